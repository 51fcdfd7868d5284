//! Steps run once: journaled outputs, unique starts, redeliveries, stale leases, errors and
//! exhausted retries.
use super::*;

#[tokio::test]
pub(crate) async fn three_steps_run_to_completion_with_outputs_journaled() -> TestResult {
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
pub(crate) async fn starting_twice_with_one_unique_key_gives_one_workflow() -> TestResult {
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
pub(crate) async fn a_redelivered_step_job_does_not_rerun_a_journaled_step() -> TestResult {
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
pub(crate) async fn concurrent_deliveries_of_one_step_run_it_once() -> TestResult {
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
pub(crate) async fn a_stale_lease_checkpoints_nothing() -> TestResult {
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
pub(crate) async fn a_step_error_rolls_back_its_writes_and_retries() -> TestResult {
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
pub(crate) async fn fail_and_exhausted_retries_fail_the_workflow() -> TestResult {
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
