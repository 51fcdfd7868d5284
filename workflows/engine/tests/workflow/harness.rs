//! The testing harness: steps one by one, assertions on jobs, signals and journals, timers.
use super::*;

/// notify (enqueues a side job) → fill (waits for a signal) → done.
pub(crate) fn harnessed() -> Workflow {
    Workflow::new("harnessed", 1)
        .step("notify", |ctx: StepCtx| async move {
            let job = NewJob::new("notify.email", json!({ "workflow_id": ctx.workflow_id() }))
                .queue("notifications");
            let mut db = ctx.db().await.map_err(|e| e.to_string())?;
            ctx.store()
                .job_insert_in(&mut db, &job)
                .await
                .map_err(|e| e.to_string())?;
            Ok(StepOutcome::Continue(json!({ "notified": true })))
        })
        .step("fill", |ctx: StepCtx| async move {
            let key = ctx.workflow_id().to_string();
            Ok(StepOutcome::wait_signal(
                "fill",
                key,
                Duration::from_secs(60),
            ))
        })
        .step("done", |ctx: StepCtx| async move {
            Ok(StepOutcome::Finish(
                ctx.output("fill").cloned().unwrap_or(Value::Null),
            ))
        })
}

#[tokio::test]
pub(crate) async fn the_harness_runs_steps_one_by_one_and_asserts_on_jobs_signals_and_journals()
-> TestResult {
    let env = Env::new().await?;
    let h = WorkflowHarness::new(env.store.clone(), registry(harnessed())?);
    let id = h.start("harnessed", &json!({ "user": 7 })).await?;
    assert_eq!(h.state(id).await?.state, "running");
    assert_eq!(h.all_enqueued("default").await?.len(), 1, "the first step");

    let ran = h.run_next_step().await?.expect("a step ran");
    assert_eq!(ran.step.as_deref(), Some("notify"));
    assert_eq!(ran.outcome, Outcome::Complete);
    let email = h
        .assert_enqueued("notify.email", &json!({ "workflow_id": id }))
        .await?;
    assert_eq!(email.queue, "notifications");
    assert!(
        h.assert_enqueued("notify.email", &json!({ "workflow_id": "someone else" }))
            .await
            .is_err()
    );
    h.refute_enqueued("notify.sms", &json!({})).await?;
    assert_eq!(h.all_enqueued("notifications").await?.len(), 1);
    h.assert_enqueued(
        WORKFLOW_JOB_KIND,
        &json!({ "workflow_id": id, "step": "fill" }),
    )
    .await?;

    // Idle while waiting: the notification job is not the harness's to run.
    assert_eq!(h.run_until_idle().await?.len(), 1);
    let wf = h.state(id).await?;
    assert_eq!(wf.state, "waiting");
    assert_eq!(wf.wait_reason, Some(format!("signal:fill:{id}")));
    assert!(h.signals_sent("fill").await?.is_empty());

    signal_send(
        &env.store,
        "fill",
        &id.to_string(),
        &json!({ "px": "101.5" }),
        "ev-1",
    )
    .await?;
    let sent = h.signals_sent("fill").await?;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].payload, json!({ "px": "101.5" }));
    let ran = h.run_until_idle().await?;
    assert_eq!(
        ran.iter().map(|r| r.step.as_deref()).collect::<Vec<_>>(),
        [Some("fill"), Some("done")]
    );
    assert!(h.run_next_step().await?.is_none());

    let wf = h.state(id).await?;
    assert_eq!(
        (wf.state.as_str(), wf.output),
        ("completed", Some(json!({ "px": "101.5" })))
    );
    let journal = h.journal(id).await?;
    assert_eq!(
        journal
            .iter()
            .map(|r| (r.step.as_str(), r.status.as_str()))
            .collect::<Vec<_>>(),
        [
            ("notify", "completed"),
            ("fill", "completed"),
            ("done", "completed")
        ]
    );
    assert_eq!(h.signals_sent("fill").await?[0].workflow_id, Some(id));
    assert_eq!(
        h.all_enqueued("notifications").await?.len(),
        1,
        "still there"
    );
    Ok(())
}

#[tokio::test]
pub(crate) async fn the_harness_fires_timers_when_the_clock_moves() -> TestResult {
    let env = Env::new().await?;
    let wake_at = t0() + TimeDelta::minutes(5);
    let wf = Workflow::new("sleepy", 1)
        .step("sleep", move |_ctx: StepCtx| async move {
            Ok(StepOutcome::SleepUntil(wake_at))
        })
        .step("after", |_ctx: StepCtx| async {
            Ok(StepOutcome::Continue(json!("woke")))
        });
    let h = WorkflowHarness::new(env.store.clone(), registry(wf)?);
    let id = h.start("sleepy", &json!({})).await?;
    assert_eq!(h.run_until_idle().await?.len(), 1);
    assert_eq!(h.state(id).await?.wait_reason.as_deref(), Some("timer"));
    assert_eq!(h.all_enqueued("default").await?[0].run_at, wake_at);
    env.clock.advance(Duration::from_secs(300));
    assert_eq!(h.run_until_idle().await?.len(), 1);
    assert_eq!(h.state(id).await?.state, "completed");
    Ok(())
}
