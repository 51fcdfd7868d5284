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
#[path = "common/payments_load.rs"]
mod payments_load;
#[path = "common/private_pg.rs"]
mod private_pg;
#[path = "common/proc.rs"]
mod proc;

use ledgerflow_payments::exchange::server::{HttpSimControls, RunningSimulator};
use ledgerflow_payments::exchange::sim::SimConfig;
use payments_load::PROVIDER;
use payments_load::{
    Accepted, Client, ExchangeCalls, Request, Rng, TestResult, User, check_payments, env_u64,
    fund_user, plan, run_client,
};
use private_pg::PrivatePg;
use proc::Proc;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

const DEFAULT_SEED: u64 = 20_261_207;
const DEFAULT_CHAOS_SECS: u64 = 35;
const DATABASE: &str = "ledgerflow";
/// The webhook provider name the simulator posts as.
const USERS: usize = 4;

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
        let sim = payments_load::start_simulator(
            &api_addr,
            &secret,
            SimConfig {
                seed,
                fill_delay_ms: 300,
                confirm_delay_ms: 300,
                ..SimConfig::default()
            },
        )
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
        let proc = |name: &'static str, roles: &'static str, ops: &str| {
            Proc::new(name, roles, env(ops), logs.join(format!("{name}.log")))
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
        fund_user(&self.pool, &format!("kill-loop-{n}@example.com"), requests).await
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
    let plans = plan(&mut rng, USERS, per_user_trades, per_user_withdrawals);
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
            Client {
                prefix: "kill-loop",
                user: n,
                api: rig.api_addr.clone(),
                api_key: user.api_key.clone(),
                seed: seed.wrapping_add(n as u64 + 1),
            },
            user.requests.clone(),
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
/// The assertions over the final state.
async fn check_outcomes(rig: &Rig, seed: u64, users: &[User], accepted: &[Accepted]) -> TestResult {
    let ExchangeCalls {
        trades,
        withdrawals,
        place_calls,
        withdrawal_calls,
    } = check_payments(
        &rig.pool,
        &rig.controls,
        &rig.sim_url,
        seed,
        users,
        accepted,
    )
    .await?;

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
