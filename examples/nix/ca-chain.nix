# a -> b -> c, all floating CA (the `chain` fixture); b also mentions a in its env.
with import ./lib.nix;
rec {
  a = ca "chain-a" "echo hello > $out" {};
  b = ca "chain-b" "echo ${a} > $out; cat ${a} >> $out" { dep = a; };
  c = ca "chain-c" "mkdir $out; echo ${b} > $out/b-path; cat ${b} > $out/b-content" {};
}
