//! The external call's two records on the step's journal row: its intent, committed before
//! the call is made, and its answer, committed after (contract rule 3). Both run in their own
//! transaction on a pooled connection, never in the step's.
use crate::Store;
use crate::workflow::state::CallState;
use crate::workflow::wire::WorkflowId;
use chrono::{DateTime, Utc};
use serde_json::Value;

/// The call a step is about to make.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Intent<'a> {
    pub workflow_id: WorkflowId,
    pub step: &'a str,
    pub position: i32,
    pub idempotency_key: &'a str,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
}

/// Records the intent (`status = 'calling'`). `Ok(false)` when the step is journaled already
/// (completed, in doubt, compensated): no call may be made.
pub(crate) async fn intent(store: &Store, i: &Intent<'_>) -> Result<bool, sqlx::Error> {
    let recorded: Option<i32> = sqlx::query_scalar(
        "INSERT INTO workflow_steps (workflow_id, step, position, status, idempotency_key,
                                     attempt, started_at, call_state, call_attempt,
                                     call_started_at)
         VALUES ($1, $2, $3, 'calling', $4, $5, $6, 'calling', $5,
                 coalesce($7::timestamptz, now()))
         ON CONFLICT (workflow_id, step) DO UPDATE
         SET status = 'calling', output = NULL, error = NULL, attempt = EXCLUDED.attempt,
             started_at = EXCLUDED.started_at, call_state = 'calling',
             call_attempt = EXCLUDED.call_attempt, call_started_at = EXCLUDED.call_started_at,
             call_finished_at = NULL, call_output = NULL, call_error = NULL
         WHERE workflow_steps.status IN ('failed', 'calling')
         RETURNING 1",
    )
    .bind(i.workflow_id)
    .bind(i.step)
    .bind(i.position)
    .bind(i.idempotency_key)
    .bind(i.attempt)
    .bind(i.started_at)
    .bind(store.now())
    .fetch_optional(store.pool())
    .await?;
    Ok(recorded.is_some())
}

/// What the call answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answer<'a> {
    pub workflow_id: WorkflowId,
    pub step: &'a str,
    pub state: CallState,
    pub output: Option<&'a Value>,
    pub error: Option<&'a str>,
}

/// Records the answer on the step's `calling` row.
pub(crate) async fn answer(store: &Store, a: &Answer<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE workflow_steps
         SET call_state = $3, call_output = $4, call_error = $5,
             call_finished_at = coalesce($6::timestamptz, now())
         WHERE workflow_id = $1 AND step = $2 AND status = 'calling'",
    )
    .bind(a.workflow_id)
    .bind(a.step)
    .bind(a.state.as_str())
    .bind(a.output)
    .bind(a.error)
    .bind(store.now())
    .execute(store.pool())
    .await?;
    Ok(())
}
