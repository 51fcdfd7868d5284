//! Admin API over workflows: list (filters, whitelisted sort, opaque
//! cursors), detail with the step journal, retry of the failed step, cancel,
//! and the settlement of `in_doubt` steps by an operator.
//!
//! Same rules as [`crate::admin`]: reads need [`Permission::Read`], every
//! mutation needs [`Permission::Operate`] and a reason, and the engine's
//! `_in` operation and the audit row run on one transaction.
//!
//! "Retry from a step" is deliberately limited to the step the workflow
//! failed at: re-running a step that already completed would repeat its
//! effects (a second exchange order, a second ledger posting), which the
//! contract forbids (DESIGN.md rules 2 and 3).
use crate::AppState;
use crate::admin::{
    ActionRequest, decode_cursor, encode_cursor, log_action, page_limit, reason, text_filter,
};
use crate::auth::{self, AdminKey, Permission};
use crate::error::{Error, Result};
use crate::types::Text;
use chrono::{DateTime, Utc};
use ledgerflow_engine::admin_query::{
    WorkflowCursor, WorkflowFilter, WorkflowSort, WorkflowSortColumn,
};
use ledgerflow_engine::workflow::{StepRow, WorkflowRow, workflow_get_in, workflow_steps_in};
use ledgerflow_engine::{
    Resolution, WorkflowState, workflow_cancel_in, workflow_resolve_in, workflow_retry_in,
};
use ledgerflow_payments::audit::{self, NewEntry};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Default and largest page of a workflow listing.
const PAGE: u32 = 50;
const PAGE_MAX: u32 = 200;
/// Longest step name accepted in a path.
const STEP_MAX: usize = 128;

#[derive(Tags)]
enum Tag {
    /// Inspect workflows and their step journal; retry, cancel, resolve.
    Workflows,
}

/// A workflow instance as the admin sees it.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct WorkflowView {
    pub id: Uuid,
    /// The workflow's kind (its name), e.g. `payments.withdrawal`.
    pub kind: String,
    pub version: i32,
    /// running, waiting, completed, failed, compensating, compensated or cancelled.
    pub state: String,
    pub input: serde_json::Value,
    pub output: Option<serde_json::Value>,
    /// The step that runs next or is waiting (absent once finished).
    pub current_step: Option<String>,
    /// Why it waits: `signal:<name>:<key>`, `timer` or `in_doubt:<step>`.
    pub wait_reason: Option<String>,
    pub wait_until: Option<DateTime<Utc>>,
    pub queue: String,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The id of the trace the workflow was started in (W3C, 32 hex digits), to look it up in
    /// the tracing backend; absent when tracing was off for the process that started it.
    pub trace_id: Option<String>,
}

impl From<WorkflowRow> for WorkflowView {
    fn from(w: WorkflowRow) -> Self {
        let trace_id = w.trace_id().map(str::to_owned);
        Self {
            trace_id,
            id: w.id,
            kind: w.kind,
            version: w.version,
            state: w.state,
            input: w.input,
            output: w.output,
            current_step: w.current_step,
            wait_reason: w.wait_reason,
            wait_until: w.wait_until,
            queue: w.queue,
            error: w.error,
            created_at: w.created_at,
            updated_at: w.updated_at,
            finished_at: w.finished_at,
        }
    }
}

/// One row of the step journal.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct StepView {
    /// The step's name.
    pub step: String,
    /// Its index in the workflow's definition.
    pub position: i32,
    /// calling, completed, failed, in_doubt or compensated.
    pub status: String,
    /// True when the step's external call has an unknown outcome and waits
    /// for its reconcile hook or an operator (`.../resolve`).
    pub in_doubt: bool,
    pub attempt: i32,
    pub output: Option<serde_json::Value>,
    pub error: Option<String>,
    /// The key its external call carries.
    pub idempotency_key: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The external call: calling, answered, rejected, not_sent or unknown.
    pub call_state: Option<String>,
    pub call_error: Option<String>,
    pub reconcile_attempts: i32,
    /// Who settled an in-doubt step: reconcile or admin.
    pub resolved_by: Option<String>,
    pub compensation_error: Option<String>,
    pub compensated_at: Option<DateTime<Utc>>,
}

impl From<StepRow> for StepView {
    fn from(s: StepRow) -> Self {
        Self {
            in_doubt: s.status == "in_doubt",
            step: s.step,
            position: s.position,
            status: s.status,
            attempt: s.attempt,
            output: s.output,
            error: s.error,
            idempotency_key: s.idempotency_key,
            started_at: s.started_at,
            finished_at: s.finished_at,
            call_state: s.call_state,
            call_error: s.call_error,
            reconcile_attempts: s.reconcile_attempts,
            resolved_by: s.resolved_by,
            compensation_error: s.compensation_error,
            compensated_at: s.compensated_at,
        }
    }
}

/// A page of workflows.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct WorkflowPage {
    pub items: Vec<WorkflowView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A workflow with its step journal.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct WorkflowDetail {
    pub workflow: WorkflowView,
    /// The journal, in the definition's step order.
    pub steps: Vec<StepView>,
    /// Names of the steps that are `in_doubt` now.
    pub in_doubt_steps: Vec<String>,
}

/// A workflow after an operator action.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct WorkflowActionResult {
    pub workflow: WorkflowView,
    /// The audit row written with the change.
    pub audit_id: Uuid,
}

/// Retry a failed workflow.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct RetryWorkflowRequest {
    /// Why (required, not blank, at most 1000 characters); kept in the audit log.
    pub reason: crate::types::Reason,
    /// The step to run again; if given it must be the step the workflow
    /// failed at (completed steps are never re-run: their effects happened).
    pub step: Option<Text>,
}

/// How an operator settles an in-doubt step.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ResolveStepRequest {
    /// Why (required); kept in the audit log.
    pub reason: crate::types::Reason,
    /// `succeeded` (the call took effect) or `failed` (it did not: the
    /// workflow compensates its completed steps).
    pub outcome: Text,
    /// The step's output when `succeeded` (default `{}`); what later steps read.
    pub output: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CursorWire {
    s: String,
    d: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<DateTime<Utc>>,
    id: Uuid,
}

fn cursor_of(sort: WorkflowSort, row: &WorkflowRow) -> Result<String> {
    let c = WorkflowCursor::after(row, sort.column);
    encode_cursor(&CursorWire {
        s: sort.column.as_str().to_string(),
        d: sort.descending,
        t: c.time,
        id: c.id,
    })
}

fn parse_cursor(sort: WorkflowSort, text: &str) -> Result<WorkflowCursor> {
    let w: CursorWire = decode_cursor(text)?;
    if w.s != sort.column.as_str() || w.d != sort.descending {
        return Err(Error::Validation(
            "cursor belongs to a different sort order".into(),
        ));
    }
    match (sort.column, w.t) {
        (WorkflowSortColumn::Id, None) => Ok(WorkflowCursor {
            time: None,
            id: w.id,
        }),
        (WorkflowSortColumn::CreatedAt | WorkflowSortColumn::UpdatedAt, Some(t)) => {
            Ok(WorkflowCursor {
                time: Some(t),
                id: w.id,
            })
        }
        _ => Err(Error::Validation("cursor is malformed".into())),
    }
}

fn parse_states(text: &str) -> Result<Vec<WorkflowState>> {
    let mut out = Vec::new();
    for s in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let state: WorkflowState = s.parse().map_err(|_| {
            Error::Validation(format!(
                "state must be a comma-separated list of: {}",
                WorkflowState::ALL.map(WorkflowState::as_str).join(", ")
            ))
        })?;
        if !out.contains(&state) {
            out.push(state);
        }
    }
    Ok(out)
}

fn check_step(step: &str) -> Result<()> {
    crate::input::check_text("step", step, STEP_MAX, crate::input::TextKind::Line)?;
    if step.is_empty() || step.len() > STEP_MAX {
        return Err(Error::Validation(format!(
            "step must be 1..={STEP_MAX} bytes"
        )));
    }
    Ok(())
}

/// The workflow operations of the admin API.
pub struct WorkflowsApi;

#[OpenApi]
impl WorkflowsApi {
    /// Lists workflows matching the filters, in a whitelisted order, one page at a time.
    #[oai(
        path = "/v1/workflows",
        method = "get",
        operation_id = "list_workflows",
        tag = "Tag::Workflows"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn list_workflows(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        /// Exact workflow kind (name), e.g. `payments.withdrawal`.
        #[oai(validator(
            max_length = 200,
            pattern = r"^[^\x00-\x1F\x7F-\x9F\u00AD\u034F\u061C\u115F\u1160\u17B4\u17B5\u180B-\u180F\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFF8]*$"
        ))]
        kind: Query<Option<String>>,
        /// Comma-separated states, e.g. `failed,waiting`.
        #[oai(name = "state")]
        states: Query<Option<String>>,
        /// `created_at >= created_after` (RFC 3339).
        created_after: Query<Option<DateTime<Utc>>>,
        /// `created_at < created_before` (RFC 3339).
        created_before: Query<Option<DateTime<Utc>>>,
        /// created_at (default), updated_at or id.
        sort: Query<Option<String>>,
        /// desc (default) or asc.
        order: Query<Option<String>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Page size, 1..=200 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "200")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<WorkflowPage>> {
        auth::admin(&state, &key, Permission::Read).await?;
        let filter = WorkflowFilter {
            kind: text_filter("kind", kind.0)?,
            states: parse_states(states.0.as_deref().unwrap_or(""))?,
            created_from: created_after.0,
            created_to: created_before.0,
        };
        if let (Some(from), Some(to)) = (filter.created_from, filter.created_to)
            && from > to
        {
            return Err(Error::Validation(
                "created_after is later than created_before".into(),
            ));
        }
        let column = match sort.0.as_deref() {
            None | Some("") => WorkflowSortColumn::CreatedAt,
            Some(s) => s.parse().map_err(|_| {
                Error::Validation("sort must be one of created_at, updated_at, id".into())
            })?,
        };
        let descending = match order.0.as_deref() {
            None | Some("") | Some("desc") => true,
            Some("asc") => false,
            Some(_) => return Err(Error::Validation("order must be asc or desc".into())),
        };
        let sort = WorkflowSort { column, descending };
        let after = cursor
            .0
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(|c| parse_cursor(sort, c))
            .transpose()?;
        let limit = page_limit(limit.0, PAGE, PAGE_MAX)?;
        let mut rows = state
            .store
            .workflow_list(&filter, sort, after.as_ref(), limit + 1)
            .await?;
        let next_cursor = crate::admin::next_page(&mut rows, limit, |r| cursor_of(sort, r))?;
        Ok(Json(WorkflowPage {
            items: rows.into_iter().map(WorkflowView::from).collect(),
            next_cursor,
        }))
    }

    /// One workflow with its step journal (in-doubt steps flagged).
    #[oai(
        path = "/v1/workflows/:id",
        method = "get",
        operation_id = "get_workflow",
        tag = "Tag::Workflows"
    )]
    async fn get_workflow(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
    ) -> Result<Json<WorkflowDetail>> {
        auth::admin(&state, &key, Permission::Read).await?;
        // One snapshot for the row and its journal.
        let mut tx = state.pool().begin().await?;
        let workflow = workflow_get_in(&mut tx, id.0)
            .await?
            .ok_or_else(|| not_found(id.0))?;
        let steps = workflow_steps_in(&mut tx, id.0).await?;
        tx.commit().await?;
        let in_doubt_steps = steps
            .iter()
            .filter(|s| s.status == "in_doubt")
            .map(|s| s.step.clone())
            .collect();
        Ok(Json(WorkflowDetail {
            workflow: workflow.into(),
            steps: steps.into_iter().map(StepView::from).collect(),
            in_doubt_steps,
        }))
    }

    /// Runs a failed workflow's failed step again (or resumes its failed
    /// compensation). 409 unless the workflow is `failed`.
    #[oai(
        path = "/v1/workflows/:id/retry",
        method = "post",
        operation_id = "retry_workflow",
        tag = "Tag::Workflows"
    )]
    async fn retry_workflow(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
        body: Json<RetryWorkflowRequest>,
    ) -> Result<Json<WorkflowActionResult>> {
        let admin = auth::admin(&state, &key, Permission::Operate).await?;
        let why = reason(body.reason.as_str())?;
        let id = id.0;
        let mut tx = state.pool().begin().await?;
        let before = workflow_get_in(&mut tx, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        if let Some(step) = &body.step {
            check_step(step.as_str())?;
            if before.current_step.as_deref() != Some(step.as_str()) {
                return Err(Error::Conflict(format!(
                    "workflow {id} can only be retried from its failed step ({}); \
                     completed steps are never re-run",
                    before.current_step.as_deref().unwrap_or("none")
                )));
            }
        }
        if !workflow_retry_in(&mut tx, &state.store, id).await? {
            return Err(Error::Conflict(format!(
                "workflow {id} is {}; only a failed workflow can be retried",
                before.state
            )));
        }
        let after = workflow_get_in(&mut tx, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        let audit_id = audit::record(
            &mut *tx,
            &admin,
            &NewEntry {
                action: "workflow.retry",
                target_type: "workflow",
                target_id: &id.to_string(),
                reason: &why,
                details: serde_json::json!({
                    "kind": after.kind,
                    "step": before.current_step,
                    "state_before": before.state,
                    "state_after": after.state,
                }),
            },
        )
        .await?;
        tx.commit().await?;
        log_action(&admin, "workflow.retry", &id.to_string());
        Ok(Json(WorkflowActionResult {
            workflow: after.into(),
            audit_id,
        }))
    }

    /// Cancels a workflow that has not finished; its pending step jobs are
    /// cancelled. 409 when it already finished.
    #[oai(
        path = "/v1/workflows/:id/cancel",
        method = "post",
        operation_id = "cancel_workflow",
        tag = "Tag::Workflows"
    )]
    async fn cancel_workflow(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
        body: Json<ActionRequest>,
    ) -> Result<Json<WorkflowActionResult>> {
        let admin = auth::admin(&state, &key, Permission::Operate).await?;
        let why = reason(body.reason.as_str())?;
        let id = id.0;
        let mut tx = state.pool().begin().await?;
        let before = workflow_get_in(&mut tx, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        let msg = format!("cancelled by admin {}: {why}", admin.name);
        if !workflow_cancel_in(&mut tx, &state.store, id, &msg).await? {
            return Err(Error::Conflict(format!(
                "workflow {id} is {}; it cannot be cancelled",
                before.state
            )));
        }
        let after = workflow_get_in(&mut tx, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        let audit_id = audit::record(
            &mut *tx,
            &admin,
            &NewEntry {
                action: "workflow.cancel",
                target_type: "workflow",
                target_id: &id.to_string(),
                reason: &why,
                details: serde_json::json!({
                    "kind": after.kind,
                    "state_before": before.state,
                    "current_step": before.current_step,
                }),
            },
        )
        .await?;
        tx.commit().await?;
        log_action(&admin, "workflow.cancel", &id.to_string());
        Ok(Json(WorkflowActionResult {
            workflow: after.into(),
            audit_id,
        }))
    }

    /// Settles an `in_doubt` step: `succeeded` completes it with `output`
    /// and moves on; `failed` fails it (the workflow compensates). 409 when
    /// the step is not in doubt (already settled, or never was).
    #[oai(
        path = "/v1/workflows/:id/steps/:step/resolve",
        method = "post",
        operation_id = "resolve_workflow_step",
        tag = "Tag::Workflows"
    )]
    async fn resolve_step(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
        step: Path<String>,
        body: Json<ResolveStepRequest>,
    ) -> Result<Json<WorkflowActionResult>> {
        let admin = auth::admin(&state, &key, Permission::Operate).await?;
        let why = reason(body.reason.as_str())?;
        check_step(&step.0)?;
        let resolution = match body.outcome.as_str() {
            "succeeded" => {
                Resolution::Succeeded(body.output.clone().unwrap_or_else(|| serde_json::json!({})))
            }
            "failed" => {
                if body.output.is_some() {
                    return Err(Error::Validation(
                        "output is only accepted with outcome succeeded".into(),
                    ));
                }
                Resolution::Failed(format!("resolved failed by admin {}: {why}", admin.name))
            }
            _ => {
                return Err(Error::Validation(
                    "outcome must be succeeded or failed".into(),
                ));
            }
        };
        // Without the definitions the engine cannot move the workflow on.
        let registry = state.workflows.clone().ok_or(Error::Unavailable)?;
        let id = id.0;
        let mut tx = state.pool().begin().await?;
        if workflow_get_in(&mut tx, id).await?.is_none() {
            return Err(not_found(id));
        }
        if !workflow_resolve_in(&mut tx, &state.store, &registry, id, &step.0, resolution).await? {
            return Err(Error::Conflict(format!(
                "step {:?} of workflow {id} is not in doubt",
                step.0
            )));
        }
        let after = workflow_get_in(&mut tx, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        let audit_id = audit::record(
            &mut *tx,
            &admin,
            &NewEntry {
                action: "workflow.resolve_step",
                target_type: "workflow",
                target_id: &id.to_string(),
                reason: &why,
                details: serde_json::json!({
                    "kind": after.kind,
                    "step": step.0,
                    "outcome": body.outcome.as_str(),
                    "output": body.output,
                    "state_after": after.state,
                }),
            },
        )
        .await?;
        tx.commit().await?;
        log_action(&admin, "workflow.resolve_step", &id.to_string());
        Ok(Json(WorkflowActionResult {
            workflow: after.into(),
            audit_id,
        }))
    }
}

fn not_found(id: Uuid) -> Error {
    Error::NotFound(format!("workflow {id} not found"))
}

/// Route templates, for metrics labels.
pub(crate) const ROUTES: &[&str] = &[
    "/v1/workflows",
    "/v1/workflows/{id}",
    "/v1/workflows/{id}/retry",
    "/v1/workflows/{id}/cancel",
    "/v1/workflows/{id}/steps/{step}/resolve",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_cursors_are_strict() {
        assert!(parse_states("failed,waiting").is_ok());
        assert!(parse_states("failed' OR '1'='1").is_err());
        let sort = WorkflowSort::default();
        assert!(parse_cursor(sort, "'; DROP TABLE workflows; --").is_err());
        let text = encode_cursor(&CursorWire {
            s: "created_at".into(),
            d: true,
            t: Some(Utc::now()),
            id: Uuid::now_v7(),
        })
        .unwrap_or_default();
        assert!(parse_cursor(sort, &text).is_ok());
        let by_id = WorkflowSort {
            column: WorkflowSortColumn::Id,
            descending: true,
        };
        assert!(parse_cursor(by_id, &text).is_err());
    }
}
