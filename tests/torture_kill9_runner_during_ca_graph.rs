//! Torture: `qr run` is killed with SIGKILL at random moments (at least `QR_TORTURE_KILLS`, default
//! 20) while it builds a layered graph of `QR_TORTURE_STEPS` (default 500) trivial derivations,
//! half floating CA, with twins that resolve to the same resolved drv; it is started again with
//! the same command after each kill, then left to finish. The builds end with the outputs of an
//! uninterrupted run, and after every kill (the state exactly as the crash left it) and at the
//! end: no drv built twice (runs ledger, build logs), no duplicate or orphan rows, every Resolved
//! row linked to the resolved drv's row in its build, no store path registered without its
//! contents. On SQLite and PostgreSQL. `QR_TORTURE_SEED` replays a run; see `docs/torture.md`.

mod common;
#[path = "common/torture.rs"]
mod torture;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::qr::{Backend, Qr};
use torture::{
    Rng, SLOTS, Sql, check_db_final, check_db_structure, check_runs, check_store, ledger, outputs,
    setup, store_realisations, tail,
};

/// Polls `cond` every 5 ms until it holds (`None`), the child exits (`Some(status)`), or
/// `limit` passes (panics: the runner made no progress).
fn wait_for(
    child: &mut Child,
    limit: Duration,
    err: &Path,
    mut cond: impl FnMut() -> bool,
) -> Option<ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if cond() {
            return None;
        }
        assert!(
            t.elapsed() < limit,
            "the runner made no progress for {limit:?}; its log ends:\n{}",
            tail(err, 40)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Kill {
    mode: String,
    after: Duration,
    ledger: usize,
    recovered: String,
    resolved_rows: usize,
    rows: String,
    valid_paths: usize,
    stray: usize,
}

fn torture(backend: Backend, label: &str) {
    let Some(qr) = Qr::new(backend, true) else {
        return;
    };
    let s = setup();
    let (k, g, r) = (s.knobs, &s.graph, &s.reference);
    let owned;
    let qr: &Qr = if torture::keeping() {
        torture::keep(qr, label)
    } else {
        owned = qr;
        &owned
    };
    let file = qr.write_json("g.json", &g.doc);
    let sql = Sql::new(&qr.db_url);
    let root = qr.state_dir().join("nix-store");
    let slots: usize = SLOTS.parse().unwrap();
    // Kill targets in executor runs completed (the ledger), spread over the first 80% of the
    // graph, so the last kill still finds work left even if every kill loses `slots` runs.
    let budget = r.runs.len().saturating_sub(k.kills * slots + 10);
    let mut rng = Rng(k.seed);
    let mut spawns: Vec<SystemTime> = Vec::new();
    let mut verified = BTreeSet::new();
    let mut registered = std::collections::BTreeMap::new();
    let mut kills: Vec<Kill> = Vec::new();
    let started = Instant::now();
    let spawn = |i: usize| -> (Child, std::path::PathBuf) {
        let err = qr.state_dir().join(format!("gen-{i}.err"));
        let mut c = qr.command();
        c.args(["run", "--json"])
            .arg(&file)
            .env("QR_LOCAL_BUILDER_MAX_JOBS", SLOTS)
            .env("QR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap());
        (c.spawn().expect("qr run"), err)
    };
    for i in 0..k.kills {
        spawns.push(SystemTime::now());
        let t = Instant::now();
        let (mut child, err) = spawn(i);
        // Every fourth kill at a random time after the start (store recovery, import of the
        // graph, database recovery, expansion); the others at a random moment after a target
        // number of completed runs.
        let (mode, exited) = if i % 4 == 3 {
            let d = rng.millis(0, 1500);
            (
                format!("{} ms after start", d.as_millis()),
                wait_for(&mut child, d + Duration::from_secs(1), &err, || {
                    t.elapsed() >= d
                }),
            )
        } else {
            let mut target =
                (budget as f64 * 0.8 * (i as f64 + rng.unit()) / k.kills as f64) as usize;
            // Passed already (an earlier generation got further): a few runs into this one.
            let at_start = ledger(qr.state_dir()).len();
            if target <= at_start {
                let step = (budget * 8 / 10 / k.kills.max(1)).max(1);
                target = (at_start + 1 + rng.below(step)).min(budget * 9 / 10);
            }
            let extra = rng.millis(0, 150);
            let state = qr.state_dir().to_path_buf();
            let mut reached: Option<Instant> = None;
            (
                format!("{} ms after run #{target}", extra.as_millis()),
                wait_for(&mut child, Duration::from_secs(300), &err, || {
                    if reached.is_none() && ledger(&state).len() >= target {
                        reached = Some(Instant::now());
                    }
                    reached.is_some_and(|at| at.elapsed() >= extra)
                }),
            )
        };
        if let Some(s) = exited {
            panic!(
                "{label}: generation {i} exited ({s}) before kill {} ({mode}); it should have had work left. Log:\n{}",
                i + 1,
                tail(&err, 40)
            );
        }
        child.kill().unwrap();
        let s = child.wait().unwrap();
        assert!(
            std::os::unix::process::ExitStatusExt::signal(&s) == Some(9),
            "{label}: killed with SIGKILL: {s}"
        );
        let after = t.elapsed();
        let what = format!("{label}: after kill {} ({mode})", i + 1);
        let (resolved_rows, rows) = check_db_structure(&sql, r, &what);
        let (valid_paths, stray) = check_store(&root, &mut verified, false, &what);
        torture::note_registered(&root, i, &mut registered);
        let recovered = std::fs::read_to_string(&err)
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("recovered:"))
            .unwrap_or("")
            .trim_start_matches("recovered: ")
            .to_string();
        kills.push(Kill {
            mode,
            after,
            ledger: ledger(qr.state_dir()).len(),
            recovered,
            resolved_rows,
            rows: format!("{rows:?}"),
            valid_paths,
            stray,
        });
    }
    // The last start, left to finish.
    spawns.push(SystemTime::now());
    let final_err = qr.state_dir().join("final.err");
    let mut c = qr.command();
    c.args(["run", "--json"])
        .arg(&file)
        .env("QR_LOCAL_BUILDER_MAX_JOBS", SLOTS)
        .env("QR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&final_err).unwrap());
    let child = c.spawn().unwrap();
    let out = child.wait_with_output().unwrap();
    let total = started.elapsed();
    let recovered_final = std::fs::read_to_string(&final_err)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("recovered:"))
        .unwrap_or("")
        .trim_start_matches("recovered: ")
        .to_string();
    assert!(
        out.status.success(),
        "{label}: the last run failed ({}):\n{}",
        out.status,
        tail(&final_err, 60)
    );
    let builds: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    eprintln!(
        "[{label}] kill  when                          after(ms) ledger  resolved  valid  stray  rows by status / recovered at the next start"
    );
    for (i, x) in kills.iter().enumerate() {
        eprintln!(
            "[{label}] {:>4}  {:<30} {:>8} {:>6} {:>9} {:>6} {:>6}  {} / {}",
            i + 1,
            x.mode,
            x.after.as_millis(),
            x.ledger,
            x.resolved_rows,
            x.valid_paths,
            x.stray,
            x.rows,
            kills
                .get(i + 1)
                .map(|n| n.recovered.as_str())
                .unwrap_or(recovered_final.as_str())
        );
    }

    // Every build finished with the outputs of the uninterrupted run.
    assert_eq!(builds.len(), g.tops, "{label}: one build per top-level drv");
    for b in &builds {
        assert_eq!(b["status"], 0, "{label}: {b}");
    }
    assert_eq!(
        outputs(&builds),
        r.outputs,
        "{label}: the outputs of an uninterrupted run"
    );
    let what = format!("{label}: at the end");
    let (resolved_rows, rows) = check_db_structure(&sql, r, &what);
    check_db_final(&sql, &what);
    let (valid, _) = check_store(&root, &mut verified, true, &what);
    let sr = store_realisations(&root);
    for (key, path) in &sr {
        if let Some(want) = r.store_realisations.get(key) {
            assert_eq!(path, want, "{what}: store realisation {key:?}");
        }
    }
    // Runs: none twice; the ones the ledger lacks were registered (killed before the ledger
    // line), at most `slots` per kill.
    let (ledger_lines, starts, restarted) =
        check_runs(qr.state_dir(), r, &spawns, &registered, &what);
    let have: BTreeSet<String> = ledger(qr.state_dir()).into_iter().collect();
    let lost: Vec<&String> = r.runs.iter().filter(|d| !have.contains(*d)).collect();
    for d in &lost {
        assert!(
            sr.contains_key(&((*d).clone(), "out".to_string())),
            "{what}: {d} was neither run (ledger) nor registered (store realisation)"
        );
    }
    assert!(
        lost.len() <= kills.len() * slots,
        "{what}: {} runs missing from the ledger, more than {} kills × {slots} slots: {lost:?}",
        lost.len(),
        kills.len()
    );
    assert!(
        kills.len() >= k.kills,
        "{label}: {} kills, wanted {}",
        kills.len(),
        k.kills
    );
    eprintln!(
        "[{label}] {} kills; finished {:.1} s after the first start (uninterrupted: {:.1} s); \
         ledger {ledger_lines} of {} runs ({} registered by a killed runner before its ledger line); \
         {starts} executor starts, {restarted} drvs started again after a kill; \
         {resolved_rows} Resolved rows (reference {}); rows by status {rows:?} (reference {:?}); \
         {valid} valid store paths; {}",
        kills.len(),
        total.as_secs_f64(),
        r.duration.as_secs_f64(),
        r.runs.len(),
        lost.len(),
        r.rows.get("13").copied().unwrap_or(0),
        r.rows,
        recovered_final
    );
}

#[test]
fn runner_killed_at_random_during_a_ca_graph_ends_as_an_uninterrupted_run_on_sqlite() {
    torture(Backend::Sqlite, "kill9-runner-sqlite");
}

#[test]
fn runner_killed_at_random_during_a_ca_graph_ends_as_an_uninterrupted_run_on_postgres() {
    torture(Backend::Postgres, "kill9-runner-postgres");
}
