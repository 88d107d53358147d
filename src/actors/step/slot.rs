//! A step as the graph holds it: plain state while it only waits for its inputs (dormant), an
//! actor from the moment it has something to do (live).
//!
//! Most steps of a large queue spend their life waiting, and receive nothing but their builds,
//! their waiters and, once per input, that the input landed. An actix actor costs a tokio task,
//! a context and a mailbox before it holds anything of its own; a dormant step costs its state.
//!
//! - [`Holder`] is the strong reference dependents and builds share ([`StepRef`]): while one
//!   lives, the step does. Once the step is live, the holder keeps its actor's `Addr`.
//! - [`Slot`] is the step's identity: what the registry and the step's waiters hold weakly, and
//!   the actor holds strongly while it runs (so a waiter reaches a live step even after its holder
//!   went, as a weak actix address did).
//! - A message to a dormant step is taken by its state in one synchronous step ([`Sleeper::take`]),
//!   on the sender's thread; when the state says it must act, the actor is started from it and
//!   takes over. Messages to dormant steps queue on the thread ([`post`]) rather than recursing,
//!   and while that queue drains every message to any step goes through it, so what one sender
//!   sends one step arrives in the order sent, as in one actix mailbox.
//!
//! [`StepRef`]: super::wiring::StepRef

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use actix::WeakAddr;
use actix::prelude::*;

/// What a step is while dormant: its state without the actor.
pub trait Sleeper: Send + Sized + 'static {
    type Actor: Actor<Context = Context<Self::Actor>> + Handler<Deliver<Self::Ev>>;
    type Ev: Send + 'static;
    /// Takes one event as plain state: `true` when the step must become an actor now (what it
    /// has to do next needs one; it is left for the actor to do).
    fn take(&mut self, ev: Self::Ev) -> bool;
    /// The actor, made from the state; it holds `slot` (what its waiters reach it by) while it
    /// runs.
    fn into_actor(self, slot: Arc<Slot<Self>>) -> Self::Actor;
    /// The step is dropped while dormant: nothing needs it any more.
    fn wind_up(&mut self);
}

/// An event handed to a live step by the queue of dormant deliveries.
pub struct Deliver<E>(pub E);

impl<E: 'static> Message for Deliver<E> {
    type Result = ();
}

enum State<S: Sleeper> {
    Dormant(Box<S>),
    /// Being started as an actor (never seen outside [`Slot::take`]).
    Waking,
    Live(WeakAddr<S::Actor>),
    /// Its actor stopped: messages are dropped, and it cannot be taken up again.
    Stopped,
}

struct Inner<S: Sleeper> {
    state: State<S>,
    holder: Weak<Holder<S>>,
}

/// The step's identity (see the module's documentation).
pub struct Slot<S: Sleeper> {
    inner: Mutex<Inner<S>>,
}

/// The strong reference a step's dependents and builds share.
pub struct Holder<S: Sleeper> {
    slot: Arc<Slot<S>>,
    /// The actor's address, once it is live: the holder keeps it running.
    addr: OnceLock<Addr<S::Actor>>,
}

impl<S: Sleeper> std::fmt::Debug for Holder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.addr.get().is_some() {
            "Step(live)"
        } else {
            "Step(dormant)"
        })
    }
}

thread_local! {
    /// Deliveries to dormant steps (and, while they drain, to every step), in order.
    static QUEUE: RefCell<VecDeque<Job>> = const { RefCell::new(VecDeque::new()) };
    static DRAINING: Cell<bool> = const { Cell::new(false) };
}

/// Resets the draining flag however the drain ends (a panicking step included).
struct Draining;

impl Drop for Draining {
    fn drop(&mut self) {
        DRAINING.with(|d| d.set(false));
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Queues `f` and, unless a drain is under way on this thread (it will run `f` in turn), drains.
/// Off the actors' thread (where no actor can be started) it is handed to the actors' system.
fn post(f: Job) {
    let Some(f) = elsewhere(f) else {
        return;
    };
    QUEUE.with(|q| q.borrow_mut().push_back(f));
    if DRAINING.with(|d| d.replace(true)) {
        return;
    }
    let _reset = Draining;
    while let Some(f) = QUEUE.with(|q| q.borrow_mut().pop_front()) {
        f();
    }
}

/// Hands `f` to the actors' system when this thread has none (no actor can be started here) and
/// gives back `None`; gives `f` back to be run here on the actors' thread, or when there is no
/// system to take it (plain unit tests, a system that is stopping).
fn elsewhere(f: Job) -> Option<Job> {
    if draining() || actix_rt::Arbiter::try_current().is_some() {
        return Some(f);
    }
    let Some(system) = actix_rt::System::try_current() else {
        return Some(f);
    };
    let cell = Arc::new(Mutex::new(Some(f)));
    let taken = cell.clone();
    let handed = system.arbiter().spawn_fn(move || {
        let f = taken.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = f {
            post(f);
        }
    });
    if handed {
        return None;
    }
    tracing::warn!("the actors' system is stopping: a step delivery runs where it was sent");
    cell.lock().unwrap_or_else(|e| e.into_inner()).take()
}

fn draining() -> bool {
    DRAINING.with(|d| d.get())
}

impl<S: Sleeper> Slot<S> {
    /// A dormant step and the first holder of it.
    pub fn dormant(state: S) -> Arc<Holder<S>> {
        let slot = Arc::new(Slot {
            inner: Mutex::new(Inner {
                state: State::Dormant(Box::new(state)),
                holder: Weak::new(),
            }),
        });
        let holder = Arc::new(Holder {
            slot: slot.clone(),
            addr: OnceLock::new(),
        });
        slot.lock().holder = Arc::downgrade(&holder);
        holder
    }

    fn lock(&self) -> MutexGuard<'_, Inner<S>> {
        // Every change is one assignment: a panic elsewhere leaves nothing half-done.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `msg`: straight to a live step's mailbox when no dormant delivery is under way on
    /// this thread, else in turn behind them.
    pub fn send<M>(self: &Arc<Self>, msg: M)
    where
        M: Message<Result = ()> + Send + 'static,
        S::Actor: Handler<M>,
        S::Ev: From<M>,
    {
        if !draining() {
            match &self.lock().state {
                State::Live(addr) => {
                    if let Some(a) = addr.upgrade() {
                        a.do_send(msg);
                    }
                    return;
                }
                State::Stopped => return,
                State::Dormant(_) | State::Waking => {}
            }
        }
        self.post(S::Ev::from(msg));
    }

    /// Hands the step one event, in turn with every delivery queued on this thread.
    pub fn post(self: &Arc<Self>, ev: S::Ev) {
        let slot = self.clone();
        post(Box::new(move || slot.take(ev)));
    }

    fn take(self: &Arc<Self>, ev: S::Ev) {
        let mut inner = self.lock();
        let wake = match &mut inner.state {
            State::Live(addr) => {
                if let Some(a) = addr.upgrade() {
                    a.do_send(Deliver(ev));
                }
                return;
            }
            State::Stopped => return,
            State::Waking => {
                tracing::error!("an event reached a step while it was being started: dropped");
                return;
            }
            State::Dormant(state) => state.take(ev),
        };
        // A step no holder needs any more is not started: it winds up as it is dropped.
        let Some(holder) = inner.holder.upgrade().filter(|_| wake) else {
            return;
        };
        let State::Dormant(state) = std::mem::replace(&mut inner.state, State::Waking) else {
            return;
        };
        // Starting only schedules the actor: nothing of it runs before this returns.
        let addr = state.into_actor(self.clone()).start();
        inner.state = State::Live(addr.downgrade());
        if holder.addr.set(addr).is_err() {
            tracing::error!("a dormant step's holder already had an actor");
        }
    }

    /// Its actor stopped (called by the actor as it stops).
    pub fn stopped(&self) {
        self.lock().state = State::Stopped;
    }

    /// Whether the step is needed (a holder lives) or its actor still runs.
    pub fn alive(&self) -> bool {
        let inner = self.lock();
        if inner.holder.strong_count() > 0 {
            return true;
        }
        matches!(&inner.state, State::Live(a) if a.upgrade().is_some())
    }

    /// Whether it is dormant.
    pub fn is_dormant(&self) -> bool {
        matches!(self.lock().state, State::Dormant(_))
    }

    /// A holder of the step: the one its dependents share, or a new one for a live actor whose
    /// holders all went (it is needed again before it stopped).
    pub fn holder(self: &Arc<Self>) -> Option<Arc<Holder<S>>> {
        let mut inner = self.lock();
        if let Some(h) = inner.holder.upgrade() {
            return Some(h);
        }
        let State::Live(addr) = &inner.state else {
            return None;
        };
        let addr = addr.upgrade()?;
        let holder = Arc::new(Holder {
            slot: self.clone(),
            addr: OnceLock::from(addr),
        });
        inner.holder = Arc::downgrade(&holder);
        Some(holder)
    }
}

impl<S: Sleeper> Drop for Slot<S> {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        if let State::Dormant(state) = std::mem::replace(&mut inner.state, State::Stopped) {
            // Dropping its state drops the last holders of its inputs in turn: queued, so a long
            // chain unwinds in a loop rather than by recursion.
            post(Box::new(move || {
                let mut state = state;
                state.wind_up();
            }));
        }
    }
}

impl<S: Sleeper> Holder<S> {
    /// The step's identity (what its waiters hold weakly).
    pub fn slot(&self) -> &Arc<Slot<S>> {
        &self.slot
    }

    /// Sends `msg` to the step (see [`Slot::send`]).
    pub fn send<M>(&self, msg: M)
    where
        M: Message<Result = ()> + Send + 'static,
        S::Actor: Handler<M>,
        S::Ev: From<M>,
    {
        self.slot.send(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts to a threshold, then wakes; its actor reports what it is given.
    struct Counter {
        seen: Vec<u32>,
        wake_at: u32,
        log: Arc<Mutex<Vec<String>>>,
    }

    struct CounterActor {
        log: Arc<Mutex<Vec<String>>>,
        _slot: Arc<Slot<Counter>>,
    }

    impl Actor for CounterActor {
        type Context = Context<Self>;
    }

    struct Num(u32);
    impl Message for Num {
        type Result = ();
    }
    impl From<Num> for u32 {
        fn from(n: Num) -> u32 {
            n.0
        }
    }
    impl Handler<Num> for CounterActor {
        type Result = ();
        fn handle(&mut self, n: Num, _: &mut Context<Self>) {
            self.log.lock().unwrap().push(format!("actor {}", n.0));
        }
    }
    impl Handler<Deliver<u32>> for CounterActor {
        type Result = ();
        fn handle(&mut self, n: Deliver<u32>, _: &mut Context<Self>) {
            self.log.lock().unwrap().push(format!("actor {}", n.0));
        }
    }

    impl Sleeper for Counter {
        type Actor = CounterActor;
        type Ev = u32;
        fn take(&mut self, ev: u32) -> bool {
            self.seen.push(ev);
            self.log.lock().unwrap().push(format!("dormant {ev}"));
            ev >= self.wake_at
        }
        fn into_actor(self, slot: Arc<Slot<Self>>) -> CounterActor {
            CounterActor {
                log: self.log,
                _slot: slot,
            }
        }
        fn wind_up(&mut self) {
            self.log.lock().unwrap().push("wound up".into());
        }
    }

    fn counter(wake_at: u32) -> (Arc<Holder<Counter>>, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let h = Slot::dormant(Counter {
            seen: vec![],
            wake_at,
            log: log.clone(),
        });
        (h, log)
    }

    #[actix::test]
    async fn a_dormant_step_takes_events_in_place_until_it_must_act_then_its_actor_takes_over() {
        let (h, log) = counter(2);
        h.send(Num(1));
        assert!(h.slot().is_dormant());
        h.send(Num(2));
        assert!(
            !h.slot().is_dormant(),
            "the event that needed an actor started one"
        );
        h.send(Num(3));
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(
            *log.lock().unwrap(),
            ["dormant 1", "dormant 2", "actor 3"],
            "the actor takes what comes after it started"
        );
        assert!(h.slot().alive());
    }

    #[actix::test]
    async fn a_dormant_step_nobody_holds_winds_up_and_its_slot_is_not_alive() {
        let (h, log) = counter(10);
        let slot = Arc::downgrade(h.slot());
        h.send(Num(1));
        drop(h);
        assert!(slot.upgrade().is_none());
        assert_eq!(*log.lock().unwrap(), ["dormant 1", "wound up"]);
    }

    #[actix::test]
    async fn a_live_step_whose_holders_went_can_be_held_again_while_its_actor_runs() {
        let (h, _log) = counter(1);
        h.send(Num(1));
        let slot = h.slot().clone();
        drop(h);
        // The actor holds its slot and has not stopped yet (it has not been polled).
        let again = slot.holder().expect("a running actor can be held again");
        assert!(
            again.addr.get().is_some(),
            "the new holder keeps the actor running"
        );
        slot.stopped();
        drop(again);
        assert!(
            slot.holder().is_none(),
            "a stopped actor is not taken up again"
        );
        assert!(!slot.alive());
    }

    #[actix::test]
    async fn deliveries_queued_while_draining_keep_their_order_per_step() {
        let (a, log) = counter(100);
        let a2 = a.clone();
        let log2 = log.clone();
        // A delivery that sends two more while it is drained: they run after it, in order.
        post(Box::new(move || {
            a2.send(Num(7));
            a2.send(Num(8));
            log2.lock().unwrap().push("first".into());
        }));
        assert_eq!(*log.lock().unwrap(), ["first", "dormant 7", "dormant 8"]);
        assert!(!draining(), "the drain ended");
        drop(a);
    }
}
