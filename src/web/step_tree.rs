//! A build's steps as a tree (`/api/builds/{id}/tree`): its `BuildSteps` rows, each with the
//! rows it links to as children.
//!
//! Two links exist: a CA step that resolved points at the step of its resolved drv
//! (`resolvedToStep`, `rel: "resolved"`), and a step whose output holds a drv points at the rows
//! of that produced drv's step (dynamic derivations: `producedsteps`, `rel: "produced"`). The
//! answer is a flat list of rows plus typed edges (`{from, to, rel}`); the page nests every edge
//! the same way and labels it by `rel`. Only links between two rows of the build are edges (a
//! producer or produced row of another build is in the build's gRPC detail, not in its tree).

use std::collections::{BTreeMap, BTreeSet};

use crate::grpc::admin::admin_v1::{Build, ProducedLink, Step};

/// A link from one step row to another.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Edge {
    pub from: i32,
    pub to: i32,
    /// `"resolved"`: `to` is the step of `from`'s resolved drv; `"produced"`: `to` is a row of
    /// the drv an output of `from` holds.
    pub rel: &'static str,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepTree {
    pub build: Option<Build>,
    pub steps: Vec<Step>,
    pub edges: Vec<Edge>,
    /// Steps no edge points to, by step number: the tree's roots.
    pub roots: Vec<i32>,
}

/// The tree of `steps` and the `produced` links (a link to a step that is not a row of the build
/// is dropped).
pub fn step_tree(build: Option<Build>, steps: Vec<Step>, produced: &[ProducedLink]) -> StepTree {
    let nrs: BTreeSet<i32> = steps.iter().map(|s| s.stepnr).collect();
    let id = build
        .as_ref()
        .map(|b| b.id)
        .or_else(|| steps.first().map(|s| s.build));
    let mut edges: Vec<Edge> = steps
        .iter()
        .filter(|s| s.resolved_to_step != 0 && s.resolved_to_step != s.stepnr)
        .filter(|s| nrs.contains(&s.resolved_to_step))
        .map(|s| Edge {
            from: s.stepnr,
            to: s.resolved_to_step,
            rel: "resolved",
        })
        .collect();
    edges.extend(
        produced
            .iter()
            .filter(|l| Some(l.build) == id && Some(l.produced_build) == id)
            .filter(|l| l.stepnr != l.produced_step)
            .filter(|l| nrs.contains(&l.stepnr) && nrs.contains(&l.produced_step))
            .map(|l| Edge {
                from: l.stepnr,
                to: l.produced_step,
                rel: "produced",
            }),
    );
    edges.sort_by_key(|e| (e.from, e.to, e.rel));
    edges.dedup();
    let targets: BTreeSet<i32> = edges.iter().map(|e| e.to).collect();
    let mut roots: Vec<i32> = nrs
        .iter()
        .copied()
        .filter(|n| !targets.contains(n))
        .collect();
    // Steps that only sit on a cycle of links (the database does not allow one, but) still show.
    let mut reached: BTreeSet<i32> = BTreeSet::new();
    let by_from: BTreeMap<i32, Vec<i32>> = edges.iter().fold(BTreeMap::new(), |mut m, e| {
        m.entry(e.from).or_insert_with(Vec::new).push(e.to);
        m
    });
    let mut stack = roots.clone();
    while let Some(n) = stack.pop() {
        if reached.insert(n) {
            stack.extend(by_from.get(&n).into_iter().flatten().copied());
        }
    }
    for n in &nrs {
        if !reached.contains(n) {
            roots.push(*n);
            let mut stack = vec![*n];
            while let Some(m) = stack.pop() {
                if reached.insert(m) {
                    stack.extend(by_from.get(&m).into_iter().flatten().copied());
                }
            }
        }
    }
    roots.sort_unstable();
    StepTree {
        build,
        steps,
        edges,
        roots,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(nr: i32, resolved_to: i32) -> Step {
        Step {
            stepnr: nr,
            resolved_to_step: resolved_to,
            ..Step::default()
        }
    }

    #[test]
    fn resolved_steps_hang_under_the_step_that_resolved() {
        // 1 and 2 built; 3 resolved to 4, which resolved to 5 (a chain); 6 links nowhere known.
        let t = step_tree(
            None,
            vec![
                step(1, 0),
                step(2, 0),
                step(3, 4),
                step(4, 5),
                step(5, 0),
                step(6, 99),
            ],
            &[],
        );
        assert_eq!(t.roots, [1, 2, 3, 6]);
        assert_eq!(
            t.edges,
            [
                Edge {
                    from: 3,
                    to: 4,
                    rel: "resolved"
                },
                Edge {
                    from: 4,
                    to: 5,
                    rel: "resolved"
                }
            ]
        );
    }

    #[test]
    fn a_cycle_of_links_still_shows_each_step() {
        let t = step_tree(None, vec![step(1, 2), step(2, 1), step(3, 3)], &[]);
        assert_eq!(t.roots, [1, 3]);
        assert_eq!(t.edges.len(), 2);
    }

    fn link(build: i64, nr: i32, produced_build: i64, produced: i32) -> ProducedLink {
        ProducedLink {
            build,
            stepnr: nr,
            output: "out.drv".into(),
            produced_build,
            produced_step: produced,
        }
    }

    #[test]
    fn produced_steps_hang_under_their_producer_and_other_builds_rows_are_left_out() {
        // 1 produced the drv of 2 (which resolved to 3) and of 4; 5 was produced by a row of
        // build 8, and 1 also produced a row of build 9: neither is an edge of build 7's tree.
        let steps: Vec<Step> = [(1, 0), (2, 3), (3, 0), (4, 0), (5, 0)]
            .into_iter()
            .map(|(n, r)| Step {
                build: 7,
                ..step(n, r)
            })
            .collect();
        let links = [
            link(7, 1, 7, 2),
            link(7, 1, 7, 4),
            link(8, 1, 7, 5),
            link(7, 1, 9, 1),
        ];
        let t = step_tree(None, steps, &links);
        let edges: Vec<(i32, i32, &str)> = t.edges.iter().map(|e| (e.from, e.to, e.rel)).collect();
        assert_eq!(
            edges,
            [(1, 2, "produced"), (1, 4, "produced"), (2, 3, "resolved")]
        );
        assert_eq!(t.roots, [1, 5]);
    }
}
