//! Debounce and throttle, applied when a job is enqueued.
//!
//! - Trailing debounce is one upsert on `jobs_debounce` (at most one pending job per key): a
//!   trigger while a job has not started replaces its args and pushes its start to `window`
//!   from now; a trigger after it started enqueues the next one.
//! - Leading debounce and throttle decide from the key's recent jobs, under the key's advisory
//!   lock (held to the end of the caller's transaction), so concurrent triggers queue up
//!   instead of both seeing room.
use super::{Debounce, Gate, Throttle};
use crate::notify::JOBS_CHANNEL;
use crate::{Inserted, NewJob, Result};
use chrono::{DateTime, Utc};
use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

/// The columns every gated insert writes, `$1`–`$8`; `$9` is the clock's now, `$10` the
/// key, `$11` the window in ms, `$14` the trace context.
macro_rules! gated_insert {
    ($state:literal, $run_at:literal, $key_col:literal, $tail:literal) => {
        concat!(
            "INSERT INTO jobs (id, queue, kind, args, state, priority, max_attempts, timeout_ms,
                               run_at, traceparent, ",
            $key_col,
            ", created_at)
             SELECT $1, $2, $3, $4, ",
            $state,
            ", $5, $6, $7, ",
            $run_at,
            ", $14::text, $10, t.n FROM t ",
            $tail
        )
    };
}

/// Inserts `job`, whose flow settings have a gate, on `conn`.
pub(crate) async fn insert(
    conn: &mut PgConnection,
    job: &NewJob,
    now: Option<DateTime<Utc>>,
    notify: bool,
) -> Result<Inserted> {
    let Some(gate) = &job.flow.gate else {
        return Err(crate::Error::Invalid(
            "the job has no debounce or throttle".into(),
        ));
    };
    let mut tx = conn.begin().await?;
    let (sql, key, window, limit): (&str, &str, _, i64) = match gate {
        Gate::Debounce {
            key,
            window,
            mode: Debounce::Trailing,
        } => (TRAILING, key, window, 0),
        Gate::Debounce {
            key,
            window,
            mode: Debounce::Leading,
        } => {
            lock(&mut tx, key).await?;
            (LEADING, key, window, 0)
        }
        Gate::Throttle {
            key,
            limit,
            window,
            mode,
        } => {
            lock(&mut tx, key).await?;
            let sql = match mode {
                Throttle::Drop => THROTTLE_DROP,
                Throttle::Delay => THROTTLE_DELAY,
            };
            (sql, key, window, i64::from(*limit))
        }
    };
    let row: Option<(Uuid, i64)> = sqlx::query_as(sql)
        .bind(job.id)
        .bind(&job.queue)
        .bind(&job.kind)
        .bind(&job.args)
        .bind(job.priority)
        .bind(job.max_attempts)
        .bind(job.timeout_ms())
        .bind(notify)
        .bind(now)
        .bind(key)
        .bind(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))
        .bind(limit)
        .bind(JOBS_CHANNEL)
        .bind(&job.traceparent)
        .fetch_optional(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(match row {
        Some((id, _)) if id == job.id => Inserted::New(id),
        Some((id, _)) => Inserted::Existing(id),
        None => Inserted::Dropped,
    })
}

/// Takes the transaction-scoped lock of gate key `key`: a debounce or throttle key, or the
/// key of a debounced workflow start.
pub(crate) async fn lock(conn: &mut PgConnection, key: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext('gate:' || $2))")
        .bind(super::db::LOCK_CLASS)
        .bind(key)
        .execute(conn)
        .await?;
    Ok(())
}

/// The NOTIFY part: wakes the queue when the row is available now.
macro_rules! with_notify {
    ([$($head:tt)*], [$($insert:tt)*]) => {
        concat!(
            "WITH t AS (SELECT coalesce($9::timestamptz, now()) AS n)",
            $($head)*,
            ", ins AS (",
            $($insert)*,
            " RETURNING id, state, queue),
             ntf AS (
               SELECT count(pg_notify($13, queue)) AS n
               FROM (SELECT DISTINCT queue FROM ins WHERE $8 AND state = 'available') q
             )
             SELECT ins.id, ntf.n + 0 * $12::bigint FROM ins, ntf"
        )
    };
}

/// Trailing debounce: one pending job per key, its args and start replaced by each trigger.
const TRAILING: &str = with_notify!(
    [""],
    [gated_insert!(
        "'scheduled'",
        "t.n + $11 * interval '1 millisecond'",
        "debounce_key",
        "ON CONFLICT (debounce_key)
           WHERE debounce_key IS NOT NULL AND state IN ('scheduled', 'available')
         DO UPDATE SET args = excluded.args, run_at = excluded.run_at, state = 'scheduled',
                       priority = excluded.priority, max_attempts = excluded.max_attempts,
                       timeout_ms = excluded.timeout_ms"
    )]
);

/// Leading debounce: the first trigger runs now; any within the window of the last job
/// enqueued with the key is dropped.
const LEADING: &str = with_notify!(
    [""],
    [gated_insert!(
        "'available'",
        "t.n",
        "debounce_key",
        "WHERE NOT EXISTS (SELECT 1 FROM jobs r WHERE r.debounce_key = $10
                             AND r.created_at > t.n - $11 * interval '1 millisecond')
         ON CONFLICT (debounce_key)
           WHERE debounce_key IS NOT NULL AND state IN ('scheduled', 'available')
         DO NOTHING"
    )]
);

/// The start of the next job of a throttle key: now while fewer than `$12` of its jobs start
/// within a window, else a window after the `$12`-th latest start.
macro_rules! throttle_slot {
    () => {
        ",
         last AS (SELECT run_at FROM jobs WHERE throttle_key = $10 ORDER BY run_at DESC LIMIT $12),
         slot AS (
           SELECT CASE WHEN (SELECT count(*) FROM last) < $12 THEN t.n
                       ELSE greatest(t.n, (SELECT min(run_at) FROM last)
                                          + $11 * interval '1 millisecond') END AS at
           FROM t
         )"
    };
}

/// Throttle, delaying: the job starts at the next free place.
const THROTTLE_DELAY: &str = with_notify!(
    [throttle_slot!()],
    [gated_insert!(
        "CASE WHEN (SELECT at FROM slot) <= t.n THEN 'available'::job_state
              ELSE 'scheduled'::job_state END",
        "(SELECT at FROM slot)",
        "throttle_key",
        ""
    )]
);

/// Throttle, dropping: the job is enqueued only when its place is now.
const THROTTLE_DROP: &str = with_notify!(
    [throttle_slot!()],
    [gated_insert!(
        "'available'",
        "t.n",
        "throttle_key",
        "WHERE (SELECT at FROM slot) <= t.n"
    )]
);
