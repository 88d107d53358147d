//! Nix's formats and algorithms, reproduced byte for byte, and the store.
