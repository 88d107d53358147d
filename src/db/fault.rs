//! Fault injection inside the write paths production runs, so tests can prove the writes are
//! all-or-nothing: between the statements of a transaction, and before a one-statement write
//! (or, in the PostgreSQL batch, before a write's numbers are allocated) where nothing of it is
//! committed yet. Compiled only with the `test-hooks` feature (and in unit tests);
//! without it [`Faults::check`] is a constant `Ok` the compiler removes, and nothing can be armed.

#[cfg(any(test, feature = "test-hooks"))]
use std::sync::Mutex;
#[cfg(any(test, feature = "test-hooks"))]
use std::sync::atomic::{AtomicBool, Ordering};

use super::error::DbError;

/// A place inside a write where an armed fault makes it fail (and roll back). On PostgreSQL the
/// step writes are one statement each (after their step numbers, which commit on their own):
/// the first three points fire there before the numbers and the statement, with nothing of the
/// write committed, as a failure between the statements of the transaction leaves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// `resolve_step`: after the resolved step row is inserted, before the original is updated.
    ResolveAfterInsert,
    /// `finish_step`: after the step row is updated, before its outputs and realisations.
    FinishStepAfterStepRow,
    /// `create_step`: after the step number is allocated, before the row is inserted.
    CreateStepAfterAlloc,
    /// `finish_build`: after the build row is updated, before its outputs.
    FinishBuildAfterBuildRow,
    /// `create_step` of a produced drv's row (dynamic derivations): after the row is inserted,
    /// before its `producedsteps` links.
    LinkProducedAfterRow,
    /// Any write transaction: the connection is "lost" instead of sending `COMMIT` (nothing is
    /// committed), and the operation sees `CommitOutcomeUnknown`.
    CommitLostBefore,
    /// Any write transaction: it commits, then the reply is "lost" and the operation sees
    /// `CommitOutcomeUnknown`.
    CommitLostAfter,
}

/// Without the `test-hooks` feature: nothing is ever armed.
#[cfg(not(any(test, feature = "test-hooks")))]
#[derive(Debug, Default)]
pub(crate) struct Faults {
    _none: (),
}

#[cfg(not(any(test, feature = "test-hooks")))]
impl Faults {
    #[inline(always)]
    pub(crate) fn check(&self, _point: FaultPoint) -> Result<(), DbError> {
        Ok(())
    }
}

/// The armed fault points of one `Db`. Each fires once, then disarms.
#[cfg(any(test, feature = "test-hooks"))]
#[derive(Debug, Default)]
pub(crate) struct Faults {
    any: AtomicBool,
    armed: Mutex<Vec<FaultPoint>>,
}

#[cfg(any(test, feature = "test-hooks"))]
impl Faults {
    pub(crate) fn arm(&self, point: FaultPoint) {
        let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        armed.push(point);
        self.any.store(true, Ordering::SeqCst);
    }

    pub(crate) fn disarm_all(&self) {
        let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        armed.clear();
        self.any.store(false, Ordering::SeqCst);
    }

    /// `Err(FaultInjected)` if `point` is armed (and disarms it).
    pub(crate) fn check(&self, point: FaultPoint) -> Result<(), DbError> {
        if !self.any.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = armed.iter().position(|p| *p == point) {
            armed.remove(i);
            if armed.is_empty() {
                self.any.store(false, Ordering::SeqCst);
            }
            return Err(DbError::FaultInjected(point));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once() {
        let f = Faults::default();
        assert!(f.check(FaultPoint::ResolveAfterInsert).is_ok());
        f.arm(FaultPoint::ResolveAfterInsert);
        assert!(f.check(FaultPoint::FinishStepAfterStepRow).is_ok());
        assert!(matches!(
            f.check(FaultPoint::ResolveAfterInsert),
            Err(DbError::FaultInjected(FaultPoint::ResolveAfterInsert))
        ));
        assert!(f.check(FaultPoint::ResolveAfterInsert).is_ok());
        f.arm(FaultPoint::CreateStepAfterAlloc);
        f.disarm_all();
        assert!(f.check(FaultPoint::CreateStepAfterAlloc).is_ok());
    }
}
