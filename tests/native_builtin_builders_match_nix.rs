//! The native executor's builtin builders against Debian's Nix 2.8 on the same derivations
//! (instantiated by `nix-instantiate`, built by `nix-store --realise` in Nix's sandbox and by the
//! native executor, store dir `/nix/store` in both):
//!
//! - `builtin:fetchurl` from an HTTP server in this test: a flat file, an executable one, a NAR
//!   unpacked; the same output paths and NAR hashes as Nix. A wrong hash fails in both, with
//!   Nix's message, permanently, and leaves nothing valid.
//! - `builtin:buildenv`: a profile of three packages (directories merged, a priority deciding a
//!   collision, a propagated package): equal NAR hashes; equal priorities collide in both.
//! - `builtin:unpack-channel`: an xz channel tarball (a directory, an executable, a symlink)
//!   unpacked to the same output as Nix's; a tarball of two entries fails in both.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;

use common::nix::{self, NixStore};
use common::nix_vs_native::{assert_same_outputs, native_build, normalise};
use qr::builder::executor::{ExecError, ExecutorConfig, NativeExecutor};
use qr::store::nar::NarTree;
use qr::store::{LocalStore, Store, StoreDir};
use sha2::{Digest, Sha256};

const FILE: &[u8] = b"#!/bin/sh\necho fetched\n";

const EXPR: &str = r#"
{ base, flatHash, execHash, narHash }:
let
  fetch = { name, url, hash, executable ? false, unpack ? false }: derivation {
    builder = "builtin:fetchurl";
    system = "builtin";
    inherit name url executable unpack;
    outputHashAlgo = "sha256";
    outputHash = hash;
    outputHashMode = if unpack || executable then "recursive" else "flat";
    urls = [ url ];
  };
  sh = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ("set -e; " + script) ];
    PATH = "/usr/bin:/bin";
  };
  profile = name: derivations: derivation {
    inherit name derivations;
    system = "builtin";
    builder = "builtin:buildenv";
    manifest = builtins.toFile "manifest.nix" "[ ]";
  };
in rec {
  flat = fetch { name = "flat"; url = "${base}/file"; hash = flatHash; };
  exec = fetch { name = "exec"; url = "${base}/redirect"; hash = execHash; executable = true; };
  nar = fetch { name = "nar"; url = "${base}/tree.nar"; hash = narHash; unpack = true; };
  wrong = fetch { name = "wrong"; url = "${base}/file"; hash = "0000000000000000000000000000000000000000000000000000000000000000"; };

  c = sh "c" "mkdir -p $out/lib; echo c > $out/lib/z";
  a = sh "a" "mkdir -p $out/bin $out/share/doc; echo a > $out/bin/x; echo a > $out/share/doc/a; echo > $out/.hidden";
  b = sh "b" "mkdir -p $out/bin $out/share/doc $out/nix-support; echo b > $out/bin/x; echo b > $out/bin/y; echo b > $out/share/doc/b; echo ${c} > $out/nix-support/propagated-user-env-packages";
  env = profile "env" "true 3 1 ${a} true 5 1 ${b} false 0 1 ${c}";
  collide = profile "collide" "true 5 1 ${a} true 5 1 ${b}";
  channel = derivation {
    name = "channel";
    system = "builtin";
    builder = "builtin:unpack-channel";
    src = ./channel.tar.xz;
    channelName = "nixpkgs";
  };
  channelTwo = derivation {
    name = "channel-two";
    system = "builtin";
    builder = "builtin:unpack-channel";
    src = ./two.tar;
    channelName = "c";
  };
}
"#;

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn tree() -> NarTree {
    NarTree::dir([
        ("bin", NarTree::dir([("run", NarTree::executable(FILE))])),
        ("link", NarTree::symlink("bin/run")),
    ])
}

/// Serves `/file`, `/redirect` (302 to `/file`) and `/tree.nar` until the test ends.
fn serve() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let nar = tree().to_nar().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut rd = BufReader::new(s.try_clone().unwrap());
            let mut first = String::new();
            let _ = rd.read_line(&mut first);
            let mut line = String::new();
            while rd.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
            let (head, body): (String, &[u8]) = match path.as_str() {
                "/file" => ("200 OK".into(), FILE),
                "/tree.nar" => ("200 OK".into(), &nar),
                "/redirect" => ("302 Found\r\nLocation: /file".into(), b""),
                _ => ("404 Not Found".into(), b""),
            };
            let _ = write!(
                s,
                "HTTP/1.1 {head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(body);
        }
    });
    port
}

struct Rig {
    nix: NixStore,
    expr: std::path::PathBuf,
    args: Vec<String>,
    _tmp: tempfile::TempDir,
    exec: NativeExecutor,
}

impl Rig {
    async fn new() -> Rig {
        let port = serve();
        let nix = NixStore::sandboxed(1);
        let expr = nix.dir.path().join("drvs.nix");
        std::fs::write(&expr, EXPR).unwrap();
        channel_tarballs(nix.dir.path());
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(
            LocalStore::open(StoreDir::default(), &tmp.path().join("root"))
                .await
                .unwrap(),
        );
        let cfg = ExecutorConfig::new(tmp.path());
        let args = vec![
            ("base", format!("http://127.0.0.1:{port}")),
            ("flatHash", sha256_hex(FILE)),
            (
                "execHash",
                sha256_hex(&NarTree::executable(FILE).to_nar().unwrap()),
            ),
            ("narHash", sha256_hex(&tree().to_nar().unwrap())),
        ]
        .into_iter()
        .flat_map(|(k, v)| ["--argstr".to_string(), k.to_string(), v])
        .collect();
        Rig {
            nix,
            expr,
            args,
            _tmp: tmp,
            exec: NativeExecutor::new(store, cfg),
        }
    }

    fn instantiate(&self, attr: &str) -> String {
        let mut a: Vec<&str> = vec![self.expr.to_str().unwrap(), "-A", attr];
        a.extend(self.args.iter().map(String::as_str));
        let out = self.nix.run("nix-instantiate", &a);
        assert!(
            out.status.success(),
            "nix-instantiate -A {attr}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Imports `drv`'s closure, builds its inputs, then `drv`.
    async fn qr_build(&self, drv: &str) -> Result<qr::builder::executor::BuildResult, ExecError> {
        native_build(&self.exec, &self.nix, drv).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn builtin_fetchurl_and_buildenv_give_nixs_outputs() {
    if !nix::available() {
        return;
    }
    let rig = Rig::new().await;
    for attr in ["flat", "exec", "nar", "env"] {
        assert_same_outputs(&rig.exec, &rig.nix, attr, &rig.instantiate(attr)).await;
    }
    // What the outputs hold (equal to Nix's, so these say what both did).
    let store = rig.exec.store();
    let out_of = |attr: &str| {
        let drv = rig.instantiate(attr);
        let store = store.clone();
        async move {
            let d = store.read_derivation(&drv).await.unwrap();
            store
                .physical_path(d.outputs["out"].path().unwrap())
                .unwrap()
        }
    };
    use std::os::unix::fs::PermissionsExt;
    let exec = out_of("exec").await;
    assert_eq!(std::fs::read(&exec).unwrap(), FILE);
    assert_eq!(
        std::fs::metadata(&exec).unwrap().permissions().mode() & 0o111,
        0o111
    );
    let flat = out_of("flat").await;
    assert_eq!(
        std::fs::metadata(&flat).unwrap().permissions().mode() & 0o111,
        0
    );
    assert_eq!(NarTree::from_path(&out_of("nar").await).unwrap(), tree());
    let env = out_of("env").await;
    let link = |rel: &str| std::fs::read_link(env.join(rel)).unwrap();
    let a = rig
        .exec
        .store()
        .read_derivation(&rig.instantiate("a"))
        .await
        .unwrap();
    let a = a.outputs["out"].path().unwrap().to_string();
    assert_eq!(
        link("bin/x"),
        std::path::PathBuf::from(format!("{a}/bin/x"))
    );
    assert!(link("lib").to_string_lossy().ends_with("-c/lib"));
    assert!(
        std::fs::symlink_metadata(env.join("share/doc"))
            .unwrap()
            .is_dir()
    );
    assert!(std::fs::symlink_metadata(env.join(".hidden")).is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_hash_and_a_collision_fail_in_both() {
    if !nix::available() {
        return;
    }
    let rig = Rig::new().await;
    // A wrong hash: rejected with Nix's message, permanently.
    let drv = rig.instantiate("wrong");
    let nix_err = rig.nix.realise(&drv).expect_err("Nix built the wrong hash");
    let e = rig.qr_build(&drv).await.expect_err("built the wrong hash");
    assert!(matches!(e, ExecError::OutputRejected { .. }), "{e:?}");
    assert_eq!((e.status(), e.is_transient()), (1, false));
    assert!(
        normalise(&nix_err).contains(&normalise(&format!("error: {e}"))),
        "the native executor says\n{e}\nNix says\n{nix_err}"
    );
    let d = rig.exec.store().read_derivation(&drv).await.unwrap();
    let out = d.outputs["out"].path().unwrap();
    assert!(!rig.exec.store().is_valid_path(out).await.unwrap());
    assert!(!rig.nix.is_valid(out));

    // Equal priorities: the builder fails, in both, naming the same two files.
    let drv = rig.instantiate("collide");
    let nix_err = rig.nix.realise(&drv).expect_err("Nix built the collision");
    let e = rig.qr_build(&drv).await.expect_err("built the collision");
    assert!(matches!(e, ExecError::Failed { .. }), "{e:?}");
    assert_eq!((e.status(), e.is_transient()), (1, false));
    let ours = e.log_tail().last().cloned().unwrap_or_default();
    assert!(ours.contains("have the same priority 5"), "{e}");
    let sentence = ours.trim_start_matches("error: ");
    assert!(
        normalise(&nix_err).contains(&normalise(sentence)),
        "the native executor says\n{e}\nNix says\n{nix_err}"
    );
    assert!(normalise(&nix_err).contains(&normalise(&format!(
        "builder for '{drv}' failed with exit code 1"
    ))));
}

/// `channel.tar.xz` (one top-level directory) and `two.tar` (two entries) beside the expression,
/// made by the system's `tar`.
fn channel_tarballs(dir: &std::path::Path) {
    let src = tempfile::tempdir().unwrap();
    let top = src.path().join("nixexprs-1.0");
    std::fs::create_dir_all(top.join("bin")).unwrap();
    std::fs::write(top.join("default.nix"), "{ }: 42\n").unwrap();
    std::fs::write(top.join("bin/tool"), FILE).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(top.join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("default.nix", top.join("link")).unwrap();
    std::fs::write(src.path().join("stray"), "x").unwrap();
    let tar = |args: &[&str]| {
        let st = std::process::Command::new("tar")
            .arg("-C")
            .arg(src.path())
            .args(args)
            .status()
            .expect("running tar");
        assert!(st.success(), "tar {args:?}");
    };
    let out = |n: &str| dir.join(n).to_str().unwrap().to_string();
    tar(&["-cJf", &out("channel.tar.xz"), "nixexprs-1.0"]);
    tar(&["-cf", &out("two.tar"), "nixexprs-1.0", "stray"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn builtin_unpack_channel_gives_nixs_output_and_refuses_two_entries() {
    if !nix::available() {
        return;
    }
    let rig = Rig::new().await;
    let drv = rig.instantiate("channel");
    let r = assert_same_outputs(&rig.exec, &rig.nix, "the channel", &drv).await;
    let info = &r.outputs["out"];
    // What both made: the one directory renamed to the channel's name.
    let out = rig.exec.store().physical_path(&info.path).unwrap();
    assert_eq!(
        std::fs::read(out.join("nixpkgs/bin/tool")).unwrap(),
        FILE,
        "{}",
        out.display()
    );
    assert_eq!(
        std::fs::read_link(out.join("nixpkgs/link")).unwrap(),
        std::path::PathBuf::from("default.nix")
    );

    let two = rig.instantiate("channelTwo");
    let nix_err = rig
        .nix
        .realise(&two)
        .expect_err("Nix built a channel of two entries");
    let e = rig
        .qr_build(&two)
        .await
        .expect_err("the native executor built a channel of two entries");
    assert!(!e.is_transient(), "{e:?}");
    let sentence = "contains more than one file";
    assert!(
        normalise(&nix_err).contains(sentence),
        "Nix says\n{nix_err}"
    );
    assert!(e.to_string().contains(sentence), "{e}");
    assert!(
        !rig.exec
            .store()
            .is_valid_path(two_out(&rig, &two).await.as_str())
            .await
            .unwrap()
    );
}

async fn two_out(rig: &Rig, drv: &str) -> String {
    let d = rig.exec.store().read_derivation(drv).await.unwrap();
    d.outputs["out"].path().unwrap().to_string()
}
