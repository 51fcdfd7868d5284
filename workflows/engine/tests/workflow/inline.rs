//! Inline continuation: successors run on the same job row, within their bound and attempts.
use super::*;

/// Claims the one due step job.
pub(crate) async fn claim_one(env: &Env) -> Result<ClaimedJob> {
    let mut jobs = env.claim("worker", 1).await?;
    assert_eq!(jobs.len(), 1, "one step job is due");
    Ok(jobs.remove(0))
}

#[tokio::test]
pub(crate) async fn inline_continuation_runs_the_whole_chain_on_one_job_row() -> TestResult {
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
pub(crate) async fn inline_continuation_stops_at_its_bound_and_enqueues_the_rest() -> TestResult {
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
pub(crate) fn flaky_execute(calls: &Calls) -> Workflow {
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
pub(crate) async fn an_inlined_step_that_fails_uses_its_own_attempts_and_earlier_steps_never_rerun()
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
pub(crate) async fn a_crash_between_inlined_steps_resumes_from_the_journal() -> TestResult {
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
pub(crate) async fn a_workflow_cancelled_between_inlined_steps_runs_no_further() -> TestResult {
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
