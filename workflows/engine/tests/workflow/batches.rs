//! One-statement inbox starts, locked batches of first steps, and a step's connection on every
//! execution path.
use super::*;
use crate::pure::{nothing, pure_steps, start_pure};

#[tokio::test]
pub(crate) async fn an_inbox_entry_and_its_workflow_start_are_one_statement() -> TestResult {
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
pub(crate) async fn eventually<F, Fut>(what: &str, mut cond: F) -> TestResult
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
pub(crate) fn batch_steps(env: &Env, reg: &WorkflowRegistry) -> StepHandler {
    let inline = Inline {
        budget: Duration::from_secs(120),
        ..Inline::default()
    };
    steps(env, reg, inline)
}

/// Runs every job in `jobs` at once, each in its own task, the way a worker's handler slots
/// do; returns the tasks.
pub(crate) fn run_all(
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
pub(crate) async fn first_steps_of_concurrent_deliveries_share_locked_batches() -> TestResult {
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
pub(crate) async fn a_slow_first_step_does_not_hold_back_the_deliveries_after_it() -> TestResult {
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
pub(crate) async fn a_step_holding_its_db_connection_can_make_its_external_call_on_every_path()
-> TestResult {
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
