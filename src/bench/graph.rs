//! Synthetic build graphs: `depth` layers of trivial derivations (`/bin/sh -c "echo … > $out"`),
//! each derivation of layer `l > 0` reading `fan_in` outputs of layer `l - 1`, a `ca_fraction` of
//! them floating content-addressed (the rest input-addressed, so deferred when an input is CA or
//! deferred). Instantiated the way Nix's `derivation` primop does (the fixtures' `lib.nix`: `ca`
//! and `ia`), so the native executor builds them and resolution works as for real graphs.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use anyhow::{Context as _, bail};
use futures::{StreamExt, TryStreamExt};

use crate::db::Db;
use crate::db::types::{BuildId, NewBuild};
use crate::store::derivation::{Derivation, DerivationOutput};
use crate::store::hash_modulo::DrvHashes;
use crate::store::placeholder::{downstream_placeholder, hash_placeholder};
use crate::store::{Store, StoreDir};

/// The shape of a graph.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GraphSpec {
    /// Derivations in the graph (each one step to build).
    pub steps: usize,
    /// Share of derivations that are floating content-addressed (0.0 ..= 1.0).
    pub ca_fraction: f64,
    /// Inputs per derivation above the first layer (capped by the layer width).
    pub fan_in: usize,
    /// Layers; the derivations are spread evenly over them.
    pub depth: usize,
    /// Seed of the choices (which inputs, which derivations are CA).
    pub seed: u64,
    /// Put into every derivation's name, so graphs of different runs never share a derivation.
    pub tag: String,
}

/// A generated graph.
pub struct Graph {
    /// Drv path and derivation, layer by layer (inputs before the derivations that read them).
    pub drvs: Vec<(String, Derivation)>,
    /// Number of derivations per layer.
    pub layers: Vec<usize>,
    /// Derivations no other derivation reads: each is queued as a build.
    pub tops: Vec<String>,
    /// Floating CA derivations.
    pub ca: usize,
    /// Derivations that are resolved before they build (CA or deferred, with inputs).
    pub to_resolve: usize,
}

/// splitmix64: small, deterministic, good enough to pick inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }
}

/// What `${drv}` (its `out`) evaluates to: its output path, or a downstream placeholder for a CA
/// or deferred derivation.
fn interpolated(sd: &StoreDir, path: &str, drv: &Derivation) -> anyhow::Result<String> {
    Ok(
        match drv.outputs.get("out").and_then(DerivationOutput::path) {
            Some(p) => p.to_string(),
            None => downstream_placeholder(&sd.parse(path)?, "out"),
        },
    )
}

/// Generates the graph for `system` in store dir `sd`.
pub fn generate(spec: &GraphSpec, sd: &StoreDir, system: &str) -> anyhow::Result<Graph> {
    if spec.steps == 0 || spec.depth == 0 || spec.depth > spec.steps {
        bail!(
            "need 1 <= depth <= steps (steps {}, depth {})",
            spec.steps,
            spec.depth
        );
    }
    if !(0.0..=1.0).contains(&spec.ca_fraction) {
        bail!("--ca-fraction must be within 0..=1");
    }
    let mut rng = Rng(spec.seed);
    let mut hashes = DrvHashes::new(sd.clone());
    let layers: Vec<usize> = (0..spec.depth)
        .map(|l| spec.steps / spec.depth + usize::from(l < spec.steps % spec.depth))
        .collect();
    let mut drvs: Vec<(String, Derivation)> = Vec::with_capacity(spec.steps);
    let mut used: HashSet<usize> = HashSet::new();
    let (mut ca_count, mut to_resolve) = (0, 0);
    let mut prev: std::ops::Range<usize> = 0..0;
    for (l, &width) in layers.iter().enumerate() {
        let start = drvs.len();
        for i in 0..width {
            // Inputs from the layer below: the i-th one (so every one is read), then random ones.
            let mut inputs: BTreeSet<usize> = BTreeSet::new();
            if !prev.is_empty() {
                let want = spec.fan_in.min(prev.len());
                inputs.insert(prev.start + i % prev.len());
                while inputs.len() < want {
                    inputs.insert(prev.start + rng.below(prev.len()));
                }
            }
            let ca = rng.chance(spec.ca_fraction);
            let name = format!("bench-{}-{l}-{i}", spec.tag);
            let mut script = format!("echo {name}");
            for &j in &inputs {
                let (p, d) = &drvs[j];
                script.push(' ');
                script.push_str(&interpolated(sd, p, d)?);
                used.insert(j);
            }
            script.push_str(" > $out");
            let mut env: BTreeMap<String, String> = [
                ("PATH", "/usr/bin:/bin"),
                ("builder", "/bin/sh"),
                ("name", name.as_str()),
                ("system", system),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            let out = if ca {
                env.insert("outputHashAlgo".into(), "sha256".into());
                env.insert("outputHashMode".into(), "recursive".into());
                env.insert("out".into(), hash_placeholder("out"));
                DerivationOutput::CaFloating {
                    method_algo: "r:sha256".into(),
                }
            } else {
                DerivationOutput::Deferred
            };
            let mut drv = Derivation {
                name: name.clone(),
                outputs: BTreeMap::from([("out".to_string(), out)]),
                input_drvs: inputs
                    .iter()
                    .map(|&j| (drvs[j].0.clone(), BTreeSet::from(["out".to_string()])))
                    .collect(),
                dynamic_inputs: BTreeMap::new(),
                input_srcs: BTreeSet::new(),
                system: system.to_string(),
                builder: "/bin/sh".into(),
                args: vec!["-c".into(), script],
                env,
            };
            // Inputs are memoised already: the loader is never asked for one.
            let mut no_load = |p: &str| -> Result<Derivation, String> { Err(p.to_string()) };
            hashes
                .fill_input_addressed_paths(&mut drv, &mut no_load)
                .map_err(|e| anyhow::anyhow!("{name}: {e:?}"))?;
            let path = sd.print(&drv.drv_path(sd).context("drv path")?);
            let mut this = |p: &str| -> Result<Derivation, String> {
                if p == path {
                    Ok(drv.clone())
                } else {
                    Err(p.to_string())
                }
            };
            hashes
                .path_hash(&path, &mut this)
                .map_err(|e| anyhow::anyhow!("{name}: {e:?}"))?;
            ca_count += usize::from(ca);
            to_resolve += usize::from(drv.needs_resolution() && !drv.input_drvs.is_empty());
            drvs.push((path, drv));
        }
        prev = start..drvs.len();
    }
    let tops = (0..drvs.len())
        .filter(|i| !used.contains(i))
        .map(|i| drvs[i].0.clone())
        .collect();
    Ok(Graph {
        drvs,
        layers,
        tops,
        ca: ca_count,
        to_resolve,
    })
}

/// Adds the derivations to the store (what the queue reads), layer by layer, `parallel` at once.
pub async fn add_to_store(store: &dyn Store, graph: &Graph, parallel: usize) -> anyhow::Result<()> {
    let mut start = 0;
    for &width in &graph.layers {
        futures::stream::iter(&graph.drvs[start..start + width])
            .map(|(path, drv)| async move {
                let added = store
                    .add_derivation(drv)
                    .await
                    .with_context(|| format!("adding {path}"))?;
                if added != *path {
                    bail!("the store computed {added} for {path}");
                }
                Ok(())
            })
            .buffer_unordered(parallel.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        start += width;
    }
    Ok(())
}

/// The build of `drv` (at `path`) in `jobset`, queued at `now`, named for the drv, with the
/// output paths known for its input-addressed outputs.
pub fn new_build(jobset: &str, path: &str, drv: &Derivation, now: i64) -> NewBuild {
    NewBuild {
        jobset: jobset.to_string(),
        job: drv.name.clone(),
        drv_path: path.to_string(),
        system: drv.system.clone(),
        priority: 0,
        global_priority: 0,
        max_silent: 0,
        timeout: 0,
        timestamp: now,
        outputs: drv
            .outputs
            .iter()
            .map(|(o, out)| (o.clone(), out.path().map(str::to_string)))
            .collect(),
    }
}

/// Queues one build per top-level derivation in `jobset`, `parallel` inserts at once.
pub async fn queue_builds(
    db: &Db,
    jobset: &str,
    graph: &Graph,
    now: i64,
    parallel: usize,
) -> anyhow::Result<Vec<BuildId>> {
    db.create_jobset(jobset, 100).await?;
    let by_path: std::collections::HashMap<&str, &Derivation> =
        graph.drvs.iter().map(|(p, d)| (p.as_str(), d)).collect();
    let ids = futures::stream::iter(&graph.tops)
        .map(|top| {
            let nb = new_build(jobset, top, by_path[top.as_str()], now);
            async move { db.create_build(&nb).await }
        })
        .buffer_unordered(parallel.max(1))
        .try_collect::<Vec<BuildId>>()
        .await?;
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(steps: usize, ca: f64, fan_in: usize, depth: usize) -> GraphSpec {
        GraphSpec {
            steps,
            ca_fraction: ca,
            fan_in,
            depth,
            seed: 7,
            tag: "t".into(),
        }
    }

    #[test]
    fn layered_graph_has_the_asked_shape() {
        let sd = StoreDir::default();
        let g = generate(&spec(100, 0.5, 3, 4), &sd, "x86_64-linux").unwrap();
        assert_eq!(g.drvs.len(), 100);
        assert_eq!(g.layers, vec![25, 25, 25, 25]);
        // every derivation below the top layer is read by one above it
        assert_eq!(g.tops.len(), 25);
        for (i, (_, d)) in g.drvs.iter().enumerate() {
            let want = if i < 25 { 0 } else { 3 };
            assert_eq!(d.input_drvs.len(), want);
        }
        assert!(g.ca > 25 && g.ca < 75, "{}", g.ca);
        // paths are distinct and inputs come first
        let mut seen = HashSet::new();
        for (p, d) in &g.drvs {
            for i in d.input_drvs.keys() {
                assert!(seen.contains(i));
            }
            assert!(seen.insert(p.clone()));
        }
    }

    #[test]
    fn no_ca_means_input_addressed_paths_and_nothing_to_resolve() {
        let sd = StoreDir::default();
        let g = generate(&spec(30, 0.0, 2, 3), &sd, "x86_64-linux").unwrap();
        assert_eq!((g.ca, g.to_resolve), (0, 0));
        assert!(
            g.drvs
                .iter()
                .all(|(_, d)| d.outputs["out"].path().is_some())
        );
        let all = generate(&spec(30, 1.0, 2, 3), &sd, "x86_64-linux").unwrap();
        assert_eq!((all.ca, all.to_resolve), (30, 20));
    }

    #[test]
    fn same_spec_same_graph() {
        let sd = StoreDir::default();
        let a = generate(&spec(50, 0.3, 2, 5), &sd, "x86_64-linux").unwrap();
        let b = generate(&spec(50, 0.3, 2, 5), &sd, "x86_64-linux").unwrap();
        let paths = |g: &Graph| g.drvs.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
        assert_eq!(paths(&a), paths(&b));
    }
}
