//! `qr admin …`: the admin API (`proto/qr/admin/v1/admin.proto`) from the command line. Tables by
//! default, `--json` for one JSON document per answer (one per line for `watch`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use serde::Serialize;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::Context;
use crate::grpc::admin::admin_v1::admin_service_client::AdminServiceClient;
use crate::grpc::admin::admin_v1::set_machine_request::Action;
use crate::grpc::admin::admin_v1::*;
use crate::grpc::auth::ClientAuth;

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The runner's gRPC address (default: `http://` + `[grpc] listen`; `https://` for TLS).
    #[arg(long, global = true, env = "QR_RUNNER", value_name = "URL")]
    pub runner: Option<String>,
    /// File holding the runner's token (default: `[grpc] token_file`).
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA to trust for an `https://` runner.
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// Uptime, builds and steps by state, runnable steps per system, machine slots.
    Status,
    /// The most recent builds.
    Builds {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only unfinished builds (in queue order).
        #[arg(long)]
        unfinished: bool,
    },
    /// One build with its outputs and steps.
    Build { id: i64 },
    /// The steps of a build.
    Steps { build: i64 },
    /// One step with its outputs and its Resolved chain.
    Step { build: i64, stepnr: i32 },
    /// The live actors (the supervision tree): kind, state, messages handled, restarts, links.
    Actors {
        /// queue_monitor, dispatcher, build or step.
        #[arg(long, default_value = "")]
        kind: String,
    },
    /// The machines with their slots and jobs.
    Machines,
    /// The evaluations (`qr submit --eval-jobs`), newest first, with their counts.
    Evals {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One evaluation: its jobs with their builds, its errors and its aggregates.
    Eval { id: i64 },
    /// Cancel an unfinished build.
    Cancel { id: i64 },
    /// Queue a finished build again.
    Restart { id: i64 },
    /// Set an unfinished build's global priority.
    Bump { id: i64, global_priority: i32 },
    /// Let a machine take jobs again.
    Enable { machine: String },
    /// Give a machine no new jobs (running jobs finish).
    Disable { machine: String },
    /// Like disable; the machine shows as draining until its jobs are done.
    Drain { machine: String },
    /// A step's build log: that step attempt's own (a step that ran nothing itself shows the
    /// latest log of its drv); without STEPNR, the build's last failed step, else its last step
    /// with a log.
    Log {
        build: i64,
        stepnr: Option<i32>,
        /// Only the last lines.
        #[arg(long, default_value_t = 0)]
        tail: u32,
    },
    /// Print scheduler events as they happen.
    Watch {
        /// Stop after this many events (0: never).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
}

type Client = AdminServiceClient<InterceptedService<Channel, ClientAuth>>;

async fn connect(ctx: &Context, args: &AdminArgs) -> anyhow::Result<Client> {
    let url = args
        .runner
        .clone()
        .unwrap_or_else(|| format!("http://{}", ctx.config.grpc.listen));
    let token_file = match &args.token_file {
        Some(f) => f.clone(),
        None if !ctx.config.grpc.token_file.is_empty() => {
            PathBuf::from(&ctx.config.grpc.token_file)
        }
        None => anyhow::bail!("no token: pass --token-file or set [grpc] token_file"),
    };
    let token = crate::grpc::auth::read_token_file(&token_file)?;
    let mut ep = Endpoint::from_shared(url.clone()).context("the runner URL")?;
    if url.starts_with("https://") {
        ep = ep
            .tls_config(super::tls::client_config(args.tls_ca.as_deref(), None)?)
            .context("TLS")?;
    }
    let ch = ep
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(AdminServiceClient::with_interceptor(
        ch,
        ClientAuth::new(&token)?,
    ))
}

pub fn run(ctx: Context, args: AdminArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(admin(ctx, args))
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

/// Prints rows as columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r);
    }
}

fn time(t: i64) -> String {
    if t == 0 { "-".into() } else { t.to_string() }
}

/// A machine's last heartbeat: its age and unix time (`now (local)` for the in-process builder).
fn heartbeat(m: &Machine) -> String {
    if m.local {
        "now (local)".into()
    } else if m.last_heartbeat_ms == 0 {
        "-".into()
    } else {
        format!(
            "{:.1}s ago ({})",
            m.heartbeat_age_s,
            m.last_heartbeat_ms / 1000
        )
    }
}

fn short(p: &str) -> String {
    p.rsplit('/').next().unwrap_or(p).to_string()
}

fn steps_table(steps: &[Step]) {
    table(
        &["step", "status", "machine", "drv", "resolved to", "error"],
        steps
            .iter()
            .map(|s| {
                vec![
                    s.stepnr.to_string(),
                    s.status_name.clone(),
                    s.machine.clone(),
                    short(&s.drv_path),
                    if s.resolved_to_step > 0 {
                        s.resolved_to_step.to_string()
                    } else {
                        String::new()
                    },
                    s.error_msg.lines().next().unwrap_or("").to_string(),
                ]
            })
            .collect(),
    );
}

fn evals_table(evals: &[Eval]) {
    table(
        &[
            "eval",
            "jobset",
            "time",
            "jobs",
            "new",
            "existing",
            "errors",
            "succeeded",
            "failed",
            "queued",
            "source",
        ],
        evals
            .iter()
            .map(|e| {
                vec![
                    e.id.to_string(),
                    e.jobset.clone(),
                    time(e.timestamp),
                    e.jobs.to_string(),
                    e.new_builds.to_string(),
                    e.existing_builds.to_string(),
                    e.errors.to_string(),
                    e.succeeded.to_string(),
                    e.failed.to_string(),
                    e.queued.to_string(),
                    e.source.clone(),
                ]
            })
            .collect(),
    );
}

fn event_line(e: &Event) -> String {
    let mut s = format!("{} {}", e.time, e.kind);
    if e.build != 0 {
        s.push_str(&format!(" build={}", e.build));
    }
    if !e.drv_path.is_empty() {
        s.push_str(&format!(" drv={}", short(&e.drv_path)));
    }
    if !e.machine.is_empty() {
        s.push_str(&format!(" machine={}", e.machine));
    }
    if e.kind.ends_with("finished") {
        s.push_str(&format!(" status={}", e.status));
    }
    if !e.resolved.is_empty() {
        s.push_str(&format!(" resolved={}", short(&e.resolved)));
    }
    s
}

async fn action(
    json: bool,
    r: Result<tonic::Response<ActionResponse>, tonic::Status>,
) -> anyhow::Result<ExitCode> {
    let r = r.map_err(status_err)?.into_inner();
    if json {
        print_json(&r)?;
    } else {
        println!("{}", r.message);
    }
    Ok(ExitCode::SUCCESS)
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn admin(ctx: Context, args: AdminArgs) -> anyhow::Result<ExitCode> {
    let mut c = connect(&ctx, &args).await?;
    let json = args.json;
    match args.command {
        AdminCommand::Status => {
            let s = c
                .status(StatusRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&s).map(|_| ExitCode::SUCCESS);
            }
            let counts = |v: &[Count]| {
                v.iter()
                    .map(|c| format!("{}={}", c.key, c.count))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            table(
                &["key", "value"],
                vec![
                    vec!["uptime_s".into(), s.uptime_s.to_string()],
                    vec!["builds queued".into(), s.builds_queued.to_string()],
                    vec!["builds active".into(), s.builds_active.to_string()],
                    vec!["builds finished".into(), s.builds_finished.to_string()],
                    vec!["steps by state".into(), counts(&s.steps_by_state)],
                    vec!["runnable".into(), s.runnable.to_string()],
                    vec!["runnable per system".into(), counts(&s.runnable_per_system)],
                    vec!["machines".into(), s.machines.to_string()],
                    vec![
                        "slots busy/total".into(),
                        format!("{}/{}", s.slots_busy, s.slots_total),
                    ],
                    vec!["steps built".into(), s.steps_built.to_string()],
                    vec!["steps failed".into(), s.steps_failed.to_string()],
                    vec!["resolutions".into(), s.resolutions.to_string()],
                    vec!["early cutoffs".into(), s.early_cutoffs.to_string()],
                    vec!["actor restarts".into(), s.actor_restarts.to_string()],
                ],
            );
        }
        AdminCommand::Builds { limit, unfinished } => {
            let r = c
                .list_builds(ListBuildsRequest {
                    limit,
                    unfinished_only: unfinished,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&r).map(|_| ExitCode::SUCCESS);
            }
            table(
                &["id", "status", "prio", "job", "drv", "stopped"],
                r.builds
                    .iter()
                    .map(|b| {
                        vec![
                            b.id.to_string(),
                            b.status_name.clone(),
                            b.global_priority.to_string(),
                            b.job.clone(),
                            short(&b.drv_path),
                            time(b.stop_time),
                        ]
                    })
                    .collect(),
            );
        }
        AdminCommand::Build { id } => {
            let d = c
                .get_build(GetBuildRequest { id })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&d).map(|_| ExitCode::SUCCESS);
            }
            if let Some(b) = &d.build {
                println!(
                    "build {} ({}) {} {}",
                    b.id, b.job, b.status_name, b.drv_path
                );
            }
            for o in &d.outputs {
                println!("  {} -> {}", o.name, o.path);
            }
            steps_table(&d.steps);
        }
        AdminCommand::Steps { build } => {
            let r = c
                .list_steps(ListStepsRequest { build })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&r).map(|_| ExitCode::SUCCESS);
            }
            steps_table(&r.steps);
        }
        AdminCommand::Step { build, stepnr } => {
            let r = c
                .get_step(GetStepRequest { build, stepnr })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&r).map(|_| ExitCode::SUCCESS);
            }
            println!("resolved chain:");
            steps_table(&r.resolved_chain);
            for o in &r.outputs {
                println!("  {} -> {}", o.name, o.path);
            }
            if !r.resolved_from.is_empty() {
                println!("resolved from:");
                steps_table(&r.resolved_from);
            }
        }
        AdminCommand::Actors { kind } => {
            let r = c
                .list_actors(ListActorsRequest { kind })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&r).map(|_| ExitCode::SUCCESS);
            }
            table(
                &[
                    "actor",
                    "state",
                    "handled",
                    "restarts",
                    "blocked",
                    "waiting on",
                    "children",
                    "detail",
                ],
                r.actors
                    .iter()
                    .map(|a| {
                        vec![
                            short(&a.id),
                            a.state.clone(),
                            a.handled.to_string(),
                            a.restarts.to_string(),
                            if a.blocked {
                                "yes".into()
                            } else {
                                String::new()
                            },
                            a.waiting_on
                                .iter()
                                .map(|w| short(w))
                                .collect::<Vec<_>>()
                                .join(","),
                            a.children.len().to_string(),
                            a.detail.clone(),
                        ]
                    })
                    .collect(),
            );
        }
        AdminCommand::Machines => {
            let r = c
                .list_machines(ListMachinesRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&r).map(|_| ExitCode::SUCCESS);
            }
            table(
                &[
                    "machine",
                    "state",
                    "slots",
                    "heartbeat",
                    "load",
                    "systems",
                    "features",
                    "jobs",
                ],
                r.machines
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            m.state.clone(),
                            format!("{}/{}", m.running, m.max_jobs),
                            heartbeat(m),
                            if m.local {
                                "-".into()
                            } else {
                                format!("{:.2}", m.load)
                            },
                            m.systems.join(","),
                            m.supported_features.join(","),
                            m.jobs
                                .iter()
                                .map(|j| short(j))
                                .collect::<Vec<_>>()
                                .join(","),
                        ]
                    })
                    .collect(),
            );
        }
        AdminCommand::Evals { limit } => {
            let r = c
                .list_evals(ListEvalsRequest { limit })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&r).map(|_| ExitCode::SUCCESS);
            }
            evals_table(&r.evals);
        }
        AdminCommand::Eval { id } => {
            let d = c
                .get_eval(GetEvalRequest { id })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&d).map(|_| ExitCode::SUCCESS);
            }
            if let Some(e) = &d.eval {
                evals_table(std::slice::from_ref(e));
                println!();
            }
            table(
                &["job", "build", "new", "status", "drv", "constituents"],
                d.jobs
                    .iter()
                    .map(|j| {
                        let b = j.build.clone().unwrap_or_default();
                        vec![
                            j.job.clone(),
                            b.id.to_string(),
                            if j.is_new { "new" } else { "existing" }.into(),
                            b.status_name.clone(),
                            short(&b.drv_path),
                            j.constituents
                                .iter()
                                .map(|c| c.to_string())
                                .collect::<Vec<_>>()
                                .join(","),
                        ]
                    })
                    .collect(),
            );
            if !d.errors.is_empty() {
                println!();
                table(
                    &["line", "job", "error"],
                    d.errors
                        .iter()
                        .map(|e| {
                            vec![
                                e.line.to_string(),
                                e.job.clone(),
                                e.message.lines().next().unwrap_or("").to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        AdminCommand::Cancel { id } => {
            return action(json, c.cancel_build(BuildAction { id }).await).await;
        }
        AdminCommand::Restart { id } => {
            return action(json, c.restart_build(BuildAction { id }).await).await;
        }
        AdminCommand::Bump {
            id,
            global_priority,
        } => {
            return action(
                json,
                c.bump_build(BumpBuildRequest {
                    id,
                    global_priority,
                })
                .await,
            )
            .await;
        }
        AdminCommand::Enable { machine }
        | AdminCommand::Disable { machine }
        | AdminCommand::Drain { machine }
            if machine.is_empty() =>
        {
            anyhow::bail!("no machine given")
        }
        AdminCommand::Enable { machine } => {
            let r = c
                .set_machine(SetMachineRequest {
                    machine,
                    action: Action::Enable as i32,
                })
                .await;
            return action(json, r).await;
        }
        AdminCommand::Disable { machine } => {
            let r = c
                .set_machine(SetMachineRequest {
                    machine,
                    action: Action::Disable as i32,
                })
                .await;
            return action(json, r).await;
        }
        AdminCommand::Drain { machine } => {
            let r = c
                .set_machine(SetMachineRequest {
                    machine,
                    action: Action::Drain as i32,
                })
                .await;
            return action(json, r).await;
        }
        AdminCommand::Log {
            build,
            stepnr,
            tail,
        } => {
            let r = c
                .get_log(GetLogRequest {
                    build,
                    stepnr: stepnr.unwrap_or(0),
                    tail_lines: tail,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&r).map(|_| ExitCode::SUCCESS);
            }
            eprintln!("build {} step {} ({})", r.build, r.stepnr, r.drv_path);
            if !r.exact {
                let of = if r.log_build > 0 {
                    format!("build {} step {}", r.log_build, r.log_stepnr)
                } else {
                    "an unnamed attempt".into()
                };
                eprintln!("(the step has no log of its own: the latest log of its drv, from {of})");
            }
            if r.attempts.len() > 1 {
                let list: Vec<String> = r
                    .attempts
                    .iter()
                    .map(|a| {
                        if a.build > 0 {
                            format!("{}/{}", a.build, a.stepnr)
                        } else {
                            "?".into()
                        }
                    })
                    .collect();
                eprintln!(
                    "({} logs of this drv, oldest first, as build/step: {})",
                    list.len(),
                    list.join(" ")
                );
            }
            print!("{}", r.text);
        }
        AdminCommand::Watch { count } => {
            let mut s = c
                .watch_events(WatchEventsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            let mut n = 0;
            while let Some(e) = s.message().await.map_err(status_err)? {
                if json {
                    print_json(&e)?;
                } else {
                    println!("{}", event_line(&e));
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
                n += 1;
                if count > 0 && n >= count {
                    break;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
