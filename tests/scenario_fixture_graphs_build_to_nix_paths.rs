//! Every fixture graph, imported with `qr import` (drvs and sources, from a store-shaped dir) and
//! queued through `qr run` (real actors, native executor, store dir `/nix/store` over a temp
//! root), builds to exactly Nix's output paths, with one Resolved row per
//! resolution Nix made, pointing at a step for the same resolved drv, and builds exactly the drvs
//! Nix built, once each. On SQLite and on PostgreSQL.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use std::path::Path;

use common::qr::{Backend, Qr, all_steps};
use common::sources::fixture_sources;
use qr::store::aterm;
use serde_json::Value;

fn check_fixture(backend: Backend, name: &str, fixture: &Value) {
    let Some(qr) = Qr::new(backend, true) else {
        return;
    };
    // A store-shaped dir with the drvs (their ATerms) and the `builtins.toFile` sources.
    let dir = qr.state_dir().join("from");
    std::fs::create_dir_all(&dir).expect("dir");
    let mut drvs = BTreeMap::new();
    for (path, d) in fixture["derivations"].as_object().expect("derivations") {
        let aterm = d["aterm"].as_str().expect("aterm");
        let base = path.rsplit('/').next().expect("base name");
        std::fs::write(dir.join(base), aterm).expect("write drv");
        let name = base
            .split_once('-')
            .map(|x| x.1)
            .unwrap_or(base)
            .trim_end_matches(".drv");
        drvs.insert(
            path.clone(),
            aterm::parse_named(aterm.as_bytes(), name).expect("aterm"),
        );
    }
    for (src, content) in fixture_sources(fixture, &drvs) {
        std::fs::write(dir.join(src.rsplit('/').next().expect("base")), content)
            .expect("write source");
    }
    let mut args = vec![
        "import".to_string(),
        "--from".to_string(),
        dir.display().to_string(),
    ];
    args.extend(drvs.keys().cloned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let imported = qr.run(&argv, &[]);
    assert!(
        imported.status.success(),
        "{name}: qr import: {}",
        String::from_utf8_lossy(&imported.stderr)
    );
    // One build per top-level drv (one no other drv of the graph uses).
    let used: BTreeSet<&String> = drvs.values().flat_map(|d| d.input_drvs.keys()).collect();
    let tops: Vec<&Path> = drvs
        .keys()
        .filter(|p| !used.contains(p))
        .map(Path::new)
        .collect();
    let (out, builds) = qr.run_json(&tops, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} ({backend:?}): qr run failed\n{stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!builds.is_empty(), "{name}: no builds reported");

    // Every build's outputs are Nix's.
    let drvs = fixture["derivations"].as_object().expect("derivations");
    for b in &builds {
        let drv = b["drvPath"].as_str().expect("drvPath");
        assert_eq!(
            b["status"], 0,
            "{name}: build of {drv} did not succeed: {b}"
        );
        let want: BTreeMap<String, String> = drvs[drv]["realisations"]
            .as_object()
            .expect("realisations")
            .iter()
            .map(|(o, r)| {
                (
                    o.clone(),
                    r["out_path"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let got: BTreeMap<String, String> = b["outputs"]
            .as_object()
            .expect("outputs")
            .iter()
            .map(|(o, p)| (o.clone(), p.as_str().unwrap_or_default().to_string()))
            .collect();
        assert_eq!(got, want, "{name}: outputs of {drv}");
    }

    // One Resolved row per resolution Nix made, pointing at a step for the same resolved drv.
    let steps = all_steps(&builds);
    let by_row: BTreeMap<(i64, i64), &Value> = steps
        .iter()
        .map(|(b, s)| ((*b, s["stepnr"].as_i64().unwrap_or(0)), s))
        .collect();
    let mut resolved: BTreeMap<String, String> = BTreeMap::new();
    for (b, s) in &steps {
        if s["status"] == 13 {
            let to = s["resolvedToStep"]
                .as_i64()
                .expect("Resolved row without resolvedToStep");
            let target = by_row
                .get(&(*b, to))
                .expect("resolvedToStep names a step of the same build");
            let prev = resolved.insert(
                s["drvPath"].as_str().unwrap_or_default().to_string(),
                target["drvPath"].as_str().unwrap_or_default().to_string(),
            );
            assert!(
                prev.is_none(),
                "{name}: two Resolved rows for {}",
                s["drvPath"]
            );
        }
    }
    let nix: BTreeMap<String, String> = fixture["resolutions"]
        .as_object()
        .expect("resolutions")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    assert_eq!(resolved, nix, "{name}: resolutions");

    // Exactly the drvs Nix built, each once.
    let nix_built: BTreeSet<String> = fixture["build_order_log"]
        .as_array()
        .expect("log")
        .iter()
        .filter_map(|l| {
            l.as_str()?
                .strip_prefix("building '")?
                .strip_suffix("'...")
                .map(str::to_string)
        })
        .collect();
    let runs = qr.runs();
    let ran: BTreeSet<String> = runs.iter().cloned().collect();
    assert_eq!(
        ran.len(),
        runs.len(),
        "{name}: a drv was built twice: {runs:?}"
    );
    assert_eq!(ran, nix_built, "{name}: the drvs built");
}

fn all(backend: Backend) {
    let fixtures = common::load_fixtures();
    assert!(fixtures.len() >= 4, "expected the four nix-oracle fixtures");
    for (name, f) in &fixtures {
        check_fixture(backend, name, f);
    }
}

#[test]
fn fixture_graphs_build_to_nix_paths_on_sqlite() {
    all(Backend::Sqlite);
}

#[test]
fn fixture_graphs_build_to_nix_paths_on_postgres() {
    all(Backend::Postgres);
}
