//! Admin API over dead letters, of both kinds:
//! - Kafka messages that ingress could not apply (`dead_letters` table):
//!   list, inspect, redrive. A redrive marks the row redriven and writes the
//!   original message (key, payload, headers) to the outbox for its original
//!   topic, in one transaction with the audit row; the relay then publishes
//!   it and ingress consumes it again like any new message. A second redrive
//!   of the same row is a 409, so one request re-publishes it once. A letter
//!   whose payload was cut to its limit cannot be redriven (409). Its copy to
//!   the dead-letter topic is published by the ingress' copier; while the
//!   topic refuses it the row shows why, and an operator can make the next
//!   try due at once (`copy-retry`, audited).
//! - jobs that ran out of attempts or were discarded (`failed`, `discarded`):
//!   list and redrive (the job runs again with one more attempt).
use crate::AppState;
use crate::admin::{
    ActionRequest, JobView, decode_cursor, encode_cursor, job_cursor, log_action, page_limit,
    parse_job_cursor, reason, text_filter,
};
use crate::auth::{self, AdminKey, Permission};
use crate::error::{Error, Result};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use ledgerflow_engine::admin_query::{DeadLetterFilter, JobFilter, JobSort};
use ledgerflow_engine::dead_letter::{
    DeadLetter, dead_letter_copy_retry_in, dead_letter_redrive_in,
};
use ledgerflow_engine::outbox::{NewOutboxEvent, outbox_insert_in};
use ledgerflow_engine::{Job, JobState};
use ledgerflow_payments::audit::{self, NewEntry};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const PAGE: u32 = 50;
const PAGE_MAX: u32 = 200;
/// The job states that make a job a dead letter.
const DEAD_JOB_STATES: [JobState; 2] = [JobState::Failed, JobState::Discarded];
/// The header a redriven message carries: the dead letter it came from.
pub const REDRIVE_HEADER: &str = "ledgerflow-redrive-of";

#[derive(Tags)]
enum Tag {
    /// Dead letters: Kafka messages and jobs that could not be processed.
    DeadLetters,
}

/// A Kafka message that could not be applied.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct DeadLetterView {
    pub id: i64,
    /// Where it came from, e.g. `kafka:<topic>`.
    pub source: String,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    /// The key as UTF-8 text, when it is valid UTF-8.
    pub key: Option<String>,
    /// The key's bytes, base64 (standard alphabet).
    pub key_base64: Option<String>,
    /// The payload as UTF-8 text, when it is valid UTF-8.
    pub payload: Option<String>,
    /// The payload's bytes, base64 (standard alphabet).
    pub payload_base64: Option<String>,
    pub headers: serde_json::Value,
    /// Why it was dead-lettered.
    pub error: String,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    /// When an operator redrove it (absent while pending).
    pub redriven_at: Option<DateTime<Utc>>,
    /// Size in bytes of the whole payload as received.
    pub payload_size: Option<i32>,
    /// SHA-256 of the whole payload as received, lower-case hex.
    pub payload_sha256: Option<String>,
    /// True when only the payload's first bytes were kept (the message was
    /// larger than the ingress' dead-letter payload limit); such a letter
    /// cannot be redriven.
    pub payload_truncated: bool,
    /// The dead-letter topic its copy goes to.
    pub copy_topic: Option<String>,
    /// `none` (no copy owed), `pending` (not yet accepted by the topic) or
    /// `published`.
    pub copy_state: String,
    /// Publish attempts of the copy so far.
    pub copy_attempts: i32,
    /// Why the copy's last publish attempt failed.
    pub copy_error: Option<String>,
    /// When the copy's next publish attempt is due.
    pub copy_next_at: Option<DateTime<Utc>>,
    /// When the topic accepted the copy.
    pub copy_published_at: Option<DateTime<Utc>>,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(d: DeadLetter) -> Self {
        let text = |b: &Option<Vec<u8>>| {
            b.as_ref()
                .and_then(|b| std::str::from_utf8(b).ok())
                .map(str::to_string)
        };
        let b64 = |b: &Option<Vec<u8>>| b.as_ref().map(|b| STANDARD.encode(b));
        Self {
            key: text(&d.key),
            key_base64: b64(&d.key),
            payload: text(&d.payload),
            payload_base64: b64(&d.payload),
            id: d.id,
            source: d.source,
            topic: d.topic,
            partition: d.partition,
            offset: d.offset,
            headers: d.headers,
            error: d.error,
            attempts: d.attempts,
            created_at: d.created_at,
            redriven_at: d.redriven_at,
            payload_size: d.payload_size,
            payload_sha256: d.payload_sha256.map(hex::encode),
            payload_truncated: d.payload_truncated,
            copy_topic: d.copy_topic,
            copy_state: d.copy_state,
            copy_attempts: d.copy_attempts,
            copy_error: d.copy_error,
            copy_next_at: d.copy_next_at,
            copy_published_at: d.copy_published_at,
        }
    }
}

/// A page of Kafka dead letters, newest first.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct DeadLetterPage {
    pub items: Vec<DeadLetterView>,
    pub next_cursor: Option<String>,
}

/// What a Kafka redrive did.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct DeadLetterRedriveResult {
    pub dead_letter: DeadLetterView,
    /// The outbox row that re-publishes the message to its topic.
    pub outbox_id: Uuid,
    pub audit_id: Uuid,
}

/// A dead letter whose topic copy was made due.
#[derive(Debug, Object)]
pub struct DeadLetterCopyRetryResult {
    pub dead_letter: DeadLetterView,
    pub audit_id: Uuid,
}

/// A page of dead jobs (failed or discarded), newest first.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct DeadJobPage {
    pub items: Vec<JobView>,
    pub next_cursor: Option<String>,
}

/// A job after its redrive.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct DeadJobRedriveResult {
    pub job: JobView,
    pub audit_id: Uuid,
}

#[derive(Debug, Serialize, Deserialize)]
struct CursorWire {
    /// The last id of the previous page.
    before: i64,
}

/// The dead-letter operations of the admin API.
pub struct DeadLettersApi;

#[OpenApi]
impl DeadLettersApi {
    /// Kafka dead letters, newest first.
    #[oai(
        path = "/v1/dead-letters",
        method = "get",
        operation_id = "list_dead_letters",
        tag = "Tag::DeadLetters"
    )]
    async fn list_dead_letters(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        /// Only the ones not redriven yet (default true).
        pending: Query<Option<bool>>,
        /// Exact topic.
        #[oai(validator(
            max_length = 200,
            pattern = r"^[^\x00-\x1F\x7F-\x9F\u00AD\u034F\u061C\u115F\u1160\u17B4\u17B5\u180B-\u180F\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFF8]*$"
        ))]
        topic: Query<Option<String>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Page size, 1..=200 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "200")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<DeadLetterPage>> {
        auth::admin(&state, &key, Permission::Read).await?;
        let filter = DeadLetterFilter {
            pending_only: pending.0.unwrap_or(true),
            topic: text_filter("topic", topic.0)?,
        };
        let before = cursor
            .0
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(decode_cursor::<CursorWire>)
            .transpose()?
            .map(|c| c.before);
        let limit = page_limit(limit.0, PAGE, PAGE_MAX)?;
        let mut rows = state
            .store
            .dead_letter_page(&filter, before, limit + 1)
            .await?;
        let next_cursor = crate::admin::next_page(&mut rows, limit, |r| {
            encode_cursor(&CursorWire { before: r.id })
        })?;
        Ok(Json(DeadLetterPage {
            items: rows.into_iter().map(DeadLetterView::from).collect(),
            next_cursor,
        }))
    }

    /// Jobs that failed for good or were discarded, newest first.
    #[oai(
        path = "/v1/dead-letters/jobs",
        method = "get",
        operation_id = "list_dead_jobs",
        tag = "Tag::DeadLetters"
    )]
    async fn list_dead_jobs(
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
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Page size, 1..=200 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "200")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<DeadJobPage>> {
        auth::admin(&state, &key, Permission::Read).await?;
        let filter = JobFilter {
            queue: text_filter("queue", queue.0)?,
            kind: text_filter("kind", kind.0)?,
            states: DEAD_JOB_STATES.to_vec(),
            ..JobFilter::default()
        };
        let sort = JobSort::default();
        let after = cursor
            .0
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(|c| parse_job_cursor(sort, c))
            .transpose()?;
        let limit = page_limit(limit.0, PAGE, PAGE_MAX)?;
        let mut jobs: Vec<Job> = state
            .store
            .job_list(&filter, sort, after.as_ref(), limit + 1)
            .await?;
        let next_cursor = crate::admin::next_page(&mut jobs, limit, |j| job_cursor(sort, j))?;
        Ok(Json(DeadJobPage {
            items: jobs.into_iter().map(JobView::from).collect(),
            next_cursor,
        }))
    }

    /// One Kafka dead letter.
    #[oai(
        path = "/v1/dead-letters/:id",
        method = "get",
        operation_id = "get_dead_letter",
        tag = "Tag::DeadLetters"
    )]
    async fn get_dead_letter(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<i64>,
    ) -> Result<Json<DeadLetterView>> {
        auth::admin(&state, &key, Permission::Read).await?;
        let row = state
            .store
            .dead_letter_get(id.0)
            .await?
            .ok_or_else(|| not_found(id.0))?;
        Ok(Json(row.into()))
    }

    /// Re-publishes a Kafka dead letter to its original topic (through the
    /// outbox). 409 when it was redriven already or is not a Kafka message.
    #[oai(
        path = "/v1/dead-letters/:id/redrive",
        method = "post",
        operation_id = "redrive_dead_letter",
        tag = "Tag::DeadLetters"
    )]
    async fn redrive_dead_letter(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<i64>,
        body: Json<ActionRequest>,
    ) -> Result<Json<DeadLetterRedriveResult>> {
        let admin = auth::admin(&state, &key, Permission::Operate).await?;
        let why = reason(body.reason.as_str())?;
        let id = id.0;
        let mut tx = state.pool().begin().await?;
        let Some(letter) = dead_letter_redrive_in(&mut tx, id).await? else {
            return Err(match state.store.dead_letter_get(id).await? {
                None => not_found(id),
                Some(_) => Error::Conflict(format!("dead letter {id} was redriven already")),
            });
        };
        if letter.payload_truncated {
            return Err(Error::Conflict(format!(
                "dead letter {id} kept only the first bytes of its payload; it cannot be \
                 re-published (see payload_size and payload_sha256)"
            )));
        }
        let topic = letter.topic.clone().ok_or_else(|| {
            Error::Conflict(format!(
                "dead letter {id} has no topic; there is nothing to re-publish"
            ))
        })?;
        let key_text = match &letter.key {
            None => None,
            Some(k) => Some(std::str::from_utf8(k).map_err(|_| {
                Error::Conflict(format!(
                    "dead letter {id} has a binary key the outbox cannot carry"
                ))
            })?),
        };
        let mut headers = match &letter.headers {
            serde_json::Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        headers.insert(REDRIVE_HEADER.into(), id.to_string().into());
        let headers = serde_json::Value::Object(headers);
        let outbox_id = outbox_insert_in(
            &mut tx,
            &NewOutboxEvent {
                topic: &topic,
                key: key_text,
                headers: Some(&headers),
                payload: letter.payload.as_deref().unwrap_or_default(),
            },
        )
        .await?;
        let audit_id = audit::record(
            &mut *tx,
            &admin,
            &NewEntry {
                action: "dead_letter.redrive",
                target_type: "dead_letter",
                target_id: &id.to_string(),
                reason: &why,
                details: serde_json::json!({
                    "topic": topic,
                    "partition": letter.partition,
                    "offset": letter.offset,
                    "outbox_id": outbox_id,
                }),
            },
        )
        .await?;
        tx.commit().await?;
        log_action(&admin, "dead_letter.redrive", &id.to_string());
        Ok(Json(DeadLetterRedriveResult {
            dead_letter: letter.into(),
            outbox_id,
            audit_id,
        }))
    }

    /// Makes the dead-letter topic copy of a Kafka dead letter due at once
    /// (it is retried with backoff on its own). 409 unless a copy is still
    /// owed.
    #[oai(
        path = "/v1/dead-letters/:id/copy-retry",
        method = "post",
        operation_id = "retry_dead_letter_copy",
        tag = "Tag::DeadLetters"
    )]
    async fn retry_dead_letter_copy(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<i64>,
        body: Json<ActionRequest>,
    ) -> Result<Json<DeadLetterCopyRetryResult>> {
        let admin = auth::admin(&state, &key, Permission::Operate).await?;
        let why = reason(body.reason.as_str())?;
        let id = id.0;
        let mut tx = state.pool().begin().await?;
        if !dead_letter_copy_retry_in(&mut tx, id, state.store.now()).await? {
            return Err(match state.store.dead_letter_get(id).await? {
                None => not_found(id),
                Some(_) => Error::Conflict(format!(
                    "dead letter {id} owes no topic copy (published, or none was owed)"
                )),
            });
        }
        let audit_id = audit::record(
            &mut *tx,
            &admin,
            &NewEntry {
                action: "dead_letter.copy_retry",
                target_type: "dead_letter",
                target_id: &id.to_string(),
                reason: &why,
                details: serde_json::json!({}),
            },
        )
        .await?;
        tx.commit().await?;
        log_action(&admin, "dead_letter.copy_retry", &id.to_string());
        let letter = state
            .store
            .dead_letter_get(id)
            .await?
            .ok_or_else(|| not_found(id))?;
        Ok(Json(DeadLetterCopyRetryResult {
            dead_letter: letter.into(),
            audit_id,
        }))
    }

    /// Runs a failed or discarded job again (one more attempt). 409 for a
    /// job in any other state.
    #[oai(
        path = "/v1/dead-letters/jobs/:id/redrive",
        method = "post",
        operation_id = "redrive_dead_job",
        tag = "Tag::DeadLetters"
    )]
    async fn redrive_dead_job(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
        body: Json<ActionRequest>,
    ) -> Result<Json<DeadJobRedriveResult>> {
        let admin = auth::admin(&state, &key, Permission::Operate).await?;
        let why = reason(body.reason.as_str())?;
        let id = id.0;
        let mut tx = state.pool().begin().await?;
        // Read for a clear 404/409 and the audit detail; `job_redrive_in`
        // checks the state again under the row lock, so a concurrent redrive
        // of the same job fails there and writes no second audit row.
        let before = state
            .store
            .job_get(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("job {id} not found")))?;
        if !DEAD_JOB_STATES.contains(&before.state) {
            return Err(Error::Conflict(format!(
                "job {id} is {}; only failed or discarded jobs are dead letters",
                before.state
            )));
        }
        let job = state.store.job_redrive_in(&mut tx, id).await?;
        let audit_id = audit::record(
            &mut *tx,
            &admin,
            &NewEntry {
                action: "dead_letter.job_redrive",
                target_type: "job",
                target_id: &id.to_string(),
                reason: &why,
                details: serde_json::json!({
                    "queue": job.queue,
                    "kind": job.kind,
                    "state_before": before.state,
                    "state_after": job.state,
                }),
            },
        )
        .await?;
        tx.commit().await?;
        log_action(&admin, "dead_letter.job_redrive", &id.to_string());
        Ok(Json(DeadJobRedriveResult {
            job: job.into(),
            audit_id,
        }))
    }
}

fn not_found(id: i64) -> Error {
    Error::NotFound(format!("dead letter {id} not found"))
}

/// Route templates, for metrics labels.
pub(crate) const ROUTES: &[&str] = &[
    "/v1/dead-letters",
    "/v1/dead-letters/jobs",
    "/v1/dead-letters/{id}",
    "/v1/dead-letters/{id}/redrive",
    "/v1/dead-letters/{id}/copy-retry",
    "/v1/dead-letters/jobs/{id}/redrive",
];
