//! The example derivation graphs in `examples/*.json` (Nix's `derivation show` shape, store dir
//! `/nix/store`): generated here the way Nix's `derivation` primop instantiates them, and checked
//! to be what is committed.
//!
//! - `cargo test --test examples_gen -- --ignored regenerate_examples` rewrites the files;
//! - the other tests regenerate them in memory and check that the committed files are equal,
//!   load, and behave as `examples/README.md` says (the graphs that a fixture also has are equal
//!   to what real Nix wrote there; `scripts/check-examples-with-nix` checks all of them against a
//!   real `nix-instantiate`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use qr::store::ca_output::finalize_ca_trees;
use qr::store::derivation::{Derivation, derivations_from_show_json};
use qr::store::hash_modulo::DrvHashes;
use qr::store::nar::NarTree;
use qr::store::relocate::relocate;
use qr::store::resolve::try_resolve;
use qr::store::{StoreDir, StorePath};
use serde_json::{Map, Value};

use common::load_fixtures;

use common::instantiate::{DynInput, Gen, Kind, SYSTEM, hide_out_placeholder, writes_drv};

/// The example graphs, by file stem. The drv names say which graph a derivation belongs to; the
/// comments give the Nix expression (with the fixtures' `lib.nix`, `examples/nix/lib.nix`).
fn examples() -> Vec<(&'static str, Value)> {
    let mut v = Vec::new();

    // ca-chain = the `chain` fixture:
    //   a = ca "chain-a" "echo hello > $out" {};
    //   b = ca "chain-b" "echo ${a} > $out; cat ${a} >> $out" { dep = a; };
    //   c = ca "chain-c" "mkdir $out; echo ${b} > $out/b-path; cat ${b} > $out/b-content" {};
    let mut g = Gen::new();
    let a = g.add(Kind::Ca, "chain-a", "echo hello > $out", &[], &[]);
    let oa = g.out(&a);
    let b = g.add(
        Kind::Ca,
        "chain-b",
        &format!("echo {oa} > $out; cat {oa} >> $out"),
        &[("dep", &oa)],
        &[&a],
    );
    let ob = g.out(&b);
    g.add(
        Kind::Ca,
        "chain-c",
        &format!("mkdir $out; echo {ob} > $out/b-path; cat {ob} > $out/b-content"),
        &[],
        &[&b],
    );
    v.push(("ca-chain", g.doc()));

    // diamond = the `diamond` fixture:
    //   base  = ca "dia-base"  "echo base > $out" {};
    //   left  = ca "dia-left"  "echo left ${base} > $out" {};
    //   right = ca "dia-right" "echo right ${base} > $out" {};
    //   top   = ca "dia-top"   "cat ${left} ${right} > $out" { l = left; r = right; };
    let mut g = Gen::new();
    let base = g.add(Kind::Ca, "dia-base", "echo base > $out", &[], &[]);
    let ob = g.out(&base);
    let left = g.add(
        Kind::Ca,
        "dia-left",
        &format!("echo left {ob} > $out"),
        &[],
        &[&base],
    );
    let right = g.add(
        Kind::Ca,
        "dia-right",
        &format!("echo right {ob} > $out"),
        &[],
        &[&base],
    );
    let (ol, or) = (g.out(&left), g.out(&right));
    g.add(
        Kind::Ca,
        "dia-top",
        &format!("cat {ol} {or} > $out"),
        &[("l", &ol), ("r", &or)],
        &[&left, &right],
    );
    v.push(("diamond", g.doc()));

    // converge: two different upstreams that build the same bytes; their downstreams differ only
    // in which upstream they read, so both resolve to one derivation (early cutoff). The names
    // must be equal: a CA output path (and so the resolved script) contains the drv name.
    //   up-a   = ca "converge-up"   "echo same > $out" { variant = "a"; };
    //   up-b   = ca "converge-up"   "echo same > $out" { variant = "b"; };
    //   down-a = ca "converge-down" "cat ${up-a} > $out" {};
    //   down-b = ca "converge-down" "cat ${up-b} > $out" {};
    //   top    = ca "converge-top"  "cat ${down-a} ${down-b} > $out" {};
    let mut g = Gen::new();
    let mut downs = Vec::new();
    for variant in ["a", "b"] {
        let up = g.add(
            Kind::Ca,
            "converge-up",
            "echo same > $out",
            &[("variant", variant)],
            &[],
        );
        let ou = g.out(&up);
        downs.push(g.add(
            Kind::Ca,
            "converge-down",
            &format!("cat {ou} > $out"),
            &[],
            &[&up],
        ));
    }
    let (da, db) = (g.out(&downs[0]), g.out(&downs[1]));
    g.add(
        Kind::Ca,
        "converge-top",
        &format!("cat {da} {db} > $out"),
        &[],
        &[&downs[0], &downs[1]],
    );
    v.push(("converge", g.doc()));

    // ca-failing-input: the input's builder fails, so the dependent can never be resolved.
    //   input     = ca "fail-input"     "echo fail-input fails on purpose; exit 1" {};
    //   dependent = ca "fail-dependent" "cat ${input} > $out" {};
    let mut g = Gen::new();
    let input = g.add(
        Kind::Ca,
        "fail-input",
        "echo fail-input fails on purpose; exit 1",
        &[],
        &[],
    );
    let oi = g.out(&input);
    g.add(
        Kind::Ca,
        "fail-dependent",
        &format!("cat {oi} > $out"),
        &[],
        &[&input],
    );
    v.push(("ca-failing-input", g.doc()));

    // ia-on-ca = part of the `mixed` fixture: IA derivations with a CA input (deferred), and
    // transitively through another IA one.
    //   ca1            = ca "mx-ca1" "echo ca1 > $out" {};
    //   ia_on_ca       = ia "mx-ia-on-ca" "echo ${ca1} > $out" { dep = ca1; };
    //   ia_on_ia_on_ca = ia "mx-ia-on-ia-on-ca" "cat ${ia_on_ca} > $out" {};
    let mut g = Gen::new();
    let ca1 = g.add(Kind::Ca, "mx-ca1", "echo ca1 > $out", &[], &[]);
    let oc = g.out(&ca1);
    let ia = g.add(
        Kind::Ia,
        "mx-ia-on-ca",
        &format!("echo {oc} > $out"),
        &[("dep", &oc)],
        &[&ca1],
    );
    let oi = g.out(&ia);
    g.add(
        Kind::Ia,
        "mx-ia-on-ia-on-ca",
        &format!("cat {oi} > $out"),
        &[],
        &[&ia],
    );
    v.push(("ia-on-ca", g.doc()));

    v.push(("dynamic", dynamic().0));
    v
}

/// The `dynamic` example (dynamic derivations, depth 2) and its drv paths (outer, mid, leaf,
/// top): `outer`'s output is the `.drv` of `mid`, whose output is the `.drv` of `leaf`; `top`
/// reads `leaf`'s output. Only `outer` and `top` are in the file: `mid` and `leaf` exist once
/// their producers have run. A producer's builder writes `$drv` with its `out` placeholder put
/// back (hidden as `@OUT1@` / `@OUT2@` in the env: the executor rewrites the producer's own).
///   leaf  = ca   "dyn-leaf"         "echo leaf > $out" {};
///   mid   = text "dyn-leaf.drv"     (writes_drv "@OUT1@") { drv = <leaf's ATerm>; };
///   outer = text "dyn-leaf.drv.drv" (writes_drv "@OUT2@") { drv = <mid's ATerm>; };
///   top   = ca   "dyn-top" "cat ${outputOf (outputOf outer.outPath "out") "out"} > $out" {};
fn dynamic() -> (Value, [String; 4]) {
    let mut g = Gen::new();
    let (leaf, leaf_aterm) = g.make(Kind::Ca, "dyn-leaf", "echo leaf > $out", &[]);
    let (mid, mid_aterm) = g.make(
        Kind::Text,
        "dyn-leaf.drv",
        &writes_drv("@OUT1@"),
        &[("drv", &hide_out_placeholder(&leaf_aterm, "@OUT1@"))],
    );
    let outer = g.add(
        Kind::Text,
        "dyn-leaf.drv.drv",
        &writes_drv("@OUT2@"),
        &[("drv", &hide_out_placeholder(&mid_aterm, "@OUT2@"))],
        &[],
    );
    let leaf_out = DynInput {
        producer: &outer,
        chain: &["out", "out"],
        output: "out",
    };
    let ol = g.dyn_out(&leaf_out);
    let top = g.add_dyn(
        Kind::Ca,
        "dyn-top",
        &format!("cat {ol} > $out"),
        &[],
        &[],
        &[leaf_out],
    );
    (g.doc(), [outer, mid, leaf, top])
}

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn render(doc: &Value) -> String {
    serde_json::to_string_pretty(doc).unwrap() + "\n"
}

/// Loads a `derivation show` document, checking every key against the recomputed drv path.
fn load(doc: &Value) -> Vec<(String, Derivation)> {
    let sd = StoreDir::default();
    let mut hs = DrvHashes::new(sd.clone());
    let mut ext =
        |p: &str| -> Result<Derivation, String> { Err(format!("{p} is not in the file")) };
    derivations_from_show_json(doc, &mut hs, &mut ext)
        .unwrap()
        .into_iter()
        .map(|(p, d)| (sd.print(&p), d))
        .collect()
}

fn example(name: &str) -> Vec<(String, Derivation)> {
    let (_, doc) = examples().into_iter().find(|(n, _)| *n == name).unwrap();
    load(&doc)
}

/// The drv path of the derivation named `name` with env `variant` (if given).
fn find<'a>(
    drvs: &'a [(String, Derivation)],
    name: &str,
    variant: Option<&str>,
) -> &'a (String, Derivation) {
    drvs.iter()
        .find(|(_, d)| d.name == name && d.env.get("variant").map(String::as_str) == variant)
        .unwrap_or_else(|| panic!("no {name} {variant:?}"))
}

/// The final path of a CA output whose builder wrote `tree` (no references).
fn ca_output(drv_path: &str, tree: NarTree) -> String {
    let sd = StoreDir::default();
    let dp: StorePath = sd.parse(drv_path).unwrap();
    let outs =
        finalize_ca_trees(&sd, &dp, &BTreeMap::from([("out".to_string(), tree)]), &[]).unwrap();
    sd.print(&outs["out"].0.path)
}

#[test]
#[ignore = "writes examples/*.json; run with --ignored to regenerate them"]
fn regenerate_examples() {
    for (name, doc) in examples() {
        std::fs::write(examples_dir().join(format!("{name}.json")), render(&doc)).unwrap();
    }
}

#[test]
fn committed_examples_are_the_generated_ones_and_load() {
    let generated = examples();
    let mut on_disk: Vec<String> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut names: Vec<String> = generated.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(on_disk, names, "examples/*.json vs the generator");
    for (name, doc) in &generated {
        let path = examples_dir().join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text == render(doc),
            "{} differs from the generator (cargo test --test examples_gen -- --ignored)",
            path.display()
        );
        let drvs = load(&serde_json::from_str(&text).unwrap());
        assert_eq!(drvs.len(), doc.as_object().unwrap().len(), "{name}");
        for (p, d) in &drvs {
            assert!(
                p.starts_with("/nix/store/") && d.system == SYSTEM,
                "{name}: {p}"
            );
        }
    }
}

#[test]
fn graphs_that_a_fixture_has_are_what_nix_wrote() {
    let fixtures = load_fixtures();
    let fixture = |n: &str| &fixtures.iter().find(|(s, _)| s == n).unwrap().1;
    for (example, fx, whole) in [
        ("ca-chain", "chain", true),
        ("diamond", "diamond", true),
        ("ia-on-ca", "mixed", false),
    ] {
        let (_, doc) = examples().into_iter().find(|(n, _)| *n == example).unwrap();
        let doc = doc.as_object().unwrap();
        let fdrvs = fixture(fx)["derivations"].as_object().unwrap();
        if whole {
            assert_eq!(doc.len(), fdrvs.len(), "{example}");
        }
        for (p, d) in doc {
            assert_eq!(Some(d), fdrvs[p].get("show_derivation"), "{example}: {p}");
        }
    }
}

/// What real Nix 2.8 did when it built `examples/nix/converge.nix` (`nix-build -A top`): both
/// downstreams logged `resolved derivation: '…' -> '/nix/store/2agh…-converge-down.drv'`, which
/// was built once.
mod converge_nix {
    pub const UP_OUT: &str = "/nix/store/pgkcbfy4apglizrnzhj10q8j3hp99mm2-converge-up";
    pub const DOWN_RESOLVED: &str = "/nix/store/2agh05b7nby29krxbxl02l1az2m80gsp-converge-down.drv";
    pub const DOWN_OUT: &str = "/nix/store/kfsg43i1qsr5jkj9a2l7zvwrnykn4gaq-converge-down";
    pub const TOP_RESOLVED: &str = "/nix/store/aii84c8w6sygz76q77w6hgknhk9zln3d-converge-top.drv";
    pub const TOP_OUT: &str = "/nix/store/6bfbn5m4kmjcdk2sm9drc9vhdl6jq5m0-converge-top";
}

#[test]
fn converge_downstreams_resolve_to_one_derivation() {
    let sd = StoreDir::default();
    let drvs = example("converge");
    assert_eq!(drvs.len(), 5);
    let (ua, ub) = (
        find(&drvs, "converge-up", Some("a")),
        find(&drvs, "converge-up", Some("b")),
    );
    assert_ne!(ua.0, ub.0, "the upstreams are different derivations");
    // Both build `echo same > $out`: one regular file, so one content-addressed path.
    let (pa, pb) = (
        ca_output(&ua.0, NarTree::file("same\n")),
        ca_output(&ub.0, NarTree::file("same\n")),
    );
    assert_eq!(pa, pb);
    assert_eq!(pa, converge_nix::UP_OUT);
    let real: BTreeMap<&str, &str> =
        BTreeMap::from([(ua.0.as_str(), pa.as_str()), (ub.0.as_str(), pb.as_str())]);

    let downs: Vec<&(String, Derivation)> = drvs
        .iter()
        .filter(|(_, d)| d.name == "converge-down")
        .collect();
    assert_eq!(downs.len(), 2);
    assert_ne!(
        downs[0].0, downs[1].0,
        "the downstreams are different derivations"
    );
    let resolved: Vec<(String, Derivation)> = downs
        .iter()
        .map(|(_, d)| {
            assert!(d.needs_resolution());
            let r = try_resolve(d, &sd, |p, o| {
                (o == "out")
                    .then(|| real.get(p).map(|s| s.to_string()))
                    .flatten()
            })
            .unwrap();
            (sd.print(&r.drv_path(&sd).unwrap()), r)
        })
        .collect();
    assert_eq!(
        resolved[0], resolved[1],
        "early cutoff: one resolved derivation"
    );
    assert_eq!(resolved[0].0, converge_nix::DOWN_RESOLVED);
    let r = &resolved[0].1;
    assert!(r.input_drvs.is_empty());
    assert_eq!(r.input_srcs, BTreeSet::from([pa.clone()]));
    assert_eq!(r.args[1], format!("cat {pa} > $out"));

    // The top reads both downstreams, whose one resolved derivation has one output.
    let dout = ca_output(&resolved[0].0, NarTree::file("same\n"));
    assert_eq!(dout, converge_nix::DOWN_OUT);
    let (_, top) = find(&drvs, "converge-top", None);
    assert_eq!(top.input_drvs.len(), 2);
    let rt = try_resolve(top, &sd, |_, _| Some(dout.clone())).unwrap();
    assert_eq!(rt.args[1], format!("cat {dout} {dout} > $out"));
    let tp = sd.print(&rt.drv_path(&sd).unwrap());
    assert_eq!(tp, converge_nix::TOP_RESOLVED);
    assert_eq!(
        ca_output(&tp, NarTree::file("same\nsame\n")),
        converge_nix::TOP_OUT
    );
}

#[test]
fn failing_input_leaves_the_dependent_unresolvable() {
    let sd = StoreDir::default();
    let drvs = example("ca-failing-input");
    let (ip, input) = find(&drvs, "fail-input", None);
    assert!(input.is_ca_floating() && !input.needs_resolution());
    assert!(input.args[1].ends_with("exit 1"));
    let (_, dep) = find(&drvs, "fail-dependent", None);
    assert!(dep.needs_resolution());
    let e = try_resolve(dep, &sd, |_, _| None).unwrap_err();
    assert_eq!(e.missing().len(), 1);
    assert_eq!(e.missing()[0].drv_path, *ip);
}

#[test]
fn ia_on_ca_resolves_as_nix_did() {
    let sd = StoreDir::default();
    let fixtures = load_fixtures();
    let mixed = &fixtures.iter().find(|(s, _)| s == "mixed").unwrap().1;
    let drvs = example("ia-on-ca");
    let mut real: BTreeMap<String, String> = BTreeMap::new();
    for (p, d) in &drvs {
        let f = &mixed["derivations"][p];
        if d.needs_resolution() {
            assert!(d.has_deferred_outputs(), "{p} is deferred");
            let r = try_resolve(d, &sd, |i, o| {
                (o == "out").then(|| real.get(i).cloned()).flatten()
            })
            .unwrap();
            assert_eq!(
                sd.print(&r.drv_path(&sd).unwrap()),
                f["resolved"]["drv_path"].as_str().unwrap(),
                "{p}"
            );
            // The resolved derivation is input-addressed: its output path is known before building.
            let out = r.outputs["out"].path().unwrap();
            assert_eq!(f["realisations"]["out"]["out_path"], out, "{p}");
        }
        real.insert(
            p.clone(),
            f["realisations"]["out"]["out_path"]
                .as_str()
                .unwrap()
                .into(),
        );
    }
}

#[test]
fn examples_relocate_to_another_store_dir_and_back() {
    let (from, to) = (
        StoreDir::default(),
        StoreDir::new("/tmp/qr-x/store").unwrap(),
    );
    for (name, doc) in examples() {
        let drvs = load(&doc);
        let there = relocate(&drvs, &from, &to).unwrap();
        // What `qr run` will add to a store at `to`: a consistent graph with no trace of /nix/store.
        let mut moved = Map::new();
        for (p, d) in &there {
            assert!(!d.to_aterm().contains("/nix/store"), "{name}: {p}");
            moved.insert(p.clone(), d.to_show_json());
        }
        let mut hs = DrvHashes::new(to.clone());
        let mut ext = |p: &str| -> Result<Derivation, String> { Err(p.to_string()) };
        derivations_from_show_json(&Value::Object(moved), &mut hs, &mut ext).unwrap();
        assert_eq!(relocate(&there, &to, &from).unwrap(), drvs, "{name}");
    }
}

/// The `dynamic` example resolves as `examples/README.md` says: the text output of a producer
/// is the produced `.drv` (its path is `makeTextPath` over the ATerm, as Nix's `.drv` files
/// are), and `top` resolves once `leaf` is built, its placeholder (Nix's `DownstreamPlaceholder`
/// of `outer^out^out^out`) replaced by `leaf`'s output.
#[test]
fn dynamic_example_produces_its_drvs_and_resolves_top() {
    let sd = StoreDir::default();
    let (_, [outer, mid, leaf, top]) = dynamic();
    let drvs = example("dynamic");
    assert_eq!(drvs.len(), 2);
    let (_, o) = drvs.iter().find(|(p, _)| *p == outer).unwrap();
    let (_, t) = drvs.iter().find(|(p, _)| *p == top).unwrap();
    assert!(t.has_dynamic_inputs() && t.needs_resolution());
    assert!(t.to_aterm().starts_with("DrvWithVersion(\"xp-dyn-drv\","));
    // What each producer's builder writes (`$drv`, its marker turned back into the `out`
    // placeholder) is the next derivation, at the path Nix gives it.
    let ph = qr::store::placeholder::hash_placeholder("out");
    let written = |d: &Derivation, marker: &str| d.env["drv"].replace(marker, &ph);
    let text_out = |d: &Derivation, marker: &str, name: &str| {
        sd.print(&sd.make_text_path(name, written(d, marker).as_bytes(), []))
    };
    assert_eq!(text_out(o, "@OUT2@", "dyn-leaf.drv.drv"), mid);
    let m = qr::store::aterm::parse_named(written(o, "@OUT2@").as_bytes(), "dyn-leaf.drv").unwrap();
    assert_eq!(sd.print(&m.drv_path(&sd).unwrap()), mid);
    assert_eq!(text_out(&m, "@OUT1@", "dyn-leaf.drv"), leaf);
    let l = qr::store::aterm::parse_named(written(&m, "@OUT1@").as_bytes(), "dyn-leaf").unwrap();
    assert_eq!(sd.print(&l.drv_path(&sd).unwrap()), leaf);
    let leaf_out = ca_output(&leaf, NarTree::file(b"leaf\n".to_vec()));
    let real: BTreeMap<(String, String), String> = [
        ((outer.clone(), "out".to_string()), mid.clone()),
        ((mid.clone(), "out".to_string()), leaf.clone()),
        ((leaf.clone(), "out".to_string()), leaf_out.clone()),
    ]
    .into();
    let r = try_resolve(t, &sd, |d, o| {
        real.get(&(d.to_string(), o.to_string())).cloned()
    })
    .unwrap();
    assert_eq!(r.args[1], format!("cat {leaf_out} > $out"));
    assert_eq!(r.input_srcs, BTreeSet::from([leaf_out.clone()]));
    assert!(r.input_drvs.is_empty() && !r.has_dynamic_inputs());
    // Without the leaf built, resolution names the missing link.
    let e = try_resolve(t, &sd, |d, o| {
        (o == "out" && d != leaf).then(|| real[&(d.to_string(), o.to_string())].clone())
    })
    .unwrap_err();
    assert_eq!(e.to_string(), format!("no realisation for {leaf}^out"));
}
