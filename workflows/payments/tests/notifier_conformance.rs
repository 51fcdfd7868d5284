//! The notifier conformance suite, run once per implementation: the
//! in-process `SimulatedNotifier` and `HttpNotifier` against the simulator
//! server (the `exchange-sim` server, which serves the provider beside the
//! exchange) started in-process on port 0. Plus what only HTTP can get
//! wrong — a provider that is down, one that delivers and hangs, the
//! idempotency-key header — and the notification workflow sending through
//! the HTTP adapter against a real database: retried with backoff through an
//! outage, failed by a refusal, and delivered once across a lost answer.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use chrono::{DateTime, Utc};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::workflow_testing::WorkflowHarness;
use ledgerflow_engine::{ManualClock, RetryPolicy, Store, StoreConfig, WorkflowId};
use ledgerflow_payments::exchange::conformance as exchange_conformance;
use ledgerflow_payments::exchange::http::{HttpConfig as ExchangeHttpConfig, HttpExchange};
use ledgerflow_payments::exchange::server::{HttpSimControls, RunningSimulator, SimServerConfig};
use ledgerflow_payments::exchange::sim::{SimConfig, SimulatedExchange};
use ledgerflow_payments::notifier::conformance::{exercise, sample_notification};
use ledgerflow_payments::notifier::http::{HttpConfig, HttpNotifier, IDEMPOTENCY_KEY_HEADER};
use ledgerflow_payments::notifier::server::HttpNotifierControls;
use ledgerflow_payments::notifier::{
    Channel, Error, Notifier, NotifierControls, NotifyFault, SendReceipt, SimulatedNotifier,
};
use ledgerflow_payments::users;
use ledgerflow_payments::workflows::{self, Deps, WorkflowsConfig, notification};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn client_config() -> HttpConfig {
    HttpConfig {
        timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        api_key: None,
    }
}

async fn server() -> RunningSimulator {
    RunningSimulator::start(SimServerConfig {
        hang_for: Duration::from_secs(5),
        ..SimServerConfig::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn simulated_notifier_conforms() {
    let sim = Arc::new(SimulatedNotifier::new());
    exercise(sim.clone(), &*sim).await;
    // Every message that went out is in the log once.
    let mut ids: Vec<String> = sim.deliveries().into_iter().map(|n| n.id).collect();
    let total = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), total, "no id delivered twice: {ids:?}");
}

#[tokio::test]
async fn http_notifier_conforms() {
    let server = server().await;
    let notifier = Arc::new(HttpNotifier::new(&server.base_url(), client_config()).unwrap());
    let controls = HttpNotifierControls::new(&server.base_url()).unwrap();
    exercise(notifier, &controls).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn one_simulator_serves_the_exchange_and_the_provider_at_once() {
    let server = server().await;
    let exchange = Arc::new(
        HttpExchange::new(
            &server.base_url(),
            ExchangeHttpConfig {
                timeout: Duration::from_millis(500),
                connect_timeout: Duration::from_millis(500),
                api_key: None,
            },
        )
        .unwrap(),
    );
    let exchange_controls = HttpSimControls::new(&server.base_url(), None).unwrap();
    let notifier = Arc::new(HttpNotifier::new(&server.base_url(), client_config()).unwrap());
    let notifier_controls = HttpNotifierControls::new(&server.base_url()).unwrap();
    // Both suites, interleaved on one server: neither side's faults or
    // counters leak into the other's.
    tokio::join!(
        exchange_conformance::exercise(exchange, &exchange_controls),
        exercise(notifier, &notifier_controls),
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn provider_down_is_unavailable() {
    // Bind a port, then free it: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let notifier = HttpNotifier::new(&format!("http://{addr}/"), client_config()).unwrap();
    let err = notifier
        .send(&sample_notification("down:1"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(err.is_retryable());
    assert!(matches!(
        notifier.delivery("down:1").await,
        Err(Error::Unavailable(_))
    ));
}

#[tokio::test]
async fn provider_that_delivers_and_hangs_is_unknown_at_the_client_timeout() {
    let server = server().await;
    let notifier = HttpNotifier::new(&server.base_url(), client_config()).unwrap();
    let controls = HttpNotifierControls::new(&server.base_url()).unwrap();
    controls
        .fail_next(1, NotifyFault::AcceptThenTimeout)
        .await
        .unwrap();
    let note = sample_notification("hang:1");
    let started = Instant::now();
    let err = notifier.send(&note).await.unwrap_err();
    assert!(matches!(err, Error::Unknown(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the client timeout, not the server, ended the call"
    );
    // The adapter's own reconcile query sees the delivery.
    let delivered = notifier.delivery(&note.id).await.unwrap().unwrap();
    assert_eq!(delivered.notification, note);
    assert!(delivered.provider_message_id.starts_with("msg_"));
    assert_eq!(controls.counters(&note.id).await.unwrap().delivered, 1);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_idempotency_key_header_is_the_dedupe_key() {
    let server = server().await;
    let controls = HttpNotifierControls::new(&server.base_url()).unwrap();
    let url = format!("{}v1/notifications", server.base_url());
    let client = reqwest::Client::new();
    let note = sample_notification("hdr:1");

    // No header: refused before anything is recorded.
    let resp = client.post(&url).json(&note).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    // A header that disagrees with the body's id: refused too.
    let resp = client
        .post(&url)
        .header(IDEMPOTENCY_KEY_HEADER, "hdr:other")
        .json(&note)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    for id in ["hdr:1", "hdr:other"] {
        let counters = controls.counters(id).await.unwrap();
        assert_eq!((counters.attempts, counters.delivered), (0, 0), "{id}");
    }

    // 201 for the delivery, 200 with the same receipt for the repeat.
    let send = || {
        client
            .post(&url)
            .header(IDEMPOTENCY_KEY_HEADER, &note.id)
            .json(&note)
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 201);
    let first: SendReceipt = first.json().await.unwrap();
    let again = send().await.unwrap();
    assert_eq!(again.status(), 200);
    let again: SendReceipt = again.json().await.unwrap();
    assert!(!first.duplicate && again.duplicate);
    assert_eq!(first.provider_message_id, again.provider_message_id);

    // A body that is not a notification is a final refusal.
    let resp = client
        .post(&url)
        .header(IDEMPOTENCY_KEY_HEADER, "hdr:2")
        .header("content-type", "application/json")
        .body(r#"{"id":"hdr:2","channel":"fax"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "rejected");
    server.stop().await.unwrap();
}

// ------------------------------------------- the workflow through HTTP

/// 2030-01-01T00:00:00Z.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).unwrap()
}

struct Env {
    db: TestDb,
    clock: ManualClock,
    h: WorkflowHarness,
    controls: HttpNotifierControls,
    server: RunningSimulator,
}

impl Env {
    async fn new() -> TestResult<Self> {
        let db = TestDb::new().await?;
        let clock = ManualClock::new(t0());
        let store = Store::with_config(
            db.pool.clone(),
            StoreConfig {
                lease_ttl: Duration::from_secs(30),
                notify: false,
                retry: RetryPolicy {
                    base: Duration::from_secs(10),
                    max: Duration::from_secs(3600),
                    jitter: 0.0,
                },
            },
        )
        .with_clock(Arc::new(clock.clone()));
        let server = server().await;
        let registry = workflows::registry(Deps {
            exchange: Arc::new(SimulatedExchange::new(SimConfig::default())),
            notifier: Arc::new(HttpNotifier::new(&server.base_url(), client_config())?),
            config: WorkflowsConfig::default(),
        })?;
        Ok(Env {
            db,
            clock,
            h: WorkflowHarness::new(store, registry),
            controls: HttpNotifierControls::new(&server.base_url())?,
            server,
        })
    }

    /// Starts a `trade.settled` email to a new user; returns the workflow
    /// and the notification id.
    async fn start(&self, id: &str) -> TestResult<(WorkflowId, String)> {
        let mut conn = self.db.pool.acquire().await?;
        let user = users::create_user(&mut conn, "grace@example.com", "Grace").await?;
        let input = json!({
            "id": id,
            "user_id": user,
            "channel": Channel::Email,
            "template": "trade.settled",
            "payload": { "trade_id": "t-1", "side": "sell", "base": "ETH", "quote": "EUR" },
        });
        Ok((self.h.start(notification::KIND, &input).await?, id.into()))
    }

    /// Runs what is due, then moves the clock past the longest backoff.
    async fn run_and_wait(&self) -> TestResult {
        self.h.run_until_idle().await?;
        self.clock.advance(Duration::from_secs(3600));
        Ok(())
    }

    async fn row(&self, id: &str) -> TestResult<(String, Option<String>)> {
        Ok(
            sqlx::query_as("SELECT status, provider_message_id FROM notifications WHERE id = $1")
                .bind(id)
                .fetch_one(&self.db.pool)
                .await?,
        )
    }
}

#[tokio::test]
async fn workflow_retries_through_an_outage_and_delivers_once() -> TestResult {
    let env = Env::new().await?;
    env.controls.fail_next(3, NotifyFault::Unavailable).await?;
    let (wf, id) = env.start("wf-http:outage").await?;
    for _ in 0..3 {
        env.run_and_wait().await?;
        assert_eq!(env.controls.counters(&id).await?.delivered, 0);
        assert_eq!(env.row(&id).await?.0, "pending");
    }
    env.h.run_until_idle().await?;
    assert_eq!(env.h.state(wf).await?.state, "completed");
    let counters = env.controls.counters(&id).await?;
    assert_eq!((counters.attempts, counters.delivered), (4, 1));
    let delivery = env.controls.delivery(&id).await?.unwrap();
    assert_eq!(delivery.notification.to, "grace@example.com");
    assert_eq!(delivery.notification.subject, "Your trade was executed");
    assert_eq!(
        delivery.notification.body,
        "Trade t-1 (sell ETH/EUR) was filled and settled."
    );
    assert_eq!(
        env.row(&id).await?,
        ("sent".to_string(), Some(delivery.provider_message_id))
    );
    env.server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn workflow_fails_on_a_refusal_without_retrying() -> TestResult {
    let env = Env::new().await?;
    env.controls
        .fail_next(
            1,
            NotifyFault::Reject {
                reason: "mailbox does not exist".into(),
            },
        )
        .await?;
    let (wf, id) = env.start("wf-http:rejected").await?;
    env.run_and_wait().await?;
    env.h.run_until_idle().await?;
    assert_eq!(env.h.state(wf).await?.state, "failed");
    assert_eq!(env.row(&id).await?, ("rejected".to_string(), None));
    let counters = env.controls.counters(&id).await?;
    assert_eq!((counters.attempts, counters.delivered), (1, 0), "no retry");
    env.server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn workflow_delivers_once_across_a_lost_answer() -> TestResult {
    let env = Env::new().await?;
    env.controls
        .fail_next(1, NotifyFault::AcceptThenTimeout)
        .await?;
    let (wf, id) = env.start("wf-http:lost").await?;
    env.run_and_wait().await?;
    // The provider delivered; the step does not know and retries.
    assert_eq!(env.controls.counters(&id).await?.delivered, 1);
    assert_eq!(env.row(&id).await?.0, "pending");
    env.h.run_until_idle().await?;
    let wf_row = env.h.state(wf).await?;
    assert_eq!(wf_row.state, "completed");
    let counters = env.controls.counters(&id).await?;
    assert_eq!((counters.attempts, counters.delivered), (2, 1));
    let delivery = env.controls.delivery(&id).await?.unwrap();
    assert_eq!(
        env.row(&id).await?,
        ("sent".to_string(), Some(delivery.provider_message_id))
    );
    env.server.stop().await?;
    Ok(())
}
