//! Workflows end to end on real runners: completion, signals, a durable timer
//! across a runner restart, and a `kill -9` of a worker process mid-workflow.
//!
//! The crash test re-runs this test binary with `LF_WF_CHILD_DB` set, which
//! turns the `wf_child_worker` test into a long-running worker process.
mod common;
use chrono::Utc;
use common::{count, wait_for};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{
    ExecConfig, Inline, RetryPolicy, StepCtx, StepOutcome, Store, StoreConfig, Workflow,
    WorkflowRegistry, WorkflowRuntime, signal_send, workflow_start_in,
};
use ledgerflow_workers::runner::{QueueConfig, Registry, Runner, RunnerConfig};
use serde_json::json;
use sqlx::PgPool;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const CHILD_DB: &str = "LF_WF_CHILD_DB";

fn store(pool: &PgPool, lease_ttl: Duration) -> Store {
    Store::with_config(
        pool.clone(),
        StoreConfig {
            lease_ttl,
            notify: true,
            retry: RetryPolicy::default(),
        },
    )
}

fn fast_config(worker: &str) -> RunnerConfig {
    RunnerConfig {
        worker_id: worker.to_string(),
        queues: vec![QueueConfig::new("default", 8)],
        poll_interval: Duration::from_millis(200),
        heartbeat_interval: Duration::from_millis(300),
        rescue_interval: Duration::from_millis(200),
        promote_interval: Duration::from_millis(100),
        ..RunnerConfig::default()
    }
}

/// A test database whose pool fits the runner, sized as the `ledgerflow` binary sizes
/// its own (concurrency + 8): every in-flight step holds one connection for its fenced
/// transaction, these steps also write `executions` through the pool, and the fetcher,
/// heartbeats and completer need theirs. With the default 8 connections and 8 steps in
/// flight, a step's second checkout could wait out the pool timeout.
async fn test_db() -> Result<TestDb, Box<dyn std::error::Error + Send + Sync>> {
    Ok(TestDb::with_pool_size(16).await?)
}

/// The runner's handler for workflow step jobs.
/// One step per delivery, as these tests count deliveries.
fn handlers(s: &Store, workflows: WorkflowRegistry) -> Registry {
    let config = ExecConfig::default().inline(Inline::OFF);
    Registry::new().workflows(WorkflowRuntime::with_config(s.clone(), workflows, config).handler())
}

/// Starts a workflow of `kind` in its own statement.
async fn start(
    s: &Store,
    workflows: &WorkflowRegistry,
    kind: &str,
    input: &serde_json::Value,
) -> ledgerflow_engine::Result<ledgerflow_engine::WorkflowId> {
    let mut conn = s.pool().acquire().await?;
    workflow_start_in(&mut conn, s, workflows, kind, input, None).await
}

async fn create_tables(pool: &PgPool) -> TestResult {
    // effects: written in the step's fenced transaction (exactly once);
    // executions: written outside it (every time a step function starts).
    sqlx::query("CREATE TABLE effects (workflow_id uuid NOT NULL, step text NOT NULL)")
        .execute(pool)
        .await?;
    sqlx::query("CREATE TABLE executions (workflow_id uuid NOT NULL, step text NOT NULL)")
        .execute(pool)
        .await?;
    Ok(())
}

async fn record(ctx: &StepCtx, fenced: bool) -> Result<(), String> {
    if fenced {
        let mut db = ctx.db().await.map_err(|e| e.to_string())?;
        sqlx::query("INSERT INTO effects (workflow_id, step) VALUES ($1, $2)")
            .bind(ctx.workflow_id())
            .bind(ctx.step())
            .execute(&mut *db)
            .await
            .map_err(|e| e.to_string())?;
    } else {
        sqlx::query("INSERT INTO executions (workflow_id, step) VALUES ($1, $2)")
            .bind(ctx.workflow_id())
            .bind(ctx.step())
            .execute(ctx.store().pool())
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// a → b → c; `b` takes `b_ms`. Every step records its execution and writes
/// one effect in its checkpoint transaction.
fn abc(b_ms: u64) -> Workflow {
    Workflow::new("abc", 1)
        .step("a", |ctx: StepCtx| async move {
            record(&ctx, false).await?;
            record(&ctx, true).await?;
            Ok(StepOutcome::Continue(json!({ "a": 1 })))
        })
        .step("b", move |ctx: StepCtx| async move {
            record(&ctx, false).await?;
            tokio::time::sleep(Duration::from_millis(b_ms)).await;
            record(&ctx, true).await?;
            Ok(StepOutcome::Continue(
                json!({ "b": ctx.output("a").cloned() }),
            ))
        })
        .step("c", |ctx: StepCtx| async move {
            record(&ctx, false).await?;
            record(&ctx, true).await?;
            Ok(StepOutcome::Finish(
                json!({ "done": ctx.idempotency_key() }),
            ))
        })
}

/// Not a test of its own: the body of a child worker process. Returns at once
/// unless `LF_WF_CHILD_DB` is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wf_child_worker() -> TestResult {
    let Ok(url) = std::env::var(CHILD_DB) else {
        return Ok(());
    };
    // Sized like `test_db` (concurrency + 8), for the same reason.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await?;
    let workflows = WorkflowRegistry::new().register(abc(60_000))?;
    let _runner = Runner::start(
        store(&pool, Duration::from_secs(2)),
        handlers(&store(&pool, Duration::from_secs(2)), workflows),
        fast_config("wf-child"),
    )
    .await?;
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

fn spawn_child(db: &TestDb) -> std::io::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args([
            "wf_child_worker",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB, &db.url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workflows_run_to_completion_on_a_runner() -> TestResult {
    let db = test_db().await?;
    create_tables(&db.pool).await?;
    let s = store(&db.pool, Duration::from_secs(10));
    let workflows = WorkflowRegistry::new().register(abc(5))?;
    let runner = Runner::start(
        s.clone(),
        handlers(&s, workflows.clone()),
        fast_config("w1"),
    )
    .await?;
    for i in 0..20 {
        start(&s, &workflows, "abc", &json!({ "i": i })).await?;
    }
    let done = "SELECT count(*) FROM workflows WHERE state = 'completed'";
    let result = wait_for(&db.pool, done, 20, Duration::from_secs(30)).await;
    runner.shutdown(Duration::from_secs(5)).await;
    result?;
    assert_eq!(count(&db.pool, "SELECT count(*) FROM effects").await, 60);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM executions").await, 60);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM workflow_steps WHERE status = 'completed'"
        )
        .await,
        60
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signal_wakes_a_workflow_on_a_runner() -> TestResult {
    let db = test_db().await?;
    let s = store(&db.pool, Duration::from_secs(10));
    let workflows = WorkflowRegistry::new().register(
        Workflow::new("await", 1)
            .step("wait", |_ctx: StepCtx| async {
                Ok(StepOutcome::wait_signal(
                    "fill",
                    "ORDER7",
                    Duration::from_secs(3600),
                ))
            })
            .step("end", |ctx: StepCtx| async move {
                Ok(StepOutcome::Finish(
                    ctx.output("wait").cloned().unwrap_or_default(),
                ))
            }),
    )?;
    let runner = Runner::start(
        s.clone(),
        handlers(&s, workflows.clone()),
        fast_config("w1"),
    )
    .await?;
    let id = start(&s, &workflows, "await", &json!({})).await?;
    let waiting = "SELECT count(*) FROM workflows WHERE state = 'waiting'";
    let r1 = wait_for(&db.pool, waiting, 1, Duration::from_secs(10)).await;
    let sent = signal_send(&s, "fill", "ORDER7", &json!({ "px": "101.5" }), "evt-1").await;
    let done = "SELECT count(*) FROM workflows WHERE state = 'completed'";
    let r2 = wait_for(&db.pool, done, 1, Duration::from_secs(10)).await;
    runner.shutdown(Duration::from_secs(5)).await;
    r1?;
    sent?;
    r2?;
    let output: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT output FROM workflows WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(output, Some(json!({ "px": "101.5" })));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timer_step_survives_a_runner_restart() -> TestResult {
    let db = test_db().await?;
    let s = store(&db.pool, Duration::from_secs(10));
    let wake_at = Utc::now() + chrono::TimeDelta::seconds(2);
    let workflows = WorkflowRegistry::new().register(
        Workflow::new("cooldown", 1)
            .step("pause", move |_ctx: StepCtx| async move {
                Ok(StepOutcome::SleepUntil(wake_at))
            })
            .step("after", |_ctx: StepCtx| async {
                Ok(StepOutcome::Continue(json!({ "woke_at": Utc::now() })))
            }),
    )?;
    let first = Runner::start(
        s.clone(),
        handlers(&s, workflows.clone()),
        fast_config("w1"),
    )
    .await?;
    let id = start(&s, &workflows, "cooldown", &json!({})).await?;
    let sleeping =
        "SELECT count(*) FROM workflows WHERE state = 'waiting' AND wait_reason = 'timer'";
    let r = wait_for(&db.pool, sleeping, 1, Duration::from_secs(10)).await;
    first.shutdown(Duration::from_secs(5)).await;
    r?;
    // No runner while the timer is due: the timer is a row, not a task.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM workflows WHERE state = 'completed'"
        )
        .await,
        0
    );
    let second = Runner::start(s.clone(), handlers(&s, workflows), fast_config("w2")).await?;
    let done = "SELECT count(*) FROM workflows WHERE state = 'completed'";
    let r = wait_for(&db.pool, done, 1, Duration::from_secs(10)).await;
    second.shutdown(Duration::from_secs(5)).await;
    r?;
    let woke_at: String =
        sqlx::query_scalar("SELECT output->>'woke_at' FROM workflows WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await?;
    let woke_at: chrono::DateTime<Utc> = woke_at.parse()?;
    assert!(
        woke_at >= wake_at,
        "ran before its time: {woke_at} < {wake_at}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_workflow_resumes_at_the_next_step_and_no_step_applies_twice() -> TestResult {
    let db = test_db().await?;
    create_tables(&db.pool).await?;
    let s = store(&db.pool, Duration::from_secs(2));
    // The child's `b` takes a minute: it is killed while `b` runs, after `a`
    // was checkpointed.
    let workflows = WorkflowRegistry::new().register(abc(60_000))?;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(start(&s, &workflows, "abc", &json!({ "i": i })).await?);
    }
    let mut child = spawn_child(&db)?;
    let b_started = "SELECT count(*) FROM executions WHERE step = 'b'";
    let started = wait_for(&db.pool, b_started, 5, Duration::from_secs(60)).await;
    child.kill()?; // SIGKILL
    child.wait()?;
    started?;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM effects WHERE step = 'b'").await,
        0
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM workflow_steps WHERE step = 'a'"
        )
        .await,
        5
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE state = 'running' AND lease_owner = 'wf-child'"
        )
        .await,
        5,
        "the child dies holding the leases of its `b` steps"
    );

    let survivor_flows = WorkflowRegistry::new().register(abc(10))?;
    let survivor = Runner::start(
        s.clone(),
        handlers(&s, survivor_flows),
        fast_config("survivor"),
    )
    .await?;
    let done = "SELECT count(*) FROM workflows WHERE state = 'completed'";
    let r = wait_for(&db.pool, done, 5, Duration::from_secs(60)).await;
    survivor.shutdown(Duration::from_secs(5)).await;
    r?;

    for id in ids {
        let per_step: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT s.step,
                    (SELECT count(*) FROM effects e WHERE e.workflow_id = $1 AND e.step = s.step),
                    (SELECT count(*) FROM executions x WHERE x.workflow_id = $1 AND x.step = s.step)
             FROM workflow_steps s WHERE s.workflow_id = $1 ORDER BY s.position",
        )
        .bind(id)
        .fetch_all(&db.pool)
        .await?;
        assert_eq!(
            per_step,
            vec![
                ("a".to_string(), 1, 1), // not re-run after the crash
                ("b".to_string(), 1, 2), // started twice, applied once
                ("c".to_string(), 1, 1),
            ],
            "workflow {id}"
        );
    }
    assert!(
        count(
            &db.pool,
            "SELECT count(*) FROM job_attempts WHERE outcome = 'lease_expired' AND worker = 'wf-child'"
        )
        .await
            >= 5
    );
    Ok(())
}
