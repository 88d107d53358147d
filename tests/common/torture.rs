//! Shared by the torture tests (`tests/torture_*.rs`, `docs/torture.md`): the size knobs, a
//! seeded layered CA graph of trivial builders, a reference (uninterrupted) run, and the
//! invariant checks against the database, the local store's metadata, the runs ledger and the
//! build logs.
//!
//! Included with `#[path]` by the torture tests only (it is not part of `common/mod.rs`).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use qr::store::StoreDir;
use qr::store::derivation::Derivation;
use serde_json::Value;

use crate::common::instantiate::{Gen, Kind};
use crate::common::qr::{Backend, Qr};

// ------------------------------------------------------------------------------------ knobs

/// `QR_TORTURE_STEPS` (default 500), `QR_TORTURE_KILLS` (default 20), `QR_TORTURE_SEED`
/// (default: from the clock; always printed so a failure can be replayed).
#[derive(Debug, Clone, Copy)]
pub struct Knobs {
    pub steps: usize,
    pub kills: usize,
    pub seed: u64,
}

impl Knobs {
    pub fn from_env(test: &str) -> Knobs {
        let num = |k: &str, d: u64| -> u64 {
            match std::env::var(k) {
                Ok(v) if !v.trim().is_empty() => v
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{k}={v:?} is not a number")),
                _ => d,
            }
        };
        let clock = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let k = Knobs {
            steps: num("QR_TORTURE_STEPS", 500).max(20) as usize,
            kills: num("QR_TORTURE_KILLS", 20) as usize,
            seed: num("QR_TORTURE_SEED", clock % 1_000_000_007),
        };
        eprintln!(
            "[{test}] QR_TORTURE_STEPS={} QR_TORTURE_KILLS={} QR_TORTURE_SEED={}",
            k.steps, k.kills, k.seed
        );
        k
    }
}

/// splitmix64: deterministic from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + (self.next() % (hi - lo + 1)))
    }
}

// ------------------------------------------------------------------------------------ graph

/// A generated graph and its shape.
pub struct Graph {
    /// The `derivation show` document `qr run` / `qr submit` accept.
    pub doc: Value,
    pub drvs: BTreeMap<String, Derivation>,
    pub layers: usize,
    /// Floating CA derivations.
    pub ca: usize,
    /// Derivations resolved before they build (CA with inputs, or deferred IA).
    pub to_resolve: usize,
    /// Derivations that are a second copy of another one: distinct drvs that produce the same
    /// content (leaves) or resolve to the same resolved drv (above), so one of each pair is an
    /// early cutoff or shares the other's resolved step.
    pub twins: usize,
    /// Derivations no other one reads (each is queued as a build).
    pub tops: usize,
    /// Derivations whose builder sleeps 0.3 s (so kills also land while builders run).
    pub slow: usize,
}

struct Class {
    copies: Vec<String>,
    /// CA, or IA with a floating input below (deferred): its outputs are known only once built.
    floating: bool,
}

/// About `steps` trivial derivations in layers, half floating CA. Every derivation above the
/// first layer reads 2–4 outputs (mostly of the layer below) with
/// `{ echo NAME; cat INPUTS… | cksum; echo FIRST-INPUT; } > $out`, so outputs depend on every
/// input and refer to one. Some CA leaves come in two copies (the same output, different drvs);
/// a floating derivation reading a class that has two copies gets two copies as well, one per
/// choice of copies, and the two resolve to the same resolved drv: built once, the other copy
/// attaches to it or is an early cutoff. Same seed, same graph.
pub fn graph(steps: usize, seed: u64) -> Graph {
    let mut rng = Rng(seed ^ 0x005e_ed0f_6a4a_f00d);
    let mut g = Gen::new();
    let depth = (steps / 60).clamp(4, 16);
    let per_layer = steps.div_ceil(depth);
    let mut layers: Vec<Vec<Class>> = Vec::new();
    let (mut total, mut twins, mut slow) = (0usize, 0usize, 0usize);
    for l in 0..depth {
        let quota = if l + 1 == depth {
            steps - total
        } else {
            per_layer.min(steps - total)
        };
        let mut layer: Vec<Class> = Vec::new();
        let mut made = 0;
        while made < quota {
            let i = layer.len();
            let name = format!("t{l}-{i}");
            let ca = rng.chance(0.5);
            let kind = if ca { Kind::Ca } else { Kind::Ia };
            let nap = if rng.chance(0.1) { "sleep 0.3; " } else { "" };
            let room = quota - made;
            let class = if l == 0 {
                let n = if ca && room >= 2 && rng.chance(0.4) {
                    2
                } else {
                    1
                };
                let copies = (0..n)
                    .map(|c| {
                        let script = format!("{nap}echo {name} > $out; : copy-{c}");
                        g.add(kind, &name, &script, &[], &[])
                    })
                    .collect();
                Class {
                    copies,
                    floating: ca,
                }
            } else {
                let k = 2 + rng.below(3);
                let mut inputs: Vec<(usize, usize)> = Vec::new();
                let mut tries = 0;
                while inputs.len() < k && tries < 50 {
                    tries += 1;
                    let from = if l == 1 || rng.chance(0.8) {
                        l - 1
                    } else {
                        rng.below(l - 1)
                    };
                    let pick = (from, rng.below(layers[from].len()));
                    if !inputs.contains(&pick) {
                        inputs.push(pick);
                    }
                }
                let floating = ca || inputs.iter().any(|&(a, b)| layers[a][b].floating);
                let twin_able =
                    floating && inputs.iter().any(|&(a, b)| layers[a][b].copies.len() > 1);
                let n = if twin_able && room >= 2 && rng.chance(0.5) {
                    2
                } else {
                    1
                };
                let offsets: Vec<usize> = inputs.iter().map(|_| rng.below(2)).collect();
                let mut copies: Vec<String> = Vec::new();
                for c in 0..n {
                    let picked: Vec<String> = inputs
                        .iter()
                        .zip(&offsets)
                        .map(|(&(a, b), off)| {
                            let cl = &layers[a][b];
                            cl.copies[(c + off) % cl.copies.len()].clone()
                        })
                        .collect();
                    let outs: Vec<String> = picked.iter().map(|d| g.out(d)).collect();
                    let script = format!(
                        "{nap}{{ echo {name}; cat {} | cksum; echo {}; }} > $out",
                        outs.join(" "),
                        outs[0]
                    );
                    let refs: Vec<&str> = picked.iter().map(String::as_str).collect();
                    let p = g.add(kind, &name, &script, &[], &refs);
                    if !copies.contains(&p) {
                        copies.push(p);
                    }
                }
                Class { copies, floating }
            };
            made += class.copies.len();
            twins += class.copies.len() - 1;
            if !nap.is_empty() {
                slow += class.copies.len();
            }
            layer.push(class);
        }
        total += made;
        layers.push(layer);
    }
    let used: BTreeSet<&String> = g.drvs.values().flat_map(|d| d.input_drvs.keys()).collect();
    let tops = g.drvs.keys().filter(|p| !used.contains(p)).count();
    let ca = g.drvs.values().filter(|d| d.is_ca_floating()).count();
    let to_resolve = g.drvs.values().filter(|d| d.needs_resolution()).count();
    Graph {
        doc: g.doc(),
        drvs: g.drvs.clone(),
        layers: depth,
        ca,
        to_resolve,
        twins,
        tops,
        slow,
    }
}

impl Graph {
    pub fn describe(&self) -> String {
        format!(
            "{} drvs in {} layers: {} floating CA, {} to resolve, {} twin copies, {} slow, {} top-level (builds)",
            self.drvs.len(),
            self.layers,
            self.ca,
            self.to_resolve,
            self.twins,
            self.slow,
            self.tops
        )
    }

    /// What every drv that needs resolution resolves to, given the realisations of a run.
    pub fn resolutions(
        &self,
        realisations: &BTreeMap<(String, String), String>,
    ) -> BTreeMap<String, String> {
        let sd = StoreDir::default();
        let mut out = BTreeMap::new();
        for (p, d) in &self.drvs {
            if !d.needs_resolution() {
                continue;
            }
            let r = qr::store::resolve::try_resolve(d, &sd, |i, o| {
                match self
                    .drvs
                    .get(i)
                    .and_then(|x| x.outputs.get(o))
                    .and_then(|x| x.path())
                {
                    Some(s) => Some(s.to_string()),
                    None => realisations.get(&(i.to_string(), o.to_string())).cloned(),
                }
            })
            .unwrap_or_else(|e| panic!("resolving {p} with the reference's realisations: {e}"));
            out.insert(p.clone(), sd.print(&r.drv_path(&sd).unwrap()));
        }
        out
    }
}

// ------------------------------------------------------------------------------------ SQL

/// Plain SQL against a database or the store's metadata, every column read as text (queries
/// `cast` what is not text). One connection per query: the runner may be dead or restarting.
pub struct Sql {
    url: String,
    rt: tokio::runtime::Runtime,
}

pub type Rows = Vec<Vec<Option<String>>>;

impl Sql {
    pub fn new(url: &str) -> Sql {
        Sql {
            url: url.to_string(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    /// The local store's metadata, read-only.
    pub fn store_meta(store_root: &Path) -> Sql {
        Sql::new(&format!(
            "sqlite://{}?mode=ro",
            store_root.join(".qr-meta/store.sqlite").display()
        ))
    }

    pub fn rows(&self, q: &str) -> Rows {
        use sqlx::Connection;
        self.rt.block_on(async {
            if self.url.starts_with("sqlite:") {
                let c = sqlx::SqliteConnection::connect(&self.url).await;
                text_rows(c, &self.url, q).await
            } else {
                let c = sqlx::PgConnection::connect(&self.url).await;
                text_rows(c, &self.url, q).await
            }
        })
    }

    /// One text column, nulls as "".
    pub fn col(&self, q: &str) -> Vec<String> {
        self.rows(q)
            .into_iter()
            .map(|r| r.into_iter().next().flatten().unwrap_or_default())
            .collect()
    }

    pub fn count(&self, q: &str) -> usize {
        self.col(q)[0].parse().unwrap()
    }
}

/// `(drvpath, outputname) → outpath` of the `realisations` table.
pub fn db_realisations(sql: &Sql) -> BTreeMap<(String, String), String> {
    sql.rows("select drvpath, outputname, outpath from realisations")
        .into_iter()
        .map(|r| {
            let s = |i: usize| r[i].clone().unwrap_or_default();
            ((s(0), s(1)), s(2))
        })
        .collect()
}

/// `(drvPath, outputName) → output path` of the store's `Realisations`.
pub fn store_realisations(root: &Path) -> BTreeMap<(String, String), String> {
    Sql::store_meta(root)
        .rows(
            "select r.drvPath, r.outputName, v.path from Realisations r \
             join ValidPaths v on v.id = r.outputPath",
        )
        .into_iter()
        .map(|r| {
            let s = |i: usize| r[i].clone().unwrap_or_default();
            ((s(0), s(1)), s(2))
        })
        .collect()
}

// ------------------------------------------------------------------------------------ runs

/// The runs ledger and the build logs of one state dir (a runner's or a builder's).
pub fn ledger(state: &Path) -> Vec<String> {
    std::fs::read_to_string(state.join("runs.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// One executor start: the executor creates `<logs>/<drv base name>.<random>.log` before it
/// starts the builder, killed or not.
#[derive(Debug, Clone)]
pub struct Start {
    pub drv_base: String,
    pub created: SystemTime,
    pub file: PathBuf,
}

pub fn starts(state: &Path) -> Vec<Start> {
    let dir = state.join("logs");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return vec![];
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = name
            .strip_suffix(".log")
            .or_else(|| name.strip_suffix(".log.gz"))
        else {
            continue;
        };
        let Some((drv_base, _random)) = stem.rsplit_once('.') else {
            continue;
        };
        let md = e.metadata().unwrap();
        out.push(Start {
            drv_base: drv_base.to_string(),
            created: md.created().or_else(|_| md.modified()).unwrap(),
            file: e.path(),
        });
    }
    out
}

pub fn base(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

pub fn dups(v: &[String]) -> BTreeMap<String, usize> {
    let mut m: BTreeMap<String, usize> = BTreeMap::new();
    for x in v {
        *m.entry(x.clone()).or_default() += 1;
    }
    m.retain(|_, n| *n > 1);
    m
}

// ------------------------------------------------------------------------------------ reference

/// An uninterrupted run of the graph: what every torture run must end with.
pub struct Reference {
    /// Top-level drv → its build's outputs.
    pub outputs: BTreeMap<String, Value>,
    pub realisations: BTreeMap<(String, String), String>,
    pub store_realisations: BTreeMap<(String, String), String>,
    /// Drvs the executor ran (each once).
    pub runs: BTreeSet<String>,
    /// Drv → the resolved drv it resolves to.
    pub resolved: BTreeMap<String, String>,
    pub builds: usize,
    pub duration: Duration,
    /// Step rows by status code.
    pub rows: BTreeMap<String, usize>,
}

/// Top-level drv → outputs, from `qr run --json` / `qr submit --wait --json` lines.
pub fn outputs(builds: &[Value]) -> BTreeMap<String, Value> {
    builds
        .iter()
        .map(|b| {
            (
                b["drvPath"].as_str().unwrap_or_default().to_string(),
                b["outputs"].clone(),
            )
        })
        .collect()
}

pub fn rows_by_status(sql: &Sql) -> BTreeMap<String, usize> {
    sql.rows(
        "select coalesce(cast(status as text), 'null'), cast(count(*) as text) \
         from buildsteps group by status",
    )
    .into_iter()
    .map(|r| {
        (
            r[0].clone().unwrap_or_default(),
            r[1].clone().unwrap_or_default().parse().unwrap(),
        )
    })
    .collect()
}

/// Runs the graph once, uninterrupted, with `qr run` on `backend` (`None`: PostgreSQL wanted
/// and unreachable outside CI). Checks the run against the same invariants as the torture runs.
pub fn reference(backend: Backend, g: &Graph, what: &str) -> Option<(Qr, Reference)> {
    let qr = Qr::new(backend, true)?;
    let file = qr.write_json("g.json", &g.doc);
    let t = Instant::now();
    let (out, builds) = qr.run_json(&[&file], &[("QR_LOCAL_BUILDER_MAX_JOBS", SLOTS)]);
    let duration = t.elapsed();
    assert!(
        out.status.success(),
        "{what}: the uninterrupted run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(builds.len(), g.tops, "{what}: one build per top-level drv");
    let sql = Sql::new(&qr.db_url);
    let realisations = db_realisations(&sql);
    let resolved = g.resolutions(&realisations);
    let runs = ledger(qr.state_dir());
    let d = dups(&runs);
    assert!(d.is_empty(), "{what}: uninterrupted run built twice: {d:?}");
    let r = Reference {
        outputs: outputs(&builds),
        store_realisations: store_realisations(&qr.state_dir().join("nix-store")),
        runs: runs.iter().cloned().collect(),
        realisations,
        resolved,
        builds: builds.len(),
        duration,
        rows: rows_by_status(&sql),
    };
    let st = starts(qr.state_dir());
    assert_eq!(
        st.len(),
        runs.len(),
        "{what}: uninterrupted run: every executor start completed once"
    );
    check_db_structure(&sql, &r, &format!("{what} (reference)"));
    check_db_final(&sql, &format!("{what} (reference)"));
    let mut cache = BTreeSet::new();
    check_store(
        &qr.state_dir().join("nix-store"),
        &mut cache,
        true,
        &format!("{what} (reference)"),
    );
    eprintln!(
        "[{what}] reference run: {:.1} s, {} builds, {} executor runs, {} resolutions, rows {:?}",
        duration.as_secs_f64(),
        r.builds,
        r.runs.len(),
        r.resolved.len(),
        r.rows
    );
    Some((qr, r))
}

/// With `QR_TORTURE_KEEP` set, the state (temp dir, PostgreSQL database) is kept for a post
/// mortem: the runner's `Qr` is leaked, and its place printed.
pub fn keep(qr: Qr, what: &str) -> &'static Qr {
    eprintln!(
        "[{what}] QR_TORTURE_KEEP: state kept in {} (database {})",
        qr.state_dir().display(),
        qr.db_url
    );
    Box::leak(Box::new(qr))
}

pub fn keeping() -> bool {
    std::env::var_os("QR_TORTURE_KEEP").is_some()
}

/// Concurrent jobs of the in-process local builder in these tests.
pub const SLOTS: &str = "4";

/// What every test of one test binary shares: the knobs (one seed per process), the graph and
/// its uninterrupted reference run, made once (on SQLite: the outputs, realisations and resolved
/// drvs do not depend on the database) by whichever test asks first.
pub struct Setup {
    pub knobs: Knobs,
    pub graph: Graph,
    pub reference: Reference,
}

pub fn setup() -> &'static Setup {
    static SETUP: std::sync::OnceLock<Setup> = std::sync::OnceLock::new();
    SETUP.get_or_init(|| {
        let knobs = Knobs::from_env("torture");
        let graph = graph(knobs.steps, knobs.seed);
        eprintln!("[torture] {}", graph.describe());
        let (_state, reference) =
            reference(Backend::Sqlite, &graph, "torture").expect("SQLite is always there");
        Setup {
            knobs,
            graph,
            reference,
        }
    })
}

// ------------------------------------------------------------------------------------ checks

/// What holds at every moment, a crash included: no orphan rows, no duplicate rows, the
/// Resolved/resolvedToStep link complete and pointing at the resolved drv's row in the same
/// build. Returns (Resolved rows, rows by status).
pub fn check_db_structure(
    sql: &Sql,
    r: &Reference,
    what: &str,
) -> (usize, BTreeMap<String, usize>) {
    let none = |q: &str, why: &str| {
        let rows = sql.rows(q);
        assert!(rows.is_empty(), "{what}: {why}: {rows:?}");
    };
    none(
        "select cast(s.build as text), cast(s.stepnr as text) from buildsteps s \
         where not exists (select 1 from builds b where b.id = s.build)",
        "step rows of no build",
    );
    none(
        "select cast(o.build as text), cast(o.stepnr as text) from buildstepoutputs o \
         where not exists (select 1 from buildsteps s where s.build = o.build and s.stepnr = o.stepnr)",
        "step outputs of no step",
    );
    none(
        "select cast(o.build as text), o.name from buildoutputs o \
         where not exists (select 1 from builds b where b.id = o.build)",
        "build outputs of no build",
    );
    none(
        "select r.drvpath from realisations r where r.build is not null and not exists \
         (select 1 from buildsteps s where s.build = r.build and s.stepnr = r.stepnr)",
        "realisations naming no step",
    );
    none(
        "select cast(s.build as text), cast(s.stepnr as text) from buildsteps s \
         join builds b on b.id = s.build where s.stepnr > b.laststepnr or s.stepnr < 1",
        "step numbers outside 1..laststepnr",
    );
    none(
        "select cast(build as text), cast(stepnr as text), cast(status as text), \
         cast(resolvedtostep as text) from buildsteps \
         where (status is not null and status = 13 and resolvedtostep is null) \
            or ((status is null or status <> 13) and resolvedtostep is not null)",
        "status 13 without resolvedtostep, or resolvedtostep without status 13",
    );
    none(
        "select cast(s.build as text), cast(s.stepnr as text) from buildsteps s \
         where s.resolvedtostep is not null and not exists \
         (select 1 from buildsteps t where t.build = s.build and t.stepnr = s.resolvedtostep)",
        "resolvedtostep naming no step row of the same build",
    );
    // Duplicates. A drv's Resolved row is one per build; each resolution inserts its own row
    // for the resolved drv (docs/actors.md, point 5), so twins resolving to one drv in one build
    // give that drv two successful rows there: one built, the other an early cutoff
    // (timesbuilt 0) — by design, and `scenario_early_cutoff_builds_resolved_drv_once` checks
    // it. So, exactly: one Resolved row per (build, drv); no two Resolved rows share a target;
    // per (build, drv) at most one successful row that is no resolution's target; per drv at
    // most one successful row that built it (timesbuilt > 0), in the whole database.
    let dup = |q: &str, why: &str| {
        let rows = sql.rows(q);
        assert!(
            rows.is_empty(),
            "{what}: {why}: {rows:?}; the rows:\n{}",
            step_rows(sql, &rows)
        );
    };
    dup(
        "select cast(build as text), drvpath from buildsteps \
         where status = 13 group by build, drvpath having count(*) > 1",
        "two Resolved rows for one drv in one build",
    );
    dup(
        "select cast(s.build as text), t.drvpath from buildsteps s \
         join buildsteps t on t.build = s.build and t.stepnr = s.resolvedtostep \
         where s.status = 13 group by s.build, s.resolvedtostep, t.drvpath having count(*) > 1",
        "two Resolved rows pointing at one row",
    );
    dup(
        "select cast(s.build as text), s.drvpath from buildsteps s where s.status = 0 \
         and not exists (select 1 from buildsteps o where o.build = s.build \
                         and o.resolvedtostep = s.stepnr) \
         group by s.build, s.drvpath having count(*) > 1",
        "two successful rows for one drv in one build that are no resolution's target",
    );
    dup(
        "select cast(min(build) as text), drvpath from buildsteps \
         where status = 0 and timesbuilt > 0 group by drvpath having count(*) > 1",
        "two successful rows that each built the drv",
    );
    none(
        "select cast(build as text), cast(stepnr as text) from buildsteps \
         where status is not null and busy <> 0",
        "a finished row still busy",
    );
    // Every link points at the drv the original resolves to (with the reference's inputs).
    let links = sql.rows(
        "select s.drvpath, t.drvpath, cast(s.build as text), cast(s.stepnr as text) \
         from buildsteps s join buildsteps t on t.build = s.build and t.stepnr = s.resolvedtostep \
         where s.status = 13",
    );
    for l in &links {
        let (orig, target) = (l[0].clone().unwrap(), l[1].clone().unwrap());
        let want = r.resolved.get(&orig);
        assert_eq!(
            want,
            Some(&target),
            "{what}: build {:?} step {:?}: {orig} is Resolved to {target}",
            l[2],
            l[3]
        );
    }
    // Realisations recorded agree with the uninterrupted run's.
    for (k, v) in db_realisations(sql) {
        assert_eq!(
            r.realisations.get(&k),
            Some(&v),
            "{what}: realisation {k:?} differs from the uninterrupted run's"
        );
    }
    (links.len(), rows_by_status(sql))
}

/// Every column of the step rows of these (build, drv path) pairs, for failure messages.
pub fn step_rows(sql: &Sql, pairs: &Rows) -> String {
    let mut out = String::new();
    for p in pairs.iter().take(5) {
        let (b, d) = (
            p[0].clone().unwrap_or_default(),
            p[1].clone().unwrap_or_default(),
        );
        for r in sql.rows(&format!(
            "select cast(build as text), cast(stepnr as text), drvpath, cast(status as text), \
             cast(busy as text), cast(timesbuilt as text), machine, cast(propagatedfrom as text), \
             cast(resolvedtostep as text), cast(starttime as text), cast(stoptime as text), errormsg \
             from buildsteps where build = {b} and drvpath = '{d}' order by stepnr"
        )) {
            out.push_str(&format!("{r:?}\n"));
        }
        for r in sql.rows(&format!(
            "select cast(build as text), cast(stepnr as text), drvpath, cast(status as text), \
             cast(resolvedtostep as text) from buildsteps where build = {b} and resolvedtostep in \
             (select stepnr from buildsteps where build = {b} and drvpath = '{d}')"
        )) {
            out.push_str(&format!("  resolved to it: {r:?}\n"));
        }
    }
    out
}

/// What holds once every build finished: every build succeeded, no row is pending or busy, no
/// failure is cached.
pub fn check_db_final(sql: &Sql, what: &str) {
    let none = |q: &str, why: &str| {
        let rows = sql.rows(q);
        assert!(rows.is_empty(), "{what}: {why}: {rows:?}");
    };
    none(
        "select cast(id as text), cast(finished as text), cast(buildstatus as text) from builds \
         where finished <> 1 or buildstatus is null or buildstatus <> 0",
        "a build unfinished or not successful",
    );
    let open = sql.rows(
        "select cast(build as text), drvpath from buildsteps where status is null or busy <> 0",
    );
    assert!(
        open.is_empty(),
        "{what}: {} step rows left unfinished or busy: {open:?}; the rows:\n{}",
        open.len(),
        step_rows(sql, &open)
    );
    none(
        "select cast(build as text), cast(stepnr as text), drvpath, cast(status as text), errormsg \
         from buildsteps where status not in (0, 3, 13)",
        "a step row failed (only Success, Aborted by a crash, and Resolved are expected)",
    );
    none("select path from failedpaths", "a cached failure");
    none(
        "select b.drvpath, o.name from builds b join buildoutputs o on o.build = b.id \
         where o.path is null",
        "a finished build with an unknown output path",
    );
}

/// The store's metadata against the files: every registered path has contents with the
/// registered narHash and narSize (hashed once per path, `verified` remembers; `full` re-hashes
/// everything and also requires every entry of the root to be registered, as after a clean
/// open). Reads the metadata read-only, as a crash left it. Returns (valid paths, unregistered
/// entries in the root).
pub fn check_store(
    root: &Path,
    verified: &mut BTreeSet<String>,
    full: bool,
    what: &str,
) -> (usize, usize) {
    let meta = Sql::store_meta(root);
    let rows = meta.rows("select path, narHash, cast(narSize as text) from ValidPaths");
    let mut registered = BTreeSet::new();
    for r in &rows {
        let path = r[0].clone().unwrap();
        let b = base(&path).to_string();
        let phys = root.join(&b);
        assert!(
            std::fs::symlink_metadata(&phys).is_ok(),
            "{what}: {path} is registered but {} is missing",
            phys.display()
        );
        registered.insert(b);
        if !full && verified.contains(&path) {
            continue;
        }
        let want = qr::store::hash::parse_sha256(r[1].as_deref().unwrap()).unwrap();
        let (h, size) = qr::store::nar::nar_hash_and_size(&phys).unwrap();
        assert!(
            h == want && Some(size.to_string()) == r[2],
            "{what}: {path}: contents do not have the registered narHash/narSize"
        );
        verified.insert(path);
    }
    let mut stray = Vec::new();
    for e in std::fs::read_dir(root).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        if !n.starts_with('.') && !registered.contains(&n) {
            stray.push(n);
        }
    }
    if full {
        assert!(
            stray.is_empty(),
            "{what}: entries in the store root that are not registered: {stray:?}"
        );
    }
    (rows.len(), stray.len())
}

/// The runs ledger and the executor starts of one runner against the reference.
///
/// The executor appends to the ledger after the outputs are registered in the store, and a
/// restarted runner (its expander, or the step actor for a resolved drv) takes registered
/// outputs as built; so the ledger holds no drv twice, killed or not. A kill after the builder
/// ran but before the registration committed loses that run: the drv is started again, which
/// the build logs show (the executor creates the log before it starts the builder). So: every
/// drv at most once in the ledger; only drvs the uninterrupted run built; every start of a drv in
/// a different process generation (`spawns`: when each was started); and no start of a drv in a
/// generation after one that ended with the drv's outputs registered (`registered`: drv base
/// name → the first generation after whose kill the store held a realisation for it).
/// Returns (ledger lines, executor starts, drvs started more than once).
pub fn check_runs(
    state: &Path,
    r: &Reference,
    spawns: &[SystemTime],
    registered: &BTreeMap<String, usize>,
    what: &str,
) -> (usize, usize, usize) {
    let runs = ledger(state);
    let d = dups(&runs);
    assert!(
        d.is_empty(),
        "{what}: drvs built twice (runs ledger): {d:?}"
    );
    let extra: Vec<&String> = runs.iter().filter(|x| !r.runs.contains(*x)).collect();
    assert!(
        extra.is_empty(),
        "{what}: built drvs the uninterrupted run did not build: {extra:?}"
    );
    let st = starts(state);
    let generation = |t: SystemTime| spawns.iter().rposition(|s| *s <= t).unwrap_or(0);
    let mut by_drv: BTreeMap<&str, Vec<(usize, &Start)>> = BTreeMap::new();
    for s in &st {
        by_drv
            .entry(&s.drv_base)
            .or_default()
            .push((generation(s.created), s));
    }
    let mut again = 0;
    for (drv, v) in &by_drv {
        let gens: BTreeSet<usize> = v.iter().map(|(g, _)| *g).collect();
        assert_eq!(
            gens.len(),
            v.len(),
            "{what}: {drv} started twice by one process: {v:?}"
        );
        if v.len() > 1 {
            again += 1;
        }
        if let Some(done) = registered.get(*drv) {
            assert!(
                gens.iter().all(|g| g <= done),
                "{what}: {drv} started in generation(s) {gens:?} although its outputs were registered when generation {done} was killed"
            );
        }
    }
    (runs.len(), st.len(), again)
}

/// Adds the drvs with a realisation in the store (outputs registered) to `registered`, as done
/// by generation `generation` (see [`check_runs`]).
pub fn note_registered(root: &Path, generation: usize, registered: &mut BTreeMap<String, usize>) {
    for (drv, _) in store_realisations(root).into_keys() {
        registered
            .entry(base(&drv).to_string())
            .or_insert(generation);
    }
}

/// The last `n` lines of a file (for failure messages).
pub fn tail(p: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `q` on a freshly opened connection (to `url`, for messages) and reads every column as
/// text, then closes it.
async fn text_rows<C>(conn: Result<C, sqlx::Error>, url: &str, q: &str) -> Rows
where
    C: sqlx::Connection,
    for<'c> &'c mut C: sqlx::Executor<'c, Database = C::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, C::Database> + sqlx::Type<C::Database>,
    for<'q> <C::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, C::Database>,
    usize: sqlx::ColumnIndex<<C::Database as sqlx::Database>::Row>,
{
    use sqlx::Row;
    let mut c = conn.unwrap_or_else(|e| panic!("{url}: {e}"));
    let rows = sqlx::query::<C::Database>(q)
        .fetch_all(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{q}: {e}"));
    let out = rows
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| r.try_get::<Option<String>, _>(i).unwrap())
                .collect()
        })
        .collect();
    let _ = c.close().await;
    out
}
