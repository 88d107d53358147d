//! The one generic driver that runs a state machine under actix.
//!
//! A machine takes events ([`Machine::take`]) and hands out commands one at a time
//! ([`Machine::next`]); the runtime half ([`Machine::perform`]) performs each command and says
//! whether it produced an event at once, later (I/O, during which the mailbox waits, so effects
//! stay in order), or not at all. Every decision is the machine's: the driver only moves events in
//! and commands out.

use std::future::Future;
use std::pin::Pin;

use actix::prelude::*;

/// What performing a command produced.
pub enum Done<E> {
    /// Nothing to feed back.
    Nothing,
    /// An event, now.
    Now(E),
    /// An event, when this future resolves; nothing else runs in the actor meanwhile.
    Later(Pin<Box<dyn Future<Output = E>>>),
}

/// A state machine and its runtime half.
pub trait Machine: Sized + Unpin + 'static {
    type In: 'static;
    type Cmd;
    /// What performing needs: addresses, the environment, the introspection cell.
    type Io: Unpin + 'static;

    /// Takes one event.
    fn take(&mut self, ev: Self::In);
    /// The next command, if one may be performed now.
    fn next(&mut self) -> Option<Self::Cmd>;
    /// A message arrived (before it is taken as an event).
    fn received(_io: &mut Self::Io) {}
    /// Performs one command.
    fn perform(
        io: &mut Self::Io,
        cmd: Self::Cmd,
        ctx: &mut Context<Driver<Self>>,
    ) -> Done<Self::In>;
    /// Called after every event has been taken and its commands performed (e.g. to refresh
    /// introspection).
    fn observe(&self, _io: &mut Self::Io) {}
    /// The event fed when the actor starts (`None`: it starts by performing what its machine
    /// holds).
    fn start_event() -> Option<Self::In> {
        None
    }
    /// The supervisor restarts the actor (its state is kept; [`Machine::start_event`] follows).
    fn restarting(&mut self, _io: &mut Self::Io) {}
    /// The actor stopped: what must outlive it (performed by the runtime half, detached).
    fn stopped(&mut self, _io: &mut Self::Io, _ctx: &mut Context<Driver<Self>>) {}
}

/// An actor running the machine `M`.
pub struct Driver<M: Machine> {
    pub machine: M,
    pub io: M::Io,
}

impl<M: Machine> Driver<M> {
    pub fn with(machine: M, io: M::Io) -> Self {
        Driver { machine, io }
    }

    /// Feeds one event and performs what it leads to.
    pub fn feed(&mut self, ev: M::In, ctx: &mut Context<Self>) {
        self.machine.take(ev);
        self.drain(ctx);
    }

    /// Runs a decision that answers its caller (a query with a result), then performs what it
    /// led to.
    pub fn decide<T>(&mut self, ctx: &mut Context<Self>, f: impl FnOnce(&mut M) -> T) -> T {
        M::received(&mut self.io);
        let out = f(&mut self.machine);
        self.drain(ctx);
        out
    }

    fn drain(&mut self, ctx: &mut Context<Self>) {
        while let Some(cmd) = self.machine.next() {
            match M::perform(&mut self.io, cmd, ctx) {
                Done::Nothing => {}
                Done::Now(ev) => self.machine.take(ev),
                Done::Later(fut) => {
                    ctx.wait(fut.into_actor(self).map(|ev, act, ctx| act.feed(ev, ctx)));
                    break;
                }
            }
        }
        self.machine.observe(&mut self.io);
    }
}

impl<M: Machine> Actor for Driver<M> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        match M::start_event() {
            Some(ev) => self.feed(ev, ctx),
            // A machine made from state that already took events (a dormant step waking) may
            // hold commands for the actor: they are its first work.
            None => self.drain(ctx),
        }
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        self.machine.stopped(&mut self.io, ctx);
    }
}

/// A supervised driver keeps its machine over a restart and tells it.
impl<M: Machine> actix::Supervised for Driver<M> {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.machine.restarting(&mut self.io);
    }
}

/// Every message a machine's events can be made from is handled the same way: taken as that
/// event.
impl<M, X> Handler<X> for Driver<M>
where
    M: Machine,
    X: Message<Result = ()> + 'static,
    M::In: From<X>,
{
    type Result = ();

    fn handle(&mut self, msg: X, ctx: &mut Context<Self>) {
        M::received(&mut self.io);
        self.feed(msg.into(), ctx);
    }
}
