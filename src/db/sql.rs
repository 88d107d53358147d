//! The SQL the runner sends. The same text runs on both backends (sqlx's SQLite driver accepts
//! `$N` parameters) except where a function says otherwise. Every query here is covered by
//! `Db::explain_hot_queries`.
//!
//! Status and busy codes are never written as numbers here: a statement that names one is built
//! once from the enums ([`with_codes`]), so its text (which the partial indexes match, e.g.
//! the Resolved code in `indexbuildstepsonresolvedtostep`) is the same as if it were spelt out.

use std::sync::LazyLock;

use super::types::{BuildStatus, BusyPhase};

/// `sql` with the codes it names filled in from the enums: `{resolved}`, `{aborted}`,
/// `{cancelled}`, `{success}` (status codes) and `{not_busy}` (busy phase).
fn with_codes(sql: &str) -> String {
    let code = |s: BuildStatus| s.code().to_string();
    sql.replace("{resolved}", &code(BuildStatus::Resolved))
        .replace("{aborted}", &code(BuildStatus::Aborted))
        .replace("{cancelled}", &code(BuildStatus::Cancelled))
        .replace("{success}", &code(BuildStatus::Success))
        .replace("{not_busy}", &BusyPhase::NotBusy.code().to_string())
}

/// A statement built by [`with_codes`] on first use.
pub(crate) type Coded = LazyLock<String>;

macro_rules! build_cols {
    () => {
        "id, jobset, job, drvpath, system, priority, globalpriority, maxsilent, timeout, \
         timestamp, finished, buildstatus, starttime, stoptime, iscachedbuild, laststepnr"
    };
}

macro_rules! step_cols {
    () => {
        "build, stepnr, type, drvpath, busy, status, errormsg, starttime, stoptime, machine, \
         system, propagatedfrom, timesbuilt, resolvedtostep"
    };
    ($p:ident) => {
        concat!(
            stringify!($p),
            ".build as ",
            stringify!($p),
            "_build, ",
            stringify!($p),
            ".stepnr as ",
            stringify!($p),
            "_stepnr, ",
            stringify!($p),
            ".type as ",
            stringify!($p),
            "_type, ",
            stringify!($p),
            ".drvpath as ",
            stringify!($p),
            "_drvpath, ",
            stringify!($p),
            ".busy as ",
            stringify!($p),
            "_busy, ",
            stringify!($p),
            ".status as ",
            stringify!($p),
            "_status, ",
            stringify!($p),
            ".errormsg as ",
            stringify!($p),
            "_errormsg, ",
            stringify!($p),
            ".starttime as ",
            stringify!($p),
            "_starttime, ",
            stringify!($p),
            ".stoptime as ",
            stringify!($p),
            "_stoptime, ",
            stringify!($p),
            ".machine as ",
            stringify!($p),
            "_machine, ",
            stringify!($p),
            ".system as ",
            stringify!($p),
            "_system, ",
            stringify!($p),
            ".propagatedfrom as ",
            stringify!($p),
            "_propagatedfrom, ",
            stringify!($p),
            ".timesbuilt as ",
            stringify!($p),
            "_timesbuilt, ",
            stringify!($p),
            ".resolvedtostep as ",
            stringify!($p),
            "_resolvedtostep"
        )
    };
}

macro_rules! realisation_cols {
    () => {
        "drvpath, outputname, outpath, build, stepnr"
    };
}

// --- jobsets ---

pub(crate) const UPSERT_JOBSET: &str = "insert into jobsets (name, schedulingshares) values ($1, $2) \
     on conflict (name) do update set schedulingshares = excluded.schedulingshares";

pub(crate) const JOBSETS: &str = "select name, schedulingshares from jobsets order by name";

// --- builds ---

pub(crate) const INSERT_BUILD: &str = "insert into builds (jobset, job, drvpath, system, priority, \
     globalpriority, maxsilent, timeout, timestamp) values ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
     returning id";

pub(crate) const GET_BUILD: &str = concat!("select ", build_cols!(), " from builds where id = $1");

/// The most recent builds, newest first (admin listing).
pub(crate) const RECENT_BUILDS: &str = concat!(
    "select ",
    build_cols!(),
    " from builds order by id desc limit $1"
);

/// The queue, in scheduling order (index `indexbuildsonunfinished`).
pub(crate) const COUNT_UNFINISHED_BUILDS: &str = "select count(*) from builds where finished = 0";

pub(crate) const UNFINISHED_BUILDS: &str = concat!(
    "select ",
    build_cols!(),
    " from builds where finished = 0 order by globalpriority desc, priority desc, id"
);

/// New queue entries after the last id seen (primary key range).
pub(crate) const UNFINISHED_BUILDS_SINCE: &str = concat!(
    "select ",
    build_cols!(),
    " from builds where id > $1 and finished = 0 order by id"
);

pub(crate) const BUILD_FINISHED: &str = "select finished from builds where id = $1";

pub(crate) const UPSERT_BUILD_OUTPUT: &str = "insert into buildoutputs (build, name, path) values ($1, $2, $3) \
     on conflict (build, name) do update set path = coalesce(excluded.path, buildoutputs.path)";

pub(crate) const BUILD_OUTPUTS: &str =
    "select name, path from buildoutputs where build = $1 order by name";

pub(crate) const FINISH_BUILD: &str = "update builds set finished = 1, buildstatus = $2, \
     starttime = coalesce($3, starttime, $4), stoptime = $4, iscachedbuild = $5 \
     where id = $1 and finished = 0";

pub(crate) static CANCEL_BUILD: Coded = LazyLock::new(|| {
    with_codes(
        "update builds set finished = 1, buildstatus = {cancelled}, \
         starttime = coalesce(starttime, $2), stoptime = $2, iscachedbuild = 0 \
         where id = $1 and finished = 0",
    )
});

pub(crate) const RESTART_BUILD: &str = "update builds set finished = 0, buildstatus = null, \
     starttime = null, stoptime = null, iscachedbuild = 0 where id = $1 and finished = 1";

/// Restarting forgets the cached failures of the build's steps (by drv path and output path).
pub(crate) const CLEAR_FAILED_STEP_DRVS: &str = "delete from failedpaths where path in \
     (select drvpath from buildsteps where build = $1)";

pub(crate) const CLEAR_FAILED_STEP_OUTPUTS: &str = "delete from failedpaths where path in \
     (select path from buildstepoutputs where build = $1 and path is not null)";

pub(crate) const BUMP_BUILD: &str =
    "update builds set globalpriority = $2 where id = $1 and finished = 0";

// --- steps ---

/// Step-number allocation: `$2` consecutive numbers of build `$1`; returns the last. Bumping the
/// build's counter locks its row until commit, so concurrent writers of one build serialise here
/// (both backends).
pub(crate) const ALLOC_STEPNRS: &str =
    "update builds set laststepnr = laststepnr + $2 where id = $1 returning laststepnr";

pub(crate) const INSERT_STEP: &str = "insert into buildsteps (build, stepnr, type, drvpath, busy, \
     status, errormsg, starttime, stoptime, machine, system, propagatedfrom, timesbuilt, \
     resolvedtostep) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)";

pub(crate) const UPSERT_STEP_OUTPUT: &str = "insert into buildstepoutputs (build, stepnr, name, path) \
     values ($1, $2, $3, $4) on conflict (build, stepnr, name) \
     do update set path = coalesce(excluded.path, buildstepoutputs.path)";

pub(crate) const STEP: &str = concat!(
    "select ",
    step_cols!(),
    " from buildsteps where build = $1 and stepnr = $2"
);

pub(crate) const STEP_STATUS: &str =
    "select status from buildsteps where build = $1 and stepnr = $2";

pub(crate) const STEPS_OF_BUILD: &str = concat!(
    "select ",
    step_cols!(),
    " from buildsteps where build = $1 order by stepnr"
);

pub(crate) const STEP_OUTPUTS: &str =
    "select name, path from buildstepoutputs where build = $1 and stepnr = $2 order by name";

pub(crate) const START_STEP: &str = "update buildsteps set busy = $3, machine = $4, starttime = $5 \
     where build = $1 and stepnr = $2 and status is null";

pub(crate) const SET_STEP_BUSY: &str =
    "update buildsteps set busy = $3 where build = $1 and stepnr = $2 and status is null";

pub(crate) static FINISH_STEP: Coded = LazyLock::new(|| {
    with_codes(
        "update buildsteps set busy = {not_busy}, status = $3, errormsg = $4, \
         stoptime = $5, timesbuilt = $6, machine = coalesce($7, machine) \
         where build = $1 and stepnr = $2 and status is null",
    )
});

/// The last statement of the resolve transaction: marks the original Resolved.
pub(crate) static MARK_RESOLVED: Coded = LazyLock::new(|| {
    with_codes(
        "update buildsteps set status = {resolved}, busy = {not_busy}, stoptime = $3, \
         resolvedtostep = $4 where build = $1 and stepnr = $2 and status is null",
    )
});

/// Restart recovery: rows left busy (index `indexbuildstepsonbusy`).
pub(crate) static BUSY_STEPS: Coded = LazyLock::new(|| {
    with_codes(concat!(
        "select ",
        step_cols!(),
        " from buildsteps where busy != {not_busy} order by build, stepnr"
    ))
});

pub(crate) static ABORT_BUSY_STEPS: Coded = LazyLock::new(|| {
    with_codes(concat!(
        "update buildsteps set busy = {not_busy}, status = {aborted}, errormsg = $2, \
         stoptime = $1 where busy != {not_busy} and status is null returning ",
        step_cols!()
    ))
});

/// Restart recovery: closes one busy row as Aborted (the rows that really stopped).
pub(crate) static ABORT_STEP: Coded = LazyLock::new(|| {
    with_codes(concat!(
        "update buildsteps set busy = {not_busy}, status = {aborted}, errormsg = $4, \
         stoptime = $3 where build = $1 and stepnr = $2 and status is null returning ",
        step_cols!()
    ))
});

/// Busy flags left on rows that already have a status (should not happen; cleared anyway),
/// leaving unfinished busy rows alone.
pub(crate) static CLEAR_FINISHED_BUSY: Coded = LazyLock::new(|| {
    with_codes(
        "update buildsteps set busy = {not_busy} where busy != {not_busy} \
         and status is not null",
    )
});

/// Busy flags left on rows that already have a status (should not happen; cleared anyway).
pub(crate) static CLEAR_STRAY_BUSY: Coded = LazyLock::new(|| {
    with_codes("update buildsteps set busy = {not_busy} where busy != {not_busy}")
});

/// The Resolved rows and the rows they point at, of the builds `o.build` is tested against (the
/// backends differ in how the unfinished builds' ids are best given to their planner).
macro_rules! resolved_steps_where {
    () => {
        concat!(
            "select ",
            step_cols!(o),
            ", ",
            step_cols!(r),
            " from buildsteps o join buildsteps r on r.build = o.build \
             and r.stepnr = o.resolvedtostep where o.status = {resolved} and o.build"
        )
    };
}

/// Restart recovery: the Resolved rows of unfinished builds and their targets. Driven by the
/// unfinished builds (index `indexbuildsonunfinished`), each probing
/// `indexbuildstepsonresolvedtostep` by build, then the primary key: the Resolved rows of finished
/// builds (history: that index grows with every resolution ever made) are never read. Unordered:
/// the caller sorts. PostgreSQL: the ids as an array (`= any(array(...))`), so the plan is the
/// index probes whatever the planner thinks of the join; SQLite: [`RESOLVED_STEPS_SQLITE`].
pub(crate) static RESOLVED_STEPS_PG: Coded = LazyLock::new(|| {
    with_codes(concat!(
        resolved_steps_where!(),
        " = any(array(select id from builds where finished = 0))"
    ))
});

/// [`RESOLVED_STEPS_PG`] on SQLite: the unfinished builds as an `in` list it probes the index with.
pub(crate) static RESOLVED_STEPS_SQLITE: Coded = LazyLock::new(|| {
    with_codes(concat!(
        resolved_steps_where!(),
        " in (select id from builds where finished = 0)"
    ))
});

/// Restart recovery: pending targets of Resolved rows in finished builds (nothing will ever
/// finish them), read through `indexbuildstepsonpending` (rows without a status: the unfinished
/// rows only), each build by its primary key, and each row's Resolved original probed by key.
/// A scalar subquery, not `exists`: PostgreSQL turns an `exists` into a semi-join, which may
/// walk the whole of `indexbuildstepsonresolvedtostep` (every Resolved row ever written).
pub(crate) static PENDING_TARGETS_OF_FINISHED: Coded = LazyLock::new(|| {
    with_codes(
        "select r.build, r.stepnr from buildsteps r join builds b on b.id = r.build \
         where r.status is null and r.busy = {not_busy} and b.finished = 1 \
         and (select o.stepnr from buildsteps o where o.build = r.build \
         and o.resolvedtostep = r.stepnr and o.status = {resolved} limit 1) is not null \
         order by r.build, r.stepnr",
    )
});

/// The steps that resolved to a given step.
pub(crate) static STEPS_RESOLVED_TO: Coded = LazyLock::new(|| {
    with_codes(concat!(
        "select ",
        step_cols!(),
        " from buildsteps where build = $1 and resolvedtostep = $2 and status = {resolved} \
         order by stepnr"
    ))
});

/// Step seconds per jobset since `$1` (index `indexbuildstepsonstoptime`).
pub(crate) const JOBSET_SECONDS: &str = "select b.jobset as jobset, \
     cast(sum(s.stoptime - s.starttime) as bigint) as seconds \
     from buildsteps s join builds b on b.id = s.build \
     where s.starttime is not null and s.stoptime is not null and s.stoptime >= $1 \
     group by b.jobset order by b.jobset";

/// The latest successful build steps that stopped at or after `$1`, newest first, at most `$2`
/// (the critical path's expected durations; index `indexbuildstepsonstoptime`, read backwards
/// from the newest and stopped after `$2` rows: never all of history).
pub(crate) static RECENT_STEP_DURATIONS: Coded = LazyLock::new(|| {
    with_codes(
        "select s.drvpath as drvpath, b.jobset as jobset, b.job as job, \
         s.stoptime - s.starttime as seconds \
         from buildsteps s join builds b on b.id = s.build \
         where s.starttime is not null and s.stoptime is not null and s.stoptime >= $1 \
         and s.status = {success} and s.type = 0 \
         order by s.stoptime desc limit $2",
    )
});

// --- failed paths ---

pub(crate) const ADD_FAILED_PATH: &str =
    "insert into failedpaths (path) values ($1) on conflict (path) do nothing";

pub(crate) const IS_FAILED_PATH: &str = "select path from failedpaths where path = $1";

pub(crate) const REMOVE_FAILED_PATH: &str = "delete from failedpaths where path = $1";

/// PostgreSQL only: one array parameter.
pub(crate) const FAILED_PATHS_AMONG_PG: &str =
    "select path from failedpaths where path = any($1) order by path";

/// SQLite: `select path from failedpaths where path in ($1, …, $n) order by path`.
pub(crate) fn failed_paths_among_sqlite(n: usize) -> String {
    let mut s = String::from("select path from failedpaths where path in (");
    for i in 1..=n {
        if i > 1 {
            s.push_str(", ");
        }
        s.push('$');
        s.push_str(&i.to_string());
    }
    s.push_str(") order by path");
    s
}

// --- realisations ---

pub(crate) const INSERT_REALISATION: &str = "insert into realisations (drvpath, outputname, outpath, \
     build, stepnr) values ($1, $2, $3, $4, $5) on conflict (drvpath, outputname) do nothing";

pub(crate) const REALISATION: &str = concat!(
    "select ",
    realisation_cols!(),
    " from realisations where drvpath = $1 and outputname = $2"
);

pub(crate) const REALISATIONS_FOR_DRVS_PG: &str = concat!(
    "select ",
    realisation_cols!(),
    " from realisations where drvpath = any($1)"
);

/// SQLite: the realisations of the drvs `$1 … $n`.
pub(crate) fn realisations_for_drvs_sqlite(n: usize) -> String {
    let mut s = String::from(concat!(
        "select ",
        realisation_cols!(),
        " from realisations where drvpath in ("
    ));
    for i in 1..=n {
        if i > 1 {
            s.push_str(", ");
        }
        s.push('$');
        s.push_str(&i.to_string());
    }
    s.push(')');
    s
}

pub(crate) const REALISATIONS_FOR_DRV: &str = concat!(
    "select ",
    realisation_cols!(),
    " from realisations where drvpath = $1 order by outputname"
);

// ------------------------------------------------ PostgreSQL: one statement, one round trip
//
// A multi-statement transaction costs a round trip per statement plus `BEGIN` and `COMMIT`;
// on PostgreSQL the step writes do the same work in one statement (its own transaction: all or
// nothing), using data-modifying `WITH` clauses. Foreign keys are checked at the end of the
// statement, so rows inserted by one clause may reference rows inserted by another.

/// The resolve transaction as one statement: only if step `$2` of build `$1` is unfinished,
/// allocates the next step number, marks `$2` Resolved (busy 0, stop time `$3`) pointing at it,
/// and inserts the resolved step under it (`$4`…`$14`) with its outputs (`$15` names, `$16`
/// paths). Returns the new number, `NULL` when nothing was done (the counter is not moved).
pub(crate) static PG_RESOLVE_STEP: Coded = LazyLock::new(|| {
    with_codes(
        "with a as (
       update builds set laststepnr = laststepnr + 1
       where id = $1
         and exists (select 1 from buildsteps where build = $1 and stepnr = $2 and status is null)
       returning laststepnr),
     m as (
       update buildsteps set status = {resolved}, busy = {not_busy}, stoptime = $3,
           resolvedtostep = a.laststepnr
       from a where build = $1 and stepnr = $2 and status is null
       returning buildsteps.build, a.laststepnr as nr),
     res as (
       insert into buildsteps (build, stepnr, type, drvpath, busy, status, errormsg, starttime,
           stoptime, machine, system, propagatedfrom, timesbuilt, resolvedtostep)
       select m.build, m.nr, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, null from m
       returning build, stepnr),
     ro as (
       insert into buildstepoutputs (build, stepnr, name, path)
       select res.build, res.stepnr, u.name, u.path
       from res, unnest($15::text[], $16::text[]) as u(name, path))
     select (select nr from m)",
    )
});

// ------------------------------------------------ PostgreSQL: many steps, one statement
//
// The writes of many step actors arriving together are coalesced (`db::batch`) into one
// statement per kind: one round trip and one commit (one WAL flush) for all of them. A write
// done alone runs the same statement with one write in it.

/// Allocates step numbers for many builds at once: `$1` build ids (unique), `$2` how many for
/// each; returns each existing build's id and its last number (the `n` numbers end there).
pub(crate) const PG_ALLOC_STEPNRS_MANY: &str = "with want as (
       select * from unnest($1::int8[], $2::int4[]) as u(id, n))
     update builds b set laststepnr = b.laststepnr + want.n
     from want where b.id = want.id
     returning b.id, b.laststepnr";

/// Inserts many step rows under numbers allocated beforehand (`$1` builds, `$2` numbers, then
/// one array per column in the order of [`INSERT_STEP`]: `$3`…`$13`, then `$14` the step each is
/// resolved to), and their outputs (`$15` builds, `$16` numbers, `$17` names, `$18` paths;
/// unique names per step). A row resolved to another is inserted with it (foreign keys are
/// checked at the end of the statement). Returns how many step rows it inserted.
pub(crate) const PG_INSERT_STEPS_MANY: &str = "with st as (
       insert into buildsteps (build, stepnr, type, drvpath, busy, status, errormsg, starttime,
           stoptime, machine, system, propagatedfrom, timesbuilt, resolvedtostep)
       select * from unnest($1::int8[], $2::int4[], $3::int4[], $4::text[], $5::int4[],
           $6::int4[], $7::text[], $8::int8[], $9::int8[], $10::text[], $11::text[], $12::int8[],
           $13::int4[], $14::int4[])
       returning build, stepnr),
     o as (
       insert into buildstepoutputs (build, stepnr, name, path)
       select * from unnest($15::int8[], $16::int4[], $17::text[], $18::text[]))
     select count(*) from st";

/// `START_STEP` for many steps (unique): `$1` builds, `$2` numbers, `$3` busy phases, `$4`
/// machines, `$5` start times. Returns the steps updated (those unfinished).
pub(crate) const PG_START_STEPS_MANY: &str = "update buildsteps b
     set busy = u.busy, machine = u.machine, starttime = u.starttime
     from unnest($1::int8[], $2::int4[], $3::int4[], $4::text[], $5::int8[])
         as u(build, stepnr, busy, machine, starttime)
     where b.build = u.build and b.stepnr = u.stepnr and b.status is null
     returning b.build, b.stepnr";

/// `INSERT_REALISATION` for many: `$1` drvs, `$2` outputs, `$3` paths, `$4` builds, `$5`
/// numbers. Returns those inserted (the others were recorded already).
pub(crate) const PG_INSERT_REALISATIONS_MANY: &str = "insert into realisations
         (drvpath, outputname, outpath, build, stepnr)
     select * from unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int4[])
     on conflict (drvpath, outputname) do nothing
     returning drvpath, outputname";

/// `FINISH_STEP` for many steps (unique), with their outputs and realisations, written only
/// for the steps it updated: `$1`…`$7` one array per argument of one finish
/// (build, number, status, error, stop time, times built, machine); outputs `$8` builds, `$9`
/// numbers, `$10` names, `$11` paths (unique names per step); realisations `$12` builds and
/// `$13` numbers of the finishing step they belong to, `$14` drvs, `$15` outputs, `$16` paths,
/// `$17` builds, `$18` numbers. Only the steps found unfinished are updated, and only their
/// outputs and realisations written. Returns one row per step updated (`'s'`, build, number)
/// and per realisation inserted (`'r'`, drv, output); a realisation not inserted was already
/// recorded.
pub(crate) static PG_FINISH_STEPS_MANY: Coded = LazyLock::new(|| {
    with_codes(
        "with f as (
       select * from unnest($1::int8[], $2::int4[], $3::int4[], $4::text[], $5::int8[],
           $6::int4[], $7::text[])
           as u(build, stepnr, status, errormsg, stoptime, timesbuilt, machine)),
     s as (
       update buildsteps b set busy = {not_busy}, status = f.status, errormsg = f.errormsg,
           stoptime = f.stoptime, timesbuilt = f.timesbuilt, machine = coalesce(f.machine, b.machine)
       from f where b.build = f.build and b.stepnr = f.stepnr and b.status is null
       returning b.build, b.stepnr),
     o as (
       insert into buildstepoutputs (build, stepnr, name, path)
       select u.build, u.stepnr, u.name, u.path
       from unnest($8::int8[], $9::int4[], $10::text[], $11::text[]) as u(build, stepnr, name, path)
       join s on s.build = u.build and s.stepnr = u.stepnr
       on conflict (build, stepnr, name)
       do update set path = coalesce(excluded.path, buildstepoutputs.path)),
     r as (
       insert into realisations (drvpath, outputname, outpath, build, stepnr)
       select w.drvpath, w.outputname, w.outpath, w.build, w.stepnr
       from unnest($12::int8[], $13::int4[], $14::text[], $15::text[], $16::text[], $17::int8[],
           $18::int4[]) as w(fbuild, fstepnr, drvpath, outputname, outpath, build, stepnr)
       join s on s.build = w.fbuild and s.stepnr = w.fstepnr
       on conflict (drvpath, outputname) do nothing
       returning drvpath, outputname)
     select 's' as kind, build, stepnr, null::text as drvpath, null::text as outputname from s
     union all
     select 'r', null, null, drvpath, outputname from r",
    )
});

/// Dynamic derivations: links step `$1`/`$2` (a row of a produced drv) to the row of the step
/// that recorded the realisation of producer `$3`'s output `$4` (none when no step did).
pub(crate) const LINK_PRODUCED_STEP: &str = "insert into producedsteps \
     (build, stepnr, output, producedbuild, producedstep) \
     select r.build, r.stepnr, r.outputname, $1, $2 from realisations r \
     where r.drvpath = $3 and r.outputname = $4 and r.build is not null \
     on conflict do nothing";

/// The links from producers' rows to the rows of the drvs they produced, of the rows of build
/// `$1` on either side: (producer build, stepnr, output, produced build, stepnr).
pub(crate) const PRODUCED_LINKS_OF_BUILD: &str = "select build, stepnr, output, producedbuild, \
     producedstep from producedsteps where producedbuild = $1 \
     union select build, stepnr, output, producedbuild, producedstep from producedsteps \
     where build = $1 order by 1, 2, 3, 4, 5";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        assert_eq!(
            failed_paths_among_sqlite(3),
            "select path from failedpaths where path in ($1, $2, $3) order by path"
        );
    }

    /// Every statement that names a code has it filled in, and none spells a status or busy
    /// code as a number.
    #[test]
    fn codes_come_from_the_enums() {
        let coded: [&str; 14] = [
            &CANCEL_BUILD,
            &FINISH_STEP,
            &MARK_RESOLVED,
            &BUSY_STEPS,
            &ABORT_BUSY_STEPS,
            &ABORT_STEP,
            &CLEAR_FINISHED_BUSY,
            &CLEAR_STRAY_BUSY,
            &RESOLVED_STEPS_PG,
            &RESOLVED_STEPS_SQLITE,
            &PENDING_TARGETS_OF_FINISHED,
            &STEPS_RESOLVED_TO,
            &PG_RESOLVE_STEP,
            &PG_FINISH_STEPS_MANY,
        ];
        for sql in coded {
            assert!(!sql.contains('{'), "{sql}");
        }
        assert!(MARK_RESOLVED.contains("status = 13, busy = 0"));
        assert!(RESOLVED_STEPS_PG.contains("where o.status = 13 and"));
        assert!(BUSY_STEPS.contains("where busy != 0 order by"));
        assert!(CANCEL_BUILD.contains("buildstatus = 4,"));
        assert!(ABORT_STEP.contains("status = 3,"));
    }

    #[test]
    fn prefixed_columns() {
        assert!(RESOLVED_STEPS_PG.contains("o.resolvedtostep as o_resolvedtostep"));
        assert!(RESOLVED_STEPS_SQLITE.contains("r.build as r_build"));
    }
}
