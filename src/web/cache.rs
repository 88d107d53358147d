//! The binary cache over HTTP, at the root of `[http] listen` beside the dashboard: Nix's
//! substituter URL is `http://HOST:PORT`. Routes: `/nix-cache-info`, `/<hash>.narinfo`,
//! `/nar/<file hash>.nar[.zst|.xz]`, `/log/<drv base name>`, `/realisations/<id>.doi` (Nix ≤ 2.34)
//! and `/build-trace-v2/<drv base name>/<output>.doi` (Nix ≥ 2.35). Anything else is a 404, which
//! Nix takes as "not in this cache". `HEAD` answers the same headers without a body.
//!
//! NARs are streamed: an uncompressed one is exported from the store by a blocking thread into a
//! bounded channel, a compressed one is read from its file the same way; a client that goes away
//! closes the channel and the thread stops at its next chunk.

use std::io::{self, Write};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::mpsc;

use crate::cache::source::NarSource;
use crate::cache::{Cache, CacheError};
use crate::store::Store;

/// Bytes per chunk of a streamed NAR.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the blocking reader and the connection.
const CHANNEL: usize = 4;

/// The cache's routes (merged into the dashboard's router).
pub fn router(cache: Arc<Cache>) -> Router {
    Router::new()
        .route("/nix-cache-info", get(cache_info))
        .route("/{file}", get(narinfo))
        .route("/nar/{file}", get(nar))
        .route("/log/{drv}", get(log))
        .route("/realisations/{file}", get(realisation))
        .route("/build-trace-v2/{drv}/{file}", get(build_trace))
        .with_state(cache)
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not in this cache\n").into_response()
}

fn failed(what: &str, e: &CacheError) -> Response {
    tracing::error!(request = what, error = %e, "binary cache request failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("cannot answer {what}: {e}\n"),
    )
        .into_response()
}

fn text(ctype: &'static str, body: impl Into<Body>) -> Response {
    ([(header::CONTENT_TYPE, ctype)], body.into()).into_response()
}

async fn cache_info(State(c): State<Arc<Cache>>) -> Response {
    text("text/x-nix-cache-info", c.cache_info())
}

async fn narinfo(State(c): State<Arc<Cache>>, Path(file): Path<String>) -> Response {
    let Some(hash) = file.strip_suffix(".narinfo") else {
        return not_found();
    };
    match c.narinfo(hash).await {
        Ok(Some(t)) => text("text/x-nix-narinfo", t),
        Ok(None) => not_found(),
        Err(e) => failed(&file, &e),
    }
}

async fn realisation(State(c): State<Arc<Cache>>, Path(file): Path<String>) -> Response {
    let Some(id) = file.strip_suffix(".doi") else {
        return not_found();
    };
    match c.legacy_doc(id).await {
        Ok(Some(t)) => text("application/json", t),
        Ok(None) => not_found(),
        Err(e) => failed(&file, &e),
    }
}

async fn build_trace(
    State(c): State<Arc<Cache>>,
    Path((drv, file)): Path<(String, String)>,
) -> Response {
    let Some(output) = file.strip_suffix(".doi") else {
        return not_found();
    };
    match c.build_trace_doc(&drv, output).await {
        Ok(Some(t)) => text("application/json", t),
        Ok(None) => not_found(),
        Err(e) => failed(&file, &e),
    }
}

async fn log(State(c): State<Arc<Cache>>, Path(drv): Path<String>) -> Response {
    match c.log(&drv).await {
        Ok(Some(t)) => text("text/plain; charset=utf-8", t),
        Ok(None) => not_found(),
        Err(e) => failed(&drv, &e),
    }
}

async fn nar(State(c): State<Arc<Cache>>, method: Method, Path(file): Path<String>) -> Response {
    let src = match c.nar(&file).await {
        Ok(Some(s)) => s,
        Ok(None) => return not_found(),
        Err(e) => return failed(&file, &e),
    };
    let size = match &src {
        NarSource::Store { size, .. } | NarSource::File { size, .. } => *size,
    };
    let head = [
        (header::CONTENT_TYPE, "application/x-nix-nar".to_string()),
        (header::CONTENT_LENGTH, size.to_string()),
    ];
    if method == Method::HEAD {
        return (head, Body::empty()).into_response();
    }
    let store = c.store().clone();
    let body = stream_blocking(file.clone(), move |w| match src {
        NarSource::Store { path, .. } => store
            .export_nar(&path, w)
            .map(|_| ())
            .map_err(|e| io::Error::other(e.to_string())),
        NarSource::File { path, .. } => {
            let mut f = std::fs::File::open(&path)?;
            io::copy(&mut f, w).map(|_| ())
        }
    });
    (head, body).into_response()
}

/// A body fed by `produce` writing on a blocking thread through a bounded channel. When the
/// client goes away the channel closes, the next write fails and `produce` stops; when `produce`
/// fails the body ends with an error (the connection is cut, so no client takes a truncated NAR
/// for a whole one).
fn stream_blocking(
    what: String,
    produce: impl FnOnce(&mut dyn Write) -> io::Result<()> + Send + 'static,
) -> Body {
    let (tx, rx) = mpsc::channel::<io::Result<Vec<u8>>>(CHANNEL);
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        let r = produce(&mut w).and_then(|()| w.send());
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                tracing::info!(file = %what, "NAR download ended by the client");
            }
            Err(e) => {
                tracing::error!(file = %what, error = %e, "NAR stream failed");
                // The receiver may be gone too; then nobody is left to tell.
                let _ = tx.blocking_send(Err(e));
            }
        }
    });
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}

struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// A client that reads a little of a NAR and goes away stops the producing thread at its
    /// next chunk, having produced only what the bounded channel holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_going_away_stops_the_producer() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let body = stream_blocking("test".into(), move |w| {
            let chunk = vec![7u8; 64 * 1024];
            let mut written: u64 = 0;
            let r = loop {
                if let Err(e) = w.write_all(&chunk) {
                    break Err(e);
                }
                written += chunk.len() as u64;
                if written > 1 << 40 {
                    break Ok(());
                }
            };
            let kind = r.as_ref().err().map(io::Error::kind);
            done_tx.send((written, kind)).unwrap();
            r
        });
        let mut data = body.into_data_stream();
        let first = data.next().await.expect("a chunk").expect("data");
        assert_eq!(first.len(), CHUNK);
        drop(data);
        let (written, kind) = tokio::task::spawn_blocking(move || {
            done_rx.recv_timeout(std::time::Duration::from_secs(10))
        })
        .await
        .unwrap()
        .expect("the producer stopped");
        assert_eq!(kind, Some(io::ErrorKind::BrokenPipe));
        assert!(
            written <= ((CHANNEL + 2) * CHUNK) as u64,
            "produced {written} bytes for a client that read one chunk"
        );
    }

    /// A producer that fails ends the body with an error, not with a clean end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_producer_ends_the_body_with_an_error() {
        let body = stream_blocking("test".into(), |w| {
            w.write_all(&[1u8; 1000])?;
            Err(io::Error::other("disk on fire"))
        });
        let items: Vec<_> = body.into_data_stream().collect().await;
        assert!(items.iter().any(|i| i.is_err()), "{items:?}");
    }
}
