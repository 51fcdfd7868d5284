//! `exchange-sim`: the simulated exchange as an HTTP server, for local
//! development and end-to-end tests. A thin wrapper over
//! [`ledgerflow_payments::exchange::server::serve_simulator`]. The same
//! server is the simulated email/push provider (`/v1/notifications`, see
//! `ledgerflow_payments::notifier::server`): point `LEDGERFLOW_NOTIFIER_URL`
//! at it too.
//!
//! ```text
//! exchange-sim --listen 127.0.0.1:0 \
//!     --webhook-url http://127.0.0.1:8080/v1/webhooks/sim \
//!     --webhook-secret s3cret --scheme stripe
//! ```
//!
//! The first line on stdout is the bound address (useful with port 0).
//! Stops on Ctrl-C or SIGTERM.

use clap::Parser;
use ledgerflow_payments::exchange::budget::RequestBudget;
use ledgerflow_payments::exchange::server::{SimServerConfig, WebhookTarget, serve_simulator};
use ledgerflow_payments::exchange::signature::Scheme;
use ledgerflow_payments::exchange::sim::SimConfig;
use std::io::Write;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "exchange-sim", about = "Simulated exchange over HTTP")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7070", env = "EXCHANGE_SIM_LISTEN")]
    listen: String,
    /// Where to POST events (fills, confirmations).
    #[arg(long, env = "EXCHANGE_SIM_WEBHOOK_URL")]
    webhook_url: Option<String>,
    /// Shared HMAC secret for webhook signatures.
    #[arg(long, env = "EXCHANGE_SIM_WEBHOOK_SECRET", default_value = "")]
    webhook_secret: String,
    /// Signature header style: stripe (`t=…,v1=…`) or github (`sha256=…`).
    #[arg(long, default_value = "stripe")]
    scheme: Scheme,
    /// Seeds the ids; defaults to the start time so restarts never reuse
    /// event ids.
    #[arg(long)]
    seed: Option<u64>,
    /// Advance the simulated clock every this many ms of wall time (0: only
    /// via POST /admin/advance).
    #[arg(long, default_value_t = 100)]
    tick_ms: u64,
    /// Delay between placing an order and its fill, in simulated ms.
    #[arg(long, default_value_t = 0)]
    fill_delay_ms: u64,
    /// Delay between a withdrawal and its confirmation, in simulated ms.
    #[arg(long, default_value_t = 0)]
    confirm_delay_ms: u64,
    /// Request budget per API key, `weight/seconds` (`none`: unlimited); over it the
    /// simulator answers 429 with `Retry-After`, as a real exchange does.
    #[arg(long, default_value = "1200/60", env = "EXCHANGE_SIM_REQUEST_BUDGET")]
    request_budget: String,
    /// How long an accept-then-timeout call (order, withdrawal or
    /// notification) holds its answer, in ms.
    #[arg(long, default_value_t = 30_000)]
    hang_ms: u64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let now = chrono::Utc::now();
    let seed = args
        .seed
        .unwrap_or_else(|| u64::try_from(now.timestamp_millis()).unwrap_or_default());
    let webhook = match args.webhook_url {
        Some(url) if args.webhook_secret.is_empty() => {
            return Err(std::io::Error::other(format!(
                "--webhook-url {url} needs --webhook-secret"
            )));
        }
        Some(url) => Some(WebhookTarget {
            url,
            secret: args.webhook_secret,
            scheme: args.scheme,
        }),
        None => None,
    };
    let config = SimServerConfig {
        sim: SimConfig {
            seed,
            start: now,
            fill_delay_ms: args.fill_delay_ms,
            confirm_delay_ms: args.confirm_delay_ms,
            budget: match args.request_budget.as_str() {
                "none" => None,
                b => Some(RequestBudget::parse(b).map_err(std::io::Error::other)?),
            },
            ..SimConfig::default()
        },
        webhook,
        hang_for: Duration::from_millis(args.hang_ms),
        tick: (args.tick_ms > 0).then(|| Duration::from_millis(args.tick_ms)),
        ..SimServerConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{addr}")?;
        out.flush()?;
    }
    serve_simulator(listener, config, shutdown_signal()).await
}

/// Ctrl-C or SIGTERM: `cargo xtask dev` and process supervisors stop the
/// simulator with SIGTERM and expect a clean exit (status 0).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
