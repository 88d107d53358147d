//! A step is Unsupported only when no machine could take it for `[scheduler] unsupported_wait_s`:
//! `qr serve` without a local builder and one `qr builder`, the only machine with the feature the
//! steps require. The builder is killed (SIGKILL) while one step builds and others wait in the
//! queue.
//!
//! - Back after about 3 s — several of the dispatcher's once-a-second checks, less than the 10 s
//!   wait — every build succeeds and no step is Unsupported.
//! - Never back, with a 2 s wait: the waiting steps end Unsupported (9), as do their builds, so
//!   the first case can fail.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::cluster::{Builder, Cluster};
use common::instantiate::{Gen, Kind};
use common::qr::{Backend, all_steps};

const FEATURE: &str = "qr-test-only-here";
const UNSUPPORTED: i64 = 9;

fn wait_for(timeout: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Three independent builds needing `FEATURE`, each sleeping 2 s.
fn graph(c: &Cluster, tag: &str) -> PathBuf {
    let mut g = Gen::new();
    for i in 0..3 {
        g.add(
            Kind::Ca,
            &format!("{tag}-{i}"),
            &format!("sleep 2; echo {i} > $out"),
            &[("requiredSystemFeatures", FEATURE)],
            &[],
        );
    }
    c.qr.write_json(&format!("{tag}.json"), &g.doc())
}

fn start_builder(c: &Cluster, joins: usize) -> Builder {
    let b = c.builder(
        "special",
        &[
            "--systems",
            "x86_64-linux",
            "--features",
            FEATURE,
            "--max-jobs",
            "1",
        ],
        &[],
    );
    assert!(
        c.wait_joined("special", joins, Duration::from_secs(30)),
        "the builder did not join:\n{}",
        c.logs(&[&b])
    );
    b
}

/// Starts serve (with `unsupported_wait_s`), the builder and the builds; kills the builder once
/// its first build started (the two others waiting). Returns the submit child.
fn kill_while_steps_wait(
    c: &mut Cluster,
    unsupported_wait_s: &str,
    tag: &str,
) -> (std::process::Child, Builder) {
    c.serve_env.extend([
        (
            "QR_SCHEDULER_UNSUPPORTED_WAIT_S".into(),
            unsupported_wait_s.into(),
        ),
        // The killed builder's running job is not held for it long.
        ("QR_GRPC_REJOIN_GRACE_S".into(), "1".into()),
    ]);
    c.start_serve();
    let mut b = start_builder(c, 1);
    let file = graph(c, tag);
    let submit = c.submit(&[&file], 120);
    assert!(
        wait_for(Duration::from_secs(60), || b
            .proc
            .count_lines(&["build started", tag])
            > 0),
        "no build started:\n{}",
        c.logs(&[&b])
    );
    b.proc.kill();
    (submit, b)
}

#[test]
fn a_builder_back_within_the_wait_leaves_no_step_unsupported() {
    let Some(mut c) = Cluster::new(Backend::Sqlite) else {
        return;
    };
    let (submit, gone) = kill_while_steps_wait(&mut c, "10", "back");
    std::thread::sleep(Duration::from_secs(3));
    let b = start_builder(&c, 2);
    let (out, builds) = c.finish(submit);
    let logs = c.logs(&[&gone, &b]);
    assert!(
        out.status.success(),
        "{}\n{logs}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(builds.len(), 3, "{logs}");
    for b in &builds {
        assert_eq!(b["status"], 0, "{b}\n{logs}");
    }
    for (_, s) in all_steps(&builds) {
        assert_ne!(s["status"], UNSUPPORTED, "Unsupported: {s}\n{logs}");
    }
}

#[test]
fn a_builder_gone_longer_than_the_wait_leaves_its_steps_unsupported() {
    let Some(mut c) = Cluster::new(Backend::Sqlite) else {
        return;
    };
    let (submit, gone) = kill_while_steps_wait(&mut c, "2", "gone");
    let (out, builds) = c.finish(submit);
    let logs = c.logs(&[&gone]);
    assert!(!out.status.success(), "{logs}");
    assert_eq!(builds.len(), 3, "{logs}");
    let unsupported = builds.iter().filter(|b| b["status"] == UNSUPPORTED).count();
    // The two that waited at least; the one that was building too, once its job was given up.
    assert!(
        unsupported >= 2,
        "{unsupported} Unsupported: {builds:?}\n{logs}"
    );
    for b in builds.iter().filter(|b| b["status"] == UNSUPPORTED) {
        assert!(
            b["steps"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["status"] == UNSUPPORTED)),
            "an Unsupported build without its Unsupported step: {b}\n{logs}"
        );
    }
}
