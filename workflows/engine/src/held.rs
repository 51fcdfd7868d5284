//! Locked batches: the first steps of many workflow deliveries run under one transaction's row locks and checkpoint in one statement and one commit.
//!
//! The first step of a delivery runs with its workflow row locked (decision 0003): an
//! operator's cancel waits for the step's checkpoint, a duplicate delivery waits and then finds
//! the step journaled, and a step whose lease is lost never starts. Taking that lock in a
//! transaction of its own per delivery cost a BEGIN, a lock statement, a checkpoint statement
//! and a COMMIT (with its WAL flush) per workflow — the largest share of the workflow
//! benchmark's Postgres time. Here the deliveries that arrive together share it instead:
//!
//! 1. [`LockBatcher::hold`] requests pile up while a batch is open (one at a time, on a
//!    connection of its own, `checkpoint::BatchConn`: with two open at once the batches were
//!    smaller and Postgres used more CPU per workflow — 1.89–1.91 against 1.20–1.26 ms in two
//!    interleaved pairs on a loaded machine); the next batch takes them all and, in ONE
//!    statement ([`LOCK_SQL`]), locks their job rows by lease token
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
//!    writes every checkpoint in ONE statement (`checkpoint::apply_in`, the group committer's,
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
use crate::Clock;
use crate::JobId;
use crate::checkpoint::{self, Applied, BatchConn, Item};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgRow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

/// Most deliveries in one batch.
const MAX_BATCH: usize = 128;

/// How long a batch waits for its slowest steps once one of its steps reported or another
/// delivery waits for a batch. A step that takes longer does not hold its batch-mates'
/// checkpoints, nor the next batch, back: it goes on without the batch, lock-free.
const STRAGGLER_WAIT: Duration = Duration::from_millis(20);

/// One batch's statement: `r` is the requests (job, lease token, workflow, step, in order);
/// `fenced` locks the job rows that still hold their tokens (a token is set only while its row
/// is `running`, a table constraint); `held` locks the workflow rows
/// whose current step is the requested one, due (running, or asleep on a timer) and without a
/// journal row. Rows locked by another transaction are skipped: their deliveries take the
/// one-at-a-time path. Rows are found by `id = ANY(array)` (see `checkpoint::BATCH_SQL` on
/// plans) and locked in id order, the order every batch statement uses. No condition on a
/// `state` column is one an index could serve: with such a condition the planner walked the
/// state indexes (every running job, every running workflow) instead of the primary keys.
/// One result row per journal row of a held workflow (or one with NULL journal columns), the
/// request's ordinal last ([`ORD_COLUMN`]).
const LOCK_SQL: &str = concat!(
    "WITH r AS (
       SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[]) WITH ORDINALITY
         AS r(job, token, wf, step, ord)
     ),
     fenced AS (
       SELECT j.id, j.lease_token FROM jobs j
       WHERE j.id = ANY($1::uuid[]) AND j.lease_token = ANY($2::uuid[])
       ORDER BY j.id
       FOR UPDATE SKIP LOCKED
     ),
     ready AS (
       SELECT r.ord, r.wf, r.step FROM r JOIN fenced f ON f.id = r.job AND f.lease_token = r.token
     ),
     held AS (
       SELECT w.* FROM workflows w
       WHERE w.id = ANY($3::uuid[])
         AND CASE w.state WHEN 'running' THEN true
                          WHEN 'waiting' THEN w.wait_signal_name IS NULL
                          ELSE false END
         AND EXISTS (SELECT 1 FROM ready
                     WHERE ready.wf = w.id AND ready.step = w.current_step
                       AND NOT EXISTS (SELECT 1 FROM workflow_steps s
                                       WHERE s.workflow_id = w.id AND s.step = ready.step))
       ORDER BY w.id
       FOR NO KEY UPDATE SKIP LOCKED
     )
     SELECT ",
    crate::workflow::locked_columns!("h"),
    crate::workflow::journal_columns!(),
    ", ready.ord
     FROM ready
     JOIN held h ON h.id = ready.wf AND h.current_step = ready.step
     LEFT JOIN workflow_steps s ON s.workflow_id = h.id
     ORDER BY ready.ord"
);

/// Where [`LOCK_SQL`]'s rows carry the request's ordinal: after the workflow's
/// 11 locked columns and the journal's 6.
const ORD_COLUMN: usize = 17;

/// The backends waiting for the current transaction's locks, and the transaction's start.
const WAITERS_SQL: &str = "SELECT array_agg(l.pid), statement_timestamp() FROM pg_locks l
     WHERE l.locktype = 'transactionid' AND NOT l.granted
       AND l.transactionid = pg_current_xact_id()::text::xid";

/// How long a committed batch waits for the transactions that waited for it (they need
/// milliseconds; the bound only keeps a stuck one from stalling the batches).
const WAITERS_WAIT: Duration = Duration::from_secs(2);

/// Waits until none of `pids` is still in a transaction that began before `since`.
async fn let_waiters_finish(
    pool: &PgPool,
    pids: &[i32],
    since: DateTime<Utc>,
) -> std::result::Result<(), sqlx::Error> {
    let deadline = tokio::time::Instant::now() + WAITERS_WAIT;
    while tokio::time::Instant::now() < deadline {
        let busy: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1) AND xact_start <= $2",
        )
        .bind(pids)
        .bind(since)
        .fetch_one(pool)
        .await?;
        if busy == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// A delivery asking to run its step in a batch.
struct Request {
    job_id: JobId,
    token: Uuid,
    workflow_id: Uuid,
    step: String,
    reply: oneshot::Sender<Option<Held>>,
}

/// A delivery held by a batch: the rows [`LOCK_SQL`] returned for it (its workflow row's
/// locked columns and its journal) and the handle to report back through.
pub(crate) struct Held {
    pub rows: Vec<PgRow>,
    pub handle: HeldHandle,
}

/// The answer to a held delivery's checkpoint: what became of it and whether a transaction
/// was waiting for the batch's locks, or the item back when the batch no longer takes it.
type Answer = std::result::Result<(Applied, bool), Box<Item>>;

/// What a held delivery reports to its batch.
enum Event {
    /// Its checkpoint, to write in the batch's statement; answered after the commit.
    Checkpoint(Box<Item>, oneshot::Sender<Answer>),
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
    pub(crate) async fn checkpoint(&self, item: Item) -> Answer {
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
    pub(crate) fn start(pool: PgPool, clock: Arc<dyn Clock>, lease_ttl: Duration) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        let ttl_ms = crate::store::ms(lease_ttl);
        let counters = Arc::new(Counters::default());
        let stats = counters.clone();
        tokio::spawn(async move {
            // One batch at a time, on a connection of its own.
            let mut conn = BatchConn::new(pool.clone());
            loop {
                // Whatever piled up while the previous batch was open (at least one).
                let mut batch = Vec::with_capacity(MAX_BATCH);
                if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
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
        Self { tx, counters }
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
            job_id,
            token,
            workflow_id,
            step: step.to_string(),
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
    let mut jobs = Vec::with_capacity(requests.len());
    let mut tokens = Vec::with_capacity(requests.len());
    let mut wfs = Vec::with_capacity(requests.len());
    let mut steps = Vec::with_capacity(requests.len());
    for r in &requests {
        jobs.push(r.job_id);
        tokens.push(r.token);
        wfs.push(r.workflow_id);
        steps.push(r.step.as_str());
    }
    let rows = sqlx::query(LOCK_SQL)
        .bind(&jobs)
        .bind(&tokens)
        .bind(&wfs)
        .bind(&steps)
        .fetch_all(&mut *tx)
        .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, steps = requests.len(),
                "locked batch failed to lock; its steps lock one at a time");
            // Dropping the requests answers `None` to each.
            Counters::add(&stats.not_held, asked);
            return false;
        }
    };
    // The rows of each held request, by ordinal (1-based).
    let mut by_ord: HashMap<i64, Vec<PgRow>> = HashMap::new();
    for row in rows {
        use sqlx::Row;
        match row.try_get::<i64, _>(ORD_COLUMN) {
            Ok(ord) => by_ord.entry(ord).or_default().push(row),
            Err(e) => {
                tracing::warn!(error = %e, "locked batch returned an unreadable row");
                Counters::add(&stats.not_held, asked);
                return false;
            }
        }
    }
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let (ended_tx, ended) = watch::channel(false);
    let mut seen = std::collections::HashSet::new();
    let mut pending = 0usize;
    for (ord, request) in (1i64..).zip(requests) {
        // A second delivery of a workflow the batch already holds is not held: it waits for
        // the batch's commit on the locked path (and then finds the step journaled).
        let rows = by_ord
            .remove(&ord)
            .filter(|_| seen.insert(request.workflow_id));
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
    drop(events_tx);
    Counters::add(&stats.batches, 1);
    Counters::add(&stats.held, pending);
    Counters::add(&stats.not_held, asked - pending);
    let mut items: Vec<(Box<Item>, oneshot::Sender<Answer>)> = Vec::new();
    // Every STRAGGLER_WAIT the batch looks up: once a held step reported or another delivery
    // waits for a batch, the steps still running go on without this one. A lone slow step
    // keeps its lock as long as it runs, as on the one-at-a-time path.
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
    let mut waited_on: Option<(Option<Vec<i32>>, DateTime<Utc>)> = None;
    let written = if items.is_empty() {
        tx.commit().await.map(|()| (Vec::new(), false))
    } else {
        let batch: Vec<&Item> = items.iter().map(|(item, _)| item.as_ref()).collect();
        match checkpoint::apply_in(&mut tx, clock.now(), ttl_ms, &batch, true).await {
            Ok((applied, false)) => tx.commit().await.map(|()| (applied, false)),
            Ok((applied, true)) => {
                // Someone waits for the batch's locks (an operator's cancel): note who,
                // commit, and let them finish before any successor of this batch runs.
                // Postgres gives a freed row to whoever asks first, not to the waiter, so
                // a successor asking at once could overtake it.
                let waiters = sqlx::query_as::<_, (Option<Vec<i32>>, DateTime<Utc>)>(WAITERS_SQL)
                    .fetch_one(&mut *tx)
                    .await;
                match tx.commit().await {
                    Ok(()) => {
                        waited_on = waiters.ok();
                        Ok((applied, true))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => {
                // Ended before anyone is told so: the rows are free once this returns (or
                // the connection, then discarded, is gone).
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    };
    if let Some((Some(pids), since)) = waited_on {
        let _ = let_waiters_finish(pool, &pids, since).await;
    }
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

/// In-process serialization of one workflow's deliveries (see the module's doc).
#[derive(Debug, Default)]
pub(crate) struct Gates {
    open: std::sync::Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

/// A delivery's turn on its workflow; the next one's comes when it is dropped.
pub(crate) struct Gate {
    gates: Arc<Gates>,
    id: Uuid,
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Gates {
    /// Waits for the turn of a delivery of workflow `id`.
    pub(crate) async fn enter(self: &Arc<Self>, id: Uuid) -> Gate {
        let gate = {
            let mut open = self
                .open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            open.entry(id).or_default().clone()
        };
        let turn = gate.lock_owned().await;
        Gate {
            gates: self.clone(),
            id,
            turn: Some(turn),
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let mut open = self
            .gates
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The map's and this turn's references only: nobody else waits, forget the gate.
        // (New waiters clone it under this same lock, so the count cannot grow meanwhile.)
        if open
            .get(&self.id)
            .is_some_and(|g| Arc::strong_count(g) <= 2)
        {
            open.remove(&self.id);
        }
        drop(open);
        self.turn.take();
    }
}
