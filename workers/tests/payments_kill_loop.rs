//! End-to-end `kill -9` loop over the shipped `ledgerflow` binary: separate
//! API and worker processes, the HTTP exchange simulator with latency
//! injected on order/withdrawal calls (so kills land inside them), and one
//! immediate Postgres restart on a private cluster. Every accepted trade
//! must settle and every accepted withdrawal complete, with exact balances,
//! one order/withdrawal per request at the exchange and one ledger transfer
//! per settlement/capture: a crash may never change a business outcome.
//!
//! Pieces:
//! - a private PostgreSQL 15 cluster (`common/private_pg.rs`), restarted once
//!   with `pg_ctl restart -m immediate` in the middle of the run;
//! - the exchange simulator (`RunningSimulator`) in this process, ticking on
//!   wall time and delivering signed fill/confirmation webhooks to the API
//!   (a failed delivery is queued again and retried on the next tick, like a
//!   real exchange's at-least-once webhooks);
//! - a latency proxy in front of it (the workers' `LEDGERFLOW_EXCHANGE_URL`):
//!   `POST /v1/orders` and `POST /v1/withdrawals` wait before reaching the
//!   exchange and again before the answer goes back, so a kill can land
//!   before the exchange saw the call or after it acted but before the
//!   worker recorded the answer;
//! - `ledgerflow run --roles api,admin` and `ledgerflow run --roles worker`,
//!   configured by environment as `cargo xtask dev` does;
//! - one careful client per user, POSTing trades and withdrawals with an
//!   `Idempotency-Key` each and retrying the same request on connection
//!   errors, 409 and 5xx;
//! - a seeded killer: SIGKILLs the worker or the API at random moments
//!   (preferring moments when an exchange call is in flight) and restarts
//!   it after a short random pause.
//!
//! `LF_SEED=<n>` replays a seed (default fixed: [`DEFAULT_SEED`]);
//! `LF_KILL_LOOP_SECS=<n>` makes the chaos phase longer (default
//! [`DEFAULT_CHAOS_SECS`]); `TEST_LOG=1` keeps the process logs' tails
//! printed on success too. Logs: `$CARGO_TARGET_TMPDIR/payments_kill_loop/`.
#[path = "common/private_pg.rs"]
mod private_pg;

use ledgerflow_payments::exchange::server::{
    HttpSimControls, RunningSimulator, SimServerConfig, WebhookTarget,
};
use ledgerflow_payments::exchange::signature::Scheme;
use ledgerflow_payments::exchange::sim::{Counters, SimConfig, SimControls};
use ledgerflow_payments::exchange::{OrderState, WithdrawalState};
use ledgerflow_payments::workflows::{trade, withdrawal};
use ledgerflow_payments::{Amount, UserId, ledger, users};
use private_pg::PrivatePg;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const DEFAULT_SEED: u64 = 20_261_207;
const DEFAULT_CHAOS_SECS: u64 = 35;
const DATABASE: &str = "ledgerflow";
/// The webhook provider name the simulator posts as.
const PROVIDER: &str = "exchange";
const USERS: usize = 4;
/// Scales: BTC in satoshis (8), USD in cents (2).
const BTC_SCALE: u32 = 8;
const USD_SCALE: u32 = 2;

// -------------------------------------------------------------------- rng

/// SplitMix64: small, seedable, good enough to pick moments and amounts.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[usize::try_from(self.below(items.len() as u64)).unwrap_or(0)]
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok())
}

// ----------------------------------------------------------- latency proxy

/// What the proxy shares between connections.
struct ProxyState {
    target: String,
    client: reqwest::Client,
    rng: Mutex<Rng>,
    /// Mutating calls between arrival and answer.
    in_flight: AtomicU64,
    /// Mutating calls that reached the exchange.
    forwarded: AtomicU64,
    /// Mutating calls dropped because their caller died before they were
    /// forwarded (they never reached the exchange).
    aborted: AtomicU64,
}

/// An HTTP/1.1 reverse proxy to the simulator that delays the mutating
/// calls (`POST /v1/orders`, `POST /v1/withdrawals`) on the way in and on
/// the way out. Like nginx with `proxy_ignore_client_abort off`, a call
/// whose caller hangs up before it was forwarded is dropped; once
/// forwarded, it completes at the exchange whatever the caller does. So a
/// worker killed during the first delay leaves an intent the exchange never
/// saw, and one killed during the second an order it did not hear about.
struct LatencyProxy {
    addr: std::net::SocketAddr,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

/// One parsed request.
struct HttpRequest {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Reads one request from `stream` (`buf` holds bytes already read);
/// `None` when the connection closed cleanly between requests.
async fn read_request(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> TestResult<Option<HttpRequest>> {
    use tokio::io::AsyncReadExt;
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("connection closed mid-request".into())
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, path) = (
        first.next().unwrap_or_default().to_string(),
        first.next().unwrap_or_default().to_string(),
    );
    let mut headers = Vec::new();
    let mut length = 0usize;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or("bad header line")?;
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_string());
        match name.as_str() {
            "content-length" => length = value.parse()?,
            "transfer-encoding" => return Err("chunked requests are not supported".into()),
            "host" | "connection" => {}
            _ => headers.push((name, value)),
        }
    }
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err("connection closed mid-body".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Ok(Some(HttpRequest {
        method,
        path,
        headers,
        body,
    }))
}

/// Sends `req` to the simulator: (status, content type, body).
async fn forward(state: &ProxyState, req: HttpRequest) -> Result<(u16, String, Vec<u8>), String> {
    let method = reqwest::Method::from_bytes(req.method.as_bytes()).map_err(|e| e.to_string())?;
    let url = format!("{}{}", state.target.trim_end_matches('/'), req.path);
    let mut request = state.client.request(method, &url).body(req.body);
    for (name, value) in req.headers {
        request = request.header(name, value);
    }
    let resp = request.send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
    Ok((status, content_type, bytes.to_vec()))
}

/// Serves one caller's connection (keep-alive: many requests).
async fn proxy_connection(state: Arc<ProxyState>, mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    while let Ok(Some(req)) = read_request(&mut stream, &mut buf).await {
        let mutating =
            req.method == "POST" && (req.path == "/v1/orders" || req.path == "/v1/withdrawals");
        let (before, after) = if mutating {
            let mut rng = state.rng.lock().unwrap_or_else(|e| e.into_inner());
            (rng.millis(50, 700), rng.millis(0, 600))
        } else {
            (Duration::ZERO, Duration::ZERO)
        };
        if mutating {
            state.in_flight.fetch_add(1, Ordering::SeqCst);
            // On the way in: if the caller hangs up now, drop the call.
            let mut probe = [0u8; 1024];
            let gone = tokio::select! {
                () = tokio::time::sleep(before) => false,
                n = stream.read(&mut probe) => match n {
                    Ok(0) | Err(_) => true,
                    Ok(n) => {
                        // Pipelined bytes (not expected): keep them, wait on.
                        buf.extend_from_slice(&probe[..n]);
                        tokio::time::sleep(before).await;
                        false
                    }
                },
            };
            if gone {
                state.aborted.fetch_add(1, Ordering::SeqCst);
                state.in_flight.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        }
        // Once sent, the call completes at the exchange even if the caller
        // dies meanwhile.
        let answer = {
            let state = state.clone();
            tokio::spawn(async move {
                let answer = forward(&state, req).await;
                if mutating && answer.is_ok() {
                    state.forwarded.fetch_add(1, Ordering::SeqCst);
                }
                answer
            })
            .await
        };
        // On the way out: the exchange acted; the caller may die before it
        // hears so.
        tokio::time::sleep(after).await;
        if mutating {
            state.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        let (status, content_type, body) = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => (502, "text/plain".to_string(), e.into_bytes()),
            Err(e) => (502, "text/plain".to_string(), e.to_string().into_bytes()),
        };
        let reason = reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Status");
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if stream.write_all(head.as_bytes()).await.is_err()
            || stream.write_all(&body).await.is_err()
        {
            return;
        }
    }
}

impl LatencyProxy {
    async fn start(target: String, seed: u64) -> TestResult<LatencyProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ProxyState {
            target,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            rng: Mutex::new(Rng(seed ^ 0x5eed_f1a7)),
            in_flight: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(proxy_connection(shared.clone(), stream));
            }
        });
        Ok(LatencyProxy { addr, state, task })
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    fn in_flight(&self) -> u64 {
        self.state.in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// --------------------------------------------------------------- processes

/// One `ledgerflow run --roles …` process, restarted under the same
/// configuration after every kill.
struct Proc {
    name: &'static str,
    roles: &'static str,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
    kills: u32,
    /// Exits nobody asked for (status, generation).
    unexpected: Vec<String>,
}

impl Proc {
    fn spawn(&mut self) -> TestResult {
        self.starts += 1;
        let log = File::options().create(true).append(true).open(&self.log)?;
        use std::io::Write;
        writeln!(&log, "===== {} generation {} =====", self.name, self.starts)?;
        let child = Command::new(env!("CARGO_BIN_EXE_ledgerflow"))
            .args(["run", "--roles", self.roles])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL and reap.
    fn kill(&mut self) -> TestResult {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
            self.kills += 1;
        }
        Ok(())
    }

    /// Restarts the process if it exited on its own (and remembers that).
    fn check(&mut self) -> TestResult {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            self.unexpected
                .push(format!("generation {} exited: {status}", self.starts));
            self.child = None;
            self.spawn()?;
        }
        Ok(())
    }

    fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------- requests

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Buy,
    Sell,
}

/// One request a client sends, with its exact money effects in minor units.
#[derive(Debug, Clone)]
enum Request {
    Trade {
        side: Side,
        /// Satoshis.
        qty: i128,
        /// Cents per BTC.
        price: i128,
    },
    Withdrawal {
        /// Satoshis.
        amount: i128,
    },
}

impl Request {
    /// Cents of notional (qty × price, exact for the amounts used).
    fn notional(qty: i128, price: i128) -> i128 {
        qty * price / 10i128.pow(BTC_SCALE)
    }

    /// The simulator's fee: 0.1 % of the notional, rounded toward zero at
    /// the quote scale.
    fn fee(qty: i128, price: i128) -> i128 {
        Self::notional(qty, price) / 1000
    }

    /// (USD, BTC) the user must have before the request: what its hold takes.
    fn needs(&self) -> (i128, i128) {
        match *self {
            Request::Trade {
                side: Side::Buy,
                qty,
                price,
            } => (Self::notional(qty, price) + Self::fee(qty, price), 0),
            Request::Trade {
                side: Side::Sell,
                qty,
                ..
            } => (0, qty),
            Request::Withdrawal { amount } => (0, amount),
        }
    }

    /// (USD, BTC) the user gets once it completed.
    fn gets(&self) -> (i128, i128) {
        match *self {
            Request::Trade {
                side: Side::Buy,
                qty,
                ..
            } => (0, qty),
            Request::Trade {
                side: Side::Sell,
                qty,
                price,
            } => (Self::notional(qty, price) - Self::fee(qty, price), 0),
            Request::Withdrawal { .. } => (0, 0),
        }
    }

    fn path(&self) -> &'static str {
        match self {
            Request::Trade { .. } => "/v1/trades",
            Request::Withdrawal { .. } => "/v1/withdrawals",
        }
    }

    fn body(&self) -> Value {
        match *self {
            Request::Trade { side, qty, price } => json!({
                "side": if side == Side::Buy { "buy" } else { "sell" },
                "base_asset": "BTC",
                "quote_asset": "USD",
                "base_amount": decimal(qty, BTC_SCALE),
                "limit_price": decimal(price, USD_SCALE),
            }),
            Request::Withdrawal { amount } => json!({
                "asset": "BTC",
                "amount": decimal(amount, BTC_SCALE),
                "address": "bc1qmt4npcrde7q9vkkfxhk23mp7s73v6uv5h06myw",
            }),
        }
    }
}

/// `units` minor units at `scale` as a decimal string ("0.01000000").
fn decimal(units: i128, scale: u32) -> String {
    let sign = if units < 0 { "-" } else { "" };
    let p = 10i128.pow(scale);
    let (int, frac) = (units.abs() / p, units.abs() % p);
    format!("{sign}{int}.{frac:0width$}", width = scale as usize)
}

/// A user of the run: credentials and the requests their client sends.
struct User {
    id: UserId,
    api_key: String,
    requests: Vec<Request>,
}

/// What a client learned about one request.
#[derive(Debug, Clone)]
struct Accepted {
    user: usize,
    request: Request,
    id: Uuid,
    /// POSTs it took (retries with the same key included).
    attempts: u32,
}

/// Plans every user's requests from the seed.
fn plan(rng: &mut Rng, per_user_trades: usize, per_user_withdrawals: usize) -> Vec<Vec<Request>> {
    (0..USERS)
        .map(|_| {
            let mut reqs = Vec::new();
            for _ in 0..per_user_trades {
                reqs.push(Request::Trade {
                    side: if rng.chance(50) {
                        Side::Buy
                    } else {
                        Side::Sell
                    },
                    // 0.01, 0.02 or 0.05 BTC at 1000, 2000 or 3000 USD: the
                    // notional is a multiple of 10 USD, so the 0.1 % fee is
                    // whole cents and every expected balance is exact.
                    qty: rng.pick(&[1_000_000, 2_000_000, 5_000_000]),
                    price: rng.pick(&[100_000, 200_000, 300_000]),
                });
            }
            for _ in 0..per_user_withdrawals {
                reqs.push(Request::Withdrawal {
                    amount: rng.pick(&[100_000, 200_000, 500_000]),
                });
            }
            // Interleave trades and withdrawals.
            for i in (1..reqs.len()).rev() {
                let j = usize::try_from(rng.below(i as u64 + 1)).unwrap_or(0);
                reqs.swap(i, j);
            }
            reqs
        })
        .collect()
}

/// POSTs `request` with `key` until a 2xx, retrying the SAME request and
/// key on connection errors, timeouts, 409 and 5xx, as a careful client.
async fn post_until_accepted(
    client: &reqwest::Client,
    api: &str,
    api_key: &str,
    key: &str,
    request: &Request,
    deadline: Instant,
) -> TestResult<(Uuid, u32)> {
    let body = request.body();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let sent = client
            .post(format!("http://{api}{}", request.path()))
            .bearer_auth(api_key)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await;
        let retry_why = match sent {
            Ok(resp) if resp.status().is_success() => {
                let v: Value = resp.json().await?;
                let id = v["id"]
                    .as_str()
                    .ok_or_else(|| format!("no id in {v}"))?
                    .parse()?;
                return Ok((id, attempts));
            }
            Ok(resp) if resp.status().as_u16() == 409 || resp.status().is_server_error() => {
                format!("{}", resp.status())
            }
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                return Err(format!(
                    "POST {} (key {key}) refused: {status} {text}",
                    request.path()
                )
                .into());
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(format!(
                "POST {} (key {key}) never accepted after {attempts} attempts: {retry_why}",
                request.path()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// One user's client: sends its requests one after another with random
/// gaps spread over `spread`.
async fn run_client(
    user: usize,
    api: String,
    api_key: String,
    requests: Vec<Request>,
    seed: u64,
    spread: Duration,
    deadline: Instant,
) -> TestResult<Vec<Accepted>> {
    let mut rng = Rng(seed);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let gap_ms = u64::try_from(spread.as_millis()).unwrap_or(0) / requests.len().max(1) as u64;
    let mut out = Vec::new();
    for (n, request) in requests.into_iter().enumerate() {
        tokio::time::sleep(rng.millis(0, 2 * gap_ms)).await;
        let key = format!("kill-loop-{seed:x}-u{user}-{n}");
        let (id, attempts) =
            post_until_accepted(&client, &api, &api_key, &key, &request, deadline).await?;
        out.push(Accepted {
            user,
            request,
            id,
            attempts,
        });
    }
    Ok(out)
}

// --------------------------------------------------------------------- rig

/// Everything the run started. Field order is drop order: processes first,
/// the cluster last.
struct Rig {
    api: Proc,
    worker: Proc,
    proxy: LatencyProxy,
    sim: Option<RunningSimulator>,
    sim_url: String,
    controls: HttpSimControls,
    pool: PgPool,
    api_addr: String,
    pg: PrivatePg,
}

impl Rig {
    async fn start(seed: u64) -> TestResult<Rig> {
        let pg = PrivatePg::start(DATABASE)?;
        let url = pg.url(DATABASE);
        let pool = PgPoolOptions::new()
            .max_connections(6)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await?;
        ledgerflow_engine::MIGRATOR.run(&pool).await?;

        let port = || private_pg::free_port().map(|p| format!("127.0.0.1:{p}"));
        let (api_addr, admin_addr) = (port()?, port()?);
        let (api_ops, worker_ops) = (port()?, port()?);
        let secret = format!("kill-loop-secret-{seed:x}-{}", Uuid::now_v7().simple());
        let sim = RunningSimulator::start(SimServerConfig {
            sim: SimConfig {
                seed,
                fill_delay_ms: 300,
                confirm_delay_ms: 300,
                ..SimConfig::default()
            },
            webhook: Some(WebhookTarget {
                url: format!("http://{api_addr}/v1/webhooks/{PROVIDER}"),
                secret: secret.clone(),
                scheme: Scheme::Stripe,
            }),
            tick: Some(Duration::from_millis(100)),
            delivery_timeout: Duration::from_secs(3),
            ..SimServerConfig::default()
        })
        .await?;
        let sim_url = sim.base_url();
        let controls = HttpSimControls::new(&sim_url, None)?;
        let proxy = LatencyProxy::start(sim_url.clone(), seed).await?;

        let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("payments_kill_loop");
        std::fs::create_dir_all(&logs)?;
        let env = |ops: &str| -> Vec<(String, String)> {
            [
                ("DATABASE_URL", url.clone()),
                ("LEDGERFLOW_API_ADDR", api_addr.clone()),
                ("LEDGERFLOW_ADMIN_ADDR", admin_addr.clone()),
                ("LEDGERFLOW_OPS_ADDR", ops.to_string()),
                ("LEDGERFLOW_EXCHANGE_URL", proxy.url()),
                ("LEDGERFLOW_NOTIFIER_URL", sim_url.clone()),
                (
                    "LEDGERFLOW_WEBHOOK_PROVIDERS",
                    json!({ PROVIDER: {"scheme": "stripe"} }).to_string(),
                ),
                ("LEDGERFLOW_WEBHOOK_SECRETS_EXCHANGE", secret.clone()),
                // A killed worker's jobs are rescued 2 s after its last
                // heartbeat.
                ("LEDGERFLOW_LEASE_TTL_SECS", "2".to_string()),
                ("LEDGERFLOW_POLL_MS", "200".to_string()),
                ("LEDGERFLOW_QUEUES", "default=8".to_string()),
                ("LEDGERFLOW_SHUTDOWN_GRACE_SECS", "2".to_string()),
                (
                    "RUST_LOG",
                    std::env::var("LF_KILL_LOOP_LOG").unwrap_or_else(|_| "info".to_string()),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
        };
        let proc = |name: &'static str, roles: &'static str, ops: &str| -> TestResult<Proc> {
            let log = logs.join(format!("{name}.log"));
            std::fs::write(&log, "")?;
            Ok(Proc {
                name,
                roles,
                env: env(ops),
                log,
                child: None,
                starts: 0,
                kills: 0,
                unexpected: Vec::new(),
            })
        };
        let (api, worker) = (
            proc("api", "api,admin", &api_ops)?,
            proc("worker", "worker", &worker_ops)?,
        );
        Ok(Rig {
            api,
            worker,
            proxy,
            sim: Some(sim),
            sim_url,
            controls,
            pool,
            api_addr,
            pg,
        })
    }

    /// A user funded with exactly what their requests hold, and an API key.
    async fn user(&self, n: usize, requests: Vec<Request>) -> TestResult<User> {
        let (usd, btc) = requests.iter().fold((0, 0), |(u, b), r| {
            let (nu, nb) = r.needs();
            (u + nu, b + nb)
        });
        let mut tx = self.pool.begin().await?;
        let id =
            users::create_user(&mut tx, &format!("kill-loop-{n}@example.com"), "Kill Loop").await?;
        let (_, key) = users::create_api_key(&mut tx, id, None).await?;
        for (asset, units, scale) in [("USD", usd, USD_SCALE), ("BTC", btc, BTC_SCALE)] {
            let accounts = ledger::ensure_user_accounts(&mut tx, id, &[asset]).await?;
            if units > 0 {
                ledger::deposit(
                    &mut tx,
                    &format!("deposit:{id}:{asset}"),
                    accounts[0].1,
                    Amount::parse(&decimal(units, scale), scale)?,
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(User {
            id,
            api_key: key.expose_secret().to_string(),
            requests,
        })
    }

    fn check_processes(&mut self) -> TestResult {
        self.api.check()?;
        self.worker.check()
    }

    async fn scalar_i64(&self, sql: &str) -> TestResult<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    /// Workflows that are not finished.
    async fn unfinished(&self) -> TestResult<i64> {
        self.scalar_i64(
            "SELECT count(*) FROM workflows
             WHERE state NOT IN ('completed', 'compensated', 'failed', 'cancelled')",
        )
        .await
    }

    async fn sim_totals(&self) -> TestResult<Counters> {
        let url = format!("{}admin/counters", self.sim_url);
        Ok(reqwest::get(url).await?.error_for_status()?.json().await?)
    }

    fn print_tails(&self) {
        for p in [&self.api, &self.worker] {
            eprintln!(
                "---- last lines of {} ({}) ----\n{}",
                p.name,
                p.log.display(),
                p.tail(30)
            );
        }
        let pg_log = std::fs::read_to_string(self.pg.log_path()).unwrap_or_default();
        let lines: Vec<&str> = pg_log.lines().collect();
        eprintln!(
            "---- last lines of the postgres log ----\n{}",
            lines[lines.len().saturating_sub(15)..].join("\n")
        );
    }
}

/// Waits (checking the processes) until every workflow is finished and no
/// job runs, three polls in a row.
async fn wait_quiet(rig: &mut Rig, within: Duration, seed: u64) -> TestResult {
    let deadline = Instant::now() + within;
    let mut quiet = 0;
    while quiet < 3 {
        rig.check_processes()?;
        let open = rig.unfinished().await.unwrap_or(-1);
        let running = rig
            .scalar_i64("SELECT count(*) FROM jobs WHERE state = 'running'")
            .await
            .unwrap_or(-1);
        quiet = if open == 0 && running == 0 {
            quiet + 1
        } else {
            0
        };
        if Instant::now() > deadline {
            type Row = (Uuid, String, String, Option<String>, Option<String>);
            let stuck: Vec<Row> = sqlx::query_as(
                "SELECT id, kind, state, current_step, wait_reason FROM workflows
                     WHERE state NOT IN ('completed', 'compensated', 'failed', 'cancelled')
                     ORDER BY created_at LIMIT 20",
            )
            .fetch_all(&rig.pool)
            .await?;
            return Err(format!(
                "seed {seed}: not quiet after {within:?}: {open} workflows unfinished, \
                 {running} jobs running; first unfinished: {stuck:?}"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

// -------------------------------------------------------------------- test

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_loop_over_api_and_worker_with_a_postgres_restart_changes_no_outcome() -> TestResult
{
    let seed = env_u64("LF_SEED").unwrap_or(DEFAULT_SEED);
    let chaos = Duration::from_secs(env_u64("LF_KILL_LOOP_SECS").unwrap_or(DEFAULT_CHAOS_SECS));
    eprintln!(
        "payments kill loop: seed = {seed} (replay with LF_SEED={seed}), chaos for {chaos:?} \
         (LF_KILL_LOOP_SECS)"
    );
    let started = Instant::now();
    let mut rig = Rig::start(seed).await?;
    eprintln!(
        "  logs: {} and {}, postgres: {}",
        rig.api.log.display(),
        rig.worker.log.display(),
        rig.pg.log_path().display()
    );
    let result = run(&mut rig, seed, chaos).await;
    if result.is_err() || std::env::var_os("TEST_LOG").is_some() {
        rig.print_tails();
    }
    // Stop the processes before the simulator and the cluster go.
    rig.api.kill()?;
    rig.worker.kill()?;
    if let Some(sim) = rig.sim.take() {
        sim.stop().await?;
    }
    eprintln!(
        "seed {seed}: finished in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    result
}

async fn run(rig: &mut Rig, seed: u64, chaos: Duration) -> TestResult {
    let mut rng = Rng(seed);
    // About one trade per 1.5 s and one withdrawal per 3 s of chaos, over
    // all users.
    let secs = usize::try_from(chaos.as_secs()).unwrap_or(30).max(8);
    let per_user_trades = (secs * 2 / 3 / USERS).max(2);
    let per_user_withdrawals = (secs / 3 / USERS).max(1);
    let plans = plan(&mut rng, per_user_trades, per_user_withdrawals);
    let mut users = Vec::new();
    for (n, requests) in plans.into_iter().enumerate() {
        users.push(rig.user(n, requests).await?);
    }

    rig.api.spawn()?;
    rig.worker.spawn()?;
    let chaos_start = Instant::now();
    let client_deadline = chaos_start + chaos + Duration::from_secs(60);
    let mut clients = Vec::new();
    for (n, user) in users.iter().enumerate() {
        clients.push(tokio::spawn(run_client(
            n,
            rig.api_addr.clone(),
            user.api_key.clone(),
            user.requests.clone(),
            seed.wrapping_add(n as u64 + 1),
            // Requests keep arriving for most of the chaos phase.
            chaos * 4 / 5,
            client_deadline,
        )));
    }

    // The killer.
    let pg_restart_at = chaos_start + chaos / 2;
    let mut pg_restarted = false;
    let mut in_call_kills = 0u32;
    let mut both_kills = 0u32;
    while chaos_start.elapsed() < chaos {
        let pause = rng.millis(300, 2200);
        let until = Instant::now() + pause;
        while Instant::now() < until {
            rig.check_processes()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !pg_restarted && Instant::now() >= pg_restart_at {
            eprintln!(
                "  +{:.1}s restarting postgres (-m immediate)",
                chaos_start.elapsed().as_secs_f64()
            );
            tokio::task::block_in_place(|| rig.pg.restart_immediate())?;
            pg_restarted = true;
            continue;
        }
        // 0: the worker, 1: the API, 2: both.
        let victim = match rng.below(100) {
            0..55 => 0,
            55..90 => 1,
            _ => 2,
        };
        if victim != 1 {
            // Prefer a moment when an exchange call is in flight (waiting
            // at most 1.5 s for one).
            if rng.chance(80) {
                let wait_until = Instant::now() + Duration::from_millis(1500);
                while rig.proxy.in_flight() == 0 && Instant::now() < wait_until {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            if rig.proxy.in_flight() > 0 {
                in_call_kills += 1;
            }
            rig.worker.kill()?;
        }
        if victim != 0 {
            rig.api.kill()?;
        }
        if victim == 2 {
            both_kills += 1;
        }
        tokio::time::sleep(rng.millis(50, 900)).await;
        if rig.worker.child.is_none() {
            rig.worker.spawn()?;
        }
        if rig.api.child.is_none() {
            rig.api.spawn()?;
        }
    }
    if !pg_restarted {
        tokio::task::block_in_place(|| rig.pg.restart_immediate())?;
    }
    eprintln!(
        "  +{:.1}s chaos over: {} worker kills, {} api kills ({both_kills} both at once; \
         {in_call_kills} worker kills with an exchange call in flight), 1 postgres restart",
        chaos_start.elapsed().as_secs_f64(),
        rig.worker.kills,
        rig.api.kills
    );

    // Every request must be accepted (the clients retry until 2xx).
    let mut accepted: Vec<Accepted> = Vec::new();
    for client in clients {
        loop {
            rig.check_processes()?;
            if client.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        accepted.extend(client.await??);
    }
    private_pg::wait_ready(&rig.pool, Duration::from_secs(30)).await?;
    wait_quiet(rig, Duration::from_secs(90), seed).await?;
    eprintln!(
        "  +{:.1}s everything finished",
        chaos_start.elapsed().as_secs_f64()
    );

    check_outcomes(rig, seed, &users, &accepted).await?;

    let unexpected: Vec<String> = [&rig.api, &rig.worker]
        .iter()
        .flat_map(|p| p.unexpected.iter().map(move |u| format!("{}: {u}", p.name)))
        .collect();
    assert!(
        unexpected.is_empty(),
        "seed {seed}: processes exited on their own (e.g. on the Postgres restart): {unexpected:?}"
    );
    Ok(())
}

/// The assertions over the final state.
async fn check_outcomes(rig: &Rig, seed: u64, users: &[User], accepted: &[Accepted]) -> TestResult {
    let pool = &rig.pool;
    let planned: usize = users.iter().map(|u| u.requests.len()).sum();
    assert_eq!(
        accepted.len(),
        planned,
        "seed {seed}: every request accepted"
    );
    let trades = accepted
        .iter()
        .filter(|a| matches!(a.request, Request::Trade { .. }))
        .count();
    let withdrawals = accepted.len() - trades;
    let mut ids = std::collections::HashSet::new();
    for a in accepted {
        assert!(
            ids.insert(a.id),
            "seed {seed}: two requests answered {}",
            a.id
        );
    }

    // One domain row per accepted request, none more (a retried POST
    // replayed, it did not create a second one).
    let rows: i64 = rig.scalar_i64("SELECT count(*) FROM trades").await?;
    assert_eq!(rows, trades as i64, "seed {seed}: trade rows");
    let rows: i64 = rig.scalar_i64("SELECT count(*) FROM withdrawals").await?;
    assert_eq!(rows, withdrawals as i64, "seed {seed}: withdrawal rows");

    let mut place_calls = 0;
    let mut withdrawal_calls = 0;
    for a in accepted {
        let what = format!("seed {seed}: {:?} {} (user {})", a.request, a.id, a.user);
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM workflows WHERE id = $1")
            .bind(a.id)
            .fetch_optional(pool)
            .await?;
        assert_eq!(
            state.as_deref(),
            Some("completed"),
            "{what}: workflow state"
        );
        let compensated: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM workflow_steps
             WHERE workflow_id = $1 AND status NOT IN ('completed')",
        )
        .bind(a.id)
        .fetch_one(pool)
        .await?;
        assert_eq!(compensated, 0, "{what}: steps not completed (compensated?)");
        match a.request {
            Request::Trade { qty, .. } => {
                let status: String = sqlx::query_scalar("SELECT status FROM trades WHERE id = $1")
                    .bind(a.id)
                    .fetch_one(pool)
                    .await?;
                assert_eq!(status, "settled", "{what}: trade status");
                let key = trade::order_key(a.id);
                let c = rig.controls.counters_for(&key).await?;
                place_calls += c.place_calls;
                assert_eq!(c.orders_created, 1, "{what}: orders at the exchange");
                let order = ledgerflow_payments::exchange::Exchange::get_order_by_key(
                    &ledgerflow_payments::exchange::http::HttpExchange::new(
                        &rig.sim_url,
                        ledgerflow_payments::exchange::http::HttpConfig::default(),
                    )?,
                    &key,
                )
                .await?
                .ok_or_else(|| format!("{what}: no order at the exchange"))?;
                assert_eq!(order.state, OrderState::Filled, "{what}: order state");
                assert_eq!(
                    units(&order.filled_base.to_string(), BTC_SCALE)?,
                    qty,
                    "{what}: filled quantity"
                );
                let settlements = transfers(pool, &trade::settle_reference(a.id)).await?;
                assert_eq!(settlements, 1, "{what}: settlement transfers");
            }
            Request::Withdrawal { .. } => {
                let status: String =
                    sqlx::query_scalar("SELECT status FROM withdrawals WHERE id = $1")
                        .bind(a.id)
                        .fetch_one(pool)
                        .await?;
                assert_eq!(status, "completed", "{what}: withdrawal status");
                let key = withdrawal::submit_key(a.id);
                let c = rig.controls.counters_for(&key).await?;
                withdrawal_calls += c.withdrawal_calls;
                assert_eq!(
                    c.withdrawals_created, 1,
                    "{what}: withdrawals at the exchange"
                );
                let at_exchange = ledgerflow_payments::exchange::Exchange::get_withdrawal_by_key(
                    &ledgerflow_payments::exchange::http::HttpExchange::new(
                        &rig.sim_url,
                        ledgerflow_payments::exchange::http::HttpConfig::default(),
                    )?,
                    &key,
                )
                .await?
                .ok_or_else(|| format!("{what}: no withdrawal at the exchange"))?;
                assert_eq!(
                    at_exchange.state,
                    WithdrawalState::Confirmed,
                    "{what}: withdrawal at the exchange"
                );
                let captures = transfers(pool, &withdrawal::capture_reference(a.id)).await?;
                assert_eq!(captures, 1, "{what}: capture transfers");
            }
        }
    }

    // Nothing at the exchange that no accepted request asked for.
    let totals = rig.sim_totals().await?;
    assert_eq!(
        totals.orders_created, trades as u64,
        "seed {seed}: orders at the exchange"
    );
    assert_eq!(
        totals.withdrawals_created, withdrawals as u64,
        "seed {seed}: withdrawals at the exchange"
    );

    // Exact balances: funded with exactly what the holds take, each user
    // ends with exactly what the fills give.
    for user in users {
        let (usd, btc) = user.requests.iter().fold((0, 0), |(u, b), r| {
            let (gu, gb) = r.gets();
            (u + gu, b + gb)
        });
        for (asset, expected, scale) in [("USD", usd, USD_SCALE), ("BTC", btc, BTC_SCALE)] {
            let (balance, held): (String, String) = sqlx::query_as(
                "SELECT b.balance::text, b.held::text
                   FROM accounts a JOIN account_balances b ON b.account_id = a.id
                  WHERE a.owner_user_id = $1 AND a.kind = 'user_available' AND a.asset = $2",
            )
            .bind(user.id)
            .bind(asset)
            .fetch_one(pool)
            .await?;
            assert_eq!(
                units(&balance, scale)?,
                expected,
                "seed {seed}: user {} {asset} balance {balance}, expected {}",
                user.id,
                decimal(expected, scale)
            );
            assert_eq!(
                units(&held, scale)?,
                0,
                "seed {seed}: user {} {asset} held",
                user.id
            );
        }
    }

    // The books: double entry per asset, balances match postings, no hold
    // left active, one transfer per reference.
    let mut conn = pool.acquire().await?;
    for (asset, sum) in ledger::ledger_sums(&mut conn).await? {
        assert!(
            sum.is_zero(),
            "seed {seed}: postings of {asset} sum to {sum}"
        );
    }
    let drift = ledger::balance_drift(&mut conn).await?;
    assert!(drift.is_empty(), "seed {seed}: balances drifted: {drift:?}");
    drop(conn);
    assert_eq!(
        rig.scalar_i64("SELECT count(*) FROM holds WHERE state = 'active'")
            .await?,
        0,
        "seed {seed}: active holds"
    );
    assert_eq!(
        rig.scalar_i64(
            "SELECT count(*) FROM ledger_transfers WHERE reference LIKE 'trade:%:settle'"
        )
        .await?,
        trades as i64,
        "seed {seed}: settlement transfers in all"
    );
    assert_eq!(
        rig.scalar_i64(
            "SELECT count(*) FROM ledger_transfers WHERE reference LIKE 'withdrawal:%:capture'"
        )
        .await?,
        withdrawals as i64,
        "seed {seed}: capture transfers in all"
    );

    // The queue: nothing running past its lease, nothing stuck.
    assert_eq!(
        rig.scalar_i64(
            "SELECT count(*) FROM jobs WHERE state = 'running' AND lease_expires_at < now()"
        )
        .await?,
        0,
        "seed {seed}: jobs running past their lease"
    );
    assert_eq!(
        rig.unfinished().await?,
        0,
        "seed {seed}: unfinished workflows"
    );

    let rescued = rig
        .scalar_i64("SELECT count(*) FROM job_attempts WHERE outcome = 'lease_expired'")
        .await?;
    let reconciled = rig
        .scalar_i64("SELECT count(*) FROM workflow_steps WHERE resolved_by IS NOT NULL")
        .await?;
    let retried_posts: u32 = accepted.iter().map(|a| a.attempts - 1).sum();
    eprintln!(
        "seed {seed}: {trades} trades settled, {withdrawals} withdrawals completed; \
         {retried_posts} client retries; exchange saw {place_calls} order calls and \
         {withdrawal_calls} withdrawal calls ({} forwarded by the proxy, {} dropped because \
         their worker died before they left) for one order/withdrawal each; {rescued} attempts \
         rescued from dead workers; {reconciled} in-doubt calls resolved",
        rig.proxy.state.forwarded.load(Ordering::SeqCst),
        rig.proxy.state.aborted.load(Ordering::SeqCst),
    );
    Ok(())
}

async fn transfers(pool: &PgPool, reference: &str) -> TestResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM ledger_transfers WHERE reference = $1")
            .bind(reference)
            .fetch_one(pool)
            .await?,
    )
}

/// A decimal string ("12.3400") as minor units at `scale` (exactly).
fn units(s: &str, scale: u32) -> TestResult<i128> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let frac = frac.trim_end_matches('0');
    if frac.len() > scale as usize {
        return Err(format!("{s} has more than {scale} decimals").into());
    }
    let v: i128 = format!("{int}{frac:0<width$}", width = scale as usize).parse()?;
    Ok(if neg { -v } else { v })
}
