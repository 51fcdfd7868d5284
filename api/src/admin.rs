//! The admin API (its own listener, admin credentials, roles).
//!
//! Reads need [`Permission::Read`]; every mutation needs
//! [`Permission::Operate`] and a non-blank `reason`, and writes exactly one
//! `audit_log` row in the same transaction as the change (DESIGN.md rule 7):
//! the engine's `_in` operations and [`audit::record`] run on one
//! transaction, committed once. A refused mutation (404, 409) rolls the
//! transaction back, so it leaves no audit row either.
//!
//! Listings use keyset pagination with an opaque cursor: base64url of the
//! sort column, direction, the last row's sort key and id
//! ([`crate::admin_params`], with the other parameter parsing). Filters and sort
//! columns are parsed into the engine's typed [`JobFilter`]/[`JobSort`]
//! (a closed set of columns), whose SQL binds every value.
use crate::AppState;
use crate::auth::{self, AdminKey, Permission};
use crate::error::{Error, Result};
use crate::input::{TextKind, check_text};
use crate::types::{FilterText, Reason, Text};
use chrono::{DateTime, Utc};
use ledgerflow_engine::admin_query::{JobFilter, JobSort, JobSortColumn};
use ledgerflow_engine::job::Attempt;
use ledgerflow_engine::{Job, JobState};
use ledgerflow_payments::audit::{self, NewEntry};
use ledgerflow_payments::users::Admin;
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use serde::Serialize;
use std::collections::BTreeMap;
use uuid::Uuid;

/// Default and largest page of a job listing.
const JOBS_PAGE: u32 = 50;
const JOBS_PAGE_MAX: u32 = 200;
/// Default and largest page of the audit log.
const AUDIT_PAGE: u32 = 50;
const AUDIT_PAGE_MAX: u32 = 500;
/// Most jobs one bulk action touches (run it again for the rest).
const BULK_MAX: u32 = 1000;

/// States a bulk retry applies to (retrying an `available` job is a no-op).
const BULK_RETRY_FROM: &[JobState] = &[
    JobState::Scheduled,
    JobState::Retryable,
    JobState::Failed,
    JobState::Cancelled,
    JobState::Discarded,
];
/// States a bulk cancel applies to.
const BULK_CANCEL_FROM: &[JobState] = &[
    JobState::Scheduled,
    JobState::Available,
    JobState::Running,
    JobState::Retryable,
];

#[derive(Tags)]
enum Tag {
    /// Inspect and act on jobs.
    Jobs,
    /// Pause and resume queues.
    Queues,
    /// Who did what, and why.
    Audit,
}

/// A job as the admin sees it.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobView {
    pub id: Uuid,
    pub queue: String,
    pub kind: String,
    pub args: serde_json::Value,
    /// One of scheduled, available, running, retryable, completed, failed,
    /// cancelled, discarded.
    pub state: String,
    pub priority: i16,
    pub attempt: i32,
    pub max_attempts: i32,
    pub timeout_ms: Option<i32>,
    pub run_at: DateTime<Utc>,
    pub unique_key: Option<String>,
    pub workflow_id: Option<Uuid>,
    pub workflow_step: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub attempted_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub completed_by: Option<String>,
}

impl From<Job> for JobView {
    fn from(j: Job) -> Self {
        Self {
            id: j.id,
            queue: j.queue,
            kind: j.kind,
            args: j.args,
            state: j.state.to_string(),
            priority: j.priority,
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            timeout_ms: j.timeout_ms,
            run_at: j.run_at,
            unique_key: j.unique_key,
            workflow_id: j.workflow_id,
            workflow_step: j.workflow_step,
            lease_owner: j.lease_owner,
            lease_expires_at: j.lease_expires_at,
            last_error: j.last_error,
            created_at: j.created_at,
            attempted_at: j.attempted_at,
            finished_at: j.finished_at,
            completed_by: j.completed_by,
        }
    }
}

/// One unsuccessful attempt.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct AttemptView {
    pub attempt: i32,
    pub worker: String,
    /// retry, failed, cancelled, discarded or lease_expired.
    pub outcome: String,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

impl From<Attempt> for AttemptView {
    fn from(a: Attempt) -> Self {
        Self {
            attempt: a.attempt,
            worker: a.worker,
            outcome: a.outcome,
            error: a.error,
            started_at: a.started_at,
            finished_at: a.finished_at,
        }
    }
}

/// A page of jobs.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobPage {
    pub items: Vec<JobView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A job with its attempt history.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobDetail {
    pub job: JobView,
    /// Every recorded unsuccessful attempt, oldest first (the successful
    /// one is described by the job itself).
    pub attempts: Vec<AttemptView>,
}

/// The body of every single-target mutation.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ActionRequest {
    /// Why (required, not blank, at most 1000 characters); kept in the audit log.
    pub reason: Reason,
}

/// A job after an operator action.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobActionResult {
    pub job: JobView,
    /// The audit row written with the change.
    pub audit_id: Uuid,
}

/// Which jobs a bulk action covers. Absent fields match everything.
#[derive(Debug, Clone, Default, Object, Serialize)]
#[oai(skip_serializing_if_is_none)]
pub struct JobFilterBody {
    pub queue: Option<FilterText>,
    pub kind: Option<FilterText>,
    /// Job states; narrowed to those the action applies to.
    pub states: Option<Vec<Text>>,
    /// `created_at >= created_after`.
    pub created_after: Option<DateTime<Utc>>,
    /// `created_at < created_before`.
    pub created_before: Option<DateTime<Utc>>,
    /// Case-insensitive substring of the args' JSON text (matched literally).
    pub q: Option<FilterText>,
}

/// A bulk retry or cancel.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct BulkRequest {
    pub filter: JobFilterBody,
    /// Count what would be affected; change nothing, write no audit row.
    #[oai(default)]
    pub dry_run: bool,
    /// Why (required unless `dry_run`).
    pub reason: Option<Reason>,
    /// At most this many jobs (1..=1000, default 1000); repeat for more.
    #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
    pub limit: Option<u32>,
}

/// What a bulk action did (or would do).
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct BulkResult {
    pub dry_run: bool,
    /// Jobs matching the filter in a state the action applies to (dry run),
    /// or jobs changed.
    pub count: i64,
    /// The jobs changed (empty on a dry run).
    pub job_ids: Vec<Uuid>,
    /// The audit row written with the change (absent on a dry run or when
    /// nothing matched).
    pub audit_id: Option<Uuid>,
}

/// A queue with its counts per state.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct QueueView {
    pub name: String,
    pub paused: bool,
    pub counts: BTreeMap<String, i64>,
}

/// The queues.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct QueueList {
    pub queues: Vec<QueueView>,
}

/// A queue after pause/resume.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct QueueActionResult {
    pub name: String,
    pub paused: bool,
    pub audit_id: Uuid,
}

/// An audit row.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct AuditView {
    pub id: Uuid,
    pub admin_id: Uuid,
    pub admin_name: String,
    pub admin_role: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub reason: String,
    pub details: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

impl From<audit::Entry> for AuditView {
    fn from(e: audit::Entry) -> Self {
        Self {
            id: e.id,
            admin_id: e.admin_id.into(),
            admin_name: e.admin_name,
            admin_role: e.admin_role,
            action: e.action,
            target_type: e.target_type,
            target_id: e.target_id,
            reason: e.reason,
            details: e.details,
            created_at: e.created_at,
        }
    }
}

/// A page of the audit log, newest first.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct AuditPage {
    pub items: Vec<AuditView>,
    pub next_cursor: Option<String>,
}

// Cursors, filters, page limits and reasons: `admin_params` (shared by
// every admin module; re-exported here for them).
pub(crate) use crate::admin_params::{
    AuditCursorWire, check_range, decode_cursor, encode_cursor, filter_from, job_cursor, next_page,
    page_limit, parse_job_cursor, parse_states, reason, text_filter,
};

// ---------------------------------------------------------------- endpoints

/// The admin operations.
pub struct AdminApi;

#[OpenApi]
impl AdminApi {
    /// Lists jobs matching the filters, in a whitelisted order, one page at a time.
    #[oai(
        path = "/v1/jobs",
        method = "get",
        operation_id = "list_jobs",
        tag = "Tag::Jobs"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn list_jobs(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        /// Exact queue name.
        #[oai(validator(
            max_length = 200,
            pattern = r"^[^\x00-\x1F\x7F-\x9F\u00AD\u034F\u061C\u115F\u1160\u17B4\u17B5\u180B-\u180F\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFF8]*$"
        ))]
        queue: Query<Option<String>>,
        /// Exact job kind.
        #[oai(validator(
            max_length = 200,
            pattern = r"^[^\x00-\x1F\x7F-\x9F\u00AD\u034F\u061C\u115F\u1160\u17B4\u17B5\u180B-\u180F\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFF8]*$"
        ))]
        kind: Query<Option<String>>,
        /// Comma-separated job states, e.g. `failed,discarded`.
        #[oai(name = "state")]
        states: Query<Option<String>>,
        /// `created_at >= created_after` (RFC 3339).
        created_after: Query<Option<DateTime<Utc>>>,
        /// `created_at < created_before` (RFC 3339).
        created_before: Query<Option<DateTime<Utc>>>,
        /// Case-insensitive substring of the args' JSON text (matched literally).
        #[oai(validator(
            max_length = 200,
            pattern = r"^[^\x00-\x1F\x7F-\x9F\u00AD\u034F\u061C\u115F\u1160\u17B4\u17B5\u180B-\u180F\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFF8]*$"
        ))]
        q: Query<Option<String>>,
        /// created_at (default), run_at, priority or id.
        sort: Query<Option<String>>,
        /// desc (default) or asc.
        order: Query<Option<String>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Page size, 1..=200 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "200")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<JobPage>> {
        auth::admin(&state, &key, Permission::Read).await?;
        let filter = JobFilter {
            queue: text_filter("queue", queue.0)?,
            kind: text_filter("kind", kind.0)?,
            states: parse_states(states.0.as_deref().unwrap_or("").split(','))?,
            created_from: created_after.0,
            created_to: created_before.0,
            search: text_filter("q", q.0)?,
        };
        check_range(&filter)?;
        let column = match sort.0.as_deref() {
            None | Some("") => JobSortColumn::CreatedAt,
            Some(s) => s.parse().map_err(|_| {
                Error::Validation("sort must be one of created_at, run_at, priority, id".into())
            })?,
        };
        let descending = match order.0.as_deref() {
            None | Some("") | Some("desc") => true,
            Some("asc") => false,
            Some(_) => return Err(Error::Validation("order must be asc or desc".into())),
        };
        let sort = JobSort { column, descending };
        let after = cursor
            .0
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(|c| parse_job_cursor(sort, c))
            .transpose()?;
        let limit = page_limit(limit.0, JOBS_PAGE, JOBS_PAGE_MAX)?;
        let mut jobs = state
            .store
            .job_list(&filter, sort, after.as_ref(), limit + 1)
            .await?;
        let next_cursor = next_page(&mut jobs, limit, |j| job_cursor(sort, j))?;
        Ok(Json(JobPage {
            items: jobs.into_iter().map(JobView::from).collect(),
            next_cursor,
        }))
    }

    /// One job with every recorded attempt.
    #[oai(
        path = "/v1/jobs/:id",
        method = "get",
        operation_id = "get_job",
        tag = "Tag::Jobs"
    )]
    async fn get_job(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
    ) -> Result<Json<JobDetail>> {
        auth::admin(&state, &key, Permission::Read).await?;
        let job = state
            .store
            .job_get(id.0)
            .await?
            .ok_or_else(|| Error::NotFound(format!("job {} not found", id.0)))?;
        let attempts = state.store.job_attempts(id.0).await?;
        Ok(Json(JobDetail {
            job: job.into(),
            attempts: attempts.into_iter().map(AttemptView::from).collect(),
        }))
    }

    /// Makes a job run again now (from scheduled, available, retryable,
    /// failed, cancelled or discarded). 409 for a running or completed job.
    #[oai(
        path = "/v1/jobs/:id/retry",
        method = "post",
        operation_id = "retry_job",
        tag = "Tag::Jobs"
    )]
    async fn retry_job(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
        body: Json<ActionRequest>,
    ) -> Result<Json<JobActionResult>> {
        job_action(&state, &key, id.0, body.reason.as_str(), JobAction::Retry).await
    }

    /// Cancels a job that has not finished; a running attempt is fenced off.
    #[oai(
        path = "/v1/jobs/:id/cancel",
        method = "post",
        operation_id = "cancel_job",
        tag = "Tag::Jobs"
    )]
    async fn cancel_job(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
        body: Json<ActionRequest>,
    ) -> Result<Json<JobActionResult>> {
        job_action(&state, &key, id.0, body.reason.as_str(), JobAction::Cancel).await
    }

    /// Discards a job (makes it a dead letter) unless it completed or was cancelled.
    #[oai(
        path = "/v1/jobs/:id/discard",
        method = "post",
        operation_id = "discard_job",
        tag = "Tag::Jobs"
    )]
    async fn discard_job(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
        body: Json<ActionRequest>,
    ) -> Result<Json<JobActionResult>> {
        job_action(&state, &key, id.0, body.reason.as_str(), JobAction::Discard).await
    }

    /// Retries every job matching a filter (scheduled, retryable, failed,
    /// cancelled, discarded), up to `limit`; `dry_run` only counts.
    #[oai(
        path = "/v1/jobs/bulk-retry",
        method = "post",
        operation_id = "bulk_retry_jobs",
        tag = "Tag::Jobs"
    )]
    async fn bulk_retry(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        body: Json<BulkRequest>,
    ) -> Result<Json<BulkResult>> {
        bulk_action(&state, &key, &body, JobAction::Retry).await
    }

    /// Cancels every unfinished job matching a filter, up to `limit`;
    /// `dry_run` only counts.
    #[oai(
        path = "/v1/jobs/bulk-cancel",
        method = "post",
        operation_id = "bulk_cancel_jobs",
        tag = "Tag::Jobs"
    )]
    async fn bulk_cancel(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        body: Json<BulkRequest>,
    ) -> Result<Json<BulkResult>> {
        bulk_action(&state, &key, &body, JobAction::Cancel).await
    }

    /// Every queue with its counts per state and whether it is paused.
    #[oai(
        path = "/v1/queues",
        method = "get",
        operation_id = "list_queues",
        tag = "Tag::Queues"
    )]
    async fn list_queues(&self, state: Data<&AppState>, key: AdminKey) -> Result<Json<QueueList>> {
        auth::admin(&state, &key, Permission::Read).await?;
        let queues = state.store.queue_list().await?;
        Ok(Json(QueueList {
            queues: queues
                .into_iter()
                .map(|q| QueueView {
                    name: q.name,
                    paused: q.paused,
                    counts: q.counts,
                })
                .collect(),
        }))
    }

    /// Pauses a queue for every worker (in-flight attempts finish).
    #[oai(
        path = "/v1/queues/:name/pause",
        method = "post",
        operation_id = "pause_queue",
        tag = "Tag::Queues"
    )]
    async fn pause_queue(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        name: Path<String>,
        body: Json<ActionRequest>,
    ) -> Result<Json<QueueActionResult>> {
        queue_action(&state, &key, &name.0, body.reason.as_str(), true).await
    }

    /// Resumes a paused queue.
    #[oai(
        path = "/v1/queues/:name/resume",
        method = "post",
        operation_id = "resume_queue",
        tag = "Tag::Queues"
    )]
    async fn resume_queue(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        name: Path<String>,
        body: Json<ActionRequest>,
    ) -> Result<Json<QueueActionResult>> {
        queue_action(&state, &key, &name.0, body.reason.as_str(), false).await
    }

    /// The audit log, newest first.
    #[oai(
        path = "/v1/audit",
        method = "get",
        operation_id = "list_audit",
        tag = "Tag::Audit"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn list_audit(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        /// Only this admin's actions.
        admin_id: Query<Option<Uuid>>,
        /// Exact action, e.g. `job.retry`.
        #[oai(validator(
            max_length = 200,
            pattern = r"^[^\x00-\x1F\x7F-\x9F\u00AD\u034F\u061C\u115F\u1160\u17B4\u17B5\u180B-\u180F\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFF8]*$"
        ))]
        action: Query<Option<String>>,
        /// Exact target type, e.g. `job`.
        #[oai(validator(
            max_length = 200,
            pattern = r"^[^\x00-\x1F\x7F-\x9F\u00AD\u034F\u061C\u115F\u1160\u17B4\u17B5\u180B-\u180F\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFF8]*$"
        ))]
        target_type: Query<Option<String>>,
        /// Exact target id, e.g. a job id.
        #[oai(validator(
            max_length = 200,
            pattern = r"^[^\x00-\x1F\x7F-\x9F\u00AD\u034F\u061C\u115F\u1160\u17B4\u17B5\u180B-\u180F\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFF8]*$"
        ))]
        target_id: Query<Option<String>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Page size, 1..=500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<AuditPage>> {
        auth::admin(&state, &key, Permission::Read).await?;
        let before = cursor
            .0
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(decode_cursor::<AuditCursorWire>)
            .transpose()?
            .map(|c| (c.t, c.id));
        let filter = audit::Filter {
            admin_id: admin_id.0.map(Into::into),
            action: text_filter("action", action.0)?,
            target_type: text_filter("target_type", target_type.0)?,
            target_id: text_filter("target_id", target_id.0)?,
            before,
        };
        let limit = page_limit(limit.0, AUDIT_PAGE, AUDIT_PAGE_MAX)?;
        let mut rows = audit::list(state.pool(), &filter, limit + 1).await?;
        let next_cursor = next_page(&mut rows, limit, |r| {
            encode_cursor(&AuditCursorWire {
                t: r.created_at,
                id: r.id,
            })
        })?;
        Ok(Json(AuditPage {
            items: rows.into_iter().map(AuditView::from).collect(),
            next_cursor,
        }))
    }
}

// --------------------------------------------------------------- mutations

#[derive(Debug, Clone, Copy)]
enum JobAction {
    Retry,
    Cancel,
    Discard,
}

impl JobAction {
    fn name(self) -> &'static str {
        match self {
            JobAction::Retry => "retry",
            JobAction::Cancel => "cancel",
            JobAction::Discard => "discard",
        }
    }
}

/// Authorizes, changes one job and writes its audit row, in one transaction.
async fn job_action(
    state: &AppState,
    key: &AdminKey,
    id: Uuid,
    reason_text: &str,
    action: JobAction,
) -> Result<Json<JobActionResult>> {
    let admin = auth::admin(state, key, Permission::Operate).await?;
    let why = reason(reason_text)?;
    let mut tx = state.pool().begin().await?;
    let job = match action {
        JobAction::Retry => state.store.job_retry_in(&mut tx, id).await?,
        JobAction::Cancel => {
            let msg = format!("cancelled by admin {}: {why}", admin.name);
            state.store.job_cancel_in(&mut tx, id, &msg).await?
        }
        JobAction::Discard => {
            let msg = format!("discarded by admin {}: {why}", admin.name);
            state.store.job_discard_in(&mut tx, id, &msg).await?
        }
    };
    let audit_id = audit::record(
        &mut *tx,
        &admin,
        &NewEntry {
            action: &format!("job.{}", action.name()),
            target_type: "job",
            target_id: &id.to_string(),
            reason: &why,
            details: serde_json::json!({
                "queue": job.queue,
                "kind": job.kind,
                "state_after": job.state,
                "attempt": job.attempt,
                "max_attempts": job.max_attempts,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    log_action(&admin, action.name(), &id.to_string());
    Ok(Json(JobActionResult {
        job: job.into(),
        audit_id,
    }))
}

/// A bulk retry/cancel: the matching ids are locked, each job changed, and
/// one audit row (with the filter and every id) written, all in one transaction.
async fn bulk_action(
    state: &AppState,
    key: &AdminKey,
    body: &BulkRequest,
    action: JobAction,
) -> Result<Json<BulkResult>> {
    let admin = auth::admin(state, key, Permission::Operate).await?;
    let filter = filter_from(&body.filter)?;
    let limit = page_limit(body.limit, BULK_MAX, BULK_MAX)?;
    let allowed = match action {
        JobAction::Retry => BULK_RETRY_FROM,
        JobAction::Cancel | JobAction::Discard => BULK_CANCEL_FROM,
    };
    if body.dry_run {
        let count = state.store.job_count_for_action(&filter, allowed).await?;
        return Ok(Json(BulkResult {
            dry_run: true,
            count,
            job_ids: Vec::new(),
            audit_id: None,
        }));
    }
    let why = reason(body.reason.as_ref().map_or("", Reason::as_str))?;
    let mut tx = state.pool().begin().await?;
    let ids = state
        .store
        .job_ids_for_action_in(&mut tx, &filter, allowed, limit)
        .await?;
    if ids.is_empty() {
        return Ok(Json(BulkResult {
            dry_run: false,
            count: 0,
            job_ids: ids,
            audit_id: None,
        }));
    }
    let msg = format!("{} by admin {} (bulk): {why}", action.name(), admin.name);
    for id in &ids {
        match action {
            JobAction::Retry => state.store.job_retry_in(&mut tx, *id).await?,
            JobAction::Cancel => state.store.job_cancel_in(&mut tx, *id, &msg).await?,
            JobAction::Discard => state.store.job_discard_in(&mut tx, *id, &msg).await?,
        };
    }
    let audit_id = audit::record(
        &mut *tx,
        &admin,
        &NewEntry {
            action: &format!("jobs.bulk_{}", action.name()),
            target_type: "jobs",
            target_id: &format!("bulk:{}", ids.len()),
            reason: &why,
            details: serde_json::json!({
                "filter": body.filter,
                "count": ids.len(),
                "job_ids": ids,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    log_action(
        &admin,
        &format!("bulk_{}", action.name()),
        &ids.len().to_string(),
    );
    Ok(Json(BulkResult {
        dry_run: false,
        count: i64::try_from(ids.len()).unwrap_or(i64::MAX),
        job_ids: ids,
        audit_id: Some(audit_id),
    }))
}

/// Pauses or resumes a queue and writes its audit row, in one transaction.
async fn queue_action(
    state: &AppState,
    key: &AdminKey,
    name: &str,
    reason_text: &str,
    pause: bool,
) -> Result<Json<QueueActionResult>> {
    let admin = auth::admin(state, key, Permission::Operate).await?;
    let why = reason(reason_text)?;
    check_text("queue name", name, 128, TextKind::Line)?;
    if name.is_empty() || name.len() > 128 {
        return Err(Error::Validation("queue name must be 1..=128 bytes".into()));
    }
    let mut tx = state.pool().begin().await?;
    // Only a queue that has jobs or a control row: a typo must not create
    // (and audit) a paused queue nobody serves.
    if !state.store.queue_exists_in(&mut tx, name).await? {
        return Err(Error::NotFound(format!("queue {name:?} not found")));
    }
    if pause {
        state.store.queue_pause_in(&mut tx, name).await?;
    } else {
        state.store.queue_resume_in(&mut tx, name).await?;
    }
    let action = if pause { "queue.pause" } else { "queue.resume" };
    let audit_id = audit::record(
        &mut *tx,
        &admin,
        &NewEntry {
            action,
            target_type: "queue",
            target_id: name,
            reason: &why,
            details: serde_json::json!({ "paused": pause }),
        },
    )
    .await?;
    tx.commit().await?;
    log_action(&admin, action, name);
    Ok(Json(QueueActionResult {
        name: name.to_string(),
        paused: pause,
        audit_id,
    }))
}

pub(crate) fn log_action(admin: &Admin, action: &str, target: &str) {
    tracing::info!(admin = %admin.name, role = admin.role.as_str(), action, target, "admin action");
}

/// The route templates of the admin listener, for metrics labels.
pub(crate) const ROUTES: &[&str] = &[
    "/v1/jobs",
    "/v1/jobs/{id}",
    "/v1/jobs/{id}/retry",
    "/v1/jobs/{id}/cancel",
    "/v1/jobs/{id}/discard",
    "/v1/jobs/bulk-retry",
    "/v1/jobs/bulk-cancel",
    "/v1/queues",
    "/v1/queues/{name}/pause",
    "/v1/queues/{name}/resume",
    "/v1/audit",
    "/healthcheck",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
];
