//! `derivation show` JSON of every Nix from 2.8 to 2.35 — unversioned (2.8, 2.18, 2.23 shapes),
//! version 3 (2.32) and version 4 (2.33 on) — is read into the derivations Nix 2.8 wrote: the same
//! ATerm byte for byte and the same drv path, for every fixture graph (IA, fixed flat and
//! recursive sha256 and flat sha512, floating CA, deferred, multiple outputs). `qr run FILE.json`
//! builds the 2.8, version 3 and version 4 documents of a graph to Nix's own output paths, and
//! `qr submit` queues the same builds from either. Real Nix 2.8's `nix show-derivation` output
//! parses to the drvs it wrote. Malformed documents are refused with the reason, by the library
//! and by `qr run`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::qr::{Backend, Qr};
use qr::store::StoreDir;
use qr::store::derivation::Derivation;
use qr::store::drv_json::{DocumentShape, ShowJsonError, parse_show_document};
use qr::store::hash_modulo::DrvHashes;
use serde_json::{Value, json};

const GRAPHS: [&str; 5] = ["chain", "diamond", "mixed", "multi", "fods"];
const FORMATS: [(&str, DocumentShape); 5] = [
    ("nix-2.8", DocumentShape::KeyedByPath),
    ("nix-2.18", DocumentShape::KeyedByPath),
    ("nix-2.23", DocumentShape::KeyedByPath),
    ("nix-2.32", DocumentShape::KeyedByBaseName),
    ("nix-2.33", DocumentShape::Wrapped),
];

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/drv-json")
}

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn doc_file(graph: &str, format: &str) -> PathBuf {
    data_dir().join(format!("{graph}.{format}.json"))
}

/// What Nix 2.8 wrote for the graph: the nix-oracle fixture, or `fods.json` made alike.
fn oracle(graph: &str) -> Value {
    if graph == "fods" {
        read_json(&data_dir().join("fods.json"))
    } else {
        read_json(&common::fixtures_dir().join(format!("{graph}.json")))
    }
}

fn oracle_aterms(graph: &str) -> BTreeMap<String, String> {
    common::derivations(&oracle(graph))
        .into_iter()
        .map(|(p, d)| {
            (
                p.to_string(),
                d["aterm"].as_str().expect("aterm").to_string(),
            )
        })
        .collect()
}

/// Nix's output paths of the graph, drv path → output → path.
fn oracle_outputs(graph: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let o = oracle(graph);
    if graph == "fods" {
        return serde_json::from_value(o["outputs"].clone()).expect("outputs");
    }
    common::derivations(&o)
        .into_iter()
        .map(|(p, d)| {
            let outs = d["realisations"]
                .as_object()
                .expect("realisations")
                .iter()
                .map(|(n, r)| (n.clone(), r["out_path"].as_str().expect("out_path").into()))
                .collect();
            (p.to_string(), outs)
        })
        .collect()
}

fn no_external(p: &str) -> Result<Derivation, String> {
    Err(format!("{p} is not in the document"))
}

fn import(doc: &Value) -> Result<Vec<(String, Derivation)>, String> {
    // A configured store dir that is not the document's is tried first and must not be taken.
    let hint = StoreDir::new("/var/lib/qr/store").unwrap();
    let parsed = parse_show_document(doc, &[hint]).map_err(|e| e.to_string())?;
    let sd = parsed.store_dir.clone();
    let mut hs = DrvHashes::new(sd.clone());
    Ok(parsed
        .import(&mut hs, &mut no_external)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(p, d)| (sd.print(&p), d))
        .collect())
}

#[test]
fn every_format_gives_the_aterm_and_drv_path_nix_2_8_wrote() {
    let sd = StoreDir::default();
    for graph in GRAPHS {
        let aterms = oracle_aterms(graph);
        let mut first: Option<BTreeMap<String, Derivation>> = None;
        for (format, shape) in FORMATS {
            let doc = read_json(&doc_file(graph, format));
            let parsed =
                parse_show_document(&doc, &[]).unwrap_or_else(|e| panic!("{graph} {format}: {e}"));
            assert_eq!(parsed.shape, shape, "{graph} {format}");
            assert_eq!(parsed.store_dir, sd, "{graph} {format}: store dir");
            let drvs = import(&doc).unwrap_or_else(|e| panic!("{graph} {format}: {e}"));
            assert_eq!(drvs.len(), aterms.len(), "{graph} {format}: derivations");
            for (path, d) in &drvs {
                let want = aterms
                    .get(path)
                    .unwrap_or_else(|| panic!("{graph} {format}: {path} is not Nix's"));
                assert_eq!(&d.to_aterm(), want, "{graph} {format}: ATerm of {path}");
                assert_eq!(
                    sd.print(&d.drv_path(&sd).unwrap()),
                    *path,
                    "{graph} {format}: drv path"
                );
            }
            let drvs: BTreeMap<String, Derivation> = drvs.into_iter().collect();
            match &first {
                None => first = Some(drvs),
                Some(f) => assert_eq!(&drvs, f, "{graph} {format}: not the 2.8 derivations"),
            }
        }
    }
}

#[test]
fn malformed_documents_are_refused_with_the_reason() {
    let v4 = read_json(&doc_file("mixed", "nix-2.33"));
    let first_key = v4["derivations"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    let err = |f: &dyn Fn(&mut Value)| {
        let mut d = v4.clone();
        f(&mut d);
        import(&d).expect_err("a malformed document was accepted")
    };
    assert!(err(&|d| d["version"] = json!(5)).contains("version 5"));
    assert!(err(&|d| d["derivations"][&first_key]["version"] = json!(3)).contains("inputSrcs"));
    let e = err(&|d| {
        d["derivations"][&first_key]
            .as_object_mut()
            .unwrap()
            .remove("inputs");
    });
    assert!(
        e.contains(&first_key) && e.contains("\"inputs\" is missing"),
        "{e}"
    );
    let e = err(&|d| d["derivations"][&first_key]["inputs"]["srcs"] = json!(["/nix/store/x"]));
    assert!(e.contains("not a valid store path"), "{e}");
    let e = err(&|d| {
        d["derivations"][&first_key]["inputs"]["drvs"] = json!({
            "c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-dep2.drv":
                {"outputs": ["out"], "dynamicOutputs": {"out": {"outputs": ["out"], "dynamicOutputs": {}}}}
        })
    });
    // Dynamic inputs are read (dynamic derivations); the document is refused because the
    // derivation no longer has its key's contents, not for them.
    assert!(!e.contains("dynamic"), "{e}");
    // A key whose hash part is not the derivation's: the other keys give the store dir, and
    // this one is not its derivation's path.
    let mut wrong = v4.clone();
    let ds = wrong["derivations"].as_object_mut().unwrap();
    let d = ds.remove(&first_key).unwrap();
    let bad_key = format!("00000000000000000000000000000000{}", &first_key[32..]);
    ds.insert(bad_key.clone(), d.clone());
    let e = import(&wrong).unwrap_err();
    assert!(e.contains("the derivation's contents give the path"), "{e}");
    // Alone, no store dir makes it match.
    let alone = json!({"version": 4, "derivations": { bad_key: d }});
    let e = parse_show_document(&alone, &[]).unwrap_err();
    assert!(matches!(e, ShowJsonError::NoStoreDir { .. }), "{e}");

    // Through the CLI: the file is named, the reason printed, nothing queued.
    let qr = Qr::new(Backend::Sqlite, false).expect("SQLite");
    let mut bad = v4.clone();
    bad["version"] = json!(5);
    let file = qr.write_json("bad.json", &bad);
    let out = qr.run(&["run", file.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "qr run accepted version 5");
    assert!(
        stderr.contains("bad.json") && stderr.contains("version 5"),
        "stderr: {stderr}"
    );
}

/// The outputs of each build `qr run --json` reported, by drv path.
fn built_outputs(builds: &[Value]) -> BTreeMap<String, BTreeMap<String, String>> {
    builds
        .iter()
        .map(|b| {
            assert_eq!(b["status"], 0, "build failed: {b}");
            let outs = b["outputs"]
                .as_object()
                .expect("outputs")
                .iter()
                .map(|(o, p)| (o.clone(), p.as_str().expect("built path").to_string()))
                .collect();
            (b["drvPath"].as_str().expect("drvPath").to_string(), outs)
        })
        .collect()
}

#[test]
fn qr_run_builds_nix_2_8_v3_and_v4_documents_to_nixs_outputs() {
    for graph in ["multi", "fods"] {
        let nix = oracle_outputs(graph);
        for format in ["nix-2.8", "nix-2.32", "nix-2.33"] {
            // Store dir /nix/store (over a temp root): the paths are Nix's.
            let qr = Qr::new(Backend::Sqlite, true).expect("SQLite");
            let (out, builds) = qr.run_json(&[&doc_file(graph, format)], &[]);
            assert!(
                out.status.success(),
                "{graph} {format}: qr run failed\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!builds.is_empty(), "{graph} {format}: no builds");
            for (drv, outs) in built_outputs(&builds) {
                assert_eq!(
                    Some(&outs),
                    nix.get(&drv),
                    "{graph} {format}: outputs of {drv}"
                );
            }
        }
    }
}

#[test]
fn qr_run_relocates_a_v4_document_into_the_default_store() {
    // The embedded default: the store dir is the state dir's, not the document's /nix/store.
    let qr = Qr::new(Backend::Sqlite, false).expect("SQLite");
    let (out, first) = qr.run_json(&[&doc_file("multi", "nix-2.33")], &[]);
    assert!(
        out.status.success(),
        "qr run failed\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = built_outputs(&first);
    let store = qr.state_dir().join("store");
    for (drv, outs) in &first {
        assert!(
            drv.starts_with(store.to_str().unwrap()),
            "{drv} not relocated"
        );
        assert!(
            outs.values()
                .all(|p| p.starts_with(store.to_str().unwrap()))
        );
    }
    // The 2.8 document of the same graph is the same derivations: the same builds, done.
    let (out, again) = qr.run_json(&[&doc_file("multi", "nix-2.8")], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(built_outputs(&again), first);
}

#[test]
fn real_nix_2_8_show_derivation_parses_to_the_drvs_it_wrote() {
    if !common::nix::available() {
        return;
    }
    let nix = common::nix::NixStore::new();
    let expr = nix.dir.path().join("fods.nix");
    std::fs::copy(data_dir().join("fods.nix"), &expr).expect("copy fods.nix");
    let inst = nix.run("nix-instantiate", &[expr.to_str().unwrap(), "-A", "top"]);
    assert!(
        inst.status.success(),
        "{}",
        String::from_utf8_lossy(&inst.stderr)
    );
    let top = String::from_utf8(inst.stdout).unwrap().trim().to_string();
    let show = nix.run("nix", &["show-derivation", "-r", &top]);
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let doc: Value = serde_json::from_slice(&show.stdout).expect("nix show-derivation JSON");
    let drvs = import(&doc).expect("Nix 2.8's own document");
    assert_eq!(drvs.len(), 3);
    let aterms = oracle_aterms("fods");
    for (path, d) in &drvs {
        let on_disk =
            std::fs::read_to_string(nix.physical_store().join(&path["/nix/store/".len()..]))
                .expect("the drv Nix wrote");
        assert_eq!(d.to_aterm(), on_disk, "{path}");
        assert_eq!(
            aterms.get(path),
            Some(&on_disk),
            "{path}: not the fixture's"
        );
    }
}

#[test]
fn qr_submit_queues_the_same_builds_from_v3_and_v4_documents() {
    // The drvs of `multi` no other drv of it uses: the builds a document queues.
    let aterms = oracle_aterms("multi");
    let drvs = import(&read_json(&doc_file("multi", "nix-2.8"))).expect("2.8 document");
    let used: std::collections::BTreeSet<&String> =
        drvs.iter().flat_map(|(_, d)| d.input_drvs.keys()).collect();
    let tops: std::collections::BTreeSet<String> = aterms
        .keys()
        .filter(|p| !used.contains(p))
        .cloned()
        .collect();
    assert!(!tops.is_empty());
    let qr = Qr::new(Backend::Sqlite, true).expect("SQLite");
    let mut queued = Vec::new();
    for format in ["nix-2.32", "nix-2.33"] {
        let file = doc_file("multi", format);
        let out = qr.run(&["submit", "--json", file.to_str().unwrap()], &[]);
        assert!(
            out.status.success(),
            "{format}: qr submit failed\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let builds: BTreeMap<String, i64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("a JSON line");
                (
                    v["drvPath"].as_str().unwrap().to_string(),
                    v["id"].as_i64().unwrap(),
                )
            })
            .collect();
        let paths: std::collections::BTreeSet<String> = builds.keys().cloned().collect();
        assert_eq!(paths, tops, "{format}: queued drvs");
        queued.push(builds);
    }
    // The second document is the same derivations: its builds are the first one's, not new.
    assert_eq!(queued[0], queued[1]);
}
