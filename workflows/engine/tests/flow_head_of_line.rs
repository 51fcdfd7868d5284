//! A head-of-line block the controlled claim must not have (found by the flow-control kill
//! test's author): a key at its limit with a backlog larger than the claim's candidate window
//! (4 × the jobs wanted, 16..=2,000) must not hide the free keys behind it while handler slots
//! are idle.
use ledgerflow_engine::flow::{self, FlowLimit};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{NewJob, Store};
use serde_json::json;
use std::sync::Arc;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// 200 priority-0 jobs of one key limited to 1, then 50 priority-1 jobs of 50 free keys: a claim
/// of 8 takes the hot key's one job and 7 free keys' jobs; the next claim of 8 takes 8 free
/// keys' jobs (the hot key is full).
#[tokio::test]
async fn a_full_keys_backlog_does_not_hide_free_keys() -> TestResult {
    let db = TestDb::new().await?;
    let store = Store::new(db.pool.clone());
    flow::limits::declare(
        &db.pool,
        &[
            FlowLimit::new("hot:*").concurrency(1),
            FlowLimit::new("cold:*").concurrency(1),
        ],
    )
    .await?;
    let hot: Vec<NewJob> = (0..200)
        .map(|n| {
            NewJob::new("k", json!({ "n": n }))
                .flow_key("hot:1")
                .priority(0)
        })
        .collect();
    store.job_insert_many(&hot).await?;
    let cold: Vec<NewJob> = (0..50)
        .map(|n| {
            NewJob::new("k", json!({ "n": n }))
                .flow_key(format!("cold:{n}"))
                .priority(1)
        })
        .collect();
    store.job_insert_many(&cold).await?;
    let owner: Arc<str> = Arc::from("w");
    let first = store.job_claim("default", &owner, 8).await?;
    let second = store.job_claim("default", &owner, 8).await?;
    assert_eq!((first.len(), second.len()), (8, 8));
    Ok(())
}
