//! `cargo xtask dev`: the whole system on this machine, for a newcomer.
//!
//! Uses `DATABASE_URL` when set, otherwise starts the installed PostgreSQL
//! (see `pg.rs`); uses `KAFKA_BROKERS` when set, otherwise a local tansu
//! broker (see `kafka.rs`); builds the `ledgerflow` binary, applies
//! migrations, starts every role in one process (api, admin, worker,
//! scheduler, ingress, relay) and prints how to use them. `--smoke` checks
//! every listener, pushes a job end to end and exits 0 when it completed.
use crate::cmd;
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Run one job end to end, then stop everything and exit.
    #[arg(long)]
    smoke: bool,
    /// Address for /healthcheck, /readyz and /metrics of every role.
    #[arg(long, default_value = "127.0.0.1:9090")]
    ops_addr: String,
    /// Address of the public API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    api_addr: String,
    /// Address of the admin API.
    #[arg(long, default_value = "127.0.0.1:8081")]
    admin_addr: String,
    /// Kafka bootstrap servers to use instead of a local tansu broker.
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// PostgreSQL to use instead of starting the local cluster.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

impl Args {
    /// The `--smoke` run used by `cargo xtask test`, on a port of its own so
    /// it does not collide with a developer's running `cargo xtask dev`.
    pub fn smoke(database_url: Option<String>, kafka_brokers: Option<String>) -> Self {
        Self {
            smoke: true,
            ops_addr: "127.0.0.1:19090".into(),
            api_addr: "127.0.0.1:18080".into(),
            admin_addr: "127.0.0.1:18081".into(),
            database_url,
            kafka_brokers,
        }
    }
}

fn step(n: usize, total: usize, what: &str) {
    println!("[{n}/{total}] {what}");
}

pub fn run(args: Args) -> Result<()> {
    let total = 5;
    step(1, total, "PostgreSQL");
    let url = match args.database_url.clone() {
        Some(u) => u,
        None => crate::pg::ensure_postgres()?,
    };
    println!("      using {}", cmd::redact_url(&url));
    step(2, total, "Kafka-protocol broker");
    let brokers = match args.kafka_brokers.clone() {
        Some(b) => b,
        None => crate::kafka::ensure_broker()?,
    };
    println!("      using {brokers}");

    step(3, total, "building the ledgerflow binary");
    cmd::run(cmd::cargo().args(["build", "-p", "ledgerflow-workers", "--bin", "ledgerflow"]))?;
    let bin: PathBuf = cmd::workspace_root().join("target/debug/ledgerflow");

    step(4, total, "applying migrations");
    cmd::run(Command::new(&bin).arg("migrate").env("DATABASE_URL", &url))?;

    step(
        5,
        total,
        "starting roles: api, admin, worker, scheduler, ingress, relay",
    );
    // The demo ingress turns messages on `ledgerflow.demo.jobs` into jobs.
    let ingress = format!(
        r#"{{"kafka": {{"bootstrap-servers": "{brokers}"}}, "group-id": "ledgerflow-dev",
            "topics": [{{"name": "ledgerflow.demo.jobs", "handler": "enqueue:default:ledgerflow.noop"}}],
            "dead-letter-topic": "ledgerflow.dead-letters"}}"#
    );
    let mut child = Command::new(&bin)
        .args([
            "run",
            "--roles",
            "api,admin,worker,scheduler,ingress,relay",
            "--queues",
            "default=16",
        ])
        .env("DATABASE_URL", &url)
        .env("KAFKA_BROKERS", &brokers)
        .env("LEDGERFLOW_INGRESS_CONFIG", ingress)
        .env("LEDGERFLOW_OPS_ADDR", &args.ops_addr)
        .env("LEDGERFLOW_API_ADDR", &args.api_addr)
        .env("LEDGERFLOW_ADMIN_ADDR", &args.admin_addr)
        .env("LEDGERFLOW_SHUTDOWN_GRACE_SECS", "5")
        .spawn()
        .context("starting ledgerflow")?;
    for addr in [&args.ops_addr, &args.api_addr, &args.admin_addr] {
        if let Err(e) = wait_healthy(addr, Duration::from_secs(60)) {
            let _ = child.kill();
            return Err(e);
        }
    }

    let enqueue = format!(
        "DATABASE_URL='{}' {} enqueue --kind ledgerflow.noop --wait-secs 10",
        url,
        bin.display()
    );
    if args.smoke {
        let result = cmd::run(
            Command::new(&bin)
                .args(["enqueue", "--kind", "ledgerflow.noop", "--wait-secs", "30"])
                .env("DATABASE_URL", &url),
        );
        stop(&mut child)?;
        result.context("smoke job did not complete")?;
        println!("smoke: ok");
        return Ok(());
    }
    println!();
    println!("Ledgerflow is running (Ctrl-C stops it gracefully).");
    println!("  public API   http://{}/docs (Swagger UI)", args.api_addr);
    println!("  admin API    http://{}/docs", args.admin_addr);
    println!("  health   http://{}/healthcheck", args.ops_addr);
    println!("  ready    http://{}/readyz", args.ops_addr);
    println!("  metrics  http://{}/metrics", args.ops_addr);
    println!("  enqueue a job:");
    println!("    {enqueue}");
    let status = child.wait()?;
    if !status.success() {
        bail!("ledgerflow exited with {status}");
    }
    Ok(())
}

fn wait_healthy(addr: &str, within: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        if get(addr, "/healthcheck").is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
            return Ok(());
        }
        if start.elapsed() > within {
            bail!("ledgerflow did not answer http://{addr}/healthcheck within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// SIGTERM, then wait for the graceful drain.
fn stop(child: &mut Child) -> Result<()> {
    cmd::run(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
    let status = child.wait()?;
    if !status.success() {
        bail!("ledgerflow exited with {status} after SIGTERM");
    }
    Ok(())
}
