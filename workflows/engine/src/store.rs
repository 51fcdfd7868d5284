//! The job queue's SQL: insert, claim, heartbeat, finish, rescue, promote,
//! prune, and the operator actions.
//!
//! Operation names are noun-first (`job_insert`, `job_claim`, …), one method
//! each. Methods that end in `_in` run on a connection the caller provides —
//! usually inside the caller's own transaction — so that enqueueing or
//! finishing a job commits together with the caller's writes.
//!
//! Every statement takes "now" as a parameter from the injected [`Clock`] and
//! falls back to the database's `now()` when the clock has no opinion (the
//! production default), so all workers share the database's timeline.
use crate::job::{Attempt, JOB_COLUMNS};
use crate::lease::Lease;
use crate::notify::JOBS_CHANNEL;
use crate::{
    Clock, DbClock, Error, Inserted, Job, JobId, JobState, NewJob, Outcome, Result, RetryPolicy,
};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub(crate) mod claim;

/// Settings of a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How long a claim's lease lasts without a heartbeat.
    pub lease_ttl: Duration,
    /// Send NOTIFY on inserts (turn off behind poolers that can't LISTEN).
    pub notify: bool,
    /// Backoff for retried attempts.
    pub retry: RetryPolicy,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(10),
            notify: true,
            retry: RetryPolicy::default(),
        }
    }
}

/// Handle on the job store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    config: Arc<StoreConfig>,
    /// Queues known to be flow-controlled (the flag is never cleared, so a cached yes stays
    /// true; a stale no only costs the fast claim finding nothing).
    flow_queues: Arc<std::sync::RwLock<std::collections::HashSet<String>>>,
}

pub use crate::claimed::ClaimedJob;

/// `d` in whole milliseconds, as statements bind durations (saturating).
pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// A store on `pool` with default settings and the database clock.
    pub fn new(pool: PgPool) -> Self {
        Self::with_config(pool, StoreConfig::default())
    }

    /// A store with explicit settings.
    pub fn with_config(pool: PgPool, config: StoreConfig) -> Self {
        Self {
            pool,
            clock: Arc::new(DbClock),
            config: Arc::new(config),
            flow_queues: Arc::default(),
        }
    }

    /// Replaces the clock (tests use a [`crate::ManualClock`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The same store with NOTIFY on inserts turned on or off. A caller that
    /// sends its own wake-up after the commit (the public API coalesces them)
    /// starts workflows with `false`, so its commits do not take Postgres'
    /// global notify lock.
    pub fn with_notify(mut self, notify: bool) -> Self {
        if self.config.notify != notify {
            let mut config = (*self.config).clone();
            config.notify = notify;
            self.config = Arc::new(config);
        }
        self
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The settings.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The clock.
    pub(crate) fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The clock's reading (`None`: the database's `now()`).
    pub fn now(&self) -> Option<DateTime<Utc>> {
        self.clock.now()
    }

    // ---------------------------------------------------------------- insert

    /// Enqueues one job in its own transaction.
    pub async fn job_insert(&self, job: &NewJob) -> Result<Inserted> {
        let mut conn = self.pool.acquire().await?;
        self.job_insert_in(&mut conn, job).await
    }

    /// Enqueues one job on the caller's connection (inside their transaction,
    /// if one is open). A unique-key conflict returns the existing job and
    /// never aborts the caller's transaction at READ COMMITTED (the default);
    /// at REPEATABLE READ or SERIALIZABLE, a conflict with a job committed
    /// after the caller's snapshot is a serialization failure, as for any
    /// other write in such a transaction.
    pub async fn job_insert_in(&self, conn: &mut PgConnection, job: &NewJob) -> Result<Inserted> {
        job.validate()?;
        if job.flow.gate.is_some() {
            return crate::flow::gate::insert(conn, job, self.now(), self.config.notify).await;
        }
        let mut out = self.insert_chunk(conn, std::slice::from_ref(job)).await?;
        out.pop()
            .ok_or_else(|| Error::Invalid("the insert returned no row".into()))
    }

    /// Enqueues many jobs in one transaction, in chunks of a few thousand rows
    /// per statement. Returns one [`Inserted`] per input, in order.
    pub async fn job_insert_many(&self, jobs: &[NewJob]) -> Result<Vec<Inserted>> {
        let mut tx = self.pool.begin().await?;
        let out = self.job_insert_many_in(&mut tx, jobs).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Bulk insert on the caller's connection.
    pub async fn job_insert_many_in(
        &self,
        conn: &mut PgConnection,
        jobs: &[NewJob],
    ) -> Result<Vec<Inserted>> {
        const CHUNK: usize = 5_000;
        if jobs.iter().any(|j| j.flow.gate.is_some()) {
            // Gated jobs decide one by one (debounce and throttle read the key's last jobs).
            let mut out = Vec::with_capacity(jobs.len());
            for j in jobs {
                out.push(self.job_insert_in(conn, j).await?);
            }
            return Ok(out);
        }
        let mut out = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(CHUNK) {
            out.extend(self.insert_chunk(conn, chunk).await?);
        }
        Ok(out)
    }

    async fn insert_chunk(
        &self,
        conn: &mut PgConnection,
        jobs: &[NewJob],
    ) -> Result<Vec<Inserted>> {
        let n = jobs.len();
        let (mut ids, mut queues, mut kinds, mut args) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut prios, mut maxes, mut timeouts, mut run_ats) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut keys, mut wf_ids, mut wf_steps, mut traceparents) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut flow_keys, mut rate_keys, mut rate_weights) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for j in jobs {
            j.validate()?;
            ids.push(j.id);
            queues.push(j.queue.as_str());
            kinds.push(j.kind.as_str());
            args.push(j.args.clone());
            prios.push(j.priority);
            maxes.push(j.max_attempts);
            timeouts.push(j.timeout_ms());
            run_ats.push(j.run_at);
            keys.push(j.unique_key.as_deref());
            wf_ids.push(j.workflow_id);
            wf_steps.push(j.workflow_step.as_deref());
            traceparents.push(j.traceparent.as_deref());
            flow_keys.push(j.flow.key.as_deref());
            rate_keys.push(j.flow.rate.as_ref().map(|(k, _)| k.as_str()));
            rate_weights.push(
                j.flow
                    .rate
                    .as_ref()
                    .map(|(_, w)| i32::try_from(*w).unwrap_or(i32::MAX)),
            );
        }
        // Fairness: a keyed job comes one step (1000 / its key's weight) after its key's last
        // waiting job, or at the queue's head when the key has none waiting; an un-keyed job
        // comes at the head. Without keys every fair_seq is the head, 0.
        let rows = sqlx::query(
            "WITH t AS (SELECT coalesce($12::timestamptz, now()) AS n),
             s AS (
               SELECT s.*, row_number() OVER (PARTITION BY s.queue, s.flow_key ORDER BY s.ord) AS nth
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::int2[], $6::int4[],
                           $7::int4[], $8::timestamptz[], $9::text[], $10::uuid[], $11::text[],
                           $15::text[], $16::text[], $17::int4[], $18::text[])
                    WITH ORDINALITY
                    AS s(id, queue, kind, args, priority, max_attempts, timeout_ms, run_at,
                         unique_key, workflow_id, workflow_step, flow_key, rate_key, rate_weight,
                         traceparent, ord)
             ),
             heads AS (
               SELECT q.queue,
                      coalesce((SELECT j.fair_seq FROM jobs j
                                WHERE j.state = 'available' AND j.queue = q.queue
                                ORDER BY j.priority, j.fair_seq, j.run_at, j.id LIMIT 1), 0) AS h
               FROM (SELECT DISTINCT queue FROM s) q
             ),
             keyed AS (
               SELECT k.queue, k.flow_key,
                      (SELECT max(j.fair_seq) FROM jobs j
                       WHERE j.state = 'available' AND j.queue = k.queue
                         AND j.flow_key = k.flow_key) AS last,
                      1000 / coalesce((SELECT f.fair_weight FROM flow_limits f
                                       WHERE f.key = k.flow_key OR f.key = flow_class(k.flow_key)
                                       ORDER BY f.key = k.flow_key DESC LIMIT 1), 1) AS step
               FROM (SELECT DISTINCT queue, flow_key FROM s WHERE flow_key IS NOT NULL) k
             ),
             flag AS (
               INSERT INTO queues (name, flow)
               SELECT DISTINCT s.queue, true FROM s
               WHERE (s.flow_key IS NOT NULL OR s.rate_key IS NOT NULL)
                 AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = s.queue AND q.flow)
               ON CONFLICT (name) DO UPDATE SET flow = true, updated_at = now()
             ),
             ins AS (
               INSERT INTO jobs (id, queue, kind, args, state, priority, max_attempts, timeout_ms,
                                 run_at, unique_key, workflow_id, workflow_step, created_at,
                                 flow_key, rate_key, rate_weight, fair_seq, traceparent)
               SELECT s.id, s.queue, s.kind, s.args,
                      CASE WHEN coalesce(s.run_at, t.n) <= t.n THEN 'available'::job_state
                           ELSE 'scheduled'::job_state END,
                      s.priority, s.max_attempts, s.timeout_ms, coalesce(s.run_at, t.n),
                      s.unique_key, s.workflow_id, s.workflow_step, t.n,
                      s.flow_key, s.rate_key, s.rate_weight,
                      CASE WHEN s.flow_key IS NULL THEN h.h
                           ELSE greatest(h.h - k.step, coalesce(k.last, h.h - k.step))
                                + s.nth * k.step END,
                      s.traceparent
               FROM s JOIN heads h ON h.queue = s.queue
                    LEFT JOIN keyed k ON k.queue = s.queue AND k.flow_key = s.flow_key, t
               ORDER BY s.ord
               ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
               RETURNING id, state, queue
             ),
             ntf AS (
               SELECT count(pg_notify($14, queue)) AS n
               FROM (SELECT DISTINCT queue FROM ins WHERE $13 AND state = 'available') q
             )
             SELECT ins.id FROM ins, ntf",
        )
        .bind(&ids)
        .bind(&queues)
        .bind(&kinds)
        .bind(&args)
        .bind(&prios)
        .bind(&maxes)
        .bind(&timeouts)
        .bind(&run_ats)
        .bind(&keys)
        .bind(&wf_ids)
        .bind(&wf_steps)
        .bind(self.now())
        .bind(self.config.notify)
        .bind(JOBS_CHANNEL)
        .bind(&flow_keys)
        .bind(&rate_keys)
        .bind(&rate_weights)
        .bind(&traceparents)
        .fetch_all(&mut *conn)
        .await?;
        if jobs.iter().any(|j| j.flow.controlled()) {
            for j in jobs.iter().filter(|j| j.flow.controlled()) {
                self.mark_flow_queue(&j.queue);
            }
        }
        let mut inserted = std::collections::HashSet::with_capacity(rows.len());
        for r in &rows {
            inserted.insert(r.try_get::<Uuid, _>(0)?);
        }
        let missing: Vec<&str> = jobs
            .iter()
            .filter(|j| !inserted.contains(&j.id))
            .filter_map(|j| j.unique_key.as_deref())
            .collect();
        let mut existing: HashMap<String, Uuid> = HashMap::new();
        if !missing.is_empty() {
            let rows = sqlx::query("SELECT unique_key, id FROM jobs WHERE unique_key = ANY($1)")
                .bind(&missing)
                .fetch_all(&mut *conn)
                .await?;
            for r in rows {
                existing.insert(r.try_get(0)?, r.try_get(1)?);
            }
        }
        jobs.iter()
            .map(|j| {
                if inserted.contains(&j.id) {
                    return Ok(Inserted::New(j.id));
                }
                let key = j.unique_key.clone().unwrap_or_default();
                existing
                    .get(&key)
                    .copied()
                    .map(Inserted::Existing)
                    .ok_or(Error::UniqueKeyNotVisible { key })
            })
            .collect()
    }

    // ----------------------------------------------------------------- read

    /// One job by id.
    pub async fn job_get(&self, id: JobId) -> Result<Option<Job>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        Ok(sqlx::query_as::<_, Job>(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Every recorded unsuccessful attempt of a job, oldest first.
    pub async fn job_attempts(&self, id: JobId) -> Result<Vec<Attempt>> {
        Ok(sqlx::query_as::<_, Attempt>(
            "SELECT job_id, attempt, worker, outcome, error, started_at, finished_at
             FROM job_attempts WHERE job_id = $1 ORDER BY attempt",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Extends the leases of running attempts. Rows locked by a handler's
    /// [`crate::FencedTx`] are skipped (the reaper skips them too, and they are
    /// about to finish). Returns the ids whose lease was extended.
    pub async fn job_heartbeat(&self, leases: &[(JobId, Uuid)]) -> Result<Vec<JobId>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, tokens): (Vec<Uuid>, Vec<Uuid>) = leases.iter().copied().unzip();
        Ok(sqlx::query_scalar(
            "WITH t AS (SELECT coalesce($3::timestamptz, now()) AS n),
             h AS (
               SELECT j.id FROM jobs j
               JOIN unnest($1::uuid[], $2::uuid[]) AS c(id, token)
                 ON j.id = c.id AND j.lease_token = c.token
               WHERE j.state = 'running'
               FOR UPDATE OF j SKIP LOCKED
             )
             UPDATE jobs j SET lease_expires_at = t.n + $4 * interval '1 millisecond'
             FROM h, t WHERE j.id = h.id
             RETURNING j.id",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(self.now())
        .bind(ms(self.config.lease_ttl))
        .fetch_all(&self.pool)
        .await?)
    }

    // --------------------------------------------------------------- finish

    /// Completes many attempts in one statement (the runner's fast path).
    /// Only attempts whose token is still current complete; returns their ids.
    pub async fn job_complete_many(&self, leases: &[(JobId, Uuid)]) -> Result<Vec<JobId>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, tokens): (Vec<Uuid>, Vec<Uuid>) = leases.iter().copied().unzip();
        Ok(sqlx::query_scalar(
            "WITH t AS (SELECT coalesce($3::timestamptz, now()) AS n)
             UPDATE jobs j
             SET state = 'completed', finished_at = t.n, completed_by = j.lease_owner,
                 lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
             FROM unnest($1::uuid[], $2::uuid[]) AS c(id, token), t
             WHERE j.id = c.id AND j.lease_token = c.token AND j.state = 'running'
             RETURNING j.id",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(self.now())
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records an attempt's outcome in its own transaction.
    pub async fn job_finish(&self, lease: &Lease, outcome: &Outcome) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        self.job_finish_in(&mut conn, lease, outcome).await
    }

    /// Records an attempt's outcome on the caller's connection. Fails with
    /// [`Error::StaleLease`] when the lease is no longer current; the caller
    /// must then roll back whatever else its transaction wrote.
    pub async fn job_finish_in(
        &self,
        conn: &mut PgConnection,
        lease: &Lease,
        outcome: &Outcome,
    ) -> Result<()> {
        // (new state, delay before run_at, attempts given back, error text, attempt-row outcome)
        let (state, delay, give_back, error, recorded): (
            JobState,
            Option<Duration>,
            i32,
            Option<&str>,
            Option<&str>,
        ) = match outcome {
            Outcome::Complete => (JobState::Completed, None, 0, None, None),
            Outcome::Retry { error, delay } if lease.is_last_attempt() => {
                let _ = delay;
                (JobState::Discarded, None, 0, Some(error), Some("discarded"))
            }
            Outcome::Retry { error, delay } => {
                let d = delay.unwrap_or_else(|| self.config.retry.backoff(lease.attempt));
                (JobState::Retryable, Some(d), 0, Some(error), Some("retry"))
            }
            Outcome::Fail { error } => (JobState::Failed, None, 0, Some(error), Some("failed")),
            Outcome::Cancel { reason } => (
                JobState::Cancelled,
                None,
                0,
                Some(reason),
                Some("cancelled"),
            ),
            Outcome::Snooze(d) => (JobState::Scheduled, Some(*d), 1, None, None),
        };
        let done: i64 = sqlx::query_scalar(
            "WITH t AS (SELECT coalesce($3::timestamptz, now()) AS n),
             upd AS (
               UPDATE jobs j
               SET state = $4,
                   run_at = CASE WHEN $5::bigint IS NULL THEN j.run_at
                                 ELSE t.n + $5 * interval '1 millisecond' END,
                   attempt = j.attempt - $6,
                   last_error = coalesce($7, j.last_error),
                   finished_at = CASE WHEN $4 IN ('completed', 'failed', 'cancelled', 'discarded')
                                      THEN t.n END,
                   completed_by = CASE WHEN $4 = 'completed' THEN j.lease_owner END,
                   lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
               FROM t
               WHERE j.id = $1 AND j.lease_token = $2 AND j.state = 'running'
               RETURNING j.id, t.n
             ),
             att AS (
               INSERT INTO job_attempts (job_id, attempt, worker, outcome, error, started_at, finished_at)
               SELECT id, $9, $8, $10, $7, $11, n FROM upd WHERE $10::text IS NOT NULL
               ON CONFLICT DO NOTHING
             )
             SELECT count(*) FROM upd",
        )
        .bind(lease.job_id)
        .bind(lease.token)
        .bind(self.now())
        .bind(state)
        .bind(delay.map(ms))
        .bind(give_back)
        .bind(error)
        .bind(&*lease.owner)
        .bind(lease.attempt)
        .bind(recorded)
        .bind(lease.attempted_at)
        .fetch_one(&mut *conn)
        .await?;
        if done == 0 {
            return Err(Error::StaleLease {
                job_id: lease.job_id,
                token: lease.token,
            });
        }
        Ok(())
    }

    /// Gives leases back without using up an attempt (graceful shutdown):
    /// the jobs become available at once. Returns how many were released.
    pub async fn job_release(&self, leases: &[(JobId, Uuid)]) -> Result<u64> {
        if leases.is_empty() {
            return Ok(0);
        }
        let (ids, tokens): (Vec<Uuid>, Vec<Uuid>) = leases.iter().copied().unzip();
        let n: i64 = sqlx::query_scalar(
            "WITH t AS (SELECT coalesce($3::timestamptz, now()) AS n),
             upd AS (
               UPDATE jobs j
               SET state = 'available', attempt = j.attempt - 1, run_at = t.n,
                   lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
               FROM unnest($1::uuid[], $2::uuid[]) AS c(id, token), t
               WHERE j.id = c.id AND j.lease_token = c.token AND j.state = 'running'
               RETURNING j.queue
             ),
             ntf AS (
               SELECT count(pg_notify($4, queue)) AS n
               FROM (SELECT DISTINCT queue FROM upd WHERE $5) q
             )
             SELECT (SELECT count(*) FROM upd) + 0 * (SELECT n FROM ntf)",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(self.now())
        .bind(JOBS_CHANNEL)
        .bind(self.config.notify)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    // ---------------------------------------------------------- maintenance

    /// The lease reaper: jobs whose lease expired (their worker died or hung)
    /// become available again, or are discarded if that was their last
    /// attempt. Each rescue is recorded as a `lease_expired` attempt.
    pub async fn job_rescue_expired(&self, limit: u32) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "WITH t AS (SELECT coalesce($1::timestamptz, now()) AS n),
             expired AS (
               SELECT j.id, j.lease_owner, j.attempt, j.attempted_at
               FROM jobs j, t
               WHERE j.state = 'running' AND j.lease_expires_at < t.n
               ORDER BY j.lease_expires_at
               LIMIT $2
               FOR UPDATE OF j SKIP LOCKED
             ),
             upd AS (
               UPDATE jobs j
               SET state = CASE WHEN j.attempt >= j.max_attempts THEN 'discarded'::job_state
                                ELSE 'available'::job_state END,
                   run_at = t.n,
                   finished_at = CASE WHEN j.attempt >= j.max_attempts THEN t.n END,
                   last_error = 'lease expired: worker ' || e.lease_owner || ' stopped heartbeating',
                   lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
               FROM expired e, t
               WHERE j.id = e.id
               RETURNING j.id, j.queue, j.state, e.lease_owner, e.attempt, e.attempted_at, t.n
             ),
             att AS (
               INSERT INTO job_attempts (job_id, attempt, worker, outcome, error, started_at, finished_at)
               SELECT id, attempt, lease_owner, 'lease_expired',
                      'lease expired: worker ' || lease_owner || ' stopped heartbeating',
                      coalesce(attempted_at, n), n
               FROM upd
               ON CONFLICT DO NOTHING
             ),
             ntf AS (
               SELECT count(pg_notify($3, queue)) AS n
               FROM (SELECT DISTINCT queue FROM upd WHERE $4 AND state = 'available') q
             )
             SELECT (SELECT count(*) FROM upd) + 0 * (SELECT n FROM ntf)",
        )
        .bind(self.now())
        .bind(i64::from(limit))
        .bind(JOBS_CHANNEL)
        .bind(self.config.notify)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Makes scheduled and retryable jobs whose `run_at` has come available,
    /// waking their queues. Returns how many were promoted.
    pub async fn job_promote_due(&self, limit: u32) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "WITH t AS (SELECT coalesce($1::timestamptz, now()) AS n),
             due AS (
               SELECT j.id FROM jobs j, t
               WHERE j.state IN ('scheduled', 'retryable') AND j.run_at <= t.n
               ORDER BY j.run_at
               LIMIT $2
               FOR UPDATE OF j SKIP LOCKED
             ),
             upd AS (
               UPDATE jobs j SET state = 'available' FROM due WHERE j.id = due.id RETURNING j.queue
             ),
             ntf AS (
               SELECT count(pg_notify($3, queue)) AS n
               FROM (SELECT DISTINCT queue FROM upd WHERE $4) q
             )
             SELECT (SELECT count(*) FROM upd) + 0 * (SELECT n FROM ntf)",
        )
        .bind(self.now())
        .bind(i64::from(limit))
        .bind(JOBS_CHANNEL)
        .bind(self.config.notify)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Deletes up to `limit` completed jobs finished before `completed_before`
    /// and dead letters (failed, cancelled, discarded) finished before
    /// `dead_before`, so history never slows the queue down. Returns the count.
    pub async fn job_prune(
        &self,
        completed_before: DateTime<Utc>,
        dead_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM jobs WHERE id IN (
               SELECT id FROM jobs
               WHERE finished_at IS NOT NULL
                 AND ((state = 'completed' AND finished_at < $1)
                      OR (state IN ('failed', 'cancelled', 'discarded') AND finished_at < $2))
               LIMIT $3
               FOR UPDATE SKIP LOCKED)",
        )
        .bind(completed_before)
        .bind(dead_before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    // ------------------------------------------------------------- operator

    /// Makes a job run again now: from `retryable`, `scheduled`, `available`
    /// (no-op apart from `run_at`), `failed`, `cancelled` or `discarded`. A job out of attempts gets one more.
    pub async fn job_retry_in(&self, conn: &mut PgConnection, id: JobId) -> Result<Job> {
        self.operator_action(
            conn,
            id,
            "retry",
            &[
                JobState::Retryable,
                JobState::Scheduled,
                JobState::Failed,
                JobState::Cancelled,
                JobState::Discarded,
                JobState::Available,
            ],
            "state = 'available', run_at = t.n, finished_at = NULL,
             max_attempts = greatest(j.max_attempts, j.attempt + 1)",
            None,
        )
        .await
    }

    /// Runs a dead letter again now — only a `failed` or `discarded` job, with one more
    /// attempt. The state is checked under the row lock, so two operators redriving the same
    /// job at once revive it once; the second gets [`Error::InvalidTransition`].
    pub async fn job_redrive_in(&self, conn: &mut PgConnection, id: JobId) -> Result<Job> {
        self.operator_action(
            conn,
            id,
            "redrive",
            &[JobState::Failed, JobState::Discarded],
            "state = 'available', run_at = t.n, finished_at = NULL,
             max_attempts = greatest(j.max_attempts, j.attempt + 1)",
            None,
        )
        .await
    }

    /// Cancels a job that has not finished. A running attempt is fenced off:
    /// its lease is revoked, so nothing it later tries to commit is applied.
    pub async fn job_cancel_in(
        &self,
        conn: &mut PgConnection,
        id: JobId,
        reason: &str,
    ) -> Result<Job> {
        self.operator_action(
            conn,
            id,
            "cancel",
            &[
                JobState::Scheduled,
                JobState::Available,
                JobState::Running,
                JobState::Retryable,
            ],
            "state = 'cancelled', finished_at = t.n, last_error = $3,
             lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL",
            Some(reason),
        )
        .await
    }

    /// Discards a job (makes it a dead letter) unless it already finished
    /// successfully or was cancelled. A running attempt is fenced off.
    pub async fn job_discard_in(
        &self,
        conn: &mut PgConnection,
        id: JobId,
        reason: &str,
    ) -> Result<Job> {
        self.operator_action(
            conn,
            id,
            "discard",
            &[
                JobState::Scheduled,
                JobState::Available,
                JobState::Running,
                JobState::Retryable,
                JobState::Failed,
            ],
            "state = 'discarded', finished_at = t.n, last_error = $3,
             lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL",
            Some(reason),
        )
        .await
    }

    async fn operator_action(
        &self,
        conn: &mut PgConnection,
        id: JobId,
        action: &'static str,
        from: &[JobState],
        set: &'static str,
        reason: Option<&str>,
    ) -> Result<Job> {
        let current: Option<JobState> =
            sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
        let current = current.ok_or(Error::JobNotFound(id))?;
        if !from.contains(&current) {
            return Err(Error::InvalidTransition {
                job_id: id,
                state: current.to_string(),
                action,
            });
        }
        // `set` is one of the constant fragments above, never input.
        let sql = format!(
            "WITH t AS (SELECT coalesce($2::timestamptz, now()) AS n),
             upd AS (UPDATE jobs j SET {set} FROM t WHERE j.id = $1 RETURNING j.*),
             ntf AS (SELECT count(pg_notify($4, queue)) AS n FROM upd WHERE $5 AND state = 'available')
             SELECT {JOB_COLUMNS} FROM upd, ntf"
        );
        Ok(sqlx::query_as::<_, Job>(&sql)
            .bind(id)
            .bind(self.now())
            .bind(reason)
            .bind(JOBS_CHANNEL)
            .bind(self.config.notify)
            .fetch_one(&mut *conn)
            .await?)
    }
}
