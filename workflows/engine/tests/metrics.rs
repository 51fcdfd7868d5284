//! The workflow runtime's metrics (`ledgerflow_engine::metrics`): a step body's run is timed
//! per workflow, step and outcome, and an external call's answer is counted per workflow,
//! both read back from the runtime's registry after real steps ran against Postgres.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::workflow_testing::WorkflowHarness;
use ledgerflow_engine::{CallError, StepCtx, StepOutcome, Store, Workflow, WorkflowRegistry};
use prometheus::proto::{MetricFamily, MetricType};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The value of the sample of `family` whose labels include all of `labels` (a histogram's
/// count), summed over the samples that match.
fn sample(families: &[MetricFamily], family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let f = families.iter().find(|f| f.name() == family)?;
    let matching: Vec<f64> = f
        .get_metric()
        .iter()
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| {
            if f.get_field_type() == MetricType::HISTOGRAM {
                m.get_histogram().get_sample_count() as f64
            } else {
                m.get_counter().get_value()
            }
        })
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

#[tokio::test]
async fn step_runs_and_external_call_answers_are_counted() -> TestResult {
    let db = TestDb::new().await?;
    let wf = Workflow::new("metered", 1)
        .step("quote", |ctx: StepCtx| async move {
            let answer = ctx
                .external_call(|_key| async { Ok(json!({"price": "1"})) })
                .await
                .map_err(|e| e.to_string())?;
            Ok(StepOutcome::Continue(answer))
        })
        .step("order", |ctx: StepCtx| async move {
            let refused = ctx
                .external_call(|_key| async {
                    Err::<Value, _>(CallError::Rejected("insufficient funds".into()))
                })
                .await;
            refused
                .map(StepOutcome::Continue)
                .map_err(|e| e.to_string())
        });
    let h = WorkflowHarness::new(
        Store::new(db.pool.clone()),
        WorkflowRegistry::new().register(wf)?,
    );
    h.start("metered", &json!({})).await?;
    h.run_until_idle().await?;

    let families = h.runtime().metrics().unwrap().registry().gather();
    let steps = "ledgerflow_workflow_step_duration_seconds";
    let calls = "ledgerflow_external_calls_total";
    let wf = ("workflow", "metered");
    assert_eq!(
        sample(
            &families,
            steps,
            &[wf, ("step", "quote"), ("outcome", "ok")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &families,
            steps,
            &[wf, ("step", "order"), ("outcome", "error")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&families, steps, &[wf, ("outcome", "in_doubt")]),
        None
    );
    assert_eq!(
        sample(&families, calls, &[wf, ("outcome", "answered")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&families, calls, &[wf, ("outcome", "rejected")]),
        Some(1.0)
    );
    // No label carries an id: every label value is one of the few the code chose.
    for f in families
        .iter()
        .filter(|f| f.name() == steps || f.name() == calls)
    {
        for m in f.get_metric() {
            for l in m.get_label() {
                assert!(
                    [
                        "metered", "quote", "order", "ok", "error", "answered", "rejected"
                    ]
                    .contains(&l.value()),
                    "{}={}",
                    l.name(),
                    l.value()
                );
            }
        }
    }
    Ok(())
}
