//! `qr drv show` / `qr drv resolve` (through `qr::cli::drv::run_with_output`) against the Nix
//! oracle fixtures: every derivation is written to a scratch dir laid out like a store.

mod common;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use qr::cli::drv::{DrvCommand, EXIT_MISSING_REALISATION, run_with_output};
use serde_json::Value;

use common::{derivations, load_fixtures, s};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: DrvCommand,
}

fn run(args: &[String], from: &Path) -> (ExitCode, String, String) {
    let cli = Cli::try_parse_from(std::iter::once("drv".to_string()).chain(args.iter().cloned()))
        .expect("arguments parse");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_with_output(cli.cmd, from, &mut out, &mut err).expect("command runs");
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn show_and_resolve_every_fixture_derivation() {
    let (mut shown, mut resolved, mut missing) = (0, 0, 0);
    for (fname, fx) in load_fixtures() {
        let dir = tempfile::tempdir().unwrap();
        let drvs = derivations(&fx);
        for (p, v) in &drvs {
            let base = p.rsplit('/').next().unwrap();
            std::fs::write(dir.path().join(base), s(v, "/aterm")).unwrap();
        }

        let mut args = vec![
            "show".to_string(),
            "--store-dir".into(),
            s(&fx, "/store_dir").into(),
        ];
        args.extend(drvs.iter().map(|(p, _)| p.to_string()));
        let (code, out, err) = run(&args, dir.path());
        assert_eq!(code, ExitCode::SUCCESS, "{fname}: {err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v.as_object().unwrap().len(), drvs.len(), "{fname}");
        for (p, d) in &drvs {
            let e = &v[*p];
            assert!(e.is_object(), "{fname}: {p} not shown under its own path");
            assert_eq!(e["name"], d["show_derivation"]["env"]["name"]);
            assert_eq!(e["env"], d["show_derivation"]["env"]);
            assert_eq!(e["inputDrvs"], d["show_derivation"]["inputDrvs"]);
            assert_eq!(e["inputSrcs"], d["show_derivation"]["inputSrcs"]);
            for (o, r) in d["realisations"].as_object().unwrap() {
                let id = s(r, "/id");
                assert_eq!(
                    format!("{}!{o}", e["hashModulo"].as_str().unwrap()),
                    id,
                    "{fname}: {p}"
                );
                let out = &e["outputs"][o];
                let want_path = &d["show_derivation"]["outputs"][o]["path"];
                assert_eq!(
                    &out["path"],
                    if want_path.is_null() {
                        &Value::Null
                    } else {
                        want_path
                    }
                );
                if out["path"].is_null() {
                    assert_eq!(out["placeholder"], d["interpolated"][o], "{fname}: {p}!{o}");
                }
            }
            let deferred = d["show_derivation"]["outputs"]
                .as_object()
                .unwrap()
                .values()
                .any(|o| o.get("path").is_none());
            assert_eq!(e["deferred"], deferred, "{fname}: {p}");
            shown += 1;
        }

        for (p, d) in &drvs {
            if d["resolved"].is_null() {
                continue;
            }
            // Realisations only for inputs without static paths; IA/fixed inputs come from
            // their drv files.
            let mut args = vec!["resolve".to_string(), p.to_string()];
            let mut needed = Vec::new();
            for (ip, outs) in d["show_derivation"]["inputDrvs"].as_object().unwrap() {
                for o in outs.as_array().unwrap() {
                    let o = o.as_str().unwrap();
                    let input = &fx["derivations"][ip];
                    if input["show_derivation"]["outputs"][o]["path"].is_null() {
                        let real = s(input, &format!("/realisations/{o}/out_path"));
                        needed.push(format!("{ip}^{o}={real}"));
                    }
                }
            }
            for r in &needed {
                args.push("--realisation".into());
                args.push(r.clone());
            }
            let (code, out, err) = run(&args, dir.path());
            assert_eq!(code, ExitCode::SUCCESS, "{fname}: {p}: {err}");
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["path"], d["resolved"]["drv_path"], "{fname}: {p}");
            assert_eq!(v["aterm"], d["resolved"]["aterm"], "{fname}: {p}");
            resolved += 1;

            // Dropping any needed realisation: exit 2, naming it.
            for (i, r) in needed.iter().enumerate() {
                let mut args = vec!["resolve".to_string(), p.to_string()];
                for (j, other) in needed.iter().enumerate() {
                    if i != j {
                        args.push(format!("--realisation={other}"));
                    }
                }
                let (code, out, err) = run(&args, dir.path());
                assert_eq!(code, ExitCode::from(EXIT_MISSING_REALISATION));
                assert!(out.is_empty());
                let id = r.split("=/").next().unwrap();
                assert!(err.contains(&format!("no realisation for {id}")), "{err}");
                missing += 1;
            }
        }
    }
    eprintln!("shown {shown}, resolved {resolved}, missing-realisation checks {missing}");
    assert!(shown > 0 && resolved > 0 && missing > 0);
}
