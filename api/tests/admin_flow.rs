//! The admin API's flow-control routes against a real Postgres: a viewer reads limits with
//! their holders and waiters, an operator sets and removes one (each change audited with its
//! reason, none for a refused one), a bad limit is a 400, and a change applies to the next claim.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

#[path = "common/admin_fixture.rs"]
mod fixture;
use fixture::*;
use ledgerflow_engine::flow::{self, FlowLimit};

async fn audit_rows(f: &Fixture, action: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = $1")
        .bind(action)
        .fetch_one(&f.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn operators_set_and_remove_limits_audited_and_claims_follow() {
    let f = fixture().await;
    let (viewer, operator) = (Some(f.keys.viewer.as_str()), Some(f.keys.operator.as_str()));
    flow::limits::declare(&f.db.pool, &[FlowLimit::new("acct:*").concurrency(1)])
        .await
        .unwrap();
    for n in 0..4 {
        let job = NewJob::new("k", json!({ "n": n })).flow_key("acct:7");
        f.store.job_insert(&job).await.unwrap();
    }
    let owner: Arc<str> = Arc::from("w");
    assert_eq!(
        f.store
            .job_claim("default", &owner, 10)
            .await
            .unwrap()
            .len(),
        1
    );

    let list = send(&f.admin, Method::GET, "/v1/flow/limits", viewer, None).await;
    assert_eq!(list.status.as_u16(), 200, "{}", list.text);
    let row = &list.json["limits"][0];
    assert_eq!(row["key"], "acct:*");
    assert_eq!(row["concurrency"], 1);
    assert_eq!(row["source"], "code");
    assert_eq!(
        (row["holders"].as_i64(), row["waiters"].as_i64()),
        (Some(1), Some(3))
    );

    // A viewer may not change a limit; nothing is audited.
    let body = json!({ "concurrency": 3, "reason": "month-end batch" });
    let refused = send(
        &f.admin,
        Method::PUT,
        "/v1/flow/limits/acct:*",
        viewer,
        Some(body.clone()),
    )
    .await;
    assert_eq!(refused.status.as_u16(), 403, "{}", refused.text);
    assert_eq!(audit_rows(&f, "flow.limit.set").await, 0);

    // A bad limit is a 400.
    let bad = json!({ "concurrency": -1, "reason": "oops" });
    let r = send(
        &f.admin,
        Method::PUT,
        "/v1/flow/limits/acct:*",
        operator,
        Some(bad),
    )
    .await;
    assert_problem(&r, 400, "validation");

    let set = send(
        &f.admin,
        Method::PUT,
        "/v1/flow/limits/acct:*",
        operator,
        Some(body),
    )
    .await;
    assert_eq!(set.status.as_u16(), 200, "{}", set.text);
    assert_eq!(set.json["limit"]["concurrency"], 3);
    assert_eq!(set.json["limit"]["source"], "admin");
    assert_eq!(set.json["limit"]["reason"], "month-end batch");
    assert_eq!(audit_rows(&f, "flow.limit.set").await, 1);
    // The next claim follows the new limit, without a restart.
    assert_eq!(
        f.store
            .job_claim("default", &owner, 10)
            .await
            .unwrap()
            .len(),
        2
    );

    let one = send(
        &f.admin,
        Method::GET,
        "/v1/flow/limits/acct:*",
        viewer,
        None,
    )
    .await;
    assert_eq!(one.json["holders"], 3);

    let gone = send(
        &f.admin,
        Method::POST,
        "/v1/flow/limits/acct:*/remove",
        operator,
        Some(json!({ "reason": "batch done" })),
    )
    .await;
    assert_eq!(gone.status.as_u16(), 200, "{}", gone.text);
    assert!(gone.json.get("limit").is_none());
    assert_eq!(audit_rows(&f, "flow.limit.remove").await, 1);
    let missing = send(
        &f.admin,
        Method::GET,
        "/v1/flow/limits/acct:*",
        viewer,
        None,
    )
    .await;
    assert_problem(&missing, 404, "not-found");
}
