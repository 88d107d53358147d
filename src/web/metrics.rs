//! `/metrics`: the Prometheus text format. The actors' [`Stats`], the live actors' states (steps
//! by state and machine type), the dispatcher's and the machines' views (through [`Admin`]), the
//! process registry ([`crate::metrics::global`]: queue reads, dispatch decisions, jobs per machine,
//! NAR bytes, the binary cache) and the database (pool use, evaluations). `docs/ops.md` maps the
//! families to Hydra's queue runner's.
//!
//! Served while the database is away (that is when it is wanted): what needs it is then left out
//! and `qr_database_up` is 0.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, HttpBody as _};
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;

use crate::actors::dispatcher::MachineInfo;
use crate::actors::env::Stats;
use crate::actors::introspect::ActorKind;
use crate::grpc::admin::Admin;
use crate::grpc::admin::admin_v1::Machine;
use crate::metrics::machines::PHASES;
use crate::metrics::steps::UNKNOWN_TYPE;
use crate::metrics::text::{Page, labels};
use crate::metrics::{Counter, HistogramSnapshot, Labeled, global};

/// Timeout of the scrape's own database reads (the evaluations): a slow database does not hold
/// the scrape; those families are then left without samples.
const DB_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Every `Labeled<Counter>` as samples.
fn counters(l: &Labeled<Counter>) -> Vec<(String, f64)> {
    l.snapshot()
        .into_iter()
        .map(|(k, c)| (k, c.get() as f64))
        .collect()
}

fn histograms(l: &Labeled<crate::metrics::Histogram>) -> Vec<(String, HistogramSnapshot)> {
    l.snapshot()
        .into_iter()
        .map(|(k, h)| (k, h.snapshot()))
        .collect()
}

fn machine_info(m: &Machine) -> MachineInfo {
    let set = |v: &[String]| v.iter().cloned().collect::<BTreeSet<String>>();
    MachineInfo {
        id: m.id.clone(),
        systems: set(&m.systems),
        supported_features: set(&m.supported_features),
        mandatory_features: set(&m.mandatory_features),
        max_jobs: m.max_jobs,
        speed_factor: m.speed_factor,
    }
}

/// (system, features) of a machine type as [`crate::metrics::steps::machine_type_of`] names it.
fn split_type(t: &str) -> (&str, BTreeSet<String>) {
    match t.split_once(':') {
        Some((s, f)) => (s, f.split(',').map(str::to_string).collect()),
        None => (t, BTreeSet::new()),
    }
}

/// The live steps, tallied.
#[derive(Default)]
struct StepTally {
    /// (machine type, state) → steps.
    by_type_state: BTreeMap<(String, String), u64>,
    /// Machine type → (runnable steps, seconds they have been runnable, summed).
    runnable: BTreeMap<String, (u64, f64)>,
    waiting: u64,
    unfinished: u64,
}

fn tally(admin: &Admin) -> StepTally {
    let mut t = StepTally::default();
    for c in admin.env().actors.cells() {
        if c.kind != ActorKind::Step {
            continue;
        }
        let (state, age) = c.state_and_age();
        let ty = c
            .group()
            .map_or(UNKNOWN_TYPE.to_string(), |g| g.to_string());
        if state == "runnable" {
            let e = t.runnable.entry(ty.clone()).or_default();
            e.0 += 1;
            e.1 += age.as_secs_f64();
        }
        if state == "waiting_for_inputs" {
            t.waiting += 1;
        }
        if state != "succeeded" && state != "failed" {
            t.unfinished += 1;
        }
        *t.by_type_state.entry((ty, state)).or_default() += 1;
    }
    t
}

/// Renders the page; `scrapes` counts this one.
pub async fn render(admin: &Admin, scrapes: u64) -> Result<String, tonic::Status> {
    let queued = admin.queued().await;
    let st = admin.status_with(*queued.as_ref().unwrap_or(&0)).await?;
    let machines = admin.machines().await.unwrap_or_default();
    let env = admin.env();
    let db = &env.db;
    let evals = match tokio::time::timeout(DB_READ_TIMEOUT, db.eval_counts()).await {
        Ok(Ok(e)) => Some(e),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics: cannot count the evaluations");
            None
        }
        Err(_) => {
            tracing::warn!("metrics: counting the evaluations timed out");
            None
        }
    };
    let c = |a: &AtomicU64| Stats::get(a) as f64;
    let g = global();
    let mut p = Page::default();

    // The runner.
    p.one(
        "qr_uptime_seconds",
        "gauge",
        "Seconds since the runner started.",
        st.uptime_s as f64,
    );
    p.one(
        "qr_start_time_seconds",
        "gauge",
        "When the runner started (unix seconds).",
        env.started_at as f64,
    );
    p.one(
        "qr_current_time_seconds",
        "gauge",
        "The runner's clock (unix seconds) at this scrape.",
        env.now_ms() as f64 / 1000.0,
    );
    p.one(
        "qr_database_up",
        "gauge",
        "1 if the database answered this scrape's queue count, else 0.",
        if queued.is_ok() { 1.0 } else { 0.0 },
    );
    p.one(
        "qr_metrics_scrapes_total",
        "counter",
        "Scrapes of this endpoint.",
        scrapes as f64,
    );

    // The queue monitor.
    p.family(
        "qr_builds_queued",
        "gauge",
        "Unfinished builds in the database (absent while the database is away).",
        &if queued.is_ok() {
            vec![(String::new(), st.builds_queued as f64)]
        } else {
            vec![]
        },
    );
    let q = &g.queue;
    p.one(
        "qr_queue_checks_started_total",
        "counter",
        "Reads of the queue started by the queue monitor.",
        q.checks_started.get() as f64,
    );
    p.one(
        "qr_queue_checks_finished_total",
        "counter",
        "Reads of the queue that completed.",
        q.checks_finished.get() as f64,
    );
    p.one(
        "qr_queue_checks_failed_total",
        "counter",
        "Reads of the queue that failed (read again a second later).",
        q.checks_failed.get() as f64,
    );
    p.one(
        "qr_queue_builds_read_total",
        "counter",
        "Build rows read from the database by the queue monitor.",
        q.builds_read.get() as f64,
    );
    p.one(
        "qr_queue_read_seconds_total",
        "counter",
        "Time the queue monitor spent reading the queue.",
        q.read_micros.seconds(),
    );
    p.one(
        "qr_queue_monitor_wakeups_total",
        "counter",
        "Queue events (notifications, rescans) the queue monitor handled.",
        q.wakeups.get() as f64,
    );
    p.one(
        "qr_queue_builds_loaded_total",
        "counter",
        "Build actors the queue monitor started.",
        q.builds_loaded.get() as f64,
    );

    // Builds.
    p.one(
        "qr_builds_active",
        "gauge",
        "Builds with a live actor.",
        st.builds_active as f64,
    );
    p.one(
        "qr_builds_finished_total",
        "counter",
        "Builds finished since start.",
        c(&env.stats.builds_finished),
    );
    let by_status = counters(&g.builds.finished);
    let status_sum = |ok: bool| -> f64 {
        by_status
            .iter()
            .filter(|(l, _)| (l == &labels(&[("status", "success")])) == ok)
            .map(|(_, v)| v)
            .sum()
    };
    p.one(
        "qr_builds_succeeded_total",
        "counter",
        "Builds finished with status success.",
        status_sum(true),
    );
    p.one(
        "qr_builds_failed_total",
        "counter",
        "Builds finished with any other status.",
        status_sum(false),
    );
    p.family(
        "qr_builds_finished_by_status_total",
        "counter",
        "Builds finished since start, by status (Hydra's names).",
        &by_status,
    );
    let bd = env.stats.build_seconds.snapshot();
    p.summary(
        "qr_build_duration_seconds",
        "Build durations (queued to finished).",
        bd.0,
        bd.1,
    );

    // Steps.
    let tally = tally(admin);
    p.family(
        "qr_steps",
        "gauge",
        "Live step actors by state.",
        &st.steps_by_state
            .iter()
            .map(|x| (labels(&[("state", &x.key)]), x.count as f64))
            .collect::<Vec<_>>(),
    );
    p.family(
        "qr_steps_by_machine_type",
        "gauge",
        "Live step actors by machine type (system, and required features after a colon) and state.",
        &tally
            .by_type_state
            .iter()
            .map(|((t, s), n)| (labels(&[("machine_type", t), ("state", s)]), *n as f64))
            .collect::<Vec<_>>(),
    );
    p.one(
        "qr_steps_unfinished",
        "gauge",
        "Live step actors not succeeded or failed.",
        tally.unfinished as f64,
    );
    p.one(
        "qr_steps_waiting",
        "gauge",
        "Live step actors waiting for their inputs.",
        tally.waiting as f64,
    );
    p.one(
        "qr_steps_running",
        "gauge",
        "Steps on a machine.",
        c(&env.stats.steps_running),
    );
    p.one(
        "qr_runnable_steps",
        "gauge",
        "Steps waiting for a machine.",
        st.runnable as f64,
    );
    p.family(
        "qr_runnable_steps_by_system",
        "gauge",
        "Steps waiting for a machine, per system.",
        &st.runnable_per_system
            .iter()
            .map(|x| (labels(&[("system", &x.key)]), x.count as f64))
            .collect::<Vec<_>>(),
    );
    p.family(
        "qr_machine_type_runnable_wait_seconds",
        "gauge",
        "Seconds the runnable steps of each machine type have waited so far, summed (divide by \
         their count in qr_steps_by_machine_type for the average).",
        &tally
            .runnable
            .iter()
            .map(|(t, (_, s))| (labels(&[("machine_type", t)]), *s))
            .collect::<Vec<_>>(),
    );
    let infos: Vec<(MachineInfo, bool)> = machines
        .iter()
        .map(|m| (machine_info(m), m.enabled))
        .collect();
    let mut disabled = Vec::new();
    let mut unsupported = 0u64;
    for (t, (n, _)) in &tally.runnable {
        if t == UNKNOWN_TYPE {
            continue;
        }
        let (system, features) = split_type(t);
        let able: Vec<bool> = infos
            .iter()
            .filter(|(i, _)| i.supports(system, &features, false))
            .map(|(_, enabled)| *enabled)
            .collect();
        if able.is_empty() {
            unsupported += n;
        } else if !able.iter().any(|e| *e) {
            disabled.push((labels(&[("machine_type", t)]), *n as f64));
        }
    }
    p.family(
        "qr_machine_type_disabled_steps",
        "gauge",
        "Runnable steps of each machine type whose every supporting machine is disabled.",
        &disabled,
    );
    p.one(
        "qr_steps_unsupported",
        "gauge",
        "Runnable steps no connected machine supports (they fail as Unsupported after \
         [scheduler] unsupported_wait_s).",
        unsupported as f64,
    );
    p.one(
        "qr_steps_created_total",
        "counter",
        "Step actors created.",
        c(&env.stats.steps_created),
    );
    p.one(
        "qr_steps_started_total",
        "counter",
        "Steps started on a machine (each attempt).",
        g.steps.started.get() as f64,
    );
    p.family(
        "qr_steps_finished_total",
        "counter",
        "Steps finished, by status (Hydra's names; resolved steps finish as their child does).",
        &counters(&g.steps.finished),
    );
    p.one(
        "qr_steps_built_total",
        "counter",
        "Steps built by a machine.",
        c(&env.stats.steps_built),
    );
    p.one(
        "qr_steps_failed_total",
        "counter",
        "Steps failed.",
        c(&env.stats.steps_failed),
    );
    p.one(
        "qr_step_retries_total",
        "counter",
        "Transient step failures retried.",
        g.steps.retries.get() as f64,
    );
    p.one(
        "qr_step_max_tries",
        "gauge",
        "Tries a step gets before a transient failure is final ([scheduler] max_tries).",
        f64::from(env.retry.max_tries),
    );
    p.one(
        "qr_resolutions_total",
        "counter",
        "CA steps resolved to another drv.",
        c(&env.stats.resolutions),
    );
    p.one(
        "qr_early_cutoffs_total",
        "counter",
        "Resolved drvs found already built.",
        c(&env.stats.early_cutoffs),
    );
    p.one(
        "qr_dynamic_steps_total",
        "counter",
        "Steps of produced derivations (a .drv an input's output holds, dynamic derivations) \
         that a dependent waited on.",
        g.steps.dynamic.get() as f64,
    );
    p.one(
        "qr_steps_copying_to",
        "gauge",
        "NAR streams to remote builders in flight (inputs being copied to machines).",
        g.steps.copying_to.get() as f64,
    );
    p.one(
        "qr_steps_copying_from",
        "gauge",
        "NAR uploads from remote builders in flight (outputs being copied from machines).",
        g.steps.copying_from.get() as f64,
    );
    p.histogram(
        "qr_step_phase_seconds",
        "Time jobs spent per phase on their machine: preparing (reading the drv, listing and \
         sending what it needs), building (on a remote builder including its fetching inputs), \
         receiving_outputs, and total.",
        &histograms(&g.steps.phases),
    );
    p.histogram(
        "qr_job_wait_seconds",
        "Time from a step becoming runnable to a machine taking it, by machine type.",
        &histograms(&g.steps.job_wait),
    );
    p.histogram(
        "qr_step_critical_path_seconds",
        "A step's remaining critical path when it is queued (its priority within Hydra's order: \
         expected seconds of the longest chain from its start to a build that needs it), by \
         machine type.",
        &histograms(&g.steps.critical_path),
    );
    p.histogram(
        "qr_step_input_drvs",
        "Input derivations per step, by machine type.",
        &histograms(&g.steps.input_drvs),
    );
    p.histogram(
        "qr_step_input_closure_bytes",
        "Bytes (NAR sizes) of the input closure of a job sent to a remote builder, by machine \
         type.",
        &histograms(&g.steps.input_closure_bytes),
    );
    let ds = env.stats.dispatch.snapshot();
    p.summary(
        "qr_dispatch_latency_seconds",
        "Time from a step becoming runnable to its start on a machine.",
        ds.0,
        ds.1,
    );

    // The dispatcher.
    p.one(
        "qr_dispatcher_wakeups_total",
        "counter",
        "Dispatcher decisions (a step became runnable, a slot was freed).",
        g.dispatcher.wakeups.get() as f64,
    );
    p.one(
        "qr_dispatcher_busy_seconds_total",
        "counter",
        "Time the dispatcher spent deciding.",
        g.dispatcher.busy_micros.seconds(),
    );

    // Machines (connected now).
    let by_machine = |f: fn(&Machine) -> f64| -> Vec<(String, f64)> {
        machines
            .iter()
            .map(|m| (labels(&[("machine", &m.id)]), f(m)))
            .collect()
    };
    p.one(
        "qr_machines",
        "gauge",
        "Machines connected (the local builder included).",
        machines.len() as f64,
    );
    p.one(
        "qr_machines_in_use",
        "gauge",
        "Machines running at least one job.",
        machines.iter().filter(|m| m.running > 0).count() as f64,
    );
    p.family(
        "qr_machine_slots",
        "gauge",
        "Job slots per machine.",
        &by_machine(|m| f64::from(m.max_jobs)),
    );
    p.family(
        "qr_machine_slots_busy",
        "gauge",
        "Busy job slots per machine.",
        &by_machine(|m| f64::from(m.running)),
    );
    p.family(
        "qr_machine_enabled",
        "gauge",
        "1 if the machine takes new jobs.",
        &by_machine(|m| f64::from(u8::from(m.enabled))),
    );
    p.family(
        "qr_machine_heartbeat_age_seconds",
        "gauge",
        "Seconds since the machine's last heartbeat (0 for the local builder).",
        &machines
            .iter()
            .filter(|m| m.last_heartbeat_ms != 0)
            .map(|m| (labels(&[("machine", &m.id)]), m.heartbeat_age_s))
            .collect::<Vec<_>>(),
    );
    p.family(
        "qr_machine_last_heartbeat_timestamp_seconds",
        "gauge",
        "When the machine last gave a sign of life (unix seconds).",
        &machines
            .iter()
            .filter(|m| m.last_heartbeat_ms != 0)
            .map(|m| {
                (
                    labels(&[("machine", &m.id)]),
                    m.last_heartbeat_ms as f64 / 1000.0,
                )
            })
            .collect::<Vec<_>>(),
    );
    p.family(
        "qr_machine_load",
        "gauge",
        "The builder's load average from its last heartbeat.",
        &by_machine(|m| m.load),
    );
    p.family(
        "qr_machine_free_disk_bytes",
        "gauge",
        "The builder's free disk from its last heartbeat.",
        &by_machine(|m| m.free_disk_bytes as f64),
    );

    // Machines (every one seen since start): jobs, time, bytes.
    let seen = g.machines.snapshot();
    let per = |f: &dyn Fn(&crate::metrics::MachineCounters) -> f64| -> Vec<(String, f64)> {
        seen.iter().map(|(l, m)| (l.clone(), f(m))).collect()
    };
    p.family(
        "qr_machine_jobs_started_total",
        "counter",
        "Jobs a machine took.",
        &per(&|m| m.jobs_started.get() as f64),
    );
    p.family(
        "qr_machine_steps_done_total",
        "counter",
        "Jobs a machine ended with an outcome (built or failed; aborted ones not included).",
        &per(&|m| m.jobs_done.get() as f64),
    );
    p.family(
        "qr_machine_step_failures_total",
        "counter",
        "Jobs a machine ended failed (including those lost with its session).",
        &per(&|m| m.jobs_failed.get() as f64),
    );
    p.family(
        "qr_machine_jobs_aborted_total",
        "counter",
        "Jobs on a machine the runner aborted (no longer wanted) before they ended.",
        &per(&|m| m.jobs_aborted.get() as f64),
    );
    p.family(
        "qr_machine_consecutive_failures",
        "gauge",
        "Failed jobs on a machine since its last success.",
        &per(&|m| m.consecutive_failures.load(Ordering::Relaxed) as f64),
    );
    p.family(
        "qr_machine_running_jobs",
        "gauge",
        "Jobs running on a machine now, as its job timers count them.",
        &per(&|m| m.running.load(Ordering::Relaxed) as f64),
    );
    p.family(
        "qr_machine_busy_seconds_total",
        "counter",
        "Time with a job on a machine, summed over its jobs.",
        &per(&|m| m.busy_micros.seconds()),
    );
    let mut phase_samples = Vec::new();
    for (l, m) in &seen {
        for ph in PHASES {
            phase_samples.push((
                format!("{l},{}", labels(&[("phase", ph.as_str())])),
                m.phase_micros[ph as usize].seconds(),
            ));
        }
    }
    p.family(
        "qr_machine_phase_seconds_total",
        "counter",
        "Time a machine's jobs spent per phase (preparing, building, receiving_outputs).",
        &phase_samples,
    );
    p.family(
        "qr_machine_idle_since_timestamp_seconds",
        "gauge",
        "When the machine's last job ended (unix seconds), if it has none now; 0 while busy.",
        &seen
            .iter()
            .filter_map(|(l, m)| {
                let end = m.last_job_end_ms.load(Ordering::Relaxed);
                if m.running.load(Ordering::Relaxed) > 0 {
                    Some((l.clone(), 0.0))
                } else {
                    (end > 0).then(|| (l.clone(), end as f64 / 1000.0))
                }
            })
            .collect::<Vec<_>>(),
    );
    p.family(
        "qr_machine_nar_bytes_received_total",
        "counter",
        "NAR bytes uploaded by a remote builder (its outputs): bytes in.",
        &per(&|m| m.bytes_in.get() as f64),
    );
    p.family(
        "qr_machine_nar_bytes_sent_total",
        "counter",
        "NAR bytes a remote builder fetched from the runner (its inputs): bytes out.",
        &per(&|m| m.bytes_out.get() as f64),
    );
    p.family(
        "qr_machine_nars_received_total",
        "counter",
        "NARs a remote builder uploaded and the runner accepted.",
        &per(&|m| m.nars_in.get() as f64),
    );
    p.family(
        "qr_machine_nars_sent_total",
        "counter",
        "NAR fetches a remote builder started.",
        &per(&|m| m.nars_out.get() as f64),
    );
    p.family(
        "qr_machine_sessions_total",
        "counter",
        "Sessions a remote builder opened (joins and rejoins).",
        &per(&|m| m.sessions.get() as f64),
    );
    p.family(
        "qr_machine_refusals_total",
        "counter",
        "Times the runner refused what a remote builder sent (it was quarantined).",
        &per(&|m| m.refusals.get() as f64),
    );

    // The binary cache.
    let cm = &g.cache;
    let requests = counters(&cm.requests);
    p.family(
        "qr_cache_requests_total",
        "counter",
        "Binary cache requests by kind (cache_info, narinfo, nar, log, realisation, other) and \
         result (hit, miss, error).",
        &requests,
    );
    p.family(
        "qr_cache_response_bytes_total",
        "counter",
        "Binary cache response body bytes sent, by kind.",
        &counters(&cm.bytes),
    );
    let narinfo = |result: &str| -> f64 {
        let key = labels(&[("kind", "narinfo"), ("result", result)]);
        requests
            .iter()
            .filter(|(l, _)| *l == key)
            .map(|(_, v)| v)
            .sum()
    };
    let (hits, misses) = (narinfo("hit"), narinfo("miss"));
    p.family(
        "qr_cache_narinfo_hit_ratio",
        "gauge",
        "Narinfo requests answered, of those answered or missed, since start (no sample before \
         the first).",
        &if hits + misses > 0.0 {
            vec![(String::new(), hits / (hits + misses))]
        } else {
            vec![]
        },
    );
    p.one(
        "qr_cache_nar_compressions_total",
        "counter",
        "NARs compressed (for serving, or for the file:// upload).",
        cm.compressions.get() as f64,
    );
    p.one(
        "qr_cache_nar_compression_input_bytes_total",
        "counter",
        "NAR bytes compressed.",
        cm.compression_in_bytes.get() as f64,
    );
    p.one(
        "qr_cache_nar_compression_output_bytes_total",
        "counter",
        "Compressed bytes written.",
        cm.compression_out_bytes.get() as f64,
    );
    p.one(
        "qr_cache_nar_compression_seconds_total",
        "counter",
        "Time spent compressing NARs.",
        cm.compression_micros.seconds(),
    );
    let (cin, cout, csec) = (
        cm.compression_in_bytes.get() as f64,
        cm.compression_out_bytes.get() as f64,
        cm.compression_micros.seconds(),
    );
    p.family(
        "qr_cache_nar_compression_savings_ratio",
        "gauge",
        "1 - compressed/uncompressed bytes since start (no sample before the first compression).",
        &if cin > 0.0 {
            vec![(String::new(), 1.0 - cout / cin)]
        } else {
            vec![]
        },
    );
    p.family(
        "qr_cache_nar_compression_speed_bytes_per_second",
        "gauge",
        "NAR bytes compressed per second of compression since start.",
        &if csec > 0.0 {
            vec![(String::new(), cin / csec)]
        } else {
            vec![]
        },
    );
    p.family(
        "qr_cache_upload_passes_total",
        "counter",
        "Passes of the [cache] upload (file://) publisher, by result.",
        &counters(&cm.upload_passes),
    );
    p.one(
        "qr_cache_upload_paths_total",
        "counter",
        "Store paths written to the upload directory (NAR and narinfo).",
        cm.upload_paths.get() as f64,
    );
    p.one(
        "qr_cache_upload_skipped_total",
        "counter",
        "Store paths found in the upload directory already (not written again).",
        cm.upload_skipped.get() as f64,
    );
    p.one(
        "qr_cache_upload_realisations_total",
        "counter",
        "Realisations written to the upload directory.",
        cm.upload_realisations.get() as f64,
    );
    p.one(
        "qr_cache_upload_logs_total",
        "counter",
        "Build logs written to the upload directory.",
        cm.upload_logs.get() as f64,
    );
    p.one(
        "qr_cache_upload_nar_bytes_total",
        "counter",
        "Uncompressed NAR bytes written to the upload directory.",
        cm.upload_nar_bytes.get() as f64,
    );
    p.one(
        "qr_cache_upload_file_bytes_total",
        "counter",
        "NAR file bytes (as compressed) written to the upload directory.",
        cm.upload_file_bytes.get() as f64,
    );

    // Evaluations.
    let ev = |f: fn(&crate::db::EvalCounts) -> u64| -> Vec<(String, f64)> {
        evals.iter().map(|e| (String::new(), f(e) as f64)).collect()
    };
    p.family(
        "qr_evaluations_total",
        "counter",
        "Evaluations recorded (qr submit --eval-jobs), read from the database at each scrape.",
        &ev(|e| e.evals),
    );
    p.family(
        "qr_evaluation_errors_total",
        "counter",
        "Evaluator lines that queued nothing (errors), recorded with their evaluations.",
        &ev(|e| e.errors),
    );
    p.family(
        "qr_evaluation_jobs_total",
        "counter",
        "Jobs of the evaluations recorded.",
        &ev(|e| e.jobs),
    );
    p.family(
        "qr_evaluation_new_builds_total",
        "counter",
        "Jobs whose build their evaluation queued (the others joined existing builds).",
        &ev(|e| e.new_builds),
    );

    // The database.
    let backend = match db.backend() {
        crate::db::Backend::Sqlite => "sqlite",
        crate::db::Backend::Postgres => "postgres",
    };
    let mut tx = Vec::new();
    let mut failures = Vec::new();
    for kind in [crate::db::TxKind::Read, crate::db::TxKind::Write] {
        let h = db.transaction_timings().of(kind).snapshot();
        let l = labels(&[("backend", backend), ("kind", kind.as_str())]);
        failures.push((l.clone(), db.transaction_timings().failures(kind) as f64));
        tx.push((
            l,
            HistogramSnapshot {
                buckets: h.buckets,
                sum: h.sum,
                count: h.count,
            },
        ));
    }
    p.histogram(
        "qr_db_transaction_seconds",
        "Database operation latency per attempt (pool wait to commit), by kind.",
        &tx,
    );
    p.family(
        "qr_db_operation_failures_total",
        "counter",
        "Database operations that failed for good (after their retries), by kind.",
        &failures,
    );
    p.one(
        "qr_db_write_transactions_total",
        "counter",
        "Write transactions committed.",
        db.write_transactions() as f64,
    );
    p.one(
        "qr_db_write_failures_total",
        "counter",
        "Database writes that failed for good (each failed its step or build, or is logged).",
        c(&env.stats.db_write_failures),
    );
    let pool = db.pool_stats();
    p.family(
        "qr_db_pool_connections",
        "gauge",
        "Connections of the database pool, by state (idle, in_use).",
        &[
            (labels(&[("state", "idle")]), f64::from(pool.idle)),
            (labels(&[("state", "in_use")]), f64::from(pool.in_use())),
        ],
    );
    p.one(
        "qr_db_pool_max_connections",
        "gauge",
        "The pool's size limit ([database] max_connections).",
        f64::from(pool.max),
    );
    p.one(
        "qr_db_pool_saturation_ratio",
        "gauge",
        "Connections in use over the pool's limit (1: every operation waits for a connection).",
        if pool.max > 0 {
            f64::from(pool.in_use()) / f64::from(pool.max)
        } else {
            0.0
        },
    );

    // The actors and the runner's own bookkeeping.
    let mut by_kind: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
    for cell in env.actors.cells() {
        let e = by_kind.entry(cell.kind.as_str()).or_default();
        e.0 += 1;
        if cell.is_blocked() {
            e.1 += 1;
        }
    }
    p.one(
        "qr_actors",
        "gauge",
        "Live actors.",
        env.actors.len() as f64,
    );
    p.family(
        "qr_actors_by_kind",
        "gauge",
        "Live actors by kind.",
        &by_kind
            .iter()
            .map(|(k, (n, _))| (labels(&[("kind", k)]), *n as f64))
            .collect::<Vec<_>>(),
    );
    p.family(
        "qr_actors_blocked",
        "gauge",
        "Live actors whose mailbox waits on their database or store I/O, by kind.",
        &by_kind
            .iter()
            .map(|(k, (_, b))| (labels(&[("kind", k)]), *b as f64))
            .collect::<Vec<_>>(),
    );
    p.one(
        "qr_actor_restarts_total",
        "counter",
        "Supervised actor restarts.",
        c(&env.stats.actor_restarts),
    );
    p.one(
        "qr_gauge_underflows_total",
        "counter",
        "Gauge decrements below 0 (a bookkeeping bug; each is logged as an error).",
        c(&env.stats.gauge_underflows),
    );
    p.one(
        "qr_executor_runs_total",
        "counter",
        "Successful executor runs.",
        env.stats.runs.total() as f64,
    );
    p.one(
        "qr_executor_reruns_total",
        "counter",
        "Executor runs of a drv already run recently (among the last 65536 drvs).",
        env.stats.runs.reruns() as f64,
    );
    Ok(p.finish())
}

/// The kind of a binary cache request, from its path.
fn cache_kind(path: &str) -> &'static str {
    if path == "/nix-cache-info" {
        "cache_info"
    } else if path.starts_with("/nar/") {
        "nar"
    } else if path.starts_with("/log/") {
        "log"
    } else if path.starts_with("/realisations/") || path.starts_with("/build-trace-v2/") {
        "realisation"
    } else if path.ends_with(".narinfo") {
        "narinfo"
    } else {
        "other"
    }
}

/// Middleware on the binary cache's routes: counts each request by kind and result, and the body
/// bytes as they are sent (a client that goes away mid-NAR counts what it got).
pub async fn count_cache(req: Request, next: Next) -> Response {
    let kind = cache_kind(req.uri().path());
    let head = req.method() == Method::HEAD;
    let res = next.run(req).await;
    let result = match res.status() {
        s if s.is_success() => "hit",
        StatusCode::NOT_FOUND => "miss",
        _ => "error",
    };
    let m = &global().cache;
    m.requests.with(&[("kind", kind), ("result", result)]).inc();
    if head {
        return res;
    }
    let bytes = m.bytes.with(&[("kind", kind)]);
    let (mut parts, body) = res.into_parts();
    // A counted body has no size of its own: keep the length the client is told.
    if let Some(n) = body.size_hint().exact()
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        parts.headers.insert(header::CONTENT_LENGTH, n.into());
    }
    let counted = body.into_data_stream().map(move |c| {
        if let Ok(b) = &c {
            bytes.add(b.len() as u64);
        }
        c
    });
    Response::from_parts(parts, Body::from_stream(counted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_kinds_by_path() {
        for (p, k) in [
            ("/nix-cache-info", "cache_info"),
            ("/0a7vq5hmgmp4r1pqy7r6g4qdq9w2j1d1.narinfo", "narinfo"),
            ("/nar/abc.nar.zst", "nar"),
            ("/log/x.drv", "log"),
            ("/realisations/sha256:x!out.doi", "realisation"),
            ("/build-trace-v2/x.drv/out.doi", "realisation"),
            ("/favicon.ico", "other"),
        ] {
            assert_eq!(cache_kind(p), k, "{p}");
        }
    }

    #[test]
    fn machine_types_split_back() {
        assert_eq!(
            split_type("x86_64-linux"),
            ("x86_64-linux", BTreeSet::new())
        );
        let (s, f) = split_type("x86_64-linux:big-parallel,kvm");
        assert_eq!(s, "x86_64-linux");
        assert_eq!(
            f.into_iter().collect::<Vec<_>>(),
            vec!["big-parallel".to_string(), "kvm".to_string()]
        );
    }
}
