# Two different upstreams that build identical outputs; their downstreams differ only in which
# upstream they read, so both resolve to one derivation (early cutoff). Names must be equal: a CA
# output path contains the derivation name.
with import ./lib.nix;
rec {
  up-a   = ca "converge-up"   "echo same > $out" { variant = "a"; };
  up-b   = ca "converge-up"   "echo same > $out" { variant = "b"; };
  down-a = ca "converge-down" "cat ${up-a} > $out" {};
  down-b = ca "converge-down" "cat ${up-b} > $out" {};
  top    = ca "converge-top"  "cat ${down-a} ${down-b} > $out" {};
}
