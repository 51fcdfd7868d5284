//! Sagas: a failing step compensates the completed ones in reverse order, once; compensations
//! retry, and one out of attempts waits for an operator.
use super::*;

/// a → b → c, where a and b have compensations and c fails as told.
pub(crate) fn saga(
    log: &Log,
    c_fails: fn(&StepCtx) -> Option<String>,
    comp_a: Arc<AtomicUsize>,
) -> Workflow {
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
pub(crate) async fn a_failing_step_compensates_the_completed_steps_in_reverse_order_once()
-> TestResult {
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
pub(crate) async fn exhausted_retries_compensate_too() -> TestResult {
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
pub(crate) async fn a_compensation_that_fails_transiently_is_retried() -> TestResult {
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
pub(crate) async fn a_compensation_out_of_attempts_fails_the_workflow_until_an_operator_retries()
-> TestResult {
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
pub(crate) async fn a_failing_first_step_fails_without_compensation() -> TestResult {
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
