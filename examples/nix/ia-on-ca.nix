# Input-addressed derivations on a CA one: deferred, directly and transitively (part of the
# `mixed` fixture).
with import ./lib.nix;
rec {
  ca1            = ca "mx-ca1" "echo ca1 > $out" {};
  ia_on_ca       = ia "mx-ia-on-ca" "echo ${ca1} > $out" { dep = ca1; };
  ia_on_ia_on_ca = ia "mx-ia-on-ia-on-ca" "cat ${ia_on_ca} > $out" {};
}
