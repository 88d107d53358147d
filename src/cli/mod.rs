//! The `qr` command line: global flags, configuration loading and the subcommands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::{self, Config};

pub mod admin;
pub mod bench;
pub mod builder;
pub mod drv;
pub mod eval_jobs;
pub mod import;
pub mod run;
pub mod serve;
pub mod submit;
pub mod tls;

#[derive(Debug, Parser)]
#[command(
    name = "qr",
    version,
    about = "An actor-model queue runner for Nix builds"
)]
pub struct Cli {
    /// Configuration file (TOML); a missing file means defaults.
    #[arg(long, global = true, env = "QR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the default SQLite database, the store root and logs live.
    #[arg(long, global = true, env = "QR_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the effective configuration (defaults, file and environment merged).
    Config,
    /// Inspect derivations the way Nix computes them (paths, placeholders, hash modulo, resolution).
    #[command(subcommand)]
    Drv(drv::DrvCommand),
    /// Build TARGETs (drv paths or JSON files of derivations) in one process and wait for them.
    Run(run::RunArgs),
    /// Copy `.drv` closures (input drvs and sources) from a directory laid out as a store into
    /// the configured store, verifying each drv's path.
    Import(import::ImportArgs),
    /// The long-running runner: actors, gRPC for builders, the local builder if configured.
    Serve(serve::ServeArgs),
    /// A remote build agent: dials the runner, builds what it is sent.
    Builder(builder::BuilderArgs),
    /// Queue builds for a running `qr serve` (and optionally wait for them).
    Submit(submit::SubmitArgs),
    /// The admin API of a running `qr serve`: status, builds, steps, actors, machines, actions.
    Admin(admin::AdminArgs),
    /// Synthetic workloads through the real actors and database: the performance figures.
    Bench(bench::BenchArgs),
}

/// What every subcommand gets: the loaded configuration and the state dir.
#[derive(Debug, Clone)]
pub struct Context {
    pub config: Config,
    pub state_dir: PathBuf,
}

impl Context {
    /// Loads the configuration the way every subcommand does.
    pub fn load(config_file: Option<&Path>, state_dir: Option<&Path>) -> anyhow::Result<Self> {
        let state_dir = state_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(config::default_state_dir);
        let state_dir = config::prepare_state_dir(&state_dir)?;
        let config = Config::load(config_file, &state_dir, std::env::vars())?;
        Ok(Context { config, state_dir })
    }

    /// The store's physical directory.
    pub fn store_root(&self) -> PathBuf {
        PathBuf::from(&self.config.store.root)
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("QR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Entry point of the `qr` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qr: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = Context::load(cli.config.as_deref(), cli.state_dir.as_deref())?;
    match cli.command {
        Command::Config => {
            let text =
                toml::to_string_pretty(&ctx.config).context("rendering the configuration")?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Drv(cmd) => drv::run(cmd, &ctx.store_root()),
        Command::Run(args) => run::run(ctx, args),
        Command::Import(args) => import::run(args, &ctx),
        Command::Serve(args) => serve::run(ctx, args),
        Command::Builder(args) => builder::run(ctx, args),
        Command::Submit(args) => submit::run(ctx, args),
        Command::Admin(args) => admin::run(ctx, args),
        Command::Bench(args) => bench::run(ctx, args),
    }
}

/// An error and its causes on one line, each cause once (errors that already print their source
/// are not repeated by the chain).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        // A message spanning lines (a log tail, a server's text) is folded onto this one.
        let text = cause
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" / ");
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_prints_each_cause_once() {
        let inner = std::io::Error::other("connection refused");
        let e = anyhow::Error::new(inner)
            .context("cannot connect to database x: connection refused")
            .context("opening");
        assert_eq!(
            one_line(&e),
            "opening: cannot connect to database x: connection refused"
        );
        let e = anyhow::anyhow!("Unavailable: the database is unavailable:\n  gone\n");
        assert_eq!(
            one_line(&e),
            "Unavailable: the database is unavailable: / gone"
        );
    }
}
