//! The tonic service builders talk to: sessions, NAR transfer both ways, logs.

use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;

use actix::Addr;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::clip::clip_status;
use super::hub::{BuilderHub, Join, Lookup, LookupMachine, RemoteSettings};
use super::info_from_proto;
use super::nar::{ChunkReader, export};
use super::remote_machine::{
    CheckUpload, Disconnected, FromBuilder, JobAttempt, Refuse, RemoteMachine, UploadDone,
};
use super::runner_v1::runner_service_server::RunnerService;
use super::runner_v1::{
    BuilderMessage, DescribeRequest, DescribeResponse, FetchNarRequest, LogChunk, NarChunk,
    RunnerMessage, StreamLogResponse, UploadNarRequest, UploadNarResponse, builder_message,
    upload_nar_request,
};
use crate::store::{LocalStore, Store};

pub struct RunnerServiceImpl {
    hub: Addr<BuilderHub>,
    store: Arc<LocalStore>,
    settings: Arc<RemoteSettings>,
}

impl RunnerServiceImpl {
    pub fn new(hub: Addr<BuilderHub>, store: Arc<LocalStore>, settings: RemoteSettings) -> Self {
        RunnerServiceImpl {
            hub,
            store,
            settings: Arc::new(settings),
        }
    }

    async fn session(&self, id: &str) -> Result<Addr<RemoteMachine>, Status> {
        self.hub
            .send(Lookup(id.to_string()))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::permission_denied(format!("no live session {id:?}")))
    }

    /// The live session `id` and its machine's metrics.
    async fn session_counters(
        &self,
        id: &str,
    ) -> Result<(Addr<RemoteMachine>, Arc<crate::metrics::MachineCounters>), Status> {
        let (machine, addr) = self
            .hub
            .send(LookupMachine(id.to_string()))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::permission_denied(format!("no live session {id:?}")))?;
        Ok((addr, crate::metrics::global().machine(&machine)))
    }
}

fn mailbox(e: actix::MailboxError) -> Status {
    Status::unavailable(format!("the runner is shutting down: {e}"))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The longest job id a log may name (the runner's are about 30 characters).
const MAX_JOB_ID: usize = 128;

/// The file a job's log goes to: `<drv base name>.<job id>.log` (found by the admin API by its
/// prefix; compressed later to `.log.gz`). A job id of other characters than letters, digits and
/// `-`, or longer than [`MAX_JOB_ID`], is refused. When the name would exceed a file name's 255
/// bytes (a drv name can be 211 characters), the job id is replaced by as much of its hash as fits.
fn log_file_name(drv_base: &str, job_id: &str) -> Result<String, Status> {
    if job_id.is_empty()
        || job_id.len() > MAX_JOB_ID
        || !job_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(Status::invalid_argument(format!(
            "job id {:?}: 1-{MAX_JOB_ID} letters, digits and -",
            crate::store::clip(job_id)
        )));
    }
    const NAME_MAX: usize = 255;
    let room = NAME_MAX.saturating_sub(drv_base.len() + ".".len() + ".log.gz".len());
    let job = if job_id.len() <= room {
        job_id.to_string()
    } else {
        let h = crate::store::hash::to_hex(&crate::store::hash::sha256(job_id.as_bytes()));
        h[..room.min(h.len())].to_string()
    };
    Ok(format!("{drv_base}.{job}.log"))
}

#[tonic::async_trait]
impl RunnerService for RunnerServiceImpl {
    type SessionStream = BoxStream<RunnerMessage>;
    type FetchNarStream = BoxStream<NarChunk>;

    async fn session(
        &self,
        request: Request<Streaming<BuilderMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the session closed before joining"))?;
        let Some(builder_message::Msg::Join(join)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be a join"));
        };
        let (tx, rx) = mpsc::channel(256);
        let session = self
            .hub
            .send(Join {
                join,
                tx,
                peer: peer.clone(),
            })
            .await
            .map_err(mailbox)??;
        let addr = session.addr.clone();
        tokio::spawn(async move {
            let why = loop {
                match inbound.message().await {
                    // Waits for room in the actor's mailbox: a builder that sends faster than
                    // its messages are handled is slowed down, none of its messages is dropped.
                    Ok(Some(m)) => {
                        if addr.send(FromBuilder(m)).await.is_err() {
                            break "the session actor stopped".to_string();
                        }
                    }
                    Ok(None) => break "the builder closed the session".to_string(),
                    Err(e) => break format!("the session stream broke: {}", e.message()),
                }
            };
            addr.do_send(Disconnected(why));
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_nar(
        &self,
        request: Request<FetchNarRequest>,
    ) -> Result<Response<Self::FetchNarStream>, Status> {
        let r = request.into_inner();
        let (_, counters) = self.session_counters(&r.session_id).await?;
        let valid = self
            .store
            .is_valid_path(&r.path)
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !valid {
            return Err(Status::not_found(format!(
                "{} is not valid on the runner",
                r.path
            )));
        }
        let store: Arc<dyn Store> = self.store.clone();
        let rx = export(store, r.path);
        counters.nars_out.inc();
        // Counted while the stream lives (an input being copied to the machine).
        let copying = crate::metrics::global().steps.copying_to.hold();
        let s = ReceiverStream::new(rx).map(move |c| {
            let _copying = &copying;
            match c {
                Ok(data) => {
                    counters.bytes_out.add(data.len() as u64);
                    Ok(NarChunk { data })
                }
                Err(e) => Err(clip_status(Code::Internal, &e)),
            }
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn upload_nar(
        &self,
        request: Request<Streaming<UploadNarRequest>>,
    ) -> Result<Response<UploadNarResponse>, Status> {
        let mut s = request.into_inner();
        let Some(upload_nar_request::Msg::Header(h)) = s.message().await?.and_then(|m| m.msg)
        else {
            return Err(Status::invalid_argument("an upload starts with its header"));
        };
        let (addr, counters) = self.session_counters(&h.session_id).await?;
        let _copying = crate::metrics::global().steps.copying_from.hold();
        let info = match h.info.as_ref().map(info_from_proto) {
            Some(Ok(i)) => i,
            Some(Err(e)) => {
                addr.do_send(Refuse(e.clone()));
                return Err(Status::invalid_argument(e));
            }
            None => return Err(Status::invalid_argument("an upload header without info")),
        };
        let permit = addr
            .send(CheckUpload {
                job_id: h.job_id.clone(),
                output: h.output_name.clone(),
                info: info.clone(),
            })
            .await
            .map_err(mailbox)?
            .map_err(Status::permission_denied)?;
        let already = self
            .store
            .query_path_info(&info.path)
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (tx, rx) = mpsc::channel(4);
        let imported = already.is_none();
        let task = {
            let store = self.store.clone();
            let settings = self.settings.clone();
            let info = info.clone();
            tokio::task::spawn_blocking(move || -> Result<(), String> {
                let mut r = ChunkReader::new(rx, settings.max_nar_bytes);
                if already.is_some() {
                    // Valid already: nothing enters the store; drop the bytes.
                    let _ = std::io::copy(&mut r, &mut std::io::sink());
                    return Ok(());
                }
                let mut file = super::verify::spool_and_verify(
                    &mut r,
                    &info,
                    &permit.expected,
                    &permit.inputs,
                    &settings.store_dir,
                    settings.max_nar_bytes,
                    &settings.spool_dir,
                )?;
                store
                    .import_nar(&info, &mut file)
                    .map_err(|e| format!("importing {}: {e}", info.path))
            })
        };
        // What ended the upload early: a protocol violation (refused), or a broken stream.
        let mut stream_err: Option<(bool, Status)> = None;
        loop {
            match s.message().await {
                Ok(Some(m)) => match m.msg {
                    Some(upload_nar_request::Msg::Data(d)) => {
                        counters.bytes_in.add(d.len() as u64);
                        if tx.send(Ok(d)).await.is_err() {
                            break; // the checker stopped reading (it failed)
                        }
                    }
                    _ => {
                        let why = "a second header (or an empty message) in one upload";
                        stream_err = Some((true, Status::invalid_argument(why)));
                        break;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e.message().to_string())).await;
                    // A message that does not decode is the builder's doing; anything else
                    // (a cancelled call, a reset connection) is not a lie.
                    let malformed = e.code() == Code::InvalidArgument;
                    let code = if malformed {
                        Code::InvalidArgument
                    } else {
                        Code::Aborted
                    };
                    let msg = format!("the upload broke: {}", e.message());
                    stream_err = Some((malformed, clip_status(code, &msg)));
                    break;
                }
            }
        }
        drop(tx);
        let res = task.await.map_err(|e| Status::internal(e.to_string()))?;
        if let Some((violation, status)) = stream_err {
            if violation {
                addr.do_send(Refuse(format!(
                    "upload of {}: {}",
                    info.path,
                    status.message()
                )));
            }
            return Err(status);
        }
        match res {
            Ok(()) => {
                counters.nars_in.inc();
                addr.send(UploadDone {
                    job_id: h.job_id,
                    output: h.output_name,
                    info,
                })
                .await
                .map_err(mailbox)?;
                Ok(Response::new(UploadNarResponse { imported }))
            }
            Err(reason) => {
                tracing::error!(path = %info.path, reason = %reason, "refused an uploaded output");
                addr.do_send(Refuse(reason.clone()));
                Err(Status::invalid_argument(reason))
            }
        }
    }

    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        Ok(Response::new(DescribeResponse {
            version: Some(super::PROTOCOL_VERSION),
            store_dir: self.settings.store_dir.as_str().to_string(),
        }))
    }

    async fn stream_log(
        &self,
        request: Request<Streaming<LogChunk>>,
    ) -> Result<Response<StreamLogResponse>, Status> {
        let mut s = request.into_inner();
        let mut file: Option<std::fs::File> = None;
        let mut bytes = 0u64;
        let mut checked = false;
        while let Some(c) = s.message().await? {
            if !checked {
                let session = self.session(&c.session_id).await?;
                let attempt = session
                    .send(JobAttempt(c.job_id.clone()))
                    .await
                    .map_err(mailbox)?;
                let sp = self
                    .settings
                    .store_dir
                    .parse(&c.drv_path)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                // The job id is checked (and the fallback name made to fit) either way.
                let job_name = log_file_name(&sp.base_name(), &c.job_id)?;
                std::fs::create_dir_all(&self.settings.log_dir)
                    .map_err(|e| Status::internal(e.to_string()))?;
                // Named for the step attempt when the job is known (it is, while it runs);
                // else for the job only, found by its drv.
                let p = match attempt {
                    Some(a) => crate::builder::logs::remote_path(
                        &self.settings.log_dir,
                        &sp.base_name(),
                        a,
                    ),
                    None => self.settings.log_dir.join(job_name),
                };
                file = Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&p)
                        .map_err(|e| Status::internal(format!("{}: {e}", p.display())))?,
                );
                checked = true;
            }
            if bytes + c.data.len() as u64 > self.settings.max_log_bytes {
                return Err(Status::resource_exhausted("the log exceeds the limit"));
            }
            bytes += c.data.len() as u64;
            if let Some(f) = &mut file {
                f.write_all(&c.data)
                    .map_err(|e| Status::internal(e.to_string()))?;
            }
        }
        Ok(Response::new(StreamLogResponse { bytes }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_file_names_fit_and_refuse_odd_job_ids() {
        let short = "0a7vq5hmgmp4r1pqy7r6g4qdq9w2j1d1-x.drv";
        assert_eq!(
            log_file_name(short, "18eb-3-1").unwrap(),
            format!("{short}.18eb-3-1.log")
        );
        for bad in ["", "a/b", "..", "x y", &"j".repeat(MAX_JOB_ID + 1)] {
            assert_eq!(
                log_file_name(short, bad).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
        // The longest drv name there can be: the name still fits, distinct per job.
        let long = format!("0a7vq5hmgmp4r1pqy7r6g4qdq9w2j1d1-{}.drv", "n".repeat(207));
        let a = log_file_name(&long, "18eb-3-1").unwrap();
        let b = log_file_name(&long, "18eb-3-2").unwrap();
        assert!(a.len() + ".gz".len() <= 255, "{}", a.len());
        assert!(a.starts_with(&format!("{long}.")) && a.ends_with(".log"));
        assert_ne!(a, b);
    }
}
