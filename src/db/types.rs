//! Typed values and rows of the database layer.

use std::fmt;

/// A build's id (`builds.id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BuildId(pub i64);

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A step's number within its build (`buildsteps.stepnr`, 1-based).
pub type StepNr = i32;

/// A code read from the database (or given by a caller) that no enum variant has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} code {code}")]
pub struct UnknownCode {
    pub what: &'static str,
    pub code: i32,
}

macro_rules! int_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $v:ident = $n:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(i32)]
        pub enum $name { $($(#[$vm])* $v = $n,)* }

        impl $name {
            /// Every variant, in code order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];

            /// The integer stored in the database.
            pub fn code(self) -> i32 {
                self as i32
            }

            /// The variant for a stored integer.
            pub fn from_code(code: i32) -> Result<Self, UnknownCode> {
                match code {
                    $($n => Ok($name::$v),)*
                    _ => Err(UnknownCode { what: $what, code }),
                }
            }
        }

        impl From<$name> for i32 {
            fn from(v: $name) -> i32 {
                v.code()
            }
        }

        impl TryFrom<i32> for $name {
            type Error = UnknownCode;
            fn try_from(code: i32) -> Result<Self, UnknownCode> {
                Self::from_code(code)
            }
        }
    };
}

int_enum! {
    /// Hydra's build and step status codes (`builds.buildstatus`, `buildsteps.status`).
    /// Code 5 is unused, as in Hydra.
    BuildStatus, "status" {
        Success = 0,
        Failed = 1,
        DepFailed = 2,
        Aborted = 3,
        Cancelled = 4,
        FailedWithOutput = 6,
        TimedOut = 7,
        CachedFailure = 8,
        Unsupported = 9,
        LogLimitExceeded = 10,
        NarSizeLimitExceeded = 11,
        NotDeterministic = 12,
        /// The step's derivation was resolved (CA); `resolvedtostep` names the step that builds it.
        Resolved = 13,
    }
}

int_enum! {
    /// Hydra's busy phases of a step (`buildsteps.busy`); `NotBusy` (0) means the step is not running.
    BusyPhase, "busy phase" {
        NotBusy = 0,
        Preparing = 1,
        Connecting = 10,
        SendingInputs = 20,
        Building = 30,
        WaitingForLocalSlot = 35,
        ReceivingOutputs = 40,
        PostProcessing = 50,
    }
}

int_enum! {
    /// Hydra's step types (`buildsteps.type`).
    StepType, "step type" {
        Build = 0,
        Substitution = 1,
    }
}

impl BuildStatus {
    /// True for `Success` only.
    pub fn is_success(self) -> bool {
        self == BuildStatus::Success
    }
}

impl BusyPhase {
    /// True unless `NotBusy`.
    pub fn is_busy(self) -> bool {
        self != BusyPhase::NotBusy
    }
}

/// An output name with its store path; the path is `None` while unknown (CA outputs before they
/// are built).
pub type Output = (String, Option<String>);

/// A row of `jobsets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jobset {
    pub name: String,
    pub scheduling_shares: i32,
}

/// What `Db::create_build` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBuild {
    pub jobset: String,
    pub job: String,
    pub drv_path: String,
    pub system: String,
    pub priority: i32,
    pub global_priority: i32,
    pub max_silent: i32,
    pub timeout: i32,
    /// Queue time (`builds.timestamp`), unix seconds.
    pub timestamp: i64,
    /// `buildoutputs` rows inserted with the build (paths known for input-addressed outputs).
    pub outputs: Vec<Output>,
}

/// A row of `builds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub id: BuildId,
    pub jobset: String,
    pub job: String,
    pub drv_path: String,
    pub system: String,
    pub priority: i32,
    pub global_priority: i32,
    pub max_silent: i32,
    pub timeout: i32,
    pub timestamp: i64,
    pub finished: bool,
    pub build_status: Option<BuildStatus>,
    pub start_time: Option<i64>,
    pub stop_time: Option<i64>,
    pub is_cached_build: bool,
    /// The last step number allocated for this build (0 when it has no steps).
    pub last_step_nr: StepNr,
}

/// A row of `buildoutputs` or `buildstepoutputs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRow {
    pub name: String,
    pub path: Option<String>,
}

/// What `Db::create_step` (and `Db::resolve_step` for the resolved row) needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewStep {
    pub step_type: StepType,
    pub drv_path: String,
    pub system: Option<String>,
    pub busy: BusyPhase,
    /// `None` while the step is pending or running; a step can be created already finished
    /// (e.g. a cached or propagated failure).
    pub status: Option<BuildStatus>,
    pub error_msg: Option<String>,
    pub start_time: Option<i64>,
    pub stop_time: Option<i64>,
    /// Empty when none, as in Hydra.
    pub machine: String,
    pub propagated_from: Option<BuildId>,
    pub times_built: Option<i32>,
    /// `buildstepoutputs` rows inserted with the step.
    pub outputs: Vec<Output>,
    /// Dynamic derivations: the (producer drv, output) pairs whose output holds this step's
    /// drv. In the same transaction, a `producedsteps` row links the row of each producer's
    /// step (the one its realisation names) to this row; a producer without one links nothing.
    pub produced_by: Vec<(String, String)>,
}

impl NewStep {
    /// A pending build step for `drv_path`: not busy, no status, everything else empty.
    pub fn build(drv_path: impl Into<String>, system: impl Into<String>) -> Self {
        NewStep {
            step_type: StepType::Build,
            drv_path: drv_path.into(),
            system: Some(system.into()),
            busy: BusyPhase::NotBusy,
            status: None,
            error_msg: None,
            start_time: None,
            stop_time: None,
            machine: String::new(),
            propagated_from: None,
            times_built: None,
            outputs: Vec::new(),
            produced_by: Vec::new(),
        }
    }
}

/// A row of `buildsteps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub build: BuildId,
    pub stepnr: StepNr,
    pub step_type: StepType,
    pub drv_path: String,
    pub busy: BusyPhase,
    pub status: Option<BuildStatus>,
    pub error_msg: Option<String>,
    pub start_time: Option<i64>,
    pub stop_time: Option<i64>,
    pub machine: String,
    pub system: Option<String>,
    pub propagated_from: Option<BuildId>,
    pub times_built: Option<i32>,
    /// Set exactly when `status` is `Resolved`.
    pub resolved_to_step: Option<StepNr>,
}

/// What `Db::finish_step` records, in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishStep {
    pub build: BuildId,
    pub stepnr: StepNr,
    /// Any status but `Resolved` (use `Db::resolve_step`).
    pub status: BuildStatus,
    pub error_msg: Option<String>,
    pub stop_time: i64,
    pub times_built: Option<i32>,
    /// Upserted into `buildstepoutputs` (a known path replaces a `NULL` one).
    pub outputs: Vec<Output>,
    /// Inserted into `realisations`; see `Db::finish_step` for disagreements.
    pub realisations: Vec<Realisation>,
    /// `Some` overwrites the step's machine.
    pub machine: Option<String>,
}

/// What `Db::finish_build` records, in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishBuild {
    pub build: BuildId,
    pub status: BuildStatus,
    /// `Some` sets `starttime`; if `None` it is kept, or set to `stop_time` if the build never
    /// started (a finished build has both times, as in Hydra).
    pub start_time: Option<i64>,
    pub stop_time: i64,
    pub is_cached: bool,
    /// Upserted into `buildoutputs`.
    pub outputs: Vec<Output>,
}

/// A row of `realisations`: the derived build trace entry `drv_path!output_name -> out_path`, with
/// the step that produced it (`None` when it came from elsewhere, or the step row was deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realisation {
    pub drv_path: String,
    pub output_name: String,
    pub out_path: String,
    pub build: Option<BuildId>,
    pub stepnr: Option<StepNr>,
}

/// A recorded realisation that disagrees with one being inserted. The recorded one stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("realisation {drv_path}!{output_name} is recorded as {existing}, not {attempted}")]
pub struct RealisationConflict {
    pub drv_path: String,
    pub output_name: String,
    pub existing: String,
    pub attempted: String,
}

/// A step row marked `Resolved` and the step row it points at (same build).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPair {
    pub original: Step,
    pub resolved: Step,
}

/// A `producedsteps` row (dynamic derivations): the producer's row, whose `output` holds a
/// drv, and a row of the step that builds that drv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducedLink {
    pub build: BuildId,
    pub stepnr: StepNr,
    pub output: String,
    pub produced_build: BuildId,
    pub produced_step: StepNr,
}

/// How long a successful build step took (`stoptime - starttime`), with its build's job: what
/// the critical path's expected durations learn from (`Db::recent_step_durations`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepDuration {
    pub drv_path: String,
    pub jobset: String,
    pub job: String,
    pub seconds: i64,
}

/// Build-step seconds spent per jobset since some time (for scheduling shares).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsetSeconds {
    pub jobset: String,
    pub seconds: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_round_trip() {
        for s in BuildStatus::ALL {
            assert_eq!(BuildStatus::from_code(s.code()), Ok(*s));
        }
        assert_eq!(BuildStatus::Resolved.code(), 13);
        assert_eq!(BuildStatus::FailedWithOutput.code(), 6);
        assert_eq!(i32::from(BuildStatus::Cancelled), 4);
        assert!(BuildStatus::from_code(5).is_err());
        assert!(BuildStatus::try_from(14).is_err());
        assert_eq!(BuildStatus::ALL.len(), 13);
    }

    #[test]
    fn busy_phases_round_trip() {
        let codes: Vec<i32> = BusyPhase::ALL.iter().map(|b| b.code()).collect();
        assert_eq!(codes, [0, 1, 10, 20, 30, 35, 40, 50]);
        for b in BusyPhase::ALL {
            assert_eq!(BusyPhase::try_from(b.code()), Ok(*b));
        }
        assert!(!BusyPhase::NotBusy.is_busy());
        assert!(BusyPhase::Building.is_busy());
        let err = BusyPhase::from_code(2).unwrap_err();
        assert_eq!(err.to_string(), "unknown busy phase code 2");
    }

    #[test]
    fn step_types() {
        assert_eq!(StepType::from_code(1), Ok(StepType::Substitution));
        assert!(StepType::from_code(2).is_err());
    }
}
