//! CA output finalisation and NAR hashing against real Nix 2.8 (the nix-oracle fixtures).
//!
//! For every derivation in every fixture, the tree its builder script produces is written by hand
//! below (one arm per derivation name, read off the `/bin/sh -c` scripts in `nix_expr`): where the
//! script writes `$out`/`$dev`/`$bin` the builder sees the output path (the scratch path for a CA
//! floating output), and `${input}` is the input's real path (cross-checked against the script of
//! the derivation Nix actually built, i.e. the resolved one). Builds run in dependency order over a
//! temporary physical store with logical dir `/nix/store`; CA floating outputs go through
//! `finalize_ca_outputs`, and every output's path, `ca`, `narHash`, `narSize` and `references` must
//! equal Nix's `output_path_infos` exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use qr::store::ca_output::{ScratchOutput, finalize_ca_outputs, finalize_ca_trees, scratch_path};
use qr::store::hash::{render_sri, sha256, to_hex};
use qr::store::nar::{NarReader, NarTree, restore};
use qr::store::nix32;
use qr::store::refscan::hash_and_scan_path;
use qr::store::{StoreDir, StorePath};
use serde_json::Value;

fn fixtures_dir() -> PathBuf {
    match std::env::var_os("QR_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/nix-oracle"),
    }
}

fn load_fixtures() -> Vec<(String, Value)> {
    let dir = fixtures_dir();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fixtures dir {} is missing: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let v: Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    CaFloating,
    Fixed,
    InputAddressed,
}

/// One derivation of a fixture, as the test needs it.
struct Drv<'a> {
    name: String,
    /// The derivation Nix built: the resolved one if there is one.
    built_path: String,
    built: &'a Value,
    /// Output name -> (kind, final path Nix recorded).
    outputs: BTreeMap<String, (Kind, String)>,
    input_drvs: Vec<String>,
}

fn drvs(fixture: &Value) -> BTreeMap<String, Drv<'_>> {
    let mut out = BTreeMap::new();
    for (drv_path, d) in fixture["derivations"].as_object().unwrap() {
        let sd = &d["show_derivation"];
        let name = s(&sd["env"]["name"]).to_string();
        let (built_path, built) = match d.get("resolved") {
            Some(r) if !r.is_null() => (s(&r["drv_path"]).to_string(), &r["show_derivation"]),
            _ => (drv_path.clone(), sd),
        };
        let mut outputs = BTreeMap::new();
        for (o, spec) in sd["outputs"].as_object().unwrap() {
            let kind = if spec.get("hash").is_some() {
                Kind::Fixed
            } else if spec.get("hashAlgo").is_some_and(|a| a == "r:sha256") {
                Kind::CaFloating
            } else {
                Kind::InputAddressed
            };
            let real = s(&d["realisations"][o]["out_path"]).to_string();
            if let Some(p) = spec.get("path") {
                assert_eq!(s(p), real, "{drv_path}!{o}");
            }
            outputs.insert(o.clone(), (kind, real));
        }
        let input_drvs = sd["inputDrvs"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        out.insert(
            drv_path.clone(),
            Drv {
                name,
                built_path,
                built,
                outputs,
                input_drvs,
            },
        );
    }
    out
}

/// Derivation paths, inputs first.
fn build_order(drvs: &BTreeMap<String, Drv<'_>>) -> Vec<String> {
    fn visit(
        p: &str,
        drvs: &BTreeMap<String, Drv<'_>>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(p.to_string()) {
            return;
        }
        for i in &drvs[p].input_drvs {
            visit(i, drvs, seen, out);
        }
        out.push(p.to_string());
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for p in drvs.keys() {
        visit(p, drvs, &mut seen, &mut out);
    }
    out
}

/// What a builder sees and can read.
struct Ctx<'a> {
    drvs: &'a BTreeMap<String, Drv<'a>>,
    script: String,
    /// `$<output>` as the builder sees it.
    out_vars: BTreeMap<String, String>,
    /// The store so far: full path -> tree.
    store: &'a BTreeMap<String, NarTree>,
}

impl Ctx<'_> {
    fn var(&self, o: &str) -> &str {
        &self.out_vars[o]
    }

    /// `${drv.<o>}` for the input derivation named `name`: its real path, which must be what the
    /// built derivation's script says.
    fn input(&self, name: &str, o: &str) -> String {
        let d = self
            .drvs
            .values()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no derivation named {name}"));
        let p = d.outputs[o].1.clone();
        assert!(
            self.script.contains(&p),
            "script {:?} does not mention {p}",
            self.script
        );
        p
    }

    /// `cat <path>`: a regular file in the store built so far.
    fn cat(&self, path: &str) -> String {
        let rest = path.strip_prefix("/nix/store/").unwrap();
        let (base, sub) = rest.split_once('/').unwrap_or((rest, ""));
        let tree = &self.store[&format!("/nix/store/{base}")];
        match tree.get(sub) {
            Some(NarTree::Regular { contents, .. }) => String::from_utf8(contents.clone()).unwrap(),
            other => panic!("cat {path}: not a regular file: {other:?}"),
        }
    }
}

fn file(s: impl Into<String>) -> NarTree {
    NarTree::file(s.into().into_bytes())
}

fn dir<const K: usize>(entries: [(&str, NarTree); K]) -> NarTree {
    NarTree::dir(entries)
}

fn outs<const K: usize>(o: [(&str, NarTree); K]) -> BTreeMap<String, NarTree> {
    o.into_iter().map(|(n, t)| (n.to_string(), t)).collect()
}

/// The trees each builder script writes, by derivation name.
fn run_builder(name: &str, c: &Ctx<'_>) -> BTreeMap<String, NarTree> {
    match name {
        // chain.json
        "chain-a" => outs([("out", file("hello\n"))]), // echo hello > $out
        "chain-b" => {
            // echo ${a} > $out; cat ${a} >> $out
            let a = c.input("chain-a", "out");
            outs([("out", file(format!("{a}\n") + &c.cat(&a)))])
        }
        "chain-c" => {
            // mkdir $out; echo ${b} > $out/b-path; cat ${b} > $out/b-content
            let b = c.input("chain-b", "out");
            outs([(
                "out",
                dir([
                    ("b-path", file(format!("{b}\n"))),
                    ("b-content", file(c.cat(&b))),
                ]),
            )])
        }
        // diamond.json
        "dia-base" => outs([("out", file("base\n"))]),
        "dia-left" => outs([(
            "out",
            file(format!("left {}\n", c.input("dia-base", "out"))),
        )]),
        "dia-right" => outs([(
            "out",
            file(format!("right {}\n", c.input("dia-base", "out"))),
        )]),
        "dia-top" => {
            // cat ${left} ${right} > $out
            let l = c.input("dia-left", "out");
            let r = c.input("dia-right", "out");
            outs([("out", file(c.cat(&l) + &c.cat(&r)))])
        }
        // mixed.json
        "mx-ca1" => outs([("out", file("ca1\n"))]),
        "mx-ia-leaf" => outs([("out", file("ia-leaf\n"))]),
        "mx-ia-on-ca" => outs([("out", file(format!("{}\n", c.input("mx-ca1", "out"))))]),
        "mx-ia-on-ia-on-ca" => outs([("out", file(c.cat(&c.input("mx-ia-on-ca", "out"))))]),
        "mx-ca-on-ia" => outs([("out", file(format!("{}\n", c.input("mx-ia-leaf", "out"))))]),
        "mx-ca-on-deferred" => {
            outs([("out", file(format!("{}\n", c.input("mx-ia-on-ca", "out"))))])
        }
        "mx-fod" => outs([("out", file("hello"))]), // printf hello > $out
        "mx-ca-on-fod" | "mx-ia-on-fod" => outs([("out", file(c.cat(&c.input("mx-fod", "out"))))]),
        "mx-ia-on-ia" => outs([("out", file(c.cat(&c.input("mx-ia-leaf", "out"))))]),
        // multi.json
        "mo-lib" => {
            // mkdir -p $out $dev; echo lib > $out/lib; echo $dev > $out/dev-path; echo $dev > $dev/self
            let dev = c.var("dev");
            outs([
                (
                    "out",
                    dir([
                        ("lib", file("lib\n")),
                        ("dev-path", file(format!("{dev}\n"))),
                    ]),
                ),
                ("dev", dir([("self", file(format!("{dev}\n")))])),
            ])
        }
        "mo-use-dev" => {
            // cat ${m.dev}/self > $out
            let dev = c.input("mo-lib", "dev");
            outs([("out", file(c.cat(&format!("{dev}/self"))))])
        }
        "mo-use-both" => {
            // mkdir $out; cat ${m}/lib > $out/lib; echo ${m.dev} > $out/dev
            let m = c.input("mo-lib", "out");
            let dev = c.input("mo-lib", "dev");
            outs([(
                "out",
                dir([
                    ("lib", file(c.cat(&format!("{m}/lib")))),
                    ("dev", file(format!("{dev}\n"))),
                ]),
            )])
        }
        "mo-ia-use-dev" => outs([("out", file(format!("{}\n", c.input("mo-lib", "dev"))))]),
        "mo-selfref" => {
            // mkdir $out; echo $out > $out/me; ln -s $out/me $out/link
            let out = c.var("out");
            outs([(
                "out",
                dir([
                    ("me", file(format!("{out}\n"))),
                    ("link", NarTree::symlink(format!("{out}/me"))),
                ]),
            )])
        }
        "mo-two-out" => {
            // mkdir -p $out $bin; echo ${m.dev} > $bin/x; echo $bin > $out/y
            let dev = c.input("mo-lib", "dev");
            let bin = c.var("bin");
            outs([
                ("bin", dir([("x", file(format!("{dev}\n")))])),
                ("out", dir([("y", file(format!("{bin}\n")))])),
            ])
        }
        "mo-use-two" => {
            // cat ${two_out.bin}/x ${two_out}/y > $out
            let bin = c.input("mo-two-out", "bin");
            let out = c.input("mo-two-out", "out");
            outs([(
                "out",
                file(c.cat(&format!("{bin}/x")) + &c.cat(&format!("{out}/y"))),
            )])
        }
        other => panic!("no hand-written builder for derivation {other:?}: add one"),
    }
}

fn closure(infos: &Value, roots: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = roots.into_iter().collect();
    while let Some(p) = todo.pop() {
        if seen.insert(p.clone())
            && let Some(refs) = infos.get(&p).and_then(|i| i["references"].as_array())
        {
            todo.extend(refs.iter().map(|r| s(r).to_string()));
        }
    }
    seen
}

fn write_physical(tree: &NarTree, dest: &Path) {
    let nar = tree.to_nar().unwrap();
    let mut r = nar.as_slice();
    let mut nar = NarReader::new(&mut r);
    restore(&mut nar, dest).unwrap();
}

#[derive(Default)]
struct Counts {
    ca_floating: usize,
    ca_checked: usize,
    ia_checked: usize,
    fixed_checked: usize,
    self_referencing: usize,
    inter_output: usize,
}

fn check_info(
    infos: &Value,
    path: &str,
    built_path: &str,
    nar_hash: &[u8; 32],
    nar_size: u64,
    refs: &BTreeSet<String>,
) -> Value {
    let info = infos
        .get(path)
        .unwrap_or_else(|| panic!("Nix has no output {path}"))
        .clone();
    assert_eq!(
        s(&info["narHash"]),
        render_sri(nar_hash),
        "narHash of {path}"
    );
    assert_eq!(
        info["narSize"].as_u64().unwrap(),
        nar_size,
        "narSize of {path}"
    );
    let expected_refs: BTreeSet<String> = info["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| s(r).to_string())
        .collect();
    assert_eq!(refs, &expected_refs, "references of {path}");
    assert_eq!(s(&info["deriver"]), built_path, "deriver of {path}");
    info
}

fn run_fixture(file_name: &str, fixture: &Value, counts: &mut Counts) {
    let sd = StoreDir::new(s(&fixture["store_dir"])).unwrap();
    assert_eq!(sd.as_str(), "/nix/store");
    let infos = &fixture["output_path_infos"];
    let drvs = drvs(fixture);
    let tmp = tempfile::tempdir().unwrap();
    let physical_store = tmp.path().join("store");
    fs::create_dir(&physical_store).unwrap();
    let mut store: BTreeMap<String, NarTree> = BTreeMap::new();

    for drv_path in build_order(&drvs) {
        let d = &drvs[&drv_path];
        let built =
            StorePath::from_base_name(d.built_path.strip_prefix("/nix/store/").unwrap()).unwrap();
        let script = s(&d.built["args"][1]).to_string();
        let kinds: BTreeSet<Kind> = d.outputs.values().map(|(k, _)| *k).collect();
        assert_eq!(kinds.len(), 1, "{drv_path}: mixed output kinds");
        let ca = kinds.contains(&Kind::CaFloating);
        let out_vars: BTreeMap<String, String> = d
            .outputs
            .iter()
            .map(|(o, (_, real))| {
                let v = if ca {
                    sd.print(&scratch_path(&sd, &built, o))
                } else {
                    real.clone()
                };
                (o.clone(), v)
            })
            .collect();
        // The inputs' closure: what the outputs may refer to besides themselves.
        let input_srcs: Vec<String> = d.built["inputSrcs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| s(p).to_string())
            .collect();
        let input_closure = closure(infos, input_srcs);
        let trees = {
            let ctx = Ctx {
                drvs: &drvs,
                script,
                out_vars: out_vars.clone(),
                store: &store,
            };
            run_builder(&d.name, &ctx)
        };
        assert_eq!(
            trees.keys().collect::<Vec<_>>(),
            d.outputs.keys().collect::<Vec<_>>(),
            "{}: builder outputs",
            d.name
        );

        if ca {
            counts.ca_floating += d.outputs.len();
            let candidates: Vec<StorePath> =
                input_closure.iter().map(|p| sd.parse(p).unwrap()).collect();
            // The builder writes at the scratch paths.
            let mut scratch = Vec::new();
            for (o, tree) in &trees {
                let phys = physical_store.join(out_vars[o].strip_prefix("/nix/store/").unwrap());
                write_physical(tree, &phys);
                scratch.push(ScratchOutput {
                    name: o.clone(),
                    physical: phys,
                });
            }
            let finals =
                finalize_ca_outputs(&sd, &physical_store, &built, &scratch, &candidates).unwrap();
            let in_memory = finalize_ca_trees(&sd, &built, &trees, &candidates).unwrap();
            for f in &finals {
                let path = sd.print(&f.path);
                assert_eq!(
                    path, d.outputs[&f.name].1,
                    "{file_name}: final path of {}!{}",
                    d.name, f.name
                );
                let refs: BTreeSet<String> = f.references.iter().map(|r| sd.print(r)).collect();
                let info = check_info(infos, &path, &d.built_path, &f.nar_hash, f.nar_size, &refs);
                assert_eq!(s(&info["ca"]), f.ca, "ca of {path}");
                assert_eq!(
                    f.ca,
                    format!("fixed:r:sha256:{}", nix32::encode(&f.ca_hash))
                );
                assert!(!f.already_existed);
                assert!(
                    !scratch.iter().any(|o| o.physical.exists()),
                    "scratch left behind"
                );
                // The final tree on disk is what we reported, and what the in-memory variant gives.
                let on_disk = NarTree::from_path(&f.physical).unwrap();
                let (mem, mem_tree) = &in_memory[&f.name];
                assert_eq!(
                    (
                        &mem.path,
                        &mem.nar_hash,
                        mem.nar_size,
                        &mem.references,
                        &mem.ca
                    ),
                    (&f.path, &f.nar_hash, f.nar_size, &f.references, &f.ca)
                );
                assert_eq!(mem_tree, &on_disk);
                assert_eq!(
                    qr::store::nar::tree_hash_and_size(&on_disk).unwrap(),
                    (f.nar_hash, f.nar_size)
                );
                let text = format!("{on_disk:?}");
                assert!(
                    !finals
                        .iter()
                        .any(|g| text.contains(g.scratch_path.hash_part())),
                    "a scratch hash part survived in {path}"
                );
                if f.references.contains(&f.path) {
                    counts.self_referencing += 1;
                }
                if finals
                    .iter()
                    .any(|g| g.name != f.name && f.references.contains(&g.path))
                {
                    counts.inter_output += 1;
                }
                store.insert(path, on_disk);
                counts.ca_checked += 1;
            }
        } else {
            // Input-addressed and fixed outputs are written directly at their final paths.
            for (o, tree) in &trees {
                let (kind, real) = &d.outputs[o];
                let phys = physical_store.join(real.strip_prefix("/nix/store/").unwrap());
                write_physical(tree, &phys);
                let mut candidates: BTreeSet<String> = input_closure.clone();
                candidates.extend(d.outputs.values().map(|(_, p)| p.clone()));
                let (h, n, refs) =
                    hash_and_scan_path(&phys, candidates.iter().map(|p| sd.parse(p).unwrap()))
                        .unwrap();
                let refs: BTreeSet<String> = refs.iter().map(|r| sd.print(r)).collect();
                let info = check_info(infos, real, &d.built_path, &h, n, &refs);
                if *kind == Kind::Fixed {
                    // Flat sha256 fixed output: ca is the file's sha256, the path follows from it.
                    let NarTree::Regular { contents, .. } = tree else {
                        panic!("flat fixed output is not a file")
                    };
                    let fh = sha256(contents);
                    let spec = &drvs[&drv_path].built["outputs"][o];
                    assert_eq!(s(&spec["hashAlgo"]), "sha256");
                    assert_eq!(s(&spec["hash"]), to_hex(&fh));
                    assert_eq!(
                        s(&info["ca"]),
                        format!("fixed:sha256:{}", nix32::encode(&fh))
                    );
                    assert_eq!(
                        sd.print(&sd.make_fixed_output_path("sha256", &to_hex(&fh), &d.name)),
                        *real
                    );
                    counts.fixed_checked += 1;
                } else {
                    assert!(info["ca"].is_null(), "{real} has a ca");
                    counts.ia_checked += 1;
                }
                store.insert(real.clone(), tree.clone());
            }
        }
    }
    let recorded: BTreeSet<String> = infos.as_object().unwrap().keys().cloned().collect();
    let produced: BTreeSet<String> = store.keys().cloned().collect();
    assert_eq!(
        produced, recorded,
        "{file_name}: outputs produced vs recorded by Nix"
    );
}

#[test]
fn ca_outputs_match_nix() {
    let mut counts = Counts::default();
    let fixtures = load_fixtures();
    for (name, f) in &fixtures {
        run_fixture(name, f, &mut counts);
    }
    eprintln!(
        "checked {} CA floating outputs ({} self-referencing, {} referring to a sibling output), \
         {} input-addressed and {} fixed outputs across {} fixtures",
        counts.ca_checked,
        counts.self_referencing,
        counts.inter_output,
        counts.ia_checked,
        counts.fixed_checked,
        fixtures.len()
    );
    assert!(counts.ca_checked > 0 && counts.ia_checked > 0);
    assert_eq!(counts.ca_checked, counts.ca_floating);
    assert!(counts.fixed_checked > 0);
    assert!(
        counts.self_referencing >= 2,
        "mo-selfref and mo-lib-dev refer to themselves"
    );
    assert!(
        counts.inter_output >= 2,
        "mo-lib -> dev and mo-two-out -> bin"
    );
}
