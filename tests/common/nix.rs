//! Real Nix (Debian's nix-bin 2.8), offline, each instance with a chroot store of its own
//! (`store = <tmp>/root`: files under `<tmp>/root/nix/store`, paths under `/nix/store`), its own
//! configuration and `HOME` (so no narinfo cache is shared between stores).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Whether `nix-store` runs here. In CI (where scripts/test installs nix-bin) its absence fails.
pub fn available() -> bool {
    let ok = Command::new("nix-store")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "nix-store is not installed, and CI is set (scripts/test installs nix-bin)"
        );
        eprintln!("nix-store is not installed: skipped");
    }
    ok
}

/// One Nix with a fresh chroot store.
pub struct NixStore {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    conf: PathBuf,
    home: PathBuf,
}

impl NixStore {
    pub fn new() -> NixStore {
        Self::with_settings("sandbox = false\n")
    }

    /// A store whose builds run in Nix's sandbox as `nix-bin` sets it up here (the build dir at
    /// `/build`, uid 1000, `/bin`, `/usr`, `/lib`, `/lib64` from this machine), with `cores`
    /// build cores (`NIX_BUILD_CORES`).
    pub fn sandboxed(cores: usize) -> NixStore {
        Self::with_settings(&format!(
            "sandbox = true\nsandbox-fallback = false\n\
             extra-sandbox-paths = /bin=/usr/bin /usr /lib=/usr/lib /lib64=/usr/lib64\n\
             cores = {cores}\n"
        ))
    }

    fn with_settings(settings: &str) -> NixStore {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("root");
        let conf = dir.path().join("conf");
        let home = dir.path().join("home");
        for d in [&root, &conf, &home] {
            std::fs::create_dir_all(d).expect("dir");
        }
        std::fs::write(
            conf.join("nix.conf"),
            format!(
                "store = {}\nbuild-users-group =\n{settings}\
                 experimental-features = nix-command ca-derivations\nsubstituters =\n\
                 fsync-metadata = false\nconnect-timeout = 5\n",
                root.display()
            ),
        )
        .expect("nix.conf");
        NixStore {
            dir,
            root,
            conf,
            home,
        }
    }

    /// Where the store's files are.
    pub fn physical_store(&self) -> PathBuf {
        self.root.join("nix/store")
    }

    /// `program` with this store's environment.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("NIX_CONF_DIR", &self.conf)
            .env("NIX_USER_CONF_FILES", self.conf.join("nix.conf"))
            .env("HOME", &self.home)
            .env_remove("NIX_REMOTE");
        c
    }

    /// Runs `program args…`, returning its output (whatever the status).
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.cmd(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"))
    }

    /// `nix-instantiate FILE`: the drv paths it prints (deduplicated, in order).
    pub fn instantiate(&self, file: &Path) -> Vec<String> {
        let out = self.run("nix-instantiate", &[file.to_str().expect("utf-8 path")]);
        assert!(
            out.status.success(),
            "nix-instantiate {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut drvs: Vec<String> = Vec::new();
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let p = l.split('!').next().unwrap_or(l).trim().to_string();
            if p.ends_with(".drv") && !drvs.contains(&p) {
                drvs.push(p);
            }
        }
        drvs
    }

    /// `nix-store --realise DRV`: the output paths, or the error text.
    pub fn realise(&self, drv: &str) -> Result<BTreeSet<String>, String> {
        let out = self.run("nix-store", &["--realise", drv]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `nix path-info --json PATH`: its object (`narHash`, `narSize`, `references`, …).
    pub fn path_info(&self, path: &str) -> serde_json::Value {
        let out = self.run("nix", &["path-info", "--json", path]);
        assert!(
            out.status.success(),
            "nix path-info {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("path-info JSON");
        v[0].clone()
    }

    /// Whether `path` is valid in this store.
    pub fn is_valid(&self, path: &str) -> bool {
        self.run("nix-store", &["--check-validity", path])
            .status
            .success()
    }
}

/// `nix-store --generate-binary-cache-key NAME` into `dir`: (secret key file, public key text).
pub fn generate_key(nix: &NixStore, dir: &Path, name: &str) -> (PathBuf, String) {
    let sk = dir.join(format!("{name}.sk"));
    let pk = dir.join(format!("{name}.pk"));
    let out = nix
        .cmd("nix-store")
        .arg("--generate-binary-cache-key")
        .arg(name)
        .arg(&sk)
        .arg(&pk)
        .output()
        .expect("nix-store --generate-binary-cache-key");
    assert!(
        out.status.success(),
        "generating a key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pk = std::fs::read_to_string(&pk).expect("public key");
    (sk, pk.trim().to_string())
}
