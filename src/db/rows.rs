//! Decoding rows of either backend into the typed rows of `types`.

use super::error::DbError;
use super::evals::ConstituentState;
use super::exec::Row;
use super::types::{
    Build, BuildId, BuildStatus, BusyPhase, Jobset, JobsetSeconds, OutputRow, ProducedLink,
    Realisation, Step, StepDuration, StepType,
};

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

impl Row {
    pub(crate) fn build(&self) -> Result<Build, DbError> {
        Ok(Build {
            id: BuildId(self.get("id")?),
            jobset: self.get("jobset")?,
            job: self.get("job")?,
            drv_path: self.get("drvpath")?,
            system: self.get("system")?,
            priority: self.get("priority")?,
            global_priority: self.get("globalpriority")?,
            max_silent: self.get("maxsilent")?,
            timeout: self.get("timeout")?,
            timestamp: self.get("timestamp")?,
            finished: self.get::<i32>("finished")? != 0,
            build_status: status(self.get("buildstatus")?)?,
            start_time: self.get("starttime")?,
            stop_time: self.get("stoptime")?,
            is_cached_build: self.get::<i32>("iscachedbuild")? != 0,
            last_step_nr: self.get("laststepnr")?,
        })
    }

    /// A step from columns named `{prefix}build`, `{prefix}stepnr`, ….
    pub(crate) fn step(&self, p: &str) -> Result<Step, DbError> {
        Ok(Step {
            build: BuildId(self.get(&col(p, "build"))?),
            stepnr: self.get(&col(p, "stepnr"))?,
            step_type: StepType::from_code(self.get(&col(p, "type"))?)?,
            drv_path: self.get(&col(p, "drvpath"))?,
            busy: BusyPhase::from_code(self.get(&col(p, "busy"))?)?,
            status: status(self.get(&col(p, "status"))?)?,
            error_msg: self.get(&col(p, "errormsg"))?,
            start_time: self.get(&col(p, "starttime"))?,
            stop_time: self.get(&col(p, "stoptime"))?,
            machine: self.get(&col(p, "machine"))?,
            system: self.get(&col(p, "system"))?,
            propagated_from: self
                .get::<Option<i64>>(&col(p, "propagatedfrom"))?
                .map(BuildId),
            times_built: self.get(&col(p, "timesbuilt"))?,
            resolved_to_step: self.get(&col(p, "resolvedtostep"))?,
        })
    }

    pub(crate) fn output(&self) -> Result<OutputRow, DbError> {
        Ok(OutputRow {
            name: self.get("name")?,
            path: self.get("path")?,
        })
    }

    pub(crate) fn realisation(&self) -> Result<Realisation, DbError> {
        Ok(Realisation {
            drv_path: self.get("drvpath")?,
            output_name: self.get("outputname")?,
            out_path: self.get("outpath")?,
            build: self.get::<Option<i64>>("build")?.map(BuildId),
            stepnr: self.get("stepnr")?,
        })
    }

    pub(crate) fn produced_link(&self) -> Result<ProducedLink, DbError> {
        Ok(ProducedLink {
            build: BuildId(self.get("build")?),
            stepnr: self.get("stepnr")?,
            output: self.get("output")?,
            produced_build: BuildId(self.get("producedbuild")?),
            produced_step: self.get("producedstep")?,
        })
    }

    pub(crate) fn jobset(&self) -> Result<Jobset, DbError> {
        Ok(Jobset {
            name: self.get("name")?,
            scheduling_shares: self.get("schedulingshares")?,
        })
    }

    pub(crate) fn jobset_seconds(&self) -> Result<JobsetSeconds, DbError> {
        Ok(JobsetSeconds {
            jobset: self.get("jobset")?,
            seconds: self.get::<Option<i64>>("seconds")?.unwrap_or(0),
        })
    }

    pub(crate) fn step_duration(&self) -> Result<StepDuration, DbError> {
        Ok(StepDuration {
            drv_path: self.get("drvpath")?,
            jobset: self.get("jobset")?,
            job: self.get("job")?,
            seconds: self.get::<Option<i64>>("seconds")?.unwrap_or(0),
        })
    }

    /// A constituent of an aggregate and its state.
    pub(crate) fn constituent(&self) -> Result<ConstituentState, DbError> {
        Ok(ConstituentState {
            aggregate: BuildId(self.get("aggregate")?),
            constituent: BuildId(self.get("constituent")?),
            finished: self.get::<i32>("finished")? != 0,
            status: status(self.get("buildstatus")?)?,
        })
    }
}
