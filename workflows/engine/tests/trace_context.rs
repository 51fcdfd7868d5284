//! The trace context stored with jobs (decision 0011), against a real database: what an
//! enqueuer gives is stored by the one-job and the bulk insert, and the claim hands it back, so
//! an attempt in another process — or after a crash — continues that trace. With tracing off
//! (as in this test binary: no OpenTelemetry layer, `trace::enable` never called) a job built
//! with `NewJob::new` stores nothing.
mod common;

use common::TestDb;
use ledgerflow_engine::{NewJob, Result, Store, trace};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;

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
