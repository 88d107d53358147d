use std::cell::Cell;

use super::*;

thread_local! {
    /// Builds whose actor died (without saying so) in the current test.
    static DEAD: Cell<i64> = const { Cell::new(0) };
}

/// A build actor's address is its build id.
struct Ids;

impl Routes for Ids {
    type Build = i64;
    fn alive(b: &i64) -> bool {
        DEAD.with(|d| d.get()) != *b
    }
}

fn build(id: i64, finished: bool) -> Build {
    Build {
        id: BuildId(id),
        jobset: "js".into(),
        job: format!("job{id}"),
        drv_path: format!("/s/{id}.drv"),
        system: "x86_64-linux".into(),
        priority: 0,
        global_priority: 0,
        max_silent: 0,
        timeout: 0,
        timestamp: 0,
        finished,
        build_status: None,
        start_time: None,
        stop_time: None,
        is_cached_build: false,
        last_step_nr: 0,
    }
}

fn drain(c: &mut QueueCore<Ids>) -> Vec<Cmd<Ids>> {
    std::iter::from_fn(|| c.poll()).collect()
}

fn spawned(cmds: &[Cmd<Ids>]) -> Vec<i64> {
    cmds.iter()
        .flat_map(|c| match c {
            Cmd::Spawn(rows) => rows.iter().map(|r| r.id.0).collect(),
            _ => vec![],
        })
        .collect()
}

fn reads(cmds: &[Cmd<Ids>]) -> Vec<Option<BuildId>> {
    cmds.iter()
        .filter_map(|c| match c {
            Cmd::Read { after } => Some(*after),
            _ => None,
        })
        .collect()
}

/// Feeds a read's rows and acknowledges what was spawned, as the actor does.
fn read(c: &mut QueueCore<Ids>, rows: Vec<Build>, gates: BTreeMap<i64, Gate>) -> Vec<Cmd<Ids>> {
    c.on(In::Read {
        shares: vec![],
        rows: Ok((rows, gates)),
    });
    let cmds = drain(c);
    let ids = spawned(&cmds);
    if !ids.is_empty() {
        c.on(In::Spawned(ids.iter().map(|&i| (i, i)).collect()));
        drain(c);
    }
    cmds
}

#[test]
fn it_listens_before_it_reads_and_reads_everything_after_a_failed_listen() {
    let mut c = QueueCore::<Ids>::default();
    c.on(In::Start);
    assert!(matches!(drain(&mut c)[..], [Cmd::Listen]));
    c.on(In::Listening(Err("down".into())));
    let cmds = drain(&mut c);
    assert!(matches!(&cmds[0], Cmd::RestartSoon(r) if r.contains("down")));
    assert_eq!(reads(&cmds), vec![None]);
}

#[test]
fn unfinished_builds_get_one_actor_each_and_added_builds_are_read_after_the_last_id() {
    let mut c = QueueCore::<Ids>::default();
    let cmds = read(
        &mut c,
        vec![build(1, false), build(2, true), build(3, false)],
        BTreeMap::new(),
    );
    assert_eq!(spawned(&cmds), vec![1, 3]);
    assert_eq!(c.active(), 2);
    // Read again: nothing twice.
    assert!(
        spawned(&read(
            &mut c,
            vec![build(1, false), build(3, false)],
            BTreeMap::new()
        ))
        .is_empty()
    );
    c.on(In::Queue(QueueEvent::BuildsAdded(None)));
    assert_eq!(reads(&drain(&mut c)), vec![Some(BuildId(3))]);
    c.on(In::Queue(QueueEvent::Rescan));
    assert_eq!(reads(&drain(&mut c)), vec![None]);
}

#[test]
fn a_build_whose_actor_died_gets_a_new_one_at_the_next_read() {
    let mut c = QueueCore::<Ids>::default();
    read(&mut c, vec![build(1, false)], BTreeMap::new());
    DEAD.with(|d| d.set(1));
    assert_eq!(
        spawned(&read(&mut c, vec![build(1, false)], BTreeMap::new())),
        vec![1]
    );
    DEAD.with(|d| d.set(0));
}

#[test]
fn a_failed_read_is_tried_again_soon() {
    let mut c = QueueCore::<Ids>::default();
    c.on(In::Read {
        shares: vec![Jobset {
            name: "js".into(),
            scheduling_shares: 0,
        }],
        rows: Err("gone".into()),
    });
    let cmds = drain(&mut c);
    assert!(matches!(&cmds[0], Cmd::Shares(s) if s == &vec![("js".to_string(), 1)]));
    assert!(matches!(cmds[1], Cmd::ReadSoon));
}

#[test]
fn an_aggregate_waits_for_its_constituents_and_starts_when_the_last_one_finishes() {
    let mut c = QueueCore::<Ids>::default();
    let gates = BTreeMap::from([(10, Gate::Waiting([1, 2].into()))]);
    let cmds = read(
        &mut c,
        vec![build(1, false), build(2, false), build(10, false)],
        gates,
    );
    assert_eq!(spawned(&cmds), vec![1, 2]);
    assert_eq!(c.held(), 1);
    // A constituent finished: the aggregate is looked at again.
    c.on(In::BuildDone(1));
    assert!(drain(&mut c).iter().any(|c| matches!(c, Cmd::Regate(10))));
    c.on(In::Regated {
        aggregate: 10,
        result: Ok((build(10, false), Gate::Waiting([2].into()))),
    });
    assert!(spawned(&drain(&mut c)).is_empty());
    c.on(In::BuildDone(2));
    drain(&mut c);
    c.on(In::Regated {
        aggregate: 10,
        result: Ok((build(10, false), Gate::Ready)),
    });
    assert_eq!(spawned(&drain(&mut c)), vec![10]);
    assert_eq!(c.held(), 0);
}

#[test]
fn an_aggregate_with_a_failed_constituent_is_ended_once_however_often_it_is_read() {
    let mut c = QueueCore::<Ids>::default();
    let failed = Gate::Failed {
        constituent: BuildId(1),
        status: BuildStatus::Failed,
    };
    let gates = BTreeMap::from([(10, failed.clone())]);
    let ends = |cmds: &[Cmd<Ids>]| {
        cmds.iter()
            .filter(|c| matches!(c, Cmd::FailAggregate { row, .. } if row.id.0 == 10))
            .count()
    };
    assert_eq!(
        ends(&read(&mut c, vec![build(10, false)], gates.clone())),
        1
    );
    assert_eq!(
        ends(&read(&mut c, vec![build(10, false)], gates.clone())),
        0
    );
    // Once ended (or failed to end), the next read may try again.
    c.on(In::AggregateEnded(10));
    assert_eq!(ends(&read(&mut c, vec![build(10, false)], gates)), 1);
}

#[test]
fn cancels_and_bumps_reach_only_live_build_actors() {
    let mut c = QueueCore::<Ids>::default();
    read(
        &mut c,
        vec![build(1, false), build(2, false)],
        BTreeMap::new(),
    );
    c.on(In::Queue(QueueEvent::BuildsCancelled(Some(BuildId(2)))));
    assert!(matches!(drain(&mut c)[..], [Cmd::Cancel(2)]));
    c.on(In::Queue(QueueEvent::BuildsCancelled(Some(BuildId(9)))));
    assert!(drain(&mut c).is_empty());
    c.on(In::Queue(QueueEvent::BuildsBumped(None)));
    assert!(matches!(&drain(&mut c)[..], [Cmd::Bump(t)] if t == &vec![(1, 1), (2, 2)]));
    c.on(In::Queue(QueueEvent::BuildsBumped(Some(BuildId(9)))));
    assert!(drain(&mut c).is_empty());
    c.on(In::Restart("operator".into()));
    assert!(matches!(drain(&mut c)[..], [Cmd::Stop]));
}
