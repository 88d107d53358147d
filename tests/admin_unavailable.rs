//! The admin API answers UNAVAILABLE while `qr serve`'s database is away, and recovers when it is
//! back (PostgreSQL only; skipped when PostgreSQL is unreachable outside CI):
//!
//! 1. the database refuses connections and its sessions are terminated (as when an operator takes
//!    it away: `ALLOW_CONNECTIONS false` + `pg_terminate_backend`) — the server answers at once;
//! 2. the server cannot be reached at all (the runner talks to PostgreSQL through a TCP proxy that
//!    this test cuts: connections reset, new ones refused) — the admin's database deadline answers.
//!
//! Each time: `Status` and `ListBuilds` give `Code::Unavailable`, `qr admin status` fails with one
//! clear line, `/status` is 503 while `/metrics` is still served (`qr_database_up 0`); then the
//! database comes back and everything answers again, and a build queued afterwards succeeds.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, TOKEN};
use common::instantiate::{Gen, Kind};
use common::qr::Backend;
use qr::grpc::admin::admin_v1::admin_service_client::AdminServiceClient;
use qr::grpc::admin::admin_v1::*;
use qr::grpc::auth::ClientAuth;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = AdminServiceClient<InterceptedService<Channel, ClientAuth>>;

fn psql(url: &str, sql: &str) {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP proxy to PostgreSQL that can be cut (every connection reset, new ones refused: nothing
/// listens on its port) and restored (listening on the same port again).
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: String) -> Proxy {
        // A port reserved for this process: still ours when the proxy listens on it again.
        let port = common::ports::port();
        let l = TcpListener::bind(("127.0.0.1", port)).expect("bind the reserved port");
        let p = Proxy {
            port,
            up: Arc::new(AtomicBool::new(true)),
            stop: Arc::new(AtomicBool::new(false)),
            conns: Arc::default(),
        };
        let (up, stop, conns) = (p.up.clone(), p.stop.clone(), p.conns.clone());
        std::thread::spawn(move || {
            let mut listener = Some(l);
            while !stop.load(Ordering::SeqCst) {
                match (&listener, up.load(Ordering::SeqCst)) {
                    (Some(_), false) => listener = None, // refused from now on
                    (None, true) => {
                        // Back on the same port (std sets SO_REUSEADDR).
                        match TcpListener::bind(("127.0.0.1", port)) {
                            Ok(l) => listener = Some(l),
                            Err(_) => std::thread::sleep(Duration::from_millis(50)),
                        }
                        continue;
                    }
                    _ => {}
                }
                let Some(l) = &listener else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                l.set_nonblocking(true).unwrap();
                match l.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(&upstream) else {
                            continue;
                        };
                        let mut c = conns.lock().unwrap();
                        c.push(client.try_clone().unwrap());
                        c.push(server.try_clone().unwrap());
                        pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                        pipe(server, client);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        p
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

async fn client(url: &str) -> Client {
    let ch = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connect");
    AdminServiceClient::with_interceptor(ch, ClientAuth::new(TOKEN).unwrap())
}

/// Polls `Status` until it answers with `want` (Ok or an error code); returns how long it took.
async fn await_status(adm: &mut Client, want: Code, within: Duration, ctx: &dyn Fn() -> String) {
    let t = Instant::now();
    loop {
        let got = match adm.status(StatusRequest {}).await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        if got == want {
            return;
        }
        assert!(
            t.elapsed() < within,
            "Status answered {got:?}, not {want:?}, for {within:?}\n{}",
            ctx()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What every reader sees while the database is away.
async fn check_unavailable(c: &Cluster, adm: &mut Client, url: &str) {
    let t = Instant::now();
    let e = adm.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("database"), "{e:?}");
    // Within the admin's database deadline (5 s), plus slack for a loaded machine.
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    eprintln!(
        "Status: {:?} after {:?}: {}",
        e.code(),
        t.elapsed(),
        e.message()
    );
    let e = adm
        .list_builds(ListBuildsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e = adm.get_build(GetBuildRequest { id: 1 }).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // `qr admin status`: a failure with one clear line.
    let out =
        c.qr.command()
            .args(["admin", "--runner", url, "--token-file"])
            .arg(&c.token)
            .arg("status")
            .output()
            .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("qr: Unavailable: the database is unavailable"),
        "{err}"
    );

    // HTTP: /status is 503; /metrics is still served and says the database is down.
    let (code, _, body) = c.http_get("/status");
    assert_eq!(code, 503, "{body}");
    let (code, _, body) = c.http_get("/metrics");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\nqr_database_up 0\n"), "{body}");
    assert!(!body.contains("\nqr_builds_queued "), "{body}");
}

#[test]
fn admin_answers_unavailable_while_the_database_is_away() {
    let Some(mut c) = Cluster::new(Backend::Postgres) else {
        return;
    };
    let (base, name) =
        c.qr.db_url
            .rsplit_once('/')
            .map(|(b, n)| (b.to_string(), n.to_string()))
            .unwrap();
    let admin_db = format!("{base}/postgres");
    // The runner reaches PostgreSQL through the proxy (`qr submit` and psql directly).
    let hostport = base
        .rsplit_once('@')
        .map(|(_, h)| h.to_string())
        .unwrap_or_else(|| base.trim_start_matches("postgres://").to_string());
    let proxy = Proxy::start(hostport.clone());
    let via_proxy =
        c.qr.db_url
            .replacen(&hostport, &format!("127.0.0.1:{}", proxy.port), 1);
    c.serve_env = vec![
        ("QR_DATABASE_URL".into(), via_proxy),
        ("QR_LOCAL_BUILDER_ENABLED".into(), "true".into()),
    ];
    let mut g = Gen::new();
    g.system = qr::config::this_system();
    let x = g.add(Kind::Ia, "after-outage", "echo ok > $out", &[], &[]);
    let file = c.qr.write_json("after.json", &g.doc());
    c.start_serve();
    let url = c.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let logs = || c.serve_logs();
    rt.block_on(async {
        let mut adm = client(&url).await;
        adm.status(StatusRequest {}).await.expect("Status before");

        // 1. The database refuses connections; its sessions are terminated.
        psql(
            &admin_db,
            &format!("alter database {name} allow_connections false"),
        );
        psql(
            &admin_db,
            &format!(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = '{name}'"
            ),
        );
        await_status(&mut adm, Code::Unavailable, Duration::from_secs(20), &logs).await;
        check_unavailable(&c, &mut adm, &url).await;
        psql(
            &admin_db,
            &format!("alter database {name} allow_connections true"),
        );
        await_status(&mut adm, Code::Ok, Duration::from_secs(30), &logs).await;

        // 2. The server cannot be reached at all.
        proxy.cut();
        await_status(&mut adm, Code::Unavailable, Duration::from_secs(20), &logs).await;
        check_unavailable(&c, &mut adm, &url).await;
        proxy.restore();
        await_status(&mut adm, Code::Ok, Duration::from_secs(30), &logs).await;
        let (code, _, body) = c.http_get("/metrics");
        assert_eq!(code, 200);
        assert!(body.contains("\nqr_database_up 1\n"), "{body}");
    });

    // The runner went on: a build queued now is built.
    let (out, builds) = c.finish(c.submit(&[&file], 120));
    assert!(out.status.success(), "{}", c.serve_logs());
    assert_eq!(builds[0]["drvPath"], x);
    assert_eq!(builds[0]["status"], 0);
    let serve = c.serve.as_mut().unwrap();
    assert!(
        serve.wait_exit(Duration::from_millis(100)).is_none(),
        "qr serve died"
    );
}
