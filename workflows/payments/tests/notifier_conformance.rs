//! The notifier conformance suite, run once per implementation: the
//! in-process `SimulatedNotifier` and `HttpNotifier` against the simulator
//! server (the `exchange-sim` server, which serves the provider beside the
//! exchange) started in-process on port 0. Plus what only HTTP can get
//! wrong — a provider that is down, one that delivers and hangs, the
//! idempotency-key header, a bare 404 that is not the provider's answer —
//! and the notification workflow sending through the HTTP adapter against a
//! real database: retried with backoff through an outage, failed by a
//! refusal, and, when the outcome of a send is unknown (a lost answer, a
//! lost request, a worker that died during the send), put in doubt and
//! reconciled by asking the provider: found → delivered once, nothing sent
//! again; not found → sent again once under the same id; no answer → still
//! in doubt, asked again later.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use chrono::{DateTime, Utc};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::workflow::StepRow;
use ledgerflow_engine::workflow_testing::WorkflowHarness;
use ledgerflow_engine::{ManualClock, WorkflowId};
use ledgerflow_payments::exchange::conformance as exchange_conformance;
use ledgerflow_payments::exchange::http::{HttpConfig as ExchangeHttpConfig, HttpExchange};
use ledgerflow_payments::exchange::server::{HttpSimControls, RunningSimulator, SimServerConfig};
use ledgerflow_payments::exchange::sim::{SimConfig, SimulatedExchange};
use ledgerflow_payments::notifier::conformance::{exercise, sample_notification};
use ledgerflow_payments::notifier::http::{HttpConfig, HttpNotifier, IDEMPOTENCY_KEY_HEADER};
use ledgerflow_payments::notifier::server::HttpNotifierControls;
use ledgerflow_payments::notifier::{
    Channel, Error, Notification, Notifier, NotifierControls, NotifyFault, SendReceipt,
    SimulatedNotifier,
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
async fn a_bare_404_is_no_answer_to_the_reconcile_query() {
    let server = server().await;
    let controls = HttpNotifierControls::new(&server.base_url()).unwrap();
    // The provider's own 404 (its error body) means "never delivered" …
    let notifier = HttpNotifier::new(&server.base_url(), client_config()).unwrap();
    assert_eq!(notifier.delivery_status("path:1").await, Ok(None));
    // … a 404 from a wrong base path (a proxy, a typo in the URL) does not:
    // reading it as "absent" would turn a misrouted query into a re-send.
    let misrouted =
        HttpNotifier::new(&format!("{}elsewhere/", server.base_url()), client_config()).unwrap();
    let err = misrouted.delivery_status("path:1").await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert_eq!(controls.counters("path:1").await.unwrap().lookups, 1);
    server.stop().await.unwrap();
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
        Self::with_notifier(|http| Arc::new(http)).await
    }

    /// An environment whose workflows reach the simulator through
    /// `wrap(the HTTP adapter)`.
    async fn with_notifier(
        wrap: impl FnOnce(HttpNotifier) -> Arc<dyn Notifier>,
    ) -> TestResult<Self> {
        let db = TestDb::new().await?;
        let clock = ManualClock::new(t0());
        let store = ledgerflow_engine::testing::manual_store(&db.pool, &clock);
        let server = server().await;
        let registry = workflows::registry(Deps {
            exchange: Arc::new(SimulatedExchange::new(SimConfig::default())),
            notifier: wrap(HttpNotifier::new(&server.base_url(), client_config())?),
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

    /// The journal row of the `send` step.
    async fn send_step(&self, wf: WorkflowId) -> TestResult<StepRow> {
        self.h
            .journal(wf)
            .await?
            .into_iter()
            .find(|r| r.step == notification::SEND_STEP)
            .ok_or_else(|| "no journal row for the send step".into())
    }

    /// `(attempts, delivered, lookups)` at the simulator.
    async fn counted(&self, id: &str) -> TestResult<(u64, u64, u64)> {
        let c = self.controls.counters(id).await?;
        Ok((c.attempts, c.delivered, c.lookups))
    }

    /// Runs `render` and `send` (and nothing else), then checks that the
    /// send's outcome is unknown: the step waits in doubt, its intent and
    /// the unknown answer journaled under its idempotency key, and the row is
    /// still `pending`.
    async fn run_into_doubt(&self, wf: WorkflowId, id: &str) -> TestResult {
        for step in ["render", notification::SEND_STEP] {
            let ran = self.h.run_next_step().await?.ok_or("a step was due")?;
            assert_eq!(ran.step.as_deref(), Some(step));
        }
        let state = self.h.state(wf).await?;
        assert_eq!(state.state, "waiting");
        assert_eq!(state.wait_reason.as_deref(), Some("in_doubt:send"));
        let journal = self.send_step(wf).await?;
        assert_eq!(journal.status, "in_doubt");
        assert_eq!(journal.idempotency_key, format!("{wf}:send"));
        assert_eq!(journal.call_state.as_deref(), Some("unknown"));
        assert_eq!(self.row(id).await?, ("pending".to_string(), None));
        Ok(())
    }

    /// After reconciliation: the workflow completed with the provider's
    /// message id, the row is `sent` with it, the step was settled by the
    /// reconcile hook, and the simulator delivered `id` once, as rendered.
    async fn assert_delivered_once(&self, wf: WorkflowId, id: &str) -> TestResult<Notification> {
        let state = self.h.state(wf).await?;
        assert_eq!(state.state, "completed");
        let delivery = self.controls.delivery(id).await?.ok_or("delivered")?;
        assert_eq!(
            state
                .output
                .as_ref()
                .and_then(|o| o["provider_message_id"].as_str()),
            Some(delivery.provider_message_id.as_str())
        );
        assert_eq!(
            self.row(id).await?,
            (
                "sent".to_string(),
                Some(delivery.provider_message_id.clone())
            )
        );
        let journal = self.send_step(wf).await?;
        assert_eq!(journal.status, "completed");
        assert_eq!(journal.resolved_by.as_deref(), Some("reconcile"));
        assert_eq!(self.controls.counters(id).await?.delivered, 1);
        assert_eq!(delivery.notification.id, id, "the same id, the dedupe key");
        assert_eq!(delivery.notification.to, "grace@example.com");
        Ok(delivery.notification)
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
async fn lost_answer_goes_in_doubt_and_the_reconcile_finds_the_delivery() -> TestResult {
    let env = Env::new().await?;
    env.controls
        .fail_next(1, NotifyFault::AcceptThenTimeout)
        .await?;
    let (wf, id) = env.start("wf-http:lost").await?;
    env.run_into_doubt(wf, &id).await?;
    // The provider delivered; the step does not know, and sends nothing more.
    assert_eq!(env.counted(&id).await?, (1, 1, 0));
    // The reconcile hook is due at once: it asks, finds the delivery, settles.
    let ran = env.h.run_until_idle().await?;
    assert_eq!(ran.len(), 1, "one reconcile ask: {ran:?}");
    assert_eq!(ran[0].args["wake"], "reconcile");
    env.assert_delivered_once(wf, &id).await?;
    assert_eq!(
        env.counted(&id).await?,
        (1, 1, 1),
        "one send, one lookup: never sent again"
    );
    let output = env.h.state(wf).await?.output.ok_or("an output")?;
    assert_eq!(
        output["duplicate"], true,
        "settled from the provider's record"
    );
    // Nothing is left to run, however long we wait.
    env.run_and_wait().await?;
    env.h.run_until_idle().await?;
    assert_eq!(env.counted(&id).await?, (1, 1, 1));
    env.server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn lost_request_goes_in_doubt_and_is_resent_once_under_the_same_id() -> TestResult {
    let env = Env::new().await?;
    env.controls
        .fail_next(1, NotifyFault::LostBeforeDelivery)
        .await?;
    let (wf, id) = env.start("wf-http:lost-request").await?;
    env.run_into_doubt(wf, &id).await?;
    assert_eq!(env.counted(&id).await?, (1, 0, 0), "nothing went out");
    env.h.run_until_idle().await?;
    let sent = env.assert_delivered_once(wf, &id).await?;
    assert_eq!(
        env.counted(&id).await?,
        (2, 1, 1),
        "one lookup found nothing, then exactly one more send"
    );
    assert_eq!(sent.subject, "Your trade was executed");
    assert_eq!(
        sent.body,
        "Trade t-1 (sell ETH/EUR) was filled and settled."
    );
    let output = env.h.state(wf).await?.output.ok_or("an output")?;
    assert_eq!(output["duplicate"], false, "delivered by the re-send");
    env.run_and_wait().await?;
    env.h.run_until_idle().await?;
    assert_eq!(env.counted(&id).await?, (2, 1, 1));
    env.server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn in_doubt_stays_in_doubt_while_the_provider_cannot_answer() -> TestResult {
    let env = Env::new().await?;
    env.controls
        .fail_next(1, NotifyFault::LostBeforeDelivery)
        .await?;
    env.controls.fail_next_lookups(2).await?;
    let (wf, id) = env.start("wf-http:lookup-outage").await?;
    env.run_into_doubt(wf, &id).await?;
    for (asked, lookups) in [(1, 1), (2, 2)] {
        // The ask fails: still in doubt, nothing sent, asked again later.
        env.run_and_wait().await?;
        let journal = env.send_step(wf).await?;
        assert_eq!(journal.status, "in_doubt", "after ask {asked}");
        assert_eq!(journal.reconcile_attempts, asked);
        assert_eq!(env.h.state(wf).await?.state, "waiting");
        assert_eq!(env.counted(&id).await?, (1, 0, lookups));
        assert_eq!(env.row(&id).await?.0, "pending");
    }
    // The provider answers the third ask: nothing there, so one re-send.
    env.h.run_until_idle().await?;
    env.assert_delivered_once(wf, &id).await?;
    assert_eq!(env.send_step(wf).await?.reconcile_attempts, 3);
    assert_eq!(env.counted(&id).await?, (2, 1, 3));
    env.server.stop().await?;
    Ok(())
}

/// A provider client whose worker "dies" during its send: the request goes
/// out (and is delivered), the answer never comes back.
struct DiesDuringSend(HttpNotifier);

#[async_trait::async_trait]
impl Notifier for DiesDuringSend {
    async fn send(&self, n: &Notification) -> ledgerflow_payments::notifier::Result<SendReceipt> {
        let _delivered = self.0.send(n).await;
        std::future::pending().await
    }

    async fn delivery_status(
        &self,
        id: &str,
    ) -> ledgerflow_payments::notifier::Result<Option<SendReceipt>> {
        self.0.delivery_status(id).await
    }
}

#[tokio::test]
async fn a_worker_that_dies_during_the_send_leaves_it_in_doubt_never_resent() -> TestResult {
    let env = Env::with_notifier(|http| Arc::new(DiesDuringSend(http))).await?;
    let (wf, id) = env.start("wf-http:crash").await?;
    env.h.run_next_step().await?.ok_or("render was due")?;
    // The send step: the intent commits, the request is delivered, then the
    // worker is gone (its future dropped: its transaction rolls back, its
    // lease stays until it expires).
    let died = tokio::time::timeout(Duration::from_secs(2), env.h.run_next_step()).await;
    assert!(died.is_err(), "the send never answered");
    let journal = env.send_step(wf).await?;
    assert_eq!(
        (journal.status.as_str(), journal.call_state.as_deref()),
        ("calling", Some("calling")),
        "only the intent was committed"
    );
    assert_eq!(env.counted(&id).await?, (1, 1, 0));
    // A survivor rescues the lease and runs on: the step finds an intent
    // without an answer, goes in doubt, and the reconcile finds the delivery.
    env.clock.advance(Duration::from_secs(31));
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.h.store().job_rescue_expired(10).await? == 0 {
        assert!(
            Instant::now() < deadline,
            "the dead worker's lease was rescued"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.h.run_until_idle().await?;
    env.assert_delivered_once(wf, &id).await?;
    assert_eq!(env.counted(&id).await?, (1, 1, 1), "never sent again");
    env.server.stop().await?;
    Ok(())
}
