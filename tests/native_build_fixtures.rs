//! Builds every derivation of every Nix oracle fixture with the native executor, in dependency
//! order (resolving CA/deferred derivations with `try_resolve` and the realisations the inputs'
//! builds produced), and compares with what real Nix 2.8 produced.
//!
//! - Namespace mode: logical store dir `/nix/store`, physical root a temporary directory (builders
//!   run in a private mount namespace). Every output path, narHash, narSize, reference set, `ca`
//!   and deriver must equal Nix's, and every resolved drv path Nix's.
//! - Embedded mode: store dir == root (a temporary directory, no namespace). The fixture graph is
//!   re-instantiated under that store dir (paths, placeholders and input-addressed output paths
//!   recomputed), built, and checked for self-consistency: references name the same outputs as in
//!   Nix's build, outputs without references have Nix's exact NAR, fixed outputs Nix's `ca`.

mod common;

use common::sources::{fixture_sources, to_file_sources};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use qr::builder::executor::{BuildResult, ExecutorConfig, Limits, NativeExecutor};
use qr::store::aterm;
use qr::store::hash::{render_sri, sha256};
use qr::store::hash_modulo::DrvHashes;
use qr::store::placeholder::downstream_placeholder;
use qr::store::resolve::try_resolve;
use qr::store::{Derivation, DerivationOutput, DrvOutput, LocalStore, Store, StoreDir};
use serde_json::Value;

/// The drv paths of a fixture, inputs before dependents.
fn topo_order(drvs: &BTreeMap<String, Derivation>) -> Vec<String> {
    fn visit(
        p: &str,
        drvs: &BTreeMap<String, Derivation>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if done.contains(p) {
            return;
        }
        for i in drvs[p].input_drvs.keys() {
            visit(i, drvs, done, out);
        }
        done.insert(p.to_string());
        out.push(p.to_string());
    }
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for p in drvs.keys() {
        visit(p, drvs, &mut done, &mut out);
    }
    out
}

struct Graph {
    /// drv path → derivation, in the store the test builds in.
    drvs: BTreeMap<String, Derivation>,
    /// Fixture (Nix) path → this store's path, for drvs, sources, static outputs.
    to_local: HashMap<String, String>,
}

/// Parses a fixture's derivations as they are (logical dir `/nix/store`).
fn fixture_drvs(fixture: &Value) -> BTreeMap<String, Derivation> {
    let sd = StoreDir::default();
    common::derivations(fixture)
        .into_iter()
        .map(|(p, v)| {
            let sp = sd.parse(p).unwrap();
            let drv = aterm::parse_named(common::s(v, "/aterm").as_bytes(), sp.drv_name()).unwrap();
            (p.to_string(), drv)
        })
        .collect()
}

/// Re-instantiates the fixture graph under another store dir (what `nix-instantiate` would have
/// produced there): sources re-added, every path and downstream placeholder rewritten, fixed and
/// input-addressed output paths recomputed.
async fn reinstantiate(fixture: &Value, store: &LocalStore) -> Graph {
    let nix_sd = StoreDir::default();
    let sd = store.store_dir().clone();
    let old = fixture_drvs(fixture);
    let mut to_local: HashMap<String, String> = HashMap::new();
    let mut rewrites: BTreeMap<String, String> = BTreeMap::new();
    for (src, content) in fixture_sources(fixture, &old) {
        let name = nix_sd.parse(&src).unwrap().name().to_string();
        let p = store
            .add_text(&name, &content, &BTreeSet::new())
            .await
            .unwrap();
        rewrites.insert(src.clone(), p.clone());
        to_local.insert(src, p);
    }
    let mut hashes = DrvHashes::new(sd.clone());
    let mut drvs: BTreeMap<String, Derivation> = BTreeMap::new();
    for old_path in topo_order(&old) {
        let od = &old[&old_path];
        let rw = |s: &str| {
            let mut s = s.to_string();
            for (from, to) in &rewrites {
                s = s.replace(from.as_str(), to);
            }
            s
        };
        let mut d = od.clone();
        d.input_drvs = od
            .input_drvs
            .iter()
            .map(|(k, v)| (to_local[k].clone(), v.clone()))
            .collect();
        d.input_srcs = od.input_srcs.iter().map(|s| to_local[s].clone()).collect();
        d.builder = rw(&od.builder);
        d.args = od.args.iter().map(|a| rw(a)).collect();
        d.env = od.env.iter().map(|(k, v)| (rw(k), rw(v))).collect();
        for (o, out) in od.outputs.iter() {
            match out {
                DerivationOutput::InputAddressed { .. } => {
                    d.outputs.insert(o.clone(), DerivationOutput::Deferred);
                }
                DerivationOutput::CaFixed {
                    method_algo, hash, ..
                } => {
                    let p = sd.print(&d.fixed_output_path(&sd, o, method_algo, hash).unwrap());
                    d.env.insert(o.clone(), p.clone());
                    d.outputs.insert(
                        o.clone(),
                        DerivationOutput::CaFixed {
                            method_algo: method_algo.clone(),
                            hash: hash.clone(),
                            path: p,
                        },
                    );
                }
                _ => {}
            }
        }
        {
            let mut load = |p: &str| drvs.get(p).cloned().ok_or_else(|| p.to_string());
            hashes
                .fill_input_addressed_paths(&mut d, &mut load)
                .unwrap();
        }
        let new_path = store.add_derivation(&d).await.unwrap();
        assert_eq!(new_path, sd.print(&d.drv_path(&sd).unwrap()));
        let (old_sp, new_sp) = (
            nix_sd.parse(&old_path).unwrap(),
            sd.parse(&new_path).unwrap(),
        );
        for (o, out) in &od.outputs {
            rewrites.insert(
                downstream_placeholder(&old_sp, o),
                downstream_placeholder(&new_sp, o),
            );
            if let (Some(op), Some(np)) = (out.path(), d.outputs[o].path()) {
                rewrites.insert(op.to_string(), np.to_string());
                to_local.insert(op.to_string(), np.to_string());
            }
        }
        rewrites.insert(old_path.clone(), new_path.clone());
        to_local.insert(old_path, new_path.clone());
        drvs.insert(new_path, d);
    }
    Graph { drvs, to_local }
}

/// Imports the fixture's ATerms (and `builtins.toFile` sources) into a `/nix/store` store through
/// `import_from_dir`, as `qr import` does.
async fn import_fixture(fixture: &Value, store: &LocalStore, tmp: &std::path::Path) -> Graph {
    let drvs = fixture_drvs(fixture);
    let dir = tmp.join("nix-store-copy");
    std::fs::create_dir_all(&dir).unwrap();
    for (p, v) in common::derivations(fixture) {
        let base = p.rsplit('/').next().unwrap();
        std::fs::write(dir.join(base), common::s(v, "/aterm")).unwrap();
    }
    for (src, content) in fixture_sources(fixture, &drvs) {
        std::fs::write(dir.join(src.rsplit('/').next().unwrap()), content).unwrap();
    }
    let roots: Vec<String> = drvs.keys().cloned().collect();
    let report = store.import_from_dir(&dir, &roots).await.unwrap();
    assert!(report.added.len() >= drvs.len());
    for p in &roots {
        assert_eq!(store.read_derivation(p).await.unwrap(), drvs[p]);
    }
    let to_local = drvs.keys().map(|k| (k.clone(), k.clone())).collect();
    Graph { drvs, to_local }
}

struct Built {
    /// (drv path, output) → output path, for every drv of the graph.
    realised: HashMap<(String, String), String>,
    /// drv path → (the drv actually built, its result).
    results: BTreeMap<String, (String, BuildResult)>,
}

async fn build_graph(graph: &Graph, exec: &NativeExecutor) -> Built {
    let store = exec.store();
    let sd = store.store_dir().clone();
    let mut realised: HashMap<(String, String), String> = HashMap::new();
    let mut results = BTreeMap::new();
    for path in topo_order(&graph.drvs) {
        let drv = store.read_derivation(&path).await.unwrap();
        let (built_path, built_drv) = if drv.needs_resolution() {
            let r = try_resolve(&drv, &sd, |p, o| {
                realised.get(&(p.to_string(), o.to_string())).cloned()
            })
            .unwrap_or_else(|e| panic!("resolving {path}: {e}"));
            let rp = store.add_derivation(&r).await.unwrap();
            (rp, r)
        } else {
            (path.clone(), drv.clone())
        };
        let res = exec
            .build(&built_path, &built_drv, Limits::default())
            .await
            .unwrap_or_else(|e| panic!("building {built_path}: {e}"));
        assert!(res.ran);
        assert_eq!(
            res.outputs.keys().collect::<Vec<_>>(),
            drv.outputs.keys().collect::<Vec<_>>()
        );
        for (o, info) in &res.outputs {
            // The realisation of the built drv was recorded; record the original's too (as the
            // scheduler does once a resolved step lands).
            let key = DrvOutput::new(built_path.clone(), o.clone());
            assert_eq!(
                store.query_realisation(&key).await.unwrap().as_deref(),
                Some(info.path.as_str())
            );
            store
                .register_realisation(&DrvOutput::new(path.clone(), o.clone()), &info.path)
                .await
                .unwrap();
            realised.insert((path.clone(), o.clone()), info.path.clone());
            // What is registered is what is on disk.
            let nar = {
                let (s, p) = (store.clone(), info.path.clone());
                tokio::task::spawn_blocking(move || {
                    let mut v = Vec::new();
                    s.export_nar(&p, &mut v).unwrap();
                    v
                })
                .await
                .unwrap()
            };
            assert_eq!(
                (sha256(&nar), nar.len() as u64),
                (info.nar_hash, info.nar_size)
            );
            assert_eq!(info.deriver.as_deref(), Some(built_path.as_str()));
        }
        assert!(res.log_path.as_ref().is_some_and(|p| p.exists()));
        results.insert(path, (built_path, res));
    }
    Built { realised, results }
}

fn executor(store: Arc<LocalStore>, tmp: &std::path::Path) -> NativeExecutor {
    let mut cfg = ExecutorConfig::new(tmp);
    cfg.cores = 1;
    cfg.timeout = Some(std::time::Duration::from_secs(120));
    NativeExecutor::new(store, cfg)
}

fn name_of(p: &str) -> &str {
    &p.rsplit('/').next().unwrap()[33..]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_build_exactly_as_nix_in_a_mount_namespace() {
    for (stem, fixture) in common::load_fixtures() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(
            LocalStore::open(StoreDir::default(), tmp.path().join("root"))
                .await
                .unwrap(),
        );
        assert!(store.needs_namespace());
        let graph = import_fixture(&fixture, &store, tmp.path()).await;
        let exec = executor(store.clone(), tmp.path());
        let built = build_graph(&graph, &exec).await;

        let infos = fixture["output_path_infos"].as_object().unwrap();
        let resolutions = fixture["resolutions"].as_object().unwrap();
        let mut seen = BTreeSet::new();
        for (drv_path, (built_path, res)) in &built.results {
            match resolutions.get(drv_path) {
                Some(r) => assert_eq!(r.as_str(), Some(built_path.as_str()), "{stem}: {drv_path}"),
                None => assert_eq!(
                    drv_path, built_path,
                    "{stem}: Nix did not resolve {drv_path}"
                ),
            }
            for (o, info) in &res.outputs {
                let want = infos.get(&info.path).unwrap_or_else(|| {
                    panic!(
                        "{stem}: {drv_path}!{o} built {}, which Nix did not",
                        info.path
                    )
                });
                let ctx = format!("{stem}: {}", info.path);
                assert_eq!(
                    render_sri(&info.nar_hash),
                    common::s(want, "/narHash"),
                    "{ctx}"
                );
                assert_eq!(Some(info.nar_size), want["narSize"].as_u64(), "{ctx}");
                let refs: BTreeSet<String> = want["references"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect();
                assert_eq!(info.references, refs, "{ctx}");
                assert_eq!(info.ca.as_deref(), want["ca"].as_str(), "{ctx}");
                assert_eq!(info.deriver.as_deref(), want["deriver"].as_str(), "{ctx}");
                seen.insert(info.path.clone());
            }
        }
        assert_eq!(
            seen.len(),
            infos.len(),
            "{stem}: every output Nix built was built"
        );
        // Every realisation Nix recorded for the original drvs (by output path).
        for (drv_path, v) in common::derivations(&fixture) {
            for (o, r) in v["realisations"].as_object().unwrap() {
                assert_eq!(
                    built.realised[&(drv_path.to_string(), o.clone())],
                    common::s(r, "/out_path"),
                    "{stem}: {drv_path}!{o}"
                );
            }
        }
        assert_eq!(exec.runs() as usize, graph.drvs.len(), "{stem}");
        for (built_path, _) in built.results.values() {
            assert_eq!(exec.runs_of(built_path), 1);
        }
        // Nothing but the store's own entries remains in the root (no chroots or staging dirs).
        let leftovers: Vec<String> = std::fs::read_dir(store.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && n != ".qr-meta")
            .collect();
        assert!(leftovers.is_empty(), "{stem}: {leftovers:?}");
        // A second build of an input-addressed drv whose outputs are valid does not run.
        for (drv_path, drv) in &graph.drvs {
            if !drv.needs_resolution() && drv.outputs.values().all(|o| o.path().is_some()) {
                let r = exec.build(drv_path, drv, Limits::default()).await.unwrap();
                assert!(!r.ran);
                assert_eq!(r.outputs, built.results[drv_path].1.outputs);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_build_in_the_embedded_store_without_a_namespace() {
    for (stem, fixture) in common::load_fixtures() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        let store = Arc::new(
            LocalStore::open(StoreDir::new(root.to_str().unwrap()).unwrap(), &root)
                .await
                .unwrap(),
        );
        assert!(!store.needs_namespace());
        let graph = reinstantiate(&fixture, &store).await;
        let exec = executor(store.clone(), tmp.path());
        let built = build_graph(&graph, &exec).await;
        assert_eq!(exec.runs() as usize, graph.drvs.len(), "{stem}");

        let nix_infos = fixture["output_path_infos"].as_object().unwrap();
        let sd = store.store_dir().clone();
        for (nix_drv, v) in common::derivations(&fixture) {
            let local_drv = &graph.to_local[nix_drv];
            for (o, r) in v["realisations"].as_object().unwrap() {
                let nix_out = common::s(r, "/out_path");
                let want = &nix_infos[nix_out];
                let local_out = &built.realised[&(local_drv.clone(), o.clone())];
                let info = store.query_path_info(local_out).await.unwrap().unwrap();
                let ctx = format!("{stem}: {nix_drv}!{o} -> {local_out}");
                assert!(local_out.starts_with(&format!("{sd}/")), "{ctx}");
                assert_eq!(name_of(local_out), name_of(nix_out), "{ctx}");
                // The same outputs are referenced (by name).
                let want_refs: BTreeSet<&str> = want["references"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| name_of(r.as_str().unwrap()))
                    .collect();
                let refs: BTreeSet<&str> = info.references.iter().map(|r| name_of(r)).collect();
                assert_eq!(refs, want_refs, "{ctx}");
                for r in &info.references {
                    assert!(store.is_valid_path(r).await.unwrap(), "{ctx}: {r}");
                }
                // Outputs that embed no store path are byte-identical to Nix's.
                if want_refs.is_empty() {
                    assert_eq!(
                        render_sri(&info.nar_hash),
                        common::s(want, "/narHash"),
                        "{ctx}"
                    );
                    assert_eq!(Some(info.nar_size), want["narSize"].as_u64(), "{ctx}");
                }
                match want["ca"].as_str() {
                    Some(ca) if ca.starts_with("fixed:r:") => {
                        assert!(
                            info.ca
                                .as_deref()
                                .is_some_and(|c| c.starts_with("fixed:r:sha256:")),
                            "{ctx}"
                        );
                        if want_refs.is_empty() {
                            assert_eq!(info.ca.as_deref(), Some(ca), "{ctx}");
                        }
                    }
                    Some(ca) => assert_eq!(info.ca.as_deref(), Some(ca), "{ctx}"),
                    None => assert_eq!(info.ca, None, "{ctx}"),
                }
            }
        }
    }
}

#[test]
fn to_file_sources_are_read_from_the_expression() {
    let m = to_file_sources(
        r#"x = builtins.toFile "a.txt" "l1\n\"q\"\\"; y = builtins.toFile "b" "";"#,
    );
    assert_eq!(m["a.txt"], "l1\n\"q\"\\");
    assert_eq!(m["b"], "");
}
