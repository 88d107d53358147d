//! `qr import` through the binary: fixture drvs (and their `builtins.toFile` sources) copied from a
//! directory laid out as a store into the configured store (`QR_STORE_DIR=/nix/store`, root under
//! `--state-dir`); malformed input is refused; and a process killed between "contents in place"
//! and "registered" leaves a store that is consistent on reopen.

mod common;

use std::collections::BTreeSet;
#[cfg(feature = "test-hooks")]
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

use qr::store::aterm;
use qr::store::{LocalStore, Store, StoreDir};
use serde_json::Value;

/// Writes every fixture's drvs, plus `mx-src.txt` (`builtins.toFile "mx-src.txt" "some source\n"`
/// in mixed.json's expression), into `dir`. Returns every drv path.
fn fixture_dir(dir: &Path) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let mut all = Vec::new();
    for (_, fx) in common::load_fixtures() {
        for (p, v) in common::derivations(&fx) {
            std::fs::write(
                dir.join(p.rsplit('/').next().unwrap()),
                common::s(v, "/aterm"),
            )
            .unwrap();
            all.push(p.to_string());
        }
    }
    let sd = StoreDir::default();
    let src = sd.print(&sd.make_text_path("mx-src.txt", b"some source\n", []));
    assert_eq!(
        src,
        "/nix/store/igp3ry331i6rq512l5i84f06s7mhvf65-mx-src.txt"
    );
    std::fs::write(dir.join(src.rsplit('/').next().unwrap()), "some source\n").unwrap();
    all
}

fn qr(state: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qr"));
    c.arg("--state-dir").arg(state).args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("QR_") && k != "QR_FIXTURES" {
            c.env_remove(k);
        }
    }
    c.env("QR_STORE_DIR", "/nix/store");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

async fn open(state: &Path) -> LocalStore {
    LocalStore::open(StoreDir::default(), state.join("store"))
        .await
        .unwrap()
}

#[tokio::test]
async fn import_copies_drv_closures_from_a_store_shaped_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, state) = (tmp.path().join("src"), tmp.path().join("state"));
    let drvs = fixture_dir(&src);
    let mut args = vec!["import", "--from", src.to_str().unwrap()];
    args.extend(drvs.iter().map(String::as_str));
    let out = qr(&state, &args, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().collect::<Vec<_>>(), drvs);
    // Every drv, plus the one source.
    assert!(
        stderr.contains(&format!(
            "imported {} paths (0 already valid)",
            drvs.len() + 1
        )),
        "{stderr}"
    );

    {
        let store = open(&state).await;
        for (_, fx) in common::load_fixtures() {
            for (p, v) in common::derivations(&fx) {
                let sp = store.store_dir().parse(p).unwrap();
                let want =
                    aterm::parse_named(common::s(v, "/aterm").as_bytes(), sp.drv_name()).unwrap();
                assert_eq!(store.read_derivation(p).await.unwrap(), want);
                let info = store.query_path_info(p).await.unwrap().unwrap();
                let refs: BTreeSet<String> =
                    want.references().into_iter().map(String::from).collect();
                assert_eq!(info.references, refs, "{p}");
            }
        }
        let info = store
            .query_path_info("/nix/store/igp3ry331i6rq512l5i84f06s7mhvf65-mx-src.txt")
            .await
            .unwrap()
            .unwrap();
        assert!(info.ca.unwrap().starts_with("text:sha256:"));
        store.close().await;
    }

    // Again (by base name): nothing to add.
    let base = drvs[0].rsplit('/').next().unwrap();
    let out = qr(
        &state,
        &["import", "--json", "--from", src.to_str().unwrap(), base],
        &[],
    );
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["drvs"][0], drvs[0].as_str());
    assert_eq!(v["added"], serde_json::json!([]));
    assert_eq!(v["already_valid"], serde_json::json!([drvs[0]]));
}

#[tokio::test]
async fn import_refuses_malformed_and_misnamed_drvs() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, state) = (tmp.path().join("src"), tmp.path().join("state"));
    std::fs::create_dir_all(&src).unwrap();
    let bad = "/nix/store/00000000000000000000000000000000-bad.drv";
    std::fs::write(
        src.join("00000000000000000000000000000000-bad.drv"),
        "Derive([(\"out\"",
    )
    .unwrap();
    let out = qr(
        &state,
        &["import", "--from", src.to_str().unwrap(), bad],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        format!(
            "qr: importing from {}: malformed derivation {bad}: {}/00000000000000000000000000000000-bad.drv: unexpected end of input, expected ',' at byte 14",
            src.display(),
            src.display()
        )
    );
    let missing = "/nix/store/11111111111111111111111111111111-missing.drv";
    let out = qr(
        &state,
        &["import", "--from", src.to_str().unwrap(), missing],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reading") && stderr.contains("No such file"),
        "{stderr}"
    );
    let store = open(&state).await;
    assert!(store.valid_paths().await.unwrap().is_empty());
}

/// `QR_STORE_FAULT` is a hook of the `test-hooks` feature.
#[cfg(feature = "test-hooks")]
#[tokio::test]
async fn a_process_killed_before_registration_leaves_a_consistent_store() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, state) = (tmp.path().join("src"), tmp.path().join("state"));
    let drvs = fixture_dir(&src);
    let mut args = vec!["import", "--from", src.to_str().unwrap()];
    args.extend(drvs.iter().map(String::as_str));

    // The first registration aborts the process (SIGABRT) right after the contents were moved
    // into place and fsynced, before the metadata transaction.
    let out = qr(
        &state,
        &args,
        &[("QR_STORE_FAULT", "abort-before-register")],
    );
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{out:?}");
    let root = state.join("store");
    let visible: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(
        visible.len(),
        1,
        "contents in place, unregistered: {visible:?}"
    );

    // Reopening removes them: no contents without registration, no registration without contents.
    {
        let store = open(&state).await;
        assert!(store.valid_paths().await.unwrap().is_empty());
        let left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".qr-meta")
            .collect();
        assert!(left.is_empty(), "{left:?}");
        store.close().await;
    }

    // Re-adding works.
    let out = qr(&state, &args, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = open(&state).await;
    let valid = store.valid_paths().await.unwrap();
    assert_eq!(valid.len(), drvs.len() + 1);
    for p in &valid {
        assert!(store.physical_path(p).unwrap().exists(), "{p}");
    }
    let on_disk: BTreeSet<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".qr-meta")
        .map(|n| format!("/nix/store/{n}"))
        .collect();
    assert_eq!(on_disk, valid);
}
