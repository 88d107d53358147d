//! No file of `src/actors` reaches itself through its imports: every `crate::…` and `super::…` path
//! a file names (in `use` items or inline) is an edge to the file that defines the module it
//! reaches, and the graph of those edges has no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`actors::step::core`) → source, for every `.rs` file under `dir`.
fn modules(src: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for e in std::fs::read_dir(dir).expect("read src/actors") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            modules(src, &p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let rel = p.strip_prefix(src).expect("under src").with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|l| l == "mod") {
                parts.pop();
            }
            let text = std::fs::read_to_string(&p).expect("read source");
            out.insert(parts.join("::"), text);
        }
    }
}

/// The source without comments (so prose naming a path is no edge).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path starting at `crate` or `super`, with brace groups expanded (`a::{b, c::d}` gives
/// `a::b` and `a::c::d`).
fn paths(code: &str) -> Vec<(String, Vec<String>)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = |w: &str| {
            chars[i..].iter().take(w.len()).copied().eq(w.chars())
                && (i == 0 || !ident(chars[i - 1]))
                && chars.get(i + w.len()).is_some_and(|c| *c == ':')
        };
        let root = if starts("crate") {
            "crate"
        } else if starts("super") {
            "super"
        } else {
            i += 1;
            continue;
        };
        i += root.len();
        let (found, next) = expand(&chars, i);
        for p in found {
            out.push((root.to_string(), p));
        }
        i = next.max(i + 1);
    }
    out
}

/// Parses `::seg::seg…` or `::{…}` from `i`: the paths it names, and where it ends.
fn expand(chars: &[char], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let mut prefix: Vec<String> = Vec::new();
    loop {
        if chars.get(i) != Some(&':') || chars.get(i + 1) != Some(&':') {
            return (vec![prefix], i);
        }
        i += 2;
        if chars.get(i) == Some(&'{') {
            let mut all = vec![prefix.clone()];
            i += 1;
            loop {
                while chars.get(i).is_some_and(|c| c.is_whitespace() || *c == ',') {
                    i += 1;
                }
                match chars.get(i) {
                    None => return (all, i),
                    Some('}') => return (all, i + 1),
                    _ => {}
                }
                let start = i;
                while chars.get(i).is_some_and(|c| ident(*c)) {
                    i += 1;
                }
                let seg: String = chars[start..i].iter().collect();
                if seg.is_empty() {
                    i += 1; // `*` or `self`-like punctuation
                    continue;
                }
                let (subs, next) = expand(chars, i);
                for s in subs {
                    let mut p = prefix.clone();
                    if seg != "self" {
                        p.push(seg.clone());
                    }
                    p.extend(s);
                    all.push(p);
                }
                i = next;
                // `x as y`
                while chars.get(i).is_some_and(|c| *c != ',' && *c != '}') {
                    i += 1;
                }
            }
        }
        let start = i;
        while chars.get(i).is_some_and(|c| ident(*c)) {
            i += 1;
        }
        if start == i {
            return (vec![prefix], i);
        }
        prefix.push(chars[start..i].iter().collect());
    }
}

/// The module (a key of `mods`) a path reaches: its longest prefix that is a file.
fn target(mods: &BTreeMap<String, String>, parts: &[String]) -> Option<String> {
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|k| mods.contains_key(k))
}

/// The import edges between the files.
fn edges(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges = BTreeMap::new();
    for (m, text) in mods {
        let here: Vec<String> = m.split("::").map(str::to_string).collect();
        // `super` is the parent of the module the file defines.
        let parent: Vec<String> = here[..here.len().saturating_sub(1)].to_vec();
        let mut deps = BTreeSet::new();
        for (root, rest) in paths(&code(text)) {
            let mut parts = if root == "crate" {
                vec![]
            } else {
                parent.clone()
            };
            let mut rest = rest.as_slice();
            while rest.first().is_some_and(|s| s == "super") {
                parts.pop();
                rest = &rest[1..];
            }
            parts.extend(rest.iter().cloned());
            if let Some(t) = target(mods, &parts)
                && &t != m
            {
                deps.insert(t);
            }
        }
        edges.insert(m.clone(), deps);
    }
    edges
}

/// The import cycles: strongly connected components of more than one file.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Kosaraju: finish order on the graph, then components on the reversed graph.
    fn visit(
        v: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(v.to_string()) {
            return;
        }
        for w in g.get(v).into_iter().flatten() {
            visit(w, g, seen, out);
        }
        out.push(v.to_string());
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for v in edges.keys() {
        visit(v, edges, &mut seen, &mut order);
    }
    let mut rev: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (v, ws) in edges {
        for w in ws {
            rev.entry(w.clone()).or_default().insert(v.clone());
        }
    }
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    for v in order.iter().rev() {
        let mut comp = Vec::new();
        visit(v, &rev, &mut seen, &mut comp);
        if comp.len() > 1 {
            comp.sort();
            found.push(comp);
        }
    }
    found
}

#[test]
fn no_file_of_the_actors_reaches_itself_through_its_imports() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut mods = BTreeMap::new();
    modules(&src, &src.join("actors"), &mut mods);
    assert!(mods.len() > 20, "found only {} files", mods.len());
    let e = edges(&mods);
    // The checker sees the imports it must: the step's adapter reaches its core.
    assert!(
        e["actors::step::actor"].contains("actors::step::core"),
        "{:?}",
        e["actors::step::actor"]
    );
    let found = cycles(&e);
    assert!(
        found.is_empty(),
        "import cycles among src/actors: {found:#?}"
    );
}

#[test]
fn the_checker_finds_a_cycle_through_braces_and_super() {
    let mods: BTreeMap<String, String> = [
        (
            "actors::a".to_string(),
            "use crate::actors::{b::Thing, c};\n".to_string(),
        ),
        (
            "actors::b".to_string(),
            "// use crate::actors::a; (a comment)\nfn f() { super::c::g() }\n".to_string(),
        ),
        (
            "actors::c".to_string(),
            "use super::{a as other};\n".to_string(),
        ),
        ("actors::d".to_string(), "use super::c;\n".to_string()),
    ]
    .into();
    let e = edges(&mods);
    assert_eq!(
        e["actors::a"],
        ["actors::b".to_string(), "actors::c".to_string()].into()
    );
    let found = cycles(&e);
    assert_eq!(
        found,
        vec![vec![
            "actors::a".to_string(),
            "actors::b".to_string(),
            "actors::c".to_string()
        ]]
    );
}
