//! `qr import --from DIR DRV…`: copies `.drv` closures (input drvs and input sources,
//! recursively) from a directory laid out as a store (a physical store root, or `/nix/store`
//! itself) into the configured store. Each drv's path is verified against its ATerm.
//!
//! A DRV is a full path in the configured store dir, or a base name (`<hash>-<name>.drv`), or a
//! file `DIR/<hash>-<name>.drv`. Prints each DRV's path once its closure is valid (with `--json`:
//! `{"drvs": […], "added": […], "already_valid": […]}`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::json;

use super::Context;
use crate::store::{LocalStore, Store};

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Directory laid out as a store: `<hash>-<name>` entries.
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Derivations to import.
    #[arg(required = true, value_name = "DRV")]
    pub drvs: Vec<String>,
}

/// The logical path a DRV argument names.
fn drv_path(arg: &str, store_dir: &str) -> String {
    if arg
        .strip_prefix(store_dir)
        .is_some_and(|r| r.starts_with('/') && !r[1..].contains('/'))
    {
        return arg.to_string();
    }
    let base = Path::new(arg)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| arg.to_string());
    format!("{store_dir}/{base}")
}

pub fn run(args: ImportArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let store = LocalStore::open_config(&ctx.config.store)
            .await
            .with_context(|| format!("opening the store at {}", ctx.config.store.root))?;
        let sd = store.store_dir().as_str().to_string();
        let drvs: Vec<String> = args.drvs.iter().map(|a| drv_path(a, &sd)).collect();
        let result = store.import_from_dir(&args.from, &drvs).await;
        store.close().await;
        let report = result.with_context(|| format!("importing from {}", args.from.display()))?;
        if args.json {
            println!(
                "{}",
                json!({"drvs": drvs, "added": report.added, "already_valid": report.already_valid})
            );
        } else {
            for d in &drvs {
                println!("{d}");
            }
            eprintln!(
                "imported {} paths ({} already valid) into {}",
                report.added.len(),
                report.already_valid.len(),
                ctx.config.store.root
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drv_arguments() {
        let b = "p1qxcx8sbmi2zvx8dk4944x7hnlh4fly-mx-ia-leaf.drv";
        let full = format!("/nix/store/{b}");
        assert_eq!(drv_path(&full, "/nix/store"), full);
        assert_eq!(drv_path(b, "/nix/store"), full);
        assert_eq!(drv_path(&format!("/tmp/dir/{b}"), "/nix/store"), full);
    }
}
