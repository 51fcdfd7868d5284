//! The statements that lock a workflow for a step and read its journal: one at a time
//! ([`lock_step`], [`lock_workflow`], [`lock_unchanged`]) and many at once for a locked batch
//! ([`lock_batch`]), plus the journal reads that go with them.
use super::Unchanged;
use crate::workflow::state::{CallState, StepStatus, WorkflowState};
use crate::workflow::wire::WorkflowId;
use crate::{Error, FencedTx, JobId, Lease, Result, Store};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use uuid::Uuid;

/// The locked workflow row, as the runtime needs it.
#[derive(Debug, Clone)]
pub(crate) struct Locked {
    pub id: WorkflowId,
    pub kind: String,
    pub version: i32,
    pub state: WorkflowState,
    pub input: Value,
    pub current_step: Option<String>,
    pub wait_signal_name: Option<String>,
    pub wait_correlation_key: Option<String>,
    pub wait_seq: i32,
    pub wait_until: Option<DateTime<Utc>>,
    pub queue: String,
}

impl Locked {
    /// The row as a move on to `step` leaves it (running, no wait).
    pub fn moved_on_to(&mut self, step: &str) {
        self.state = WorkflowState::Running;
        self.current_step = Some(step.to_string());
        self.wait_signal_name = None;
        self.wait_correlation_key = None;
        self.wait_until = None;
    }
}

/// An external call as the step's journal row recorded it.
#[derive(Debug, Clone)]
pub(crate) struct PriorCall {
    pub state: CallState,
    pub output: Option<Value>,
    pub error: Option<String>,
}

/// A step's own journal row.
#[derive(Debug, Clone)]
pub(crate) struct Journaled {
    pub status: StepStatus,
    pub output: Option<Value>,
    pub call: Option<PriorCall>,
}

/// A workflow's journal as one read gives it for one step.
#[derive(Debug, Clone, Default)]
pub(crate) struct Journal {
    /// The step's own row.
    pub own: Option<Journaled>,
    /// Every journaled step (any status).
    pub names: HashSet<String>,
    /// Outputs of the completed (and compensated) steps.
    pub outputs: HashMap<String, Value>,
}

/// The columns [`locked_from_row`] reads, first in a row, of table `$t`.
macro_rules! locked_columns {
    ($t:literal) => {
        concat!(
            $t,
            ".id, ",
            $t,
            ".kind, ",
            $t,
            ".version, ",
            $t,
            ".state, ",
            $t,
            ".input, ",
            $t,
            ".current_step, ",
            $t,
            ".wait_signal_name, ",
            $t,
            ".wait_correlation_key, ",
            $t,
            ".wait_seq, ",
            $t,
            ".wait_until, ",
            $t,
            ".queue"
        )
    };
}

/// The columns [`journal_from_rows`] reads, after [`locked_columns`]: one journal row of the
/// workflow per result row (NULLs when it has none).
macro_rules! journal_columns {
    () => {
        ", s.step, s.status, s.output, s.call_state, s.call_output, s.call_error"
    };
}

/// A workflow row as [`locked_columns`] selected it.
fn locked_from_row(r: &PgRow) -> Result<Locked> {
    let state: String = r.try_get(3)?;
    Ok(Locked {
        id: r.try_get(0)?,
        kind: r.try_get(1)?,
        version: r.try_get(2)?,
        state: state.parse()?,
        input: r.try_get(4)?,
        current_step: r.try_get(5)?,
        wait_signal_name: r.try_get(6)?,
        wait_correlation_key: r.try_get(7)?,
        wait_seq: r.try_get(8)?,
        wait_until: r.try_get(9)?,
        queue: r.try_get(10)?,
    })
}

/// Reads the journal from rows of [`locked_columns`] then [`journal_columns`].
fn journal_from_rows(rows: &[PgRow], step: &str) -> Result<Journal> {
    let mut journal = Journal::default();
    for r in rows {
        let Some(name) = r.try_get::<Option<String>, _>(11)? else {
            continue;
        };
        journal.names.insert(name.clone());
        let status: StepStatus = r.try_get::<String, _>(12)?.parse()?;
        let output: Option<Value> = r.try_get(13)?;
        if status.has_output() {
            journal
                .outputs
                .insert(name.clone(), output.clone().unwrap_or(Value::Null));
        }
        if name == step {
            let call = match r.try_get::<Option<String>, _>(14)? {
                Some(state) => Some(PriorCall {
                    state: state.parse()?,
                    output: r.try_get(15)?,
                    error: r.try_get(16)?,
                }),
                None => None,
            };
            journal.own = Some(Journaled {
                status,
                output,
                call,
            });
        }
    }
    Ok(journal)
}

/// Locks the workflow row (`FOR NO KEY UPDATE`: serializes deliveries and operators like
/// `FOR UPDATE`, but lets an external call's own transaction insert the step's journal row,
/// whose foreign-key check takes `KEY SHARE` on this row).
pub(crate) async fn lock_workflow(
    conn: &mut PgConnection,
    id: WorkflowId,
) -> Result<Option<Locked>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        locked_columns!("workflows"),
        " FROM workflows WHERE id = $1 FOR NO KEY UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(locked_from_row).transpose()
}

/// Locks the job row by id and lease token and the workflow row, and reads the workflow's
/// journal, in ONE statement (one row per journal row): the locked path's first round trip.
/// `Ok(None)` when nothing matched: the lease is stale ([`Error::StaleLease`] is returned
/// instead) or the workflow does not exist.
pub(crate) async fn lock_step(
    tx: &mut FencedTx,
    id: WorkflowId,
    step: &str,
) -> Result<Option<(Locked, Journal)>> {
    let lease = tx.lease().clone();
    let rows = sqlx::query(concat!(
        "SELECT ",
        locked_columns!("w"),
        journal_columns!(),
        "
         FROM jobs j
         JOIN workflows w ON w.id = $3
         LEFT JOIN workflow_steps s ON s.workflow_id = w.id
         WHERE j.id = $1 AND j.lease_token = $2 AND j.state = 'running'
         FOR UPDATE OF j FOR NO KEY UPDATE OF w"
    ))
    .bind(lease.job_id)
    .bind(lease.token)
    .bind(id)
    .fetch_all(tx.conn())
    .await?;
    let Some(first) = rows.first() else {
        // Told apart only now, off the hot path: a lost lease, or no workflow row.
        tx.check_fence().await?;
        return Ok(None);
    };
    Ok(Some((
        locked_from_row(first)?,
        journal_from_rows(&rows, step)?,
    )))
}

/// Opens the step's fenced transaction (failing with [`Error::StaleLease`] when the lease is
/// lost) and locks the workflow row, if the workflow is still where a step that ran without
/// the lock found it ([`Unchanged`]). `None` (rolled back) when it moved.
pub(crate) async fn lock_unchanged(
    store: &Store,
    lease: &Lease,
    at: &Unchanged<'_>,
) -> Result<Option<FencedTx>> {
    let mut tx = FencedTx::begin(store, lease).await?;
    let same: Option<bool> = sqlx::query_scalar(
        "SELECT coalesce(w.state = $2 AND w.current_step = $3 AND w.wait_seq = $4
                         AND NOT EXISTS (SELECT 1 FROM workflow_steps s
                                         WHERE s.workflow_id = w.id AND s.step = $3), false)
         FROM workflows w WHERE w.id = $1 FOR NO KEY UPDATE OF w",
    )
    .bind(at.id)
    .bind(at.state.as_str())
    .bind(at.step)
    .bind(at.wait_seq)
    .fetch_optional(tx.conn())
    .await?;
    if same == Some(true) {
        Ok(Some(tx))
    } else {
        tx.rollback().await?;
        Ok(None)
    }
}

/// The outputs of the completed (and compensated) steps, by name.
pub(crate) async fn load_outputs(
    conn: &mut PgConnection,
    id: WorkflowId,
) -> Result<HashMap<String, Value>> {
    let rows = sqlx::query(
        "SELECT step, output FROM workflow_steps
         WHERE workflow_id = $1 AND status IN ('completed', 'compensated')",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                r.try_get::<Option<Value>, _>(1)?.unwrap_or(Value::Null),
            ))
        })
        .collect()
}

/// The store clock's now, or the database's.
pub(crate) async fn db_now(conn: &mut PgConnection, store: &Store) -> Result<DateTime<Utc>> {
    Ok(
        sqlx::query_scalar("SELECT coalesce($1::timestamptz, now())")
            .bind(store.now())
            .fetch_one(&mut *conn)
            .await?,
    )
}

// ------------------------------------------------------------------ locked batches

/// A delivery asking to be held by a locked batch.
#[derive(Debug, Clone)]
pub(crate) struct HoldRequest {
    pub job_id: JobId,
    pub token: Uuid,
    pub workflow_id: Uuid,
    pub step: String,
}

/// One batch's statement: `r` is the requests (job, lease token, workflow, step, in order);
/// `fenced` locks the job rows that still hold their tokens (a token is set only while its row
/// is `running`, a table constraint); `held` locks the workflow rows whose current step is the
/// requested one, due (running, or asleep on a timer) and without a journal row. Rows locked
/// by another transaction are skipped: their deliveries take the one-at-a-time path. Rows are
/// found by `id = ANY(array)` (see [`super::transition`] on plans) and locked in id order,
/// the order every batch statement uses. No condition on a `state` column is one an index
/// could serve: with such a condition the planner walked the state indexes (every running
/// job, every running workflow) instead of the primary keys. One result row per journal row
/// of a held workflow (or one with NULL journal columns), the request's ordinal last.
const LOCK_BATCH_SQL: &str = concat!(
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
    locked_columns!("h"),
    journal_columns!(),
    ", ready.ord
     FROM ready
     JOIN held h ON h.id = ready.wf AND h.current_step = ready.step
     LEFT JOIN workflow_steps s ON s.workflow_id = h.id
     ORDER BY ready.ord"
);

/// Where [`LOCK_BATCH_SQL`]'s rows carry the request's ordinal: after the workflow's 11
/// locked columns and the journal's 6.
const ORD_COLUMN: usize = 17;

/// What a locked batch holds for one request: the workflow row and its journal (a held step is
/// never journaled, so `own` is always `None`).
pub(crate) type HeldRows = (Locked, Journal);

/// Locks, in the caller's transaction, what it can of `requests` ([`LOCK_BATCH_SQL`]): the
/// rows of each held request by its index in `requests`.
pub(crate) async fn lock_batch(
    conn: &mut PgConnection,
    requests: &[HoldRequest],
) -> Result<HashMap<usize, HeldRows>> {
    let jobs: Vec<Uuid> = requests.iter().map(|r| r.job_id).collect();
    let tokens: Vec<Uuid> = requests.iter().map(|r| r.token).collect();
    let wfs: Vec<Uuid> = requests.iter().map(|r| r.workflow_id).collect();
    let steps: Vec<&str> = requests.iter().map(|r| r.step.as_str()).collect();
    let rows = sqlx::query(LOCK_BATCH_SQL)
        .bind(&jobs)
        .bind(&tokens)
        .bind(&wfs)
        .bind(&steps)
        .fetch_all(&mut *conn)
        .await?;
    let mut by_ord: HashMap<i64, Vec<PgRow>> = HashMap::new();
    for row in rows {
        by_ord
            .entry(row.try_get::<i64, _>(ORD_COLUMN)?)
            .or_default()
            .push(row);
    }
    let mut held = HashMap::with_capacity(by_ord.len());
    for (ord, rows) in by_ord {
        let index = usize::try_from(ord - 1)
            .map_err(|_| Error::Invalid(format!("locked batch ordinal {ord}")))?;
        let (Some(first), Some(request)) = (rows.first(), requests.get(index)) else {
            continue;
        };
        let held_rows = (
            locked_from_row(first)?,
            journal_from_rows(&rows, &request.step)?,
        );
        held.insert(index, held_rows);
    }
    Ok(held)
}

// ------------------------------------------------------------------ waiting transactions

/// The backends waiting for the current transaction's locks, and the transaction's start.
const WAITERS_SQL: &str = "SELECT array_agg(l.pid), statement_timestamp() FROM pg_locks l
     WHERE l.locktype = 'transactionid' AND NOT l.granted
       AND l.transactionid = pg_current_xact_id()::text::xid";

/// Who waits for the locks of the transaction open on `conn`: their pids (none: `None`) and
/// the moment asked. Run just before the commit that frees the locks.
pub(crate) async fn lock_waiters(
    conn: &mut PgConnection,
) -> Result<(Option<Vec<i32>>, DateTime<Utc>)> {
    Ok(sqlx::query_as(WAITERS_SQL).fetch_one(&mut *conn).await?)
}

/// How long a committed transaction waits for the transactions that waited for it (they need
/// milliseconds; the bound only keeps a stuck one from stalling the caller).
const WAITERS_WAIT: Duration = Duration::from_secs(2);

/// Waits until none of `pids` is still in a transaction that began before `since` — so that
/// a transaction that waited for locks just freed (an operator's cancel) gets them before the
/// caller asks again: Postgres hands a freed row to whoever asks first, not to its waiter.
pub(crate) async fn let_waiters_finish(
    pool: &PgPool,
    pids: &[i32],
    since: DateTime<Utc>,
) -> Result<()> {
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
