//! Torture: while `qr run` builds the layered CA graph (`QR_TORTURE_STEPS`, default 500) on
//! PostgreSQL, its database connections are taken away again and again (`QR_TORTURE_SEED`):
//! every connection of its database is terminated (`pg_terminate_backend`) at random intervals
//! of 20–300 ms (`QR_TORTURE_DROP_MS`), and every 2–6 s the database goes away for up to 2 s
//! (`QR_TORTURE_OUTAGE_MS`; 0: never) — the runner reaches PostgreSQL through a TCP proxy that
//! then cuts every connection and refuses new ones. The runner retries and finishes on its own,
//! with the outputs of an uninterrupted run, no executor started twice for a drv (one process: a
//! dropped connection must never cost a rebuild), no duplicate, orphan or unfinished rows, the
//! Resolved links right, and the store consistent.

mod common;
#[path = "common/torture.rs"]
mod torture;

use std::collections::BTreeSet;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::qr::{Backend, Qr};
use torture::{
    Rng, SLOTS, Sql, check_db_final, check_db_structure, check_runs, check_store, outputs, setup,
    tail,
};

/// A TCP proxy between the runner and PostgreSQL that can take the database away: during an
/// outage every connection through it is cut and new ones are closed as soon as they arrive.
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: String) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (d, cs) = (down.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in l.incoming() {
                let Ok(client) = client else { continue };
                if d.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let mut list = cs.lock().unwrap();
                list.retain(|c: &TcpStream| c.peer_addr().is_ok());
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                drop(list);
                let pairs = [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ];
                for (mut from, mut to) in pairs {
                    std::thread::spawn(move || {
                        let _ = io::copy(&mut from, &mut to);
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, down, conns }
    }

    /// Cuts every connection and refuses new ones for `d`.
    fn outage(&self, d: Duration) {
        self.down.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        std::thread::sleep(d);
        self.down.store(false, Ordering::SeqCst);
    }
}

fn knob(name: &str, default: u64) -> u64 {
    let v = std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    eprintln!("[db-drops-postgres] {name}={v}");
    v
}

#[test]
fn runner_rides_out_dropped_connections_and_database_outages_during_a_ca_graph() {
    let label = "db-drops-postgres";
    // The longest pause between two rounds of terminations, and the longest outage.
    let drop_ms = knob("QR_TORTURE_DROP_MS", 300).max(1);
    let outage_ms = knob("QR_TORTURE_OUTAGE_MS", 2000);
    let Some(qr) = Qr::new(Backend::Postgres, true) else {
        return;
    };
    let s = setup();
    let (k, g, r) = (s.knobs, &s.graph, &s.reference);
    let file = qr.write_json("g.json", &g.doc);
    let db_name = qr.db_url.rsplit('/').next().unwrap().to_string();
    let base_url = std::env::var("QR_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let upstream = {
        let rest = base_url.split_once("://").map(|x| x.1).unwrap_or(&base_url);
        let host = rest.rsplit_once('@').map(|x| x.1).unwrap_or(rest);
        let host = host.split(['/', '?']).next().unwrap();
        if host.contains(':') {
            host.to_string()
        } else {
            format!("{host}:5432")
        }
    };
    let proxy = Arc::new(Proxy::start(upstream));
    let proxied = format!("postgres://postgres@127.0.0.1:{}/{db_name}", proxy.port);
    let err = qr.state_dir().join("run.err");
    let spawned = SystemTime::now();
    let t = Instant::now();
    let mut c = qr.command();
    c.args(["run", "--json"])
        .arg(&file)
        .env("QR_LOCAL_BUILDER_MAX_JOBS", SLOTS)
        .env("QR_LOG", "info")
        .env("QR_DATABASE_URL", &proxied)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err).unwrap());
    let child = c.spawn().unwrap();

    // The terminator: until the runner exits.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicUsize::new(0));
    let outages = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let terminator = {
        let (stop, rounds, killed) = (stop.clone(), rounds.clone(), killed.clone());
        let (proxy, outages) = (proxy.clone(), outages.clone());
        let seed = k.seed;
        let max_ms = drop_ms;
        std::thread::spawn(move || {
            let sql = Sql::new(&base_url);
            let mut rng = Rng(seed ^ 0xdb);
            let mut next_outage = Instant::now() + rng.millis(2000, 6000);
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(rng.millis(max_ms.min(20), max_ms));
                if outage_ms > 0 && Instant::now() >= next_outage {
                    let d = rng.millis(outage_ms / 10, outage_ms);
                    proxy.outage(d);
                    outages.lock().unwrap().push(d);
                    next_outage = Instant::now() + rng.millis(2000, 6000);
                }
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
        .filter(|l| l.contains("was lost during COMMIT"))
        .count();
    let unknown_done = log
        .lines()
        .filter(|l| l.contains("the commit had happened"))
        .count();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    let outages = outages.lock().unwrap().clone();
    eprintln!(
        "[{label}] {} outages ({} ms in all, longest {} ms)",
        outages.len(),
        outages.iter().map(Duration::as_millis).sum::<u128>(),
        outages.iter().map(Duration::as_millis).max().unwrap_or(0)
    );
    eprintln!(
        "[{label}] {} termination rounds, {} backends terminated, in {:.1} s (uninterrupted: {:.1} s); \
         the runner logged {retries} retried operations, {persisted} retried writes, {gave_up} give-ups, \
         {unknown} commit replies lost ({unknown_done} of those commits had happened, read back), {} errors{}",
        rounds.load(Ordering::SeqCst),
        killed.load(Ordering::SeqCst),
        took.as_secs_f64(),
        r.duration.as_secs_f64(),
        errors.len(),
        errors
            .iter()
            .take(3)
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
    let (resolved_rows, rows) = check_db_structure(&sql, r, &what);
    check_db_final(&sql, &what);
    let (valid, _) = check_store(&root, &mut BTreeSet::new(), true, &what);
    let (ledger_lines, starts, again) =
        check_runs(qr.state_dir(), r, &[spawned], &Default::default(), &what);
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
