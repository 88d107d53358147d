//! The admin API against a real `qr serve` (local builder on, SQLite and PostgreSQL): every RPC
//! with a valid token while a graph with a CA step builds (the Resolved chain, the actor tree, the
//! machines, the event stream, the actions on builds and machines and their error codes), and every
//! RPC refused without a token or with a wrong one.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, TOKEN};
use common::instantiate::{Gen, Kind};
use common::qr::Backend;
use qr::grpc::admin::admin_v1::admin_service_client::AdminServiceClient;
use qr::grpc::admin::admin_v1::set_machine_request::Action;
use qr::grpc::admin::admin_v1::*;
use qr::grpc::auth::ClientAuth;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = AdminServiceClient<InterceptedService<Channel, ClientAuth>>;

async fn client(url: &str, token: &str) -> Client {
    let ch = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connect");
    AdminServiceClient::with_interceptor(ch, ClientAuth::new(token).unwrap())
}

/// Every RPC once; returns the codes (OK as `Code::Ok`).
async fn every_rpc(c: &mut Client) -> Vec<(&'static str, Code)> {
    fn code<T>(r: Result<T, tonic::Status>) -> Code {
        r.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
    }
    vec![
        ("Status", code(c.status(StatusRequest {}).await)),
        (
            "ListBuilds",
            code(c.list_builds(ListBuildsRequest::default()).await),
        ),
        (
            "GetBuild",
            code(c.get_build(GetBuildRequest { id: 1 }).await),
        ),
        (
            "ListSteps",
            code(c.list_steps(ListStepsRequest { build: 1 }).await),
        ),
        (
            "GetStep",
            code(
                c.get_step(GetStepRequest {
                    build: 1,
                    stepnr: 1,
                })
                .await,
            ),
        ),
        (
            "ListActors",
            code(c.list_actors(ListActorsRequest::default()).await),
        ),
        (
            "ListMachines",
            code(c.list_machines(ListMachinesRequest {}).await),
        ),
        (
            "CancelBuild",
            code(c.cancel_build(BuildAction { id: 1 }).await),
        ),
        (
            "RestartBuild",
            code(c.restart_build(BuildAction { id: 1 }).await),
        ),
        (
            "BumpBuild",
            code(
                c.bump_build(BumpBuildRequest {
                    id: 1,
                    global_priority: 5,
                })
                .await,
            ),
        ),
        (
            "SetMachine",
            code(
                c.set_machine(SetMachineRequest {
                    machine: "localhost".into(),
                    action: Action::Enable as i32,
                })
                .await,
            ),
        ),
        (
            "WatchEvents",
            code(c.watch_events(WatchEventsRequest {}).await),
        ),
    ]
}

fn admin_api(backend: Backend) {
    let Some(mut c) = Cluster::new(backend) else {
        return;
    };
    c.serve_env = vec![
        ("QR_LOCAL_BUILDER_ENABLED".into(), "true".into()),
        ("QR_LOCAL_BUILDER_MAX_JOBS".into(), "2".into()),
    ];
    // A floating CA input and a CA step on it (resolved before it builds); the input sleeps so
    // the build is seen running.
    let mut g = Gen::new();
    g.system = qr::config::this_system();
    let a = g.add(Kind::Ca, "admin-a", "sleep 2; echo a > $out", &[], &[]);
    let script = format!("cat {} > $out; echo b >> $out", g.out(&a));
    let b = g.add(Kind::Ca, "admin-b", &script, &[], &[&a]);
    let file = c.qr.write_json("admin-graph.json", &g.doc());
    c.start_serve();
    let url = c.url();
    let logs = || c.serve_logs();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Refused without a valid token: every RPC.
        for token in ["", "wrong-token"] {
            let ch = Channel::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut bare = AdminServiceClient::new(ch);
            if token.is_empty() {
                let e = bare.status(StatusRequest {}).await.unwrap_err();
                assert_eq!(e.code(), Code::Unauthenticated);
            }
            let mut wrong = client(&url, if token.is_empty() { "x" } else { token }).await;
            for (rpc, code) in every_rpc(&mut wrong).await {
                assert_eq!(code, Code::Unauthenticated, "{rpc} with token {token:?}");
            }
        }

        let mut adm = client(&url, TOKEN).await;
        let mut events = adm
            .watch_events(WatchEventsRequest {})
            .await
            .expect("watch")
            .into_inner();

        // Not found and invalid arguments before anything is queued.
        let e = adm
            .get_build(GetBuildRequest { id: 4242 })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let e = adm.get_build(GetBuildRequest { id: 0 }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = adm
            .list_steps(ListStepsRequest { build: 4242 })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = adm
            .get_step(GetStepRequest {
                build: 1,
                stepnr: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = adm
            .list_actors(ListActorsRequest {
                kind: "nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = adm
            .cancel_build(BuildAction { id: 4242 })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);

        // Machines: the local builder; disable, drain, enable; unknown machine; bad action.
        let ms = adm
            .list_machines(ListMachinesRequest {})
            .await
            .unwrap()
            .into_inner()
            .machines;
        assert_eq!(ms.len(), 1, "{ms:?}");
        assert_eq!((ms[0].id.as_str(), ms[0].max_jobs), ("localhost", 2));
        assert!(ms[0].enabled && ms[0].state == "enabled");
        // The in-process builder is alive as long as the runner: its heartbeat is now.
        assert!(ms[0].local && ms[0].heartbeat_age_s < 1.0, "{:?}", ms[0]);
        assert!(
            (ms[0].last_heartbeat_ms - unix_ms()).abs() < 5_000,
            "{:?}",
            ms[0]
        );
        for (action, state) in [
            (Action::Disable, "disabled"),
            (Action::Drain, "drained"),
            (Action::Enable, "enabled"),
        ] {
            adm.set_machine(SetMachineRequest {
                machine: "localhost".into(),
                action: action as i32,
            })
            .await
            .unwrap();
            let m = adm
                .list_machines(ListMachinesRequest {})
                .await
                .unwrap()
                .into_inner()
                .machines;
            assert_eq!(m[0].state, state);
        }
        let e = adm
            .set_machine(SetMachineRequest {
                machine: "nowhere".into(),
                action: Action::Disable as i32,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = adm
            .set_machine(SetMachineRequest {
                machine: "localhost".into(),
                action: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);

        // Queue the graph; watch it run.
        let child = c.submit(&[&file], 120);
        let t = Instant::now();
        let build = loop {
            let bs = adm
                .list_builds(ListBuildsRequest {
                    limit: 10,
                    unfinished_only: false,
                })
                .await
                .unwrap()
                .into_inner()
                .builds;
            if let Some(x) = bs.iter().find(|x| x.drv_path == b) {
                break x.clone();
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "never queued\n{}",
                logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // While it runs: the actor tree has the build, its steps, the dispatcher and monitor.
        let t = Instant::now();
        loop {
            let actors = adm
                .list_actors(ListActorsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .actors;
            let ids: BTreeSet<&str> = actors.iter().map(|x| x.id.as_str()).collect();
            let building = actors
                .iter()
                .any(|x| x.id == format!("step:{a}") && x.state == "building");
            if building {
                assert!(
                    ids.contains("dispatcher") && ids.contains("queue-monitor"),
                    "{ids:?}"
                );
                assert!(
                    ids.contains(format!("build:{}", build.id).as_str()),
                    "{ids:?}"
                );
                let top = actors.iter().find(|x| x.id == format!("step:{b}")).unwrap();
                assert_eq!(top.state, "waiting_for_inputs");
                assert_eq!(top.waiting_on, [format!("step:{a}")]);
                assert!(
                    top.parents.contains(&format!("build:{}", build.id)),
                    "{top:?}"
                );
                let st = adm.status(StatusRequest {}).await.unwrap().into_inner();
                assert_eq!(st.builds_active, 1, "{st:?}");
                assert_eq!((st.machines, st.slots_total, st.slots_busy), (1, 2, 1));
                let m = adm
                    .list_machines(ListMachinesRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .machines;
                assert_eq!(m[0].jobs, vec![a.clone()]);
                // Actions that do not apply while it runs; a bump does.
                let e = adm
                    .restart_build(BuildAction { id: build.id })
                    .await
                    .unwrap_err();
                assert_eq!(e.code(), Code::FailedPrecondition);
                adm.bump_build(BumpBuildRequest {
                    id: build.id,
                    global_priority: 7,
                })
                .await
                .unwrap();
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "a never built: {actors:?}\n{}",
                logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (out, builds) = c.finish(child);
        assert!(out.status.success(), "{}", logs());
        assert_eq!(builds[0]["status"], 0);

        // The build, its steps, and the Resolved chain of the CA step.
        let d = adm
            .get_build(GetBuildRequest { id: build.id })
            .await
            .unwrap()
            .into_inner();
        let bb = d.build.unwrap();
        assert!(
            bb.finished && bb.status == 0 && bb.global_priority == 7,
            "{bb:?}"
        );
        assert_eq!(d.outputs.len(), 1);
        let steps = adm
            .list_steps(ListStepsRequest { build: build.id })
            .await
            .unwrap()
            .into_inner()
            .steps;
        assert_eq!(steps, d.steps);
        let resolved = steps
            .iter()
            .find(|s| s.drv_path == b && s.status == 13)
            .unwrap_or_else(|| panic!("no Resolved row for b: {steps:?}"));
        let sd = adm
            .get_step(GetStepRequest {
                build: build.id,
                stepnr: resolved.stepnr,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(sd.resolved_chain.len(), 2, "{sd:?}");
        assert_eq!(sd.resolved_chain[1].stepnr, resolved.resolved_to_step);
        assert_eq!(sd.resolved_chain[1].status, 0);
        let child_step = adm
            .get_step(GetStepRequest {
                build: build.id,
                stepnr: resolved.resolved_to_step,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(child_step.resolved_from.len(), 1);
        assert_eq!(child_step.outputs.len(), 1);
        let e = adm
            .get_step(GetStepRequest {
                build: build.id,
                stepnr: 999,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);

        // The log of the step that built the resolved drv; the build's default log; not found.
        let log = adm
            .get_log(GetLogRequest {
                build: build.id,
                stepnr: resolved.resolved_to_step,
                tail_lines: 5,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(log.stepnr, resolved.resolved_to_step);
        assert!(log.file.ends_with(".log"), "{log:?}");
        let any = adm
            .get_log(GetLogRequest {
                build: build.id,
                stepnr: 0,
                tail_lines: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(any.stepnr > 0);
        let e = adm
            .get_log(GetLogRequest {
                build: build.id,
                stepnr: resolved.stepnr,
                tail_lines: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Code::NotFound,
            "a Resolved step built nothing itself"
        );

        // Events seen meanwhile.
        let mut kinds = BTreeSet::new();
        let t = Instant::now();
        while !kinds.contains("build_finished") && t.elapsed() < Duration::from_secs(10) {
            match tokio::time::timeout(Duration::from_secs(10), events.message()).await {
                Ok(Ok(Some(ev))) => {
                    kinds.insert(ev.kind);
                }
                _ => break,
            }
        }
        for k in [
            "build_started",
            "step_started",
            "step_resolved",
            "step_finished",
            "build_finished",
        ] {
            assert!(kinds.contains(k), "no {k} event: {kinds:?}");
        }

        // The same through `qr admin` (JSON and tables).
        let admin = |args: &[&str]| {
            let mut cmd = c.qr.command();
            cmd.args(["admin", "--runner", &url, "--token-file"])
                .arg(&c.token)
                .args(args);
            cmd.output().expect("qr admin")
        };
        let json = |args: &[&str]| -> serde_json::Value {
            let mut a = args.to_vec();
            a.push("--json");
            let out = admin(&a);
            assert!(
                out.status.success(),
                "qr admin {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).expect("JSON")
        };
        let id = build.id.to_string();
        assert!(json(&["status"])["resolutions"].as_u64().unwrap() >= 1);
        assert_eq!(json(&["builds"])["builds"][0]["id"], build.id);
        assert_eq!(json(&["build", &id])["build"]["status"], 0);
        assert_eq!(
            json(&["steps", &id])["steps"].as_array().unwrap().len(),
            steps.len()
        );
        let chain = json(&["step", &id, &resolved.stepnr.to_string()]);
        assert_eq!(chain["resolved_chain"].as_array().unwrap().len(), 2);
        assert!(
            json(&["actors"])["actors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["id"] == "dispatcher")
        );
        assert_eq!(json(&["machines"])["machines"][0]["id"], "localhost");
        for a in ["disable", "drain", "enable"] {
            assert!(
                json(&[a, "localhost"])["message"]
                    .as_str()
                    .unwrap()
                    .contains("localhost")
            );
        }
        for args in [
            &["status"][..],
            &["builds"],
            &["steps", &id],
            &["actors"],
            &["machines"],
        ] {
            let out = admin(args);
            assert!(out.status.success());
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.lines().count() >= 2, "qr admin {args:?}: {text}");
        }
        let out = admin(&["log", &id, &resolved.resolved_to_step.to_string(), "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = admin(&["bump", &id, "3"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition"));
        let wrong = c.qr.state_dir().join("wrong-token");
        std::fs::write(&wrong, "nope\n").unwrap();
        let mut cmd = c.qr.command();
        let out = cmd
            .args(["admin", "--runner", &url, "--token-file"])
            .arg(&wrong)
            .arg("status")
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
        let mut watch = c.qr.command();
        let watch = watch
            .args(["admin", "--runner", &url, "--token-file"])
            .arg(&c.token)
            .args(["watch", "--json", "--count", "1"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Finished: cancel and bump do not apply; restart does, then the status counts.
        let e = adm
            .cancel_build(BuildAction { id: build.id })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        let e = adm
            .bump_build(BumpBuildRequest {
                id: build.id,
                global_priority: 9,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        adm.restart_build(BuildAction { id: build.id })
            .await
            .unwrap();
        // The restarted build is cancelled, unless it already finished again (all cached).
        match adm.cancel_build(BuildAction { id: build.id }).await {
            Ok(_) => {}
            Err(e) => assert_eq!(e.code(), Code::FailedPrecondition),
        }
        // The watcher may connect late on a loaded machine: make events until it has printed one.
        let mut watch = watch;
        let t = Instant::now();
        while watch.try_wait().unwrap().is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "qr admin watch saw no event"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = adm.restart_build(BuildAction { id: build.id }).await;
            let _ = adm.cancel_build(BuildAction { id: build.id }).await;
        }
        let out = watch.wait_with_output().unwrap();
        let ev: serde_json::Value = serde_json::from_slice(&out.stdout).expect("an event");
        assert!(ev["kind"].as_str().unwrap().starts_with("build_"), "{ev}");
        let st = adm.status(StatusRequest {}).await.unwrap().into_inner();
        assert!(st.steps_built >= 2 && st.resolutions >= 1, "{st:?}");
        assert!(st.uptime_s < 600);

        // With a valid token every RPC answers (its own error code at worst, never UNAUTHENTICATED).
        for (rpc, code) in every_rpc(&mut adm).await {
            assert_ne!(code, Code::Unauthenticated, "{rpc}");
        }
    });
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn list_machines(rt: &tokio::runtime::Runtime, adm: &mut Client) -> Vec<Machine> {
    rt.block_on(adm.list_machines(ListMachinesRequest {}))
        .expect("ListMachines")
        .into_inner()
        .machines
}

/// A remote builder's heartbeat in `ListMachines`, `qr admin machines` and `/api/machines`: recent
/// once it joined, and advancing while it stays (heartbeats every second here). Then the log of a
/// step it builds is kept (and served) under that step attempt's name.
#[test]
fn heartbeats_of_joined_builders() {
    let Some(mut c) = Cluster::new(Backend::Sqlite) else {
        return;
    };
    c.start_serve();
    let b = c.builder("hb-1", &["--systems", "x86_64-linux"], &[]);
    assert!(
        c.wait_joined("hb-1", 1, Duration::from_secs(30)),
        "{}",
        c.logs(&[&b])
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut adm = rt.block_on(client(&c.url(), TOKEN));
    let find = |ms: Vec<Machine>| {
        ms.into_iter()
            .find(|m| m.id == "hb-1")
            .expect("hb-1 in ListMachines")
    };
    let first = find(list_machines(&rt, &mut adm));
    assert!(!first.local);
    assert!(first.last_heartbeat_ms > 0, "{first:?}");
    assert!(
        (first.last_heartbeat_ms - unix_ms()).abs() < 5_000,
        "{first:?}"
    );
    assert!(first.heartbeat_age_s < 3.0, "{first:?}");
    // The next heartbeats move it on; its age stays below the interval (plus slack).
    let t = Instant::now();
    let later = loop {
        std::thread::sleep(Duration::from_millis(300));
        let m = find(list_machines(&rt, &mut adm));
        if m.last_heartbeat_ms > first.last_heartbeat_ms + 500 {
            break m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the heartbeat never advanced: {m:?}\n{}",
            c.logs(&[&b])
        );
    };
    assert!(later.heartbeat_age_s < 3.0, "{later:?}");
    // The builder reports its load average with its heartbeats.
    assert!(later.load >= 0.0);

    let out =
        c.qr.command()
            .args(["admin", "--runner", &c.url(), "--token-file"])
            .arg(&c.token)
            .arg("machines")
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.lines().next().unwrap().contains("HEARTBEAT"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("hb-1"))
        .expect("hb-1 row");
    assert!(row.contains("s ago ("), "{text}");
    let (code, _, body) = c.http_get("/api/machines");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["machines"][0]["last_heartbeat_ms"].as_i64().unwrap() >= later.last_heartbeat_ms);

    // A build on it: the log it streams up is kept under the step attempt's name.
    let mut g = Gen::new();
    let x = g.add(
        Kind::Ia,
        "remote-log",
        "echo remote-marker; echo x > $out",
        &[],
        &[],
    );
    let file = c.qr.write_json("remote-log.json", &g.doc());
    let (out, builds) = c.finish(c.submit(&[&file], 120));
    assert!(out.status.success(), "{}", c.logs(&[&b]));
    let id = builds[0]["id"].as_i64().unwrap();
    let steps = rt
        .block_on(adm.list_steps(ListStepsRequest { build: id }))
        .unwrap()
        .into_inner()
        .steps;
    let step = steps.iter().find(|s| s.drv_path == x).expect("the step");
    assert_eq!(step.machine, "hb-1");
    let t = Instant::now();
    let log = loop {
        // The stream may end a moment after the result.
        if let Ok(l) = rt.block_on(adm.get_log(GetLogRequest {
            build: id,
            stepnr: step.stepnr,
            tail_lines: 0,
        })) {
            let l = l.into_inner();
            if l.text.contains("remote-marker") {
                break l;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no remote log\n{}",
            c.logs(&[&b])
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(log.exact, "{log:?}");
    assert!(
        log.file.contains("/logs/remote/")
            && log
                .file
                .contains(&format!(".attempt-{id}-{}.log", step.stepnr)),
        "{log:?}"
    );
}

/// Logs are kept per step attempt: a failed build restarted builds its drv again in a new step
/// row, and each row keeps its own log (`GetLog`, `qr admin log`, `/api/…/log`); without a step
/// number the latest failed attempt is shown.
#[test]
fn logs_are_kept_per_attempt() {
    let Some(mut c) = Cluster::new(Backend::Sqlite) else {
        return;
    };
    c.serve_env = vec![("QR_LOCAL_BUILDER_ENABLED".into(), "true".into())];
    let mut g = Gen::new();
    g.system = qr::config::this_system();
    let x = g.add(
        Kind::Ia,
        "attempts",
        "echo attempt-marker $(date +%s%N); exit 3",
        &[],
        &[],
    );
    let file = c.qr.write_json("attempts.json", &g.doc());
    c.start_serve();
    let url = c.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut adm = rt.block_on(client(&url, TOKEN));
    let (out, builds) = c.finish(c.submit(&[&file], 120));
    assert!(!out.status.success());
    assert_eq!(builds[0]["status"], 1, "{builds:?}\n{}", c.serve_logs());
    let id = builds[0]["id"].as_i64().unwrap();

    rt.block_on(adm.restart_build(BuildAction { id })).unwrap();
    let t = Instant::now();
    let steps = loop {
        std::thread::sleep(Duration::from_millis(200));
        let d = rt
            .block_on(adm.get_build(GetBuildRequest { id }))
            .unwrap()
            .into_inner();
        let failed: Vec<Step> = d
            .steps
            .iter()
            .filter(|s| s.drv_path == x && s.status == 1)
            .cloned()
            .collect();
        if d.build.as_ref().unwrap().finished && failed.len() == 2 {
            break failed;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no second attempt: {d:?}\n{}",
            c.serve_logs()
        );
    };
    let mut log = |stepnr: i32| {
        rt.block_on(adm.get_log(GetLogRequest {
            build: id,
            stepnr,
            tail_lines: 0,
        }))
        .unwrap_or_else(|e| panic!("log of step {stepnr}: {e:?}"))
        .into_inner()
    };
    let (a, b) = (log(steps[0].stepnr), log(steps[1].stepnr));
    for (l, s) in [(&a, &steps[0]), (&b, &steps[1])] {
        assert!(l.exact, "{l:?}");
        assert_eq!((l.log_build, l.log_stepnr), (id, s.stepnr), "{l:?}");
        assert!(l.text.contains("attempt-marker"), "{l:?}");
        assert!(
            l.file.contains(&format!(".attempt-{id}-{}.", s.stepnr)),
            "{l:?}"
        );
        let order: Vec<(i64, i32)> = l.attempts.iter().map(|a| (a.build, a.stepnr)).collect();
        assert_eq!(
            order,
            [(id, steps[0].stepnr), (id, steps[1].stepnr)],
            "attempts oldest first: {l:?}"
        );
    }
    assert_ne!(a.file, b.file);
    assert_ne!(
        a.text, b.text,
        "the second attempt overwrote the first's log"
    );
    // Default: the build's last failed step.
    let latest = log(0);
    assert_eq!(latest.stepnr, steps[1].stepnr);
    assert_eq!(latest.text, b.text);
    // Both files are on disk, gzipped a few seconds after their step ended; compressing keeps
    // their order.
    let t = Instant::now();
    loop {
        let names: Vec<String> = std::fs::read_dir(c.qr.state_dir().join("logs"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".attempt-"))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        if names.iter().all(|n| n.ends_with(".log.gz")) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not compressed: {names:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let order: Vec<i32> = log(0).attempts.iter().map(|a| a.stepnr).collect();
    assert_eq!(order, [steps[0].stepnr, steps[1].stepnr]);

    // `qr admin log BUILD STEP` and the dashboard's endpoint show each attempt's own.
    let admin_log = |args: &[&str]| {
        let out =
            c.qr.command()
                .args(["admin", "--runner", &url, "--token-file"])
                .arg(&c.token)
                .arg("log")
                .args(args)
                .output()
                .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ids = id.to_string();
    let (text, note) = admin_log(&[&ids, &steps[0].stepnr.to_string()]);
    assert_eq!(text, a.text);
    assert!(note.contains("2 logs of this drv"), "{note}");
    assert_eq!(admin_log(&[&ids, &steps[1].stepnr.to_string()]).0, b.text);
    assert_eq!(admin_log(&[&ids]).0, b.text);
    let (code, _, body) = c.http_get(&format!("/api/builds/{id}/steps/{}/log", steps[0].stepnr));
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["text"], a.text.as_str());
}

#[test]
fn admin_api_on_sqlite() {
    admin_api(Backend::Sqlite);
}

#[test]
fn admin_api_on_postgres() {
    admin_api(Backend::Postgres);
}
