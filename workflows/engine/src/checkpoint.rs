//! Group commit of workflow step checkpoints: many workflows' steps in one statement and one commit.
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
use crate::Clock;
use crate::JobId;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Most checkpoints in one statement.
const MAX_BATCH: usize = 256;

/// One step's checkpoint.
#[derive(Debug)]
pub(crate) struct Item {
    pub workflow_id: Uuid,
    /// The step that ran, its position and journal idempotency key.
    pub step: String,
    pub position: i32,
    pub idempotency_key: String,
    pub output: Value,
    /// The attempt that ran it (journaled) and when it started.
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    /// The job row and the lease token that must still hold it.
    pub job_id: JobId,
    pub token: Uuid,
    /// The workflow row as the step ran against it: state and `wait_seq`.
    pub state: &'static str,
    pub wait_seq: i32,
    /// The successor the job row moves on to, or `None` to complete the
    /// workflow with `output` and the job.
    pub next: Option<Next>,
}

/// The successor a checkpoint moves its job row on to.
#[derive(Debug)]
pub(crate) struct Next {
    pub step: String,
    pub args: Value,
    pub max_attempts: i32,
}

/// What became of an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Committed; the job row now runs the successor, its lease's
    /// `attempted_at` is this.
    Moved(DateTime<Utc>),
    /// Committed; the workflow and the job completed.
    Finished,
    /// Not applied (stale lease, the workflow changed, or the statement
    /// failed): nothing of it was written.
    Rejected,
}

type Request = (Item, oneshot::Sender<Applied>);

/// The connection a batching task (this one, `crate::held`) runs its statements on: its own,
/// outside the pool, with sequential scans priced out of its plans (`enable_seqscan = off`).
///
/// Why: a connection keeps a prepared statement's generic plan, made from the statistics of
/// the moment. Planned while a table was small (a fresh database, the minute before
/// autovacuum first analyzes it), a batch statement's lookups by `id = ANY(array)` became
/// sequential scans, and stayed so while the table grew: measured at ~2.5× the Postgres time
/// per workflow, depending on which pooled connection happened to plan first. Every lookup
/// of these statements has an index, so the setting only removes the bad choice; on a pooled
/// connection it would leak to every other statement.
pub(crate) struct BatchConn {
    pool: PgPool,
    conn: Option<sqlx::PgConnection>,
}

impl BatchConn {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool, conn: None }
    }

    /// The connection, (re)opened if there is none.
    pub(crate) async fn get(&mut self) -> Result<&mut sqlx::PgConnection, sqlx::Error> {
        use sqlx::ConnectOptions;
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let mut conn = self.pool.connect_options().connect().await?;
                sqlx::query("SET enable_seqscan = off")
                    .execute(&mut conn)
                    .await?;
                conn
            }
        };
        Ok(self.conn.insert(conn))
    }

    /// Forgets the connection after an error (it may be broken); the next use opens another.
    pub(crate) fn discard(&mut self) {
        self.conn = None;
    }
}

/// Handle on the batching task; cheap to clone. The task ends when every
/// handle is gone.
#[derive(Debug, Clone)]
pub(crate) struct Checkpointer {
    tx: mpsc::UnboundedSender<Request>,
}

impl Checkpointer {
    /// Starts the batching task on the current runtime.
    pub(crate) fn start(pool: PgPool, clock: Arc<dyn Clock>, lease_ttl: Duration) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        let ttl_ms = crate::store::ms(lease_ttl);
        tokio::spawn(async move {
            let mut conn = BatchConn::new(pool);
            let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
            // Whatever piled up while the previous batch was in flight (at least one).
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
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
        Self { tx }
    }

    /// Checkpoints `item` in the next batch. `Rejected` when the batch did
    /// not apply it or the task is gone (a runtime that shut down).
    pub(crate) async fn submit(&self, item: Item) -> Applied {
        let (reply, answer) = oneshot::channel();
        if self.tx.send((item, reply)).is_err() {
            return Applied::Rejected;
        }
        answer.await.unwrap_or(Applied::Rejected)
    }
}

/// The journal upsert's conflict clause for a step that completed: a row
/// left by an earlier attempt (an intent, a failure) is overwritten, a
/// `completed` row never. Shared by every checkpoint statement (here and in
/// `workflow.rs`), which differ only in where their rows come from.
macro_rules! journal_completed_on_conflict {
    () => {
        "
       ON CONFLICT (workflow_id, step) DO UPDATE
       SET status = EXCLUDED.status, output = EXCLUDED.output, error = NULL,
           attempt = EXCLUDED.attempt, started_at = EXCLUDED.started_at,
           finished_at = EXCLUDED.finished_at
       WHERE workflow_steps.status <> 'completed'"
    };
}
pub(crate) use journal_completed_on_conflict;

/// The batch statement. `i` is the items; `fenced` and `current` lock their
/// job and workflow rows (in id order, so two batches cannot deadlock on
/// each other; by id alone: a `state` condition there made the planner walk
/// the state index over every running job); `ok` is the items whose job row
/// holds their lease token (set only while the row is `running`) and
/// whose workflow row is still where their step found it; the rest write
/// nothing. Every row is found by `id = ANY(array)`, which the planner
/// serves from the primary key even with the statistics of an empty table
/// (a statement prepared early in a fresh database keeps its generic plan,
/// and joins against `unnest` were planned as sequential scans there).
///
/// The journal upsert and the completions say what `CHECKPOINT_MOVE_SQL` and
/// `CHECKPOINT_FINISH_SQL` in `workflow.rs` say, per row; keep them in step.
/// The move differs on purpose: it changes no indexed column (the row keeps
/// its `unique_key` and `run_at`; its `state` and `finished_at` are set to
/// what they were), so Postgres updates it in place (HOT) instead of adding
/// an entry to each of the job table's indexes; the row keeps the unique key
/// of the step it was moved on to under the lock. Moves and completions are
/// ONE update (`moved`, a `CASE` per column): every table a statement writes
/// costs it the preparation of that table's CHECK constraints, per write.
const BATCH_SQL: &str = concat!(
    "WITH t AS (SELECT coalesce($1::timestamptz, now()) AS n),
     i AS (
       SELECT * FROM unnest($2::uuid[], $3::text[], $4::int[], $5::text[], $6::jsonb[],
                            $7::int[], $8::timestamptz[], $9::uuid[], $10::uuid[], $11::text[],
                            $12::int[], $13::text[], $14::jsonb[], $15::int[])
         AS i(wf, step, pos, idem, output, attempt, started, job, token, state, wait_seq,
              next_step, next_args, next_max)
     ),
     fenced AS (
       SELECT j.id, j.lease_token FROM jobs j
       WHERE j.id = ANY($9::uuid[])
       ORDER BY j.id
       FOR UPDATE
     ),
     current AS (
       SELECT w.id, w.state, w.current_step, w.wait_seq FROM workflows w
       WHERE w.id = ANY($2::uuid[])
       ORDER BY w.id
       FOR NO KEY UPDATE
     ),
     ok AS (
       SELECT i.* FROM i
       JOIN fenced f ON f.id = i.job AND f.lease_token = i.token
       JOIN current c ON c.id = i.wf AND c.state = i.state AND c.current_step = i.step
                     AND c.wait_seq = i.wait_seq
     ),
     journal AS (
       INSERT INTO workflow_steps (workflow_id, step, position, status, output,
                                   idempotency_key, attempt, started_at, finished_at)
       SELECT ok.wf, ok.step, ok.pos, 'completed', ok.output, ok.idem, ok.attempt, ok.started, t.n
       FROM ok, t
",
    journal_completed_on_conflict!(),
    "
     ),
     moved AS (
       UPDATE jobs j
       SET args = CASE WHEN ok.next_step IS NULL THEN j.args ELSE ok.next_args END,
           workflow_step = coalesce(ok.next_step, j.workflow_step),
           max_attempts = coalesce(ok.next_max, j.max_attempts),
           attempted_at = CASE WHEN ok.next_step IS NULL THEN j.attempted_at ELSE t.n END,
           lease_expires_at = CASE WHEN ok.next_step IS NULL THEN NULL
                                   ELSE t.n + $16 * interval '1 millisecond' END,
           state = CASE WHEN ok.next_step IS NULL THEN 'completed'::job_state ELSE j.state END,
           finished_at = CASE WHEN ok.next_step IS NULL THEN t.n ELSE j.finished_at END,
           completed_by = CASE WHEN ok.next_step IS NULL THEN j.lease_owner
                               ELSE j.completed_by END,
           lease_owner = CASE WHEN ok.next_step IS NULL THEN NULL ELSE j.lease_owner END,
           lease_token = CASE WHEN ok.next_step IS NULL THEN NULL ELSE j.lease_token END
       FROM ok, t
       WHERE j.id = ok.job AND j.id = ANY($9::uuid[])
       RETURNING j.id, CASE WHEN ok.next_step IS NOT NULL THEN j.attempted_at END AS attempted_at
     ),
     wf AS (
       UPDATE workflows w
       SET state = CASE WHEN ok.next_step IS NULL THEN 'completed' ELSE 'running' END,
           output = CASE WHEN ok.next_step IS NULL THEN ok.output ELSE w.output END,
           finished_at = CASE WHEN ok.next_step IS NULL THEN t.n ELSE w.finished_at END,
           current_step = ok.next_step, wait_reason = NULL, wait_signal_name = NULL,
           wait_correlation_key = NULL, wait_until = NULL, updated_at = t.n
       FROM ok, t
       WHERE w.id = ok.wf AND w.id = ANY($2::uuid[])
     )
     SELECT ok.job, m.attempted_at,
            CASE WHEN $17 THEN EXISTS (SELECT 1 FROM pg_locks l
                                       WHERE l.locktype = 'transactionid' AND NOT l.granted
                                         AND l.transactionid = pg_current_xact_id()::text::xid)
                 ELSE false END
     FROM ok LEFT JOIN moved m ON m.id = ok.job"
);

/// Runs one batch as one statement, atomic on its own (no BEGIN and COMMIT
/// round trips around it); the result is per item, in order.
async fn apply(
    conn: &mut BatchConn,
    now: Option<DateTime<Utc>>,
    ttl_ms: i64,
    batch: &[Request],
) -> Result<Vec<Applied>, sqlx::Error> {
    let items: Vec<&Item> = batch.iter().map(|(item, _)| item).collect();
    let (applied, _) = apply_in(conn.get().await?, now, ttl_ms, &items, false).await?;
    Ok(applied)
}

/// Runs [`BATCH_SQL`] for `items` on `conn` (in the caller's transaction,
/// if one is open); the result is per item, in order. The locked batches of
/// first steps (`crate::held`) run it in the transaction that already holds
/// their rows, and with `ask_waiters` learn in the same round trip whether
/// another transaction waits for one of that transaction's locks (the
/// second value; `false` when not asked or nothing was applied).
pub(crate) async fn apply_in(
    conn: &mut sqlx::PgConnection,
    now: Option<DateTime<Utc>>,
    ttl_ms: i64,
    batch: &[&Item],
    ask_waiters: bool,
) -> Result<(Vec<Applied>, bool), sqlx::Error> {
    let n = batch.len();
    let mut wf = Vec::with_capacity(n);
    let mut step = Vec::with_capacity(n);
    let mut pos = Vec::with_capacity(n);
    let mut idem = Vec::with_capacity(n);
    let mut output = Vec::with_capacity(n);
    let mut attempt = Vec::with_capacity(n);
    let mut started = Vec::with_capacity(n);
    let mut job = Vec::with_capacity(n);
    let mut token = Vec::with_capacity(n);
    let mut state = Vec::with_capacity(n);
    let mut wait_seq = Vec::with_capacity(n);
    let mut next_step = Vec::with_capacity(n);
    let mut next_args = Vec::with_capacity(n);
    let mut next_max = Vec::with_capacity(n);
    for item in batch {
        wf.push(item.workflow_id);
        step.push(item.step.as_str());
        pos.push(item.position);
        idem.push(item.idempotency_key.as_str());
        output.push(&item.output);
        attempt.push(item.attempt);
        started.push(item.started_at);
        job.push(item.job_id);
        token.push(item.token);
        state.push(item.state);
        wait_seq.push(item.wait_seq);
        next_step.push(item.next.as_ref().map(|x| x.step.as_str()));
        next_args.push(item.next.as_ref().map(|x| &x.args));
        next_max.push(item.next.as_ref().map(|x| x.max_attempts));
    }
    let rows: Vec<(Uuid, Option<DateTime<Utc>>, bool)> = sqlx::query_as(BATCH_SQL)
        .bind(now)
        .bind(&wf)
        .bind(&step)
        .bind(&pos)
        .bind(&idem)
        .bind(&output)
        .bind(&attempt)
        .bind(&started)
        .bind(&job)
        .bind(&token)
        .bind(&state)
        .bind(&wait_seq)
        .bind(&next_step)
        .bind(&next_args)
        .bind(&next_max)
        .bind(ttl_ms)
        .bind(ask_waiters)
        .fetch_all(&mut *conn)
        .await?;
    let waiting = rows.iter().any(|(_, _, waiting)| *waiting);
    let applied: std::collections::HashMap<Uuid, Option<DateTime<Utc>>> =
        rows.into_iter().map(|(job, at, _)| (job, at)).collect();
    let applied = batch
        .iter()
        .map(|item| match (applied.get(&item.job_id), &item.next) {
            (None, _) => Applied::Rejected,
            (Some(_), None) => Applied::Finished,
            (Some(Some(at)), Some(_)) => Applied::Moved(*at),
            // A successor without its moved row cannot happen (the move
            // updates the very row that was fenced). Were it to, the caller's
            // re-check under lock finds the workflow moved on and retries the
            // job, whose row then stands for the successor.
            (Some(None), Some(_)) => Applied::Rejected,
        })
        .collect();
    Ok((applied, waiting))
}
