use std::time::Duration;

use super::*;
use crate::actors::dispatcher::Priority;

/// Addresses as names: a step is its drv, a runner its machine.
#[derive(Debug, PartialEq)]
struct Names;

impl Routes for Names {
    type Step = String;
    type Runner = String;
}

fn info(id: &str, jobs: u32) -> MachineInfo {
    MachineInfo {
        id: id.into(),
        systems: ["x86_64-linux".to_string()].into(),
        supported_features: BTreeSet::new(),
        mandatory_features: BTreeSet::new(),
        max_jobs: jobs,
        speed_factor: 1.0,
    }
}

fn runnable(drv: &str, build: i64) -> In<Names> {
    In::Runnable {
        step: RunnableStep {
            drv: drv.into(),
            system: "x86_64-linux".into(),
            features: BTreeSet::new(),
            prefer_local: false,
            priority: Priority {
                global_priority: 0,
                jobset: "js".into(),
                local_priority: 0,
                critical_path_ms: 0,
                build_id: build,
            },
        },
        addr: format!("step {drv}"),
    }
}

fn core() -> DispatchCore<Names> {
    DispatchCore::new(Dispatcher::new(Duration::from_secs(60)))
}

fn drain(c: &mut DispatchCore<Names>) -> Vec<Cmd<Names>> {
    std::iter::from_fn(|| c.poll()).collect()
}

fn assigns(cmds: &[Cmd<Names>]) -> Vec<(&str, &str, &str)> {
    cmds.iter()
        .filter_map(|c| match c {
            Cmd::Assign {
                to, runner, drv, ..
            } => Some((to.as_str(), runner.as_str(), drv.as_str())),
            _ => None,
        })
        .collect()
}

#[test]
fn an_assignment_goes_to_the_steps_address_with_the_machines_runner() {
    let mut c = core();
    c.on(In::MachineJoined {
        info: info("m", 1),
        runner: "runner m".into(),
    });
    assert_eq!(drain(&mut c), vec![Cmd::Joined(info("m", 1))]);
    c.on(runnable("a", 1));
    let cmds = drain(&mut c);
    assert_eq!(cmds[0], Cmd::Queued("a".into()));
    assert_eq!(assigns(&cmds), vec![("step a", "runner m", "a")]);
    assert_eq!(c.logic().runnable(), 0);
}

#[test]
fn a_slot_whose_step_was_gone_goes_to_the_next_step() {
    let mut c = core();
    c.on(In::MachineJoined {
        info: info("m", 1),
        runner: "runner m".into(),
    });
    c.on(runnable("a", 1));
    c.on(runnable("b", 2));
    let cmds = drain(&mut c);
    assert_eq!(assigns(&cmds), vec![("step a", "runner m", "a")]);
    // The actor found step a gone: the slot comes back and b takes it.
    c.on(In::StepGone {
        machine: "m".into(),
    });
    assert_eq!(assigns(&drain(&mut c)), vec![("step b", "runner m", "b")]);
}

#[test]
fn a_step_that_left_the_queue_is_never_assigned() {
    let mut c = core();
    c.on(runnable("a", 1));
    c.on(In::StepLeft("a".into()));
    c.on(In::MachineJoined {
        info: info("m", 1),
        runner: "runner m".into(),
    });
    assert!(assigns(&drain(&mut c)).is_empty());
    assert_eq!(c.logic().runnable(), 0);
}

#[test]
fn a_machine_that_left_gets_nothing_and_its_steps_wait() {
    let mut c = core();
    c.on(In::MachineJoined {
        info: info("m", 1),
        runner: "runner m".into(),
    });
    c.on(In::MachineLeft("m".into()));
    assert!(!c.knows("m"));
    c.on(runnable("a", 1));
    let cmds = drain(&mut c);
    assert!(assigns(&cmds).is_empty());
    assert!(cmds.contains(&Cmd::Left("m".into())));
    assert_eq!(c.logic().runnable(), 1);
}

#[test]
fn disabling_an_unknown_machine_changes_nothing_and_a_known_one_is_drained() {
    let mut c = core();
    c.on(In::SetEnabled {
        machine: "ghost".into(),
        enabled: false,
    });
    c.on(In::MachineJoined {
        info: info("m", 2),
        runner: "runner m".into(),
    });
    c.on(In::SetEnabled {
        machine: "m".into(),
        enabled: false,
    });
    c.on(runnable("a", 1));
    assert!(assigns(&drain(&mut c)).is_empty());
    c.on(In::SetEnabled {
        machine: "m".into(),
        enabled: true,
    });
    assert_eq!(assigns(&drain(&mut c)), vec![("step a", "runner m", "a")]);
}

#[test]
fn a_step_no_machine_supports_is_told_after_the_wait() {
    let mut c = core();
    c.on(In::Start);
    assert_eq!(drain(&mut c), vec![Cmd::StartClock]);
    c.on(In::Tick(0));
    let mut step = runnable("a", 1);
    if let In::Runnable { step, .. } = &mut step {
        step.system = "riscv64-linux".into();
    }
    c.on(step);
    c.on(In::Tick(30_000));
    assert!(
        !drain(&mut c)
            .iter()
            .any(|c| matches!(c, Cmd::NoMachine { .. }))
    );
    c.on(In::Tick(61_000));
    assert_eq!(
        drain(&mut c),
        vec![Cmd::NoMachine {
            to: "step a".into(),
            drv: "a".into()
        }]
    );
}
