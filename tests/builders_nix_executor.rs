//! A `qr builder --executor nix` (Debian's `nix-bin`, offline, store `/nix/store` over a temp root)
//! builds the fixture graphs for a `qr serve`: each build gets Nix's own output paths, Nix really
//! built them (its store holds the outputs), and the runner verified and registered what it sent.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::cluster::Cluster;
use common::qr::Backend;

fn nix_available() -> bool {
    Command::new("nix-store")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn nix_executor_builds_fixture_graphs_to_nix_paths() {
    if !nix_available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "nix-store is not installed, and CI is set (scripts/test installs nix-bin)"
        );
        eprintln!("nix-store is not installed: skipped");
        return;
    }
    let Some(mut c) = Cluster::new(Backend::Sqlite) else {
        return;
    };
    c.start_serve();
    let nix = tempfile::tempdir().unwrap();
    let root = nix.path().join("root");
    let conf = nix.path().join("conf");
    let home = nix.path().join("home");
    for d in [&root, &conf, &home] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(
        conf.join("nix.conf"),
        format!(
            "store = {}\nbuild-users-group =\nsandbox = true\nsandbox-fallback = false\n\
             extra-sandbox-paths = /bin=/usr/bin /usr /lib=/usr/lib /lib64=/usr/lib64\n\
             experimental-features = nix-command ca-derivations\nsubstituters =\n\
             fsync-metadata = false\n",
            root.display()
        ),
    )
    .unwrap();
    let env = [
        ("NIX_CONF_DIR", conf.to_str().unwrap()),
        (
            "NIX_USER_CONF_FILES",
            conf.join("nix.conf").to_str().unwrap().to_string().leak() as &str,
        ),
        ("HOME", home.to_str().unwrap()),
    ];
    let b = c.builder(
        "nixer",
        &[
            "--systems",
            "x86_64-linux",
            "--executor",
            "nix",
            "--max-jobs",
            "2",
        ],
        &env,
    );
    assert!(
        c.wait_joined("nixer", 1, Duration::from_secs(20)),
        "{}",
        c.logs(&[&b])
    );

    let fixtures = common::load_fixtures();
    // Every fixture's drvs (and mixed.json's `builtins.toFile` source) into the runner's store.
    let dir = c.qr.state_dir().join("fixture-store");
    std::fs::create_dir_all(&dir).unwrap();
    let mut all = Vec::new();
    let mut used = BTreeSet::new();
    for (_, fx) in &fixtures {
        for (p, v) in common::derivations(fx) {
            std::fs::write(
                dir.join(p.rsplit('/').next().unwrap()),
                common::s(v, "/aterm"),
            )
            .unwrap();
            all.push(p.to_string());
            if let Some(i) = v["show_derivation"]["inputDrvs"].as_object() {
                used.extend(i.keys().cloned());
            }
        }
    }
    let sd = qr::store::StoreDir::default();
    let src = sd.print(&sd.make_text_path("mx-src.txt", b"some source\n", []));
    std::fs::write(dir.join(src.rsplit('/').next().unwrap()), "some source\n").unwrap();
    let mut args = vec![
        "import".to_string(),
        "--from".into(),
        dir.display().to_string(),
    ];
    args.extend(all.iter().cloned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.qr.run(&argv, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tops: Vec<PathBuf> = all
        .iter()
        .filter(|p| !used.contains(*p))
        .map(PathBuf::from)
        .collect();
    let refs: Vec<&std::path::Path> = tops.iter().map(PathBuf::as_path).collect();
    let (out, builds) = c.finish(c.submit(&refs, 150));
    let logs = c.logs(&[&b]);
    assert!(
        out.status.success(),
        "{}\n{logs}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut nix_built = BTreeSet::new();
    let mut checked = 0;
    for (name, f) in &fixtures {
        let drvs = f["derivations"].as_object().unwrap();
        for bld in builds
            .iter()
            .filter(|x| drvs.contains_key(x["drvPath"].as_str().unwrap()))
        {
            assert_eq!(bld["status"], 0, "{name}: {bld}\n{logs}");
            let drv = bld["drvPath"].as_str().unwrap();
            let want: BTreeMap<String, String> = drvs[drv]["realisations"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(o, r)| (o.clone(), r["out_path"].as_str().unwrap().to_string()))
                .collect();
            let got: BTreeMap<String, String> = bld["outputs"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(o, p)| (o.clone(), p.as_str().unwrap().to_string()))
                .collect();
            assert_eq!(got, want, "{name}: outputs of {drv}");
            // Nix itself produced them: they are in its store.
            for p in got.values() {
                let phys = root.join(p.trim_start_matches('/'));
                assert!(
                    phys.exists(),
                    "{p} is not in Nix's store at {}",
                    phys.display()
                );
                checked += 1;
            }
        }
        nix_built.extend(
            f["build_order_log"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|l| {
                    l.as_str()?
                        .strip_prefix("building '")?
                        .strip_suffix("'...")
                        .map(str::to_string)
                }),
        );
    }
    assert!(checked >= fixtures.len());
    // Nix built exactly the drvs it built when the fixtures were made, once each.
    let runs = b.runs();
    let ran: BTreeSet<String> = runs.iter().cloned().collect();
    assert_eq!(ran.len(), runs.len(), "a drv was built twice: {runs:?}");
    assert_eq!(ran, nix_built, "{logs}");
}
