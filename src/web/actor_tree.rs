//! The supervision tree as the dashboard shows it (`/api/actors/tree`): the live actors
//! ([`Admin::actors`](crate::grpc::admin::Admin::actors)) folded into a tree on the server, so the
//! page receives only the rows it shows, whether 10 actors are alive or 100,000.
//!
//! - The actors' links form a DAG (a step shared by two builds has two parents). Each actor is
//!   shown once, under the first parent that reaches it breadth-first from the roots (the queue
//!   monitor, then the dispatcher); its other parents are counted (`other_parents`). Actors no
//!   root reaches become roots themselves, grouped under one synthetic node per kind
//!   ([`UNATTACHED`]) so that 10,000 detached steps are one row.
//! - Collapsed by default: a node lists its children only when it is open — named in `open`, or
//!   every node when fewer than `auto_open` actors are alive (a small tree reads best whole) and
//!   it is not named in `closed`. An open node shows at most `page` children and counts the rest
//!   (`more`).
//! - Searchable: with a query, the tree is filtered to the first `max_matches` actors whose id,
//!   kind, state or detail contain it (case-insensitively) and the paths to them, open down to
//!   each match; the number of all matches is returned.
//! - At most [`MAX_DEPTH`] levels are shown.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::grpc::admin::admin_v1::Actor;

/// The id prefix of the synthetic roots that hold actors no root reaches (`unattached:step`).
pub const UNATTACHED: &str = "unattached:";

/// Levels shown at most: a node this deep is shown closed (the page nests one list per level,
/// and a chain of 10,000 steps would nest 10,000).
pub const MAX_DEPTH: usize = 200;

/// What the page asks for.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct TreeQuery {
    /// Newline-separated ids of nodes opened by the user.
    pub open: String,
    /// Newline-separated ids of nodes closed by the user (they stay closed under `auto_open`).
    pub closed: String,
    /// The search text (empty: no search).
    pub q: String,
    /// Children shown per open node.
    pub page: usize,
    /// Matches shown at most.
    pub max_matches: usize,
    /// Below this many live actors every node starts open.
    pub auto_open: usize,
}

impl Default for TreeQuery {
    fn default() -> Self {
        TreeQuery {
            open: String::new(),
            closed: String::new(),
            q: String::new(),
            page: 100,
            max_matches: 50,
            auto_open: 200,
        }
    }
}

/// One row of the tree.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Node {
    pub id: String,
    pub kind: String,
    pub state: String,
    pub detail: String,
    pub handled: u64,
    pub restarts: u64,
    pub blocked: bool,
    pub queued_effects: u64,
    /// How this node hangs under its parent: `"resolved"` for a step's resolved child, `""`
    /// otherwise.
    pub rel: &'static str,
    /// Parents besides the one it is shown under.
    pub other_parents: usize,
    /// Children in the tree (each shown under this node).
    pub child_count: usize,
    /// Actors below it (children, their children, …).
    pub descendants: usize,
    pub open: bool,
    /// It matches the search.
    #[serde(rename = "match")]
    pub is_match: bool,
    /// The children shown (empty unless open).
    pub children: Vec<Node>,
    /// Children not shown (past `page`, or not on a path to a match).
    pub more: usize,
}

/// The whole answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Tree {
    /// Live actors.
    pub total: usize,
    /// Live actors by kind and by state, most first.
    pub by_kind: Vec<(String, usize)>,
    pub by_state: Vec<(String, usize)>,
    pub q: String,
    /// Actors matching `q` (all of them; at most `max_matches` are shown).
    pub matches: usize,
    pub shown_matches: usize,
    /// Whether nodes start open (fewer than `auto_open` actors).
    pub auto_open: bool,
    pub roots: Vec<Node>,
    /// Rows in this answer.
    pub rows: usize,
}

/// The spanning tree of the actors' DAG: each actor's children in the tree, and the roots.
struct Spanning<'a> {
    actors: Vec<&'a Actor>,
    index: HashMap<&'a str, usize>,
    /// Synthetic roots (`unattached:KIND`) are indices past `actors.len()`.
    synthetic: Vec<String>,
    kids: Vec<Vec<usize>>,
    parent: Vec<Option<usize>>,
    roots: Vec<usize>,
    descendants: Vec<usize>,
}

fn is_root(a: &Actor) -> bool {
    a.kind == "queue_monitor" || a.kind == "dispatcher"
}

fn base(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

impl<'a> Spanning<'a> {
    fn new(all: &'a [Actor]) -> Self {
        let mut actors: Vec<&Actor> = all.iter().collect();
        // Roots first, in a stable order; then everything else by id.
        actors.sort_by(|a, b| {
            (!is_root(a), a.kind != "queue_monitor", &a.id).cmp(&(
                !is_root(b),
                b.kind != "queue_monitor",
                &b.id,
            ))
        });
        actors.dedup_by(|a, b| a.id == b.id);
        let index: HashMap<&str, usize> = actors
            .iter()
            .enumerate()
            .map(|(i, a)| (a.id.as_str(), i))
            .collect();
        let n = actors.len();
        let mut s = Spanning {
            actors,
            index,
            synthetic: vec![],
            kids: vec![vec![]; n],
            parent: vec![None; n],
            roots: vec![],
            descendants: vec![],
        };
        let mut reached = vec![false; n];
        let mut queue = VecDeque::new();
        s.roots = (0..n).filter(|&i| is_root(s.actors[i])).collect();
        for &i in &s.roots {
            reached[i] = true;
            queue.push_back(i);
        }
        s.walk(&mut reached, &mut queue);
        // Actors no root reaches: the topmost of them (no parent among the unreached, or on a
        // cycle) go under a synthetic root per kind, and what they reach under them.
        let mut groups: Vec<(String, Vec<usize>)> = vec![];
        for i in 0..n {
            if reached[i] {
                continue;
            }
            let a = s.actors[i];
            let has_live_parent = a.parents.iter().any(|p| {
                s.index
                    .get(p.as_str())
                    .is_some_and(|&j| !reached[j] && j != i)
            });
            if has_live_parent {
                continue;
            }
            reached[i] = true;
            queue.push_back(i);
            s.walk(&mut reached, &mut queue);
            match groups.iter_mut().find(|(k, _)| *k == a.kind) {
                Some((_, v)) => v.push(i),
                None => groups.push((a.kind.clone(), vec![i])),
            }
        }
        // What is left sits on cycles of unreached actors: the first of each cycle starts it.
        for i in 0..n {
            if !reached[i] {
                reached[i] = true;
                queue.push_back(i);
                s.walk(&mut reached, &mut queue);
                let kind = s.actors[i].kind.clone();
                match groups.iter_mut().find(|(k, _)| *k == kind) {
                    Some((_, v)) => v.push(i),
                    None => groups.push((kind, vec![i])),
                }
            }
        }
        for (kind, members) in groups {
            let g = n + s.synthetic.len();
            s.synthetic.push(format!("{UNATTACHED}{kind}"));
            s.kids.push(members.clone());
            s.parent.push(None);
            for m in members {
                s.parent[m] = Some(g);
            }
            s.roots.push(g);
        }
        s.count_descendants();
        s
    }

    fn walk(&mut self, reached: &mut [bool], queue: &mut VecDeque<usize>) {
        while let Some(i) = queue.pop_front() {
            let a = self.actors[i];
            for c in &a.children {
                let Some(&j) = self.index.get(c.as_str()) else {
                    continue;
                };
                if !reached[j] {
                    reached[j] = true;
                    self.parent[j] = Some(i);
                    self.kids[i].push(j);
                    queue.push_back(j);
                }
            }
        }
    }

    /// Descendant counts, children before parents (the tree has no cycles: each node has one
    /// parent and was reached from a root).
    fn count_descendants(&mut self) {
        let total = self.kids.len();
        let mut order = Vec::with_capacity(total);
        let mut stack: Vec<usize> = self.roots.clone();
        while let Some(i) = stack.pop() {
            order.push(i);
            stack.extend(self.kids[i].iter().copied());
        }
        let mut d = vec![0usize; total];
        for &i in order.iter().rev() {
            d[i] = self.kids[i].iter().map(|&k| 1 + d[k]).sum();
        }
        self.descendants = d;
    }

    fn id(&self, i: usize) -> &str {
        match self.actors.get(i) {
            Some(a) => &a.id,
            None => &self.synthetic[i - self.actors.len()],
        }
    }
}

fn matches(a: &Actor, needle: &str) -> bool {
    [&a.id, &a.kind, &a.state, &a.detail]
        .iter()
        .any(|f| f.to_lowercase().contains(needle))
}

fn ids(s: &str) -> HashSet<&str> {
    s.split('\n')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .collect()
}

/// Counts by key, most first (then by key).
fn tally<'a>(it: impl Iterator<Item = &'a str>) -> Vec<(String, usize)> {
    let mut m: HashMap<&str, usize> = HashMap::new();
    for k in it {
        *m.entry(k).or_default() += 1;
    }
    let mut v: Vec<(String, usize)> = m.into_iter().map(|(k, n)| (k.to_string(), n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// Folds `actors` into the rows the page shows for `q`.
pub fn tree(actors: &[Actor], q: &TreeQuery) -> Tree {
    let s = Spanning::new(actors);
    let n = s.actors.len();
    let open = ids(&q.open);
    let closed = ids(&q.closed);
    let auto_open = n < q.auto_open;
    let needle = q.q.trim().to_lowercase();
    let page = q.page.max(1);
    // Search: the first matches in tree order (depth first), and every node on a path to one.
    let mut on_path: HashSet<usize> = HashSet::new();
    let mut match_set: HashSet<usize> = HashSet::new();
    let mut total_matches = 0;
    if !needle.is_empty() {
        let mut stack: Vec<usize> = s.roots.iter().rev().copied().collect();
        while let Some(i) = stack.pop() {
            if i < n && matches(s.actors[i], &needle) {
                total_matches += 1;
                if match_set.len() < q.max_matches {
                    match_set.insert(i);
                    let mut up = s.parent[i];
                    while let Some(p) = up {
                        if !on_path.insert(p) {
                            break;
                        }
                        up = s.parent[p];
                    }
                }
            }
            stack.extend(s.kids[i].iter().rev().copied());
        }
    }
    let searching = !needle.is_empty();
    let mut rows = 0;
    // Depth-first, building nodes bottom-up with an explicit stack (a chain of 10,000 steps
    // must not overflow the thread's stack).
    fn node(s: &Spanning<'_>, i: usize, rel: &'static str, is_open: bool, is_match: bool) -> Node {
        let n = s.actors.len();
        let (kind, state, detail, handled, restarts, blocked, queued, parents) =
            match s.actors.get(i) {
                Some(a) => (
                    a.kind.clone(),
                    a.state.clone(),
                    a.detail.clone(),
                    a.handled,
                    a.restarts,
                    a.blocked,
                    a.queued_effects,
                    a.parents.len(),
                ),
                None => (
                    "unattached".to_string(),
                    String::new(),
                    format!("{} actors no root reaches", s.kids[i].len()),
                    0,
                    0,
                    false,
                    0,
                    0,
                ),
            };
        let other_parents = if i < n && s.parent[i].is_some() {
            parents.saturating_sub(1)
        } else {
            parents
        };
        Node {
            id: s.id(i).to_string(),
            kind,
            state,
            detail,
            handled,
            restarts,
            blocked,
            queued_effects: queued,
            rel,
            other_parents,
            child_count: s.kids[i].len(),
            descendants: s.descendants[i],
            open: is_open,
            is_match,
            children: vec![],
            more: 0,
        }
    }
    let rel_of = |parent: usize, child: usize| -> &'static str {
        let (Some(p), Some(c)) = (s.actors.get(parent), s.actors.get(child)) else {
            return "";
        };
        match p.detail.strip_prefix("resolved to ") {
            Some(r) if p.kind == "step" && base(r) == base(&c.id) => "resolved",
            _ => "",
        }
    };
    let is_open = |i: usize| -> bool {
        let id = s.id(i);
        if searching {
            return on_path.contains(&i) || open.contains(id);
        }
        open.contains(id) || (auto_open && !closed.contains(id))
    };
    // Which children of an open node are shown, and how many are not.
    let shown = |i: usize| -> (Vec<usize>, usize) {
        let kids = &s.kids[i];
        let pick: Vec<usize> = if searching && !open.contains(s.id(i)) {
            kids.iter()
                .copied()
                .filter(|k| on_path.contains(k) || match_set.contains(k))
                .collect()
        } else {
            kids.to_vec()
        };
        let hidden = kids.len() - pick.len().min(page);
        (pick.into_iter().take(page).collect(), hidden)
    };
    struct Frame {
        node: Node,
        pending: Vec<usize>,
        idx: usize,
    }
    let mut roots = vec![];
    let top: Vec<usize> = if searching {
        s.roots
            .iter()
            .copied()
            .filter(|r| on_path.contains(r) || match_set.contains(r))
            .collect()
    } else {
        s.roots.clone()
    };
    for r in top {
        let mut stack: Vec<Frame> = vec![];
        let open_r = is_open(r);
        let mut root = node(&s, r, "", open_r, match_set.contains(&r));
        rows += 1;
        let pending = if open_r {
            let (p, more) = shown(r);
            root.more = more;
            p
        } else {
            root.more = s.kids[r].len();
            vec![]
        };
        stack.push(Frame {
            node: root,
            pending,
            idx: 0,
        });
        let mut ids_stack: Vec<usize> = vec![r];
        while let Some(top) = stack.last_mut() {
            if top.idx < top.pending.len() {
                let c = top.pending[top.idx];
                top.idx += 1;
                let p = *ids_stack.last().unwrap_or(&r);
                let open_c = ids_stack.len() + 1 < MAX_DEPTH && is_open(c);
                let mut child = node(&s, c, rel_of(p, c), open_c, match_set.contains(&c));
                rows += 1;
                let pending = if open_c {
                    let (pk, more) = shown(c);
                    child.more = more;
                    pk
                } else {
                    child.more = s.kids[c].len();
                    vec![]
                };
                stack.push(Frame {
                    node: child,
                    pending,
                    idx: 0,
                });
                ids_stack.push(c);
            } else {
                let done = stack.pop().map(|f| f.node);
                ids_stack.pop();
                match (done, stack.last_mut()) {
                    (Some(d), Some(parent)) => parent.node.children.push(d),
                    (Some(d), None) => roots.push(d),
                    (None, _) => {}
                }
            }
        }
    }
    Tree {
        total: n,
        by_kind: tally(s.actors.iter().map(|a| a.kind.as_str())),
        by_state: tally(s.actors.iter().map(|a| a.state.as_str())),
        q: q.q.clone(),
        matches: total_matches,
        shown_matches: match_set.len(),
        auto_open,
        roots,
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(id: &str, kind: &str, state: &str, parents: &[&str], children: &[&str]) -> Actor {
        Actor {
            id: id.into(),
            kind: kind.into(),
            state: state.into(),
            parents: parents.iter().map(|s| s.to_string()).collect(),
            children: children.iter().map(|s| s.to_string()).collect(),
            ..Actor::default()
        }
    }

    fn leaf(i: usize) -> String {
        format!("step:/nix/store/{i:032}-leaf-{i}.drv")
    }

    /// The queue monitor → one build → its top step → `width` input steps, plus the dispatcher.
    fn wide(width: usize) -> Vec<Actor> {
        let leaves: Vec<String> = (0..width).map(leaf).collect();
        let refs: Vec<&str> = leaves.iter().map(String::as_str).collect();
        let top = "step:/nix/store/ffffffffffffffffffffffffffffffff-top.drv";
        let mut v = vec![
            actor(
                "queue-monitor",
                "queue_monitor",
                "watching",
                &[],
                &["build:1"],
            ),
            actor("dispatcher", "dispatcher", "dispatching", &[], &[]),
            actor("build:1", "build", "waiting", &["queue-monitor"], &[top]),
            actor(top, "step", "waiting_for_inputs", &["build:1"], &refs),
        ];
        for l in &leaves {
            v.push(actor(l, "step", "runnable", &[top], &[]));
        }
        v
    }

    fn count_rows(nodes: &[Node]) -> usize {
        nodes.iter().map(|n| 1 + count_rows(&n.children)).sum()
    }

    fn find<'a>(nodes: &'a [Node], id: &str) -> Option<&'a Node> {
        nodes.iter().find_map(|n| {
            if n.id == id {
                Some(n)
            } else {
                find(&n.children, id)
            }
        })
    }

    #[test]
    fn ten_thousand_actors_start_collapsed_to_their_roots() {
        let actors = wide(10_000);
        let t = tree(&actors, &TreeQuery::default());
        assert_eq!(t.total, 10_004);
        assert!(!t.auto_open);
        // Two rows: the queue monitor (closed, holding everything) and the dispatcher.
        assert_eq!(t.rows, 2);
        assert_eq!(count_rows(&t.roots), 2);
        let qm = &t.roots[0];
        assert_eq!(
            (qm.id.as_str(), qm.open, qm.child_count),
            ("queue-monitor", false, 1)
        );
        assert_eq!(qm.descendants, 10_002);
        assert_eq!(t.by_kind[0], ("step".to_string(), 10_001));
        assert_eq!(t.by_state[0], ("runnable".to_string(), 10_000));
    }

    #[test]
    fn an_open_node_shows_one_page_of_children_and_counts_the_rest() {
        let actors = wide(10_000);
        let top = "step:/nix/store/ffffffffffffffffffffffffffffffff-top.drv";
        let q = TreeQuery {
            open: format!("queue-monitor\nbuild:1\n{top}"),
            ..TreeQuery::default()
        };
        let t = tree(&actors, &q);
        let n = find(&t.roots, top).expect("the top step is shown");
        assert!(n.open);
        assert_eq!(n.children.len(), 100);
        assert_eq!(n.more, 9_900);
        assert!(n.children.iter().all(|c| !c.open && c.children.is_empty()));
        // queue monitor, build, top, 100 leaves, dispatcher
        assert_eq!(t.rows, 104);
        assert_eq!(count_rows(&t.roots), 104);
    }

    #[test]
    fn search_finds_one_actor_among_ten_thousand_with_its_path_open() {
        let actors = wide(10_000);
        let q = TreeQuery {
            q: "LEAF-4242.drv".into(),
            ..TreeQuery::default()
        };
        let t = tree(&actors, &q);
        assert_eq!((t.matches, t.shown_matches), (1, 1));
        // Only the path: queue monitor → build → top → the match (the dispatcher is filtered out).
        assert_eq!(t.rows, 4);
        let hit = find(&t.roots, &leaf(4242)).expect("the match is shown");
        assert!(hit.is_match);
        let top = find(
            &t.roots,
            "step:/nix/store/ffffffffffffffffffffffffffffffff-top.drv",
        )
        .expect("its parent");
        assert!(top.open);
        assert_eq!(top.children.len(), 1);
        assert_eq!(top.more, 9_999);
        // Many matches: all counted, `max_matches` shown.
        let t = tree(
            &actors,
            &TreeQuery {
                q: "runnable".into(),
                ..TreeQuery::default()
            },
        );
        assert_eq!((t.matches, t.shown_matches), (10_000, 50));
        assert_eq!(t.rows, 3 + 50);
        // Nothing matches: no rows.
        let t = tree(
            &actors,
            &TreeQuery {
                q: "no-such-actor".into(),
                ..TreeQuery::default()
            },
        );
        assert_eq!((t.matches, t.rows), (0, 0));
    }

    #[test]
    fn a_small_tree_starts_open_unless_closed_and_marks_resolved_children() {
        let a = "step:/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a.drv";
        let r = "step:/nix/store/rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr-a.drv";
        let mut resolved = actor(
            a,
            "step",
            "awaiting_resolved",
            &["build:1", "build:2"],
            &[r],
        );
        resolved.detail = "resolved to /nix/store/rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr-a.drv".into();
        let actors = vec![
            actor(
                "queue-monitor",
                "queue_monitor",
                "watching",
                &[],
                &["build:1", "build:2"],
            ),
            actor("build:1", "build", "waiting", &["queue-monitor"], &[a]),
            // build 2 shares the step: shown once, under build 1.
            actor("build:2", "build", "waiting", &["queue-monitor"], &[a]),
            resolved,
            actor(r, "step", "building", &[a], &[]),
        ];
        let t = tree(&actors, &TreeQuery::default());
        assert!(t.auto_open);
        assert_eq!(t.rows, 5);
        let step = find(&t.roots, a).expect("the resolved step");
        assert_eq!(step.other_parents, 1);
        let child = find(&t.roots, r).expect("its resolved child");
        assert_eq!(child.rel, "resolved");
        assert_eq!(find(&t.roots, "build:2").map(|b| b.child_count), Some(0));
        let t = tree(
            &actors,
            &TreeQuery {
                closed: "build:1".into(),
                ..TreeQuery::default()
            },
        );
        assert_eq!(t.rows, 3);
        assert_eq!(find(&t.roots, "build:1").map(|b| b.more), Some(1));
    }

    #[test]
    fn actors_no_root_reaches_are_grouped_per_kind() {
        let mut actors = wide(3);
        // Steps left over from finished builds, one on a cycle of two.
        actors.push(actor(
            "step:/nix/store/x-orphan.drv",
            "step",
            "succeeded",
            &[],
            &[],
        ));
        actors.push(actor(
            "step:/nix/store/c1.drv",
            "step",
            "runnable",
            &["step:/nix/store/c2.drv"],
            &["step:/nix/store/c2.drv"],
        ));
        actors.push(actor(
            "step:/nix/store/c2.drv",
            "step",
            "runnable",
            &["step:/nix/store/c1.drv"],
            &["step:/nix/store/c1.drv"],
        ));
        let t = tree(
            &actors,
            &TreeQuery {
                auto_open: 0,
                ..TreeQuery::default()
            },
        );
        assert_eq!(t.total, 10);
        let ids: Vec<&str> = t.roots.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["queue-monitor", "dispatcher", "unattached:step"]);
        let g = &t.roots[2];
        assert_eq!((g.child_count, g.descendants), (2, 3));
        // Every actor is counted exactly once across the roots.
        let all: usize = t.roots.iter().map(|n| 1 + n.descendants).sum();
        assert_eq!(all, 10 + 1);
    }

    #[test]
    fn a_chain_of_ten_thousand_does_not_overflow_the_stack() {
        let ids: Vec<String> = (0..10_000).map(leaf).collect();
        let mut actors = vec![actor(
            "queue-monitor",
            "queue_monitor",
            "watching",
            &[],
            &[&ids[0]],
        )];
        for (i, id) in ids.iter().enumerate() {
            let kids: Vec<&str> = ids.get(i + 1).map(String::as_str).into_iter().collect();
            actors.push(actor(id, "step", "waiting_for_inputs", &[], &kids));
        }
        let t = tree(
            &actors,
            &TreeQuery {
                q: leaf(9_999),
                ..TreeQuery::default()
            },
        );
        assert_eq!(t.roots[0].descendants, 10_000);
        // The path is open down to the depth limit; the node there is shown closed.
        assert_eq!(t.rows, MAX_DEPTH);
        let mut n = &t.roots[0];
        let mut depth = 1;
        while let Some(c) = n.children.first() {
            n = c;
            depth += 1;
        }
        assert_eq!(depth, MAX_DEPTH);
        assert!(!n.open);
        assert_eq!(n.more, 1);
    }
}
