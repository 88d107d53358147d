//! The native executor's failure modes and its sandbox: each failure has its exact status and
//! message, and leaves the store as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qr::builder::executor::{ExecError, ExecutorConfig, Limits, NativeExecutor};
use qr::store::hash_modulo::DrvHashes;
use qr::store::placeholder::hash_placeholder;
use qr::store::{Derivation, DerivationOutput, LocalStore, Store, StoreDir, StoreError};

/// A store of either kind in `tmp`: `/nix/store` over a separate root (namespace), or dir == root.
async fn store(tmp: &Path, namespace: bool) -> Arc<LocalStore> {
    let root = tmp.join("root");
    let sd = if namespace {
        StoreDir::default()
    } else {
        StoreDir::new(root.to_str().unwrap()).unwrap()
    };
    Arc::new(LocalStore::open(sd, &root).await.unwrap())
}

fn executor(store: Arc<LocalStore>, tmp: &Path) -> NativeExecutor {
    let mut cfg = ExecutorConfig::new(tmp);
    cfg.cores = 1;
    NativeExecutor::new(store, cfg)
}

fn base_env(name: &str) -> BTreeMap<String, String> {
    [
        ("PATH", "/usr/bin:/bin"),
        ("builder", "/bin/sh"),
        ("name", name),
        ("system", qr::config::this_system().as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// An input-addressed `/bin/sh -c script` derivation (output path computed as Nix does).
fn ia_drv(sd: &StoreDir, name: &str, script: &str, srcs: &[&str]) -> Derivation {
    let mut d = Derivation {
        name: name.into(),
        outputs: [("out".to_string(), DerivationOutput::Deferred)].into(),
        input_srcs: srcs.iter().map(|s| s.to_string()).collect(),
        system: qr::config::this_system(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: base_env(name),
        ..Default::default()
    };
    let mut none = |p: &str| Err::<Derivation, String>(p.to_string());
    DrvHashes::new(sd.clone())
        .fill_input_addressed_paths(&mut d, &mut none)
        .unwrap();
    d
}

/// A floating CA `/bin/sh -c script` derivation.
fn ca_drv(name: &str, script: &str) -> Derivation {
    let mut env = base_env(name);
    env.insert("out".into(), hash_placeholder("out"));
    env.insert("outputHashAlgo".into(), "sha256".into());
    env.insert("outputHashMode".into(), "recursive".into());
    Derivation {
        name: name.into(),
        outputs: [(
            "out".to_string(),
            DerivationOutput::CaFloating {
                method_algo: "r:sha256".into(),
            },
        )]
        .into(),
        system: qr::config::this_system(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env,
        ..Default::default()
    }
}

async fn add(store: &LocalStore, d: &Derivation) -> String {
    store.add_derivation(d).await.unwrap()
}

/// The root's entries other than the metadata dir.
fn root_entries(store: &LocalStore) -> BTreeSet<String> {
    std::fs::read_dir(store.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".qr-meta")
        .collect()
}

#[tokio::test]
async fn a_failing_builder_reports_its_exit_code_and_log_tail() {
    for namespace in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let store = store(tmp.path(), namespace).await;
        let exec = executor(store.clone(), tmp.path());
        // It also leaves junk in the store and a partial output: both are removed.
        let script = "for i in $(seq 1 25); do echo line $i; done; echo oops >&2; \
                      echo j > $NIX_STORE/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-junk; echo partial > $out; exit 3";
        let d = ia_drv(store.store_dir(), "fails", script, &[]);
        let p = add(&store, &d).await;
        let before = root_entries(&store);
        let e = exec.build(&p, &d, Limits::default()).await.unwrap_err();
        let mut want = format!("builder for '{p}' failed with exit code 3; last 20 log lines:");
        for i in 7..=25 {
            want.push_str(&format!("\n> line {i}"));
        }
        want.push_str("\n> oops");
        assert_eq!(e.to_string(), want);
        assert!(matches!(e, ExecError::Failed { .. }));
        assert_eq!((e.status(), e.is_transient()), (1, false));
        assert_eq!(e.log_tail().len(), 20);
        assert_eq!(exec.runs_of(&p), 1);
        assert_eq!(root_entries(&store), before, "namespace={namespace}");
        assert!(
            !store
                .is_valid_path(d.outputs["out"].path().unwrap())
                .await
                .unwrap()
        );
        // The whole log is kept.
        let logs: Vec<_> = std::fs::read_dir(tmp.path().join("logs"))
            .unwrap()
            .collect();
        assert_eq!(logs.len(), 1);
        let log = std::fs::read_to_string(logs[0].as_ref().unwrap().path()).unwrap();
        assert!(
            log.starts_with("line 1\n") && log.ends_with("line 25\noops\n"),
            "{log}"
        );
    }
}

#[tokio::test]
async fn the_build_timeout_kills_the_process_group() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path(), false).await;
    let exec = executor(store.clone(), tmp.path());
    // A background child holds the log pipe open too: it must die with the group.
    let d = ca_drv("slow", "sleep 60 & echo started; sleep 60");
    let p = add(&store, &d).await;
    let limits = Limits {
        timeout: Some(Duration::from_secs(1)),
        ..Limits::default()
    };
    let t = Instant::now();
    let e = exec.build(&p, &d, limits).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert_eq!(
        e.to_string(),
        format!("building '{p}' timed out after 1 seconds (build timeout)")
    );
    assert!(matches!(e, ExecError::TimedOut { .. }));
    assert_eq!((e.status(), e.is_transient()), (7, false));
    assert_eq!(e.log_tail(), ["started"]);
}

#[tokio::test]
async fn max_silent_time_kills_a_quiet_builder() {
    for namespace in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let store = store(tmp.path(), namespace).await;
        let mut cfg = ExecutorConfig::new(tmp.path());
        cfg.max_silent = Some(Duration::from_secs(1));
        cfg.timeout = Some(Duration::from_secs(60));
        let exec = NativeExecutor::new(store.clone(), cfg);
        let d = ca_drv("quiet", "echo hello; sleep 60");
        let p = add(&store, &d).await;
        let before = root_entries(&store);
        let e = exec.build(&p, &d, Limits::default()).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("building '{p}' timed out after 1 seconds of silence (max-silent-time)")
        );
        assert_eq!(e.status(), 7);
        assert_eq!(root_entries(&store), before);
    }
}

#[tokio::test]
async fn the_log_limit_kills_a_chatty_builder() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path(), false).await;
    let exec = executor(store.clone(), tmp.path());
    let d = ca_drv("chatty", "while :; do echo 0123456789; done");
    let p = add(&store, &d).await;
    let limits = Limits {
        max_log_bytes: Some(1000),
        ..Limits::default()
    };
    let e = exec.build(&p, &d, limits).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("building '{p}' was killed after writing more than 1000 bytes of log output")
    );
    assert!(matches!(e, ExecError::LogLimitExceeded { .. }));
    assert_eq!((e.status(), e.is_transient()), (10, false));
    let logs: Vec<_> = std::fs::read_dir(tmp.path().join("logs"))
        .unwrap()
        .collect();
    let log = logs[0].as_ref().unwrap().path();
    assert_eq!(std::fs::metadata(log).unwrap().len(), 1000);
}

#[tokio::test]
async fn a_builder_that_writes_nothing_fails_clearly() {
    for namespace in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let store = store(tmp.path(), namespace).await;
        let exec = executor(store.clone(), tmp.path());
        let d = ia_drv(store.store_dir(), "lazy", "echo nothing to do", &[]);
        let p = add(&store, &d).await;
        let out = d.outputs["out"].path().unwrap().to_string();
        let e = exec.build(&p, &d, Limits::default()).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("builder for '{p}' did not produce output 'out' (expected at {out})")
        );
        assert!(matches!(e, ExecError::OutputRejected { .. }));
        assert_eq!((e.status(), e.is_transient()), (1, false));

        // A CA floating output is expected at its scratch path.
        let c = ca_drv("lazy-ca", "true");
        let cp = add(&store, &c).await;
        let sd = store.store_dir();
        let scratch = qr::store::ca_output::scratch_path(sd, &sd.parse(&cp).unwrap(), "out");
        let e = exec.build(&cp, &c, Limits::default()).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "builder for '{cp}' did not produce output 'out' (expected at {})",
                sd.print(&scratch)
            )
        );
        assert_eq!(root_entries(&store).len(), 2, "only the two drvs");
    }
}

#[tokio::test]
async fn a_builder_writing_outside_its_outputs_is_refused_and_cleaned_up() {
    for namespace in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let store = store(tmp.path(), namespace).await;
        let exec = executor(store.clone(), tmp.path());
        let evil = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-evil";
        let d = ia_drv(
            store.store_dir(),
            "sneaky",
            &format!("echo ok > $out; echo x > $NIX_STORE/{evil}; mkdir $NIX_STORE/.hidden"),
            &[],
        );
        let p = add(&store, &d).await;
        let before = root_entries(&store);
        let e = exec.build(&p, &d, Limits::default()).await.unwrap_err();
        let sd = store.store_dir();
        let want = format!(
            "builder for '{p}' wrote outside its outputs: {sd}/.hidden, {sd}/{evil} (removed)"
        );
        assert_eq!(e.to_string(), want);
        assert!(matches!(e, ExecError::OutputRejected { .. }));
        assert_eq!(e.status(), 1);
        // Neither the stray entry nor the unregistered output is left behind.
        let after = root_entries(&store);
        assert_eq!(after, before, "namespace={namespace}");
        assert!(
            !store
                .is_valid_path(d.outputs["out"].path().unwrap())
                .await
                .unwrap()
        );
    }
}

#[tokio::test]
async fn concurrent_builds_do_not_see_each_others_outputs_as_strays() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path(), false).await;
    let exec = Arc::new(executor(store.clone(), tmp.path()));
    let mut drvs = Vec::new();
    for i in 0..4 {
        let d = ca_drv(
            &format!("par{i}"),
            &format!("sleep 0.2; mkdir $out; echo {i} > $out/x"),
        );
        let p = add(&store, &d).await;
        drvs.push((p, d));
    }
    let mut tasks = Vec::new();
    for (p, d) in drvs.clone() {
        let exec = exec.clone();
        tasks.push(tokio::spawn(async move {
            exec.build(&p, &d, Limits::default()).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert!(store.is_valid_path(&r.outputs["out"].path).await.unwrap());
    }
    assert_eq!(exec.runs(), 4);
}

#[tokio::test]
async fn a_fixed_output_with_the_wrong_hash_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path(), true).await;
    let exec = executor(store.clone(), tmp.path());
    let sd = store.store_dir().clone();
    let hello = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    let mut d = ia_drv(&sd, "fod", "printf goodbye > $out", &[]);
    let out = sd.print(&d.fixed_output_path(&sd, "out", "sha256", hello).unwrap());
    d.outputs.insert(
        "out".into(),
        DerivationOutput::CaFixed {
            method_algo: "sha256".into(),
            hash: hello.into(),
            path: out.clone(),
        },
    );
    d.env.insert("out".into(), out.clone());
    let p = add(&store, &d).await;
    let e = exec.build(&p, &d, Limits::default()).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "hash mismatch in fixed-output derivation '{p}':\n  specified: sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=\n     got:    sha256-guNaY866N+lkZDTF3UEupXcUfx5KQczeFhQlMYfj2/k="
        )
    );
    assert_eq!(e.status(), 1);
    assert!(!store.is_valid_path(&out).await.unwrap());
}

#[tokio::test]
async fn the_sandbox_shows_the_store_at_its_logical_dir_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path(), true).await;
    let exec = executor(store.clone(), tmp.path());
    let src = store
        .add_text("input.txt", "an input\n", &BTreeSet::new())
        .await
        .unwrap();
    let script = format!(
        "exec > $out; id -u; id -g; hostname; pwd; echo $NIX_BUILD_TOP $TMPDIR $HOME $NIX_STORE; \
         cat {src}; ls /nix/store | grep -v -- '-probe$'; \
         if echo x > {src} 2>/dev/null; then echo input-writable; else echo input-read-only; fi; \
         ls -d /tmp /build /dev/null /proc/self >/dev/null && echo dirs-ok"
    );
    let d = ia_drv(store.store_dir(), "probe", &script, &[&src]);
    let p = add(&store, &d).await;
    let r = exec.build(&p, &d, Limits::default()).await.unwrap();
    let out = store.physical_path(&r.outputs["out"].path).unwrap();
    let text = std::fs::read_to_string(out).unwrap();
    let src_base = src.rsplit('/').next().unwrap();
    assert_eq!(
        text,
        format!(
            "1000\n100\nlocalhost\n/build\n/build /build /homeless-shelter /nix/store\nan input\n{src_base}\ninput-read-only\ndirs-ok\n"
        )
    );
    // The output refers to the input it printed.
    assert_eq!(r.outputs["out"].references, [src.clone()].into());
    assert_eq!(r.outputs["out"].deriver.as_deref(), Some(p.as_str()));
    assert!(store.root().join(src_base).exists());
}

#[tokio::test]
async fn builds_share_a_read_only_sandbox_skeleton_and_keep_their_own_tmp() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path(), true).await;
    let exec = executor(store.clone(), tmp.path());
    // Each build tries to change what the next one would see: the skeleton's files, its root,
    // and /tmp (which is the build's own).
    let script = "exec > $out; \
         if (echo x >> /etc/passwd) 2>/dev/null; then echo etc-writable; else echo etc-read-only; fi; \
         if (: > /stray) 2>/dev/null; then echo root-writable; else echo root-read-only; fi; \
         ls /tmp | wc -l; echo left > /tmp/mark; grep -c nixbld /etc/passwd";
    let mut texts = Vec::new();
    for name in ["first", "second"] {
        let d = ia_drv(store.store_dir(), name, script, &[]);
        let p = add(&store, &d).await;
        let r = exec.build(&p, &d, Limits::default()).await.unwrap();
        let out = store.physical_path(&r.outputs["out"].path).unwrap();
        texts.push(std::fs::read_to_string(out).unwrap());
    }
    let want = "etc-read-only\nroot-read-only\n0\n1\n";
    assert_eq!(texts, [want, want]);
    // One skeleton, made by the first build, kept beside the store's metadata.
    let skeletons = std::fs::read_dir(store.root().join(".qr-meta/sandboxes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert_eq!(skeletons.len(), 1, "{skeletons:?}");
    assert!(!skeletons[0].starts_with(".tmp-"));
    // Nothing of either build is left in the root but its output and drv.
    assert!(
        root_entries(&store).iter().all(|n| !n.starts_with(".qr-")),
        "{:?}",
        root_entries(&store)
    );
}

#[tokio::test]
async fn unbuildable_derivations_are_refused_before_running() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path(), false).await;
    let exec = executor(store.clone(), tmp.path());
    let sd = store.store_dir().clone();
    // A CA drv with an input drv must be resolved first.
    let a = ca_drv("a", "echo a > $out");
    let ap = add(&store, &a).await;
    let mut b = ca_drv("b", "echo b > $out");
    b.input_drvs.insert(ap.clone(), ["out".to_string()].into());
    let bp = add(&store, &b).await;
    let e = exec.build(&bp, &b, Limits::default()).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "derivation {bp} must be resolved before it is built (it is CA floating with input derivations, or has deferred outputs)"
        )
    );
    assert_eq!(e.status(), 1);
    // Another system.
    let mut c = ca_drv("c", "true");
    c.system = "mips64-plan9".into();
    let cp = add(&store, &c).await;
    let e = exec.build(&cp, &c, Limits::default()).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "derivation {cp} is for system \"mips64-plan9\"; this executor builds for {}",
            qr::config::this_system()
        )
    );
    assert_eq!(e.status(), 9);
    // exportReferencesGraph (also under structured attributes) of a path outside the store is
    // refused as Nix refuses it, for good.
    for (k, v) in [
        ("exportReferencesGraph", "graph /nix/store/x".to_string()),
        (
            "__json",
            r#"{"exportReferencesGraph":{"graph":["/nix/store/x"]}}"#.to_string(),
        ),
    ] {
        let mut g = ca_drv("g", "true");
        g.env.insert(k.into(), v);
        let gp = add(&store, &g).await;
        let e = exec.build(&gp, &g, Limits::default()).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "derivation '{gp}': 'exportReferencesGraph' contains a non-store path '/nix/store/x'"
            )
        );
        assert_eq!((e.status(), e.is_transient()), (1, false));
    }
    // A missing input is machine trouble (transient).
    let missing = format!("{sd}/00000000000000000000000000000000-gone");
    let d = ia_drv(&sd, "d", "true", &[&missing]);
    let e = exec
        .build(&sd.print(&d.drv_path(&sd).unwrap()), &d, Limits::default())
        .await
        .unwrap_err();
    assert!(e.is_transient() && e.status() == 3, "{e}");
    // A drv that does not match its path.
    let e = exec.build(&ap, &c, Limits::default()).await.unwrap_err();
    assert!(e.to_string().contains("does not match its path"), "{e}");
    assert_eq!(exec.runs(), 0);
}

#[tokio::test]
async fn malformed_derivations_are_refused_by_read_and_import() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path(), true).await;
    // read_derivation: a registered .drv that does not parse.
    let bad = "Derive([(\"out\",\"\",\"r:sha256\",\"\")],[],[],\"x\",\"/bin/sh\",[],[(\"a\",1)])";
    let p = store
        .add_text("bad.drv", bad, &BTreeSet::new())
        .await
        .unwrap();
    let e = store.read_derivation(&p).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("malformed derivation {p}: expected '\"' at byte 63")
    );
    assert!(matches!(e, StoreError::BadDerivation { .. }));

    // import: a malformed file, and a well-formed one under the wrong path.
    let dir = tmp.path().join("src");
    std::fs::create_dir(&dir).unwrap();
    let bad_path = "/nix/store/00000000000000000000000000000000-bad.drv";
    std::fs::write(dir.join("00000000000000000000000000000000-bad.drv"), bad).unwrap();
    let e = store
        .import_from_dir(&dir, &[bad_path.to_string()])
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "malformed derivation {bad_path}: {}/00000000000000000000000000000000-bad.drv: expected '\"' at byte 63",
            dir.display()
        )
    );
    let good = ca_drv("good", "true");
    let good_text = good.to_aterm();
    let wrong = "/nix/store/11111111111111111111111111111111-good.drv";
    std::fs::write(
        dir.join("11111111111111111111111111111111-good.drv"),
        &good_text,
    )
    .unwrap();
    let e = store
        .import_from_dir(&dir, &[wrong.to_string()])
        .await
        .unwrap_err();
    let right = store
        .store_dir()
        .print(&good.drv_path(store.store_dir()).unwrap());
    assert_eq!(
        e.to_string(),
        format!("derivation file {wrong} does not hash to its own path (recomputed {right})")
    );
    assert!(!store.is_valid_path(wrong).await.unwrap());
    assert!(!store.is_valid_path(bad_path).await.unwrap());
}

#[tokio::test]
async fn dropping_a_build_kills_the_builder() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path(), false).await;
    let exec = executor(store.clone(), tmp.path());
    let pid_file = tmp.path().join("pid");
    let d = ca_drv(
        "dropped",
        &format!("echo $$ > {}; exec sleep 60", pid_file.display()),
    );
    let p = add(&store, &d).await;
    let r = tokio::time::timeout(
        Duration::from_millis(500),
        exec.build(&p, &d, Limits::default()),
    )
    .await;
    assert!(r.is_err(), "the build cannot finish in time");
    // The builder was started, and is gone soon after the future is dropped.
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid: i32 = loop {
        if let Ok(s) = std::fs::read_to_string(&pid_file) {
            if let Ok(p) = s.trim().parse() {
                break p;
            }
        }
        assert!(Instant::now() < deadline, "the builder never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    loop {
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        if !alive {
            break;
        }
        assert!(Instant::now() < deadline, "builder {pid} still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
