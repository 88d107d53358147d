//! One drv built by real Nix ([`NixStore`]) and by qr's native executor from the same drv files,
//! and what each made compared: output paths, NAR hashes, NAR sizes and references.

use std::collections::BTreeSet;

use qr::builder::executor::{BuildResult, ExecError, Limits, NativeExecutor};
use qr::store::Store;
use qr::store::hash::render_sri;

use super::nix::NixStore;

/// Imports `drv`'s closure from `nix`'s store into the executor's, builds its inputs there
/// (inputs before the drvs that use them; already built ones are not rebuilt), then `drv`.
pub async fn native_build(
    exec: &NativeExecutor,
    nix: &NixStore,
    drv: &str,
) -> Result<BuildResult, ExecError> {
    let store = exec.store();
    store
        .import_from_dir(&nix.physical_store(), &[drv.to_string()])
        .await
        .expect("importing the drv closure from Nix's store");
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    let mut stack = vec![(drv.to_string(), false)];
    while let Some((p, expanded)) = stack.pop() {
        if expanded {
            order.push(p);
            continue;
        }
        if !seen.insert(p.clone()) {
            continue;
        }
        stack.push((p.clone(), true));
        let d = store.read_derivation(&p).await.expect("read drv");
        stack.extend(d.input_drvs.keys().map(|i| (i.clone(), false)));
    }
    let top = order.pop().expect("the drv itself");
    assert_eq!(top, drv);
    for input in order {
        let i = store.read_derivation(&input).await.expect("read input drv");
        exec.build(&input, &i, Limits::default())
            .await
            .unwrap_or_else(|e| panic!("building input {input}: {e}"));
    }
    let d = store.read_derivation(drv).await.expect("read drv");
    exec.build(drv, &d, Limits::default()).await
}

/// Builds `drv` (called `what` in messages) with Nix and with the native executor: the same
/// output paths, NAR hashes, sizes and references. Returns the native executor's result.
pub async fn assert_same_outputs(
    exec: &NativeExecutor,
    nix: &NixStore,
    what: &str,
    drv: &str,
) -> BuildResult {
    let nix_paths = nix
        .realise(drv)
        .unwrap_or_else(|e| panic!("Nix failed to build {what}: {e}"));
    let r = native_build(exec, nix, drv)
        .await
        .unwrap_or_else(|e| panic!("the native executor failed to build {what}: {e}"));
    assert!(r.ran, "{what}");
    let qr_paths: BTreeSet<String> = r.outputs.values().map(|i| i.path.clone()).collect();
    assert_eq!(qr_paths, nix_paths, "{what}: output paths");
    let store = exec.store();
    // What the native executor's output holds, for a NAR hash that differs.
    let show = |p: &str| {
        let phys = store.physical_path(p).expect("physical path");
        let mut s = String::new();
        for f in ["", "/.attrs.json", "/.attrs.sh", "/env", "/vars"] {
            if let Ok(t) = std::fs::read_to_string(format!("{}{f}", phys.display())) {
                s.push_str(&format!("--- {f}\n{t}\n"));
            }
        }
        s
    };
    for (o, info) in &r.outputs {
        let n = nix.path_info(&info.path);
        assert_eq!(
            render_sri(&info.nar_hash),
            n["narHash"].as_str().expect("narHash"),
            "{what}.{o}: NAR hash; the native executor's output:\n{}",
            show(&info.path)
        );
        assert_eq!(
            info.nar_size,
            n["narSize"].as_u64().expect("narSize"),
            "{what}.{o}: NAR size"
        );
        let refs: BTreeSet<String> = n["references"]
            .as_array()
            .expect("references")
            .iter()
            .map(|r| r.as_str().expect("a reference").to_string())
            .collect();
        assert_eq!(info.references, refs, "{what}.{o}: references");
    }
    r
}

/// A message as compared: colours removed, whitespace runs as one space (Nix indents the lines
/// of a message).
pub fn normalise(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}
