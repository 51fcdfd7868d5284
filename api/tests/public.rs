//! The public money endpoints (`/v1/trades`, `/v1/withdrawals`) in-process
//! against a real Postgres (one cloned database per test), with the payments
//! workflows registered on a `SimulatedExchange` (no runner: a 201 must leave
//! a committed workflow and its first job behind): authentication and
//! ownership, `Idempotency-Key` semantics (replay, mismatch, 50 concurrent
//! requests), strict amounts and the field allow-list.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use ledgerflow_api::{AppState, admin_app, public_app};
use ledgerflow_engine::Store;
use ledgerflow_engine::testing::TestDb;
use ledgerflow_payments::exchange::sim::{SimConfig, SimulatedExchange};
use ledgerflow_payments::notifier::SimulatedNotifier;
use ledgerflow_payments::users;
use ledgerflow_payments::workflows::{self, Deps, WorkflowsConfig};
use poem::endpoint::BoxEndpoint;
use poem::http::{Method, StatusCode, header};
use poem::test::TestClient;
use poem::{EndpointExt, Response};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

type App = TestClient<BoxEndpoint<'static, Response>>;

struct Fixture {
    db: TestDb,
    app: App,
    /// The admin listener on the same state: where metrics are scraped
    /// (the public listener serves none).
    admin: App,
    user_a: String,
    user_b: String,
    expired: String,
}

async fn fixture(pool_size: u32) -> Fixture {
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

fn assert_problem(r: &Reply, status: u16, slug: &str) {
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
fn key_of(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// `POST /v1/trades` of [`trade_body`] as the bearer of `token`, with
/// Idempotency-Key `key`.
async fn post_trade(app: &App, token: &str, key: &str) -> Reply {
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

fn trade_body() -> Value {
    json!({
        "side": "buy",
        "base_asset": "BTC",
        "quote_asset": "USD",
        "base_amount": "0.5",
        "limit_price": "30000.00",
    })
}

fn withdrawal_body() -> Value {
    json!({ "asset": "BTC", "amount": "0.01", "address": "bc1q2rv93cyctmx87czp32hse3dttpl59sjhs3fd6g" })
}

async fn count(f: &Fixture, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&f.db.pool).await.unwrap()
}

async fn workflows_of(f: &Fixture, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM workflows WHERE kind = $1")
        .bind(kind)
        .fetch_one(&f.db.pool)
        .await
        .unwrap()
}

async fn jobs_of(f: &Fixture, workflow: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE workflow_id = $1::uuid")
        .bind(workflow)
        .fetch_one(&f.db.pool)
        .await
        .unwrap()
}

/// Nothing was written: no workflow, no job, no idempotency record.
async fn assert_nothing_written(f: &Fixture) {
    assert_eq!(count(f, "SELECT count(*) FROM workflows").await, 0);
    assert_eq!(count(f, "SELECT count(*) FROM jobs").await, 0);
    assert_eq!(count(f, "SELECT count(*) FROM idempotency_keys").await, 0);
}

// ------------------------------------------------------------- creation

#[tokio::test]
async fn post_trade_starts_the_workflow_and_answers_201() {
    let f = fixture(8).await;
    let r = post_trade(&f.app, &f.user_a, "t-1").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.json["id"].as_str().unwrap().to_string();
    assert_eq!(r.json["status"], "pending");
    assert_eq!(r.json["side"], "buy");
    assert_eq!(r.json["base_asset"], "BTC");
    assert_eq!(r.json["quote_asset"], "USD");
    assert_eq!(r.json["base_amount"], "0.5");
    assert_eq!(r.json["limit_price"], "30000.00");
    // Committed before the answer: the workflow and its first job exist.
    assert_eq!(workflows_of(&f, "payments.trade").await, 1);
    assert_eq!(jobs_of(&f, &id).await, 1);
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM idempotency_keys WHERE resource_id = $1::uuid AND response_status = 201",
    )
    .bind(&id)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(stored, 1);

    let got = send(
        &f.app,
        Method::GET,
        &format!("/v1/trades/{id}"),
        Some(&f.user_a),
        None,
        None,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert_eq!(got.json, r.json);
}

#[tokio::test]
async fn a_created_trade_wakes_its_queue_after_the_commit() {
    // The workflow starts without an in-transaction NOTIFY; the API sends the
    // wake-up itself once the commit is done.
    let f = fixture(8).await;
    let mut listener = ledgerflow_engine::notify::Listener::connect(&f.db.pool)
        .await
        .unwrap();
    let r = post_trade(&f.app, &f.user_a, "wake-1").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let queue: String = sqlx::query_scalar("SELECT queue FROM jobs WHERE workflow_id = $1::uuid")
        .bind(r.json["id"].as_str().unwrap())
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a wake-up within 10 s")
        .unwrap();
    assert_eq!(woken, Some(ledgerflow_engine::notify::Wakeup::Jobs(queue)));
}

#[tokio::test]
async fn post_withdrawal_starts_the_workflow_and_answers_201() {
    let f = fixture(8).await;
    let r = send(
        &f.app,
        Method::POST,
        "/v1/withdrawals",
        Some(&f.user_a),
        Some("w-1"),
        Some(&withdrawal_body()),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.json["id"].as_str().unwrap().to_string();
    assert_eq!(r.json["status"], "pending");
    assert_eq!(r.json["amount"], "0.01");
    assert_eq!(r.json["asset"], "BTC");
    assert_eq!(workflows_of(&f, "payments.withdrawal").await, 1);
    assert_eq!(jobs_of(&f, &id).await, 1);

    let got = send(
        &f.app,
        Method::GET,
        &format!("/v1/withdrawals/{id}"),
        Some(&f.user_a),
        None,
        None,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json, r.json);
    // Same key, same body: the first answer again, no second workflow.
    let again = send(
        &f.app,
        Method::POST,
        "/v1/withdrawals",
        Some(&f.user_a),
        Some("w-1"),
        Some(&withdrawal_body()),
    )
    .await;
    assert_eq!(
        (again.status, again.text.as_str()),
        (r.status, r.text.as_str())
    );
    assert_eq!(workflows_of(&f, "payments.withdrawal").await, 1);
}

// ------------------------------------------------------------------ auth

#[tokio::test]
async fn auth_and_ownership() {
    let f = fixture(8).await;
    for (method, path, body) in [
        (Method::POST, "/v1/trades", Some(trade_body())),
        (Method::POST, "/v1/withdrawals", Some(withdrawal_body())),
        (
            Method::GET,
            "/v1/trades/0190f5a4-0000-7000-8000-000000000000",
            None,
        ),
        (
            Method::GET,
            "/v1/withdrawals/0190f5a4-0000-7000-8000-000000000000",
            None,
        ),
    ] {
        let r = send(&f.app, method.clone(), path, None, Some("k"), body.as_ref()).await;
        assert_problem(&r, 401, "unauthorized");
        let r = send(
            &f.app,
            method,
            path,
            Some(&f.expired),
            Some("k"),
            body.as_ref(),
        )
        .await;
        assert_problem(&r, 401, "unauthorized");
    }
    assert_nothing_written(&f).await;

    let trade = post_trade(&f.app, &f.user_a, "t-1").await;
    assert_eq!(trade.status, StatusCode::CREATED);
    let wd = send(
        &f.app,
        Method::POST,
        "/v1/withdrawals",
        Some(&f.user_a),
        Some("w-1"),
        Some(&withdrawal_body()),
    )
    .await;
    assert_eq!(wd.status, StatusCode::CREATED);
    let trade_path = format!("/v1/trades/{}", trade.json["id"].as_str().unwrap());
    let wd_path = format!("/v1/withdrawals/{}", wd.json["id"].as_str().unwrap());

    // B can't see A's resources: 404, like a missing one.
    let r = send(
        &f.app,
        Method::GET,
        &trade_path,
        Some(&f.user_b),
        None,
        None,
    )
    .await;
    assert_problem(&r, 404, "not-found");
    let r = send(&f.app, Method::GET, &wd_path, Some(&f.user_b), None, None).await;
    assert_problem(&r, 404, "not-found");
    // A trade id is not a withdrawal id.
    let crossed = format!("/v1/withdrawals/{}", trade.json["id"].as_str().unwrap());
    let r = send(&f.app, Method::GET, &crossed, Some(&f.user_a), None, None).await;
    assert_problem(&r, 404, "not-found");
    // The expired key of A can't read A's trade either.
    let r = send(
        &f.app,
        Method::GET,
        &trade_path,
        Some(&f.expired),
        None,
        None,
    )
    .await;
    assert_problem(&r, 401, "unauthorized");
    // Keys are scoped per user: B's "t-1" is a different request.
    let r = post_trade(&f.app, &f.user_b, "t-1").await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_ne!(r.json["id"], trade.json["id"]);
}

// ----------------------------------------------------------- idempotency

#[tokio::test]
async fn idempotency_key_replays_and_refuses_mismatches() {
    let f = fixture(8).await;
    // Missing key: 400 and nothing written.
    let r = send(
        &f.app,
        Method::POST,
        "/v1/trades",
        Some(&f.user_a),
        None,
        Some(&trade_body()),
    )
    .await;
    assert_problem(&r, 400, "validation");
    assert!(
        r.json["detail"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key")
    );
    let r = send(
        &f.app,
        Method::POST,
        "/v1/withdrawals",
        Some(&f.user_a),
        None,
        Some(&withdrawal_body()),
    )
    .await;
    assert_problem(&r, 400, "validation");
    assert_nothing_written(&f).await;

    let first = post_trade(&f.app, &f.user_a, "same").await;
    assert_eq!(first.status, StatusCode::CREATED);
    // Same key, same body (other key order): the identical response.
    let reordered = json!({
        "limit_price": "30000.00",
        "base_amount": "0.5",
        "quote_asset": "USD",
        "base_asset": "BTC",
        "side": "buy",
    });
    let second = send(
        &f.app,
        Method::POST,
        "/v1/trades",
        Some(&f.user_a),
        Some("same"),
        Some(&reordered),
    )
    .await;
    assert_eq!(second.status, first.status);
    assert_eq!(second.text, first.text);
    assert_eq!(workflows_of(&f, "payments.trade").await, 1);

    // Same key, different body: 422, nothing new.
    let mut other = trade_body();
    other["base_amount"] = json!("0.6");
    let r = send(
        &f.app,
        Method::POST,
        "/v1/trades",
        Some(&f.user_a),
        Some("same"),
        Some(&other),
    )
    .await;
    assert_problem(&r, 422, "unprocessable");
    // Same key on another endpoint: also a different request.
    let r = send(
        &f.app,
        Method::POST,
        "/v1/withdrawals",
        Some(&f.user_a),
        Some("same"),
        Some(&withdrawal_body()),
    )
    .await;
    assert_problem(&r, 422, "unprocessable");
    assert_eq!(count(&f, "SELECT count(*) FROM workflows").await, 1);
    assert_eq!(count(&f, "SELECT count(*) FROM idempotency_keys").await, 1);
}

#[tokio::test]
async fn fifty_concurrent_requests_with_one_key_create_one_trade() {
    let f = fixture(20).await;
    let body = trade_body();
    let replies = futures::future::join_all((0..50).map(|_| {
        send(
            &f.app,
            Method::POST,
            "/v1/trades",
            Some(&f.user_a),
            Some("burst"),
            Some(&body),
        )
    }))
    .await;
    assert_eq!(workflows_of(&f, "payments.trade").await, 1);
    assert_eq!(count(&f, "SELECT count(*) FROM jobs").await, 1);
    let created: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .collect();
    assert!(!created.is_empty());
    // Every 201 is the same answer; anything else is the documented 409
    // "in progress" (only if a waiter outlived the lock timeout).
    for r in &replies {
        if r.status == StatusCode::CREATED {
            assert_eq!(r.text, created[0].text);
        } else {
            assert_problem(r, 409, "conflict");
        }
    }
}

// ------------------------------------------------------------- bad input

#[tokio::test]
async fn bad_input_is_a_problem_and_changes_nothing() {
    let f = fixture(8).await;
    let with = |field: &str, value: Value| {
        let mut b = trade_body();
        b[field] = value;
        b
    };
    let mut cases: Vec<(&str, Value)> = vec![
        ("number amount", with("base_amount", json!(0.5))),
        ("number price", with("limit_price", json!(30000))),
        (
            "over scale (BTC has 8)",
            with("base_amount", json!("0.123456789")),
        ),
        (
            "over scale (USD has 2)",
            with("limit_price", json!("30000.001")),
        ),
        (
            "29 digits",
            with("base_amount", json!("12345678901234567890123456789")),
        ),
        ("negative", with("base_amount", json!("-1"))),
        ("zero", with("base_amount", json!("0"))),
        ("zero with decimals", with("limit_price", json!("0.00"))),
        ("NaN", with("base_amount", json!("NaN"))),
        ("Infinity", with("limit_price", json!("Infinity"))),
        ("exponent", with("base_amount", json!("1e5"))),
        ("empty", with("base_amount", json!(""))),
        ("null amount", with("base_amount", Value::Null)),
        ("unknown asset", with("base_asset", json!("DOGE"))),
        ("same assets", with("quote_asset", json!("BTC"))),
        ("bad side", with("side", json!("short"))),
        ("numeric asset", with("base_asset", json!(5))),
        ("mass-assigned status", with("status", json!("settled"))),
        ("mass-assigned fee", with("fee", json!("0"))),
        (
            "mass-assigned user_id",
            with("user_id", json!(uuid::Uuid::nil())),
        ),
    ];
    let mut missing = trade_body();
    missing.as_object_mut().unwrap().remove("limit_price");
    cases.push(("missing field", missing));
    cases.push(("not an object", json!(["buy"])));
    for (name, body) in &cases {
        let r = send(
            &f.app,
            Method::POST,
            "/v1/trades",
            Some(&f.user_a),
            Some(&key_of(name)),
            Some(body),
        )
        .await;
        assert!(
            matches!(r.status.as_u16(), 400 | 422),
            "{name}: {} {}",
            r.status,
            r.text
        );
        assert_eq!(r.content_type, "application/problem+json", "{name}");
        assert!(
            r.json["type"]
                .as_str()
                .unwrap()
                .starts_with("https://ledgerflow.dev/problems/")
        );
    }
    let wd = |field: &str, value: Value| {
        let mut b = withdrawal_body();
        b[field] = value;
        b
    };
    let cases = [
        ("wd number", wd("amount", json!(0.01))),
        ("wd over scale", wd("amount", json!("0.000000001"))),
        ("wd negative", wd("amount", json!("-0.01"))),
        ("wd zero", wd("amount", json!("0"))),
        ("wd NaN", wd("amount", json!("NaN"))),
        (
            "wd 29 digits",
            wd("amount", json!("99999999999999999999999999999")),
        ),
        ("wd empty address", wd("address", json!(""))),
        ("wd status", wd("status", json!("completed"))),
    ];
    for (name, body) in &cases {
        let r = send(
            &f.app,
            Method::POST,
            "/v1/withdrawals",
            Some(&f.user_a),
            Some(&key_of(name)),
            Some(body),
        )
        .await;
        assert!(
            matches!(r.status.as_u16(), 400 | 422),
            "{name}: {} {}",
            r.status,
            r.text
        );
        assert_eq!(r.content_type, "application/problem+json", "{name}");
    }
    // A bad Idempotency-Key is refused too.
    let r = send(
        &f.app,
        Method::POST,
        "/v1/trades",
        Some(&f.user_a),
        Some(&"k".repeat(300)),
        Some(&trade_body()),
    )
    .await;
    assert_problem(&r, 400, "validation");
    assert_nothing_written(&f).await;
}

/// `POST` of a raw JSON text (a `Value` cannot hold a duplicate key).
async fn send_raw(app: &App, path: &str, token: &str, key: &str, body: &str) -> Reply {
    let resp = app
        .post(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header("Idempotency-Key", key)
        .content_type("application/json")
        .body(body.to_string())
        .send()
        .await
        .0;
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

/// Issue 12 (2, 3): U+0000 and other control characters in asset codes
/// and addresses, duplicate keys, and addresses that read differently from
/// what they are (bidi, invisible characters) or fail their checksum are
/// 400 problems — never a 500 — and write nothing.
#[tokio::test]
async fn control_characters_duplicate_keys_and_bad_addresses_are_refused() {
    let f = fixture(8).await;
    let with = |field: &str, value: &str| {
        let mut b = trade_body();
        b[field] = json!(value);
        b
    };
    let wd = |value: &str| {
        let mut b = withdrawal_body();
        b["address"] = json!(value);
        b
    };
    let cases: Vec<(&str, &str, Value)> = vec![
        (
            "nul base asset",
            "/v1/trades",
            with("base_asset", "BT\u{0}C"),
        ),
        (
            "nul quote asset",
            "/v1/trades",
            with("quote_asset", "USD\0"),
        ),
        ("bell asset", "/v1/trades", with("base_asset", "BTC\u{7}")),
        ("lowercase asset", "/v1/trades", with("base_asset", "btc")),
        ("nul amount", "/v1/trades", with("base_amount", "0.5\0")),
        ("nul address", "/v1/withdrawals", wd("bc1q\0")),
        (
            "bell address",
            "/v1/withdrawals",
            wd("bc1q2rv93cyctmx87czp32hse3dttpl59sjhs3fd6g\u{7}"),
        ),
        (
            "rlo address",
            "/v1/withdrawals",
            wd("bc1q\u{202e}lacol-kcatta"),
        ),
        (
            "zero-width address",
            "/v1/withdrawals",
            wd("bc1q2rv93cyctmx87czp32\u{200b}hse3dttpl59sjhs3fd6g"),
        ),
        (
            "bad checksum",
            "/v1/withdrawals",
            wd("bc1q2rv93cyctmx87czp32hse3dttpl59sjhs3fd6h"),
        ),
        ("not bech32", "/v1/withdrawals", wd("bc1qexampleaddress")),
        (
            "mixed case",
            "/v1/withdrawals",
            wd("bc1Q2rv93cyctmx87czp32hse3dttpl59sjhs3fd6g"),
        ),
        (
            "ETH address for BTC",
            "/v1/withdrawals",
            wd("0x52908400098527886E0F7030069857D2E4169EE7"),
        ),
    ];
    for (name, path, body) in &cases {
        let r = send(
            &f.app,
            Method::POST,
            path,
            Some(&f.user_a),
            Some(&key_of(name)),
            Some(body),
        )
        .await;
        assert_problem(&r, 400, "validation");
        assert!(!r.text.contains('\0'), "{name}: the problem echoes no NUL");
    }
    // A NUL in the Idempotency-Key cannot even be sent (not a header value).
    // Duplicate keys, even with the same value: a reader taking the first
    // would see another amount than the server.
    let raw = [
        r#"{"side":"buy","base_asset":"BTC","quote_asset":"USD","base_amount":"0.001","limit_price":"30000.00","base_amount":"1.9"}"#,
        r#"{"side":"buy","side":"buy","base_asset":"BTC","quote_asset":"USD","base_amount":"0.5","limit_price":"30000.00"}"#,
    ];
    for (i, body) in raw.iter().enumerate() {
        let r = send_raw(&f.app, "/v1/trades", &f.user_a, &format!("dup-{i}"), body).await;
        assert_problem(&r, 400, "validation");
        assert!(r.text.contains("duplicate key"), "{}", r.text);
    }
    let r = send_raw(
        &f.app,
        "/v1/withdrawals",
        &f.user_a,
        "dup-wd",
        r#"{"asset":"BTC","amount":"0.01","address":"bc1q2rv93cyctmx87czp32hse3dttpl59sjhs3fd6g","address":"bc1qu6p0py2tgnljt5xyrrfltkjzs865x45m5te026"}"#,
    )
    .await;
    assert_problem(&r, 400, "validation");
    // An escaped NUL in raw JSON too.
    let r = send_raw(
        &f.app,
        "/v1/trades",
        &f.user_a,
        "nul-raw",
        r#"{"side":"buy","base_asset":"BTC\u0000","quote_asset":"USD","base_amount":"0.5","limit_price":"30000.00"}"#,
    )
    .await;
    assert_problem(&r, 400, "validation");
    assert_nothing_written(&f).await;

    // The same bodies without the defect are accepted.
    for (key, address) in [
        ("ok-segwit", "bc1q2rv93cyctmx87czp32hse3dttpl59sjhs3fd6g"),
        (
            "ok-taproot",
            "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",
        ),
        ("ok-legacy", "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2"),
    ] {
        let r = send(
            &f.app,
            Method::POST,
            "/v1/withdrawals",
            Some(&f.user_a),
            Some(key),
            Some(&wd(address)),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{address}: {}", r.text);
    }
}

// ------------------------------------------------------ API key cache

/// An app on `f`'s database with `config` (the fixture's app uses the
/// defaults).
fn app_with(f: &Fixture, config: ledgerflow_api::ApiConfig) -> App {
    let registry = workflows::registry(Deps {
        exchange: Arc::new(SimulatedExchange::new(SimConfig::default())),
        notifier: Arc::new(SimulatedNotifier::new()),
        config: WorkflowsConfig::default(),
    })
    .unwrap();
    let state = AppState::with_config(Store::new(f.db.pool.clone()), config)
        .unwrap()
        .with_workflows(Arc::new(registry));
    TestClient::new(public_app(state).boxed())
}

/// A fresh user with one API key of `lifetime`: (key id, plain key).
async fn user_with_key(
    f: &Fixture,
    email: &str,
    lifetime: Option<Duration>,
) -> (ledgerflow_payments::ApiKeyId, String) {
    let mut conn = f.db.pool.acquire().await.unwrap();
    let user = users::create_user(&mut conn, email, "C").await.unwrap();
    let (id, key) = users::create_api_key(&mut conn, user, lifetime)
        .await
        .unwrap();
    (id, key.expose_secret().to_string())
}

/// Sends `GET /v1/accounts/me/balances` with `key` every 50 ms until it is
/// refused (asserting every earlier answer was a 200); returns how long
/// that took, or panics after `deadline`.
async fn until_refused(app: &App, key: &str, deadline: Duration) -> Duration {
    let start = std::time::Instant::now();
    loop {
        let r = send(
            app,
            Method::GET,
            "/v1/accounts/me/balances",
            Some(key),
            None,
            None,
        )
        .await;
        if r.status == StatusCode::UNAUTHORIZED {
            assert_problem(&r, 401, "unauthorized");
            return start.elapsed();
        }
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(
            start.elapsed() < deadline,
            "the key still works after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_revoked_key_stops_working_within_the_key_cache_ttl() {
    let f = fixture(8).await;
    let (id, key) = user_with_key(&f, "c@example.com", None).await;
    // Used once: now remembered by the app's key cache (TTL 1 s by default).
    let r = send(
        &f.app,
        Method::GET,
        "/v1/accounts/me/balances",
        Some(&key),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let mut conn = f.db.pool.acquire().await.unwrap();
    assert!(users::revoke_api_key(&mut conn, id).await.unwrap());
    // Refused once the cached answer is older than the TTL (generous
    // deadline: a loaded machine may be slow to send the requests).
    until_refused(&f.app, &key, Duration::from_secs(20)).await;
    // ...and a POST with it writes nothing.
    let r = post_trade(&f.app, &key, "after-revocation").await;
    assert_problem(&r, 401, "unauthorized");
    assert_nothing_written(&f).await;
}

#[tokio::test]
async fn without_a_key_cache_a_revoked_key_is_refused_at_once() {
    let f = fixture(8).await;
    let app = app_with(
        &f,
        ledgerflow_api::ApiConfig {
            api_key_cache_ttl: Duration::ZERO,
            ..Default::default()
        },
    );
    let (id, key) = user_with_key(&f, "c@example.com", None).await;
    let r = send(
        &app,
        Method::GET,
        "/v1/accounts/me/balances",
        Some(&key),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let mut conn = f.db.pool.acquire().await.unwrap();
    assert!(users::revoke_api_key(&mut conn, id).await.unwrap());
    let r = send(
        &app,
        Method::GET,
        "/v1/accounts/me/balances",
        Some(&key),
        None,
        None,
    )
    .await;
    assert_problem(&r, 401, "unauthorized");
}

#[tokio::test]
async fn a_cached_key_is_not_trusted_past_its_expiry() {
    let f = fixture(8).await;
    // A cache TTL far longer than the key's life: only the expiry bound
    // can end the cached answer within the deadline.
    let app = app_with(
        &f,
        ledgerflow_api::ApiConfig {
            api_key_cache_ttl: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    let (_, key) = user_with_key(&f, "c@example.com", Some(Duration::from_secs(3))).await;
    let r = send(
        &app,
        Method::GET,
        "/v1/accounts/me/balances",
        Some(&key),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    until_refused(&app, &key, Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_post_does_not_lock_its_users_row() {
    // Concurrent POSTs of one user must not queue on the user's row: hold
    // it FOR UPDATE (which a foreign key check's FOR KEY SHARE would wait
    // for, past the POST's 5 s lock timeout) and POST meanwhile.
    let f = fixture(8).await;
    let mut tx = f.db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM users WHERE email = 'a@example.com' FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let r = post_trade(&f.app, &f.user_a, "while-locked").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    tx.rollback().await.unwrap();
    assert_eq!(workflows_of(&f, "payments.trade").await, 1);
    assert_eq!(count(&f, "SELECT count(*) FROM idempotency_keys").await, 1);
}

// ------------------------------------------------------- group commit

/// `ledgerflow_api_post_batch_size`'s (count, sum) from `/metrics` (of the
/// admin listener: the public one has none): POSTs' transactions and the
/// POSTs they committed.
async fn batch_sizes(app: &App) -> (f64, f64) {
    let r = send(app, Method::GET, "/metrics", None, None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let value = |name: &str| {
        r.text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("ledgerflow_api_post_batch_size_count"),
        value("ledgerflow_api_post_batch_size_sum"),
    )
}

#[tokio::test]
async fn concurrent_posts_share_transactions_and_each_gets_its_own_answer() {
    let f = fixture(20).await;
    // One POST first, so the key and the assets are cached and the burst
    // below reaches the batcher without awaiting anything.
    let first = post_trade(&f.app, &f.user_a, "warm").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    let keys: Vec<String> = (0..40).map(|i| format!("burst-{i}")).collect();
    let replies = futures::future::join_all(keys.iter().enumerate().map(|(i, k)| {
        let (path, body) = if i % 4 == 0 {
            ("/v1/withdrawals", withdrawal_body())
        } else {
            ("/v1/trades", trade_body())
        };
        let app = &f.app;
        let key = f.user_a.clone();
        async move { send(app, Method::POST, path, Some(&key), Some(k), Some(&body)).await }
    }))
    .await;
    for (k, r) in keys.iter().zip(&replies) {
        assert_eq!(r.status, StatusCode::CREATED, "{k}: {}", r.text);
        // Each answer is its own resource, committed with its record.
        let stored: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM idempotency_keys k JOIN workflows w ON w.id = k.resource_id
             JOIN jobs j ON j.workflow_id = w.id
             WHERE k.key = $1 AND w.id = $2::uuid AND k.response_status = 201",
        )
        .bind(k)
        .bind(r.json["id"].as_str().unwrap())
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
        assert_eq!(stored, 1, "{k}");
    }
    assert_eq!(count(&f, "SELECT count(*) FROM workflows").await, 41);
    assert_eq!(count(&f, "SELECT count(*) FROM jobs").await, 41);
    assert_eq!(count(&f, "SELECT count(*) FROM idempotency_keys").await, 41);
    // Fewer transactions than POSTs: some were committed together.
    let (transactions, posts) = batch_sizes(&f.admin).await;
    assert_eq!(posts, 41.0);
    assert!(transactions < posts, "{transactions} transactions");
}

#[tokio::test]
async fn a_shared_transaction_with_a_repeated_or_reused_key_answers_each_request_alone() {
    let f = fixture(20).await;
    let warm = post_trade(&f.app, &f.user_a, "warm").await;
    assert_eq!(warm.status, StatusCode::CREATED, "{}", warm.text);
    // Ten trades, "dup-3" twice more, and a withdrawal reusing "dup-5":
    // whichever of a pair runs first wins, the other replays or gets a 422.
    let mut posts: Vec<(&str, String, Value)> = (0..10)
        .map(|i| ("/v1/trades", format!("dup-{i}"), trade_body()))
        .collect();
    posts.push(("/v1/trades", "dup-3".into(), trade_body()));
    posts.push(("/v1/trades", "dup-3".into(), trade_body()));
    posts.push(("/v1/withdrawals", "dup-5".into(), withdrawal_body()));
    let replies = futures::future::join_all(posts.iter().map(|(path, k, body)| {
        let app = &f.app;
        let key = f.user_a.clone();
        async move { send(app, Method::POST, path, Some(&key), Some(k), Some(body)).await }
    }))
    .await;
    let dup3: Vec<&Reply> = posts
        .iter()
        .zip(&replies)
        .filter(|((_, k, _), _)| k == "dup-3")
        .map(|(_, r)| r)
        .collect();
    for r in &dup3 {
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.text, dup3[0].text, "one answer for one key");
    }
    let dup5: Vec<&Reply> = posts
        .iter()
        .zip(&replies)
        .filter(|((_, k, _), _)| k == "dup-5")
        .map(|(_, r)| r)
        .collect();
    let created = dup5
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .count();
    assert_eq!(created, 1, "{:?}", dup5);
    for r in dup5.iter().filter(|r| r.status != StatusCode::CREATED) {
        assert_problem(r, 422, "unprocessable");
    }
    for ((_, k, _), r) in posts.iter().zip(&replies) {
        if k != "dup-3" && k != "dup-5" {
            assert_eq!(r.status, StatusCode::CREATED, "{k}: {}", r.text);
        }
    }
    // One workflow, job and record per key; nothing of a losing request.
    assert_eq!(count(&f, "SELECT count(*) FROM workflows").await, 11);
    assert_eq!(count(&f, "SELECT count(*) FROM jobs").await, 11);
    assert_eq!(count(&f, "SELECT count(*) FROM idempotency_keys").await, 11);
}

#[tokio::test]
async fn every_way_of_ending_without_success_tells_the_owner_why() {
    let f = fixture(8).await;
    let trade = post_trade(&f.app, &f.user_a, "t-why").await;
    assert_eq!(trade.status, StatusCode::CREATED, "{}", trade.text);
    let withdrawal = send(
        &f.app,
        Method::POST,
        "/v1/withdrawals",
        Some(&f.user_a),
        Some("w-why"),
        Some(&withdrawal_body()),
    )
    .await;
    assert_eq!(
        withdrawal.status,
        StatusCode::CREATED,
        "{}",
        withdrawal.text
    );
    // An operator cancels the trade's workflow before it ran; the
    // withdrawal's fails (e.g. its first step exhausted its attempts).
    let end = |id: &Value, state: &str, why: &str| {
        sqlx::query(
            "UPDATE workflows SET state = $2, error = $3, finished_at = now() WHERE id = $1::uuid",
        )
        .bind(id.as_str().unwrap().to_string())
        .bind(state.to_string())
        .bind(why.to_string())
        .execute(&f.db.pool)
    };
    end(
        &trade.json["id"],
        "cancelled",
        "cancelled by admin ops: duplicate order",
    )
    .await
    .unwrap();
    end(
        &withdrawal.json["id"],
        "failed",
        "validate: the exchange was unreachable",
    )
    .await
    .unwrap();
    for (path, id, status, why) in [
        ("trades", &trade.json["id"], "cancelled", "duplicate order"),
        (
            "withdrawals",
            &withdrawal.json["id"],
            "rejected",
            "unreachable",
        ),
    ] {
        let got = send(
            &f.app,
            Method::GET,
            &format!("/v1/{path}/{}", id.as_str().unwrap()),
            Some(&f.user_a),
            None,
            None,
        )
        .await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text);
        assert_eq!(got.json["status"], status, "{}", got.text);
        let error = got.json["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{path}: {}", got.text);
    }
}
