//! The transitions of a step that did not simply complete: failure and compensation (sagas),
//! doubt about its external call, a re-send of a call never received, and the records of who
//! settled it.
use super::StepAt;
use super::transition::Attempt;
use crate::workflow::state::StepStatus;
use crate::workflow::wire::{Wake, WorkflowId, idempotency_key};
use crate::{Result, Store};
use sqlx::PgConnection;

/// Writes the step's journal row as `status` with `error` (overwriting anything but
/// `completed`). With an attempt, the row records it; without (a reconcile hook's or an
/// admin's settlement) it keeps the step's own attempt and start.
async fn journal_in(
    conn: &mut PgConnection,
    store: &Store,
    at: &StepAt<'_>,
    status: StepStatus,
    error: &str,
    attempt: Option<Attempt>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO workflow_steps (workflow_id, step, position, status, error,
                                     idempotency_key, attempt, started_at, finished_at)
         VALUES ($1, $2, $9, $3, $4, $5, coalesce($6::integer, 1),
                 coalesce($7::timestamptz, $8::timestamptz, now()),
                 coalesce($8::timestamptz, now()))
         ON CONFLICT (workflow_id, step) DO UPDATE
         SET status = EXCLUDED.status, output = NULL, error = EXCLUDED.error,
             attempt = coalesce($6::integer, workflow_steps.attempt),
             started_at = CASE WHEN $6::integer IS NULL THEN workflow_steps.started_at
                               ELSE EXCLUDED.started_at END,
             finished_at = EXCLUDED.finished_at
         WHERE workflow_steps.status <> 'completed'",
    )
    .bind(at.workflow_id)
    .bind(at.step)
    .bind(status.as_str())
    .bind(error)
    .bind(idempotency_key(at.workflow_id, at.step))
    .bind(attempt.map(|a| a.attempt))
    .bind(attempt.map(|a| a.started_at))
    .bind(store.now())
    .bind(at.position)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A step that failed permanently.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Failure<'a> {
    pub at: StepAt<'a>,
    pub error: &'a str,
    /// The attempt that failed (`None`: a reconcile hook's or an admin's verdict).
    pub attempt: Option<Attempt>,
    /// The steps before it that have a compensation, in definition order.
    pub compensable: &'a [&'a str],
}

/// Journals the step as failed; then compensates the completed steps (the workflow goes
/// `compensating`), or fails the workflow when none has a compensation. The caller finishes
/// the job.
pub(crate) async fn fail_step_in(
    conn: &mut PgConnection,
    store: &Store,
    f: &Failure<'_>,
) -> Result<()> {
    journal_in(conn, store, &f.at, StepStatus::Failed, f.error, f.attempt).await?;
    if compensate_next_in(conn, store, &f.at, f.compensable, Some(f.error)).await? {
        return Ok(());
    }
    sqlx::query(
        "UPDATE workflows
         SET state = 'failed', error = $2, wait_reason = NULL, wait_signal_name = NULL,
             wait_correlation_key = NULL, wait_until = NULL, updated_at = t.n, finished_at = t.n
         FROM (SELECT coalesce($3::timestamptz, now()) AS n) t
         WHERE id = $1",
    )
    .bind(f.at.workflow_id)
    .bind(f.error)
    .bind(store.now())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Moves compensation to the latest completed step of `compensable` (steps with a
/// compensation, in definition order): the workflow is `compensating` at that step (with
/// `error` recorded when compensation starts) and its compensation job is enqueued. Without
/// one: when compensation had started (`error` is `None`) the workflow ends `compensated`;
/// returns false when there was nothing to compensate at all.
pub(crate) async fn compensate_next_in(
    conn: &mut PgConnection,
    store: &Store,
    at: &StepAt<'_>,
    compensable: &[&str],
    error: Option<&str>,
) -> Result<bool> {
    let done: Vec<String> = sqlx::query_scalar(
        "SELECT step FROM workflow_steps WHERE workflow_id = $1 AND status = 'completed'",
    )
    .bind(at.workflow_id)
    .fetch_all(&mut *conn)
    .await?;
    let next = compensable
        .iter()
        .rev()
        .find(|s| done.iter().any(|d| d == *s));
    let Some(next) = next else {
        if error.is_some() {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE workflows
             SET state = 'compensated', current_step = NULL, wait_reason = NULL,
                 wait_signal_name = NULL, wait_correlation_key = NULL, wait_until = NULL,
                 updated_at = t.n, finished_at = t.n
             FROM (SELECT coalesce($2::timestamptz, now()) AS n) t
             WHERE id = $1",
        )
        .bind(at.workflow_id)
        .bind(store.now())
        .execute(&mut *conn)
        .await?;
        return Ok(true);
    };
    let seq: i32 = sqlx::query_scalar(
        "UPDATE workflows
         SET state = 'compensating', error = coalesce($3, error), current_step = $2,
             wait_reason = NULL, wait_signal_name = NULL, wait_correlation_key = NULL,
             wait_until = NULL, wait_seq = wait_seq + 1,
             updated_at = coalesce($4::timestamptz, now())
         WHERE id = $1
         RETURNING wait_seq",
    )
    .bind(at.workflow_id)
    .bind(*next)
    .bind(error)
    .bind(store.now())
    .fetch_one(&mut *conn)
    .await?;
    let job = at.job(next, Wake::Compensate { seq }, None);
    store.job_insert_in(conn, &job).await?;
    Ok(true)
}

/// Journals the step's compensation as done with its output, then moves compensation on
/// ([`compensate_next_in`]).
pub(crate) async fn compensated_in(
    conn: &mut PgConnection,
    store: &Store,
    at: &StepAt<'_>,
    (output, attempt): (&serde_json::Value, i32),
    compensable: &[&str],
) -> Result<()> {
    sqlx::query(
        "UPDATE workflow_steps
         SET status = 'compensated', compensation_output = $3, compensation_error = NULL,
             compensation_attempt = $4, compensated_at = coalesce($5::timestamptz, now())
         WHERE workflow_id = $1 AND step = $2",
    )
    .bind(at.workflow_id)
    .bind(at.step)
    .bind(output)
    .bind(attempt)
    .bind(store.now())
    .execute(&mut *conn)
    .await?;
    compensate_next_in(conn, store, at, compensable, None).await?;
    Ok(())
}

/// A compensation exhausted its attempts: its error is journaled and the workflow fails (an
/// operator's retry resumes compensating at this step).
pub(crate) async fn compensation_failed_in(
    conn: &mut PgConnection,
    store: &Store,
    at: &StepAt<'_>,
    (error, attempt): (&str, i32),
) -> Result<()> {
    sqlx::query(
        "UPDATE workflow_steps SET compensation_error = $3, compensation_attempt = $4
         WHERE workflow_id = $1 AND step = $2",
    )
    .bind(at.workflow_id)
    .bind(at.step)
    .bind(error)
    .bind(attempt)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE workflows
         SET state = 'failed', error = $2, updated_at = t.n, finished_at = t.n
         FROM (SELECT coalesce($3::timestamptz, now()) AS n) t
         WHERE id = $1 AND state = 'compensating'",
    )
    .bind(at.workflow_id)
    .bind(format!(
        "compensation of step {:?} failed: {error}",
        at.step
    ))
    .bind(store.now())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A step whose external call's outcome is unknown.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Doubt<'a> {
    pub at: StepAt<'a>,
    pub reason: &'a str,
    pub attempt: Attempt,
    /// Whether the step has a reconcile hook to ask.
    pub reconcile: bool,
}

/// Journals the step as in doubt and parks the workflow (`waiting`, `wait_reason =
/// 'in_doubt:<step>'`); enqueues the first ask of its reconcile hook, if it has one. The
/// caller completes the job.
pub(crate) async fn in_doubt_in(
    conn: &mut PgConnection,
    store: &Store,
    d: &Doubt<'_>,
) -> Result<()> {
    let at = &d.at;
    journal_in(
        conn,
        store,
        at,
        StepStatus::InDoubt,
        d.reason,
        Some(d.attempt),
    )
    .await?;
    sqlx::query(
        "UPDATE workflow_steps
         SET reconcile_attempts = 0, resolved_by = NULL,
             call_state = CASE WHEN call_state = 'calling' THEN 'unknown' ELSE call_state END
         WHERE workflow_id = $1 AND step = $2",
    )
    .bind(at.workflow_id)
    .bind(at.step)
    .execute(&mut *conn)
    .await?;
    let seq: i32 = sqlx::query_scalar(
        "UPDATE workflows
         SET state = 'waiting', wait_reason = 'in_doubt:' || $2, wait_signal_name = NULL,
             wait_correlation_key = NULL, wait_until = NULL, wait_seq = wait_seq + 1,
             updated_at = coalesce($3::timestamptz, now())
         WHERE id = $1
         RETURNING wait_seq",
    )
    .bind(at.workflow_id)
    .bind(at.step)
    .bind(store.now())
    .fetch_one(&mut *conn)
    .await?;
    if d.reconcile {
        let job = at.job(at.step, Wake::Reconcile { seq, n: 1 }, None);
        store.job_insert_in(conn, &job).await?;
    }
    Ok(())
}

/// Settles an in-doubt step whose call the other side never received: the step goes back to
/// `failed` with its call `not_sent` (so its re-run sends the call again under the same
/// idempotency key, as an operator retry does), the workflow runs again at the step, and a job
/// re-runs it. Returns the number of sends so far, or `None` when `max_resends` is used up
/// (nothing written: the caller fails the step).
pub(crate) async fn resend_in(
    conn: &mut PgConnection,
    store: &Store,
    at: &StepAt<'_>,
    (reason, max_resends): (&str, i32),
) -> Result<Option<i32>> {
    let resent: Option<i32> = sqlx::query_scalar(
        "UPDATE workflow_steps
         SET status = 'failed', error = $3, call_state = 'not_sent', call_error = $3,
             call_resends = call_resends + 1
         WHERE workflow_id = $1 AND step = $2 AND status = 'in_doubt' AND call_resends < $4
         RETURNING call_resends",
    )
    .bind(at.workflow_id)
    .bind(at.step)
    .bind(reason)
    .bind(max_resends)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(resent) = resent else {
        return Ok(None);
    };
    let seq: i32 = sqlx::query_scalar(
        "UPDATE workflows
         SET state = 'running', wait_reason = NULL, wait_signal_name = NULL,
             wait_correlation_key = NULL, wait_until = NULL, wait_seq = wait_seq + 1,
             updated_at = coalesce($2::timestamptz, now())
         WHERE id = $1
         RETURNING wait_seq",
    )
    .bind(at.workflow_id)
    .bind(store.now())
    .fetch_one(&mut *conn)
    .await?;
    let job = at.job(at.step, Wake::Retry { seq }, None);
    store.job_insert_in(conn, &job).await?;
    Ok(Some(resent))
}

/// Records who settled an in-doubt step (`reconcile` or `admin`).
pub(crate) async fn mark_resolved_in(
    conn: &mut PgConnection,
    id: WorkflowId,
    step: &str,
    by: &str,
) -> Result<()> {
    sqlx::query("UPDATE workflow_steps SET resolved_by = $3 WHERE workflow_id = $1 AND step = $2")
        .bind(id)
        .bind(step)
        .bind(by)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records how many times the step's reconcile hook has been asked in this episode.
pub(crate) async fn reconcile_asked_in(
    conn: &mut PgConnection,
    id: WorkflowId,
    step: &str,
    n: i32,
) -> Result<()> {
    sqlx::query(
        "UPDATE workflow_steps SET reconcile_attempts = $3 WHERE workflow_id = $1 AND step = $2",
    )
    .bind(id)
    .bind(step)
    .bind(n)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
