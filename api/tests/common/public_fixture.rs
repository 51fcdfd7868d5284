//! The public money endpoints in-process against a real Postgres with the payments workflows registered: the fixture (two users, their keys) and request helpers the public test files share.
// Each test binary that includes this uses a different part of it.
#![allow(dead_code, unused_imports)]
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

pub use ledgerflow_api::{AppState, admin_app, public_app};
pub use ledgerflow_engine::Store;
pub use ledgerflow_engine::testing::TestDb;
pub use ledgerflow_payments::exchange::sim::{SimConfig, SimulatedExchange};
pub use ledgerflow_payments::notifier::SimulatedNotifier;
pub use ledgerflow_payments::users;
pub use ledgerflow_payments::workflows::{self, Deps, WorkflowsConfig};
pub use poem::endpoint::BoxEndpoint;
pub use poem::http::{Method, StatusCode, header};
pub use poem::test::TestClient;
pub use poem::{EndpointExt, Response};
pub use serde_json::{Value, json};
pub use std::sync::Arc;
pub use std::time::Duration;

pub type App = TestClient<BoxEndpoint<'static, Response>>;

pub struct Fixture {
    pub db: TestDb,
    pub app: App,
    /// The admin listener on the same state: where metrics are scraped
    /// (the public listener serves none).
    pub admin: App,
    pub user_a: String,
    pub user_b: String,
    pub expired: String,
}

pub async fn fixture(pool_size: u32) -> Fixture {
    let db = TestDb::with_pool_size(pool_size).await.unwrap();
    let store = Store::new(db.pool.clone());
    let registry = workflows::registry(Deps {
        exchange: Arc::new(SimulatedExchange::new(SimConfig::default())),
        notifier: Arc::new(SimulatedNotifier::new()),
        config: WorkflowsConfig::default(),
    })
    .unwrap();
    let state = AppState::new(store)
        .unwrap()
        .with_workflows(Arc::new(registry));
    let mut conn = db.pool.acquire().await.unwrap();
    let a = users::create_user(&mut conn, "a@example.com", "A")
        .await
        .unwrap();
    let b = users::create_user(&mut conn, "b@example.com", "B")
        .await
        .unwrap();
    let key = |k: users::PlaintextKey| k.expose_secret().to_string();
    let (_, user_a) = users::create_api_key(&mut conn, a, None).await.unwrap();
    let (_, user_b) = users::create_api_key(&mut conn, b, None).await.unwrap();
    let (_, expired) = users::create_api_key(&mut conn, a, Some(Duration::from_millis(1)))
        .await
        .unwrap();
    drop(conn);
    tokio::time::sleep(Duration::from_millis(5)).await; // the expired key expires
    Fixture {
        app: TestClient::new(public_app(state.clone()).boxed()),
        admin: TestClient::new(admin_app(state).boxed()),
        user_a: key(user_a),
        user_b: key(user_b),
        expired: key(expired),
        db,
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub text: String,
    pub json: Value,
}

pub async fn send(
    app: &App,
    method: Method,
    path: &str,
    auth: Option<&str>,
    idem: Option<&str>,
    body: Option<&Value>,
) -> Reply {
    let mut req = app.request(method, path);
    if let Some(token) = auth {
        req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some(key) = idem {
        req = req.header("Idempotency-Key", key);
    }
    if let Some(body) = body {
        req = req.body_json(body);
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

pub fn assert_problem(r: &Reply, status: u16, slug: &str) {
    assert_eq!(r.status.as_u16(), status, "body: {}", r.text);
    assert_eq!(r.content_type, "application/problem+json", "{}", r.text);
    assert_eq!(r.json["status"], status);
    assert_eq!(
        r.json["type"],
        format!("https://ledgerflow.dev/problems/{slug}"),
        "body: {}",
        r.text
    );
}

/// A valid Idempotency-Key naming a test case.
pub fn key_of(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// `POST /v1/trades` of [`trade_body`] as the bearer of `token`, with
/// Idempotency-Key `key`.
pub async fn post_trade(app: &App, token: &str, key: &str) -> Reply {
    send(
        app,
        Method::POST,
        "/v1/trades",
        Some(token),
        Some(key),
        Some(&trade_body()),
    )
    .await
}

pub fn trade_body() -> Value {
    json!({
        "side": "buy",
        "base_asset": "BTC",
        "quote_asset": "USD",
        "base_amount": "0.5",
        "limit_price": "30000.00",
    })
}

pub fn withdrawal_body() -> Value {
    json!({ "asset": "BTC", "amount": "0.01", "address": "bc1q2rv93cyctmx87czp32hse3dttpl59sjhs3fd6g" })
}

pub async fn count(f: &Fixture, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&f.db.pool).await.unwrap()
}

pub async fn workflows_of(f: &Fixture, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM workflows WHERE kind = $1")
        .bind(kind)
        .fetch_one(&f.db.pool)
        .await
        .unwrap()
}

pub async fn jobs_of(f: &Fixture, workflow: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE workflow_id = $1::uuid")
        .bind(workflow)
        .fetch_one(&f.db.pool)
        .await
        .unwrap()
}

/// Nothing was written: no workflow, no job, no idempotency record.
pub async fn assert_nothing_written(f: &Fixture) {
    assert_eq!(count(f, "SELECT count(*) FROM workflows").await, 0);
    assert_eq!(count(f, "SELECT count(*) FROM jobs").await, 0);
    assert_eq!(count(f, "SELECT count(*) FROM idempotency_keys").await, 0);
}

// ------------------------------------------------------------- creation
