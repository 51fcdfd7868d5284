//! The transactional outbox: domain events written by business transactions
//! and published to Kafka by the relay.
//!
//! A business transaction calls [`outbox_insert_in`] next to its own writes,
//! so an event exists if and only if its transaction committed. The relay
//! then publishes unpublished rows and marks them published after the broker
//! acknowledged them (at-least-once; every message carries its outbox id so
//! consumers can deduplicate).
//!
//! ## Per-key order across several relays
//!
//! Rows are published in id (UUID v7, creation) order per `(topic, key)`.
//! With several relay replicas, a relay must never publish a key's row while
//! another relay still holds an earlier row of that key. [`outbox_claim_in`]
//! does this with a transaction-scoped advisory lock per key:
//!
//! 1. it lists the keys of the oldest unpublished rows;
//! 2. it tries `pg_try_advisory_xact_lock(hash(topic, key))` on each (never
//!    waits, so relays never deadlock and skip keys another relay holds);
//! 3. with a NEW statement (so, at READ COMMITTED, a fresh snapshot that sees
//!    everything the key's previous holder committed before releasing the
//!    lock) it selects the unpublished rows of the locked keys in id order.
//!
//! The relay keeps the transaction open while it publishes, marks the
//! delivered rows with [`outbox_mark_published_in`] and commits, which
//! releases the locks. Rows without a key are independent of each other (the
//! row id serves as their key). A hash collision only serialises two keys.
use crate::Result;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// An event to publish.
#[derive(Debug, Clone)]
pub struct NewOutboxEvent<'a> {
    /// The Kafka topic.
    pub topic: &'a str,
    /// The message key (ordering is kept per topic and key).
    pub key: Option<&'a str>,
    /// Extra headers (`name -> string`); the relay adds `ledgerflow-id`.
    pub headers: Option<&'a serde_json::Value>,
    /// The message bytes (often JSON).
    pub payload: &'a [u8],
}

/// An outbox row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: Uuid,
    pub topic: String,
    pub key: Option<String>,
    pub headers: serde_json::Value,
    pub payload: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
}

const OUTBOX_COLUMNS: &str = "id, topic, key, headers, payload, created_at, published_at";

/// Writes an event on the caller's connection (inside the business
/// transaction) and returns its id.
pub async fn outbox_insert_in(conn: &mut PgConnection, event: &NewOutboxEvent<'_>) -> Result<Uuid> {
    if event.topic.is_empty() || event.topic.len() > 249 {
        return Err(crate::Error::Invalid(
            "outbox topic must be 1..=249 bytes".into(),
        ));
    }
    let id = Uuid::now_v7();
    let empty = serde_json::Value::Object(serde_json::Map::new());
    let headers = event.headers.unwrap_or(&empty);
    let traced = traced_headers(id, event.topic, headers);
    sqlx::query(
        "INSERT INTO outbox (id, topic, key, headers, payload) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(event.topic)
    .bind(event.key)
    .bind(traced.as_ref().unwrap_or(headers))
    .bind(event.payload)
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

/// With tracing on, `headers` plus the `traceparent` of an `outbox.insert` span (a child of the
/// current one) that the relay's message continues; `None` (store `headers` as they are) with
/// tracing off, or when the caller set a `traceparent` of its own.
fn traced_headers(id: Uuid, topic: &str, headers: &serde_json::Value) -> Option<serde_json::Value> {
    if !crate::trace::enabled() || headers.get(crate::trace::TRACEPARENT).is_some() {
        return None;
    }
    let span = tracing::info_span!("outbox.insert", outbox.id = %id, messaging.destination = topic);
    let traceparent = crate::trace::traceparent_of(&span)?;
    let mut map = headers.as_object().cloned().unwrap_or_default();
    map.insert(
        crate::trace::TRACEPARENT.to_owned(),
        serde_json::Value::String(traceparent),
    );
    Some(serde_json::Value::Object(map))
}

/// Claims up to `limit` unpublished rows on the caller's connection, which
/// must be inside a READ COMMITTED transaction that stays open until the rows
/// are published and marked (see the module docs). Rows come in id order;
/// every key present is held exclusively by this transaction.
pub async fn outbox_claim_in(conn: &mut PgConnection, limit: i64) -> Result<Vec<OutboxRow>> {
    let limit = limit.max(1);
    // Steps 1 and 2: candidate keys of the oldest rows, locked where free.
    // MATERIALIZED keeps the lock calls out of the candidate scan.
    let locked: Vec<(String, String)> = sqlx::query_as(
        "WITH cand AS MATERIALIZED (
           SELECT topic, k, min(rn) AS first FROM (
             SELECT topic, coalesce(key, id::text) AS k, row_number() OVER (ORDER BY id) AS rn
             FROM (SELECT id, topic, key FROM outbox
                   WHERE published_at IS NULL ORDER BY id LIMIT $1) o) n
           GROUP BY topic, k
         ), ordered AS MATERIALIZED (
           SELECT topic, k, first FROM cand ORDER BY first
         )
         SELECT topic, k FROM ordered
         WHERE pg_try_advisory_xact_lock(
                 hashtextextended('ledgerflow.outbox' || chr(31) || topic || chr(31) || k, 0))
         ORDER BY first",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    if locked.is_empty() {
        return Ok(Vec::new());
    }
    let (topics, keys): (Vec<String>, Vec<String>) = locked.into_iter().unzip();
    // Step 3: a fresh snapshot, after the locks.
    Ok(sqlx::query_as::<_, OutboxRow>(&format!(
        "SELECT {OUTBOX_COLUMNS} FROM outbox
         WHERE published_at IS NULL
           AND (topic, coalesce(key, id::text)) IN (SELECT * FROM unnest($1::text[], $2::text[]))
         ORDER BY id
         LIMIT $3
         FOR UPDATE"
    ))
    .bind(&topics)
    .bind(&keys)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?)
}

/// Marks rows published (after the broker acknowledged them).
pub async fn outbox_mark_published_in(conn: &mut PgConnection, ids: &[Uuid]) -> Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query(
        "UPDATE outbox SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL",
    )
    .bind(ids)
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// Unpublished rows, oldest first (for tests and the admin view).
pub async fn outbox_pending(pool: &PgPool, limit: i64) -> Result<Vec<OutboxRow>> {
    Ok(sqlx::query_as::<_, OutboxRow>(&format!(
        "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Deletes published rows older than `older_than` (at most `limit`).
pub async fn outbox_prune(pool: &PgPool, older_than: DateTime<Utc>, limit: i64) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM outbox WHERE id IN (
           SELECT id FROM outbox WHERE published_at IS NOT NULL AND published_at < $1 LIMIT $2)",
    )
    .bind(older_than)
    .bind(limit)
    .execute(pool)
    .await?
    .rows_affected())
}
