let
  fod = name: mode: algo: hash: derivation {
    inherit name;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" "printf hello > $out" ];
    PATH = "/usr/bin:/bin";
    outputHashMode = mode;
    outputHashAlgo = algo;
    outputHash = hash;
  };
  rec-fod = fod "fj-fod-nar" "recursive" "sha256" "0a430879c266f8b57f4092a0f935cf3facd48bbccde5760d4748ca405171e969";
  sha512-fod = fod "fj-fod-sha512" "flat" "sha512" "9b71d224bd62f3785d96d46ad3ea3d73319bfbc2890caadae2dff72519673ca72323c3d99ba5c11d7c7acc6e14b8c5da0c4663475c2e5c3adef46f73bcdec043";
in {
  inherit rec-fod sha512-fod;
  top = derivation {
    name = "fj-top";
    system = "x86_64-linux";
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" "cat ${rec-fod} ${sha512-fod} > $out" ];
  };
}
