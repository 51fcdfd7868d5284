//! The simulated exchange over HTTP: [`serve_simulator`] (poem), the
//! `exchange-sim` binary's whole logic, plus the test-side helpers
//! [`HttpSimControls`] and [`WebhookCapture`].
//!
//! The server takes a bound listener and a shutdown future (as mini-redis
//! does), so tests bind port 0 in-process and stop it cleanly.
//!
//! API (JSON bodies; amounts as strings):
//!
//! | method and path | answer |
//! |---|---|
//! | `POST /v1/orders` ([`OrderRequest`]) | 200 [`super::OrderAck`], 422 rejected |
//! | `GET /v1/orders/by-key/{key}` | 200 [`super::OrderStatus`], 404, 422 (the order was rejected) |
//! | `POST /v1/orders/by-key/{key}/cancel` | 200 [`super::OrderStatus`], 422 |
//! | `POST /v1/withdrawals` ([`WithdrawalRequest`]) | 200 [`super::WithdrawalAck`], 422 |
//! | `GET /v1/withdrawals/by-key/{key}` | 200 [`super::WithdrawalStatus`], 404, 422 (rejected) |
//! | `PUT /admin/fault` (`{"fault": Fault or null, "key": null or "…"}`) | 204 |
//! | `POST /admin/advance` (`{"ms": n}`) | 200 [`AdvanceReport`] |
//! | `GET /admin/counters`, `GET /admin/counters/{key}` | 200 counters |
//! | `GET /healthz` | 200 |
//! | `POST /v1/notifications`, `GET /v1/notifications/{id}`, `/admin/notifications/…` | the simulated email/push provider, see [`crate::notifier::server`] |
//!
//! Errors are `{"error": "rejected"|"unknown"|"unavailable", "reason": "…"}`.
//! Every `/v1/orders…` and `/v1/withdrawals…` request is charged to the caller's request
//! budget (API key from `Authorization: Bearer …`, else `anonymous`; weights in
//! [`super::weight`]) before it is processed; over the budget the answer is 429 with
//! `Retry-After` (whole seconds) and nothing is processed.
//! Under [`Fault::AcceptThenTimeout`] the call is recorded and the answer is
//! held for [`SimServerConfig::hang_for`] (then 504): a client with a shorter
//! timeout sees exactly what a lost answer looks like.
//!
//! Events are POSTed to [`WebhookTarget::url`] when they become due (on
//! `/admin/advance`, or every [`SimServerConfig::tick`] of wall time), signed
//! per [`Scheme`]; a delivery that fails is retried at the next delivery
//! with the same event id.

use super::signature::{self, Scheme};
use super::sim::{Fault, KeyCounters, SimConfig, SimControls, SimulatedExchange};
use super::{Error, Event, IdempotencyKey, OrderRequest, Result, WithdrawalRequest};
use async_trait::async_trait;
use poem::Request;
use poem::http::{HeaderMap, StatusCode};
use poem::listener::TcpAcceptor;
use poem::web::{Data, Path};
use poem::{EndpointExt, Response, Route, Server, get, handler, post, put};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Where and how the simulator delivers webhooks.
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    /// The receiving endpoint, e.g. `http://127.0.0.1:8080/v1/webhooks/sim`.
    pub url: String,
    /// The shared HMAC secret.
    pub secret: String,
    /// The header style.
    pub scheme: Scheme,
}

/// Everything [`serve_simulator`] needs.
#[derive(Debug, Clone)]
pub struct SimServerConfig {
    /// The simulated exchange's own settings.
    pub sim: SimConfig,
    /// Where events go; without one they are only returned by `/admin/advance`.
    pub webhook: Option<WebhookTarget>,
    /// How long an accept-then-timeout call holds its answer.
    pub hang_for: Duration,
    /// Advance the logical clock by this much every this much wall time
    /// (the binary's default); `None` leaves time to `/admin/advance`.
    pub tick: Option<Duration>,
    /// Timeout of one webhook POST.
    pub delivery_timeout: Duration,
}

impl Default for SimServerConfig {
    fn default() -> Self {
        SimServerConfig {
            sim: SimConfig::default(),
            webhook: None,
            hang_for: Duration::from_secs(30),
            tick: None,
            delivery_timeout: Duration::from_secs(5),
        }
    }
}

/// The answer of `POST /admin/advance`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AdvanceReport {
    /// Events delivered (to the webhook when one is configured).
    pub delivered: Vec<Event>,
    /// Deliveries that failed and were queued again.
    pub failed: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct FaultRequest {
    fault: Option<Fault>,
    #[serde(default)]
    key: Option<IdempotencyKey>,
}

#[derive(Debug, Serialize, Deserialize)]
struct AdvanceRequest {
    ms: u64,
}

struct App {
    sim: SimulatedExchange,
    webhook: Option<WebhookTarget>,
    client: reqwest::Client,
    hang_for: Duration,
}

/// Serves the simulator on `listener` until `shutdown` resolves.
pub async fn serve_simulator(
    listener: tokio::net::TcpListener,
    config: SimServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(config.delivery_timeout)
        .build()
        .map_err(std::io::Error::other)?;
    let app = Arc::new(App {
        sim: SimulatedExchange::new(config.sim.clone()),
        webhook: config.webhook.clone(),
        client,
        hang_for: config.hang_for,
    });
    let routes = Route::new()
        .at("/healthz", get(healthz))
        .at("/v1/orders", post(place_order))
        .at("/v1/orders/by-key/:key", get(get_order))
        .at("/v1/orders/by-key/:key/cancel", post(cancel_order))
        .at("/v1/withdrawals", post(submit_withdrawal))
        .at("/v1/withdrawals/by-key/:key", get(get_withdrawal))
        .at("/admin/fault", put(set_fault))
        .at("/admin/advance", post(advance))
        .at("/admin/counters", get(counters))
        .at("/admin/counters/:key", get(counters_for));
    // The notification provider simulator lives beside the exchange, so one
    // `exchange-sim` process serves both adapters' HTTP implementations.
    let routes = crate::notifier::server::mount(routes, config.hang_for).data(app.clone());
    let server = Server::new_with_acceptor(TcpAcceptor::from_tokio(listener)?)
        .run_with_graceful_shutdown(routes, shutdown, Some(Duration::from_secs(1)));
    match config.tick {
        Some(tick) if !tick.is_zero() => {
            tokio::select! {
                r = server => r,
                () = ticker(app, tick) => Ok(()),
            }
        }
        _ => server.await,
    }
}

async fn ticker(app: Arc<App>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let events = app.sim.advance(tick);
        deliver(&app, events).await;
    }
}

/// A simulator server running in the background (tests, dev tools).
#[derive(Debug)]
pub struct RunningSimulator {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningSimulator {
    /// Binds `127.0.0.1:0` and serves `config` on a spawned task.
    pub async fn start(config: SimServerConfig) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_simulator(listener, config, async move {
            let _ = rx.await;
        }));
        Ok(RunningSimulator {
            addr,
            shutdown: Some(tx),
            task,
        })
    }

    /// `http://{addr}/`.
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.map_err(std::io::Error::other)?
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------- handlers

/// A JSON response (also used by the notification provider's endpoints).
pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => Response::builder()
            .status(status)
            .content_type("application/json")
            .body(body),
        Err(e) => Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(e.to_string()),
    }
}

impl App {
    async fn error(&self, e: Error) -> Response {
        match e {
            Error::Rejected(_) => json(StatusCode::UNPROCESSABLE_ENTITY, &e),
            Error::Unknown(_) => {
                // Accepted, then the answer is "lost": hold it past any sane
                // client timeout.
                tokio::time::sleep(self.hang_for).await;
                json(StatusCode::GATEWAY_TIMEOUT, &e)
            }
            Error::Unavailable(_) => json(StatusCode::SERVICE_UNAVAILABLE, &e),
        }
    }
}

/// Charges the request's API key (its bearer token) `weight`; `Some` is the 429 to answer.
fn charge(app: &App, req: &Request, weight: u32) -> Option<Response> {
    let key = req
        .headers()
        .get(poem::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("anonymous");
    app.sim.charge(key, weight).err().map(|wait| {
        let secs = wait.as_millis().div_ceil(1000).max(1);
        let body = Error::Unavailable(format!("rate limited: retry after {secs} s"));
        let mut r = json(StatusCode::TOO_MANY_REQUESTS, &body);
        if let Ok(v) = secs.to_string().parse() {
            r.headers_mut().insert(poem::http::header::RETRY_AFTER, v);
        }
        r
    })
}

fn bad_body(e: serde_json::Error) -> Response {
    json(
        StatusCode::UNPROCESSABLE_ENTITY,
        &Error::Rejected(format!("bad request body: {e}")),
    )
}

#[handler]
fn healthz() -> &'static str {
    "ok"
}

#[handler]
async fn place_order(req: &Request, Data(app): Data<&Arc<App>>, body: Vec<u8>) -> Response {
    if let Some(r) = charge(app, req, super::weight::PLACE_ORDER) {
        return r;
    }
    let order: OrderRequest = match serde_json::from_slice(&body) {
        Ok(o) => o,
        Err(e) => return bad_body(e),
    };
    match app.sim.place_uncharged(&order) {
        Ok(ack) => json(StatusCode::OK, &ack),
        Err(e) => app.error(e).await,
    }
}

#[handler]
async fn get_order(req: &Request, Data(app): Data<&Arc<App>>, Path(key): Path<String>) -> Response {
    if let Some(r) = charge(app, req, super::weight::ORDER_LOOKUP) {
        return r;
    }
    match app.sim.order_status(&IdempotencyKey::new(key)) {
        Ok(Some(s)) => json(StatusCode::OK, &s),
        Ok(None) => json(
            StatusCode::NOT_FOUND,
            &Error::Rejected("no such order".into()),
        ),
        Err(e) => app.error(e).await,
    }
}

#[handler]
async fn cancel_order(
    req: &Request,
    Data(app): Data<&Arc<App>>,
    Path(key): Path<String>,
) -> Response {
    if let Some(r) = charge(app, req, super::weight::CANCEL_ORDER) {
        return r;
    }
    match app.sim.cancel_uncharged(&IdempotencyKey::new(key)) {
        Ok(s) => json(StatusCode::OK, &s),
        Err(e) => app.error(e).await,
    }
}

#[handler]
async fn submit_withdrawal(req: &Request, Data(app): Data<&Arc<App>>, body: Vec<u8>) -> Response {
    if let Some(r) = charge(app, req, super::weight::SUBMIT_WITHDRAWAL) {
        return r;
    }
    let w: WithdrawalRequest = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => return bad_body(e),
    };
    match app.sim.submit_uncharged(&w) {
        Ok(ack) => json(StatusCode::OK, &ack),
        Err(e) => app.error(e).await,
    }
}

#[handler]
async fn get_withdrawal(
    req: &Request,
    Data(app): Data<&Arc<App>>,
    Path(key): Path<String>,
) -> Response {
    if let Some(r) = charge(app, req, super::weight::WITHDRAWAL_LOOKUP) {
        return r;
    }
    match app.sim.withdrawal_status(&IdempotencyKey::new(key)) {
        Ok(Some(s)) => json(StatusCode::OK, &s),
        Ok(None) => json(
            StatusCode::NOT_FOUND,
            &Error::Rejected("no such withdrawal".into()),
        ),
        Err(e) => app.error(e).await,
    }
}

#[handler]
async fn set_fault(Data(app): Data<&Arc<App>>, body: Vec<u8>) -> Response {
    let req: FaultRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_body(e),
    };
    match (req.key, req.fault) {
        (Some(key), Some(fault)) => app.sim.set_fault_for(&key, fault),
        (Some(_), None) => {
            return json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &Error::Rejected("a per-key fault needs a fault".into()),
            );
        }
        (None, fault) => app.sim.set_fault(fault),
    }
    Response::builder().status(StatusCode::NO_CONTENT).finish()
}

#[handler]
async fn advance(Data(app): Data<&Arc<App>>, body: Vec<u8>) -> Response {
    let req: AdvanceRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_body(e),
    };
    let events = app.sim.advance(Duration::from_millis(req.ms));
    let report = deliver(app, events).await;
    json(StatusCode::OK, &report)
}

#[handler]
fn counters(Data(app): Data<&Arc<App>>) -> Response {
    json(StatusCode::OK, &app.sim.counters())
}

#[handler]
fn counters_for(Data(app): Data<&Arc<App>>, Path(key): Path<String>) -> Response {
    json(
        StatusCode::OK,
        &app.sim.counters_for(&IdempotencyKey::new(key)),
    )
}

// ---------------------------------------------------------------- webhooks

async fn deliver(app: &App, events: Vec<Event>) -> AdvanceReport {
    let mut report = AdvanceReport::default();
    for event in events {
        let Some(target) = &app.webhook else {
            report.delivered.push(event);
            continue;
        };
        match post_webhook(&app.client, target, &event).await {
            Ok(()) => report.delivered.push(event),
            Err(e) => {
                tracing::warn!(event_id = %event.id, error = %e, "webhook delivery failed; will retry");
                report.failed += 1;
                app.sim.redeliver(event);
            }
        }
    }
    report
}

/// The headers that sign `body` for `target` (also used by tests that forge
/// deliveries).
pub fn webhook_headers(
    scheme: Scheme,
    secret: &[u8],
    body: &[u8],
    event: &Event,
    unix_now: i64,
) -> Vec<(&'static str, String)> {
    match scheme {
        Scheme::Stripe => vec![(
            signature::STRIPE_HEADER,
            signature::stripe_header(secret, unix_now, body),
        )],
        Scheme::Github => vec![
            (
                signature::GITHUB_HEADER,
                signature::github_header(secret, body),
            ),
            (
                signature::GITHUB_DELIVERY_HEADER,
                uuid::Uuid::now_v7().to_string(),
            ),
            (signature::GITHUB_EVENT_HEADER, event.kind.as_str().into()),
        ],
    }
}

async fn post_webhook(
    client: &reqwest::Client,
    target: &WebhookTarget,
    event: &Event,
) -> std::result::Result<(), String> {
    let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    let headers = webhook_headers(
        target.scheme,
        target.secret.as_bytes(),
        &body,
        event,
        chrono::Utc::now().timestamp(),
    );
    let mut req = client
        .post(&target.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        req = req.header(name, value);
    }
    let resp = req.body(body).send().await.map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("receiver answered {}", resp.status()))
    }
}

// ------------------------------------------------------ test-side helpers

/// One webhook delivery as received: the exact raw body and the headers.
#[derive(Debug, Clone)]
pub struct CapturedWebhook {
    /// Header name (lowercase) → value.
    pub headers: Vec<(String, String)>,
    /// The body bytes, exactly as received.
    pub body: Vec<u8>,
}

impl CapturedWebhook {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct CaptureState {
    received: Mutex<Vec<CapturedWebhook>>,
    fail_next: Mutex<u32>,
}

/// A webhook receiver on `127.0.0.1:0` that keeps every delivery's raw bytes,
/// answering 200 (or 500 for the next `fail_next` deliveries).
#[derive(Debug)]
pub struct WebhookCapture {
    state: Arc<CaptureState>,
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for CaptureState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureState").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[handler]
async fn capture_webhook(
    Data(state): Data<&Arc<CaptureState>>,
    headers: &HeaderMap,
    body: Vec<u8>,
) -> StatusCode {
    let headers = headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    lock(&state.received).push(CapturedWebhook { headers, body });
    let mut fail = lock(&state.fail_next);
    if *fail > 0 {
        *fail -= 1;
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    }
}

impl WebhookCapture {
    /// Starts the receiver.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(CaptureState::default());
        let (tx, rx) = oneshot::channel::<()>();
        let app = Route::new()
            .at("/*path", post(capture_webhook))
            .data(state.clone());
        let acceptor = TcpAcceptor::from_tokio(listener)?;
        tokio::spawn(async move {
            let _ = Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(
                    app,
                    async move {
                        let _ = rx.await;
                    },
                    Some(Duration::from_secs(1)),
                )
                .await;
        });
        Ok(WebhookCapture {
            state,
            addr,
            shutdown: Some(tx),
        })
    }

    /// The URL to configure as [`WebhookTarget::url`].
    pub fn url(&self) -> String {
        format!("http://{}/v1/webhooks/sim", self.addr)
    }

    /// Takes the deliveries received so far (failed ones included).
    pub fn take(&self) -> Vec<CapturedWebhook> {
        std::mem::take(&mut *lock(&self.state.received))
    }

    /// Answers 500 to the next `n` deliveries.
    pub fn fail_next(&self, n: u32) {
        *lock(&self.state.fail_next) = n;
    }
}

impl Drop for WebhookCapture {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Verifies a captured delivery's signature over its raw body.
pub fn verify_captured(
    scheme: Scheme,
    secret: &[u8],
    delivery: &CapturedWebhook,
    unix_now: i64,
) -> std::result::Result<(), signature::Error> {
    match scheme {
        Scheme::Stripe => {
            let header = delivery
                .header(signature::STRIPE_HEADER)
                .ok_or(signature::Error::Malformed("no signature header"))?;
            signature::verify_stripe(&[secret], header, &delivery.body, unix_now, 300).map(|_| ())
        }
        Scheme::Github => {
            let header = delivery
                .header(signature::GITHUB_HEADER)
                .ok_or(signature::Error::Malformed("no signature header"))?;
            if delivery
                .header(signature::GITHUB_DELIVERY_HEADER)
                .is_none_or(str::is_empty)
            {
                return Err(signature::Error::Malformed("no delivery id header"));
            }
            signature::verify_github(&[secret], header, &delivery.body)
        }
    }
}

/// [`SimControls`] over the simulator's admin endpoints. With a
/// [`WebhookCapture`], [`SimControls::advance`] returns the events as the
/// receiver got them, after verifying each signature over the raw body.
#[derive(Debug)]
pub struct HttpSimControls {
    base: Url,
    client: reqwest::Client,
    capture: Option<(Arc<WebhookCapture>, Scheme, String)>,
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
}

impl HttpSimControls {
    /// Controls for the simulator at `base_url`; `capture` is the webhook
    /// receiver it delivers to, with the scheme and secret it signs with.
    pub fn new(
        base_url: &str,
        capture: Option<(Arc<WebhookCapture>, Scheme, String)>,
    ) -> Result<Self> {
        Ok(HttpSimControls {
            base: Url::parse(base_url).map_err(unavailable)?,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(unavailable)?,
            capture,
        })
    }

    fn url(&self, segments: &[&str]) -> Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| unavailable("base url cannot have paths"))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    async fn put_fault(&self, req: &FaultRequest) -> Result<()> {
        let resp = self
            .client
            .put(self.url(&["admin", "fault"])?)
            .json(req)
            .send()
            .await
            .map_err(unavailable)?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(unavailable(format!("set fault: {}", resp.status())))
        }
    }
}

#[async_trait]
impl SimControls for HttpSimControls {
    async fn set_fault(&self, fault: Option<Fault>) -> Result<()> {
        self.put_fault(&FaultRequest { fault, key: None }).await
    }

    async fn set_fault_for(&self, key: &IdempotencyKey, fault: Fault) -> Result<()> {
        self.put_fault(&FaultRequest {
            fault: Some(fault),
            key: Some(key.clone()),
        })
        .await
    }

    async fn advance(&self, by: Duration) -> Result<Vec<Event>> {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let report: AdvanceReport = self
            .client
            .post(self.url(&["admin", "advance"])?)
            .json(&AdvanceRequest { ms })
            .send()
            .await
            .map_err(unavailable)?
            .error_for_status()
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)?;
        let Some((capture, scheme, secret)) = &self.capture else {
            return Ok(report.delivered);
        };
        // The server awaited every POST before answering, so the capture
        // already holds this round's deliveries.
        let now = chrono::Utc::now().timestamp();
        let mut events = Vec::new();
        for delivery in capture.take() {
            verify_captured(*scheme, secret.as_bytes(), &delivery, now)
                .map_err(|e| Error::Rejected(format!("webhook signature: {e}")))?;
            events.push(
                serde_json::from_slice(&delivery.body)
                    .map_err(|e| Error::Rejected(format!("webhook body: {e}")))?,
            );
        }
        Ok(events)
    }

    async fn counters_for(&self, key: &IdempotencyKey) -> Result<KeyCounters> {
        self.client
            .get(self.url(&["admin", "counters", key.as_str()])?)
            .send()
            .await
            .map_err(unavailable)?
            .error_for_status()
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)
    }
}
