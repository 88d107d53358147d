//! `qr submit --eval-jobs` against a running `qr serve` and a `qr builder`, with lines in
//! nix-eval-jobs' format produced by real Nix (Debian's nix-bin 2.8, offline, a chroot store):
//! the fixture expressions (with their `lib.nix`) as jobs, an attr that throws (an `error` line),
//! a derivation whose builder exits 1, and three aggregates — one whose constituents (drv paths,
//! as nix-eval-jobs' rewritten aggregates list them) all succeed, one naming (`namedConstituents`)
//! the failing job, one naming two jobs that succeed (it starts only after they finished). Checks job names and statuses, the error lines reported and recorded,
//! re-submission (nothing queued again; the jobs join the new evaluation as existing builds), the
//! aggregates' outcomes, `qr admin evals/eval --json` and `/api/evals`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::cluster::Cluster;
use common::qr::Backend;
use serde_json::{Value, json};

fn nix_available() -> bool {
    Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// An offline Nix with a chroot store (logical `/nix/store`, physical `<dir>/root/nix/store`).
struct Nix {
    dir: tempfile::TempDir,
}

impl Nix {
    fn new() -> Nix {
        let dir = tempfile::tempdir().unwrap();
        for d in ["root", "conf", "home", "expr"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(
            dir.path().join("conf/nix.conf"),
            format!(
                "store = {}\nbuild-users-group =\nexperimental-features = nix-command ca-derivations\n\
                 substituters =\nfsync-metadata = false\n",
                dir.path().join("root").display()
            ),
        )
        .unwrap();
        Nix { dir }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("root/nix/store")
    }

    fn expr_dir(&self) -> PathBuf {
        self.dir.path().join("expr")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let conf = self.dir.path().join("conf");
        c.env("NIX_CONF_DIR", &conf)
            .env("NIX_USER_CONF_FILES", conf.join("nix.conf"))
            .env("HOME", self.dir.path().join("home"))
            .current_dir(self.expr_dir());
        c
    }

    /// `nix eval --json --impure --expr E` (instantiating what it forces into the chroot store).
    fn eval(&self, expr: &str) -> Output {
        self.command("nix")
            .args(["eval", "--json", "--impure", "--expr", expr])
            .output()
            .expect("nix eval")
    }
}

/// The jobs: each fixture's expression as a group, and the extra jobs of this test.
const RELEASE: &str = r#"
with import ./lib.nix;
rec {
  chain = import ./chain.nix;
  diamond = import ./diamond.nix;
  mixed = import ./mixed.nix;
  multi = import ./multi.nix;
  failing = ia "ej-failing" "echo this builder fails; exit 1" {};
  broken = throw "this job is broken on purpose";
  # As releaseTools.aggregate makes them: the constituents are in the drv's context.
  tested_ok = ia "ej-tested-ok" "echo ok > $out" {
    _hydraAggregate = true; constituents = [ chain.c diamond.top ]; };
  # Constituents by name only (nix-eval-jobs' namedConstituents): no dependency in the drv.
  tested_bad = ia "ej-tested-bad" "echo ok > $out" {
    _hydraAggregate = true; constituents = [ "failing" "chain.a" ]; };
  tested_named = ia "ej-tested-named" "echo ok > $out" {
    _hydraAggregate = true; constituents = [ "chain.c" "diamond.top" ]; };
}
"#;

/// What nix-eval-jobs prints for each job that evaluates (fields as its `Drv` JSON: attr,
/// attrPath, drvPath, name, outputs — null for an output whose path is not known before it is
/// built — and system; aggregates with `constituents` / `namedConstituents`).
const JOBS: &str = r#"
let
  r = import ./release.nix;
  known = p: if builtins.substring 0 11 p == "/nix/store/" then p else null;
  agg = j: if j ? _hydraAggregate then {
    constituents = map (c: c.drvPath) (builtins.filter (c: !builtins.isString c) j.constituents);
    namedConstituents = builtins.filter builtins.isString j.constituents;
  } else {};
  info = path: j: {
    attr = builtins.concatStringsSep "." path;
    attrPath = path;
    drvPath = j.drvPath;
    name = j.name;
    system = j.system;
    outputs = builtins.listToAttrs (map (o: { name = o; value = known j.${o}.outPath; }) (j.outputs or [ "out" ]));
  } // agg j;
  group = g: map (n: info [ g n ] r.${g}.${n}) (builtins.attrNames r.${g});
in builtins.concatLists (map group [ "chain" "diamond" "mixed" "multi" ])
  ++ map (n: info [ n ] r.${n}) [ "failing" "tested_ok" "tested_bad" "tested_named" ]
"#;

/// Writes the expressions, instantiates them with Nix, and returns the lines (one per job, the
/// `error` line of `broken`, and two lines qr cannot use), and the jobs by attr.
fn eval_lines(nix: &Nix) -> (String, BTreeMap<String, Value>) {
    let dir = nix.expr_dir();
    std::fs::write(dir.join("lib.nix"), include_str!("../examples/nix/lib.nix")).unwrap();
    for (name, fx) in common::load_fixtures() {
        std::fs::write(dir.join(format!("{name}.nix")), common::s(&fx, "/nix_expr")).unwrap();
    }
    std::fs::write(dir.join("release.nix"), RELEASE).unwrap();
    let out = nix.eval(&format!(
        "import {}",
        write(&dir, "jobs.nix", JOBS).display()
    ));
    assert!(
        out.status.success(),
        "nix eval: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jobs: Vec<Value> = serde_json::from_slice(&out.stdout).expect("nix eval's JSON");
    let broken = nix.eval("(import ./release.nix).broken.drvPath");
    assert!(!broken.status.success(), "the broken attr evaluated");
    let message = String::from_utf8_lossy(&broken.stderr).to_string();
    assert!(
        message.contains("this job is broken on purpose"),
        "{message}"
    );
    let mut lines: Vec<String> = jobs.iter().map(|j| j.to_string()).collect();
    // nix-eval-jobs' error line for an attr that throws.
    lines.insert(
        3,
        json!({"attr": "broken", "attrPath": ["broken"], "error": message}).to_string(),
    );
    lines.insert(5, "this is not JSON".into());
    lines.push(
        json!({"attr": "elsewhere", "attrPath": ["elsewhere"],
            "drvPath": "/gnu/store/kgl69vyd5yssfkn9a7jvb6s21zfah5ja-x.drv"})
        .to_string(),
    );
    let by_attr = jobs
        .into_iter()
        .map(|j| (j["attr"].as_str().unwrap().to_string(), j))
        .collect();
    (lines.join("\n") + "\n", by_attr)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn admin(c: &Cluster, args: &[&str]) -> Value {
    let mut a = vec!["admin", "--json", "--runner"];
    let url = c.url();
    a.push(&url);
    a.push("--token-file");
    let token = c.token.display().to_string();
    a.push(&token);
    a.extend_from_slice(args);
    let out = c.qr.run(&a, &[]);
    assert!(
        out.status.success(),
        "qr admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("qr admin's JSON")
}

#[test]
fn eval_jobs_lines_from_nix_become_evaluations_with_aggregates_sqlite() {
    eval_jobs_lines_from_nix_become_evaluations(Backend::Sqlite);
}

#[test]
fn eval_jobs_lines_from_nix_become_evaluations_with_aggregates_postgres() {
    eval_jobs_lines_from_nix_become_evaluations(Backend::Postgres);
}

fn eval_jobs_lines_from_nix_become_evaluations(backend: Backend) {
    if !nix_available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "nix-instantiate is not installed, and CI is set (scripts/test installs nix-bin)"
        );
        eprintln!("nix-instantiate is not installed: skipped");
        return;
    }
    let nix = Nix::new();
    let (lines, jobs) = eval_lines(&nix);
    let Some(mut c) = Cluster::new(backend) else {
        return;
    };
    let file = write(c.qr.state_dir(), "jobs.jsonl", &lines);
    c.start_serve();
    let b = c.builder("b1", &["--systems", "x86_64-linux", "--max-jobs", "2"], &[]);
    assert!(
        c.wait_joined("b1", 1, Duration::from_secs(20)),
        "{}",
        c.logs(&[&b])
    );
    let store = nix.store();
    let from = store.to_str().unwrap();
    let submit = |wait: bool| {
        let mut args = vec!["submit", "--json", "--eval-jobs", file.to_str().unwrap()];
        args.extend(["--from", from]);
        if wait {
            args.extend(["--wait", "--timeout", "300"]);
        }
        c.qr.run(&args, &[])
    };

    // --- the first evaluation: every job queued and built, the bad lines reported.
    let out = submit(true);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let logs = || format!("{stderr}\n{}", c.logs(&[&b]));
    assert_eq!(
        out.status.code(),
        Some(1),
        "errors and failures: {}",
        logs()
    );
    let builds = json_lines(&out);
    let by_job: BTreeMap<String, &Value> = builds
        .iter()
        .map(|v| (v["job"].as_str().unwrap().to_string(), v))
        .collect();
    assert_eq!(
        by_job.keys().collect::<Vec<_>>(),
        jobs.keys().collect::<Vec<_>>(),
        "one build per job, named by its attr: {}",
        logs()
    );
    for (attr, j) in &jobs {
        let v = by_job[attr];
        assert_eq!(v["drvPath"], j["drvPath"], "{attr}");
        assert_eq!(v["isNew"], true, "{attr}");
        assert_eq!(v["eval"], 1, "{attr}");
        let want = match attr.as_str() {
            "failing" => 1,
            "tested_bad" => 2,
            _ => 0,
        };
        assert_eq!(v["status"], want, "{attr}: {v}\n{}", logs());
        if want == 0 {
            // Input-addressed outputs Nix knew at evaluation are the ones built.
            for (o, p) in j["outputs"].as_object().unwrap() {
                if !p.is_null() {
                    assert_eq!(v["outputs"][o], *p, "{attr}!{o}");
                }
            }
        }
    }
    // The build's own job name is the attr too.
    let one = admin(&c, &["build", &by_job["chain.c"]["id"].to_string()]);
    assert_eq!(one["build"]["job"], "chain.c");
    assert_eq!(one["build"]["jobset"], "qr-submit");
    // The error lines, on stderr with their line numbers.
    assert!(
        stderr.contains("qr: line 4 (job broken): error:")
            && stderr.contains("this job is broken on purpose"),
        "{stderr}"
    );
    assert!(stderr.contains("qr: line 6: malformed JSON"), "{stderr}");
    let last = lines.lines().count();
    assert!(
        stderr.contains(&format!(
            "qr: line {last} (job elsewhere): drvPath \"/gnu/store/"
        )) && stderr.contains("is not a store path of this store (/nix/store)"),
        "{stderr}"
    );

    // The aggregate whose constituent failed: held back (never built), then DepFailed, with a
    // step saying which constituent failed; the other ran after its constituents succeeded.
    let failing = by_job["failing"]["id"].as_i64().unwrap();
    let bad = admin(&c, &["build", &by_job["tested_bad"]["id"].to_string()]);
    let steps = bad["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1, "{bad}");
    assert_eq!(steps[0]["status_name"], "DepFailed");
    assert_eq!(steps[0]["propagated_from"], failing);
    assert!(
        steps[0]["error_msg"]
            .as_str()
            .unwrap()
            .contains(&format!("constituent build {failing} ")),
        "{bad}"
    );
    let bad_drv = jobs["tested_bad"]["drvPath"].as_str().unwrap();
    assert!(
        !b.runs().iter().any(|r| r == bad_drv),
        "the failed aggregate was built"
    );
    assert!(
        c.serve_logs()
            .contains("aggregate held back until its constituents finish"),
        "{}",
        logs()
    );
    // The aggregate naming two jobs it does not depend on started only once both had finished.
    let serve_log = c.serve_logs();
    let at = |what: &str, id: &Value| {
        let field = format!("build={id} ");
        serve_log
            .lines()
            .position(|l| l.contains(what) && l.contains(&field))
            .unwrap_or_else(|| panic!("no {what:?} of build {id}:\n{serve_log}"))
    };
    let started = at("build queued", &by_job["tested_named"]["id"]);
    for j in ["chain.c", "diamond.top"] {
        assert!(
            at("build finished", &by_job[j]["id"]) < started,
            "tested_named started before {j} finished:\n{serve_log}"
        );
    }

    // The evaluation record.
    let evals = admin(&c, &["evals"]);
    let e = &evals["evals"][0];
    let n = jobs.len() as u64;
    assert_eq!(e["id"], 1);
    assert_eq!(e["jobset"], "qr-submit");
    assert_eq!(e["jobs"], n);
    assert_eq!(e["new_builds"], n);
    assert_eq!(e["existing_builds"], 0);
    assert_eq!(e["errors"], 3);
    assert_eq!(e["succeeded"], n - 2);
    assert_eq!(e["failed"], 2);
    assert_eq!(e["queued"], 0);
    assert_eq!(
        e["source"],
        std::fs::canonicalize(&file).unwrap().to_str().unwrap()
    );
    let d = admin(&c, &["eval", "1"]);
    let errs = d["errors"].as_array().unwrap();
    let lines_of: Vec<(i64, &str)> = errs
        .iter()
        .map(|x| (x["line"].as_i64().unwrap(), x["job"].as_str().unwrap()))
        .collect();
    assert_eq!(
        lines_of,
        vec![(4, "broken"), (6, ""), (last as i64, "elsewhere")]
    );
    assert!(
        errs[0]["message"]
            .as_str()
            .unwrap()
            .contains("this job is broken on purpose")
    );
    let members: BTreeMap<&str, &Value> = d["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["job"].as_str().unwrap(), j))
        .collect();
    assert_eq!(members.len(), jobs.len());
    let mut ok_constituents: Vec<i64> = members["tested_ok"]["constituents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    ok_constituents.sort();
    let mut want: Vec<i64> = ["chain.c", "diamond.top"]
        .iter()
        .map(|j| by_job[*j]["id"].as_i64().unwrap())
        .collect();
    want.sort();
    assert_eq!(ok_constituents, want);
    let mut bad_constituents: Vec<i64> = members["tested_bad"]["constituents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    bad_constituents.sort();
    let mut want: Vec<i64> = ["failing", "chain.a"]
        .iter()
        .map(|j| by_job[*j]["id"].as_i64().unwrap())
        .collect();
    want.sort();
    assert_eq!(bad_constituents, want);

    // --- the same lines again: nothing is queued again; every job joins evaluation 2 as the
    // existing build of its drv.
    let runs_before = b.runs().len();
    let out = submit(false);
    assert_eq!(out.status.code(), Some(1), "the error lines again");
    let again = json_lines(&out);
    assert_eq!(again.len(), jobs.len());
    for v in &again {
        let job = v["job"].as_str().unwrap();
        assert_eq!(v["eval"], 2);
        assert_eq!(v["isNew"], false, "{job}");
        assert_eq!(v["id"], by_job[job]["id"], "{job}: the same build");
    }
    let evals = admin(&c, &["evals"]);
    let e2 = &evals["evals"][0];
    assert_eq!(e2["id"], 2);
    assert_eq!(e2["new_builds"], 0);
    assert_eq!(e2["existing_builds"], n);
    assert_eq!(e2["succeeded"], n - 2);
    assert_eq!(e2["failed"], 2);
    assert_eq!(evals["evals"][1]["id"], 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(b.runs().len(), runs_before, "nothing was built again");

    // The same over HTTP.
    let (code, ctype, body) = c.http_get("/api/evals");
    assert_eq!(code, 200);
    assert_eq!(ctype, "application/json");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["evals"].as_array().unwrap().len(), 2);
    assert_eq!(v["evals"][1]["succeeded"], n - 2);
    let (code, _, body) = c.http_get("/api/evals/1");
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["jobs"].as_array().unwrap().len(), jobs.len());
    assert_eq!(v["errors"].as_array().unwrap().len(), 3);
    let (code, _, body) = c.http_get("/api/evals/99");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("evaluation 99 not found"), "{body}");
}
