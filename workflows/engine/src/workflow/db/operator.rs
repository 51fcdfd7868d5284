//! Operator statements on a workflow: cancel, and retry of a failed one.
use crate::workflow::state::WorkflowState;
use crate::workflow::wire::{WORKFLOW_JOB_KIND, WorkflowId};
use crate::{Result, Store};
use sqlx::{PgConnection, Row};

/// Cancels the workflow if it has not finished, and its pending step jobs. `false` when it
/// had finished already.
pub(crate) async fn cancel_in(
    conn: &mut PgConnection,
    store: &Store,
    id: WorkflowId,
    reason: &str,
) -> Result<bool> {
    let cancelled: Option<WorkflowId> = sqlx::query_scalar(
        "UPDATE workflows
         SET state = 'cancelled', error = $2, wait_reason = NULL, wait_signal_name = NULL,
             wait_correlation_key = NULL, wait_until = NULL, updated_at = t.n, finished_at = t.n
         FROM (SELECT coalesce($3::timestamptz, now()) AS n) t
         WHERE id = $1 AND state IN ('running', 'waiting')
         RETURNING id",
    )
    .bind(id)
    .bind(reason)
    .bind(store.now())
    .fetch_optional(&mut *conn)
    .await?;
    if cancelled.is_none() {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE jobs
         SET state = 'cancelled', finished_at = coalesce($3::timestamptz, now()), last_error = $2
         WHERE workflow_id = $1 AND kind = $4 AND state IN ('scheduled', 'available', 'retryable')",
    )
    .bind(id)
    .bind(reason)
    .bind(store.now())
    .bind(WORKFLOW_JOB_KIND)
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

/// Where a retried workflow resumes.
#[derive(Debug, Clone)]
pub(crate) struct Resumed {
    pub step: String,
    pub queue: String,
    /// The workflow's new `wait_seq` (the retry job's key).
    pub seq: i32,
    /// `Running` (the failed step runs again) or `Compensating` (its compensation does).
    pub state: WorkflowState,
    /// The workflow's trace context, which the resuming job continues (decision 0011).
    pub traceparent: Option<String>,
}

/// Resumes a `failed` workflow: a failed step runs again; a workflow whose compensation
/// exhausted its attempts resumes compensating at that step (its journal row is `completed`).
/// `None` unless the workflow is `failed`. The caller enqueues the job that resumes it.
pub(crate) async fn retry_in(
    conn: &mut PgConnection,
    store: &Store,
    id: WorkflowId,
) -> Result<Option<Resumed>> {
    let row = sqlx::query(
        "UPDATE workflows w
         SET state = CASE WHEN s.status = 'completed' THEN 'compensating' ELSE 'running' END,
             error = CASE WHEN s.status = 'completed' THEN w.error END,
             finished_at = NULL, wait_seq = w.wait_seq + 1,
             updated_at = coalesce($2::timestamptz, now())
         FROM (SELECT w0.id, (SELECT ws.status FROM workflow_steps ws
                              WHERE ws.workflow_id = w0.id AND ws.step = w0.current_step) AS status
               FROM workflows w0 WHERE w0.id = $1 FOR NO KEY UPDATE) s
         WHERE w.id = s.id AND w.state = 'failed' AND w.current_step IS NOT NULL
         RETURNING w.current_step, w.queue, w.wait_seq, w.state, w.traceparent",
    )
    .bind(id)
    .bind(store.now())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(Resumed {
        step: row.try_get(0)?,
        queue: row.try_get(1)?,
        seq: row.try_get(2)?,
        state: row.try_get::<String, _>(3)?.parse()?,
        traceparent: row.try_get(4)?,
    }))
}

/// The status of `step`'s journal row, if it has one.
pub(crate) async fn step_status_in(
    conn: &mut PgConnection,
    id: WorkflowId,
    step: &str,
) -> Result<Option<crate::workflow::state::StepStatus>> {
    let status: Option<String> = sqlx::query_scalar(
        "SELECT status FROM workflow_steps WHERE workflow_id = $1 AND step = $2",
    )
    .bind(id)
    .bind(step)
    .fetch_optional(&mut *conn)
    .await?;
    status.map(|s| s.parse()).transpose()
}
