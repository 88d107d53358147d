//! The step's I/O: each function performs one [`Cmd`](super::core::Cmd) against the database and
//! the store and returns the reply event. No decisions are made here: what to write, and what a
//! failure means, come from the command and go back to [`StepCore`](super::core::StepCore).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::core::{Found, Held, In, OnError, Row, RowEnd, Wiring, Write, WriteError};
use super::machine::Resolution;
use crate::actors::env::{Env, SchedEvent, Stats, persist};
use crate::actors::types::{Drv, Outputs, Status};
use crate::db::DbError;
use crate::db::types::{BuildId, BusyPhase, FinishStep, NewStep, Realisation};
use crate::store::{Derivation, DrvOutput};

/// Logs a write that failed for good with the step's fields, and words its error.
fn failed(what: &str, drv: &str, row: Option<Row>, build: Option<i64>, e: &DbError) -> String {
    tracing::error!(
        drv,
        build = row.map(|r| r.0).or(build),
        stepnr = row.map(|r| r.1),
        what,
        error = %e,
        "a database write failed for good"
    );
    format!("cannot {what} in the database: {e}")
}

/// Reply of a resolution: the resolution, and the rows its transaction wrote.
type Resolved = Result<(Resolution, Option<(Row, Row)>), WriteError>;

/// A write's error as the core takes it.
fn write_failed<A: Wiring>(error: WriteError, free_slot: bool, detached: bool) -> In<A> {
    In::WriteFailed {
        error,
        free_slot,
        detached,
    }
}

/// [`resolution`], as the reply the core takes.
pub async fn resolve<A: Wiring>(
    env: Arc<Env>,
    drv_path: Drv,
    inputs: BTreeMap<(String, String), String>,
    owner: Option<i64>,
    pending: Option<Row>,
    producers: Vec<(String, String)>,
) -> In<A> {
    match resolution(env, drv_path, inputs, owner, pending, producers).await {
        Ok((resolution, rows)) => In::Resolved { resolution, rows },
        Err(error) => write_failed(error, false, false),
    }
}

/// Resolves `drv_path` with the input realisations: reads it, resolves it, and if it resolves to
/// another drv, writes that drv (with a GC root) and then, in one transaction, the resolved drv's
/// row and ours as Resolved (`pending`, or a new row in `owner`).
async fn resolution(
    env: Arc<Env>,
    drv_path: Drv,
    inputs: BTreeMap<(String, String), String>,
    owner: Option<i64>,
    pending: Option<Row>,
    producers: Vec<(String, String)>,
) -> Resolved {
    let impossible = |m: String| Ok((Resolution::Impossible(m), None));
    let drv = match env.store.read_derivation(&drv_path).await {
        Ok(d) => d,
        Err(e) => return impossible(format!("cannot read {drv_path}: {e}")),
    };
    let sd = env.store.store_dir().clone();
    let resolved = match crate::store::resolve::try_resolve(&drv, &sd, |d, o| {
        inputs.get(&(d.to_string(), o.to_string())).cloned()
    }) {
        Ok(r) => r,
        Err(e) => return impossible(e.to_string()),
    };
    let rpath = match resolved.drv_path(&sd) {
        Ok(p) => sd.print(&p),
        Err(e) => return impossible(e.to_string()),
    };
    if *rpath == *drv_path {
        return Ok((Resolution::Same, None));
    }
    // I/O first: the resolved drv into the store, kept alive by a GC root ...
    let written = match env
        .store
        .add_derivation_rooted(&resolved, "resolved-")
        .await
    {
        Ok(p) => p,
        Err(e) => return impossible(format!("cannot write {rpath}: {e}")),
    };
    let Some(owner) = owner else {
        return Ok((Resolution::Child(written), None));
    };
    #[cfg(feature = "test-hooks")]
    env.crash_point("before-resolve-tx");
    // ... then the database, in one transaction: the resolved row, then ours marked Resolved.
    let mut own_step = NewStep::build(&*drv_path, &drv.system);
    own_step.produced_by = producers;
    let resolved_step = NewStep::build(&written, &drv.system);
    let now = env.now();
    // A step without a row gets it in the same transaction (a row created on its own first would
    // be left pending by a crash before the resolution).
    let rows = match pending {
        Some(r) => persist("resolve step", || {
            env.db
                .resolve_step(BuildId(owner), r.1, &resolved_step, now)
        })
        .await
        .map(|c| (r.1, c)),
        None => {
            persist("resolve step", || {
                env.db
                    .create_and_resolve_step(BuildId(owner), &own_step, &resolved_step, now)
            })
            .await
        }
    };
    // A permanent error is the database's, not the drv's: the step fails as Aborted (not
    // Failed, which would make the drv a cached failure).
    let (own, child) = rows.map_err(|e| WriteError {
        message: failed("record the resolution", &drv_path, pending, Some(owner), &e),
        unclosed: vec![],
    })?;
    #[cfg(feature = "test-hooks")]
    env.crash_point("after-resolve-tx");
    Stats::inc(&env.stats.resolutions);
    env.emit(SchedEvent::StepResolved {
        drv: drv_path.to_string(),
        resolved: written.clone(),
    });
    tracing::info!(drv = %drv_path, resolved = %written, build = owner, "resolved");
    Ok((
        Resolution::Child(written),
        Some(((owner, own), (owner, child))),
    ))
}

/// Whether the resolved drv is readable and already built (the registry is looked at again on
/// the actor's thread by the caller when it is neither).
pub async fn look_for_child<A: Wiring<Drv = Arc<Derivation>>>(
    env: Arc<Env>,
    resolved: String,
) -> In<A> {
    In::Child(match env.store.read_derivation(&resolved).await {
        Err(e) => Found::Unreadable(e.to_string()),
        Ok(d) => match crate::actors::built::built_outputs(&env, &resolved, &d).await {
            Some(outputs) => Found::Built(outputs),
            None => Found::Missing(Arc::new(d)),
        },
    })
}

/// [`start`], as the reply the core takes (a failure leaves the job unsent: its slot is freed).
pub async fn start_row<A: Wiring>(
    env: Arc<Env>,
    drv_path: Drv,
    pending: Option<Row>,
    owner: Option<i64>,
    machine: String,
    system: String,
    producers: Vec<(String, String)>,
) -> In<A> {
    match start(env, drv_path, pending, owner, machine, system, producers).await {
        Ok(row) => In::Started(row),
        Err(error) => write_failed(error, true, false),
    }
}

/// Starts `pending`, or makes a running row in `owner`; `Ok(None)` when the step has neither.
async fn start(
    env: Arc<Env>,
    drv_path: Drv,
    pending: Option<Row>,
    owner: Option<i64>,
    machine: String,
    system: String,
    producers: Vec<(String, String)>,
) -> Result<Option<Row>, WriteError> {
    let now = env.now();
    match (pending, owner) {
        (Some(r), _) => persist("start step", || {
            env.db
                .start_step(BuildId(r.0), r.1, &machine, BusyPhase::Building, now)
        })
        .await
        .map(|_| Some(r))
        .map_err(|e| WriteError {
            message: failed("record the step's start", &drv_path, Some(r), None, &e),
            unclosed: vec![(r, Held::Pending)],
        }),
        (None, Some(o)) => {
            let mut s = NewStep::build(&*drv_path, &system);
            s.busy = BusyPhase::Building;
            s.start_time = Some(now);
            s.machine = machine.clone();
            s.produced_by = producers;
            persist("create step", || env.db.create_step(BuildId(o), &s))
                .await
                .map(|n| Some((o, n)))
                .map_err(|e| WriteError {
                    message: failed("record the step's start", &drv_path, None, Some(o), &e),
                    unclosed: vec![],
                })
        }
        (None, None) => Ok(None),
    }
}

/// Performs the writes in order. With [`OnError::Stop`], the first failure ends it and every row
/// not closed is reported; with [`OnError::Continue`], every write is tried and the first error
/// reported, with the rows that failed. `free_slot` and `detached` are passed back with a failure.
pub async fn write_all<A: Wiring>(
    env: Arc<Env>,
    drv_path: Drv,
    writes: Vec<Write>,
    on_error: OnError,
    free_slot: bool,
    detached: bool,
    producers: Vec<(String, String)>,
) -> In<A> {
    match writes_in_order(env, drv_path, writes, on_error, &producers).await {
        Ok(()) => In::Written,
        Err(error) => write_failed(error, free_slot, detached),
    }
}

/// The writes of a step that stopped, done without it: a failure is counted (and logged by the
/// write), as nothing is left to fail.
pub fn write_detached(
    env: Arc<Env>,
    drv_path: Drv,
    writes: Vec<Write>,
    on_error: OnError,
    producers: Vec<(String, String)>,
) {
    actix::spawn(env.clone().offload(async move {
        let written = writes_in_order(env.clone(), drv_path, writes, on_error, &producers);
        if let Err(e) = written.await {
            tracing::error!(error = %e.message, "a stopped step's writes failed");
            env.stats
                .db_write_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }));
}

async fn writes_in_order(
    env: Arc<Env>,
    drv_path: Drv,
    writes: Vec<Write>,
    on_error: OnError,
    producers: &[(String, String)],
) -> Result<(), WriteError> {
    let mut first: Option<WriteError> = None;
    let mut writes = writes.into_iter();
    while let Some(w) = writes.next() {
        let Err((message, row)) = write_one(&env, &drv_path, &w, producers).await else {
            continue;
        };
        let e = first.get_or_insert(WriteError {
            message,
            unclosed: vec![],
        });
        e.unclosed.extend(row);
        if on_error == OnError::Stop {
            e.unclosed.extend(writes.filter_map(|w| match w {
                Write::Finish(end) => Some((end.row, end.held)),
                _ => None,
            }));
            break;
        }
    }
    first.map_or(Ok(()), Err)
}

/// One write; on failure, its message and the row it did not close.
async fn write_one(
    env: &Arc<Env>,
    drv_path: &Drv,
    w: &Write,
    producers: &[(String, String)],
) -> Result<(), (String, Option<(Row, Held)>)> {
    match w {
        Write::Finish(end) => finish_row(env, end).await.map_err(|e| {
            let what = match end.status {
                Status::Success if end.times_built == 0 => "finish a cached step",
                Status::Success => "record the step's success",
                _ => "finish a step row",
            };
            (
                failed(what, &end.drv, Some(end.row), None, &e),
                Some((end.row, end.held)),
            )
        }),
        Write::Realise { outputs, row } => {
            for (o, p) in outputs {
                let r = Realisation {
                    drv_path: drv_path.to_string(),
                    output_name: o.clone(),
                    out_path: p.clone(),
                    build: row.map(|r| BuildId(r.0)),
                    stepnr: row.map(|r| r.1),
                };
                persist("record realisation", || env.db.insert_realisation(&r))
                    .await
                    .map_err(|e| {
                        (
                            failed("record a realisation", drv_path, *row, None, &e),
                            None,
                        )
                    })?;
            }
            Ok(())
        }
        Write::FailedRow {
            build,
            system,
            failure,
        } => {
            let now = env.now();
            let mut s = NewStep::build(&**drv_path, system);
            s.status = Some(failure.status);
            s.error_msg = Some(failure.message.clone());
            s.start_time = Some(now);
            s.stop_time = Some(now);
            s.produced_by = producers.to_vec();
            persist("create failed step", || {
                env.db.create_step(BuildId(*build), &s)
            })
            .await
            .map(|_| ())
            .map_err(|e| {
                let m = failed(
                    "record the step's failure",
                    drv_path,
                    None,
                    Some(*build),
                    &e,
                );
                (m, None)
            })
        }
        Write::FailedPath => persist("add failed path", || env.db.add_failed_path(drv_path))
            .await
            .map_err(|e| {
                (
                    failed("record the failed path", drv_path, None, None, &e),
                    None,
                )
            }),
    }
}

/// Finishes one row; a success records the drv's realisations with it.
async fn finish_row(env: &Arc<Env>, end: &RowEnd) -> Result<(), DbError> {
    let realisations: Vec<Realisation> = if end.status == Status::Success {
        end.outputs
            .iter()
            .map(|(o, p)| Realisation {
                drv_path: end.drv.to_string(),
                output_name: o.clone(),
                out_path: p.clone(),
                build: Some(BuildId(end.row.0)),
                stepnr: Some(end.row.1),
            })
            .collect()
    } else {
        vec![]
    };
    let f = FinishStep {
        build: BuildId(end.row.0),
        stepnr: end.row.1,
        status: end.status,
        error_msg: end.message.clone(),
        stop_time: env.now(),
        times_built: Some(end.times_built),
        outputs: end
            .outputs
            .iter()
            .map(|(o, p)| (o.clone(), Some(p.clone())))
            .collect(),
        realisations,
        machine: end.machine.clone(),
    };
    let conflicts = persist("finish step", || env.db.finish_step(&f)).await?;
    for c in conflicts {
        tracing::error!(drv = %end.drv, conflict = %c, "realisation disagrees with the recorded one");
    }
    Ok(())
}

/// Records the drv's realisations in the store too (Nix's own realisation table); a failure is
/// logged only (the database holds them).
pub async fn register_in_store(env: Arc<Env>, drv_path: Drv, outputs: Outputs) {
    for (o, p) in outputs {
        if let Err(e) = env
            .store
            .register_realisation(&DrvOutput::new(drv_path.to_string(), o), &p)
            .await
        {
            tracing::error!(drv = %drv_path, error = %e, "cannot register realisation in the store");
        }
    }
}
