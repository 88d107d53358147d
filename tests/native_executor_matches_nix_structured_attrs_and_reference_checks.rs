//! The native executor against Debian's Nix 2.8 on the same derivations (instantiated by
//! `nix-instantiate` from the expression below, built by `nix-store --realise` in Nix's sandbox
//! and by the native executor in its namespace, store dir `/nix/store` in both):
//!
//! - structured attributes (`.attrs.json`, `.attrs.sh`, the environment), `passAsFile` and
//!   hash placeholders: each builder copies what it was given into its outputs, so equal NAR
//!   hashes mean byte-for-byte equal files and environments;
//! - fixed outputs: `impureEnvVars` from the caller's environment (only for them), the hash;
//! - `allowedReferences`, `allowedRequisites`, `disallowedReferences`, `disallowedRequisites`
//!   and structured `outputChecks` (`maxSize`, `maxClosureSize`, the lists per output): what Nix
//!   accepts is built to the same outputs, what Nix rejects is rejected with Nix's message, as a
//!   permanent failure that leaves no output valid;
//! - `exportReferencesGraph`, as files and under structured attributes: the same outputs; a path
//!   outside the input closure fails in both.

mod common;

use std::sync::Arc;

use common::nix::{self, NixStore};
use common::nix_vs_native::{assert_same_outputs, native_build, normalise};
use qr::builder::executor::{ExecError, ExecutorConfig, NativeExecutor};
use qr::store::{LocalStore, Store, StoreDir};

const CORES: usize = 2;

/// Builders copy what they get into `$out`. `env` lists leave out `NIX_ATTRS_*_FILE`, whose
/// value Nix 2.8 takes from the build dir outside its sandbox (see docs/builders.md).
const EXPR: &str = r#"
{ callerPath }:
let
  sh = name: script: attrs: derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/bash";
    # The trailing `true`: bash execs a script's last command, and when that is `cp` or `mkdir`
    # (which close stdout and stderr before they exit) Nix 2.8 sees EOF on the log while the
    # builder is still alive, SIGKILLs it as it does at EOF, and reports "failed due to signal 9"
    # (about one build in three here). So the last command is a builtin, and bash exits after it.
    args = [ "-c" ("export PATH=/usr/bin:/bin; set -e; " + script + "
true") ];
    PATH = "/usr/bin:/bin";
  } // attrs);
  envList = "env | grep -v '^NIX_ATTRS_' | sort";
in rec {
  dep2 = sh "dep2" "echo dep2 > $out" {};
  dep = sh "dep" "echo ${dep2} > $out" {};

  # Structured attributes: every kind of value .attrs.sh handles or leaves out.
  structured = sh "structured" ''
    . .attrs.sh
    mkdir -p ''${outputs[out]} ''${outputs[dev]}
    cp .attrs.json .attrs.sh ''${outputs[out]}/
    ${envList} > ''${outputs[out]}/env
    echo "$inp $ph ''${#lst[@]} ''${map[k 2]}" > ''${outputs[dev]}/vars
  '' {
    __structuredAttrs = true;
    outputs = [ "out" "dev" ];
    str = "it's a \"string\" with $dollar, \\ backslash,\ttab\nnewline, é ☃ and \r";
    int = 42; neg = -7; big = 4294967297; zero = 0;
    flt = 1.5; flt2 = 3.0; tiny = 1.0e-7; huge = 1.0e20; third = 0.333333333333; negf = -2.5;
    t = true; f = false; n = null;
    lst = [ "a" "b'c" 1 true false null ];
    empty = [ ]; emptyMap = { };
    nested = [ [ "x" ] ];
    map = { k1 = "v1"; "k 2" = "v'2"; k3 = 3; k4 = null; };
    deep = { a = { b = 1; }; };
    "bad-name" = "x"; _under = "u";
    inp = "${dep}";
    ph = builtins.placeholder "dev";
    passAsFile = [ "str" ];
  };

  # Structured and content-addressed: outputs at a scratch path, then rewritten.
  structuredCa = sh "structured-ca" ''
    . .attrs.sh
    mkdir ''${outputs[out]}
    cp .attrs.json .attrs.sh ''${outputs[out]}/
    ${envList} > ''${outputs[out]}/env
  '' {
    __structuredAttrs = true;
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    self = builtins.placeholder "out";
  };

  # passAsFile, and placeholders in the env of an input-addressed drv.
  passAsFile = sh "pass-as-file" ''
    mkdir $out
    cp .attr-* $out/
    ${envList} > $out/env
  '' {
    passAsFile = [ "big" "empty" "missing" ];
    big = "line 1\nline 2 with ${builtins.placeholder "out"} and 'quotes'\n";
    empty = "";
    plain = "not in a file";
    here = builtins.placeholder "out";
    # Only fixed-output derivations get these from the caller.
    impureEnvVars = [ "PATH" "HOME" ];
  };

  # Fixed outputs: impureEnvVars come from the caller's environment (PATH here, before the
  # builder changes it); the hash is checked.
  fod = name: check: hash: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/bash";
    args = [ "-c" ((if check then "[ \"$PATH\" = '${callerPath}' ] && " else "") + "echo fixed > $out") ];
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = hash;
    impureEnvVars = [ "PATH" ];
  };
  # sha256 of "fixed\n" and of "other\n".
  fodImpure = fod "fod-impure" true "0c3071418e6356e614898c84ed064ca95e88551bc0811b534bdf1952ecdae534";
  fodMismatch = fod "fod-mismatch" false "7e4fa2eb8c7ac089739d5defc4489fad68a100d92082ca35c6b40a4524821f87";

  # Reference checks without structured attributes: the lists apply to every output.
  refsOk = sh "refs-ok" "echo ${dep} > $out" { allowedReferences = [ dep ]; };
  refsOutName = sh "refs-out-name" "echo $lib > $out; echo lib > $lib" {
    outputs = [ "out" "lib" ];
    allowedReferences = [ "lib" ];
  };
  requisitesIgnoreSelf = sh "requisites-ignore-self" "echo ${dep} $out > $out" {
    allowedRequisites = [ dep dep2 ];
  };
  refsNone = sh "refs-none" "echo ${dep} > $out" { allowedReferences = [ ]; };
  refsSelf = sh "refs-self" "echo ${dep} $out > $out" { allowedReferences = [ dep ]; };
  requisitesMissing = sh "requisites-missing" "echo ${dep} > $out" { allowedRequisites = [ dep ]; };
  refsDisallowed = sh "refs-disallowed" "echo ${dep} > $out" { disallowedReferences = [ dep ]; };
  requisitesDisallowed = sh "requisites-disallowed" "echo ${dep} > $out" {
    disallowedRequisites = [ dep2 ];
  };
  refsIllegal = sh "refs-illegal" "echo > $out" { allowedReferences = [ "lib" ]; };

  # Structured outputChecks, per output.
  checksOk = sh "checks-ok" ''
    . .attrs.sh
    echo ''${outputs[lib]} ${dep} > ''${outputs[out]}
    echo lib > ''${outputs[lib]}
  '' {
    __structuredAttrs = true;
    outputs = [ "out" "lib" ];
    outputChecks = {
      out = { allowedReferences = [ "lib" dep ]; maxSize = 10000; allowedRequisites = [ "out" "lib" dep dep2 ]; };
      lib = { allowedRequisites = [ "lib" ]; maxClosureSize = 100000; disallowedReferences = [ "out" ]; };
    };
  };
  checksSelf = sh "checks-self" ". .attrs.sh; echo ${dep} > \${outputs[out]}" {
    __structuredAttrs = true;
    outputChecks.out.allowedRequisites = [ dep dep2 ];
  };
  checksMaxSize = sh "checks-max-size" ". .attrs.sh; echo 0123456789 > \${outputs[out]}" {
    __structuredAttrs = true;
    outputChecks.out.maxSize = 100;
  };
  checksMaxClosureSize = sh "checks-max-closure-size" ". .attrs.sh; echo ${dep} > \${outputs[out]}" {
    __structuredAttrs = true;
    outputChecks.out = { maxSize = 1000; maxClosureSize = 300; };
  };
  checksDisallowedByName = sh "checks-disallowed-by-name" ''
    . .attrs.sh
    echo out > ''${outputs[out]}
    echo ''${outputs[out]} > ''${outputs[lib]}
  '' {
    __structuredAttrs = true;
    outputs = [ "out" "lib" ];
    outputChecks.lib.disallowedReferences = [ "out" ];
  };
  # exportReferencesGraph: closures as registration files, and as JSON under structured
  # attributes (NAR hashes, sizes and closure sizes, so equal outputs mean equal path infos).
  exportGraph = sh "export-graph" "mkdir $out; cp refs refs2 $out/" {
    exportReferencesGraph = [ "refs" dep "refs2" dep2 ];
  };
  exportGraphStructured = sh "export-graph-structured" ''
    . .attrs.sh
    mkdir ''${outputs[out]}
    cp .attrs.json .attrs.sh ''${outputs[out]}/
  '' {
    __structuredAttrs = true;
    exportReferencesGraph = { g = [ dep ]; h = [ dep2 dep ]; };
  };
  exportNotAnInput = sh "export-not-an-input" "echo > $out" {
    exportReferencesGraph = [ "refs" "/nix/store/00000000000000000000000000000000-nope" ];
  };

  # Top-level lists do not count under structured attributes.
  checksTopLevelIgnored = sh "checks-top-level-ignored" ". .attrs.sh; echo ${dep} > \${outputs[out]}" {
    __structuredAttrs = true;
    allowedReferences = [ ];
  };
}
"#;

/// Builds that succeed in Nix and must give the same outputs.
const SAME_OUTPUTS: &[&str] = &[
    "structured",
    "structuredCa",
    "passAsFile",
    "refsOk",
    "refsOutName",
    "requisitesIgnoreSelf",
    "checksOk",
    "checksTopLevelIgnored",
    "fodImpure",
];

/// Builds Nix rejects after the builder ran.
const REJECTED: &[&str] = &[
    "refsNone",
    "refsSelf",
    "requisitesMissing",
    "refsDisallowed",
    "requisitesDisallowed",
    "refsIllegal",
    "checksSelf",
    "checksMaxSize",
    "checksMaxClosureSize",
    "checksDisallowedByName",
    "fodMismatch",
];

struct Rig {
    nix: NixStore,
    expr: std::path::PathBuf,
    _tmp: tempfile::TempDir,
    exec: NativeExecutor,
}

impl Rig {
    async fn new() -> Rig {
        let nix = NixStore::sandboxed(CORES);
        let expr = nix.dir.path().join("drvs.nix");
        std::fs::write(&expr, EXPR).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(
            LocalStore::open(StoreDir::default(), &tmp.path().join("root"))
                .await
                .unwrap(),
        );
        assert!(store.needs_namespace());
        let mut cfg = ExecutorConfig::new(tmp.path());
        cfg.cores = CORES;
        Rig {
            nix,
            expr,
            _tmp: tmp,
            exec: NativeExecutor::new(store, cfg),
        }
    }

    fn instantiate(&self, attr: &str) -> String {
        // The caller's PATH, which the fixed-output builders check they were given.
        let path = std::env::var("PATH").unwrap_or_default();
        assert!(!path.contains('\''), "PATH {path:?}");
        let out = self.nix.run(
            "nix-instantiate",
            &[
                self.expr.to_str().unwrap(),
                "--argstr",
                "callerPath",
                &path,
                "-A",
                attr,
            ],
        );
        assert!(
            out.status.success(),
            "nix-instantiate -A {attr}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Imports `drv`'s closure from Nix's store and builds its inputs (already built ones are
    /// not rebuilt), then `drv` itself.
    async fn qr_build(&self, drv: &str) -> Result<qr::builder::executor::BuildResult, ExecError> {
        native_build(&self.exec, &self.nix, drv).await
    }
}

/// Builds `attr` with Nix and with the native executor: the same outputs.
async fn same_outputs(rig: &Rig, attr: &str) {
    assert_same_outputs(&rig.exec, &rig.nix, attr, &rig.instantiate(attr)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn export_references_graph_gives_nixs_outputs() {
    if !nix::available() {
        return;
    }
    let rig = Rig::new().await;
    for attr in ["exportGraph", "exportGraphStructured"] {
        same_outputs(&rig, attr).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn native_builds_match_nix_for_structured_attrs_pass_as_file_and_accepted_reference_checks() {
    if !nix::available() {
        return;
    }
    let rig = Rig::new().await;
    for attr in SAME_OUTPUTS {
        same_outputs(&rig, attr).await;
    }
    // The structured build really saw its attributes (not an empty .attrs.sh copied twice).
    let drv = rig.instantiate("structured");
    let d = rig.exec.store().read_derivation(&drv).await.unwrap();
    let dev = d.outputs["dev"].path().unwrap();
    let vars =
        std::fs::read_to_string(rig.exec.store().physical_path(dev).unwrap().join("vars")).unwrap();
    let dep = rig.instantiate("dep");
    let dep_out = rig
        .exec
        .store()
        .read_derivation(&dep)
        .await
        .unwrap()
        .outputs["out"]
        .path()
        .unwrap()
        .to_string();
    // `false` is an empty word in a `declare -a` list, so `lst` has 5 members.
    assert_eq!(vars, format!("{dep_out} {dev} 5 v'2\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn reference_violations_fail_in_both_with_nixs_message() {
    if !nix::available() {
        return;
    }
    let rig = Rig::new().await;
    for attr in REJECTED {
        let drv = rig.instantiate(attr);
        let nix_err = match rig.nix.realise(&drv) {
            Ok(p) => panic!("Nix built {attr}: {p:?}"),
            Err(e) => e,
        };
        let e = match rig.qr_build(&drv).await {
            Ok(r) => panic!("the native executor built {attr}: {:?}", r.outputs),
            Err(e) => e,
        };
        assert!(
            matches!(e, ExecError::OutputRejected { .. }),
            "{attr}: {e:?}"
        );
        assert_eq!((e.status(), e.is_transient()), (1, false), "{attr}");
        assert!(
            normalise(&nix_err).contains(&normalise(&format!("error: {e}"))),
            "{attr}: the native executor says\n{e}\nNix says\n{nix_err}"
        );
        let store = rig.exec.store();
        let d = store.read_derivation(&drv).await.unwrap();
        for out in d.outputs.values().filter_map(|o| o.path()) {
            assert!(!store.is_valid_path(out).await.unwrap(), "{attr}: {out}");
            assert!(!rig.nix.is_valid(out), "{attr}: {out} in Nix");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn exporting_a_path_outside_the_input_closure_fails_in_both() {
    if !nix::available() {
        return;
    }
    let rig = Rig::new().await;
    let drv = rig.instantiate("exportNotAnInput");
    let nix_err = rig
        .nix
        .realise(&drv)
        .expect_err("Nix exported a path outside the input closure");
    let e = rig
        .qr_build(&drv)
        .await
        .expect_err("the native executor exported a path outside the input closure");
    assert!(!e.is_transient(), "{e:?}");
    let sentence = "cannot export references of path '/nix/store/00000000000000000000000000000000-nope' because it is not in the input closure of the derivation";
    assert!(
        normalise(&nix_err).contains(sentence),
        "Nix says\n{nix_err}"
    );
    assert!(e.to_string().contains(sentence), "{e}");
}
