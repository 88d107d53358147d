//! `qr builder --runner URL --token-file F …`: a remote build agent. It keeps its own store (at the
//! configured `[store] root`; its logical dir is `[store] dir` when the configuration pins one,
//! which must then be the runner's, else the runner's own, asked at start), dials the runner,
//! builds what it is sent with the native executor or a real Nix, and reconnects with backoff when
//! the runner goes away.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};

use super::Context;
use super::run::open_store;
use crate::actors::machine::Executor;
use crate::builder::agent::{AgentConfig, Fault, hostname};

#[derive(Debug, clap::Args)]
pub struct BuilderArgs {
    /// The runner's gRPC address, e.g. `http://runner:50051` (`https://` for TLS).
    #[arg(long, value_name = "URL")]
    pub runner: String,
    /// File holding the token the runner expects.
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// Systems to build for (comma-separated); default: this machine's.
    #[arg(long, value_delimiter = ',')]
    pub systems: Vec<String>,
    /// Supported system features (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub features: Vec<String>,
    /// Features a step must require to be sent here (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub mandatory_features: Vec<String>,
    /// Concurrent builds; default: the number of cores.
    #[arg(long)]
    pub max_jobs: Option<u32>,
    /// Relative speed (the runner prefers faster builders).
    #[arg(long, default_value_t = 1.0)]
    pub speed_factor: f64,
    /// `native` (builds as Nix would, no Nix needed), `nix` (calls a real Nix), or `simulated`
    /// (zero-time builds: each output is a small file naming its drv, for `qr bench
    /// --remote-builders`).
    #[arg(long, default_value = "native")]
    pub executor: String,
    /// The builder's store does not fsync what it registers (outputs, fetched inputs) nor its
    /// metadata commits: a power loss may lose them. Only for scratch builders (benchmarks).
    #[arg(long)]
    pub no_fsync: bool,
    /// The name this builder has on the runner; default: the host name.
    #[arg(long)]
    pub machine_id: Option<String>,
    /// For the nix executor: the Nix store to build in (`--store` of Nix's commands); default:
    /// Nix's own configuration.
    #[arg(long, value_name = "URI")]
    pub nix_store: Option<String>,
    /// PEM file of the CA (or certificate) to trust for an `https://` runner.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// The name the runner's certificate must carry (default: the URL's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
}

pub fn run(ctx: Context, args: BuilderArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(builder(ctx, args))
}

async fn builder(ctx: Context, args: BuilderArgs) -> anyhow::Result<ExitCode> {
    let token = crate::grpc::auth::read_token_file(&args.token_file)?;
    let tls = if args.runner.starts_with("https://") {
        Some(super::tls::client_config(
            args.tls_ca.as_deref(),
            args.tls_domain.as_deref(),
        )?)
    } else {
        None
    };
    let store = if store_dir_pinned(&ctx) {
        open_store(&ctx).await?
    } else {
        let dir = crate::builder::agent::runner_store_dir(
            &args.runner,
            &token,
            tls.as_ref(),
            keepalive(&ctx),
        )
        .await
        .with_context(|| format!("asking {} for its store dir", args.runner))?;
        tracing::info!(store_dir = %dir, root = %ctx.store_root().display(), "[store] dir is not set: taking the runner's");
        let dir = crate::store::StoreDir::new(dir).context("the runner's store dir")?;
        let store = crate::store::local::LocalStore::open(dir, ctx.store_root())
            .await
            .with_context(|| format!("opening the store at {}", ctx.store_root().display()))?;
        Arc::new(store)
    };
    if args.no_fsync {
        store.set_fsync(false);
    }
    let systems = if args.systems.is_empty() {
        vec![crate::config::this_system()]
    } else {
        args.systems.clone()
    };
    let max_jobs = args
        .max_jobs
        .unwrap_or_else(|| ctx.config.local_max_jobs() as u32);
    let mut exec_cfg =
        crate::builder::executor::ExecutorConfig::from_config(&ctx.config, &ctx.state_dir);
    exec_cfg.systems = systems.clone();
    let log_dir = exec_cfg.log_dir.clone();
    let executor: Arc<dyn Executor> = match args.executor.as_str() {
        "native" => Arc::new(crate::builder::executor::NativeExecutor::new(
            store.clone(),
            exec_cfg,
        )),
        "nix" => Arc::new(crate::builder::executor::nix::NixExecutor::new(
            store.clone(),
            crate::builder::executor::nix::NixConfig {
                store_uri: args.nix_store.clone(),
                systems: systems.clone(),
                log_dir: log_dir.clone(),
            },
        )),
        "simulated" => Arc::new(crate::actors::machine::simulated::SimulatedExecutor::new(
            store.clone(),
        )),
        other => bail!("--executor {other:?}: expected native, nix or simulated"),
    };
    let host = hostname();
    let cfg = AgentConfig {
        runner: args.runner,
        token,
        tls,
        machine_id: args.machine_id.unwrap_or_else(|| host.clone()),
        hostname: host,
        systems,
        supported_features: args.features,
        mandatory_features: args.mandatory_features,
        max_jobs,
        speed_factor: args.speed_factor,
        store,
        executor,
        log_dir: Some(log_dir),
        runs_ledger: Some(ctx.state_dir.join("runs.log")),
        fault: Fault::from_env(),
        keepalive: keepalive(&ctx),
    };
    crate::builder::agent::run(cfg).await?;
    Ok(ExitCode::SUCCESS)
}

/// `[grpc] keepalive_interval_s` / `keepalive_timeout_s`.
fn keepalive(ctx: &Context) -> crate::builder::agent::Keepalive {
    let g = &ctx.config.grpc;
    let secs = |s: f64| std::time::Duration::from_secs_f64(s.max(0.0));
    crate::builder::agent::Keepalive {
        interval: (g.keepalive_interval_s > 0.0).then(|| secs(g.keepalive_interval_s)),
        timeout: secs(g.keepalive_timeout_s).max(std::time::Duration::from_millis(100)),
    }
}

/// Whether the configuration chose the logical store dir (file or `QR_STORE_DIR`); the default
/// (`<state dir>/store`) is not a choice, so such a builder takes the runner's.
fn store_dir_pinned(ctx: &Context) -> bool {
    std::path::Path::new(&ctx.config.store.dir) != ctx.state_dir.join("store")
}
