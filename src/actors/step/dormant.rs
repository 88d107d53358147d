//! A step held as plain state ([`Sleeper`]): its core takes events where the sender stands and
//! performs what needs no actor; the first command that needs one (an address of its own, I/O,
//! a timer) wakes it, and so does anything that leaves it holding more than its wait.

use std::sync::Arc;

use super::actor::{is_plain, perform_plain, wind_up};
use super::core::In;
use super::slot::{Sleeper, Slot};
use super::wiring::{Actix, StepActor};
use crate::actors::driver::Machine;
use crate::actors::step::core::StepCore;

impl Sleeper for StepActor {
    type Actor = StepActor;
    type Ev = In<Actix>;

    fn take(&mut self, ev: In<Actix>) -> bool {
        <StepCore<Actix> as Machine>::received(&mut self.io);
        self.machine.on(ev);
        // What the event asks is done all here or all by the actor, so that whoever watches
        // sees it in the order the core gave it (a gauge never runs ahead of its enqueue).
        let mut cmds = Vec::new();
        let mut needs_actor = false;
        while let Some(cmd) = self.machine.poll() {
            needs_actor = !is_plain(&cmd);
            cmds.push(cmd);
            if needs_actor {
                break;
            }
        }
        let wake = if needs_actor {
            for cmd in cmds.into_iter().rev() {
                self.machine.unpoll(cmd);
            }
            true
        } else {
            for cmd in cmds {
                if let Some(cmd) = perform_plain(&mut self.io, cmd) {
                    tracing::error!(drv = %self.io.drv, cmd = ?cmd, "a dormant step was left a command it cannot perform");
                }
            }
            !self.machine.may_sleep()
        };
        self.machine.observe(&mut self.io);
        wake
    }

    fn into_actor(mut self, slot: Arc<Slot<Self>>) -> StepActor {
        self.io.slot = Some(slot);
        self
    }

    fn wind_up(&mut self) {
        wind_up(&mut self.machine, &mut self.io);
    }
}
