//! Group commit of workflow starts: many callers' `workflow_start`s in one statement and one commit.
//!
//! A start used to be one autocommit statement of its own (the workflow row, its first step's
//! job, the NOTIFY), so every start paid a statement, a commit and a WAL flush. Concurrent
//! starts (the API, webhooks, benchmark starters) now hand their rows to a background task
//! which, like the checkpointer (`checkpoint.rs`), sends whatever piled up while the previous
//! batch was in flight as ONE statement over arrays. That statement runs in autocommit, so
//! the batch is one round trip and one commit; at idle a lone start waits for nothing.
//!
//! The contract stays the one-at-a-time start's:
//! - a caller gets its id only after the statement that wrote its workflow row and first job
//!   has committed (rule 1: accepted means committed);
//! - a taken unique key — by an instance committed earlier, by one another transaction
//!   commits meanwhile, or by an item earlier in the same batch (Postgres' `ON CONFLICT DO
//!   NOTHING` skips a row that conflicts with one the same statement inserted) — enqueues
//!   nothing, and the caller gets the holder's id, looked up after the commit in one query
//!   for the whole batch;
//! - a batch statement that Postgres refuses wrote nothing; each of its callers then takes
//!   the one-statement path (`workflow_start_in`) on its own, so only the item that caused
//!   the error gets it. A failure that leaves the outcome unknown (the connection broke
//!   while the statement ran) is reported to every caller, as the one-statement path
//!   reports it to its one caller: retrying with the same unique key is safe;
//! - a caller that gave up (dropped its future) before its batch went out gets nothing
//!   written, as a dropped one-statement start did.
//!
//! Starts inside a caller's transaction (`workflow_start_in`,
//! `workflow_start_for_inbox_in`) are not batched: they commit with the caller's writes.
use crate::job::NewJob;
use crate::{Clock, Error, WorkflowId};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Most starts in one statement.
const MAX_BATCH: usize = 256;

/// One start: the workflow row and its first step's job, as
/// `workflow_start_in` would insert them.
#[derive(Debug)]
pub(crate) struct Item {
    pub id: WorkflowId,
    pub kind: &'static str,
    pub version: i32,
    pub input: Value,
    pub first_step: &'static str,
    pub queue: String,
    pub unique_key: Option<String>,
    /// The first step's job (due now; its queue is `queue`).
    pub job: NewJob,
    /// Whether the job's queue is woken with NOTIFY (the store's setting;
    /// stores that differ only in it share one batcher).
    pub notify: bool,
}

/// What became of an item.
#[derive(Debug)]
pub(crate) enum Submitted {
    /// Committed: the id of the instance this item started, or of the one
    /// that holds its unique key.
    Started(WorkflowId),
    /// Nothing of it was written (the batch statement was refused, or the
    /// batching task is gone): start it on the one-statement path.
    Unbatched,
    /// The start failed; for a database failure, it may or may not have
    /// been committed (as for any statement whose answer was lost).
    Failed(Error),
}

type Request = (Item, oneshot::Sender<Submitted>);

/// Handle on the batching task; cheap to clone. The task ends when every
/// handle is gone.
#[derive(Debug, Clone)]
pub(crate) struct StartBatcher {
    tx: mpsc::UnboundedSender<Request>,
}

impl StartBatcher {
    /// Starts the batching task on the current runtime.
    pub(crate) fn start(pool: PgPool, clock: Arc<dyn Clock>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        tokio::spawn(async move {
            let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
            // Whatever piled up while the previous batch was in flight (at least one).
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                // A caller that gave up before its start went out (its future
                // was dropped: a cancelled request) was told nothing, so
                // nothing is written for it, as before batching.
                batch.retain(|(_, reply)| !reply.is_closed());
                if batch.is_empty() {
                    continue;
                }
                // Rows in unique-key order: two batches (of two processes)
                // that share keys then wait on each other's keys in the same
                // order instead of deadlocking.
                batch.sort_by(|(a, _), (b, _)| a.unique_key.cmp(&b.unique_key));
                let results = apply(&pool, clock.now(), &batch).await;
                for ((_, reply), result) in batch.drain(..).zip(results) {
                    // The caller may have given up (its task was dropped).
                    let _ = reply.send(result);
                }
            }
        });
        Self { tx }
    }

    /// Starts `item` in the next batch. The item is queued before the first
    /// `.await` (so starts created together go out together).
    pub(crate) async fn submit(&self, item: Item) -> Submitted {
        let id = item.id;
        let (reply, answer) = oneshot::channel();
        if self.tx.send((item, reply)).is_err() {
            // The task is gone (its runtime shut down) before it took the item.
            return Submitted::Unbatched;
        }
        answer.await.unwrap_or_else(|_| {
            // The task went away with the item, perhaps mid-statement.
            Submitted::Failed(in_doubt(
                id,
                std::io::ErrorKind::Other,
                "the start batcher stopped".into(),
            ))
        })
    }
}

/// The batch statement: `i` is the items (`$2`–`$16`, one array per
/// column), `$1` the clock's now (`None`: the database's), `$17` the NOTIFY
/// channel. It says, row by row, what `start_sql!` in `workflow.rs` says
/// for one start; keep them in step.
///
/// Only inserted workflow rows get a job (`wf JOIN i`), so a taken key
/// enqueues nothing. Duplicate keys inside the batch are fine: `DO NOTHING`
/// skips a row that conflicts with one this statement inserted (the first
/// in array order wins; `DO UPDATE` would raise "cannot affect row a second
/// time" instead). The jobs' unique keys name their new workflow's id, so
/// they never conflict with each other. No table is scanned (inserts and
/// CTE joins only), so a generic plan prepared in a fresh, unanalyzed
/// database is as good as any.
///
/// The NOTIFY goes once per distinct queue that got a job from an item
/// that wants it.
const BATCH_SQL: &str = "WITH t AS (SELECT coalesce($1::timestamptz, now()) AS n),
     i AS (
       SELECT * FROM unnest($2::uuid[], $3::text[], $4::int[], $5::jsonb[], $6::text[],
                            $7::text[], $8::text[], $9::uuid[], $10::text[], $11::jsonb[],
                            $12::int2[], $13::int[], $14::int[], $15::text[], $16::bool[])
         AS i(id, kind, version, input, first_step, queue, unique_key, job, job_kind, args,
              priority, max_attempts, timeout_ms, job_key, notify)
     ),
     wf AS (
       INSERT INTO workflows (id, kind, version, state, input, current_step, queue,
                              unique_key, created_at, updated_at)
       SELECT i.id, i.kind, i.version, 'running', i.input, i.first_step, i.queue,
              i.unique_key, t.n, t.n
       FROM i, t
       ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
       RETURNING id
     ),
     job AS (
       INSERT INTO jobs (id, queue, kind, args, state, priority, max_attempts, timeout_ms,
                         run_at, unique_key, workflow_id, workflow_step, created_at)
       SELECT i.job, i.queue, i.job_kind, i.args, 'available'::job_state, i.priority,
              i.max_attempts, i.timeout_ms, t.n, i.job_key, wf.id, i.first_step, t.n
       FROM wf JOIN i ON i.id = wf.id, t
       ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
       RETURNING queue, workflow_id
     ),
     ntf AS (
       SELECT count(pg_notify($17, q.queue)) AS n
       FROM (SELECT DISTINCT job.queue FROM job JOIN i ON i.id = job.workflow_id
             WHERE i.notify) q
     )
     SELECT wf.id, (SELECT n FROM ntf) FROM wf";

/// The holders of taken keys. One index probe per key: a scalar subquery
/// on `unique_key = k` is planned on the partial unique index even in a
/// fresh database, where `unique_key = ANY($1)` (and a join against
/// `unnest`) got a sequential scan as its generic plan.
const HOLDERS_SQL: &str = "SELECT k.k, (SELECT w.id FROM workflows w WHERE w.unique_key = k.k)
     FROM unnest($1::text[]) AS k(k)";

/// Runs one batch; the result is per item, in order.
async fn apply(pool: &PgPool, now: Option<DateTime<Utc>>, batch: &[Request]) -> Vec<Submitted> {
    let unbatched = || batch.iter().map(|_| Submitted::Unbatched).collect();
    let mut conn = match pool.acquire().await {
        Ok(c) => c,
        // Nothing was sent: each caller tries on its own.
        Err(_) => return unbatched(),
    };
    let n = batch.len();
    let mut id = Vec::with_capacity(n);
    let mut kind = Vec::with_capacity(n);
    let mut version = Vec::with_capacity(n);
    let mut input = Vec::with_capacity(n);
    let mut first_step = Vec::with_capacity(n);
    let mut queue = Vec::with_capacity(n);
    let mut unique_key = Vec::with_capacity(n);
    let mut job = Vec::with_capacity(n);
    let mut job_kind = Vec::with_capacity(n);
    let mut args = Vec::with_capacity(n);
    let mut priority = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut timeout_ms = Vec::with_capacity(n);
    let mut job_key = Vec::with_capacity(n);
    let mut notify = Vec::with_capacity(n);
    for (item, _) in batch {
        id.push(item.id);
        kind.push(item.kind);
        version.push(item.version);
        input.push(&item.input);
        first_step.push(item.first_step);
        queue.push(item.queue.as_str());
        unique_key.push(item.unique_key.as_deref());
        job.push(item.job.id);
        job_kind.push(item.job.kind.as_str());
        args.push(&item.job.args);
        priority.push(item.job.priority);
        max_attempts.push(item.job.max_attempts);
        timeout_ms.push(item.job.timeout_ms());
        job_key.push(item.job.unique_key.as_deref());
        notify.push(item.notify);
    }
    // Autocommit: the statement is atomic on its own and commits when it
    // answers; no BEGIN and COMMIT round trips around it.
    let rows: Vec<(Uuid, i64)> = match sqlx::query_as(BATCH_SQL)
        .bind(now)
        .bind(&id)
        .bind(&kind)
        .bind(&version)
        .bind(&input)
        .bind(&first_step)
        .bind(&queue)
        .bind(&unique_key)
        .bind(&job)
        .bind(&job_kind)
        .bind(&args)
        .bind(&priority)
        .bind(&max_attempts)
        .bind(&timeout_ms)
        .bind(&job_key)
        .bind(&notify)
        .bind(crate::notify::JOBS_CHANNEL)
        .fetch_all(&mut *conn)
        .await
    {
        Ok(rows) => rows,
        // Postgres answered with an error: the statement's implicit
        // transaction rolled back and nothing of the batch was written.
        // Which item caused it is not known, so each takes the
        // one-statement path and only that one gets the error.
        Err(sqlx::Error::Database(e)) => {
            tracing::warn!(error = %e, starts = n,
                "batched workflow start refused; each start takes the one-statement path");
            return unbatched();
        }
        // No answer (the connection broke): it may have committed.
        Err(e) => {
            return batch
                .iter()
                .map(|(item, _)| {
                    let kind = match &e {
                        sqlx::Error::Io(io) => io.kind(),
                        _ => std::io::ErrorKind::Other,
                    };
                    let what = format!("the batched start got no answer ({e})");
                    Submitted::Failed(in_doubt(item.id, kind, what))
                })
                .collect();
        }
    };
    let inserted: HashSet<Uuid> = rows.into_iter().map(|(id, _)| id).collect();

    // Items whose key was taken: by a committed instance or by an earlier
    // item of this batch, both visible now that the batch has committed.
    let taken: Vec<&str> = batch
        .iter()
        .filter(|(item, _)| !inserted.contains(&item.id))
        .filter_map(|(item, _)| item.unique_key.as_deref())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let holders: Option<HashMap<String, Option<Uuid>>> = if taken.is_empty() {
        Some(HashMap::new())
    } else {
        match sqlx::query_as::<_, (String, Option<Uuid>)>(HOLDERS_SQL)
            .bind(&taken)
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => Some(rows.into_iter().collect()),
            Err(e) => {
                // Their inserts wrote nothing, so the one-statement path
                // (insert or find the holder) is safe for them.
                tracing::warn!(error = %e, keys = taken.len(),
                    "looking up the holders of taken workflow keys failed; those starts take the one-statement path");
                None
            }
        }
    };
    batch
        .iter()
        .map(|(item, _)| {
            if inserted.contains(&item.id) {
                return Submitted::Started(item.id);
            }
            let Some(key) = item.unique_key.as_deref() else {
                // Only a unique key can keep a row out; a keyless item
                // missing from the answer is a bug, reported as such.
                return Submitted::Failed(Error::Invalid(format!(
                    "the batched start of workflow {} inserted nothing",
                    item.id
                )));
            };
            match holders.as_ref().map(|h| h.get(key).copied().flatten()) {
                Some(Some(holder)) => Submitted::Started(holder),
                Some(None) => Submitted::Failed(Error::Invalid(format!(
                    "workflow unique key {key:?} is taken by an instance that is gone"
                ))),
                None => Submitted::Unbatched,
            }
        })
        .collect()
}

/// The error for a start whose statement may or may not have committed:
/// a connection-level error (transient: retry with the same unique key).
fn in_doubt(id: WorkflowId, kind: std::io::ErrorKind, what: String) -> Error {
    Error::Db(sqlx::Error::Io(std::io::Error::new(
        kind,
        format!("{what}; workflow {id} may or may not have been started"),
    )))
}
