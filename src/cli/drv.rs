//! `qr drv …`: inspect and resolve derivations with the runner's own implementation of Nix's
//! formats (no Nix needed).
//!
//! - `qr drv show [--store-dir D] [--from DIR] DRV…` prints JSON keyed by each derivation's
//!   recomputed store path.
//! - `qr drv resolve [--store-dir D] [--from DIR] DRV --realisation DRVPATH^OUT=OUTPATH…` prints
//!   `{"path": …, "aterm": …}` of the resolved derivation; exit status 2 when a realisation is
//!   missing.
//!
//! A DRV is a store path (`<store dir>/<hash>-<name>.drv`); its file, and those of its input
//! derivations, are read from `DIR/<hash>-<name>.drv`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};
use thiserror::Error;

use crate::store::aterm::{self, ParseError};
use crate::store::derivation::Derivation;
use crate::store::hash::to_hex;
use crate::store::hash_modulo::DrvHashes;
use crate::store::placeholder::downstream_placeholder;
use crate::store::realisation::Realisation;
use crate::store::resolve::{ResolveError, try_resolve};
use crate::store::{StoreDir, StorePath, StorePathError};

/// Exit status when resolution fails for want of a realisation.
pub const EXIT_MISSING_REALISATION: u8 = 2;

#[derive(Debug, clap::Subcommand)]
pub enum DrvCommand {
    /// Print derivations as JSON keyed by their recomputed store paths, with each output's
    /// downstream placeholder, the modulo hash (as Nix keys realisations) and whether they are
    /// deferred.
    Show {
        /// The logical store dir the paths live in.
        #[arg(long, default_value = "/nix/store")]
        store_dir: String,
        /// Directory holding the `.drv` files (default: the configured store's physical dir).
        #[arg(long, value_name = "DIR")]
        from: Option<PathBuf>,
        /// Derivation store paths.
        #[arg(required = true, value_name = "DRV")]
        drvs: Vec<String>,
    },
    /// Resolve a CA or deferred derivation given its inputs' realisations; prints the resolved
    /// derivation's path and ATerm. Inputs with statically known output paths (input-addressed,
    /// fixed-output) need no `--realisation`.
    Resolve {
        /// The logical store dir the paths live in.
        #[arg(long, default_value = "/nix/store")]
        store_dir: String,
        /// Directory holding the `.drv` files (default: the configured store's physical dir).
        #[arg(long, value_name = "DIR")]
        from: Option<PathBuf>,
        /// Derivation store path.
        #[arg(value_name = "DRV")]
        drv: String,
        /// A realisation of an input: `DRVPATH^OUTPUT=OUTPATH` (repeatable).
        #[arg(long = "realisation", value_name = "DRVPATH^OUT=OUTPATH")]
        realisations: Vec<Realisation>,
    },
}

/// Why a `.drv` could not be read.
#[derive(Debug, Error)]
pub enum ReadDrvError {
    #[error("{path:?} is not a derivation path in {store_dir}: {error}")]
    NotADrvPath {
        path: String,
        store_dir: String,
        error: StorePathError,
    },
    #[error("{path:?} is not a derivation (.drv) path")]
    NotDrv { path: String },
    #[error("cannot read derivation file {}: {error}", file.display())]
    Io {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("malformed derivation {}: {error}", file.display())]
    Malformed { file: PathBuf, error: ParseError },
}

/// Reads `.drv` files of a store dir from a physical directory.
#[derive(Debug, Clone)]
pub struct DrvReader {
    pub store_dir: StoreDir,
    pub from: PathBuf,
}

impl DrvReader {
    /// Parses `drv_path` as a `.drv` store path.
    pub fn store_path(&self, drv_path: &str) -> Result<StorePath, ReadDrvError> {
        let sp = self
            .store_dir
            .parse(drv_path)
            .map_err(|error| ReadDrvError::NotADrvPath {
                path: drv_path.to_string(),
                store_dir: self.store_dir.to_string(),
                error,
            })?;
        if !sp.is_derivation() {
            return Err(ReadDrvError::NotDrv {
                path: drv_path.to_string(),
            });
        }
        Ok(sp)
    }

    /// Reads and parses the derivation at `drv_path` (named after its path).
    pub fn read(&self, drv_path: &str) -> Result<Derivation, ReadDrvError> {
        let sp = self.store_path(drv_path)?;
        let file = self.from.join(sp.base_name());
        let bytes = std::fs::read(&file).map_err(|error| ReadDrvError::Io {
            file: file.clone(),
            error,
        })?;
        aterm::parse_named(&bytes, sp.drv_name())
            .map_err(|error| ReadDrvError::Malformed { file, error })
    }
}

/// Runs a `qr drv` command, printing to stdout/stderr.
pub fn run(cmd: DrvCommand, default_from: &Path) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    run_with_output(cmd, default_from, &mut stdout.lock(), &mut stderr.lock())
}

/// [`run`] with explicit output streams (for tests and embedding).
pub fn run_with_output(
    cmd: DrvCommand,
    default_from: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    match cmd {
        DrvCommand::Show {
            store_dir,
            from,
            drvs,
        } => {
            let reader = reader(&store_dir, from, default_from)?;
            let v = show(&reader, &drvs, err)?;
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            Ok(ExitCode::SUCCESS)
        }
        DrvCommand::Resolve {
            store_dir,
            from,
            drv,
            realisations,
        } => {
            let reader = reader(&store_dir, from, default_from)?;
            match resolve(&reader, &drv, &realisations, err)? {
                Ok(v) => {
                    writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    writeln!(err, "error: cannot resolve {drv}: {e}")?;
                    Ok(ExitCode::from(EXIT_MISSING_REALISATION))
                }
            }
        }
    }
}

fn reader(
    store_dir: &str,
    from: Option<PathBuf>,
    default_from: &Path,
) -> anyhow::Result<DrvReader> {
    let store_dir =
        StoreDir::new(store_dir).with_context(|| format!("invalid --store-dir {store_dir:?}"))?;
    Ok(DrvReader {
        store_dir,
        from: from.unwrap_or_else(|| default_from.to_path_buf()),
    })
}

fn show(reader: &DrvReader, drvs: &[String], err: &mut dyn Write) -> anyhow::Result<Value> {
    let sd = &reader.store_dir;
    let mut hashes = DrvHashes::new(sd.clone());
    let mut load = |p: &str| reader.read(p);
    let mut result = Map::new();
    for given in drvs {
        let drv = reader.read(given)?;
        let path = drv
            .drv_path(sd)
            .with_context(|| format!("computing the store path of {given}"))?;
        let printed = sd.print(&path);
        if printed != *given {
            writeln!(
                err,
                "warning: the contents of {given} hash to {printed}; showing it under that path"
            )?;
        }
        let masked = hashes
            .static_output_hashes(&drv, &mut load)
            .with_context(|| format!("hashing {given}"))?;
        let Some(hash_modulo) = masked
            .common()
            .or_else(|| masked.output("out"))
            .or_else(|| masked.hashes.values().next())
        else {
            bail!("{given} has no outputs");
        };
        let mut outputs = Map::new();
        for (o, out) in &drv.outputs {
            outputs.insert(
                o.clone(),
                json!({
                    "path": out.path(),
                    "hashAlgo": out.hash_algo(),
                    "hash": out.hash(),
                    "placeholder": downstream_placeholder(&path, o),
                }),
            );
        }
        let mut entry = Map::new();
        entry.insert("name".into(), json!(drv.name));
        entry.insert("system".into(), json!(drv.system));
        entry.insert("builder".into(), json!(drv.builder));
        entry.insert("args".into(), json!(drv.args));
        entry.insert("env".into(), json!(drv.env));
        entry.insert("inputDrvs".into(), json!(drv.input_drvs));
        entry.insert("inputSrcs".into(), json!(drv.input_srcs));
        entry.insert("outputs".into(), Value::Object(outputs));
        entry.insert(
            "hashModulo".into(),
            json!(format!("sha256:{}", to_hex(hash_modulo))),
        );
        entry.insert("deferred".into(), json!(masked.is_deferred()));
        result.insert(printed, Value::Object(entry));
    }
    Ok(Value::Object(result))
}

/// Resolves `given`; the inner `Err` is a missing realisation (exit status 2).
fn resolve(
    reader: &DrvReader,
    given: &str,
    realisations: &[Realisation],
    err: &mut dyn Write,
) -> anyhow::Result<Result<Value, ResolveError>> {
    let sd = &reader.store_dir;
    let drv = reader.read(given)?;
    let mut known: HashMap<(String, String), String> = HashMap::new();
    for r in realisations {
        sd.parse(&r.out_path)
            .with_context(|| format!("realisation {r}: output path not in {sd}"))?;
        known.insert(
            (r.id.drv_path.clone(), r.id.output.clone()),
            r.out_path.clone(),
        );
    }
    let resolved = if drv.needs_resolution() {
        // Inputs with static output paths (IA, fixed) need no realisation on the command line.
        let mut static_paths: HashMap<String, Option<Derivation>> = HashMap::new();
        let lookup = |p: &str, o: &str| -> Option<String> {
            if let Some(real) = known.get(&(p.to_string(), o.to_string())) {
                return Some(real.clone());
            }
            static_paths
                .entry(p.to_string())
                .or_insert_with(|| reader.read(p).ok())
                .as_ref()
                .and_then(|d| d.outputs.get(o))
                .and_then(|out| out.path())
                .map(str::to_string)
        };
        match try_resolve(&drv, sd, lookup) {
            Ok(r) => r,
            Err(e @ ResolveError::MissingRealisations(_)) => return Ok(Err(e)),
            Err(e) => return Err(e).with_context(|| format!("resolving {given}")),
        }
    } else {
        writeln!(
            err,
            "note: {given} needs no resolution (not deferred, not CA with inputs)"
        )?;
        drv
    };
    let path = resolved
        .drv_path(sd)
        .with_context(|| format!("computing the resolved path of {given}"))?;
    Ok(Ok(json!({
        "path": sd.print(&path),
        "aterm": resolved.to_aterm(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: DrvCommand,
    }

    const CA1: (&str, &str) = (
        "/nix/store/kgl69vyd5yssfkn9a7jvb6s21zfah5ja-mx-ca1.drv",
        r#"Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",["-c","echo ca1 > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","mx-ca1"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])"#,
    );
    const IA_ON_CA: (&str, &str) = (
        "/nix/store/lpgbx0lr2q16g25fb1w260xr0wqfkdr5-mx-ia-on-ca.drv",
        r#"Derive([("out","","","")],[("/nix/store/kgl69vyd5yssfkn9a7jvb6s21zfah5ja-mx-ca1.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","echo /16gdi2w38brm0ig1mrqvag7sa1csd24vjnkqzlqj2xnzfc3ik738 > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("dep","/16gdi2w38brm0ig1mrqvag7sa1csd24vjnkqzlqj2xnzfc3ik738"),("name","mx-ia-on-ca"),("out",""),("system","x86_64-linux")])"#,
    );

    fn store() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (p, a) in [CA1, IA_ON_CA] {
            let base = p.rsplit('/').next().unwrap();
            std::fs::write(dir.path().join(base), a).unwrap();
        }
        dir
    }

    fn run_args(args: &[&str], from: &Path) -> (anyhow::Result<ExitCode>, String, String) {
        let cli = Cli::try_parse_from(std::iter::once("drv").chain(args.iter().copied())).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = run_with_output(cli.cmd, from, &mut out, &mut err);
        (
            r,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn show_deferred() {
        let dir = store();
        let (r, out, _) = run_args(&["show", IA_ON_CA.0], dir.path());
        assert_eq!(r.unwrap(), ExitCode::SUCCESS);
        let v: Value = serde_json::from_str(&out).unwrap();
        let e = &v[IA_ON_CA.0];
        assert_eq!(e["name"], "mx-ia-on-ca");
        assert_eq!(e["deferred"], true);
        assert_eq!(e["outputs"]["out"]["path"], Value::Null);
        assert_eq!(
            e["outputs"]["out"]["placeholder"],
            "/1lkrga7ybjkb66b498bk27db9m8pzm82am34qjk15frf8pw32qga"
        );
        assert_eq!(
            e["hashModulo"],
            "sha256:3f72597c1738c7b475f7795283137e209aca1fe669813739e8a526f278e4e827"
        );
    }

    #[test]
    fn resolve_and_missing_realisation() {
        let dir = store();
        let real = format!(
            "{}^out=/nix/store/56z494m8h9l3rb9cql2pdiv40jv80zzi-mx-ca1",
            CA1.0
        );
        let (r, out, _) = run_args(&["resolve", IA_ON_CA.0, "--realisation", &real], dir.path());
        assert_eq!(r.unwrap(), ExitCode::SUCCESS);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["path"],
            "/nix/store/0bvjrvhd66049z18hbsjbmp5lcd2i48m-mx-ia-on-ca.drv"
        );
        let (r, out, err) = run_args(&["resolve", IA_ON_CA.0], dir.path());
        assert_eq!(r.unwrap(), ExitCode::from(EXIT_MISSING_REALISATION));
        assert!(out.is_empty());
        assert!(
            err.contains(&format!("no realisation for {}^out", CA1.0)),
            "{err}"
        );
    }

    #[test]
    fn malformed_files_name_file_and_offset() {
        let dir = store();
        let base = IA_ON_CA.0.rsplit('/').next().unwrap();
        std::fs::write(dir.path().join(base), "Derive([x").unwrap();
        let (r, _, _) = run_args(&["show", IA_ON_CA.0], dir.path());
        let msg = format!("{:#}", r.unwrap_err());
        assert!(
            msg.contains(base) && msg.contains("expected '(' at byte 8"),
            "{msg}"
        );
        // An unreadable input derivation is named too.
        std::fs::write(dir.path().join(base), IA_ON_CA.1).unwrap();
        std::fs::remove_file(dir.path().join(CA1.0.rsplit('/').next().unwrap())).unwrap();
        let (r, _, _) = run_args(&["show", IA_ON_CA.0], dir.path());
        let msg = format!("{:#}", r.unwrap_err());
        assert!(msg.contains("cannot read derivation file"), "{msg}");
        let (r, _, _) = run_args(&["show", "/tmp/x.drv"], dir.path());
        assert!(format!("{:#}", r.unwrap_err()).contains("not a derivation path"));
        assert!(
            Cli::try_parse_from(["drv", "resolve", "/nix/store/x.drv", "--realisation", "bad"])
                .is_err()
        );
    }
}
