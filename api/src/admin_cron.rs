//! Admin API over cron schedules: list, trigger now, pause and resume.
//!
//! A manual trigger is a `manual` tick row and its job, inserted by the
//! engine in the same transaction as the audit row, so one request starts
//! exactly one job (the tick's unique `(schedule, fire_at)` and the job's
//! unique key guard against a double insert).
use crate::AppState;
use crate::admin::{ActionRequest, log_action, reason};
use crate::auth::{self, AdminKey, Permission};
use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use ledgerflow_engine::cron::CronSchedule;
use ledgerflow_payments::audit::{self, NewEntry};
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use uuid::Uuid;

/// Longest schedule name accepted in a path.
const NAME_MAX: usize = 200;

#[derive(Tags)]
enum Tag {
    /// Cron schedules: list, trigger now, pause and resume.
    Cron,
}

/// A cron schedule as the admin sees it.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct CronView {
    pub name: String,
    /// Cron expression, evaluated in `timezone`.
    pub expression: String,
    pub timezone: String,
    /// all, latest or skip.
    pub catch_up: String,
    pub catch_up_window_secs: i32,
    /// allow or skip.
    pub overlap: String,
    pub job_kind: String,
    pub job_args: serde_json::Value,
    pub job_queue: String,
    pub job_max_attempts: i32,
    /// False while paused.
    pub enabled: bool,
    pub paused_at: Option<DateTime<Utc>>,
    pub next_fire_at: Option<DateTime<Utc>>,
    pub last_fire_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<Uuid>,
    pub updated_at: DateTime<Utc>,
}

impl From<CronSchedule> for CronView {
    fn from(s: CronSchedule) -> Self {
        Self {
            name: s.name,
            expression: s.expression,
            timezone: s.timezone,
            catch_up: s.catch_up.as_str().to_string(),
            catch_up_window_secs: s.catch_up_window_secs,
            overlap: s.overlap.as_str().to_string(),
            job_kind: s.job_kind,
            job_args: s.job_args,
            job_queue: s.job_queue,
            job_max_attempts: s.job_max_attempts,
            enabled: s.enabled,
            paused_at: s.paused_at,
            next_fire_at: s.next_fire_at,
            last_fire_at: s.last_fire_at,
            last_job_id: s.last_job_id,
            updated_at: s.updated_at,
        }
    }
}

/// Every schedule, by name.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct CronList {
    pub schedules: Vec<CronView>,
}

/// What a manual trigger started.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct CronTriggerResult {
    pub schedule: String,
    /// The tick's instant (now).
    pub fire_at: DateTime<Utc>,
    /// The one job the tick enqueued.
    pub job_id: Uuid,
    pub audit_id: Uuid,
}

/// A schedule after pause/resume.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct CronActionResult {
    pub schedule: CronView,
    pub audit_id: Uuid,
}

fn check_name(name: &str) -> Result<()> {
    crate::input::check_text(
        "schedule name",
        name,
        NAME_MAX,
        crate::input::TextKind::Line,
    )?;
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(Error::Validation(format!(
            "schedule name must be 1..={NAME_MAX} bytes"
        )));
    }
    Ok(())
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("cron schedule {name:?} not found"))
}

/// The cron operations of the admin API.
pub struct CronApi;

#[OpenApi]
impl CronApi {
    /// Every cron schedule with its next and last fire times.
    #[oai(
        path = "/v1/cron",
        method = "get",
        operation_id = "list_cron",
        tag = "Tag::Cron"
    )]
    async fn list_cron(&self, state: Data<&AppState>, key: AdminKey) -> Result<Json<CronList>> {
        auth::admin(&state, &key, Permission::Read).await?;
        let schedules = state.store.cron_list().await?;
        Ok(Json(CronList {
            schedules: schedules.into_iter().map(CronView::from).collect(),
        }))
    }

    /// Fires a schedule now: one `manual` tick and its job (also when the
    /// schedule is paused; the overlap policy does not apply).
    #[oai(
        path = "/v1/cron/:name/trigger",
        method = "post",
        operation_id = "trigger_cron",
        tag = "Tag::Cron"
    )]
    async fn trigger_cron(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        name: Path<String>,
        body: Json<ActionRequest>,
    ) -> Result<Json<CronTriggerResult>> {
        let admin = auth::admin(&state, &key, Permission::Operate).await?;
        let why = reason(body.reason.as_str())?;
        let name = name.0;
        check_name(&name)?;
        let mut tx = state.pool().begin().await?;
        if state.store.cron_get_in(&mut tx, &name).await?.is_none() {
            return Err(not_found(&name));
        }
        let tick = state.store.cron_trigger_in(&mut tx, &name).await?;
        let job_id = tick
            .job_id
            .ok_or_else(|| Error::Internal("manual tick without a job".into()))?;
        let audit_id = audit::record(
            &mut *tx,
            &admin,
            &NewEntry {
                action: "cron.trigger",
                target_type: "cron_schedule",
                target_id: &name,
                reason: &why,
                details: serde_json::json!({ "fire_at": tick.fire_at, "job_id": job_id }),
            },
        )
        .await?;
        tx.commit().await?;
        log_action(&admin, "cron.trigger", &name);
        Ok(Json(CronTriggerResult {
            schedule: name,
            fire_at: tick.fire_at,
            job_id,
            audit_id,
        }))
    }

    /// Pauses a schedule: no tick fires until it is resumed (missed ticks
    /// are then handled by its catch-up policy).
    #[oai(
        path = "/v1/cron/:name/pause",
        method = "post",
        operation_id = "pause_cron",
        tag = "Tag::Cron"
    )]
    async fn pause_cron(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        name: Path<String>,
        body: Json<ActionRequest>,
    ) -> Result<Json<CronActionResult>> {
        set_enabled(&state, &key, &name.0, body.reason.as_str(), false).await
    }

    /// Resumes a paused schedule.
    #[oai(
        path = "/v1/cron/:name/resume",
        method = "post",
        operation_id = "resume_cron",
        tag = "Tag::Cron"
    )]
    async fn resume_cron(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        name: Path<String>,
        body: Json<ActionRequest>,
    ) -> Result<Json<CronActionResult>> {
        set_enabled(&state, &key, &name.0, body.reason.as_str(), true).await
    }
}

/// Pauses or resumes a schedule and writes its audit row, in one transaction.
async fn set_enabled(
    state: &AppState,
    key: &AdminKey,
    name: &str,
    reason_text: &str,
    enabled: bool,
) -> Result<Json<CronActionResult>> {
    let admin = auth::admin(state, key, Permission::Operate).await?;
    let why = reason(reason_text)?;
    check_name(name)?;
    let mut tx = state.pool().begin().await?;
    if state.store.cron_get_in(&mut tx, name).await?.is_none() {
        return Err(not_found(name));
    }
    let schedule = if enabled {
        state.store.cron_resume_in(&mut tx, name).await?
    } else {
        state.store.cron_pause_in(&mut tx, name).await?
    };
    let action = if enabled { "cron.resume" } else { "cron.pause" };
    let audit_id = audit::record(
        &mut *tx,
        &admin,
        &NewEntry {
            action,
            target_type: "cron_schedule",
            target_id: name,
            reason: &why,
            details: serde_json::json!({ "enabled": enabled }),
        },
    )
    .await?;
    tx.commit().await?;
    log_action(&admin, action, name);
    Ok(Json(CronActionResult {
        schedule: schedule.into(),
        audit_id,
    }))
}

/// Route templates, for metrics labels.
pub(crate) const ROUTES: &[&str] = &[
    "/v1/cron",
    "/v1/cron/{name}/trigger",
    "/v1/cron/{name}/pause",
    "/v1/cron/{name}/resume",
];
