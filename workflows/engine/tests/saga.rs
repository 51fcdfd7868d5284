//! Sagas and in-doubt external calls against a real database, driven step by
//! step with the [`WorkflowHarness`] and a [`ManualClock`] (nothing sleeps).
//!
//! The "provider" is a fake in-process exchange that counts every call it
//! receives, so "never re-sent" is checked where it matters: at the provider.
use chrono::{DateTime, Utc};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::workflow::StepRow;
use ledgerflow_engine::workflow_testing::WorkflowHarness;
use ledgerflow_engine::{
    CallError, ExternalError, ManualClock, Reconciled, Resolution, Result, StepCtx, StepOutcome,
    Store, Workflow, WorkflowId, WorkflowRegistry, workflow_resolve_in, workflow_retry_in,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// 2030-01-01T00:00:00Z.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).expect("a valid timestamp")
}

struct Env {
    _db: TestDb,
    clock: ManualClock,
    store: Store,
}

impl Env {
    async fn new() -> Result<Self> {
        let db = TestDb::new().await?;
        let clock = ManualClock::new(t0());
        let store = ledgerflow_engine::testing::manual_store(&db.pool, &clock);
        Ok(Self {
            _db: db,
            clock,
            store,
        })
    }

    fn harness(&self, wf: Workflow) -> Result<WorkflowHarness> {
        Ok(WorkflowHarness::new(
            self.store.clone(),
            WorkflowRegistry::new().register(wf)?,
        ))
    }

    /// Runs until idle, advancing the clock by an hour between rounds so that
    /// backoffs and reconcile retries come due; `rounds` times.
    async fn settle(&self, h: &WorkflowHarness, rounds: usize) -> Result<usize> {
        let mut ran = 0;
        for _ in 0..rounds {
            ran += h.run_until_idle().await?.len();
            self.clock.advance(Duration::from_secs(3600));
        }
        Ok(ran)
    }
}

/// An ordered log of what ran.
#[derive(Default, Clone)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: impl Into<String>) {
        self.0.lock().expect("not poisoned").push(s.into());
    }

    fn get(&self) -> Vec<String> {
        self.0.lock().expect("not poisoned").clone()
    }

    fn count(&self, s: &str) -> usize {
        self.get().iter().filter(|x| *x == s).count()
    }
}

fn status_of<'a>(journal: &'a [StepRow], step: &str) -> &'a StepRow {
    journal
        .iter()
        .find(|r| r.step == step)
        .unwrap_or_else(|| panic!("step {step} is journaled"))
}

// ------------------------------------------------------------------ sagas

/// a → b → c, where a and b have compensations and c fails as told.
fn saga(log: &Log, c_fails: fn(&StepCtx) -> Option<String>, comp_a: Arc<AtomicUsize>) -> Workflow {
    let (l1, l2, l3, l4, l5) = (
        log.clone(),
        log.clone(),
        log.clone(),
        log.clone(),
        log.clone(),
    );
    Workflow::new("saga", 1)
        .max_attempts(3)
        .step_with_compensation(
            "a",
            move |_ctx: StepCtx| {
                let log = l1.clone();
                async move {
                    log.push("run a");
                    Ok(StepOutcome::Continue(json!({ "hold": "H-1" })))
                }
            },
            move |_ctx: StepCtx, output: Value| {
                let log = l2.clone();
                let fail_first = comp_a.clone();
                async move {
                    // Fails transiently as many times as the test asks.
                    if fail_first
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        log.push("undo a failed");
                        return Err("hold service unavailable".to_string());
                    }
                    log.push(format!("undo a {}", output["hold"].as_str().unwrap_or("?")));
                    Ok(json!({ "released": output["hold"] }))
                }
            },
        )
        .step_with_compensation(
            "b",
            move |_ctx: StepCtx| {
                let log = l3.clone();
                async move {
                    log.push("run b");
                    Ok(StepOutcome::Continue(json!({ "order": "O-7" })))
                }
            },
            move |ctx: StepCtx, output: Value| {
                let log = l4.clone();
                async move {
                    log.push(format!(
                        "undo b {}",
                        output["order"].as_str().unwrap_or("?")
                    ));
                    let refused = ctx.external_call(|_| async { Ok(Value::Null) }).await;
                    assert!(matches!(refused, Err(ExternalError::NotMade(_))));
                    Ok(json!({ "cancelled": output["order"], "key": ctx.idempotency_key() }))
                }
            },
        )
        .step("c", move |ctx: StepCtx| {
            let log = l5.clone();
            async move {
                log.push("run c");
                match c_fails(&ctx) {
                    Some(e) if e == "transient" => Err(e),
                    Some(e) => Ok(StepOutcome::Fail(e)),
                    None => Ok(StepOutcome::Continue(json!({ "done": true }))),
                }
            }
        })
}

#[tokio::test]
async fn a_failing_step_compensates_the_completed_steps_in_reverse_order_once() -> TestResult {
    let env = Env::new().await?;
    let log = Log::default();
    let h = env.harness(saga(
        &log,
        |_| Some("insufficient liquidity".to_string()),
        Arc::new(AtomicUsize::new(0)),
    ))?;
    let id = h.start("saga", &json!({})).await?;
    h.run_until_idle().await?;

    assert_eq!(
        log.get(),
        ["run a", "run b", "run c", "undo b O-7", "undo a H-1"]
    );
    let wf = h.state(id).await?;
    assert_eq!(wf.state, "compensated");
    assert_eq!(wf.error.as_deref(), Some("insufficient liquidity"));
    assert!(wf.finished_at.is_some());
    assert_eq!(wf.current_step, None);

    let journal = h.journal(id).await?;
    let statuses: Vec<_> = journal
        .iter()
        .map(|r| (r.step.as_str(), r.status.as_str()))
        .collect();
    assert_eq!(
        statuses,
        [("a", "compensated"), ("b", "compensated"), ("c", "failed")]
    );
    let a = status_of(&journal, "a");
    assert_eq!(a.output, Some(json!({ "hold": "H-1" })), "output kept");
    assert_eq!(a.compensation_output, Some(json!({ "released": "H-1" })));
    assert!(a.compensated_at.is_some());
    let b = status_of(&journal, "b");
    assert_eq!(
        b.compensation_output,
        Some(json!({ "cancelled": "O-7", "key": format!("{id}:b:compensate") }))
    );
    assert!(b.compensated_at <= a.compensated_at);
    assert_eq!(
        status_of(&journal, "c").error.as_deref(),
        Some("insufficient liquidity")
    );

    // Nothing runs again.
    env.clock.advance(Duration::from_secs(86_400));
    assert_eq!(h.run_until_idle().await?.len(), 0);
    assert_eq!(log.count("undo a H-1"), 1);
    assert_eq!(log.count("undo b O-7"), 1);
    Ok(())
}

#[tokio::test]
async fn exhausted_retries_compensate_too() -> TestResult {
    let env = Env::new().await?;
    let log = Log::default();
    let h = env.harness(saga(
        &log,
        |_| Some("transient".to_string()),
        Arc::new(AtomicUsize::new(0)),
    ))?;
    let id = h.start("saga", &json!({})).await?;
    env.settle(&h, 5).await?;

    assert_eq!(log.count("run c"), 3, "max_attempts(3)");
    assert_eq!(h.state(id).await?.state, "compensated");
    assert_eq!(
        log.get()[5..].to_vec(),
        ["undo b O-7", "undo a H-1"],
        "compensations after the last attempt, in reverse order"
    );
    Ok(())
}

#[tokio::test]
async fn a_compensation_that_fails_transiently_is_retried() -> TestResult {
    let env = Env::new().await?;
    let log = Log::default();
    let h = env.harness(saga(
        &log,
        |_| Some("rejected".to_string()),
        Arc::new(AtomicUsize::new(1)),
    ))?;
    let id = h.start("saga", &json!({})).await?;
    h.run_until_idle().await?;
    assert_eq!(h.state(id).await?.state, "compensating");
    assert_eq!(h.state(id).await?.current_step.as_deref(), Some("a"));
    assert_eq!(status_of(&h.journal(id).await?, "a").status, "completed");

    // The retry comes after the backoff.
    env.clock.advance(Duration::from_secs(11));
    h.run_until_idle().await?;
    assert_eq!(h.state(id).await?.state, "compensated");
    assert_eq!(
        log.get()[3..].to_vec(),
        ["undo b O-7", "undo a failed", "undo a H-1"]
    );
    let a = status_of(&h.journal(id).await?, "a").clone();
    assert_eq!(a.status, "compensated");
    assert_eq!(a.compensation_output, Some(json!({ "released": "H-1" })));
    Ok(())
}

#[tokio::test]
async fn a_compensation_out_of_attempts_fails_the_workflow_until_an_operator_retries() -> TestResult
{
    let env = Env::new().await?;
    let log = Log::default();
    let h = env.harness(saga(
        &log,
        |_| Some("rejected".to_string()),
        Arc::new(AtomicUsize::new(3)),
    ))?;
    let id = h.start("saga", &json!({})).await?;
    env.settle(&h, 4).await?;

    let wf = h.state(id).await?;
    assert_eq!(wf.state, "failed", "needs an operator");
    assert_eq!(wf.current_step.as_deref(), Some("a"));
    assert!(
        wf.error
            .as_deref()
            .is_some_and(|e| e.contains("compensation of step \"a\" failed")),
        "{:?}",
        wf.error
    );
    let a = status_of(&h.journal(id).await?, "a").clone();
    assert_eq!(a.status, "completed");
    assert_eq!(
        a.compensation_error.as_deref(),
        Some("hold service unavailable")
    );
    assert_eq!(log.count("undo a failed"), 3);

    // The operator resumes compensating at that step.
    let mut tx = env.store.pool().begin().await?;
    assert!(workflow_retry_in(&mut tx, &env.store, id).await?);
    tx.commit().await?;
    h.run_until_idle().await?;
    assert_eq!(h.state(id).await?.state, "compensated");
    assert_eq!(log.count("undo a H-1"), 1);
    assert_eq!(log.count("undo b O-7"), 1, "b is not undone twice");
    Ok(())
}

#[tokio::test]
async fn a_failing_first_step_fails_without_compensation() -> TestResult {
    let env = Env::new().await?;
    let wf = Workflow::new("one", 1).step_with_compensation(
        "only",
        |_ctx: StepCtx| async { Ok(StepOutcome::Fail("nope".to_string())) },
        |_ctx: StepCtx, _out: Value| async { Err("must not run".to_string()) },
    );
    let h = env.harness(wf)?;
    let id = h.start("one", &json!({})).await?;
    h.run_until_idle().await?;
    let row = h.state(id).await?;
    assert_eq!(row.state, "failed");
    assert_eq!(row.error.as_deref(), Some("nope"));
    Ok(())
}

// ------------------------------------------------------ in-doubt calls

/// A fake exchange: counts calls, remembers orders by idempotency key.
#[derive(Default, Clone)]
struct Provider {
    calls: Arc<AtomicUsize>,
    /// Requests lost so far ([`Mode::LostFirst`]).
    lost: Arc<AtomicUsize>,
    orders: Arc<Mutex<HashMap<String, String>>>,
    reconciles: Arc<AtomicUsize>,
}

impl Provider {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Places the order (idempotently) and returns its id.
    fn place(&self, key: &str) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut orders = self.orders.lock().expect("not poisoned");
        let n = orders.len() + 1;
        orders
            .entry(key.to_string())
            .or_insert_with(|| format!("ord-{n}"))
            .clone()
    }

    fn lookup(&self, key: &str) -> Option<String> {
        self.reconciles.fetch_add(1, Ordering::SeqCst);
        self.orders.lock().expect("not poisoned").get(key).cloned()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// The provider takes the order, then the answer times out.
    TimesOut,
    /// The provider takes the order, then the worker dies (never answers).
    Hangs,
    /// The first request never leaves (connection refused); the second is answered.
    RefusedOnce,
    /// The first `n` requests are lost on the way (the provider never sees
    /// them, the caller gets no answer); later ones are answered.
    LostFirst(usize),
}

/// What the reconcile hook says.
#[derive(Clone, Copy, PartialEq)]
enum Verdict {
    /// Looks the order up at the provider.
    Lookup,
    /// Always unknown.
    Unknown,
    /// The exchange says the order does not exist.
    Failed,
    /// Looks the order up; absent means the provider never received it.
    LookupOrNotReceived,
}

/// hold (compensated by release) → place (external) → settle.
fn trade(provider: &Provider, log: &Log, mode: Mode, verdict: Verdict) -> Workflow {
    let (p1, p2) = (provider.clone(), provider.clone());
    let (l1, l2, l3) = (log.clone(), log.clone(), log.clone());
    Workflow::new("trade", 1)
        .reconcile_attempts(3)
        .step_with_compensation(
            "hold",
            |_ctx: StepCtx| async { Ok(StepOutcome::Continue(json!({ "hold": "H-9" }))) },
            move |_ctx: StepCtx, output: Value| {
                let log = l1.clone();
                async move {
                    log.push(format!(
                        "release {}",
                        output["hold"].as_str().unwrap_or("?")
                    ));
                    Ok(json!({ "released": true }))
                }
            },
        )
        .step("place", move |ctx: StepCtx| {
            let provider = p1.clone();
            let log = l2.clone();
            async move {
                log.push("place");
                let first_attempt = ctx.attempt() == 1;
                let answer = ctx
                    .external_call(|key| async move {
                        if mode == Mode::RefusedOnce && first_attempt {
                            return Err(CallError::NotSent("connection refused".to_string()));
                        }
                        if let Mode::LostFirst(n) = mode
                            && provider.lost.fetch_add(1, Ordering::SeqCst) < n
                        {
                            return Err(CallError::Unknown("no answer".to_string()));
                        }
                        let order = provider.place(&key);
                        match mode {
                            Mode::TimesOut => Err(CallError::Unknown("timed out".to_string())),
                            Mode::Hangs => std::future::pending().await,
                            Mode::RefusedOnce | Mode::LostFirst(_) => {
                                Ok(json!({ "order_id": order }))
                            }
                        }
                    })
                    .await?;
                Ok(StepOutcome::Continue(answer))
            }
        })
        .reconcile(move |_ctx: StepCtx, key: String| {
            let provider = p2.clone();
            async move {
                Ok(match (provider.lookup(&key), verdict) {
                    (Some(order), Verdict::Lookup) => {
                        Reconciled::Succeeded(json!({ "order_id": order }))
                    }
                    (Some(order), Verdict::LookupOrNotReceived) => {
                        Reconciled::Succeeded(json!({ "order_id": order }))
                    }
                    (None, Verdict::LookupOrNotReceived) => {
                        Reconciled::NotReceived("no order under the key".to_string())
                    }
                    (_, Verdict::Failed) => Reconciled::Failed("no such order".to_string()),
                    _ => Reconciled::Unknown,
                })
            }
        })
        .step("settle", move |ctx: StepCtx| {
            let log = l3.clone();
            async move {
                let order = ctx.output("place").cloned().unwrap_or(Value::Null);
                log.push(format!("settle {}", order["order_id"]));
                Ok(StepOutcome::Continue(
                    json!({ "settled": order["order_id"] }),
                ))
            }
        })
}

async fn assert_in_doubt(h: &WorkflowHarness, id: WorkflowId) -> TestResult {
    let wf = h.state(id).await?;
    assert_eq!(wf.state, "waiting");
    assert_eq!(wf.wait_reason.as_deref(), Some("in_doubt:place"));
    assert_eq!(wf.current_step.as_deref(), Some("place"));
    let place = status_of(&h.journal(id).await?, "place").clone();
    assert_eq!(place.status, "in_doubt");
    assert_eq!(place.call_state.as_deref(), Some("unknown"));
    assert_eq!(place.idempotency_key, format!("{id}:place"));
    Ok(())
}

#[tokio::test]
async fn an_unknown_outcome_goes_in_doubt_and_reconcile_continues_it() -> TestResult {
    let env = Env::new().await?;
    let (provider, log) = (Provider::default(), Log::default());
    let h = env.harness(trade(&provider, &log, Mode::TimesOut, Verdict::Lookup))?;
    let id = h.start("trade", &json!({})).await?;

    assert!(h.run_next_step().await?.is_some(), "hold");
    assert!(h.run_next_step().await?.is_some(), "place");
    assert_in_doubt(&h, id).await?;
    assert_eq!(provider.calls(), 1);
    h.assert_enqueued(
        ledgerflow_engine::WORKFLOW_JOB_KIND,
        &json!({ "workflow_id": id, "step": "place", "wake": "reconcile", "n": 1 }),
    )
    .await?;

    h.run_until_idle().await?;
    let wf = h.state(id).await?;
    assert_eq!(wf.state, "completed");
    assert_eq!(wf.output, Some(json!({ "settled": "ord-1" })));
    assert_eq!(provider.calls(), 1, "the order was placed exactly once");
    assert_eq!(provider.reconciles.load(Ordering::SeqCst), 1);
    assert_eq!(log.get(), ["place", "settle \"ord-1\""]);
    let place = status_of(&h.journal(id).await?, "place").clone();
    assert_eq!(place.status, "completed");
    assert_eq!(place.output, Some(json!({ "order_id": "ord-1" })));
    assert_eq!(place.resolved_by.as_deref(), Some("reconcile"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_call_and_checkpoint_goes_in_doubt_without_resending() -> TestResult {
    let env = Env::new().await?;
    let (provider, log) = (Provider::default(), Log::default());
    let h = env.harness(trade(&provider, &log, Mode::Hangs, Verdict::Lookup))?;
    let id = h.start("trade", &json!({})).await?;
    assert!(h.run_next_step().await?.is_some(), "hold");

    // The worker dies while the provider holds the request.
    let worker = {
        let h = h.clone();
        tokio::spawn(async move { h.run_next_step().await })
    };
    for _ in 0..500 {
        if provider.calls() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(provider.calls(), 1);
    worker.abort();
    assert!(worker.await.is_err_and(|e| e.is_cancelled()));
    let place = status_of(&h.journal(id).await?, "place").clone();
    assert_eq!(
        (place.status.as_str(), place.call_state.as_deref()),
        ("calling", Some("calling")),
        "the intent was committed before the call"
    );

    // The lease expires and the reaper hands the job to a new worker.
    env.clock.advance(Duration::from_secs(31));
    let mut rescued = 0;
    for _ in 0..500 {
        rescued = env.store.job_rescue_expired(10).await?;
        if rescued > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rescued, 1);
    let ran = h.run_next_step().await?.expect("the re-run");
    assert_eq!(ran.step.as_deref(), Some("place"));
    assert_in_doubt(&h, id).await?;
    assert_eq!(provider.calls(), 1, "not re-sent");
    assert_eq!(
        log.count("place"),
        1,
        "the step body did not even run again"
    );

    h.run_until_idle().await?;
    assert_eq!(h.state(id).await?.state, "completed");
    assert_eq!(provider.calls(), 1);
    Ok(())
}

#[tokio::test]
async fn a_call_the_provider_never_received_is_sent_again_under_the_same_key() -> TestResult {
    let env = Env::new().await?;
    let (provider, log) = (Provider::default(), Log::default());
    let def = trade(
        &provider,
        &log,
        Mode::LostFirst(1),
        Verdict::LookupOrNotReceived,
    );
    let h = env.harness(def)?;
    let id = h.start("trade", &json!({})).await?;
    assert!(h.run_next_step().await?.is_some(), "hold");
    assert!(h.run_next_step().await?.is_some(), "place");
    assert_in_doubt(&h, id).await?;
    assert_eq!(provider.calls(), 0, "the request was lost on the way");

    // The reconcile hook learns the provider has no order: the step runs
    // again and sends again, under the same key; nothing is compensated.
    h.run_until_idle().await?;
    let wf = h.state(id).await?;
    assert_eq!(wf.state, "completed", "{:?}", wf.error);
    assert_eq!(wf.output, Some(json!({ "settled": "ord-1" })));
    assert_eq!(provider.calls(), 1, "placed once");
    assert_eq!(provider.orders.lock().expect("not poisoned").len(), 1);
    assert_eq!(log.count("release H-9"), 0, "the hold was not released");
    assert_eq!(log.get(), ["place", "place", "settle \"ord-1\""]);
    let place = status_of(&h.journal(id).await?, "place").clone();
    assert_eq!(place.status, "completed");
    assert_eq!(place.idempotency_key, format!("{id}:place"));
    assert_eq!(place.resolved_by.as_deref(), Some("reconcile"));
    let resends: i32 = sqlx::query_scalar(
        "SELECT call_resends FROM workflow_steps WHERE workflow_id = $1 AND step = 'place'",
    )
    .bind(id)
    .fetch_one(env.store.pool())
    .await?;
    assert_eq!(resends, 1);
    Ok(())
}

#[tokio::test]
async fn a_call_never_received_after_every_resend_fails_the_step_and_compensates() -> TestResult {
    let env = Env::new().await?;
    let (provider, log) = (Provider::default(), Log::default());
    let def = trade(
        &provider,
        &log,
        Mode::LostFirst(usize::MAX),
        Verdict::LookupOrNotReceived,
    )
    .max_resends(2);
    let h = env.harness(def)?;
    let id = h.start("trade", &json!({})).await?;
    h.run_until_idle().await?;
    let wf = h.state(id).await?;
    assert_eq!(wf.state, "compensated");
    let error = wf.error.unwrap_or_default();
    assert!(error.contains("never received after 3 sends"), "{error}");
    assert_eq!(log.count("place"), 3, "the first send and two resends");
    assert_eq!(log.count("release H-9"), 1);
    assert_eq!(provider.calls(), 0);
    Ok(())
}

#[tokio::test]
async fn reconcile_unknown_waits_for_an_admin_who_resolves_it_succeeded() -> TestResult {
    let env = Env::new().await?;
    let (provider, log) = (Provider::default(), Log::default());
    let h = env.harness(trade(&provider, &log, Mode::TimesOut, Verdict::Unknown))?;
    let id = h.start("trade", &json!({})).await?;
    env.settle(&h, 6).await?;

    assert_in_doubt(&h, id).await?;
    assert_eq!(
        provider.reconciles.load(Ordering::SeqCst),
        3,
        "asked 3 times"
    );
    assert_eq!(
        status_of(&h.journal(id).await?, "place").reconcile_attempts,
        3
    );
    assert!(
        h.all_enqueued("default").await?.is_empty(),
        "left for an admin"
    );

    let mut tx = env.store.pool().begin().await?;
    let resolved = workflow_resolve_in(
        &mut tx,
        &env.store,
        h.registry(),
        id,
        "place",
        Resolution::Succeeded(json!({ "order_id": "ord-admin" })),
    )
    .await?;
    assert!(resolved);
    tx.commit().await?;
    let mut conn = env.store.pool().acquire().await?;
    let again = workflow_resolve_in(
        &mut conn,
        &env.store,
        h.registry(),
        id,
        "place",
        Resolution::Failed("too late".to_string()),
    )
    .await?;
    assert!(!again, "already settled");
    drop(conn);

    h.run_until_idle().await?;
    let wf = h.state(id).await?;
    assert_eq!(wf.state, "completed");
    assert_eq!(wf.output, Some(json!({ "settled": "ord-admin" })));
    let place = status_of(&h.journal(id).await?, "place").clone();
    assert_eq!(place.resolved_by.as_deref(), Some("admin"));
    assert_eq!(provider.calls(), 1);
    Ok(())
}

#[tokio::test]
async fn an_admin_resolving_failed_compensates() -> TestResult {
    let env = Env::new().await?;
    let (provider, log) = (Provider::default(), Log::default());
    let h = env.harness(trade(&provider, &log, Mode::TimesOut, Verdict::Unknown))?;
    let id = h.start("trade", &json!({})).await?;
    env.settle(&h, 6).await?;
    assert_in_doubt(&h, id).await?;

    let mut tx = env.store.pool().begin().await?;
    assert!(
        workflow_resolve_in(
            &mut tx,
            &env.store,
            h.registry(),
            id,
            "place",
            Resolution::Failed("the exchange has no such order".to_string()),
        )
        .await?
    );
    tx.commit().await?;
    h.run_until_idle().await?;

    let wf = h.state(id).await?;
    assert_eq!(wf.state, "compensated");
    assert_eq!(wf.error.as_deref(), Some("the exchange has no such order"));
    assert_eq!(log.get(), ["place", "release H-9"]);
    let journal = h.journal(id).await?;
    assert_eq!(status_of(&journal, "hold").status, "compensated");
    assert_eq!(status_of(&journal, "place").status, "failed");
    assert_eq!(provider.calls(), 1);
    Ok(())
}

#[tokio::test]
async fn a_rejected_call_is_remembered_and_a_step_may_go_in_doubt_itself() -> TestResult {
    let env = Env::new().await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let flip = Arc::new(AtomicBool::new(false));
    let (c1, f1) = (calls.clone(), flip.clone());
    let wf = Workflow::new("rej", 1)
        .max_attempts(2)
        .step("call", move |ctx: StepCtx| {
            let (calls, flip) = (c1.clone(), f1.clone());
            async move {
                if flip.load(Ordering::SeqCst) {
                    return Ok(StepOutcome::InDoubt("operator said so".to_string()));
                }
                let r = ctx
                    .external_call(|_key| async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Err(CallError::Rejected("insufficient funds".to_string()))
                    })
                    .await;
                // Retry transiently: the re-run must get the recorded answer.
                Err(format!("{r:?}"))
            }
        });
    let h = env.harness(wf)?;
    let id = h.start("rej", &json!({})).await?;
    env.settle(&h, 3).await?;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "rejected once, remembered");
    let row = h.state(id).await?;
    assert_eq!(row.state, "failed");
    assert!(
        row.error
            .as_deref()
            .is_some_and(|e| e.contains("insufficient funds"))
    );

    // An operator retry runs the step again; this time it is in doubt by
    // its own verdict (no reconcile hook: it waits for an admin).
    flip.store(true, Ordering::SeqCst);
    let mut tx = env.store.pool().begin().await?;
    assert!(workflow_retry_in(&mut tx, &env.store, id).await?);
    tx.commit().await?;
    h.run_until_idle().await?;
    let row = h.state(id).await?;
    assert_eq!(row.state, "waiting");
    assert_eq!(row.wait_reason.as_deref(), Some("in_doubt:call"));
    assert_eq!(status_of(&h.journal(id).await?, "call").status, "in_doubt");
    Ok(())
}

#[tokio::test]
async fn reconcile_failed_compensates() -> TestResult {
    let env = Env::new().await?;
    let (provider, log) = (Provider::default(), Log::default());
    let h = env.harness(trade(&provider, &log, Mode::TimesOut, Verdict::Failed))?;
    let id = h.start("trade", &json!({})).await?;
    h.run_until_idle().await?;
    let wf = h.state(id).await?;
    assert_eq!(wf.state, "compensated");
    assert_eq!(wf.error.as_deref(), Some("no such order"));
    let journal = h.journal(id).await?;
    let place = status_of(&journal, "place");
    assert_eq!(
        (place.status.as_str(), place.resolved_by.as_deref()),
        ("failed", Some("reconcile"))
    );
    assert_eq!(log.get(), ["place", "release H-9"]);
    assert_eq!(provider.calls(), 1);
    Ok(())
}

#[tokio::test]
async fn a_call_that_was_certainly_not_sent_is_sent_again_with_the_same_key() -> TestResult {
    let env = Env::new().await?;
    let (provider, log) = (Provider::default(), Log::default());
    let h = env.harness(trade(&provider, &log, Mode::RefusedOnce, Verdict::Unknown))?;
    let id = h.start("trade", &json!({})).await?;
    h.run_until_idle().await?;
    let place = status_of(&h.journal(id).await?, "place").clone();
    assert_eq!(
        (place.status.as_str(), place.call_state.as_deref()),
        ("calling", Some("not_sent"))
    );
    assert_eq!(provider.calls(), 0);

    env.clock.advance(Duration::from_secs(11));
    h.run_until_idle().await?;
    let wf = h.state(id).await?;
    assert_eq!(wf.state, "completed");
    assert_eq!(wf.output, Some(json!({ "settled": "ord-1" })));
    let place = status_of(&h.journal(id).await?, "place").clone();
    assert_eq!(
        (place.status.as_str(), place.call_state.as_deref()),
        ("completed", Some("answered"))
    );
    assert_eq!(place.call_output, Some(json!({ "order_id": "ord-1" })));
    assert_eq!(provider.calls(), 1);
    assert_eq!(
        provider
            .orders
            .lock()
            .expect("not poisoned")
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        [format!("{id}:place")]
    );
    Ok(())
}
