//! Checking an output a builder uploads, before anything enters the runner's store: the NAR is
//! spooled to a temporary file while it is hashed (narHash, narSize), scanned for references, and,
//! for a floating content-addressed output, hashed modulo its own hash part so that its path and
//! `ca` can be recomputed from the content. Only a NAR that passes is imported.

use std::collections::BTreeSet;
use std::io::{Read, Seek, Write};
use std::path::Path;

use super::jobs::Expected;
use crate::store::PathInfo;
use crate::store::StoreDir;
use crate::store::ca_output::{HashModuloWriter, ca_string};
use crate::store::hash::render_nix32;
use crate::store::nar::HashingWriter;
use crate::store::refscan::RefScanner;

/// Spools the NAR read from `nar` into a temporary file in `spool_dir` and checks it against
/// `info` and `expected`; `inputs` are the paths the output may refer to besides itself and the
/// references it claims (which must all be found in it). Returns the spooled NAR, rewound.
pub fn spool_and_verify(
    nar: &mut dyn Read,
    info: &PathInfo,
    expected: &Expected,
    inputs: &BTreeSet<String>,
    store_dir: &StoreDir,
    max_bytes: u64,
    spool_dir: &Path,
) -> Result<std::fs::File, String> {
    let sp = store_dir
        .parse(&info.path)
        .map_err(|e| format!("{}: {e}", info.path))?;
    if info.nar_size > max_bytes {
        return Err(format!(
            "{}: NAR of {} bytes exceeds the limit of {max_bytes}",
            info.path, info.nar_size
        ));
    }
    let mut candidates: BTreeSet<String> = inputs.clone();
    candidates.extend(info.references.iter().cloned());
    candidates.insert(info.path.clone());
    let parsed: Vec<_> = candidates
        .iter()
        .filter_map(|c| store_dir.parse(c).ok())
        .collect();
    let mut scanner = RefScanner::new(parsed);
    let floating = matches!(expected, Expected::Floating { .. });
    let mut modulo = if floating {
        Some(HashModuloWriter::new(sp.hash_part()).map_err(|e| e.to_string())?)
    } else {
        None
    };
    std::fs::create_dir_all(spool_dir).map_err(|e| format!("{}: {e}", spool_dir.display()))?;
    let file = tempfile::tempfile_in(spool_dir).map_err(|e| format!("spooling: {e}"))?;
    let mut hashing = HashingWriter::tee(std::io::BufWriter::new(file));
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = nar
            .read(&mut buf)
            .map_err(|e| format!("{}: receiving the NAR: {e}", info.path))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > info.nar_size || total > max_bytes {
            return Err(format!(
                "{}: the NAR is larger than the {} bytes claimed",
                info.path, info.nar_size
            ));
        }
        let chunk = &buf[..n];
        hashing
            .write_all(chunk)
            .map_err(|e| format!("spooling: {e}"))?;
        scanner.feed(chunk);
        if let Some(m) = &mut modulo {
            m.write_all(chunk).map_err(|e| e.to_string())?;
        }
    }
    let (hash, size, w) = hashing.finish();
    if hash != info.nar_hash || size != info.nar_size {
        return Err(format!(
            "{}: NAR hash or size mismatch: claimed {} ({} bytes), received {} ({size} bytes)",
            info.path,
            render_nix32(&info.nar_hash),
            info.nar_size,
            render_nix32(&hash),
        ));
    }
    let found: BTreeSet<String> = scanner.found().iter().map(|p| store_dir.print(p)).collect();
    if found != info.references {
        return Err(format!(
            "{}: claimed references {:?}, the content refers to {:?}",
            info.path, info.references, found
        ));
    }
    if let Some(m) = modulo {
        let h = m.finish().hash;
        let self_ref = info.references.contains(&info.path);
        let others = info
            .references
            .iter()
            .filter(|r| **r != info.path)
            .map(String::as_str);
        let want_path =
            store_dir.print(&store_dir.make_source_path(sp.name(), &h, others, self_ref));
        let want_ca = ca_string(&h);
        if want_path != info.path {
            return Err(format!(
                "{}: the content gives the content-addressed path {want_path}",
                info.path
            ));
        }
        if info.ca.as_deref() != Some(want_ca.as_str()) {
            return Err(format!(
                "{}: claimed content address {:?}, the content gives {want_ca}",
                info.path, info.ca
            ));
        }
    }
    let mut file = w
        .into_inner()
        .map_err(|e| format!("spooling: {}", e.error()))?;
    file.rewind().map_err(|e| format!("spooling: {e}"))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::hash::sha256;
    use crate::store::nar::NarTree;

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    /// A CA output of one file that mentions `input`, with its true info.
    fn ca_output(input: &str) -> (Vec<u8>, PathInfo) {
        let nar = NarTree::file(format!("made from {input}\n").into_bytes())
            .to_nar()
            .unwrap();
        // no self reference: the modulo hash is the plain NAR hash
        let h = sha256(&nar);
        let path = sd().print(&sd().make_source_path("out-name", &h, [input], false));
        let info = PathInfo {
            path,
            nar_hash: h,
            nar_size: nar.len() as u64,
            references: [input.to_string()].into(),
            ca: Some(ca_string(&h)),
            deriver: None,
        };
        (nar, info)
    }

    const INPUT: &str = "/nix/store/0a7vq5hmgmp4r1pqy7r6g4qdq9w2j1d1-input";

    fn check(nar: &[u8], info: &PathInfo) -> Result<std::fs::File, String> {
        let dir = tempfile::tempdir().unwrap();
        let exp = Expected::Floating {
            name: "out-name".into(),
        };
        spool_and_verify(
            &mut &nar[..],
            info,
            &exp,
            &[INPUT.to_string()].into(),
            &sd(),
            1 << 20,
            dir.path(),
        )
    }

    #[test]
    fn a_true_ca_output_passes() {
        let (nar, info) = ca_output(INPUT);
        let mut f = check(&nar, &info).unwrap();
        let mut back = Vec::new();
        f.read_to_end(&mut back).unwrap();
        assert_eq!(back, nar);
    }

    #[test]
    fn lies_are_caught() {
        let (nar, info) = ca_output(INPUT);
        // flipped content, same claims
        let mut bad = nar.clone();
        let i = bad.len() - 20;
        bad[i] ^= 1;
        assert!(check(&bad, &info).unwrap_err().contains("mismatch"));
        // a hidden reference
        let mut hidden = info.clone();
        hidden.references.clear();
        assert!(check(&nar, &hidden).unwrap_err().contains("references"));
        // right hash, wrong path
        let mut moved = info.clone();
        moved.path = "/nix/store/1b7vq5hmgmp4r1pqy7r6g4qdq9w2j1d1-out-name".into();
        assert!(
            check(&nar, &moved)
                .unwrap_err()
                .contains("content-addressed path")
        );
        // wrong ca
        let mut ca = info.clone();
        ca.ca = Some(ca_string(&[0; 32]));
        assert!(check(&nar, &ca).unwrap_err().contains("content address"));
        // larger than claimed
        let mut small = info.clone();
        small.nar_size = 8;
        assert!(check(&nar, &small).is_err());
    }
}
