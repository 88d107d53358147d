//! A builder whose connection goes silent — a proxy in between stops forwarding without closing
//! either side, as when packets are dropped with no FIN or RST — is declared lost by the runner
//! after `[grpc] silent_timeout_s`, and the builder notices the silence too (the runner's
//! heartbeats stop), drops the session and reconnects on its own. Its build goes on: the graph
//! finishes, and no step waiting meanwhile is failed as Unsupported, although the wait for a
//! machine is shorter than the outage.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Proc};
use common::instantiate::{Gen, Kind};
use common::qr::{Backend, all_steps};

/// A loopback TCP proxy. `silence()` makes every connection open at that moment swallow what
/// either side sends (read and dropped, never forwarded, never closed); later connections
/// forward normally.
struct Proxy {
    port: u16,
    /// Connections numbered below this are silenced.
    cut: Arc<AtomicU64>,
    next: Arc<AtomicU64>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().expect("proxy addr").port();
        let cut = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let (c, n) = (cut.clone(), next.clone());
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { continue };
                let Ok(up) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let id = n.fetch_add(1, Ordering::SeqCst);
                for (from, to) in [
                    (
                        down.try_clone().expect("clone"),
                        up.try_clone().expect("clone"),
                    ),
                    (up, down),
                ] {
                    let cut = c.clone();
                    std::thread::spawn(move || pump(id, from, to, cut));
                }
            }
        });
        Proxy { port, cut, next }
    }

    fn silence(&self) {
        self.cut
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

fn pump(id: u64, mut from: TcpStream, mut to: TcpStream, cut: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                if id >= cut.load(Ordering::SeqCst) {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => {
                if id < cut.load(Ordering::SeqCst) {
                    continue; // dropped on the floor
                }
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("gave up waiting for {what}");
    false
}

fn started(p: &Proc, name_part: &str) -> bool {
    p.count_lines(&["build started", name_part]) > 0
}

#[test]
fn a_silent_builder_connection_is_lost_and_the_builder_rejoins_on_its_own() {
    let Some(mut c) = Cluster::new(Backend::Sqlite) else {
        return;
    };
    // Heartbeats every second (the cluster's), silent for 3 s = lost; a step no machine can take
    // would be Unsupported after only 2 s, shorter than the outage.
    c.serve_env.extend([
        ("QR_GRPC_SILENT_TIMEOUT_S".into(), "3".into()),
        ("QR_SCHEDULER_UNSUPPORTED_WAIT_S".into(), "2".into()),
    ]);
    c.start_serve();
    let proxy = Proxy::start(c.port);
    let url = format!("http://127.0.0.1:{}", proxy.port);
    let token = c.token.clone();
    // HTTP/2 PINGs off, so only the heartbeats can tell the connection went silent.
    let b = c.builder_at(
        "behind-proxy",
        &url,
        &token,
        &["--systems", "x86_64-linux"],
        &[("QR_GRPC_KEEPALIVE_INTERVAL_S", "0")],
    );
    assert!(
        c.wait_joined("behind-proxy", 1, Duration::from_secs(30)),
        "{}",
        c.logs(&[&b])
    );

    // a → b → c; b sleeps so the connection goes silent while it builds, and c waits meanwhile.
    let mut g = Gen::new();
    let a = g.add(Kind::Ca, "sil-a", "echo a > $out", &[], &[]);
    let oa = g.out(&a);
    let bb = g.add(
        Kind::Ca,
        "sil-b",
        &format!("sleep 6; cat {oa} > $out; echo b >> $out"),
        &[],
        &[&a],
    );
    let ob = g.out(&bb);
    g.add(
        Kind::Ca,
        "sil-c",
        &format!("cat {ob} > $out; echo c >> $out"),
        &[],
        &[&bb],
    );
    let file = c.qr.write_json("g.json", &g.doc());
    let submit = c.submit(&[&file], 180);
    assert!(
        wait_for("sil-b to start", Duration::from_secs(60), || started(
            &b.proc, "sil-b"
        )),
        "{}",
        c.logs(&[&b])
    );

    proxy.silence();

    // Both sides time out after the same silence, each counted from the last message it heard
    // (up to a heartbeat apart), so either may notice first: the runner ends the old session on
    // its own, or because the builder, having noticed first, came back with a new one.
    assert!(
        wait_for(
            "the runner to lose the builder",
            Duration::from_secs(60),
            || {
                let logs = c.serve_logs();
                logs.contains("nothing heard from the builder")
                    || logs.contains("the builder reconnected: its old session ends")
            }
        ),
        "the runner did not notice the silent connection:\n{}",
        c.logs(&[&b])
    );
    assert!(
        wait_for("the builder to notice", Duration::from_secs(60), || b
            .proc
            .log_text()
            .contains("nothing heard from the runner")),
        "the builder did not notice the silent connection:\n{}",
        c.logs(&[&b])
    );
    assert!(
        c.wait_joined("behind-proxy", 2, Duration::from_secs(60)),
        "the builder did not rejoin on its own:\n{}",
        c.logs(&[&b])
    );

    let (out, builds) = c.finish(submit);
    let logs = c.logs(&[&b]);
    assert!(
        out.status.success(),
        "{}\n{logs}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(builds.len(), 1, "{logs}");
    assert_eq!(builds[0]["status"], 0, "{}\n{logs}", builds[0]);
    for (_, s) in all_steps(&builds) {
        assert_ne!(
            s["status"], 9,
            "a step was failed as Unsupported: {s}\n{logs}"
        );
    }
}
