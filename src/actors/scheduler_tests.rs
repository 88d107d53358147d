//! Restart recovery against a real (SQLite) database: which busy rows are aborted, which carried,
//! and the sweep at the end of the grace.

use super::*;
use crate::actors::env::SystemClock;
use crate::actors::step::machine::RetryPolicy;
use crate::db::Db;
use crate::db::types::{BusyPhase, NewBuild, NewStep};
use crate::store::StoreDir;
use crate::store::local::LocalStore;

async fn env(dir: &std::path::Path) -> Env {
    let db = Db::connect(&format!("sqlite://{}/qr.db", dir.display()), 2)
        .await
        .expect("database");
    let root = dir.join("store");
    let store = LocalStore::open(
        StoreDir::new(root.display().to_string()).expect("store dir"),
        &root,
    )
    .await
    .expect("store");
    Env::new(
        db,
        Arc::new(store),
        Arc::new(SystemClock),
        RetryPolicy::default(),
    )
}

/// A build with three busy rows: on the in-process builder, on a remote builder, on no machine.
async fn busy_rows(env: &Env) -> (BuildId, [StepNr; 3]) {
    let db = &env.db;
    db.create_jobset("main", 100).await.expect("jobset");
    let b = db
        .create_build(&NewBuild {
            jobset: "main".into(),
            job: "j".into(),
            drv_path: "/nix/store/aaaa-j.drv".into(),
            system: "x86_64-linux".into(),
            priority: 0,
            global_priority: 0,
            max_silent: 3600,
            timeout: 36000,
            timestamp: 1,
            outputs: vec![("out".into(), None)],
        })
        .await
        .expect("build");
    let mut rows = [0; 3];
    for (i, (drv, machine)) in [
        ("/nix/store/llll-local.drv", "localhost"),
        ("/nix/store/rrrr-remote.drv", "builder-1"),
        ("/nix/store/nnnn-none.drv", ""),
    ]
    .into_iter()
    .enumerate()
    {
        let n = db
            .create_step(b, &NewStep::build(drv, "x86_64-linux"))
            .await
            .expect("step");
        db.start_step(b, n, machine, BusyPhase::Building, 100 + i as i64)
            .await
            .expect("start");
        rows[i] = n;
    }
    (b, rows)
}

#[tokio::test]
async fn serve_carries_the_remote_row_and_the_sweep_aborts_it_when_nobody_took_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let env = env(dir.path()).await;
    let (b, [local, remote, none]) = busy_rows(&env).await;
    let restart = Restart::CarryRemote {
        local: vec![],
        grace: Duration::from_secs(1),
    };
    let (rec, _) = recover(&env, &restart).await.expect("recover");
    assert_eq!(rec.aborted, 2, "{rec:?}");
    assert_eq!(
        rec.carried.iter().map(|c| c.row).collect::<Vec<_>>(),
        [(b.0, remote)]
    );
    for n in [local, none] {
        let s = env.db.step(b, n).await.expect("step");
        assert_eq!(s.status, Some(BuildStatus::Aborted), "{s:?}");
    }
    let r = env.db.step(b, remote).await.expect("step");
    assert!(r.status.is_none() && r.busy.is_busy(), "{r:?}");
    assert_eq!((r.machine.as_str(), r.start_time), ("builder-1", Some(101)));
    // Killed again before any step took it: the next start carries the same row again.
    let (again, _) = recover(&env, &restart).await.expect("recover again");
    assert_eq!(
        (again.aborted, again.carried.clone()),
        (0, rec.carried.clone())
    );
    // Nobody claims it: the sweep closes it as Aborted, on the machine it was on.
    env.carried.fill(again.carried);
    sweep_carried(&env).await;
    assert!(env.carried.is_empty());
    let r = env.db.step(b, remote).await.expect("step");
    assert_eq!(r.status, Some(BuildStatus::Aborted), "{r:?}");
    assert!(!r.busy.is_busy() && r.machine == "builder-1", "{r:?}");
    assert!(env.db.busy_steps().await.expect("busy").is_empty());
}

#[tokio::test]
async fn a_claimed_row_is_left_to_its_step_by_the_sweep() {
    let dir = tempfile::tempdir().expect("temp dir");
    let env = env(dir.path()).await;
    let (b, [_, remote, _]) = busy_rows(&env).await;
    let restart = Restart::CarryRemote {
        local: vec![],
        grace: Duration::from_secs(1),
    };
    let (rec, _) = recover(&env, &restart).await.expect("recover");
    env.carried.fill(rec.carried);
    let c = env
        .carried
        .claim("/nix/store/rrrr-remote.drv")
        .expect("claimed");
    assert_eq!(c.row, (b.0, remote));
    sweep_carried(&env).await;
    let r = env.db.step(b, remote).await.expect("step");
    assert!(
        r.status.is_none() && r.busy.is_busy(),
        "still its step's: {r:?}"
    );
}

#[tokio::test]
async fn qr_run_aborts_every_busy_row() {
    let dir = tempfile::tempdir().expect("temp dir");
    let env = env(dir.path()).await;
    let (_, _) = busy_rows(&env).await;
    let (rec, _) = recover(&env, &Restart::AbortAll).await.expect("recover");
    assert_eq!((rec.aborted, rec.carried.len()), (3, 0));
    assert!(env.db.busy_steps().await.expect("busy").is_empty());
}
