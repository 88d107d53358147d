//! The build's logic as a plain state machine: a build waits for its top-level step (or finds its
//! outputs already there) and finishes once, with Hydra's status codes.

use crate::actors::types::{Failure, Outputs, Status};

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Its drv closure is being expanded into steps.
    Expanding,
    /// Waiting for the step of its top-level drv.
    Waiting {
        top: String,
    },
    Finished {
        status: Status,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Expansion found every output of the build's drv already valid (or realised).
    AlreadyBuilt {
        outputs: Outputs,
        /// An output holds `nix-support/failed`: the build failed with output when it ran.
        failed_marker: bool,
    },
    /// Expansion made (or found) the step for the top-level drv; the build waits on it.
    WaitingOn(String),
    /// The top-level step's outputs landed; `failed_marker` when an output holds `nix-support/failed`.
    TopLanded {
        outputs: Outputs,
        failed_marker: bool,
    },
    TopFailed(Failure),
    /// Expansion itself failed (e.g. a malformed or missing drv).
    ExpansionFailed(String),
    Cancel,
    Bump {
        global_priority: i32,
    },
    /// A step row the build records (a cached or propagated failure) could not be written (the
    /// database refused it for good): an unfinished build finishes as Aborted with the message.
    RecordFailed(String),
    /// The build's own finish could not be written: it is tried once more as Aborted, without
    /// outputs (a result the database refuses must not leave the build unfinished).
    FinishFailed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Finish the build row (only if unfinished) with its outputs.
    Finish {
        status: Status,
        outputs: Outputs,
        cached: bool,
        message: Option<String>,
    },
    /// Stop waiting on the top-level step (so unneeded steps are abandoned).
    Release { top: String },
    /// Requeue its runnable steps with the new priority.
    Reprioritise { global_priority: i32 },
}

#[derive(Debug, Clone)]
pub struct BuildMachine {
    pub id: i64,
    phase: Phase,
    /// The finish was retried as Aborted after a write failed: no further try.
    fallback_finish: bool,
}

impl BuildMachine {
    pub fn new(id: i64) -> Self {
        BuildMachine {
            id,
            phase: Phase::Expanding,
            fallback_finish: false,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished { .. })
    }

    pub fn on(&mut self, ev: Event) -> Vec<Effect> {
        if let Event::FinishFailed(message) = ev {
            return self.finish_failed(message);
        }
        if self.is_finished() {
            return vec![];
        }
        match ev {
            // The status it would have had if built now (as Hydra marks a cached build).
            Event::AlreadyBuilt {
                outputs,
                failed_marker,
            } => {
                let status = if failed_marker {
                    Status::FailedWithOutput
                } else {
                    Status::Success
                };
                self.finish(status, outputs, true, None)
            }
            Event::WaitingOn(top) => {
                self.phase = Phase::Waiting { top };
                vec![]
            }
            Event::TopLanded {
                outputs,
                failed_marker,
            } => {
                let status = if failed_marker {
                    Status::FailedWithOutput
                } else {
                    Status::Success
                };
                self.finish(status, outputs, false, None)
            }
            Event::TopFailed(f) => {
                let status = if f.propagated_from.is_some() {
                    Status::DepFailed
                } else {
                    f.status
                };
                self.finish(status, Outputs::new(), false, Some(f.message))
            }
            Event::ExpansionFailed(msg) => {
                self.finish(Status::Failed, Outputs::new(), false, Some(msg))
            }
            Event::Cancel => {
                let mut fx = match &self.phase {
                    Phase::Waiting { top } => vec![Effect::Release { top: top.clone() }],
                    _ => vec![],
                };
                fx.extend(self.finish(Status::Cancelled, Outputs::new(), false, None));
                fx
            }
            Event::Bump { global_priority } => vec![Effect::Reprioritise { global_priority }],
            Event::RecordFailed(message) => {
                let mut fx = match &self.phase {
                    Phase::Waiting { top } => vec![Effect::Release { top: top.clone() }],
                    _ => vec![],
                };
                fx.extend(self.finish(Status::Aborted, Outputs::new(), false, Some(message)));
                fx
            }
            Event::FinishFailed(_) => vec![],
        }
    }

    fn finish_failed(&mut self, message: String) -> Vec<Effect> {
        match &self.phase {
            Phase::Finished { status } if !self.fallback_finish => {
                self.fallback_finish = true;
                let message = format!(
                    "cannot record the build's result ({status:?}): {message}",
                    status = *status
                );
                self.finish(Status::Aborted, Outputs::new(), false, Some(message))
            }
            _ => vec![],
        }
    }

    fn finish(
        &mut self,
        status: Status,
        outputs: Outputs,
        cached: bool,
        message: Option<String>,
    ) -> Vec<Effect> {
        self.phase = Phase::Finished { status };
        vec![Effect::Finish {
            status,
            outputs,
            cached,
            message,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_finishes_the_build_as_aborted_and_a_failed_finish_is_retried_once() {
        // Expanding: finished as Aborted.
        let mut b = BuildMachine::new(3);
        assert!(matches!(
            &b.on(Event::RecordFailed("x".into()))[..],
            [Effect::Finish {
                status: Status::Aborted,
                ..
            }]
        ));
        // Waiting: the top step is released and the build finishes as Aborted.
        let mut b = BuildMachine::new(1);
        b.on(Event::WaitingOn("/s/t.drv".into()));
        let fx = b.on(Event::RecordFailed("cannot record a step".into()));
        assert_eq!(
            fx,
            vec![
                Effect::Release {
                    top: "/s/t.drv".into()
                },
                Effect::Finish {
                    status: Status::Aborted,
                    outputs: Outputs::new(),
                    cached: false,
                    message: Some("cannot record a step".into()),
                }
            ]
        );
        // Finished, a row's failure changes nothing; its finish failing: one more try, as
        // Aborted, then nothing.
        assert_eq!(b.on(Event::RecordFailed("late".into())), vec![]);
        let fx = b.on(Event::FinishFailed("fault".into()));
        assert!(matches!(
            &fx[..],
            [Effect::Finish { status: Status::Aborted, message: Some(m), .. }] if m.contains("fault")
        ));
        assert_eq!(b.on(Event::FinishFailed("again".into())), vec![]);

        // A successful finish that could not be written becomes an Aborted one.
        let mut b = BuildMachine::new(2);
        b.on(Event::WaitingOn("/s/t.drv".into()));
        b.on(Event::TopLanded {
            outputs: outs(),
            failed_marker: false,
        });
        let fx = b.on(Event::FinishFailed("fault".into()));
        assert!(matches!(
            &fx[..],
            [Effect::Finish { status: Status::Aborted, outputs, message: Some(m), .. }]
                if outputs.is_empty() && m.contains("Success") && m.contains("fault")
        ));
    }

    fn outs() -> Outputs {
        [("out".to_string(), "/s/x-a".to_string())].into()
    }

    #[test]
    fn already_built_finishes_as_cached_success() {
        let mut b = BuildMachine::new(1);
        assert_eq!(
            b.on(Event::AlreadyBuilt {
                outputs: outs(),
                failed_marker: false,
            }),
            vec![Effect::Finish {
                status: Status::Success,
                outputs: outs(),
                cached: true,
                message: None
            }]
        );
        assert!(b.is_finished());
        // a finished build is never touched again
        assert_eq!(b.on(Event::Cancel), vec![]);
        assert_eq!(
            b.on(Event::TopFailed(Failure::new(Status::Failed, "x"))),
            vec![]
        );
    }

    #[test]
    fn top_landing_finishes_successfully_or_failed_with_output() {
        let mut b = BuildMachine::new(1);
        assert_eq!(b.on(Event::WaitingOn("/s/t.drv".into())), vec![]);
        assert_eq!(
            b.phase(),
            &Phase::Waiting {
                top: "/s/t.drv".into()
            }
        );
        let fx = b.on(Event::TopLanded {
            outputs: outs(),
            failed_marker: false,
        });
        assert!(matches!(
            &fx[..],
            [Effect::Finish {
                status: Status::Success,
                cached: false,
                ..
            }]
        ));
        let mut b = BuildMachine::new(2);
        b.on(Event::WaitingOn("/s/t.drv".into()));
        let fx = b.on(Event::TopLanded {
            outputs: outs(),
            failed_marker: true,
        });
        assert!(matches!(
            &fx[..],
            [Effect::Finish {
                status: Status::FailedWithOutput,
                ..
            }]
        ));
    }

    #[test]
    fn own_failures_keep_their_status_and_propagated_ones_are_dep_failed() {
        let mut b = BuildMachine::new(1);
        b.on(Event::WaitingOn("/s/t.drv".into()));
        let fx = b.on(Event::TopFailed(Failure::new(
            Status::TimedOut,
            "silent for 10s",
        )));
        assert_eq!(
            fx,
            vec![Effect::Finish {
                status: Status::TimedOut,
                outputs: Outputs::new(),
                cached: false,
                message: Some("silent for 10s".into())
            }]
        );
        let mut b = BuildMachine::new(2);
        b.on(Event::WaitingOn("/s/t.drv".into()));
        let f = Failure::new(Status::Failed, "boom").propagate("/s/dep.drv");
        assert!(matches!(
            &b.on(Event::TopFailed(f))[..],
            [Effect::Finish {
                status: Status::DepFailed,
                ..
            }]
        ));
    }

    #[test]
    fn cancel_releases_the_top_step_and_bump_reprioritises() {
        let mut b = BuildMachine::new(1);
        b.on(Event::WaitingOn("/s/t.drv".into()));
        assert_eq!(
            b.on(Event::Bump {
                global_priority: 10
            }),
            vec![Effect::Reprioritise {
                global_priority: 10
            }]
        );
        let fx = b.on(Event::Cancel);
        assert_eq!(
            fx[0],
            Effect::Release {
                top: "/s/t.drv".into()
            }
        );
        assert!(matches!(
            fx[1],
            Effect::Finish {
                status: Status::Cancelled,
                ..
            }
        ));
    }

    #[test]
    fn expansion_failure_fails_the_build_with_its_message() {
        let mut b = BuildMachine::new(1);
        let fx = b.on(Event::ExpansionFailed("malformed drv at byte 12".into()));
        assert!(
            matches!(&fx[..], [Effect::Finish { status: Status::Failed, message: Some(m), .. }] if m.contains("byte 12"))
        );
    }
}
