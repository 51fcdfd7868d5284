//! Locked batches (layer 3): the first steps of many workflow deliveries run under one transaction's row locks and checkpoint in one statement and one commit.
//!
//! The first step of a delivery runs with its workflow row locked (decision 0003): an
//! operator's cancel waits for the step's checkpoint, a duplicate delivery waits and then finds
//! the step journaled, and a step whose lease is lost never starts. Taking that lock in a
//! transaction of its own per delivery cost a BEGIN, a lock statement, a checkpoint statement
//! and a COMMIT (with its WAL flush) per workflow — the largest share of the workflow
//! benchmark's Postgres time. Here the deliveries that arrive together share it instead:
//!
//! 1. [`LockBatcher::hold`] requests pile up while a batch is open (one at a time, on a
//!    connection of its own, `super::conn::BatchConn`: with two open at once the batches were
//!    smaller and Postgres used more CPU per workflow — 1.89–1.91 against 1.20–1.26 ms in two
//!    interleaved pairs on a loaded machine); the next batch takes them all and, in ONE
//!    statement (`db::lock::lock_batch`), locks their job rows by lease token
//!    and their workflow rows — only those whose step is due and not journaled, and skipping
//!    rows someone else holds (that delivery takes the one-at-a-time locked path instead, and
//!    waits there, so one busy workflow never stalls a batch) — and reads their journals.
//! 2. Each held delivery runs its step body while the batch's transaction holds its rows. A step
//!    that needs nothing but its checkpoint hands it back ([`HeldHandle::checkpoint`]); any
//!    other step — one that calls `db()` or makes its external call, fails, waits, sleeps —
//!    leaves the batch ([`HeldHandle::release`]): it waits for the batch's commit and then
//!    takes the lock on its own, checked unchanged, exactly like a lock-free successor.
//! 3. When every held delivery has reported (or a straggler outlived [`STRAGGLER_WAIT`] while
//!    others had reported or more deliveries waited for a batch: it then continues without the
//!    batch, as a lock-free step), the batch
//!    writes every checkpoint in ONE statement (`db::transition::checkpoint_batch_in`, the group committer's,
//!    each item fenced and checked), which also looks in `pg_locks` for transactions waiting
//!    on the batch (an operator's cancel: the batch commits, waits until that transaction
//!    has finished — Postgres would hand the freed row to whoever asks first — and the
//!    successors then take the locked path), and commits.
//!
//! Deliveries of one workflow within this process are serialized by [`Gates`], so that a
//! duplicate delivery never slips between a batch's commit and the lock a released step takes
//! next. Across processes such a duplicate may run the step's body a second time; the journal,
//! the domain writes and the external call stay exactly-once (they are fenced and happen only
//! under the lock).
use super::conn::BatchConn;
use super::{Stop, recv_batch};
use crate::workflow::db::lock::{
    HeldRows, HoldRequest, let_waiters_finish, lock_batch, lock_waiters,
};
use crate::workflow::db::transition::{Applied, BatchItem, checkpoint_batch_in};
use crate::{Clock, JobId};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Most deliveries in one batch.
const MAX_BATCH: usize = 128;

/// How long a batch waits for its slowest steps once one of its steps reported or another
/// delivery waits for a batch. A step that takes longer does not hold its batch-mates'
/// checkpoints, nor the next batch, back: it goes on without the batch, lock-free.
const STRAGGLER_WAIT: Duration = Duration::from_millis(20);

/// A delivery asking to run its step in a batch.
struct Request {
    hold: HoldRequest,
    reply: oneshot::Sender<Option<Held>>,
}

/// A delivery held by a batch: its workflow row and journal as the batch locked them, and the
/// handle to report back through.
pub(crate) struct Held {
    pub rows: HeldRows,
    pub handle: HeldHandle,
}

/// The answer to a held delivery's checkpoint: what became of it and whether a transaction
/// was waiting for the batch's locks, or the item back when the batch no longer takes it.
type Answer = std::result::Result<(Applied, bool), Box<BatchItem>>;

/// What a held delivery reports to its batch.
enum Event {
    /// Its checkpoint, to write in the batch's statement; answered after the commit.
    Checkpoint(Box<BatchItem>, oneshot::Sender<Answer>),
    /// It leaves the batch (and waits for the batch's end to lock on its own).
    Release,
}

/// A held delivery's link to its batch. Dropping it unreported releases it.
pub(crate) struct HeldHandle {
    events: mpsc::UnboundedSender<Event>,
    ended: watch::Receiver<bool>,
    reported: AtomicBool,
}

impl HeldHandle {
    /// Hands the step's checkpoint to the batch. `Ok` after the batch's commit: what became
    /// of it, and whether a transaction was waiting for the batch's locks. `Err(item)` when
    /// the batch has gone on without this delivery (a straggler, or it released already):
    /// the item was not written and goes to the group committer instead.
    pub(crate) async fn checkpoint(&self, item: BatchItem) -> Answer {
        if self.reported.swap(true, Ordering::SeqCst) {
            return Err(Box::new(item));
        }
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError(Event::Checkpoint(item, _))) =
            self.events.send(Event::Checkpoint(Box::new(item), reply))
        {
            return Err(item);
        }
        // A batch that ends without answering (its task was dropped with the runtime) wrote
        // nothing it did not answer for: the caller's locked path re-checks.
        answer.await.unwrap_or(Ok((Applied::Rejected, false)))
    }

    /// Leaves the batch and returns once the batch's transaction has ended, so that the
    /// delivery's own lock on its rows can be taken.
    pub(crate) async fn release(&self) {
        if !self.reported.swap(true, Ordering::SeqCst) {
            let _ = self.events.send(Event::Release);
        }
        let mut ended = self.ended.clone();
        // An error means the batch's task is gone, and its transaction with it.
        let _ = ended.wait_for(|ended| *ended).await;
    }
}

impl Drop for HeldHandle {
    fn drop(&mut self) {
        if !self.reported.swap(true, Ordering::SeqCst) {
            let _ = self.events.send(Event::Release);
        }
    }
}

/// What the locked batches of a store have done (for diagnostics and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LockBatchStats {
    /// Batches that ran their lock statement.
    pub batches: u64,
    /// Deliveries a batch held.
    pub held: u64,
    /// Requests a batch did not hold (they took the one-at-a-time path).
    pub not_held: u64,
    /// Held deliveries whose batch went on without them (still running 20 ms into the batch
    /// while others had reported or waited).
    pub stragglers: u64,
    /// Batches open now.
    pub open: u64,
    /// Requests waiting for a batch to take them now.
    pub waiting: u64,
}

/// The counters behind [`LockBatchStats`].
#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    held: AtomicU64,
    not_held: AtomicU64,
    stragglers: AtomicU64,
    open: AtomicU64,
    waiting: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn sub(counter: &AtomicU64, n: usize) {
        counter.fetch_sub(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// Handle on the batching task; cheap to clone. The task ends when every handle is gone.
#[derive(Debug, Clone)]
pub(crate) struct LockBatcher {
    tx: mpsc::UnboundedSender<Request>,
    counters: Arc<Counters>,
}

impl LockBatcher {
    /// Starts the batching task on the current runtime.
    pub(crate) fn start(
        pool: PgPool,
        clock: Arc<dyn Clock>,
        lease_ttl: Duration,
        mut stop: Stop,
    ) -> (Self, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        let ttl_ms = crate::store::ms(lease_ttl);
        let counters = Arc::new(Counters::default());
        let stats = counters.clone();
        let task = tokio::spawn(async move {
            // One batch at a time, on a connection of its own.
            let mut conn = BatchConn::new(pool.clone());
            loop {
                // Whatever piled up while the previous batch was open (at least one).
                let mut batch = Vec::with_capacity(MAX_BATCH);
                if recv_batch(&mut rx, &mut batch, MAX_BATCH, &mut stop).await == 0 {
                    break;
                }
                Counters::sub(&stats.waiting, batch.len());
                Counters::add(&stats.open, 1);
                if !run_batch(&mut conn, &pool, clock.as_ref(), ttl_ms, batch, &stats).await {
                    conn.discard();
                }
                Counters::sub(&stats.open, 1);
            }
        });
        (Self { tx, counters }, task)
    }

    /// What the batches have done so far.
    pub(crate) fn stats(&self) -> LockBatchStats {
        let c = &self.counters;
        LockBatchStats {
            batches: c.batches.load(Ordering::Relaxed),
            held: c.held.load(Ordering::Relaxed),
            not_held: c.not_held.load(Ordering::Relaxed),
            stragglers: c.stragglers.load(Ordering::Relaxed),
            open: c.open.load(Ordering::Relaxed),
            waiting: c.waiting.load(Ordering::Relaxed),
        }
    }

    /// Asks to run `step` of `workflow_id` (the delivery of job `job_id` under `token`) in a
    /// locked batch. `None`: not held — the lease is lost, the step is not due as asked, its
    /// rows are busy, or the batch failed; the delivery takes the one-at-a-time locked path,
    /// which finds out which.
    pub(crate) async fn hold(
        &self,
        job_id: JobId,
        token: Uuid,
        workflow_id: Uuid,
        step: &str,
    ) -> Option<Held> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            hold: HoldRequest {
                job_id,
                token,
                workflow_id,
                step: step.to_string(),
            },
            reply,
        };
        Counters::add(&self.counters.waiting, 1);
        if self.tx.send(request).is_err() {
            Counters::sub(&self.counters.waiting, 1);
            return None;
        }
        answer.await.ok().flatten()
    }
}

/// The reports of a batch's held deliveries: checkpoints to write, each with its reply.
type Reports = Vec<(Box<BatchItem>, oneshot::Sender<Answer>)>;

/// One batch, from its lock statement to its commit. `false` when a statement failed (the
/// connection may be broken).
async fn run_batch(
    conn: &mut BatchConn,
    pool: &PgPool,
    clock: &dyn Clock,
    ttl_ms: i64,
    requests: Vec<Request>,
    stats: &Counters,
) -> bool {
    let asked = requests.len();
    let begun = match conn.get().await {
        Ok(conn) => sqlx::Connection::begin(conn).await,
        Err(e) => Err(e),
    };
    let mut tx = match begun {
        Ok(tx) => tx,
        Err(e) => {
            tracing::warn!(error = %e, "locked batch could not begin; its steps lock one at a time");
            Counters::add(&stats.not_held, asked);
            return false;
        }
    };
    let holds: Vec<HoldRequest> = requests.iter().map(|r| r.hold.clone()).collect();
    let by_index = match lock_batch(&mut tx, &holds).await {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!(error = %e, steps = asked,
                "locked batch failed to lock; its steps lock one at a time");
            // Dropping the requests answers `None` to each.
            Counters::add(&stats.not_held, asked);
            return false;
        }
    };
    let (ended_tx, ended) = watch::channel(false);
    let (mut events, pending) = hand_out(requests, by_index, ended);
    Counters::add(&stats.batches, 1);
    Counters::add(&stats.held, pending);
    Counters::add(&stats.not_held, asked - pending);
    let items = collect(&mut events, pending, stats).await;
    let written = write(tx, pool, clock, ttl_ms, &items).await;
    let ok = written.is_ok();
    let (applied, waiting) = written.unwrap_or_else(|e| {
        tracing::warn!(error = %e, steps = items.len(),
            "locked batch's checkpoint failed; each step takes the one-at-a-time path");
        (vec![Applied::Rejected; items.len()], false)
    });
    for ((_, reply), applied) in items.into_iter().zip(applied) {
        let _ = reply.send(Ok((applied, waiting)));
    }
    let _ = ended_tx.send(true);
    // Whatever stragglers report from now on is handed back to them.
    events.close();
    while let Ok(event) = events.try_recv() {
        if let Event::Checkpoint(item, reply) = event {
            let _ = reply.send(Err(item));
        }
    }
    ok
}

/// Answers each request: held (its rows and a handle on the batch) or not. Returns the
/// batch's end of the handles' channel and how many are held.
fn hand_out(
    requests: Vec<Request>,
    mut by_index: std::collections::HashMap<usize, HeldRows>,
    ended: watch::Receiver<bool>,
) -> (mpsc::UnboundedReceiver<Event>, usize) {
    let (events_tx, events) = mpsc::unbounded_channel::<Event>();
    let mut seen = std::collections::HashSet::new();
    let mut pending = 0usize;
    for (index, request) in requests.into_iter().enumerate() {
        // A second delivery of a workflow the batch already holds is not held: it waits for
        // the batch's commit on the locked path (and then finds the step journaled).
        let rows = by_index
            .remove(&index)
            .filter(|_| seen.insert(request.hold.workflow_id));
        let Some(rows) = rows else {
            let _ = request.reply.send(None);
            continue;
        };
        let held = Held {
            rows,
            handle: HeldHandle {
                events: events_tx.clone(),
                ended: ended.clone(),
                reported: AtomicBool::new(false),
            },
        };
        // A delivery that went away drops its handle, which releases it.
        pending += 1;
        let _ = request.reply.send(Some(held));
    }
    (events, pending)
}

/// Waits for the held deliveries' reports. Every [`STRAGGLER_WAIT`] the batch looks up: once a
/// held step reported or another delivery waits for a batch, the steps still running go on
/// without this one. A lone slow step keeps its lock as long as it runs, as on the
/// one-at-a-time path.
async fn collect(
    events: &mut mpsc::UnboundedReceiver<Event>,
    mut pending: usize,
    stats: &Counters,
) -> Reports {
    let mut items = Vec::new();
    let mut deadline = tokio::time::Instant::now() + STRAGGLER_WAIT;
    let mut reported = false;
    while pending > 0 {
        let event = match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(event) => event,
            Err(_) if reported || stats.waiting.load(Ordering::Relaxed) > 0 => {
                Counters::add(&stats.stragglers, pending);
                break;
            }
            Err(_) => {
                deadline += STRAGGLER_WAIT;
                continue;
            }
        };
        let Some(event) = event else { break };
        pending -= 1;
        reported = true;
        if let Event::Checkpoint(item, reply) = event {
            items.push((item, reply));
        }
    }
    items
}

/// Writes the reported checkpoints in the batch's transaction and commits: what became of
/// each, and whether a transaction was waiting for the batch's locks. Someone waiting (an
/// operator's cancel) is noted before the commit and let finish after it, before any
/// successor of this batch runs: Postgres gives a freed row to whoever asks first, not to the
/// waiter, so a successor asking at once could overtake it.
async fn write(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    pool: &PgPool,
    clock: &dyn Clock,
    ttl_ms: i64,
    items: &Reports,
) -> crate::Result<(Vec<Applied>, bool)> {
    if items.is_empty() {
        tx.commit().await?;
        return Ok((Vec::new(), false));
    }
    let batch: Vec<&BatchItem> = items.iter().map(|(item, _)| item.as_ref()).collect();
    let (applied, waiting) =
        match checkpoint_batch_in(&mut tx, clock.now(), ttl_ms, &batch, true).await {
            Ok(answer) => answer,
            Err(e) => {
                // Ended before anyone is told so: the rows are free once this returns (or
                // the connection, then discarded, is gone).
                let _ = tx.rollback().await;
                return Err(e.into());
            }
        };
    let waiters = if waiting {
        lock_waiters(&mut tx).await.ok()
    } else {
        None
    };
    tx.commit().await?;
    if let Some((Some(pids), since)) = waiters {
        let _ = let_waiters_finish(pool, &pids, since).await;
    }
    Ok((applied, waiting))
}
