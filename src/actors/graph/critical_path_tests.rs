use super::*;

fn d(s: &str) -> Drv {
    s.into()
}

/// A full recompute from scratch, to check the incremental values against.
fn brute(cp: &CriticalPath, drv: &str) -> u64 {
    let n = &cp.nodes[drv];
    n.own_ms + n.dependents.iter().map(|x| brute(cp, x)).max().unwrap_or(0)
}

#[test]
fn a_chain_adds_up_towards_the_build() {
    let mut cp = CriticalPath::new();
    cp.insert(&d("a"), 10, &[]);
    cp.insert(&d("b"), 20, &[d("a")]);
    cp.insert(&d("top"), 5, &[d("b")]);
    assert_eq!(cp.value("top"), Some(5));
    assert_eq!(cp.value("b"), Some(25));
    assert_eq!(cp.value("a"), Some(35));
}

#[test]
fn the_longest_dependent_counts() {
    let mut cp = CriticalPath::new();
    cp.insert(&d("lib"), 10, &[]);
    cp.insert(&d("short"), 1, &[d("lib")]);
    cp.insert(&d("long"), 100, &[d("lib")]);
    assert_eq!(cp.value("lib"), Some(110));
    // Adding the shorter one after the longer changes nothing.
    let changes = cp.insert(&d("short2"), 2, &[d("lib")]);
    assert_eq!(changes, vec![(d("short2"), 2)]);
    assert_eq!(cp.value("lib"), Some(110));
}

#[test]
fn a_new_build_sharing_a_step_raises_it_and_its_inputs_only() {
    let mut cp = CriticalPath::new();
    // build 1: top1 <- mid <- base; an unrelated chain x <- y.
    cp.insert(&d("base"), 1, &[]);
    cp.insert(&d("mid"), 2, &[d("base")]);
    cp.insert(&d("top1"), 3, &[d("mid")]);
    cp.insert(&d("x"), 4, &[]);
    cp.insert(&d("y"), 5, &[d("x")]);
    assert_eq!(cp.value("base"), Some(6));
    // build 2 needs mid through a long step.
    let changes = cp.insert(&d("top2"), 50, &[d("mid")]);
    assert_eq!(
        changes,
        vec![(d("top2"), 50), (d("mid"), 52), (d("base"), 53)]
    );
    assert_eq!(cp.value("top1"), Some(3));
    assert_eq!(cp.value("x"), Some(9));
}

#[test]
fn a_rise_stops_where_values_no_longer_change() {
    let mut cp = CriticalPath::new();
    // A long chain below `hub`, already dominated by a long dependent.
    let chain: Vec<Drv> = (0..100).map(|i| d(&format!("c{i}"))).collect();
    cp.insert(&chain[0], 1, &[]);
    for i in 1..100 {
        cp.insert(&chain[i], 1, &[chain[i - 1].clone()]);
    }
    cp.insert(&d("long"), 1000, &[chain[99].clone()]);
    let before = cp.visits();
    // A short dependent of the chain's top changes nothing below it: the new step and its input
    // are visited, the chain below is not.
    let changes = cp.insert(&d("short"), 1, &[chain[99].clone()]);
    assert_eq!(changes, vec![(d("short"), 1)]);
    assert_eq!(cp.visits() - before, 2);
}

#[test]
fn removing_a_dependent_lowers_what_it_raised() {
    let mut cp = CriticalPath::new();
    cp.insert(&d("base"), 1, &[]);
    cp.insert(&d("top1"), 3, &[d("base")]);
    cp.insert(&d("top2"), 50, &[d("base")]);
    assert_eq!(cp.value("base"), Some(51));
    let changes = cp.remove("top2");
    assert_eq!(changes, vec![(d("base"), 4)]);
    assert_eq!(cp.value("base"), Some(4));
    assert_eq!(cp.value("top2"), None);
    // Removing an input (it was built) leaves its dependents as they are.
    assert!(cp.remove("base").is_empty());
    assert_eq!(cp.value("top1"), Some(3));
    assert!(cp.remove("nope").is_empty());
}

#[test]
fn linking_tracked_steps_and_untracked_inputs() {
    let mut cp = CriticalPath::new();
    cp.insert(&d("child"), 7, &[]);
    // "built" is not tracked: skipped.
    cp.insert(&d("parent"), 3, &[d("built")]);
    assert_eq!(cp.value("child"), Some(7));
    cp.link(&d("child"), &d("parent"));
    assert_eq!(cp.value("child"), Some(10));
    // Twice is once.
    assert!(cp.link(&d("child"), &d("parent")).is_empty());
    assert!(cp.link(&d("child"), &d("nope")).is_empty());
}

/// Seeded random DAGs, built and torn down in random order: the incremental values always equal
/// a full recompute.
#[test]
fn incremental_values_match_a_full_recompute() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _round in 0..20 {
        let mut cp = CriticalPath::new();
        let mut live: Vec<Drv> = Vec::new();
        for i in 0..200 {
            let drv = d(&format!("s{i}"));
            let k = if live.is_empty() { 0 } else { rnd(4) };
            let inputs: Vec<Drv> = (0..k)
                .map(|_| live[rnd(live.len() as u64) as usize].clone())
                .collect();
            if rnd(2) == 0 {
                cp.insert(&drv, 1 + rnd(1000), &inputs);
            } else {
                // A small plan: the step and a new dependent of it.
                let top = d(&format!("t{i}"));
                cp.insert_all(&[
                    (drv.clone(), 1 + rnd(1000), inputs),
                    (top.clone(), 1 + rnd(1000), vec![drv.clone()]),
                ]);
                live.push(top);
            }
            live.push(drv);
            if rnd(5) == 0 {
                let gone = live.remove(rnd(live.len() as u64) as usize);
                cp.remove(&gone);
            }
            for s in &live {
                assert_eq!(cp.value(s), Some(brute(&cp, s)), "step {s}");
            }
        }
    }
}

/// A whole plan added at once (inputs first) costs one visit per step, however deep it is; the
/// same plan added step by step would raise each chain below again.
#[test]
fn a_plan_added_at_once_visits_each_step_once() {
    let chain: Vec<Drv> = (0..1000).map(|i| d(&format!("c{i}"))).collect();
    let plan: Vec<(Drv, u64, Vec<Drv>)> = chain
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let inputs = if i == 0 {
                vec![]
            } else {
                vec![chain[i - 1].clone()]
            };
            (c.clone(), 2, inputs)
        })
        .collect();
    let mut cp = CriticalPath::new();
    let changes = cp.insert_all(&plan);
    assert_eq!(changes.len(), 1000);
    assert_eq!(cp.visits(), 1000);
    assert_eq!(cp.value("c0"), Some(2000));
    assert_eq!(cp.value("c999"), Some(2));
    // A second plan on top of it (a new build sharing the chain): the chain rises once.
    let before = cp.visits();
    cp.insert_all(&[(d("top"), 10, vec![chain[999].clone()])]);
    assert_eq!(cp.value("c0"), Some(2010));
    assert_eq!(cp.visits() - before, 1 + 1000);
}
