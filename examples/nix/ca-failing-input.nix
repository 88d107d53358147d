# A CA derivation whose builder fails, and a CA dependent that can therefore never be resolved.
with import ./lib.nix;
rec {
  input     = ca "fail-input"     "echo fail-input fails on purpose; exit 1" {};
  dependent = ca "fail-dependent" "cat ${input} > $out" {};
}
