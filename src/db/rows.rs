//! Decoding rows of either backend into the typed rows of `types`.

use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use super::error::DbError;
use super::types::{
    Build, BuildId, BuildStatus, BusyPhase, Jobset, JobsetSeconds, OutputRow, Realisation, Step,
    StepType,
};

/// Typed decoding, implemented for `SqliteRow` and `PgRow` alike.
pub(crate) trait RowExt {
    fn build(&self) -> Result<Build, DbError>;
    /// A step from columns named `{prefix}build`, `{prefix}stepnr`, ….
    fn step(&self, prefix: &str) -> Result<Step, DbError>;
    fn output(&self) -> Result<OutputRow, DbError>;
    fn realisation(&self) -> Result<Realisation, DbError>;
    fn jobset(&self) -> Result<Jobset, DbError>;
    fn jobset_seconds(&self) -> Result<JobsetSeconds, DbError>;
}

fn col<'a>(prefix: &str, name: &'a str) -> std::borrow::Cow<'a, str> {
    if prefix.is_empty() {
        name.into()
    } else {
        format!("{prefix}{name}").into()
    }
}

fn status(code: Option<i32>) -> Result<Option<BuildStatus>, DbError> {
    Ok(code.map(BuildStatus::from_code).transpose()?)
}

macro_rules! impl_row_ext {
    ($row:ty) => {
        impl RowExt for $row {
            fn build(&self) -> Result<Build, DbError> {
                Ok(Build {
                    id: BuildId(self.try_get("id")?),
                    jobset: self.try_get("jobset")?,
                    job: self.try_get("job")?,
                    drv_path: self.try_get("drvpath")?,
                    system: self.try_get("system")?,
                    priority: self.try_get("priority")?,
                    global_priority: self.try_get("globalpriority")?,
                    max_silent: self.try_get("maxsilent")?,
                    timeout: self.try_get("timeout")?,
                    timestamp: self.try_get("timestamp")?,
                    finished: self.try_get::<i32, _>("finished")? != 0,
                    build_status: status(self.try_get("buildstatus")?)?,
                    start_time: self.try_get("starttime")?,
                    stop_time: self.try_get("stoptime")?,
                    is_cached_build: self.try_get::<i32, _>("iscachedbuild")? != 0,
                    last_step_nr: self.try_get("laststepnr")?,
                })
            }

            fn step(&self, p: &str) -> Result<Step, DbError> {
                Ok(Step {
                    build: BuildId(self.try_get(&*col(p, "build"))?),
                    stepnr: self.try_get(&*col(p, "stepnr"))?,
                    step_type: StepType::from_code(self.try_get(&*col(p, "type"))?)?,
                    drv_path: self.try_get(&*col(p, "drvpath"))?,
                    busy: BusyPhase::from_code(self.try_get(&*col(p, "busy"))?)?,
                    status: status(self.try_get(&*col(p, "status"))?)?,
                    error_msg: self.try_get(&*col(p, "errormsg"))?,
                    start_time: self.try_get(&*col(p, "starttime"))?,
                    stop_time: self.try_get(&*col(p, "stoptime"))?,
                    machine: self.try_get(&*col(p, "machine"))?,
                    system: self.try_get(&*col(p, "system"))?,
                    propagated_from: self
                        .try_get::<Option<i64>, _>(&*col(p, "propagatedfrom"))?
                        .map(BuildId),
                    times_built: self.try_get(&*col(p, "timesbuilt"))?,
                    resolved_to_step: self.try_get(&*col(p, "resolvedtostep"))?,
                })
            }

            fn output(&self) -> Result<OutputRow, DbError> {
                Ok(OutputRow {
                    name: self.try_get("name")?,
                    path: self.try_get("path")?,
                })
            }

            fn realisation(&self) -> Result<Realisation, DbError> {
                Ok(Realisation {
                    drv_path: self.try_get("drvpath")?,
                    output_name: self.try_get("outputname")?,
                    out_path: self.try_get("outpath")?,
                    build: self.try_get::<Option<i64>, _>("build")?.map(BuildId),
                    stepnr: self.try_get("stepnr")?,
                })
            }

            fn jobset(&self) -> Result<Jobset, DbError> {
                Ok(Jobset {
                    name: self.try_get("name")?,
                    scheduling_shares: self.try_get("schedulingshares")?,
                })
            }

            fn jobset_seconds(&self) -> Result<JobsetSeconds, DbError> {
                Ok(JobsetSeconds {
                    jobset: self.try_get("jobset")?,
                    seconds: self.try_get::<Option<i64>, _>("seconds")?.unwrap_or(0),
                })
            }
        }
    };
}

impl_row_ext!(SqliteRow);
impl_row_ext!(PgRow);
