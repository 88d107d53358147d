//! Dynamic derivations: the rows of a produced drv's step link to the row of the step whose
//! output holds it (`producedsteps`), in the transaction that creates them.

use anyhow::{Result, ensure};
use qr::db::types::*;
use qr::db::*;

use super::{Ctx, SYSTEM, drv, finish, new_build};

/// Build `b`'s producer of `out.drv`, finished with its realisation naming its row.
async fn producer(db: &Db, b: BuildId, name: &str, produced: &str) -> Result<StepNr> {
    let mut p = NewStep::build(drv(name), SYSTEM);
    p.outputs = vec![("out.drv".into(), None)];
    let nr = db.create_step(b, &p).await?;
    let mut f = finish(b, nr, BuildStatus::Success);
    f.outputs = vec![("out.drv".into(), Some(produced.to_string()))];
    f.realisations = vec![Realisation {
        drv_path: drv(name),
        output_name: "out.drv".into(),
        out_path: produced.to_string(),
        build: Some(b),
        stepnr: Some(nr),
    }];
    db.finish_step(&f).await?;
    Ok(nr)
}

fn produced_step(name: &str, by: &[(&str, &str)]) -> NewStep {
    let mut s = NewStep::build(drv(name), SYSTEM);
    s.produced_by = by.iter().map(|(p, o)| (drv(p), o.to_string())).collect();
    s
}

fn link(b: BuildId, nr: StepNr, pb: BuildId, pnr: StepNr) -> ProducedLink {
    ProducedLink {
        build: b,
        stepnr: nr,
        output: "out.drv".into(),
        produced_build: pb,
        produced_step: pnr,
    }
}

pub async fn produced_rows_link_to_their_producers_row(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    db.create_jobset("main", 100).await?;
    let b = db.create_build(&new_build("dyn", 0, 0)).await?;
    let other = db.create_build(&new_build("other", 0, 0)).await?;
    let p1 = producer(db, b, "p1", &drv("d")).await?;
    let p2 = producer(db, b, "p2", &drv("d")).await?;

    // Two producers making one drv: its row links to both.
    let d = db
        .create_step(
            b,
            &produced_step("d", &[("p1", "out.drv"), ("p2", "out.drv")]),
        )
        .await?;
    let want = vec![link(b, p1, b, d), link(b, p2, b, d)];
    ensure!(
        db.produced_links(b).await? == want,
        "{:?}",
        db.produced_links(b).await?
    );

    // A produced drv that resolves: its own row (Resolved) links, not the resolved one's.
    let (own, child) = db
        .create_and_resolve_step(
            b,
            &produced_step("e", &[("p1", "out.drv")]),
            &NewStep::build(drv("e-resolved"), SYSTEM),
            1_700_000_050,
        )
        .await?;
    let links = db.produced_links(b).await?;
    ensure!(links.contains(&link(b, p1, b, own)), "{links:?}");
    ensure!(!links.iter().any(|l| l.produced_step == child), "{links:?}");

    // A row in another build links to the producer's row in this one, seen from both builds.
    let o = db
        .create_step(other, &produced_step("d", &[("p1", "out.drv")]))
        .await?;
    let cross = link(b, p1, other, o);
    ensure!(db.produced_links(b).await?.contains(&cross));
    ensure!(db.produced_links(other).await? == vec![cross]);

    // A producer no step recorded (built before, or not at all) links nothing and fails nothing.
    let n = db
        .create_step(b, &produced_step("f", &[("nobody", "out.drv")]))
        .await?;
    ensure!(
        !db.produced_links(b)
            .await?
            .iter()
            .any(|l| l.produced_step == n)
    );
    ensure!(db.step(b, n).await?.drv_path == drv("f"));
    Ok(())
}

/// A failure between the produced row and its links leaves neither.
#[cfg(feature = "test-hooks")]
pub async fn a_produced_row_and_its_links_commit_together(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    db.create_jobset("main", 100).await?;
    let b = db.create_build(&new_build("dyn", 0, 0)).await?;
    let p = producer(db, b, "p", &drv("d")).await?;
    let rows = db.steps_of_build(b).await?.len();
    db.arm_fault(FaultPoint::LinkProducedAfterRow);
    let r = db
        .create_step(b, &produced_step("d", &[("p", "out.drv")]))
        .await;
    ensure!(
        matches!(
            r,
            Err(DbError::FaultInjected(FaultPoint::LinkProducedAfterRow))
        ),
        "{r:?}"
    );
    ensure!(db.steps_of_build(b).await?.len() == rows, "the row stayed");
    ensure!(db.produced_links(b).await?.is_empty());
    let d = db
        .create_step(b, &produced_step("d", &[("p", "out.drv")]))
        .await?;
    ensure!(db.produced_links(b).await? == vec![link(b, p, b, d)]);
    Ok(())
}
