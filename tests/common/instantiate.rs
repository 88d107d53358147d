//! Instantiating derivations in memory the way Nix's `derivation` primop does (the fixtures'
//! `lib.nix`: `ca` and `ia` over `/bin/sh -c` scripts), for tests that need graphs of their own.

use std::collections::{BTreeMap, BTreeSet};

use qr::store::StoreDir;
use qr::store::derivation::{Derivation, DerivationOutput};
use qr::store::hash_modulo::DrvHashes;
use qr::store::placeholder::{downstream_placeholder, dynamic_placeholder, hash_placeholder};
use serde_json::Value;

pub const SYSTEM: &str = "x86_64-linux";

/// How an output is addressed (the fixtures' `lib.nix`: `ca` and `ia`).
#[derive(Clone, Copy)]
pub enum Kind {
    /// Floating content-addressed: `__contentAddressed = true`, recursive sha256.
    Ca,
    /// Input-addressed (deferred when an input is CA or deferred).
    Ia,
    /// Floating content-addressed, text-hashed (`outputHashMode = "text"`): an output that is a
    /// `.drv` (dynamic derivations; the name must end in `.drv`).
    Text,
}

/// The builder script of a producer (dynamic derivations): writes `$drv` (a derivation's
/// ATerm with its `out` hash placeholder hidden as `marker`, see [`hide_out_placeholder`]) to
/// `$out`, the placeholder put back. Hidden because the executor, as Nix, rewrites every hash
/// placeholder of the producer's own outputs in its env and args to their paths; the script
/// spells it in two halves for the same reason.
pub fn writes_drv(marker: &str) -> String {
    let ph = hash_placeholder("out");
    let (a, b) = ph.split_at(ph.len() / 2);
    format!(r#"a={a}; b={b}; printf %s "$drv" | sed "s|{marker}|$a$b|g" > $out"#)
}

/// `aterm` with its `out` hash placeholder replaced by `marker` (for [`writes_drv`]).
pub fn hide_out_placeholder(aterm: &str, marker: &str) -> String {
    aterm.replace(&hash_placeholder("out"), marker)
}

/// A dynamic input: output `output` of the derivation reached from `producer` by following
/// the `.drv` outputs of `chain` (`producer^chain[0]^…^output`).
pub struct DynInput<'a> {
    pub producer: &'a str,
    pub chain: &'a [&'a str],
    pub output: &'a str,
}

/// Instantiates derivations in memory as `derivation { name; system; builder = "/bin/sh";
/// args = ["-c" script]; PATH = "/usr/bin:/bin"; … }` does, inputs first.
pub struct Gen {
    pub sd: StoreDir,
    pub hashes: DrvHashes,
    pub drvs: BTreeMap<String, Derivation>,
    /// The `system` of the derivations added next.
    pub system: String,
}

impl Gen {
    pub fn new() -> Self {
        Self::in_store_dir(StoreDir::default())
    }

    /// Instantiates into another logical store dir.
    pub fn in_store_dir(sd: StoreDir) -> Self {
        Gen {
            hashes: DrvHashes::new(sd.clone()),
            sd,
            drvs: BTreeMap::new(),
            system: SYSTEM.into(),
        }
    }

    /// What `${drv}` (its `out`) evaluates to: a downstream placeholder for a CA or deferred
    /// input, else its output path.
    pub fn out(&self, drv_path: &str) -> String {
        match self.drvs[drv_path].outputs["out"].path() {
            Some(p) => p.to_string(),
            None => downstream_placeholder(&self.sd.parse(drv_path).unwrap(), "out"),
        }
    }

    /// What `builtins.outputOf` of a dynamic input evaluates to: its placeholder.
    pub fn dyn_out(&self, d: &DynInput<'_>) -> String {
        let chain: Vec<String> = d.chain.iter().map(|c| c.to_string()).collect();
        dynamic_placeholder(&self.sd.parse(d.producer).unwrap(), &chain, d.output)
    }

    /// Adds a derivation; `inputs` are the drv paths whose `out` the script or `attrs` mention
    /// (the string context). Returns its drv path.
    pub fn add(
        &mut self,
        kind: Kind,
        name: &str,
        script: &str,
        attrs: &[(&str, &str)],
        inputs: &[&str],
    ) -> String {
        self.add_dyn(kind, name, script, attrs, inputs, &[])
    }

    /// The derivation [`add`](Self::add) would make, not added (e.g. to be written by a
    /// producer's builder): its drv path and its ATerm.
    pub fn make(
        &mut self,
        kind: Kind,
        name: &str,
        script: &str,
        attrs: &[(&str, &str)],
    ) -> (String, String) {
        let path = self.add(kind, name, script, attrs, &[]);
        let drv = self.drvs.remove(&path).unwrap();
        (path, drv.to_aterm())
    }

    /// [`add`](Self::add) with dynamic inputs too (each producer is also an input drv, using
    /// no output of its own unless `inputs` names it).
    pub fn add_dyn(
        &mut self,
        kind: Kind,
        name: &str,
        script: &str,
        attrs: &[(&str, &str)],
        inputs: &[&str],
        dynamic: &[DynInput<'_>],
    ) -> String {
        let mut env: BTreeMap<String, String> = [
            ("PATH", "/usr/bin:/bin"),
            ("builder", "/bin/sh"),
            ("name", name),
            ("system", self.system.as_str()),
        ]
        .into_iter()
        .chain(attrs.iter().copied())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let out = match kind {
            Kind::Ca => {
                env.insert("outputHashAlgo".into(), "sha256".into());
                env.insert("outputHashMode".into(), "recursive".into());
                env.insert("out".into(), hash_placeholder("out"));
                DerivationOutput::CaFloating {
                    method_algo: "r:sha256".into(),
                }
            }
            Kind::Ia => DerivationOutput::Deferred,
            Kind::Text => {
                env.insert("outputHashAlgo".into(), "sha256".into());
                env.insert("outputHashMode".into(), "text".into());
                env.insert("out".into(), hash_placeholder("out"));
                DerivationOutput::CaFloating {
                    method_algo: "text:sha256".into(),
                }
            }
        };
        for i in inputs {
            assert!(self.drvs.contains_key(*i), "{name}: unknown input {i}");
        }
        let mut drv = Derivation {
            name: name.into(),
            outputs: BTreeMap::from([("out".to_string(), out)]),
            input_drvs: inputs
                .iter()
                .map(|i| (i.to_string(), BTreeSet::from(["out".to_string()])))
                .collect(),
            dynamic_inputs: BTreeMap::new(),
            input_srcs: BTreeSet::new(),
            system: self.system.clone(),
            builder: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env,
        };
        for d in dynamic {
            assert!(
                self.drvs.contains_key(d.producer),
                "{name}: unknown producer"
            );
            drv.input_drvs.entry(d.producer.to_string()).or_default();
            let (first, rest) = d
                .chain
                .split_first()
                .expect("a chain of at least one output");
            let mut node = drv
                .dynamic_inputs
                .entry(d.producer.to_string())
                .or_default()
                .entry(first.to_string())
                .or_default();
            for link in rest {
                node = node.dynamic_outputs.entry(link.to_string()).or_default();
            }
            node.outputs.insert(d.output.to_string());
        }
        let drvs = &self.drvs;
        let mut load = |p: &str| drvs.get(p).cloned().ok_or_else(|| p.to_string());
        self.hashes
            .fill_input_addressed_paths(&mut drv, &mut load)
            .unwrap();
        let path = self.sd.print(&drv.drv_path(&self.sd).unwrap());
        self.drvs.insert(path.clone(), drv);
        path
    }

    /// The `derivation show` document: drv path → derivation, keys sorted as Nix prints them.
    pub fn doc(&self) -> Value {
        Value::Object(
            self.drvs
                .iter()
                .map(|(p, d)| (p.clone(), sorted(d.to_show_json())))
                .collect(),
        )
    }
}

/// `v` with every object's keys sorted (as Nix's JSON output has them).
pub fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        v => v,
    }
}
