//! Workflows against a real database: the step journal, re-delivery, signals, timers, fencing,
//! and the `WorkflowHarness` testing helpers.
//!
//! Each test gets its own migrated database and a [`ManualClock`]; step jobs
//! are claimed by hand and run with a runtime's handler (as the worker does),
//! so every interleaving is explicit and nothing sleeps.
use chrono::{DateTime, TimeDelta, Utc};
use ledgerflow_engine::signal::signal_list_in;
use ledgerflow_engine::store::ClaimedJob;
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::workflow::{StepRow, WorkflowRow, workflow_get_in, workflow_steps_in};
use ledgerflow_engine::workflow_testing::WorkflowHarness;
use ledgerflow_engine::{
    ExecConfig, Inline, ManualClock, NewJob, Outcome, Result, SignalSent, StepCtx, StepHandler,
    StepOutcome, Store, WORKFLOW_JOB_KIND, Workflow, WorkflowId, WorkflowRegistry, WorkflowRuntime,
    signal_send, workflow_cancel_in, workflow_retry_in,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// 2030-01-01T00:00:00Z.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).expect("a valid timestamp")
}

struct Env {
    db: TestDb,
    clock: ManualClock,
    store: Store,
    /// One runtime per registry and inline setting, as one process has one: deliveries of a
    /// workflow in one process share its in-process turns and batches.
    runtimes: Mutex<HashMap<(usize, u32, Duration), WorkflowRuntime>>,
}

impl Env {
    async fn new() -> Result<Self> {
        let db = TestDb::new().await?;
        let clock = ManualClock::new(t0());
        let store = ledgerflow_engine::testing::manual_store(&db.pool, &clock);
        sqlx::query("CREATE TABLE effects (workflow_id uuid NOT NULL, step text NOT NULL)")
            .execute(&db.pool)
            .await?;
        Ok(Self {
            db,
            clock,
            store,
            runtimes: Mutex::default(),
        })
    }

    fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    async fn count(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(self.pool()).await?)
    }

    async fn workflow(&self, id: WorkflowId) -> Result<WorkflowRow> {
        let mut conn = self.pool().acquire().await?;
        Ok(workflow_get_in(&mut conn, id)
            .await?
            .expect("the workflow exists"))
    }

    async fn journal(&self, id: WorkflowId) -> Result<Vec<StepRow>> {
        let mut conn = self.pool().acquire().await?;
        workflow_steps_in(&mut conn, id).await
    }

    async fn claim(&self, owner: &str, limit: u32) -> Result<Vec<ClaimedJob>> {
        self.store.job_promote_due(1000).await?;
        self.store
            .job_claim("default", &Arc::from(owner), limit)
            .await
    }

    /// Runs one claimed job the way the runner does, one step per delivery,
    /// then records the outcome unless the step already committed it.
    async fn run(&self, registry: &WorkflowRegistry, job: &ClaimedJob) -> Result<Outcome> {
        let outcome = steps(self, registry, Inline::OFF).run(job).await.outcome;
        if !job.lease.is_finished() {
            match self.store.job_finish(&job.lease, &outcome).await {
                Ok(()) | Err(ledgerflow_engine::Error::StaleLease { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(outcome)
    }

    /// Claims and runs due step jobs until none is left; returns how many ran.
    async fn drain(&self, registry: &WorkflowRegistry) -> Result<usize> {
        let mut ran = 0;
        loop {
            let jobs = self.claim("worker", 10).await?;
            if jobs.is_empty() {
                return Ok(ran);
            }
            for job in &jobs {
                self.run(registry, job).await?;
                ran += 1;
            }
        }
    }
}

/// The production handler of the test's runtime for `registry`, with `inline` continuation.
fn steps(env: &Env, registry: &WorkflowRegistry, inline: Inline) -> StepHandler {
    let key = (
        std::ptr::from_ref(registry) as usize,
        inline.max_steps,
        inline.budget,
    );
    let mut runtimes = env.runtimes.lock().expect("not poisoned");
    runtimes
        .entry(key)
        .or_insert_with(|| {
            let config = ExecConfig::default().inline(inline);
            WorkflowRuntime::with_config(env.store.clone(), registry.clone(), config)
        })
        .handler()
}

/// Starts a workflow (the runtime's batched start).
async fn workflow_start(
    store: &Store,
    registry: &WorkflowRegistry,
    kind: &str,
    input: &Value,
    key: Option<&str>,
) -> Result<WorkflowId> {
    let runtime = WorkflowRuntime::new(store.clone(), registry.clone());
    let started = runtime.start(kind, input, key).await;
    runtime.shutdown().await;
    started
}

/// Executions per step name.
#[derive(Default, Clone)]
struct Calls(Arc<Mutex<HashMap<String, usize>>>);

impl Calls {
    fn hit(&self, step: &str) {
        *self
            .0
            .lock()
            .expect("not poisoned")
            .entry(step.to_string())
            .or_default() += 1;
    }

    fn get(&self, step: &str) -> usize {
        self.0
            .lock()
            .expect("not poisoned")
            .get(step)
            .copied()
            .unwrap_or(0)
    }
}

async fn effect(ctx: &StepCtx) -> std::result::Result<(), String> {
    let mut db = ctx.db().await.map_err(|e| e.to_string())?;
    sqlx::query("INSERT INTO effects (workflow_id, step) VALUES ($1, $2)")
        .bind(ctx.workflow_id())
        .bind(ctx.step())
        .execute(&mut *db)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// reserve → execute → settle; each writes an effect in its fenced transaction.
fn three_steps(calls: &Calls, delay: Duration) -> Workflow {
    let (c1, c2, c3) = (calls.clone(), calls.clone(), calls.clone());
    Workflow::new("trade", 1)
        .step("reserve", move |ctx: StepCtx| {
            let calls = c1.clone();
            async move {
                calls.hit("reserve");
                tokio::time::sleep(delay).await;
                effect(&ctx).await?;
                Ok(StepOutcome::Continue(
                    json!({ "reserved": ctx.input()["amount"] }),
                ))
            }
        })
        .step("execute", move |ctx: StepCtx| {
            let calls = c2.clone();
            async move {
                calls.hit("execute");
                effect(&ctx).await?;
                let reserved = ctx.output("reserve").cloned().unwrap_or(Value::Null);
                Ok(StepOutcome::Continue(
                    json!({ "executed": reserved, "key": ctx.idempotency_key() }),
                ))
            }
        })
        .step("settle", move |ctx: StepCtx| {
            let calls = c3.clone();
            async move {
                calls.hit("settle");
                effect(&ctx).await?;
                let n = ctx.outputs().len();
                Ok(StepOutcome::Continue(json!({ "settled": true, "seen": n })))
            }
        })
}

fn registry(wf: Workflow) -> Result<WorkflowRegistry> {
    WorkflowRegistry::new().register(wf)
}

#[tokio::test]
async fn three_steps_run_to_completion_with_outputs_journaled() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = registry(three_steps(&calls, Duration::ZERO))?;
    let id = workflow_start(
        &env.store,
        &reg,
        "trade",
        &json!({ "amount": "12.5" }),
        None,
    )
    .await?;
    let wf = env.workflow(id).await?;
    assert_eq!((wf.state.as_str(), wf.version), ("running", 1));
    assert_eq!(wf.current_step.as_deref(), Some("reserve"));

    assert_eq!(env.drain(&reg).await?, 3);

    let wf = env.workflow(id).await?;
    assert_eq!(wf.state, "completed");
    assert!(wf.finished_at.is_some() && wf.current_step.is_none());
    assert_eq!(wf.output, Some(json!({ "settled": true, "seen": 2 })));
    let journal = env.journal(id).await?;
    let steps: Vec<_> = journal.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(steps, ["reserve", "execute", "settle"]);
    assert!(journal.iter().all(|s| s.status == "completed"));
    for s in &journal {
        assert_eq!(s.idempotency_key, format!("{id}:{}", s.step));
    }
    assert_eq!(journal[0].output, Some(json!({ "reserved": "12.5" })));
    assert_eq!(
        journal[1].output,
        Some(json!({ "executed": { "reserved": "12.5" }, "key": format!("{id}:execute") }))
    );
    assert_eq!(env.count("SELECT count(*) FROM effects").await?, 3);
    assert_eq!(
        env.count(
            "SELECT count(*) FROM jobs WHERE state = 'completed' AND kind = 'ledgerflow.workflow'"
        )
        .await?,
        3
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE state <> 'completed'")
            .await?,
        0
    );
    for step in ["reserve", "execute", "settle"] {
        assert_eq!(calls.get(step), 1, "{step}");
    }
    Ok(())
}

#[tokio::test]
async fn starting_twice_with_one_unique_key_gives_one_workflow() -> TestResult {
    let env = Env::new().await?;
    let reg = registry(three_steps(&Calls::default(), Duration::ZERO))?;
    let a = workflow_start(&env.store, &reg, "trade", &json!({}), Some("req-1")).await?;
    let b = workflow_start(&env.store, &reg, "trade", &json!({}), Some("req-1")).await?;
    assert_eq!(a, b);
    assert_eq!(env.count("SELECT count(*) FROM workflows").await?, 1);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 1);
    assert!(
        workflow_start(&env.store, &reg, "nope", &json!({}), None)
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn a_redelivered_step_job_does_not_rerun_a_journaled_step() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = registry(three_steps(&calls, Duration::ZERO))?;
    let id = workflow_start(&env.store, &reg, "trade", &json!({ "amount": "1" }), None).await?;
    let first = env.claim("w", 1).await?;
    env.run(&reg, &first[0]).await?;
    assert_eq!(calls.get("reserve"), 1);

    // The same step delivered again (as after a crash between the step's
    // commit and anything that followed, or an operator re-run).
    let again = NewJob::new(
        WORKFLOW_JOB_KIND,
        json!({ "workflow_id": id, "step": "reserve" }),
    )
    .workflow(id, "reserve");
    env.store.job_insert(&again).await?;
    env.drain(&reg).await?;

    for step in ["reserve", "execute", "settle"] {
        assert_eq!(calls.get(step), 1, "{step} ran more than once");
    }
    assert_eq!(env.count("SELECT count(*) FROM effects").await?, 3);
    // The successor was not enqueued twice.
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE workflow_step = 'execute'")
            .await?,
        1
    );
    assert_eq!(env.workflow(id).await?.state, "completed");

    // A late duplicate of a finished workflow's step is a no-op too.
    let late = NewJob::new(
        WORKFLOW_JOB_KIND,
        json!({ "workflow_id": id, "step": "settle" }),
    )
    .workflow(id, "settle");
    env.store.job_insert(&late).await?;
    assert_eq!(env.drain(&reg).await?, 1);
    assert_eq!(calls.get("settle"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_of_one_step_run_it_once() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = registry(three_steps(&calls, Duration::from_millis(300)))?;
    let id = workflow_start(&env.store, &reg, "trade", &json!({}), None).await?;
    let dup = NewJob::new(
        WORKFLOW_JOB_KIND,
        json!({ "workflow_id": id, "step": "reserve" }),
    )
    .workflow(id, "reserve");
    env.store.job_insert(&dup).await?;
    let jobs = env.claim("w", 2).await?;
    assert_eq!(jobs.len(), 2);
    let (a, b) = tokio::join!(env.run(&reg, &jobs[0]), env.run(&reg, &jobs[1]));
    assert_eq!((a?, b?), (Outcome::Complete, Outcome::Complete));
    assert_eq!(calls.get("reserve"), 1);
    env.drain(&reg).await?;
    assert_eq!(env.count("SELECT count(*) FROM effects").await?, 3);
    assert_eq!(env.workflow(id).await?.state, "completed");
    Ok(())
}

#[tokio::test]
async fn a_stale_lease_checkpoints_nothing() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = registry(three_steps(&calls, Duration::ZERO))?;
    let id = workflow_start(&env.store, &reg, "trade", &json!({}), None).await?;
    let old = env.claim("slow-worker", 1).await?;
    // The slow worker's lease expires; the job is rescued and claimed again.
    env.clock.advance(Duration::from_secs(31));
    assert_eq!(env.store.job_rescue_expired(10).await?, 1);
    let new = env.claim("other-worker", 1).await?;
    assert_eq!(new.len(), 1);

    let outcome = steps(&env, &reg, Inline::OFF).run(&old[0]).await.outcome;
    assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
    assert!(!old[0].lease.is_finished());
    assert_eq!(calls.get("reserve"), 0);
    assert!(env.journal(id).await?.is_empty());
    assert_eq!(env.count("SELECT count(*) FROM effects").await?, 0);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 1);

    env.run(&reg, &new[0]).await?;
    assert_eq!(calls.get("reserve"), 1);
    assert_eq!(env.journal(id).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_step_error_rolls_back_its_writes_and_retries() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let c = calls.clone();
    let wf = Workflow::new("flaky", 1).step("only", move |ctx: StepCtx| {
        let calls = c.clone();
        async move {
            calls.hit("only");
            effect(&ctx).await?;
            if ctx.attempt() == 1 {
                return Err("exchange unavailable".to_string());
            }
            Ok(StepOutcome::Finish(json!({ "attempt": ctx.attempt() })))
        }
    });
    let reg = registry(wf)?;
    let id = workflow_start(&env.store, &reg, "flaky", &json!({}), None).await?;
    env.drain(&reg).await?;
    assert_eq!(env.count("SELECT count(*) FROM effects").await?, 0);
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE state = 'retryable'")
            .await?,
        1
    );
    assert!(env.journal(id).await?.is_empty());
    env.clock.advance(Duration::from_secs(11));
    env.drain(&reg).await?;
    assert_eq!(calls.get("only"), 2);
    assert_eq!(env.count("SELECT count(*) FROM effects").await?, 1);
    let wf = env.workflow(id).await?;
    assert_eq!(wf.state, "completed");
    assert_eq!(wf.output, Some(json!({ "attempt": 2 })));
    assert_eq!(env.journal(id).await?[0].attempt, 2);
    Ok(())
}

#[tokio::test]
async fn fail_and_exhausted_retries_fail_the_workflow() -> TestResult {
    let env = Env::new().await?;
    let reg = WorkflowRegistry::new()
        .register(
            Workflow::new("refused", 1).step("check", |_ctx: StepCtx| async {
                Ok(StepOutcome::Fail("limit exceeded".to_string()))
            }),
        )?
        .register(
            Workflow::new("broken", 1)
                .max_attempts(1)
                .step("call", |_ctx: StepCtx| async { Err("boom".to_string()) }),
        )?;
    let refused = workflow_start(&env.store, &reg, "refused", &json!({}), None).await?;
    let broken = workflow_start(&env.store, &reg, "broken", &json!({}), None).await?;
    env.drain(&reg).await?;

    let wf = env.workflow(refused).await?;
    assert_eq!(
        (wf.state.as_str(), wf.error.as_deref()),
        ("failed", Some("limit exceeded"))
    );
    let j = env.journal(refused).await?;
    assert_eq!(
        (j[0].status.as_str(), j[0].error.as_deref()),
        ("failed", Some("limit exceeded"))
    );

    let wf = env.workflow(broken).await?;
    assert_eq!(
        (wf.state.as_str(), wf.error.as_deref()),
        ("failed", Some("boom"))
    );
    assert_eq!(env.journal(broken).await?[0].status, "failed");
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE state = 'failed' AND workflow_step = 'call'")
            .await?,
        1
    );
    Ok(())
}

/// place → await_fill (signal `fill`/`ORDER1`, timeout 60 s) → done.
fn fill_workflow(calls: &Calls) -> Workflow {
    let c = calls.clone();
    Workflow::new("fill", 1)
        .step("place", |_ctx: StepCtx| async {
            Ok(StepOutcome::Continue(json!({ "order": "ORDER1" })))
        })
        .step("await_fill", move |ctx: StepCtx| {
            let calls = c.clone();
            async move {
                calls.hit("await_fill");
                if ctx.timed_out() {
                    return Ok(StepOutcome::Continue(json!({ "timed_out": true })));
                }
                let order = ctx
                    .output("place")
                    .and_then(|o| o["order"].as_str())
                    .unwrap_or("");
                Ok(StepOutcome::wait_signal(
                    "fill",
                    order,
                    Duration::from_secs(60),
                ))
            }
        })
        .step("done", |ctx: StepCtx| async move {
            Ok(StepOutcome::Finish(
                ctx.output("await_fill").cloned().unwrap_or(Value::Null),
            ))
        })
}

#[tokio::test]
async fn a_signal_sent_before_the_wait_is_kept_and_consumed() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = registry(fill_workflow(&calls))?;
    let sent = signal_send(
        &env.store,
        "fill",
        "ORDER1",
        &json!({ "qty": "2" }),
        "evt-1",
    )
    .await?;
    assert_eq!(
        sent.clone(),
        SignalSent::New {
            id: 1,
            woke: vec![]
        }
    );

    let id = workflow_start(&env.store, &reg, "fill", &json!({}), None).await?;
    env.drain(&reg).await?;
    let wf = env.workflow(id).await?;
    assert_eq!(wf.state, "completed");
    assert_eq!(wf.output, Some(json!({ "qty": "2" })));
    assert_eq!(calls.get("await_fill"), 1);
    let mut conn = env.pool().acquire().await?;
    let signals = signal_list_in(&mut conn, "fill", "ORDER1").await?;
    assert_eq!(signals.len(), 1);
    assert!(signals[0].consumed_at.is_some());
    assert_eq!(signals[0].consumed_by_step.as_deref(), Some("await_fill"));
    assert_eq!(signals[0].workflow_id, Some(id));
    Ok(())
}

#[tokio::test]
async fn a_signal_wakes_a_waiting_workflow_and_duplicates_apply_once() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = registry(fill_workflow(&calls))?;
    let id = workflow_start(&env.store, &reg, "fill", &json!({}), None).await?;
    env.drain(&reg).await?;
    let wf = env.workflow(id).await?;
    assert_eq!(wf.state, "waiting");
    assert_eq!(wf.wait_reason.as_deref(), Some("signal:fill:ORDER1"));
    assert_eq!(wf.current_step.as_deref(), Some("await_fill"));
    assert_eq!(wf.wait_until, Some(t0() + TimeDelta::seconds(60)));

    let payload = json!({ "qty": "3" });
    let first = signal_send(&env.store, "fill", "ORDER1", &payload, "evt-9").await?;
    let second = signal_send(
        &env.store,
        "fill",
        "ORDER1",
        &json!({ "qty": "999" }),
        "evt-9",
    )
    .await?;
    assert!(matches!(first, SignalSent::New { ref woke, .. } if woke == &vec![id]));
    assert_eq!(second, SignalSent::Duplicate);
    assert_eq!(env.count("SELECT count(*) FROM signals").await?, 1);
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE args->>'wake' = 'signal'")
            .await?,
        1
    );

    env.drain(&reg).await?;
    let wf = env.workflow(id).await?;
    assert_eq!(wf.state, "completed");
    assert_eq!(wf.output, Some(payload));
    // Woken without re-running the step function.
    assert_eq!(calls.get("await_fill"), 1);

    // The timeout job still fires later, and changes nothing.
    env.clock.advance(Duration::from_secs(61));
    assert_eq!(env.drain(&reg).await?, 1);
    assert_eq!(calls.get("await_fill"), 1);
    assert_eq!(env.workflow(id).await?.output, Some(json!({ "qty": "3" })));
    Ok(())
}

#[tokio::test]
async fn a_wait_that_times_out_runs_the_timeout_path() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = registry(fill_workflow(&calls))?;
    let id = workflow_start(&env.store, &reg, "fill", &json!({}), None).await?;
    env.drain(&reg).await?;
    assert_eq!(env.workflow(id).await?.state, "waiting");
    env.clock.advance(Duration::from_secs(59));
    assert_eq!(env.drain(&reg).await?, 0, "not yet");
    env.clock.advance(Duration::from_secs(2));
    env.drain(&reg).await?;
    let wf = env.workflow(id).await?;
    assert_eq!(wf.state, "completed");
    assert_eq!(wf.output, Some(json!({ "timed_out": true })));
    assert_eq!(calls.get("await_fill"), 2);

    // A signal that comes too late is kept, unconsumed, for nobody.
    let late = signal_send(&env.store, "fill", "ORDER1", &json!({}), "evt-late").await?;
    assert!(matches!(late, SignalSent::New { ref woke, .. } if woke.is_empty()));
    Ok(())
}

#[tokio::test]
async fn a_timer_step_resumes_at_its_time() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let c = calls.clone();
    let wake_at = t0() + TimeDelta::hours(1);
    let wf = Workflow::new("cooldown", 1)
        .step("pause", move |_ctx: StepCtx| async move {
            Ok(StepOutcome::SleepUntil(wake_at))
        })
        .step("after", move |_ctx: StepCtx| {
            let calls = c.clone();
            async move {
                calls.hit("after");
                Ok(StepOutcome::Continue(json!("woke")))
            }
        });
    let reg = registry(wf)?;
    let id = workflow_start(&env.store, &reg, "cooldown", &json!({}), None).await?;
    env.drain(&reg).await?;
    let wf = env.workflow(id).await?;
    assert_eq!(wf.state, "waiting");
    assert_eq!(wf.wait_reason.as_deref(), Some("timer"));
    assert_eq!(wf.wait_until, Some(wake_at));
    assert_eq!(
        env.count(
            "SELECT count(*) FROM jobs WHERE state = 'scheduled' AND workflow_step = 'after'"
        )
        .await?,
        1
    );
    env.clock.advance(Duration::from_secs(1800));
    assert_eq!(env.drain(&reg).await?, 0);
    env.clock.advance(Duration::from_secs(1800));
    assert_eq!(env.drain(&reg).await?, 1);
    assert_eq!(calls.get("after"), 1);
    let wf = env.workflow(id).await?;
    assert_eq!(
        (wf.state.as_str(), wf.output),
        ("completed", Some(json!("woke")))
    );
    Ok(())
}

#[tokio::test]
async fn instances_keep_their_version_and_new_starts_use_the_newest() -> TestResult {
    let env = Env::new().await?;
    let v1 = || {
        Workflow::new("payout", 1)
            .step("a", |_c: StepCtx| async {
                Ok(StepOutcome::Continue(json!("v1a")))
            })
            .step("b", |_c: StepCtx| async {
                Ok(StepOutcome::Continue(json!("v1b")))
            })
    };
    let v2 = Workflow::new("payout", 2)
        .step("a", |_c: StepCtx| async {
            Ok(StepOutcome::Continue(json!("v2a")))
        })
        .step("c", |_c: StepCtx| async {
            Ok(StepOutcome::Continue(json!("v2c")))
        })
        .step("d", |_c: StepCtx| async {
            Ok(StepOutcome::Continue(json!("v2d")))
        });
    let old = registry(v1())?;
    let old_id = workflow_start(&env.store, &old, "payout", &json!({}), None).await?;
    let both = registry(v1())?.register(v2)?;
    assert!(
        both.clone().register(v1()).is_err(),
        "a version registers once"
    );
    let new_id = workflow_start(&env.store, &both, "payout", &json!({}), None).await?;
    env.drain(&both).await?;

    let (a, b) = (env.workflow(old_id).await?, env.workflow(new_id).await?);
    assert_eq!(
        (a.version, a.state.as_str(), a.output),
        (1, "completed", Some(json!("v1b")))
    );
    assert_eq!(
        (b.version, b.state.as_str(), b.output),
        (2, "completed", Some(json!("v2d")))
    );
    let steps = |rows: Vec<StepRow>| rows.into_iter().map(|r| r.step).collect::<Vec<_>>();
    assert_eq!(steps(env.journal(old_id).await?), ["a", "b"]);
    assert_eq!(steps(env.journal(new_id).await?), ["a", "c", "d"]);
    Ok(())
}

/// A step that waits from the start, raced against its signal many times:
/// every workflow must get its signal without the timeout (the clock never
/// moves), whichever side commits first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signal_racing_the_wait_checkpoint_is_never_lost() -> TestResult {
    let env = Env::new().await?;
    let waits = Arc::new(AtomicUsize::new(0));
    let w = waits.clone();
    let wf = Workflow::new("race", 1)
        .step("wait", move |ctx: StepCtx| {
            let waits = w.clone();
            async move {
                waits.fetch_add(1, Ordering::SeqCst);
                let key = ctx.input()["key"].as_str().unwrap_or_default().to_string();
                Ok(StepOutcome::wait_signal(
                    "go",
                    key,
                    Duration::from_secs(3600),
                ))
            }
        })
        .step("end", |ctx: StepCtx| async move {
            Ok(StepOutcome::Finish(
                ctx.output("wait").cloned().unwrap_or(Value::Null),
            ))
        });
    let reg = registry(wf)?;
    let mut ids = Vec::new();
    for i in 0..40 {
        let id = workflow_start(
            &env.store,
            &reg,
            "race",
            &json!({ "key": format!("k{i}") }),
            None,
        )
        .await?;
        let job = env.claim("w", 1).await?;
        let store = env.store.clone();
        let key = format!("k{i}");
        let send = tokio::spawn(async move {
            if i % 2 == 0 {
                tokio::task::yield_now().await;
            }
            signal_send(&store, "go", &key, &json!({ "i": i }), &format!("evt-{i}")).await
        });
        env.run(&reg, &job[0]).await?;
        send.await??;
        ids.push(id);
    }
    env.drain(&reg).await?;
    for (i, id) in ids.into_iter().enumerate() {
        let wf = env.workflow(id).await?;
        assert_eq!(wf.state, "completed", "workflow {i} lost its signal");
        assert_eq!(wf.output, Some(json!({ "i": i })));
    }
    assert_eq!(
        waits.load(Ordering::SeqCst),
        40,
        "the wait step ran once each"
    );
    Ok(())
}

#[tokio::test]
async fn a_cancelled_workflow_runs_no_further_step() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = registry(fill_workflow(&calls))?;
    let id = workflow_start(&env.store, &reg, "fill", &json!({}), None).await?;
    env.drain(&reg).await?;
    assert_eq!(env.workflow(id).await?.state, "waiting");
    let mut conn = env.pool().acquire().await?;
    assert!(workflow_cancel_in(&mut conn, &env.store, id, "user asked").await?);
    assert!(!workflow_cancel_in(&mut conn, &env.store, id, "again").await?);
    let wf = env.workflow(id).await?;
    assert_eq!(
        (wf.state.as_str(), wf.error.as_deref()),
        ("cancelled", Some("user asked"))
    );
    assert!(wf.finished_at.is_some());
    // The pending timeout job is cancelled; a signal wakes nobody.
    assert_eq!(
        env.count(
            "SELECT count(*) FROM jobs WHERE state = 'cancelled' AND args->>'wake' = 'timeout'"
        )
        .await?,
        1
    );
    let sent = signal_send(&env.store, "fill", "ORDER1", &json!({}), "evt-x").await?;
    assert!(matches!(sent, SignalSent::New { ref woke, .. } if woke.is_empty()));
    env.clock.advance(Duration::from_secs(3600));
    assert_eq!(env.drain(&reg).await?, 0);
    assert_eq!(calls.get("await_fill"), 1);
    Ok(())
}

#[tokio::test]
async fn an_operator_retry_reruns_the_failed_step() -> TestResult {
    let env = Env::new().await?;
    let fail_once = Arc::new(AtomicUsize::new(0));
    let f = fail_once.clone();
    let wf = Workflow::new("retryable", 1)
        .step("first", |_c: StepCtx| async {
            Ok(StepOutcome::Continue(json!(1)))
        })
        .step("second", move |_c: StepCtx| {
            let f = f.clone();
            async move {
                if f.fetch_add(1, Ordering::SeqCst) == 0 {
                    Ok(StepOutcome::Fail("rejected".to_string()))
                } else {
                    Ok(StepOutcome::Continue(json!(2)))
                }
            }
        });
    let reg = registry(wf)?;
    let id = workflow_start(&env.store, &reg, "retryable", &json!({}), None).await?;
    env.drain(&reg).await?;
    assert_eq!(env.workflow(id).await?.state, "failed");
    let mut conn = env.pool().acquire().await?;
    assert!(workflow_retry_in(&mut conn, &env.store, id).await?);
    assert!(
        !workflow_retry_in(&mut conn, &env.store, id).await?,
        "only failed workflows"
    );
    env.drain(&reg).await?;
    let wf = env.workflow(id).await?;
    assert_eq!(
        (wf.state.as_str(), wf.output),
        ("completed", Some(json!(2)))
    );
    assert!(wf.error.is_none());
    let journal = env.journal(id).await?;
    assert!(journal.iter().all(|s| s.status == "completed"));
    assert_eq!(fail_once.load(Ordering::SeqCst), 2);
    Ok(())
}

// ------------------------------------------------------- testing harness

/// notify (enqueues a side job) → fill (waits for a signal) → done.
fn harnessed() -> Workflow {
    Workflow::new("harnessed", 1)
        .step("notify", |ctx: StepCtx| async move {
            let job = NewJob::new("notify.email", json!({ "workflow_id": ctx.workflow_id() }))
                .queue("notifications");
            let mut db = ctx.db().await.map_err(|e| e.to_string())?;
            ctx.store()
                .job_insert_in(&mut db, &job)
                .await
                .map_err(|e| e.to_string())?;
            Ok(StepOutcome::Continue(json!({ "notified": true })))
        })
        .step("fill", |ctx: StepCtx| async move {
            let key = ctx.workflow_id().to_string();
            Ok(StepOutcome::wait_signal(
                "fill",
                key,
                Duration::from_secs(60),
            ))
        })
        .step("done", |ctx: StepCtx| async move {
            Ok(StepOutcome::Finish(
                ctx.output("fill").cloned().unwrap_or(Value::Null),
            ))
        })
}

#[tokio::test]
async fn the_harness_runs_steps_one_by_one_and_asserts_on_jobs_signals_and_journals() -> TestResult
{
    let env = Env::new().await?;
    let h = WorkflowHarness::new(env.store.clone(), registry(harnessed())?);
    let id = h.start("harnessed", &json!({ "user": 7 })).await?;
    assert_eq!(h.state(id).await?.state, "running");
    assert_eq!(h.all_enqueued("default").await?.len(), 1, "the first step");

    let ran = h.run_next_step().await?.expect("a step ran");
    assert_eq!(ran.step.as_deref(), Some("notify"));
    assert_eq!(ran.outcome, Outcome::Complete);
    let email = h
        .assert_enqueued("notify.email", &json!({ "workflow_id": id }))
        .await?;
    assert_eq!(email.queue, "notifications");
    assert!(
        h.assert_enqueued("notify.email", &json!({ "workflow_id": "someone else" }))
            .await
            .is_err()
    );
    h.refute_enqueued("notify.sms", &json!({})).await?;
    assert_eq!(h.all_enqueued("notifications").await?.len(), 1);
    h.assert_enqueued(
        WORKFLOW_JOB_KIND,
        &json!({ "workflow_id": id, "step": "fill" }),
    )
    .await?;

    // Idle while waiting: the notification job is not the harness's to run.
    assert_eq!(h.run_until_idle().await?.len(), 1);
    let wf = h.state(id).await?;
    assert_eq!(wf.state, "waiting");
    assert_eq!(wf.wait_reason, Some(format!("signal:fill:{id}")));
    assert!(h.signals_sent("fill").await?.is_empty());

    signal_send(
        &env.store,
        "fill",
        &id.to_string(),
        &json!({ "px": "101.5" }),
        "ev-1",
    )
    .await?;
    let sent = h.signals_sent("fill").await?;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].payload, json!({ "px": "101.5" }));
    let ran = h.run_until_idle().await?;
    assert_eq!(
        ran.iter().map(|r| r.step.as_deref()).collect::<Vec<_>>(),
        [Some("fill"), Some("done")]
    );
    assert!(h.run_next_step().await?.is_none());

    let wf = h.state(id).await?;
    assert_eq!(
        (wf.state.as_str(), wf.output),
        ("completed", Some(json!({ "px": "101.5" })))
    );
    let journal = h.journal(id).await?;
    assert_eq!(
        journal
            .iter()
            .map(|r| (r.step.as_str(), r.status.as_str()))
            .collect::<Vec<_>>(),
        [
            ("notify", "completed"),
            ("fill", "completed"),
            ("done", "completed")
        ]
    );
    assert_eq!(h.signals_sent("fill").await?[0].workflow_id, Some(id));
    assert_eq!(
        h.all_enqueued("notifications").await?.len(),
        1,
        "still there"
    );
    Ok(())
}

#[tokio::test]
async fn the_harness_fires_timers_when_the_clock_moves() -> TestResult {
    let env = Env::new().await?;
    let wake_at = t0() + TimeDelta::minutes(5);
    let wf = Workflow::new("sleepy", 1)
        .step("sleep", move |_ctx: StepCtx| async move {
            Ok(StepOutcome::SleepUntil(wake_at))
        })
        .step("after", |_ctx: StepCtx| async {
            Ok(StepOutcome::Continue(json!("woke")))
        });
    let h = WorkflowHarness::new(env.store.clone(), registry(wf)?);
    let id = h.start("sleepy", &json!({})).await?;
    assert_eq!(h.run_until_idle().await?.len(), 1);
    assert_eq!(h.state(id).await?.wait_reason.as_deref(), Some("timer"));
    assert_eq!(h.all_enqueued("default").await?[0].run_at, wake_at);
    env.clock.advance(Duration::from_secs(300));
    assert_eq!(h.run_until_idle().await?.len(), 1);
    assert_eq!(h.state(id).await?.state, "completed");
    Ok(())
}

// ------------------------------------------------------- inline continuation

/// Claims the one due step job.
async fn claim_one(env: &Env) -> Result<ClaimedJob> {
    let mut jobs = env.claim("worker", 1).await?;
    assert_eq!(jobs.len(), 1, "one step job is due");
    Ok(jobs.remove(0))
}

#[tokio::test]
async fn inline_continuation_runs_the_whole_chain_on_one_job_row() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = registry(three_steps(&calls, Duration::ZERO))?;
    let id = workflow_start(&env.store, &reg, "trade", &json!({ "amount": "1" }), None).await?;
    let job = claim_one(&env).await?;
    let ran = steps(&env, &reg, Inline::default()).run(&job).await;
    assert_eq!(ran.outcome, Outcome::Complete);
    assert_eq!((ran.steps, ran.last_step.as_deref()), (3, Some("settle")));
    assert!(
        job.lease.is_finished(),
        "the last checkpoint completed the row"
    );
    let wf = env.workflow(id).await?;
    assert_eq!(wf.state, "completed");
    assert_eq!(wf.output, Some(json!({ "settled": true, "seen": 2 })));
    let journal = env.journal(id).await?;
    assert!(
        journal
            .iter()
            .all(|s| s.status == "completed" && s.attempt == 1)
    );
    assert_eq!(journal.len(), 3);
    // One row carried all three steps, and nothing else was enqueued.
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 1);
    let row = env.store.job_get(job.id).await?.expect("the job exists");
    assert_eq!(
        (
            row.state.as_str(),
            row.attempt,
            row.workflow_step.as_deref()
        ),
        ("completed", 1, Some("settle"))
    );
    assert_eq!(row.unique_key, Some(format!("wf:{id}:settle:0")));
    assert_eq!(env.count("SELECT count(*) FROM effects").await?, 3);
    for step in ["reserve", "execute", "settle"] {
        assert_eq!(calls.get(step), 1, "{step}");
    }
    Ok(())
}

#[tokio::test]
async fn inline_continuation_stops_at_its_bound_and_enqueues_the_rest() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = registry(three_steps(&calls, Duration::ZERO))?;
    let id = workflow_start(&env.store, &reg, "trade", &json!({}), None).await?;
    let job = claim_one(&env).await?;
    let bound = Inline {
        max_steps: 1,
        budget: Duration::from_secs(60),
    };
    let ran = steps(&env, &reg, bound).run(&job).await;
    assert_eq!((ran.steps, ran.last_step.as_deref()), (2, Some("execute")));
    assert!(job.lease.is_finished());
    let wf = env.workflow(id).await?;
    assert_eq!(
        (wf.state.as_str(), wf.current_step.as_deref()),
        ("running", Some("settle"))
    );
    // `settle` is an ordinary job under its usual unique key.
    let next = claim_one(&env).await?;
    assert_eq!(next.workflow_step.as_deref(), Some("settle"));
    assert_ne!(next.id, job.id);
    assert_eq!(
        env.store.job_get(next.id).await?.and_then(|j| j.unique_key),
        Some(format!("wf:{id}:settle:0"))
    );
    assert_eq!(env.run(&reg, &next).await?, Outcome::Complete);
    assert_eq!(env.workflow(id).await?.state, "completed");
    // A zero budget runs one step per delivery, like `run_step`.
    let id = workflow_start(&env.store, &reg, "trade", &json!({}), None).await?;
    let job = claim_one(&env).await?;
    let none = Inline {
        max_steps: 8,
        budget: Duration::ZERO,
    };
    assert_eq!(steps(&env, &reg, none).run(&job).await.steps, 1);
    assert_eq!(
        env.workflow(id).await?.current_step.as_deref(),
        Some("execute")
    );
    Ok(())
}

/// reserve → execute → settle where `execute` fails transiently on its first run.
fn flaky_execute(calls: &Calls) -> Workflow {
    let (c1, c2, c3) = (calls.clone(), calls.clone(), calls.clone());
    Workflow::new("trade", 1)
        .max_attempts(3)
        .step("reserve", move |_ctx: StepCtx| {
            let calls = c1.clone();
            async move {
                calls.hit("reserve");
                Ok(StepOutcome::Continue(json!("r")))
            }
        })
        .step("execute", move |ctx: StepCtx| {
            let calls = c2.clone();
            async move {
                calls.hit("execute");
                if calls.get("execute") == 1 {
                    return Err("exchange busy".to_string());
                }
                Ok(StepOutcome::Continue(json!({ "attempt": ctx.attempt() })))
            }
        })
        .step("settle", move |_ctx: StepCtx| {
            let calls = c3.clone();
            async move {
                calls.hit("settle");
                Ok(StepOutcome::Continue(json!("s")))
            }
        })
}

#[tokio::test]
async fn an_inlined_step_that_fails_uses_its_own_attempts_and_earlier_steps_never_rerun()
-> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = registry(flaky_execute(&calls))?;
    let id = workflow_start(&env.store, &reg, "trade", &json!({}), None).await?;
    let job = claim_one(&env).await?;
    let ran = steps(&env, &reg, Inline::default()).run(&job).await;
    assert!(matches!(ran.outcome, Outcome::Retry { .. }));
    assert_eq!((ran.steps, ran.last_step.as_deref()), (2, Some("execute")));
    // The engine recorded the retry with `execute`'s lease: the runner must not.
    assert!(job.lease.is_finished());
    let row = env.store.job_get(job.id).await?.expect("the job exists");
    assert_eq!(
        (
            row.state.as_str(),
            row.attempt,
            row.workflow_step.as_deref()
        ),
        ("retryable", 1, Some("execute"))
    );
    let attempts = env.store.job_attempts(job.id).await?;
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        (attempts[0].attempt, attempts[0].outcome.as_str()),
        (1, "retry")
    );

    env.clock.advance(Duration::from_secs(11));
    let retry = claim_one(&env).await?;
    assert_eq!(retry.id, job.id);
    assert_eq!(
        (retry.lease.attempt, retry.workflow_step.as_deref()),
        (2, Some("execute"))
    );
    // Not on its first attempt: the successor is enqueued, not inlined.
    let ran = steps(&env, &reg, Inline::default()).run(&retry).await;
    assert_eq!((ran.outcome, ran.steps), (Outcome::Complete, 1));
    assert_eq!(env.drain(&reg).await?, 1);
    assert_eq!(env.workflow(id).await?.state, "completed");
    let journal = env.journal(id).await?;
    assert_eq!(journal[1].output, Some(json!({ "attempt": 2 })));
    assert_eq!(
        (
            calls.get("reserve"),
            calls.get("execute"),
            calls.get("settle")
        ),
        (1, 2, 1)
    );
    Ok(())
}

#[tokio::test]
async fn a_crash_between_inlined_steps_resumes_from_the_journal() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let hang = Arc::new(AtomicUsize::new(0));
    let (c1, c2, c3, h) = (calls.clone(), calls.clone(), calls.clone(), hang.clone());
    let wf = Workflow::new("trade", 1)
        .step("reserve", move |ctx: StepCtx| {
            let calls = c1.clone();
            async move {
                calls.hit("reserve");
                effect(&ctx).await?;
                Ok(StepOutcome::Continue(json!("r")))
            }
        })
        .step("execute", move |_ctx: StepCtx| {
            let (calls, hang) = (c2.clone(), h.clone());
            async move {
                calls.hit("execute");
                if hang.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The worker dies here (the test drops this future).
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                Ok(StepOutcome::Continue(json!("e")))
            }
        })
        .step("settle", move |_ctx: StepCtx| {
            let calls = c3.clone();
            async move {
                calls.hit("settle");
                Ok(StepOutcome::Continue(json!("s")))
            }
        });
    let reg = registry(wf)?;
    let id = workflow_start(&env.store, &reg, "trade", &json!({}), None).await?;
    let job = claim_one(&env).await?;
    let handler = steps(&env, &reg, Inline::default());
    let run = handler.run(&job);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), run)
            .await
            .is_err()
    );
    assert!(!job.lease.is_finished());
    // `reserve`'s checkpoint committed and moved the row on; `execute`'s writes are gone.
    let row = env.store.job_get(job.id).await?.expect("the job exists");
    assert_eq!(
        (row.state.as_str(), row.workflow_step.as_deref()),
        ("running", Some("execute"))
    );
    assert_eq!(
        env.workflow(id).await?.current_step.as_deref(),
        Some("execute")
    );
    // The lease expires; the reaper makes the row available again.
    env.clock.advance(Duration::from_secs(31));
    assert_eq!(env.store.job_rescue_expired(10).await?, 1);
    let again = claim_one(&env).await?;
    assert_eq!(
        (
            again.id,
            again.lease.attempt,
            again.workflow_step.as_deref()
        ),
        (job.id, 2, Some("execute"))
    );
    assert_eq!(env.run(&reg, &again).await?, Outcome::Complete);
    assert_eq!(env.drain(&reg).await?, 1);
    assert_eq!(env.workflow(id).await?.state, "completed");
    assert_eq!(
        (
            calls.get("reserve"),
            calls.get("execute"),
            calls.get("settle")
        ),
        (1, 2, 1)
    );
    assert_eq!(env.count("SELECT count(*) FROM effects").await?, 1);
    Ok(())
}

#[tokio::test]
async fn a_workflow_cancelled_between_inlined_steps_runs_no_further() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let (pool, store) = (env.pool().clone(), env.store.clone());
    let c = calls.clone();
    let wf = Workflow::new("trade", 1)
        .step("reserve", move |ctx: StepCtx| {
            let (calls, pool, store) = (c.clone(), pool.clone(), store.clone());
            async move {
                calls.hit("reserve");
                // An operator cancels while this step runs; the cancel waits
                // for the workflow row, i.e. for this step's checkpoint.
                let id = ctx.workflow_id();
                let canceller = pool.clone();
                tokio::spawn(async move {
                    let mut conn = canceller.acquire().await.map_err(|e| e.to_string())?;
                    workflow_cancel_in(&mut conn, &store, id, "operator")
                        .await
                        .map_err(|e| e.to_string())
                });
                // The step ends once the cancel waits for the workflow's lock (a fixed
                // sleep was too short when a loaded machine was slow to start the cancel).
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                loop {
                    let waiting: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    )
                    .fetch_one(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
                    if waiting > 0 {
                        break;
                    }
                    if tokio::time::Instant::now() > deadline {
                        return Err("the cancel never waited for the step's lock".to_string());
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(StepOutcome::Continue(json!("r")))
            }
        })
        .step("execute", |_ctx: StepCtx| async {
            Ok(StepOutcome::Continue(json!("e")))
        });
    let reg = registry(wf)?;
    let id = workflow_start(&env.store, &reg, "trade", &json!({}), None).await?;
    let job = claim_one(&env).await?;
    let ran = steps(&env, &reg, Inline::default()).run(&job).await;
    assert_eq!((ran.outcome, ran.steps), (Outcome::Complete, 2));
    assert!(job.lease.is_finished());
    let wf = env.workflow(id).await?;
    assert_eq!(wf.state, "cancelled");
    let journal = env.journal(id).await?;
    assert_eq!(journal.len(), 1, "execute never ran");
    Ok(())
}

/// a → b → c, none of which touches the database: after the delivery's first step (locked),
/// the successors run without a lock and checkpoint through the group committer. `during_b`
/// runs inside step b, before it returns.
fn pure_steps<F, Fut>(calls: &Calls, during_b: F) -> Workflow
where
    F: Fn(StepCtx) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = std::result::Result<(), String>> + Send + 'static,
{
    let (c1, c2, c3) = (calls.clone(), calls.clone(), calls.clone());
    Workflow::new("pure", 1)
        .step("a", move |ctx: StepCtx| {
            let calls = c1.clone();
            async move {
                calls.hit("a");
                Ok(StepOutcome::Continue(json!({ "n": ctx.input()["n"] })))
            }
        })
        .step("b", move |ctx: StepCtx| {
            let (calls, during_b) = (c2.clone(), during_b.clone());
            async move {
                calls.hit("b");
                during_b(ctx.clone()).await?;
                let a = ctx.output("a").cloned().unwrap_or(Value::Null);
                Ok(StepOutcome::Continue(json!({ "after": a })))
            }
        })
        .step("c", move |ctx: StepCtx| {
            let calls = c3.clone();
            async move {
                calls.hit("c");
                let seen: Vec<String> = ctx.outputs().keys().cloned().collect();
                Ok(StepOutcome::Continue(
                    json!({ "seen": seen.len(), "b": ctx.output("b") }),
                ))
            }
        })
}

async fn nothing(_ctx: StepCtx) -> std::result::Result<(), String> {
    Ok(())
}

/// An operator's cancel of workflow `id`, committed before it returns.
async fn cancel_now(
    pool: &PgPool,
    store: &Store,
    id: WorkflowId,
) -> std::result::Result<(), String> {
    let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
    workflow_cancel_in(&mut conn, store, id, "operator")
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Starts `n` workflows of [`pure_steps`] (input `{"n": i}`) and claims their first jobs.
async fn start_pure(
    env: &Env,
    reg: &WorkflowRegistry,
    n: usize,
) -> Result<(Vec<WorkflowId>, Vec<ClaimedJob>)> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(workflow_start(&env.store, reg, "pure", &json!({ "n": i }), None).await?);
    }
    let jobs = env.claim("worker", 100).await?;
    assert_eq!(jobs.len(), n);
    Ok((ids, jobs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pure_inline_successors_of_many_workflows_share_batched_checkpoints() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = Arc::new(registry(pure_steps(&calls, nothing))?);
    let n = 40;
    let (ids, jobs) = start_pure(&env, &reg, n).await?;
    // All deliveries at once, so their successors' checkpoints meet in the
    // group committer.
    let handler = steps(&env, &reg, Inline::default());
    let mut tasks = Vec::new();
    for job in jobs {
        let handler = handler.clone();
        tasks.push(tokio::spawn(async move {
            let ran = handler.run(&job).await;
            (ran, job.lease.is_finished())
        }));
    }
    for task in tasks {
        let (ran, finished) = task.await?;
        assert_eq!((ran.outcome, ran.steps), (Outcome::Complete, 3));
        assert!(finished, "the last checkpoint completed the row");
    }
    for (i, id) in ids.iter().enumerate() {
        let wf = env.workflow(*id).await?;
        assert_eq!(wf.state, "completed");
        assert_eq!(
            wf.output,
            Some(json!({ "seen": 2, "b": { "after": { "n": i } } }))
        );
        let journal = env.journal(*id).await?;
        assert_eq!(
            journal
                .iter()
                .map(|s| (s.step.as_str(), s.status.as_str(), s.attempt))
                .collect::<Vec<_>>(),
            vec![
                ("a", "completed", 1),
                ("b", "completed", 1),
                ("c", "completed", 1)
            ]
        );
    }
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE state = 'completed' AND workflow_step = 'c'")
            .await?,
        i64::try_from(n)?
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs").await?,
        i64::try_from(n)?
    );
    for step in ["a", "b", "c"] {
        assert_eq!(calls.get(step), n, "{step}");
    }
    Ok(())
}

#[tokio::test]
async fn a_cancel_during_a_pure_inline_successor_discards_its_result() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let (pool, store) = (env.pool().clone(), env.store.clone());
    // The operator's cancel commits while b runs: b holds no lock, so it
    // does not wait for b's checkpoint.
    let cancel = move |ctx: StepCtx| {
        let (pool, store) = (pool.clone(), store.clone());
        async move { cancel_now(&pool, &store, ctx.workflow_id()).await }
    };
    let reg = registry(pure_steps(&calls, cancel))?;
    let id = workflow_start(&env.store, &reg, "pure", &json!({ "n": 1 }), None).await?;
    let job = claim_one(&env).await?;
    let ran = steps(&env, &reg, Inline::default()).run(&job).await;
    // b's checkpoint is refused; under the lock the job finds its workflow
    // cancelled and completes, as any delivery to a cancelled workflow does.
    assert_eq!((ran.outcome, ran.steps), (Outcome::Complete, 2));
    assert!(job.lease.is_finished());
    assert_eq!(env.workflow(id).await?.state, "cancelled");
    let journal = env.journal(id).await?;
    assert_eq!(
        journal.iter().map(|s| s.step.as_str()).collect::<Vec<_>>(),
        vec!["a"],
        "b's result was discarded"
    );
    assert_eq!((calls.get("b"), calls.get("c")), (1, 0));
    let row = env.store.job_get(job.id).await?.expect("the job exists");
    assert_eq!(row.state.as_str(), "completed");
    Ok(())
}

#[tokio::test]
async fn a_pure_successor_that_writes_after_its_workflow_moved_writes_nothing() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let (pool, store) = (env.pool().clone(), env.store.clone());
    // Cancelled while b runs, then b asks for its transaction to write an
    // effect: opening it finds the workflow moved, so nothing is written.
    let cancel_then_write = move |ctx: StepCtx| {
        let (pool, store) = (pool.clone(), store.clone());
        async move {
            cancel_now(&pool, &store, ctx.workflow_id()).await?;
            effect(&ctx).await
        }
    };
    let reg = registry(pure_steps(&calls, cancel_then_write))?;
    let id = workflow_start(&env.store, &reg, "pure", &json!({ "n": 1 }), None).await?;
    let job = claim_one(&env).await?;
    let ran = steps(&env, &reg, Inline::default()).run(&job).await;
    assert_eq!((ran.outcome, ran.steps), (Outcome::Complete, 2));
    assert_eq!(env.workflow(id).await?.state, "cancelled");
    assert_eq!(env.count("SELECT count(*) FROM effects").await?, 0);
    assert_eq!(env.journal(id).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_pure_successor_whose_lease_was_lost_checkpoints_nothing() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let (clock, store) = (env.clock.clone(), env.store.clone());
    let first_time = Arc::new(AtomicUsize::new(0));
    // The first time b runs, its lease expires and the reaper takes the job
    // back (nothing holds the row locked while a pure successor runs).
    let lose_lease = move |_ctx: StepCtx| {
        let (clock, store, first_time) = (clock.clone(), store.clone(), first_time.clone());
        async move {
            if first_time.fetch_add(1, Ordering::SeqCst) == 0 {
                clock.advance(Duration::from_secs(31));
                let rescued = store
                    .job_rescue_expired(10)
                    .await
                    .map_err(|e| e.to_string())?;
                assert_eq!(rescued, 1);
            }
            Ok(())
        }
    };
    let reg = registry(pure_steps(&calls, lose_lease))?;
    let id = workflow_start(&env.store, &reg, "pure", &json!({ "n": 7 }), None).await?;
    let job = claim_one(&env).await?;
    let ran = steps(&env, &reg, Inline::default()).run(&job).await;
    assert!(
        matches!(ran.outcome, Outcome::Retry { .. }),
        "{:?}",
        ran.outcome
    );
    assert!(!job.lease.is_finished());
    assert_eq!(
        env.journal(id).await?.len(),
        1,
        "the stale run of b wrote nothing"
    );
    // The rescued job runs b again (it was never journaled), then c.
    env.drain(&reg).await?;
    let wf = env.workflow(id).await?;
    assert_eq!(wf.state, "completed");
    assert_eq!(
        wf.output,
        Some(json!({ "seen": 2, "b": { "after": { "n": 7 } } }))
    );
    assert_eq!((calls.get("a"), calls.get("b"), calls.get("c")), (1, 2, 1));
    assert_eq!(env.journal(id).await?.len(), 3);
    Ok(())
}

#[tokio::test]
async fn an_inbox_entry_and_its_workflow_start_are_one_statement() -> TestResult {
    use ledgerflow_engine::inbox::{InboxEntry, InboxInserted};
    use ledgerflow_engine::workflow_start_for_inbox_in;
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = registry(pure_steps(&calls, nothing))?;
    let entry = |key: &'static str| InboxEntry {
        source: "webhook:test",
        dedupe_key: key,
        business_id: Some("evt-1"),
        payload: Some(b"{\"id\":\"evt-1\"}"),
        ..InboxEntry::default()
    };
    let mut conn = env.pool().acquire().await?;
    let start = ("pure", &json!({ "n": 5 }), Some("for:evt-1"));

    // New: the inbox row, the workflow with the row's id in its input, its
    // first job — committed by the one statement (no transaction around it).
    let (inserted, wf) =
        workflow_start_for_inbox_in(&mut conn, &env.store, &reg, &entry("d-1"), start).await?;
    let InboxInserted::Inserted(inbox_id) = inserted else {
        panic!("a new entry: {inserted:?}");
    };
    let wf = wf.expect("a workflow was started");
    let row = env.workflow(wf).await?;
    assert_eq!(row.input, json!({ "n": 5, "inbox_id": inbox_id }));
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 1);

    // The same entry again: nothing.
    let again =
        workflow_start_for_inbox_in(&mut conn, &env.store, &reg, &entry("d-1"), start).await?;
    assert_eq!(again, (InboxInserted::Duplicate, None));

    // Another entry for a workflow whose unique key is taken: its inbox row,
    // and the existing workflow.
    let (other, existing) =
        workflow_start_for_inbox_in(&mut conn, &env.store, &reg, &entry("d-2"), start).await?;
    assert!(other.is_new());
    assert_eq!(existing, Some(wf));
    assert_eq!(env.count("SELECT count(*) FROM inbox").await?, 2);
    assert_eq!(env.count("SELECT count(*) FROM workflows").await?, 1);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 1);

    // An input that is not an object is refused before anything is written.
    let refused = workflow_start_for_inbox_in(
        &mut conn,
        &env.store,
        &reg,
        &entry("d-3"),
        ("pure", &json!([1]), None),
    )
    .await;
    assert!(refused.is_err());
    assert_eq!(env.count("SELECT count(*) FROM inbox").await?, 2);
    drop(conn);

    // The started workflow runs.
    env.drain(&reg).await?;
    assert_eq!(env.workflow(wf).await?.state, "completed");
    Ok(())
}

/// Polls `cond` until it holds, failing after a generous deadline (the machine may be loaded).
async fn eventually<F, Fut>(what: &str, mut cond: F) -> TestResult
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond().await? {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The handler the batch tests share: production's, except that the default inline budget
/// (250 ms from the delivery's start) is a time limit — on a loaded machine a delivery that
/// waited for its batch (or, here, a step held open on purpose) would run out of it and
/// enqueue its successors instead, which these tests do not look at. Their deliveries get a
/// budget no wait here can use up.
fn batch_steps(env: &Env, reg: &WorkflowRegistry) -> StepHandler {
    let inline = Inline {
        budget: Duration::from_secs(120),
        ..Inline::default()
    };
    steps(env, reg, inline)
}

/// Runs every job in `jobs` at once, each in its own task, the way a worker's handler slots
/// do; returns the tasks.
fn run_all(
    handler: &StepHandler,
    jobs: Vec<ClaimedJob>,
) -> Vec<tokio::task::JoinHandle<ledgerflow_engine::StepsRun>> {
    jobs.into_iter()
        .map(|job| {
            let handler = handler.clone();
            tokio::spawn(async move { handler.run(&job).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_steps_of_concurrent_deliveries_share_locked_batches() -> TestResult {
    let env = Env::new().await?;
    let calls = Calls::default();
    let reg = Arc::new(registry(pure_steps(&calls, nothing))?);
    let n = 40;
    let (ids, jobs) = start_pure(&env, &reg, n).await?;
    let handler = batch_steps(&env, &reg);
    for task in run_all(&handler, jobs) {
        let ran = task.await?;
        assert_eq!((ran.outcome, ran.steps), (Outcome::Complete, 3));
    }
    for id in &ids {
        assert_eq!(env.workflow(*id).await?.state, "completed");
        assert_eq!(env.journal(*id).await?.len(), 3);
    }
    assert_eq!(calls.get("a"), n, "every first step ran once");
    let stats = handler.runtime().lock_batch_stats();
    // Every first step ran under a batch's lock, and the batches were shared: one is open at
    // a time, so 40 deliveries arriving together cannot each get their own.
    assert_eq!((stats.held, stats.not_held), (40, 0), "{stats:?}");
    assert!(stats.batches < 40, "{stats:?}");
    assert_eq!((stats.open, stats.waiting), (0, 0), "{stats:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_first_step_does_not_hold_back_the_deliveries_after_it() -> TestResult {
    let env = Env::new().await?;
    let (release_slow, slow_released) = tokio::sync::watch::channel(false);
    // Step a of the "slow" workflow runs until the test has seen every other workflow
    // completed; the others' step a returns at once.
    let wf = Workflow::new("slow", 1)
        .step("a", move |ctx: StepCtx| {
            let mut slow = slow_released.clone();
            async move {
                if ctx.input()["role"] == "slow" {
                    let wait = Duration::from_secs(30);
                    let _ = tokio::time::timeout(wait, slow.wait_for(|r| *r)).await;
                }
                Ok(StepOutcome::Continue(json!("a")))
            }
        })
        .step("b", |_ctx: StepCtx| async {
            Ok(StepOutcome::Continue(json!("b")))
        })
        .step("c", |_ctx: StepCtx| async {
            Ok(StepOutcome::Continue(json!("c")))
        });
    let reg = Arc::new(registry(wf)?);
    let slow = workflow_start(&env.store, &reg, "slow", &json!({ "role": "slow" }), None).await?;
    let handler = batch_steps(&env, &reg);
    let mut tasks = run_all(&handler, env.claim("worker", 1).await?);
    let runtime = handler.runtime().clone();
    eventually("the slow step's batch to hold it", || {
        let stats = runtime.lock_batch_stats();
        async move { Ok((stats.open, stats.held) == (1, 1)) }
    })
    .await?;
    // Seven deliveries arrive while the slow step's batch is open: they wait for a batch,
    // so the slow step goes on without its batch and they get theirs.
    let mut quick = Vec::new();
    for i in 0..7 {
        quick.push(workflow_start(&env.store, &reg, "slow", &json!({ "n": i }), None).await?);
    }
    let jobs = env.claim("worker", 7).await?;
    assert_eq!(jobs.len(), 7);
    tasks.extend(run_all(&handler, jobs));
    let pool = env.pool().clone();
    eventually("the quick workflows to complete", || {
        let (ids, pool) = (quick.clone(), pool.clone());
        async move {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM workflows WHERE id = ANY($1) AND state = 'completed'",
            )
            .bind(&ids)
            .fetch_one(&pool)
            .await?;
            Ok(done == 7)
        }
    })
    .await?;
    assert_eq!(
        env.workflow(slow).await?.state,
        "running",
        "still in step a"
    );
    release_slow.send(true)?;
    for task in tasks {
        let ran = task.await?;
        assert_eq!((ran.outcome, ran.steps), (Outcome::Complete, 3));
    }
    let slow_wf = env.workflow(slow).await?;
    assert_eq!(slow_wf.state, "completed");
    assert_eq!(slow_wf.output, Some(json!("c")));
    assert_eq!(env.journal(slow).await?.len(), 3);
    let stats = handler.runtime().lock_batch_stats();
    assert_eq!((stats.held, stats.stragglers), (8, 1), "{stats:?}");
    Ok(())
}

/// A step that keeps its `db()` connection while it makes its external call
/// behaves the same on every path: on the lazy ones (a delivery's first step
/// under a locked batch, an inlined successor) the call used to wait for the
/// step's own `db()` guard, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_holding_its_db_connection_can_make_its_external_call_on_every_path() -> TestResult {
    let env = Env::new().await?;
    let step = |ctx: StepCtx| async move {
        let mut db = ctx.db().await.map_err(|e| e.to_string())?;
        sqlx::query("SELECT 1")
            .execute(&mut *db)
            .await
            .map_err(|e| e.to_string())?;
        let answer = ctx
            .external_call(|key| async move { Ok(json!({ "key": key })) })
            .await
            .map_err(|e| e.to_string())?;
        drop(db);
        Ok(StepOutcome::Continue(answer))
    };
    let wf = Workflow::new("held", 1)
        .step("first", step)
        .step("second", step)
        .step("done", |_ctx: StepCtx| async {
            Ok(StepOutcome::Continue(json!("done")))
        });
    let reg = Arc::new(registry(wf)?);
    let id = workflow_start(&env.store, &reg, "held", &json!({}), None).await?;
    let tasks = run_all(&batch_steps(&env, &reg), env.claim("worker", 1).await?);
    for task in tasks {
        let ran = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .map_err(|_| "the step waited on its own db() guard")??;
        assert_eq!((ran.outcome, ran.steps), (Outcome::Complete, 3));
    }
    let journal = env.journal(id).await?;
    assert_eq!(journal.len(), 3);
    for row in journal.iter().filter(|r| r.step != "done") {
        assert_eq!(row.status, "completed", "{row:?}");
        assert_eq!(row.call_state.as_deref(), Some("answered"), "{row:?}");
        assert_eq!(
            row.output,
            Some(json!({ "key": format!("{id}:{}", row.step) }))
        );
    }
    Ok(())
}
