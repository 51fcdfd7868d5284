//! The job store against a real database: every state transition and the contract's guarantees.
//!
//! Each test gets its own freshly migrated database and a [`ManualClock`], so
//! time moves only when a test says so and nothing sleeps (except the short
//! window in which notifications are collected). Assertions read the final
//! rows back from the database.
mod common;

use chrono::{DateTime, TimeDelta, Utc};
use common::TestDb;
use ledgerflow_engine::notify::JOBS_CHANNEL;
use ledgerflow_engine::store::ClaimedJob;
use ledgerflow_engine::{
    Error, FencedTx, Inserted, Job, JobId, JobState, Lease, ManualClock, NewJob, Outcome, Result,
    RetryPolicy, Store, StoreConfig,
};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;

// ------------------------------------------------------------------ helpers

/// 2030-01-01T00:00:00Z: where every test's clock starts.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).expect("a valid timestamp")
}

/// `t0` plus `ms` milliseconds.
fn at_ms(ms: i64) -> DateTime<Utc> {
    t0() + TimeDelta::milliseconds(ms)
}

/// `t0` plus `s` seconds.
fn at(s: i64) -> DateTime<Utc> {
    at_ms(s * 1000)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn owner(name: &str) -> Arc<str> {
    Arc::from(name)
}

/// Lease 30 s, no NOTIFY, and an exact backoff of 10 s · 2^(n-1).
fn config() -> StoreConfig {
    StoreConfig {
        lease_ttl: secs(30),
        notify: false,
        retry: RetryPolicy {
            base: secs(10),
            max: secs(60 * 60),
            jitter: 0.0,
        },
    }
}

fn job(kind: &str) -> NewJob {
    NewJob::new(kind, json!({ "kind": kind }))
}

fn stale(err: &Error, id: JobId) -> bool {
    matches!(err, Error::StaleLease { job_id, .. } if *job_id == id)
}

/// The rows of `job_attempts` for one job: (attempt, worker, outcome, error).
type AttemptRow = (i32, String, String, Option<String>);

struct Env {
    db: TestDb,
    clock: ManualClock,
    store: Store,
}

impl Env {
    async fn new() -> Result<Self> {
        Self::with(config()).await
    }

    async fn with(config: StoreConfig) -> Result<Self> {
        let db = TestDb::new().await?;
        let clock = ManualClock::new(t0());
        let store = Store::with_config(db.pool.clone(), config).with_clock(Arc::new(clock.clone()));
        Ok(Self { db, clock, store })
    }

    fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    /// Another store on the same database and clock (a second worker process).
    fn other_store(&self) -> Store {
        Store::with_config(self.pool().clone(), self.store.config().clone())
            .with_clock(Arc::new(self.clock.clone()))
    }

    async fn job(&self, id: JobId) -> Result<Job> {
        self.store.job_get(id).await?.ok_or(Error::JobNotFound(id))
    }

    async fn state(&self, id: JobId) -> Result<JobState> {
        Ok(self.job(id).await?.state)
    }

    async fn token(&self, id: JobId) -> Result<Option<Uuid>> {
        Ok(
            sqlx::query_scalar("SELECT lease_token FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_one(self.pool())
                .await?,
        )
    }

    async fn attempts(&self, id: JobId) -> Result<Vec<AttemptRow>> {
        Ok(sqlx::query_as(
            "SELECT attempt, worker, outcome, error FROM job_attempts
             WHERE job_id = $1 ORDER BY attempt",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?)
    }

    async fn count(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(self.pool()).await?)
    }

    async fn insert(&self, job: NewJob) -> Result<JobId> {
        match self.store.job_insert(&job).await? {
            Inserted::New(id) => {
                assert_eq!(id, job.id());
                Ok(id)
            }
            other => panic!("expected a new job, got {other:?}"),
        }
    }

    async fn claim(&self, queue: &str, who: &str, limit: u32) -> Result<Vec<ClaimedJob>> {
        self.store.job_claim(queue, &owner(who), limit).await
    }

    /// Claims exactly one job of `queue`.
    async fn claim_one(&self, queue: &str, who: &str) -> Result<ClaimedJob> {
        let mut got = self.claim(queue, who, 1).await?;
        assert_eq!(got.len(), 1, "expected one job to claim in {queue:?}");
        Ok(got.remove(0))
    }

    /// Inserts `job` into `queue` (which must hold no other available job),
    /// claims it as `who` and, if given, finishes the attempt with `outcome`.
    async fn drive(
        &self,
        queue: &str,
        job: NewJob,
        who: &str,
        outcome: Option<Outcome>,
    ) -> Result<(JobId, Lease)> {
        let id = self.insert(job.queue(queue)).await?;
        let claimed = self.claim_one(queue, who).await?;
        assert_eq!(claimed.id, id);
        if let Some(outcome) = outcome {
            self.store.job_finish(&claimed.lease, &outcome).await?;
        }
        Ok((id, claimed.lease))
    }
}

/// Waits (polling, bounded) until `n` backends of this database wait on a lock.
async fn wait_for_lock_waiters(pool: &PgPool, n: i64) -> Result<()> {
    for _ in 0..2000 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await?;
        if waiting >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("no backend started waiting on a lock");
}

/// LISTENs on the jobs channel; payloads arrive on the returned receiver.
async fn listen(pool: &PgPool) -> Result<mpsc::UnboundedReceiver<String>> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(JOBS_CHANNEL).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(n) = listener.recv().await {
            if tx.send(n.payload().to_string()).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Every payload received within `window`.
async fn collect(rx: &mut mpsc::UnboundedReceiver<String>, window: Duration) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + window;
    let mut got = Vec::new();
    while let Ok(Some(payload)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        got.push(payload);
    }
    got
}

const WINDOW: Duration = Duration::from_millis(300);

// ------------------------------------------------------------------- insert

#[tokio::test]
async fn insert_is_available_now_or_scheduled_for_later() -> Result<()> {
    let env = Env::new().await?;
    let now = env.insert(job("now")).await?;
    let due = env.insert(job("due").run_at(at(0))).await?;
    let past = env.insert(job("past").run_at(at(-60))).await?;
    let later = env
        .insert(
            job("later")
                .run_at(at(3600))
                .max_attempts(3)
                .timeout(Duration::from_millis(1500)),
        )
        .await?;

    let j = env.job(now).await?;
    assert_eq!(j.state, JobState::Available);
    assert_eq!((j.run_at, j.created_at), (t0(), t0()));
    assert_eq!((j.attempt, j.max_attempts, j.timeout_ms), (0, 20, None));
    assert_eq!(j.queue, "default");
    assert_eq!(j.args, json!({ "kind": "now" }));
    assert_eq!(env.state(due).await?, JobState::Available);
    let j = env.job(past).await?;
    assert_eq!((j.state, j.run_at), (JobState::Available, at(-60)));
    let j = env.job(later).await?;
    assert_eq!((j.state, j.run_at), (JobState::Scheduled, at(3600)));
    assert_eq!((j.max_attempts, j.timeout_ms), (3, Some(1500)));
    assert!(j.lease_owner.is_none() && j.attempted_at.is_none() && j.finished_at.is_none());

    // Bad input is refused and writes nothing.
    let err = env.store.job_insert(&NewJob::new("", json!({}))).await;
    assert!(matches!(err, Err(Error::Invalid(_))), "{err:?}");
    let err = env.store.job_insert(&job("x").queue("")).await;
    assert!(matches!(err, Err(Error::Invalid(_))), "{err:?}");
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 4);

    // Only what is available can be claimed.
    let claimed: HashSet<JobId> = env
        .claim("default", "w", 10)
        .await?
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(claimed, HashSet::from([now, due, past]));
    assert_eq!(env.state(later).await?, JobState::Scheduled);
    Ok(())
}

#[tokio::test]
async fn claims_follow_priority_then_run_at_then_id() -> Result<()> {
    let env = Env::new().await?;
    let late1 = job("late1").priority(1).run_at(at(-10));
    let early0 = job("early0").priority(0).run_at(at(-20));
    let ties: Vec<NewJob> = (0..3)
        .map(|i| job(&format!("tie{i}")).priority(0).run_at(at(-5)))
        .collect();
    let urgent = job("urgent").priority(-1).run_at(at(0));
    for j in [&late1, &ties[2], &urgent, &ties[0], &early0, &ties[1]] {
        env.insert(j.clone()).await?;
    }
    let mut tie_ids: Vec<JobId> = ties.iter().map(NewJob::id).collect();
    tie_ids.sort();
    let mut expected = vec![urgent.id(), early0.id()];
    expected.extend(tie_ids);
    expected.push(late1.id());

    let mut order = Vec::new();
    while let Some(c) = env.claim("default", "w", 1).await?.pop() {
        order.push(c.id);
    }
    assert_eq!(order, expected);
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE state = 'running'")
            .await?,
        6
    );
    Ok(())
}

#[tokio::test]
async fn bulk_insert_of_ten_thousand_returns_new_ids_in_order() -> Result<()> {
    let env = Env::new().await?;
    let jobs: Vec<NewJob> = (0..10_000)
        .map(|i| NewJob::new("bulk", json!({ "n": i })).queue("bulk"))
        .collect();
    let out = env.store.job_insert_many(&jobs).await?;
    let expected: Vec<Inserted> = jobs.iter().map(|j| Inserted::New(j.id())).collect();
    assert_eq!(out, expected);
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE queue = 'bulk' AND state = 'available'")
            .await?,
        10_000
    );
    // Each row carries its own args.
    let n: i64 = sqlx::query_scalar("SELECT (args->>'n')::bigint FROM jobs WHERE id = $1")
        .bind(jobs[7_777].id())
        .fetch_one(env.pool())
        .await?;
    assert_eq!(n, 7_777);
    Ok(())
}

#[tokio::test]
async fn bulk_insert_resolves_duplicate_keys_to_their_holder() -> Result<()> {
    let env = Env::new().await?;
    let held = env.insert(job("held").unique("k-held")).await?;

    // 5,001 rows: two statements (chunks of 5,000), with duplicates inside a
    // chunk, across the chunk boundary, and against an existing row.
    let mut jobs: Vec<NewJob> = (0..5_001).map(|_| job("bulk")).collect();
    jobs[0] = job("a").unique("k-edge");
    jobs[1] = job("b").unique("k1");
    jobs[2] = job("c").unique("k-held");
    jobs[3] = job("d").unique("k1");
    jobs[4] = job("e").unique("k2");
    jobs[5_000] = job("f").unique("k-edge");
    let out = env.store.job_insert_many(&jobs).await?;
    assert_eq!(out.len(), 5_001);
    assert_eq!(out[0], Inserted::New(jobs[0].id()));
    assert_eq!(out[1], Inserted::New(jobs[1].id()));
    assert_eq!(out[2], Inserted::Existing(held));
    assert_eq!(out[3], Inserted::Existing(jobs[1].id()));
    assert_eq!(out[4], Inserted::New(jobs[4].id()));
    assert_eq!(out[5_000], Inserted::Existing(jobs[0].id()));
    assert!(
        out[5..5_000]
            .iter()
            .zip(&jobs[5..5_000])
            .all(|(o, j)| *o == Inserted::New(j.id()))
    );

    // One row per key, and the losers were never written.
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 1 + 5_001 - 3);
    let keys: Vec<(String, i64)> = sqlx::query_as(
        "SELECT unique_key, count(*) FROM jobs WHERE unique_key IS NOT NULL
         GROUP BY unique_key ORDER BY unique_key",
    )
    .fetch_all(env.pool())
    .await?;
    let expected: Vec<(String, i64)> = ["k-edge", "k-held", "k1", "k2"]
        .iter()
        .map(|k| (k.to_string(), 1))
        .collect();
    assert_eq!(keys, expected);
    for loser in [2, 3, 5_000] {
        assert!(env.store.job_get(jobs[loser].id()).await?.is_none());
    }
    Ok(())
}

// -------------------------------------------------------------- unique keys

#[tokio::test]
async fn unique_conflict_in_a_callers_tx_returns_the_holder_without_aborting() -> Result<()> {
    let env = Env::new().await?;
    let a = job("a").unique("k");
    let mut tx1 = env.pool().begin().await?;
    assert_eq!(
        env.store.job_insert_in(&mut tx1, &a).await?,
        Inserted::New(a.id())
    );
    tx1.commit().await?;

    let b = job("b").unique("k");
    let c = job("c");
    let mut tx2 = env.pool().begin().await?;
    assert_eq!(
        env.store.job_insert_in(&mut tx2, &b).await?,
        Inserted::Existing(a.id())
    );
    // The transaction is still usable: more statements succeed and it commits.
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut *tx2).await?;
    assert_eq!(one, 1);
    assert_eq!(
        env.store.job_insert_in(&mut tx2, &c).await?,
        Inserted::New(c.id())
    );
    tx2.commit().await?;

    assert!(env.store.job_get(a.id()).await?.is_some());
    assert!(env.store.job_get(b.id()).await?.is_none());
    assert!(env.store.job_get(c.id()).await?.is_some());
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 2);
    Ok(())
}

#[tokio::test]
async fn unique_key_is_free_again_after_a_rollback() -> Result<()> {
    let env = Env::new().await?;
    let a = job("a").unique("k");
    let mut tx = env.pool().begin().await?;
    assert_eq!(
        env.store.job_insert_in(&mut tx, &a).await?,
        Inserted::New(a.id())
    );
    tx.rollback().await?;

    let b = job("b").unique("k");
    assert_eq!(env.store.job_insert(&b).await?, Inserted::New(b.id()));
    assert!(env.store.job_get(a.id()).await?.is_none());
    let holder: Uuid = sqlx::query_scalar("SELECT id FROM jobs WHERE unique_key = 'k'")
        .fetch_one(env.pool())
        .await?;
    assert_eq!(holder, b.id());
    Ok(())
}

/// tx1 inserts key `k` and keeps its transaction open; tx2 inserts `k` on
/// another connection and must wait for tx1. Returns what tx2 got.
async fn contend_for_a_key(env: &Env, commit_first: bool) -> Result<(NewJob, NewJob, Inserted)> {
    let a = job("a").unique("k");
    let b = job("b").unique("k");
    let mut tx1 = env.pool().begin().await?;
    assert_eq!(
        env.store.job_insert_in(&mut tx1, &a).await?,
        Inserted::New(a.id())
    );

    let (store, b2) = (env.other_store(), b.clone());
    let second = tokio::spawn(async move {
        let mut tx2 = store.pool().begin().await?;
        let got = store.job_insert_in(&mut tx2, &b2).await?;
        sqlx::query("SELECT 1").execute(&mut *tx2).await?;
        tx2.commit().await?;
        Ok::<_, Error>(got)
    });
    wait_for_lock_waiters(env.pool(), 1).await?;
    assert!(!second.is_finished(), "tx2 must wait for tx1's key");

    if commit_first {
        tx1.commit().await?;
    } else {
        tx1.rollback().await?;
    }
    let got = second.await.expect("the second inserter panicked")?;
    Ok((a, b, got))
}

#[tokio::test]
async fn concurrent_unique_insert_waits_and_sees_the_committed_holder() -> Result<()> {
    let env = Env::new().await?;
    let (a, b, got) = contend_for_a_key(&env, true).await?;
    assert_eq!(got, Inserted::Existing(a.id()));
    assert!(env.store.job_get(b.id()).await?.is_none());
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 1);
    Ok(())
}

#[tokio::test]
async fn concurrent_unique_insert_takes_the_key_when_the_holder_rolls_back() -> Result<()> {
    let env = Env::new().await?;
    let (a, b, got) = contend_for_a_key(&env, false).await?;
    assert_eq!(got, Inserted::New(b.id()));
    assert!(env.store.job_get(a.id()).await?.is_none());
    let holder: Uuid = sqlx::query_scalar("SELECT id FROM jobs WHERE unique_key = 'k'")
        .fetch_one(env.pool())
        .await?;
    assert_eq!(holder, b.id());
    Ok(())
}

// -------------------------------------------------------------------- claim

#[tokio::test]
async fn claim_takes_a_lease() -> Result<()> {
    let env = Env::new().await?;
    let id = env.insert(job("x").max_attempts(5)).await?;
    env.clock.advance(secs(5));
    let c = env.claim_one("default", "worker-1").await?;
    assert_eq!(c.id, id);
    assert_eq!(c.kind, "x");
    assert_eq!(&*c.lease.owner, "worker-1");
    assert_eq!((c.lease.attempt, c.lease.max_attempts), (1, 5));
    assert_eq!(c.lease.attempted_at, at(5));

    let j = env.job(id).await?;
    assert_eq!(j.state, JobState::Running);
    assert_eq!(j.attempt, 1);
    assert_eq!(j.lease_owner.as_deref(), Some("worker-1"));
    assert_eq!(j.lease_expires_at, Some(at(5 + 30)));
    assert_eq!(j.attempted_at, Some(at(5)));
    assert_eq!(env.token(id).await?, Some(c.lease.token));

    // A running job is nobody else's.
    assert!(env.claim("default", "worker-2", 10).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn concurrent_claims_never_share_a_job() -> Result<()> {
    let env = Env::new().await?;
    let (sa, sb) = (env.other_store(), env.other_store());
    let (oa, ob) = (owner("a"), owner("b"));
    for round in 0..3 {
        let queue = format!("race-{round}");
        let jobs: Vec<NewJob> = (0..100).map(|_| job("r").queue(queue.as_str())).collect();
        env.store.job_insert_many(&jobs).await?;
        let (ga, gb) = tokio::join!(sa.job_claim(&queue, &oa, 50), sb.job_claim(&queue, &ob, 50));
        let (ga, gb) = (ga?, gb?);
        let ia: HashSet<JobId> = ga.iter().map(|c| c.id).collect();
        let ib: HashSet<JobId> = gb.iter().map(|c| c.id).collect();
        assert_eq!((ia.len(), ib.len()), (50, 50), "round {round}");
        assert!(ia.is_disjoint(&ib), "round {round}");
        let all: HashSet<JobId> = ia.union(&ib).copied().collect();
        assert_eq!(all, jobs.iter().map(NewJob::id).collect::<HashSet<_>>());

        let owners: Vec<(Option<String>, i64)> = sqlx::query_as(
            "SELECT lease_owner, count(*) FROM jobs WHERE queue = $1 AND state = 'running'
             AND attempt = 1 GROUP BY lease_owner ORDER BY lease_owner",
        )
        .bind(&queue)
        .fetch_all(env.pool())
        .await?;
        assert_eq!(owners, vec![(Some("a".into()), 50), (Some("b".into()), 50)]);
    }
    Ok(())
}

#[tokio::test]
async fn a_paused_queue_yields_nothing_until_resumed() -> Result<()> {
    let env = Env::new().await?;
    let q1 = env.insert(job("x").queue("q1")).await?;
    let q2 = env.insert(job("x").queue("q2")).await?;
    env.store.queue_pause("q1").await?;
    assert!(env.store.queue_is_paused("q1").await?);
    assert!(!env.store.queue_is_paused("q2").await?);

    assert!(env.claim("q1", "w", 10).await?.is_empty());
    assert_eq!(env.claim_one("q2", "w").await?.id, q2);
    assert_eq!(env.state(q1).await?, JobState::Available);

    env.store.queue_resume("q1").await?;
    assert!(!env.store.queue_is_paused("q1").await?);
    assert_eq!(env.claim_one("q1", "w").await?.id, q1);
    let paused: bool = sqlx::query_scalar("SELECT paused FROM queues WHERE name = 'q1'")
        .fetch_one(env.pool())
        .await?;
    assert!(!paused);
    Ok(())
}

// ------------------------------------------------------------------- finish

#[tokio::test]
async fn complete_records_the_finisher_and_clears_the_lease() -> Result<()> {
    let env = Env::new().await?;
    let (id, lease) = env.drive("q", job("x"), "worker-1", None).await?;
    env.clock.advance(secs(3));
    env.store.job_finish(&lease, &Outcome::Complete).await?;

    let j = env.job(id).await?;
    assert_eq!(j.state, JobState::Completed);
    assert_eq!(j.finished_at, Some(at(3)));
    assert_eq!(j.completed_by.as_deref(), Some("worker-1"));
    assert_eq!((j.lease_owner, j.lease_expires_at), (None, None));
    assert_eq!(env.token(id).await?, None);
    assert_eq!(j.attempt, 1);
    assert!(env.attempts(id).await?.is_empty());

    // Finishing twice is refused; the job is never claimed again.
    let err = env.store.job_finish(&lease, &Outcome::fail("late")).await;
    assert!(err.as_ref().is_err_and(|e| stale(e, id)), "{err:?}");
    assert_eq!(env.state(id).await?, JobState::Completed);
    assert!(env.claim("q", "w", 10).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn complete_many_completes_only_current_tokens() -> Result<()> {
    let env = Env::new().await?;
    let ids: Vec<JobId> = env
        .store
        .job_insert_many(&(0..4).map(|_| job("x")).collect::<Vec<_>>())
        .await?
        .into_iter()
        .map(Inserted::id)
        .collect();
    let first = env.claim("default", "w1", 4).await?;
    assert_eq!(first.len(), 4);
    // Two of them are given back and claimed again: their first tokens are stale.
    let (keep, redo): (Vec<&ClaimedJob>, Vec<&ClaimedJob>) =
        first.iter().partition(|c| c.id == ids[0] || c.id == ids[1]);
    let released = env
        .store
        .job_release(
            &redo
                .iter()
                .map(|c| (c.id, c.lease.token))
                .collect::<Vec<_>>(),
        )
        .await?;
    assert_eq!(released, 2);
    let second = env.claim("default", "w2", 4).await?;
    assert_eq!(second.len(), 2);

    env.clock.advance(secs(1));
    let mut batch: Vec<(JobId, Uuid)> = keep.iter().map(|c| (c.id, c.lease.token)).collect();
    batch.extend(redo.iter().map(|c| (c.id, c.lease.token)));
    batch.push((Uuid::now_v7(), Uuid::new_v4()));
    let mut done = env.store.job_complete_many(&batch).await?;
    done.sort();
    let mut expected = vec![ids[0], ids[1]];
    expected.sort();
    assert_eq!(done, expected);

    for c in &keep {
        let j = env.job(c.id).await?;
        assert_eq!(j.state, JobState::Completed);
        assert_eq!(j.completed_by.as_deref(), Some("w1"));
        assert_eq!(j.finished_at, Some(at(1)));
        assert_eq!(env.token(c.id).await?, None);
    }
    for c in &second {
        let j = env.job(c.id).await?;
        assert_eq!(j.state, JobState::Running);
        assert_eq!(j.lease_owner.as_deref(), Some("w2"));
        assert_eq!(env.token(c.id).await?, Some(c.lease.token));
    }
    assert!(env.store.job_complete_many(&[]).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn retry_backs_off_and_records_the_attempt() -> Result<()> {
    let env = Env::new().await?;
    let (id, lease) = env.drive("q", job("x").max_attempts(5), "w", None).await?;
    env.clock.advance(secs(2));
    env.store
        .job_finish(&lease, &Outcome::retry("boom"))
        .await?;

    let j = env.job(id).await?;
    assert_eq!(j.state, JobState::Retryable);
    assert_eq!(j.run_at, at(2 + 10));
    assert_eq!(j.attempt, 1);
    assert_eq!(j.last_error.as_deref(), Some("boom"));
    assert_eq!(
        (j.lease_owner, j.finished_at, j.completed_by),
        (None, None, None)
    );
    assert_eq!(
        env.attempts(id).await?,
        vec![(1, "w".into(), "retry".into(), Some("boom".into()))]
    );
    let (started, finished): (DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
        "SELECT started_at, finished_at FROM job_attempts WHERE job_id = $1 AND attempt = 1",
    )
    .bind(id)
    .fetch_one(env.pool())
    .await?;
    assert_eq!((started, finished), (t0(), at(2)));

    // The second failure waits twice as long.
    env.clock.set(at(12));
    assert_eq!(env.store.job_promote_due(100).await?, 1);
    let c = env.claim_one("q", "w").await?;
    assert_eq!(c.lease.attempt, 2);
    env.store
        .job_finish(&c.lease, &Outcome::retry("boom 2"))
        .await?;
    assert_eq!(env.job(id).await?.run_at, at(12 + 20));

    // An explicit delay overrides the policy.
    env.clock.set(at(32));
    assert_eq!(env.store.job_promote_due(100).await?, 1);
    let c = env.claim_one("q", "w").await?;
    let outcome = Outcome::Retry {
        error: "rate limited".into(),
        delay: Some(secs(5)),
    };
    env.store.job_finish(&c.lease, &outcome).await?;
    let j = env.job(id).await?;
    assert_eq!(
        (j.state, j.run_at, j.attempt),
        (JobState::Retryable, at(37), 3)
    );
    let outcomes: Vec<(i32, String)> = env
        .attempts(id)
        .await?
        .into_iter()
        .map(|(n, _, o, _)| (n, o))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (1, "retry".into()),
            (2, "retry".into()),
            (3, "retry".into())
        ]
    );
    Ok(())
}

#[tokio::test]
async fn retry_on_the_last_attempt_discards() -> Result<()> {
    let env = Env::new().await?;
    let (id, lease) = env.drive("q", job("x").max_attempts(1), "w", None).await?;
    assert!(lease.is_last_attempt());
    env.clock.advance(secs(1));
    env.store
        .job_finish(&lease, &Outcome::retry("gave up"))
        .await?;

    let j = env.job(id).await?;
    assert_eq!(j.state, JobState::Discarded);
    assert_eq!(j.finished_at, Some(at(1)));
    assert_eq!(j.last_error.as_deref(), Some("gave up"));
    assert_eq!(env.token(id).await?, None);
    assert_eq!(
        env.attempts(id).await?,
        vec![(1, "w".into(), "discarded".into(), Some("gave up".into()))]
    );
    env.clock.advance(secs(24 * 3600));
    assert_eq!(env.store.job_promote_due(100).await?, 0);
    assert!(env.claim("q", "w", 10).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn fail_and_cancel_are_final() -> Result<()> {
    let env = Env::new().await?;
    let (failed, _) = env
        .drive("qf", job("f"), "w", Some(Outcome::fail("bad input")))
        .await?;
    let (cancelled, _) = env
        .drive("qc", job("c"), "w", Some(Outcome::cancel("not wanted")))
        .await?;

    let j = env.job(failed).await?;
    assert_eq!((j.state, j.finished_at), (JobState::Failed, Some(t0())));
    assert_eq!(j.last_error.as_deref(), Some("bad input"));
    assert_eq!(env.token(failed).await?, None);
    assert_eq!(
        env.attempts(failed).await?,
        vec![(1, "w".into(), "failed".into(), Some("bad input".into()))]
    );

    let j = env.job(cancelled).await?;
    assert_eq!((j.state, j.finished_at), (JobState::Cancelled, Some(t0())));
    assert_eq!(j.last_error.as_deref(), Some("not wanted"));
    assert_eq!(
        env.attempts(cancelled).await?,
        vec![(1, "w".into(), "cancelled".into(), Some("not wanted".into()))]
    );

    env.clock.advance(secs(24 * 3600));
    assert_eq!(env.store.job_promote_due(100).await?, 0);
    assert_eq!(env.store.job_rescue_expired(100).await?, 0);
    assert!(env.claim("qf", "w", 10).await?.is_empty());
    assert!(env.claim("qc", "w", 10).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn snooze_reschedules_and_gives_the_attempt_back() -> Result<()> {
    let env = Env::new().await?;
    let id = env.insert(job("x").queue("q")).await?;
    assert_eq!(env.job(id).await?.attempt, 0);
    let c = env.claim_one("q", "w").await?;
    assert_eq!(c.lease.attempt, 1);
    env.clock.advance(secs(1));
    env.store
        .job_finish(&c.lease, &Outcome::Snooze(secs(30)))
        .await?;

    let j = env.job(id).await?;
    assert_eq!(j.state, JobState::Scheduled);
    assert_eq!(j.run_at, at(31));
    assert_eq!(j.attempt, 0);
    assert_eq!((j.lease_owner, j.finished_at), (None, None));
    assert_eq!(env.token(id).await?, None);
    assert!(env.attempts(id).await?.is_empty());

    env.clock.set(at_ms(31_000 - 1));
    assert_eq!(env.store.job_promote_due(100).await?, 0);
    assert!(env.claim("q", "w", 1).await?.is_empty());
    env.clock.set(at(31));
    assert_eq!(env.store.job_promote_due(100).await?, 1);
    assert_eq!(env.claim_one("q", "w").await?.lease.attempt, 1);
    Ok(())
}

// ------------------------------------------------------------------ promote

#[tokio::test]
async fn promote_waits_for_run_at_then_makes_jobs_claimable() -> Result<()> {
    let env = Env::new().await?;
    let scheduled = env.insert(job("s").queue("q").run_at(at(60))).await?;
    let (retryable, lease) = env.drive("q", job("r"), "w", None).await?;
    let outcome = Outcome::Retry {
        error: "later".into(),
        delay: Some(secs(60)),
    };
    env.store.job_finish(&lease, &outcome).await?;
    assert_eq!(env.state(retryable).await?, JobState::Retryable);

    env.clock.set(at_ms(60_000 - 1));
    assert_eq!(env.store.job_promote_due(100).await?, 0);
    assert_eq!(env.state(scheduled).await?, JobState::Scheduled);
    assert_eq!(env.state(retryable).await?, JobState::Retryable);
    assert!(env.claim("q", "w", 10).await?.is_empty());

    env.clock.set(at(60));
    assert_eq!(env.store.job_promote_due(100).await?, 2);
    assert_eq!(env.state(scheduled).await?, JobState::Available);
    assert_eq!(env.state(retryable).await?, JobState::Available);
    assert_eq!(env.store.job_promote_due(100).await?, 0);

    let claimed: HashSet<JobId> = env
        .claim("q", "w", 10)
        .await?
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(claimed, HashSet::from([scheduled, retryable]));
    assert_eq!(env.job(retryable).await?.attempt, 2);
    assert_eq!(env.job(scheduled).await?.attempt, 1);
    Ok(())
}

// ----------------------------------------------------------------- fencing

async fn create_effects(pool: &PgPool) -> Result<()> {
    sqlx::query("CREATE TABLE effects (job_id uuid NOT NULL)")
        .execute(pool)
        .await?;
    Ok(())
}

async fn effects(pool: &PgPool, id: JobId) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM effects WHERE job_id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

#[tokio::test]
async fn a_stale_attempt_is_fenced_off_and_only_the_current_one_applies() -> Result<()> {
    let env = Env::with(StoreConfig {
        lease_ttl: secs(1),
        ..config()
    })
    .await?;
    create_effects(env.pool()).await?;
    let id = env.insert(job("pay").queue("q")).await?;
    let a = env.claim_one("q", "worker-a").await?.lease;

    // A stops heartbeating; the reaper takes the job back.
    env.clock.advance(secs(2));
    assert_eq!(env.store.job_rescue_expired(100).await?, 1);
    let j = env.job(id).await?;
    assert_eq!(
        (j.state, j.attempt, j.run_at),
        (JobState::Available, 1, at(2))
    );
    assert_eq!((j.lease_owner, j.finished_at), (None, None));
    assert!(j.last_error.is_some_and(|e| e.contains("worker-a")));
    let rows = env.attempts(id).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].0, rows[0].1.as_str(), rows[0].2.as_str()),
        (1, "worker-a", "lease_expired")
    );

    // B claims it under a new token.
    let b = env.claim_one("q", "worker-b").await?.lease;
    assert_eq!(b.attempt, 2);
    assert_ne!(b.token, a.token);

    // Everything A tries now is refused.
    let err = env.store.job_finish(&a, &Outcome::Complete).await;
    assert!(err.as_ref().is_err_and(|e| stale(e, id)), "{err:?}");
    let err = FencedTx::begin(&env.store, &a).await;
    assert!(err.as_ref().is_err_and(|e| stale(e, id)), "{err:?}");
    // A's own transaction: its effect and its follow-up job roll back with the refusal.
    let mut tx = env.pool().begin().await?;
    sqlx::query("INSERT INTO effects (job_id) VALUES ($1)")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    env.store
        .job_insert_in(&mut tx, &job("next-from-a").queue("next"))
        .await?;
    let err = env
        .store
        .job_finish_in(&mut tx, &a, &Outcome::Complete)
        .await;
    assert!(err.as_ref().is_err_and(|e| stale(e, id)), "{err:?}");
    tx.rollback().await?;
    assert!(
        env.store
            .job_complete_many(&[(id, a.token)])
            .await?
            .is_empty()
    );
    assert!(env.store.job_heartbeat(&[(id, a.token)]).await?.is_empty());
    assert_eq!(env.store.job_release(&[(id, a.token)]).await?, 0);
    assert!(!a.is_finished());

    // B's attempt commits its effect, its follow-up and the completion together.
    let mut ftx = FencedTx::begin(&env.store, &b).await?;
    sqlx::query("INSERT INTO effects (job_id) VALUES ($1)")
        .bind(id)
        .execute(ftx.conn())
        .await?;
    env.store
        .job_insert_in(ftx.conn(), &job("next-from-b").queue("next"))
        .await?;
    ftx.complete().await?;
    assert!(b.is_finished());

    let j = env.job(id).await?;
    assert_eq!(j.state, JobState::Completed);
    assert_eq!(j.completed_by.as_deref(), Some("worker-b"));
    assert_eq!(j.attempt, 2);
    assert_eq!(effects(env.pool(), id).await?, 1);
    assert_eq!(env.count("SELECT count(*) FROM effects").await?, 1);
    let next: Vec<String> = sqlx::query_scalar("SELECT kind FROM jobs WHERE queue = 'next'")
        .fetch_all(env.pool())
        .await?;
    assert_eq!(next, vec!["next-from-b".to_string()]);
    assert_eq!(env.attempts(id).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn an_open_fenced_tx_holds_off_the_reaper() -> Result<()> {
    let env = Env::with(StoreConfig {
        lease_ttl: secs(1),
        ..config()
    })
    .await?;
    create_effects(env.pool()).await?;
    let id = env.insert(job("pay").queue("q")).await?;
    let a = env.claim_one("q", "worker-a").await?.lease;

    let mut ftx = FencedTx::begin(&env.store, &a).await?;
    sqlx::query("INSERT INTO effects (job_id) VALUES ($1)")
        .bind(id)
        .execute(ftx.conn())
        .await?;

    // The lease expires while A's transaction is open: the reaper skips the
    // locked row, so nobody else can take the job over.
    env.clock.advance(secs(2));
    assert_eq!(env.store.job_rescue_expired(100).await?, 0);
    assert!(env.claim("q", "worker-b", 10).await?.is_empty());
    assert!(env.store.job_heartbeat(&[(id, a.token)]).await?.is_empty());
    assert_eq!(env.state(id).await?, JobState::Running);

    ftx.complete().await?;
    assert!(a.is_finished());
    let j = env.job(id).await?;
    assert_eq!(j.state, JobState::Completed);
    assert_eq!(j.completed_by.as_deref(), Some("worker-a"));
    assert_eq!(j.finished_at, Some(at(2)));
    assert_eq!(effects(env.pool(), id).await?, 1);
    assert!(env.attempts(id).await?.is_empty());
    assert_eq!(env.store.job_rescue_expired(100).await?, 0);
    assert!(env.claim("q", "worker-b", 10).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_rolled_back_fenced_tx_leaves_the_lease_and_writes_nothing() -> Result<()> {
    let env = Env::new().await?;
    create_effects(env.pool()).await?;
    let (id, lease) = env.drive("q", job("x"), "w", None).await?;
    let mut ftx = FencedTx::begin(&env.store, &lease).await?;
    sqlx::query("INSERT INTO effects (job_id) VALUES ($1)")
        .bind(id)
        .execute(ftx.conn())
        .await?;
    ftx.rollback().await?;
    assert_eq!(effects(env.pool(), id).await?, 0);
    assert!(!lease.is_finished());
    assert_eq!(env.state(id).await?, JobState::Running);
    assert_eq!(env.token(id).await?, Some(lease.token));

    // A checkpoint commits the writes but keeps the lease.
    let mut ftx = FencedTx::begin(&env.store, &lease).await?;
    sqlx::query("INSERT INTO effects (job_id) VALUES ($1)")
        .bind(id)
        .execute(ftx.conn())
        .await?;
    ftx.commit().await?;
    assert_eq!(effects(env.pool(), id).await?, 1);
    assert_eq!(env.state(id).await?, JobState::Running);
    env.store.job_finish(&lease, &Outcome::Complete).await?;
    assert_eq!(env.state(id).await?, JobState::Completed);
    Ok(())
}

// ---------------------------------------------------------- rescue, release

#[tokio::test]
async fn rescue_respects_expiry_and_discards_on_the_last_attempt() -> Result<()> {
    let env = Env::with(StoreConfig {
        lease_ttl: secs(1),
        ..config()
    })
    .await?;
    let (last, _) = env
        .drive("qx", job("x").max_attempts(1), "wx", None)
        .await?;
    env.clock.set(at_ms(1_500));
    let (more, _) = env
        .drive("qy", job("y").max_attempts(3), "wy", None)
        .await?;

    // Expiring exactly now is not yet expired.
    env.clock.set(at(1));
    assert_eq!(env.store.job_rescue_expired(100).await?, 0);

    env.clock.set(at(2));
    assert_eq!(env.store.job_rescue_expired(100).await?, 1);
    let j = env.job(last).await?;
    assert_eq!(j.state, JobState::Discarded);
    assert_eq!(j.finished_at, Some(at(2)));
    assert_eq!(env.token(last).await?, None);
    let rows = env.attempts(last).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].0, rows[0].1.as_str(), rows[0].2.as_str()),
        (1, "wx", "lease_expired")
    );
    assert_eq!(env.state(more).await?, JobState::Running);
    assert!(env.claim("qx", "w", 10).await?.is_empty());

    env.clock.set(at(3));
    assert_eq!(env.store.job_rescue_expired(100).await?, 1);
    let j = env.job(more).await?;
    assert_eq!(
        (j.state, j.attempt, j.run_at, j.finished_at),
        (JobState::Available, 1, at(3), None)
    );
    assert_eq!(env.claim_one("qy", "w").await?.lease.attempt, 2);
    Ok(())
}

#[tokio::test]
async fn release_gives_the_job_back_without_using_an_attempt() -> Result<()> {
    let env = Env::new().await?;
    let (id, lease) = env.drive("q", job("x"), "w", None).await?;
    env.clock.advance(secs(1));
    assert_eq!(env.store.job_release(&[(id, lease.token)]).await?, 1);

    let j = env.job(id).await?;
    assert_eq!(
        (j.state, j.attempt, j.run_at),
        (JobState::Available, 0, at(1))
    );
    assert_eq!(
        (j.lease_owner, j.lease_expires_at, j.finished_at),
        (None, None, None)
    );
    assert_eq!(env.token(id).await?, None);
    assert!(env.attempts(id).await?.is_empty());
    assert_eq!(env.store.job_release(&[(id, lease.token)]).await?, 0);
    assert_eq!(env.store.job_release(&[]).await?, 0);

    let again = env.claim_one("q", "w").await?.lease;
    assert_eq!(again.attempt, 1);
    assert_ne!(again.token, lease.token);
    Ok(())
}

#[tokio::test]
async fn heartbeat_extends_only_current_leases() -> Result<()> {
    let env = Env::with(StoreConfig {
        lease_ttl: secs(10),
        ..config()
    })
    .await?;
    let (live, live_lease) = env.drive("q1", job("a"), "w", None).await?;
    let (other, _) = env.drive("q2", job("b"), "w", None).await?;
    let (done, done_lease) = env
        .drive("q3", job("c"), "w", Some(Outcome::Complete))
        .await?;

    env.clock.advance(secs(5));
    let extended = env
        .store
        .job_heartbeat(&[
            (live, live_lease.token),
            (other, Uuid::new_v4()),
            (done, done_lease.token),
        ])
        .await?;
    assert_eq!(extended, vec![live]);
    assert_eq!(env.job(live).await?.lease_expires_at, Some(at(15)));
    assert_eq!(env.job(other).await?.lease_expires_at, Some(at(10)));
    assert_eq!(env.job(done).await?.lease_expires_at, None);
    assert_eq!(env.state(done).await?, JobState::Completed);

    // The extended lease survives the reaper; the other does not.
    env.clock.set(at(12));
    assert_eq!(env.store.job_rescue_expired(100).await?, 1);
    assert_eq!(env.state(live).await?, JobState::Running);
    assert_eq!(env.state(other).await?, JobState::Available);
    assert!(env.store.job_heartbeat(&[]).await?.is_empty());
    Ok(())
}

// ---------------------------------------------------------------- operator

#[tokio::test]
async fn operator_retry_revives_dead_and_waiting_jobs_only() -> Result<()> {
    let env = Env::new().await?;
    let (discarded, _) = env
        .drive(
            "od",
            job("d").max_attempts(1),
            "w",
            Some(Outcome::retry("x")),
        )
        .await?;
    let (failed, _) = env
        .drive("of", job("f"), "w", Some(Outcome::fail("x")))
        .await?;
    let (cancelled, _) = env
        .drive("oc", job("c"), "w", Some(Outcome::cancel("x")))
        .await?;
    let (retryable, _) = env
        .drive("or", job("r"), "w", Some(Outcome::retry("x")))
        .await?;
    let (running, _) = env.drive("orun", job("run"), "w", None).await?;
    let (completed, _) = env
        .drive("odone", job("done"), "w", Some(Outcome::Complete))
        .await?;
    assert_eq!(env.state(discarded).await?, JobState::Discarded);
    assert_eq!(env.state(retryable).await?, JobState::Retryable);

    env.clock.set(at(60));
    let mut conn = env.pool().acquire().await?;

    // Inside a transaction that rolls back, nothing changes.
    let mut tx = env.pool().begin().await?;
    env.store.job_retry_in(&mut tx, failed).await?;
    tx.rollback().await?;
    assert_eq!(env.state(failed).await?, JobState::Failed);

    for id in [discarded, failed, cancelled, retryable] {
        let j = env.store.job_retry_in(&mut conn, id).await?;
        assert_eq!(
            (j.state, j.run_at, j.finished_at),
            (JobState::Available, at(60), None)
        );
        let stored = env.job(id).await?;
        assert_eq!((stored.state, stored.run_at), (JobState::Available, at(60)));
        assert_eq!(stored.finished_at, None);
    }
    // Out of attempts: one more is granted. Otherwise the budget stands.
    let j = env.job(discarded).await?;
    assert_eq!((j.attempt, j.max_attempts), (1, 2));
    assert_eq!(env.job(failed).await?.max_attempts, 20);

    for (id, state) in [(running, "running"), (completed, "completed")] {
        let err = env.store.job_retry_in(&mut conn, id).await;
        assert!(
            matches!(&err, Err(Error::InvalidTransition { job_id, state: s, action: "retry" })
                if *job_id == id && s == state),
            "{err:?}"
        );
    }
    assert_eq!(env.state(running).await?, JobState::Running);
    assert_eq!(env.state(completed).await?, JobState::Completed);
    let unknown = Uuid::now_v7();
    let err = env.store.job_retry_in(&mut conn, unknown).await;
    assert!(
        matches!(err, Err(Error::JobNotFound(id)) if id == unknown),
        "{err:?}"
    );

    // The revived dead letter runs again with its extra attempt.
    let c = env.claim_one("od", "w").await?;
    assert_eq!(
        (c.id, c.lease.attempt, c.lease.max_attempts),
        (discarded, 2, 2)
    );
    Ok(())
}

#[tokio::test]
async fn operator_cancel_fences_off_a_running_attempt() -> Result<()> {
    let env = Env::new().await?;
    let (running, lease) = env.drive("q", job("run"), "w", None).await?;
    let scheduled = env.insert(job("s").queue("q").run_at(at(600))).await?;
    let available = env.insert(job("a").queue("q")).await?;
    let (completed, _) = env
        .drive("done", job("d"), "w", Some(Outcome::Complete))
        .await?;
    env.clock.advance(secs(1));
    let mut conn = env.pool().acquire().await?;

    let j = env
        .store
        .job_cancel_in(&mut conn, running, "operator: not needed")
        .await?;
    assert_eq!(j.state, JobState::Cancelled);
    assert_eq!(j.last_error.as_deref(), Some("operator: not needed"));
    assert_eq!((j.lease_owner, j.finished_at), (None, Some(at(1))));
    assert_eq!(env.state(running).await?, JobState::Cancelled);
    assert_eq!(env.token(running).await?, None);

    // The attempt still running in its worker can no longer commit anything.
    let err = env.store.job_finish(&lease, &Outcome::Complete).await;
    assert!(err.as_ref().is_err_and(|e| stale(e, running)), "{err:?}");
    let err = FencedTx::begin(&env.store, &lease).await;
    assert!(err.as_ref().is_err_and(|e| stale(e, running)), "{err:?}");
    assert!(
        env.store
            .job_heartbeat(&[(running, lease.token)])
            .await?
            .is_empty()
    );
    assert_eq!(env.state(running).await?, JobState::Cancelled);

    for id in [scheduled, available] {
        assert_eq!(
            env.store.job_cancel_in(&mut conn, id, "stop").await?.state,
            JobState::Cancelled
        );
        assert_eq!(env.state(id).await?, JobState::Cancelled);
    }
    assert!(env.claim("q", "w", 10).await?.is_empty());

    for (id, state) in [(completed, "completed"), (running, "cancelled")] {
        let err = env.store.job_cancel_in(&mut conn, id, "again").await;
        assert!(
            matches!(&err, Err(Error::InvalidTransition { job_id, state: s, action: "cancel" })
                if *job_id == id && s == state),
            "{err:?}"
        );
    }
    assert_eq!(env.state(completed).await?, JobState::Completed);
    let unknown = Uuid::now_v7();
    let err = env.store.job_cancel_in(&mut conn, unknown, "x").await;
    assert!(
        matches!(err, Err(Error::JobNotFound(id)) if id == unknown),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn operator_discard_makes_dead_letters() -> Result<()> {
    let env = Env::new().await?;
    let available = env.insert(job("a").queue("q")).await?;
    let (failed, _) = env
        .drive("qf", job("f"), "w", Some(Outcome::fail("x")))
        .await?;
    let (running, lease) = env.drive("qr", job("r"), "w", None).await?;
    let (completed, _) = env
        .drive("qd", job("d"), "w", Some(Outcome::Complete))
        .await?;
    let (cancelled, _) = env
        .drive("qc", job("c"), "w", Some(Outcome::cancel("x")))
        .await?;
    env.clock.advance(secs(1));
    let mut conn = env.pool().acquire().await?;

    for id in [available, failed, running] {
        let j = env.store.job_discard_in(&mut conn, id, "poison").await?;
        assert_eq!(j.state, JobState::Discarded);
        let stored = env.job(id).await?;
        assert_eq!(stored.state, JobState::Discarded);
        assert_eq!(stored.finished_at, Some(at(1)));
        assert_eq!(stored.last_error.as_deref(), Some("poison"));
        assert_eq!(env.token(id).await?, None);
    }
    let err = env.store.job_finish(&lease, &Outcome::Complete).await;
    assert!(err.as_ref().is_err_and(|e| stale(e, running)), "{err:?}");
    assert_eq!(env.state(running).await?, JobState::Discarded);

    for (id, state) in [(completed, "completed"), (cancelled, "cancelled")] {
        let err = env.store.job_discard_in(&mut conn, id, "x").await;
        assert!(
            matches!(&err, Err(Error::InvalidTransition { job_id, state: s, action: "discard" })
                if *job_id == id && s == state),
            "{err:?}"
        );
    }
    let unknown = Uuid::now_v7();
    let err = env.store.job_discard_in(&mut conn, unknown, "x").await;
    assert!(
        matches!(err, Err(Error::JobNotFound(id)) if id == unknown),
        "{err:?}"
    );

    // A dead letter can be revived.
    let j = env.store.job_retry_in(&mut conn, available).await?;
    assert_eq!(j.state, JobState::Available);
    Ok(())
}

// -------------------------------------------------------------------- prune

#[tokio::test]
async fn prune_deletes_old_finished_jobs_and_keeps_the_rest() -> Result<()> {
    let env = Env::new().await?;
    env.clock.set(at(10 * 60));
    let (c_old, _) = env
        .drive("p1", job("c-old"), "w", Some(Outcome::Complete))
        .await?;
    let (f_old, _) = env
        .drive("p2", job("f-old"), "w", Some(Outcome::fail("x")))
        .await?;
    env.clock.set(at(2 * 3600));
    let (x_dead, _) = env
        .drive("p3", job("x-dead"), "w", Some(Outcome::cancel("x")))
        .await?;
    env.clock.set(at(4 * 3600));
    let (c_new, _) = env
        .drive("p4", job("c-new"), "w", Some(Outcome::Complete))
        .await?;
    let (d_new, _) = env
        .drive(
            "p5",
            job("d-new").max_attempts(1),
            "w",
            Some(Outcome::retry("x")),
        )
        .await?;
    let available = env.insert(job("live").queue("p6")).await?;
    let scheduled = env.insert(job("sched").run_at(at(10 * 3600))).await?;
    let (running, _) = env.drive("p7", job("run"), "w", None).await?;
    let (retryable, _) = env
        .drive("p8", job("retry"), "w", Some(Outcome::retry("x")))
        .await?;
    assert_eq!(env.count("SELECT count(*) FROM job_attempts").await?, 4);

    // Completed jobs are kept 3 h, dead letters only 1 h here: the
    // cancelled job (2 h) goes by neither cutoff's rule.
    let (completed_before, dead_before) = (at(3 * 3600), at(3600));
    assert_eq!(
        env.store
            .job_prune(completed_before, dead_before, 1)
            .await?,
        1
    );
    assert_eq!(
        env.store
            .job_prune(completed_before, dead_before, 1)
            .await?,
        1
    );
    assert_eq!(
        env.store
            .job_prune(completed_before, dead_before, 1)
            .await?,
        0
    );

    for id in [c_old, f_old] {
        assert!(env.store.job_get(id).await?.is_none());
    }
    for id in [
        x_dead, c_new, d_new, available, scheduled, running, retryable,
    ] {
        assert!(env.store.job_get(id).await?.is_some());
    }
    let (completed_before, dead_before) = (at(3 * 3600), at(3 * 3600));
    assert_eq!(
        env.store
            .job_prune(completed_before, dead_before, 100)
            .await?,
        1
    );
    assert!(env.store.job_get(x_dead).await?.is_none());
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 6);

    // The pruned jobs' attempt rows went with them.
    assert!(env.attempts(f_old).await?.is_empty());
    assert!(env.attempts(x_dead).await?.is_empty());
    assert_eq!(env.attempts(d_new).await?.len(), 1);
    assert_eq!(env.attempts(retryable).await?.len(), 1);
    assert_eq!(env.count("SELECT count(*) FROM job_attempts").await?, 2);
    Ok(())
}

// ------------------------------------------------------------------ notify

#[tokio::test]
async fn notify_once_per_transaction_and_queue() -> Result<()> {
    assert_eq!(JOBS_CHANNEL, "ledgerflow_jobs");
    let env = Env::with(StoreConfig {
        notify: true,
        ..config()
    })
    .await?;
    let mut rx = listen(env.pool()).await?;

    let mut tx = env.pool().begin().await?;
    let batch: Vec<NewJob> = (0..60).map(|_| job("m").queue("mail")).collect();
    env.store.job_insert_many_in(&mut tx, &batch).await?;
    for _ in 0..40 {
        env.store
            .job_insert_in(&mut tx, &job("m").queue("mail"))
            .await?;
    }
    // Nothing is announced before the commit.
    assert!(collect(&mut rx, Duration::from_millis(50)).await.is_empty());
    tx.commit().await?;
    assert_eq!(collect(&mut rx, WINDOW).await, vec!["mail".to_string()]);
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE queue = 'mail' AND state = 'available'")
            .await?,
        100
    );

    // Two queues in one transaction: one notification each.
    let mut tx = env.pool().begin().await?;
    let batch: Vec<NewJob> = (0..10)
        .map(|i| job("m").queue(if i % 2 == 0 { "a" } else { "b" }))
        .collect();
    env.store.job_insert_many_in(&mut tx, &batch).await?;
    env.store
        .job_insert_in(&mut tx, &job("m").queue("a"))
        .await?;
    tx.commit().await?;
    let mut got = collect(&mut rx, WINDOW).await;
    got.sort();
    assert_eq!(got, vec!["a".to_string(), "b".to_string()]);

    // A rolled-back insert announces nothing.
    let mut tx = env.pool().begin().await?;
    env.store
        .job_insert_in(&mut tx, &job("m").queue("mail"))
        .await?;
    tx.rollback().await?;
    assert!(collect(&mut rx, WINDOW).await.is_empty());
    Ok(())
}

#[tokio::test]
async fn notify_disabled_sends_nothing() -> Result<()> {
    let env = Env::new().await?; // notify: false
    let mut rx = listen(env.pool()).await?;
    let mut tx = env.pool().begin().await?;
    let batch: Vec<NewJob> = (0..100).map(|_| job("m").queue("mail")).collect();
    env.store.job_insert_many_in(&mut tx, &batch).await?;
    env.store
        .job_insert_in(&mut tx, &job("m").queue("mail"))
        .await?;
    tx.commit().await?;
    env.insert(job("m").queue("mail")).await?;
    env.insert(job("s").queue("mail").run_at(at(1))).await?;
    env.clock.set(at(1));
    assert_eq!(env.store.job_promote_due(100).await?, 1);
    let c = env.claim_one("mail", "w").await?;
    assert_eq!(env.store.job_release(&[(c.id, c.lease.token)]).await?, 1);
    env.store.queue_pause("mail").await?;
    env.store.queue_resume("mail").await?;
    assert!(collect(&mut rx, WINDOW).await.is_empty());
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 103);
    Ok(())
}

#[tokio::test]
async fn scheduled_insert_sends_no_notification_until_promoted() -> Result<()> {
    let env = Env::with(StoreConfig {
        notify: true,
        ..config()
    })
    .await?;
    let mut rx = listen(env.pool()).await?;
    let id = env.insert(job("later").queue("s").run_at(at(60))).await?;
    let batch: Vec<NewJob> = (0..5)
        .map(|i| job("later").queue("s").run_at(at(61 + i)))
        .collect();
    env.store.job_insert_many(&batch).await?;
    assert!(collect(&mut rx, WINDOW).await.is_empty());
    assert_eq!(env.state(id).await?, JobState::Scheduled);

    // Promotion wakes the queue once.
    env.clock.set(at(3600));
    assert_eq!(env.store.job_promote_due(100).await?, 6);
    assert_eq!(collect(&mut rx, WINDOW).await, vec!["s".to_string()]);
    Ok(())
}

// -------------------------------------------------------------- queue list

#[tokio::test]
async fn queue_list_counts_jobs_per_state() -> Result<()> {
    let env = Env::new().await?;
    // Finished and waiting jobs first, so that each claim takes the job just inserted.
    env.drive("q", job("c"), "w", Some(Outcome::Complete))
        .await?;
    env.drive("q", job("f"), "w", Some(Outcome::fail("x")))
        .await?;
    env.drive("q", job("x"), "w", Some(Outcome::cancel("x")))
        .await?;
    env.drive(
        "q",
        job("d").max_attempts(1),
        "w",
        Some(Outcome::retry("x")),
    )
    .await?;
    env.drive("q", job("r"), "w", Some(Outcome::retry("x")))
        .await?;
    env.drive("q", job("run"), "w", None).await?;
    env.insert(job("s").queue("q").run_at(at(600))).await?;
    env.insert(job("a").queue("q")).await?;
    env.insert(job("a").queue("q")).await?;
    env.insert(job("a").queue("other")).await?;
    env.store.queue_pause("other").await?;
    env.store.queue_pause("idle").await?;

    let list = env.store.queue_list().await?;
    let names: Vec<(&str, bool)> = list.iter().map(|q| (q.name.as_str(), q.paused)).collect();
    assert_eq!(names, vec![("idle", true), ("other", true), ("q", false)]);

    let counts = |pairs: &[(&str, i64)]| -> BTreeMap<String, i64> {
        let mut m: BTreeMap<String, i64> =
            JobState::ALL.iter().map(|s| (s.to_string(), 0)).collect();
        for (s, n) in pairs {
            m.insert((*s).to_string(), *n);
        }
        m
    };
    assert_eq!(list[0].counts, counts(&[]));
    assert_eq!(list[1].counts, counts(&[("available", 1)]));
    assert_eq!(
        list[2].counts,
        counts(&[
            ("scheduled", 1),
            ("available", 2),
            ("running", 1),
            ("retryable", 1),
            ("completed", 1),
            ("failed", 1),
            ("cancelled", 1),
            ("discarded", 1),
        ])
    );
    // The same numbers straight from the table.
    let by_state: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state::text, count(*) FROM jobs WHERE queue = 'q' GROUP BY state ORDER BY 1",
    )
    .fetch_all(env.pool())
    .await?;
    let from_db: BTreeMap<String, i64> = by_state.into_iter().collect();
    assert!(
        from_db
            .iter()
            .all(|(s, n)| list[2].counts.get(s) == Some(n))
    );
    Ok(())
}
