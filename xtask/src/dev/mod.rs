//! `cargo xtask dev`: the whole system on this machine, for a newcomer.
//!
//! In numbered steps: PostgreSQL (`DATABASE_URL`, else the installed cluster,
//! see `pg.rs`); a Kafka broker (`KAFKA_BROKERS`, else Apache Kafka on
//! 127.0.0.1:9092 from jars Maven resolves once and caches, its log in
//! `target/kafka/dev`, see `kafka.rs`) and the topics the roles use; builds `ledgerflow` and
//! `exchange-sim`; applies the migrations; seeds demo data (`ledgerflow
//! seed`: a funded user with an API key, an operator, two approvers and a
//! security admin); runs with the withdrawal policy [`DEV_WITHDRAWAL_POLICY`];
//! starts the exchange simulator, whose signed webhooks go to the API's
//! `/v1/webhooks/exchange` with a secret generated for this run and handed to
//! both sides through the environment; starts every role (api, admin,
//! worker, scheduler, ingress, relay) with the payments workflows on; prints
//! the URLs, the credentials and a ready-to-paste curl that starts a trade.
//!
//! Ctrl-C (or SIGTERM) stops everything in order: `ledgerflow` first (it
//! drains its in-flight jobs), then the simulator, then the Kafka broker if
//! this run started it; every child is waited for. The children run in
//! process groups of their own, so a Ctrl-C in the terminal reaches only
//! xtask, which decides the order; a second Ctrl-C kills what is left. Only
//! a SIGKILL of xtask itself can leave them behind.
//!
//! `--smoke` does all that on a database of its own (so it never
//! disturbs a running `cargo xtask dev`), then pushes one trade and one
//! small withdrawal end to end through the public API, the simulator and its
//! webhooks, then a large withdrawal through two distinct approvers on the
//! admin API (the same approver's second approval is refused) and one
//! through an approver's rejection (its hold released), checks the final
//! states and the exact balance changes, stops everything and exits 0. It fails with a message naming the step on any
//! error, or when the run after the build takes longer than 90 s.
use crate::{cmd, http};
use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod banner;
mod services;
mod smoke;

use banner::*;
use services::*;
use smoke::*;

/// Ctrl-C/SIGTERM received so far: 1 stops gracefully, 2 kills.
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// The smoke run's budget once the binaries are built.
const SMOKE_DEADLINE: Duration = Duration::from_secs(90);
/// Seconds `ledgerflow` gets to drain on shutdown.
const GRACE_SECS: u64 = 5;
/// The webhook provider name the simulator posts as (`/v1/webhooks/exchange`).
const PROVIDER: &str = "exchange";
/// The smoke run's own database on the same server.
const SMOKE_DATABASE: &str = "ledgerflow_dev_smoke";

/// The demo trade: buy 0.001 BTC at a limit of 30,000.00 USD. The simulator
/// fills at the limit with a 0.1% fee on the notional, so the user pays
/// 30.00 + 0.03 USD and gets 0.001 BTC.
const TRADE_BASE_AMOUNT: &str = "0.001";
const TRADE_LIMIT_PRICE: &str = "30000.00";
const TRADE_USD_COST: &str = "30.03";
/// The smoke withdrawal: 0.001 BTC, below the approval threshold of
/// [`DEV_WITHDRAWAL_POLICY`], so it needs no approval.
const WITHDRAWAL_AMOUNT: &str = "0.001";
/// The smoke's large withdrawal: above BTC's second-approval threshold, so
/// demo-approver and demo-approver-2 must both approve it.
const LARGE_WITHDRAWAL_AMOUNT: &str = "1.2";
/// The smoke's rejected withdrawal: above the approval threshold; the
/// approver rejects it and its hold is released.
const REJECTED_WITHDRAWAL_AMOUNT: &str = "0.6";

/// The withdrawal policy `cargo xtask dev` runs with (LEDGERFLOW_WITHDRAWAL_POLICY):
/// BTC above 0.5 needs an approver, above 1 two distinct ones, at most 1.9
/// per user and day; USD likewise at 10,000 / 50,000 / 100,000. The seeded
/// user holds 2 BTC, so a large withdrawal of the demo data waits in the
/// console's Approvals panel.
const DEV_WITHDRAWAL_POLICY: &str = r#"{"BTC": {"approval-threshold": "0.5", "second-approval-threshold": "1", "daily-limit": "1.9"}, "USD": {"approval-threshold": "10000", "second-approval-threshold": "50000", "daily-limit": "100000"}}"#;
/// The cron schedule `cargo xtask dev` runs: a no-op job every 30 seconds (every 5 with
/// `--smoke`, whose run is short), so the scheduler's metrics and the dashboards' cron
/// panels have something to show.
fn dev_cron_schedules(smoke: bool) -> String {
    let every = if smoke { 5 } else { 30 };
    json!([{"name": "dev-heartbeat", "expression": format!("*/{every} * * * * *"),
            "job-kind": "ledgerflow.noop", "catch-up": "latest"}])
    .to_string()
}
const WITHDRAWAL_ADDRESS: &str = "tb1qz90pueq0k755tzthyrfjcr9m4gpny46jfr07ls";

#[derive(clap::Args)]
#[command(
    after_help = "What it prints: the Swagger UI, admin console, metrics and health URLs, \
    the demo user's API key and balances, the admins' credentials, and a curl that starts a \
    trade. Logs go to target/dev/*.log."
)]
pub struct Args {
    /// Push one trade and three withdrawals (small; large, approved by two
    /// approvers; rejected) end to end, then stop everything and exit.
    #[arg(long)]
    smoke: bool,
    /// Address for /healthcheck, /readyz and /metrics of every role
    /// [default: 127.0.0.1:9090, with --smoke a free port].
    #[arg(long)]
    ops_addr: Option<String>,
    /// Address of the public API [default: 127.0.0.1:8080, with --smoke a free port].
    #[arg(long)]
    api_addr: Option<String>,
    /// Address of the admin API and console [default: 127.0.0.1:8081, with --smoke a free port].
    #[arg(long)]
    admin_addr: Option<String>,
    /// Address of the exchange simulator [default: 127.0.0.1:7070, with --smoke a free port].
    #[arg(long)]
    exchange_addr: Option<String>,
    /// Kafka bootstrap servers to use instead of a local Apache Kafka broker.
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// PostgreSQL to use instead of starting the local cluster.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

impl Args {
    /// The `--smoke` run used by `cargo xtask test`.
    pub fn smoke(database_url: Option<String>, kafka_brokers: Option<String>) -> Self {
        Self {
            smoke: true,
            ops_addr: None,
            api_addr: None,
            admin_addr: None,
            exchange_addr: None,
            database_url,
            kafka_brokers,
        }
    }

    /// The addresses, defaults filled in. A smoke run takes free ports
    /// picked by the OS, so that it never collides with a developer's
    /// running `cargo xtask dev`, a leftover process, or another smoke run.
    fn addrs(&self) -> Result<Addrs> {
        let pick = |given: &Option<String>, port: u16| match given {
            Some(addr) => Ok(addr.clone()),
            None if self.smoke => free_port(),
            None => Ok(format!("127.0.0.1:{port}")),
        };
        Ok(Addrs {
            ops: pick(&self.ops_addr, 9090)?,
            api: pick(&self.api_addr, 8080)?,
            admin: pick(&self.admin_addr, 8081)?,
            exchange: pick(&self.exchange_addr, 7070)?,
        })
    }
}

/// A port nothing listens on now, as `127.0.0.1:port` (the OS picks it; a
/// process could still take it before we bind it, which is unlikely enough).
fn free_port() -> Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.to_string())
}

/// Where each listener is.
struct Addrs {
    ops: String,
    api: String,
    admin: String,
    exchange: String,
}

/// Numbered progress lines.
struct Progress {
    done: usize,
    total: usize,
    started: Instant,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.done += 1;
        println!(
            "[{}/{}] {what}  (+{:.1}s)",
            self.done,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
    }
}

pub fn run(args: Args) -> Result<()> {
    // A second handler (xtask test already set one) is not an error.
    let _ = ctrlc::try_set_handler(|| {
        let n = SIGNALS.fetch_add(1, Ordering::SeqCst) + 1;
        if n == 1 {
            eprintln!("\nstopping… (Ctrl-C again to kill)");
        }
    });
    let mut progress = Progress {
        done: 0,
        // postgres, kafka, build, migrate, seed, simulator, roles, (trade,
        // withdrawal, approved withdrawal, rejected withdrawal, schemathesis,)
        // stop
        total: if args.smoke { 13 } else { 8 },
        started: Instant::now(),
    };
    let logs =
        cmd::workspace_root()
            .join("target")
            .join(if args.smoke { "dev-smoke" } else { "dev" });
    let mut services = Services::new(logs);
    let result = run_services(&args, &mut progress, &mut services);
    if result.is_err() && args.smoke {
        services.print_log_tails();
    }
    let stopping = "stopping: ledgerflow (drains its jobs), exchange-sim, Kafka if started here";
    if result.is_ok() {
        progress.step(stopping);
    } else {
        println!("{stopping}");
    }
    let stopped = services.stop();
    match (result, stopped) {
        (Ok(()), Ok(())) => {
            if args.smoke {
                println!(
                    "smoke: ok in {:.1}s",
                    progress.started.elapsed().as_secs_f64()
                );
            } else {
                println!("stopped cleanly");
            }
            Ok(())
        }
        (Err(e), stopped) => {
            if let Err(also) = stopped {
                eprintln!("also, while stopping: {also:#}");
            }
            Err(if args.smoke {
                e.context("the dev smoke run failed (logs: target/dev-smoke/)")
            } else {
                e
            })
        }
        (Ok(()), Err(e)) => Err(e.context("stopping the services")),
    }
}

/// What the run learned while preparing, for the banner and the smoke.
struct Ready {
    seeded: Value,
    database_url: String,
    addrs: Addrs,
}

fn run_services(args: &Args, progress: &mut Progress, services: &mut Services) -> Result<()> {
    let addrs = args.addrs()?;
    progress.step("PostgreSQL");
    let url = match args.database_url.clone() {
        Some(u) => u,
        None => crate::pg::ensure_postgres()?,
    };
    println!("      using {}", cmd::redact_url(&url));
    interrupted()?;

    progress.step("Kafka broker");
    let brokers = match args.kafka_brokers.clone() {
        Some(b) => b,
        None => {
            let (brokers, node) = crate::kafka::broker()?;
            services.kafka = node;
            brokers
        }
    };
    println!("      using {brokers}");
    create_topics(&brokers);
    interrupted()?;

    progress.step("building ledgerflow and exchange-sim");
    cmd::run(cmd::cargo().args([
        "build",
        "-p",
        "ledgerflow-workers",
        "-p",
        "ledgerflow-payments",
        "--bin",
        "ledgerflow",
        "--bin",
        "exchange-sim",
    ]))?;
    let target = cmd::target_dir(cmd::workspace_root()).join("debug");
    let bin = target.join("ledgerflow");
    let sim_bin = target.join("exchange-sim");
    interrupted()?;
    // Everything after the build is bounded in a smoke run.
    let deadline = args.smoke.then(|| Instant::now() + SMOKE_DEADLINE);

    let url = if args.smoke {
        progress.step(&format!(
            "database {SMOKE_DATABASE} of the smoke runs, migrations"
        ));
        smoke_database(&url, SMOKE_DATABASE)?
    } else {
        progress.step("applying migrations");
        url
    };
    cmd::run(Command::new(&bin).arg("migrate").env("DATABASE_URL", &url))?;
    interrupted()?;

    progress.step("seeding demo data (ledgerflow seed)");
    let seeded = seed(&bin, &url)?;
    for note in seeded["notes"].as_array().into_iter().flatten() {
        println!("      {}", note.as_str().unwrap_or_default());
    }
    interrupted()?;

    for addr in [&addrs.api, &addrs.admin, &addrs.ops, &addrs.exchange] {
        ensure_free(addr)?;
    }
    let secret = random_hex(32)?;
    progress.step("starting the exchange simulator");
    let webhook_url = format!("http://{}/v1/webhooks/{PROVIDER}", addrs.api);
    let sim_addr = services.start_simulator(&sim_bin, &addrs.exchange, &webhook_url, &secret)?;
    println!(
        "      listening on {sim_addr}, webhooks to {webhook_url} (secret generated for this run)"
    );
    interrupted()?;

    progress.step("starting roles: api, admin, worker, scheduler, ingress, relay");
    let group = if args.smoke {
        "ledgerflow-dev-smoke"
    } else {
        "ledgerflow-dev"
    };
    let ingress = json!({
        "kafka": {"bootstrap-servers": brokers},
        "group-id": group,
        "topics": [{"name": DEMO_TOPIC, "handler": "enqueue:default:ledgerflow.noop"}],
        "dead-letter-topic": DEAD_LETTER_TOPIC,
    });
    let mut ledgerflow = Command::new(&bin);
    ledgerflow
        .args([
            "run",
            "--roles",
            "api,admin,worker,scheduler,ingress,relay",
            "--queues",
            "default=16",
        ])
        .env("DATABASE_URL", &url)
        .env("KAFKA_BROKERS", &brokers)
        .env("LEDGERFLOW_INGRESS_CONFIG", ingress.to_string())
        .env("LEDGERFLOW_OPS_ADDR", &addrs.ops)
        .env("LEDGERFLOW_API_ADDR", &addrs.api)
        .env("LEDGERFLOW_ADMIN_ADDR", &addrs.admin)
        .env("LEDGERFLOW_SHUTDOWN_GRACE_SECS", GRACE_SECS.to_string())
        .env("LEDGERFLOW_WITHDRAWAL_POLICY", DEV_WITHDRAWAL_POLICY)
        .env("LEDGERFLOW_CRON_SCHEDULES", dev_cron_schedules(args.smoke))
        .env("LEDGERFLOW_EXCHANGE_URL", format!("http://{sim_addr}/"))
        // The simulator is the email/push provider too.
        .env("LEDGERFLOW_NOTIFIER_URL", format!("http://{sim_addr}/"))
        .env(
            "LEDGERFLOW_WEBHOOK_PROVIDERS",
            json!({ PROVIDER: {"scheme": "stripe"} }).to_string(),
        )
        .env(
            format!("LEDGERFLOW_WEBHOOK_SECRETS_{}", PROVIDER.to_uppercase()),
            &secret,
        );
    services.start_ledgerflow(ledgerflow)?;
    for addr in [&addrs.ops, &addrs.api, &addrs.admin] {
        services.wait_healthy(addr, deadline)?;
    }

    let ready = Ready {
        seeded,
        database_url: url,
        addrs,
    };
    println!("{}", banner(args, &ready, &brokers));
    if args.smoke {
        let deadline = deadline.context("a smoke run has a deadline")?;
        return smoke(&ready, services, progress, deadline);
    }
    println!("Ledgerflow is running. Ctrl-C stops everything.");
    loop {
        if SIGNALS.load(Ordering::SeqCst) > 0 {
            return Ok(());
        }
        services.check_alive()?;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The topics the dev roles use, created before the roles start: a broker
/// that does not create topics on first use (a managed Kafka usually does
/// not) leaves a relay producing to a missing topic retrying until
/// librdkafka's message timeout, which also holds up its shutdown.
const TOPICS: &[&str] = &[
    DEMO_TOPIC,
    DEAD_LETTER_TOPIC,
    // The payments workflows' domain events (`ledgerflow_payments::workflows::EVENTS_TOPIC`).
    "ledgerflow.payments.events",
];
/// Each message on it becomes a `ledgerflow.noop` job (the demo ingress).
const DEMO_TOPIC: &str = "ledgerflow.demo.jobs";
const DEAD_LETTER_TOPIC: &str = "ledgerflow.dead-letters";

/// Creates [`TOPICS`] (3 partitions each) with Kafka's own topic command; an
/// existing topic is fine. A failure is only reported: a `KAFKA_BROKERS`
/// cluster may refuse this client the right to create topics and have them
/// already.
fn create_topics(brokers: &str) {
    let first = brokers.split(',').next().unwrap_or(brokers).trim();
    let created =
        crate::kafka::jars().and_then(|jars| crate::kafka::create_topics(&jars, first, TOPICS));
    match created {
        Ok(()) => println!("      topics: {}", TOPICS.join(", ")),
        Err(e) => println!("      warning: could not create the topics {TOPICS:?}: {e:#}"),
    }
}

/// Fails once Ctrl-C or SIGTERM arrived.
fn interrupted() -> Result<()> {
    if SIGNALS.load(Ordering::SeqCst) > 0 {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs `ledgerflow seed` and returns its JSON.
fn seed(bin: &Path, url: &str) -> Result<Value> {
    let out = cmd::capture(
        Command::new(bin)
            .args(["seed", "--rotate-admin-credentials"])
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn"),
    )?;
    if !out.status.success() {
        bail!(
            "`ledgerflow seed` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    seed_json(&stdout)
}

/// The pretty-printed JSON object in `ledgerflow seed`'s stdout (log lines,
/// if any, may surround it: they go to stdout too).
fn seed_json(stdout: &str) -> Result<Value> {
    let lines: Vec<&str> = stdout.lines().collect();
    let start = lines.iter().position(|l| *l == "{");
    let end = lines.iter().rposition(|l| *l == "}");
    let (Some(start), Some(end)) = (start, end) else {
        bail!("`ledgerflow seed` printed no JSON object: {stdout}");
    };
    let value: Value = serde_json::from_str(&lines[start..=end].join("\n"))
        .context("`ledgerflow seed` printed malformed JSON")?;
    for field in [
        "user_id",
        "api_key",
        "admin_token",
        "approver_token",
        "approver2_token",
        "security_token",
    ] {
        if value[field].as_str().is_none_or(str::is_empty) {
            bail!("`ledgerflow seed` printed no {field:?}");
        }
    }
    Ok(value)
}

/// Creates database `name` on `url`'s server unless it exists, empties it, and
/// returns its URL.
///
/// The database is kept between runs rather than dropped and recreated
/// (`DROP DATABASE` waits for a checkpoint, tens of seconds on a busy
/// machine), but its schema is dropped and rebuilt by the migrations: the
/// previous run's schemathesis pass drives the admin API at random and can
/// leave a queue paused or a schedule stopped, which would hold this run's
/// trade forever.
fn smoke_database(url: &str, name: &str) -> Result<String> {
    let psql = |db_url: &str, sql: &str| {
        cmd::capture(
            Command::new("psql")
                .arg(format!("--dbname={db_url}"))
                .args([
                    "-X",
                    "-w",
                    "-q",
                    "-t",
                    "-A",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    sql,
                ])
                .env("PGCONNECT_TIMEOUT", "5"),
        )
    };
    let exists = psql(
        url,
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
    )?;
    if !exists.status.success() {
        bail!(
            "cannot query {}: {}",
            cmd::redact_url(url),
            String::from_utf8_lossy(&exists.stderr).trim()
        );
    }
    if String::from_utf8_lossy(&exists.stdout).trim() == "0" {
        let created = psql(url, &format!("CREATE DATABASE {name}"))?;
        let stderr = String::from_utf8_lossy(&created.stderr);
        // Another process may have created it meanwhile: fine.
        if !created.status.success() && !stderr.contains("already exists") {
            bail!(
                "could not create the smoke database {name} on {} (the role needs CREATEDB): {}",
                cmd::redact_url(url),
                stderr.trim()
            );
        }
        println!("      created database {name}");
    }
    let url = with_database(url, name);
    let reset = psql(
        &url,
        "DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;",
    )?;
    if !reset.status.success() {
        bail!(
            "could not empty the smoke database {name} on {} (its role must own it): {}",
            cmd::redact_url(&url),
            String::from_utf8_lossy(&reset.stderr).trim()
        );
    }
    println!("      emptied database {name} (the migrations rebuild it)");
    Ok(url)
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// `n` random bytes from the OS, hex-encoded (the per-run webhook secret).
fn random_hex(n: usize) -> Result<String> {
    let mut bytes = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Fails when something already listens on `addr`: a leftover `cargo xtask
/// dev` would otherwise answer our health checks in place of the new one.
fn ensure_free(addr: &str) -> Result<()> {
    let sock: SocketAddr = addr
        .parse()
        .with_context(|| format!("{addr} is not host:port"))?;
    if TcpStream::connect_timeout(&sock, Duration::from_millis(300)).is_ok() {
        bail!(
            "{addr} is already in use (another `cargo xtask dev`? `ss -ltnp` shows which \
             process); stop it or choose other addresses (`cargo xtask dev --help`)"
        );
    }
    Ok(())
}
