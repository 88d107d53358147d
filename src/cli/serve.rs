//! `qr serve`: the long-running runner. Opens the database and the store, recovers, starts the
//! actors (with the in-process local builder if `[local_builder] enabled`), and serves builders
//! over gRPC (`[grpc]`: the runner service behind the token, plus health and reflection) until
//! SIGINT or SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use anyhow::Context as _;
use tonic::service::interceptor::InterceptedService;

use super::Context;
use super::run::{
    local_executor, local_machine, notify_settings, open_store, retry_policy, start_notify,
};
use crate::actors::env::{Env, SystemClock};
use crate::actors::scheduler::{Restart, Scheduler};
use crate::db::{Db, DbOptions};
use crate::grpc::admin::AdminServiceImpl;
use crate::grpc::admin::admin_v1::admin_service_server::AdminServiceServer;
use crate::grpc::auth::{ServerAuth, read_token_file};
use crate::grpc::clip::ClipStatus;
use crate::grpc::hub::{BuilderHub, RemoteSettings};
use crate::grpc::runner_v1::runner_service_server::RunnerServiceServer;
use crate::grpc::service::RunnerServiceImpl;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Listen here instead of `[grpc] listen`.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

pub fn run(ctx: Context, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let system = actix_rt::System::new();
    system.block_on(serve(ctx, args))
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn no_limit_if_zero(n: u64) -> u64 {
    if n == 0 { u64::MAX } else { n }
}

/// The gRPC settings for builders, from the configuration.
pub fn remote_settings(ctx: &Context, store_dir: crate::store::StoreDir) -> RemoteSettings {
    let g = &ctx.config.grpc;
    RemoteSettings {
        store_dir,
        heartbeat: secs(g.heartbeat_interval_s).max(Duration::from_millis(100)),
        silent_timeout: secs(g.silent_timeout_s).max(secs(g.heartbeat_interval_s)),
        // 0 is no limit, as in Nix.
        max_nar_bytes: no_limit_if_zero(g.max_nar_bytes),
        max_log_bytes: no_limit_if_zero(ctx.config.store.max_log_bytes),
        quarantine: secs(g.quarantine_s),
        adopt_grace: secs(g.rejoin_grace_s),
        spool_dir: ctx.state_dir.join("uploads"),
        log_dir: ctx.state_dir.join("logs").join("remote"),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn serve(ctx: Context, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let notify = notify_settings(&ctx)?;
    let db = Db::connect_with(
        &ctx.config.database.url,
        DbOptions {
            max_connections: ctx.config.database.max_connections,
            rescan_interval: secs(ctx.config.database.rescan_interval_s)
                .max(Duration::from_millis(50)),
            sqlite_poll_interval: secs(ctx.config.database.sqlite_poll_interval_s),
            notify: notify.targets(),
            ..DbOptions::default()
        },
    )
    .await?;
    let store = open_store(&ctx).await?;
    let token = match ctx.config.grpc.token_file.as_str() {
        "" => {
            tracing::warn!("[grpc] token_file is not set: every builder will be refused");
            None
        }
        f => Some(read_token_file(std::path::Path::new(f))?),
    };
    let listen = args
        .listen
        .unwrap_or_else(|| ctx.config.grpc.listen.clone());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let local_addr = listener.local_addr()?;

    let mut env = Env::new(db, store.clone(), Arc::new(SystemClock), retry_policy(&ctx));
    env.max_silent = Duration::from_secs(ctx.config.scheduler.max_silent_time_s);
    env.timeout = Duration::from_secs(ctx.config.scheduler.build_timeout_s);
    env.scheduling = ctx.config.scheduler.scheduling();
    env.runs_ledger = Some(ctx.state_dir.join("runs.log"));
    let io = crate::actors::env::io_runtime().context("starting the I/O runtime")?;
    env.db.run_batches_on(io.clone());
    start_notify(&io, &env.db, &notify)?;
    env.io = Some(io);
    let env = Arc::new(env);
    let machines = if ctx.config.local_builder.enabled {
        vec![(local_machine(&ctx), local_executor(&ctx, store.clone())?)]
    } else {
        vec![]
    };
    let settings = remote_settings(&ctx, store.store_dir().clone());
    let remote_logs = settings.log_dir.clone();
    // Rows busy on a builder when the runner stopped: that builder may still be running them.
    // They stay busy, and their steps are kept for it, until it rejoins (and its build is
    // adopted, in the same row) or the grace passes (`actors/carried.rs`).
    let restart = Restart::CarryRemote {
        local: machines.iter().map(|(m, _)| m.id.clone()).collect(),
        grace: settings.adopt_grace,
    };
    let (sched, recovery) = Scheduler::start_with(
        env.clone(),
        machines,
        Duration::from_secs(ctx.config.scheduler.unsupported_wait_s),
        restart,
    )
    .await?;
    if recovery.aborted > 0 || recovery.resolutions > 0 || !recovery.carried.is_empty() {
        tracing::warn!(
            aborted = recovery.aborted,
            carried = recovery.carried.len(),
            resolutions = recovery.resolutions,
            "recovered from a restart"
        );
    }
    let hub = BuilderHub::new(
        env.clone(),
        store.clone(),
        sched.dispatcher.clone(),
        settings.clone(),
    )
    .start();
    let runner = RunnerServiceServer::new(RunnerServiceImpl::new(hub, store.clone(), settings))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let auth = ServerAuth::new(token);
    let runner = ClipStatus::new(InterceptedService::new(runner, auth.clone()));
    let log_dirs = vec![
        crate::builder::executor::ExecutorConfig::from_config(&ctx.config, &ctx.state_dir).log_dir,
        remote_logs,
    ];
    crate::grpc::admin::spawn_log_compressor(env.clone(), log_dirs.clone());
    let history = Arc::new(std::sync::Mutex::new(crate::actors::history::History::new(
        secs(ctx.config.http.history_interval_s).max(Duration::from_millis(100)),
        secs(ctx.config.http.history_window_s),
    )));
    crate::actors::history::spawn_sampler(env.clone(), history.clone());
    let admin = crate::grpc::admin::Admin::new(env.clone(), sched.dispatcher.clone())
        .with_log_dirs(log_dirs.clone())
        .with_history(history);
    let http_cache = crate::cache::setup::start(&ctx.config.cache, store.clone(), log_dirs)?;
    let http_listen = ctx.config.http.listen.clone();
    if !http_listen.is_empty() {
        let l = tokio::net::TcpListener::bind(&http_listen)
            .await
            .with_context(|| format!("listening on {http_listen} ([http] listen)"))?;
        eprintln!("qr serve: dashboard on http://{}", l.local_addr()?);
        let admin = admin.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::web::serve(l, admin, http_cache).await {
                tracing::error!(error = %e, "the HTTP server stopped");
            }
        });
    }
    let admin_service = ClipStatus::new(InterceptedService::new(
        AdminServiceServer::new(AdminServiceImpl::new(admin.clone())),
        auth,
    ));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<RunnerServiceServer<RunnerServiceImpl>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::grpc::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;

    let g = &ctx.config.grpc;
    let mut server = tonic::transport::Server::builder()
        .http2_keepalive_interval(
            (g.keepalive_interval_s > 0.0).then(|| secs(g.keepalive_interval_s)),
        )
        .http2_keepalive_timeout(Some(
            secs(g.keepalive_timeout_s).max(Duration::from_millis(100)),
        ));
    let tls = super::tls::server_config(&ctx)?;
    if let Some(tls) = tls {
        server = server.tls_config(tls).context("[grpc] TLS configuration")?;
    }
    eprintln!("qr serve: listening on {local_addr}");
    tracing::info!(addr = %local_addr, "serving builders");
    server
        .add_service(health_service)
        .add_service(reflection)
        .add_service(runner)
        .add_service(admin_service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown_signal(),
        )
        .await
        .context("serving gRPC")?;
    tracing::info!("shutting down");
    drop(sched);
    actix_rt::System::current().stop();
    Ok(ExitCode::SUCCESS)
}
