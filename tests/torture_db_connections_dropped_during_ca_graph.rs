//! Torture: while `qr run` builds the layered CA graph (`QR_TORTURE_STEPS`, default 500) on
//! PostgreSQL, every connection of its database is terminated (`pg_terminate_backend`) again
//! and again, at random intervals of 20–300 ms (`QR_TORTURE_SEED`). The runner retries and
//! finishes on its own, with the outputs of an uninterrupted run, no executor started twice for
//! a drv (one process: a dropped connection must never cost a rebuild), no duplicate, orphan or
//! unfinished rows, the Resolved links right, and the store consistent.

mod common;
#[path = "common/torture.rs"]
mod torture;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use common::qr::{Backend, Qr};
use torture::{
    Knobs, Rng, SLOTS, Sql, check_db_final, check_db_structure, check_runs, check_store, graph,
    outputs, reference, tail,
};

#[test]
fn runner_survives_its_database_connections_being_terminated_during_a_ca_graph() {
    let label = "db-drops-postgres";
    let k = Knobs::from_env(label);
    // The longest pause between two rounds of terminations (`QR_TORTURE_DROP_MS`, default 300).
    let drop_ms: u64 = std::env::var("QR_TORTURE_DROP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
        .max(1);
    eprintln!("[{label}] QR_TORTURE_DROP_MS={drop_ms}");
    let g = graph(k.steps, k.seed);
    eprintln!("[{label}] {}", g.describe());
    let Some((_reference_state, r)) = reference(Backend::Postgres, &g, label) else {
        return;
    };
    let Some(qr) = Qr::new(Backend::Postgres, true) else {
        return;
    };
    let file = qr.write_json("g.json", &g.doc);
    let db_name = qr.db_url.rsplit('/').next().unwrap().to_string();
    let base_url = std::env::var("QR_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let err = qr.state_dir().join("run.err");
    let spawned = SystemTime::now();
    let t = Instant::now();
    let mut c = qr.command();
    c.args(["run", "--json"])
        .arg(&file)
        .env("QR_LOCAL_BUILDER_MAX_JOBS", SLOTS)
        .env("QR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err).unwrap());
    let child = c.spawn().unwrap();

    // The terminator: until the runner exits.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicUsize::new(0));
    let terminator = {
        let (stop, rounds, killed) = (stop.clone(), rounds.clone(), killed.clone());
        let seed = k.seed;
        let max_ms = drop_ms;
        std::thread::spawn(move || {
            let sql = Sql::new(&base_url);
            let mut rng = Rng(seed ^ 0xdb);
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(rng.millis(max_ms.min(20), max_ms));
                let n = sql.count(&format!(
                    "select cast(count(*) as text) from \
                     (select pg_terminate_backend(pid) as t from pg_stat_activity \
                      where datname = '{db_name}' and pid <> pg_backend_pid()) x where x.t"
                ));
                rounds.fetch_add(1, Ordering::SeqCst);
                killed.fetch_add(n, Ordering::SeqCst);
            }
        })
    };
    let out = child.wait_with_output().unwrap();
    stop.store(true, Ordering::SeqCst);
    terminator.join().unwrap();
    let took = t.elapsed();
    let log = std::fs::read_to_string(&err).unwrap_or_default();
    let retries = log
        .lines()
        .filter(|l| l.contains("database operation failed; retrying"))
        .count();
    let persisted = log
        .lines()
        .filter(|l| l.contains("database write failed; retrying"))
        .count();
    let gave_up = log.lines().filter(|l| l.contains("giving up")).count();
    let unknown = log
        .lines()
        .filter(|l| l.contains("the outcome is unknown"))
        .count();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    eprintln!(
        "[{label}] {} termination rounds, {} backends terminated, in {:.1} s (uninterrupted: {:.1} s); \
         the runner logged {retries} retried operations, {persisted} retried writes, {gave_up} give-ups, \
         {unknown} commits of unknown outcome, {} errors{}",
        rounds.load(Ordering::SeqCst),
        killed.load(Ordering::SeqCst),
        took.as_secs_f64(),
        r.duration.as_secs_f64(),
        errors.len(),
        errors
            .iter()
            .take(10)
            .map(|l| format!("\n  {l}"))
            .collect::<String>()
    );
    assert!(
        out.status.success(),
        "{label}: the runner did not finish ({}):\n{}",
        out.status,
        tail(&err, 60)
    );
    assert!(
        killed.load(Ordering::SeqCst) > 0,
        "{label}: no connection was terminated: the test tested nothing"
    );
    let builds: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(builds.len(), g.tops, "{label}: one build per top-level drv");
    for b in &builds {
        assert_eq!(b["status"], 0, "{label}: {b}");
    }
    assert_eq!(
        outputs(&builds),
        r.outputs,
        "{label}: the outputs of an uninterrupted run"
    );
    let sql = Sql::new(&qr.db_url);
    let root = qr.state_dir().join("nix-store");
    let what = format!("{label}: at the end");
    let (resolved_rows, rows) = check_db_structure(&sql, &r, &what);
    check_db_final(&sql, &what);
    let (valid, _) = check_store(&root, &mut BTreeSet::new(), true, &what);
    let (ledger_lines, starts, again) =
        check_runs(qr.state_dir(), &r, &[spawned], &Default::default(), &what);
    // One process: every drv the uninterrupted run built was built here exactly once.
    assert_eq!(
        ledger_lines,
        r.runs.len(),
        "{what}: the same executor runs as the uninterrupted run"
    );
    assert_eq!(starts, ledger_lines, "{what}: no executor start was lost");
    assert_eq!(again, 0);
    eprintln!(
        "[{label}] ledger {ledger_lines} runs = {starts} starts; {resolved_rows} Resolved rows; rows by status {rows:?} (reference {:?}); {valid} valid store paths",
        r.rows
    );
}
