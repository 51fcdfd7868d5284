//! Group commit of workflow starts (layer 3): many callers' `WorkflowRuntime::start`s in one statement and one commit.
//!
//! A start used to be one autocommit statement of its own (the workflow row, its first step's
//! job, the NOTIFY), so every start paid a statement, a commit and a WAL flush. Concurrent
//! starts (the API, webhooks, benchmark starters) now hand their rows to a background task
//! which, like the checkpointer (`checkpoint`), sends whatever piled up while the previous
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
//!   the one-statement path (`db::start::start_in`) on its own, so only the item that caused
//!   the error gets it. A failure that leaves the outcome unknown (the connection broke
//!   while the statement ran) is reported to every caller, as the one-statement path
//!   reports it to its one caller: retrying with the same unique key is safe;
//! - a caller that gave up (dropped its future) before its batch went out gets nothing
//!   written, as a dropped one-statement start did.
//!
//! Starts inside a caller's transaction (`WorkflowRuntime::start_in`,
//! `WorkflowRuntime::start_for_inbox_in`) are not batched: they commit with the caller's writes.
use super::{Stop, recv_batch};
use crate::job::NewJob;
use crate::workflow::db::start::{NewStart, key_holders_in, start_batch_in};
use crate::workflow::wire::WorkflowId;
use crate::{Clock, Error};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
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
    /// The instance's workflow-wide flow key.
    pub flow_key: Option<String>,
    /// The first step's job (due now; its queue is `queue`).
    pub job: NewJob,
    /// Whether the job's queue is woken with NOTIFY (the store's setting;
    /// stores that differ only in it share one batcher).
    pub notify: bool,
}

impl Item {
    /// The start as the statements take it.
    fn as_start(&self) -> NewStart<'_> {
        NewStart {
            id: self.id,
            kind: self.kind,
            version: self.version,
            input: &self.input,
            first_step: self.first_step,
            queue: &self.queue,
            unique_key: self.unique_key.as_deref(),
            flow_key: self.flow_key.as_deref(),
            job: &self.job,
            notify: self.notify,
        }
    }
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
    pub(crate) fn start(
        pool: PgPool,
        clock: Arc<dyn Clock>,
        mut stop: Stop,
    ) -> (Self, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        let task = tokio::spawn(async move {
            let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
            // Whatever piled up while the previous batch was in flight (at least one).
            while recv_batch(&mut rx, &mut batch, MAX_BATCH, &mut stop).await > 0 {
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
        (Self { tx }, task)
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

/// Runs one batch; the result is per item, in order.
async fn apply(pool: &PgPool, now: Option<DateTime<Utc>>, batch: &[Request]) -> Vec<Submitted> {
    let unbatched = || batch.iter().map(|_| Submitted::Unbatched).collect();
    let mut conn = match pool.acquire().await {
        Ok(c) => c,
        // Nothing was sent: each caller tries on its own.
        Err(_) => return unbatched(),
    };
    let n = batch.len();
    let starts: Vec<NewStart<'_>> = batch.iter().map(|(item, _)| item.as_start()).collect();
    // Autocommit: the statement is atomic on its own and commits when it
    // answers; no BEGIN and COMMIT round trips around it.
    let rows = match start_batch_in(&mut conn, now, &starts).await {
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
    let inserted: HashSet<Uuid> = rows.into_iter().collect();

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
        match key_holders_in(&mut conn, &taken).await {
            Ok(holders) => Some(holders),
            Err(e) => {
                // Their inserts wrote nothing, so the one-statement path
                // (insert or find the holder) is safe for them.
                tracing::warn!(error = %e, keys = taken.len(),
                    "looking up the holders of taken workflow keys failed; those starts take the one-statement path");
                None
            }
        }
    };
    answers(batch, &inserted, holders.as_ref())
}

/// Each item's answer, from the instances the batch inserted and the holders of the keys it
/// found taken (`None`: not known).
fn answers(
    batch: &[Request],
    inserted: &HashSet<Uuid>,
    holders: Option<&HashMap<String, Option<Uuid>>>,
) -> Vec<Submitted> {
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
            match holders.map(|h| h.get(key).copied().flatten()) {
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
