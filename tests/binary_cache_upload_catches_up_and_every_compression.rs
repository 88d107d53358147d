//! The `file://` publisher follows the store, not the builds: outputs realised while no publisher
//! ran (here by `qr run` without `[cache] upload`) are published when `qr serve` starts with one,
//! and `qr run` with an upload publishes what it realised before it exits. Real Nix 2.8 substitutes
//! every fixture output from each cache, with every compression: `none` (NARs exported from the
//! store as they are served over HTTP, and written plain into the upload) and `xz`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::binary_cache::{
    check_substitution, fixture_outputs, import_instantiated, text, wait_for, write_exprs,
};
use common::cluster::Cluster;
use common::nix::{NixStore, available, generate_key};
use common::qr::Backend;

#[test]
fn upload_catches_up_at_start_and_nix_reads_none_and_xz_caches() {
    if !available() {
        return;
    }
    let fixtures = common::load_fixtures();
    let want = fixture_outputs(&fixtures);
    let Some(mut c) = Cluster::new(Backend::Sqlite) else {
        return;
    };
    let work = c.qr.state_dir().join("work");
    let exprs = write_exprs(&work.join("exprs"), &fixtures);
    let keys = NixStore::new();
    let (sk, pk) = generate_key(&keys, &work, "qr-cache-test-2");
    let drvs = import_instantiated(&c.qr, &exprs);
    let sk_env = sk.display().to_string();

    // Built with no upload configured.
    let targets: Vec<&Path> = drvs.iter().map(Path::new).collect();
    let (out, builds) =
        c.qr.run_json(&targets, &[("QR_CACHE_SECRET_KEY_FILE", &sk_env)]);
    assert!(out.status.success(), "qr run: {}", text(&out));
    assert_eq!(builds.len(), drvs.len());

    // `qr serve` with an upload publishes all of it at start; its HTTP cache serves plain NARs.
    let plain = work.join("upload-none");
    c.serve_env = vec![
        ("QR_CACHE_SECRET_KEY_FILE".into(), sk_env.clone()),
        ("QR_CACHE_COMPRESSION".into(), "none".into()),
        (
            "QR_CACHE_UPLOAD".into(),
            format!("file://{}", plain.display()),
        ),
        ("QR_CACHE_UPLOAD_INTERVAL_S".into(), "0.2".into()),
    ];
    c.start_serve();
    let narinfos: BTreeSet<String> = want
        .values()
        .flatten()
        .map(|p| format!("{}.narinfo", &p.rsplit('/').next().unwrap()[..32]))
        .collect();
    wait_for("the catch-up publication", Duration::from_secs(60), || {
        narinfos.iter().all(|n| plain.join(n).exists())
    });
    let some = std::fs::read_to_string(plain.join(narinfos.iter().next().unwrap())).unwrap();
    assert!(some.contains("Compression: none\n"), "{some}");
    let http = format!("http://127.0.0.1:{}", c.http_port);
    let (code, _, info) = c.http_get(&format!("/{}", narinfos.iter().next().unwrap()));
    assert_eq!(code, 200);
    assert!(
        info.contains("Compression: none\n") && info.contains(".nar\n"),
        "{info}"
    );
    check_substitution("http none", &exprs, &http, &pk, &want);
    check_substitution(
        "file none",
        &exprs,
        &format!("file://{}", plain.display()),
        &pk,
        &want,
    );
    c.serve.take();

    // `qr run` with an upload (everything already built) publishes before it exits.
    let xz = work.join("upload-xz");
    let upload = format!("file://{}", xz.display());
    let (out, _) = c.qr.run_json(
        &targets,
        &[
            ("QR_CACHE_SECRET_KEY_FILE", &sk_env),
            ("QR_CACHE_COMPRESSION", "xz"),
            ("QR_CACHE_UPLOAD", &upload),
        ],
    );
    assert!(out.status.success(), "qr run: {}", text(&out));
    for n in &narinfos {
        let t = std::fs::read_to_string(xz.join(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
        assert!(t.contains("Compression: xz\n"), "{t}");
    }
    check_substitution("file xz", &exprs, &upload, &pk, &want);
}
