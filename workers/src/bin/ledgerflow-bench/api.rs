//! `ledgerflow-bench api`: `POST /v1/trades` against the real public API on a real socket.
//!
//! On a fresh database a user, an API key and funded `USD`/`BTC` accounts are seeded, and the
//! public app (`ledgerflow_api::serve_listeners`, poem) is served on `127.0.0.1:0` with the
//! payments workflow registry (simulated exchange and notifier). Each `201` therefore means what
//! it means in production: the `Idempotency-Key` record, the `payments.trade` workflow and its
//! first step's job were committed before the answer. No worker runs: only the POST path is
//! measured, and the started workflows stay queued.
//!
//! The load generator runs in this process, on the same tokio runtime as the server:
//! `--connections` keep-alive HTTP/1.1 connections over loopback, each sending its next request
//! as soon as the previous answer arrived (a closed loop), every request with a distinct
//! `Idempotency-Key`. It is a minimal hand-written HTTP/1.1 client (request bytes out,
//! `Content-Length` framed answer in) so that the client's share of the two cores stays small.
//! `--warmup` requests go first and are not counted. The API runs with its default settings
//! (group commit of concurrent POSTs included) unless `--post-batch` / `--post-transactions`
//! say otherwise (`--post-batch 1`: one transaction per POST).
//!
//! Afterwards the database is checked: one trade workflow with its first job per `201`.

use crate::common::{
    BenchDb, CommonArgs, CpuUse, PoolArgs, percentile, print_table, quiet, write_json,
};
use anyhow::{Context, Result, bail, ensure};
use ledgerflow_api::{ApiConfig, AppState};
use ledgerflow_engine::Store;
use ledgerflow_payments::exchange::sim::{SimConfig, SimulatedExchange};
use ledgerflow_payments::money::Amount;
use ledgerflow_payments::notifier::SimulatedNotifier;
use ledgerflow_payments::workflows::{self, Deps, WorkflowsConfig};
use ledgerflow_payments::{ledger, users};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The request body: a small limit buy (validated, then started as a trade workflow).
const BODY: &str = r#"{"side":"buy","base_asset":"BTC","quote_asset":"USD","base_amount":"0.5","limit_price":"30000.00"}"#;
/// The kind of workflow each POST starts.
const TRADE_KIND: &str = "payments.trade";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    common: CommonArgs,

    /// Requests measured (each with its own Idempotency-Key).
    #[arg(long, default_value_t = 20_000)]
    requests: usize,

    /// Requests sent first and not measured.
    #[arg(long, default_value_t = 1_000)]
    warmup: usize,

    /// Concurrent keep-alive connections (each with one request in flight).
    #[arg(long, default_value_t = 32)]
    connections: usize,

    /// `ApiConfig::post_batch`: most POSTs committed in one shared transaction (1: one
    /// transaction per POST). Default: the API's default.
    #[arg(long)]
    post_batch: Option<usize>,

    /// `ApiConfig::post_transactions`: most POST transactions at once. Default: the API's.
    #[arg(long)]
    post_transactions: Option<usize>,

    #[command(flatten)]
    pool: PoolArgs,
}

/// The measured figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    requests: usize,
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    wall_s: f64,
    /// CPU milliseconds per request: this process (server and client) and Postgres.
    cpu: CpuUse,
    bg_pct: u32,
    /// The API's group commit settings used.
    post_batch: usize,
    post_transactions: usize,
}

pub async fn run(args: Args) -> Result<()> {
    ensure!(args.requests > 0, "--requests must be at least 1");
    ensure!(args.connections > 0, "--connections must be at least 1");
    let bg_pct = quiet(&args.common).await?;
    let db = BenchDb::create(&args.common, &args.pool).await?;
    let out = measure(&args, &db, bg_pct).await;
    let figures = db.finish(out).await?;
    report(&args, &figures)
}

/// A user with an API key and funded accounts; returns the key's plain text.
async fn seed(db: &BenchDb) -> Result<String> {
    let mut conn = db.pool.acquire().await?;
    let user = users::create_user(&mut conn, "bench@example.com", "Bench").await?;
    let (_, key) = users::create_api_key(&mut conn, user, None).await?;
    let accounts = ledger::ensure_user_accounts(&mut conn, user, &["USD", "BTC"]).await?;
    for (asset, account) in accounts {
        let (amount, scale) = if asset == "USD" {
            ("1000000000.00", 2)
        } else {
            ("1000.00000000", 8)
        };
        ledger::deposit(
            &mut conn,
            &format!("bench:seed:{asset}"),
            account,
            Amount::parse(amount, scale)?,
        )
        .await?;
    }
    Ok(key.expose_secret().to_string())
}

async fn measure(args: &Args, db: &BenchDb, bg_pct: u32) -> Result<Figures> {
    let api_key = seed(db).await?;
    let registry = workflows::registry(Deps {
        exchange: Arc::new(SimulatedExchange::new(SimConfig::default())),
        notifier: Arc::new(SimulatedNotifier::new()),
        config: WorkflowsConfig::default(),
    })?;
    let defaults = ApiConfig::default();
    let config = ApiConfig {
        post_batch: args.post_batch.unwrap_or(defaults.post_batch),
        post_transactions: args.post_transactions.unwrap_or(defaults.post_transactions),
        ..defaults
    };
    let (post_batch, post_transactions) = (config.post_batch, config.post_transactions);
    let state = AppState::with_config(Store::new(db.pool.clone()), config)?
        .with_workflows(Arc::new(registry));
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = public.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ledgerflow_api::serve_listeners(
        public,
        admin,
        state,
        async move {
            let _ = stopped.await;
        },
    ));

    let out = load(args, addr, &api_key, &db.name).await;
    let _ = stop.send(());
    server
        .await
        .context("api server task")?
        .context("api server")?;
    let (mut xs, wall, cpu) = out?;
    verify(db, args.warmup + args.requests).await?;

    xs.sort_by(f64::total_cmp);
    Ok(Figures {
        requests: xs.len(),
        per_s: xs.len() as f64 / wall.as_secs_f64(),
        p50_ms: percentile(&xs, 50.0),
        p99_ms: percentile(&xs, 99.0),
        max_ms: xs.last().copied().unwrap_or_default(),
        wall_s: wall.as_secs_f64(),
        cpu: CpuUse {
            this_ms: cpu.this_ms / xs.len() as f64,
            postgres_ms: cpu.postgres_ms / xs.len() as f64,
        },
        bg_pct,
        post_batch,
        post_transactions,
    })
}

/// Warms up, then sends `--requests` requests over `--connections` connections; returns the
/// latencies (ms), the wall time and the CPU used by the measured part.
async fn load(
    args: &Args,
    addr: std::net::SocketAddr,
    api_key: &str,
    database: &str,
) -> Result<(Vec<f64>, Duration, CpuUse)> {
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        conns.push(Conn::open(addr).await?);
    }
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    // Warm-up sends requests `0..warmup`, the measurement `warmup..warmup + requests`: each
    // its own counter (a task that finds its counter past the end still bumps it), one key
    // per request.
    let phase = |conns: Vec<Conn>, from: usize, until: usize| {
        let next = Arc::new(AtomicUsize::new(from));
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                let next = next.clone();
                let (api_key, run_id) = (api_key.to_string(), run_id.clone());
                tokio::spawn(async move {
                    let mut xs = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= until {
                            return Ok::<_, anyhow::Error>((conn, xs));
                        }
                        let request = format!(
                            "POST /v1/trades HTTP/1.1\r\nHost: bench\r\n\
                             Authorization: Bearer {api_key}\r\n\
                             Idempotency-Key: bench-{run_id}-{i}\r\n\
                             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{BODY}",
                            BODY.len()
                        );
                        let sent = Instant::now();
                        let (status, body) = conn.round_trip(request.as_bytes()).await?;
                        xs.push(sent.elapsed().as_secs_f64() * 1e3);
                        if status != 201 {
                            bail!(
                                "request {i} answered {status}: {}",
                                String::from_utf8_lossy(&body)
                            );
                        }
                    }
                })
            })
            .collect();
        async move {
            let mut conns = Vec::new();
            let mut xs = Vec::new();
            for t in tasks {
                let (conn, mut part) = t.await.context("load task")??;
                conns.push(conn);
                xs.append(&mut part);
            }
            Ok::<_, anyhow::Error>((conns, xs))
        }
    };
    let (conns, _) = phase(conns, 0, args.warmup).await?;
    let cpu0 = CpuUse::now(database);
    let t0 = Instant::now();
    let (_, xs) = phase(conns, args.warmup, args.warmup + args.requests).await?;
    let wall = t0.elapsed();
    let cpu = CpuUse::now(database).since(cpu0);
    Ok((xs, wall, cpu))
}

/// One keep-alive HTTP/1.1 connection with a single request in flight.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: std::net::SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request` and reads one `Content-Length` framed answer: (status, body).
    async fn round_trip(&mut self, request: &[u8]) -> Result<(u16, Vec<u8>)> {
        self.stream.write_all(request).await?;
        loop {
            if let Some((head_len, status, body_len)) = parse_head(&self.buf)? {
                let total = head_len + body_len;
                while self.buf.len() < total {
                    self.read_more().await?;
                }
                let body = self.buf[head_len..total].to_vec();
                self.buf.drain(..total);
                return Ok((status, body));
            }
            self.read_more().await?;
        }
    }

    async fn read_more(&mut self) -> Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// The head of an HTTP/1.1 response at the start of `buf`, once complete: (head length with
/// its blank line, status, `Content-Length`).
fn parse_head(buf: &[u8]) -> Result<Option<(usize, u16, usize)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .trim()
                    .parse::<usize>()
                    .context("bad Content-Length")?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("chunked answers are not supported by the benchmark client");
        }
    }
    Ok(Some((end + 4, status, length.unwrap_or(0))))
}

/// Checks the database agrees: `n` trade workflows, each with its first step's job.
async fn verify(db: &BenchDb, n: usize) -> Result<()> {
    let mut conn = db.connect().await?;
    let (workflows, jobs): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM workflows WHERE kind = $1),
                (SELECT count(*) FROM jobs j JOIN workflows w ON w.id = j.workflow_id
                 WHERE w.kind = $1)",
    )
    .bind(TRADE_KIND)
    .fetch_one(&mut conn.0)
    .await?;
    conn.close().await;
    let n = i64::try_from(n)?;
    ensure!(
        workflows == n && jobs == n,
        "database disagrees: {workflows} trade workflows and {jobs} step jobs for {n} answers 201"
    );
    Ok(())
}

fn report(args: &Args, f: &Figures) -> Result<()> {
    eprintln!(
        "api: {} POST /v1/trades, {:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms \
         (bg {}%)",
        f.requests, f.per_s, f.p50_ms, f.p99_ms, f.max_ms, f.bg_pct
    );
    eprintln!(
        "CPU per request: bench process (server + client) {:.3} ms, postgres {:.3} ms",
        f.cpu.this_ms, f.cpu.postgres_ms
    );
    let rows: Vec<(&str, String)> = vec![
        ("requests (201 each)", f.requests.to_string()),
        ("requests/s", format!("{:.0}", f.per_s)),
        ("p50 ms", format!("{:.2}", f.p50_ms)),
        ("p99 ms", format!("{:.2}", f.p99_ms)),
        ("max ms", format!("{:.2}", f.max_ms)),
        ("wall s", format!("{:.2}", f.wall_s)),
        (
            "CPU ms/request: bench / postgres",
            format!("{:.3} / {:.3}", f.cpu.this_ms, f.cpu.postgres_ms),
        ),
        (
            "connections / pool",
            format!("{} / {}", args.connections, args.pool.pool_size),
        ),
        (
            "POST batch / transactions",
            format!("{} / {}", f.post_batch, f.post_transactions),
        ),
        ("bg_pct", f.bg_pct.to_string()),
    ];
    print_table(&rows);
    let doc = json!({
        "requests": f.requests,
        "requests_per_s": f.per_s,
        "p99_ms": f.p99_ms,
        "p50_ms": f.p50_ms,
        "max_ms": f.max_ms,
        "wall_s": f.wall_s,
        "cpu_ms_per_request_bench": f.cpu.this_ms,
        "cpu_ms_per_request_postgres": f.cpu.postgres_ms,
        "connections": args.connections,
        "pool_size": args.pool.pool_size,
        "post_batch": f.post_batch,
        "post_transactions": f.post_transactions,
        "load_generator": "in-process",
        "workers_running": false,
        "bg_pct": f.bg_pct,
    });
    write_json(args.common.json.as_deref(), &doc)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_complete_head_only() {
        let full = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\
                     content-length: 2\r\n\r\n{}rest";
        let head_len = full.len() - "{}rest".len();
        assert_eq!(parse_head(full).expect("parses"), Some((head_len, 201, 2)));
        assert_eq!(
            parse_head(b"HTTP/1.1 201 Created\r\ncontent-le").expect("ok"),
            None
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }
}
