//! Which paths this process knows to be valid, so the hot paths of a busy runner (a build's
//! outputs, a resolved drv's inputs, a registration's references) do not ask the metadata
//! database again and again.
//!
//! Only positive answers are kept: a path becomes valid when someone registers it (here or in
//! another process, e.g. `qr import`), and stops being valid only through this store's own
//! garbage collection or open-time recovery, which drop it from the cache. Entries are 128-bit
//! digests of the path (16 bytes each, not the string), so 200k paths cost a few MiB.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::store::hash::sha256;

#[derive(Debug, Default)]
pub(crate) struct ValidCache {
    known: Mutex<HashSet<u128>>,
}

fn key(path: &str) -> u128 {
    let h = sha256(path.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    u128::from_le_bytes(b)
}

impl ValidCache {
    pub(crate) fn contains(&self, path: &str) -> bool {
        let k = key(path);
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&k)
    }

    pub(crate) fn insert<'a>(&self, paths: impl IntoIterator<Item = &'a str>) {
        let keys: Vec<u128> = paths.into_iter().map(key).collect();
        let mut m = self.known.lock().unwrap_or_else(|p| p.into_inner());
        m.extend(keys);
    }

    pub(crate) fn remove<'a>(&self, paths: impl IntoIterator<Item = &'a str>) {
        let keys: Vec<u128> = paths.into_iter().map(key).collect();
        let mut m = self.known.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            m.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a";
    const B: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b";

    #[test]
    fn knows_what_was_inserted_until_removed() {
        let c = ValidCache::default();
        assert!(!c.contains(A));
        c.insert([A, B]);
        assert!(c.contains(A) && c.contains(B));
        // Another name with the same hash part is another path.
        assert!(!c.contains("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-b"));
        c.remove([A]);
        assert!(!c.contains(A));
        assert!(c.contains(B));
    }
}
