//! Flow control under `kill -9`: three real `ledgerflow run --roles worker` processes drain a
//! queue of keyed jobs under a per-key concurrency limit and a queue limit while a seeded killer
//! SIGKILLs one of them every 1–2 s and restarts it. Proves, from the database alone, that
//! no limit was ever exceeded (a sampler of the running rows, and the completed attempts'
//! intervals), that every job completed exactly once, and that no slot is left held once the
//! last lease expired (issue 14, "Tests": concurrency).
//!
//! The jobs are the binary's own `ledgerflow.noop` with `sleep_ms`, so each holds its lease and
//! its slot for [`SLEEP_MS`] and kills land inside attempts (the lease reaper must then free
//! the slot, never earlier).
//!
//! `LF_SEED=<n>` replays a seed (default [`DEFAULT_SEED`]); `TEST_LOG=1` prints the workers'
//! log tails on success too. Logs: `$CARGO_TARGET_TMPDIR/flow_kill/`.
mod common;
#[path = "common/proc.rs"]
mod proc;

use ledgerflow_engine::flow::limits::{self, FlowLimit};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{NewJob, Store};
use proc::Proc;
use serde_json::json;
use sqlx::PgPool;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const DEFAULT_SEED: u64 = 20_261_208;
const QUEUE: &str = "flowkill";
const JOBS: usize = 3_000;
/// Few enough keys that a claim batch meets the same key more than twice, so the per-key
/// limit binds (with 200 keys × 2 slots the workers' 96 handler slots would never fill one).
const KEYS: usize = 30;
const PER_KEY: i64 = 2;
/// Below the keys' 60 slots and the workers' 96 handler slots: the queue limit binds too.
const QUEUE_LIMIT: i64 = 48;
const SLEEP_MS: i64 = 250;
const CHAOS: Duration = Duration::from_secs(15);
const DRAIN: Duration = Duration::from_secs(40);
const LEASE_TTL_SECS: u64 = 2;

/// A seeded xorshift64*: replayable kill times and victims.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the sampler saw: the most running jobs of one key and of the queue in one snapshot.
#[derive(Debug, Default)]
struct Sampled {
    samples: u64,
    max_per_key: i64,
    max_queue: i64,
    /// The first snapshots over a limit (key or `queue`, running), for the failure message.
    over: Vec<(String, i64)>,
}

/// Samples the running rows until `stop`: one statement, so one snapshot, per sample. A
/// concurrency slot *is* a running row with the key, so this reads the invariant directly.
async fn sample(pool: PgPool, stop: Arc<AtomicBool>) -> TestResult<Sampled> {
    let mut s = Sampled::default();
    while !stop.load(Ordering::Relaxed) {
        let row: (Option<String>, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT (array_agg(flow_key ORDER BY n DESC))[1], max(n), sum(n)::bigint
             FROM (SELECT flow_key, count(*) AS n FROM jobs
                   WHERE state = 'running' AND queue = $1 GROUP BY flow_key) s",
        )
        .bind(QUEUE)
        .fetch_one(&pool)
        .await?;
        let (key, per_key, queue) = (row.0, row.1.unwrap_or(0), row.2.unwrap_or(0));
        s.samples += 1;
        s.max_per_key = s.max_per_key.max(per_key);
        s.max_queue = s.max_queue.max(queue);
        if per_key > PER_KEY && s.over.len() < 10 {
            s.over.push((key.unwrap_or_default(), per_key));
        }
        if queue > QUEUE_LIMIT && s.over.len() < 10 {
            s.over.push(("queue".into(), queue));
        }
    }
    Ok(s)
}

/// The most completed attempts that overlap at one instant, per key (`by_key`) or in the
/// whole queue. Each completed attempt is taken as `[finished_at - SLEEP_MS, finished_at]`,
/// which lies inside the time its row was `running`: the handler slept `SLEEP_MS` after the
/// claim committed, and `finished_at` is the completing transaction's `now()`, taken after
/// the handler returned and before that transaction committed. So an overlap above a limit
/// here is a real violation (the converse does not hold: rescued attempts are not counted).
/// Intervals are open: an end and a start at the same instant do not overlap.
async fn max_overlap(pool: &PgPool, by_key: bool) -> TestResult<i64> {
    let part = if by_key { "flow_key" } else { "queue" };
    let sql = format!(
        "WITH iv AS (
           SELECT {part} AS p, finished_at - make_interval(secs => $2::float8 / 1000) AS s,
                  finished_at AS e
           FROM jobs WHERE queue = $1 AND state = 'completed'),
         ev AS (SELECT p, s AS t, 1 AS d FROM iv UNION ALL SELECT p, e, -1 FROM iv)
         SELECT coalesce(max(c), 0)::bigint FROM (
           SELECT sum(d) OVER (PARTITION BY p ORDER BY t, d ROWS UNBOUNDED PRECEDING) AS c
           FROM ev) x"
    );
    Ok(sqlx::query_scalar(&sql)
        .bind(QUEUE)
        .bind(SLEEP_MS)
        .fetch_one(pool)
        .await?)
}

async fn scalar(pool: &PgPool, sql: &str) -> TestResult<i64> {
    Ok(sqlx::query_scalar(sql).bind(QUEUE).fetch_one(pool).await?)
}

fn worker(name: &'static str, url: &str, logs: &std::path::Path) -> TestResult<Proc> {
    let env = [
        ("DATABASE_URL", url.to_string()),
        // A killed worker's attempts are rescued (and their slots freed) 2 s after its last
        // heartbeat.
        ("LEDGERFLOW_LEASE_TTL_SECS", LEASE_TTL_SECS.to_string()),
        ("LEDGERFLOW_POLL_MS", "200".to_string()),
        ("LEDGERFLOW_QUEUES", format!("{QUEUE}=32")),
        // Port 0: three processes on one machine, none needs a known ops address.
        ("LEDGERFLOW_OPS_ADDR", "127.0.0.1:0".to_string()),
        ("LEDGERFLOW_SHUTDOWN_GRACE_SECS", "2".to_string()),
        (
            "RUST_LOG",
            std::env::var("LF_FLOW_KILL_LOG").unwrap_or_else(|_| "warn".to_string()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Proc::new(name, "worker", env, logs.join(format!("{name}.log")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limits_hold_across_killed_worker_processes() -> TestResult {
    let t0 = Instant::now();
    let seed = std::env::var("LF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let mut rng = Rng(seed.max(1));
    let db = TestDb::new().await?;
    let store = Store::new(db.pool.clone());
    limits::declare(
        &db.pool,
        &[
            FlowLimit::new("acct:*").concurrency(i32::try_from(PER_KEY)?),
            FlowLimit::new(format!("queue:{QUEUE}")).concurrency(i32::try_from(QUEUE_LIMIT)?),
        ],
    )
    .await?;
    let jobs: Vec<NewJob> = (0..JOBS)
        .map(|n| {
            NewJob::new("ledgerflow.noop", json!({ "n": n, "sleep_ms": SLEEP_MS }))
                .queue(QUEUE)
                .flow_key(format!("acct:{}", n % KEYS))
                // Kills every 1–2 s rescue an attempt a few times at most; a job must never
                // run out of attempts because of them.
                .max_attempts(100)
        })
        .collect();
    for chunk in jobs.chunks(500) {
        store.job_insert_many(chunk).await?;
    }

    let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("flow_kill");
    std::fs::create_dir_all(&logs)?;
    let mut workers = vec![
        worker("w1", &db.url, &logs)?,
        worker("w2", &db.url, &logs)?,
        worker("w3", &db.url, &logs)?,
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample(db.pool.clone(), stop.clone()));
    for w in &mut workers {
        w.spawn()?;
    }

    // Chaos: every 1–2 s one worker dies by SIGKILL and comes back after up to 0.5 s.
    let chaos_end = Instant::now() + CHAOS;
    while Instant::now() < chaos_end {
        tokio::time::sleep(Duration::from_millis(1_000 + rng.below(1_000))).await;
        let victim = usize::try_from(rng.below(workers.len() as u64))?;
        workers[victim].kill()?;
        tokio::time::sleep(Duration::from_millis(rng.below(500))).await;
        workers[victim].spawn()?;
        for w in &mut workers {
            w.check()?;
        }
    }
    let completed_at_chaos_end = scalar(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'completed'",
    )
    .await?;

    // Drain: the survivors' jobs and the rescued ones.
    let drained = common::wait_for(
        &db.pool,
        &format!("SELECT count(*) FROM jobs WHERE queue = '{QUEUE}' AND state = 'completed'"),
        i64::try_from(JOBS)?,
        DRAIN,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let sampled = sampler.await??;
    for w in &mut workers {
        w.check()?;
    }
    let report = |workers: &[Proc]| {
        workers
            .iter()
            .map(|w| format!("--- {} ---\n{}", w.name, w.tail(30)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    if let Err(e) = drained {
        return Err(format!("{e}\n{}", report(&workers)).into());
    }
    for w in &mut workers {
        w.stop(Duration::from_secs(10))?;
    }

    let kills: u32 = workers.iter().map(|w| w.kills).sum();
    let rescued = scalar(
        &db.pool,
        "SELECT count(*) FROM job_attempts a JOIN jobs j ON j.id = a.job_id
         WHERE j.queue = $1 AND a.outcome = 'lease_expired'",
    )
    .await?;
    let other_attempts = scalar(
        &db.pool,
        "SELECT count(*) FROM job_attempts a JOIN jobs j ON j.id = a.job_id
         WHERE j.queue = $1 AND a.outcome <> 'lease_expired'",
    )
    .await?;
    let overlap_key = max_overlap(&db.pool, true).await?;
    let overlap_queue = max_overlap(&db.pool, false).await?;
    let summary = format!(
        "seed {seed}: {kills} kills, {rescued} rescued attempts, {completed_at_chaos_end} of \
         {JOBS} completed when the chaos ended, sampler {sampled:?}, completed attempts \
         overlapping: {overlap_key} per key, {overlap_queue} in the queue, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    println!("{summary}");
    if std::env::var("TEST_LOG").is_ok() {
        println!("{}", report(&workers));
    }

    // The limits held at every sampled instant and at every instant completed attempts cover.
    assert!(sampled.over.is_empty(), "limit exceeded: {summary}");
    assert!(sampled.max_per_key <= PER_KEY, "{summary}");
    assert!(sampled.max_queue <= QUEUE_LIMIT, "{summary}");
    assert!(overlap_key <= PER_KEY, "per-key limit exceeded: {summary}");
    assert!(
        overlap_queue <= QUEUE_LIMIT,
        "queue limit exceeded: {summary}"
    );
    // The run was a test of something: the limits were reached, kills landed inside attempts.
    assert!(sampled.samples >= 100, "too few samples: {summary}");
    assert_eq!(
        sampled.max_per_key, PER_KEY,
        "never reached the key limit: {summary}"
    );
    assert!(kills >= 7, "{summary}");
    assert!(rescued > 0, "no kill landed inside an attempt: {summary}");

    // Every job completed exactly once: one completed row each (a row completes once; a
    // rescued attempt is recorded as `lease_expired` and nothing else failed).
    let counts: (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'completed' AND finished_at IS NOT NULL
                                              AND completed_by IS NOT NULL),
                count(DISTINCT args->>'n')
         FROM jobs WHERE queue = $1",
    )
    .bind(QUEUE)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        counts,
        (
            i64::try_from(JOBS)?,
            i64::try_from(JOBS)?,
            i64::try_from(JOBS)?
        )
    );
    assert_eq!(other_attempts, 0, "attempts that failed: {summary}");

    // No slot is held: nothing runs, and the operators' view agrees (holders and waiters 0).
    assert_eq!(
        scalar(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE queue = $1 AND state <> 'completed'"
        )
        .await?,
        0
    );
    for status in limits::status(&db.pool, None).await? {
        assert_eq!(
            (status.holders, status.waiters),
            (0, 0),
            "{} still held: {summary}",
            status.limit.key
        );
    }
    for w in &workers {
        assert!(w.unexpected.is_empty(), "{}: {:?}", w.name, w.unexpected);
    }
    Ok(())
}
