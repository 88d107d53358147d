//! PostgreSQL: the hot step writes (a step row created when a build starts, a step started or
//! finished, a realisation recorded) of many actors coalesced into one statement per kind. Each
//! is otherwise its own round trip and its own commit — one WAL flush each — and with hundreds
//! of steps finishing a second those are what the runner waits for.
//!
//! Generic over the write ([`Batched`]): one task takes whatever writes of every kind are
//! waiting when it is free (no timer: a write that finds the task idle goes alone, at once),
//! runs each kind's as one statement ([`Batched::apply_many`]), the kinds at once, and answers
//! each write.
//! All of a statement is committed or none of it, so a write the statement did not do (it
//! failed, or that write's row did not match) goes through the one retry layer alone
//! ([`Outcome::Alone`]: [`Db::write`]); a statement whose reply was lost leaves each write to be
//! read back first ([`Outcome::Unknown`]), with what the batch learned for it (its step numbers).

use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{mpsc, oneshot};

use super::error::DbError;
use super::lanes::Lanes;
use super::steps::{CreateSteps, FinishStepWrite, InsertRealisation, StartStep};
use super::write::{Start, Write};
use super::{Db, Inner};

/// The most writes of one kind in one statement.
const MAX_BATCH: usize = 512;

/// What became of a write handed to the batch.
#[derive(Debug)]
pub(crate) enum Outcome<A> {
    /// Written (committed), with its answer.
    Done(A),
    /// Not written: do it alone.
    Alone,
    /// The statement may or may not have been committed (its reply was lost, for this reason):
    /// read back, then do it alone if it was not.
    Unknown(String),
    /// Not written, for good (a fault injected in the batch).
    Failed(DbError),
}

/// A write waiting in (or taken by) the batch.
pub(crate) struct Pending<W: Write> {
    write: Arc<W>,
    trace: Arc<Mutex<W::Trace>>,
    reply: oneshot::Sender<Outcome<W::Answer>>,
}

impl<W: Write> Pending<W> {
    pub(crate) fn write(&self) -> &W {
        &self.write
    }

    /// Records what the batch learned for this write, before its statement is sent: a caller
    /// whose answer is lost reads back with it.
    pub(crate) fn learned(&self, trace: W::Trace) {
        *self.trace.lock().unwrap_or_else(|p| p.into_inner()) = trace;
    }
}

/// A write the batch coalesces with others of its kind.
pub(crate) trait Batched: Write<Answer: 'static, Trace: 'static> + Sized + 'static {
    /// This kind's queue.
    fn queue(b: &Batcher) -> &Queue<Self>;

    /// Runs the writes as one statement (or as few as the kind needs): one outcome per write,
    /// in order.
    fn apply_many(
        db: &Db,
        lanes: &Lanes,
        writes: &[Pending<Self>],
    ) -> impl std::future::Future<Output = Vec<Outcome<Self::Answer>>> + Send;
}

/// One kind's writes waiting for the task.
pub(crate) struct Queue<W: Write> {
    waiting: Mutex<Vec<Pending<W>>>,
}

impl<W: Write> Default for Queue<W> {
    fn default() -> Self {
        Queue {
            waiting: Mutex::new(Vec::new()),
        }
    }
}

impl<W: Write> Queue<W> {
    fn push(&self, job: Pending<W>) {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(job);
    }

    /// The oldest writes waiting, at most [`MAX_BATCH`].
    fn take(&self) -> Vec<Pending<W>> {
        let mut q = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let n = q.len().min(MAX_BATCH);
        q.drain(..n).collect()
    }
}

/// The queues in [`Inner`], one per kind, and the one task that runs them all.
#[derive(Default)]
pub(crate) struct Batcher {
    /// Where the task runs ([`Db::run_batches_on`]); else on the runtime of the first writer.
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
    /// Wakes the task, one token per write queued. The task ends when this goes (with
    /// [`Inner`]); a closed one is a task whose runtime went, and the next write starts another.
    wake: Mutex<Option<mpsc::UnboundedSender<()>>>,
    pub(crate) create: Queue<CreateSteps>,
    pub(crate) finish: Queue<FinishStepWrite>,
    pub(crate) start: Queue<StartStep>,
    pub(crate) realise: Queue<InsertRealisation>,
}

impl Batcher {
    /// Runs the task on `rt` from now on (the first call wins).
    pub(crate) fn run_on(&self, rt: tokio::runtime::Handle) {
        if self.runtime.set(rt).is_err() {
            tracing::debug!("the write batch already has its runtime");
        }
    }

    /// Queues `job` for the task (started if there is none); `false`, with nothing queued, when
    /// there is no runtime to run it on.
    fn send<W: Batched>(&self, inner: &Arc<Inner>, job: Pending<W>) -> bool {
        let mut wake = self.wake.lock().unwrap_or_else(|p| p.into_inner());
        if wake.as_ref().is_none_or(|tx| tx.is_closed()) {
            let Some(tx) = self.start_task(inner) else {
                return false;
            };
            *wake = Some(tx);
        }
        W::queue(self).push(job);
        if wake.as_ref().is_some_and(|tx| tx.send(()).is_ok()) {
            return true;
        }
        // The task ended between the check and the token (its runtime went): another takes it.
        match self.start_task(inner) {
            Some(tx) => {
                if tx.send(()).is_err() {
                    tracing::debug!("the write batch's new task ended at once; the write waits");
                }
                *wake = Some(tx);
            }
            None => tracing::debug!("the write batch has no runtime; the write waits"),
        }
        true
    }

    /// Starts the task on its runtime; `None` when there is none.
    fn start_task(&self, inner: &Arc<Inner>) -> Option<mpsc::UnboundedSender<()>> {
        let rt = match self.runtime.get() {
            Some(h) => h.clone(),
            None => tokio::runtime::Handle::try_current().ok()?,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        rt.spawn(run(Arc::downgrade(inner), rx));
        Some(tx)
    }
}

impl Db {
    /// A write of a batched kind: through the batch when it is on ([`DbOptions::batch_writes`],
    /// PostgreSQL), else alone; either way through the one retry layer when the batch did not
    /// write it.
    ///
    /// [`DbOptions::batch_writes`]: super::DbOptions::batch_writes
    pub(crate) async fn write_batched<W: Batched>(&self, w: W) -> Result<W::Answer, DbError> {
        if self.batch_lanes().is_none() {
            return self.write(&w).await;
        }
        let write = Arc::new(w);
        let trace = Arc::new(Mutex::new(W::Trace::default()));
        let (reply, rx) = oneshot::channel();
        let job = Pending {
            write: write.clone(),
            trace: trace.clone(),
            reply,
        };
        let outcome = match self.inner.batcher.send(&self.inner, job) {
            false => Outcome::Alone,
            // The task gone mid-statement (its runtime shut down) is a lost reply.
            true => rx
                .await
                .unwrap_or_else(|_| Outcome::Unknown("the write batch's task stopped".into())),
        };
        // What the batch learned for it (its step numbers, committed): the lone write goes on.
        let learned = std::mem::take(&mut *trace.lock().unwrap_or_else(|p| p.into_inner()));
        match outcome {
            Outcome::Done(a) => Ok(a),
            Outcome::Failed(e) => Err(e),
            Outcome::Alone => self.write_from(&*write, Start::Fresh(learned)).await,
            Outcome::Unknown(why) => {
                let source = sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    why,
                ));
                self.write_from(&*write, Start::Lost(learned, source)).await
            }
        }
    }

    /// The connections the write batch runs on, when it is on: PostgreSQL with
    /// [`DbOptions::batch_writes`](super::DbOptions::batch_writes).
    pub(crate) fn batch_lanes(&self) -> Option<&Lanes> {
        if !self.inner.options.batch_writes {
            return None;
        }
        self.inner.lanes.as_ref()
    }
}

/// The task: waits for a write, then takes what every kind has waiting and runs the kinds at
/// once (one statement per kind, on separate connections), again until nothing waits; ends when
/// the database handle is gone. One loop for all kinds, so writes of every kind that come while
/// a round runs share the next round rather than each going alone.
async fn run(inner: Weak<Inner>, mut wake: mpsc::UnboundedReceiver<()>) {
    while wake.recv().await.is_some() {
        while wake.try_recv().is_ok() {}
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let db = Db { inner };
        loop {
            let b = &db.inner.batcher;
            let (create, finish, start, realise) = (
                b.create.take(),
                b.finish.take(),
                b.start.take(),
                b.realise.take(),
            );
            if create.is_empty() && finish.is_empty() && start.is_empty() && realise.is_empty() {
                break;
            }
            tokio::join!(
                round(&db, create),
                round(&db, finish),
                round(&db, start),
                round(&db, realise),
            );
        }
    }
}

/// One kind's writes of a round, as one statement: each answered.
async fn round<W: Batched>(db: &Db, jobs: Vec<Pending<W>>) {
    if jobs.is_empty() {
        return;
    }
    let outcomes = match db.batch_lanes() {
        Some(lanes) => W::apply_many(db, lanes, &jobs).await,
        None => Vec::new(),
    };
    let mut outcomes = outcomes.into_iter();
    for j in jobs {
        // A write the statement gave no outcome for is done alone.
        let out = outcomes.next().unwrap_or(Outcome::Alone);
        if j.reply.send(out).is_err() {
            tracing::debug!(op = j.write.name(), "a batched write's caller is gone");
        }
    }
}

/// How a batch statement failed: every write of it gets [`Failed::outcome`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Failed {
    /// The database refused it, or there was no connection: nothing was written.
    Refused,
    /// Its reply was lost: it may have been committed.
    Lost,
}

impl Failed {
    pub(crate) fn outcome<A>(self) -> Outcome<A> {
        match self {
            Failed::Refused => Outcome::Alone,
            Failed::Lost => Outcome::Unknown("the reply to the batch statement was lost".into()),
        }
    }
}

/// Runs one batch statement as [`Db::autocommit`] does, timing it as a write.
pub(crate) async fn statement<T>(
    db: &Db,
    run: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, Failed> {
    let hist = db.inner.timings.of(super::timing::TxKind::Write);
    let begun = std::time::Instant::now();
    let r = db.autocommit(run).await;
    hist.observe(begun.elapsed());
    match r {
        Ok(v) => Ok(v),
        Err(DbError::CommitOutcomeUnknown(e)) => {
            tracing::warn!(error = %e, "the reply to a batch statement was lost; each write is read back");
            Err(Failed::Lost)
        }
        Err(e) => {
            tracing::warn!(error = %e, "a batch statement failed; each write is done alone");
            Err(Failed::Refused)
        }
    }
}
