use super::*;

fn set(xs: &[&str]) -> BTreeSet<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

fn machine(id: &str, systems: &[&str], jobs: u32, speed: f64) -> MachineInfo {
    MachineInfo {
        id: id.into(),
        systems: set(systems),
        supported_features: set(&[]),
        mandatory_features: set(&[]),
        max_jobs: jobs,
        speed_factor: speed,
    }
}

fn step(
    drv: &str,
    system: &str,
    global: i32,
    jobset: &str,
    local: i32,
    build: i64,
) -> RunnableStep {
    RunnableStep {
        drv: drv.into(),
        system: system.into(),
        features: set(&[]),
        prefer_local: false,
        priority: Priority {
            global_priority: global,
            jobset: jobset.into(),
            local_priority: local,
            critical_path_ms: 0,
            build_id: build,
        },
    }
}

/// The assignments of holders (adoptions): (drv, machine).
fn adopted(fx: &[Effect]) -> Vec<(String, String)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Assign {
                drv,
                machine,
                held: true,
            } => Some((drv.clone(), machine.clone())),
            _ => None,
        })
        .collect()
}

fn assigned(fx: &[Effect]) -> Vec<(String, String)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Assign { drv, machine, .. } => Some((drv.clone(), machine.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn orders_by_global_then_local_priority_then_lowest_build_id() {
    let mut d = Dispatcher::new(Duration::from_secs(60));
    for s in [
        step("low-global", "x86_64-linux", 0, "js", 100, 1),
        step("high-local-late", "x86_64-linux", 5, "js", 10, 9),
        step("high-local-early", "x86_64-linux", 5, "js", 10, 3),
        step("high-global-low-local", "x86_64-linux", 5, "js", 0, 1),
    ] {
        assert_eq!(d.on(Event::Runnable(s)), vec![]);
    }
    assert_eq!(d.runnable(), 4);
    let fx = d.on(Event::MachineJoined(machine(
        "m",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    assert_eq!(assigned(&fx), vec![("high-local-early".into(), "m".into())]);
    let order: Vec<String> = (0..3)
        .flat_map(|_| assigned(&d.on(Event::SlotFreed("m".into()))))
        .map(|a| a.0)
        .collect();
    assert_eq!(
        order,
        vec!["high-local-late", "high-global-low-local", "low-global"]
    );
    assert_eq!(d.runnable(), 0);
}

#[test]
fn jobset_with_less_share_use_goes_first_at_equal_global_priority() {
    let mut d = Dispatcher::new(Duration::from_secs(60));
    d.on(Event::JobsetShares {
        jobset: "big".into(),
        shares: 100,
    });
    d.on(Event::JobsetUsed {
        jobset: "big".into(),
        seconds: 1000.0,
    }); // 10 s per share
    d.on(Event::JobsetUsed {
        jobset: "small".into(),
        seconds: 50.0,
    }); // 50 s per share
    d.on(Event::Runnable(step(
        "small-step",
        "x86_64-linux",
        0,
        "small",
        50,
        1,
    )));
    d.on(Event::Runnable(step(
        "big-step",
        "x86_64-linux",
        0,
        "big",
        0,
        2,
    )));
    let fx = d.on(Event::MachineJoined(machine(
        "m",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    assert_eq!(assigned(&fx), vec![("big-step".into(), "m".into())]);
}

#[test]
fn machines_get_steps_of_their_system_only_and_fill_free_slots() {
    let mut d = Dispatcher::new(Duration::from_secs(60));
    d.on(Event::MachineJoined(machine(
        "arm",
        &["aarch64-linux"],
        2,
        1.0,
    )));
    d.on(Event::MachineJoined(machine(
        "x86",
        &["x86_64-linux"],
        2,
        1.0,
    )));
    let mut all = vec![];
    for (i, sys) in [
        "x86_64-linux",
        "aarch64-linux",
        "x86_64-linux",
        "x86_64-linux",
    ]
    .iter()
    .enumerate()
    {
        all.extend(assigned(&d.on(Event::Runnable(step(
            &format!("s{i}"),
            sys,
            0,
            "js",
            0,
            i as i64,
        )))));
    }
    assert_eq!(
        all,
        vec![
            ("s0".into(), "x86".into()),
            ("s1".into(), "arm".into()),
            ("s2".into(), "x86".into())
        ]
    );
    assert_eq!(d.runnable(), 1, "x86 is full, s3 waits");
    assert_eq!(d.running_on("x86"), Some(2));
    assert_eq!(
        assigned(&d.on(Event::SlotFreed("x86".into()))),
        vec![("s3".into(), "x86".into())]
    );
}

#[test]
fn faster_machines_are_preferred() {
    let mut d = Dispatcher::new(Duration::from_secs(60));
    d.on(Event::MachineJoined(machine(
        "slow",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    d.on(Event::MachineJoined(machine(
        "fast",
        &["x86_64-linux"],
        1,
        4.0,
    )));
    let fx = d.on(Event::Runnable(step("s", "x86_64-linux", 0, "js", 0, 1)));
    assert_eq!(assigned(&fx), vec![("s".into(), "fast".into())]);
}

#[test]
fn features_supported_and_mandatory() {
    let mut d = Dispatcher::new(Duration::from_secs(60));
    let mut kvm = machine("kvm", &["x86_64-linux"], 4, 1.0);
    kvm.supported_features = set(&["kvm"]);
    let mut bench = machine("bench", &["x86_64-linux"], 4, 1.0);
    bench.mandatory_features = set(&["benchmark"]);
    d.on(Event::MachineJoined(kvm));
    d.on(Event::MachineJoined(bench));
    let mut needs_kvm = step("vm-test", "x86_64-linux", 0, "js", 0, 1);
    needs_kvm.features = set(&["kvm"]);
    let mut bench_step = step("perf", "x86_64-linux", 0, "js", 0, 2);
    bench_step.features = set(&["benchmark"]);
    let plain = step("plain", "x86_64-linux", 0, "js", 0, 3);
    assert_eq!(
        assigned(&d.on(Event::Runnable(needs_kvm))),
        vec![("vm-test".into(), "kvm".into())]
    );
    assert_eq!(
        assigned(&d.on(Event::Runnable(bench_step))),
        vec![("perf".into(), "bench".into())]
    );
    // the bench machine only takes steps that require its mandatory feature
    assert_eq!(
        assigned(&d.on(Event::Runnable(plain))),
        vec![("plain".into(), "kvm".into())]
    );
}

#[test]
fn supports_is_hydras_supports_step_with_local_met_by_prefer_local() {
    let mut local = machine("localhost", &["x86_64-linux"], 1, 1.0);
    local.mandatory_features = set(&["local"]);
    local.supported_features = set(&["kvm"]);
    let x86 = "x86_64-linux";
    // `local` mandatory: only steps that prefer a local build (or require `local`)
    assert!(!local.supports(x86, &set(&[]), false));
    assert!(local.supports(x86, &set(&[]), true));
    assert!(local.supports(x86, &set(&["local"]), false));
    assert!(local.supports("builtin", &set(&[]), true));
    // still its systems and features only
    assert!(!local.supports("aarch64-linux", &set(&[]), true));
    assert!(local.supports(x86, &set(&["kvm"]), true));
    assert!(!local.supports(x86, &set(&["big-parallel"]), true));
    // other mandatory features are not met by preferring a local build
    let mut bench = machine("bench", &["x86_64-linux"], 1, 1.0);
    bench.mandatory_features = set(&["benchmark", "local"]);
    assert!(!bench.supports(x86, &set(&[]), true));
    assert!(bench.supports(x86, &set(&["benchmark"]), true));
    assert!(!bench.supports(x86, &set(&["benchmark"]), false));
    // a machine without mandatory features takes both
    let plain = machine("plain", &["x86_64-linux"], 1, 1.0);
    assert!(plain.supports(x86, &set(&[]), true));
    assert!(plain.supports(x86, &set(&[]), false));
    // can_build ignores mandatory features
    assert!(local.can_build(x86, &set(&["kvm"])));
    assert!(local.can_build(x86, &set(&["local"])));
    assert!(!local.can_build(x86, &set(&["big-parallel"])));
}

#[test]
fn can_build_locally_is_nixs_can_build_locally_over_the_runners_own_builders() {
    let x86 = "x86_64-linux";
    let mut local = machine("localhost", &["x86_64-linux"], 2, 1.0);
    local.supported_features = set(&["kvm"]);
    local.mandatory_features = set(&["local"]);
    let builders = [local.clone()];
    assert!(can_build_locally(&builders, x86, &set(&[])));
    assert!(can_build_locally(&builders, x86, &set(&["kvm"])));
    assert!(can_build_locally(&builders, "builtin", &set(&[])));
    assert!(!can_build_locally(&builders, "aarch64-linux", &set(&[])));
    assert!(!can_build_locally(&builders, x86, &set(&["big-parallel"])));
    // no local builder at all (`[local_builder] enabled = false`)
    assert!(!can_build_locally(&[], x86, &set(&[])));
    // no slot: only builtins (Nix's `max-jobs = 0`)
    local.max_jobs = 0;
    assert!(!can_build_locally(&[local.clone()], x86, &set(&[])));
    assert!(can_build_locally(&[local], "builtin", &set(&[])));
}

#[test]
fn a_local_mandatory_machine_takes_only_prefer_local_steps_and_others_take_them_too() {
    let mut d = Dispatcher::new(Duration::from_secs(60));
    let mut local = machine("localhost", &["x86_64-linux"], 2, 2.0);
    local.mandatory_features = set(&["local"]);
    d.on(Event::MachineJoined(local));
    d.on(Event::MachineJoined(machine(
        "remote",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    let prefer = |drv: &str, b: i64| RunnableStep {
        prefer_local: true,
        ..step(drv, "x86_64-linux", 0, "js", 0, b)
    };
    // The plain steps go to the remote machine only, though localhost is faster and free.
    assert_eq!(
        assigned(&d.on(Event::Runnable(step(
            "plain1",
            "x86_64-linux",
            0,
            "js",
            0,
            1
        )))),
        vec![("plain1".into(), "remote".into())]
    );
    assert_eq!(
        assigned(&d.on(Event::Runnable(step(
            "plain2",
            "x86_64-linux",
            0,
            "js",
            0,
            2
        )))),
        vec![]
    );
    // Preferring a local build: localhost takes them (the faster machine first) ...
    assert_eq!(
        assigned(&d.on(Event::Runnable(prefer("writeText1", 3)))),
        vec![("writeText1".into(), "localhost".into())]
    );
    assert_eq!(
        assigned(&d.on(Event::Runnable(prefer("writeText2", 4)))),
        vec![("writeText2".into(), "localhost".into())]
    );
    // ... and when localhost is full, the next free machine (Hydra does not keep them for it).
    assert_eq!(
        assigned(&d.on(Event::Runnable(prefer("writeText3", 5)))),
        vec![]
    );
    let fx = d.on(Event::SlotFreed("remote".into()));
    // plain2 (build 2) ranks before writeText3 (build 5); both fit the remote machine.
    assert_eq!(assigned(&fx), vec![("plain2".into(), "remote".into())]);
    let fx = d.on(Event::SlotFreed("remote".into()));
    assert_eq!(assigned(&fx), vec![("writeText3".into(), "remote".into())]);
}

#[test]
fn a_step_only_a_local_mandatory_machine_could_take_waits_unsupported() {
    let mut d = Dispatcher::new(Duration::from_secs(10));
    let mut local = machine("localhost", &["x86_64-linux"], 1, 1.0);
    local.mandatory_features = set(&["local"]);
    d.on(Event::MachineJoined(local));
    d.on(Event::Tick(1_000));
    assert_eq!(
        d.on(Event::Runnable(step(
            "plain",
            "x86_64-linux",
            0,
            "js",
            0,
            1
        ))),
        vec![]
    );
    let fx = d.on(Event::Runnable(RunnableStep {
        prefer_local: true,
        ..step("cheap", "x86_64-linux", 0, "js", 0, 2)
    }));
    assert_eq!(assigned(&fx), vec![("cheap".into(), "localhost".into())]);
    assert_eq!(
        d.on(Event::Tick(11_000)),
        vec![Effect::Unsupported {
            drv: "plain".into()
        }]
    );
}

#[test]
fn unsupported_steps_fail_after_the_wait_unless_a_machine_joins() {
    let mut d = Dispatcher::new(Duration::from_secs(60));
    d.on(Event::MachineJoined(machine(
        "x86",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    d.on(Event::Tick(1_000));
    d.on(Event::Runnable(step(
        "riscv",
        "riscv64-linux",
        0,
        "js",
        0,
        1,
    )));
    d.on(Event::Runnable(step("arm", "aarch64-linux", 0, "js", 0, 2)));
    assert_eq!(d.on(Event::Tick(30_000)), vec![]);
    // an arm machine joins and takes its step: only riscv times out
    assert_eq!(
        assigned(&d.on(Event::MachineJoined(machine(
            "arm",
            &["aarch64-linux"],
            1,
            1.0
        )))),
        vec![("arm".into(), "arm".into())]
    );
    assert_eq!(
        d.on(Event::Tick(61_000)),
        vec![Effect::Unsupported {
            drv: "riscv".into()
        }]
    );
    assert_eq!(d.runnable(), 0);
}

#[test]
fn a_machine_leaving_makes_its_steps_unsupported_again() {
    let mut d = Dispatcher::new(Duration::from_secs(10));
    d.on(Event::MachineJoined(machine(
        "arm",
        &["aarch64-linux"],
        0,
        1.0,
    )));
    d.on(Event::Runnable(step("a", "aarch64-linux", 0, "js", 0, 1)));
    assert_eq!(
        d.on(Event::Tick(20_000)),
        vec![],
        "supported (though the machine has no slots)"
    );
    d.on(Event::MachineLeft("arm".into()));
    assert_eq!(d.on(Event::Tick(25_000)), vec![]);
    assert_eq!(
        d.on(Event::Tick(30_000)),
        vec![Effect::Unsupported { drv: "a".into() }]
    );
}

#[test]
fn removed_and_requeued_steps() {
    let mut d = Dispatcher::new(Duration::from_secs(60));
    d.on(Event::Runnable(step("a", "x86_64-linux", 0, "js", 0, 1)));
    d.on(Event::Runnable(step("b", "x86_64-linux", 0, "js", 0, 2)));
    d.on(Event::Removed("a".into()));
    // requeueing with a bumped priority replaces the old entry
    d.on(Event::Runnable(step("b", "x86_64-linux", 9, "js", 0, 2)));
    assert_eq!(d.runnable(), 1);
    assert_eq!(d.runnable_per_system().get("x86_64-linux"), Some(&1));
    let fx = d.on(Event::MachineJoined(machine(
        "m",
        &["x86_64-linux"],
        5,
        1.0,
    )));
    assert_eq!(assigned(&fx), vec![("b".into(), "m".into())]);
}

#[test]
fn a_held_build_is_adopted_by_its_holder_whatever_its_slots() {
    let mut d = Dispatcher::new(Duration::from_secs(60));
    d.on(Event::MachineJoined(machine(
        "fast",
        &["x86_64-linux"],
        4,
        10.0,
    )));
    d.on(Event::MachineJoined(machine(
        "b",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    // b is busy, then says it still holds "held"
    assert_eq!(
        assigned(&d.on(Event::Runnable(step(
            "other",
            "x86_64-linux",
            0,
            "js",
            0,
            1
        ))))
        .len(),
        1
    );
    d.on(Event::MachineJoined(machine(
        "b",
        &["x86_64-linux"],
        0,
        1.0,
    )));
    d.on(Event::Holds {
        machine: "b".into(),
        drvs: set(&["held"]),
    });
    let fx = d.on(Event::Runnable(step("held", "x86_64-linux", 0, "js", 0, 2)));
    assert_eq!(assigned(&fx), vec![("held".into(), "b".into())]);
    assert_eq!(adopted(&fx), vec![("held".into(), "b".into())], "{fx:?}");
    assert_eq!(d.running_on("b"), Some(1));
    // a held drv that is already queued is taken when the holder says so
    let mut d = Dispatcher::new(Duration::from_secs(60));
    d.on(Event::Runnable(step("q", "x86_64-linux", 0, "js", 0, 1)));
    d.on(Event::Holds {
        machine: "b".into(),
        drvs: set(&["q"]),
    });
    let fx = d.on(Event::MachineJoined(machine(
        "b",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    assert_eq!(assigned(&fx), vec![("q".into(), "b".into())]);
    assert_eq!(adopted(&fx), vec![("q".into(), "b".into())], "{fx:?}");
    assert_eq!(d.runnable(), 0);
}

#[test]
fn a_reserved_step_waits_for_its_machine_then_goes_to_anyone() {
    let mut d = Dispatcher::new(Duration::from_secs(60));
    d.on(Event::MachineJoined(machine(
        "other",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    d.on(Event::Reserve {
        drv: "r".into(),
        machine: "gone".into(),
        wait_ms: 5_000,
    });
    // runnable, but kept for "gone" although "other" is free
    assert_eq!(
        d.on(Event::Runnable(step("r", "x86_64-linux", 0, "js", 0, 1))),
        vec![]
    );
    assert_eq!(d.runnable(), 1);
    // "gone" rejoins holding it: adopted
    d.on(Event::Holds {
        machine: "gone".into(),
        drvs: set(&["r"]),
    });
    let fx = d.on(Event::MachineJoined(machine(
        "gone",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    assert_eq!(adopted(&fx), vec![("r".into(), "gone".into())], "{fx:?}");

    // rejoins without it: released at once
    let mut d = Dispatcher::new(Duration::from_secs(60));
    d.on(Event::MachineJoined(machine(
        "other",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    d.on(Event::Reserve {
        drv: "r".into(),
        machine: "gone".into(),
        wait_ms: 5_000,
    });
    d.on(Event::Runnable(step("r", "x86_64-linux", 0, "js", 0, 1)));
    let fx = d.on(Event::MachineJoined(machine(
        "gone",
        &["x86_64-linux"],
        0,
        2.0,
    )));
    assert_eq!(assigned(&fx), vec![("r".into(), "other".into())]);
    assert_eq!(adopted(&fx), vec![], "a fresh start, not an adoption");

    // never rejoins: released when the wait is over
    let mut d2 = Dispatcher::new(Duration::from_secs(60));
    d2.on(Event::Reserve {
        drv: "r".into(),
        machine: "gone".into(),
        wait_ms: 5_000,
    });
    d2.on(Event::MachineJoined(machine(
        "other",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    assert_eq!(
        d2.on(Event::Runnable(step("r", "x86_64-linux", 0, "js", 0, 1))),
        vec![]
    );
    assert_eq!(assigned(&d2.on(Event::Tick(4_000))), vec![]);
    let fx = d2.on(Event::Tick(5_000));
    assert_eq!(assigned(&fx), vec![("r".into(), "other".into())]);
    assert_eq!(adopted(&fx), vec![]);

    // rejoined without it before the step was runnable: not kept for it
    let mut d3 = Dispatcher::new(Duration::from_secs(60));
    d3.on(Event::Reserve {
        drv: "r".into(),
        machine: "gone".into(),
        wait_ms: 5_000,
    });
    d3.on(Event::MachineJoined(machine(
        "gone",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    let fx = d3.on(Event::Runnable(step("r", "x86_64-linux", 0, "js", 0, 1)));
    assert_eq!(assigned(&fx), vec![("r".into(), "gone".into())]);
    assert_eq!(adopted(&fx), vec![], "a fresh start: it does not hold it");
}

#[test]
fn holds_of_a_machine_that_left_are_forgotten() {
    let mut d = Dispatcher::new(Duration::from_secs(60));
    d.on(Event::MachineJoined(machine(
        "a",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    d.on(Event::MachineJoined(machine(
        "b",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    d.on(Event::Holds {
        machine: "a".into(),
        drvs: set(&["h"]),
    });
    d.on(Event::MachineLeft("a".into()));
    let fx = d.on(Event::Runnable(step("h", "x86_64-linux", 0, "js", 0, 1)));
    assert_eq!(assigned(&fx), vec![("h".into(), "b".into())]);
}

#[test]
fn a_disabled_machine_gets_no_new_jobs_until_enabled_even_across_a_rejoin() {
    let mut d = Dispatcher::new(Duration::from_secs(60));
    d.on(Event::MachineJoined(machine(
        "m",
        &["x86_64-linux"],
        2,
        1.0,
    )));
    let fx = d.on(Event::SetEnabled {
        machine: "m".into(),
        enabled: false,
    });
    assert!(fx.is_empty());
    assert!(assigned(&d.on(Event::Runnable(step("a", "x86_64-linux", 0, "js", 0, 1)))).is_empty());
    d.on(Event::MachineLeft("m".into()));
    assert!(
        assigned(&d.on(Event::MachineJoined(machine(
            "m",
            &["x86_64-linux"],
            2,
            1.0
        ))))
        .is_empty()
    );
    assert!(!d.machines()[0].enabled);
    let fx = d.on(Event::SetEnabled {
        machine: "m".into(),
        enabled: true,
    });
    assert_eq!(assigned(&fx), vec![("a".to_string(), "m".to_string())]);
    assert_eq!(d.machines()[0].running, 1);
}

fn with_cp(mut s: RunnableStep, ms: u64) -> RunnableStep {
    s.priority.critical_path_ms = ms;
    s
}

/// Assignments one slot at a time, after `steps` are queued with no machine.
fn one_by_one(mut d: Dispatcher, steps: Vec<RunnableStep>) -> Vec<String> {
    let n = steps.len();
    for s in steps {
        assert_eq!(d.on(Event::Runnable(s)), vec![]);
    }
    let mut order: Vec<String> = assigned(&d.on(Event::MachineJoined(machine(
        "m",
        &["x86_64-linux"],
        1,
        1.0,
    ))))
    .into_iter()
    .map(|a| a.0)
    .collect();
    for _ in 1..n {
        order.extend(
            assigned(&d.on(Event::SlotFreed("m".into())))
                .into_iter()
                .map(|a| a.0),
        );
    }
    order
}

#[test]
fn a_longer_critical_path_goes_first_at_equal_priority_and_shares() {
    let steps = vec![
        with_cp(step("short-old", "x86_64-linux", 0, "js", 0, 1), 10),
        with_cp(step("long-new", "x86_64-linux", 0, "js", 0, 9), 5_000),
        with_cp(step("mid", "x86_64-linux", 0, "js", 0, 5), 100),
        // Equal critical paths: the lower build id.
        with_cp(step("mid-older", "x86_64-linux", 0, "js", 0, 4), 100),
    ];
    let d = Dispatcher::new(Duration::from_secs(60));
    assert_eq!(d.order(), Order::CriticalPath);
    assert_eq!(
        one_by_one(d, steps.clone()),
        vec!["long-new", "mid-older", "mid", "short-old"]
    );
    // Build-id order ignores the critical path.
    let d = Dispatcher::with_order(Duration::from_secs(60), Order::BuildId);
    assert_eq!(
        one_by_one(d, steps),
        vec!["short-old", "mid-older", "mid", "long-new"]
    );
}

#[test]
fn global_priority_and_shares_still_win_over_the_critical_path() {
    let d = Dispatcher::new(Duration::from_secs(60));
    let order = one_by_one(
        d,
        vec![
            with_cp(step("long-low", "x86_64-linux", 0, "js", 0, 1), 1_000_000),
            with_cp(step("short-high", "x86_64-linux", 5, "js", 0, 2), 1),
        ],
    );
    assert_eq!(order, vec!["short-high", "long-low"]);

    let mut d = Dispatcher::new(Duration::from_secs(60));
    d.on(Event::JobsetUsed {
        jobset: "busy".into(),
        seconds: 1000.0,
    });
    let order = one_by_one(
        d,
        vec![
            with_cp(
                step("long-busy", "x86_64-linux", 0, "busy", 0, 1),
                1_000_000,
            ),
            with_cp(step("short-idle", "x86_64-linux", 0, "idle", 0, 2), 1),
        ],
    );
    assert_eq!(order, vec!["short-idle", "long-busy"]);
}

#[test]
fn a_queued_step_moves_when_its_critical_path_changes() {
    let mut d = Dispatcher::new(Duration::from_secs(60));
    d.on(Event::Runnable(with_cp(
        step("a", "x86_64-linux", 0, "js", 0, 1),
        50,
    )));
    d.on(Event::Runnable(with_cp(
        step("b", "x86_64-linux", 0, "js", 0, 2),
        10,
    )));
    // A new build needs b through a long chain; unknown steps are ignored.
    assert_eq!(
        d.on(Event::CriticalPaths(vec![
            ("b".into(), 900),
            ("gone".into(), 1)
        ])),
        vec![]
    );
    assert_eq!(d.runnable(), 2);
    let fx = d.on(Event::MachineJoined(machine(
        "m",
        &["x86_64-linux"],
        1,
        1.0,
    )));
    assert_eq!(assigned(&fx), vec![("b".into(), "m".into())]);
    assert_eq!(
        assigned(&d.on(Event::SlotFreed("m".into()))),
        vec![("a".into(), "m".into())]
    );
}
