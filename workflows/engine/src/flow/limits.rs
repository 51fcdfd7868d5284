//! Flow limits: declared in code, changed by operators at runtime, read back with their
//! holders, waiters, tokens and deferrals.
//!
//! A limit is a `flow_limits` row keyed by an exact key (`user:42`), a class of keys
//! (`user:*`, every key up to its last `:`) or a queue (`queue:<name>`). The exact row wins
//! over the class row. Code declares its limits at start ([`declare`]): a declaration inserts
//! the row, or updates a row that code wrote, but never overwrites an operator's change
//! ([`set_in`], source `admin`). Every claim reads the rows, so a change applies to the next
//! claim of every process, without a restart.
use super::{QUEUE_KEY_PREFIX, check_key};
use crate::{Error, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool, Row};
use std::time::Duration;

/// A token bucket: `capacity` weight at most, refilled by `refill` weight per `window`.
/// Over any span `T`, at most `capacity + refill * T / window` weight passes: to stay under a
/// budget of `B` per window, choose `capacity + refill <= B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub capacity: i64,
    pub refill: i64,
    #[serde(with = "window_ms")]
    pub window: Duration,
}

impl Rate {
    /// The window in milliseconds, as stored.
    pub fn window_ms(&self) -> i64 {
        i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX)
    }
}

mod window_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// One limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowLimit {
    /// `user:42`, `user:*` or `queue:<name>`.
    pub key: String,
    /// Holders at once (0 stops the key; `None`: no limit).
    pub concurrency: Option<i32>,
    /// A rate limit.
    pub rate: Option<Rate>,
    /// Share of claims relative to other keys (1..=1000).
    pub fair_weight: i32,
}

impl FlowLimit {
    /// A limit of `key` with nothing set yet.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            concurrency: None,
            rate: None,
            fair_weight: 1,
        }
    }

    /// At most `n` holders at once.
    pub fn concurrency(mut self, n: i32) -> Self {
        self.concurrency = Some(n);
        self
    }

    /// A token bucket.
    pub fn rate(mut self, capacity: i64, refill: i64, window: Duration) -> Self {
        self.rate = Some(Rate {
            capacity,
            refill,
            window,
        });
        self
    }

    /// A fairness weight.
    pub fn fair_weight(mut self, w: i32) -> Self {
        self.fair_weight = w;
        self
    }

    /// Checks the limit's values.
    pub fn validate(&self) -> Result<()> {
        check_key("limit key", &self.key)?;
        let bad = |m: &str| Err(Error::Invalid(format!("limit {:?}: {m}", self.key)));
        if self.concurrency.is_some_and(|n| n < 0) {
            return bad("concurrency must be 0 or more");
        }
        if !(1..=1000).contains(&self.fair_weight) {
            return bad("fair_weight must be 1..=1000");
        }
        if let Some(r) = &self.rate
            && (r.capacity <= 0 || r.refill <= 0 || r.window.is_zero())
        {
            return bad("a rate needs a positive capacity, refill and window");
        }
        if self.key == QUEUE_KEY_PREFIX {
            return bad("a queue limit names its queue: queue:<name>");
        }
        Ok(())
    }

    fn queue(&self) -> Option<&str> {
        self.key.strip_prefix(QUEUE_KEY_PREFIX)
    }
}

/// An operator's change of a limit.
#[derive(Debug, Clone)]
pub struct LimitChange<'a> {
    pub limit: &'a FlowLimit,
    /// Who (an admin's id or name), for the row; the audit log records it too.
    pub by: &'a str,
    pub reason: &'a str,
}

/// A limit with what holds and waits for it now.
#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    #[serde(flatten)]
    pub limit: FlowLimit,
    /// `code` or `admin`.
    pub source: String,
    pub reason: Option<String>,
    pub updated_by: Option<String>,
    pub updated_at: DateTime<Utc>,
    /// Running jobs (or admitted workflows) under the limit.
    pub holders: i64,
    /// Jobs (or workflows) waiting for it.
    pub waiters: i64,
    /// The bucket's tokens now (rate limits; what is owed to deferred callers not deducted).
    pub tokens: Option<i64>,
    /// Jobs and calls deferred by the bucket so far.
    pub deferred: i64,
}

/// Who writes a limit row: code (a declaration) or an operator (with a reason).
enum Writer<'a> {
    Code,
    Admin { by: &'a str, reason: &'a str },
}

/// Writes `l`'s row, the one statement behind [`declare`] and [`set_in`]: an operator's write
/// always lands (and makes the row `admin`); code's lands only on a row code wrote, and only
/// when it changes something (so restarts do not touch `updated_at`).
async fn upsert(conn: &mut PgConnection, l: &FlowLimit, writer: Writer<'_>) -> Result<()> {
    l.validate()?;
    let (source, by, reason) = match writer {
        Writer::Code => ("code", "code", None),
        Writer::Admin { by, reason } => ("admin", by, Some(reason)),
    };
    sqlx::query(
        "INSERT INTO flow_limits (key, concurrency, rate_capacity, rate_refill, rate_window_ms,
                                  fair_weight, source, reason, updated_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (key) DO UPDATE
           SET concurrency = excluded.concurrency, rate_capacity = excluded.rate_capacity,
               rate_refill = excluded.rate_refill, rate_window_ms = excluded.rate_window_ms,
               fair_weight = excluded.fair_weight, source = excluded.source,
               reason = excluded.reason, updated_by = excluded.updated_by, updated_at = now()
           WHERE excluded.source = 'admin'
              OR (flow_limits.source = 'code'
                  AND (flow_limits.concurrency, flow_limits.rate_capacity, flow_limits.rate_refill,
                       flow_limits.rate_window_ms, flow_limits.fair_weight)
                      IS DISTINCT FROM
                      (excluded.concurrency, excluded.rate_capacity, excluded.rate_refill,
                       excluded.rate_window_ms, excluded.fair_weight))",
    )
    .bind(&l.key)
    .bind(l.concurrency)
    .bind(l.rate.map(|r| r.capacity))
    .bind(l.rate.map(|r| r.refill))
    .bind(l.rate.map(|r| r.window_ms()))
    .bind(l.fair_weight)
    .bind(source)
    .bind(reason)
    .bind(by)
    .execute(&mut *conn)
    .await?;
    if let Some(q) = l.queue() {
        super::db::flag_queue(conn, q).await?;
    }
    Ok(())
}

/// Declares limits from code: inserts each row, or updates a row code wrote; a row an
/// operator changed stays as the operator left it.
pub async fn declare(pool: &PgPool, limits: &[FlowLimit]) -> Result<()> {
    let mut tx = pool.begin().await?;
    for l in limits {
        upsert(&mut tx, l, Writer::Code).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// An operator sets a limit (source `admin`: code declarations leave it alone from now on),
/// on the caller's connection, so the caller's audit row commits with it.
pub async fn set_in(conn: &mut PgConnection, change: &LimitChange<'_>) -> Result<()> {
    let writer = Writer::Admin {
        by: change.by,
        reason: change.reason,
    };
    upsert(conn, change.limit, writer).await
}

/// An operator removes a limit (the key is then governed by its class row, or unlimited, until
/// code declares it again). Returns whether a row was removed.
pub async fn remove_in(conn: &mut PgConnection, key: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM flow_limits WHERE key = $1")
        .bind(key)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Every limit with its holders, waiters, tokens and deferrals (`key`: just that one).
pub async fn status(pool: &PgPool, key: Option<&str>) -> Result<Vec<KeyStatus>> {
    let rows = sqlx::query(
        "WITH l AS (SELECT * FROM flow_limits WHERE $1::text IS NULL OR key = $1),
         keyed AS (
           SELECT flow_key AS k, count(*) FILTER (WHERE state = 'running') AS run,
                  count(*) FILTER (WHERE state = 'available') AS wait
           FROM jobs WHERE state IN ('running', 'available') AND flow_key IS NOT NULL
           GROUP BY 1
           UNION ALL
           SELECT flow_key, count(*) FILTER (WHERE flow_admitted),
                  count(*) FILTER (WHERE NOT flow_admitted)
           FROM workflows WHERE finished_at IS NULL AND flow_key IS NOT NULL
           GROUP BY 1
           UNION ALL
           SELECT rate_key, 0, count(*) FROM jobs
           WHERE state IN ('scheduled', 'available') AND rate_key IS NOT NULL
           GROUP BY 1
         ),
         gov AS (
           SELECT (SELECT f.key FROM flow_limits f WHERE f.key = keyed.k OR f.key = flow_class(keyed.k)
                   ORDER BY f.key = keyed.k DESC LIMIT 1) AS key, run, wait
           FROM keyed
         ),
         q AS (
           SELECT 'queue:' || queue AS key, count(*) FILTER (WHERE state = 'running') AS run,
                  count(*) FILTER (WHERE state = 'available') AS wait
           FROM jobs
           WHERE state IN ('running', 'available')
             AND queue IN (SELECT substr(key, 7) FROM l WHERE key LIKE 'queue:%')
           GROUP BY 1
         )
         SELECT l.key, l.concurrency, l.rate_capacity, l.rate_refill, l.rate_window_ms,
                l.fair_weight, l.source, l.reason, l.updated_by, l.updated_at,
                (coalesce((SELECT sum(run) FROM gov WHERE gov.key = l.key), 0)
                  + coalesce((SELECT run FROM q WHERE q.key = l.key), 0))::bigint,
                (coalesce((SELECT sum(wait) FROM gov WHERE gov.key = l.key), 0)
                  + coalesce((SELECT wait FROM q WHERE q.key = l.key), 0))::bigint,
                b.millis, b.at, now(),
                coalesce((SELECT sum(d.deferred) FROM flow_deferrals d
                          WHERE d.key = l.key OR flow_class(d.key) = l.key), 0)::bigint
         FROM l LEFT JOIN flow_buckets b ON b.key = l.key
         ORDER BY l.key",
    )
    .bind(key)
    .fetch_all(pool)
    .await?;
    rows.iter().map(status_from_row).collect()
}

fn status_from_row(r: &sqlx::postgres::PgRow) -> Result<KeyStatus> {
    let cap: Option<i64> = r.try_get(2)?;
    let refill: Option<i64> = r.try_get(3)?;
    let window: Option<i64> = r.try_get(4)?;
    let rate = match (cap, refill, window) {
        (Some(capacity), Some(refill), Some(w)) => Some(Rate {
            capacity,
            refill,
            window: Duration::from_millis(u64::try_from(w).unwrap_or(0)),
        }),
        _ => None,
    };
    let millis: Option<i64> = r.try_get(12)?;
    let at: Option<DateTime<Utc>> = r.try_get(13)?;
    let now: DateTime<Utc> = r.try_get(14)?;
    let tokens = rate.map(|rt| {
        let bucket = super::decide::Bucket {
            capacity: rt.capacity,
            refill: rt.refill,
            window_ms: i64::try_from(rt.window.as_millis()).unwrap_or(i64::MAX),
        };
        let level = millis.zip(at).map(|(millis, at)| super::decide::Level {
            millis,
            owed: 0,
            at,
        });
        bucket.level(level, now) / 1000
    });
    Ok(KeyStatus {
        limit: FlowLimit {
            key: r.try_get(0)?,
            concurrency: r.try_get(1)?,
            rate,
            fair_weight: r.try_get(5)?,
        },
        source: r.try_get(6)?,
        reason: r.try_get(7)?,
        updated_by: r.try_get(8)?,
        updated_at: r.try_get(9)?,
        holders: r.try_get(10)?,
        waiters: r.try_get(11)?,
        tokens,
        deferred: r.try_get(15)?,
    })
}
