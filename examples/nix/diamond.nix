# classic diamond: top -> {left,right} -> base (the `diamond` fixture)
with import ./lib.nix;
rec {
  base  = ca "dia-base"  "echo base > $out" {};
  left  = ca "dia-left"  "echo left ${base} > $out" {};
  right = ca "dia-right" "echo right ${base} > $out" {};
  top   = ca "dia-top"   "cat ${left} ${right} > $out" { l = left; r = right; };
}
