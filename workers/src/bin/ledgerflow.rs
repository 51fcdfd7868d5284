//! The `ledgerflow` binary: one image, every role chosen by subcommand/flags.
//!
//! `ledgerflow migrate` applies the schema (the Helm migration Job runs it);
//! `ledgerflow run --roles worker,...` runs the selected roles in one process
//! until SIGTERM/Ctrl-C, then drains gracefully.
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use ledgerflow_engine::{Outcome, Store, StoreConfig};
use ledgerflow_workers::ops;
use ledgerflow_workers::runner::{JobContext, QueueConfig, Registry, Runner, RunnerConfig};
use sqlx::postgres::PgPoolOptions;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "ledgerflow", version, about = "Durable workflows and jobs on PostgreSQL and Kafka")]
struct Cli {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the database migrations and exit.
    Migrate,
    /// Run roles in this process until SIGTERM or Ctrl-C.
    Run(RunArgs),
}

#[derive(Parser, Debug)]
struct RunArgs {
    /// Roles to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "worker")]
    roles: Vec<Role>,

    /// Queues for the worker role: name=concurrency[:prefetch], comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "default=32", env = "LEDGERFLOW_QUEUES")]
    queues: Vec<String>,

    /// Seconds in-flight jobs get to finish on shutdown.
    #[arg(long, env = "LEDGERFLOW_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    grace_secs: u64,

    /// Address of /healthcheck, /readyz and /metrics.
    #[arg(long, env = "LEDGERFLOW_OPS_ADDR", default_value = "0.0.0.0:9090")]
    ops_addr: SocketAddr,

    /// Seconds a lease lasts without a heartbeat (lease reaper rescues after).
    #[arg(long, env = "LEDGERFLOW_LEASE_TTL_SECS", default_value_t = 10)]
    lease_ttl_secs: u64,

    /// Milliseconds between polls when no NOTIFY arrives.
    #[arg(long, env = "LEDGERFLOW_POLL_MS", default_value_t = 1000)]
    poll_ms: u64,

    /// Don't LISTEN/NOTIFY (for poolers in transaction mode); poll only.
    #[arg(long, env = "LEDGERFLOW_NO_NOTIFY")]
    no_notify: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Public API and webhook intake.
    Api,
    /// Admin API and console.
    Admin,
    /// Job runners.
    Worker,
    /// Kafka ingress consumers.
    Ingress,
    /// Cron scheduler.
    Scheduler,
    /// Outbox relay.
    Relay,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("LEDGERFLOW_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let url = cli
        .database_url
        .context("DATABASE_URL is not set (e.g. postgres://user:pass@host:5432/db)")?;
    match cli.command {
        Command::Migrate => {
            let pool = PgPoolOptions::new().max_connections(2).connect(&url).await?;
            ledgerflow_engine::MIGRATOR.run(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Run(args) => run(&url, args).await,
    }
}

async fn run(url: &str, args: RunArgs) -> Result<()> {
    for role in &args.roles {
        if *role != Role::Worker {
            bail!(
                "role {role:?} is not part of this build yet; available roles: worker"
            );
        }
    }
    let queues = args
        .queues
        .iter()
        .map(|q| QueueConfig::parse(q).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let total: usize = queues.iter().map(|q| q.concurrency).sum();
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(total + 8).unwrap_or(64))
        .connect(url)
        .await
        .context("connecting to PostgreSQL")?;
    let store = Store::with_config(
        pool.clone(),
        StoreConfig {
            lease_ttl: Duration::from_secs(args.lease_ttl_secs.max(1)),
            notify: !args.no_notify,
            ..StoreConfig::default()
        },
    );
    let config = RunnerConfig {
        queues,
        listen: !args.no_notify,
        poll_interval: Duration::from_millis(args.poll_ms.max(10)),
        heartbeat_interval: Duration::from_secs(args.lease_ttl_secs.max(1)) / 3,
        ..RunnerConfig::default()
    };
    let runner = Runner::start(store, builtin_handlers(), config).await?;
    tracing::info!(worker = runner.worker_id(), "worker running");
    let ops = ops::serve(args.ops_addr, pool.clone()).await?;

    shutdown_signal().await;
    tracing::info!(grace_secs = args.grace_secs, "shutting down: draining in-flight jobs");
    let report = runner.shutdown(Duration::from_secs(args.grace_secs)).await;
    tracing::info!(aborted = report.aborted, released = report.released, "stopped");
    ops.abort();
    Ok(())
}

/// Handlers every worker has, whatever domain is loaded.
fn builtin_handlers() -> Registry {
    Registry::new().register("ledgerflow.noop", |_: JobContext| async { Outcome::Complete })
}

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
