//! The build's complete logic, without a runtime: [`BuildMachine`]'s phases plus what a build
//! decides around them — expanding again when the graph changed while planning, the step rows it
//! records (cached failures met, a failure recorded in another build) before it finishes, the
//! `nix-support/failed` check of its outputs, the finish retried once, and when it is done.
//!
//! As [`StepCore`](crate::actors::step::core::StepCore): events in through [`BuildCore::on`],
//! complete commands out of [`BuildCore::poll`] one at a time; a command doing I/O
//! ([`Cmd::replies`]) gets exactly one event back before the next command is given.

use std::collections::VecDeque;

use super::machine::{BuildMachine, Effect, Event, Phase};
use crate::actors::messages::BuildPrio;
use crate::actors::types::{Failure, FailureOrigin, Outputs, Status};

/// The address of the top step, as the runtime knows it.
pub trait BuildWiring {
    type Step: Clone + std::fmt::Debug;
}

/// What expansion found for the build's top drv.
#[derive(Debug, Clone)]
pub enum Expansion<S> {
    /// The graph changed while planning: expand again.
    Replan,
    Built(Outputs),
    Failed(Failure),
    Step(S),
}

/// A step row the build records.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildRow {
    /// A cached failure met while expanding.
    CachedFailure { drv: String },
    /// A failure another build recorded, as Hydra records it for every build that needed the step.
    Propagated(FailureOrigin),
}

/// The build row's finish.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub status: Status,
    pub outputs: Outputs,
    pub cached: bool,
    pub message: Option<String>,
}

#[derive(Debug)]
pub enum In<W: BuildWiring> {
    Start,
    /// The top step's outputs landed.
    Landed(Outputs),
    /// The top step failed.
    Failed(Failure),
    Cancel,
    Bump(i32),
    // Replies.
    Expanded {
        top: Result<Expansion<W::Step>, String>,
        cached: Vec<String>,
    },
    /// The rows were written, or the first permanent error.
    Written(Result<(), String>),
    MarkerChecked {
        outputs: Outputs,
        failed_marker: bool,
        cached: bool,
    },
    Finished(Result<(), String>),
}

#[derive(Debug)]
pub enum Cmd<W: BuildWiring> {
    /// Expand the closure into steps (`first`: the build starts). Replies `Expanded`.
    Expand { prio: BuildPrio, first: bool },
    /// Record these step rows in the build. Replies `Written`.
    RecordRows(Vec<BuildRow>),
    /// Wait on the top step (as its waiter).
    Wait(W::Step),
    /// Stop waiting on the top step.
    Release(W::Step),
    /// The build's new place in the queue, for the top step and below.
    Reprioritise(W::Step, BuildPrio),
    /// Whether an output holds `nix-support/failed` (`cached`: of outputs valid before the build
    /// started). Replies `MarkerChecked`.
    CheckMarker { outputs: Outputs, cached: bool },
    /// Finish the build row (only if unfinished). Replies `Finished`.
    Finish(Finish),
    /// Nothing more to do: the actor stops.
    Done,
}

impl<W: BuildWiring> Cmd<W> {
    pub fn replies(&self) -> bool {
        matches!(
            self,
            Cmd::Expand { .. } | Cmd::RecordRows(_) | Cmd::CheckMarker { .. } | Cmd::Finish(_)
        )
    }
}

pub struct BuildCore<W: BuildWiring> {
    machine: BuildMachine,
    /// The build's top-level drv.
    drv: String,
    prio: BuildPrio,
    top: Option<W::Step>,
    /// Fed to the machine once the rows being written are (a failure waits for its rows).
    after_rows: Option<Event>,
    ready: VecDeque<Cmd<W>>,
    awaiting: bool,
}

impl<W: BuildWiring> BuildCore<W> {
    pub fn new(id: i64, drv: String, prio: BuildPrio) -> Self {
        BuildCore {
            machine: BuildMachine::new(id),
            drv,
            prio,
            top: None,
            after_rows: None,
            ready: VecDeque::new(),
            awaiting: false,
        }
    }

    /// The build's top-level drv.
    pub fn drv(&self) -> &str {
        &self.drv
    }

    pub fn id(&self) -> i64 {
        self.machine.id
    }

    pub fn phase(&self) -> &Phase {
        self.machine.phase()
    }

    pub fn is_awaiting(&self) -> bool {
        self.awaiting
    }

    pub fn poll(&mut self) -> Option<Cmd<W>> {
        if self.awaiting {
            return None;
        }
        let cmd = self.ready.pop_front()?;
        self.awaiting = cmd.replies();
        Some(cmd)
    }

    pub fn on(&mut self, ev: In<W>) -> &mut Self {
        match ev {
            In::Start => self.ready.push_back(Cmd::Expand {
                prio: self.prio.clone(),
                first: true,
            }),
            In::Expanded { top, cached } => {
                self.awaiting = false;
                self.expanded(top, cached);
            }
            In::Landed(outputs) => self.ready.push_back(Cmd::CheckMarker {
                outputs,
                cached: false,
            }),
            In::MarkerChecked {
                outputs,
                failed_marker,
                cached,
            } => {
                self.awaiting = false;
                self.feed(if cached {
                    Event::AlreadyBuilt {
                        outputs,
                        failed_marker,
                    }
                } else {
                    Event::TopLanded {
                        outputs,
                        failed_marker,
                    }
                });
            }
            In::Failed(failure) => {
                // A failure another build recorded gets a row here saying where, written before
                // the build finishes.
                let origin = failure
                    .origin
                    .as_deref()
                    .filter(|o| o.build != self.id() && !self.machine.is_finished())
                    .cloned();
                match origin {
                    None => self.feed(Event::TopFailed(failure)),
                    Some(o) => {
                        self.ready
                            .push_back(Cmd::RecordRows(vec![BuildRow::Propagated(o)]));
                        self.after_rows = Some(Event::TopFailed(failure));
                    }
                }
            }
            In::Written(res) => {
                self.awaiting = false;
                if let Err(m) = res {
                    self.feed(Event::RecordFailed(m));
                }
                if let Some(ev) = self.after_rows.take() {
                    self.feed(ev);
                }
            }
            In::Cancel => self.feed(Event::Cancel),
            In::Bump(p) => {
                self.prio.global_priority = p;
                self.feed(Event::Bump { global_priority: p });
            }
            In::Finished(res) => {
                self.awaiting = false;
                match res {
                    Ok(()) => self.done(),
                    Err(m) => {
                        // Tried once more as Aborted; past that the row stays unfinished.
                        let before = self.ready.len();
                        self.feed(Event::FinishFailed(m));
                        if self.ready.len() == before {
                            tracing::error!(build = self.id(), "the build's row stays unfinished");
                            self.done();
                        }
                    }
                }
            }
        }
        self
    }

    fn expanded(&mut self, top: Result<Expansion<W::Step>, String>, cached: Vec<String>) {
        let rows = |cached: Vec<String>| -> Vec<BuildRow> {
            cached
                .into_iter()
                .map(|drv| BuildRow::CachedFailure { drv })
                .collect()
        };
        match top {
            Err(m) => {
                self.feed(Event::ExpansionFailed(m));
            }
            Ok(Expansion::Replan) => self.ready.push_back(Cmd::Expand {
                prio: self.prio.clone(),
                first: false,
            }),
            // Built before: the status it would have had if built now (FailedWithOutput when an
            // output holds `nix-support/failed`).
            Ok(Expansion::Built(outputs)) => self.ready.push_back(Cmd::CheckMarker {
                outputs,
                cached: true,
            }),
            Ok(Expansion::Failed(f)) => {
                // The rows first, then the build finishes.
                let rows = rows(cached);
                if rows.is_empty() {
                    self.feed(Event::TopFailed(f));
                } else {
                    self.ready.push_back(Cmd::RecordRows(rows));
                    self.after_rows = Some(Event::TopFailed(f));
                }
            }
            Ok(Expansion::Step(step)) => {
                self.ready.push_back(Cmd::Wait(step.clone()));
                self.top = Some(step);
                let rows = rows(cached);
                if !rows.is_empty() {
                    self.ready.push_back(Cmd::RecordRows(rows));
                }
                // The build waits on its drv's step.
                self.feed(Event::WaitingOn(self.drv.clone()));
            }
        }
    }

    fn feed(&mut self, ev: Event) {
        for effect in self.machine.on(ev) {
            match effect {
                Effect::Finish {
                    status,
                    outputs,
                    cached,
                    message,
                } => self.ready.push_back(Cmd::Finish(Finish {
                    status,
                    outputs,
                    cached,
                    message,
                })),
                Effect::Release { .. } => {
                    if let Some(top) = self.top.take() {
                        self.ready.push_back(Cmd::Release(top));
                    }
                }
                Effect::Reprioritise { .. } => {
                    if let Some(top) = &self.top {
                        self.ready
                            .push_back(Cmd::Reprioritise(top.clone(), self.prio.clone()));
                    }
                }
            }
        }
    }

    fn done(&mut self) {
        self.top = None;
        self.ready.push_back(Cmd::Done);
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
