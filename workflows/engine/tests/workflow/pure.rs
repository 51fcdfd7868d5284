//! Pure inline successors: batched checkpoints, and nothing kept after a cancel, a moved
//! workflow or a lost lease.
use super::*;
use crate::inline::claim_one;

/// a → b → c, none of which touches the database: after the delivery's first step (locked),
/// the successors run without a lock and checkpoint through the group committer. `during_b`
/// runs inside step b, before it returns.
pub(crate) fn pure_steps<F, Fut>(calls: &Calls, during_b: F) -> Workflow
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

pub(crate) async fn nothing(_ctx: StepCtx) -> std::result::Result<(), String> {
    Ok(())
}

/// An operator's cancel of workflow `id`, committed before it returns.
pub(crate) async fn cancel_now(
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
pub(crate) async fn start_pure(
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
pub(crate) async fn pure_inline_successors_of_many_workflows_share_batched_checkpoints()
-> TestResult {
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
pub(crate) async fn a_cancel_during_a_pure_inline_successor_discards_its_result() -> TestResult {
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
pub(crate) async fn a_pure_successor_that_writes_after_its_workflow_moved_writes_nothing()
-> TestResult {
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
pub(crate) async fn a_pure_successor_whose_lease_was_lost_checkpoints_nothing() -> TestResult {
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
