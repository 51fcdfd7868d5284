//! Reads of workflow instances and their step journals, for operators, APIs and tests.
use crate::Result;
use crate::workflow::state::{CallState, StepStatus, WorkflowState};
use crate::workflow::wire::WorkflowId;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;

/// A workflow instance as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct WorkflowRow {
    pub id: WorkflowId,
    pub kind: String,
    pub version: i32,
    pub state: String,
    pub input: Value,
    pub output: Option<Value>,
    pub current_step: Option<String>,
    pub wait_reason: Option<String>,
    pub wait_until: Option<DateTime<Utc>>,
    pub queue: String,
    pub unique_key: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The W3C trace context the instance was started under (`None`: tracing was off).
    pub traceparent: Option<String>,
}

impl WorkflowRow {
    /// The id of the trace the instance belongs to (decision 0011).
    pub fn trace_id(&self) -> Option<&str> {
        self.traceparent.as_deref().and_then(crate::trace::trace_id)
    }

    /// The state, parsed.
    pub fn state(&self) -> Result<WorkflowState> {
        self.state.parse()
    }
}

impl StepRow {
    /// The status, parsed.
    pub fn status(&self) -> Result<StepStatus> {
        self.status.parse()
    }

    /// The external call's state, parsed (`None`: the step made no call).
    pub fn call_state(&self) -> Result<Option<CallState>> {
        self.call_state.as_deref().map(str::parse).transpose()
    }
}

/// A journal row of `workflow_steps`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StepRow {
    pub workflow_id: WorkflowId,
    pub step: String,
    /// The step's index in its workflow's definition.
    pub position: i32,
    /// `calling`, `completed`, `failed`, `in_doubt` or `compensated`.
    pub status: String,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub idempotency_key: String,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The external call: `calling` (intent only), `answered`, `rejected`,
    /// `not_sent` or `unknown`.
    pub call_state: Option<String>,
    pub call_output: Option<Value>,
    pub call_error: Option<String>,
    /// Reconcile hook runs in the current in-doubt episode.
    pub reconcile_attempts: i32,
    /// Who settled the in-doubt step: `reconcile` or `admin`.
    pub resolved_by: Option<String>,
    pub compensation_output: Option<Value>,
    /// The last error of a compensation that exhausted its attempts.
    pub compensation_error: Option<String>,
    pub compensated_at: Option<DateTime<Utc>>,
}

/// One workflow instance.
pub async fn workflow_get_in(
    conn: &mut PgConnection,
    id: WorkflowId,
) -> Result<Option<WorkflowRow>> {
    Ok(sqlx::query_as::<_, WorkflowRow>(
        "SELECT id, kind, version, state, input, output, current_step, wait_reason, wait_until,
                queue, unique_key, error, created_at, updated_at, finished_at, traceparent
         FROM workflows WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?)
}

/// An instance's step journal, in the steps' definition order.
pub async fn workflow_steps_in(conn: &mut PgConnection, id: WorkflowId) -> Result<Vec<StepRow>> {
    Ok(sqlx::query_as::<_, StepRow>(
        "SELECT workflow_id, step, position, status, output, error, idempotency_key, attempt,
                started_at, finished_at, call_state, call_output, call_error,
                reconcile_attempts, resolved_by, compensation_output, compensation_error,
                compensated_at
         FROM workflow_steps WHERE workflow_id = $1
         ORDER BY position, step",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?)
}

// --------------------------------------------------------------- execution
