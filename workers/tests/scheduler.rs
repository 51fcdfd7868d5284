//! Scheduler tests against a real Postgres on the database clock: replicas in
//! one process and in separate processes (one of them killed with `kill -9`)
//! fire an every-second schedule with no duplicate and no gap.
//!
//! Tests that need a scheduler *process* re-run this test binary with
//! `LF_CHILD_DB` set, which turns the `child_scheduler` test into a
//! long-running scheduler (see `spawn_child`).
use chrono::{DateTime, TimeDelta, Utc};
use ledgerflow_engine::Store;
use ledgerflow_engine::cron::ScheduleDef;
use ledgerflow_engine::testing::TestDb;
use ledgerflow_workers::scheduler::{self, SchedulerConfig};
use sqlx::PgPool;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const CHILD_DB: &str = "LF_CHILD_DB";
const CHILD_SCHEDULES: &str = "LF_CHILD_SCHEDULES";

fn every_second() -> Vec<ScheduleDef> {
    vec![ScheduleDef::new("every-second", "* * * * * *", "cron.tick").queue("cron")]
}

fn spawn_child(db: &TestDb) -> Result<Child, Box<dyn std::error::Error + Send + Sync>> {
    Ok(Command::new(std::env::current_exe()?)
        .args([
            "child_scheduler",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB, &db.url)
        .env(CHILD_SCHEDULES, serde_json::to_string(&every_second())?)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Not a test of its own: the body of a child scheduler process. Returns at
/// once unless `LF_CHILD_DB` is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_scheduler() -> TestResult {
    let Ok(url) = std::env::var(CHILD_DB) else {
        return Ok(());
    };
    let schedules = scheduler::schedules_from_json(&std::env::var(CHILD_SCHEDULES)?)?;
    let pool = PgPool::connect(&url).await?;
    // Runs until killed.
    scheduler::run(Store::new(pool), schedules, CancellationToken::new()).await?;
    Ok(())
}

async fn wait_for_ticks(pool: &PgPool, at_least: i64, within: Duration) -> TestResult {
    let start = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM cron_ticks")
            .fetch_one(pool)
            .await?;
        if n >= at_least {
            return Ok(());
        }
        if start.elapsed() > within {
            return Err(format!("timed out waiting for {at_least} ticks (have {n})").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every tick of the every-second schedule exactly once, one job each, and
/// consecutive seconds from the first to the last. Returns the tick count.
async fn assert_exactly_once_without_gaps(
    pool: &PgPool,
) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
    let dupes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT fire_at FROM cron_ticks GROUP BY 1 HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await?;
    assert_eq!(dupes, 0);
    let ticks: Vec<(DateTime<Utc>, String)> =
        sqlx::query_as("SELECT fire_at, outcome FROM cron_ticks ORDER BY fire_at")
            .fetch_all(pool)
            .await?;
    assert!(
        ticks.iter().all(|(_, o)| o == "enqueued"),
        "nothing skipped: {ticks:?}"
    );
    for w in ticks.windows(2) {
        assert_eq!(
            w[1].0 - w[0].0,
            TimeDelta::seconds(1),
            "a gap between {w:?}"
        );
    }
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = 'cron'")
        .fetch_one(pool)
        .await?;
    assert_eq!(usize::try_from(jobs)?, ticks.len());
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM cron_ticks t WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = t.job_id)",
    )
    .fetch_one(pool)
    .await?;
    assert_eq!(orphans, 0);
    Ok(ticks.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_in_process_replicas_fire_every_second_once_and_stop_on_cancel() -> TestResult {
    let db = TestDb::new().await?;
    let stop = CancellationToken::new();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        // Separate pools, as separate replicas would have.
        let pool = PgPool::connect(&db.url).await?;
        let config = SchedulerConfig {
            max_sleep: Duration::from_millis(200),
            ..SchedulerConfig::default()
        };
        replicas.push(tokio::spawn(scheduler::run_with_config(
            Store::new(pool),
            every_second(),
            config,
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(4500)).await;
    stop.cancel();
    for r in replicas {
        tokio::time::timeout(Duration::from_secs(5), r).await???;
    }
    let n = assert_exactly_once_without_gaps(&db.pool).await?;
    assert!(n >= 3, "expected about 4 ticks, got {n}");
    // Stopped: nothing fires any more.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(assert_exactly_once_without_gaps(&db.pool).await?, n);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_scheduler_processes_one_killed_fire_every_second_once() -> TestResult {
    let db = TestDb::new().await?;
    let mut a = spawn_child(&db)?;
    let mut b = spawn_child(&db)?;
    let started = wait_for_ticks(&db.pool, 3, Duration::from_secs(60)).await;
    // `kill -9` one replica mid-run; the other carries on alone.
    a.kill()?;
    a.wait()?;
    let after_kill: i64 = sqlx::query_scalar("SELECT count(*) FROM cron_ticks")
        .fetch_one(&db.pool)
        .await?;
    let carried_on = match started {
        Ok(()) => wait_for_ticks(&db.pool, after_kill + 3, Duration::from_secs(30)).await,
        Err(e) => Err(e),
    };
    b.kill()?;
    b.wait()?;
    carried_on?;
    let n = assert_exactly_once_without_gaps(&db.pool).await?;
    assert!(n >= 6, "expected at least 6 ticks, got {n}");

    // Restarted after being down: the missed seconds are caught up (policy
    // `all`), still with no gap and no duplicate.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut c = spawn_child(&db)?;
    let caught_up = wait_for_ticks(&db.pool, i64::try_from(n)? + 6, Duration::from_secs(30)).await;
    c.kill()?;
    c.wait()?;
    caught_up?;
    assert_exactly_once_without_gaps(&db.pool).await?;
    Ok(())
}
