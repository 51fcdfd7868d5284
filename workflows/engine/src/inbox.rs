//! The inbox (deduplicated intake of external events) and dead letters.
//!
//! Every Kafka message or webhook that is accepted gets one `inbox` row,
//! unique per `(source, dedupe_key)`, written in the SAME transaction as the
//! event's effect (a job, a signal, a workflow start). A redelivered or
//! re-sent event finds its row and is skipped, so effects happen once even
//! though delivery is at-least-once. [`inbox_insert_in`] uses
//! `ON CONFLICT DO NOTHING`, so a duplicate never aborts the caller's
//! transaction.
//!
//! Poison messages go to `dead_letters` ([`crate::dead_letter`], re-exported
//! here) with their error; operators list and redrive them.
use crate::Result;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use sqlx::PgPool;

/// One event to record in the inbox.
#[derive(Debug, Clone, Default)]
pub struct InboxEntry<'a> {
    /// Where it came from, e.g. `kafka:<topic>` or a webhook provider.
    pub source: &'a str,
    /// Unique per source: the business id, or `topic/partition/offset`.
    pub dedupe_key: &'a str,
    /// Kafka coordinates, when the event came from Kafka.
    pub topic: Option<&'a str>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    /// The business id the event carries, if any.
    pub business_id: Option<&'a str>,
    /// The raw bytes as received.
    pub payload: Option<&'a [u8]>,
    /// Headers as a JSON object (`name -> string or null`).
    pub headers: Option<&'a serde_json::Value>,
    /// True when the effect is applied in this same transaction (Kafka
    /// ingress); false when a job will process it later (webhooks).
    pub processed: bool,
}

/// What [`inbox_insert_in`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxInserted {
    /// A new row: apply the event's effect in the same transaction.
    Inserted(i64),
    /// Seen before: apply nothing.
    Duplicate,
}

impl InboxInserted {
    /// True for a new event.
    pub fn is_new(self) -> bool {
        matches!(self, InboxInserted::Inserted(_))
    }
}

/// An inbox row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct InboxRow {
    pub id: i64,
    pub source: String,
    pub dedupe_key: String,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub business_id: Option<String>,
    pub payload: Option<Vec<u8>>,
    pub headers: serde_json::Value,
    pub received_at: DateTime<Utc>,
    pub processed_at: Option<DateTime<Utc>>,
}

impl InboxEntry<'_> {
    /// Refuses an entry that could not be deduplicated.
    pub(crate) fn check(&self) -> Result<()> {
        if self.source.is_empty() || self.dedupe_key.is_empty() {
            return Err(crate::Error::Invalid(
                "inbox source and dedupe key must not be empty".into(),
            ));
        }
        Ok(())
    }

    /// Binds the entry's nine columns, in the order of [`inbox_insert_in`]'s
    /// `VALUES` (source, dedupe key, topic, partition, offset, business id,
    /// payload, headers, processed), as the next parameters of `query`.
    pub(crate) fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        static EMPTY: std::sync::LazyLock<serde_json::Value> =
            std::sync::LazyLock::new(|| serde_json::Value::Object(serde_json::Map::new()));
        query
            .bind(self.source)
            .bind(self.dedupe_key)
            .bind(self.topic)
            .bind(self.partition)
            .bind(self.offset)
            .bind(self.business_id)
            .bind(self.payload)
            .bind(self.headers.unwrap_or(&EMPTY))
            .bind(self.processed)
    }
}

/// Records `entry` on the caller's connection (inside their transaction).
/// Returns [`InboxInserted::Duplicate`] without writing when
/// `(source, dedupe_key)` exists; never aborts the transaction on a conflict.
pub async fn inbox_insert_in(
    conn: &mut PgConnection,
    entry: &InboxEntry<'_>,
) -> Result<InboxInserted> {
    entry.check()?;
    let id: Option<(i64,)> = entry
        .bind(sqlx::query_as(
            "INSERT INTO inbox (source, dedupe_key, topic, \"partition\", \"offset\", business_id,
                                payload, headers, processed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $9 THEN now() END)
             ON CONFLICT (source, dedupe_key) DO NOTHING
             RETURNING id",
        ))
        .fetch_optional(&mut *conn)
        .await?;
    Ok(id.map_or(InboxInserted::Duplicate, |(id,)| {
        InboxInserted::Inserted(id)
    }))
}

/// Records many entries with one statement on the caller's connection
/// (inside their transaction): what [`inbox_insert_in`] does, for a batch.
/// Returns one [`InboxInserted`] per entry, in order; when several entries
/// share a `(source, dedupe_key)`, only the first can be new. Never aborts
/// the transaction on a conflict.
pub async fn inbox_insert_many_in(
    conn: &mut PgConnection,
    entries: &[InboxEntry<'_>],
) -> Result<Vec<InboxInserted>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let n = entries.len();
    let empty = serde_json::Value::Object(serde_json::Map::new());
    let (mut sources, mut keys, mut topics) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut partitions, mut offsets, mut business_ids) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut payloads, mut headers, mut processed) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for e in entries {
        if e.source.is_empty() || e.dedupe_key.is_empty() {
            return Err(crate::Error::Invalid(
                "inbox source and dedupe key must not be empty".into(),
            ));
        }
        sources.push(e.source);
        keys.push(e.dedupe_key);
        topics.push(e.topic);
        partitions.push(e.partition);
        offsets.push(e.offset);
        business_ids.push(e.business_id);
        payloads.push(e.payload);
        headers.push(e.headers.unwrap_or(&empty).clone());
        processed.push(e.processed);
    }
    // Rows go in input order (ORDER BY ord), so of two entries with one key
    // the first is inserted and the second meets it and does nothing.
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "INSERT INTO inbox (source, dedupe_key, topic, \"partition\", \"offset\", business_id,
                            payload, headers, processed_at)
         SELECT s.source, s.dedupe_key, s.topic, s.part, s.off, s.business_id, s.payload,
                s.headers, CASE WHEN s.processed THEN now() END
         FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::text[],
                     $7::bytea[], $8::jsonb[], $9::bool[])
              WITH ORDINALITY AS s(source, dedupe_key, topic, part, off, business_id, payload,
                                   headers, processed, ord)
         ORDER BY s.ord
         ON CONFLICT (source, dedupe_key) DO NOTHING
         RETURNING id, source, dedupe_key",
    )
    .bind(&sources)
    .bind(&keys)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&business_ids)
    .bind(&payloads)
    .bind(&headers)
    .bind(&processed)
    .fetch_all(&mut *conn)
    .await?;
    let mut new: std::collections::HashMap<(String, String), i64> = rows
        .into_iter()
        .map(|(id, source, key)| ((source, key), id))
        .collect();
    Ok(entries
        .iter()
        .map(|e| {
            new.remove(&(e.source.to_string(), e.dedupe_key.to_string()))
                .map_or(InboxInserted::Duplicate, InboxInserted::Inserted)
        })
        .collect())
}

/// Marks an inbox row processed (for events processed by a later job).
pub async fn inbox_mark_processed_in(conn: &mut PgConnection, id: i64) -> Result<bool> {
    let n =
        sqlx::query("UPDATE inbox SET processed_at = now() WHERE id = $1 AND processed_at IS NULL")
            .bind(id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    Ok(n == 1)
}

/// Inbox rows of `source`, oldest first (at most `limit`).
pub async fn inbox_list(pool: &PgPool, source: &str, limit: i64) -> Result<Vec<InboxRow>> {
    Ok(sqlx::query_as::<_, InboxRow>(
        "SELECT id, source, dedupe_key, topic, \"partition\", \"offset\", business_id, payload,
                headers, received_at, processed_at
         FROM inbox WHERE source = $1 ORDER BY id LIMIT $2",
    )
    .bind(source)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Jobs of `queue` waiting to run (`available`), counted up to `cap` (so the
/// check stays cheap on a huge backlog). Used by ingress backpressure.
pub async fn queue_available_backlog(pool: &PgPool, queue: &str, cap: i64) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM (
           SELECT 1 FROM jobs WHERE queue = $1 AND state = 'available' LIMIT $2) b",
    )
    .bind(queue)
    .bind(cap.max(0))
    .fetch_one(pool)
    .await?)
}

// ------------------------------------------------------------ dead letters

pub use crate::dead_letter::{
    DeadLetter, NewDeadLetter, dead_letter_insert_in, dead_letter_list, dead_letter_redrive_in,
};
