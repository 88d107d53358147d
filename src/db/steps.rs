//! The step writes, each a [`Write`]: creating step rows (one, or one already Resolved with the
//! step it is resolved to), starting, finishing and resolving a step, its busy phase, recording
//! a realisation, and closing rows left busy at a restart. On SQLite each is one transaction; on
//! PostgreSQL the hot ones are one statement (after the step numbers they need, which commit on
//! their own: a number lost to a failure later is a gap, never a duplicate), the same statement
//! the batch runs for many ([`Batched`]).

use std::collections::{BTreeMap, HashSet};

use super::Db;
use super::batch::{Batched, Batcher, Outcome, Pending, Queue, statement};
use super::error::DbError;
use super::exec::{Exec, Param, Tx};
use super::fault::FaultPoint;
use super::lanes::Lanes;
use super::outbox;
use super::sql;
use super::timing::TxKind;
use super::types::{
    BuildId, BusyPhase, FinishStep, NewStep, Output, Realisation, RealisationConflict, Step, StepNr,
};
use super::write::{Write, found};

// ------------------------------------------------------------------------------------ helpers

/// Outputs with unique names, as upserting them one by one leaves them: a later known path
/// replaces an earlier one, a later `None` keeps it. As two arrays (names, paths).
pub(crate) fn unique_outputs(outputs: &[Output]) -> (Vec<String>, Vec<Option<String>>) {
    let mut m: BTreeMap<&str, Option<&str>> = Default::default();
    for (name, path) in outputs {
        let e = m.entry(name.as_str()).or_insert(None);
        if let Some(p) = path {
            *e = Some(p.as_str());
        }
    }
    m.into_iter()
        .map(|(n, p)| (n.to_string(), p.map(str::to_string)))
        .unzip()
}

/// Whether a stored step row is the one `s` describes (after a commit whose reply was lost).
fn step_is(row: &Step, s: &NewStep) -> bool {
    row.drv_path == s.drv_path
        && row.step_type == s.step_type
        && row.busy == s.busy
        && row.status == s.status
        && row.machine == s.machine
        && row.start_time == s.start_time
        && row.stop_time == s.stop_time
        && row.propagated_from == s.propagated_from
        && row.times_built == s.times_built
}

/// Allocates `n` consecutive step numbers of `build`; returns the last.
async fn alloc_stepnrs(exec: Exec<'_>, build: BuildId, n: i32) -> Result<StepNr, DbError> {
    match exec
        .fetch_optional(sql::ALLOC_STEPNRS, &[&build.0, &n])
        .await?
    {
        Some(row) => row.first(),
        None => Err(DbError::BuildNotFound(build)),
    }
}

/// Inserts step `nr` of `build` from `s` (resolved to `resolved_to`), and its outputs.
async fn insert_step(
    tx: &mut Tx,
    build: BuildId,
    nr: StepNr,
    s: &NewStep,
    resolved_to: Option<StepNr>,
) -> Result<(), DbError> {
    let (step_type, busy) = (s.step_type.code(), s.busy.code());
    let status = s.status.map(|st| st.code());
    let propagated = s.propagated_from.map(|b| b.0);
    tx.exec()
        .execute(
            sql::INSERT_STEP,
            &[
                &build.0,
                &nr,
                &step_type,
                &s.drv_path,
                &busy,
                &status,
                &s.error_msg,
                &s.start_time,
                &s.stop_time,
                &s.machine,
                &s.system,
                &propagated,
                &s.times_built,
                &resolved_to,
            ],
        )
        .await?;
    for (name, path) in &s.outputs {
        tx.exec()
            .execute(sql::UPSERT_STEP_OUTPUT, &[&build.0, &nr, name, path])
            .await?;
    }
    Ok(())
}

/// The error for an update of step `(build, stepnr)` that matched no row: it is not there, or
/// it is finished.
pub(crate) async fn step_miss(exec: Exec<'_>, build: BuildId, stepnr: StepNr) -> DbError {
    match exec
        .fetch_optional(sql::STEP_STATUS, &[&build.0, &stepnr])
        .await
    {
        Err(e) => e.into(),
        Ok(None) => DbError::StepNotFound { build, stepnr },
        Ok(Some(_)) => DbError::StepFinished { build, stepnr },
    }
}

/// For an update of build `id` that matched no row: `Ok(false)` if the build exists (the
/// update's condition did not hold), else `BuildNotFound`.
pub(crate) async fn build_miss(exec: Exec<'_>, id: BuildId) -> Result<bool, DbError> {
    match exec.fetch_optional(sql::BUILD_FINISHED, &[&id.0]).await? {
        None => Err(DbError::BuildNotFound(id)),
        Some(_) => Ok(false),
    }
}

/// Inserts a realisation unless one is recorded; whether it was inserted.
async fn insert_realisation(exec: Exec<'_>, r: &Realisation) -> Result<bool, sqlx::Error> {
    let n = exec
        .execute(
            sql::INSERT_REALISATION,
            &[
                &r.drv_path,
                &r.output_name,
                &r.out_path,
                &r.build.map(|b| b.0),
                &r.stepnr,
            ],
        )
        .await?;
    Ok(n > 0)
}

/// The out path recorded for `drv!output`, if any.
async fn recorded_path(exec: Exec<'_>, drv: &str, output: &str) -> Result<Option<String>, DbError> {
    exec.fetch_optional(sql::REALISATION, &[&drv, &output])
        .await?
        .map(|row| row.realisation().map(|r| r.out_path))
        .transpose()
}

/// The disagreement between `r` and the recorded path, if they differ.
fn conflict(r: &Realisation, recorded: Option<String>) -> Option<RealisationConflict> {
    match recorded {
        Some(existing) if existing != r.out_path => Some(RealisationConflict {
            drv_path: r.drv_path.clone(),
            output_name: r.output_name.clone(),
            existing,
            attempted: r.out_path.clone(),
        }),
        _ => None,
    }
}

// ------------------------------------------------------------------------------------ creating

/// Step rows created together under consecutive new numbers of one build: one step, or a step
/// already `Resolved` and the step it is resolved to (the last). Answered with the last number.
pub(crate) struct CreateSteps {
    pub(crate) build: BuildId,
    pub(crate) rows: Vec<NewStep>,
    /// All rows but the last are Resolved to the last.
    pub(crate) resolves: bool,
}

/// The numbers a [`CreateSteps`] got: the last one (0: none yet), and whether their allocation
/// is committed (PostgreSQL: they are ours, and a later attempt inserts under them) or only part
/// of the attempt's transaction (SQLite: gone with it unless it committed).
#[derive(Debug, Default)]
pub(crate) struct Numbers {
    last: StepNr,
    committed: bool,
}

impl CreateSteps {
    fn count(&self) -> i32 {
        self.rows.len() as i32
    }

    /// Whether a row links to producers' rows (dynamic derivations): such a write is one
    /// transaction on both backends, never part of PostgreSQL's batched statement.
    pub(crate) fn links_producers(&self) -> bool {
        self.rows.iter().any(|r| !r.produced_by.is_empty())
    }

    /// Where a test can make it fail: between the numbers and the rows (one step), between the
    /// resolved step's row and the row marked Resolved (a pair).
    fn fault_point(&self) -> FaultPoint {
        match self.resolves {
            true => FaultPoint::ResolveAfterInsert,
            false => FaultPoint::CreateStepAfterAlloc,
        }
    }

    /// The step row `nr` is resolved to, when the last number is `last`.
    fn resolved_to(&self, nr: StepNr, last: StepNr) -> Option<StepNr> {
        (self.resolves && nr != last).then_some(last)
    }

    /// The rows under the numbers ending at `last`.
    fn numbered(&self, last: StepNr) -> impl Iterator<Item = (StepNr, &NewStep)> {
        let first = last - self.count() + 1;
        (first..).zip(&self.rows)
    }

    /// SQLite: one transaction allocating the numbers and inserting the rows (the row the others
    /// point at first).
    async fn apply_tx(&self, db: &Db, trace: &mut Numbers) -> Result<StepNr, DbError> {
        let mut tx = db.begin_write().await?;
        let last = alloc_stepnrs(tx.exec(), self.build, self.count()).await?;
        *trace = Numbers {
            last,
            committed: false,
        };
        if !self.resolves {
            db.fault(FaultPoint::CreateStepAfterAlloc)?;
        }
        let rows: Vec<_> = self.numbered(last).collect();
        for (nr, row) in rows.into_iter().rev() {
            insert_step(&mut tx, self.build, nr, row, self.resolved_to(nr, last)).await?;
            if self.resolves && nr == last {
                db.fault(FaultPoint::ResolveAfterInsert)?;
            }
            if !row.produced_by.is_empty() {
                db.fault(FaultPoint::LinkProducedAfterRow)?;
            }
            for (producer, output) in &row.produced_by {
                tx.exec()
                    .execute(
                        sql::LINK_PRODUCED_STEP,
                        &[&self.build.0, &nr, producer, output],
                    )
                    .await?;
            }
        }
        db.commit(tx).await?;
        Ok(last)
    }

    /// PostgreSQL: the numbers (unless an earlier attempt got them), then the rows and their
    /// outputs by one statement.
    async fn apply_pg(
        &self,
        db: &Db,
        lanes: &Lanes,
        trace: &mut Numbers,
    ) -> Result<StepNr, DbError> {
        if !trace.committed {
            // Before the numbers, which commit on their own: a fault leaves nothing behind.
            db.fault(self.fault_point())?;
            let got = alloc_pg(db, lanes, &[(self.build.0, self.count())]).await?;
            let last = got
                .first()
                .map(|(_, l)| *l)
                .ok_or(DbError::BuildNotFound(self.build))?;
            *trace = Numbers {
                last,
                committed: true,
            };
        }
        let mut cols = StepColumns::default();
        self.push(&mut cols, trace.last);
        let inserted: i64 = db
            .autocommit(lanes.run(async |c| cols.insert().fetch_one(&mut *c).await))
            .await?;
        if inserted != i64::from(self.count()) {
            return Err(DbError::Invalid(format!(
                "inserted {inserted} of {} step rows of build {}",
                self.count(),
                self.build
            )));
        }
        Ok(trace.last)
    }

    fn push(&self, cols: &mut StepColumns, last: StepNr) {
        for (nr, row) in self.numbered(last) {
            cols.push(self.build, nr, row, self.resolved_to(nr, last));
        }
    }
}

impl Write for CreateSteps {
    type Answer = StepNr;
    type Trace = Numbers;

    fn name(&self) -> &'static str {
        match self.resolves {
            true => "create_and_resolve_step",
            false => "create_step",
        }
    }

    async fn apply(&self, db: &Db, trace: &mut Numbers) -> Result<StepNr, DbError> {
        match db.lanes() {
            Some(lanes) if !self.links_producers() => self.apply_pg(db, lanes, trace).await,
            _ => self.apply_tx(db, trace).await,
        }
    }

    /// The rows are there, under the numbers the attempt got, as written.
    async fn verify(&self, db: &Db, trace: &Numbers) -> Result<Option<StepNr>, DbError> {
        if trace.last == 0 {
            return Ok(None);
        }
        for (nr, row) in self.numbered(trace.last) {
            let stored = found(db.step(self.build, nr).await)?;
            let mine = stored.is_some_and(|s| {
                step_is(&s, row) && s.resolved_to_step == self.resolved_to(nr, trace.last)
            });
            if !mine {
                return Ok(None);
            }
        }
        Ok(Some(trace.last))
    }
}

/// PostgreSQL: allocates step numbers of builds (`(id, how many)`, ids unique) by one statement
/// of its own; returns each existing build's id and its last number.
async fn alloc_pg(db: &Db, lanes: &Lanes, want: &[(i64, i32)]) -> Result<Vec<(i64, i32)>, DbError> {
    let (ids, counts): (Vec<i64>, Vec<i32>) = want.iter().copied().unzip();
    let last: Vec<(i64, i32)> = lanes
        .run(async |c| {
            sqlx::query_as(sql::PG_ALLOC_STEPNRS_MANY)
                .bind(&ids)
                .bind(&counts)
                .fetch_all(&mut *c)
                .await
        })
        .await?;
    db.count_write();
    Ok(last)
}

impl Batched for CreateSteps {
    fn queue(b: &Batcher) -> &Queue<Self> {
        &b.create
    }

    /// The numbers of every build at once, then every row by one statement.
    async fn apply_many(db: &Db, lanes: &Lanes, jobs: &[Pending<Self>]) -> Vec<Outcome<StepNr>> {
        let mut out: Vec<Option<Outcome<StepNr>>> = jobs
            .iter()
            .map(|j| db.fault(j.write().fault_point()).err().map(Outcome::Failed))
            .collect();
        let mut want: BTreeMap<i64, i32> = BTreeMap::new();
        for (j, o) in jobs.iter().zip(&out) {
            if o.is_none() {
                *want.entry(j.write().build.0).or_default() += j.write().count();
            }
        }
        if !want.is_empty() {
            let asked: Vec<(i64, i32)> = want.iter().map(|(b, n)| (*b, *n)).collect();
            let begun = std::time::Instant::now();
            let last = alloc_pg(db, lanes, &asked).await;
            db.inner.timings.of(TxKind::Write).observe(begun.elapsed());
            // Numbers possibly allocated but unknown are gaps, never duplicates: each write
            // gets its own alone.
            if let Err(e) = &last {
                tracing::warn!(error = %e, "allocating a batch's step numbers failed; each write is done alone");
            }
            if let Ok(last) = last {
                // The next free number of each build, handed out in order of arrival.
                let mut next: BTreeMap<i64, i32> = last
                    .into_iter()
                    .map(|(b, l)| (b, l - want.get(&b).copied().unwrap_or(0) + 1))
                    .collect();
                let mut cols = StepColumns::default();
                let mut numbered = Vec::new();
                for (i, j) in jobs.iter().enumerate() {
                    let w = j.write();
                    if out[i].is_some() {
                        continue;
                    }
                    // A build gone (deleted) is answered alone: its error is the lone write's.
                    let Some(n) = next.get_mut(&w.build.0) else {
                        continue;
                    };
                    *n += w.count();
                    let last = *n - 1;
                    j.learned(Numbers {
                        last,
                        committed: true,
                    });
                    w.push(&mut cols, last);
                    numbered.push((i, last));
                }
                if !numbered.is_empty() {
                    let inserted = statement(
                        db,
                        lanes.run(async |c| cols.insert().fetch_one(&mut *c).await),
                    )
                    .await;
                    for (i, last) in numbered {
                        out[i] = Some(match &inserted {
                            Ok(_) => Outcome::Done(last),
                            Err(f) => f.outcome(),
                        });
                    }
                }
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or(Outcome::Alone))
            .collect()
    }
}

/// The columns of many new step rows and their outputs, as the arrays
/// [`sql::PG_INSERT_STEPS_MANY`] unnests.
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
        let (names, paths) = unique_outputs(&s.outputs);
        for (name, path) in names.into_iter().zip(paths) {
            self.out_build.push(build.0);
            self.out_nr.push(nr);
            self.out_name.push(name);
            self.out_path.push(path);
        }
    }

    /// The insert statement with these columns bound; returns how many rows it inserted.
    fn insert(
        &self,
    ) -> sqlx::query::QueryScalar<'_, sqlx::Postgres, i64, sqlx::postgres::PgArguments> {
        sqlx::query_scalar(sql::PG_INSERT_STEPS_MANY)
            .bind(&self.build)
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

// ------------------------------------------------------------------------------------ finishing

/// Finishing a step: its row, its outputs and its realisations, all or nothing. Answered with
/// the realisations not inserted because one was recorded for the drv output already.
pub(crate) struct FinishStepWrite(pub(crate) FinishStep);

/// A realisation not inserted: drv, output, the attempted path, and the recorded one if the
/// write read it (else it is read afterwards).
pub(crate) type Kept = (String, String, String, Option<String>);

impl FinishStepWrite {
    /// Every realisation of the finish, the recorded paths unknown.
    fn all_kept(&self) -> Vec<Kept> {
        let f = &self.0;
        f.realisations
            .iter()
            .map(|r| {
                let (d, o, p) = (&r.drv_path, &r.output_name, &r.out_path);
                (d.clone(), o.clone(), p.clone(), None)
            })
            .collect()
    }

    /// The realisations of the finish not among `inserted` (drv, output).
    fn kept(&self, inserted: &HashSet<(String, String)>) -> Vec<Kept> {
        let mut all = self.all_kept();
        all.retain(|(d, o, _, _)| !inserted.contains(&(d.clone(), o.clone())));
        all
    }

    /// SQLite: one transaction.
    async fn apply_tx(&self, db: &Db) -> Result<Vec<Kept>, DbError> {
        let f = &self.0;
        let mut tx = db.begin_write().await?;
        let n = tx
            .exec()
            .execute(
                &sql::FINISH_STEP,
                &[
                    &f.build.0,
                    &f.stepnr,
                    &f.status.code(),
                    &f.error_msg,
                    &f.stop_time,
                    &f.times_built,
                    &f.machine,
                ],
            )
            .await?;
        if n == 0 {
            return Err(step_miss(tx.exec(), f.build, f.stepnr).await);
        }
        db.fault(FaultPoint::FinishStepAfterStepRow)?;
        for (name, path) in &f.outputs {
            tx.exec()
                .execute(
                    sql::UPSERT_STEP_OUTPUT,
                    &[&f.build.0, &f.stepnr, name, path],
                )
                .await?;
        }
        let mut kept = Vec::new();
        for r in &f.realisations {
            if !insert_realisation(tx.exec(), r).await? {
                let recorded = recorded_path(tx.exec(), &r.drv_path, &r.output_name).await?;
                let (d, o, p) = (&r.drv_path, &r.output_name, &r.out_path);
                kept.push((d.clone(), o.clone(), p.clone(), recorded));
            }
        }
        db.commit(tx).await?;
        Ok(kept)
    }

    /// PostgreSQL: the batch's statement with this finish alone in it.
    async fn apply_pg(&self, db: &Db, lanes: &Lanes) -> Result<Vec<Kept>, DbError> {
        let f = &self.0;
        // One statement has no point between its parts: the fault fires before it.
        db.fault(FaultPoint::FinishStepAfterStepRow)?;
        let mut cols = FinishColumns::default();
        cols.push(f);
        let rows = db
            .autocommit(lanes.run(async |c| cols.finish().fetch_all(&mut *c).await))
            .await?;
        let done = finish_rows(rows);
        if !done.updated.contains(&(f.build.0, f.stepnr)) {
            return Err(step_miss(db.exec(), f.build, f.stepnr).await);
        }
        Ok(self.kept(&done.inserted))
    }
}

impl Write for FinishStepWrite {
    type Answer = Vec<Kept>;
    type Trace = ();

    fn name(&self) -> &'static str {
        "finish_step"
    }

    async fn apply(&self, db: &Db, _: &mut ()) -> Result<Vec<Kept>, DbError> {
        match db.lanes() {
            Some(lanes) => self.apply_pg(db, lanes).await,
            None => self.apply_tx(db).await,
        }
    }

    /// The step was unfinished until the write (it updates only a row without a status):
    /// finished with our status means it was ours. What it kept of the realisations is read
    /// again by the caller.
    async fn verify(&self, db: &Db, _: &()) -> Result<Option<Vec<Kept>>, DbError> {
        let f = &self.0;
        Ok(found(db.step(f.build, f.stepnr).await)?
            .filter(|row| row.status == Some(f.status))
            .map(|_| self.all_kept()))
    }
}

/// A row of [`sql::PG_FINISH_STEPS_MANY`]: a step updated (`'s'`, build, number) or a
/// realisation inserted (`'r'`, drv, output).
type FinishRow = (
    String,
    Option<i64>,
    Option<i32>,
    Option<String>,
    Option<String>,
);

/// The steps a finish statement updated, and the realisations (drv, output) it inserted.
struct Finished {
    updated: HashSet<(i64, i32)>,
    inserted: HashSet<(String, String)>,
}

fn finish_rows(rows: Vec<FinishRow>) -> Finished {
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
    Finished { updated, inserted }
}

/// Splits off the jobs whose `key` an earlier job has (one write per row in a statement): their
/// outcome is `Alone`.
fn first_of_each<W: Write, K: std::hash::Hash + Eq>(
    jobs: &[Pending<W>],
    key: impl Fn(&W) -> K,
) -> Vec<bool> {
    let mut seen = HashSet::new();
    jobs.iter().map(|j| seen.insert(key(j.write()))).collect()
}

impl Batched for FinishStepWrite {
    fn queue(b: &Batcher) -> &Queue<Self> {
        &b.finish
    }

    async fn apply_many(db: &Db, lanes: &Lanes, jobs: &[Pending<Self>]) -> Vec<Outcome<Vec<Kept>>> {
        let first = first_of_each(jobs, |w| (w.0.build.0, w.0.stepnr));
        let mut out: Vec<Option<Outcome<Vec<Kept>>>> = jobs
            .iter()
            .zip(&first)
            .map(|(_, first)| match first {
                false => Some(Outcome::Alone),
                true => db
                    .fault(FaultPoint::FinishStepAfterStepRow)
                    .err()
                    .map(Outcome::Failed),
            })
            .collect();
        let mut cols = FinishColumns::default();
        for (j, o) in jobs.iter().zip(&out) {
            if o.is_none() {
                cols.push(&j.write().0);
            }
        }
        if !cols.build.is_empty() {
            let rows = statement(
                db,
                lanes.run(async |c| cols.finish().fetch_all(&mut *c).await),
            )
            .await;
            let rows = rows.map(finish_rows);
            for (j, o) in jobs.iter().zip(out.iter_mut()) {
                if o.is_some() {
                    continue;
                }
                let w = j.write();
                *o = Some(match &rows {
                    Ok(done) if done.updated.contains(&(w.0.build.0, w.0.stepnr)) => {
                        Outcome::Done(w.kept(&done.inserted))
                    }
                    // Not unfinished (finished, or no such step): the lone write says which.
                    Ok(_) => Outcome::Alone,
                    Err(f) => f.outcome(),
                });
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or(Outcome::Alone))
            .collect()
    }
}

/// The arguments of many finishes, as the arrays [`sql::PG_FINISH_STEPS_MANY`] unnests.
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
        let (names, paths) = unique_outputs(&f.outputs);
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

    /// The finish statement with these columns bound.
    fn finish(
        &self,
    ) -> sqlx::query::QueryAs<'_, sqlx::Postgres, FinishRow, sqlx::postgres::PgArguments> {
        sqlx::query_as(&sql::PG_FINISH_STEPS_MANY)
            .bind(&self.build)
            .bind(&self.nr)
            .bind(&self.status)
            .bind(&self.error)
            .bind(&self.stop)
            .bind(&self.times_built)
            .bind(&self.machine)
            .bind(&self.out_build)
            .bind(&self.out_nr)
            .bind(&self.out_name)
            .bind(&self.out_path)
            .bind(&self.r_fbuild)
            .bind(&self.r_fnr)
            .bind(&self.r_drv)
            .bind(&self.r_out)
            .bind(&self.r_path)
            .bind(&self.r_build)
            .bind(&self.r_nr)
    }
}

// ------------------------------------------------------------------------------------ starting

/// Marking an unfinished step running on `machine` since `time`, in phase `busy`.
pub(crate) struct StartStep {
    pub(crate) build: BuildId,
    pub(crate) stepnr: StepNr,
    pub(crate) machine: String,
    pub(crate) busy: BusyPhase,
    pub(crate) time: i64,
}

impl Write for StartStep {
    type Answer = ();
    type Trace = ();

    fn name(&self) -> &'static str {
        "start_step"
    }

    /// One statement, the same on both backends; with webhooks wanting `build_started`, one
    /// transaction with the build's outbox rows (`outbox.rs`).
    async fn apply(&self, db: &Db, _: &mut ()) -> Result<(), DbError> {
        let args: [&dyn super::exec::Param; 5] = [
            &self.build.0,
            &self.stepnr,
            &self.busy.code(),
            &self.machine,
            &self.time,
        ];
        let targets = db.notify_targets();
        if targets.build_started.is_empty() {
            let n = db.execute_write(sql::START_STEP, &args).await?;
            if n == 0 {
                return Err(step_miss(db.exec(), self.build, self.stepnr).await);
            }
            return Ok(());
        }
        let mut tx = db.begin_write().await?;
        let n = tx.exec().execute(sql::START_STEP, &args).await?;
        if n == 0 {
            return Err(step_miss(tx.exec(), self.build, self.stepnr).await);
        }
        let payload = outbox::started_payload(self.build, self.stepnr, &self.machine, self.time);
        outbox::insert_started(&mut tx, targets, self.build, self.stepnr, &payload).await?;
        db.commit(tx).await
    }

    /// Setting the same values again is harmless.
    async fn verify(&self, _: &Db, _: &()) -> Result<Option<()>, DbError> {
        Ok(None)
    }
}

impl Batched for StartStep {
    fn queue(b: &Batcher) -> &Queue<Self> {
        &b.start
    }

    async fn apply_many(db: &Db, lanes: &Lanes, jobs: &[Pending<Self>]) -> Vec<Outcome<()>> {
        let first = first_of_each(jobs, |w| (w.build.0, w.stepnr));
        let ws = || {
            jobs.iter()
                .zip(&first)
                .filter(|(_, f)| **f)
                .map(|(j, _)| j.write())
        };
        let build: Vec<i64> = ws().map(|w| w.build.0).collect();
        let nr: Vec<i32> = ws().map(|w| w.stepnr).collect();
        let busy: Vec<i32> = ws().map(|w| w.busy.code()).collect();
        let machine: Vec<&str> = ws().map(|w| w.machine.as_str()).collect();
        let time: Vec<i64> = ws().map(|w| w.time).collect();
        // With webhooks wanting `build_started`, the same statement inserts the outbox rows.
        let webhooks = &db.notify_targets().build_started;
        let payload: Vec<String> = match webhooks.is_empty() {
            true => Vec::new(),
            false => ws()
                .map(|w| outbox::started_payload(w.build, w.stepnr, &w.machine, w.time))
                .collect(),
        };
        let now = outbox::now_ms();
        let updated = statement(
            db,
            lanes.run(async |c| {
                let q = match webhooks.is_empty() {
                    true => sqlx::query_as::<_, (i64, i32)>(sql::PG_START_STEPS_MANY),
                    false => sqlx::query_as::<_, (i64, i32)>(outbox::PG_START_STEPS_MANY_NOTIFY),
                };
                let q = q
                    .bind(&build)
                    .bind(&nr)
                    .bind(&busy)
                    .bind(&machine)
                    .bind(&time);
                let q = match webhooks.is_empty() {
                    true => q,
                    false => q.bind(&payload).bind(webhooks).bind(now),
                };
                q.fetch_all(&mut *c).await
            }),
        )
        .await
        .map(|rows| rows.into_iter().collect::<HashSet<_>>());
        jobs.iter()
            .zip(first)
            .map(|(j, first)| {
                let w = j.write();
                match &updated {
                    _ if !first => Outcome::Alone,
                    Ok(u) if u.contains(&(w.build.0, w.stepnr)) => Outcome::Done(()),
                    // Not unfinished: the lone write says why.
                    Ok(_) => Outcome::Alone,
                    Err(f) => f.outcome(),
                }
            })
            .collect()
    }
}

/// Setting an unfinished step's busy phase.
pub(crate) struct SetStepBusy {
    pub(crate) build: BuildId,
    pub(crate) stepnr: StepNr,
    pub(crate) busy: BusyPhase,
}

impl Write for SetStepBusy {
    type Answer = ();
    type Trace = ();

    fn name(&self) -> &'static str {
        "set_step_busy"
    }

    async fn apply(&self, db: &Db, _: &mut ()) -> Result<(), DbError> {
        let n = db
            .execute_write(
                sql::SET_STEP_BUSY,
                &[&self.build.0, &self.stepnr, &self.busy.code()],
            )
            .await?;
        if n == 0 {
            return Err(step_miss(db.exec(), self.build, self.stepnr).await);
        }
        Ok(())
    }

    /// Setting the same phase again is harmless.
    async fn verify(&self, _: &Db, _: &()) -> Result<Option<()>, DbError> {
        Ok(None)
    }
}

// ------------------------------------------------------------------------------------ resolving

/// The resolve write: the step row for the resolved derivation (with its outputs) under a new
/// number, and step `stepnr` marked `Resolved` pointing at it, all or nothing. Answered with the
/// new number.
pub(crate) struct ResolveStep<'a> {
    pub(crate) build: BuildId,
    pub(crate) stepnr: StepNr,
    pub(crate) resolved: &'a NewStep,
    pub(crate) stop_time: i64,
}

impl ResolveStep<'_> {
    /// SQLite: one transaction (the resolved row first: the original points at it).
    async fn apply_tx(&self, db: &Db) -> Result<StepNr, DbError> {
        let mut tx = db.begin_write().await?;
        let nr = alloc_stepnrs(tx.exec(), self.build, 1).await?;
        insert_step(&mut tx, self.build, nr, self.resolved, None).await?;
        db.fault(FaultPoint::ResolveAfterInsert)?;
        let n = tx
            .exec()
            .execute(
                &sql::MARK_RESOLVED,
                &[&self.build.0, &self.stepnr, &self.stop_time, &nr],
            )
            .await?;
        if n == 0 {
            return Err(step_miss(tx.exec(), self.build, self.stepnr).await);
        }
        db.commit(tx).await?;
        Ok(nr)
    }

    /// PostgreSQL: one statement (it allocates the number only if the original is unfinished).
    async fn apply_pg(&self, db: &Db, lanes: &Lanes) -> Result<StepNr, DbError> {
        // One statement has no point between its parts: the fault fires before it.
        db.fault(FaultPoint::ResolveAfterInsert)?;
        let s = self.resolved;
        let (names, paths) = unique_outputs(&s.outputs);
        let nr: Option<StepNr> = db
            .autocommit(lanes.run(async |c| {
                sqlx::query_scalar(&sql::PG_RESOLVE_STEP)
                    .bind(self.build.0)
                    .bind(self.stepnr)
                    .bind(self.stop_time)
                    .bind(s.step_type.code())
                    .bind(&s.drv_path)
                    .bind(s.busy.code())
                    .bind(s.status.map(|st| st.code()))
                    .bind(&s.error_msg)
                    .bind(s.start_time)
                    .bind(s.stop_time)
                    .bind(&s.machine)
                    .bind(&s.system)
                    .bind(s.propagated_from.map(|b| b.0))
                    .bind(s.times_built)
                    .bind(&names)
                    .bind(&paths)
                    .fetch_one(&mut *c)
                    .await
            }))
            .await?;
        match nr {
            Some(nr) => Ok(nr),
            None => Err(match step_miss(db.exec(), self.build, self.stepnr).await {
                e @ DbError::StepNotFound { .. } => match build_miss(db.exec(), self.build).await {
                    Err(b) => b,
                    Ok(_) => e,
                },
                e => e,
            }),
        }
    }
}

impl Write for ResolveStep<'_> {
    type Answer = StepNr;
    type Trace = ();

    fn name(&self) -> &'static str {
        "resolve_step"
    }

    async fn apply(&self, db: &Db, _: &mut ()) -> Result<StepNr, DbError> {
        match db.lanes() {
            Some(lanes) => self.apply_pg(db, lanes).await,
            None => self.apply_tx(db).await,
        }
    }

    async fn verify(&self, db: &Db, _: &()) -> Result<Option<StepNr>, DbError> {
        db.resolution_of(self.build, self.stepnr, &self.resolved.drv_path)
            .await
    }
}

// ------------------------------------------------------------------------------------ realisations

/// Recording a realisation: the same one again is fine, another out path for a recorded drv
/// output is `RealisationConflict` (the recorded one stays).
pub(crate) struct InsertRealisation(pub(crate) Realisation);

impl Write for InsertRealisation {
    type Answer = ();
    type Trace = ();

    fn name(&self) -> &'static str {
        "insert_realisation"
    }

    /// One statement, the same on both backends, and a read when it inserted nothing.
    async fn apply(&self, db: &Db, _: &mut ()) -> Result<(), DbError> {
        let r = &self.0;
        if db.autocommit(insert_realisation(db.exec(), r)).await? {
            return Ok(());
        }
        match conflict(
            r,
            recorded_path(db.exec(), &r.drv_path, &r.output_name).await?,
        ) {
            Some(c) => Err(DbError::RealisationConflict(c)),
            None => Ok(()),
        }
    }

    /// Recorded with our path: written; with another: the conflict; not recorded: not written.
    async fn verify(&self, db: &Db, _: &()) -> Result<Option<()>, DbError> {
        let r = &self.0;
        match recorded_path(db.exec(), &r.drv_path, &r.output_name).await? {
            None => Ok(None),
            recorded => match conflict(r, recorded) {
                Some(c) => Err(DbError::RealisationConflict(c)),
                None => Ok(Some(())),
            },
        }
    }
}

impl Batched for InsertRealisation {
    fn queue(b: &Batcher) -> &Queue<Self> {
        &b.realise
    }

    async fn apply_many(db: &Db, lanes: &Lanes, jobs: &[Pending<Self>]) -> Vec<Outcome<()>> {
        let rs = || jobs.iter().map(|j| &j.write().0);
        let drv: Vec<&str> = rs().map(|r| r.drv_path.as_str()).collect();
        let out: Vec<&str> = rs().map(|r| r.output_name.as_str()).collect();
        let path: Vec<&str> = rs().map(|r| r.out_path.as_str()).collect();
        let build: Vec<Option<i64>> = rs().map(|r| r.build.map(|b| b.0)).collect();
        let nr: Vec<Option<i32>> = rs().map(|r| r.stepnr).collect();
        let inserted = statement(
            db,
            lanes.run(async |c| {
                sqlx::query_as::<_, (String, String)>(sql::PG_INSERT_REALISATIONS_MANY)
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
        let mut inserted = inserted.map(|rows| rows.into_iter().collect::<HashSet<_>>());
        rs().map(|r| match &mut inserted {
            // Taken out: a second write of the same output was not the one inserted. One not
            // inserted is done alone, which tells a disagreement from the same one recorded.
            Ok(ins) => match ins.remove(&(r.drv_path.clone(), r.output_name.clone())) {
                true => Outcome::Done(()),
                false => Outcome::Alone,
            },
            Err(f) => f.outcome(),
        })
        .collect()
    }
}

// ------------------------------------------------------------------------------------ recovery

/// Closing unfinished rows as Aborted (busy 0, `stop_time`, `error_msg`) in one transaction:
/// the ones named, or (`rows: None`) every busy one. Busy flags on rows that already have a
/// status are cleared too. Answered with the rows it closed, as now stored, by build and step
/// number.
pub(crate) struct AbortSteps<'a> {
    pub(crate) rows: Option<&'a [(BuildId, StepNr)]>,
    pub(crate) stop_time: i64,
    pub(crate) error_msg: &'a str,
}

impl Write for AbortSteps<'_> {
    type Answer = Vec<Step>;
    type Trace = ();

    fn name(&self) -> &'static str {
        match self.rows {
            Some(_) => "abort_steps",
            None => "abort_busy_steps",
        }
    }

    async fn apply(&self, db: &Db, _: &mut ()) -> Result<Vec<Step>, DbError> {
        let mut tx = db.begin_write().await?;
        let mut steps = Vec::new();
        match self.rows {
            None => {
                let rows = tx
                    .exec()
                    .fetch_all(&sql::ABORT_BUSY_STEPS, &[&self.stop_time, &self.error_msg])
                    .await?;
                for r in rows {
                    steps.push(r.step("")?);
                }
                tx.exec().execute(&sql::CLEAR_STRAY_BUSY, &[]).await?;
            }
            Some(rows) => {
                for (build, stepnr) in rows {
                    let args: [&dyn Param; 4] =
                        [&build.0, stepnr, &self.stop_time, &self.error_msg];
                    if let Some(r) = tx.exec().fetch_optional(&sql::ABORT_STEP, &args).await? {
                        steps.push(r.step("")?);
                    }
                }
                tx.exec().execute(&sql::CLEAR_FINISHED_BUSY, &[]).await?;
            }
        }
        db.commit(tx).await?;
        steps.sort_by_key(|s| (s.build, s.stepnr));
        Ok(steps)
    }

    /// Run again after a lost reply: rows it had closed are not returned then.
    async fn verify(&self, _: &Db, _: &()) -> Result<Option<Vec<Step>>, DbError> {
        Ok(None)
    }
}
