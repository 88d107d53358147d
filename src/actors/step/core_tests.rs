//! The step's decisions around its phases, with no runtime: rows, builds, slots, early cutoffs.

use std::sync::Arc;

use super::*;
use crate::actors::step::machine::RetryPolicy;

/// Plain values for the addresses.
#[derive(Debug, Clone, Copy)]
struct T;

impl Wiring for T {
    type Waiter = Waiter;
    type Dep = &'static str;
    type Job = &'static str;
    type Drv = &'static str;
}

const S: &str = "/s/ssss-s.drv";
const R: &str = "/s/rrrr-r.drv";

fn prio(g: i32) -> BuildPrio {
    BuildPrio {
        global_priority: g,
        local_priority: 0,
        jobset: Arc::from("js"),
        job: Arc::from("j"),
        top: Arc::from("/s/top.drv"),
        limits: Default::default(),
    }
}

fn outs(p: &str) -> Outputs {
    [("out".to_string(), p.to_string())].into()
}

fn core(needs_resolution: bool, builds: &[i64], deps: Vec<&'static str>) -> StepCore<T> {
    let m = StepMachine::new(
        S,
        needs_resolution,
        BTreeMap::new(),
        BTreeMap::new(),
        RetryPolicy::default(),
    );
    let builds = builds.iter().map(|b| (*b, prio(0))).collect();
    StepCore::new(
        m,
        "x86_64-linux".into(),
        BTreeSet::new(),
        deps,
        builds,
        None,
        None,
        false,
    )
}

/// Every command the step gives until it waits for a reply (or has none left).
fn drain(c: &mut StepCore<T>) -> Vec<Cmd<T>> {
    let mut v = Vec::new();
    while let Some(cmd) = c.poll() {
        v.push(cmd);
    }
    v
}

/// A runnable step with a waiting build and an assigned machine.
fn assigned(c: &mut StepCore<T>) -> Vec<Cmd<T>> {
    c.on(In::WaiterAdded(Waiter::Build(1)));
    c.on(In::Start);
    drain(c);
    c.on(In::Assigned {
        machine: "m".into(),
        held: false,
        job: "job",
    });
    drain(c)
}

fn gauges(cmds: &[Cmd<T>], runnable: &mut i64, running: &mut i64) {
    for c in cmds {
        if let Cmd::Gauge { left, entered } = c {
            for (g, d) in [(left, -1), (entered, 1)] {
                match g {
                    Some(Gauge::Runnable) => *runnable += d,
                    Some(Gauge::Running) => *running += d,
                    None => {}
                }
            }
        }
    }
}

#[test]
fn a_start_takes_the_owner_builds_pending_row_and_the_job_names_it() {
    let mut c = core(false, &[2, 5], vec![]);
    c.on(In::RowAdopted((5, 3)));
    c.on(In::RowAdopted((2, 7)));
    let cmds = assigned(&mut c);
    // The last command waits for its reply: the row of build 2 (the owner) is started.
    assert!(
        matches!(cmds.last(), Some(Cmd::StartRow { pending: Some((2, 7)), owner: Some(2), machine, .. }) if machine == "m"),
        "{cmds:?}"
    );
    assert!(
        c.poll().is_none(),
        "nothing more until the start is written"
    );
    // The job goes with the start, named for its row: nothing more after it.
    assert!(
        matches!(
            cmds.last(),
            Some(Cmd::StartRow {
                job: Some("job"),
                ..
            })
        ),
        "{cmds:?}"
    );
    c.on(In::Started(Some((2, 7))));
    assert!(drain(&mut c).is_empty());
    assert_eq!(c.pending_rows(), &[(5, 3)]);
    assert_eq!(c.running_row(), Some((2, 7)));
}

fn limited(top: &str, max_silent: u32, timeout: u32) -> BuildPrio {
    BuildPrio {
        top: Arc::from(top),
        limits: crate::actors::limits::BuildLimits {
            max_silent,
            timeout,
        },
        ..prio(0)
    }
}

fn started_limits(cmds: &[Cmd<T>]) -> Option<crate::actors::limits::BuildLimits> {
    match cmds.last() {
        Some(Cmd::StartRow { limits, .. }) => *limits,
        other => panic!("no start: {other:?}"),
    }
}

#[test]
fn the_job_takes_the_limits_of_the_build_whose_top_level_it_is_else_the_owners() {
    use crate::actors::limits::BuildLimits;
    // Build 2 (the owner) needs S below its top; build 5 is S's own build.
    let mut c = core(false, &[], vec![]);
    c.on(In::BuildsAdded(vec![
        (5, limited(S, 1, 2)),
        (2, limited("/s/top.drv", 3600, 36000)),
    ]));
    assert_eq!(
        started_limits(&assigned(&mut c)),
        Some(BuildLimits {
            max_silent: 1,
            timeout: 2
        })
    );
    // No build of which S is the top-level: the owner's.
    let mut c = core(false, &[], vec![]);
    c.on(In::BuildsAdded(vec![
        (5, limited("/s/b.drv", 1, 2)),
        (2, limited("/s/a.drv", 3600, 0)),
    ]));
    assert_eq!(
        started_limits(&assigned(&mut c)),
        Some(BuildLimits {
            max_silent: 3600,
            timeout: 0
        })
    );
}

#[test]
fn a_start_that_cannot_be_written_gives_the_slot_back_and_fails_the_step_closing_its_row() {
    let mut c = core(false, &[2], vec![]);
    c.on(In::RowAdopted((2, 7)));
    assigned(&mut c);
    c.on(In::WriteFailed {
        error: WriteError {
            message: "cannot record the step's start in the database: gone".into(),
            unclosed: vec![((2, 7), Held::Pending)],
        },
        free_slot: true,
        detached: false,
    });
    let cmds = drain(&mut c);
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Cmd::FreeSlot(m) if m == "m")),
        "{cmds:?}"
    );
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Cmd::Count(Counter::DbWriteFailures)))
    );
    // The pending row went back to the step, and its failure closes it.
    let Some(Cmd::Db { writes, .. }) = cmds.last() else {
        panic!("{cmds:?}")
    };
    assert!(
        writes.iter().any(|w| matches!(
            w,
            Write::Finish(RowEnd {
                row: (2, 7),
                status: Status::Aborted,
                ..
            })
        )),
        "{writes:?}"
    );
    assert!(matches!(c.phase(), Phase::Failed(f) if f.status == Status::Aborted));
}

#[test]
fn an_assignment_after_the_step_left_the_queue_only_gives_the_slot_back() {
    let mut c = core(false, &[1], vec![]);
    assigned(&mut c);
    c.on(In::Started(None));
    drain(&mut c);
    c.on(In::Assigned {
        machine: "other".into(),
        held: false,
        job: "job2",
    });
    let cmds = drain(&mut c);
    assert!(
        matches!(&cmds[..], [Cmd::FreeSlot(m)] if m == "other"),
        "{cmds:?}"
    );
}

#[test]
fn rows_adopted_while_building_are_early_cutoffs_when_the_build_succeeds() {
    let mut c = core(false, &[1], vec![]);
    assigned(&mut c);
    c.on(In::Started(None));
    drain(&mut c);
    c.on(In::RowAdopted((9, 1)));
    c.on(In::JobDone(BuildOutcome::Built(outs("/s/o"))));
    let cmds = drain(&mut c);
    let cutoffs = cmds
        .iter()
        .filter(|c| matches!(c, Cmd::Count(Counter::EarlyCutoffs)))
        .count();
    assert_eq!(cutoffs, 1, "{cmds:?}");
    // The store first, then the row as a cached success, in one I/O.
    let Some(Cmd::Db {
        register: Some(_),
        writes,
        ..
    }) = cmds.last()
    else {
        panic!("{cmds:?}")
    };
    assert!(
        matches!(
            &writes[..],
            [Write::Finish(RowEnd {
                row: (9, 1),
                status: Status::Success,
                times_built: 0,
                ..
            })]
        ),
        "{writes:?}"
    );
}

#[test]
fn a_row_adopted_by_a_finished_step_is_closed_without_waiting() {
    let mut c = core(false, &[1], vec![]);
    assigned(&mut c);
    c.on(In::Started(None));
    drain(&mut c);
    c.on(In::JobDone(BuildOutcome::Failed {
        status: Status::Failed,
        message: "boom".into(),
        transient: false,
    }));
    drain(&mut c);
    c.on(In::Written);
    drain(&mut c);
    c.on(In::RowAdopted((4, 2)));
    let cmds = drain(&mut c);
    assert!(
        matches!(&cmds[..], [Cmd::Db { detached: true, writes, .. }] if matches!(&writes[..], [Write::Finish(RowEnd { row: (4, 2), status: Status::Failed, .. })])),
        "{cmds:?}"
    );
}

#[test]
fn a_better_build_requeues_a_runnable_step_and_passes_down() {
    let mut c = core(false, &[3], vec!["dep"]);
    c.on(In::WaiterAdded(Waiter::Build(3)));
    c.on(In::Start);
    drain(&mut c);
    c.on(In::BuildsAdded(vec![(1, prio(10))]));
    let cmds = drain(&mut c);
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Cmd::PassBuilds { to, .. } if to == &vec!["dep"])),
        "{cmds:?}"
    );
    assert!(
        cmds.iter().any(|c| matches!(c, Cmd::Enqueue(s) if s.priority.global_priority == 10 && s.priority.build_id == 1)),
        "{cmds:?}"
    );
    // The same builds again change nothing: no requeue, nothing passed down.
    c.on(In::BuildsAdded(vec![(1, prio(10))]));
    let cmds = drain(&mut c);
    assert!(
        matches!(&cmds[..], [Cmd::Count(Counter::MembershipHandled)]),
        "{cmds:?}"
    );
}

#[test]
fn gauges_return_to_zero_across_a_retry_and_a_success() {
    let (mut runnable, mut running) = (0, 0);
    let mut c = core(false, &[1], vec![]);
    c.on(In::WaiterAdded(Waiter::Build(1)));
    c.on(In::Start);
    gauges(&drain(&mut c), &mut runnable, &mut running);
    assert_eq!((runnable, running), (1, 0));
    c.on(In::Assigned {
        machine: "m".into(),
        held: false,
        job: "job",
    });
    gauges(&drain(&mut c), &mut runnable, &mut running);
    assert_eq!((runnable, running), (0, 1));
    c.on(In::Started(Some((1, 1))));
    drain(&mut c);
    c.on(In::JobDone(BuildOutcome::Failed {
        status: Status::Aborted,
        message: "lost".into(),
        transient: true,
    }));
    gauges(&drain(&mut c), &mut runnable, &mut running);
    assert_eq!((runnable, running), (0, 0), "retry wait counts in neither");
    c.on(In::Written);
    drain(&mut c);
    c.on(In::RetryDue);
    gauges(&drain(&mut c), &mut runnable, &mut running);
    c.on(In::Assigned {
        machine: "m".into(),
        held: false,
        job: "job",
    });
    gauges(&drain(&mut c), &mut runnable, &mut running);
    c.on(In::Started(Some((1, 2))));
    drain(&mut c);
    c.on(In::JobDone(BuildOutcome::Built(outs("/s/o"))));
    gauges(&drain(&mut c), &mut runnable, &mut running);
    assert_eq!((runnable, running), (0, 0));
}

#[test]
fn a_resolution_to_an_already_built_drv_is_an_early_cutoff_that_closes_the_child_row() {
    let mut c = core(true, &[1], vec![]);
    c.on(In::WaiterAdded(Waiter::Build(1)));
    c.on(In::Start);
    let cmds = drain(&mut c);
    assert!(
        matches!(
            cmds.last(),
            Some(Cmd::Resolve {
                owner: Some(1),
                pending: None,
                ..
            })
        ),
        "{cmds:?}"
    );
    c.on(In::Resolved {
        resolution: Resolution::Child(R.into()),
        rows: Some(((1, 1), (1, 2))),
    });
    let cmds = drain(&mut c);
    assert!(
        matches!(cmds.last(), Some(Cmd::FindChild { resolved }) if resolved == R),
        "{cmds:?}"
    );
    c.on(In::Child(Found::Built(outs("/s/r-out"))));
    let cmds = drain(&mut c);
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Cmd::Count(Counter::EarlyCutoffs)))
    );
    let Some(Cmd::Db { writes, .. }) = cmds.last() else {
        panic!("{cmds:?}")
    };
    assert!(
        matches!(&writes[..], [Write::Finish(RowEnd { row: (1, 2), status: Status::Success, times_built: 0, drv, .. })] if &**drv == R),
        "{writes:?}"
    );
    c.on(In::Written);
    let cmds = drain(&mut c);
    // The parent aliases the child's outputs: store, then its own realisations, then the build.
    assert!(
        matches!(cmds.last(), Some(Cmd::Db { register: Some(_), writes, .. }) if matches!(&writes[..], [Write::Realise { row: Some((1, 1)), .. }])),
        "{cmds:?}"
    );
    c.on(In::Written);
    let cmds = drain(&mut c);
    assert!(
        matches!(&cmds[..], [Cmd::Notify { to, notice: Notice::Landed(_) }] if to == &vec![Waiter::Build(1)]),
        "{cmds:?}"
    );
}

#[test]
fn a_failed_write_drops_what_was_queued_behind_it_but_not_the_bookkeeping() {
    let mut c = core(false, &[1], vec![]);
    assigned(&mut c);
    c.on(In::Started(Some((1, 1))));
    drain(&mut c);
    c.on(In::JobDone(BuildOutcome::Built(outs("/s/o"))));
    let cmds = drain(&mut c);
    assert!(matches!(cmds.last(), Some(Cmd::Db { .. })), "{cmds:?}");
    c.on(In::WriteFailed {
        error: WriteError {
            message: "cannot record the step's success in the database: gone".into(),
            unclosed: vec![((1, 1), Held::Running)],
        },
        free_slot: false,
        detached: false,
    });
    let cmds = drain(&mut c);
    // No success is told: the running row is closed as Aborted instead, and the waiter hears that.
    assert!(!cmds.iter().any(|c| matches!(
        c,
        Cmd::Notify {
            notice: Notice::Landed(_),
            ..
        }
    )));
    let Some(Cmd::Db {
        writes,
        on_error: OnError::Continue,
        ..
    }) = cmds.last()
    else {
        panic!("{cmds:?}")
    };
    assert!(
        matches!(
            &writes[0],
            Write::Finish(RowEnd {
                row: (1, 1),
                status: Status::Aborted,
                ..
            })
        ),
        "{writes:?}"
    );
    c.on(In::Written);
    let cmds = drain(&mut c);
    assert!(
        matches!(&cmds[..], [Cmd::Notify { notice: Notice::Failed(f), .. }] if f.status == Status::Aborted),
        "{cmds:?}"
    );
}

#[test]
fn abandoning_closes_every_row_aborts_the_job_and_stops() {
    let mut c = core(false, &[1], vec![]);
    c.on(In::RowAdopted((7, 1)));
    c.on(In::RowAdopted((1, 4)));
    assigned(&mut c);
    c.on(In::Started(Some((1, 4))));
    drain(&mut c);
    c.on(In::WaiterRemoved(Waiter::Build(1)));
    let cmds = drain(&mut c);
    assert!(cmds.iter().any(|c| matches!(c, Cmd::LeaveQueue)));
    assert!(cmds.iter().any(|c| matches!(c, Cmd::AbortJob("job"))));
    let Some(Cmd::Db {
        writes,
        detached: true,
        ..
    }) = cmds.last()
    else {
        panic!("{cmds:?}")
    };
    let rows: Vec<Row> = writes
        .iter()
        .map(|w| match w {
            Write::Finish(e) => {
                assert_eq!(e.status, Status::Cancelled);
                e.row
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(rows, vec![(1, 4), (7, 1)]);
    // A detached write that fails is only counted: the step still stops.
    c.on(In::WriteFailed {
        error: WriteError {
            message: "x".into(),
            unclosed: vec![],
        },
        free_slot: false,
        detached: true,
    });
    let cmds = drain(&mut c);
    assert!(
        matches!(&cmds[..], [Cmd::Count(Counter::DbWriteFailures), Cmd::Stop]),
        "{cmds:?}"
    );
}

#[test]
fn a_step_stopping_unfinished_closes_its_rows_and_aborts_its_job() {
    let mut c = core(false, &[1], vec![]);
    c.on(In::RowAdopted((1, 2)));
    assigned(&mut c);
    c.on(In::Started(Some((1, 2))));
    drain(&mut c);
    // Nothing references it any more: the actor stops while the job runs.
    let cmds = c.on_stop();
    assert!(
        matches!(
            cmds[0],
            Cmd::Gauge {
                left: Some(Gauge::Running),
                entered: None
            }
        ),
        "{cmds:?}"
    );
    assert!(cmds.iter().any(|c| matches!(c, Cmd::LeaveQueue)));
    assert!(cmds.iter().any(|c| matches!(c, Cmd::AbortJob("job"))));
    let Some(Cmd::Db {
        writes,
        detached: true,
        ..
    }) = cmds.last()
    else {
        panic!("{cmds:?}")
    };
    assert!(
        matches!(
            &writes[..],
            [Write::Finish(RowEnd {
                row: (1, 2),
                status: Status::Cancelled,
                ..
            })]
        ),
        "{writes:?}"
    );
}

#[test]
fn a_finished_step_stopping_only_leaves_its_gauge() {
    let mut c = core(false, &[1], vec![]);
    assigned(&mut c);
    c.on(In::Started(Some((1, 1))));
    drain(&mut c);
    c.on(In::JobDone(BuildOutcome::Built(outs("/s/o"))));
    drain(&mut c);
    let cmds = c.on_stop();
    assert!(
        matches!(
            &cmds[..],
            [Cmd::Gauge {
                left: None,
                entered: None
            }]
        ),
        "{cmds:?}"
    );
}

/// A step with a dynamic input: input P's `out` holds drv D, whose `out` the step uses.
fn dynamic_core() -> StepCore<T> {
    const P: &str = "/s/pppp-p.drv";
    let m = StepMachine::new(
        S,
        true,
        [(P.to_string(), ["out".to_string()].into())].into(),
        BTreeMap::new(),
        RetryPolicy::default(),
    )
    .with_dynamic(vec![crate::actors::step::machine::DynamicNeed {
        input: P.into(),
        chain: vec!["out".into()],
        wanted: vec!["out".into()],
    }]);
    let mut c = StepCore::new(
        m,
        "x86_64-linux".into(),
        BTreeSet::new(),
        vec!["p"],
        vec![(1, prio(0)), (2, prio(0))],
        None,
        None,
        false,
    );
    c.on(In::WaiterAdded(Waiter::Build(1)));
    c.on(In::Start);
    assert!(drain(&mut c).is_empty());
    c.on(In::Landed {
        from: P.into(),
        outputs: outs(D),
    });
    c
}

const D: &str = "/s/dddd-d.drv";

#[test]
fn a_produced_drv_is_attached_for_the_owner_build_and_joined_with_every_build() {
    let mut c = dynamic_core();
    let cmds = drain(&mut c);
    assert!(
        matches!(&cmds[..], [Cmd::AttachProduced { drv, by, build: Some(1), prio: Some(_) }] if drv == D && by.len() == 1),
        "{cmds:?}"
    );
    // The reply is awaited.
    assert!(c.is_awaiting());
    c.on(In::Produced {
        drv: D.into(),
        produced: Produced::Step {
            key: D.into(),
            dep: "d",
        },
    });
    let cmds = drain(&mut c);
    assert!(
        matches!(&cmds[..], [Cmd::JoinChild { dep: "d", adopt: None, builds: Some(b) }] if b.len() == 2),
        "{cmds:?}"
    );
    // Its landing is an input's: the step resolves with the whole chain.
    c.on(In::Landed {
        from: D.into(),
        outputs: outs("/s/d-out"),
    });
    let cmds = drain(&mut c);
    assert!(
        matches!(cmds.last(), Some(Cmd::Resolve { inputs, .. }) if inputs.len() == 2),
        "{cmds:?}"
    );
}

#[test]
fn a_produced_drv_already_built_lands_at_once_and_one_that_cannot_be_built_fails_the_step() {
    let mut c = dynamic_core();
    drain(&mut c);
    c.on(In::Produced {
        drv: D.into(),
        produced: Produced::Built(outs("/s/d-out")),
    });
    let cmds = drain(&mut c);
    assert!(matches!(cmds.last(), Some(Cmd::Resolve { .. })), "{cmds:?}");

    let mut c = dynamic_core();
    drain(&mut c);
    c.on(In::Produced {
        drv: D.into(),
        produced: Produced::Failed(Failure::new(Status::CachedFailure, "failed before")),
    });
    drain(&mut c);
    assert!(
        matches!(c.phase(), Phase::Failed(f) if f.status == Status::DepFailed),
        "{:?}",
        c.phase()
    );
}
