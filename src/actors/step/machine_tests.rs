use super::*;

/// The machine as unit tests hold it: waiters by key.
type StepMachine = super::StepMachine<Waiter>;

const A: &str = "/s/aaaa-a.drv";
const B: &str = "/s/bbbb-b.drv";
const R: &str = "/s/rrrr-b.drv";

fn outs(pairs: &[(&str, &str)]) -> Outputs {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn wants(pairs: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
    pairs
        .iter()
        .map(|(d, os)| (d.to_string(), os.iter().map(|o| o.to_string()).collect()))
        .collect()
}

fn step(needs_resolution: bool, inputs: &[(&str, &[&str])]) -> StepMachine {
    let mut s = StepMachine::new(
        B,
        needs_resolution,
        wants(inputs),
        BTreeMap::new(),
        RetryPolicy::default(),
    );
    s.on(Event::WaiterAdded(Waiter::Build(1)));
    s
}

#[test]
fn ia_step_without_inputs_is_runnable_at_start() {
    let mut s = step(false, &[]);
    assert_eq!(s.on(Event::Start), vec![Effect::MakeRunnable]);
    assert_eq!(s.phase(), &Phase::Runnable);
    // a second Start changes nothing
    assert_eq!(s.on(Event::Start), vec![]);
}

#[test]
fn ia_step_waits_for_every_input_then_runs_without_resolving() {
    let mut s = step(false, &[(A, &["out"])]);
    assert_eq!(s.on(Event::Start), vec![]);
    assert_eq!(s.waiting_on().collect::<Vec<_>>(), vec![A]);
    assert_eq!(
        s.on(Event::InputLanded {
            drv: A.into(),
            outputs: outs(&[("out", "/s/x-a")])
        }),
        vec![Effect::MakeRunnable]
    );
}

#[test]
fn ca_step_resolves_from_the_landed_realisations() {
    let mut s = StepMachine::new(
        B,
        true,
        wants(&[(A, &["out"])]),
        [((R.to_string(), "dev".to_string()), "/s/already".to_string())].into(),
        RetryPolicy::default(),
    );
    s.on(Event::Start);
    let fx = s.on(Event::InputLanded {
        drv: A.into(),
        outputs: outs(&[("out", "/s/x-a"), ("dev", "/s/x-a-dev")]),
    });
    let expected: BTreeMap<(String, String), String> = [
        ((A.to_string(), "out".to_string()), "/s/x-a".to_string()),
        ((R.to_string(), "dev".to_string()), "/s/already".to_string()),
    ]
    .into();
    assert_eq!(fx, vec![Effect::Resolve { inputs: expected }]);
    assert_eq!(s.phase(), &Phase::Resolving);
}

#[test]
fn duplicate_and_unknown_landings_are_ignored() {
    let mut s = step(false, &[(A, &["out"]), (R, &["out"])]);
    s.on(Event::Start);
    assert_eq!(
        s.on(Event::InputLanded {
            drv: A.into(),
            outputs: outs(&[("out", "/p")])
        }),
        vec![]
    );
    assert_eq!(
        s.on(Event::InputLanded {
            drv: A.into(),
            outputs: outs(&[("out", "/p")])
        }),
        vec![]
    );
    assert_eq!(
        s.on(Event::InputLanded {
            drv: "/s/zzzz-z.drv".into(),
            outputs: outs(&[])
        }),
        vec![]
    );
    assert_eq!(s.phase(), &Phase::WaitingForInputs);
    assert_eq!(
        s.on(Event::InputLanded {
            drv: R.into(),
            outputs: outs(&[("out", "/q")])
        }),
        vec![Effect::MakeRunnable]
    );
}

#[test]
fn an_input_landing_without_a_wanted_output_fails_the_step() {
    let mut s = step(true, &[(A, &["dev"])]);
    s.on(Event::Start);
    let fx = s.on(Event::InputLanded {
        drv: A.into(),
        outputs: outs(&[("out", "/p")]),
    });
    let Phase::Failed(f) = s.phase() else {
        panic!("not failed: {:?}", s.phase())
    };
    assert_eq!(f.status, Status::Failed);
    assert!(
        f.message.contains("without its output 'dev'"),
        "{}",
        f.message
    );
    assert!(matches!(
        &fx[..],
        [Effect::RecordFailure(_), Effect::NotifyFailed { .. }]
    ));
}

#[test]
fn resolving_to_itself_makes_the_step_runnable() {
    let mut s = step(true, &[]);
    assert!(matches!(&s.on(Event::Start)[..], [Effect::Resolve { .. }]));
    assert_eq!(
        s.on(Event::Resolved(Resolution::Same)),
        vec![Effect::MakeRunnable]
    );
}

#[test]
fn resolving_to_a_child_attaches_and_aliases_its_outputs() {
    let mut s = step(true, &[(A, &["out"])]);
    s.on(Event::Start);
    s.on(Event::InputLanded {
        drv: A.into(),
        outputs: outs(&[("out", "/s/x-a")]),
    });
    assert_eq!(
        s.on(Event::Resolved(Resolution::Child(R.into()))),
        vec![Effect::AttachChild { resolved: R.into() }]
    );
    assert_eq!(s.phase(), &Phase::AwaitingResolved { resolved: R.into() });
    // a machine never gets a resolved parent
    assert_eq!(
        s.on(Event::Dispatched {
            machine: "m".into()
        }),
        vec![]
    );
    let o = outs(&[("out", "/s/y-b")]);
    assert_eq!(
        s.on(Event::ChildLanded(o.clone())),
        vec![
            Effect::RecordSuccess {
                outputs: o.clone(),
                built: false
            },
            Effect::NotifyLanded {
                to: vec![Waiter::Build(1)],
                outputs: o.clone()
            },
        ]
    );
    assert_eq!(s.phase(), &Phase::Succeeded(o));
}

#[test]
fn impossible_resolution_fails_with_a_clear_message() {
    let mut s = step(true, &[]);
    s.on(Event::Start);
    let fx = s.on(Event::Resolved(Resolution::Impossible(
        "no realisation for /s/aaaa-a.drv^out".into(),
    )));
    let f = Failure::new(
        Status::Failed,
        format!("cannot resolve {B}: no realisation for /s/aaaa-a.drv^out"),
    );
    assert_eq!(
        fx,
        vec![
            Effect::RecordFailure(f.clone()),
            Effect::NotifyFailed {
                to: vec![Waiter::Build(1)],
                failure: f
            }
        ]
    );
}

#[test]
fn a_child_failure_is_the_parents_own_failure_and_not_recorded_twice() {
    let mut s = step(true, &[]);
    s.on(Event::Start);
    s.on(Event::Resolved(Resolution::Child(R.into())));
    let f = Failure::new(Status::Failed, "builder exited with 1");
    assert_eq!(
        s.on(Event::ChildFailed(f.clone())),
        vec![Effect::NotifyFailed {
            to: vec![Waiter::Build(1)],
            failure: f
        }]
    );
}

#[test]
fn a_recorded_resolution_attaches_straight_to_the_child_at_restart() {
    let mut s = StepMachine::new(
        B,
        true,
        wants(&[(A, &["out"])]),
        BTreeMap::new(),
        RetryPolicy::default(),
    )
    .with_recorded_resolution(R);
    assert_eq!(
        s.on(Event::Start),
        vec![Effect::AttachChild { resolved: R.into() }]
    );
    // inputs landing later do not resolve again
    assert_eq!(
        s.on(Event::InputLanded {
            drv: A.into(),
            outputs: outs(&[("out", "/p")])
        }),
        vec![]
    );
}

#[test]
fn input_failure_propagates_as_dep_failed_from_the_failing_drv() {
    let mut s = step(false, &[(A, &["out"])]);
    s.on(Event::Start);
    let fx = s.on(Event::InputFailed {
        drv: A.into(),
        failure: Failure::new(Status::Failed, "boom"),
    });
    let Phase::Failed(f) = s.phase().clone() else {
        panic!()
    };
    assert_eq!(f.status, Status::DepFailed);
    assert_eq!(f.propagated_from.as_deref(), Some(A));
    assert_eq!(
        fx,
        vec![
            Effect::RecordFailure(f.clone()),
            Effect::NotifyFailed {
                to: vec![Waiter::Build(1)],
                failure: f.clone()
            }
        ]
    );
    // further up, the origin is kept
    let up = f.propagate(B);
    assert_eq!(up.propagated_from.as_deref(), Some(A));
}

#[test]
fn dispatch_then_success_records_built_outputs_and_notifies() {
    let mut s = step(false, &[]);
    s.on(Event::WaiterAdded(Waiter::Step("/s/cccc-c.drv".into())));
    s.on(Event::Start);
    assert_eq!(
        s.on(Event::Dispatched {
            machine: "local".into()
        }),
        vec![Effect::RecordStart {
            machine: "local".into()
        }]
    );
    let o = outs(&[("out", "/s/z-b")]);
    let fx = s.on(Event::BuildDone(BuildOutcome::Built(o.clone())));
    assert_eq!(
        fx,
        vec![
            Effect::RecordSuccess {
                outputs: o.clone(),
                built: true
            },
            Effect::NotifyLanded {
                to: vec![Waiter::Step("/s/cccc-c.drv".into()), Waiter::Build(1)],
                outputs: o
            },
        ]
    );
    // a stray result after the end changes nothing
    assert_eq!(
        s.on(Event::BuildDone(BuildOutcome::Built(outs(&[])))),
        vec![]
    );
}

#[test]
fn transient_failures_retry_with_backoff_until_max_tries() {
    let retry = RetryPolicy {
        max_tries: 3,
        interval: Duration::from_secs(10),
        backoff: 2.0,
    };
    let mut s = StepMachine::new(B, false, BTreeMap::new(), BTreeMap::new(), retry);
    s.on(Event::WaiterAdded(Waiter::Build(7)));
    s.on(Event::Start);
    let fail = || BuildOutcome::Failed {
        status: Status::Aborted,
        message: "machine lost".into(),
        transient: true,
    };
    s.on(Event::Dispatched {
        machine: "m".into(),
    });
    assert_eq!(
        s.on(Event::BuildDone(fail())),
        vec![
            Effect::RecordRetry {
                try_number: 1,
                status: Status::Aborted,
                message: "machine lost".into()
            },
            Effect::ScheduleRetry {
                after: Duration::from_secs(10)
            },
        ]
    );
    assert_eq!(s.phase(), &Phase::RetryWait);
    assert_eq!(s.on(Event::RetryDue), vec![Effect::MakeRunnable]);
    s.on(Event::Dispatched {
        machine: "m".into(),
    });
    assert_eq!(
        s.on(Event::BuildDone(fail()))[1],
        Effect::ScheduleRetry {
            after: Duration::from_secs(20)
        }
    );
    s.on(Event::RetryDue);
    s.on(Event::Dispatched {
        machine: "m".into(),
    });
    let fx = s.on(Event::BuildDone(fail()));
    assert!(
        matches!(&fx[..], [Effect::RecordFailure(f), Effect::NotifyFailed { .. }] if f.status == Status::Aborted)
    );
    assert_eq!(s.tries(), 3);
}

#[test]
fn permanent_failures_do_not_retry() {
    let mut s = step(false, &[]);
    s.on(Event::Start);
    s.on(Event::Dispatched {
        machine: "m".into(),
    });
    let fx = s.on(Event::BuildDone(BuildOutcome::Failed {
        status: Status::Failed,
        message: "exit 1".into(),
        transient: false,
    }));
    assert!(
        matches!(&fx[..], [Effect::RecordFailure(f), Effect::NotifyFailed { .. }] if f.status == Status::Failed)
    );
    assert_eq!(s.on(Event::RetryDue), vec![]);
}

#[test]
fn late_waiters_get_the_result_at_once() {
    let mut s = step(false, &[]);
    s.on(Event::Start);
    s.on(Event::Dispatched {
        machine: "m".into(),
    });
    let o = outs(&[("out", "/s/z")]);
    s.on(Event::BuildDone(BuildOutcome::Built(o.clone())));
    assert_eq!(
        s.on(Event::WaiterAdded(Waiter::Build(2))),
        vec![Effect::NotifyLanded {
            to: vec![Waiter::Build(2)],
            outputs: o
        }]
    );
    let mut f = step(false, &[(A, &["out"])]);
    f.on(Event::InputFailed {
        drv: A.into(),
        failure: Failure::new(Status::Failed, "x"),
    });
    assert!(
        matches!(&f.on(Event::WaiterAdded(Waiter::Build(3)))[..], [Effect::NotifyFailed { to, .. }] if to == &vec![Waiter::Build(3)])
    );
}

#[test]
fn losing_every_waiter_abandons_an_unfinished_step() {
    let mut s = step(false, &[(A, &["out"])]);
    s.on(Event::WaiterAdded(Waiter::Build(2)));
    assert_eq!(s.on(Event::WaiterRemoved(Waiter::Build(1))), vec![]);
    assert_eq!(
        s.on(Event::WaiterRemoved(Waiter::Build(2))),
        vec![Effect::Abandon]
    );
    assert!(s.is_finished());
}

#[test]
fn retry_delays_grow_geometrically() {
    let p = RetryPolicy {
        max_tries: 9,
        interval: Duration::from_secs(60),
        backoff: 3.0,
    };
    assert_eq!(p.delay_before(2), Duration::from_secs(60));
    assert_eq!(p.delay_before(3), Duration::from_secs(180));
    assert_eq!(p.delay_before(4), Duration::from_secs(540));
}

#[test]
fn a_runnable_step_no_machine_supports_fails_unsupported() {
    let mut s = step(false, &[]);
    s.on(Event::Start);
    let fx = s.on(Event::NoMachine("no machine for riscv64-linux".into()));
    assert!(
        matches!(&fx[..], [Effect::RecordFailure(f), Effect::NotifyFailed { .. }] if f.status == Status::Unsupported)
    );
    // only a queued step can be unsupported
    let mut w = step(false, &[(A, &["out"])]);
    w.on(Event::Start);
    assert_eq!(w.on(Event::NoMachine("x".into())), vec![]);
}

#[test]
fn failure_messages_are_made_storable() {
    let long = format!("a\0b{}", "x".repeat(2 * MAX_FAILURE_MESSAGE));
    let BuildOutcome::Failed { message, .. } = (BuildOutcome::Failed {
        status: Status::Failed,
        message: long,
        transient: false,
    })
    .storable() else {
        panic!("still a failure");
    };
    assert!(message.starts_with("a\u{fffd}b"), "{message:.10}");
    assert!(!message.contains('\0'));
    assert!(message.len() < MAX_FAILURE_MESSAGE + 40);
    let built = BuildOutcome::Built(Outputs::new());
    assert_eq!(built.clone().storable(), built);
}

#[test]
fn inputs_given_in_any_order_are_kept_sorted_and_merged() {
    let c = "/s/cccc-c.drv";
    let mut s = StepMachine::with_inputs(
        B,
        false,
        vec![
            (c.into(), vec!["out".into()]),
            (A.into(), vec!["out".into(), "dev".into()]),
            (c.into(), vec!["lib".into(), "out".into()]),
        ],
        BTreeMap::new(),
        RetryPolicy::default(),
    );
    s.on(Event::WaiterAdded(Waiter::Build(1)));
    assert_eq!(s.waiting_on().collect::<Vec<_>>(), vec![A, c]);
    assert_eq!(s.on(Event::Start), vec![]);
    s.on(Event::InputLanded {
        drv: c.into(),
        outputs: outs(&[("out", "/p/c"), ("lib", "/p/c-lib")]),
    });
    assert_eq!(s.waiting_on().collect::<Vec<_>>(), vec![A]);
    assert_eq!(
        s.on(Event::InputLanded {
            drv: A.into(),
            outputs: outs(&[("out", "/p/a"), ("dev", "/p/a-dev")]),
        }),
        vec![Effect::MakeRunnable]
    );
}

/// Feeds `ev`, applying the gauge change of the transition to `(runnable, running)` as the
/// adapter does (in one place, from the phases before and after).
fn feed_counting(s: &mut StepMachine, ev: Event, gauges: &mut (i64, i64)) -> Vec<Effect> {
    let before = s.phase().gauge();
    let fx = s.on(ev);
    let (left, entered) = gauge_change(before, s.phase().gauge());
    for (g, d) in [(left, -1), (entered, 1)] {
        match g {
            Some(Gauge::Runnable) => gauges.0 += d,
            Some(Gauge::Running) => gauges.1 += d,
            None => {}
        }
    }
    assert!(
        gauges.0 >= 0 && gauges.1 >= 0,
        "a gauge below 0: {gauges:?}"
    );
    fx
}

#[test]
fn gauges_follow_the_phase_through_retries_and_abandonment() {
    let mut g = (0, 0);
    let mut s = StepMachine::new(
        B,
        false,
        BTreeMap::new(),
        BTreeMap::new(),
        RetryPolicy::default(),
    );
    feed_counting(&mut s, Event::WaiterAdded(Waiter::Build(1)), &mut g);
    feed_counting(&mut s, Event::Start, &mut g);
    assert_eq!(g, (1, 0), "runnable");
    feed_counting(
        &mut s,
        Event::Dispatched {
            machine: "m".into(),
        },
        &mut g,
    );
    assert_eq!(g, (0, 1), "running");
    let transient = BuildOutcome::Failed {
        status: Status::Aborted,
        message: "machine lost".into(),
        transient: true,
    };
    feed_counting(&mut s, Event::BuildDone(transient), &mut g);
    assert_eq!(g, (0, 0), "a transient failure leaves the running gauge");
    feed_counting(&mut s, Event::RetryDue, &mut g);
    assert_eq!(g, (1, 0), "runnable again");
    // Abandoned while runnable: it leaves the runnable gauge.
    feed_counting(&mut s, Event::WaiterRemoved(Waiter::Build(1)), &mut g);
    assert_eq!(g, (0, 0));
    assert!(s.is_finished());
}

#[test]
fn a_failed_write_fails_the_step_as_aborted_once() {
    let mut s = step(false, &[]);
    s.on(Event::Start);
    s.on(Event::Dispatched {
        machine: "m".into(),
    });
    let fx = s.on(Event::BuildDone(BuildOutcome::Built(outs(&[(
        "out", "/s/x-b",
    )]))));
    assert!(matches!(fx[0], Effect::RecordSuccess { built: true, .. }));
    // Recording the success failed for good: the step fails instead, and its waiters hear that.
    let fx = s.on(Event::WriteFailed(
        "cannot record the step's success".into(),
    ));
    let failure = Failure::new(Status::Aborted, "cannot record the step's success");
    assert_eq!(
        fx,
        vec![
            Effect::RecordFailure(failure.clone()),
            Effect::NotifyFailed {
                to: vec![Waiter::Build(1)],
                failure: failure.clone(),
            }
        ]
    );
    // Recording the failure failed too: the (dropped) notification is sent again, nothing is
    // recorded again.
    let fx = s.on(Event::WriteFailed("again".into()));
    assert_eq!(
        fx,
        vec![Effect::NotifyFailed {
            to: vec![Waiter::Build(1)],
            failure,
        }]
    );
    assert_eq!(
        s.phase(),
        &Phase::Failed(Failure::new(
            Status::Aborted,
            "cannot record the step's success"
        ))
    );
}

#[test]
fn a_failed_resolution_write_is_no_failure_of_the_drv() {
    let mut s = step(true, &[]);
    assert!(matches!(&s.on(Event::Start)[..], [Effect::Resolve { .. }]));
    let fx = s.on(Event::WriteFailed("cannot record the resolution".into()));
    assert!(matches!(
        &fx[..],
        [Effect::RecordFailure(f), Effect::NotifyFailed { .. }] if f.status == Status::Aborted
    ));
}

// ---- attempts carried over a runner restart

/// A step whose row was busy on `machine` at the restart, made runnable.
fn carried(machine: &str) -> StepMachine {
    let mut s = step(false, &[]).with_carried_attempt(machine);
    assert_eq!(s.on(Event::Start), vec![Effect::MakeRunnable]);
    assert_eq!(s.carried(), Some(machine));
    s
}

fn aborted_carried(fx: &[Effect]) -> bool {
    matches!(
        fx.first(),
        Some(Effect::CloseCarried {
            status: Status::Aborted,
            ..
        })
    )
}

#[test]
fn a_carried_attempt_adopted_by_its_builder_resumes_in_its_row() {
    let mut s = carried("b1");
    assert_eq!(
        s.on(Event::Adopted {
            machine: "b1".into()
        }),
        vec![Effect::ResumeCarried {
            machine: "b1".into()
        }]
    );
    assert_eq!(
        s.phase(),
        &Phase::Building {
            machine: "b1".into()
        }
    );
    assert_eq!(s.carried(), None);
    // the builder's report finishes it like any attempt
    let o = outs(&[("out", "/s/x-b")]);
    assert_eq!(
        s.on(Event::BuildDone(BuildOutcome::Built(o.clone())))[0],
        Effect::RecordSuccess {
            outputs: o,
            built: true
        }
    );
}

#[test]
fn a_carried_attempt_given_to_another_machine_is_closed_aborted_before_a_new_one() {
    let mut s = carried("b1");
    let fx = s.on(Event::Dispatched {
        machine: "b2".into(),
    });
    assert!(aborted_carried(&fx), "{fx:?}");
    assert_eq!(
        fx[1..],
        [Effect::RecordStart {
            machine: "b2".into()
        }]
    );
    assert_eq!(s.carried(), None);
}

#[test]
fn a_carried_attempt_its_builder_starts_afresh_is_closed_aborted() {
    // The builder came back without the build: a fresh dispatch, not an adoption.
    let mut s = carried("b1");
    let fx = s.on(Event::Dispatched {
        machine: "b1".into(),
    });
    assert!(aborted_carried(&fx), "{fx:?}");
    assert_eq!(
        fx[1..],
        [Effect::RecordStart {
            machine: "b1".into()
        }]
    );
    // Another builder holding the drv: a new attempt as well.
    let mut s = carried("b1");
    let fx = s.on(Event::Adopted {
        machine: "b2".into(),
    });
    assert!(aborted_carried(&fx), "{fx:?}");
    assert_eq!(
        fx[1..],
        [Effect::RecordStart {
            machine: "b2".into()
        }]
    );
}

#[test]
fn without_a_carried_attempt_an_adoption_is_a_new_attempt() {
    let mut s = step(false, &[]);
    s.on(Event::Start);
    assert_eq!(
        s.on(Event::Adopted {
            machine: "b1".into()
        }),
        vec![Effect::RecordStart {
            machine: "b1".into()
        }]
    );
}

#[test]
fn a_carried_attempt_nobody_needs_is_closed_cancelled_before_abandoning() {
    let mut s = carried("b1");
    let fx = s.on(Event::WaiterRemoved(Waiter::Build(1)));
    assert_eq!(
        fx,
        vec![
            Effect::CloseCarried {
                status: Status::Cancelled,
                message: "cancelled: no build needs this step".into()
            },
            Effect::Abandon
        ]
    );
    assert_eq!(s.carried(), None);
}

#[test]
fn a_carried_attempt_of_a_step_that_fails_before_running_is_closed_aborted_first() {
    let mut s = carried("b1");
    let fx = s.on(Event::NoMachine("no machine".into()));
    assert!(aborted_carried(&fx), "{fx:?}");
    assert!(
        matches!(fx[1], Effect::RecordFailure(ref f) if f.status == Status::Unsupported),
        "{fx:?}"
    );
    // a write failure too
    let mut s = carried("b1");
    let fx = s.on(Event::WriteFailed("db gone".into()));
    assert!(aborted_carried(&fx), "{fx:?}");
}

#[test]
fn a_carried_attempt_waits_through_inputs_and_resolution() {
    // Waiting and resolving keep the attempt open; resolving to another drv closes it.
    let mut s = StepMachine::new(
        B,
        true,
        wants(&[(A, &["out"])]),
        BTreeMap::new(),
        RetryPolicy::default(),
    )
    .with_carried_attempt("b1");
    s.on(Event::WaiterAdded(Waiter::Build(1)));
    assert_eq!(s.on(Event::Start), vec![]);
    let fx = s.on(Event::InputLanded {
        drv: A.into(),
        outputs: outs(&[("out", "/s/x-a")]),
    });
    assert!(matches!(fx[..], [Effect::Resolve { .. }]), "{fx:?}");
    assert_eq!(s.carried(), Some("b1"));
    let fx = s.on(Event::Resolved(Resolution::Child(R.into())));
    assert!(aborted_carried(&fx), "{fx:?}");
    assert_eq!(fx[1], Effect::AttachChild { resolved: R.into() });
    // resolving to itself keeps it: the step runs as it is and may resume
    let mut s = StepMachine::new(
        B,
        true,
        BTreeMap::new(),
        BTreeMap::new(),
        RetryPolicy::default(),
    )
    .with_carried_attempt("b1");
    s.on(Event::WaiterAdded(Waiter::Build(1)));
    s.on(Event::Start);
    assert_eq!(
        s.on(Event::Resolved(Resolution::Same)),
        vec![Effect::MakeRunnable]
    );
    assert_eq!(
        s.on(Event::Adopted {
            machine: "b1".into()
        }),
        vec![Effect::ResumeCarried {
            machine: "b1".into()
        }]
    );
}

// Dynamic derivations: P produces D (in its output `out.drv`), D produces E (`out.drv`); B uses
// `P^out.drv^out` (depth 1) and `P^out.drv^out.drv^out` (depth 2).
const P: &str = "/s/pppp-p.drv";
const D: &str = "/s/dddd-d.drv";
const E: &str = "/s/eeee-e.drv";

fn need(chain: &[&str], wanted: &[&str]) -> DynamicNeed {
    DynamicNeed {
        input: P.into(),
        chain: chain.iter().map(|c| c.to_string()).collect(),
        wanted: wanted.iter().map(|c| c.to_string()).collect(),
    }
}

fn dynamic_step(needs: Vec<DynamicNeed>) -> StepMachine {
    let mut s = StepMachine::new(
        B,
        true,
        wants(&[(P, &["out.drv"])]),
        BTreeMap::new(),
        RetryPolicy::default(),
    )
    .with_dynamic(needs);
    s.on(Event::WaiterAdded(Waiter::Build(1)));
    s
}

#[test]
fn a_produced_drv_is_attached_and_waited_on_before_resolving() {
    let mut s = dynamic_step(vec![need(&["out.drv"], &["out"])]);
    assert_eq!(s.on(Event::Start), vec![]);
    assert_eq!(
        s.on(Event::InputLanded {
            drv: P.into(),
            outputs: outs(&[("out.drv", D)]),
        }),
        vec![Effect::AttachProduced {
            drv: D.into(),
            by: vec![(P.into(), "out.drv".into())]
        }]
    );
    assert_eq!(s.phase(), &Phase::WaitingForInputs);
    assert_eq!(s.waiting_on().collect::<Vec<_>>(), vec![D]);
    let fx = s.on(Event::InputLanded {
        drv: D.into(),
        outputs: outs(&[("out", "/s/x-d")]),
    });
    let expected: BTreeMap<(String, String), String> = [
        ((D.to_string(), "out".to_string()), "/s/x-d".to_string()),
        ((P.to_string(), "out.drv".to_string()), D.to_string()),
    ]
    .into();
    assert_eq!(fx, vec![Effect::Resolve { inputs: expected }]);
    assert_eq!(s.produced(), [Drv::from(D)]);
}

#[test]
fn depth_two_attaches_each_level_when_the_one_above_lands() {
    let mut s = dynamic_step(vec![
        need(&["out.drv"], &["out.drv"]),
        need(&["out.drv", "out.drv"], &["out"]),
    ]);
    s.on(Event::Start);
    assert_eq!(
        s.on(Event::InputLanded {
            drv: P.into(),
            outputs: outs(&[("out.drv", D)]),
        }),
        vec![Effect::AttachProduced {
            drv: D.into(),
            by: vec![(P.into(), "out.drv".into())]
        }]
    );
    assert_eq!(
        s.on(Event::InputLanded {
            drv: D.into(),
            outputs: outs(&[("out.drv", E)]),
        }),
        vec![Effect::AttachProduced {
            drv: E.into(),
            by: vec![(D.into(), "out.drv".into())]
        }]
    );
    let fx = s.on(Event::InputLanded {
        drv: E.into(),
        outputs: outs(&[("out", "/s/x-e")]),
    });
    assert!(matches!(&fx[..], [Effect::Resolve { inputs }] if inputs.len() == 3));
    assert_eq!(s.produced(), [Drv::from(D), Drv::from(E)]);
}

#[test]
fn two_needs_of_one_produced_drv_attach_it_once() {
    // `P^out.drv^out` and `P^out.drv^dev`, written as two levels that reach the same drv.
    let mut s = dynamic_step(vec![
        need(&["out.drv"], &["out"]),
        need(&["out.drv"], &["dev"]),
    ]);
    s.on(Event::Start);
    assert_eq!(
        s.on(Event::InputLanded {
            drv: P.into(),
            outputs: outs(&[("out.drv", D)]),
        }),
        vec![Effect::AttachProduced {
            drv: D.into(),
            by: vec![(P.into(), "out.drv".into())]
        }]
    );
    // D must land with both outputs.
    let fx = s.on(Event::InputLanded {
        drv: D.into(),
        outputs: outs(&[("out", "/s/x-d")]),
    });
    assert!(
        matches!(&fx[..], [Effect::RecordFailure(f), Effect::NotifyFailed { .. }] if f.message.contains("'dev'"))
    );
}

#[test]
fn a_produced_drv_that_fails_fails_the_step_as_dep_failed() {
    let mut s = dynamic_step(vec![need(&["out.drv"], &["out"])]);
    s.on(Event::Start);
    s.on(Event::InputLanded {
        drv: P.into(),
        outputs: outs(&[("out.drv", D)]),
    });
    let fx = s.on(Event::InputFailed {
        drv: D.into(),
        failure: Failure::new(Status::Failed, "builder failed"),
    });
    assert!(matches!(
        &fx[..],
        [Effect::RecordFailure(_), Effect::NotifyFailed { .. }]
    ));
    assert!(matches!(s.phase(), Phase::Failed(f) if f.status == Status::DepFailed));
}

#[test]
fn an_already_known_produced_drv_output_needs_no_wait() {
    // Restart: P is built and so is D; both realisations are known when the step is made.
    let mut s = StepMachine::new(
        B,
        true,
        BTreeMap::new(),
        [
            ((P.to_string(), "out.drv".to_string()), D.to_string()),
            ((D.to_string(), "out".to_string()), "/s/x-d".to_string()),
        ]
        .into(),
        RetryPolicy::default(),
    )
    .with_dynamic(vec![need(&["out.drv"], &["out"])]);
    s.on(Event::WaiterAdded(Waiter::Build(1)));
    assert!(matches!(&s.on(Event::Start)[..], [Effect::Resolve { .. }]));
}
