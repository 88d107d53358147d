//! The dispatcher actor: [`DispatchCore`] run by the generic [`Driver`]; this file performs its
//! commands (its messages are in [`super::messages`]). Steps announce themselves runnable, machines join and free
//! slots; assignments go to the step, which hands its job to the machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::core::{Cmd, DispatchCore, In};
use super::machine::{Dispatcher, Order};
pub use super::messages::{
    Actix, CriticalPaths, DispatchStatus, GetMachines, GetStatus, JobsetUsage, MachineHolds,
    MachineJoined, MachineLeft, Reserve, Runnable, SetMachineEnabled, SlotFreed, StepLeft,
};
use crate::actors::driver::{Done, Driver, Machine};
use crate::actors::env::{Env, SchedEvent};
use crate::actors::introspect::{ActorCell, ActorKind};
use crate::actors::messages::{Assigned, NoMachine};

/// The dispatcher actor: [`DispatchCore`] on the generic driver.
pub type DispatcherActor = Driver<DispatchCore<Actix>>;

/// What performing needs.
pub struct DispatchIo {
    env: Arc<Env>,
    cell: Arc<ActorCell>,
    start: Instant,
    /// Time spent deciding, per `Runnable`/`SlotFreed` taken (nanoseconds), most recent last.
    decision_ns: Vec<u64>,
}

impl DispatcherActor {
    pub fn new(env: Arc<Env>, unsupported_wait: Duration, order: Order) -> Self {
        let cell = env
            .actors
            .register("dispatcher", ActorKind::Dispatcher, env.now());
        cell.set_state("dispatching");
        let io = DispatchIo {
            env,
            cell,
            start: Instant::now(),
            decision_ns: Vec::new(),
        };
        Driver::with(
            DispatchCore::new(Dispatcher::with_order(unsupported_wait, order)),
            io,
        )
    }
}

impl Machine for DispatchCore<Actix> {
    type In = In<Actix>;
    type Cmd = Cmd<Actix>;
    type Io = DispatchIo;

    fn take(&mut self, ev: In<Actix>) {
        self.on(ev);
    }

    fn next(&mut self) -> Option<Cmd<Actix>> {
        self.poll()
    }

    fn received(io: &mut DispatchIo) {
        io.cell.handled();
    }

    fn start_event() -> Option<In<Actix>> {
        Some(In::Start)
    }

    fn perform(
        io: &mut DispatchIo,
        cmd: Cmd<Actix>,
        ctx: &mut Context<DispatcherActor>,
    ) -> Done<In<Actix>> {
        match cmd {
            Cmd::StartClock => {
                ctx.run_interval(Duration::from_secs(1), |act, ctx| {
                    let now = act.io.start.elapsed().as_millis() as u64;
                    act.feed(In::Tick(now), ctx);
                });
            }
            Cmd::Queued(drv) => io.env.probe.runnable(&drv),
            Cmd::Assign {
                to,
                runner: (runner, abort),
                drv,
                machine,
                held,
            } => match to.assigned.upgrade() {
                Some(step) => {
                    tracing::debug!(drv = %drv, machine = %machine, held, "assigned");
                    io.env.probe.assigned(&drv);
                    step.do_send(Assigned {
                        machine,
                        held,
                        runner,
                        abort,
                    });
                }
                None => return Done::Now(In::StepGone { machine }),
            },
            Cmd::NoMachine { to, drv } => {
                if let Some(step) = to.no_machine.upgrade() {
                    tracing::warn!(drv = %drv, "no machine supports this step");
                    step.do_send(NoMachine(
                        "no machine supports this step's system and required features".into(),
                    ));
                }
            }
            Cmd::Joined(info) => {
                tracing::info!(machine = %info.id, systems = ?info.systems, jobs = info.max_jobs, "machine joined");
                io.env.emit(SchedEvent::MachineJoined { machine: info.id });
            }
            Cmd::Left(machine) => io.env.emit(SchedEvent::MachineLeft { machine }),
        }
        Done::Nothing
    }

    fn stopped(&mut self, io: &mut DispatchIo, _: &mut Context<DispatcherActor>) {
        io.env.actors.unregister(&io.cell);
    }
}

/// Decision time of the events the dispatcher is benchmarked by.
impl Driver<DispatchCore<Actix>> {
    fn timed(&mut self, ev: In<Actix>, ctx: &mut Context<Self>) {
        let t = Instant::now();
        self.feed(ev, ctx);
        crate::metrics::global().dispatcher.decided(t.elapsed());
        if self.io.decision_ns.len() < 1_000_000 {
            self.io.decision_ns.push(t.elapsed().as_nanos() as u64);
        }
    }
}

impl Handler<Runnable> for DispatcherActor {
    type Result = ();
    fn handle(&mut self, msg: Runnable, ctx: &mut Context<Self>) {
        self.io.cell.handled();
        let ev = In::Runnable {
            step: msg.step,
            addr: msg.addr,
        };
        self.timed(ev, ctx);
    }
}

impl Handler<SlotFreed> for DispatcherActor {
    type Result = ();
    fn handle(&mut self, msg: SlotFreed, ctx: &mut Context<Self>) {
        self.io.cell.handled();
        self.timed(In::SlotFreed(msg.0), ctx);
    }
}

impl Handler<SetMachineEnabled> for DispatcherActor {
    type Result = bool;
    fn handle(&mut self, msg: SetMachineEnabled, ctx: &mut Context<Self>) -> bool {
        self.io.cell.handled();
        let known = self.machine.knows(&msg.machine);
        if known {
            tracing::info!(machine = %msg.machine, enabled = msg.enabled, "machine enabled changed by an operator");
        }
        self.feed(
            In::SetEnabled {
                machine: msg.machine,
                enabled: msg.enabled,
            },
            ctx,
        );
        known
    }
}

impl Handler<GetMachines> for DispatcherActor {
    type Result = MessageResult<GetMachines>;
    fn handle(&mut self, _: GetMachines, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.machine.logic().machines())
    }
}

impl Handler<GetStatus> for DispatcherActor {
    type Result = DispatchStatus;
    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> DispatchStatus {
        let logic = self.machine.logic();
        DispatchStatus {
            runnable: logic.runnable(),
            per_system: logic.runnable_per_system(),
            decision_ns: self.io.decision_ns.clone(),
        }
    }
}
