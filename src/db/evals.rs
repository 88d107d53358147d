//! Evaluations (`qr submit --eval-jobs`): Hydra's `jobsetevals`, `jobsetevalmembers` and
//! `aggregateconstituents`, plus the lines that queued nothing (`jobsetevalerrors`).
//!
//! [`Db::record_eval`] writes a whole evaluation in one transaction — its row, a build for each job
//! whose drv has no build in the jobset yet (the others join as existing builds), the members, the
//! aggregates' constituents and the errors — so the queue monitor never sees an aggregate before
//! its constituents are recorded, and a lost commit reply is read back rather than written twice.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use super::Db;
use super::error::DbError;
use super::exec::Row;
use super::notify::QueueEvent;
use super::types::{Build, BuildId, BuildStatus, Output};
use super::write::Write;

/// A job of a new evaluation: its attr and the build it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvalJob {
    /// The attr (`job` of its build when one is created).
    pub job: String,
    pub drv_path: String,
    pub system: String,
    /// `buildoutputs` rows of a new build (paths known for input-addressed outputs).
    pub outputs: Vec<Output>,
    /// For an aggregate: the attrs of the jobs of this evaluation it is made of.
    pub constituents: Vec<String>,
    /// The new build's `maxsilent` and `timeout` (seconds, 0: no limit): the job's `meta`, else
    /// the submitter's defaults. An existing build keeps its own.
    pub max_silent: i32,
    pub timeout: i32,
    /// nix-eval-jobs' `meta.repo` and `meta.rev`, when the line carries them (the
    /// github-status notification's repository and commit).
    pub repo: Option<String>,
    pub rev: Option<String>,
}

/// A line of the evaluator's output that queued nothing, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalError {
    /// 1-based line number of the input.
    pub line: i64,
    /// The attr, when the line names one.
    pub job: Option<String>,
    pub message: String,
}

/// What [`Db::record_eval`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEval {
    pub jobset: String,
    /// Unix seconds; also the queue time of the builds it creates.
    pub timestamp: i64,
    /// Where the lines came from (a file name, or `-`).
    pub source: String,
    pub jobs: Vec<NewEvalJob>,
    pub errors: Vec<EvalError>,
}

/// A job of an evaluation and its build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalMember {
    pub job: String,
    pub build: BuildId,
    /// Queued by this evaluation (false: the drv already had a build in the jobset).
    pub is_new: bool,
}

/// What [`Db::record_eval`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEval {
    pub id: i64,
    /// In the order of [`NewEval::jobs`].
    pub members: Vec<EvalMember>,
}

/// A row of `jobsetevals` with its counts (per job: two jobs sharing a build count twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalSummary {
    pub id: i64,
    pub jobset: String,
    pub timestamp: i64,
    pub source: String,
    pub jobs: i64,
    /// Jobs whose build this evaluation queued.
    pub new_builds: i64,
    pub errors: i64,
    /// Jobs whose build finished with status 0.
    pub succeeded: i64,
    /// Jobs whose build finished with any other status.
    pub failed: i64,
    /// Jobs whose build is unfinished.
    pub queued: i64,
}

/// An evaluation with its members (and their builds), its errors and its aggregates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalDetail {
    pub summary: EvalSummary,
    /// By job name.
    pub members: Vec<(EvalMember, Build)>,
    /// By line.
    pub errors: Vec<EvalError>,
    /// (aggregate build, constituent build) for the aggregates among the members.
    pub constituents: Vec<(BuildId, BuildId)>,
}

/// A constituent of an aggregate build, and how far it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConstituentState {
    pub aggregate: BuildId,
    pub constituent: BuildId,
    pub finished: bool,
    pub status: Option<BuildStatus>,
}

const INSERT_JOBSET_IF_MISSING: &str =
    "insert into jobsets (name) values ($1) on conflict (name) do nothing";

const INSERT_EVAL: &str =
    "insert into jobsetevals (jobset, timestamp, source) values ($1, $2, $3) returning id";

/// The newest build of a drv in a jobset (index `indexbuildsonjobsetdrvpath`).
pub(crate) const EXISTING_BUILD: &str =
    "select id from builds where jobset = $1 and drvpath = $2 order by id desc limit 1";

const INSERT_BUILD: &str = "insert into builds (jobset, job, drvpath, system, priority, \
     globalpriority, maxsilent, timeout, timestamp) values ($1, $2, $3, $4, 0, 0, $5, $6, $7) \
     returning id";

const UPSERT_BUILD_OUTPUT: &str = "insert into buildoutputs (build, name, path) values ($1, $2, $3) \
     on conflict (build, name) do update set path = coalesce(excluded.path, buildoutputs.path)";

const INSERT_MEMBER: &str = "insert into jobsetevalmembers (eval, job, build, isnew, repo, rev) \
     values ($1, $2, $3, $4, $5, $6)";

const INSERT_CONSTITUENT: &str = "insert into aggregateconstituents (aggregate, constituent) \
     values ($1, $2) on conflict (aggregate, constituent) do nothing";

const INSERT_ERROR: &str =
    "insert into jobsetevalerrors (eval, line, job, message) values ($1, $2, $3, $4)";

/// The `$1` most recent evaluations (admin listing, like `recent_builds`), with their counts.
static RECENT_EVALS: LazyLock<String> = LazyLock::new(|| {
    "select e.id, e.jobset, e.timestamp, e.source, \
     (select count(*) from jobsetevalmembers m where m.eval = e.id) as jobs, \
     (select count(*) from jobsetevalmembers m where m.eval = e.id and m.isnew = 1) as newbuilds, \
     (select count(*) from jobsetevalerrors x where x.eval = e.id) as errors, \
     (select count(*) from jobsetevalmembers m join builds b on b.id = m.build \
        where m.eval = e.id and b.finished = 1 and b.buildstatus = {success}) as succeeded, \
     (select count(*) from jobsetevalmembers m join builds b on b.id = m.build \
        where m.eval = e.id and b.finished = 1 and b.buildstatus != {success}) as failed, \
     (select count(*) from jobsetevalmembers m join builds b on b.id = m.build \
        where m.eval = e.id and b.finished = 0) as queued \
     from jobsetevals e order by e.id desc limit $1"
        .replace("{success}", &BuildStatus::Success.code().to_string())
});

/// One evaluation's row (its counts come from its members).
const EVAL: &str = "select id, jobset, timestamp, source from jobsetevals where id = $1";

pub(crate) const EVAL_MEMBERS: &str = "select m.job as evaljob, m.isnew, b.id, b.jobset, b.job, b.drvpath, \
     b.system, b.priority, b.globalpriority, b.maxsilent, b.timeout, b.timestamp, b.finished, \
     b.buildstatus, b.starttime, b.stoptime, b.iscachedbuild, b.laststepnr \
     from jobsetevalmembers m join builds b on b.id = m.build where m.eval = $1 order by m.job";

const EVAL_ERRORS: &str =
    "select line, job, message from jobsetevalerrors where eval = $1 order by line";

const EVAL_CONSTITUENTS: &str = "select distinct a.aggregate, a.constituent \
     from jobsetevalmembers m join aggregateconstituents a on a.aggregate = m.build \
     where m.eval = $1 order by a.aggregate, a.constituent";

/// The constituents of unfinished aggregate builds with an id above `$1`: from the unfinished
/// builds (partial index), each looked up in `aggregateconstituents`.
pub(crate) const UNFINISHED_AGGREGATES: &str = "select a.aggregate, a.constituent, c.finished, c.buildstatus \
     from builds b join aggregateconstituents a on a.aggregate = b.id \
     join builds c on c.id = a.constituent \
     where b.finished = 0 and b.id > $1 order by a.aggregate, a.constituent";

/// The same for PostgreSQL, whose planner would otherwise hash-join a scan of the whole
/// `aggregateconstituents` (it grows with every evaluation) with the few unfinished builds: a
/// lateral subquery (kept apart by `offset 0`) is one index lookup per unfinished build.
pub(crate) const UNFINISHED_AGGREGATES_PG: &str = "select a.aggregate, a.constituent, c.finished, c.buildstatus \
     from builds b cross join lateral (select x.aggregate, x.constituent from aggregateconstituents x \
       where x.aggregate = b.id offset 0) a \
     join builds c on c.id = a.constituent \
     where b.finished = 0 and b.id > $1 order by a.aggregate, a.constituent";

pub(crate) const CONSTITUENTS_OF: &str = "select a.aggregate, a.constituent, c.finished, c.buildstatus \
     from aggregateconstituents a join builds c on c.id = a.constituent \
     where a.aggregate = $1 order by a.constituent";

/// Checks what the database cannot: job names unique, constituents naming jobs of the evaluation.
fn check_new_eval(e: &NewEval) -> Result<(), DbError> {
    let mut seen = HashSet::new();
    for j in &e.jobs {
        if !seen.insert(j.job.as_str()) {
            return Err(DbError::Invalid(format!(
                "job {:?} appears twice in the evaluation",
                j.job
            )));
        }
    }
    for j in &e.jobs {
        for c in &j.constituents {
            if !seen.contains(c.as_str()) {
                return Err(DbError::Invalid(format!(
                    "aggregate {:?} names constituent {c:?}, which is not a job of the evaluation",
                    j.job
                )));
            }
        }
    }
    Ok(())
}

/// Recording an evaluation (see [`Db::record_eval`]).
struct RecordEval<'a>(&'a NewEval);

impl Write for RecordEval<'_> {
    type Answer = RecordedEval;
    /// The id the last attempt inserted: after a lost reply, the row tells.
    type Trace = i64;

    fn name(&self) -> &'static str {
        "record_eval"
    }

    async fn apply(&self, db: &Db, inserted: &mut i64) -> Result<RecordedEval, DbError> {
        let e = self.0;
        let mut tx = db.begin_write().await?;
        tx.exec()
            .execute(INSERT_JOBSET_IF_MISSING, &[&e.jobset])
            .await?;
        let id: i64 = returned_id(
            tx.exec()
                .fetch_optional(INSERT_EVAL, &[&e.jobset, &e.timestamp, &e.source])
                .await?,
        )?;
        *inserted = id;
        let mut by_drv: HashMap<&str, (BuildId, bool)> = HashMap::new();
        let mut by_job: HashMap<&str, BuildId> = HashMap::new();
        let mut members = Vec::with_capacity(e.jobs.len());
        for j in &e.jobs {
            let (build, is_new) = match by_drv.get(j.drv_path.as_str()) {
                Some(x) => *x,
                None => {
                    let existing = tx
                        .exec()
                        .fetch_optional(EXISTING_BUILD, &[&e.jobset, &j.drv_path])
                        .await?;
                    match existing {
                        Some(r) => (BuildId(r.first()?), false),
                        None => {
                            let args: [&dyn super::exec::Param; 7] = [
                                &e.jobset,
                                &j.job,
                                &j.drv_path,
                                &j.system,
                                &j.max_silent,
                                &j.timeout,
                                &e.timestamp,
                            ];
                            let b =
                                returned_id(tx.exec().fetch_optional(INSERT_BUILD, &args).await?)?;
                            for (name, path) in &j.outputs {
                                tx.exec()
                                    .execute(UPSERT_BUILD_OUTPUT, &[&b, name, path])
                                    .await?;
                            }
                            (BuildId(b), true)
                        }
                    }
                }
            };
            by_drv.insert(&j.drv_path, (build, is_new));
            by_job.insert(&j.job, build);
            let args: [&dyn super::exec::Param; 6] =
                [&id, &j.job, &build.0, &i32::from(is_new), &j.repo, &j.rev];
            tx.exec().execute(INSERT_MEMBER, &args).await?;
            members.push(EvalMember {
                job: j.job.clone(),
                build,
                is_new,
            });
        }
        for j in &e.jobs {
            let aggregate = by_job[j.job.as_str()];
            for c in &j.constituents {
                let constituent = by_job[c.as_str()];
                // Two jobs with one drv share a build; it is not its own constituent.
                if constituent == aggregate {
                    continue;
                }
                tx.exec()
                    .execute(INSERT_CONSTITUENT, &[&aggregate.0, &constituent.0])
                    .await?;
            }
        }
        for x in &e.errors {
            tx.exec()
                .execute(INSERT_ERROR, &[&id, &x.line, &x.job, &x.message])
                .await?;
        }
        let targets = db.notify_targets();
        if !targets.eval_completed.is_empty() {
            let payload = eval_payload(id, e, &members);
            super::outbox::insert_eval(&mut tx, targets, id, &payload).await?;
        }
        db.commit(tx).await?;
        Ok(RecordedEval { id, members })
    }

    async fn verify(&self, db: &Db, inserted: &i64) -> Result<Option<RecordedEval>, DbError> {
        let (e, id) = (self.0, *inserted);
        if id == 0 {
            return Ok(None);
        }
        match db.eval(id).await {
            Ok(d) if d.summary.jobset == e.jobset && d.summary.timestamp == e.timestamp => {
                // In the order of the request.
                let by_job: HashMap<String, EvalMember> = d
                    .members
                    .into_iter()
                    .map(|(m, _)| (m.job.clone(), m))
                    .collect();
                let members = e
                    .jobs
                    .iter()
                    .filter_map(|j| by_job.get(&j.job).cloned())
                    .collect();
                Ok(Some(RecordedEval { id, members }))
            }
            Ok(_) | Err(DbError::EvalNotFound(_)) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

/// The facts of an `eval_completed` event.
fn eval_payload(id: i64, e: &NewEval, members: &[EvalMember]) -> serde_json::Value {
    let builds: Vec<serde_json::Value> = members
        .iter()
        .map(|m| serde_json::json!({"job": m.job, "build": m.build.0, "isNew": m.is_new}))
        .collect();
    serde_json::json!({
        "eval": id,
        "jobset": e.jobset,
        "timestamp": e.timestamp,
        "source": e.source,
        "jobs": members.len(),
        "newBuilds": members.iter().filter(|m| m.is_new).count(),
        "errors": e.errors.len(),
        "builds": builds,
    })
}

/// The id an `insert … returning id` returned.
fn returned_id(row: Option<Row>) -> Result<i64, DbError> {
    match row {
        Some(r) => r.first(),
        None => Err(DbError::Invalid("an insert returned no id".into())),
    }
}

impl Db {
    /// Records an evaluation in one transaction: the jobset (created with the default shares if
    /// missing), the `jobsetevals` row, for each job the newest build of its drv in the jobset or
    /// else a new build (named by the job, queued at the evaluation's time), the members, the
    /// aggregates' constituents and the errors. New builds are announced (`builds_added`).
    pub async fn record_eval(&self, e: &NewEval) -> Result<RecordedEval, DbError> {
        check_new_eval(e)?;
        let rec = self.write(&RecordEval(e)).await?;
        if rec.members.iter().any(|m| m.is_new) {
            self.emit(QueueEvent::BuildsAdded(None));
        }
        Ok(rec)
    }

    /// The `limit` most recent evaluations, newest first, with their counts.
    pub async fn evals(&self, limit: i64) -> Result<Vec<EvalSummary>, DbError> {
        self.eval_summaries(&RECENT_EVALS, limit).await
    }

    /// The summaries `query` selects with `arg` (a limit, or an id).
    async fn eval_summaries(&self, query: &str, arg: i64) -> Result<Vec<EvalSummary>, DbError> {
        self.reading("evals", || async move {
            let rows = self.exec().fetch_all(query, &[&arg]).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                out.push(EvalSummary {
                    id: r.get("id")?,
                    jobset: r.get("jobset")?,
                    timestamp: r.get("timestamp")?,
                    source: r.get("source")?,
                    jobs: r.get("jobs")?,
                    new_builds: r.get("newbuilds")?,
                    errors: r.get("errors")?,
                    succeeded: r.get("succeeded")?,
                    failed: r.get("failed")?,
                    queued: r.get("queued")?,
                });
            }
            Ok(out)
        })
        .await
    }

    /// One evaluation with its members, errors and aggregates; `EvalNotFound` if there is none.
    pub async fn eval(&self, id: i64) -> Result<EvalDetail, DbError> {
        if id <= 0 {
            return Err(DbError::EvalNotFound(id));
        }
        self.reading("eval", || async move {
            let Some(r) = self.exec().fetch_optional(EVAL, &[&id]).await? else {
                return Err(DbError::EvalNotFound(id));
            };
            let mut summary = EvalSummary {
                id: r.get("id")?,
                jobset: r.get("jobset")?,
                timestamp: r.get("timestamp")?,
                source: r.get("source")?,
                jobs: 0,
                new_builds: 0,
                errors: 0,
                succeeded: 0,
                failed: 0,
                queued: 0,
            };
            let mut members = Vec::new();
            for r in self.exec().fetch_all(EVAL_MEMBERS, &[&id]).await? {
                let build = r.build()?;
                members.push((
                    EvalMember {
                        job: r.get("evaljob")?,
                        build: build.id,
                        is_new: r.get::<i32>("isnew")? != 0,
                    },
                    build,
                ));
            }
            let mut errors = Vec::new();
            for r in self.exec().fetch_all(EVAL_ERRORS, &[&id]).await? {
                errors.push(EvalError {
                    line: r.get("line")?,
                    job: r.get("job")?,
                    message: r.get("message")?,
                });
            }
            let mut constituents = Vec::new();
            for r in self.exec().fetch_all(EVAL_CONSTITUENTS, &[&id]).await? {
                constituents.push((BuildId(r.get("aggregate")?), BuildId(r.get("constituent")?)));
            }
            for (m, b) in &members {
                summary.jobs += 1;
                summary.new_builds += i64::from(m.is_new);
                match (b.finished, b.build_status) {
                    (false, _) => summary.queued += 1,
                    (true, Some(BuildStatus::Success)) => summary.succeeded += 1,
                    (true, _) => summary.failed += 1,
                }
            }
            summary.errors = errors.len() as i64;
            Ok(EvalDetail {
                summary,
                members,
                errors,
                constituents,
            })
        })
        .await
    }

    /// The constituents (and their state) of every unfinished aggregate build with an id above
    /// `after`, by aggregate then constituent.
    pub async fn unfinished_aggregates(
        &self,
        after: BuildId,
    ) -> Result<Vec<ConstituentState>, DbError> {
        self.reading("unfinished_aggregates", || async move {
            let q = match self.backend() {
                super::Backend::Sqlite => UNFINISHED_AGGREGATES,
                super::Backend::Postgres => UNFINISHED_AGGREGATES_PG,
            };
            let rows = self.exec().fetch_all(q, &[&after.0]).await?;
            rows.iter().map(Row::constituent).collect()
        })
        .await
    }

    /// The constituents of one build (none: it is no aggregate), by constituent.
    pub async fn constituents_of(
        &self,
        aggregate: BuildId,
    ) -> Result<Vec<ConstituentState>, DbError> {
        self.reading("constituents_of", || async move {
            let rows = self
                .exec()
                .fetch_all(CONSTITUENTS_OF, &[&aggregate.0])
                .await?;
            rows.iter().map(Row::constituent).collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, constituents: &[&str]) -> NewEvalJob {
        NewEvalJob {
            job: name.into(),
            drv_path: format!("/nix/store/{:0>32}-{name}.drv", 0),
            system: "x86_64-linux".into(),
            outputs: vec![],
            constituents: constituents.iter().map(|c| c.to_string()).collect(),
            max_silent: 7200,
            timeout: 36000,
            repo: None,
            rev: None,
        }
    }

    fn eval(jobs: Vec<NewEvalJob>) -> NewEval {
        NewEval {
            jobset: "js".into(),
            timestamp: 1,
            source: "-".into(),
            jobs,
            errors: vec![],
        }
    }

    #[test]
    fn job_names_are_unique_and_constituents_are_jobs() {
        assert!(check_new_eval(&eval(vec![job("a", &[]), job("t", &["a"])])).is_ok());
        let dup = check_new_eval(&eval(vec![job("a", &[]), job("a", &[])]));
        assert!(matches!(dup, Err(DbError::Invalid(m)) if m.contains("twice")));
        let missing = check_new_eval(&eval(vec![job("t", &["nope"])]));
        assert!(matches!(missing, Err(DbError::Invalid(m)) if m.contains("\"nope\"")));
    }
}
