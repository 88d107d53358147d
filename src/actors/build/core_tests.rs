//! The build's decisions around its phases, with no runtime.

use std::sync::Arc;

use super::*;

#[derive(Debug, Clone, Copy)]
struct T;

impl BuildWiring for T {
    type Step = &'static str;
}

fn core() -> BuildCore<T> {
    let prio = BuildPrio {
        global_priority: 0,
        local_priority: 0,
        jobset: Arc::from("js"),
        job: Arc::from("j"),
        top: Arc::from("/s/top.drv"),
        limits: Default::default(),
    };
    BuildCore::new(7, "/s/top.drv".into(), prio)
}

fn drain(c: &mut BuildCore<T>) -> Vec<Cmd<T>> {
    let mut v = vec![];
    while let Some(cmd) = c.poll() {
        v.push(cmd);
    }
    v
}

fn finish_status(cmds: &[Cmd<T>]) -> Option<Status> {
    cmds.iter().find_map(|c| match c {
        Cmd::Finish(f) => Some(f.status),
        _ => None,
    })
}

#[test]
fn a_graph_changed_while_planning_is_expanded_again() {
    let mut c = core();
    c.on(In::Start);
    assert!(matches!(
        &drain(&mut c)[..],
        [Cmd::Expand { first: true, .. }]
    ));
    c.on(In::Expanded {
        top: Ok(Expansion::Replan),
        cached: vec![],
    });
    assert!(matches!(
        &drain(&mut c)[..],
        [Cmd::Expand { first: false, .. }]
    ));
}

#[test]
fn cached_failures_met_are_recorded_before_the_build_finishes() {
    let mut c = core();
    c.on(In::Start);
    drain(&mut c);
    c.on(In::Expanded {
        top: Ok(Expansion::Failed(Failure::new(
            Status::CachedFailure,
            "before",
        ))),
        cached: vec!["/s/bad.drv".into()],
    });
    let cmds = drain(&mut c);
    assert!(
        matches!(&cmds[..], [Cmd::RecordRows(r)] if r == &vec![BuildRow::CachedFailure { drv: "/s/bad.drv".into() }]),
        "{cmds:?}"
    );
    c.on(In::Written(Ok(())));
    assert_eq!(finish_status(&drain(&mut c)), Some(Status::CachedFailure));
}

#[test]
fn a_failure_recorded_in_another_build_gets_a_row_here_first() {
    let origin = |build| FailureOrigin {
        drv: "/s/dep.drv".into(),
        system: "x".into(),
        status: Status::Failed,
        message: "boom".into(),
        build,
    };
    let failure = |build| Failure {
        origin: Some(Box::new(origin(build))),
        ..Failure::new(Status::Failed, "boom").propagate("/s/dep.drv")
    };
    let mut c = core();
    c.on(In::Start);
    drain(&mut c);
    c.on(In::Expanded {
        top: Ok(Expansion::Step("top")),
        cached: vec![],
    });
    assert!(matches!(&drain(&mut c)[..], [Cmd::Wait("top")]));
    c.on(In::Failed(failure(3)));
    let cmds = drain(&mut c);
    assert!(
        matches!(&cmds[..], [Cmd::RecordRows(r)] if r == &vec![BuildRow::Propagated(origin(3))]),
        "{cmds:?}"
    );
    c.on(In::Written(Ok(())));
    assert_eq!(finish_status(&drain(&mut c)), Some(Status::DepFailed));
    // Recorded in this build: no second row.
    let mut c = core();
    c.on(In::Start);
    drain(&mut c);
    c.on(In::Expanded {
        top: Ok(Expansion::Step("top")),
        cached: vec![],
    });
    drain(&mut c);
    c.on(In::Failed(failure(7)));
    let cmds = drain(&mut c);
    assert!(
        !cmds.iter().any(|c| matches!(c, Cmd::RecordRows(_))),
        "{cmds:?}"
    );
    assert_eq!(finish_status(&cmds), Some(Status::DepFailed));
}

#[test]
fn an_output_holding_the_failed_marker_finishes_failed_with_output() {
    let mut c = core();
    c.on(In::Start);
    drain(&mut c);
    c.on(In::Expanded {
        top: Ok(Expansion::Step("top")),
        cached: vec![],
    });
    drain(&mut c);
    let outputs: Outputs = [("out".to_string(), "/s/o".to_string())].into();
    c.on(In::Landed(outputs.clone()));
    assert!(matches!(
        &drain(&mut c)[..],
        [Cmd::CheckMarker { cached: false, .. }]
    ));
    c.on(In::MarkerChecked {
        outputs,
        failed_marker: true,
        cached: false,
    });
    let cmds = drain(&mut c);
    assert_eq!(
        finish_status(&cmds),
        Some(Status::FailedWithOutput),
        "{cmds:?}"
    );
}

#[test]
fn a_finish_the_database_refuses_is_tried_once_more_as_aborted_then_the_build_is_done() {
    let mut c = core();
    c.on(In::Start);
    drain(&mut c);
    c.on(In::Expanded {
        top: Ok(Expansion::Built(Outputs::new())),
        cached: vec![],
    });
    assert!(matches!(
        &drain(&mut c)[..],
        [Cmd::CheckMarker { cached: true, .. }]
    ));
    c.on(In::MarkerChecked {
        outputs: Outputs::new(),
        failed_marker: false,
        cached: true,
    });
    assert_eq!(finish_status(&drain(&mut c)), Some(Status::Success));
    c.on(In::Finished(Err("refused".into())));
    assert_eq!(finish_status(&drain(&mut c)), Some(Status::Aborted));
    c.on(In::Finished(Err("refused again".into())));
    assert!(matches!(&drain(&mut c)[..], [Cmd::Done]));
}

#[test]
fn a_cancel_releases_the_top_step_and_finishes_cancelled() {
    let mut c = core();
    c.on(In::Start);
    drain(&mut c);
    c.on(In::Expanded {
        top: Ok(Expansion::Step("top")),
        cached: vec![],
    });
    drain(&mut c);
    c.on(In::Bump(5));
    let cmds = drain(&mut c);
    assert!(
        matches!(&cmds[..], [Cmd::Reprioritise("top", p)] if p.global_priority == 5),
        "{cmds:?}"
    );
    c.on(In::Cancel);
    let cmds = drain(&mut c);
    assert!(matches!(&cmds[0], Cmd::Release("top")), "{cmds:?}");
    assert_eq!(finish_status(&cmds), Some(Status::Cancelled));
    c.on(In::Finished(Ok(())));
    assert!(matches!(&drain(&mut c)[..], [Cmd::Done]));
}

#[test]
fn outputs_valid_before_with_the_failed_marker_finish_failed_with_output_as_cached() {
    let mut c = core();
    c.on(In::Start);
    drain(&mut c);
    let outputs: Outputs = [("out".to_string(), "/s/o".to_string())].into();
    c.on(In::Expanded {
        top: Ok(Expansion::Built(outputs.clone())),
        cached: vec![],
    });
    assert!(matches!(
        &drain(&mut c)[..],
        [Cmd::CheckMarker { cached: true, .. }]
    ));
    c.on(In::MarkerChecked {
        outputs,
        failed_marker: true,
        cached: true,
    });
    let cmds = drain(&mut c);
    assert!(
        matches!(&cmds[..], [Cmd::Finish(f)] if f.status == Status::FailedWithOutput && f.cached),
        "{cmds:?}"
    );
}
