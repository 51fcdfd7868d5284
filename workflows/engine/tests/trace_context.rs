//! The trace context stored with jobs and workflows (decision 0011), against a real database:
//! what an enqueuer gives is stored by the one-job and the bulk insert, and the claim hands it
//! back, so an attempt in another process — or after a crash — continues that trace; and the
//! jobs that wake a workflow from outside its own run (a signal, an operator's retry) take the
//! workflow's context, not the sender's. With tracing off (as in this test binary: no
//! OpenTelemetry layer, `trace::enable` never called) a job built with `NewJob::new` stores
//! nothing, so the workflow's context below is written by the test.
mod common;

use common::TestDb;
use ledgerflow_engine::workflow_testing::WorkflowHarness;
use ledgerflow_engine::{
    NewJob, Result, StepCtx, StepOutcome, Store, Workflow, WorkflowRegistry, signal_send, trace,
    workflow_retry_in,
};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const A: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const B: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";

#[tokio::test]
async fn jobs_keep_the_context_they_were_enqueued_under_and_the_claim_returns_it() -> Result<()> {
    let db = TestDb::new().await?;
    let store = Store::new(db.pool.clone());
    assert!(!trace::enabled());

    let one = NewJob::new("traced", json!({})).traceparent(Some(A.to_string()));
    let plain = NewJob::new("plain", json!({}));
    let many = [
        NewJob::new("traced-bulk", json!({})).traceparent(Some(B.to_string())),
        NewJob::new("plain-bulk", json!({})),
    ];
    store.job_insert(&one).await?;
    store.job_insert(&plain).await?;
    store.job_insert_many(&many).await?;

    let stored: HashMap<String, Option<String>> =
        sqlx::query_as("SELECT kind, traceparent FROM jobs")
            .fetch_all(&db.pool)
            .await?
            .into_iter()
            .collect();
    let expected = HashMap::from([
        ("traced".to_string(), Some(A.to_string())),
        ("plain".to_string(), None),
        ("traced-bulk".to_string(), Some(B.to_string())),
        ("plain-bulk".to_string(), None),
    ]);
    assert_eq!(stored, expected);

    let claimed: HashMap<String, Option<String>> = store
        .job_claim("default", &Arc::from("w"), 10)
        .await?
        .into_iter()
        .map(|j| (j.kind, j.traceparent))
        .collect();
    assert_eq!(claimed, expected);
    Ok(())
}

#[tokio::test]
async fn signal_and_retry_wake_ups_continue_the_workflows_trace() -> Result<()> {
    let db = TestDb::new().await?;
    let store = Store::new(db.pool.clone());
    let failed_once = Arc::new(AtomicBool::new(false));
    let f = failed_once.clone();
    let wf = Workflow::new("traced", 1)
        .step("wait", |_c: StepCtx| async {
            Ok(StepOutcome::wait_signal(
                "go",
                "k",
                Duration::from_secs(3600),
            ))
        })
        .step("last", move |_c: StepCtx| {
            let f = f.clone();
            async move {
                if f.swap(true, Ordering::SeqCst) {
                    Ok(StepOutcome::Continue(json!(1)))
                } else {
                    Ok(StepOutcome::Fail("once".into()))
                }
            }
        });
    let harness = WorkflowHarness::new(store.clone(), WorkflowRegistry::new().register(wf)?);
    let id = harness.start("traced", &json!({})).await?;
    // What a traced start stores; this binary traces nothing, so the test writes it.
    sqlx::query("UPDATE workflows SET traceparent = $2 WHERE id = $1")
        .bind(id)
        .bind(A)
        .execute(&db.pool)
        .await?;
    harness.run_until_idle().await?;
    assert_eq!(harness.state(id).await?.state, "waiting");

    signal_send(&store, "go", "k", &json!({}), "evt-1").await?;
    let after_signal = job_contexts(&db.pool, id).await?;
    assert_eq!(
        context_of(&after_signal, "signal"),
        Some(Some(A)),
        "{after_signal:?}"
    );

    harness.run_until_idle().await?;
    assert_eq!(harness.state(id).await?.state, "failed");
    let mut conn = db.pool.acquire().await?;
    assert!(workflow_retry_in(&mut conn, &store, id).await?);
    let after_retry = job_contexts(&db.pool, id).await?;
    assert_eq!(
        context_of(&after_retry, "retry"),
        Some(Some(A)),
        "{after_retry:?}"
    );
    harness.run_until_idle().await?;
    assert_eq!(harness.state(id).await?.state, "completed");
    Ok(())
}

/// `(wake, traceparent)` of the workflow's step jobs, oldest first.
async fn job_contexts(
    pool: &sqlx::PgPool,
    id: ledgerflow_engine::WorkflowId,
) -> Result<Vec<(Option<String>, Option<String>)>> {
    Ok(sqlx::query_as(
        "SELECT args->>'wake', traceparent FROM jobs WHERE workflow_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await?)
}

/// The context of the one job woken for `wake` (`None`: no such job).
fn context_of<'a>(
    jobs: &'a [(Option<String>, Option<String>)],
    wake: &str,
) -> Option<Option<&'a str>> {
    let mut found = jobs.iter().filter(|(w, _)| w.as_deref() == Some(wake));
    let (_, context) = found.next()?;
    assert!(found.next().is_none(), "one {wake} job: {jobs:?}");
    Some(context.as_deref())
}
