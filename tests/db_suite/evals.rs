//! Evaluations (`Db::record_eval` and its reads), in the two-backend suite of `db_suite.rs`.

use anyhow::{Result, ensure};
use qr::db::*;

use super::{Ctx, SYSTEM, drv, finish};

fn job(name: &str, constituents: &[&str]) -> NewEvalJob {
    NewEvalJob {
        job: name.into(),
        drv_path: drv(name),
        system: SYSTEM.into(),
        outputs: vec![("out".into(), None)],
        constituents: constituents.iter().map(|c| c.to_string()).collect(),
        max_silent: 7200,
        timeout: 36000,
        repo: None,
        rev: None,
    }
}

fn eval(jobset: &str, t: i64, jobs: Vec<NewEvalJob>, errors: Vec<EvalError>) -> NewEval {
    NewEval {
        jobset: jobset.into(),
        timestamp: t,
        source: "jobs.jsonl".into(),
        jobs,
        errors,
    }
}

fn err(line: i64, job: Option<&str>, message: &str) -> EvalError {
    EvalError {
        line,
        job: job.map(str::to_string),
        message: message.into(),
    }
}

/// Finishes build `b` with `status` through a step, as the actors do.
async fn end(db: &Db, b: BuildId, status: BuildStatus) -> Result<()> {
    let nr = db
        .create_step(b, &NewStep::build(db.get_build(b).await?.drv_path, SYSTEM))
        .await?;
    db.finish_step(&finish(b, nr, status)).await?;
    db.finish_build(&FinishBuild {
        build: b,
        status,
        start_time: None,
        stop_time: 1_700_000_200,
        is_cached: false,
        outputs: vec![],
    })
    .await?;
    Ok(())
}

pub async fn evals_record_members_errors_and_constituents(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    let e = eval(
        "js",
        1_700_000_000,
        vec![job("a", &[]), job("b", &[]), job("tested", &["a", "b"])],
        vec![
            err(2, Some("broken"), "error: boom"),
            err(5, None, "malformed JSON"),
        ],
    );
    let rec = db.record_eval(&e).await?;
    ensure!(rec.id > 0);
    let jobs: Vec<(&str, bool)> = rec
        .members
        .iter()
        .map(|m| (m.job.as_str(), m.is_new))
        .collect();
    ensure!(
        jobs == vec![("a", true), ("b", true), ("tested", true)],
        "{jobs:?}"
    );
    let [a, b, t] = [
        rec.members[0].build,
        rec.members[1].build,
        rec.members[2].build,
    ];
    // The builds: named by their job, queued at the evaluation's time, in its jobset (created).
    let row = db.get_build(t).await?;
    ensure!(row.job == "tested" && row.jobset == "js" && row.timestamp == 1_700_000_000);
    ensure!(!row.finished && row.drv_path == drv("tested"));
    ensure!(db.build_outputs(a).await?.len() == 1);
    ensure!(
        db.jobsets()
            .await?
            .iter()
            .any(|j| j.name == "js" && j.scheduling_shares == 100)
    );
    ensure!(db.unfinished_builds().await?.len() == 3);

    let d = db.eval(rec.id).await?;
    ensure!(d.summary.jobs == 3 && d.summary.new_builds == 3 && d.summary.errors == 2);
    ensure!(d.summary.queued == 3 && d.summary.succeeded == 0 && d.summary.failed == 0);
    ensure!(d.summary.source == "jobs.jsonl" && d.summary.jobset == "js");
    let names: Vec<&str> = d.members.iter().map(|(m, _)| m.job.as_str()).collect();
    ensure!(names == vec!["a", "b", "tested"], "{names:?}");
    ensure!(d.members[2].1.id == t);
    ensure!(d.errors == e.errors, "{:?}", d.errors);
    ensure!(
        d.constituents == vec![(t, a), (t, b)],
        "{:?}",
        d.constituents
    );

    // The aggregate's constituents as the queue monitor reads them.
    let states = db.unfinished_aggregates(BuildId(0)).await?;
    ensure!(states.len() == 2 && states.iter().all(|s| s.aggregate == t && !s.finished));
    ensure!(
        db.unfinished_aggregates(t).await?.is_empty(),
        "only aggregates above the id"
    );
    ensure!(db.constituents_of(a).await?.is_empty(), "a is no aggregate");
    end(db, a, BuildStatus::Success).await?;
    end(db, b, BuildStatus::Failed).await?;
    let states = db.constituents_of(t).await?;
    ensure!(
        states
            == vec![
                ConstituentState {
                    aggregate: t,
                    constituent: a,
                    finished: true,
                    status: Some(BuildStatus::Success)
                },
                ConstituentState {
                    aggregate: t,
                    constituent: b,
                    finished: true,
                    status: Some(BuildStatus::Failed)
                },
            ],
        "{states:?}"
    );
    let s = &db.evals(10).await?[0];
    ensure!(s.succeeded == 1 && s.failed == 1 && s.queued == 1, "{s:?}");
    // A finished aggregate is no longer listed.
    end(db, t, BuildStatus::DepFailed).await?;
    ensure!(db.unfinished_aggregates(BuildId(0)).await?.is_empty());
    ensure!(matches!(
        db.eval(rec.id + 100).await,
        Err(DbError::EvalNotFound(_))
    ));
    Ok(())
}

pub async fn a_drv_with_a_build_in_the_jobset_is_not_queued_again(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    let first = db
        .record_eval(&eval(
            "js",
            1_700_000_000,
            vec![job("a", &[]), job("b", &[])],
            vec![],
        ))
        .await?;
    let (a, b) = (first.members[0].build, first.members[1].build);
    // Any build of the drv counts, finished or not (as Hydra reuses it).
    end(db, a, BuildStatus::Failed).await?;
    let mut c = job("c", &[]);
    // Two jobs with one drv in one evaluation share one build.
    let mut c2 = job("c-alias", &[]);
    c2.drv_path = c.drv_path.clone();
    c.constituents = vec![];
    let second = db
        .record_eval(&eval(
            "js",
            1_700_000_100,
            vec![job("a", &[]), job("b", &[]), c, c2],
            vec![],
        ))
        .await?;
    let m: Vec<(&str, BuildId, bool)> = second
        .members
        .iter()
        .map(|m| (m.job.as_str(), m.build, m.is_new))
        .collect();
    ensure!(second.id > first.id);
    ensure!(m[0] == ("a", a, false) && m[1] == ("b", b, false), "{m:?}");
    ensure!(m[2].2 && m[3] == ("c-alias", m[2].1, true), "{m:?}");
    ensure!(
        db.recent_builds(100).await?.len() == 3,
        "a, b and c: no build twice"
    );
    let s = &db.evals(10).await?[0];
    ensure!(
        s.id == second.id && s.jobs == 4 && s.new_builds == 2,
        "{s:?}"
    );
    ensure!(s.failed == 1 && s.queued == 3, "{s:?}");
    // Another jobset has its own builds.
    let other = db
        .record_eval(&eval("other", 1_700_000_200, vec![job("a", &[])], vec![]))
        .await?;
    ensure!(other.members[0].is_new && other.members[0].build != a);
    ensure!(db.evals(2).await?.len() == 2 && db.evals(10).await?.len() == 3);
    Ok(())
}

/// Arms database faults: only with the `test-hooks` feature.
#[cfg(feature = "test-hooks")]
pub async fn record_eval_is_one_transaction(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    // Refused before anything is written.
    let dup = db
        .record_eval(&eval("js", 1, vec![job("a", &[]), job("a", &[])], vec![]))
        .await;
    ensure!(matches!(dup, Err(DbError::Invalid(_))), "{dup:?}");
    let dangling = db
        .record_eval(&eval("js", 1, vec![job("t", &["nope"])], vec![]))
        .await;
    ensure!(matches!(dangling, Err(DbError::Invalid(_))), "{dangling:?}");
    ensure!(db.evals(10).await?.is_empty() && db.recent_builds(10).await?.is_empty());
    // A lost commit reply is read back: one evaluation, each build once.
    for (i, lost) in [FaultPoint::CommitLostBefore, FaultPoint::CommitLostAfter]
        .into_iter()
        .enumerate()
    {
        let t = 1_700_000_000 + i as i64;
        let jobs = vec![
            job(&format!("x{i}"), &[]),
            job(&format!("agg{i}"), &[&format!("x{i}")]),
        ];
        db.arm_fault(lost);
        let rec = db
            .record_eval(&eval("js", t, jobs, vec![err(3, None, "bad")]))
            .await?;
        let all = db.evals(10).await?;
        ensure!(all.len() == i + 1, "{lost:?}: {all:?}");
        ensure!(
            all[0].id == rec.id && all[0].jobs == 2 && all[0].errors == 1,
            "{lost:?}"
        );
        ensure!(rec.members.len() == 2 && rec.members.iter().all(|m| m.is_new));
        ensure!(db.recent_builds(10).await?.len() == 2 * (i + 1), "{lost:?}");
        ensure!(db.eval(rec.id).await?.constituents.len() == 1, "{lost:?}");
    }
    db.disarm_faults();
    Ok(())
}
