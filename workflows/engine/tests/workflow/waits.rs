//! Signals, timeouts and timers, versions, the signal/wait race, cancel and operator retry.
use super::*;

/// place → await_fill (signal `fill`/`ORDER1`, timeout 60 s) → done.
pub(crate) fn fill_workflow(calls: &Calls) -> Workflow {
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
pub(crate) async fn a_signal_sent_before_the_wait_is_kept_and_consumed() -> TestResult {
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
pub(crate) async fn a_signal_wakes_a_waiting_workflow_and_duplicates_apply_once() -> TestResult {
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
pub(crate) async fn a_wait_that_times_out_runs_the_timeout_path() -> TestResult {
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
pub(crate) async fn a_timer_step_resumes_at_its_time() -> TestResult {
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
pub(crate) async fn instances_keep_their_version_and_new_starts_use_the_newest() -> TestResult {
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
pub(crate) async fn a_signal_racing_the_wait_checkpoint_is_never_lost() -> TestResult {
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
pub(crate) async fn a_cancelled_workflow_runs_no_further_step() -> TestResult {
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
pub(crate) async fn an_operator_retry_reruns_the_failed_step() -> TestResult {
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
