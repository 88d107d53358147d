//! `qr serve` builds the fixture graphs (CA, deferred, IA, fixed-output, multi-output; store dir
//! `/nix/store`) and serves them as a signed binary cache; real Nix 2.8 (nix-bin, offline), in
//! fresh stores holding only the instantiated `.drv` files, substitutes every output with
//! `--max-jobs 0` (nothing may be built locally) to exactly the fixtures' paths — from
//! `http://127.0.0.1:PORT` and from the `file://` directory the publisher filled. With another
//! trusted key Nix refuses the input-addressed paths; `nix copy --from` and `nix log` work.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::binary_cache::{
    check_substitution, fixture_outputs, import_instantiated, realise, text, wait_for, write_exprs,
};
use common::cluster::Cluster;
use common::nix::{NixStore, available, generate_key};
use common::qr::Backend;
use serde_json::Value;

#[test]
fn nix_substitutes_every_fixture_output_from_qr_s_cache_over_http_and_file() {
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
    let (sk, pk) = generate_key(&keys, &work, "qr-cache-test-1");
    let (_, other_pk) = generate_key(&keys, &work, "qr-cache-other-1");
    let upload = work.join("upload");

    // Instantiate in a scratch Nix store and import the drvs into the runner's store.
    let drvs = import_instantiated(&c.qr, &exprs);

    c.serve_env = vec![
        ("QR_LOCAL_BUILDER_ENABLED".into(), "true".into()),
        ("QR_LOCAL_BUILDER_MAX_JOBS".into(), "2".into()),
        ("QR_CACHE_SECRET_KEY_FILE".into(), sk.display().to_string()),
        (
            "QR_CACHE_UPLOAD".into(),
            format!("file://{}", upload.display()),
        ),
        ("QR_CACHE_UPLOAD_INTERVAL_S".into(), "0.2".into()),
    ];
    c.start_serve();
    let targets: Vec<&Path> = drvs.iter().map(Path::new).collect();
    let (out, builds) = c.finish(c.submit(&targets, 300));
    assert!(
        out.status.success(),
        "qr submit: {}\n{}",
        text(&out),
        c.serve_logs()
    );
    assert_eq!(builds.len(), drvs.len(), "{}", text(&out));
    for b in &builds {
        assert_eq!(b["status"], 0, "build failed: {b}\n{}", c.serve_logs());
    }
    let http = format!("http://127.0.0.1:{}", c.http_port);
    // `[cache] precompress` (the default) compresses every realised output's NAR ahead.
    let nar_dir = c.qr.state_dir().join("cache/nar");
    // (One record per NAR hash: outputs with equal contents share one.)
    let outputs: BTreeSet<&str> = fixtures
        .iter()
        .flat_map(|(_, fx)| fx["output_path_infos"].as_object().expect("infos").values())
        .map(|i| common::s(i, "/narHash"))
        .collect();
    let outputs = outputs.len();
    wait_for("precompressed NARs", Duration::from_secs(60), || {
        std::fs::read_dir(&nar_dir).is_ok_and(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".zstd"))
                .count()
                >= outputs
        })
    });
    check_documents(&c, &fixtures, &pk);

    // Over HTTP.
    let nix = check_substitution("http", &exprs, &http, &pk, &want);
    // The input-addressed paths carry our signature.
    let ia_leaf = "/nix/store/9g88l3kmpnlsx5wamsbfm5h9s30i7ba3-mx-ia-leaf";
    let sigs = nix.run("nix", &["path-info", "--sigs", ia_leaf]);
    assert!(
        String::from_utf8_lossy(&sigs.stdout).contains("qr-cache-test-1:"),
        "{}",
        text(&sigs)
    );

    // `nix log` of a CA drv that was resolved (its log is the resolved drv's) and of an IA drv.
    let logs_drvs = nix.instantiate(exprs.last().unwrap());
    let logs_drv = |suffix: &str| -> String {
        logs_drvs
            .iter()
            .find(|d| d.ends_with(suffix))
            .cloned()
            .unwrap_or_else(|| panic!("no {suffix} in {logs_drvs:?}"))
    };
    for (drv, line) in [
        (logs_drv("-cache-log-ia.drv"), "qr-cache-log-ia-line"),
        (logs_drv("-cache-log-ca.drv"), "qr-cache-log-ca-line"),
    ] {
        let out = nix.run(
            "nix",
            &["log", "--option", "substituters", &http, drv.as_str()],
        );
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(line),
            "nix log {drv}: {}",
            text(&out)
        );
    }

    // `nix copy --from` into another fresh store.
    let copy = NixStore::new();
    let chain_c = "/nix/store/i5ypy73hffqhy85x5yn0k88yjym4brb5-chain-c";
    let out = copy.run(
        "nix",
        &[
            "copy",
            "--from",
            &http,
            "--option",
            "trusted-public-keys",
            &pk,
            chain_c,
            ia_leaf,
        ],
    );
    assert!(out.status.success(), "nix copy --from: {}", text(&out));
    for p in [
        chain_c,
        "/nix/store/0zayk9fff6r40rskq10v79cpw508v2w2-chain-b",
        "/nix/store/nscyc94rf5cvmf5i5xpbbgd4wscv2z9d-chain-a",
        ia_leaf,
    ] {
        assert!(copy.is_valid(p), "nix copy: {p} not valid");
    }

    // With another trusted key Nix refuses the input-addressed paths (and has nothing to build
    // them with).
    let refuse = NixStore::new();
    let mixed =
        refuse.instantiate(&exprs[fixtures.iter().position(|(n, _)| n == "mixed").unwrap()]);
    let ia_leaf_drv: Vec<String> = mixed
        .iter()
        .filter(|d| d.ends_with("-mx-ia-leaf.drv") || d.ends_with("-mx-ia-on-ia.drv"))
        .cloned()
        .collect();
    assert_eq!(ia_leaf_drv.len(), 2, "{mixed:?}");
    let out = realise(&refuse, &ia_leaf_drv, &http, &other_pk);
    assert!(
        !out.status.success(),
        "substituted with an untrusted key: {}",
        text(&out)
    );
    assert!(
        !refuse.is_valid(ia_leaf),
        "an unsigned IA path became valid"
    );

    // The same from the file:// cache the publisher filled (it publishes as outputs are
    // realised; wait until the last of them is there).
    let expected_narinfos: BTreeSet<String> = want
        .values()
        .flatten()
        .map(|p| {
            let base = p.rsplit('/').next().unwrap();
            format!("{}.narinfo", &base[..32])
        })
        .collect();
    wait_for("the file:// cache", Duration::from_secs(60), || {
        expected_narinfos.iter().all(|n| upload.join(n).exists())
    });
    assert!(upload.join("nix-cache-info").exists());
    let file_url = format!("file://{}", upload.display());
    let nix = check_substitution("file", &exprs, &file_url, &pk, &want);
    let drv = &logs_drv("-cache-log-ca.drv");
    let out = nix.run(
        "nix",
        &["log", "--option", "substituters", &file_url, drv.as_str()],
    );
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("qr-cache-log-ca-line"),
        "nix log from file://: {}",
        text(&out)
    );
}

fn base(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// Every fixture realisation (of the drv as queued and of the resolved drv) is served with Nix's
/// own id, output and dependentRealisations, signed; the build trace of Nix ≥ 2.35 too; HEAD
/// answers without a body; what is not there is a 404.
fn check_documents(c: &Cluster, fixtures: &[(String, Value)], pk: &str) {
    let pk = qr::cache::PublicKey::parse(pk).expect("the generated public key parses");
    let mut checked = 0;
    for (name, fx) in fixtures {
        for (drv, v) in common::derivations(fx) {
            let mut docs = vec![(drv.to_string(), &v["realisations"])];
            if v["resolved"].is_object() {
                docs.push((
                    common::s(v, "/resolved/drv_path").to_string(),
                    &v["resolved"]["realisations"],
                ));
            }
            for (d, rs) in docs {
                for (o, r) in rs.as_object().expect("realisations") {
                    let id = common::s(r, "/id");
                    let (code, _, body) = c.http_get(&format!("/realisations/{id}.doi"));
                    assert_eq!(code, 200, "{name}: realisation {id} of {d}: {body}");
                    let doc: Value = serde_json::from_str(&body).expect("realisation JSON");
                    assert_eq!(doc["id"], id, "{name} {d}");
                    assert_eq!(
                        doc["outPath"],
                        base(common::s(r, "/out_path")),
                        "{name} {d}"
                    );
                    let want: BTreeMap<String, String> = r["dependent_realisations"]
                        .as_object()
                        .expect("dependent_realisations")
                        .iter()
                        .map(|(k, p)| (k.clone(), base(p.as_str().unwrap()).to_string()))
                        .collect();
                    let got: BTreeMap<String, String> = doc["dependentRealisations"]
                        .as_object()
                        .expect("dependentRealisations")
                        .iter()
                        .map(|(k, p)| (k.clone(), p.as_str().unwrap_or_default().to_string()))
                        .collect();
                    assert_eq!(got, want, "{name}: dependentRealisations of {d}^{o}");
                    // Signed over the document without its signatures.
                    let mut unsigned = doc.clone();
                    let sig = doc["signatures"][0]
                        .as_str()
                        .expect("a signature")
                        .to_string();
                    unsigned.as_object_mut().unwrap().remove("signatures");
                    let fp = serde_json::to_string(&common::instantiate::sorted(unsigned)).unwrap();
                    assert!(pk.verify(&fp, &sig), "{name}: signature of {id}");
                    // The build trace of newer Nix, keyed by the drv path.
                    let (code, _, body) =
                        c.http_get(&format!("/build-trace-v2/{}/{o}.doi", base(&d)));
                    assert_eq!(code, 200, "{name}: build trace of {d}^{o}: {body}");
                    let t: Value = serde_json::from_str(&body).expect("build trace JSON");
                    assert_eq!(t["outPath"], base(common::s(r, "/out_path")));
                    assert_eq!(t["signatures"][0]["keyName"], "qr-cache-test-1");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 40, "only {checked} realisations checked");

    let (code, ctype, body) = c.http_get("/nix-cache-info");
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/x-nix-cache-info"), "{ctype}");
    assert!(body.contains("StoreDir: /nix/store\n"), "{body}");
    // HEAD of a narinfo and of its NAR: headers, no body.
    let narinfo = c.http_get("/nscyc94rf5cvmf5i5xpbbgd4wscv2z9d.narinfo").2;
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("URL");
    for path in [
        "/nscyc94rf5cvmf5i5xpbbgd4wscv2z9d.narinfo".to_string(),
        format!("/{url}"),
    ] {
        let (code, head, body) = http_raw(c.http_port, "HEAD", &path);
        assert_eq!(code, 200, "HEAD {path}: {head}");
        assert!(body.is_empty(), "HEAD {path} has a body");
    }
    // Contents in the store's root that are not registered (as a staged or half-written path
    // is) are not served.
    let stray = "1b9p07z77phvv2hf6gm9f28syrbwpjmn";
    let stray_dir =
        c.qr.state_dir()
            .join("nix-store")
            .join(format!("{stray}-staged"));
    std::fs::create_dir_all(&stray_dir).unwrap();
    std::fs::write(stray_dir.join("file"), "half written").unwrap();
    let (code, _, _) = c.http_get(&format!("/{stray}.narinfo"));
    assert_eq!(code, 404, "an unregistered path was served");
    std::fs::remove_dir_all(&stray_dir).unwrap();
    // Not there: 404 (Nix relies on it).
    for path in [
        "/00000000000000000000000000000000.narinfo",
        "/nscyc94rf5cvmf5i5xpbbgd4wscv2z9d.nar",
        "/not-a-hash.narinfo",
        "/nar/0000000000000000000000000000000000000000000000000000.nar.zst",
        "/nar/0000000000000000000000000000000000000000000000000000.nar",
        "/nar/../../etc/passwd",
        "/realisations/sha256:0000000000000000000000000000000000000000000000000000000000000000!out.doi",
        "/realisations/garbage.doi",
        "/build-trace-v2/00000000000000000000000000000000-x.drv/out.doi",
        "/build-trace-v2/..%2F..%2Fetc/out.doi",
        "/log/00000000000000000000000000000000-x.drv",
        "/log/..%2Fqr.db",
    ] {
        let (code, _, _) = c.http_get(path);
        assert_eq!(code, 404, "GET {path}");
        let (code, _, _) = http_raw(c.http_port, "HEAD", path);
        assert_eq!(code, 404, "HEAD {path}");
    }
}

/// `METHOD path` on `port`: (status, head, body).
fn http_raw(port: u16, method: &str, path: &str) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let body = raw.get(split + 4..).unwrap_or_default().to_vec();
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head, body)
}
