//! Flow control's SQL: the controlled claim's three statements, the external-call limiter's
//! bucket, and the queue flag. Limits and gates have theirs in [`super::limits`]'s and
//! [`super::gate`]'s `sql` sections, which only this crate's flow module uses.
use super::decide::{Bucket, Candidate, Holders, Level};
use crate::Result;
use crate::claimed::lease_update;
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};
use std::collections::HashMap;
use uuid::Uuid;

/// The advisory-lock class of flow keys (two-int form, so it never meets the engine's
/// one-bigint locks of signals and the outbox).
pub(crate) const LOCK_CLASS: i32 = 0x464c_4f57; // "FLOW"

/// True when `queue` is flagged for flow control.
pub(crate) async fn queue_is_flow(pool: &PgPool, queue: &str) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT flow FROM queues WHERE name = $1")
            .bind(queue)
            .fetch_optional(pool)
            .await?
            .unwrap_or(false),
    )
}

/// Flags `queue` for flow control (a queue limit was set).
pub(crate) async fn flag_queue(conn: &mut PgConnection, queue: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO queues (name, flow) VALUES ($1, true)
         ON CONFLICT (name) DO UPDATE SET flow = true, updated_at = now() WHERE NOT queues.flow",
    )
    .bind(queue)
    .execute(conn)
    .await?;
    Ok(())
}

/// A limited key's limits, as the claim found them.
#[derive(Debug, Clone)]
pub(crate) struct KeyLimit {
    pub concurrency: Option<i64>,
    pub bucket: Option<Bucket>,
}

/// What the claim's first statement locked and found.
pub(crate) struct Found {
    pub candidates: Vec<Candidate>,
    /// The limited keys (locked), with their limits.
    pub limits: HashMap<String, KeyLimit>,
    /// Fewer candidates than there was room for, and the look-ahead ended at its depth: free
    /// keys may lie deeper, behind full keys' backlogs.
    pub short_of_depth: bool,
}

/// Statement 1: locks up to `window` available jobs of `queue` (no more than the queue limit's
/// free slots, when it has one) in claim order (skipping rows
/// others hold, jobs of keys this statement's snapshot already sees at their limit, and a
/// key's jobs beyond its limit among the first `depth` × the window — so one key's backlog
/// cannot fill the window and hide the free keys behind it), resolves
/// the limits of their keys and of the queue, and takes the advisory lock of every limited key,
/// in hash order (one global order: claimers never deadlock). The snapshot's view of full keys
/// is only a filter: statement 2 decides under the locks. Commits asynchronously, as the fast
/// claim does.
pub(crate) async fn lock_candidates(
    conn: &mut PgConnection,
    queue: &str,
    window: i64,
    depth: i64,
) -> Result<Found> {
    let rows = sqlx::query(
        "WITH t AS (SELECT set_config('synchronous_commit', 'off', true) AS async_commit),
         held AS (
           SELECT flow_key AS k, count(*) AS n FROM jobs
           WHERE state = 'running' AND flow_key IS NOT NULL GROUP BY 1
           UNION ALL
           SELECT flow_key, count(*) FROM workflows
           WHERE flow_admitted AND finished_at IS NULL AND flow_key IS NOT NULL GROUP BY 1
         ),
         room AS (
           -- Under a queue limit, no more candidates than the queue's free slots this snapshot
           -- sees (statement 2 decides under the lock): a claim waiting for one slot to free
           -- locks one job, not a window.
           SELECT CASE WHEN l.concurrency IS NULL THEN $2::bigint
                       ELSE least($2::bigint, greatest(0, l.concurrency - (
                              SELECT count(*) FROM jobs
                              WHERE state = 'running' AND queue = $1)))
                  END AS n
           FROM (SELECT (SELECT concurrency FROM flow_limits WHERE key = $3) AS concurrency) l
         ),
         full_keys AS (
           SELECT h.k FROM held h
           JOIN LATERAL (SELECT f.concurrency FROM flow_limits f
                         WHERE f.key = h.k OR f.key = flow_class(h.k)
                         ORDER BY f.key = h.k DESC LIMIT 1) l ON true
           GROUP BY h.k, l.concurrency
           HAVING sum(h.n) >= l.concurrency
         ),
         pre AS (
           SELECT j.id, coalesce(j.flow_key, w.flow_key) AS k,
                  j.priority, j.fair_seq, j.run_at
           FROM jobs j
           LEFT JOIN workflows w
             ON w.id = j.workflow_id AND w.flow_key IS NOT NULL AND NOT w.flow_admitted
           WHERE j.state = 'available' AND j.queue = $1
             AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = $1 AND q.paused)
             AND (j.flow_key IS NULL OR j.flow_key NOT IN (SELECT k FROM full_keys))
             AND (w.flow_key IS NULL OR w.flow_key NOT IN (SELECT k FROM full_keys))
           ORDER BY j.priority, j.fair_seq, j.run_at, j.id
           LIMIT least(16000, (SELECT n FROM room) * $5)
         ),
         ranked AS (
           SELECT pre.*, row_number() OVER (PARTITION BY pre.k
                                            ORDER BY priority, fair_seq, run_at, id) AS nth
           FROM pre
         ),
         pick AS (
           SELECT r.id FROM ranked r
           LEFT JOIN LATERAL (SELECT f.concurrency FROM flow_limits f
                              WHERE f.key = r.k OR f.key = flow_class(r.k)
                              ORDER BY f.key = r.k DESC LIMIT 1) l ON r.k IS NOT NULL
           WHERE r.k IS NULL OR r.nth <= coalesce(l.concurrency, $2)
           ORDER BY r.priority, r.fair_seq, r.run_at, r.id
           LIMIT (SELECT n FROM room)
         ),
         c AS (
           SELECT j.id, j.flow_key, j.rate_key, j.rate_weight, w.flow_key AS wf_key, w.id AS wf_id,
                  r.job_id IS NOT NULL AS prepaid, j.priority, j.fair_seq, j.run_at
           FROM jobs j
           JOIN pick ON pick.id = j.id
           LEFT JOIN workflows w
             ON w.id = j.workflow_id AND w.flow_key IS NOT NULL AND NOT w.flow_admitted
           LEFT JOIN flow_reservations r ON r.job_id = j.id AND r.key = j.rate_key
           WHERE j.state = 'available'
           ORDER BY j.priority, j.fair_seq, j.run_at, j.id
           FOR UPDATE OF j SKIP LOCKED
         ),
         keys AS (
           SELECT DISTINCT k FROM (
             SELECT flow_key FROM c UNION ALL SELECT wf_key FROM c
             UNION ALL SELECT rate_key FROM c UNION ALL SELECT $3::text) s(k)
           WHERE k IS NOT NULL
         ),
         lim AS (
           SELECT k.k, l.concurrency, l.rate_capacity, l.rate_refill, l.rate_window_ms
           FROM keys k
           JOIN LATERAL (SELECT f.* FROM flow_limits f
                         WHERE f.key = k.k OR f.key = flow_class(k.k)
                         ORDER BY f.key = k.k DESC LIMIT 1) l ON true
           WHERE l.concurrency IS NOT NULL OR l.rate_capacity IS NOT NULL
         ),
         locked AS (
           SELECT count(pg_advisory_xact_lock($4, h)) AS n
           FROM (SELECT DISTINCT hashtext(k) AS h FROM lim ORDER BY 1) s
         )
         SELECT x.* FROM (
           SELECT 0 AS part, c.id, c.flow_key AS key, c.wf_key, c.rate_key, c.rate_weight,
                  NULL::int AS concurrency, NULL::bigint AS cap, NULL::bigint AS refill,
                  NULL::bigint AS window_ms, c.wf_id, c.prepaid, c.priority, c.fair_seq, c.run_at
           FROM c
           UNION ALL
           SELECT 1, NULL, lim.k, NULL, NULL, NULL, lim.concurrency, lim.rate_capacity,
                  lim.rate_refill, lim.rate_window_ms, NULL, NULL, NULL, NULL, NULL
           FROM lim
           UNION ALL
           SELECT 2, NULL, NULL, NULL, NULL, NULL, NULL, (SELECT count(*) FROM pre),
                  least(16000, (SELECT n FROM room) * $5), (SELECT n FROM room),
                  NULL, NULL, NULL, NULL, NULL
         ) x, locked, t
         ORDER BY x.part, x.priority, x.fair_seq, x.run_at, x.id",
    )
    .bind(queue)
    .bind(window)
    .bind(super::queue_key(queue))
    .bind(LOCK_CLASS)
    .bind(depth)
    .fetch_all(&mut *conn)
    .await?;
    let mut limits = HashMap::new();
    let mut raw = Vec::new();
    let mut short_of_depth = false;
    for r in &rows {
        let part: i32 = r.try_get(0)?;
        if part == 2 {
            let scanned: Option<i64> = r.try_get(7)?;
            let looked: Option<i64> = r.try_get(8)?;
            let room: Option<i64> = r.try_get(9)?;
            let wanted = usize::try_from(room.unwrap_or(0)).unwrap_or(0);
            let picked = rows
                .iter()
                .filter(|r| r.try_get::<i32, _>(0).ok() == Some(0))
                .count();
            short_of_depth = scanned == looked && picked < wanted;
        } else if part == 1 {
            let key: String = r.try_get(2)?;
            let concurrency: Option<i32> = r.try_get(6)?;
            let cap: Option<i64> = r.try_get(7)?;
            let refill: Option<i64> = r.try_get(8)?;
            let window_ms: Option<i64> = r.try_get(9)?;
            let bucket = match (cap, refill, window_ms) {
                (Some(capacity), Some(refill), Some(window_ms)) => Some(Bucket {
                    capacity,
                    refill,
                    window_ms,
                }),
                _ => None,
            };
            limits.insert(
                key,
                KeyLimit {
                    concurrency: concurrency.map(i64::from),
                    bucket,
                },
            );
        } else {
            let id: Uuid = r.try_get(1)?;
            let key: Option<String> = r.try_get(2)?;
            let wf_key: Option<String> = r.try_get(3)?;
            let rate_key: Option<String> = r.try_get(4)?;
            let weight: Option<i32> = r.try_get(5)?;
            let wf_id: Option<Uuid> = r.try_get(10)?;
            let prepaid: bool = r.try_get(11)?;
            raw.push((id, key, wf_key.zip(wf_id), rate_key, weight, prepaid));
        }
    }
    let concurrency = |k: &String| limits.get(k).and_then(|l: &KeyLimit| l.concurrency);
    let candidates = raw
        .into_iter()
        .map(|(id, key, wf_key, rate_key, weight, prepaid)| Candidate {
            id,
            key: key.map(|k| {
                let l = concurrency(&k);
                (k, l)
            }),
            workflow_key: wf_key.map(|(k, wf)| {
                let l = concurrency(&k);
                (wf, k, l)
            }),
            rate: rate_key.map(|k| {
                let b = limits.get(&k).and_then(|l| l.bucket);
                (k, i64::from(weight.unwrap_or(1)), b)
            }),
            prepaid,
        })
        .collect();
    Ok(Found {
        candidates,
        limits,
        short_of_depth,
    })
}

/// Statement 2, under the key locks and so with a snapshot that sees every earlier claim of
/// those keys: their holders, the queue's running jobs, the stored bucket levels, and "now".
pub(crate) async fn holders(
    conn: &mut PgConnection,
    queue: &str,
    keys: &[&str],
    queue_limit: Option<i64>,
    now: Option<DateTime<Utc>>,
) -> Result<(Holders, DateTime<Utc>)> {
    let queue_key = super::queue_key(queue);
    let rows = sqlx::query(
        "SELECT k.k,
                CASE WHEN k.k = $2
                     THEN (SELECT count(*) FROM jobs j WHERE j.state = 'running' AND j.queue = $3)
                     ELSE (SELECT count(*) FROM jobs j
                           WHERE j.state = 'running' AND j.flow_key = k.k)
                        + (SELECT count(*) FROM workflows w
                           WHERE w.flow_admitted AND w.finished_at IS NULL AND w.flow_key = k.k)
                END,
                b.millis, b.owed, b.at, coalesce($4::timestamptz, now())
         FROM unnest($1::text[]) k(k) LEFT JOIN flow_buckets b ON b.key = k.k",
    )
    .bind(keys)
    .bind(&queue_key)
    .bind(queue)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let mut h = Holders::default();
    let mut db_now = now.unwrap_or_else(Utc::now);
    for r in &rows {
        let key: String = r.try_get(0)?;
        let held: i64 = r.try_get(1)?;
        let millis: Option<i64> = r.try_get(2)?;
        let owed: Option<i64> = r.try_get(3)?;
        let at: Option<DateTime<Utc>> = r.try_get(4)?;
        db_now = r.try_get(5)?;
        if key == queue_key {
            if let Some(limit) = queue_limit {
                h.queue = Some((limit, held));
            }
        } else {
            h.held.insert(key.clone(), held);
        }
        if let (Some(millis), Some(owed), Some(at)) = (millis, owed, at) {
            h.levels.insert(key, Level { millis, owed, at });
        }
    }
    Ok((h, db_now))
}

/// What statement 3 applies.
pub(crate) struct Apply<'a> {
    pub claim: &'a [Uuid],
    pub admit: &'a [Uuid],
    pub defer: &'a [(Uuid, DateTime<Utc>)],
    pub unreserve: &'a [Uuid],
    pub levels: &'a [(String, Level)],
    pub deferred: &'a [(String, i64)],
    pub owner: &'a str,
    pub lease_ms: i64,
    pub now: Option<DateTime<Utc>>,
}

/// Statement 3: leases the chosen jobs, admits their workflows, defers the rate-limited ones
/// (`scheduled` until their bucket will have refilled: no attempt used), and stores the
/// buckets and the deferral counts. Returns the leased rows.
pub(crate) async fn apply(
    conn: &mut PgConnection,
    a: &Apply<'_>,
) -> Result<Vec<sqlx::postgres::PgRow>> {
    const SQL: &str = concat!(
        "WITH t AS (SELECT coalesce($4::timestamptz, now()) AS n),
         adm AS (UPDATE workflows SET flow_admitted = true WHERE id = ANY($5::uuid[])),
         def AS (
           UPDATE jobs d SET state = 'scheduled', run_at = x.at
           FROM unnest($6::uuid[], $7::timestamptz[]) x(id, at)
           WHERE d.id = x.id AND d.state = 'available'
           RETURNING d.id, d.rate_key
         ),
         res AS (
           INSERT INTO flow_reservations (job_id, key) SELECT id, rate_key FROM def
           ON CONFLICT DO NOTHING
         ),
         unres AS (
           DELETE FROM flow_reservations r USING jobs j
           WHERE j.id = ANY($13::uuid[]) AND r.job_id = j.id AND r.key = j.rate_key
         ),
         bk AS (
           INSERT INTO flow_buckets (key, millis, owed, at)
           SELECT * FROM unnest($8::text[], $9::int8[], $14::int8[], $10::timestamptz[])
           ON CONFLICT (key) DO UPDATE
             SET millis = excluded.millis, owed = excluded.owed, at = excluded.at
         ),
         dc AS (
           INSERT INTO flow_deferrals (key, deferred, last_at)
           SELECT x.k, x.c, t.n FROM unnest($11::text[], $12::int8[]) x(k, c), t
           ON CONFLICT (key) DO UPDATE
             SET deferred = flow_deferrals.deferred + excluded.deferred, last_at = excluded.last_at
         ),
         pick AS (SELECT unnest($1::uuid[]) AS id)
         ",
        lease_update!(
            "pick, t",
            "j.id = pick.id AND j.state = 'available'",
            "$2",
            "$3"
        )
    );
    let (def_ids, def_at): (Vec<Uuid>, Vec<DateTime<Utc>>) = a.defer.iter().copied().unzip();
    let lv_keys: Vec<&str> = a.levels.iter().map(|(k, _)| k.as_str()).collect();
    let lv_millis: Vec<i64> = a.levels.iter().map(|(_, l)| l.millis).collect();
    let lv_at: Vec<DateTime<Utc>> = a.levels.iter().map(|(_, l)| l.at).collect();
    let lv_owed: Vec<i64> = a.levels.iter().map(|(_, l)| l.owed).collect();
    let (dk, dc): (Vec<&str>, Vec<i64>) = a.deferred.iter().map(|(k, n)| (k.as_str(), *n)).unzip();
    Ok(sqlx::query(SQL)
        .bind(a.claim)
        .bind(a.owner)
        .bind(a.lease_ms)
        .bind(a.now)
        .bind(a.admit)
        .bind(&def_ids)
        .bind(&def_at)
        .bind(&lv_keys)
        .bind(&lv_millis)
        .bind(&lv_at)
        .bind(&dk)
        .bind(&dc)
        .bind(a.unreserve)
        .bind(&lv_owed)
        .fetch_all(&mut *conn)
        .await?)
}

/// The external-call limiter's bucket: locks `key`, then (a fresh snapshot) reads its limit,
/// its stored level and "now". `None` when the key has no rate limit.
pub(crate) async fn lock_bucket(
    conn: &mut PgConnection,
    key: &str,
    now: Option<DateTime<Utc>>,
) -> Result<Option<(Bucket, Option<Level>, DateTime<Utc>)>> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(LOCK_CLASS)
        .bind(key)
        .execute(&mut *conn)
        .await?;
    let row = sqlx::query(
        "SELECT l.rate_capacity, l.rate_refill, l.rate_window_ms, b.millis, b.owed, b.at,
                coalesce($2::timestamptz, now())
         FROM (SELECT f.* FROM flow_limits f WHERE f.key = $1 OR f.key = flow_class($1)
               ORDER BY f.key = $1 DESC LIMIT 1) l
         LEFT JOIN flow_buckets b ON b.key = $1
         WHERE l.rate_capacity IS NOT NULL",
    )
    .bind(key)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else { return Ok(None) };
    let bucket = Bucket {
        capacity: r.try_get(0)?,
        refill: r.try_get(1)?,
        window_ms: r.try_get(2)?,
    };
    let millis: Option<i64> = r.try_get(3)?;
    let owed: Option<i64> = r.try_get(4)?;
    let at: Option<DateTime<Utc>> = r.try_get(5)?;
    let level = match (millis, owed, at) {
        (Some(millis), Some(owed), Some(at)) => Some(Level { millis, owed, at }),
        _ => None,
    };
    Ok(Some((bucket, level, r.try_get(6)?)))
}

/// Uses up job `job`'s reservation under `key`, if it has one (under the key's lock).
pub(crate) async fn take_reservation(
    conn: &mut PgConnection,
    job: Uuid,
    key: &str,
) -> Result<bool> {
    let done = sqlx::query("DELETE FROM flow_reservations WHERE job_id = $1 AND key = $2")
        .bind(job)
        .bind(key)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Records that job `job` paid for its next call under `key` ahead of time.
pub(crate) async fn reserve(conn: &mut PgConnection, job: Uuid, key: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO flow_reservations (job_id, key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(job)
    .bind(key)
    .execute(conn)
    .await?;
    Ok(())
}

/// Stores a bucket's level, or counts a deferral of `key`.
pub(crate) async fn store_bucket(
    conn: &mut PgConnection,
    key: &str,
    level: Option<Level>,
    deferred_at: Option<DateTime<Utc>>,
) -> Result<()> {
    sqlx::query(
        "WITH bk AS (
           INSERT INTO flow_buckets (key, millis, owed, at) SELECT $1, $2, $5, $3 WHERE $2 IS NOT NULL
           ON CONFLICT (key) DO UPDATE
             SET millis = excluded.millis, owed = excluded.owed, at = excluded.at
         )
         INSERT INTO flow_deferrals (key, deferred, last_at) SELECT $1, 1, $4 WHERE $4 IS NOT NULL
         ON CONFLICT (key) DO UPDATE
           SET deferred = flow_deferrals.deferred + 1, last_at = excluded.last_at",
    )
    .bind(key)
    .bind(level.map(|l| l.millis))
    .bind(level.map(|l| l.at))
    .bind(deferred_at)
    .bind(level.map(|l| l.owed))
    .execute(conn)
    .await?;
    Ok(())
}
