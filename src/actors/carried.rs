//! Attempts carried over a runner restart: the decisions of restart recovery about the rows it
//! finds busy, and the ledger that hands each carried row to exactly one owner.
//!
//! A row busy on a remote builder when the runner stopped may still be building there: the
//! builder keeps running it and, when it rejoins, lists it as held. Such a row is *carried*: it
//! stays busy, and the step of its drv resumes in it when the builder's held build is adopted (same
//! step number, same start time; the builder's report finishes it). A row busy on an in-process
//! builder (`localhost`, or no machine) really stopped with the runner: it is aborted at once.
//!
//! Exactly one owner closes a carried row: the step of its drv takes it from the [`Carried`] ledger
//! when it is created ([`Carried::claim`]); rows nobody claimed by the end of `[grpc]
//! rejoin_grace_s` are taken by the sweep ([`Carried::drain`]) and closed as Aborted. The ledger
//! holds no state of its own in the database: a runner killed again finds the rows still busy
//! and decides again.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::db::types::{BuildId, Step, StepNr};

/// A step row: (build id, step number).
pub type Row = (i64, StepNr);

/// A row left busy on a remote builder, carried over the restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedRow {
    pub row: Row,
    pub drv: String,
    /// The builder it was running on.
    pub machine: String,
    pub start_time: Option<i64>,
}

/// What restart recovery does with the rows it found busy.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryPlan {
    /// Rows that really stopped: closed as Aborted now.
    pub abort: Vec<(BuildId, StepNr)>,
    /// Rows a remote builder may still be running: left busy for their step to resume.
    pub carry: Vec<CarriedRow>,
}

/// Whether a busy row's machine was an in-process builder (which stopped with the runner).
pub fn is_in_process(machine: &str, local_ids: &[String]) -> bool {
    machine.is_empty() || machine == "localhost" || local_ids.iter().any(|m| m == machine)
}

/// Decides, for each row found busy at restart, whether it is aborted or carried.
///
/// - A row that already has a status is neither (only its busy flag is stale; the abort
///   transaction clears it).
/// - A row on an in-process builder (`local_ids`, `localhost` or no machine) is aborted.
/// - A row on a remote builder is carried, one per drv: a drv runs as one step, so a second
///   busy row of the same drv (left by an earlier crash) is no attempt anyone resumes; the row
///   started last is carried, the others aborted.
pub fn plan(busy: &[Step], local_ids: &[String]) -> RecoveryPlan {
    let mut plan = RecoveryPlan::default();
    let mut by_drv: HashMap<&str, usize> = HashMap::new();
    for s in busy.iter().filter(|s| s.status.is_none()) {
        if is_in_process(&s.machine, local_ids) {
            plan.abort.push((s.build, s.stepnr));
            continue;
        }
        let row = CarriedRow {
            row: (s.build.0, s.stepnr),
            drv: s.drv_path.clone(),
            machine: s.machine.clone(),
            start_time: s.start_time,
        };
        match by_drv.get(s.drv_path.as_str()) {
            None => {
                by_drv.insert(&s.drv_path, plan.carry.len());
                plan.carry.push(row);
            }
            Some(&i) => {
                let key = |r: &CarriedRow| (r.start_time, r.row);
                let old = &mut plan.carry[i];
                let loser = if key(&row) > key(old) {
                    std::mem::replace(old, row)
                } else {
                    row
                };
                plan.abort.push((BuildId(loser.row.0), loser.row.1));
            }
        }
    }
    plan.abort.sort();
    plan
}

/// The carried rows not yet taken, by drv path.
#[derive(Debug, Default)]
pub struct Carried {
    rows: Mutex<HashMap<String, CarriedRow>>,
}

impl Carried {
    /// The ledger of a plan's carried rows.
    pub fn new(rows: impl IntoIterator<Item = CarriedRow>) -> Self {
        Carried {
            rows: Mutex::new(rows.into_iter().map(|r| (r.drv.clone(), r)).collect()),
        }
    }

    /// Adds rows (restart recovery's carried ones).
    pub fn fill(&self, rows: impl IntoIterator<Item = CarriedRow>) {
        self.lock()
            .extend(rows.into_iter().map(|r| (r.drv.clone(), r)));
    }

    /// Takes the carried row of `drv`, if any: the caller now owns it (resumes or closes it).
    pub fn claim(&self, drv: &str) -> Option<CarriedRow> {
        self.lock().remove(drv)
    }

    /// Takes every row nobody claimed (the sweep at the end of the grace).
    pub fn drain(&self) -> Vec<CarriedRow> {
        let mut rows: Vec<CarriedRow> = self.lock().drain().map(|(_, r)| r).collect();
        rows.sort_by_key(|r| r.row);
        rows
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CarriedRow>> {
        // A panic while holding the lock left a map that is still whole (each operation is one
        // map call): keep using it.
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::types::{BuildStatus, BusyPhase, StepType};

    fn busy(build: i64, stepnr: i32, drv: &str, machine: &str, start: i64) -> Step {
        Step {
            build: BuildId(build),
            stepnr,
            step_type: StepType::Build,
            drv_path: drv.into(),
            busy: BusyPhase::Building,
            status: None,
            error_msg: None,
            start_time: Some(start),
            stop_time: None,
            machine: machine.into(),
            system: None,
            propagated_from: None,
            times_built: None,
            resolved_to_step: None,
        }
    }

    #[test]
    fn rows_on_in_process_builders_are_aborted_and_rows_on_remote_ones_carried() {
        let rows = [
            busy(1, 1, "/d/a", "localhost", 10),
            busy(1, 2, "/d/b", "", 10),
            busy(1, 3, "/d/c", "builder-1", 11),
            busy(2, 1, "/d/d", "in-proc", 12),
        ];
        let p = plan(&rows, &["in-proc".to_string()]);
        assert_eq!(
            p.abort,
            vec![(BuildId(1), 1), (BuildId(1), 2), (BuildId(2), 1)]
        );
        assert_eq!(
            p.carry,
            vec![CarriedRow {
                row: (1, 3),
                drv: "/d/c".into(),
                machine: "builder-1".into(),
                start_time: Some(11),
            }]
        );
    }

    #[test]
    fn a_row_with_a_status_is_neither_aborted_nor_carried() {
        let mut done = busy(1, 1, "/d/a", "builder-1", 10);
        done.status = Some(BuildStatus::Success);
        assert_eq!(plan(&[done], &[]), RecoveryPlan::default());
    }

    #[test]
    fn of_two_busy_rows_of_one_drv_the_later_is_carried_and_the_other_aborted() {
        for rows in [
            [busy(1, 4, "/d/a", "b1", 10), busy(2, 1, "/d/a", "b2", 20)],
            [busy(2, 1, "/d/a", "b2", 20), busy(1, 4, "/d/a", "b1", 10)],
        ] {
            let p = plan(&rows, &[]);
            assert_eq!(p.abort, vec![(BuildId(1), 4)]);
            assert_eq!(p.carry.len(), 1);
            assert_eq!(
                (p.carry[0].row, p.carry[0].machine.as_str()),
                ((2, 1), "b2")
            );
        }
    }

    #[test]
    fn each_carried_row_has_exactly_one_taker() {
        let rows = plan(
            &[busy(1, 1, "/d/a", "b", 1), busy(1, 2, "/d/b", "b", 2)],
            &[],
        )
        .carry;
        let ledger = Carried::new(rows);
        assert_eq!(ledger.len(), 2);
        let a = ledger.claim("/d/a").expect("claimed");
        assert_eq!(a.row, (1, 1));
        assert_eq!(ledger.claim("/d/a"), None, "taken once");
        assert_eq!(ledger.claim("/d/x"), None);
        let swept = ledger.drain();
        assert_eq!(swept.iter().map(|r| r.row).collect::<Vec<_>>(), [(1, 2)]);
        assert!(ledger.is_empty());
        assert_eq!(ledger.claim("/d/b"), None, "the sweep took it");
    }
}
