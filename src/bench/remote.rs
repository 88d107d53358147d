//! The remote-builder scenario (`qr bench --remote-builders N`): the layered graph of
//! [`super::scenario`], built by `N` `qr builder` processes (this same binary, `--executor
//! simulated`: zero-time builds whose one-file outputs are uploaded as small NARs) that dial the
//! runner's gRPC service on loopback, as `qr serve` serves it (token, hub, one actor per session,
//! uploads spooled and verified before they are registered).
//!
//! Setup and load are as in the layered scenario (no machine). Then the builders are spawned; the
//! build is timed from the spawn, and again from the moment every builder has joined (the steady
//! rate, without the processes' start-up), until every build has finished. Each step's latency is
//! the time from the dispatcher's assignment to the step counted built (inputs fetched, output
//! uploaded, checked, registered, row written). CPU time is read from `/proc` for the runner (this
//! process), the builders and every `postgres` process, and for the whole machine, so the figures
//! say whether the cores were the bound and who used them. The builders are killed when the
//! scenario ends, however it ends ([`Builders`] kills them on drop; on Linux they also get
//! SIGKILL if the thread that spawned them dies).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use serde::Serialize;
use tonic::service::interceptor::InterceptedService;

use super::graph::GraphSpec;
use super::measure::{Percentiles, machine_cpu_s, process_cpu_s, processes_cpu_s, wait_until};
use super::scenario::{
    DbTarget, Load, Params, Scratch, Setup, leave, open_scratch, setup_and_load,
};
use crate::actors::env::Stats;
use crate::grpc::auth::ServerAuth;
use crate::grpc::clip::ClipStatus;
use crate::grpc::hub::{BuilderHub, Connected, RemoteSettings};
use crate::grpc::runner_v1::runner_service_server::RunnerServiceServer;
use crate::grpc::service::RunnerServiceImpl;
use crate::store::{LocalStore, Store, StoreDir};

/// The builders of the scenario.
#[derive(Debug, Clone)]
pub struct RemoteSpec {
    /// `qr builder` processes.
    pub builders: usize,
    /// Slots (`--max-jobs`) of each.
    pub jobs: u32,
    /// The `qr` binary to run them with.
    pub exe: PathBuf,
}

/// CPU seconds used during the build phase.
#[derive(Debug, Clone, Serialize)]
pub struct CpuSplit {
    pub wall_s: f64,
    /// Cores of the machine.
    pub cores: usize,
    /// Busy CPU seconds of the whole machine (every process, other users' included).
    pub machine_busy_s: f64,
    /// Busy share of the machine's cores over the phase (1.0: every core always busy).
    pub machine_busy_share: f64,
    /// This process: actors, gRPC service, verification, store, database client.
    pub runner_s: f64,
    /// The builder processes, over their whole life (start-up included).
    pub builders_s: f64,
    /// Every process named `postgres` (other databases' users included); 0 on SQLite unless
    /// something else uses the server meanwhile.
    pub postgres_s: f64,
    /// Busy CPU seconds not accounted for by the three above (other processes, the kernel's
    /// own threads).
    pub other_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RemoteBuild {
    /// Spawn of the builders → every build finished.
    pub seconds: f64,
    /// Spawn → every builder joined.
    pub join_s: f64,
    pub steps_built: u64,
    pub resolutions: u64,
    pub steps_finished: u64,
    /// Steps finished / `seconds`.
    pub steps_per_s_from_spawn: f64,
    /// Steps finished after every builder had joined / the time since then.
    pub steps_per_s: f64,
    pub write_transactions: u64,
    pub tx_per_finished_step: f64,
    /// Assigned by the dispatcher → counted built, ms.
    pub step_ms: Percentiles,
    /// Last input landed → resolved step queued, ms.
    pub resolution_ms: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct Remote {
    pub backend: &'static str,
    pub builders: usize,
    pub jobs_per_builder: u32,
    pub builder_fsync: bool,
    pub spec: GraphSpec,
    pub setup: Setup,
    pub load: Load,
    pub build: RemoteBuild,
    pub cpu: CpuSplit,
    /// What the CPU figures say bounds the rate.
    pub bound: String,
}

/// The builder processes; killed (and reaped) when dropped.
struct Builders {
    children: Vec<(String, Child)>,
    dir: PathBuf,
}

impl Builders {
    /// The last lines of a builder's log, for an error.
    fn log_tail(&self, id: &str) -> String {
        let log =
            std::fs::read_to_string(self.dir.join(id).join("builder.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// A builder that exited, with its status and log tail.
    fn exited(&mut self) -> Option<String> {
        for (id, c) in &mut self.children {
            if let Ok(Some(status)) = c.try_wait() {
                let id = id.clone();
                return Some(format!(
                    "builder {id} exited ({status}):\n{}",
                    self.log_tail(&id)
                ));
            }
        }
        None
    }

    fn cpu_s(&self) -> f64 {
        self.children
            .iter()
            .filter_map(|(_, c)| process_cpu_s(c.id()))
            .sum()
    }
}

impl Drop for Builders {
    fn drop(&mut self) {
        for (id, c) in &mut self.children {
            if let Err(e) = c.kill() {
                tracing::debug!(builder = %id, error = %e, "killing a bench builder");
            }
            if let Err(e) = c.wait() {
                tracing::warn!(builder = %id, error = %e, "reaping a bench builder");
            }
        }
    }
}

/// Spawns the builders, each with its own state dir and store under `dir`, dialling `url`.
fn spawn_builders(
    spec: &RemoteSpec,
    dir: &Path,
    url: &str,
    token_file: &Path,
    store_dir: &StoreDir,
    fsync: bool,
) -> anyhow::Result<Builders> {
    let mut b = Builders {
        children: Vec::new(),
        dir: dir.to_path_buf(),
    };
    for i in 0..spec.builders {
        let id = format!("bench-b{i}");
        let state = dir.join(&id);
        std::fs::create_dir_all(&state)?;
        let log = std::fs::File::create(state.join("builder.log"))?;
        let mut c = Command::new(&spec.exe);
        // Nothing of the bench's own configuration reaches the builders.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("QR_") {
                c.env_remove(&k);
            }
        }
        c.arg("--state-dir")
            .arg(&state)
            .env("QR_STORE_DIR", store_dir.as_str())
            .env("QR_STORE_ROOT", state.join("store"))
            .env("QR_LOG", "warn")
            .args(["builder", "--runner", url, "--token-file"])
            .arg(token_file)
            .args(["--machine-id", &id, "--executor", "simulated", "--max-jobs"])
            .arg(spec.jobs.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if !fsync {
            c.arg("--no-fsync");
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                c.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = c
            .spawn()
            .with_context(|| format!("spawning {}", spec.exe.display()))?;
        b.children.push((id, child));
    }
    Ok(b)
}

/// The runner's gRPC service on loopback (port chosen by the kernel), as `qr serve` has it;
/// stops when the returned sender is dropped or fired.
async fn serve(
    env: Arc<crate::actors::env::Env>,
    store: Arc<LocalStore>,
    dispatcher: Addr<crate::actors::dispatcher::actor::DispatcherActor>,
    dir: &Path,
    token: String,
) -> anyhow::Result<(Addr<BuilderHub>, String, tokio::sync::oneshot::Sender<()>)> {
    let settings = RemoteSettings {
        store_dir: store.store_dir().clone(),
        heartbeat: Duration::from_secs(5),
        silent_timeout: Duration::from_secs(25),
        max_nar_bytes: 1 << 30,
        max_log_bytes: 1 << 26,
        quarantine: Duration::from_secs(60),
        adopt_grace: Duration::from_secs(0),
        spool_dir: dir.join("uploads"),
        log_dir: dir.join("logs"),
    };
    let hub = BuilderHub::new(env, store.clone(), dispatcher, settings.clone()).start();
    let runner = RunnerServiceServer::new(RunnerServiceImpl::new(hub.clone(), store, settings))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let runner = ClipStatus::new(InterceptedService::new(
        runner,
        ServerAuth::new(Some(token)),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("listening on loopback")?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    actix::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(runner)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move {
                    // Fired or dropped: either ends the service.
                    let _fired_or_dropped = stop_rx.await;
                },
            )
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "the bench's gRPC service stopped");
        }
    });
    Ok((hub, url, stop_tx))
}

/// What the CPU split says bounds the rate.
fn bound(cpu: &CpuSplit) -> String {
    let busy = cpu.machine_busy_s.max(1e-9);
    let share = |s: f64| 100.0 * s / busy;
    let who = format!(
        "runner {:.0}%, builders {:.0}%, postgres {:.0}%, other {:.0}% of the busy CPU",
        share(cpu.runner_s),
        share(cpu.builders_s),
        share(cpu.postgres_s),
        share(cpu.other_s)
    );
    if cpu.machine_busy_share >= 0.9 {
        format!(
            "CPU: the {} cores were {:.0}% busy ({who})",
            cpu.cores,
            100.0 * cpu.machine_busy_share
        )
    } else {
        format!(
            "not the CPU alone: the {} cores were {:.0}% busy ({who}); the rest is waiting \
             (commits' fsyncs, round trips)",
            cpu.cores,
            100.0 * cpu.machine_busy_share
        )
    }
}

/// The scenario (see the module docs).
pub async fn remote(
    spec: GraphSpec,
    remote: RemoteSpec,
    p: Params,
    target: DbTarget,
) -> anyhow::Result<Remote> {
    anyhow::ensure!(remote.builders > 0, "--remote-builders must be at least 1");
    let Scratch { dir, store, fresh } = open_scratch(&p, &target).await?;
    let db = fresh.db.clone();
    let result = async {
        let loaded = setup_and_load(&spec, &p, &store, &db, &fresh.setup).await?;
        let env = loaded.env.clone();
        let s = &env.stats;
        let token = format!(
            "bench-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{token}\n"))?;
        let (hub, url, stop) = serve(
            env.clone(),
            store.clone(),
            loaded.sched.dispatcher.clone(),
            dir.path(),
            token,
        )
        .await?;
        env.probe.enable();
        let builds = loaded.setup.builds as u64;
        let tx0 = db.write_transactions();
        let (busy0, all0) = machine_cpu_s();
        let runner0 = process_cpu_s(std::process::id()).unwrap_or(0.0);
        let (pg0, _) = processes_cpu_s("postgres");
        let t0 = Instant::now();
        let mut children = spawn_builders(
            &remote,
            &dir.path().join("builders"),
            &url,
            &token_file,
            store.store_dir(),
            !p.no_fsync,
        )?;
        let n = remote.builders;
        let deadline = Instant::now() + p.timeout;
        loop {
            if let Some(e) = children.exited() {
                anyhow::bail!("{e}");
            }
            if hub.send(Connected).await?.len() >= n {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("gave up waiting for {n} builders to join");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let join_s = t0.elapsed().as_secs_f64();
        let t_joined = Instant::now();
        let finished = || Stats::get(&s.steps_built) + Stats::get(&s.resolutions);
        let finished_at_join = finished();
        let mut polls = 0u32;
        wait_until("every build to finish", p.timeout, || {
            if Stats::get(&s.steps_failed) > 0 {
                return Err(format!("{} step(s) failed", Stats::get(&s.steps_failed)));
            }
            polls += 1;
            if polls % 100 == 0 {
                if let Some(e) = children.exited() {
                    return Err(e);
                }
            }
            Ok(Stats::get(&s.builds_finished) >= builds)
        })
        .await?;
        let seconds = t0.elapsed().as_secs_f64();
        let steady_s = t_joined.elapsed().as_secs_f64();
        let (busy1, all1) = machine_cpu_s();
        let runner_s = process_cpu_s(std::process::id()).unwrap_or(0.0) - runner0;
        let (pg1, _) = processes_cpu_s("postgres");
        let builders_s = children.cpu_s();
        drop(children);
        drop(stop);
        let writes = db.write_transactions() - tx0;
        let data = env.probe.take();
        let step_ms: Vec<f64> = data
            .built
            .iter()
            .filter_map(|(drv, t1)| {
                let t0 = data.assigned.get(drv)?;
                (t1 >= t0).then(|| (*t1 - *t0).as_secs_f64() * 1e3)
            })
            .collect();
        let resolution_ms: Vec<f64> = data
            .resolved
            .iter()
            .filter_map(|(drv, child)| {
                let (t0, t1) = (data.resolving.get(drv)?, data.runnable.get(child)?);
                (t1 > t0).then(|| (*t1 - *t0).as_secs_f64() * 1e3)
            })
            .collect();
        let (built, resolutions) = (Stats::get(&s.steps_built), Stats::get(&s.resolutions));
        let total = built + resolutions;
        let machine_busy_s = busy1 - busy0;
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let postgres_s = (pg1 - pg0).max(0.0);
        let cpu = CpuSplit {
            wall_s: seconds,
            cores,
            machine_busy_s,
            machine_busy_share: machine_busy_s / (all1 - all0).max(1e-9),
            runner_s,
            builders_s,
            postgres_s,
            other_s: (machine_busy_s - runner_s - builders_s - postgres_s).max(0.0),
        };
        Ok::<_, anyhow::Error>(Remote {
            backend: target.name(),
            builders: n,
            jobs_per_builder: remote.jobs,
            builder_fsync: !p.no_fsync,
            spec: spec.clone(),
            setup: loaded.setup,
            load: loaded.load,
            build: RemoteBuild {
                seconds,
                join_s,
                steps_built: built,
                resolutions,
                steps_finished: total,
                steps_per_s_from_spawn: total as f64 / seconds,
                steps_per_s: total.saturating_sub(finished_at_join) as f64 / steady_s,
                write_transactions: writes,
                tx_per_finished_step: writes as f64 / total.max(1) as f64,
                step_ms: Percentiles::of(step_ms),
                resolution_ms: Percentiles::of(resolution_ms),
            },
            bound: bound(&cpu),
            cpu,
        })
    }
    .await;
    leave(dir, &fresh);
    result
}
