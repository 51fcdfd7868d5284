//! Dead letters: Kafka messages that ingress could not apply, recorded in
//! Postgres first, and their copies to the dead-letter topic.
//!
//! The row is the durable record: ingress writes it (and only then lets the
//! partition's offset move on) without waiting for any broker, so no message
//! — whatever its size, whatever state the dead-letter topic is in — can stop
//! its partition. A payload larger than the caller's limit keeps its first
//! bytes, with the size and SHA-256 of the whole message.
//!
//! The topic copy is owed by the row (`copy_state = 'pending'`) and published
//! afterwards, outbox-style: a copier claims due rows
//! ([`dead_letter_copies_claim`], a short lease so two copiers never publish
//! one row at the same time), publishes, and records the outcome
//! ([`dead_letter_copy_published`] or [`dead_letter_copy_failed`], which
//! schedules the next try). Failures stay on the row for operators and
//! metrics; [`dead_letter_copy_retry_in`] makes a waiting copy due at once.
use crate::Result;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use std::time::Duration;

/// A poison message to record.
#[derive(Debug, Clone, Default)]
pub struct NewDeadLetter<'a> {
    pub source: &'a str,
    pub topic: Option<&'a str>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: Option<&'a serde_json::Value>,
    pub error: &'a str,
    pub attempts: i32,
    /// The dead-letter topic its copy is owed to; `None`: no copy.
    pub copy_topic: Option<&'a str>,
    /// Keep at most this many payload bytes (`None`: all of them).
    pub max_payload: Option<usize>,
}

/// Where a dead letter's topic copy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    /// No copy is owed (recorded without a dead-letter topic).
    None,
    /// Owed: the copier publishes it when due.
    Pending,
    /// The dead-letter topic accepted it.
    Published,
}

impl CopyState {
    /// The stored string.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyState::None => "none",
            CopyState::Pending => "pending",
            CopyState::Published => "published",
        }
    }
}

impl std::str::FromStr for CopyState {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(CopyState::None),
            "pending" => Ok(CopyState::Pending),
            "published" => Ok(CopyState::Published),
            other => Err(crate::Error::Invalid(format!(
                "unknown dead-letter copy state {other:?}"
            ))),
        }
    }
}

/// A stored dead letter.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub source: String,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub key: Option<Vec<u8>>,
    /// The payload, or its first bytes when `payload_truncated`.
    pub payload: Option<Vec<u8>>,
    pub headers: serde_json::Value,
    pub error: String,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub redriven_at: Option<DateTime<Utc>>,
    /// Size in bytes of the whole payload as received.
    pub payload_size: Option<i32>,
    /// SHA-256 of the whole payload as received.
    pub payload_sha256: Option<Vec<u8>>,
    /// True when only the payload's first bytes were kept.
    pub payload_truncated: bool,
    /// The dead-letter topic the copy is owed to.
    pub copy_topic: Option<String>,
    /// `none`, `pending` or `published` (see [`CopyState`]).
    pub copy_state: String,
    /// Publish attempts of the copy so far.
    pub copy_attempts: i32,
    /// Why the last publish attempt failed (cleared once published).
    pub copy_error: Option<String>,
    /// When the next publish attempt is due (pending copies).
    pub copy_next_at: Option<DateTime<Utc>>,
    pub copy_published_at: Option<DateTime<Utc>>,
}

impl DeadLetter {
    /// The copy's state, parsed.
    pub fn copy_state(&self) -> Result<CopyState> {
        self.copy_state.parse()
    }
}

/// Every column of [`DeadLetter`], in order.
pub(crate) const DEAD_LETTER_COLUMNS: &str = "id, source, topic, \"partition\", \"offset\", key, \
    payload, headers, error, attempts, created_at, redriven_at, payload_size, payload_sha256, \
    payload_truncated, copy_topic, copy_state, copy_attempts, copy_error, copy_next_at, \
    copy_published_at";

/// Records a dead letter on the caller's connection; with a `copy_topic`
/// its copy is owed (due at once). A Kafka message already recorded (same
/// topic/partition/offset, not redriven) is not recorded again: `None`.
pub async fn dead_letter_insert_in(
    conn: &mut PgConnection,
    letter: &NewDeadLetter<'_>,
) -> Result<Option<i64>> {
    let empty = serde_json::Value::Object(serde_json::Map::new());
    let limit = letter
        .max_payload
        .map(|n| i32::try_from(n).unwrap_or(i32::MAX));
    Ok(sqlx::query_scalar(
        "INSERT INTO dead_letters (source, topic, \"partition\", \"offset\", key, payload, headers,
                                   error, attempts, payload_size, payload_sha256,
                                   payload_truncated, copy_topic, copy_state, copy_next_at)
         SELECT $1, $2, $3, $4, $5,
                CASE WHEN $10::integer IS NULL OR octet_length($6::bytea) <= $10 THEN $6::bytea
                     ELSE substring($6::bytea FROM 1 FOR $10) END,
                $7, $8, $9, octet_length($6::bytea), sha256($6::bytea),
                coalesce(octet_length($6::bytea) > $10, false),
                $11::text, CASE WHEN $11::text IS NULL THEN 'none' ELSE 'pending' END,
                CASE WHEN $11::text IS NOT NULL THEN now() END
         ON CONFLICT DO NOTHING
         RETURNING id",
    )
    .bind(letter.source)
    .bind(letter.topic)
    .bind(letter.partition)
    .bind(letter.offset)
    .bind(letter.key)
    .bind(letter.payload)
    .bind(letter.headers.unwrap_or(&empty))
    .bind(letter.error)
    .bind(letter.attempts.max(1))
    .bind(limit)
    .bind(letter.copy_topic)
    .fetch_optional(&mut *conn)
    .await?)
}

/// Dead letters newest first; `pending_only` hides redriven ones.
pub async fn dead_letter_list(
    pool: &PgPool,
    pending_only: bool,
    limit: i64,
) -> Result<Vec<DeadLetter>> {
    Ok(sqlx::query_as::<_, DeadLetter>(&format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters
         WHERE NOT $1 OR redriven_at IS NULL
         ORDER BY id DESC LIMIT $2"
    ))
    .bind(pending_only)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Marks a pending dead letter redriven on the caller's connection and
/// returns it, so the caller can re-publish or re-apply it in the same
/// transaction (e.g. with `outbox_insert_in` to its original topic).
/// `None` when it does not exist or was redriven already.
pub async fn dead_letter_redrive_in(
    conn: &mut PgConnection,
    id: i64,
) -> Result<Option<DeadLetter>> {
    Ok(sqlx::query_as::<_, DeadLetter>(&format!(
        "UPDATE dead_letters SET redriven_at = now()
         WHERE id = $1 AND redriven_at IS NULL
         RETURNING {DEAD_LETTER_COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?)
}

/// Claims up to `limit` copies that are due, oldest due first, for `lease`:
/// they are not due again until then (so a copier that dies mid-publish
/// leaves them to the next one, and two copiers never take the same row).
pub async fn dead_letter_copies_claim(
    pool: &PgPool,
    limit: i64,
    lease: Duration,
    now: Option<DateTime<Utc>>,
) -> Result<Vec<DeadLetter>> {
    Ok(sqlx::query_as::<_, DeadLetter>(&format!(
        "WITH t AS (SELECT coalesce($3::timestamptz, now()) AS n),
         due AS (
           SELECT d.id FROM dead_letters d, t
           WHERE d.copy_state = 'pending' AND d.copy_next_at <= t.n
           ORDER BY d.copy_next_at, d.id
           LIMIT $1
           FOR UPDATE OF d SKIP LOCKED
         )
         UPDATE dead_letters d SET copy_next_at = t.n + make_interval(secs => $2)
         FROM due, t
         WHERE d.id = due.id
         RETURNING {}",
        *D_COLUMNS
    ))
    .bind(limit.max(1))
    .bind(lease.as_secs_f64())
    .bind(now)
    .fetch_all(pool)
    .await?)
}

/// [`DEAD_LETTER_COLUMNS`] of the table aliased `d`, built once.
static D_COLUMNS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| prefixed("d."));

/// [`DEAD_LETTER_COLUMNS`], each with `prefix`.
fn prefixed(prefix: &str) -> String {
    DEAD_LETTER_COLUMNS
        .split(", ")
        .map(|c| format!("{prefix}{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Records that the copy of dead letter `id` was published.
pub async fn dead_letter_copy_published(
    pool: &PgPool,
    id: i64,
    now: Option<DateTime<Utc>>,
) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE dead_letters
         SET copy_state = 'published', copy_attempts = copy_attempts + 1, copy_error = NULL,
             copy_next_at = NULL, copy_published_at = coalesce($2::timestamptz, now())
         WHERE id = $1 AND copy_state = 'pending'",
    )
    .bind(id)
    .bind(now)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Records a failed publish of dead letter `id`'s copy: `error` is kept and
/// the next try is due after `retry_in`. Returns the attempts so far.
pub async fn dead_letter_copy_failed(
    pool: &PgPool,
    id: i64,
    error: &str,
    retry_in: Duration,
    now: Option<DateTime<Utc>>,
) -> Result<Option<i32>> {
    Ok(sqlx::query_scalar(
        "UPDATE dead_letters
         SET copy_attempts = copy_attempts + 1, copy_error = $2,
             copy_next_at = coalesce($4::timestamptz, now()) + make_interval(secs => $3)
         WHERE id = $1 AND copy_state = 'pending'
         RETURNING copy_attempts",
    )
    .bind(id)
    .bind(error)
    .bind(retry_in.as_secs_f64())
    .bind(now)
    .fetch_optional(pool)
    .await?)
}

/// Makes the pending copy of dead letter `id` due now (an operator's
/// "retry the topic copy"), on the caller's connection so the audit row
/// commits with it. False unless a copy is pending.
pub async fn dead_letter_copy_retry_in(
    conn: &mut PgConnection,
    id: i64,
    now: Option<DateTime<Utc>>,
) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE dead_letters SET copy_next_at = coalesce($2::timestamptz, now())
         WHERE id = $1 AND copy_state = 'pending'",
    )
    .bind(id)
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_states_round_trip() {
        for s in [CopyState::None, CopyState::Pending, CopyState::Published] {
            assert_eq!(s.as_str().parse::<CopyState>().ok(), Some(s));
        }
        assert!("sent".parse::<CopyState>().is_err());
    }

    #[test]
    fn prefixed_columns_keep_their_order() {
        let p = prefixed("d.");
        assert!(p.starts_with("d.id, d.source, d.topic, d.\"partition\""));
        assert!(p.ends_with("d.copy_next_at, d.copy_published_at"));
        assert_eq!(
            p.matches("d.").count(),
            DEAD_LETTER_COLUMNS.split(", ").count()
        );
    }
}
