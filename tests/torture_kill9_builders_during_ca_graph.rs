//! Torture: `qr serve` builds the layered CA graph (`QR_TORTURE_STEPS`, default 500) on two remote
//! `qr builder`s; at random moments spread over the graph (`QR_TORTURE_SEED`) a builder is killed
//! with SIGKILL and a new one started (alternately under a new machine id and under the killed
//! one's, with an empty store both times), `max(3, QR_TORTURE_KILLS / 4)` times. The graph
//! finishes with the outputs of an uninterrupted run; the runner accepted every drv once; a drv
//! ran on more than one builder only when a killed builder had run it and its result never
//! reached the runner; every built step row names a builder that ran the drv; and the rows,
//! Resolved links and the runner's store hold the same invariants as after a runner kill.

mod common;
#[path = "common/torture.rs"]
mod torture;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use common::cluster::{Builder, Cluster};
use common::qr::Backend;
use torture::{
    Rng, Sql, check_db_final, check_db_structure, check_runs, check_store, dups, ledger, outputs,
    setup, starts, tail,
};

const JOBS: &str = "2";

fn torture(backend: Backend, label: &str) {
    let Some(mut c) = Cluster::new(backend) else {
        return;
    };
    let s = setup();
    let (k, g, r) = (s.knobs, &s.graph, &s.reference);
    c.start_serve();
    let jobs = ["--max-jobs", JOBS];
    let mut live: Vec<Builder> = vec![c.builder("b1", &jobs, &[]), c.builder("b2", &jobs, &[])];
    for b in &live {
        assert!(
            c.wait_joined(&b.id, 1, Duration::from_secs(30)),
            "{}",
            c.logs(&[b])
        );
    }
    let file = c.qr.write_json("g.json", &g.doc);
    let spawned = SystemTime::now();
    let t = Instant::now();
    let submit = c.submit(&[&file], 1800);
    let kills = (k.kills / 4).max(3);
    let mut rng = Rng(k.seed ^ 0xb1);
    let mut dead: Vec<Builder> = Vec::new();
    let mut next_id = 3;
    let mut joins: BTreeMap<String, usize> = [("b1".to_string(), 1), ("b2".to_string(), 1)].into();
    let mut log = Vec::new();
    let runs = r.runs.len();
    for i in 0..kills {
        let target = (runs as f64 * (0.1 + 0.7 * (i as f64 + rng.unit()) / kills as f64)) as usize;
        let wait = Instant::now();
        while ledger(c.qr.state_dir()).len() < target {
            assert!(
                wait.elapsed() < Duration::from_secs(300),
                "{label}: no progress for 300 s before builder kill {}:\n{}",
                i + 1,
                tail(&c.serve().log, 40)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(rng.millis(0, 300));
        let victim = rng.below(live.len());
        let mut b = live.remove(victim);
        b.proc.kill();
        let at = ledger(c.qr.state_dir()).len();
        // Alternately a new machine, and the same machine back with an empty store.
        let id = if i % 2 == 0 {
            next_id += 1;
            format!("b{}", next_id - 1)
        } else {
            b.id.clone()
        };
        log.push(format!(
            "kill {}: {} at {at} accepted runs (target {target}); started {id}",
            i + 1,
            b.id
        ));
        dead.push(b);
        let nb = c.builder(&id, &jobs, &[]);
        let n = joins.entry(id.clone()).or_insert(0);
        *n += 1;
        assert!(
            c.wait_joined(&id, *n, Duration::from_secs(30)),
            "{}",
            c.logs(&[&nb])
        );
        live.push(nb);
    }
    let (out, builds) = c.finish(submit);
    let took = t.elapsed();
    for l in &log {
        eprintln!("[{label}] {l}");
    }
    let all: Vec<&Builder> = dead.iter().chain(live.iter()).collect();
    assert!(
        out.status.success(),
        "{label}: submit failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&c.serve().log, 60)
    );
    assert_eq!(builds.len(), g.tops, "{label}: one build per top-level drv");
    for b in &builds {
        assert_eq!(b["status"], 0, "{label}: {b}");
    }
    assert_eq!(
        outputs(&builds),
        r.outputs,
        "{label}: the outputs of an uninterrupted run"
    );
    let sql = Sql::new(&c.qr.db_url);
    let root = c.qr.state_dir().join("nix-store");
    let what = format!("{label}: at the end");
    let (resolved_rows, rows) = check_db_structure(&sql, r, &what);
    check_db_final(&sql, &what);
    let (valid, _) = check_store(&root, &mut BTreeSet::new(), true, &what);
    // The runner accepted each drv once (its ledger), and, never killed, accepted all of them.
    let (accepted, _, _) = check_runs(c.qr.state_dir(), r, &[spawned], &Default::default(), &what);
    assert_eq!(accepted, runs, "{what}: the runner accepted every run once");

    // Each builder (one process each): no drv started or run twice by it.
    for b in &all {
        let st = b.state.path();
        let (_, _, again) = check_runs(
            st,
            r,
            &[SystemTime::UNIX_EPOCH],
            &Default::default(),
            &format!("{what}: builder {}", b.id),
        );
        assert_eq!(again, 0);
    }
    // Across builders: a drv ran on several only if all but one of those were killed.
    let killed_runs: Vec<String> = dead.iter().flat_map(|b| ledger(b.state.path())).collect();
    let live_runs: Vec<String> = live.iter().flat_map(|b| ledger(b.state.path())).collect();
    let d = dups(&live_runs);
    assert!(
        d.is_empty(),
        "{what}: drvs run twice by builders still alive: {d:?}"
    );
    let every: Vec<String> = killed_runs.iter().chain(&live_runs).cloned().collect();
    let twice = dups(&every);
    let jobs_n: usize = JOBS.parse().unwrap();
    assert!(
        twice.len() <= dead.len() * jobs_n,
        "{what}: {} drvs ran on two builders, more than {} killed builders × {jobs_n} jobs: {twice:?}",
        twice.len(),
        dead.len()
    );
    // Every built step row names a builder (by machine id) that ran the drv.
    let mut by_machine: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for b in &all {
        by_machine
            .entry(b.id.clone())
            .or_default()
            .extend(ledger(b.state.path()));
    }
    let built =
        sql.rows("select drvpath, machine from buildsteps where status = 0 and timesbuilt > 0");
    for row in &built {
        let (drv, m) = (row[0].clone().unwrap(), row[1].clone().unwrap_or_default());
        assert!(
            by_machine.get(&m).is_some_and(|s| s.contains(&drv)),
            "{what}: {drv} recorded as built on {m:?}, which did not run it"
        );
    }
    let total_starts: usize = all.iter().map(|b| starts(b.state.path()).len()).sum();
    eprintln!(
        "[{label}] {kills} builder kills; finished in {:.1} s (uninterrupted qr run: {:.1} s); \
         the runner accepted {accepted} runs; builders ran {} ({} on killed builders, {} drvs on two), \
         {total_starts} executor starts; {resolved_rows} Resolved rows; rows by status {rows:?} \
         (reference {:?}); {valid} valid store paths on the runner",
        took.as_secs_f64(),
        r.duration.as_secs_f64(),
        every.len(),
        killed_runs.len(),
        twice.len(),
        r.rows
    );
}

#[test]
fn builders_killed_at_random_during_a_ca_graph_end_as_an_uninterrupted_run_on_sqlite() {
    torture(Backend::Sqlite, "kill9-builders-sqlite");
}

#[test]
fn builders_killed_at_random_during_a_ca_graph_end_as_an_uninterrupted_run_on_postgres() {
    torture(Backend::Postgres, "kill9-builders-postgres");
}
