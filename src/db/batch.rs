//! PostgreSQL: the hot step writes (a step row created when a build starts, a step finished)
//! of many actors coalesced into one statement per kind. Each is otherwise its own round trip
//! and its own commit — one WAL flush each — and with hundreds of steps finishing a second
//! those are what the runner waits for.
//!
//! One task per [`Db`](super::Db) takes whatever writes are waiting when it is free (no timer:
//! a write that finds the task idle goes alone, at once), runs them as one statement per kind,
//! and answers each. All of a statement is committed or none of it, so a failed statement has
//! written nothing of its writes and each is then done alone by its caller, through the
//! one-write path with its retries and its precise errors; a statement whose reply was lost
//! leaves each caller to check its own write first ([`Outcome::Unknown`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{mpsc, oneshot};

use super::error::DbError;
use super::sql;
use super::timing::TxKind;
use super::types::{BuildId, BusyPhase, FinishStep, NewStep, Realisation, StepNr};
use super::{Db, FaultPoint, Inner};

/// The most writes of one kind in one statement.
const MAX_BATCH: usize = 512;

/// What became of a write handed to the batch.
#[derive(Debug)]
pub(super) enum Outcome<T> {
    /// Written (committed), with its answer.
    Done(T),
    /// Not written: do it alone.
    Alone,
    /// The statement may or may not have been committed (its reply was lost): check, then do
    /// it alone if it was not.
    Unknown,
}

/// Step rows to create together under consecutive new numbers of one build: one step, or a
/// step already `Resolved` and the step it is resolved to (the last). `nr` holds the last
/// number allocated (0 until then), so that a caller whose answer is lost can look for its rows.
struct Create {
    build: BuildId,
    rows: Vec<NewStep>,
    resolves: bool,
    nr: Arc<AtomicI32>,
    reply: oneshot::Sender<Outcome<StepNr>>,
}

/// A step to finish; answered with the realisations of `f` that were not inserted (already
/// recorded): their drv and output.
struct Finish {
    f: FinishStep,
    reply: oneshot::Sender<Outcome<Vec<(String, String)>>>,
}

/// A step that started building.
struct Start {
    build: BuildId,
    stepnr: StepNr,
    busy: BusyPhase,
    machine: String,
    time: i64,
    reply: oneshot::Sender<Outcome<()>>,
}

/// A realisation to record (`Alone` when it was recorded already: the one-write path compares).
struct Realise {
    r: Realisation,
    reply: oneshot::Sender<Outcome<()>>,
}

enum Job {
    Create(Create),
    Finish(Finish),
    Start(Start),
    Realise(Realise),
}

/// The handle in [`Inner`]: the task's queue, started on first use (again if its runtime went).
#[derive(Default)]
pub(super) struct Batcher {
    queue: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    /// Where the task runs ([`Db::run_batches_on`]); else on the runtime of the first writer.
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
}

impl Batcher {
    /// Queues `job`; `None` when there is no runtime to run the task on.
    fn send(&self, inner: &Arc<Inner>, job: Job) -> Option<()> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let job = match q.as_ref() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return Some(()),
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let rt = match self.runtime.get() {
            Some(h) => h.clone(),
            None => tokio::runtime::Handle::try_current().ok()?,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        rt.spawn(run(Arc::downgrade(inner), rx));
        let sent = tx.send(job).ok();
        *q = Some(tx);
        sent
    }

    /// Runs the task on `rt` from now on (the first call wins).
    pub(super) fn run_on(&self, rt: tokio::runtime::Handle) {
        let _ = self.runtime.set(rt);
    }

    /// Sends the job `make` builds around a reply channel and waits for the answer; the task
    /// gone mid-statement (its runtime shut down) is a lost reply.
    async fn ask<T>(
        &self,
        inner: &Arc<Inner>,
        make: impl FnOnce(oneshot::Sender<Outcome<T>>) -> Job,
    ) -> Outcome<T> {
        let (reply, rx) = oneshot::channel();
        if self.send(inner, make(reply)).is_none() {
            return Outcome::Alone;
        }
        rx.await.unwrap_or(Outcome::Unknown)
    }

    /// Creates step rows through the batch (see [`Create`]): answered with the last number;
    /// `Unknown` comes with the last number allocated (0: none, nothing was inserted).
    pub(super) async fn create(
        &self,
        inner: &Arc<Inner>,
        build: BuildId,
        rows: Vec<NewStep>,
        resolves: bool,
    ) -> (Outcome<StepNr>, StepNr) {
        let nr = Arc::new(AtomicI32::new(0));
        let n = nr.clone();
        let out = self
            .ask(inner, |reply| {
                Job::Create(Create {
                    build,
                    rows,
                    resolves,
                    nr: n,
                    reply,
                })
            })
            .await;
        (out, nr.load(Ordering::SeqCst))
    }

    pub(super) async fn finish(
        &self,
        inner: &Arc<Inner>,
        f: &FinishStep,
    ) -> Outcome<Vec<(String, String)>> {
        let f = f.clone();
        self.ask(inner, |reply| Job::Finish(Finish { f, reply }))
            .await
    }

    pub(super) async fn start(
        &self,
        inner: &Arc<Inner>,
        (build, stepnr): (BuildId, StepNr),
        machine: &str,
        busy: BusyPhase,
        time: i64,
    ) -> Outcome<()> {
        let machine = machine.to_string();
        self.ask(inner, |reply| {
            Job::Start(Start {
                build,
                stepnr,
                busy,
                machine,
                time,
                reply,
            })
        })
        .await
    }

    pub(super) async fn realise(&self, inner: &Arc<Inner>, r: &Realisation) -> Outcome<()> {
        let r = r.clone();
        self.ask(inner, |reply| Job::Realise(Realise { r, reply }))
            .await
    }
}

/// The task: waits for a write, takes every other one waiting, runs them (one statement per
/// kind, the kinds at once on separate connections), answers; ends when the database handle
/// is gone.
async fn run(inner: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.recv().await {
        let (mut creates, mut finishes, mut starts, mut realises) =
            (vec![], vec![], vec![], vec![]);
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(job) = next.take() {
            match job {
                Job::Create(j) => creates.push(j),
                Job::Finish(j) => finishes.push(j),
                Job::Start(j) => starts.push(j),
                Job::Realise(j) => realises.push(j),
            }
            taken += 1;
            if taken < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let db = Db { inner };
        tokio::join!(
            create_many(&db, creates),
            finish_many(&db, finishes),
            start_many(&db, starts),
            realise_many(&db, realises),
        );
    }
}

/// Answers every job `Alone`.
fn alone<J, T>(jobs: Vec<J>, reply: impl Fn(J) -> oneshot::Sender<Outcome<T>>) {
    for j in jobs {
        let _ = reply(j).send(Outcome::Alone);
    }
}

/// Runs one batch statement as [`autocommit`](super::ops::autocommit) does, timing it as a
/// write.
async fn statement<T>(
    db: &Db,
    run: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, DbError> {
    let start = std::time::Instant::now();
    let r = super::ops::autocommit(db, run).await;
    db.inner.timings.of(TxKind::Write).observe(start.elapsed());
    r
}

/// An error of a batch statement: the database refusing it (or no connection) wrote nothing;
/// anything else leaves the outcome unknown.
fn outcome_of_error<T>(e: &DbError) -> Outcome<T> {
    match e {
        DbError::CommitOutcomeUnknown(_) => Outcome::Unknown,
        _ => Outcome::Alone,
    }
}

async fn create_many(db: &Db, jobs: Vec<Create>) {
    if jobs.is_empty() {
        return;
    }
    let Some(lanes) = db.batch_lanes(Some(FaultPoint::CreateStepAfterAlloc)) else {
        return alone(jobs, |j| j.reply);
    };
    // How many numbers each build needs.
    let mut want: BTreeMap<i64, i32> = BTreeMap::new();
    for j in &jobs {
        *want.entry(j.build.0).or_default() += j.rows.len() as i32;
    }
    let (ids, counts): (Vec<i64>, Vec<i32>) = want.iter().map(|(b, n)| (*b, *n)).unzip();
    let start = std::time::Instant::now();
    let last: Result<Vec<(i64, i32)>, sqlx::Error> = lanes
        .run(async |c| {
            sqlx::query_as(sql::PG_ALLOC_STEPNRS_MANY)
                .bind(&ids)
                .bind(&counts)
                .fetch_all(&mut *c)
                .await
        })
        .await;
    db.inner.timings.of(TxKind::Write).observe(start.elapsed());
    // Numbers possibly allocated but unknown are gaps, never duplicates.
    let Ok(last) = last else {
        return alone(jobs, |j| j.reply);
    };
    db.count_write();
    // The next free number of each build, handed out in order of arrival.
    let mut next: BTreeMap<i64, i32> = last
        .into_iter()
        .map(|(b, l)| (b, l - want.get(&b).copied().unwrap_or(0) + 1))
        .collect();
    // Builds gone (deleted) are answered alone: their error is the one-write path's.
    let (numbered, gone): (Vec<Create>, Vec<Create>) = jobs
        .into_iter()
        .partition(|j| next.contains_key(&j.build.0));
    alone(gone, |j| j.reply);
    let mut cols = StepColumns::default();
    for j in &numbered {
        let Some(n) = next.get_mut(&j.build.0) else {
            continue;
        };
        let first = *n;
        *n += j.rows.len() as i32;
        let last = *n - 1;
        j.nr.store(last, Ordering::SeqCst);
        for (i, row) in j.rows.iter().enumerate() {
            let nr = first + i as i32;
            // All but the last are resolved to the last.
            let resolved_to = (j.resolves && nr != last).then_some(last);
            cols.push(j.build, nr, row, resolved_to);
        }
    }
    let inserted = statement(
        db,
        lanes.run(async |c| {
            cols.bind(sqlx::query_scalar::<_, i64>(sql::PG_INSERT_STEPS_MANY))
                .fetch_one(&mut *c)
                .await
        }),
    )
    .await;
    for j in numbered {
        let out = match &inserted {
            Ok(_) => Outcome::Done(j.nr.load(Ordering::SeqCst)),
            Err(e) => outcome_of_error(e),
        };
        let _ = j.reply.send(out);
    }
}

/// The columns of many new step rows and their outputs, as the arrays the statement unnests.
#[derive(Default)]
struct StepColumns {
    build: Vec<i64>,
    nr: Vec<i32>,
    step_type: Vec<i32>,
    drv: Vec<String>,
    busy: Vec<i32>,
    status: Vec<Option<i32>>,
    error: Vec<Option<String>>,
    start: Vec<Option<i64>>,
    stop: Vec<Option<i64>>,
    machine: Vec<String>,
    system: Vec<Option<String>>,
    propagated: Vec<Option<i64>>,
    times_built: Vec<Option<i32>>,
    resolved_to: Vec<Option<i32>>,
    out_build: Vec<i64>,
    out_nr: Vec<i32>,
    out_name: Vec<String>,
    out_path: Vec<Option<String>>,
}

impl StepColumns {
    fn push(&mut self, build: BuildId, nr: StepNr, s: &NewStep, resolved_to: Option<StepNr>) {
        self.build.push(build.0);
        self.nr.push(nr);
        self.step_type.push(s.step_type.code());
        self.drv.push(s.drv_path.clone());
        self.busy.push(s.busy.code());
        self.status.push(s.status.map(|st| st.code()));
        self.error.push(s.error_msg.clone());
        self.start.push(s.start_time);
        self.stop.push(s.stop_time);
        self.machine.push(s.machine.clone());
        self.system.push(s.system.clone());
        self.propagated.push(s.propagated_from.map(|b| b.0));
        self.times_built.push(s.times_built);
        self.resolved_to.push(resolved_to);
        let (names, paths) = super::ops::unique_outputs(&s.outputs);
        for (name, path) in names.into_iter().zip(paths) {
            self.out_build.push(build.0);
            self.out_nr.push(nr);
            self.out_name.push(name);
            self.out_path.push(path);
        }
    }

    fn bind<'q, O>(
        &'q self,
        q: sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        q.bind(&self.build)
            .bind(&self.nr)
            .bind(&self.step_type)
            .bind(&self.drv)
            .bind(&self.busy)
            .bind(&self.status)
            .bind(&self.error)
            .bind(&self.start)
            .bind(&self.stop)
            .bind(&self.machine)
            .bind(&self.system)
            .bind(&self.propagated)
            .bind(&self.times_built)
            .bind(&self.resolved_to)
            .bind(&self.out_build)
            .bind(&self.out_nr)
            .bind(&self.out_name)
            .bind(&self.out_path)
    }
}

/// Splits off the jobs whose `key` an earlier job has (answered `Alone`: one write per row in
/// a statement).
fn first_of_each<J, K: std::hash::Hash + Eq, T>(
    jobs: Vec<J>,
    key: impl Fn(&J) -> K,
    reply: impl Fn(J) -> oneshot::Sender<Outcome<T>>,
) -> Vec<J> {
    let mut seen = HashSet::new();
    let (jobs, again): (Vec<J>, Vec<J>) = jobs.into_iter().partition(|j| seen.insert(key(j)));
    alone(again, reply);
    jobs
}

async fn finish_many(db: &Db, jobs: Vec<Finish>) {
    if jobs.is_empty() {
        return;
    }
    let Some(lanes) = db.batch_lanes(Some(FaultPoint::FinishStepAfterStepRow)) else {
        return alone(jobs, |j| j.reply);
    };
    let jobs = first_of_each(jobs, |j| (j.f.build.0, j.f.stepnr), |j| j.reply);
    let mut c = FinishColumns::default();
    for j in &jobs {
        c.push(&j.f);
    }
    type Row = (
        String,
        Option<i64>,
        Option<i32>,
        Option<String>,
        Option<String>,
    );
    let rows: Result<Vec<Row>, DbError> = statement(
        db,
        lanes.run(async |conn| {
            sqlx::query_as(sql::PG_FINISH_STEPS_MANY)
                .bind(&c.build)
                .bind(&c.nr)
                .bind(&c.status)
                .bind(&c.error)
                .bind(&c.stop)
                .bind(&c.times_built)
                .bind(&c.machine)
                .bind(&c.out_build)
                .bind(&c.out_nr)
                .bind(&c.out_name)
                .bind(&c.out_path)
                .bind(&c.r_fbuild)
                .bind(&c.r_fnr)
                .bind(&c.r_drv)
                .bind(&c.r_out)
                .bind(&c.r_path)
                .bind(&c.r_build)
                .bind(&c.r_nr)
                .fetch_all(&mut *conn)
                .await
        }),
    )
    .await;
    let rows = match rows {
        Ok(r) => r,
        Err(e) => {
            for j in jobs {
                let _ = j.reply.send(outcome_of_error(&e));
            }
            return;
        }
    };
    let mut updated = HashSet::new();
    let mut inserted = HashSet::new();
    for (kind, b, n, drv, out) in rows {
        match (kind.as_str(), b, n, drv, out) {
            ("s", Some(b), Some(n), _, _) => {
                updated.insert((b, n));
            }
            ("r", _, _, Some(d), Some(o)) => {
                inserted.insert((d, o));
            }
            _ => {}
        }
    }
    for j in jobs {
        let f = &j.f;
        let out = if updated.contains(&(f.build.0, f.stepnr)) {
            Outcome::Done(
                f.realisations
                    .iter()
                    .map(|r| (r.drv_path.clone(), r.output_name.clone()))
                    .filter(|k| !inserted.contains(k))
                    .collect(),
            )
        } else {
            // Not unfinished (finished, or no such step): the one-write path says which.
            Outcome::Alone
        };
        let _ = j.reply.send(out);
    }
}

/// Starts: idempotent, so a step not updated, or a statement that failed however, is done
/// again alone.
async fn start_many(db: &Db, jobs: Vec<Start>) {
    if jobs.is_empty() {
        return;
    }
    let Some(lanes) = db.batch_lanes(None) else {
        return alone(jobs, |j| j.reply);
    };
    let jobs = first_of_each(jobs, |j| (j.build.0, j.stepnr), |j| j.reply);
    let build: Vec<i64> = jobs.iter().map(|j| j.build.0).collect();
    let nr: Vec<i32> = jobs.iter().map(|j| j.stepnr).collect();
    let busy: Vec<i32> = jobs.iter().map(|j| j.busy.code()).collect();
    let machine: Vec<&str> = jobs.iter().map(|j| j.machine.as_str()).collect();
    let time: Vec<i64> = jobs.iter().map(|j| j.time).collect();
    let updated: Result<Vec<(i64, i32)>, DbError> = statement(
        db,
        lanes.run(async |c| {
            sqlx::query_as(sql::PG_START_STEPS_MANY)
                .bind(&build)
                .bind(&nr)
                .bind(&busy)
                .bind(&machine)
                .bind(&time)
                .fetch_all(&mut *c)
                .await
        }),
    )
    .await;
    let updated: HashSet<(i64, i32)> = updated.unwrap_or_default().into_iter().collect();
    for j in jobs {
        let out = match updated.contains(&(j.build.0, j.stepnr)) {
            true => Outcome::Done(()),
            false => Outcome::Alone,
        };
        let _ = j.reply.send(out);
    }
}

/// Realisations: inserting one is idempotent, so one not inserted, or a statement that failed
/// however, is done again alone (which tells a disagreement from the same one recorded).
async fn realise_many(db: &Db, jobs: Vec<Realise>) {
    if jobs.is_empty() {
        return;
    }
    let Some(lanes) = db.batch_lanes(None) else {
        return alone(jobs, |j| j.reply);
    };
    let drv: Vec<&str> = jobs.iter().map(|j| j.r.drv_path.as_str()).collect();
    let out: Vec<&str> = jobs.iter().map(|j| j.r.output_name.as_str()).collect();
    let path: Vec<&str> = jobs.iter().map(|j| j.r.out_path.as_str()).collect();
    let build: Vec<Option<i64>> = jobs.iter().map(|j| j.r.build.map(|b| b.0)).collect();
    let nr: Vec<Option<i32>> = jobs.iter().map(|j| j.r.stepnr).collect();
    let inserted: Result<Vec<(String, String)>, DbError> = statement(
        db,
        lanes.run(async |c| {
            sqlx::query_as(sql::PG_INSERT_REALISATIONS_MANY)
                .bind(&drv)
                .bind(&out)
                .bind(&path)
                .bind(&build)
                .bind(&nr)
                .fetch_all(&mut *c)
                .await
        }),
    )
    .await;
    let mut inserted: HashSet<(String, String)> =
        inserted.unwrap_or_default().into_iter().collect();
    for j in jobs {
        // Taken out: a second job for the same output was not the one inserted.
        let out = match inserted.remove(&(j.r.drv_path.clone(), j.r.output_name.clone())) {
            true => Outcome::Done(()),
            false => Outcome::Alone,
        };
        let _ = j.reply.send(out);
    }
}

/// The arguments of many finishes, as the arrays the statement unnests.
#[derive(Default)]
struct FinishColumns {
    build: Vec<i64>,
    nr: Vec<i32>,
    status: Vec<i32>,
    error: Vec<Option<String>>,
    stop: Vec<i64>,
    times_built: Vec<Option<i32>>,
    machine: Vec<Option<String>>,
    out_build: Vec<i64>,
    out_nr: Vec<i32>,
    out_name: Vec<String>,
    out_path: Vec<Option<String>>,
    r_fbuild: Vec<i64>,
    r_fnr: Vec<i32>,
    r_drv: Vec<String>,
    r_out: Vec<String>,
    r_path: Vec<String>,
    r_build: Vec<Option<i64>>,
    r_nr: Vec<Option<i32>>,
}

impl FinishColumns {
    fn push(&mut self, f: &FinishStep) {
        self.build.push(f.build.0);
        self.nr.push(f.stepnr);
        self.status.push(f.status.code());
        self.error.push(f.error_msg.clone());
        self.stop.push(f.stop_time);
        self.times_built.push(f.times_built);
        self.machine.push(f.machine.clone());
        let (names, paths) = super::ops::unique_outputs(&f.outputs);
        for (name, path) in names.into_iter().zip(paths) {
            self.out_build.push(f.build.0);
            self.out_nr.push(f.stepnr);
            self.out_name.push(name);
            self.out_path.push(path);
        }
        for r in &f.realisations {
            self.r_fbuild.push(f.build.0);
            self.r_fnr.push(f.stepnr);
            self.r_drv.push(r.drv_path.clone());
            self.r_out.push(r.output_name.clone());
            self.r_path.push(r.out_path.clone());
            self.r_build.push(r.build.map(|b| b.0));
            self.r_nr.push(r.stepnr);
        }
    }
}
