//! The admin API's workflow, cron, dead-letter and approval routes,
//! in-process against a real Postgres (one cloned database per test): the
//! authorization matrix over every new route, the step journal, resolving an
//! in-doubt step, four-eyes, a cron trigger that starts exactly one job, a
//! dead letter redriven once, stable cursor pages, hostile filters, and one
//! audit row per mutation (none for a refused one).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use ledgerflow_api::{AppState, admin_app};
use ledgerflow_engine::cron::ScheduleDef;
use ledgerflow_engine::inbox::{NewDeadLetter, dead_letter_insert_in};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::workflow_testing::WorkflowHarness;
use ledgerflow_engine::{
    JobState, NewJob, StepCtx, StepOutcome, Store, Workflow, WorkflowId, WorkflowRegistry,
};
use ledgerflow_payments::users::{self, AdminRole};
use poem::endpoint::BoxEndpoint;
use poem::http::{Method, StatusCode, header};
use poem::test::TestClient;
use poem::{EndpointExt, Response};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use uuid::Uuid;

type App = TestClient<BoxEndpoint<'static, Response>>;

/// A step whose external call has an unknown outcome (no reconcile hook:
/// an admin decides), then a step that reports what it saw.
fn doubtful() -> Workflow {
    Workflow::new("adm.doubt", 1)
        .step("call", |_ctx: StepCtx| async {
            Ok(StepOutcome::InDoubt("exchange timed out".to_string()))
        })
        .step("after", |ctx: StepCtx| async move {
            Ok(StepOutcome::Continue(
                json!({ "saw": ctx.output("call").cloned() }),
            ))
        })
}

/// One step that fails until `ok` is set.
fn flaky(ok: Arc<AtomicBool>) -> Workflow {
    Workflow::new("adm.flaky", 1).step("only", move |_ctx: StepCtx| {
        let ok = ok.clone();
        async move {
            if ok.load(Ordering::SeqCst) {
                Ok(StepOutcome::Continue(json!({ "ok": true })))
            } else {
                Ok(StepOutcome::Fail("boom".to_string()))
            }
        }
    })
}

/// Waits an hour for an approval signal; a timeout fails it.
fn waiting() -> Workflow {
    Workflow::new("adm.wait", 1).step("await", |ctx: StepCtx| async move {
        if ctx.timed_out() {
            return Ok(StepOutcome::Fail("no approval".to_string()));
        }
        Ok(StepOutcome::wait_signal(
            "adm.approved",
            ctx.workflow_id().to_string(),
            Duration::from_secs(3600),
        ))
    })
}

fn registry(ok: &Arc<AtomicBool>) -> WorkflowRegistry {
    WorkflowRegistry::new()
        .register(doubtful())
        .unwrap()
        .register(flaky(ok.clone()))
        .unwrap()
        .register(waiting())
        .unwrap()
}

struct Keys {
    user: String,
    expired: String,
    revoked: String,
    viewer: String,
    operator: String,
    approver: String,
    approver2: String,
    disabled: String,
}

struct Fixture {
    db: TestDb,
    store: Store,
    admin: App,
    keys: Keys,
    harness: WorkflowHarness,
    flaky_ok: Arc<AtomicBool>,
    user_id: Uuid,
    approver_id: Uuid,
}

async fn fixture() -> Fixture {
    let db = TestDb::new().await.unwrap();
    let store = Store::new(db.pool.clone());
    let ok = Arc::new(AtomicBool::new(false));
    let state = AppState::new(store.clone())
        .unwrap()
        .with_workflows(Arc::new(registry(&ok)));
    let harness = WorkflowHarness::new(store.clone(), registry(&ok));
    let mut conn = db.pool.acquire().await.unwrap();
    let user = users::create_user(&mut conn, "u@example.com", "U")
        .await
        .unwrap();
    let key = |k: users::PlaintextKey| k.expose_secret().to_string();
    let (_, user_key) = users::create_api_key(&mut conn, user, None).await.unwrap();
    let (_, expired) = users::create_api_key(&mut conn, user, Some(Duration::from_millis(1)))
        .await
        .unwrap();
    let (revoked_id, revoked) = users::create_api_key(&mut conn, user, None).await.unwrap();
    users::revoke_api_key(&mut conn, revoked_id).await.unwrap();
    let (_, viewer) = users::create_admin(&mut conn, "vera", AdminRole::Viewer)
        .await
        .unwrap();
    let (_, operator) = users::create_admin(&mut conn, "otto", AdminRole::Operator)
        .await
        .unwrap();
    let (approver_id, approver) = users::create_admin(&mut conn, "anna", AdminRole::Approver)
        .await
        .unwrap();
    let (_, approver2) = users::create_admin(&mut conn, "abel", AdminRole::Approver)
        .await
        .unwrap();
    let (disabled_id, disabled) = users::create_admin(&mut conn, "dora", AdminRole::Approver)
        .await
        .unwrap();
    users::disable_admin(&mut conn, disabled_id).await.unwrap();
    drop(conn);
    tokio::time::sleep(Duration::from_millis(5)).await; // the expired key expires
    Fixture {
        admin: TestClient::new(admin_app(state).boxed()),
        keys: Keys {
            user: key(user_key),
            expired: key(expired),
            revoked: key(revoked),
            viewer: key(viewer),
            operator: key(operator),
            approver: key(approver),
            approver2: key(approver2),
            disabled: key(disabled),
        },
        harness,
        flaky_ok: ok,
        user_id: user.0,
        approver_id: approver_id.0,
        db,
        store,
    }
}

struct Reply {
    status: StatusCode,
    content_type: String,
    text: String,
    json: Value,
}

async fn send(
    app: &App,
    method: Method,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let mut req = app.request(method, path);
    if let Some(token) = auth {
        req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some(body) = body {
        req = req.body_json(&body);
    }
    let resp = req.send().await.0;
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = resp.into_body().into_string().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        content_type,
        text,
        json,
    }
}

async fn get(f: &Fixture, path: &str, key: &str) -> Reply {
    send(&f.admin, Method::GET, path, Some(key), None).await
}

async fn post(f: &Fixture, path: &str, key: &str, body: Value) -> Reply {
    send(&f.admin, Method::POST, path, Some(key), Some(body)).await
}

fn assert_problem(r: &Reply, status: u16, slug: &str) {
    assert_eq!(r.status.as_u16(), status, "body: {}", r.text);
    assert_eq!(
        r.content_type, "application/problem+json",
        "body: {}",
        r.text
    );
    assert_eq!(
        r.json["type"],
        format!("https://ledgerflow.dev/problems/{slug}"),
        "body: {}",
        r.text
    );
}

fn assert_ok(r: &Reply) {
    assert_eq!(r.status, StatusCode::OK, "body: {}", r.text);
}

fn why(text: &str) -> Value {
    json!({ "reason": text })
}

async fn audit_count(f: &Fixture, action: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = $1")
        .bind(action)
        .fetch_one(&f.db.pool)
        .await
        .unwrap()
}

async fn audit_total(f: &Fixture) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&f.db.pool)
        .await
        .unwrap()
}

async fn start(f: &Fixture, kind: &str) -> WorkflowId {
    let id = f.harness.start(kind, &json!({ "n": 1 })).await.unwrap();
    f.harness.run_until_idle().await.unwrap();
    id
}

async fn dead_letter(f: &Fixture, offset: i64) -> i64 {
    let mut conn = f.db.pool.acquire().await.unwrap();
    let headers = json!({ "trace": "t-1" });
    dead_letter_insert_in(
        &mut conn,
        &NewDeadLetter {
            source: "kafka:orders",
            topic: Some("orders"),
            partition: Some(0),
            offset: Some(offset),
            key: Some(b"user-1"),
            payload: Some(br#"{"order":"o-1"}"#),
            headers: Some(&headers),
            error: "cannot decode",
            attempts: 3,
            ..NewDeadLetter::default()
        },
    )
    .await
    .unwrap()
    .unwrap()
}

/// A withdrawal of the fixture's user that needs approval, filed by
/// `requested_by`, with id `id` (a workflow's id, when one drives it).
async fn withdrawal(f: &Fixture, id: Uuid, requested_by: Option<Uuid>, status: &str) {
    sqlx::query(
        "INSERT INTO withdrawals (id, user_id, asset, amount, address, status,
                                  requires_approval, requested_by)
         VALUES ($1, $2, 'USD', 5000, 'addr-1', $3, true, $4)",
    )
    .bind(id)
    .bind(f.user_id)
    .bind(status)
    .bind(requested_by)
    .execute(&f.db.pool)
    .await
    .unwrap();
}

// ------------------------------------------------------------ the matrix

#[tokio::test]
async fn authorization_matrix_over_the_new_routes() {
    let f = fixture().await;
    let k = &f.keys;
    let wf = start(&f, "adm.flaky").await; // failed: retry/cancel targets
    let dl = dead_letter(&f, 1).await;
    let dead_job = f
        .store
        .job_insert(&NewJob::new("k", json!({})).queue("q"))
        .await
        .unwrap()
        .id();
    {
        let mut conn = f.db.pool.acquire().await.unwrap();
        f.store
            .job_discard_in(&mut conn, dead_job, "setup")
            .await
            .unwrap();
    }
    f.store
        .cron_upsert(&ScheduleDef::new("nightly", "0 3 * * *", "report"))
        .await
        .unwrap();
    let w = Uuid::now_v7();
    withdrawal(&f, w, None, "awaiting_approval").await;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Who {
        Anonymous,
        User,
        Expired,
        Revoked,
        Viewer,
        Operator,
        Approver,
        Disabled,
    }
    use Who::*;
    let token = |w: Who| -> Option<&str> {
        match w {
            Anonymous => None,
            User => Some(&k.user),
            Expired => Some(&k.expired),
            Revoked => Some(&k.revoked),
            Viewer => Some(&k.viewer),
            Operator => Some(&k.operator),
            Approver => Some(&k.approver),
            Disabled => Some(&k.disabled),
        }
    };
    let everyone = [
        Anonymous, User, Expired, Revoked, Viewer, Operator, Approver, Disabled,
    ];
    let dead = |w: Who| matches!(w, Anonymous | User | Expired | Revoked | Disabled);

    let reads = [
        "/v1/workflows".to_string(),
        format!("/v1/workflows/{wf}"),
        "/v1/cron".to_string(),
        "/v1/dead-letters".to_string(),
        "/v1/dead-letters/jobs".to_string(),
        format!("/v1/dead-letters/{dl}"),
        "/v1/withdrawals/pending".to_string(),
    ];
    for path in &reads {
        for who in everyone {
            let r = send(&f.admin, Method::GET, path, token(who), None).await;
            if dead(who) {
                assert_problem(&r, 401, "unauthorized");
            } else {
                assert_eq!(r.status, StatusCode::OK, "{who:?} GET {path}: {}", r.text);
            }
        }
    }

    // Operator mutations: refused for everyone else, before any change.
    let before = audit_total(&f).await;
    let op_routes = [
        format!("/v1/workflows/{wf}/retry"),
        format!("/v1/workflows/{wf}/cancel"),
        format!("/v1/workflows/{wf}/steps/call/resolve"),
        "/v1/cron/nightly/trigger".to_string(),
        "/v1/cron/nightly/pause".to_string(),
        "/v1/cron/nightly/resume".to_string(),
        format!("/v1/dead-letters/{dl}/redrive"),
        format!("/v1/dead-letters/jobs/{dead_job}/redrive"),
    ];
    let body = json!({ "reason": "matrix", "outcome": "succeeded" });
    for path in &op_routes {
        for who in everyone.into_iter().filter(|w| *w != Operator) {
            let r = send(&f.admin, Method::POST, path, token(who), Some(body.clone())).await;
            if dead(who) {
                assert_problem(&r, 401, "unauthorized");
            } else {
                assert_problem(&r, 403, "forbidden");
            }
        }
    }
    // Approvals: the operator and the viewer are refused by role.
    for path in [
        format!("/v1/withdrawals/{w}/approve"),
        format!("/v1/withdrawals/{w}/reject"),
    ] {
        for who in everyone.into_iter().filter(|w| *w != Approver) {
            let r = send(&f.admin, Method::POST, &path, token(who), Some(why("x"))).await;
            if dead(who) {
                assert_problem(&r, 401, "unauthorized");
            } else {
                assert_problem(&r, 403, "forbidden");
            }
        }
    }
    assert_eq!(audit_total(&f).await, before, "refusals write no audit row");

    // The operator gets through (2xx where the target allows it).
    for path in [
        format!("/v1/workflows/{wf}/retry"),
        "/v1/cron/nightly/trigger".to_string(),
        "/v1/cron/nightly/pause".to_string(),
        "/v1/cron/nightly/resume".to_string(),
        format!("/v1/dead-letters/{dl}/redrive"),
        format!("/v1/dead-letters/jobs/{dead_job}/redrive"),
    ] {
        let r = post(&f, &path, &k.operator, why("matrix")).await;
        assert_ok(&r);
        assert!(r.json["audit_id"].is_string(), "{path}: {}", r.text);
    }
    let r = post(
        &f,
        &format!("/v1/workflows/{wf}/cancel"),
        &k.operator,
        why("m"),
    )
    .await;
    assert_ok(&r);
    assert_eq!(r.json["workflow"]["state"], "cancelled");
    // The approver approves (nobody of the request).
    let r = post(
        &f,
        &format!("/v1/withdrawals/{w}/approve"),
        &k.approver,
        why("m"),
    )
    .await;
    assert_ok(&r);
    assert_eq!(audit_total(&f).await, before + 8);

    // A mutation without a reason changes nothing.
    let r = post(&f, "/v1/cron/nightly/trigger", &k.operator, why("  ")).await;
    assert_problem(&r, 400, "validation");
    assert_eq!(audit_total(&f).await, before + 8);
}

// -------------------------------------------------------------- workflows

#[tokio::test]
async fn the_journal_flags_in_doubt_steps_and_an_operator_resolves_them() {
    let f = fixture().await;
    let k = &f.keys;
    let id = start(&f, "adm.doubt").await;

    let r = get(&f, &format!("/v1/workflows/{id}"), &k.viewer).await;
    assert_ok(&r);
    assert_eq!(r.json["workflow"]["state"], "waiting");
    assert_eq!(r.json["workflow"]["wait_reason"], "in_doubt:call");
    assert_eq!(r.json["in_doubt_steps"], json!(["call"]));
    let call = &r.json["steps"][0];
    assert_eq!(
        (&call["step"], &call["status"], &call["in_doubt"]),
        (&json!("call"), &json!("in_doubt"), &json!(true))
    );
    assert!(call["started_at"].is_string() && call["attempt"].is_i64());

    // Bad outcomes and unknown steps change nothing.
    let path = format!("/v1/workflows/{id}/steps/call/resolve");
    let r = post(
        &f,
        &path,
        &k.operator,
        json!({ "reason": "x", "outcome": "maybe" }),
    )
    .await;
    assert_problem(&r, 400, "validation");
    let other = format!("/v1/workflows/{id}/steps/after/resolve");
    let r = post(
        &f,
        &other,
        &k.operator,
        json!({ "reason": "x", "outcome": "failed" }),
    )
    .await;
    assert_problem(&r, 409, "conflict");
    let r = post(
        &f,
        &format!("/v1/workflows/{}/steps/call/resolve", Uuid::now_v7()),
        &k.operator,
        json!({ "reason": "x", "outcome": "failed" }),
    )
    .await;
    assert_problem(&r, 404, "not-found");
    assert_eq!(audit_count(&f, "workflow.resolve_step").await, 0);

    // Succeeded: the step completes with the given output and the next runs.
    let r = post(
        &f,
        &path,
        &k.operator,
        json!({ "reason": "exchange shows the order", "outcome": "succeeded",
                "output": { "order_id": "X-1" } }),
    )
    .await;
    assert_ok(&r);
    assert!(r.json["audit_id"].is_string());
    assert_eq!(audit_count(&f, "workflow.resolve_step").await, 1);
    // Settled once: a second resolve is a conflict with no audit row.
    let r = post(
        &f,
        &path,
        &k.operator,
        json!({ "reason": "again", "outcome": "succeeded" }),
    )
    .await;
    assert_problem(&r, 409, "conflict");
    assert_eq!(audit_count(&f, "workflow.resolve_step").await, 1);

    f.harness.run_until_idle().await.unwrap();
    let r = get(&f, &format!("/v1/workflows/{id}"), &k.viewer).await;
    assert_eq!(r.json["workflow"]["state"], "completed", "{}", r.text);
    assert_eq!(r.json["in_doubt_steps"], json!([]));
    let steps = r.json["steps"].as_array().unwrap();
    assert_eq!(steps[0]["resolved_by"], "admin");
    assert_eq!(steps[0]["output"], json!({ "order_id": "X-1" }));
    assert_eq!(steps[1]["output"], json!({ "saw": { "order_id": "X-1" } }));

    // Failed: the workflow fails (nothing to compensate).
    let id2 = start(&f, "adm.doubt").await;
    let r = post(
        &f,
        &format!("/v1/workflows/{id2}/steps/call/resolve"),
        &k.operator,
        json!({ "reason": "exchange has no such order", "outcome": "failed" }),
    )
    .await;
    assert_ok(&r);
    f.harness.run_until_idle().await.unwrap();
    let r = get(&f, &format!("/v1/workflows/{id2}"), &k.viewer).await;
    assert_eq!(r.json["workflow"]["state"], "failed", "{}", r.text);
}

#[tokio::test]
async fn retry_runs_the_failed_step_again_and_cancel_stops_a_workflow() {
    let f = fixture().await;
    let k = &f.keys;
    let id = start(&f, "adm.flaky").await;
    let r = get(&f, &format!("/v1/workflows/{id}"), &k.viewer).await;
    assert_eq!(r.json["workflow"]["state"], "failed");

    let path = format!("/v1/workflows/{id}/retry");
    // Only from the failed step: completed steps never run twice.
    let r = post(
        &f,
        &path,
        &k.operator,
        json!({ "reason": "x", "step": "other" }),
    )
    .await;
    assert_problem(&r, 409, "conflict");
    assert_eq!(audit_count(&f, "workflow.retry").await, 0);

    f.flaky_ok.store(true, Ordering::SeqCst);
    let r = post(
        &f,
        &path,
        &k.operator,
        json!({ "reason": "fixed", "step": "only" }),
    )
    .await;
    assert_ok(&r);
    assert_eq!(r.json["workflow"]["state"], "running");
    assert_eq!(audit_count(&f, "workflow.retry").await, 1);
    f.harness.run_until_idle().await.unwrap();
    let r = get(&f, &format!("/v1/workflows/{id}"), &k.viewer).await;
    assert_eq!(r.json["workflow"]["state"], "completed");
    // A completed workflow can be neither retried nor cancelled.
    let r = post(&f, &path, &k.operator, why("again")).await;
    assert_problem(&r, 409, "conflict");
    let r = post(
        &f,
        &format!("/v1/workflows/{id}/cancel"),
        &k.operator,
        why("x"),
    )
    .await;
    assert_problem(&r, 409, "conflict");
    assert_eq!(audit_count(&f, "workflow.retry").await, 1);
    assert_eq!(audit_count(&f, "workflow.cancel").await, 0);

    // Cancelling a waiting workflow cancels its pending step jobs.
    let w = start(&f, "adm.wait").await;
    let r = post(
        &f,
        &format!("/v1/workflows/{w}/cancel"),
        &k.operator,
        why("stop"),
    )
    .await;
    assert_ok(&r);
    assert_eq!(r.json["workflow"]["state"], "cancelled");
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE workflow_id = $1
         AND state IN ('scheduled', 'available', 'retryable')",
    )
    .bind(w)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(pending, 0);
    assert_eq!(audit_count(&f, "workflow.cancel").await, 1);
}

#[tokio::test]
async fn workflow_pages_are_stable_and_hostile_filters_are_refused_or_literal() {
    let f = fixture().await;
    let k = &f.keys;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(start(&f, "adm.doubt").await);
    }
    ids.push(start(&f, "adm.flaky").await);

    // Pages of 3, oldest first; a workflow started meanwhile does not shift them.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/v1/workflows?kind=adm.doubt&sort=created_at&order=asc&limit=3".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let r = get(&f, &path, &k.viewer).await;
        assert_ok(&r);
        for item in r.json["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_string());
        }
        pages += 1;
        if pages == 1 {
            // Inserted after page 1 was read: it sorts last, so it shows up
            // once at the end and nothing repeats.
            ids.push(start(&f, "adm.doubt").await);
        }
        match r.json["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let expected: Vec<String> = ids
        .iter()
        .filter(|id| **id != ids[7])
        .map(|id| id.to_string())
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(pages, 3);

    // State filter.
    let r = get(&f, "/v1/workflows?state=failed", &k.viewer).await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 1);
    assert_eq!(r.json["items"][0]["kind"], "adm.flaky");

    // Hostile input: 400 or matched literally, never a 5xx, nothing changed.
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM workflows")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    for bad in [
        "/v1/workflows?sort=created_at;DROP%20TABLE%20workflows",
        "/v1/workflows?sort=kind",
        "/v1/workflows?order=desc,id",
        "/v1/workflows?state=failed'%20OR%20'1'='1",
        "/v1/workflows?cursor=%27%3B%20DROP%20TABLE%20workflows%3B%20--",
        "/v1/workflows?limit=0",
        "/v1/dead-letters?cursor=nope",
        "/v1/withdrawals/pending?cursor=e30",
        "/v1/dead-letters/jobs?cursor=abc",
    ] {
        let r = get(&f, bad, &k.viewer).await;
        assert_problem(&r, 400, "validation");
    }
    // A cursor from another sort order is refused.
    let r = get(&f, "/v1/workflows?limit=1", &k.viewer).await;
    let c = r.json["next_cursor"].as_str().unwrap().to_string();
    let r = get(
        &f,
        &format!("/v1/workflows?sort=updated_at&cursor={c}"),
        &k.viewer,
    )
    .await;
    assert_problem(&r, 400, "validation");
    for literal in [
        "/v1/workflows?kind=adm.doubt'%20OR%20'1'='1",
        "/v1/workflows?kind=%25",
        "/v1/dead-letters?topic=orders'%20OR%20'1'='1",
        "/v1/dead-letters/jobs?queue=q'--",
    ] {
        let r = get(&f, literal, &k.viewer).await;
        assert_ok(&r);
        assert_eq!(r.json["items"], json!([]), "{literal}");
    }
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM workflows")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(before, after);
}

// ------------------------------------------------------------------- cron

#[tokio::test]
async fn a_cron_trigger_starts_exactly_one_job_and_pause_resume_are_audited() {
    let f = fixture().await;
    let k = &f.keys;
    f.store
        .cron_upsert(
            &ScheduleDef::new("nightly", "0 3 * * *", "report.nightly")
                .args(json!({ "fmt": "pdf" })),
        )
        .await
        .unwrap();
    let r = get(&f, "/v1/cron", &k.viewer).await;
    assert_ok(&r);
    assert_eq!(r.json["schedules"][0]["name"], "nightly");
    assert_eq!(r.json["schedules"][0]["enabled"], true);

    let r = post(&f, "/v1/cron/nightly/trigger", &k.operator, why("rerun")).await;
    assert_ok(&r);
    let job_id: Uuid = r.json["job_id"].as_str().unwrap().parse().unwrap();
    let jobs: Vec<(Uuid, String, Value)> =
        sqlx::query_as("SELECT id, kind, args FROM jobs WHERE kind = 'report.nightly'")
            .fetch_all(&f.db.pool)
            .await
            .unwrap();
    assert_eq!(
        jobs,
        vec![(
            job_id,
            "report.nightly".to_string(),
            json!({ "fmt": "pdf" })
        )]
    );
    let ticks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM cron_ticks WHERE schedule = 'nightly' AND outcome = 'manual'",
    )
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(ticks, 1);
    assert_eq!(audit_count(&f, "cron.trigger").await, 1);
    let details: Value =
        sqlx::query_scalar("SELECT details FROM audit_log WHERE action = 'cron.trigger'")
            .fetch_one(&f.db.pool)
            .await
            .unwrap();
    assert_eq!(details["job_id"], json!(job_id));

    let r = post(
        &f,
        "/v1/cron/nightly/pause",
        &k.operator,
        why("maintenance"),
    )
    .await;
    assert_ok(&r);
    assert_eq!(r.json["schedule"]["enabled"], false);
    assert!(r.json["schedule"]["paused_at"].is_string());
    let r = post(&f, "/v1/cron/nightly/resume", &k.operator, why("done")).await;
    assert_ok(&r);
    assert_eq!(r.json["schedule"]["enabled"], true);
    assert_eq!(audit_count(&f, "cron.pause").await, 1);
    assert_eq!(audit_count(&f, "cron.resume").await, 1);

    let r = post(&f, "/v1/cron/nope/trigger", &k.operator, why("x")).await;
    assert_problem(&r, 404, "not-found");
    let r = post(
        &f,
        "/v1/cron/nope'%20OR%201=1--/pause",
        &k.operator,
        why("x"),
    )
    .await;
    assert_problem(&r, 404, "not-found");
    assert_eq!(audit_total(&f).await, 3);
}

// ----------------------------------------------------------- dead letters

#[tokio::test]
async fn a_dead_letter_is_redriven_once_through_the_outbox() {
    let f = fixture().await;
    let k = &f.keys;
    let first = dead_letter(&f, 10).await;
    let second = dead_letter(&f, 11).await;

    let r = get(&f, "/v1/dead-letters?limit=1", &k.viewer).await;
    assert_ok(&r);
    assert_eq!(r.json["items"][0]["id"], second, "newest first");
    let c = r.json["next_cursor"].as_str().unwrap().to_string();
    let r = get(
        &f,
        &format!("/v1/dead-letters?limit=1&cursor={c}"),
        &k.viewer,
    )
    .await;
    assert_eq!(r.json["items"][0]["id"], first);
    assert!(r.json["next_cursor"].is_null());

    let r = get(&f, &format!("/v1/dead-letters/{first}"), &k.viewer).await;
    assert_ok(&r);
    assert_eq!(r.json["payload"], r#"{"order":"o-1"}"#);
    assert_eq!(r.json["key"], "user-1");
    assert_eq!(r.json["error"], "cannot decode");
    let r = get(&f, "/v1/dead-letters/999999", &k.viewer).await;
    assert_problem(&r, 404, "not-found");

    let path = format!("/v1/dead-letters/{first}/redrive");
    let r = post(&f, &path, &k.operator, why("consumer fixed")).await;
    assert_ok(&r);
    let outbox_id: Uuid = r.json["outbox_id"].as_str().unwrap().parse().unwrap();
    let (topic, key, payload, headers): (String, Option<String>, Vec<u8>, Value) = sqlx::query_as(
        "SELECT topic, key, payload, headers FROM outbox WHERE id = $1 AND published_at IS NULL",
    )
    .bind(outbox_id)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (topic.as_str(), key.as_deref(), payload.as_slice()),
        ("orders", Some("user-1"), br#"{"order":"o-1"}"#.as_slice())
    );
    assert_eq!(headers["trace"], "t-1");
    assert_eq!(headers["ledgerflow-redrive-of"], first.to_string());

    // Twice is refused: one message re-published, one audit row.
    let r = post(&f, &path, &k.operator, why("again")).await;
    assert_problem(&r, 409, "conflict");
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(outbox, 1);
    assert_eq!(audit_count(&f, "dead_letter.redrive").await, 1);
    // Redriven ones leave the pending list.
    let r = get(&f, "/v1/dead-letters", &k.viewer).await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 1);
    let r = get(&f, "/v1/dead-letters?pending=false", &k.viewer).await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 2);
    let r = post(&f, "/v1/dead-letters/424242/redrive", &k.operator, why("x")).await;
    assert_problem(&r, 404, "not-found");
}

#[tokio::test]
async fn dead_jobs_are_listed_and_redriven_and_live_ones_are_not() {
    let f = fixture().await;
    let k = &f.keys;
    let insert = |kind: &'static str| {
        let store = f.store.clone();
        async move {
            store
                .job_insert(&NewJob::new(kind, json!({})).queue("q"))
                .await
                .unwrap()
                .id()
        }
    };
    let dead = insert("k.dead").await;
    let live = insert("k.live").await;
    {
        let mut conn = f.db.pool.acquire().await.unwrap();
        f.store
            .job_discard_in(&mut conn, dead, "poison")
            .await
            .unwrap();
    }
    let r = get(&f, "/v1/dead-letters/jobs", &k.viewer).await;
    assert_ok(&r);
    let items = r.json["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], dead.to_string());

    let r = post(
        &f,
        &format!("/v1/dead-letters/jobs/{live}/redrive"),
        &k.operator,
        why("x"),
    )
    .await;
    assert_problem(&r, 409, "conflict");
    let r = post(
        &f,
        &format!("/v1/dead-letters/jobs/{dead}/redrive"),
        &k.operator,
        why("fixed"),
    )
    .await;
    assert_ok(&r);
    assert_eq!(r.json["job"]["state"], "available");
    assert_eq!(
        f.store.job_get(dead).await.unwrap().unwrap().state,
        JobState::Available
    );
    assert_eq!(audit_count(&f, "dead_letter.job_redrive").await, 1);
    let r = post(
        &f,
        &format!("/v1/dead-letters/jobs/{dead}/redrive"),
        &k.operator,
        why("x"),
    )
    .await;
    assert_problem(&r, 409, "conflict");
    assert_eq!(audit_count(&f, "dead_letter.job_redrive").await, 1);

    // Eight operators redriving one dead job at once: it is revived once, with
    // one audit row; the others are told it is no longer a dead letter.
    let again = insert("k.dead2").await;
    {
        let mut conn = f.db.pool.acquire().await.unwrap();
        f.store
            .job_discard_in(&mut conn, again, "poison")
            .await
            .unwrap();
    }
    let path = format!("/v1/dead-letters/jobs/{again}/redrive");
    let replies =
        futures::future::join_all((0..8).map(|_| post(&f, &path, &k.operator, why("race")))).await;
    let ok = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(
        ok,
        1,
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_problem(r, 409, "conflict");
    }
    assert_eq!(audit_count(&f, "dead_letter.job_redrive").await, 2);
}

// -------------------------------------------------------------- approvals

#[tokio::test]
async fn four_eyes_refuses_the_requester_and_another_approver_approves_once() {
    let f = fixture().await;
    let k = &f.keys;
    let w = Uuid::now_v7();
    withdrawal(&f, w, Some(f.approver_id), "awaiting_approval").await;

    let r = get(&f, "/v1/withdrawals/pending", &k.viewer).await;
    assert_ok(&r);
    assert_eq!(r.json["items"][0]["id"], w.to_string());
    assert_eq!(r.json["items"][0]["amount"], "5000");
    assert_eq!(
        r.json["items"][0]["requested_by"],
        f.approver_id.to_string()
    );

    let path = format!("/v1/withdrawals/{w}/approve");
    let r = post(&f, &path, &k.approver, why("looks fine")).await;
    assert_problem(&r, 403, "four-eyes");
    let r = post(&f, &path, &k.operator, why("looks fine")).await;
    assert_problem(&r, 403, "forbidden");
    let status: String = sqlx::query_scalar("SELECT status FROM withdrawals WHERE id = $1")
        .bind(w)
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "awaiting_approval");
    assert_eq!(audit_count(&f, "withdrawal.approve").await, 0);

    let r = post(&f, &path, &k.approver2, why("checked the address")).await;
    assert_ok(&r);
    assert_eq!(r.json["changed"], true);
    let audit_id = r.json["audit_id"].as_str().unwrap().to_string();
    let (status, approver): (String, Uuid) =
        sqlx::query_as("SELECT status, approved_by FROM withdrawals WHERE id = $1")
            .bind(w)
            .fetch_one(&f.db.pool)
            .await
            .unwrap();
    assert_eq!(status, "approved");
    assert_ne!(approver, f.approver_id);
    let (id, reason): (Uuid, String) =
        sqlx::query_as("SELECT id, reason FROM audit_log WHERE action = 'withdrawal.approve'")
            .fetch_one(&f.db.pool)
            .await
            .unwrap();
    assert_eq!(
        (id.to_string(), reason.as_str()),
        (audit_id, "checked the address")
    );
    let signals: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM signals WHERE name = 'withdrawal.approved' AND correlation_key = $1",
    )
    .bind(w.to_string())
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(signals, 1);

    // Approving again changes nothing and writes nothing.
    let r = post(&f, &path, &k.approver2, why("again")).await;
    assert_ok(&r);
    assert_eq!(r.json["changed"], false);
    assert_eq!(audit_count(&f, "withdrawal.approve").await, 1);
    let r = get(&f, "/v1/withdrawals/pending", &k.viewer).await;
    assert_eq!(r.json["items"], json!([]));
    let r = post(
        &f,
        &format!("/v1/withdrawals/{}/approve", Uuid::now_v7()),
        &k.approver,
        why("x"),
    )
    .await;
    assert_problem(&r, 404, "not-found");
}

#[tokio::test]
async fn a_rejection_times_the_approval_wait_out_now() {
    let f = fixture().await;
    let k = &f.keys;
    // A workflow waiting for approval, and its withdrawal row (same id).
    let w = start(&f, "adm.wait").await;
    withdrawal(&f, w, None, "held").await;
    let path = format!("/v1/withdrawals/{w}/reject");
    // Not yet awaiting approval: refused, nothing written.
    let r = post(&f, &path, &k.approver, why("too large")).await;
    assert_problem(&r, 409, "conflict");
    sqlx::query("UPDATE withdrawals SET status = 'awaiting_approval' WHERE id = $1")
        .bind(w)
        .execute(&f.db.pool)
        .await
        .unwrap();

    let r = post(
        &f,
        &path,
        &k.approver,
        json!({ "reason": "address on a blocklist" }),
    )
    .await;
    assert_ok(&r);
    assert_eq!(r.json["decision"], "rejected");
    assert_eq!(audit_count(&f, "withdrawal.reject").await, 1);
    let (status, error): (String, String) =
        sqlx::query_as("SELECT status, error FROM withdrawals WHERE id = $1")
            .bind(w)
            .fetch_one(&f.db.pool)
            .await
            .unwrap();
    assert_eq!(status, "rejected");
    assert!(error.contains("address on a blocklist"), "{error}");
    // The wait's timeout is due now: the step runs with timed_out and fails.
    f.harness.run_until_idle().await.unwrap();
    let r = get(&f, &format!("/v1/workflows/{w}"), &k.viewer).await;
    assert_eq!(r.json["workflow"]["state"], "failed", "{}", r.text);
    // Rejected already: a second rejection and an approval are refused.
    let r = post(&f, &path, &k.approver, why("again")).await;
    assert_problem(&r, 409, "conflict");
    let r = post(
        &f,
        &format!("/v1/withdrawals/{w}/approve"),
        &k.approver2,
        why("x"),
    )
    .await;
    assert_problem(&r, 409, "conflict");
    assert_eq!(audit_count(&f, "withdrawal.reject").await, 1);
    assert_eq!(audit_count(&f, "withdrawal.approve").await, 0);
}

// ---------------------------------------------------------------- metrics

/// The value of the sample `series` (name with labels, as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_export_workflow_states_outbox_backlog_dead_letters_and_queue_wait() {
    let f = fixture().await;
    let _waiting = start(&f, "adm.wait").await;
    let _failed = start(&f, "adm.flaky").await;
    let _doubt = start(&f, "adm.doubt").await;
    dead_letter(&f, 7).await;
    {
        let mut conn = f.db.pool.acquire().await.unwrap();
        ledgerflow_engine::outbox::outbox_insert_in(
            &mut conn,
            &ledgerflow_engine::outbox::NewOutboxEvent {
                topic: "events",
                key: None,
                headers: None,
                payload: b"{}",
            },
        )
        .await
        .unwrap();
    }
    // A job due a minute ago and not picked up.
    let due = chrono::Utc::now() - chrono::Duration::seconds(60);
    f.store
        .job_insert(&NewJob::new("k", json!({})).queue("slow").run_at(due))
        .await
        .unwrap();

    let r = send(&f.admin, Method::GET, "/metrics", None, None).await;
    assert_ok(&r);
    let t = &r.text;
    assert_eq!(
        sample(t, r#"ledgerflow_workflows{state="waiting"}"#),
        Some(2.0),
        "{t}"
    );
    assert_eq!(
        sample(t, r#"ledgerflow_workflows{state="failed"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(t, r#"ledgerflow_workflows{state="compensating"}"#),
        Some(0.0)
    );
    // Finished history is not counted on every scrape.
    assert_eq!(
        sample(t, r#"ledgerflow_workflows{state="completed"}"#),
        None
    );
    assert_eq!(sample(t, "ledgerflow_outbox_unpublished"), Some(1.0));
    assert!(sample(t, "ledgerflow_outbox_oldest_unpublished_seconds").is_some_and(|s| s >= 0.0));
    assert_eq!(sample(t, "ledgerflow_dead_letters_pending"), Some(1.0));
    let wait = sample(
        t,
        r#"ledgerflow_queue_oldest_available_seconds{queue="slow"}"#,
    );
    assert!(
        wait.is_some_and(|s| (59.0..3600.0).contains(&s)),
        "{wait:?}"
    );

    // Published and redriven rows leave the backlog.
    sqlx::query("UPDATE outbox SET published_at = now()")
        .execute(&f.db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE dead_letters SET redriven_at = now()")
        .execute(&f.db.pool)
        .await
        .unwrap();
    let r = send(&f.admin, Method::GET, "/metrics", None, None).await;
    assert_eq!(sample(&r.text, "ledgerflow_outbox_unpublished"), Some(0.0));
    assert_eq!(
        sample(&r.text, "ledgerflow_outbox_oldest_unpublished_seconds"),
        Some(0.0)
    );
    assert_eq!(
        sample(&r.text, "ledgerflow_dead_letters_pending"),
        Some(0.0)
    );
}

#[tokio::test]
async fn metrics_export_the_consumer_lag_the_ingress_recorded() {
    use ledgerflow_engine::consumer_lag::PartitionLag;
    let f = fixture().await;
    let lag = |partition: i32, high: i64, position: i64| PartitionLag {
        group: "ingress".into(),
        topic: "exchange.events".into(),
        partition,
        high_watermark: high,
        position,
        lag: high - position,
    };
    f.store
        .consumer_lag_record(&[lag(0, 120, 100), lag(1, 7, 7)])
        .await
        .unwrap();
    // A partition measured long ago (its consumer is gone) is not exported.
    sqlx::query(
        "INSERT INTO kafka_consumer_lag (consumer_group, topic, \"partition\", high_watermark,
                                        \"position\", lag, measured_at)
         VALUES ('old', 'exchange.events', 0, 50, 0, 50, now() - interval '10 minutes')",
    )
    .execute(&f.db.pool)
    .await
    .unwrap();

    let r = send(&f.admin, Method::GET, "/metrics", None, None).await;
    assert_ok(&r);
    let series = |group: &str, partition: i32| {
        format!(
            r#"ledgerflow_kafka_consumer_lag{{group="{group}",partition="{partition}",topic="exchange.events"}}"#
        )
    };
    assert_eq!(sample(&r.text, &series("ingress", 0)), Some(20.0));
    assert_eq!(sample(&r.text, &series("ingress", 1)), Some(0.0));
    assert_eq!(sample(&r.text, &series("old", 0)), None);

    // A newer measurement overwrites the partition's row.
    f.store
        .consumer_lag_record(&[lag(0, 130, 130)])
        .await
        .unwrap();
    let r = send(&f.admin, Method::GET, "/metrics", None, None).await;
    assert_eq!(sample(&r.text, &series("ingress", 0)), Some(0.0));
}
