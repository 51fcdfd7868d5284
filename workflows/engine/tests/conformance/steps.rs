//! Steps over every configuration: completion, redelivery, concurrent deliveries, stale
//! leases, rollback and retries.
use super::*;

/// `abc`: three steps; `a` and `c` need nothing but their checkpoint, `b` writes an effect.
pub(crate) fn abc(runs: Arc<AtomicUsize>) -> Workflow {
    Workflow::new("abc", 1)
        .step("a", move |_ctx: StepCtx| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(StepOutcome::Continue(json!("a")))
            }
        })
        .step("b", |ctx: StepCtx| async move {
            effect(&ctx, "b").await?;
            Ok(StepOutcome::Continue(json!("b")))
        })
        .step("c", |ctx: StepCtx| async move {
            let b = ctx.output("b").cloned().unwrap_or(Value::Null);
            Ok(StepOutcome::Continue(json!({ "c": b })))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn three_steps_complete() -> TestResult {
    conforms(
        || registry(abc(Arc::default())),
        |rig| async move {
            let id = rig.start("abc").await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            assert_eq!(rig.effects().await?, ["b"]);
            rig.dump().await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn a_redelivered_step_is_not_run_again() -> TestResult {
    let runs = Arc::new(AtomicUsize::new(0));
    conforms(
        || registry(abc(runs.clone())),
        |rig| {
            let runs = runs.clone();
            async move {
                runs.store(0, Ordering::SeqCst);
                let id = rig.start("abc").await?;
                rig.drain().await?;
                // A late duplicate delivery of each step (no unique key: a second row).
                for step in ["a", "b", "c"] {
                    let args = json!({ "workflow_id": id, "step": step, "wake": "entry" });
                    let dup = NewJob::new(WORKFLOW_JOB_KIND, args).workflow(id, step);
                    rig.store.job_insert(&dup).await?;
                }
                rig.drain().await?;
                assert_eq!(runs.load(Ordering::SeqCst), 1);
                assert_eq!(rig.effects().await?, ["b"]);
                rig.dump().await
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn concurrent_deliveries_run_a_body_once() -> TestResult {
    // `a` writes its effect slowly, so the two deliveries overlap.
    let wf = || {
        Workflow::new("dup", 1)
            .step("a", |ctx: StepCtx| async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                effect(&ctx, "a").await?;
                Ok(StepOutcome::Continue(json!("a")))
            })
            .step("b", |ctx: StepCtx| async move {
                effect(&ctx, "b").await?;
                Ok(StepOutcome::Continue(json!("b")))
            })
    };
    conforms(
        || registry(wf()),
        |rig| async move {
            let id = rig.start("dup").await?;
            let args = json!({ "workflow_id": id, "step": "a", "wake": "entry" });
            rig.store
                .job_insert(&NewJob::new(WORKFLOW_JOB_KIND, args).workflow(id, "a"))
                .await?;
            let jobs = rig.claim(2).await?;
            assert_eq!(jobs.len(), 2);
            let (x, y) = tokio::join!(rig.run(&jobs[0]), rig.run(&jobs[1]));
            x?;
            y?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            assert_eq!(rig.effects().await?, ["a", "b"], "each effect exactly once");
            rig.dump().await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn a_stale_lease_writes_nothing() -> TestResult {
    conforms(
        || registry(abc(Arc::default())),
        |rig| async move {
            let id = rig.start("abc").await?;
            let jobs = rig.claim(1).await?;
            // The lease is lost: the job was rescued and claimed by someone else.
            sqlx::query("UPDATE jobs SET lease_token = gen_random_uuid() WHERE id = $1")
                .bind(jobs[0].id)
                .execute(&rig.db.pool)
                .await?;
            rig.handler.run(&jobs[0]).await;
            let steps: i64 = sqlx::query_scalar("SELECT count(*) FROM workflow_steps")
                .fetch_one(&rig.db.pool)
                .await?;
            assert_eq!(steps, 0, "a stale attempt journals nothing");
            assert!(rig.effects().await?.is_empty());
            // The new holder's attempt ends; the job runs again and completes.
            sqlx::query(
                "UPDATE jobs SET state = 'available', lease_token = NULL, lease_owner = NULL,
                                 lease_expires_at = NULL
                 WHERE id = $1",
            )
            .bind(jobs[0].id)
            .execute(&rig.db.pool)
            .await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            rig.dump().await
        },
    )
    .await
}

/// `flaky`: `b` writes its effect and then fails on its first attempt.
pub(crate) fn flaky(max_attempts: i32, fail_always: bool) -> Workflow {
    Workflow::new("flaky", 1)
        .max_attempts(max_attempts)
        .step("a", |_ctx: StepCtx| async {
            Ok(StepOutcome::Continue(json!("a")))
        })
        .step("b", move |ctx: StepCtx| async move {
            effect(&ctx, &format!("b{}", ctx.attempt())).await?;
            if fail_always || ctx.attempt() == 1 {
                return Err(format!("b failed on attempt {}", ctx.attempt()));
            }
            Ok(StepOutcome::Continue(json!("b")))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn a_failing_step_rolls_back_its_writes_and_is_retried() -> TestResult {
    conforms(
        || registry(flaky(3, false)),
        |rig| async move {
            let id = rig.start("flaky").await?;
            rig.settle(2).await?;
            assert_eq!(rig.state(id).await?, "completed");
            assert_eq!(
                rig.effects().await?,
                ["b2"],
                "attempt 1's write rolled back"
            );
            rig.dump().await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn retries_exhaust_into_failure() -> TestResult {
    conforms(
        || registry(flaky(2, true)),
        |rig| async move {
            let id = rig.start("flaky").await?;
            rig.settle(3).await?;
            assert_eq!(rig.state(id).await?, "failed");
            assert!(rig.effects().await?.is_empty());
            rig.dump().await
        },
    )
    .await
}
