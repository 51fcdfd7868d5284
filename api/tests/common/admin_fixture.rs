//! The admin and public apps in-process against a real Postgres: the fixture (keys of every role, a store) and request helpers the admin test files share.
// Each test binary that includes this uses a different part of it.
#![allow(dead_code, unused_imports)]
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

pub use futures::StreamExt;
pub use ledgerflow_api::{ApiConfig, AppState, ReadinessCheck, admin_app, public_app};
pub use ledgerflow_engine::testing::TestDb;
pub use ledgerflow_engine::{JobId, JobState, NewJob, Outcome, Store};
pub use ledgerflow_payments::ledger;
pub use ledgerflow_payments::money::Amount;
pub use ledgerflow_payments::users::{self, AdminRole};
pub use poem::endpoint::BoxEndpoint;
pub use poem::http::{Method, StatusCode, header};
pub use poem::test::TestClient;
pub use poem::{Body, EndpointExt, Response};
pub use serde_json::{Value, json};
pub use std::sync::Arc;
pub use std::time::Duration;

pub type App = TestClient<BoxEndpoint<'static, Response>>;

/// Everyone who can knock on a door.
pub struct Keys {
    pub user_a: String,
    pub user_b: String,
    pub expired: String,
    pub revoked: String,
    pub viewer: String,
    pub operator: String,
    pub approver: String,
    pub disabled: String,
}

pub struct Fixture {
    pub db: TestDb,
    pub store: Store,
    pub state: AppState,
    pub public: App,
    pub admin: App,
    pub keys: Keys,
    pub accounts_a: Vec<uuid::Uuid>,
}

pub async fn fixture() -> Fixture {
    fixture_with(ApiConfig::default()).await
}

pub async fn fixture_with(config: ApiConfig) -> Fixture {
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

pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub www_authenticate: Option<String>,
    pub text: String,
    pub json: Value,
}

pub async fn send(
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

pub async fn into_reply(resp: Response) -> Reply {
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

pub fn assert_problem(r: &Reply, status: u16, slug: &str) {
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

pub async fn insert(store: &Store, queue: &str, kind: &str, args: Value) -> JobId {
    store
        .job_insert(&NewJob::new(kind, args).queue(queue))
        .await
        .unwrap()
        .id()
}

pub async fn state_of(store: &Store, id: JobId) -> JobState {
    store.job_get(id).await.unwrap().unwrap().state
}

pub async fn audit_rows(f: &Fixture) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&f.db.pool)
        .await
        .unwrap()
}

pub async fn job_count(f: &Fixture) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&f.db.pool)
        .await
        .unwrap()
}

/// Claims the next job of `queue` (it becomes `running`).
pub async fn claim(store: &Store, queue: &str) -> ledgerflow_engine::Lease {
    let owner: Arc<str> = Arc::from("test-worker");
    let mut claimed = store.job_claim(queue, &owner, 1).await.unwrap();
    claimed.pop().unwrap().lease
}

pub fn reason() -> Option<Value> {
    Some(json!({ "reason": "test: operator action" }))
}

// --------------------------------------------------------------- ops
