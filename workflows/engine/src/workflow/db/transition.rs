//! The forward transition — journal a completed step, move the workflow on to its successor
//! (or complete it), and enqueue the successor's job or move the step's own job row on to it —
//! in the three shapes the execution paths need, side by side:
//!
//! - [`checkpoint_in`]: one step, one statement, a new job for the successor (or none when
//!   the workflow completes); optionally fenced by the step job's lease, which it completes.
//!   The locked path's checkpoint, a reconcile hook's and an admin's resolution.
//! - [`checkpoint_move_in`]: one step whose successor runs in the same delivery: the step's job
//!   row is moved on to the successor under the same lease token. The locked path's inline
//!   continuation.
//! - [`checkpoint_batch_in`]: many steps of many workflows in one statement over arrays, each
//!   item fenced and re-checked inside it, its job row moved on in place (HOT) or completed.
//!   The group committer's and the locked batches' checkpoint.
//!
//! They share their journal upsert ([`journal_completed_on_conflict`]); that the rest of what
//! they write agrees is proven by the engine's conformance suite
//! (`workflows/engine/tests/conformance/`), which runs every workflow behaviour under each
//! execution configuration — and so through each of these shapes — and compares the rows. The
//! one difference by design is the moved job row: [`checkpoint_move_in`] gives it the
//! successor's unique key and `run_at` (an index change), [`checkpoint_batch_in`] keeps them so
//! Postgres updates the row in place.
use super::StepAt;
use crate::workflow::wire::idempotency_key;
use crate::{Error, JobId, Result, Store};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// Where a completed step leads.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Next<'a> {
    /// The workflow completes with the step's output.
    Finish,
    /// On to `step`, due at `run_at` (a durable timer) or now.
    Advance {
        step: &'a str,
        run_at: Option<DateTime<Utc>>,
    },
}

/// The attempt that ran a step, as its journal row records it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempt {
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
}

/// A job row and the lease token that must still hold it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fence {
    pub job_id: JobId,
    pub token: Uuid,
}

/// A step's completion for [`checkpoint_in`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Checkpoint<'a> {
    pub at: StepAt<'a>,
    pub output: &'a Value,
    pub next: Next<'a>,
    /// The attempt to journal; `None` keeps the row's own (a reconcile hook's or an admin's
    /// resolution of an in-doubt step).
    pub attempt: Option<Attempt>,
    /// The step job to complete with it; `None`: no job is touched.
    pub fence: Option<Fence>,
    /// Whether the successor's job (when due now) is announced with NOTIFY.
    pub notify: bool,
}

/// The journal upsert's conflict clause for a step that completed: a row left by an earlier
/// attempt (an intent, a failure, a doubt) is overwritten, a `completed` row never. `$attempt`
/// and `$started` say which attempt the row keeps.
macro_rules! journal_completed_on_conflict {
    ($attempt:literal, $started:literal) => {
        concat!(
            "
       ON CONFLICT (workflow_id, step) DO UPDATE
       SET status = EXCLUDED.status, output = EXCLUDED.output, error = NULL,
           attempt = ",
            $attempt,
            ", started_at = ",
            $started,
            ",
           finished_at = EXCLUDED.finished_at
       WHERE workflow_steps.status <> 'completed'"
        )
    };
}

/// The start of the one-step statements: "now" as `t` (`$4`) and the step's journal row as
/// completed — workflow `$1`, step `$2` at position `$3` with output `$5`, key `$6`, attempt
/// `$7` started at `$8` (both NULL: the row keeps its own).
macro_rules! step_journal_sql {
    () => {
        concat!(
            "WITH t AS (SELECT coalesce($4::timestamptz, now()) AS n),
             journal AS (
               INSERT INTO workflow_steps (workflow_id, step, position, status, output,
                                           idempotency_key, attempt, started_at, finished_at)
               SELECT $1, $2, $3, 'completed', $5, $6, coalesce($7::integer, 1),
                      coalesce($8::timestamptz, t.n), t.n FROM t",
            journal_completed_on_conflict!(
                "CASE WHEN $7::integer IS NULL THEN workflow_steps.attempt ELSE EXCLUDED.attempt END",
                "CASE WHEN $7::integer IS NULL THEN workflow_steps.started_at ELSE EXCLUDED.started_at END"
            ),
            "
             ),"
        )
    };
}

/// The one-step checkpoint: `$workflow` updates the workflow row, `$next` enqueues the next
/// step's job (and its NOTIFY) or is empty, `$select` selects the NOTIFY count (or 0). The
/// job part completes job `$9` if it still holds lease token `$10` (none when NULL).
macro_rules! checkpoint_sql {
    ($workflow:literal, $next:literal, $select:literal) => {
        concat!(
            step_journal_sql!(),
            "
             done AS (
               UPDATE jobs j
               SET state = 'completed', finished_at = t.n, completed_by = j.lease_owner,
                   lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
               FROM t
               WHERE j.id = $9 AND j.lease_token = $10 AND j.state = 'running'
               RETURNING j.id
             ),
             wf AS (",
            $workflow,
            ")",
            $next,
            " SELECT (SELECT count(*) FROM done), ",
            $select
        )
    };
}

/// [`checkpoint_sql`] for a step with a successor (`$11` its name, `$12` whether it waits for
/// `$13`, a timer; `$24` the trace context its job continues). The job part inserts what `Store::job_insert_in` inserts for a step job.
const ADVANCE_SQL: &str = checkpoint_sql!(
    "UPDATE workflows
     SET state = CASE WHEN $12 THEN 'waiting' ELSE 'running' END,
         wait_reason = CASE WHEN $12 THEN 'timer' END,
         wait_signal_name = NULL, wait_correlation_key = NULL, wait_until = $13::timestamptz,
         current_step = $11, updated_at = t.n
     FROM t WHERE id = $1",
    ", next AS (
       INSERT INTO jobs (id, queue, kind, args, state, priority, max_attempts, timeout_ms,
                         run_at, unique_key, workflow_id, workflow_step, created_at,
                         traceparent)
       SELECT $14, $15, $16, $17,
              CASE WHEN coalesce($13::timestamptz, t.n) <= t.n THEN 'available'::job_state
                   ELSE 'scheduled'::job_state END,
              $18, $19, $20, coalesce($13::timestamptz, t.n), $21, $1, $11, t.n, $24
       FROM t
       ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
       RETURNING state, queue
     ),
     ntf AS (
       SELECT count(pg_notify($22, queue)) AS n
       FROM (SELECT DISTINCT queue FROM next WHERE $23 AND state = 'available') q
     )",
    "(SELECT n FROM ntf)"
);

/// [`checkpoint_sql`] for the last step: the workflow completes with `$5`.
const FINISH_SQL: &str = checkpoint_sql!(
    "UPDATE workflows
     SET state = 'completed', output = $5, current_step = NULL, wait_reason = NULL,
         wait_signal_name = NULL, wait_correlation_key = NULL, wait_until = NULL,
         updated_at = t.n, finished_at = t.n
     FROM t WHERE id = $1",
    "",
    "0::bigint"
);

/// Binds `$1`–`$10` of the one-step statements.
fn bind_journal<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    store: &Store,
    at: &StepAt<'q>,
    output: &'q Value,
    attempt: Option<Attempt>,
    fence: Option<Fence>,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    query
        .bind(at.workflow_id)
        .bind(at.step)
        .bind(at.position)
        .bind(store.now())
        .bind(output)
        .bind(idempotency_key(at.workflow_id, at.step))
        .bind(attempt.map(|a| a.attempt))
        .bind(attempt.map(|a| a.started_at))
        .bind(fence.map(|f| f.job_id))
        .bind(fence.map(|f| f.token))
}

/// Journals the step completed and moves the workflow on (enqueueing the successor's job) or
/// completes it, and completes the fenced job — ONE statement, on the caller's connection (in
/// their transaction, if one is open). Returns whether the fenced job was completed (`false`
/// without a fence, or when the lease is stale: the caller then rolls back).
pub(crate) async fn checkpoint_in(
    conn: &mut PgConnection,
    store: &Store,
    cp: &Checkpoint<'_>,
) -> Result<bool> {
    let sql = match cp.next {
        Next::Finish => FINISH_SQL,
        Next::Advance { .. } => ADVANCE_SQL,
    };
    let query = bind_journal(
        sqlx::query_as::<_, (i64, i64)>(sql),
        store,
        &cp.at,
        cp.output,
        cp.attempt,
        cp.fence,
    );
    let next_job;
    let query = match cp.next {
        Next::Finish => query,
        Next::Advance { step, run_at } => {
            next_job = cp.at.job(step, crate::workflow::wire::Wake::Entry, run_at);
            next_job.validate()?;
            query
                .bind(step)
                .bind(run_at.is_some())
                .bind(run_at)
                .bind(next_job.id)
                .bind(&next_job.queue)
                .bind(&next_job.kind)
                .bind(&next_job.args)
                .bind(next_job.priority)
                .bind(next_job.max_attempts)
                .bind(next_job.timeout_ms())
                .bind(&next_job.unique_key)
                .bind(crate::notify::JOBS_CHANNEL)
                .bind(cp.notify)
                .bind(&next_job.traceparent)
        }
    };
    let (completed, _notified) = query.fetch_one(&mut *conn).await?;
    Ok(completed > 0)
}

/// A step whose successor runs in the same delivery, for [`checkpoint_move_in`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Move<'a> {
    pub at: StepAt<'a>,
    pub output: &'a Value,
    pub attempt: Attempt,
    pub fence: Fence,
    /// The successor, its job arguments and unique key.
    pub next_step: &'a str,
    pub next_args: &'a Value,
    pub next_key: Option<&'a str>,
    /// How far the moved row's lease is extended.
    pub ttl_ms: i64,
}

/// The inline move: the journal row and the workflow row as in [`ADVANCE_SQL`] (due now, so
/// `running`), and instead of a new job and the completion of this one, this job row moved on
/// to the successor (`$11`, its arguments `$12`, budget `$13`, unique key `$14`) under the
/// same lease token, its lease extended by `$15` ms. Returns the row's new `attempted_at`,
/// NULL when the lease is stale, and whether a transaction waits for this one's locks. The
/// successor takes the unique key a new job would have had, so a re-delivery of an earlier
/// step (which enqueues the successor by that key) finds it; another row holding that key
/// already stands for the successor, and the moved row then takes none (both serialize on the
/// workflow row, and the later finds the step done).
const MOVE_SQL: &str = concat!(
    step_journal_sql!(),
    "
     moved AS (
       UPDATE jobs j
       SET args = $12, workflow_step = $11, max_attempts = $13,
           unique_key = CASE WHEN EXISTS (SELECT 1 FROM jobs o WHERE o.unique_key = $14)
                             THEN NULL ELSE $14 END,
           run_at = t.n, attempted_at = t.n,
           lease_expires_at = t.n + $15 * interval '1 millisecond'
       FROM t
       WHERE j.id = $9 AND j.lease_token = $10 AND j.state = 'running'
       RETURNING j.attempted_at
     ),
     wf AS (
       UPDATE workflows
       SET state = 'running', wait_reason = NULL, wait_signal_name = NULL,
           wait_correlation_key = NULL, wait_until = NULL, current_step = $11, updated_at = t.n
       FROM t WHERE id = $1
     )
     SELECT (SELECT attempted_at FROM moved),
            EXISTS (SELECT 1 FROM pg_locks l
                    WHERE l.locktype = 'transactionid' AND NOT l.granted
                      AND l.transactionid = pg_current_xact_id()::text::xid)"
);

/// Runs [`MOVE_SQL`] in the caller's transaction: `None` when the lease is stale (nothing
/// applies; roll back), else the moved row's `attempted_at` and whether another transaction
/// waits for this one's locks.
pub(crate) async fn checkpoint_move_in(
    conn: &mut PgConnection,
    store: &Store,
    m: &Move<'_>,
) -> Result<Option<(DateTime<Utc>, bool)>> {
    let query = bind_journal(
        sqlx::query_as::<_, (Option<DateTime<Utc>>, bool)>(MOVE_SQL),
        store,
        &m.at,
        m.output,
        Some(m.attempt),
        Some(m.fence),
    );
    let (attempted_at, contended) = query
        .bind(m.next_step)
        .bind(m.next_args)
        .bind(m.at.max_attempts)
        .bind(m.next_key)
        .bind(m.ttl_ms)
        .fetch_one(&mut *conn)
        .await?;
    Ok(attempted_at.map(|at| (at, contended)))
}

/// One step's checkpoint in a batch ([`checkpoint_batch_in`]).
#[derive(Debug)]
pub(crate) struct BatchItem {
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
    /// The successor the job row moves on to, or `None` to complete the workflow with
    /// `output` and the job.
    pub next: Option<BatchNext>,
}

/// The successor a batched checkpoint moves its job row on to.
#[derive(Debug)]
pub(crate) struct BatchNext {
    pub step: String,
    pub args: Value,
    pub max_attempts: i32,
}

/// What became of a batched checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Committed; the job row now runs the successor, its lease's `attempted_at` is this.
    Moved(DateTime<Utc>),
    /// Committed; the workflow and the job completed.
    Finished,
    /// Not applied (stale lease, the workflow changed, or the statement failed): nothing of
    /// it was written.
    Rejected,
}

/// The batch statement. `i` is the items; `fenced` and `current` lock their job and workflow
/// rows (in id order, so two batches cannot deadlock on each other; by id alone: a `state`
/// condition there made the planner walk the state index over every running job); `ok` is the
/// items whose job row holds their lease token (set only while the row is `running`) and whose
/// workflow row is still where their step found it; the rest write nothing. Every row is found
/// by `id = ANY(array)`, which the planner serves from the primary key even with the
/// statistics of an empty table (a statement prepared early in a fresh database keeps its
/// generic plan, and joins against `unnest` were planned as sequential scans there).
///
/// The move changes no indexed column (the row keeps its `unique_key` and `run_at`; its
/// `state` and `finished_at` are set to what they were), so Postgres updates it in place (HOT)
/// instead of adding an entry to each of the job table's indexes. Moves and completions are
/// ONE update (`moved`, a `CASE` per column): every table a statement writes costs it the
/// preparation of that table's CHECK constraints, per write.
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
    journal_completed_on_conflict!("EXCLUDED.attempt", "EXCLUDED.started_at"),
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

/// Runs [`BATCH_SQL`] for `batch` on `conn` (atomic on its own in autocommit, or in the
/// caller's transaction); the result is per item, in order, and with `ask_waiters` whether
/// another transaction waits for one of that transaction's locks (`false` when not asked or
/// nothing was applied).
pub(crate) async fn checkpoint_batch_in(
    conn: &mut PgConnection,
    now: Option<DateTime<Utc>>,
    ttl_ms: i64,
    batch: &[&BatchItem],
    ask_waiters: bool,
) -> std::result::Result<(Vec<Applied>, bool), sqlx::Error> {
    let wf: Vec<Uuid> = batch.iter().map(|i| i.workflow_id).collect();
    let step: Vec<&str> = batch.iter().map(|i| i.step.as_str()).collect();
    let pos: Vec<i32> = batch.iter().map(|i| i.position).collect();
    let idem: Vec<&str> = batch.iter().map(|i| i.idempotency_key.as_str()).collect();
    let output: Vec<&Value> = batch.iter().map(|i| &i.output).collect();
    let attempt: Vec<i32> = batch.iter().map(|i| i.attempt).collect();
    let started: Vec<DateTime<Utc>> = batch.iter().map(|i| i.started_at).collect();
    let job: Vec<Uuid> = batch.iter().map(|i| i.job_id).collect();
    let token: Vec<Uuid> = batch.iter().map(|i| i.token).collect();
    let state: Vec<&str> = batch.iter().map(|i| i.state).collect();
    let wait_seq: Vec<i32> = batch.iter().map(|i| i.wait_seq).collect();
    let next_step: Vec<Option<&str>> = batch
        .iter()
        .map(|i| i.next.as_ref().map(|x| x.step.as_str()))
        .collect();
    let next_args: Vec<Option<&Value>> = batch
        .iter()
        .map(|i| i.next.as_ref().map(|x| &x.args))
        .collect();
    let next_max: Vec<Option<i32>> = batch
        .iter()
        .map(|i| i.next.as_ref().map(|x| x.max_attempts))
        .collect();
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
            // A successor without its moved row cannot happen (the move updates the very row
            // that was fenced). Were it to, the caller's re-check under lock finds the
            // workflow moved on and retries the job, whose row then stands for the successor.
            (Some(None), Some(_)) => Applied::Rejected,
        })
        .collect();
    Ok((applied, waiting))
}

/// The error of a checkpoint whose fence did not hold.
pub(crate) fn stale(fence: Fence) -> Error {
    Error::StaleLease {
        job_id: fence.job_id,
        token: fence.token,
    }
}
