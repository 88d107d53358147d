//! nix-eval-jobs' output, as `qr submit --eval-jobs` reads it: one JSON object per line
//! (<https://jsonlines.org>) with `attr`, `attrPath`, `drvPath`, `name`, `outputs`, `system`, and
//! `error` for a job that failed to evaluate; aggregate jobs (`--constituents`) carry
//! `constituents` (drv paths, after nix-eval-jobs rewrote the aggregate; qr also takes attr
//! names there) and, before the rewrite, `namedConstituents` (attr names). Of `meta` (printed with
//! `--meta`), `timeout` and `maxSilent` are read: the build's own limits in seconds, as Hydra
//! takes them (an integer, or a string holding one as Nix's `queryMetaInt` reads it; 0 is no
//! limit).
//!
//! [`parse`] turns the input into jobs and line errors (malformed JSON, a missing or mistyped
//! field, a `drvPath` that is not a derivation of this store dir, a repeated attr), each with its
//! 1-based line number; a bad line loses nothing else. [`resolve_constituents`] then maps each
//! aggregate's constituents to jobs of the same evaluation.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use crate::store::StoreDir;

/// A constituent as the line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constituent {
    /// The attr of another job of the evaluation.
    Job(String),
    /// A drv path (nix-eval-jobs' rewritten aggregates list the constituents' drvs).
    Drv(String),
}

/// A job line that names a derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub line: usize,
    pub attr: String,
    pub drv_path: String,
    pub name: Option<String>,
    pub system: Option<String>,
    /// Output name → path (`None` for an output whose path is not known before the build: CA).
    pub outputs: BTreeMap<String, Option<String>>,
    /// `Some` for an aggregate job.
    pub constituents: Option<Vec<Constituent>>,
    /// `meta.repo` and `meta.rev` (`nix-eval-jobs --meta`), when the job carries them: the
    /// repository (`owner/name`) and commit its github-status notifications are for.
    pub repo: Option<String>,
    pub rev: Option<String>,
    /// `meta.timeout` and `meta.maxSilent`, seconds (0: no limit); `None` when the line has none.
    pub limits: MetaLimits,
}

/// A job's own time limits from its `meta`, seconds; `None` where the line sets none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetaLimits {
    pub timeout: Option<u32>,
    pub max_silent: Option<u32>,
}

/// A line that queues nothing: the evaluator's `error`, or why qr could not use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub attr: Option<String>,
    pub message: String,
}

/// What is wrong with a line that is not a usable job line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineProblem {
    #[error("the line is not valid UTF-8")]
    NotUtf8,
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("expected a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}` is not {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("drvPath {path:?} is not a store path of this store ({store_dir}): {why}")]
    NotInStore {
        path: String,
        store_dir: String,
        why: String,
    },
    #[error("drvPath {0} is not a derivation (no .drv)")]
    NotADerivation(String),
    #[error("constituent {path:?} is not a derivation of this store ({store_dir})")]
    BadConstituent { path: String, store_dir: String },
    #[error(
        "field `meta.{field}` is not a number of seconds (a non-negative integer up to {max}): {found}"
    )]
    BadLimit {
        field: &'static str,
        max: i32,
        found: String,
    },
    #[error("job {attr:?} already appeared on line {first}")]
    Duplicate { attr: String, first: usize },
}

/// One parsed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Job(Job),
    Error(LineError),
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The job's attr: `attr`, else `attrPath` joined with dots (as nix-eval-jobs names it).
fn attr_of(o: &serde_json::Map<String, Value>) -> Result<String, LineProblem> {
    match o.get("attr") {
        Some(Value::String(s)) if !s.is_empty() => return Ok(s.clone()),
        Some(Value::String(_)) | None => {}
        Some(_) => {
            return Err(LineProblem::WrongType {
                field: "attr",
                expected: "a non-empty string",
            });
        }
    }
    let wrong = LineProblem::WrongType {
        field: "attrPath",
        expected: "a non-empty list of names",
    };
    match o.get("attrPath") {
        None => Err(LineProblem::Missing("attr")),
        Some(Value::Array(parts)) if !parts.is_empty() => {
            let mut names = Vec::with_capacity(parts.len());
            for p in parts {
                match p {
                    Value::String(s) => names.push(s.clone()),
                    Value::Number(n) => names.push(n.to_string()),
                    _ => return Err(wrong),
                }
            }
            Ok(names.join("."))
        }
        Some(_) => Err(wrong),
    }
}

fn opt_string(
    o: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, LineProblem> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(LineProblem::WrongType {
            field,
            expected: "a string",
        }),
    }
}

/// `meta.repo` / `meta.rev`: a string, or absent.
fn meta_string(
    m: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, LineProblem> {
    opt_string(m, field).map_err(|_| LineProblem::WrongType {
        field: match field {
            "repo" => "meta.repo",
            _ => "meta.rev",
        },
        expected: "a string",
    })
}

fn strings(
    o: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<Vec<String>>, LineProblem> {
    let wrong = LineProblem::WrongType {
        field,
        expected: "a list of strings",
    };
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or(wrong.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(wrong),
    }
}

/// `meta.timeout` / `meta.maxSilent`: an integer, or a string holding one (as Nix's
/// `queryMetaInt` reads it), of at most `i32::MAX` seconds (the `builds` column).
fn limit(
    meta: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<u32>, LineProblem> {
    let bad = |found: String| LineProblem::BadLimit {
        field,
        max: i32::MAX,
        found,
    };
    let n = match meta.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| bad(n.to_string()))?,
        Some(Value::String(s)) => s.trim().parse::<u64>().map_err(|_| bad(format!("{s:?}")))?,
        Some(v) => return Err(bad(kind(v).to_string())),
    };
    match u32::try_from(n) {
        Ok(n) if i32::try_from(n).is_ok() => Ok(Some(n)),
        _ => Err(bad(n.to_string())),
    }
}

fn meta_limits(o: &serde_json::Map<String, Value>) -> Result<MetaLimits, LineProblem> {
    match o.get("meta") {
        None | Some(Value::Null) => Ok(MetaLimits::default()),
        Some(Value::Object(meta)) => Ok(MetaLimits {
            timeout: limit(meta, "timeout")?,
            max_silent: limit(meta, "maxSilent")?,
        }),
        Some(_) => Err(LineProblem::WrongType {
            field: "meta",
            expected: "an object",
        }),
    }
}

fn drv_path(path: &str, sd: &StoreDir) -> Result<(), LineProblem> {
    let sp = sd.parse(path).map_err(|e| LineProblem::NotInStore {
        path: path.to_string(),
        store_dir: sd.as_str().to_string(),
        why: e.to_string(),
    })?;
    if !sp.is_derivation() {
        return Err(LineProblem::NotADerivation(path.to_string()));
    }
    Ok(())
}

/// A job line's fields, once the line is known to be an object without `error`.
fn job_of(
    line: usize,
    attr: String,
    o: &serde_json::Map<String, Value>,
    sd: &StoreDir,
) -> Result<Job, LineProblem> {
    let drv = match o.get("drvPath") {
        None | Some(Value::Null) => return Err(LineProblem::Missing("drvPath")),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(LineProblem::WrongType {
                field: "drvPath",
                expected: "a string",
            });
        }
    };
    drv_path(&drv, sd)?;
    let mut outputs = BTreeMap::new();
    match o.get("outputs") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (name, p) in m {
                match p {
                    Value::Null => outputs.insert(name.clone(), None),
                    Value::String(s) => outputs.insert(name.clone(), Some(s.clone())),
                    _ => {
                        return Err(LineProblem::WrongType {
                            field: "outputs",
                            expected: "an object of output paths (or null)",
                        });
                    }
                };
            }
        }
        Some(_) => {
            return Err(LineProblem::WrongType {
                field: "outputs",
                expected: "an object of output paths (or null)",
            });
        }
    }
    let listed = strings(o, "constituents")?;
    let named = strings(o, "namedConstituents")?;
    let constituents = if listed.is_none() && named.is_none() {
        None
    } else {
        let mut cs = Vec::new();
        for c in listed.unwrap_or_default() {
            if c.starts_with('/') {
                if drv_path(&c, sd).is_err() {
                    return Err(LineProblem::BadConstituent {
                        path: c,
                        store_dir: sd.as_str().to_string(),
                    });
                }
                cs.push(Constituent::Drv(c));
            } else {
                cs.push(Constituent::Job(c));
            }
        }
        cs.extend(named.unwrap_or_default().into_iter().map(Constituent::Job));
        Some(cs)
    };
    let (repo, rev) = match o.get("meta") {
        None | Some(Value::Null) => (None, None),
        Some(Value::Object(m)) => (meta_string(m, "repo")?, meta_string(m, "rev")?),
        Some(_) => {
            return Err(LineProblem::WrongType {
                field: "meta",
                expected: "an object",
            });
        }
    };
    Ok(Job {
        line,
        attr,
        drv_path: drv,
        name: opt_string(o, "name")?,
        system: opt_string(o, "system")?,
        outputs,
        constituents,
        limits: meta_limits(o)?,
        repo,
        rev,
    })
}

/// Parses line `line` (1-based); `None` for a blank line.
pub fn parse_line(line: usize, bytes: &[u8], sd: &StoreDir) -> Option<Parsed> {
    let err = |attr: Option<String>, p: LineProblem| {
        Some(Parsed::Error(LineError {
            line,
            attr,
            message: p.to_string(),
        }))
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return err(None, LineProblem::NotUtf8);
    };
    if text.trim().is_empty() {
        return None;
    }
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return err(None, LineProblem::Json(e.to_string())),
    };
    let Value::Object(o) = &v else {
        return err(None, LineProblem::NotAnObject(kind(&v)));
    };
    let attr = attr_of(o);
    if let Some(e) = o.get("error").filter(|e| !e.is_null()) {
        // The evaluator's own error: kept as it wrote it.
        let message = match e {
            Value::String(s) => s.trim_end().to_string(),
            other => other.to_string(),
        };
        return Some(Parsed::Error(LineError {
            line,
            attr: attr.ok(),
            message,
        }));
    }
    let attr = match attr {
        Ok(a) => a,
        Err(p) => return err(None, p),
    };
    match job_of(line, attr.clone(), o, sd) {
        Ok(j) => Some(Parsed::Job(j)),
        Err(p) => err(Some(attr), p),
    }
}

/// Parses every line of `input`; a repeated attr is an error of the later line.
pub fn parse(input: &[u8], sd: &StoreDir) -> Vec<Parsed> {
    let mut out = Vec::new();
    let mut first: HashMap<String, usize> = HashMap::new();
    for (i, bytes) in input.split(|b| *b == b'\n').enumerate() {
        let line = i + 1;
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let Some(p) = parse_line(line, bytes, sd) else {
            continue;
        };
        let attr = match &p {
            Parsed::Job(j) => Some(&j.attr),
            Parsed::Error(e) => e.attr.as_ref(),
        };
        if let Some(a) = attr {
            if let Some(&f) = first.get(a) {
                out.push(Parsed::Error(LineError {
                    line,
                    attr: Some(a.clone()),
                    message: LineProblem::Duplicate {
                        attr: a.clone(),
                        first: f,
                    }
                    .to_string(),
                }));
                continue;
            }
            first.insert(a.clone(), line);
        }
        out.push(p);
    }
    out
}

/// The jobs to queue, each with the attrs of its constituents (aggregates), and what was dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub jobs: Vec<(Job, Vec<String>)>,
    /// The input errors, and aggregates that cannot be queued (a constituent that is missing,
    /// broken, itself, or a cycle), by line.
    pub errors: Vec<LineError>,
    /// Drv-path constituents that are no job of the evaluation: not recorded (as Hydra does; the
    /// aggregate's drv depends on them when the evaluator put them in its context).
    pub warnings: Vec<String>,
}

/// Maps each aggregate's constituents to jobs of the evaluation. An aggregate naming a job that
/// does not exist, one that is an error line, itself, or an aggregate that (transitively) names it
/// back, is an error of its line, as nix-eval-jobs makes it; so is an aggregate whose constituent
/// became such an error.
pub fn resolve_constituents(jobs: Vec<Job>, mut errors: Vec<LineError>) -> Resolved {
    let broken: BTreeMap<String, usize> = errors
        .iter()
        .filter_map(|e| e.attr.clone().map(|a| (a, e.line)))
        .collect();
    let mut by_drv: HashMap<&str, &str> = HashMap::new();
    for j in &jobs {
        by_drv.entry(j.drv_path.as_str()).or_insert(j.attr.as_str());
    }
    let attrs: BTreeSet<&str> = jobs.iter().map(|j| j.attr.as_str()).collect();
    let mut warnings = Vec::new();
    // attr → (constituent attrs) or the reason it cannot be queued.
    let mut names: BTreeMap<String, Result<Vec<String>, String>> = BTreeMap::new();
    for j in &jobs {
        let Some(cs) = &j.constituents else { continue };
        let mut out: Vec<String> = Vec::new();
        let mut problem = None;
        for c in cs {
            let name = match c {
                Constituent::Job(n) => n.as_str(),
                Constituent::Drv(p) => match by_drv.get(p.as_str()) {
                    Some(n) => n,
                    None => {
                        warnings.push(format!(
                            "aggregate {:?} (line {}): constituent {p} is no job of this evaluation; not recorded",
                            j.attr, j.line
                        ));
                        continue;
                    }
                },
            };
            if name == j.attr {
                if matches!(c, Constituent::Job(_)) {
                    problem = Some(format!(
                        "aggregate job {:?} names itself as a constituent",
                        j.attr
                    ));
                    break;
                }
                continue;
            }
            if let Some(l) = broken.get(name) {
                problem = Some(format!(
                    "aggregate job {:?} references broken job {name:?} (line {l})",
                    j.attr
                ));
                break;
            }
            if !attrs.contains(name) {
                problem = Some(format!(
                    "aggregate job {:?} references non-existent job {name:?}",
                    j.attr
                ));
                break;
            }
            if !out.iter().any(|o| o == name) {
                out.push(name.to_string());
            }
        }
        names.insert(j.attr.clone(), problem.map_or(Ok(out), Err));
    }
    // Cycles among aggregates: every aggregate on one is an error.
    let graph: BTreeMap<&str, Vec<&str>> = names
        .iter()
        .filter_map(|(a, r)| {
            r.as_ref()
                .ok()
                .map(|cs| (a.as_str(), cs.iter().map(String::as_str).collect()))
        })
        .collect();
    let on_cycles: Vec<(String, String)> = cycles(&graph)
        .into_iter()
        .flat_map(|cycle| {
            let shown = cycle.join(" -> ");
            cycle[..cycle.len() - 1]
                .iter()
                .map(|a| (a.to_string(), shown.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    for (a, shown) in on_cycles {
        let message = format!("aggregate job {a:?} is on a cycle of constituents: {shown}");
        names.insert(a, Err(message));
    }
    // An aggregate whose constituent cannot be queued cannot be either (to a fixed point).
    loop {
        let failed: BTreeSet<String> = names
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(a, _)| a.clone())
            .collect();
        let mut changed = false;
        for (a, r) in names.iter_mut() {
            if let Ok(cs) = r {
                if let Some(c) = cs.iter().find(|c| failed.contains(*c)) {
                    *r = Err(format!("aggregate job {a:?} references broken job {c:?}"));
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    let mut out = Vec::new();
    for j in jobs {
        match names.remove(&j.attr) {
            None => out.push((j, vec![])),
            Some(Ok(cs)) => out.push((j, cs)),
            Some(Err(message)) => errors.push(LineError {
                line: j.line,
                attr: Some(j.attr),
                message,
            }),
        }
    }
    errors.sort_by_key(|e| e.line);
    Resolved {
        jobs: out,
        errors,
        warnings,
    }
}

/// The cycles of `graph` (each as its nodes, the first repeated at the end).
fn cycles<'a>(graph: &BTreeMap<&'a str, Vec<&'a str>>) -> Vec<Vec<&'a str>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit<'a>(
        n: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        mark: &mut HashMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
        found: &mut Vec<Vec<&'a str>>,
    ) {
        mark.insert(n, Mark::Open);
        stack.push(n);
        for &m in graph.get(n).into_iter().flatten() {
            match mark.get(m).copied().unwrap_or(Mark::New) {
                Mark::New if graph.contains_key(m) => visit(m, graph, mark, stack, found),
                Mark::Open => {
                    if let Some(i) = stack.iter().position(|s| *s == m) {
                        let mut c = stack[i..].to_vec();
                        c.push(m);
                        found.push(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        mark.insert(n, Mark::Done);
    }
    let mut mark = HashMap::new();
    let mut found = Vec::new();
    for &n in graph.keys() {
        if mark.get(n).copied().unwrap_or(Mark::New) == Mark::New {
            visit(n, graph, &mut mark, &mut Vec::new(), &mut found);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    const DRV: &str = "/nix/store/kgl69vyd5yssfkn9a7jvb6s21zfah5ja-mx-ca1.drv";
    const DRV2: &str = "/nix/store/jxkwkrwv1n4dzis261s21aj8aavxw98c-mx-fod.drv";

    fn sd() -> StoreDir {
        StoreDir::default()
    }

    fn one(line: &str) -> Parsed {
        parse_line(7, line.as_bytes(), &sd()).expect("not blank")
    }

    fn error_of(line: &str) -> LineError {
        match one(line) {
            Parsed::Error(e) => e,
            Parsed::Job(j) => panic!("parsed as a job: {j:?}"),
        }
    }

    #[test]
    fn a_job_line_as_nix_eval_jobs_prints_it() {
        let line = format!(
            r#"{{"attr":"mixed.ca1","attrPath":["mixed","ca1"],"drvPath":"{DRV}","name":"mx-ca1","outputs":{{"out":null}},"system":"x86_64-linux"}}"#
        );
        let Parsed::Job(j) = one(&line) else {
            panic!("not a job")
        };
        assert_eq!(j.line, 7);
        assert_eq!(j.attr, "mixed.ca1");
        assert_eq!(j.drv_path, DRV);
        assert_eq!(j.name.as_deref(), Some("mx-ca1"));
        assert_eq!(j.system.as_deref(), Some("x86_64-linux"));
        assert_eq!(j.outputs, BTreeMap::from([("out".to_string(), None)]));
        assert_eq!(j.constituents, None);
        // attrPath alone names it too (numbers are list indices).
        let line = format!(r#"{{"attrPath":["jobs",3,"x"],"drvPath":"{DRV}"}}"#);
        let Parsed::Job(j) = one(&line) else {
            panic!("not a job")
        };
        assert_eq!(j.attr, "jobs.3.x");
    }

    #[test]
    fn meta_timeout_and_max_silent_are_the_jobs_limits() {
        let limits = |meta: &str| match one(&format!(r#"{{"attr":"a","drvPath":"{DRV}"{meta}}}"#)) {
            Parsed::Job(j) => Ok(j.limits),
            Parsed::Error(e) => Err(e.message),
        };
        assert_eq!(limits(""), Ok(MetaLimits::default()));
        assert_eq!(limits(r#","meta":null"#), Ok(MetaLimits::default()));
        assert_eq!(
            limits(r#","meta":{"description":"x","maintainers":[]}"#),
            Ok(MetaLimits::default())
        );
        assert_eq!(
            limits(r#","meta":{"timeout":1,"maxSilent":0}"#),
            Ok(MetaLimits {
                timeout: Some(1),
                max_silent: Some(0)
            })
        );
        // A string holding an integer, as Nix's queryMetaInt takes it.
        assert_eq!(
            limits(r#","meta":{"maxSilent":"7200"}"#),
            Ok(MetaLimits {
                timeout: None,
                max_silent: Some(7200)
            })
        );
        for (meta, want) in [
            (
                r#","meta":{"timeout":-1}"#,
                "`meta.timeout` is not a number of seconds",
            ),
            (r#","meta":{"timeout":1.5}"#, "`meta.timeout` is not"),
            (r#","meta":{"maxSilent":"soon"}"#, "`meta.maxSilent` is not"),
            (r#","meta":{"maxSilent":true}"#, "a boolean"),
            (r#","meta":{"timeout":2147483648}"#, "2147483648"),
            (r#","meta":[]"#, "field `meta` is not an object"),
        ] {
            let e = limits(meta).expect_err(meta);
            assert!(e.contains(want), "{meta}: {e:?} lacks {want:?}");
        }
    }

    #[test]
    fn meta_repo_and_rev_are_kept_and_mistyped_ones_are_errors() {
        let line = format!(
            r#"{{"attr":"a","drvPath":"{DRV}","meta":{{"repo":"o/r","rev":"abc","description":"x"}}}}"#
        );
        let Parsed::Job(j) = one(&line) else {
            panic!("not a job")
        };
        assert_eq!(
            (j.repo.as_deref(), j.rev.as_deref()),
            (Some("o/r"), Some("abc"))
        );
        let line = format!(r#"{{"attr":"a","drvPath":"{DRV}","meta":{{"description":"x"}}}}"#);
        let Parsed::Job(j) = one(&line) else {
            panic!("not a job")
        };
        assert_eq!((j.repo, j.rev), (None, None));
        let e = error_of(&format!(
            r#"{{"attr":"a","drvPath":"{DRV}","meta":{{"rev":7}}}}"#
        ));
        assert!(e.message.contains("meta.rev"), "{e:?}");
        let e = error_of(&format!(r#"{{"attr":"a","drvPath":"{DRV}","meta":"x"}}"#));
        assert!(e.message.contains("`meta`"), "{e:?}");
    }

    #[test]
    fn an_error_line_keeps_the_evaluators_message() {
        let e = error_of(
            r#"{"attr":"broken","attrPath":["broken"],"error":"error: this job is broken\n"}"#,
        );
        assert_eq!(
            e,
            LineError {
                line: 7,
                attr: Some("broken".into()),
                message: "error: this job is broken".into()
            }
        );
        // A top-level error names no job.
        let e = error_of(r#"{"error":"top level value is 'int'"}"#);
        assert_eq!(e.attr, None);
    }

    #[test]
    fn malformed_lines_are_errors_of_their_line() {
        let cases: Vec<(String, &str)> = vec![
            ("{\"attr\":".into(), "malformed JSON"),
            ("[1,2]".into(), "expected a JSON object, found an array"),
            (
                r#"{"drvPath":"/nix/store/x.drv"}"#.into(),
                "missing field `attr`",
            ),
            (r#"{"attr":"a"}"#.into(), "missing field `drvPath`"),
            (
                r#"{"attr":"a","drvPath":3}"#.into(),
                "field `drvPath` is not a string",
            ),
            (r#"{"attr":5,"drvPath":"x"}"#.into(), "field `attr` is not"),
            (
                r#"{"attr":"a","drvPath":"/other/store/kgl69vyd5yssfkn9a7jvb6s21zfah5ja-x.drv"}"#
                    .into(),
                "is not a store path of this store (/nix/store)",
            ),
            (
                r#"{"attr":"a","drvPath":"/nix/store/kgl69vyd5yssfkn9a7jvb6s21zfah5ja-x"}"#.into(),
                "is not a derivation",
            ),
            (
                format!(r#"{{"attr":"a","drvPath":"{DRV}","outputs":["out"]}}"#),
                "field `outputs` is not",
            ),
            (
                format!(r#"{{"attr":"a","drvPath":"{DRV}","constituents":"b"}}"#),
                "field `constituents` is not a list of strings",
            ),
            (
                format!(r#"{{"attr":"a","drvPath":"{DRV}","constituents":["/tmp/x.drv"]}}"#),
                "constituent \"/tmp/x.drv\" is not a derivation",
            ),
        ];
        for (line, want) in cases {
            let e = error_of(&line);
            assert_eq!(e.line, 7);
            assert!(
                e.message.contains(want),
                "{line}: {:?} lacks {want:?}",
                e.message
            );
        }
        assert!(matches!(
            parse_line(2, b"\xff\xfe", &sd()),
            Some(Parsed::Error(LineError { line: 2, .. }))
        ));
        assert_eq!(parse_line(3, b"   ", &sd()), None);
    }

    #[test]
    fn every_line_is_kept_apart_and_numbered() {
        let input = format!(
            "{{\"attr\":\"a\",\"drvPath\":\"{DRV}\"}}\n\nnot json\n{{\"attr\":\"b\",\"drvPath\":\"{DRV2}\"}}\r\n{{\"attr\":\"a\",\"drvPath\":\"{DRV2}\"}}\n"
        );
        let p = parse(input.as_bytes(), &sd());
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(matches!(&p[0], Parsed::Job(j) if j.attr == "a" && j.line == 1));
        assert!(matches!(&p[1], Parsed::Error(e) if e.line == 3));
        assert!(matches!(&p[2], Parsed::Job(j) if j.attr == "b" && j.line == 4));
        assert!(
            matches!(&p[3], Parsed::Error(e) if e.line == 5 && e.message == "job \"a\" already appeared on line 1")
        );
    }

    proptest::proptest! {
        /// Any input, of bytes or of JSON-ish lines: no panic, every result names a line of the
        /// input (in order), and every non-blank line gives exactly one result.
        #[test]
        fn any_input_gives_one_result_per_line(
            lines in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::collection::vec(proptest::num::u8::ANY, 0..40),
                    "[ {}\\[\\]\":,a-z0-9/._-]{0,60}".prop_map(String::into_bytes),
                    (0u32..4, proptest::option::of("[a-z.]{1,8}")).prop_map(|(k, a)| {
                        let attr = a.map_or(String::new(), |a| format!("\"attr\":\"{a}\","));
                        match k {
                            0 => format!("{{{attr}\"drvPath\":\"{DRV}\"}}"),
                            1 => format!("{{{attr}\"error\":\"e\"}}"),
                            2 => format!("{{{attr}\"drvPath\":\"{DRV}\",\"constituents\":[\"x\",\"{DRV2}\"]}}"),
                            _ => format!("{{{attr}\"drvPath\":null}}"),
                        }
                        .into_bytes()
                    }),
                ],
                0..12,
            )
        ) {
            let lines: Vec<Vec<u8>> = lines
                .into_iter()
                .map(|l| l.into_iter().filter(|b| *b != b'\n').collect())
                .collect();
            let input = lines.join(&b'\n');
            let parsed = parse(&input, &sd());
            let at = |p: &Parsed| match p {
                Parsed::Job(j) => j.line,
                Parsed::Error(e) => e.line,
            };
            let want: Vec<usize> = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| {
                    let l = l.strip_suffix(b"\r").unwrap_or(l);
                    std::str::from_utf8(l).map_or(true, |t| !t.trim().is_empty())
                })
                .map(|(i, _)| i + 1)
                .collect();
            let got: Vec<usize> = parsed.iter().map(at).collect();
            proptest::prop_assert_eq!(got, want);
            let jobs: Vec<Job> = parsed
                .iter()
                .filter_map(|p| match p { Parsed::Job(j) => Some(j.clone()), _ => None })
                .collect();
            let errors: Vec<LineError> = parsed
                .iter()
                .filter_map(|p| match p { Parsed::Error(e) => Some(e.clone()), _ => None })
                .collect();
            let n = parsed.len();
            let r = resolve_constituents(jobs, errors);
            proptest::prop_assert_eq!(r.jobs.len() + r.errors.len(), n);
        }
    }

    fn job(line: usize, attr: &str, drv: &str, cs: Option<Vec<Constituent>>) -> Job {
        Job {
            line,
            attr: attr.into(),
            drv_path: drv.into(),
            name: None,
            system: None,
            outputs: BTreeMap::new(),
            constituents: cs,
            limits: MetaLimits::default(),
            repo: None,
            rev: None,
        }
    }

    fn drv(n: u32) -> String {
        format!("/nix/store/{n:0>32}-j{n}.drv")
    }

    #[test]
    fn constituents_by_name_and_by_drv_path() {
        let jobs = vec![
            job(1, "a", &drv(1), None),
            job(2, "b", &drv(2), None),
            job(
                3,
                "tested",
                &drv(3),
                Some(vec![
                    Constituent::Job("a".into()),
                    Constituent::Drv(drv(2)),
                    Constituent::Drv(drv(9)),
                    Constituent::Job("a".into()),
                ]),
            ),
        ];
        let r = resolve_constituents(jobs, vec![]);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.jobs.len(), 3);
        assert_eq!(r.jobs[2].1, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(r.warnings.len(), 1);
        assert!(r.warnings[0].contains(&drv(9)), "{:?}", r.warnings);
    }

    #[test]
    fn aggregates_on_missing_broken_or_cyclic_constituents_are_errors() {
        let j = |n: &str| Constituent::Job(n.into());
        let jobs = vec![
            job(1, "ok", &drv(1), None),
            job(3, "missing", &drv(3), Some(vec![j("ok"), j("nope")])),
            job(4, "onbroken", &drv(4), Some(vec![j("broken")])),
            job(5, "self", &drv(5), Some(vec![j("self")])),
            job(6, "c1", &drv(6), Some(vec![j("c2")])),
            job(7, "c2", &drv(7), Some(vec![j("c1")])),
            job(8, "outer", &drv(8), Some(vec![j("missing"), j("ok")])),
            job(9, "fine", &drv(9), Some(vec![j("ok")])),
        ];
        let errors = vec![LineError {
            line: 2,
            attr: Some("broken".into()),
            message: "error: boom".into(),
        }];
        let r = resolve_constituents(jobs, errors);
        let queued: Vec<&str> = r.jobs.iter().map(|(j, _)| j.attr.as_str()).collect();
        assert_eq!(queued, vec!["ok", "fine"]);
        let lines: Vec<usize> = r.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6, 7, 8]);
        let msg = |l: usize| &r.errors.iter().find(|e| e.line == l).unwrap().message;
        assert!(msg(3).contains("non-existent job \"nope\""), "{}", msg(3));
        assert!(
            msg(4).contains("broken job \"broken\" (line 2)"),
            "{}",
            msg(4)
        );
        assert!(msg(5).contains("names itself"), "{}", msg(5));
        assert!(msg(6).contains("cycle"), "{}", msg(6));
        assert!(msg(7).contains("cycle"), "{}", msg(7));
        assert!(msg(8).contains("broken job \"missing\""), "{}", msg(8));
    }
}
