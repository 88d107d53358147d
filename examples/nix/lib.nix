# The nix-oracle fixtures' lib.nix, reconstructed from their derivations (scripts/nix-relocation-oracle
# checks that it reproduces every fixture derivation exactly under /nix/store).
let
  base = name: script: attrs: {
    inherit name;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  } // attrs;
in {
  ca = name: script: attrs: derivation (base name script attrs // {
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; });
  ia = name: script: attrs: derivation (base name script attrs);
  fod = name: derivation (base name "printf hello > $out" {} // {
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"; });
}
