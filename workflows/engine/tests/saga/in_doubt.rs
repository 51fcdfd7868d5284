//! In-doubt external calls: reconciled by the hook, re-sent only when never received, settled
//! by an admin, and never re-sent after a crash between the call and its checkpoint.
use super::*;

/// A fake exchange: counts calls, remembers orders by idempotency key.
#[derive(Default, Clone)]
pub(crate) struct Provider {
    pub(crate) calls: Arc<AtomicUsize>,
    /// Requests lost so far ([`Mode::LostFirst`]).
    pub(crate) lost: Arc<AtomicUsize>,
    pub(crate) orders: Arc<Mutex<HashMap<String, String>>>,
    pub(crate) reconciles: Arc<AtomicUsize>,
}

impl Provider {
    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Places the order (idempotently) and returns its id.
    pub(crate) fn place(&self, key: &str) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut orders = self.orders.lock().expect("not poisoned");
        let n = orders.len() + 1;
        orders
            .entry(key.to_string())
            .or_insert_with(|| format!("ord-{n}"))
            .clone()
    }

    pub(crate) fn lookup(&self, key: &str) -> Option<String> {
        self.reconciles.fetch_add(1, Ordering::SeqCst);
        self.orders.lock().expect("not poisoned").get(key).cloned()
    }
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Mode {
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
pub(crate) enum Verdict {
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
pub(crate) fn trade(provider: &Provider, log: &Log, mode: Mode, verdict: Verdict) -> Workflow {
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

pub(crate) async fn assert_in_doubt(h: &WorkflowHarness, id: WorkflowId) -> TestResult {
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
pub(crate) async fn an_unknown_outcome_goes_in_doubt_and_reconcile_continues_it() -> TestResult {
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
pub(crate) async fn a_crash_between_call_and_checkpoint_goes_in_doubt_without_resending()
-> TestResult {
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
pub(crate) async fn a_call_the_provider_never_received_is_sent_again_under_the_same_key()
-> TestResult {
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
pub(crate) async fn a_call_never_received_after_every_resend_fails_the_step_and_compensates()
-> TestResult {
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
pub(crate) async fn reconcile_unknown_waits_for_an_admin_who_resolves_it_succeeded() -> TestResult {
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
pub(crate) async fn an_admin_resolving_failed_compensates() -> TestResult {
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
pub(crate) async fn a_rejected_call_is_remembered_and_a_step_may_go_in_doubt_itself() -> TestResult
{
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
pub(crate) async fn reconcile_failed_compensates() -> TestResult {
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
pub(crate) async fn a_call_that_was_certainly_not_sent_is_sent_again_with_the_same_key()
-> TestResult {
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
