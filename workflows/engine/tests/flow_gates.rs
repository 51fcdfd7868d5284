//! Flow control's gates against a real database: debounce (trailing and leading, of jobs and
//! of workflow starts) and throttles. Time is a [`ManualClock`](ledgerflow_engine::ManualClock).
mod flow_env;

use chrono::{DateTime, TimeDelta, Utc};
use flow_env::{Env, TestResult, t0};
use ledgerflow_engine::flow::{Debounce, Throttle};
use ledgerflow_engine::{
    ExecConfig, Inserted, JobState, NewJob, StartDebounce, StepCtx, StepOutcome, Workflow,
    WorkflowRegistry, WorkflowRuntime, workflow_start_debounced_in,
};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::Duration;

#[tokio::test]
async fn trailing_debounce_runs_once_with_the_last_args() -> TestResult {
    let env = Env::new().await?;
    let window = Duration::from_secs(2);
    let mut ids = HashSet::new();
    for n in 0..50 {
        let job =
            NewJob::new("notify", json!({ "n": n })).debounce("user:7", window, Debounce::Trailing);
        ids.insert(env.insert(job).await?.id());
        env.advance_ms(10);
    }
    assert_eq!(ids.len(), 1, "one pending job");
    let (args, state, run_at): (Value, JobState, DateTime<Utc>) =
        sqlx::query_as("SELECT args, state, run_at FROM jobs")
            .fetch_one(&env.db.pool)
            .await?;
    assert_eq!(args, json!({ "n": 49 }));
    assert_eq!(state, JobState::Scheduled);
    assert_eq!(run_at, t0() + TimeDelta::milliseconds(490 + 2000));
    env.advance_ms(2000);
    env.store.job_promote_due(10).await?;
    assert_eq!(env.claim("default", 10).await?.len(), 1);
    // Once it started, the next trigger is a new job.
    let next = env
        .insert(NewJob::new("notify", json!({ "n": 50 })).debounce(
            "user:7",
            window,
            Debounce::Trailing,
        ))
        .await?;
    assert!(next.is_new());
    Ok(())
}

#[tokio::test]
async fn leading_debounce_and_throttles() -> TestResult {
    let env = Env::new().await?;
    let w = Duration::from_secs(1);
    let lead = || NewJob::new("l", json!({})).debounce("lead", w, Debounce::Leading);
    assert!(env.insert(lead()).await?.is_new());
    assert_eq!(env.insert(lead()).await?, Inserted::Dropped);
    assert_eq!(
        env.claim("default", 10).await?.len(),
        1,
        "the first runs at once"
    );
    env.advance_ms(1001);
    assert!(
        env.insert(lead()).await?.is_new(),
        "a trigger after the window runs again"
    );

    let drop = || NewJob::new("d", json!({})).throttle("td", 2, w, Throttle::Drop);
    assert!(env.insert(drop()).await?.is_new());
    assert!(env.insert(drop()).await?.is_new());
    assert_eq!(env.insert(drop()).await?, Inserted::Dropped);

    let delay = || NewJob::new("y", json!({})).throttle("ty", 2, w, Throttle::Delay);
    for _ in 0..5 {
        assert!(env.insert(delay()).await?.is_new());
    }
    let starts: Vec<i64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM run_at - $1) * 1000)::bigint FROM jobs
         WHERE throttle_key = 'ty' ORDER BY run_at",
    )
    .bind(env.clock.get())
    .fetch_all(&env.db.pool)
    .await?;
    assert_eq!(starts, vec![0, 0, 1000, 1000, 2000]);
    Ok(())
}

/// The registry of the debounced-start tests: one step that finishes with its input.
fn digest() -> ledgerflow_engine::Result<WorkflowRegistry> {
    WorkflowRegistry::new().register(Workflow::new("digest", 1).step(
        "gather",
        |ctx: StepCtx| async move {
            let input: Value = ctx.input_as()?;
            Ok(StepOutcome::Finish(input))
        },
    ))
}

/// Claims and runs every step job due now; returns how many ran.
async fn run_due(env: &Env, rt: &WorkflowRuntime) -> ledgerflow_engine::Result<usize> {
    env.store.job_promote_due(100).await?;
    let jobs = env.claim("default", 100).await?;
    for job in &jobs {
        let outcome = rt.handler().run(job).await.outcome;
        if !job.lease.is_finished() {
            env.store.job_finish(&job.lease, &outcome).await?;
        }
    }
    Ok(jobs.len())
}

/// 50 debounced starts of one key, 10 ms apart, make one instance with the last input, whose
/// first step begins a window after the last start; once it has begun, the next start is a
/// new instance.
#[tokio::test]
async fn debounced_workflow_starts_make_one_instance_with_the_last_input() -> TestResult {
    let env = Env::new().await?;
    let registry = digest()?;
    let rt = WorkflowRuntime::with_config(env.store.clone(), digest()?, ExecConfig::LOCKED_ONLY);
    let debounce = StartDebounce {
        key: "notify:user:7",
        window: Duration::from_secs(2),
        max_wait: None,
    };
    let mut ids = HashSet::new();
    for n in 0..50 {
        let mut conn = env.db.pool.acquire().await?;
        let input = json!({ "n": n });
        let id = workflow_start_debounced_in(
            &mut conn, &env.store, &registry, "digest", &input, &debounce,
        )
        .await?;
        ids.insert(id);
        env.advance_ms(10);
        assert_eq!(
            run_due(&env, &rt).await?,
            0,
            "held back while starts come in"
        );
    }
    assert_eq!(ids.len(), 1, "one instance");
    let id = *ids.iter().next().ok_or("no instance")?;
    let (input, run_at): (Value, DateTime<Utc>) = sqlx::query_as(
        "SELECT w.input, j.run_at FROM workflows w JOIN jobs j ON j.workflow_id = w.id
         WHERE w.id = $1",
    )
    .bind(id)
    .fetch_one(&env.db.pool)
    .await?;
    assert_eq!(input, json!({ "n": 49 }));
    assert_eq!(run_at, t0() + TimeDelta::milliseconds(490 + 2000));
    // The clock is at 500 ms (10 ms after the last start).
    env.advance_ms(1980);
    assert_eq!(run_due(&env, &rt).await?, 0, "not before the window");
    env.advance_ms(10);
    assert_eq!(run_due(&env, &rt).await?, 1);
    let (state, output): (String, Value) =
        sqlx::query_as("SELECT state, output FROM workflows WHERE id = $1")
            .bind(id)
            .fetch_one(&env.db.pool)
            .await?;
    assert_eq!((state.as_str(), output), ("completed", json!({ "n": 49 })));

    let mut conn = env.db.pool.acquire().await?;
    let next = workflow_start_debounced_in(
        &mut conn,
        &env.store,
        &registry,
        "digest",
        &json!({ "n": 50 }),
        &debounce,
    )
    .await?;
    assert_ne!(
        next, id,
        "a start after the first step began is a new instance"
    );
    rt.shutdown().await;
    Ok(())
}

/// A start every second against a 2 s window would hold the instance back forever; the max
/// wait of 5 s lets its first step begin 5 s after the first start, and the starts after that
/// make the next instance.
#[tokio::test]
async fn the_max_wait_bounds_how_long_starts_hold_an_instance_back() -> TestResult {
    let env = Env::new().await?;
    let registry = digest()?;
    let rt = WorkflowRuntime::with_config(env.store.clone(), digest()?, ExecConfig::LOCKED_ONLY);
    let debounce = StartDebounce {
        key: "notify:user:8",
        window: Duration::from_secs(2),
        max_wait: Some(Duration::from_secs(5)),
    };
    let mut ran_at = Vec::new();
    let mut ids = Vec::new();
    for second in 0..9 {
        let mut conn = env.db.pool.acquire().await?;
        let input = json!({ "n": second });
        ids.push(
            workflow_start_debounced_in(
                &mut conn, &env.store, &registry, "digest", &input, &debounce,
            )
            .await?,
        );
        if run_due(&env, &rt).await? > 0 {
            ran_at.push(second);
        }
        env.advance_ms(1000);
    }
    assert_eq!(ran_at, vec![5], "the first instance began at its max wait");
    let distinct: HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 2);
    assert_eq!(
        ids[0], ids[5],
        "the start at 5 s still joined the first instance"
    );
    assert_ne!(
        ids[5], ids[6],
        "the next start after it began is a new instance"
    );
    let states: Vec<(Value, String)> =
        sqlx::query_as("SELECT input, state::text FROM workflows ORDER BY created_at")
            .fetch_all(&env.db.pool)
            .await?;
    assert_eq!(
        states,
        vec![
            (json!({ "n": 5 }), "completed".to_string()),
            (json!({ "n": 8 }), "running".to_string()),
        ]
    );
    rt.shutdown().await;
    Ok(())
}

/// Concurrent starts of one key, each in its own transaction, take turns on the key's lock:
/// they all join one instance, and a start rolled back with its transaction leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_debounced_starts_join_one_instance() -> TestResult {
    let env = Env::new().await?;
    let registry = std::sync::Arc::new(digest()?);
    let debounce = |key| StartDebounce {
        key,
        window: Duration::from_secs(1),
        max_wait: None,
    };
    let mut tasks = Vec::new();
    for n in 0..16 {
        let (pool, store, registry) = (env.db.pool.clone(), env.store.clone(), registry.clone());
        tasks.push(tokio::spawn(async move {
            let mut tx = pool.begin().await?;
            let input = json!({ "n": n });
            let id = workflow_start_debounced_in(
                &mut tx,
                &store,
                &registry,
                "digest",
                &input,
                &debounce("notify:user:9"),
            )
            .await?;
            tx.commit().await?;
            Ok::<_, ledgerflow_engine::Error>(id)
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        ids.insert(t.await??);
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE debounce_key = 'notify:user:9'")
            .await?,
        1
    );

    let mut tx = env.db.pool.begin().await?;
    workflow_start_debounced_in(
        &mut tx,
        &env.store,
        &registry,
        "digest",
        &json!({}),
        &debounce("notify:user:10"),
    )
    .await?;
    tx.rollback().await?;
    assert_eq!(env.count("SELECT count(*) FROM workflows").await?, 1);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 1);
    Ok(())
}
