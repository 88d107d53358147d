//! A build's own time limits (`builds.maxsilent`, `builds.timeout`) and which build's limits a
//! step runs with when several builds need it.
//!
//! Hydra's rule (`State::doBuildStep`): of the builds that need the step, one whose top-level
//! derivation the step is, else an arbitrary one ("referring builds may have conflicting
//! timeouts"); its `maxSilentTime` and `buildTimeout` go with the job. qr makes the arbitrary
//! choice definite: the oldest build of which the step is the top-level, else the oldest build
//! that needs it (the one its rows belong to). A step with no build takes the runner's
//! `[scheduler]` defaults.

use std::time::Duration;

/// Seconds; 0 is no limit (as in Nix and Hydra).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BuildLimits {
    pub max_silent: u32,
    pub timeout: u32,
}

impl BuildLimits {
    /// From the `builds` row's columns; a negative value (no writer of qr's makes one) is read as
    /// no limit, as Nix reads a non-positive limit.
    pub fn from_row(max_silent: i32, timeout: i32) -> Self {
        BuildLimits {
            max_silent: u32::try_from(max_silent).unwrap_or(0),
            timeout: u32::try_from(timeout).unwrap_or(0),
        }
    }

    pub fn max_silent(&self) -> Duration {
        Duration::from_secs(self.max_silent.into())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout.into())
    }
}

/// What the choice needs to know of a build that needs the step.
pub trait Needing {
    /// The build's top-level derivation.
    fn top(&self) -> &str;
    fn limits(&self) -> BuildLimits;
}

/// The limits the step of `drv` runs with, given the builds needing it sorted by build id (oldest
/// first): the oldest build of which `drv` is the top-level, else the oldest; `None` without
/// builds.
pub fn choose<B: Needing>(drv: &str, builds: &[B]) -> Option<BuildLimits> {
    builds
        .iter()
        .find(|b| b.top() == drv)
        .or(builds.first())
        .map(Needing::limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct B(&'static str, u32, u32);

    impl Needing for B {
        fn top(&self) -> &str {
            self.0
        }
        fn limits(&self) -> BuildLimits {
            BuildLimits {
                max_silent: self.1,
                timeout: self.2,
            }
        }
    }

    fn lim(max_silent: u32, timeout: u32) -> Option<BuildLimits> {
        Some(BuildLimits {
            max_silent,
            timeout,
        })
    }

    #[test]
    fn the_build_whose_top_level_it_is_wins_else_the_oldest() {
        // Oldest first, as the step keeps them.
        let builds = [
            B("/s/a.drv", 100, 1000),
            B("/s/dep.drv", 1, 2),
            B("/s/b.drv", 300, 3000),
            B("/s/dep.drv", 5, 6),
        ];
        // The dependency's own (oldest) build, though older builds need it too.
        assert_eq!(choose("/s/dep.drv", &builds), lim(1, 2));
        // A step that is no build's top-level: the oldest build's.
        assert_eq!(choose("/s/lib.drv", &builds), lim(100, 1000));
        assert_eq!(choose("/s/b.drv", &builds), lim(300, 3000));
        assert_eq!(choose("/s/b.drv", &builds[3..]), lim(5, 6));
        assert_eq!(choose::<B>("/s/a.drv", &[]), None);
    }

    #[test]
    fn row_values_are_seconds_and_negative_ones_no_limit() {
        let l = BuildLimits::from_row(7200, 0);
        assert_eq!(l.max_silent(), Duration::from_secs(7200));
        assert_eq!(l.timeout(), Duration::ZERO);
        assert_eq!(BuildLimits::from_row(-1, i32::MAX).max_silent, 0);
        assert_eq!(BuildLimits::from_row(-1, i32::MAX).timeout, i32::MAX as u32);
    }
}
