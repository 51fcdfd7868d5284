//! Runner tests against a real Postgres: crash with `kill -9`, pause across
//! processes, graceful shutdown, poll-only operation, durable backoff, and
//! the handler failure modes (timeout, panic, unknown kind).
//!
//! Tests that need a second worker *process* re-run this test binary with
//! `CHILD_DB` set, which turns the `child_worker` test into a long-running
//! worker (see `spawn_child`).
mod common;
use common::{count, wait_for};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{NewJob, Outcome, RetryPolicy, Store, StoreConfig};
use ledgerflow_workers::runner::{JobContext, QueueConfig, Registry, Runner, RunnerConfig};
use serde_json::json;
use sqlx::PgPool;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const CHILD_DB: &str = "LF_CHILD_DB";
const CHILD_QUEUE: &str = "LF_CHILD_QUEUE";
const CHILD_SLEEP_MS: &str = "LF_CHILD_SLEEP_MS";
const CHILD_APP: &str = "ledgerflow-test-child";

fn store(pool: &PgPool, lease_ttl: Duration, notify: bool) -> Store {
    Store::with_config(
        pool.clone(),
        StoreConfig {
            lease_ttl,
            notify,
            retry: RetryPolicy::default(),
        },
    )
}

fn fast_config(worker: &str, queue: QueueConfig) -> RunnerConfig {
    RunnerConfig {
        worker_id: worker.to_string(),
        queues: vec![queue],
        poll_interval: Duration::from_millis(200),
        heartbeat_interval: Duration::from_millis(300),
        rescue_interval: Duration::from_millis(200),
        promote_interval: Duration::from_millis(100),
        ..RunnerConfig::default()
    }
}

/// A handler that sleeps, then writes one row to `effects` and completes the
/// job in the same fenced transaction.
fn effect_handler(
    sleep: Duration,
) -> impl Fn(JobContext) -> futures::future::BoxFuture<'static, Outcome> {
    move |ctx: JobContext| {
        Box::pin(async move {
            tokio::time::sleep(sleep).await;
            let mut tx = match ctx.begin().await {
                Ok(tx) => tx,
                Err(e) => return Outcome::retry(e),
            };
            let wrote = sqlx::query("INSERT INTO effects (job_id, worker) VALUES ($1, $2)")
                .bind(ctx.job().id)
                .bind(&*ctx.lease().owner)
                .execute(tx.conn())
                .await;
            if let Err(e) = wrote {
                return Outcome::retry(e);
            }
            match tx.complete().await {
                Ok(()) => Outcome::Complete,
                Err(e) => Outcome::retry(e),
            }
        })
    }
}

async fn create_effects(pool: &PgPool) -> TestResult {
    sqlx::query("CREATE TABLE effects (job_id uuid NOT NULL, worker text NOT NULL)")
        .execute(pool)
        .await?;
    Ok(())
}

fn spawn_child(db: &TestDb, queue: &str, sleep_ms: u64) -> std::io::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["child_worker", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, &db.url)
        .env(CHILD_QUEUE, queue)
        .env(CHILD_SLEEP_MS, sleep_ms.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// Not a test of its own: the body of a child worker process. Returns at once
/// unless `CHILD_DB` is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_worker() -> TestResult {
    let Ok(url) = std::env::var(CHILD_DB) else {
        return Ok(());
    };
    let queue = std::env::var(CHILD_QUEUE)?;
    let sleep_ms: u64 = std::env::var(CHILD_SLEEP_MS)?.parse()?;
    // Named, so the parent can tell when the server has let go of this
    // process's connections after a kill -9.
    let opts: sqlx::postgres::PgConnectOptions = url.parse()?;
    let pool = PgPool::connect_with(opts.application_name(CHILD_APP)).await?;
    let store = store(&pool, Duration::from_secs(2), true);
    let registry =
        Registry::new().register("effect", effect_handler(Duration::from_millis(sleep_ms)));
    let _runner = Runner::start(
        store,
        registry,
        fast_config("child-worker", QueueConfig::new(queue, 8)),
    )
    .await?;
    // Run until killed.
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_then_another_worker_finishes_each_job_exactly_once() -> TestResult {
    let db = TestDb::new().await?;
    create_effects(&db.pool).await?;
    let s = store(&db.pool, Duration::from_secs(2), true);
    let jobs: Vec<NewJob> = (0..200)
        .map(|i| NewJob::new("effect", json!({ "i": i })).queue("crash"))
        .collect();
    s.job_insert_many(&jobs).await?;

    let mut child = spawn_child(&db, "crash", 25)?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM effects",
        30,
        Duration::from_secs(60),
    )
    .await?;
    child.kill()?; // SIGKILL: no chance to release anything
    child.wait()?;
    // A COMMIT the child sent just before dying may still be landing; count
    // its leases only once the server has dropped all of its sessions.
    let gone = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'ledgerflow-test-child'";
    let start = Instant::now();
    while count(&db.pool, gone).await != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "child sessions linger"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leased_by_dead = count(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE state = 'running' AND lease_owner = 'child-worker'",
    )
    .await;
    assert!(
        leased_by_dead > 0,
        "the child should die holding leases (mid-batch)"
    );
    let done_before = count(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE state = 'completed'",
    )
    .await;
    assert!(
        done_before < 200,
        "the child should not have finished everything"
    );

    let survivor = Runner::start(
        s.clone(),
        Registry::new().register("effect", effect_handler(Duration::from_millis(1))),
        fast_config("survivor", QueueConfig::new("crash", 8)),
    )
    .await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE state = 'completed'",
        200,
        Duration::from_secs(60),
    )
    .await?;
    survivor.shutdown(Duration::from_secs(5)).await;

    assert_eq!(count(&db.pool, "SELECT count(*) FROM effects").await, 200);
    assert_eq!(
        count(&db.pool, "SELECT count(DISTINCT job_id) FROM effects").await,
        200
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE state <> 'completed'"
        )
        .await,
        0
    );
    // Every job the dead worker held was rescued, and the rescue is on record.
    assert!(
        count(
            &db.pool,
            "SELECT count(*) FROM job_attempts WHERE outcome = 'lease_expired' AND worker = 'child-worker'"
        )
        .await
            >= leased_by_dead
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_claims_in_another_process_until_resumed() -> TestResult {
    let db = TestDb::new().await?;
    create_effects(&db.pool).await?;
    let s = store(&db.pool, Duration::from_secs(5), true);
    s.queue_pause("paused").await?;
    let mut child = spawn_child(&db, "paused", 1)?;
    let jobs: Vec<NewJob> = (0..20)
        .map(|i| NewJob::new("effect", json!({ "i": i })).queue("paused"))
        .collect();
    s.job_insert_many(&jobs).await?;
    // Give the child time to start, listen, poll several times and be woken.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let touched = count(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE state <> 'available' OR attempt > 0",
    )
    .await;
    let effects = count(&db.pool, "SELECT count(*) FROM effects").await;
    s.queue_resume("paused").await?;
    let finished = wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE state = 'completed'",
        20,
        Duration::from_secs(30),
    )
    .await;
    child.kill()?;
    child.wait()?;
    assert_eq!(touched, 0, "a paused queue must not be claimed");
    assert_eq!(effects, 0);
    finished?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_and_releases_the_rest() -> TestResult {
    let db = TestDb::new().await?;
    let s = store(&db.pool, Duration::from_secs(30), true);
    // Counts handlers that have started, so shutdown begins only once all
    // eight slots are busy (claimed rows alone may not have started yet).
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let sleepy = |ctx: JobContext| async move {
        STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let ms = ctx.job().args["ms"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Outcome::Complete
    };
    let mut jobs: Vec<NewJob> = (0..4)
        .map(|_| NewJob::new("sleepy", json!({ "ms": 300 })).queue("g"))
        .collect();
    jobs.extend((0..4).map(|_| NewJob::new("sleepy", json!({ "ms": 60_000 })).queue("g")));
    // Plus prefetched-but-never-started jobs beyond the 8 handler slots.
    jobs.extend((0..4).map(|_| NewJob::new("sleepy", json!({ "ms": 60_000 })).queue("g")));
    s.job_insert_many(&jobs).await?;
    let runner = Runner::start(
        s.clone(),
        Registry::new().register("sleepy", sleepy),
        fast_config("graceful", QueueConfig::new("g", 8).prefetch(8)),
    )
    .await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE state = 'running'",
        12,
        Duration::from_secs(10),
    )
    .await?;
    let waiting = Instant::now();
    while STARTED.load(std::sync::atomic::Ordering::SeqCst) < 8 {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "handlers did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let report = runner.shutdown(Duration::from_secs(2)).await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "shutdown must respect the grace period"
    );
    assert_eq!(report.aborted, 4, "{report:?}");
    assert_eq!(report.released, 8, "{report:?}");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE state = 'running'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE state = 'completed'"
        )
        .await,
        4
    );
    // Released jobs are available at once and did not use up an attempt.
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE state = 'available' AND attempt = 0"
        )
        .await,
        8
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_only_without_notify_processes_everything() -> TestResult {
    let db = TestDb::new().await?;
    let s = store(&db.pool, Duration::from_secs(10), false);
    let runner = Runner::start(
        s.clone(),
        Registry::new().register("noop", |_: JobContext| async { Outcome::Complete }),
        RunnerConfig {
            listen: false,
            ..fast_config("poller", QueueConfig::new("quiet", 4))
        },
    )
    .await?;
    for batch in 0..10 {
        let jobs: Vec<NewJob> = (0..10)
            .map(|i| NewJob::new("noop", json!({ "b": batch, "i": i })).queue("quiet"))
            .collect();
        s.job_insert_many(&jobs).await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let done = wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE state = 'completed'",
        100,
        Duration::from_secs(20),
    )
    .await;
    runner.shutdown(Duration::from_secs(2)).await;
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_survives_a_restart_and_is_never_shortened() -> TestResult {
    let db = TestDb::new().await?;
    let s = Store::with_config(
        db.pool.clone(),
        StoreConfig {
            lease_ttl: Duration::from_secs(10),
            notify: true,
            retry: RetryPolicy {
                base: Duration::from_secs(3),
                max: Duration::from_secs(3),
                jitter: 0.0,
            },
        },
    );
    let flaky = |ctx: JobContext| async move {
        if ctx.lease().attempt == 1 {
            Outcome::retry("first attempt fails")
        } else {
            Outcome::Complete
        }
    };
    let id = s
        .job_insert(&NewJob::new("flaky", json!({})).queue("b"))
        .await?
        .id();
    let first = Runner::start(
        s.clone(),
        Registry::new().register("flaky", flaky),
        fast_config("first", QueueConfig::new("b", 1)),
    )
    .await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE state = 'retryable'",
        1,
        Duration::from_secs(10),
    )
    .await?;
    // The process "crashes" during the backoff (its runner goes away).
    first.shutdown(Duration::from_millis(100)).await;
    let run_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT run_at FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await?;
    let failed_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "SELECT finished_at FROM job_attempts WHERE job_id = $1 AND attempt = 1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await?;
    assert!(
        run_at - failed_at >= chrono::Duration::milliseconds(2990),
        "backoff stored in run_at"
    );

    let second = Runner::start(
        s.clone(),
        Registry::new().register("flaky", flaky),
        fast_config("second", QueueConfig::new("b", 1)),
    )
    .await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE state = 'completed'",
        1,
        Duration::from_secs(15),
    )
    .await?;
    second.shutdown(Duration::from_secs(1)).await;
    let retried_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT attempted_at FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await?;
    assert!(
        retried_at >= run_at,
        "retried at {retried_at}, before its run_at {run_at}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_panics_and_unknown_kinds_become_retries_with_their_error() -> TestResult {
    let db = TestDb::new().await?;
    let s = store(&db.pool, Duration::from_secs(10), true);
    let registry = Registry::new()
        .register("slow", |_: JobContext| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Outcome::Complete
        })
        .register("boom", |_: JobContext| async {
            panic!("kaboom");
        });
    let slow = NewJob::new("slow", json!({}))
        .queue("f")
        .timeout(Duration::from_millis(100))
        .max_attempts(1);
    let boom = NewJob::new("boom", json!({})).queue("f").max_attempts(1);
    let unknown = NewJob::new("nobody-handles-this", json!({}))
        .queue("f")
        .max_attempts(1);
    let ids = [slow.id(), boom.id(), unknown.id()];
    s.job_insert_many(&[slow, boom, unknown]).await?;
    let runner = Runner::start(
        s.clone(),
        registry,
        fast_config("faults", QueueConfig::new("f", 4)),
    )
    .await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE state = 'discarded'",
        3,
        Duration::from_secs(10),
    )
    .await?;
    runner.shutdown(Duration::from_secs(1)).await;
    let errors: Vec<Option<String>> = {
        let mut v = Vec::new();
        for id in ids {
            v.push(s.job_get(id).await?.and_then(|j| j.last_error));
        }
        v
    };
    assert!(
        errors[0].as_deref().unwrap_or("").contains("timed out"),
        "{errors:?}"
    );
    assert!(
        errors[1].as_deref().unwrap_or("").contains("kaboom"),
        "{errors:?}"
    );
    assert!(
        errors[2].as_deref().unwrap_or("").contains("no handler"),
        "{errors:?}"
    );
    for id in ids {
        let attempts = s.job_attempts(id).await?;
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].outcome, "discarded");
    }
    Ok(())
}
