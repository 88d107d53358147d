//! The `.narinfo` text a binary cache serves for a store path, and Nix's signature fingerprint.

use std::fmt::Write as _;

use super::compression::Compression;
use super::key::SecretKey;
use crate::store::api::PathInfo;
use crate::store::hash::Sha256Hash;
use crate::store::nix32;

/// Where a path's (possibly compressed) NAR file is and what it hashes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarFile {
    /// Relative to the cache root, e.g. `nar/<file hash>.nar.zst`.
    pub url: String,
    pub compression: Compression,
    pub file_hash: Sha256Hash,
    pub file_size: u64,
}

impl NarFile {
    /// The URL of a NAR file whose contents hash to `file_hash`.
    pub fn url_for(file_hash: &Sha256Hash, compression: Compression) -> String {
        format!(
            "nar/{}.nar{}",
            nix32::encode(file_hash),
            compression.suffix()
        )
    }
}

fn base(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Nix's fingerprint of a path's info: `1;<path>;sha256:<nix32>;<size>;<refs, full, comma-sep>`.
pub fn fingerprint(info: &PathInfo) -> String {
    let refs: Vec<&str> = info.references.iter().map(String::as_str).collect();
    format!(
        "1;{};sha256:{};{};{}",
        info.path,
        nix32::encode(&info.nar_hash),
        info.nar_size,
        refs.join(",")
    )
}

/// The narinfo text for `info` whose NAR is `file`, signed with `key` if given.
pub fn render(info: &PathInfo, file: &NarFile, key: Option<&SecretKey>) -> String {
    let mut o = String::new();
    let refs: Vec<&str> = info.references.iter().map(|r| base(r)).collect();
    // Writing to a String cannot fail.
    let _ = writeln!(o, "StorePath: {}", info.path);
    let _ = writeln!(o, "URL: {}", file.url);
    let _ = writeln!(o, "Compression: {}", file.compression.name());
    let _ = writeln!(o, "FileHash: sha256:{}", nix32::encode(&file.file_hash));
    let _ = writeln!(o, "FileSize: {}", file.file_size);
    let _ = writeln!(o, "NarHash: sha256:{}", nix32::encode(&info.nar_hash));
    let _ = writeln!(o, "NarSize: {}", info.nar_size);
    let _ = writeln!(o, "References: {}", refs.join(" "));
    if let Some(d) = &info.deriver {
        let _ = writeln!(o, "Deriver: {}", base(d));
    }
    if let Some(ca) = &info.ca {
        let _ = writeln!(o, "CA: {ca}");
    }
    if let Some(k) = key {
        let _ = writeln!(o, "Sig: {}", k.sign(&fingerprint(info)));
    }
    o
}

/// `nix-cache-info` for a cache of `store_dir`.
pub fn cache_info(store_dir: &str, want_mass_query: bool, priority: u32) -> String {
    format!(
        "StoreDir: {store_dir}\nWantMassQuery: {}\nPriority: {priority}\n",
        u8::from(want_mass_query)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::hash::parse_sha256;

    fn info() -> PathInfo {
        PathInfo {
            path: "/nix/store/i5ypy73hffqhy85x5yn0k88yjym4brb5-chain-c".into(),
            nar_hash: parse_sha256("sha256-C8P1Gqtyp6mcCgTHUkNS1bwMyK14nRTcVv6VMuWpfYo=").unwrap(),
            nar_size: 592,
            references: [
                "/nix/store/0zayk9fff6r40rskq10v79cpw508v2w2-chain-b".to_string(),
                "/nix/store/nscyc94rf5cvmf5i5xpbbgd4wscv2z9d-chain-a".to_string(),
            ]
            .into(),
            ca: Some("fixed:r:sha256:12kxm7jk55gyavf197bqmp40rg6ma91m5iq41afak9vjmcdgbhqb".into()),
            deriver: Some("/nix/store/i71rklk2yc6fy19ck9yvn90av1xw6rx5-chain-c.drv".into()),
        }
    }

    #[test]
    fn fingerprint_is_nix_s() {
        let i = info();
        let h = nix32::encode(&i.nar_hash);
        assert_eq!(
            fingerprint(&i),
            format!(
                "1;/nix/store/i5ypy73hffqhy85x5yn0k88yjym4brb5-chain-c;sha256:{h};592;\
                 /nix/store/0zayk9fff6r40rskq10v79cpw508v2w2-chain-b,\
                 /nix/store/nscyc94rf5cvmf5i5xpbbgd4wscv2z9d-chain-a"
            )
        );
    }

    #[test]
    fn narinfo_has_every_field_and_a_verifiable_sig() {
        let i = info();
        let key = SecretKey::from_seed("cache-1", [3; 32]);
        let file = NarFile {
            url: NarFile::url_for(&[9; 32], Compression::Zstd),
            compression: Compression::Zstd,
            file_hash: [9; 32],
            file_size: 321,
        };
        let text = render(&i, &file, Some(&key));
        let h = nix32::encode(&i.nar_hash);
        let f = nix32::encode(&[9; 32]);
        let want_head = format!(
            "StorePath: /nix/store/i5ypy73hffqhy85x5yn0k88yjym4brb5-chain-c\n\
             URL: nar/{f}.nar.zst\n\
             Compression: zstd\n\
             FileHash: sha256:{f}\n\
             FileSize: 321\n\
             NarHash: sha256:{h}\n\
             NarSize: 592\n\
             References: 0zayk9fff6r40rskq10v79cpw508v2w2-chain-b nscyc94rf5cvmf5i5xpbbgd4wscv2z9d-chain-a\n\
             Deriver: i71rklk2yc6fy19ck9yvn90av1xw6rx5-chain-c.drv\n\
             CA: fixed:r:sha256:12kxm7jk55gyavf197bqmp40rg6ma91m5iq41afak9vjmcdgbhqb\n"
        );
        assert!(text.starts_with(&want_head), "{text}");
        // the hashes are bare nix32 after `sha256:` (52 characters), and read back
        let nar_hash = text
            .lines()
            .find_map(|l| l.strip_prefix("NarHash: sha256:"))
            .unwrap();
        assert_eq!(nar_hash.len(), 52, "{nar_hash}");
        assert_eq!(nix32::decode(nar_hash, 32).unwrap(), i.nar_hash.to_vec());
        assert_eq!(
            parse_sha256(&format!("sha256:{nar_hash}")).unwrap(),
            i.nar_hash
        );
        let sig = text
            .lines()
            .find_map(|l| l.strip_prefix("Sig: "))
            .expect("a Sig line");
        assert!(key.public().verify(&fingerprint(&i), sig));
        // unsigned: no Sig line; no deriver or CA: no such lines
        let mut bare = i.clone();
        bare.deriver = None;
        bare.ca = None;
        bare.references.clear();
        let t = render(&bare, &file, None);
        assert!(!t.contains("Sig:") && !t.contains("Deriver:") && !t.contains("CA:"));
        assert!(t.contains("References: \n"), "{t}");
    }

    #[test]
    fn cache_info_lines() {
        assert_eq!(
            cache_info("/nix/store", true, 40),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
        );
    }
}
