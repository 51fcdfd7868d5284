//! Signals: external events (webhooks, Kafka messages) that waiting workflows consume.
//!
//! A signal has a `name` (what happened, e.g. `fill`) and a `correlation_key`
//! (which business object, e.g. an exchange order id). It is stored once per
//! `dedupe_key` — a redelivered webhook or Kafka message is applied once — and
//! kept until a step consumes it, so a signal that arrives *before* its waiter
//! is not lost: the step that later waits for it finds it at once.
//!
//! Sending and waiting race: a signal may commit while a step is deciding to
//! wait. Both sides take the same transaction-scoped advisory lock on
//! `(name, correlation_key)` before they look at the other's rows, so under
//! READ COMMITTED one of them always sees the other's commit: either the step
//! finds the signal and consumes it, or the sender finds the workflow
//! `waiting` and enqueues its wake-up job. (A row lock on the workflow is not
//! enough on the sender's side: a workflow that is not yet `waiting` in the
//! sender's snapshot is never locked.)
use crate::workflow::wire::{Wake, WorkflowId, step_job};
use crate::{Result, Store};
use sqlx::{PgConnection, Row};

/// What [`signal_send_in`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalSent {
    /// A new signal; `woke` lists the waiting workflows whose step was
    /// enqueued to consume it.
    New { id: i64, woke: Vec<WorkflowId> },
    /// A signal with this dedupe key exists already: nothing was written.
    Duplicate,
}

impl SignalSent {
    /// True when the signal was new.
    pub fn is_new(&self) -> bool {
        matches!(self, SignalSent::New { .. })
    }
}

/// A stored signal.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Signal {
    pub id: i64,
    pub workflow_id: Option<WorkflowId>,
    pub name: String,
    pub correlation_key: String,
    pub payload: serde_json::Value,
    pub dedupe_key: String,
    pub received_at: chrono::DateTime<chrono::Utc>,
    pub consumed_at: Option<chrono::DateTime<chrono::Utc>>,
    pub consumed_by_step: Option<String>,
}

/// Takes the transaction-scoped advisory lock that serializes senders and
/// waiters of `(name, correlation_key)`. Must run inside a transaction.
pub(crate) async fn lock_signal_key(
    conn: &mut PgConnection,
    name: &str,
    correlation_key: &str,
) -> Result<()> {
    let key = format!("ledgerflow.signal\u{1f}{name}\u{1f}{correlation_key}");
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Consumes the oldest unconsumed signal `(name, correlation_key)` for
/// `step` of `workflow_id`, returning its payload. Signals locked by another
/// consumer's open transaction are skipped (they are theirs).
pub(crate) async fn signal_consume_in(
    conn: &mut PgConnection,
    store: &Store,
    workflow_id: WorkflowId,
    step: &str,
    name: &str,
    correlation_key: &str,
) -> Result<Option<serde_json::Value>> {
    Ok(sqlx::query_scalar(
        "UPDATE signals
         SET consumed_at = coalesce($5::timestamptz, now()), consumed_by_step = $4,
             workflow_id = $3
         WHERE id = (
           SELECT id FROM signals
           WHERE name = $1 AND correlation_key = $2 AND consumed_at IS NULL
           ORDER BY id
           LIMIT 1
           FOR UPDATE SKIP LOCKED)
         RETURNING payload",
    )
    .bind(name)
    .bind(correlation_key)
    .bind(workflow_id)
    .bind(step)
    .bind(store.now())
    .fetch_optional(&mut *conn)
    .await?)
}

/// Sends a signal in its own transaction; see [`signal_send_in`].
pub async fn signal_send(
    store: &Store,
    name: &str,
    correlation_key: &str,
    payload: &serde_json::Value,
    dedupe_key: &str,
) -> Result<SignalSent> {
    let mut tx = store.pool().begin().await?;
    let sent = signal_send_in(&mut tx, store, name, correlation_key, payload, dedupe_key).await?;
    tx.commit().await?;
    Ok(sent)
}

/// Stores a signal on the caller's connection, which must be inside a
/// READ COMMITTED transaction (the default): typically the webhook or Kafka
/// ingress transaction that also records the inbox row.
///
/// A second signal with the same `dedupe_key` writes nothing and returns
/// [`SignalSent::Duplicate`]. Every workflow waiting for `(name,
/// correlation_key)` gets its waiting step enqueued (one job per signal and
/// workflow, under a unique key) in the same transaction; a signal nobody
/// waits for yet is kept for the step that will.
pub async fn signal_send_in(
    conn: &mut PgConnection,
    store: &Store,
    name: &str,
    correlation_key: &str,
    payload: &serde_json::Value,
    dedupe_key: &str,
) -> Result<SignalSent> {
    if name.is_empty() || name.len() > 128 {
        return Err(crate::Error::Invalid(
            "signal name must be 1..=128 bytes".to_string(),
        ));
    }
    lock_signal_key(conn, name, correlation_key).await?;
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO signals (name, correlation_key, payload, dedupe_key, received_at)
         VALUES ($1, $2, $3, $4, coalesce($5::timestamptz, now()))
         ON CONFLICT (dedupe_key) DO NOTHING
         RETURNING id",
    )
    .bind(name)
    .bind(correlation_key)
    .bind(payload)
    .bind(dedupe_key)
    .bind(store.now())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(id) = id else {
        return Ok(SignalSent::Duplicate);
    };
    // Statement-level snapshot taken after the advisory lock: a step that
    // registered its wait before we got the lock is visible here.
    let waiting = sqlx::query(
        "SELECT id, current_step, queue, traceparent FROM workflows
         WHERE state = 'waiting' AND wait_signal_name = $1 AND wait_correlation_key = $2
           AND current_step IS NOT NULL
         ORDER BY id",
    )
    .bind(name)
    .bind(correlation_key)
    .fetch_all(&mut *conn)
    .await?;
    let mut woke = Vec::with_capacity(waiting.len());
    for row in waiting {
        let wf: WorkflowId = row.try_get(0)?;
        let step: String = row.try_get(1)?;
        let queue: String = row.try_get(2)?;
        let mut job = step_job(
            wf,
            &queue,
            &step,
            Wake::Signal { signal_id: id },
            None,
            None,
        );
        // The woken step continues its workflow's trace, not the sender's (decision 0011).
        let traceparent: Option<String> = row.try_get(3)?;
        if traceparent.is_some() {
            job = job.traceparent(traceparent);
        }
        store.job_insert_in(conn, &job).await?;
        woke.push(wf);
    }
    Ok(SignalSent::New { id, woke })
}

/// The signals with `name` and `correlation_key`, oldest first (consumed or not).
pub async fn signal_list_in(
    conn: &mut PgConnection,
    name: &str,
    correlation_key: &str,
) -> Result<Vec<Signal>> {
    Ok(sqlx::query_as::<_, Signal>(
        "SELECT id, workflow_id, name, correlation_key, payload, dedupe_key, received_at,
                consumed_at, consumed_by_step
         FROM signals WHERE name = $1 AND correlation_key = $2 ORDER BY id",
    )
    .bind(name)
    .bind(correlation_key)
    .fetch_all(&mut *conn)
    .await?)
}
