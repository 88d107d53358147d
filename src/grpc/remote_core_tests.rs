use super::*;
use crate::store::Derivation;
use std::sync::LazyLock;

/// A step's address is its name.
type Core = RemoteCore<&'static str>;

const DIR: &str = "/nix/store";

/// The output path of [`drv`].
const OUT: &str = "/nix/store/7ffcnxlyyp4nmgkf8n3xa1ghv9ldqa7g-a";

/// When the builder joined: the tests' clock starts here.
static T0: LazyLock<Instant> = LazyLock::new(Instant::now);

/// `secs` seconds after joining.
fn at(secs: u64) -> Instant {
    *T0 + Duration::from_secs(secs)
}

fn core(held: &[(&str, &str)]) -> Core {
    RemoteCore::new(
        "b1".into(),
        StoreDir::new(DIR).expect("store dir"),
        "s1".into(),
        held.iter()
            .map(|(d, j)| (d.to_string(), j.to_string()))
            .collect(),
        Duration::from_secs(4),
        Duration::from_secs(10),
        at(0),
    )
}

fn drv() -> Arc<Derivation> {
    let aterm = format!(
        "Derive([(\"out\",\"{DIR}/7ffcnxlyyp4nmgkf8n3xa1ghv9ldqa7g-a\",\"\",\"\")],[],[],\"x86_64-linux\",\"/bin/sh\",[],[(\"out\",\"{DIR}/7ffcnxlyyp4nmgkf8n3xa1ghv9ldqa7g-a\")])"
    );
    Arc::new(crate::store::aterm::parse(aterm.as_bytes()).expect("drv"))
}

fn order(step: &'static str, drv_path: &str) -> Order<&'static str> {
    Order {
        drv_path: drv_path.into(),
        drv: Some(drv()),
        step,
        max_silent: Duration::ZERO,
        timeout: Duration::ZERO,
        attempt: None,
    }
}

/// A command as a short name, for comparing.
fn name(c: Cmd<&'static str>) -> String {
    match c {
        Cmd::StartTimers { adopt_grace, .. } => format!("timers adopt={adopt_grace}"),
        Cmd::Alive(_) => "alive".into(),
        Cmd::Send(runner_message::Msg::Build(b)) => format!("send build {}", b.job_id),
        Cmd::Send(runner_message::Msg::Abort(a)) => format!("send abort {}", a.job_id),
        Cmd::Send(_) => "send other".into(),
        Cmd::CloseStream(s) => format!("close {:?}", s.map(|s| s.code())),
        Cmd::Report { to, outcome } => match outcome {
            BuildOutcome::Built(_) => format!("report built to {to}"),
            BuildOutcome::Failed { status, .. } => format!("report {status:?} to {to}"),
        },
        Cmd::FreeSlot => "free".into(),
        Cmd::HoldsNothing => "holds nothing".into(),
        Cmd::ReadDrv(o) => format!("read {}", o.drv_path),
        Cmd::ListInputs { job_id, .. } => format!("list inputs {job_id}"),
        Cmd::Verify { job_id, .. } => format!("verify {job_id}"),
        Cmd::RecordRun(d) => format!("ran {d}"),
        Cmd::Quarantine(_) => "quarantine".into(),
        Cmd::SessionEnded => "session ended".into(),
        Cmd::StopLater => "stop later".into(),
        Cmd::Note(n) => note(&n),
    }
}

/// A note as a short name (every one starts with `note`).
fn note(n: &Note) -> String {
    match n {
        Note::Opened => "note opened".into(),
        Note::Refused => "note refused".into(),
        Note::Taken(j) => format!("note taken {j}"),
        Note::Sending {
            job_id,
            closure_bytes,
            ..
        } => format!("note sending {job_id} {closure_bytes} bytes"),
        Note::Receiving(j) => format!("note receiving {j}"),
        Note::Ended { job_id, built } => format!("note ended {job_id} built={built}"),
        Note::Dropped(j) => format!("note dropped {j}"),
        Note::SessionLost => "note session lost".into(),
    }
}

/// Every command queued, notes included.
fn drain_all(c: &mut Core) -> Vec<String> {
    std::iter::from_fn(|| c.poll()).map(name).collect()
}

/// The commands queued, without the metrics' notes.
fn drain(c: &mut Core) -> Vec<String> {
    drain_all(c)
        .into_iter()
        .filter(|s| !s.starts_with("note"))
        .collect()
}

/// The next command that is not a note (the notes before it are dropped).
fn next_cmd(c: &mut Core) -> Option<Cmd<&'static str>> {
    std::iter::from_fn(|| c.poll()).find(|c| !matches!(c, Cmd::Note(_)))
}

/// The notes queued (the other commands are dropped).
fn notes(c: &mut Core) -> Vec<String> {
    drain_all(c)
        .into_iter()
        .filter(|s| s.starts_with("note"))
        .collect()
}

/// Sends a job and lists its inputs: returns its job id.
fn send_job(c: &mut Core, step: &'static str) -> String {
    c.on(In::Run(order(step, "/nix/store/x-a.drv")));
    let job_id = match next_cmd(c) {
        Some(Cmd::ListInputs { job_id, order, drv }) => {
            c.on(In::Inputs {
                job_id: job_id.clone(),
                order,
                drv,
                inputs: Ok(vec![]),
            });
            job_id
        }
        _ => panic!("no ListInputs"),
    };
    assert_eq!(drain(c), [format!("send build {job_id}")]);
    job_id
}

/// What the builder sent, arriving `secs` seconds after it joined.
fn from_builder(secs: u64, msg: builder_message::Msg) -> In<&'static str> {
    In::FromBuilder {
        msg: runner_v1::BuilderMessage { msg: Some(msg) },
        at: at(secs),
    }
}

fn result(job_id: &str, outcome: Option<job_result::Outcome>) -> In<&'static str> {
    from_builder(
        1,
        builder_message::Msg::Result(runner_v1::JobResult {
            job_id: job_id.into(),
            drv_path: "/nix/store/x-a.drv".into(),
            outcome,
        }),
    )
}

fn failure() -> Option<job_result::Outcome> {
    Some(job_result::Outcome::Failure(runner_v1::JobFailure {
        status: 1,
        message: "boom".into(),
        transient: false,
    }))
}

#[test]
fn a_failed_result_goes_to_its_step_and_frees_the_slot() {
    let mut c = core(&[]);
    c.on(In::Start);
    assert_eq!(drain(&mut c), ["alive", "timers adopt=false"]);
    let id = send_job(&mut c, "step a");
    c.on(result(&id, failure()));
    assert_eq!(drain(&mut c), ["alive", "report Failed to step a", "free"]);
}

#[test]
fn a_result_for_a_job_never_given_refuses_the_builder_and_retries_its_jobs() {
    let mut c = core(&[]);
    send_job(&mut c, "step a");
    c.on(result("s1-99", failure()));
    assert_eq!(
        drain(&mut c),
        [
            "alive",
            "quarantine",
            "close Some(PermissionDenied)",
            "report Aborted to step a",
            "session ended",
            "stop later"
        ]
    );
    assert!(c.closed());
    // A job arriving after the end is answered at once, for another machine.
    c.on(In::Run(order("step b", "/nix/store/y-b.drv")));
    assert_eq!(drain(&mut c), ["report Aborted to step b"]);
}

#[test]
fn the_result_of_an_aborted_job_is_dropped_not_refused() {
    let mut c = core(&[]);
    let id = send_job(&mut c, "step a");
    c.on(In::Abort("/nix/store/x-a.drv".into()));
    assert_eq!(drain(&mut c), ["free", format!("send abort {id}").as_str()]);
    c.on(result(&id, failure()));
    assert_eq!(drain(&mut c), ["alive"]);
    assert!(!c.closed());
}

#[test]
fn a_silent_builder_is_lost_after_the_timeout_and_a_heartbeat_resets_the_count() {
    let mut c = core(&[]);
    let id = send_job(&mut c, "step a");
    // Lost past 10 s of silence, counted from the join.
    c.on(In::Check { now: at(10) });
    assert!(!c.closed());
    c.on(from_builder(
        8,
        builder_message::Msg::Heartbeat(runner_v1::Heartbeat {
            load: 0.5,
            free_disk_bytes: 1,
            running_jobs: 1,
        }),
    ));
    assert_eq!(drain(&mut c), ["alive"]);
    // Heard at 8 s: 17 s is 9 s of silence; a message that arrived earlier than one already
    // heard does not turn the clock back.
    c.on(result(&id, failure()));
    drain(&mut c);
    c.on(In::Check { now: at(17) });
    assert!(!c.closed());
    c.on(In::Check { now: at(19) });
    assert!(c.closed());
    assert_eq!(
        drain(&mut c),
        [
            "close Some(DeadlineExceeded)",
            "session ended",
            "stop later"
        ]
    );
}

#[test]
fn a_silent_builder_loses_its_jobs_for_a_retry() {
    let mut c = core(&[]);
    send_job(&mut c, "step a");
    c.on(In::Check { now: at(11) });
    assert!(c.closed());
    assert_eq!(
        drain(&mut c),
        [
            "close Some(DeadlineExceeded)",
            "report Aborted to step a",
            "session ended",
            "stop later"
        ]
    );
}

#[test]
fn held_builds_nobody_adopted_are_dropped_after_the_grace() {
    let mut c = core(&[
        ("/nix/store/x-a.drv", "old-1"),
        ("/nix/store/y-b.drv", "old-2"),
    ]);
    c.on(In::Start);
    assert_eq!(drain(&mut c), ["alive", "timers adopt=true"]);
    // x-a is asked for again (adopted); y-b is not.
    send_job(&mut c, "step a");
    c.on(In::AdoptGraceOver);
    assert_eq!(drain(&mut c), ["holds nothing", "send abort old-2"]);
}

#[test]
fn inputs_that_cannot_be_listed_fail_the_job_for_a_retry() {
    let mut c = core(&[]);
    c.on(In::Run(order("step a", "/nix/store/x-a.drv")));
    let Some(Cmd::ListInputs { job_id, order, drv }) = next_cmd(&mut c) else {
        panic!("no ListInputs")
    };
    c.on(In::Inputs {
        job_id,
        order,
        drv,
        inputs: Err("gone".into()),
    });
    assert_eq!(drain(&mut c), ["report Aborted to step a", "free"]);
}

fn info(path: &str, nar_size: u64) -> PathInfo {
    PathInfo {
        path: path.into(),
        nar_hash: [7; 32],
        nar_size,
        references: BTreeSet::new(),
        ca: None,
        deriver: None,
    }
}

fn success(job_id: &str, out: &PathInfo) -> In<&'static str> {
    from_builder(
        2,
        builder_message::Msg::Result(runner_v1::JobResult {
            job_id: job_id.into(),
            drv_path: "/nix/store/x-a.drv".into(),
            outcome: Some(job_result::Outcome::Success(runner_v1::JobSuccess {
                outputs: vec![runner_v1::BuiltOutput {
                    name: "out".into(),
                    info: Some(info_to_proto(out)),
                }],
                ran: true,
            })),
        }),
    )
}

#[test]
fn a_built_job_is_timed_from_taken_through_sending_and_receiving_to_its_end() {
    let mut c = core(&[]);
    c.on(In::Start);
    assert_eq!(
        drain_all(&mut c),
        ["note opened", "alive", "timers adopt=false"]
    );
    c.on(In::Run(order("step a", "/nix/store/x-a.drv")));
    let Some(Cmd::Note(Note::Taken(id))) = c.poll() else {
        panic!("the job was not taken first")
    };
    let Some(Cmd::ListInputs { job_id, order, drv }) = c.poll() else {
        panic!("no ListInputs")
    };
    assert_eq!(job_id, id);
    let inputs = vec![info("/nix/store/i1-x", 100), info("/nix/store/i2-y", 200)];
    c.on(In::Inputs {
        job_id,
        order,
        drv,
        inputs: Ok(inputs),
    });
    assert_eq!(
        drain_all(&mut c),
        [
            format!("note sending {id} 300 bytes"),
            format!("send build {id}")
        ]
    );
    // The upload of its output: allowed, with the inputs it may refer to.
    let out = info(OUT, 5);
    let permit = c.check_upload(&id, "out", &out).expect("allowed");
    assert!(matches!(permit.expected, Expected::Static(ref p) if p == OUT));
    assert_eq!(
        permit.inputs.into_iter().collect::<Vec<_>>(),
        ["/nix/store/i1-x", "/nix/store/i2-y"]
    );
    assert_eq!(drain_all(&mut c), [format!("note receiving {id}")]);
    c.on(In::UploadDone {
        job_id: id.clone(),
        output: "out".into(),
        info: out.clone(),
    });
    c.on(success(&id, &out));
    let cmds: Vec<_> = std::iter::from_fn(|| c.poll()).collect();
    let [
        Cmd::Alive(None),
        Cmd::Verify {
            checks, outputs, ..
        },
    ] = &cmds[..]
    else {
        panic!("not alive then verify")
    };
    assert!(matches!(checks.get("out"), Some(OutputCheck::Uploaded)));
    let outputs = outputs.clone();
    c.on(In::Verified {
        job_id: id.clone(),
        drv_path: "/nix/store/x-a.drv".into(),
        ran: true,
        outputs,
        result: Ok(()),
    });
    assert_eq!(
        drain_all(&mut c),
        [
            "ran /nix/store/x-a.drv".to_string(),
            format!("note ended {id} built=true"),
            "report built to step a".into(),
            "free".into()
        ]
    );
    assert!(!c.closed());
}

#[test]
fn a_failed_job_ends_its_timer_as_not_built() {
    let mut c = core(&[]);
    let id = send_job(&mut c, "step a");
    c.on(result(&id, failure()));
    assert_eq!(notes(&mut c), [format!("note ended {id} built=false")]);
}

#[test]
fn an_aborted_job_is_dropped_and_a_refusal_is_counted_and_loses_the_session() {
    let mut c = core(&[]);
    let id = send_job(&mut c, "step a");
    c.on(In::Abort("/nix/store/x-a.drv".into()));
    assert_eq!(notes(&mut c), [format!("note dropped {id}")]);
    send_job(&mut c, "step b");
    c.on(In::Refuse("bad NAR".into()));
    assert_eq!(notes(&mut c), ["note refused", "note session lost"]);
}

#[test]
fn an_upload_for_an_aborted_job_is_turned_away_and_one_for_a_job_never_given_refuses() {
    let mut c = core(&[]);
    let id = send_job(&mut c, "step a");
    c.on(In::Abort("/nix/store/x-a.drv".into()));
    drain(&mut c);
    let err = c
        .check_upload(&id, "out", &info(OUT, 5))
        .expect_err("aborted");
    assert!(err.contains(OUT), "{err}");
    assert!(drain_all(&mut c).is_empty());
    assert!(!c.closed());
    assert!(c.check_upload("s1-99", "out", &info(OUT, 5)).is_err());
    assert_eq!(
        drain_all(&mut c),
        [
            "note refused",
            "quarantine",
            "close Some(PermissionDenied)",
            "note session lost",
            "session ended",
            "stop later"
        ]
    );
    // Closed: nothing more is allowed, and nothing more is refused.
    assert_eq!(
        c.check_upload(&id, "out", &info(OUT, 5)).err().as_deref(),
        Some("the session is closed")
    );
    assert!(drain_all(&mut c).is_empty());
}

#[test]
fn a_second_join_on_one_session_refuses_the_builder() {
    let mut c = core(&[]);
    c.on(from_builder(
        1,
        builder_message::Msg::Join(runner_v1::Join::default()),
    ));
    assert_eq!(
        drain(&mut c),
        [
            "alive",
            "quarantine",
            "close Some(PermissionDenied)",
            "session ended",
            "stop later"
        ]
    );
}
