//! HTTP for operators (`[http] listen`): the supervision dashboard (static HTML+JS embedded in the
//! binary), JSON endpoints backed by the admin service's functions ([`Admin`]), a server-sent
//! event stream, `/status` (JSON) and `/metrics` (Prometheus text format); and, at the root beside
//! them, the Nix binary cache ([`cache`]) when `[cache] enabled`.
//!
//! Everything here is read-only, so it needs no token; actions go through the token-protected
//! gRPC admin service (`qr admin …`).

pub mod actor_tree;
pub mod cache;
pub mod log_tail;
pub mod machine_load;
pub mod metrics;
pub mod step_tree;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{Stream, StreamExt};

use crate::grpc::admin::Admin;

/// The dashboard page, its script and its style sheet.
const DASHBOARD: &str = include_str!("dashboard.html");
const DASHBOARD_JS: &str = include_str!("dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard.css");

/// Counters only the web side keeps (scrapes), besides the actors' `Stats`.
#[derive(Default)]
struct WebStats {
    scrapes: AtomicU64,
}

#[derive(Clone)]
struct AppState {
    admin: Admin,
    stats: Arc<WebStats>,
    machine_history: machine_load::SharedMachineHistory,
}

/// The router. Inside a tokio runtime whose runner keeps a history (`[http]
/// history_interval_s`), it also starts sampling the machines' load at that interval
/// ([`machine_load`]).
pub fn router(admin: Admin) -> Router {
    let h = admin.history(i64::MAX);
    let machine_history = Arc::new(std::sync::Mutex::new(machine_load::MachineHistory::new(
        std::time::Duration::from_secs_f64(h.interval_s.max(0.001)),
        std::time::Duration::from_secs_f64(h.window_s.max(0.0)),
    )));
    if h.interval_s > 0.0 && tokio::runtime::Handle::try_current().is_ok() {
        machine_load::spawn_sampler(admin.clone(), machine_history.clone());
    }
    let state = AppState {
        admin,
        stats: Arc::default(),
        machine_history,
    };
    Router::new()
        .route("/", get(dashboard))
        .route("/dashboard.js", get(dashboard_js))
        .route("/dashboard.css", get(dashboard_css))
        .route("/api/builds/{id}/tree", get(build_tree))
        .route("/api/builds/{id}/steps/{nr}/log/follow", get(follow_log))
        .route("/api/actors/tree", get(actors_tree))
        .route("/api/machines/history", get(machines_history))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/api/builds", get(builds))
        .route("/api/builds/{id}", get(build))
        .route("/api/builds/{id}/steps/{nr}", get(step))
        .route("/api/builds/{id}/steps/{nr}/log", get(log))
        .route("/api/actors", get(actors))
        .route("/api/machines", get(machines))
        .route("/api/history", get(history))
        .route("/api/evals", get(evals))
        .route("/api/evals/{id}", get(eval))
        .route("/api/events", get(events))
        .route("/api/settle/{ms}", get(settle))
        .with_state(state)
}

/// Serves until the task is dropped; with the binary cache's routes when `cache` is given.
pub async fn serve(
    listener: tokio::net::TcpListener,
    admin: Admin,
    cache: Option<Arc<crate::cache::Cache>>,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    let mut app = router(admin);
    if let Some(c) = cache {
        app = app.merge(cache::router(c).layer(axum::middleware::from_fn(metrics::count_cache)));
    }
    // Without TCP_NODELAY a response written in two parts (head, then body) waits for the
    // client's delayed ACK: about 40 ms per request, which dominates a substitution of many
    // small paths.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY on an HTTP connection");
        }
    });
    axum::serve(listener, app).await
}

fn json<T: serde::Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// A gRPC status as an HTTP error.
fn error(s: tonic::Status) -> Response {
    let code = match s.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, s.message().to_string()).into_response()
}

fn answer<T: serde::Serialize>(r: Result<T, tonic::Status>) -> Response {
    match r {
        Ok(v) => json(&v),
        Err(s) => error(s),
    }
}

async fn dashboard() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        DASHBOARD,
    )
        .into_response()
}

async fn dashboard_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        DASHBOARD_JS,
    )
        .into_response()
}

async fn dashboard_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        DASHBOARD_CSS,
    )
        .into_response()
}

/// A build's steps with their links ([`step_tree`]).
async fn build_tree(State(s): State<AppState>, Path(id): Path<i64>) -> Response {
    answer(
        s.admin
            .get_build(id)
            .await
            .map(|d| step_tree::step_tree(d.build, d.steps, &d.produced)),
    )
}

/// The live log of a step ([`log_tail`]); a reconnecting `EventSource`'s `Last-Event-ID` is the
/// byte offset to go on from.
async fn follow_log(
    State(s): State<AppState>,
    Path((id, nr)): Path<(i64, i32)>,
    headers: axum::http::HeaderMap,
) -> Response {
    let from = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    // Refuse what cannot be followed before the stream starts (as a status, not an event).
    if let Err(e) = s.admin.get_step(id, nr).await {
        return error(e);
    }
    log_tail::follow(s.admin, id, nr, from).into_response()
}

/// The supervision tree as the page shows it ([`actor_tree`]).
async fn actors_tree(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<actor_tree::TreeQuery>,
) -> Response {
    let actors = match s.admin.actors("") {
        Ok(a) => a.actors,
        Err(e) => return error(e),
    };
    let q = actor_tree::TreeQuery {
        page: q.page.clamp(1, 1000),
        max_matches: q.max_matches.clamp(1, 1000),
        ..q
    };
    match tokio::task::spawn_blocking(move || actor_tree::tree(&actors, &q)).await {
        Ok(t) => json(&t),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn machines_history(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<HistoryQuery>,
) -> Response {
    let h = s
        .machine_history
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .answer(q.after_ms);
    // No runner history: no samples either (the page says so).
    if s.admin.history(i64::MAX).interval_s == 0.0 {
        return json(&machine_load::LoadAnswer {
            interval_s: 0.0,
            ..h
        });
    }
    json(&h)
}

/// Answers after `ms` milliseconds (at most 10 s): the dashboard loads it when opened with
/// `?settle=MS`, which holds the page's load event back while it renders live data, so a headless
/// browser's `--dump-dom` or `--screenshot` (taken at load) shows the page after MS of real time.
async fn settle(Path(ms): Path<u64>) -> Response {
    tokio::time::sleep(std::time::Duration::from_millis(ms.min(10_000))).await;
    ([(header::CONTENT_TYPE, "text/css")], "").into_response()
}

async fn status(State(s): State<AppState>) -> Response {
    answer(s.admin.status().await)
}

async fn builds(State(s): State<AppState>) -> Response {
    answer(
        s.admin
            .list_builds(crate::grpc::admin::admin_v1::ListBuildsRequest {
                limit: 50,
                unfinished_only: false,
            })
            .await,
    )
}

async fn build(State(s): State<AppState>, Path(id): Path<i64>) -> Response {
    answer(s.admin.get_build(id).await)
}

async fn step(State(s): State<AppState>, Path((id, nr)): Path<(i64, i32)>) -> Response {
    answer(s.admin.get_step(id, nr).await)
}

async fn log(State(s): State<AppState>, Path((id, nr)): Path<(i64, i32)>) -> Response {
    answer(
        s.admin
            .log(crate::grpc::admin::admin_v1::GetLogRequest {
                build: id,
                stepnr: nr,
                tail_lines: 0,
            })
            .await,
    )
}

async fn evals(State(s): State<AppState>) -> Response {
    answer(
        s.admin
            .list_evals(crate::grpc::admin::admin_v1::ListEvalsRequest { limit: 50 })
            .await,
    )
}

async fn eval(State(s): State<AppState>, Path(id): Path<i64>) -> Response {
    answer(s.admin.get_eval(id).await)
}

async fn actors(State(s): State<AppState>) -> Response {
    answer(s.admin.actors(""))
}

async fn machines(State(s): State<AppState>) -> Response {
    answer(
        s.admin
            .machines()
            .await
            .map(|machines| crate::grpc::admin::admin_v1::ListMachinesResponse { machines }),
    )
}

#[derive(serde::Deserialize)]
struct HistoryQuery {
    /// Only samples after this unix time in milliseconds.
    #[serde(default)]
    after_ms: i64,
}

async fn history(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<HistoryQuery>,
) -> Response {
    json(&s.admin.history(q.after_ms))
}

async fn events(
    State(s): State<AppState>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = s.admin.events().map(|e| {
        Ok(SseEvent::default()
            .event("sched")
            .data(serde_json::to_string(&e).unwrap_or_default()))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn metrics(State(s): State<AppState>) -> Response {
    let scrapes = s.stats.scrapes.fetch_add(1, Ordering::Relaxed) + 1;
    match metrics::render(&s.admin, scrapes).await {
        Ok(page) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            page,
        )
            .into_response(),
        Err(e) => error(e),
    }
}
