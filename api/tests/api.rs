//! The public and admin apps, in-process (`poem::test::TestClient`) against a
//! real Postgres (one cloned database per test): the authorization matrix,
//! audited mutations, bulk actions, hostile filters and bodies, and the ops
//! endpoints.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use futures::StreamExt;
use ledgerflow_api::{ApiConfig, AppState, ReadinessCheck, admin_app, public_app};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{JobId, JobState, NewJob, Outcome, Store};
use ledgerflow_payments::ledger;
use ledgerflow_payments::money::Amount;
use ledgerflow_payments::users::{self, AdminRole};
use poem::endpoint::BoxEndpoint;
use poem::http::{Method, StatusCode, header};
use poem::test::TestClient;
use poem::{Body, EndpointExt, Response};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

type App = TestClient<BoxEndpoint<'static, Response>>;

/// Everyone who can knock on a door.
struct Keys {
    user_a: String,
    user_b: String,
    expired: String,
    revoked: String,
    viewer: String,
    operator: String,
    approver: String,
    disabled: String,
}

struct Fixture {
    db: TestDb,
    store: Store,
    state: AppState,
    public: App,
    admin: App,
    keys: Keys,
    accounts_a: Vec<uuid::Uuid>,
}

async fn fixture() -> Fixture {
    fixture_with(ApiConfig::default()).await
}

async fn fixture_with(config: ApiConfig) -> Fixture {
    let db = TestDb::new().await.unwrap();
    let store = Store::new(db.pool.clone());
    let state = AppState::with_config(store.clone(), config).unwrap();
    let mut conn = db.pool.acquire().await.unwrap();

    let a = users::create_user(&mut conn, "a@example.com", "A")
        .await
        .unwrap();
    let b = users::create_user(&mut conn, "b@example.com", "B")
        .await
        .unwrap();
    let accts_a = ledger::ensure_user_accounts(&mut conn, a, &["USD", "BTC"])
        .await
        .unwrap();
    let accts_b = ledger::ensure_user_accounts(&mut conn, b, &["USD"])
        .await
        .unwrap();
    ledger::deposit(
        &mut conn,
        "dep:a:usd",
        accts_a[0].1,
        Amount::parse("250.5", 2).unwrap(),
    )
    .await
    .unwrap();
    ledger::deposit(
        &mut conn,
        "dep:a:btc",
        accts_a[1].1,
        Amount::parse("0.1", 8).unwrap(),
    )
    .await
    .unwrap();
    ledger::deposit(
        &mut conn,
        "dep:b:usd",
        accts_b[0].1,
        Amount::parse("7", 2).unwrap(),
    )
    .await
    .unwrap();

    let key = |k: users::PlaintextKey| k.expose_secret().to_string();
    let (_, user_a) = users::create_api_key(&mut conn, a, None).await.unwrap();
    let (_, user_b) = users::create_api_key(&mut conn, b, None).await.unwrap();
    let (_, expired) = users::create_api_key(&mut conn, a, Some(Duration::from_millis(1)))
        .await
        .unwrap();
    let (revoked_id, revoked) = users::create_api_key(&mut conn, a, None).await.unwrap();
    users::revoke_api_key(&mut conn, revoked_id).await.unwrap();
    let (_, viewer) = users::create_admin(&mut conn, "vera", AdminRole::Viewer)
        .await
        .unwrap();
    let (_, operator) = users::create_admin(&mut conn, "otto", AdminRole::Operator)
        .await
        .unwrap();
    let (_, approver) = users::create_admin(&mut conn, "anna", AdminRole::Approver)
        .await
        .unwrap();
    let (disabled_id, disabled) = users::create_admin(&mut conn, "dora", AdminRole::Operator)
        .await
        .unwrap();
    users::disable_admin(&mut conn, disabled_id).await.unwrap();
    drop(conn);
    tokio::time::sleep(Duration::from_millis(5)).await; // the expired key expires

    Fixture {
        public: TestClient::new(public_app(state.clone()).boxed()),
        admin: TestClient::new(admin_app(state.clone()).boxed()),
        keys: Keys {
            user_a: key(user_a),
            user_b: key(user_b),
            expired: key(expired),
            revoked: key(revoked),
            viewer: key(viewer),
            operator: key(operator),
            approver: key(approver),
            disabled: key(disabled),
        },
        accounts_a: accts_a.iter().map(|(_, id)| id.0).collect(),
        db,
        store,
        state,
    }
}

struct Reply {
    status: StatusCode,
    content_type: String,
    www_authenticate: Option<String>,
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
    into_reply(req.send().await.0).await
}

async fn into_reply(resp: Response) -> Reply {
    let status = resp.status();
    let hdr = |name| {
        resp.headers()
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = hdr(header::CONTENT_TYPE).unwrap_or_default();
    let www_authenticate = hdr(header::WWW_AUTHENTICATE);
    let text = resp.into_body().into_string().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        content_type,
        www_authenticate,
        text,
        json,
    }
}

fn assert_problem(r: &Reply, status: u16, slug: &str) {
    assert_eq!(r.status.as_u16(), status, "body: {}", r.text);
    assert_eq!(
        r.content_type, "application/problem+json",
        "body: {}",
        r.text
    );
    assert_eq!(r.json["status"], status);
    assert_eq!(
        r.json["type"],
        format!("https://ledgerflow.dev/problems/{slug}"),
        "body: {}",
        r.text
    );
    assert!(r.json["title"].is_string() && r.json["detail"].is_string());
    if status == 401 {
        assert_eq!(r.www_authenticate.as_deref(), Some("Bearer"));
    }
}

async fn insert(store: &Store, queue: &str, kind: &str, args: Value) -> JobId {
    store
        .job_insert(&NewJob::new(kind, args).queue(queue))
        .await
        .unwrap()
        .id()
}

async fn state_of(store: &Store, id: JobId) -> JobState {
    store.job_get(id).await.unwrap().unwrap().state
}

async fn audit_rows(f: &Fixture) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&f.db.pool)
        .await
        .unwrap()
}

async fn job_count(f: &Fixture) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&f.db.pool)
        .await
        .unwrap()
}

/// Claims the next job of `queue` (it becomes `running`).
async fn claim(store: &Store, queue: &str) -> ledgerflow_engine::Lease {
    let owner: Arc<str> = Arc::from("test-worker");
    let mut claimed = store.job_claim(queue, &owner, 1).await.unwrap();
    claimed.pop().unwrap().lease
}

fn reason() -> Option<Value> {
    Some(json!({ "reason": "test: operator action" }))
}

// --------------------------------------------------------------- ops

#[tokio::test]
async fn ops_endpoints_work() {
    let f = fixture().await;
    insert(&f.store, "mail", "email.send", json!({})).await;

    let r = send(&f.public, Method::GET, "/healthcheck", None, None).await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::OK, "ok"));
    let r = send(&f.admin, Method::GET, "/healthcheck", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(&f.admin, Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::OK);

    let r = send(&f.public, Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["checks"]["postgres"], "ok");

    // Some traffic, then the scrape shows it, by route template.
    let path = format!("/v1/jobs/{}", uuid::Uuid::now_v7());
    send(&f.admin, Method::GET, &path, Some(&f.keys.viewer), None).await;
    // Issue 12 (5): queue names, states and volumes are not for the
    // internet: the public listener serves no metrics; the admin one does
    // (and the binary's ops port).
    let r = send(&f.public, Method::GET, "/metrics", None, None).await;
    assert_problem(&r, 404, "not-found");
    assert!(!r.text.contains("ledgerflow_queue_jobs"));
    let r = send(&f.admin, Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type.starts_with("text/plain"));
    assert!(
        r.text
            .contains(r#"ledgerflow_queue_jobs{queue="mail",state="available"} 1"#),
        "{}",
        r.text
    );
    assert!(
        r.text.contains(r#"http_requests_total{listener="admin",method="GET",route="/v1/jobs/{id}",status="404"} 1"#),
        "{}",
        r.text
    );
    assert!(r.text.contains(r#"route="/readyz""#));
    assert!(r.text.contains("http_request_duration_seconds_bucket"));
    assert!(r.text.contains("ledgerflow_db_pool_connections"));
    assert!(!r.text.contains(&path), "raw paths never become labels");

    for app in [&f.public, &f.admin] {
        let r = send(app, Method::GET, "/openapi.json", None, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.json["openapi"].is_string());
        let r = send(app, Method::GET, "/docs", None, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.text.contains("swagger"),
            "{}",
            &r.text[..r.text.len().min(200)]
        );
    }
}

struct Down;
impl ReadinessCheck for Down {
    fn name(&self) -> &str {
        "kafka"
    }
    fn check(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Err("broker 10.0.0.1:9092 refused".to_string()) })
    }
}

#[tokio::test]
async fn readyz_fails_when_a_check_fails_without_leaking_why() {
    let f = fixture().await;
    let app = TestClient::new(public_app(f.state.clone().with_check(Arc::new(Down))).boxed());
    let r = send(&app, Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json["checks"]["postgres"], "ok");
    assert_eq!(r.json["checks"]["kafka"], "unavailable");
    assert!(!r.text.contains("10.0.0.1"));
}

#[tokio::test]
async fn serve_answers_on_real_sockets_and_shuts_down() {
    let f = fixture().await;
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (pa, aa) = (public.local_addr().unwrap(), admin.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ledgerflow_api::serve_listeners(
        public,
        admin,
        f.state.clone(),
        async {
            let _ = rx.await;
        },
    ));
    for addr in [pa, aa] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthcheck HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("ok"), "{out}");
    }
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

// ------------------------------------------------------- authorization

#[tokio::test]
async fn authorization_matrix() {
    let f = fixture().await;
    let k = &f.keys;
    // Targets so that every operator call can succeed.
    let job = insert(&f.store, "q", "k", json!({})).await;
    let cancelled = insert(&f.store, "q", "k", json!({})).await;
    let discardable = insert(&f.store, "q", "k", json!({})).await;
    {
        let mut conn = f.db.pool.acquire().await.unwrap();
        f.store
            .job_cancel_in(&mut conn, cancelled, "setup")
            .await
            .unwrap();
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Who {
        Anonymous,
        UserA,
        UserB,
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
            UserA => Some(&k.user_a),
            UserB => Some(&k.user_b),
            Expired => Some(&k.expired),
            Revoked => Some(&k.revoked),
            Viewer => Some(&k.viewer),
            Operator => Some(&k.operator),
            Approver => Some(&k.approver),
            Disabled => Some(&k.disabled),
        }
    };
    let everyone = [
        Anonymous, UserA, UserB, Expired, Revoked, Viewer, Operator, Approver, Disabled,
    ];

    // Public: only live user keys.
    for who in everyone {
        let r = send(
            &f.public,
            Method::GET,
            "/v1/accounts/me/balances",
            token(who),
            None,
        )
        .await;
        match who {
            UserA | UserB => assert_eq!(r.status, StatusCode::OK, "{who:?}: {}", r.text),
            _ => assert_problem(&r, 401, "unauthorized"),
        }
    }

    // Admin reads: every live admin role; users and dead credentials get 401.
    let reads = [
        "/v1/jobs".to_string(),
        format!("/v1/jobs/{job}"),
        "/v1/queues".to_string(),
        "/v1/audit".to_string(),
    ];
    for path in &reads {
        for who in everyone {
            let r = send(&f.admin, Method::GET, path, token(who), None).await;
            match who {
                Viewer | Operator | Approver => {
                    assert_eq!(r.status, StatusCode::OK, "{who:?} {path}: {}", r.text)
                }
                _ => assert_problem(&r, 401, "unauthorized"),
            }
        }
    }

    // Admin mutations: operator only; viewer and approver 403.
    let mutations: Vec<(String, Value)> = vec![
        (
            format!("/v1/jobs/{cancelled}/retry"),
            json!({"reason": "matrix"}),
        ),
        (
            format!("/v1/jobs/{job}/cancel"),
            json!({"reason": "matrix"}),
        ),
        (
            format!("/v1/jobs/{discardable}/discard"),
            json!({"reason": "matrix"}),
        ),
        (
            "/v1/jobs/bulk-retry".to_string(),
            json!({"filter": {"queue": "none"}, "dry_run": true}),
        ),
        (
            "/v1/jobs/bulk-cancel".to_string(),
            json!({"filter": {"queue": "none"}, "dry_run": true}),
        ),
        (
            "/v1/queues/q/pause".to_string(),
            json!({"reason": "matrix"}),
        ),
        (
            "/v1/queues/q/resume".to_string(),
            json!({"reason": "matrix"}),
        ),
    ];
    for (path, body) in &mutations {
        for who in everyone {
            if who == Operator {
                continue; // last, once, so the targets are still valid for it
            }
            let r = send(&f.admin, Method::POST, path, token(who), Some(body.clone())).await;
            match who {
                Viewer | Approver => assert_problem(&r, 403, "forbidden"),
                _ => assert_problem(&r, 401, "unauthorized"),
            }
        }
        let r = send(
            &f.admin,
            Method::POST,
            path,
            token(Operator),
            Some(body.clone()),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "operator {path}: {}", r.text);
    }
    // Refused attempts changed nothing: only the operator's 5 real mutations
    // (the two dry runs are not mutations) are in the log.
    assert_eq!(audit_rows(&f).await, 5);

    // An admin credential is not a user key, and the public app has no admin routes.
    let r = send(&f.public, Method::GET, "/v1/jobs", token(Operator), None).await;
    assert_problem(&r, 404, "not-found");
    // Malformed Authorization headers.
    for value in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "lfa_x_y"] {
        let r = f
            .admin
            .get("/v1/jobs")
            .header(header::AUTHORIZATION, value)
            .send()
            .await;
        assert_problem(&into_reply(r.0).await, 401, "unauthorized");
    }
}

#[tokio::test]
async fn users_see_only_their_own_balances_as_strings() {
    let f = fixture().await;
    let r = send(
        &f.public,
        Method::GET,
        "/v1/accounts/me/balances",
        Some(&f.keys.user_a),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let balances = r.json["balances"].as_array().unwrap();
    assert_eq!(balances.len(), 2);
    assert_eq!(balances[0]["asset"], "BTC");
    assert_eq!(balances[0]["balance"], "0.10000000");
    assert_eq!(balances[0]["available"], "0.10000000");
    assert_eq!(balances[1]["asset"], "USD");
    assert_eq!(balances[1]["balance"], "250.50");
    assert_eq!(balances[1]["held"], "0.00");
    for b in balances {
        let id: uuid::Uuid = b["account_id"].as_str().unwrap().parse().unwrap();
        assert!(f.accounts_a.contains(&id));
    }
    let r = send(
        &f.public,
        Method::GET,
        "/v1/accounts/me/balances",
        Some(&f.keys.user_b),
        None,
    )
    .await;
    let balances = r.json["balances"].as_array().unwrap();
    assert_eq!(balances.len(), 1);
    assert_eq!(balances[0]["balance"], "7.00");
    for b in balances {
        let id: uuid::Uuid = b["account_id"].as_str().unwrap().parse().unwrap();
        assert!(!f.accounts_a.contains(&id));
    }
}

// ------------------------------------------------------------- audit

#[tokio::test]
async fn a_mutation_writes_exactly_one_audit_row_and_a_refused_one_none() {
    let f = fixture().await;
    let op = Some(f.keys.operator.as_str());
    let id = insert(&f.store, "q", "k", json!({})).await;

    // Cancel: job cancelled + one audit row with who/what/why.
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/jobs/{id}/cancel"),
        op,
        Some(json!({"reason": "  customer asked  "})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["job"]["state"], "cancelled");
    assert_eq!(state_of(&f.store, id).await, JobState::Cancelled);
    let row: (String, String, String, String, String, String, Value) = sqlx::query_as(
        "SELECT admin_name, admin_role, action, target_type, target_id, reason, details FROM audit_log",
    )
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (
            row.0.as_str(),
            row.1.as_str(),
            row.2.as_str(),
            row.3.as_str()
        ),
        ("otto", "operator", "job.cancel", "job")
    );
    assert_eq!(row.4, id.to_string());
    assert_eq!(row.5, "customer asked");
    assert_eq!(row.6["state_after"], "cancelled");
    assert_eq!(r.json["audit_id"].as_str().unwrap().len(), 36);

    // Cancelling again is a conflict: 409, nothing written.
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/jobs/{id}/cancel"),
        op,
        reason(),
    )
    .await;
    assert_problem(&r, 409, "conflict");
    assert_eq!(audit_rows(&f).await, 1);

    // Retry of a running job: 409, job still running, no audit row.
    let running = insert(&f.store, "busy", "k", json!({})).await;
    let lease = claim(&f.store, "busy").await;
    assert_eq!(lease.job_id, running);
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/jobs/{running}/retry"),
        op,
        reason(),
    )
    .await;
    assert_problem(&r, 409, "conflict");
    assert_eq!(state_of(&f.store, running).await, JobState::Running);
    assert_eq!(audit_rows(&f).await, 1);

    // Unknown job: 404, nothing written.
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/jobs/{}/retry", uuid::Uuid::now_v7()),
        op,
        reason(),
    )
    .await;
    assert_problem(&r, 404, "not-found");

    // Missing, blank or oversized reason: 400, nothing changed.
    for body in [
        json!({}),
        json!({"reason": ""}),
        json!({"reason": " \n\t"}),
        json!({"reason": "x".repeat(1001)}),
    ] {
        let r = send(
            &f.admin,
            Method::POST,
            &format!("/v1/jobs/{id}/retry"),
            op,
            Some(body),
        )
        .await;
        assert_problem(&r, 400, "validation");
    }
    assert_eq!(state_of(&f.store, id).await, JobState::Cancelled);
    assert_eq!(audit_rows(&f).await, 1);

    // Retry it for real, then the audit log lists both, newest first.
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/jobs/{id}/retry"),
        op,
        reason(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(state_of(&f.store, id).await, JobState::Available);
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/audit",
        Some(&f.keys.viewer),
        None,
    )
    .await;
    let items = r.json["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["action"], "job.retry");
    assert_eq!(items[1]["action"], "job.cancel");
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/audit?limit=1&action=job.cancel",
        Some(&f.keys.viewer),
        None,
    )
    .await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 1);
    assert!(r.json["next_cursor"].is_null());

    // Queue pause/resume, audited too (a queue exists once it has a job).
    insert(&f.store, "mail", "email.send", json!({})).await;
    let r = send(
        &f.admin,
        Method::POST,
        "/v1/queues/mail/pause",
        op,
        reason(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(f.store.queue_is_paused("mail").await.unwrap());
    let r = send(&f.admin, Method::GET, "/v1/queues", op, None).await;
    let mail = r.json["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "mail")
        .cloned()
        .unwrap();
    assert_eq!(mail["paused"], true);
    let r = send(
        &f.admin,
        Method::POST,
        "/v1/queues/mail/resume",
        op,
        reason(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!f.store.queue_is_paused("mail").await.unwrap());
    assert_eq!(audit_rows(&f).await, 4);

    // Issue 12 (5): a queue that does not exist is a 404, and neither
    // created, paused nor audited.
    for action in ["pause", "resume"] {
        let r = send(
            &f.admin,
            Method::POST,
            &format!("/v1/queues/no-such-queue/{action}"),
            op,
            reason(),
        )
        .await;
        assert_problem(&r, 404, "not-found");
    }
    assert!(!f.store.queue_is_paused("no-such-queue").await.unwrap());
    let r = send(&f.admin, Method::GET, "/v1/queues", op, None).await;
    assert!(
        !r.json["queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == "no-such-queue"),
        "{}",
        r.text
    );
    assert_eq!(audit_rows(&f).await, 4);

    // The log is append-only.
    let e = sqlx::query("DELETE FROM audit_log")
        .execute(&f.db.pool)
        .await;
    assert!(e.is_err());
}

#[tokio::test]
async fn the_change_and_its_audit_row_commit_together() {
    let f = fixture().await;
    let id = insert(&f.store, "q", "k", json!({})).await;
    // Make every audit insert fail: the change must roll back with it, and
    // the client must see a generic 500, not the database's words.
    sqlx::raw_sql(
        "CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'secret internal detail: audit_log is broken'; END $$;
         CREATE TRIGGER test_fail BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION test_fail();",
    )
    .execute(&f.db.pool)
    .await
    .unwrap();
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/jobs/{id}/cancel"),
        Some(&f.keys.operator),
        reason(),
    )
    .await;
    assert_problem(&r, 500, "internal");
    assert!(
        !r.text.contains("secret") && !r.text.contains("audit_log"),
        "{}",
        r.text
    );
    assert_eq!(state_of(&f.store, id).await, JobState::Available);

    let r = send(
        &f.admin,
        Method::POST,
        "/v1/queues/q/pause",
        Some(&f.keys.operator),
        reason(),
    )
    .await;
    assert_problem(&r, 500, "internal");
    assert!(!f.store.queue_is_paused("q").await.unwrap());
}

// -------------------------------------------------------------- bulk

#[tokio::test]
async fn bulk_retry_dry_run_counts_without_changing_anything() {
    let f = fixture().await;
    let op = Some(f.keys.operator.as_str());
    let mut cancelled = Vec::new();
    {
        let mut conn = f.db.pool.acquire().await.unwrap();
        for i in 0..3 {
            let id = insert(&f.store, "bulk", "report", json!({"n": i})).await;
            f.store.job_cancel_in(&mut conn, id, "setup").await.unwrap();
            cancelled.push(id);
        }
    }
    let other_queue = insert(&f.store, "other", "report", json!({})).await;
    {
        let mut conn = f.db.pool.acquire().await.unwrap();
        f.store
            .job_cancel_in(&mut conn, other_queue, "setup")
            .await
            .unwrap();
    }
    insert(&f.store, "bulk", "report", json!({})).await;
    let running = claim(&f.store, "bulk").await.job_id;

    let dry = json!({"filter": {"queue": "bulk"}, "dry_run": true});
    let r = send(&f.admin, Method::POST, "/v1/jobs/bulk-retry", op, Some(dry)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["count"], 3);
    assert_eq!(r.json["dry_run"], true);
    for id in &cancelled {
        assert_eq!(state_of(&f.store, *id).await, JobState::Cancelled);
    }
    assert_eq!(audit_rows(&f).await, 0);

    // States narrow the selection; a state the action can't apply to matches nothing.
    let r = send(
        &f.admin,
        Method::POST,
        "/v1/jobs/bulk-retry",
        op,
        Some(json!({"filter": {"queue": "bulk", "states": ["running"]}, "dry_run": true})),
    )
    .await;
    assert_eq!(r.json["count"], 0);

    // A real run needs a reason.
    let r = send(
        &f.admin,
        Method::POST,
        "/v1/jobs/bulk-retry",
        op,
        Some(json!({"filter": {"queue": "bulk"}})),
    )
    .await;
    assert_problem(&r, 400, "validation");

    let r = send(
        &f.admin,
        Method::POST,
        "/v1/jobs/bulk-retry",
        op,
        Some(json!({"filter": {"queue": "bulk"}, "reason": "provider back up"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["count"], 3);
    for id in &cancelled {
        assert_eq!(state_of(&f.store, *id).await, JobState::Available);
    }
    assert_eq!(state_of(&f.store, other_queue).await, JobState::Cancelled);
    assert_eq!(state_of(&f.store, running).await, JobState::Running);
    assert_eq!(audit_rows(&f).await, 1);
    let details: Value = sqlx::query_scalar("SELECT details FROM audit_log")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(details["count"], 3);
    assert_eq!(details["filter"]["queue"], "bulk");

    // Bulk cancel takes the running one too (its lease is revoked).
    let r = send(
        &f.admin,
        Method::POST,
        "/v1/jobs/bulk-cancel",
        op,
        Some(json!({"filter": {"queue": "bulk"}, "reason": "drain"})),
    )
    .await;
    assert_eq!(r.json["count"], 4, "{}", r.text);
    assert_eq!(state_of(&f.store, running).await, JobState::Cancelled);
    assert_eq!(audit_rows(&f).await, 2);
}

// ----------------------------------------------------- listing & hostile input

#[tokio::test]
async fn listing_filters_sorts_and_paginates() {
    let f = fixture().await;
    let v = Some(f.keys.viewer.as_str());
    let mut ids = Vec::new();
    for i in 0..5 {
        let job = NewJob::new("report", json!({"n": i}))
            .queue("pages")
            .priority(i16::try_from(i % 2).unwrap());
        ids.push(f.store.job_insert(&job).await.unwrap().id());
    }
    insert(
        &f.store,
        "elsewhere",
        "email.send",
        json!({"note": "50% off"}),
    )
    .await;
    insert(
        &f.store,
        "elsewhere",
        "email.send",
        json!({"note": "500 off"}),
    )
    .await;

    // Walk every page, newest first.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/jobs?queue=pages&limit=2".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let r = send(&f.admin, Method::GET, &path, v, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        for item in r.json["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap());
        }
        match r.json["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    // Ascending by priority, paged: priority 0 ones first, each group by id.
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/jobs?queue=pages&sort=priority&order=asc&limit=3",
        v,
        None,
    )
    .await;
    let items = r.json["items"].as_array().unwrap();
    assert_eq!(
        items
            .iter()
            .map(|j| j["priority"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 0, 0]
    );
    let c = r.json["next_cursor"].as_str().unwrap().to_string();
    let r = send(
        &f.admin,
        Method::GET,
        &format!("/v1/jobs?queue=pages&sort=priority&order=asc&limit=3&cursor={c}"),
        v,
        None,
    )
    .await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 2);
    // A cursor from another order is refused.
    let r = send(
        &f.admin,
        Method::GET,
        &format!("/v1/jobs?queue=pages&limit=3&cursor={c}"),
        v,
        None,
    )
    .await;
    assert_problem(&r, 400, "validation");

    // State and kind filters; `%` in a search is literal.
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/jobs?state=available,retryable&kind=email.send",
        v,
        None,
    )
    .await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 2);
    let r = send(&f.admin, Method::GET, "/v1/jobs?q=0%25%20off", v, None).await;
    let items = r.json["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", r.text);
    assert_eq!(items[0]["args"]["note"], "50% off");
    let r = send(&f.admin, Method::GET, "/v1/jobs?q=5_0", v, None).await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 0);

    // Created-at range.
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/jobs?created_after=2100-01-01T00:00:00Z",
        v,
        None,
    )
    .await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 0);
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/jobs?created_after=2100-01-01T00:00:00Z&created_before=2000-01-01T00:00:00Z",
        v,
        None,
    )
    .await;
    assert_problem(&r, 400, "validation");

    // Detail with attempts.
    let lease = claim(&f.store, "elsewhere").await;
    f.store
        .job_finish(&lease, &Outcome::retry("smtp timeout"))
        .await
        .unwrap();
    let r = send(
        &f.admin,
        Method::GET,
        &format!("/v1/jobs/{}", lease.job_id),
        v,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["job"]["state"], "retryable");
    let attempts = r.json["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["outcome"], "retry");
    assert_eq!(attempts[0]["error"], "smtp timeout");
    let r = send(&f.admin, Method::GET, "/v1/jobs/not-a-uuid", v, None).await;
    assert_problem(&r, 400, "validation");
}

#[tokio::test]
async fn injection_strings_are_refused_or_literal_and_change_nothing() {
    let f = fixture().await;
    let v = Some(f.keys.viewer.as_str());
    for i in 0..3 {
        insert(&f.store, "q", "k", json!({"i": i})).await;
    }
    // A queue whose name is an injection string (pausing it below must
    // treat the name literally; an unknown queue would be a 404).
    insert(&f.store, "q'; DROP TABLE queues; --", "k", json!({})).await;
    let before = job_count(&f).await;

    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    // Treated literally: 200, nothing matches.
    for (param, value) in [
        ("q", "'; DROP TABLE jobs; --"),
        ("q", "%' OR '1'='1"),
        ("queue", "q' OR '1'='1"),
        ("kind", "k'); DELETE FROM jobs; --"),
    ] {
        let r = send(
            &f.admin,
            Method::GET,
            &format!("/v1/jobs?{param}={}", enc(value)),
            v,
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{param}={value}: {}", r.text);
        assert_eq!(
            r.json["items"].as_array().unwrap().len(),
            0,
            "{param}={value}"
        );
    }
    // Refused: 400 problems.
    for (param, value) in [
        ("state", "running' OR '1'='1"),
        ("sort", "id; DELETE FROM jobs"),
        ("sort", "created_at DESC, (SELECT 1)"),
        ("order", "desc; DROP TABLE jobs"),
        ("cursor", "'; DROP TABLE jobs; --"),
        ("limit", "1; DROP TABLE jobs"),
        ("limit", "100000"),
        ("created_after", "now()"),
    ] {
        let r = send(
            &f.admin,
            Method::GET,
            &format!("/v1/jobs?{param}={}", enc(value)),
            v,
            None,
        )
        .await;
        assert_problem(&r, 400, "validation");
        assert!(
            !r.text.to_lowercase().contains("syntax error"),
            "{}",
            r.text
        );
    }
    // Bulk filters too.
    let op = Some(f.keys.operator.as_str());
    let r = send(&f.admin, Method::POST, "/v1/jobs/bulk-cancel", op,
        Some(json!({"filter": {"queue": "q' OR '1'='1", "q": "'; DROP TABLE jobs; --"}, "reason": "x"}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["count"], 0);
    let r = send(
        &f.admin,
        Method::POST,
        "/v1/jobs/bulk-cancel",
        op,
        Some(json!({"filter": {"states": ["available' OR '1'='1"]}, "reason": "x"})),
    )
    .await;
    assert_problem(&r, 400, "validation");
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/queues/{}/pause", enc("q'; DROP TABLE queues; --")),
        op,
        reason(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a queue name is just a name: {}",
        r.text
    );

    assert_eq!(job_count(&f).await, before);
    let available: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'available'")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(available, before);
    assert!(!f.store.queue_is_paused("q").await.unwrap());
}

#[tokio::test]
async fn bad_bodies_get_problems() {
    let f = fixture_with(ApiConfig {
        request_timeout: Duration::from_millis(500),
        ..ApiConfig::default()
    })
    .await;
    let id = insert(&f.store, "q", "k", json!({})).await;
    let path = format!("/v1/jobs/{id}/cancel");
    let auth = format!("Bearer {}", f.keys.operator);
    let post = |body: Body, ct: Option<&'static str>| {
        let mut req = f
            .admin
            .post(&path)
            .header(header::AUTHORIZATION, auth.clone())
            .body(body);
        if let Some(ct) = ct {
            req = req.content_type(ct);
        }
        req
    };

    // Malformed JSON, wrong types, wrong shapes, empty: 400.
    for body in [
        "{\"reason\": ",
        "{\"reason\": 5}",
        "[\"reason\"]",
        "null",
        "",
        "{\"reason\": \"\\ud800\"}",
    ] {
        let r = into_reply(
            post(
                Body::from_string(body.to_string()),
                Some("application/json"),
            )
            .send()
            .await
            .0,
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body:?}: {}", r.text);
        assert_eq!(r.content_type, "application/problem+json");
    }
    // Not JSON at all.
    let r = into_reply(
        post(
            Body::from_string("reason=x".into()),
            Some("application/x-www-form-urlencoded"),
        )
        .send()
        .await
        .0,
    )
    .await;
    assert!(r.status.is_client_error(), "{}", r.status);
    assert_eq!(r.content_type, "application/problem+json");

    // 10 MB with Content-Length: 413.
    let big = vec![b' '; 10 * 1024 * 1024];
    let r = into_reply(
        post(Body::from(big.clone()), Some("application/json"))
            .send()
            .await
            .0,
    )
    .await;
    assert_problem(&r, 413, "payload-too-large");

    // 10 MB streamed without Content-Length: 413 as well.
    let chunks =
        futures::stream::iter((0..160).map(|_| Ok::<_, std::io::Error>(bytes_of(64 * 1024))));
    let r = into_reply(
        post(Body::from_bytes_stream(chunks), Some("application/json"))
            .send()
            .await
            .0,
    )
    .await;
    assert_problem(&r, 413, "payload-too-large");

    // A body that stalls: the request times out with a problem.
    let stalled = futures::stream::iter([Ok::<_, std::io::Error>(bytes_of(10))])
        .chain(futures::stream::pending());
    let r = into_reply(
        post(Body::from_bytes_stream(stalled), Some("application/json"))
            .send()
            .await
            .0,
    )
    .await;
    assert_problem(&r, 503, "timeout");

    assert_eq!(state_of(&f.store, id).await, JobState::Available);
    assert_eq!(audit_rows(&f).await, 0);

    // Unknown routes and methods are problems too.
    let r = send(&f.admin, Method::GET, "/nope", None, None).await;
    assert_problem(&r, 404, "not-found");
    let r = send(
        &f.public,
        Method::DELETE,
        "/v1/accounts/me/balances",
        Some(&f.keys.user_a),
        None,
    )
    .await;
    assert_problem(&r, 405, "method-not-allowed");
}

fn bytes_of(n: usize) -> Vec<u8> {
    vec![b' '; n]
}

/// `POST` of a raw JSON text as the bearer of `token`.
async fn post_raw(app: &App, path: &str, token: &str, body: &str) -> Reply {
    let resp = app
        .post(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .content_type("application/json")
        .body(body.to_string())
        .send()
        .await
        .0;
    into_reply(resp).await
}

/// Issue 12 (2): U+0000 and other control characters in any admin text —
/// list filters, reasons, queue names, bulk filters — are 400 problems,
/// never 500s, and change nothing; prose reasons keep their line breaks.
#[tokio::test]
async fn control_characters_in_admin_text_are_400_and_change_nothing() {
    let f = fixture().await;
    let v = Some(f.keys.viewer.as_str());
    let op = Some(f.keys.operator.as_str());
    let id = insert(&f.store, "q", "k", json!({})).await;
    for path in [
        "/v1/jobs?q=%00",
        "/v1/jobs?q=a%07b",
        "/v1/jobs?queue=%00",
        "/v1/jobs?kind=k%00",
        "/v1/jobs?q=%C2%85",
        "/v1/audit?action=%00",
        "/v1/audit?target_id=%1B%5B31m",
        "/v1/workflows?kind=%00",
        "/v1/dead-letters/jobs?queue=%00",
    ] {
        let r = send(&f.admin, Method::GET, path, v, None).await;
        assert_problem(&r, 400, "validation");
    }
    // Bidi controls in a filter arrive percent-encoded as UTF-8: refused by
    // the field's check, not the URI's.
    let r = send(&f.admin, Method::GET, "/v1/jobs?queue=q%E2%80%AE", v, None).await;
    assert_problem(&r, 400, "validation");

    let cancel = format!("/v1/jobs/{id}/cancel");
    for why in ["a\u{0}b", "bell\u{7}", "esc\u{1b}[2J", "rlo\u{202e}txt"] {
        let r = send(
            &f.admin,
            Method::POST,
            &cancel,
            op,
            Some(json!({ "reason": why })),
        )
        .await;
        assert_problem(&r, 400, "validation");
    }
    for path in ["/v1/queues/a%00b/pause", "/v1/queues/q%E2%80%AE/pause"] {
        let r = send(&f.admin, Method::POST, path, op, reason()).await;
        assert_problem(&r, 400, "validation");
    }
    for filter in [
        json!({"queue": "q\u{0}"}),
        json!({"q": "a\u{1}"}),
        json!({"kind": "k\u{200b}"}),
    ] {
        let r = send(
            &f.admin,
            Method::POST,
            "/v1/jobs/bulk-cancel",
            op,
            Some(json!({ "filter": filter, "reason": "x" })),
        )
        .await;
        assert_problem(&r, 400, "validation");
    }
    // Duplicate keys: which reason would the audit log keep?
    let r = post_raw(
        &f.admin,
        &cancel,
        &f.keys.operator,
        r#"{"reason":"shown to the approver","reason":"kept"}"#,
    )
    .await;
    assert_problem(&r, 400, "validation");
    assert_eq!(state_of(&f.store, id).await, JobState::Available);
    assert_eq!(audit_rows(&f).await, 0);

    // Prose may span lines.
    let r = send(
        &f.admin,
        Method::POST,
        &cancel,
        op,
        Some(json!({ "reason": "line one\nline two" })),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(audit_rows(&f).await, 1);
}

/// A value Postgres itself refuses (SQLSTATE class 22) is a 400 without
/// the database's text, not a 500 — the backstop behind input validation.
#[tokio::test]
async fn values_the_database_refuses_are_400_without_internals() {
    let f = fixture().await;
    let e = sqlx::query("SELECT $1::text")
        .bind("a\u{0}b")
        .execute(&f.db.pool)
        .await
        .unwrap_err();
    let p = ledgerflow_api::Error::from(e).problem();
    assert_eq!(p.status, 400);
    assert!(
        !p.detail.contains("0x00") && !p.detail.contains("UTF8"),
        "{}",
        p.detail
    );
    let e = sqlx::query("SELECT $1::int2")
        .bind(100_000_i32)
        .execute(&f.db.pool)
        .await
        .unwrap_err();
    assert_eq!(
        ledgerflow_api::Error::from(e).status(),
        StatusCode::BAD_REQUEST
    );
}

/// Issue 12 (5): the documented largest audit page works (the handler
/// fetches one row past it), one more is refused.
#[tokio::test]
async fn the_largest_audit_page_is_accepted() {
    let f = fixture().await;
    let v = Some(f.keys.viewer.as_str());
    let r = send(&f.admin, Method::GET, "/v1/audit?limit=500", v, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = send(&f.admin, Method::GET, "/v1/audit?limit=501", v, None).await;
    assert_problem(&r, 400, "validation");
}

/// Issue 12 (5): a 405 names the methods the resource answers (RFC 9110
/// §15.5.6), on both listeners; every answer carries a request id, and a
/// client's sane one is kept.
#[tokio::test]
async fn method_not_allowed_carries_allow_and_answers_carry_request_ids() {
    let f = fixture().await;
    let cases: [(&App, Method, &str, &str); 5] = [
        (
            &f.public,
            Method::DELETE,
            "/v1/accounts/me/balances",
            "GET, HEAD",
        ),
        (&f.public, Method::PUT, "/v1/trades", "POST"),
        (&f.admin, Method::POST, "/v1/jobs", "GET, HEAD"),
        (&f.admin, Method::GET, "/v1/jobs/0190/retry", "POST"),
        (&f.admin, Method::DELETE, "/healthcheck", "GET, HEAD"),
    ];
    for (app, method, path, allow) in cases {
        let resp = app.request(method.clone(), path).send().await.0;
        assert_eq!(
            resp.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        let got = resp
            .headers()
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        assert_eq!(got.as_deref(), Some(allow), "{method} {path}");
    }
    let resp = f.admin.get("/healthcheck").send().await.0;
    let id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok());
    assert!(
        id.is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()),
        "{id:?}"
    );
    let resp = f
        .public
        .get("/healthcheck")
        .header("x-request-id", "trace-42")
        .send()
        .await
        .0;
    assert_eq!(
        resp.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("trace-42")
    );
    let resp = f
        .public
        .get("/healthcheck")
        .header("x-request-id", "bad id\twith tab")
        .send()
        .await
        .0;
    let id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok());
    assert!(
        id.is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()),
        "{id:?}"
    );
}

/// One raw HTTP/1.1 request on a real socket (the throttle needs the
/// client's address, which only a real connection has): status line and
/// `Retry-After`.
async fn raw_get(addr: std::net::SocketAddr, path: &str, token: &str) -> (u16, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let retry = out.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("retry-after:")
            .map(|v| v.trim().to_string())
    });
    (status, retry)
}

/// Issue 12 (5): repeated failed authentication from one address, or
/// against one key prefix, is answered 429 with Retry-After; a key that
/// authenticated before keeps working.
#[tokio::test]
async fn failed_authentication_is_throttled_without_locking_out_a_good_key() {
    let f = fixture_with(ApiConfig {
        auth_throttle: ledgerflow_api::throttle::Limits {
            window: Duration::from_secs(60),
            per_address: 5,
            per_prefix: 3,
        },
        ..ApiConfig::default()
    })
    .await;
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (pa, aa) = (public.local_addr().unwrap(), admin.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ledgerflow_api::serve_listeners(
        public,
        admin,
        f.state.clone(),
        async {
            let _ = rx.await;
        },
    ));
    let balances = "/v1/accounts/me/balances";
    // user_b's key authenticates first: it is trusted from then on.
    assert_eq!(raw_get(pa, balances, &f.keys.user_b).await.0, 200);
    let bogus = |i: usize| format!("lf_{i:012x}_{}", "0".repeat(64));
    for i in 0..5 {
        assert_eq!(raw_get(pa, balances, &bogus(i)).await.0, 401, "attempt {i}");
    }
    let (status, retry) = raw_get(pa, balances, &bogus(9)).await;
    assert_eq!(status, 429);
    let retry: u64 = retry.unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // The same address with a key that never authenticated: throttled too,
    // without a lookup; the trusted key still works.
    assert_eq!(raw_get(pa, balances, &f.keys.user_a).await.0, 429);
    assert_eq!(raw_get(pa, balances, &f.keys.user_b).await.0, 200);
    // The admin listener shares the counters (same process, same address).
    assert_eq!(raw_get(aa, "/v1/jobs", &f.keys.viewer).await.0, 429);
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // Against one prefix (here from an unknown address, as in-process):
    // after 3 failures, more attempts on that prefix get 429; another
    // prefix is still checked (401), and a trusted key still works.
    let prefix = f.keys.operator.rsplit_once('_').unwrap().0.to_string();
    let wrong = format!("{prefix}_{}", "f".repeat(64));
    let op = send(
        &f.admin,
        Method::GET,
        "/v1/jobs",
        Some(&f.keys.operator),
        None,
    )
    .await;
    assert_eq!(op.status, StatusCode::OK);
    for _ in 0..3 {
        let r = send(&f.admin, Method::GET, "/v1/jobs", Some(&wrong), None).await;
        assert_problem(&r, 401, "unauthorized");
    }
    let r = send(&f.admin, Method::GET, "/v1/jobs", Some(&wrong), None).await;
    assert_problem(&r, 429, "too-many-requests");
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/jobs",
        Some(&f.keys.operator),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let other = format!("lfa_{}_{}", "e".repeat(12), "f".repeat(64));
    let r = send(&f.admin, Method::GET, "/v1/jobs", Some(&other), None).await;
    assert_problem(&r, 401, "unauthorized");
}
