//! Group commit of workflow step checkpoints (layer 3): many workflows' steps in one statement and one commit.
//!
//! A step that ran without touching the database (no `db()`, no external call) needs nothing
//! but its checkpoint: the journal row, the workflow row moved on (or completed) and its job
//! row moved on to the successor (or completed). [`Checkpointer::submit`] hands that to a
//! background task which, like the runner's completer, sends whatever piled up while the
//! previous batch was in flight as ONE statement over arrays and commits once. Under load one
//! commit carries dozens of steps; at idle a checkpoint waits for nothing.
//!
//! Each item is still fenced and checked on its own, inside the statement: its job row must
//! hold the item's lease token and be `running`, and its workflow row must still be in the
//! state and on the step the step ran against (an operator may have cancelled it meanwhile).
//! Both rows are locked (job first, then workflow: the order `FencedTx` and `lock_workflow`
//! use) before anything is written, and an item that fails either check writes nothing. So
//! every step's journal row, its workflow's move and its successor commit together and only
//! under a current lease (contract rule 2); other workflows' checkpoints merely share the
//! commit. An item the batch did not apply — a failed check or a failed statement — is
//! reported back, and its caller takes the one-at-a-time path, which locks and re-checks.
use super::conn::BatchConn;
use super::{Stop, recv_batch};
use crate::Clock;
use crate::workflow::db::transition::{Applied, BatchItem, checkpoint_batch_in};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Most checkpoints in one statement.
const MAX_BATCH: usize = 256;

type Request = (BatchItem, oneshot::Sender<Applied>);

/// Handle on the batching task; cheap to clone. The task ends when every
/// handle is gone.
#[derive(Debug, Clone)]
pub(crate) struct Checkpointer {
    tx: mpsc::UnboundedSender<Request>,
}

impl Checkpointer {
    /// Starts the batching task on the current runtime.
    pub(crate) fn start(
        pool: PgPool,
        clock: Arc<dyn Clock>,
        lease_ttl: Duration,
        mut stop: Stop,
    ) -> (Self, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        let ttl_ms = crate::store::ms(lease_ttl);
        let task = tokio::spawn(async move {
            let mut conn = BatchConn::new(pool);
            let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
            // Whatever piled up while the previous batch was in flight (at least one).
            while recv_batch(&mut rx, &mut batch, MAX_BATCH, &mut stop).await > 0 {
                let results = match apply(&mut conn, clock.now(), ttl_ms, &batch).await {
                    Ok(r) => r,
                    Err(e) => {
                        conn.discard();
                        tracing::warn!(error = %e, steps = batch.len(),
                            "batched checkpoint failed; each step takes the one-at-a-time path");
                        vec![Applied::Rejected; batch.len()]
                    }
                };
                for ((_, reply), applied) in batch.drain(..).zip(results) {
                    // The caller may have given up (its task was dropped).
                    let _ = reply.send(applied);
                }
            }
        });
        (Self { tx }, task)
    }

    /// Checkpoints `item` in the next batch. `Rejected` when the batch did
    /// not apply it or the task is gone (a runtime that shut down).
    pub(crate) async fn submit(&self, item: BatchItem) -> Applied {
        let (reply, answer) = oneshot::channel();
        if self.tx.send((item, reply)).is_err() {
            return Applied::Rejected;
        }
        answer.await.unwrap_or(Applied::Rejected)
    }
}

/// Runs one batch as one statement, atomic on its own (no BEGIN and COMMIT round trips
/// around it); the result is per item, in order.
async fn apply(
    conn: &mut BatchConn,
    now: Option<DateTime<Utc>>,
    ttl_ms: i64,
    batch: &[Request],
) -> Result<Vec<Applied>, sqlx::Error> {
    let items: Vec<&BatchItem> = batch.iter().map(|(item, _)| item).collect();
    let (applied, _) = checkpoint_batch_in(conn.get().await?, now, ttl_ms, &items, false).await?;
    Ok(applied)
}
