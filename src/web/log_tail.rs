//! The live log of a step (`/api/builds/{id}/steps/{n}/log/follow`): server-sent events carrying
//! the log file's tail and then every part appended to it, until the step has finished and its
//! file stopped growing.
//!
//! The file is the one `GetLog` names ([`Admin::log`]): the local builder writes it as the build
//! runs, and a remote builder's log is appended by `StreamLog` as its chunks arrive, so following
//! the file follows the build wherever it runs. While the step has not written a log of its own
//! yet (it waits for a machine) the stream waits for one; a finished step without one gets the
//! newest log of its drv, as `GetLog` answers.
//!
//! Events: `state` (`{status_name, finished, file, exact}`, when it changes), `log` (`{text}`,
//! with the byte offset after it as the event id), `end` (then the stream closes; the page stops
//! its `EventSource`, which would otherwise reconnect). A reconnecting `EventSource` sends the
//! last id it saw (`Last-Event-ID`) and the stream continues from that offset.

use std::convert::Infallible;
use std::io::SeekFrom;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use crate::grpc::admin::Admin;
use crate::grpc::admin::admin_v1::GetLogRequest;

/// The first event carries at most this much of the file's end.
pub const TAIL_BYTES: u64 = 64 << 10;
/// How often the file is read for new data.
const READ_EVERY: Duration = Duration::from_millis(200);
/// How often the step's row is read to learn whether it finished.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// Largest `log` event.
const CHUNK: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error("{0}")]
    Admin(#[from] tonic::Status),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The page went away.
    #[error("the client is gone")]
    Gone,
}

/// The SSE response following step `nr` of `build`, from byte `from` (a reconnect's
/// `Last-Event-ID`) or the tail.
pub fn follow(
    admin: Admin,
    build: i64,
    nr: i32,
    from: Option<u64>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel::<Event>(16);
    tokio::spawn(async move {
        match run(&admin, build, nr, from, &tx).await {
            Ok(()) | Err(FollowError::Gone) => {}
            Err(e) => {
                tracing::debug!(build, step = nr, error = %e, "log follow ended with an error");
                let data = serde_json::json!({ "error": e.to_string() }).to_string();
                // The page may have gone meanwhile; nothing else is to be done then.
                if tx
                    .send(Event::default().event("end").data(data))
                    .await
                    .is_err()
                {
                    tracing::debug!(build, step = nr, "the page left before the end event");
                }
            }
        }
    });
    let stream =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn send(tx: &mpsc::Sender<Event>, e: Event) -> Result<(), FollowError> {
    tx.send(e).await.map_err(|_| FollowError::Gone)
}

fn json_event(kind: &str, v: serde_json::Value) -> Event {
    Event::default().event(kind).data(v.to_string())
}

/// The step's status: (name, finished).
async fn status(admin: &Admin, build: i64, nr: i32) -> Result<(String, bool), FollowError> {
    let d = admin.get_step(build, nr).await?;
    let s = d.step.unwrap_or_default();
    Ok((s.status_name, s.status != -1))
}

/// The longest prefix of `buf` that ends a line (all of it past [`CHUNK`] or at the end), as
/// text, and its length in bytes.
fn take_text(buf: &mut Vec<u8>, all: bool) -> Option<(String, usize)> {
    let cut = if all || buf.len() >= CHUNK {
        buf.len()
    } else {
        buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
    };
    if cut == 0 {
        return None;
    }
    let rest = buf.split_off(cut);
    let text = String::from_utf8_lossy(buf).into_owned();
    *buf = rest;
    Some((text, cut))
}

async fn run(
    admin: &Admin,
    build: i64,
    nr: i32,
    from: Option<u64>,
    tx: &mpsc::Sender<Event>,
) -> Result<(), FollowError> {
    // Wait for the step's own log (or, once it finished, any log of its drv).
    let mut last_state = None;
    let (file, exact) = loop {
        let (name, finished) = status(admin, build, nr).await?;
        let log = admin
            .log(GetLogRequest {
                build,
                stepnr: nr,
                tail_lines: 1,
            })
            .await;
        let found = match log {
            Ok(l) if l.exact || finished => Some((l.file, l.exact)),
            Ok(_) => None,
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => return Err(s.into()),
        };
        let state = (name.clone(), finished, found.clone());
        if last_state.as_ref() != Some(&state) {
            let (file, exact) = found.clone().unwrap_or_default();
            send(
                tx,
                json_event(
                    "state",
                    serde_json::json!({"status_name": name, "finished": finished, "file": file, "exact": exact}),
                ),
            )
            .await?;
            last_state = Some(state);
        }
        match found {
            Some(f) => break f,
            None if finished => {
                send(
                    tx,
                    json_event("end", serde_json::json!({"reason": "no log"})),
                )
                .await?;
                return Ok(());
            }
            None if tx.is_closed() => return Err(FollowError::Gone),
            None => tokio::time::sleep(STATUS_EVERY).await,
        }
    };
    let io = |source| FollowError::Io {
        path: file.clone(),
        source,
    };
    if file.ends_with(".gz") {
        // Finished and compressed: it no longer grows.
        let path = std::path::PathBuf::from(&file);
        let bytes = tokio::task::spawn_blocking(move || crate::grpc::admin::read_log(&path))
            .await
            .map_err(|e| io(std::io::Error::other(e)))?
            .map_err(io)?;
        let start = match from {
            Some(f) => (f as usize).min(bytes.len()),
            None => bytes.len().saturating_sub(TAIL_BYTES as usize),
        };
        let text = String::from_utf8_lossy(&bytes[start..]).into_owned();
        send(
            tx,
            json_event(
                "log",
                serde_json::json!({"text": text, "truncated": start > 0 && from.is_none()}),
            )
            .id(bytes.len().to_string()),
        )
        .await?;
        send(
            tx,
            json_event("end", serde_json::json!({"reason": "finished"})),
        )
        .await?;
        return Ok(());
    }
    let mut f = tokio::fs::File::open(&file).await.map_err(io)?;
    let len = f.metadata().await.map_err(io)?.len();
    let mut offset = match from {
        Some(o) => o.min(len),
        None => len.saturating_sub(TAIL_BYTES),
    };
    let truncated = offset > 0 && from.is_none();
    f.seek(SeekFrom::Start(offset)).await.map_err(io)?;
    let mut buf: Vec<u8> = Vec::new();
    if truncated {
        // Start at a line.
        let mut head = vec![0u8; 4096.min(TAIL_BYTES as usize)];
        let n = f.read(&mut head).await.map_err(io)?;
        head.truncate(n);
        match head.iter().position(|&b| b == b'\n') {
            Some(i) => {
                offset += i as u64 + 1;
                buf.extend_from_slice(&head[i + 1..]);
            }
            None => buf.extend_from_slice(&head),
        }
    }
    let mut sent_first = false;
    let mut last_status = tokio::time::Instant::now();
    let mut finished = last_state.as_ref().is_some_and(|s| s.1);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        // Read what is there.
        let mut grew = false;
        loop {
            let n = f.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                break;
            }
            grew = true;
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() >= CHUNK {
                break;
            }
        }
        let at_end = !grew && finished;
        if let Some((text, bytes)) = take_text(&mut buf, at_end) {
            offset += bytes as u64;
            let first = !sent_first;
            sent_first = true;
            send(
                tx,
                json_event(
                    "log",
                    serde_json::json!({"text": text, "truncated": first && truncated}),
                )
                .id(offset.to_string()),
            )
            .await?;
        }
        if at_end {
            let (name, _) = status(admin, build, nr).await?;
            send(
                tx,
                json_event(
                    "end",
                    serde_json::json!({"reason": "finished", "status_name": name}),
                ),
            )
            .await?;
            return Ok(());
        }
        if !grew {
            if tx.is_closed() {
                return Err(FollowError::Gone);
            }
            if last_status.elapsed() >= STATUS_EVERY {
                last_status = tokio::time::Instant::now();
                let (name, done) = status(admin, build, nr).await?;
                if done {
                    // Read once more: what was written before the row finished.
                    finished = true;
                    send(
                        tx,
                        json_event(
                            "state",
                            serde_json::json!({"status_name": name, "finished": true, "file": file, "exact": exact}),
                        ),
                    )
                    .await?;
                    continue;
                }
            }
            tokio::time::sleep(READ_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_taken_up_to_the_last_whole_line() {
        let mut b = b"one\ntwo\nthr".to_vec();
        assert_eq!(take_text(&mut b, false), Some(("one\ntwo\n".into(), 8)));
        assert_eq!(b, b"thr");
        assert_eq!(take_text(&mut b, false), None);
        assert_eq!(take_text(&mut b, true), Some(("thr".into(), 3)));
        assert!(b.is_empty());
        assert_eq!(take_text(&mut b, true), None);
    }
}
