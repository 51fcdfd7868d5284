//! Flow control against a real database: concurrency limits under concurrent claimers, queue
//! limits, fairness, rate limits (claims and external calls), debounce, throttle, runtime
//! limit changes, workflow-wide keys and priority aging.
//!
//! Time is a [`ManualClock`]; nothing sleeps except the concurrent-claimers test, which runs
//! real tasks against one database.
use ledgerflow_engine::flow::{self, FlowLimit};
use ledgerflow_engine::store::ClaimedJob;
use ledgerflow_engine::{
    CallError, ExecConfig, ExternalError, NewJob, Outcome, Reconciled, Result, StepCtx,
    StepOutcome, Workflow, WorkflowRegistry, WorkflowRuntime,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use uuid::Uuid;

mod flow_env;

use flow_env::{Env, TestResult, t0};

fn keyed(key: &str, n: usize) -> NewJob {
    NewJob::new("k", json!({ "key": key, "n": n })).flow_key(key)
}

fn key_of(j: &ClaimedJob) -> String {
    j.args["key"].as_str().unwrap_or_default().to_string()
}

/// Several claimers in parallel (each its own store, as separate processes would be) claim
/// and complete jobs of 12 keys with a limit of 2 each, while a sampler reads the running rows
/// per key in its own snapshots: no snapshot ever shows more than 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_never_exceed_a_key_limit() -> TestResult {
    let env = Env::new().await?;
    flow::limits::declare(&env.db.pool, &[FlowLimit::new("user:*").concurrency(2)]).await?;
    let jobs: Vec<NewJob> = (0..360)
        .map(|n| keyed(&format!("user:{}", n % 12), n))
        .chain((0..40).map(|n| NewJob::new("plain", json!({ "n": n }))))
        .collect();
    env.store.job_insert_many(&jobs).await?;
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..6 {
        let store = env.other();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let owner: Arc<str> = Arc::from(format!("w{w}"));
            let mut idle = 0;
            while idle < 50 {
                let got = store.job_claim("default", &owner, 5).await?;
                if got.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                idle = 0;
                tokio::time::sleep(Duration::from_millis(1)).await;
                let leases: Vec<_> = got.iter().map(|j| (j.id, j.lease.token)).collect();
                let n = store.job_complete_many(&leases).await?.len();
                done.fetch_add(n, Ordering::SeqCst);
            }
            Ok::<(), ledgerflow_engine::Error>(())
        }));
    }
    let pool = env.db.pool.clone();
    let sampler = tokio::spawn(async move {
        let mut worst = 0i64;
        for _ in 0..400 {
            let most: Option<i64> = sqlx::query_scalar(
                "SELECT max(n) FROM (SELECT count(*) AS n FROM jobs
                 WHERE state = 'running' AND flow_key IS NOT NULL GROUP BY flow_key) s",
            )
            .fetch_one(&pool)
            .await?;
            worst = worst.max(most.unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok::<i64, sqlx::Error>(worst)
    });
    for t in tasks {
        t.await??;
    }
    let worst = sampler.await??;
    assert!(worst <= 2, "a key had {worst} running jobs, limit 2");
    assert_eq!(done.load(Ordering::SeqCst), 400, "every job ran once");
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE state <> 'completed'")
            .await?,
        0
    );
    Ok(())
}

/// A slot belongs to a lease: it is not free while the lease is current, nor after it expired
/// until the reaper took the job back; then the job (or another of its key) runs again.
#[tokio::test]
async fn a_slot_frees_when_the_expired_lease_is_rescued() -> TestResult {
    let env = Env::new().await?;
    flow::limits::declare(&env.db.pool, &[FlowLimit::new("acct:1").concurrency(1)]).await?;
    env.insert(keyed("acct:1", 1)).await?;
    env.insert(keyed("acct:1", 2)).await?;
    let first = env.claim("default", 10).await?;
    assert_eq!(first.len(), 1);
    assert!(
        env.claim("default", 10).await?.is_empty(),
        "the slot is held"
    );
    env.advance_ms(31_000);
    assert!(
        env.claim("default", 10).await?.is_empty(),
        "expired but not rescued yet"
    );
    assert_eq!(env.store.job_rescue_expired(100).await?, 1);
    let again = env.claim("default", 10).await?;
    assert_eq!(again.len(), 1, "the rescued slot is free again");
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE state = 'running'")
            .await?,
        1
    );
    Ok(())
}

#[tokio::test]
async fn a_queue_limit_caps_the_queue_and_changes_at_runtime() -> TestResult {
    let env = Env::new().await?;
    flow::limits::declare(&env.db.pool, &[FlowLimit::new("queue:bulk").concurrency(3)]).await?;
    let jobs: Vec<NewJob> = (0..10)
        .map(|n| NewJob::new("b", json!({ "n": n })).queue("bulk"))
        .collect();
    env.store.job_insert_many(&jobs).await?;
    // A process that never saw the limit being declared finds the queue's flag itself.
    let other = env.other();
    let got = other.job_claim("bulk", &Arc::from("o"), 10).await?;
    assert_eq!(got.len(), 3);
    assert!(env.claim("bulk", 10).await?.is_empty());
    env.admin_set(&FlowLimit::new("queue:bulk").concurrency(5))
        .await?;
    assert_eq!(
        env.claim("bulk", 10).await?.len(),
        2,
        "the raised limit applies at once"
    );
    // A code declaration does not overwrite the operator's change.
    flow::limits::declare(&env.db.pool, &[FlowLimit::new("queue:bulk").concurrency(3)]).await?;
    let status = flow::limits::status(&env.db.pool, Some("queue:bulk")).await?;
    assert_eq!(status[0].limit.concurrency, Some(5));
    assert_eq!(status[0].source, "admin");
    assert_eq!(status[0].holders, 5);
    assert_eq!(status[0].waiters, 5);
    Ok(())
}

/// One key with a big backlog and ten small keys enqueued after it: claims alternate between
/// keys, so every small job runs within (its rank + 1) rounds of the 11 keys.
#[tokio::test]
async fn claims_alternate_between_keys() -> TestResult {
    let env = Env::new().await?;
    let big: Vec<NewJob> = (0..200).map(|n| keyed("big", n)).collect();
    env.store.job_insert_many(&big).await?;
    for k in 0..10 {
        for n in 0..3 {
            env.insert(keyed(&format!("small:{k}"), n)).await?;
        }
    }
    let mut order = Vec::new();
    while order.len() < 60 {
        let got = env.claim("default", 1).await?;
        env.complete(&got).await?;
        order.extend(got.iter().map(key_of));
    }
    let last_small = order
        .iter()
        .rposition(|k| k.starts_with("small:"))
        .expect("small keys ran");
    assert!(
        last_small < 4 * 11,
        "the last small job ran at claim {last_small}: {order:?}"
    );
    let big_share = order[..33].iter().filter(|k| *k == "big").count();
    assert!((3..=4).contains(&big_share), "big got {big_share} of 33");
    Ok(())
}

#[tokio::test]
async fn a_fair_weight_buys_a_larger_share() -> TestResult {
    let env = Env::new().await?;
    flow::limits::declare(&env.db.pool, &[FlowLimit::new("heavy").fair_weight(3)]).await?;
    let jobs: Vec<NewJob> = (0..60)
        .flat_map(|n| [keyed("heavy", n), keyed("light", n)])
        .collect();
    env.store.job_insert_many(&jobs).await?;
    let got = env.claim("default", 40).await?;
    let heavy = got.iter().filter(|j| key_of(j) == "heavy").count();
    assert!((29..=31).contains(&heavy), "heavy got {heavy} of 40");
    Ok(())
}

/// Over the bucket, jobs are deferred in turn (each reserving its weight), keep their
/// attempts, and are not charged again when their turn comes.
#[tokio::test]
async fn a_rate_limit_defers_jobs_in_turn_without_using_attempts() -> TestResult {
    let env = Env::new().await?;
    let limit = FlowLimit::new("exchange:sim").rate(2, 2, Duration::from_secs(1));
    flow::limits::declare(&env.db.pool, &[limit]).await?;
    for n in 0..5 {
        env.insert(NewJob::new("order", json!({ "n": n })).rate_limit("exchange:sim", 1))
            .await?;
    }
    let got = env.claim("default", 10).await?;
    assert_eq!(got.len(), 2);
    let waits: Vec<(i64, i32)> = sqlx::query_as(
        "SELECT (extract(epoch FROM run_at - $1) * 1000)::bigint, attempt FROM jobs
         WHERE state = 'scheduled' ORDER BY run_at",
    )
    .bind(t0())
    .fetch_all(&env.db.pool)
    .await?;
    assert_eq!(waits, vec![(500, 0), (1000, 0), (1500, 0)]);
    assert_eq!(
        env.count("SELECT count(*) FROM flow_reservations").await?,
        3
    );
    env.advance_ms(500);
    env.store.job_promote_due(100).await?;
    let next = env.claim("default", 10).await?;
    assert_eq!(next.len(), 1, "the first deferred job's turn, prepaid");
    assert_eq!(next[0].lease.attempt, 1);
    assert_eq!(
        env.count("SELECT count(*) FROM flow_reservations").await?,
        2
    );
    let status = flow::limits::status(&env.db.pool, Some("exchange:sim")).await?;
    assert_eq!(status[0].deferred, 3);
    Ok(())
}

fn registry(calls: Arc<AtomicUsize>) -> Result<WorkflowRegistry> {
    let c = calls.clone();
    let wf = Workflow::new("withdraw", 1)
        .flow_key(|input| input["user"].as_str().map(|u| format!("user:{u}")))
        .step("reserve", |_ctx: StepCtx| async {
            Ok(StepOutcome::Continue(json!({})))
        })
        .step("send", move |ctx: StepCtx| {
            let calls = c.clone();
            async move {
                match ctx
                    .external_call_limited("exchange:sim", 1, |_key| async {
                        Ok(json!({ "sent": true }))
                    })
                    .await
                {
                    Ok(v) => {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Ok(StepOutcome::Continue(v))
                    }
                    Err(ExternalError::Deferred(_)) => Err("deferred".to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
        });
    WorkflowRegistry::new().register(wf)
}

async fn run_all(env: &Env, rt: &WorkflowRuntime) -> Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    for job in env.claim("default", 10).await? {
        let outcome = rt.handler().run(&job).await.outcome;
        if !job.lease.is_finished() {
            env.store.job_finish(&job.lease, &outcome).await?;
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// A hook's rate-limited request (`StepCtx::rate_limit`) over the bucket makes nothing and
/// waits for its turn: the reconcile hook's deferred run is not an ask, and the compensation's
/// uses no attempt (the workflow allows one). The bucket holds one token, refilled every 30 s,
/// and the clock moves a second at a time.
#[tokio::test]
async fn hooks_wait_for_their_bucket_without_asks_or_attempts() -> TestResult {
    let env = Env::new().await?;
    flow::limits::declare(
        &env.db.pool,
        &[FlowLimit::new("exchange:sim").rate(1, 1, Duration::from_secs(30))],
    )
    .await?;
    let (asked, cancelled) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, c) = (asked.clone(), cancelled.clone());
    let wf = Workflow::new("order", 1)
        .max_attempts(1)
        .step("hold", |_ctx: StepCtx| async {
            Ok(StepOutcome::Continue(json!({})))
        })
        .compensate(move |ctx: StepCtx, _output: Value| {
            let c = c.clone();
            async move {
                ctx.rate_limit("exchange:sim", 1)
                    .await
                    .map_err(|e| e.to_string())?;
                c.fetch_add(1, Ordering::SeqCst);
                Ok(json!({ "released": true }))
            }
        })
        .step("place", |ctx: StepCtx| async move {
            match ctx
                .external_call(|_key| async {
                    Err(CallError::Unknown("the answer was lost".into()))
                })
                .await
            {
                Err(ExternalError::InDoubt(reason)) => Ok(StepOutcome::InDoubt(reason)),
                other => Err(format!("expected in doubt, got {other:?}")),
            }
        })
        .reconcile(move |ctx: StepCtx, _key: String| {
            let a = a.clone();
            async move {
                ctx.rate_limit("exchange:sim", 1)
                    .await
                    .map_err(|e| e.to_string())?;
                a.fetch_add(1, Ordering::SeqCst);
                Ok(Reconciled::Failed("the venue has no such order".into()))
            }
        });
    let rt = WorkflowRuntime::with_config(
        env.store.clone(),
        WorkflowRegistry::new().register(wf)?,
        ExecConfig::LOCKED_ONLY,
    );
    // Someone else just used the bucket's one token.
    assert_eq!(
        flow::take(&env.store, Uuid::now_v7(), "exchange:sim", 1).await?,
        None
    );
    let id = rt.start("order", &json!({}), None).await?;
    let mut snoozed = 0;
    for _ in 0..200 {
        env.store.job_promote_due(100).await?;
        for outcome in run_all(&env, &rt).await? {
            snoozed += usize::from(matches!(outcome, Outcome::Snooze(_)));
        }
        let state: String = sqlx::query_scalar("SELECT state FROM workflows WHERE id = $1")
            .bind(id)
            .fetch_one(&env.db.pool)
            .await?;
        if state != "running" && state != "waiting" && state != "compensating" {
            assert_eq!(state, "compensated");
            break;
        }
        env.advance_ms(1000);
    }
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert_eq!(cancelled.load(Ordering::SeqCst), 1);
    assert!(
        snoozed >= 2,
        "the reconcile and the compensation each waited ({snoozed})"
    );
    let (asks, status): (i32, String) = sqlx::query_as(
        "SELECT reconcile_attempts, status FROM workflow_steps
         WHERE workflow_id = $1 AND step = 'place'",
    )
    .bind(id)
    .fetch_one(&env.db.pool)
    .await?;
    assert_eq!((asks, status.as_str()), (1, "failed"), "one ask counted");
    rt.shutdown().await;
    Ok(())
}

/// A workflow-wide key holds its slot from the first step's claim to the workflow's end: the
/// second withdrawal of a user starts only after the first finished. Its step's rate-limited
/// call, over the bucket, snoozes the step without an attempt and is not charged again.
#[tokio::test]
async fn workflow_keys_run_one_at_a_time_and_calls_wait_for_their_bucket() -> TestResult {
    let env = Env::new().await?;
    flow::limits::declare(
        &env.db.pool,
        &[
            FlowLimit::new("user:*").concurrency(1),
            FlowLimit::new("exchange:sim").rate(1, 1, Duration::from_secs(1)),
        ],
    )
    .await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let rt = WorkflowRuntime::with_config(
        env.store.clone(),
        registry(calls.clone())?,
        ExecConfig::LOCKED_ONLY,
    );
    let a = rt.start("withdraw", &json!({ "user": "1" }), None).await?;
    let b = rt.start("withdraw", &json!({ "user": "1" }), None).await?;
    let c = rt.start("withdraw", &json!({ "user": "2" }), None).await?;
    let state = |id: Uuid| {
        let pool = env.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM workflows WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
        }
    };
    // Round 1: a's and c's first steps (b waits for user:1's slot).
    assert_eq!(run_all(&env, &rt).await?.len(), 2);
    // Round 2: a's and c's calls: one goes, the other is deferred (bucket of 1).
    let outcomes = run_all(&env, &rt).await?;
    assert_eq!(
        outcomes.len(),
        2,
        "b still waits: a holds user:1 across its steps"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(outcomes.iter().any(|o| matches!(o, Outcome::Snooze(_))));
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE state = 'scheduled' AND attempt = 0")
            .await?,
        1,
        "the deferred step kept its attempt"
    );
    env.advance_ms(1000);
    env.store.job_promote_due(10).await?;
    assert_eq!(
        run_all(&env, &rt).await?.len(),
        2,
        "the deferred call and b's first step"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        env.count("SELECT count(*) FROM flow_reservations").await?,
        0
    );
    env.advance_ms(1000);
    run_all(&env, &rt).await?;
    for id in [a, b, c] {
        assert_eq!(state(id).await?, "completed");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    rt.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn low_priorities_age_until_they_run() -> TestResult {
    let env = Env::new().await?;
    env.insert(NewJob::new("low", json!({})).priority(3))
        .await?;
    env.advance_ms(1000);
    for n in 0..3 {
        env.insert(NewJob::new("high", json!({ "n": n }))).await?;
    }
    let period = Duration::from_secs(60);
    assert_eq!(env.store.job_age_priorities(period, 100).await?, 0);
    let mut prios = HashMap::new();
    for _ in 0..3 {
        env.advance_ms(60_000);
        env.store.job_age_priorities(period, 100).await?;
    }
    for (kind, p) in sqlx::query_as::<_, (String, i16)>("SELECT kind, priority FROM jobs")
        .fetch_all(&env.db.pool)
        .await?
    {
        prios.insert(kind, p);
    }
    assert_eq!(prios["low"], 0, "aged to the top level");
    assert_eq!(prios["high"], 0);
    let first = env.claim("default", 1).await?;
    assert_eq!(first[0].kind, "low", "equal priority: the older runs first");
    Ok(())
}
