//! Nix Archives (NAR): the canonical serialisation of a filesystem tree that `narHash` is taken over.
//!
//! Format (`nix-archive-1`): every string is a little-endian u64 length, the bytes, and zero padding
//! to a multiple of 8. After the magic string comes one node:
//!
//! ```text
//! node  = "(" "type" ( "regular" ["executable" ""] "contents" <u64 size> <bytes> <padding>
//!                    | "symlink" "target" <string>
//!                    | "directory" entry* ) ")"
//! entry = "entry" "(" "name" <string> "node" node ")"
//! ```
//!
//! Directory entries are sorted by the bytes of their names. The writer ([`dump_path`],
//! [`write_tree`]) produces exactly what Nix produces; the reader ([`NarReader`], [`restore`],
//! [`NarTree::from_nar`]) accepts only that canonical form, so anything it accepts re-serialises to
//! the identical bytes.

mod read;
mod tree;
mod write;

pub use read::{NarError, NarErrorKind, NarEvent, NarLimits, NarReader, RestoreError, restore};
pub use tree::NarTree;
pub use write::{
    HashingWriter, NarWriteError, dump_path, nar_hash_and_size, tree_hash_and_size, write_tree,
};

/// The magic string every NAR starts with.
pub const NAR_MAGIC: &str = "nix-archive-1";

/// Checks a directory entry name as Nix's NAR parser does: not empty, not `.` or `..`, no `/`, no NUL.
pub fn validate_entry_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("empty name")
    } else if name == b"." || name == b".." {
        Err("name is . or ..")
    } else if name.contains(&b'/') {
        Err("name contains a slash")
    } else if name.contains(&0) {
        Err("name contains a NUL byte")
    } else {
        Ok(())
    }
}

/// Checks a symlink target: not empty (no filesystem can hold that) and no NUL byte.
pub fn validate_symlink_target(target: &[u8]) -> Result<(), &'static str> {
    if target.is_empty() {
        Err("empty target")
    } else if target.contains(&0) {
        Err("target contains a NUL byte")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
