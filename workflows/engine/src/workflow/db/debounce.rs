//! A debounced start ([`start_debounced_in`]): under the key's gate lock, push the key's
//! pending start out, or insert a fresh start whose first job is the key's pending one.
use super::start::{NewStart, start_in};
use crate::Result;
use crate::workflow::wire::WorkflowId;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

/// When a debounced start's first step may begin: `window_ms` after the latest trigger, but
/// no later than `max_wait_ms` (when set) after the first.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Delay {
    pub window_ms: i64,
    pub max_wait_ms: Option<i64>,
}

/// The first job's start, from `$1` (now), `$3` (window) and `$4` (max wait, NULL: none,
/// which `least` ignores); `$anchor` is the first trigger's time.
macro_rules! due {
    ($anchor:literal) => {
        concat!(
            "least(t.n + $3 * interval '1 millisecond', ",
            $anchor,
            " + $4 * interval '1 millisecond')"
        )
    };
}

/// Sets a pending first job's start and state from [`due`].
macro_rules! set_due {
    ($anchor:literal) => {
        concat!(
            "run_at = ",
            due!($anchor),
            ", state = CASE WHEN ",
            due!($anchor),
            " <= t.n THEN 'available'::job_state ELSE 'scheduled'::job_state END"
        )
    };
}

/// Starts `start` debounced under `key`, or pushes the key's pending start out and gives it
/// `start`'s input. Returns the instance. The key's lock is held to the end of the caller's
/// transaction (its own one when none is open), so triggers of one key take turns.
pub(crate) async fn start_debounced_in(
    conn: &mut PgConnection,
    store: &crate::Store,
    start: &NewStart<'_>,
    key: &str,
    delay: Delay,
) -> Result<WorkflowId> {
    let mut tx = conn.begin().await?;
    crate::flow::gate::lock(&mut tx, key).await?;
    let now = store.now();
    let id = match push_pending_in(&mut tx, now, key, delay, start.input).await? {
        Some(id) => id,
        None => {
            let id = start_in(&mut tx, store, start).await?;
            hold_first_in(&mut tx, now, key, delay, start.job.id).await?;
            id
        }
    };
    tx.commit().await?;
    Ok(id)
}

/// Pushes the pending start of `key` (an instance whose first step's job has not started)
/// out by the delay and gives it `input`. Returns the instance, or `None` when the key has no
/// pending start.
async fn push_pending_in(
    conn: &mut PgConnection,
    now: Option<DateTime<Utc>>,
    key: &str,
    delay: Delay,
    input: &Value,
) -> Result<Option<WorkflowId>> {
    const SQL: &str = concat!(
        "WITH t AS (SELECT coalesce($1::timestamptz, now()) AS n),
         j AS (
           UPDATE jobs SET ",
        set_due!("jobs.created_at"),
        "
           FROM t
           WHERE jobs.debounce_key = $2 AND jobs.state IN ('scheduled', 'available')
             AND jobs.workflow_id IS NOT NULL
           RETURNING jobs.workflow_id
         )
         UPDATE workflows w SET input = $5, updated_at = t.n
         FROM j, t WHERE w.id = j.workflow_id
         RETURNING w.id"
    );
    let id: Option<Uuid> = sqlx::query_scalar(SQL)
        .bind(now)
        .bind(key)
        .bind(delay.window_ms)
        .bind(delay.max_wait_ms)
        .bind(input)
        .fetch_optional(conn)
        .await?;
    Ok(id)
}

/// Makes `job`, a just-inserted first step's job, the pending start of `key`: due after the
/// delay instead of now.
async fn hold_first_in(
    conn: &mut PgConnection,
    now: Option<DateTime<Utc>>,
    key: &str,
    delay: Delay,
    job: Uuid,
) -> Result<()> {
    const SQL: &str = concat!(
        "WITH t AS (SELECT coalesce($1::timestamptz, now()) AS n)
         UPDATE jobs SET debounce_key = $2, ",
        set_due!("t.n"),
        "
         FROM t WHERE jobs.id = $5"
    );
    sqlx::query(SQL)
        .bind(now)
        .bind(key)
        .bind(delay.window_ms)
        .bind(delay.max_wait_ms)
        .bind(job)
        .execute(conn)
        .await?;
    Ok(())
}
