//! The webhook intake (`POST /v1/webhooks/{provider}`), in-process against a
//! real Postgres: signatures (Stripe and GitHub style, rotation, staleness,
//! re-serialized JSON), dedupe under concurrency, nothing stored on refusal,
//! and the processing workflow started in the inbox's transaction.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use ledgerflow_api::webhooks::{EventIdSource, Provider, WebhookProviders};
use ledgerflow_api::{ApiConfig, AppState, public_app};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{ManualClock, Store};
use ledgerflow_payments::exchange::signature::{
    GITHUB_DELIVERY_HEADER, GITHUB_HEADER, STRIPE_HEADER, Scheme, github_header, stripe_header,
};
use ledgerflow_payments::exchange::sim::SimulatedExchange;
use ledgerflow_payments::notifier::SimulatedNotifier;
use ledgerflow_payments::workflows::{self, Deps, WorkflowsConfig};
use poem::http::StatusCode;
use poem::test::TestClient;
use serde_json::Value;
use std::sync::Arc;

const SECRET: &str = "whsec_current";
const OLD_SECRET: &str = "whsec_previous";
const GH_SECRET: &str = "gh_secret";

struct Fixture {
    db: TestDb,
    state: AppState,
}

fn providers() -> WebhookProviders {
    WebhookProviders::new()
        .with(
            "exchange",
            Provider::new(Scheme::Stripe, &[OLD_SECRET, SECRET]),
        )
        .with("gh", Provider::new(Scheme::Github, &[GH_SECRET]))
        .with(
            "gh-delivery",
            Provider {
                event_id: EventIdSource::Header(GITHUB_DELIVERY_HEADER.to_string()),
                ..Provider::new(Scheme::Github, &[GH_SECRET])
            },
        )
}

async fn fixture_with(config: ApiConfig) -> Fixture {
    fixture_on(config, None).await
}

/// A fixture whose store reads `clock` instead of the database's time.
async fn fixture_on(config: ApiConfig, clock: Option<Arc<ManualClock>>) -> Fixture {
    let db = TestDb::with_pool_size(16).await.unwrap();
    let mut store = Store::new(db.pool.clone());
    if let Some(clock) = clock {
        store = store.with_clock(clock);
    }
    let registry = workflows::registry(Deps {
        exchange: Arc::new(SimulatedExchange::default()),
        notifier: Arc::new(SimulatedNotifier::new()),
        config: WorkflowsConfig::default(),
    })
    .unwrap();
    let state = AppState::with_config(
        store,
        ApiConfig {
            webhooks: providers(),
            ..config
        },
    )
    .unwrap()
    .with_workflows(Arc::new(registry));
    Fixture { db, state }
}

async fn fixture() -> Fixture {
    fixture_with(ApiConfig::default()).await
}

/// An exchange event body, exactly as the provider would send it.
fn event_body(id: &str) -> String {
    format!(
        r#"{{ "id": "{id}",  "type": "order.filled", "idempotency_key": "trade:t1:place",
  "exchange_order_id": "ord-1", "filled_base": "0.10000000", "price": "100.00",
  "fee": "0.01", "created_at": "2026-01-01T00:00:00Z" }}"#
    )
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn post(
    state: &AppState,
    provider: &str,
    headers: &[(&str, String)],
    body: String,
) -> (StatusCode, Value) {
    let cli = TestClient::new(public_app(state.clone()));
    let mut req = cli
        .post(format!("/v1/webhooks/{provider}"))
        .content_type("application/json");
    for (k, v) in headers {
        req = req.header(*k, v.clone());
    }
    let resp = req.body(body).send().await;
    let status = resp.0.status();
    let text = resp.0.into_body().into_string().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

async fn post_stripe(state: &AppState, secret: &str, t: i64, body: &str) -> (StatusCode, Value) {
    let sig = stripe_header(secret.as_bytes(), t, body.as_bytes());
    post(state, "exchange", &[(STRIPE_HEADER, sig)], body.to_string()).await
}

async fn count(f: &Fixture, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&f.db.pool).await.unwrap()
}

async fn inbox_rows(f: &Fixture) -> i64 {
    count(f, "SELECT count(*) FROM inbox").await
}

async fn webhook_workflows(f: &Fixture) -> i64 {
    count(
        f,
        "SELECT count(*) FROM workflows WHERE kind = 'payments.webhook'",
    )
    .await
}

async fn assert_nothing_stored(f: &Fixture) {
    assert_eq!(inbox_rows(f).await, 0);
    assert_eq!(webhook_workflows(f).await, 0);
    assert_eq!(count(f, "SELECT count(*) FROM jobs").await, 0);
}

fn assert_problem(resp: &(StatusCode, Value), status: StatusCode) {
    assert_eq!(resp.0, status, "{}", resp.1);
    assert_eq!(resp.1["status"], status.as_u16(), "{}", resp.1);
    assert!(resp.1["type"].as_str().unwrap().starts_with("https://"));
}

#[tokio::test]
async fn valid_stripe_delivery_is_stored_and_started() {
    let f = fixture().await;
    let body = event_body("evt_1");
    let resp = post_stripe(&f.state, SECRET, now(), &body).await;
    assert_eq!(resp.0, StatusCode::OK, "{}", resp.1);
    assert_eq!(resp.1["status"], "accepted");

    let (source, key, payload): (String, String, Vec<u8>) =
        sqlx::query_as("SELECT source, dedupe_key, payload FROM inbox")
            .fetch_one(&f.db.pool)
            .await
            .unwrap();
    assert_eq!(source, "webhook:exchange");
    assert_eq!(key, "evt_1");
    assert_eq!(payload, body.as_bytes(), "the raw bytes are stored");

    let (state, input): (String, Value) = sqlx::query_as(
        "SELECT state, input FROM workflows WHERE unique_key = 'webhook:evt_1' AND kind = 'payments.webhook'",
    )
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(state, "running");
    assert_eq!(input["event"]["id"], "evt_1");
    assert!(count(&f, "SELECT count(*) FROM jobs").await >= 1);
}

#[tokio::test]
async fn the_same_webhook_twice_is_stored_once() {
    let f = fixture().await;
    let body = event_body("evt_dup");
    let first = post_stripe(&f.state, SECRET, now(), &body).await;
    let second = post_stripe(&f.state, SECRET, now(), &body).await;
    assert_eq!(first.0, StatusCode::OK);
    assert_eq!(first.1["status"], "accepted");
    assert_eq!(second.0, StatusCode::OK);
    assert_eq!(second.1["status"], "duplicate");
    assert_eq!(inbox_rows(&f).await, 1);
    assert_eq!(webhook_workflows(&f).await, 1);
    let metrics = f.state.metrics.render(&f.state.store).await;
    for status in ["accepted", "duplicate"] {
        assert!(
            metrics.contains(&format!(
                r#"ledgerflow_webhook_accepted_total{{provider="exchange",status="{status}"}} 1"#
            )),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn ten_concurrent_deliveries_store_one_row_and_one_workflow() {
    let f = fixture().await;
    let body = event_body("evt_race");
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let state = f.state.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            post_stripe(&state, SECRET, now(), &body).await
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        let (status, json) = t.await.unwrap();
        assert!(status.is_success(), "{status} {json}");
        if json["status"] == "accepted" {
            accepted += 1;
        } else {
            assert_eq!(json["status"], "duplicate");
        }
    }
    assert_eq!(accepted, 1);
    assert_eq!(inbox_rows(&f).await, 1);
    assert_eq!(webhook_workflows(&f).await, 1);
}

#[tokio::test]
async fn bad_signatures_are_401_and_store_nothing() {
    // The server's time is pinned: a timestamp one second outside the window
    // must be refused however long the requests take (with the wall clock,
    // a second boundary crossed between signing and checking let `t + 301`
    // in as 300).
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let f = fixture_on(ApiConfig::default(), Some(clock.clone())).await;
    let now = || clock.get().timestamp();
    let body = event_body("evt_bad");

    // Missing header.
    let resp = post(&f.state, "exchange", &[], body.clone()).await;
    assert_problem(&resp, StatusCode::UNAUTHORIZED);

    // Garbage header.
    let resp = post(
        &f.state,
        "exchange",
        &[(STRIPE_HEADER, "nonsense".to_string())],
        body.clone(),
    )
    .await;
    assert_problem(&resp, StatusCode::UNAUTHORIZED);

    // Well-formed but wrong MAC.
    let t = now();
    let resp = post(
        &f.state,
        "exchange",
        &[(STRIPE_HEADER, format!("t={t},v1={}", "ab".repeat(32)))],
        body.clone(),
    )
    .await;
    assert_problem(&resp, StatusCode::UNAUTHORIZED);

    // Wrong secret.
    let resp = post_stripe(&f.state, "not-a-live-secret", now(), &body).await;
    assert_problem(&resp, StatusCode::UNAUTHORIZED);

    // Signed over re-serialized JSON, raw body sent.
    let value: Value = serde_json::from_str(&body).unwrap();
    let reserialized = serde_json::to_string(&value).unwrap();
    assert_ne!(reserialized, body);
    let sig = stripe_header(SECRET.as_bytes(), now(), reserialized.as_bytes());
    let resp = post(&f.state, "exchange", &[(STRIPE_HEADER, sig)], body.clone()).await;
    assert_problem(&resp, StatusCode::UNAUTHORIZED);

    // Outside the ±300 s window, both ways.
    let resp = post_stripe(&f.state, SECRET, now() - 301, &body).await;
    assert_problem(&resp, StatusCode::UNAUTHORIZED);
    let resp = post_stripe(&f.state, SECRET, now() + 301, &body).await;
    assert_problem(&resp, StatusCode::UNAUTHORIZED);

    assert_nothing_stored(&f).await;
    let metrics = f.state.metrics.render(&f.state.store).await;
    assert!(
        metrics.contains(
            r#"ledgerflow_webhook_rejected_total{provider="exchange",reason="stale_timestamp"} 2"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"ledgerflow_webhook_rejected_total{provider="exchange",reason="bad_signature"} 3"#
    ));

    // Inside the window it is accepted.
    let resp = post_stripe(&f.state, SECRET, now() - 250, &body).await;
    assert_eq!(resp.0, StatusCode::OK, "{}", resp.1);
}

#[tokio::test]
async fn rotated_secrets_are_all_accepted() {
    let f = fixture().await;
    let resp = post_stripe(&f.state, OLD_SECRET, now(), &event_body("evt_old")).await;
    assert_eq!(resp.0, StatusCode::OK, "{}", resp.1);
    let resp = post_stripe(&f.state, SECRET, now(), &event_body("evt_new")).await;
    assert_eq!(resp.0, StatusCode::OK, "{}", resp.1);
    assert_eq!(inbox_rows(&f).await, 2);
    assert_eq!(webhook_workflows(&f).await, 2);
}

#[tokio::test]
async fn github_style_valid_and_invalid() {
    let f = fixture().await;
    let body = event_body("evt_gh");

    let bad = github_header(b"wrong", body.as_bytes());
    let resp = post(&f.state, "gh", &[(GITHUB_HEADER, bad)], body.clone()).await;
    assert_problem(&resp, StatusCode::UNAUTHORIZED);
    let resp = post(&f.state, "gh", &[], body.clone()).await;
    assert_problem(&resp, StatusCode::UNAUTHORIZED);
    assert_nothing_stored(&f).await;

    let good = github_header(GH_SECRET.as_bytes(), body.as_bytes());
    let resp = post(
        &f.state,
        "gh",
        &[(GITHUB_HEADER, good.clone())],
        body.clone(),
    )
    .await;
    assert_eq!(resp.0, StatusCode::OK, "{}", resp.1);
    assert_eq!(resp.1["status"], "accepted");
    let source: String = sqlx::query_scalar("SELECT source FROM inbox WHERE dedupe_key = 'evt_gh'")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(source, "webhook:gh");

    // A provider configured with a delivery header: the header is required,
    // but the payload's own id is the dedupe key, so the same event
    // redelivered under a fresh delivery id is a duplicate.
    let delivery = |id: &str| {
        [
            (GITHUB_HEADER, good.clone()),
            (GITHUB_DELIVERY_HEADER, id.to_string()),
        ]
    };
    let resp = post(
        &f.state,
        "gh-delivery",
        &[(GITHUB_HEADER, good.clone())],
        body.clone(),
    )
    .await;
    assert_problem(&resp, StatusCode::BAD_REQUEST);
    let resp = post(
        &f.state,
        "gh-delivery",
        &delivery("delivery-42"),
        body.clone(),
    )
    .await;
    assert_eq!(resp.0, StatusCode::OK, "{}", resp.1);
    let resp = post(
        &f.state,
        "gh-delivery",
        &delivery("delivery-42"),
        body.clone(),
    )
    .await;
    assert_eq!(resp.1["status"], "duplicate");
    let resp = post(&f.state, "gh-delivery", &delivery("delivery-43"), body).await;
    assert_eq!(resp.0, StatusCode::OK, "{}", resp.1);
    assert_eq!(resp.1["status"], "duplicate");
    let rows: Vec<(String, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
        "SELECT dedupe_key, processed_at FROM inbox WHERE source = 'webhook:gh-delivery'",
    )
    .fetch_all(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "one inbox row per event: {rows:?}");
    assert_eq!(rows[0].0, "evt_gh");
    // Same event as the `gh` delivery: one processing workflow, which owns
    // the event, so this second provider's row is processed at once rather
    // than left unprocessed forever.
    assert_eq!(webhook_workflows(&f).await, 1);
    assert!(
        rows[0].1.is_some(),
        "the duplicate event's inbox row is processed"
    );
}

#[tokio::test]
async fn unknown_provider_is_404() {
    let f = fixture().await;
    let body = event_body("evt_x");
    let sig = stripe_header(SECRET.as_bytes(), now(), body.as_bytes());
    let resp = post(&f.state, "nobody", &[(STRIPE_HEADER, sig)], body).await;
    assert_problem(&resp, StatusCode::NOT_FOUND);
    assert_nothing_stored(&f).await;
}

#[tokio::test]
async fn oversized_body_is_413() {
    let f = fixture_with(ApiConfig {
        body_limit: 1024,
        ..ApiConfig::default()
    })
    .await;
    let body = format!(
        r#"{{"id":"evt_big","type":"order.cancelled","idempotency_key":"k","created_at":"2026-01-01T00:00:00Z","pad":"{}"}}"#,
        "x".repeat(2048)
    );
    let resp = post_stripe(&f.state, SECRET, now(), &body).await;
    assert_problem(&resp, StatusCode::PAYLOAD_TOO_LARGE);
    assert_nothing_stored(&f).await;
}

#[tokio::test]
async fn signed_but_not_an_event_is_400_and_stores_nothing() {
    let f = fixture().await;
    let resp = post_stripe(&f.state, SECRET, now(), r#"{"id":"evt_q","type":"what"}"#).await;
    assert_problem(&resp, StatusCode::BAD_REQUEST);
    let resp = post_stripe(&f.state, SECRET, now(), r#"{"type":"order.filled"}"#).await;
    assert_problem(&resp, StatusCode::BAD_REQUEST);
    assert_nothing_stored(&f).await;
}

/// Issue 12 (3): a signed body with a duplicate key (which event id did
/// the provider mean?) or a U+0000 is refused with 400 after the signature
/// check; an unsigned one is still a 401 first.
#[tokio::test]
async fn signed_duplicate_keys_and_nul_are_400_and_store_nothing() {
    let f = fixture().await;
    let dup = event_body("evt_a").replacen('{', r#"{ "id": "evt_b","#, 1);
    let resp = post_stripe(&f.state, SECRET, now(), &dup).await;
    assert_problem(&resp, StatusCode::BAD_REQUEST);
    let nul = event_body("evt_\\u0000");
    let resp = post_stripe(&f.state, SECRET, now(), &nul).await;
    assert_problem(&resp, StatusCode::BAD_REQUEST);
    let resp = post_stripe(&f.state, "not-the-secret", now(), &dup).await;
    assert_problem(&resp, StatusCode::UNAUTHORIZED);
    assert_nothing_stored(&f).await;
}

#[tokio::test]
async fn database_down_is_503_never_2xx() {
    let f = fixture().await;
    f.db.pool.close().await;
    let resp = post_stripe(&f.state, SECRET, now(), &event_body("evt_down")).await;
    assert_problem(&resp, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn without_a_workflow_registry_valid_deliveries_are_503() {
    let db = TestDb::new().await.unwrap();
    let state = AppState::with_config(
        Store::new(db.pool.clone()),
        ApiConfig {
            webhooks: providers(),
            ..ApiConfig::default()
        },
    )
    .unwrap();
    let resp = post_stripe(&state, SECRET, now(), &event_body("evt_noreg")).await;
    assert_problem(&resp, StatusCode::SERVICE_UNAVAILABLE);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn processing_marks_the_inbox_row_processed_with_its_signal() {
    let f = fixture().await;
    let body = event_body("evt_proc");
    let resp = post_stripe(&f.state, SECRET, now(), &body).await;
    assert_eq!(resp.1["status"], "accepted", "{}", resp.1);
    let processed =
        "SELECT count(*) FROM inbox WHERE dedupe_key = 'evt_proc' AND processed_at IS NOT NULL";
    let signals = "SELECT count(*) FROM signals WHERE dedupe_key = 'evt_proc'";
    // Accepted means stored, not yet processed.
    assert_eq!(count(&f, processed).await, 0);
    assert_eq!(count(&f, signals).await, 0);

    // Run the processing workflow the way a worker would.
    let registry = workflows::registry(Deps {
        exchange: Arc::new(SimulatedExchange::default()),
        notifier: Arc::new(SimulatedNotifier::new()),
        config: WorkflowsConfig::default(),
    })
    .unwrap();
    let h = ledgerflow_engine::workflow_testing::WorkflowHarness::new(
        Store::new(f.db.pool.clone()),
        registry,
    );
    h.run_until_idle().await.unwrap();
    assert_eq!(count(&f, signals).await, 1);
    assert_eq!(count(&f, processed).await, 1);
    // The row was marked by the step that sent the signal, in the same
    // transaction (rows written by one transaction share its xmin).
    let same: bool = sqlx::query_scalar(
        "SELECT i.xmin::text = s.xmin::text FROM inbox i, signals s
         WHERE i.dedupe_key = 'evt_proc' AND s.dedupe_key = 'evt_proc'",
    )
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert!(
        same,
        "inbox row and signal committed in different transactions"
    );

    // A redelivery is a duplicate and changes nothing.
    let again = post_stripe(&f.state, SECRET, now(), &body).await;
    assert_eq!(again.1["status"], "duplicate");
    h.run_until_idle().await.unwrap();
    assert_eq!(count(&f, signals).await, 1);
    assert_eq!(count(&f, processed).await, 1);
}

#[tokio::test]
async fn an_accepted_delivery_wakes_its_queue() {
    // Workers listening for the queue learn about the processing workflow's
    // first job without waiting for their next poll.
    let f = fixture().await;
    let mut listener = ledgerflow_engine::notify::Listener::connect(&f.db.pool)
        .await
        .unwrap();
    let resp = post_stripe(&f.state, SECRET, now(), &event_body("evt_wake")).await;
    assert_eq!(resp.0, StatusCode::OK, "{}", resp.1);
    assert_eq!(resp.1["status"], "accepted");
    let queue: String = sqlx::query_scalar(
        "SELECT j.queue FROM jobs j JOIN workflows w ON w.id = j.workflow_id
         WHERE w.unique_key = 'webhook:evt_wake'",
    )
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    let woken = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
        .await
        .expect("a wake-up within 10 s")
        .unwrap();
    assert_eq!(woken, Some(ledgerflow_engine::notify::Wakeup::Jobs(queue)));
}
