//! Cancel, operator retry and compensation over every configuration.
use super::*;
use crate::waits::nap;

pub(crate) async fn cancel(rig: &Rig, id: WorkflowId) -> TestResult<bool> {
    let mut tx = rig.db.pool.begin().await?;
    let done = workflow_cancel_in(&mut tx, &rig.store, id, "operator says stop").await?;
    tx.commit().await?;
    Ok(done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn a_cancel_between_steps_stops_the_workflow() -> TestResult {
    conforms(
        || registry(nap()),
        |rig| async move {
            let id = rig.start("nap").await?;
            rig.drain().await?;
            assert!(cancel(&rig, id).await?);
            rig.settle(1).await?;
            assert_eq!(rig.state(id).await?, "cancelled");
            assert!(rig.effects().await?.is_empty());
            rig.dump().await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn a_cancel_during_a_step_stops_the_workflow_after_it() -> TestResult {
    let (release, released) = tokio::sync::watch::channel(false);
    let release = Arc::new(release);
    // Set when `a`'s body runs (under the workflow's lock on every path here).
    let (enter, entered) = tokio::sync::watch::channel(false);
    let enter = Arc::new(enter);
    let reset = enter.clone();
    let wf = move || {
        let (released, enter) = (released.clone(), enter.clone());
        Workflow::new("slow", 1)
            .step("a", move |_ctx: StepCtx| {
                let (mut released, enter) = (released.clone(), enter.clone());
                async move {
                    enter.send_replace(true);
                    let _ = released.wait_for(|r| *r).await;
                    Ok(StepOutcome::Continue(json!("a")))
                }
            })
            .step("b", |ctx: StepCtx| async move {
                effect(&ctx, "b").await?;
                Ok(StepOutcome::Continue(json!("b")))
            })
    };
    conforms(
        || registry(wf()),
        |rig| {
            let (release, mut entered) = (release.clone(), entered.clone());
            let reset = reset.clone();
            async move {
                release.send_replace(false);
                reset.send_replace(false);
                let id = rig.start("slow").await?;
                let jobs = rig.claim(1).await?;
                let rig = Arc::new(rig);
                let running = {
                    let (rig, job) = (rig.clone(), jobs[0].clone());
                    tokio::spawn(async move { rig.run(&job).await })
                };
                entered.wait_for(|e| *e).await?;
                // The operator's cancel, while `a` runs: it waits for the step's lock.
                let canceller = {
                    let rig = rig.clone();
                    tokio::spawn(async move { cancel(&rig, id).await })
                };
                let pool = rig.db.pool.clone();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                loop {
                    let waiting: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    )
                    .fetch_one(&pool)
                    .await?;
                    if waiting > 0 {
                        break;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the cancel never waited"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                release.send_replace(true);
                running.await??;
                assert!(canceller.await??, "the cancel applies after the step");
                rig.drain().await?;
                assert_eq!(rig.state(id).await?, "cancelled");
                assert!(rig.effects().await?.is_empty(), "b never ran");
                rig.dump().await
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn an_operator_retry_resumes_a_failed_workflow() -> TestResult {
    let healed = Arc::new(AtomicUsize::new(0));
    let wf = {
        let healed = healed.clone();
        move || {
            let healed = healed.clone();
            Workflow::new("heal", 1)
                .step("a", |_ctx: StepCtx| async {
                    Ok(StepOutcome::Continue(json!("a")))
                })
                .step("b", move |ctx: StepCtx| {
                    let healed = healed.clone();
                    async move {
                        if healed.load(Ordering::SeqCst) == 0 {
                            return Ok(StepOutcome::Fail("the account is frozen".into()));
                        }
                        effect(&ctx, "b").await?;
                        Ok(StepOutcome::Continue(json!("b")))
                    }
                })
        }
    };
    conforms(
        || registry(wf()),
        |rig| {
            let healed = healed.clone();
            async move {
                healed.store(0, Ordering::SeqCst);
                let id = rig.start("heal").await?;
                rig.drain().await?;
                assert_eq!(rig.state(id).await?, "failed");
                healed.store(1, Ordering::SeqCst);
                let mut tx = rig.db.pool.begin().await?;
                assert!(workflow_retry_in(&mut tx, &rig.store, id).await?);
                tx.commit().await?;
                rig.drain().await?;
                assert_eq!(rig.state(id).await?, "completed");
                rig.dump().await
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn compensation_runs_in_reverse_order() -> TestResult {
    let undo = |name: &'static str| {
        move |ctx: StepCtx, output: Value| async move {
            let mut db = ctx.db().await.map_err(|e| e.to_string())?;
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
                .fetch_one(&mut *db)
                .await
                .map_err(|e| e.to_string())?;
            drop(db);
            effect(&ctx, &format!("{n}: undo {name}")).await?;
            Ok(json!({ "undid": output }))
        }
    };
    let wf = move || {
        Workflow::new("saga", 1)
            .step_with_compensation(
                "hold",
                |_ctx: StepCtx| async { Ok(StepOutcome::Continue(json!("held"))) },
                undo("hold"),
            )
            .step("quote", |_ctx: StepCtx| async {
                Ok(StepOutcome::Continue(json!("quoted")))
            })
            .step_with_compensation(
                "place",
                |_ctx: StepCtx| async { Ok(StepOutcome::Continue(json!("placed"))) },
                undo("place"),
            )
            .step("settle", |_ctx: StepCtx| async {
                Ok(StepOutcome::Fail("the exchange refused".into()))
            })
    };
    conforms(
        || registry(wf()),
        |rig| async move {
            let id = rig.start("saga").await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "compensated");
            assert_eq!(rig.effects().await?, ["0: undo place", "1: undo hold"]);
            rig.dump().await
        },
    )
    .await
}
