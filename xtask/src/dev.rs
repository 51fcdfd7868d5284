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

// ----------------------------------------------------------------- children

/// The processes this run started, stopped in order by [`Services::stop`]
/// (and killed by `Drop` if an error skipped that).
struct Services {
    logs: PathBuf,
    /// Whether this run started a child, i.e. wrote the logs.
    started: bool,
    ledgerflow: Option<Child>,
    simulator: Option<Child>,
    kafka: Option<crate::apache_kafka::Node>,
}

impl Services {
    fn new(logs: PathBuf) -> Self {
        Services {
            logs,
            started: false,
            ledgerflow: None,
            simulator: None,
            kafka: None,
        }
    }

    fn log_file(&self, name: &str) -> Result<File> {
        std::fs::create_dir_all(&self.logs)
            .with_context(|| format!("creating {}", self.logs.display()))?;
        let path = self.logs.join(format!("{name}.log"));
        File::create(&path).with_context(|| format!("creating {}", path.display()))
    }

    /// Starts `exchange-sim` and returns the address it printed once bound.
    fn start_simulator(
        &mut self,
        bin: &Path,
        listen: &str,
        webhook_url: &str,
        secret: &str,
    ) -> Result<String> {
        let log = self.log_file("exchange-sim")?;
        self.started = true;
        let mut child = Command::new(bin)
            .args([
                "--listen",
                listen,
                "--webhook-url",
                webhook_url,
                "--scheme",
                "stripe",
            ])
            // Through the environment, never argv: `ps` shows arguments.
            .env("EXCHANGE_SIM_WEBHOOK_SECRET", secret)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("exchange-sim stdout")?;
        self.simulator = Some(child);
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        // Returns at the first line, or at EOF if the simulator exits.
        reader.read_line(&mut first)?;
        let addr = first.trim().to_string();
        if addr.is_empty() {
            bail!(
                "exchange-sim exited before listening on {listen}; see {}",
                self.logs.join("exchange-sim.log").display()
            );
        }
        // Keep draining its stdout into the log so it can never block on a full pipe.
        let mut log = log;
        std::thread::spawn(move || std::io::copy(&mut reader, &mut log));
        Ok(addr)
    }

    fn start_ledgerflow(&mut self, mut command: Command) -> Result<()> {
        let log = self.log_file("ledgerflow")?;
        self.started = true;
        println!("      logs: {}", self.logs.join("ledgerflow.log").display());
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting ledgerflow")?;
        self.ledgerflow = Some(child);
        Ok(())
    }

    /// Fails if a child exited on its own.
    fn check_alive(&mut self) -> Result<()> {
        for (name, child) in [
            ("ledgerflow", &mut self.ledgerflow),
            ("exchange-sim", &mut self.simulator),
        ] {
            if let Some(c) = child
                && let Some(status) = c.try_wait()?
            {
                *child = None;
                bail!(
                    "{name} exited unexpectedly ({status}); see {}",
                    self.logs.join(format!("{name}.log")).display()
                );
            }
        }
        Ok(())
    }

    /// Waits until `http://{addr}/healthcheck` answers 200.
    fn wait_healthy(&mut self, addr: &str, deadline: Option<Instant>) -> Result<()> {
        let deadline = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        loop {
            if let Ok(r) = http::request(addr, "GET", "/healthcheck", &[], None)
                && r.status == 200
            {
                return Ok(());
            }
            self.check_alive()?;
            interrupted()?;
            if Instant::now() > deadline {
                bail!("ledgerflow did not answer http://{addr}/healthcheck in time");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops every child in order and waits for each; fails if one did not
    /// exit cleanly.
    fn stop(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        // The drain, plus time for the Kafka roles to close their clients.
        let grace = Duration::from_secs(GRACE_SECS + 25);
        for (name, child, within, must_succeed) in [
            ("ledgerflow", self.ledgerflow.take(), grace, true),
            (
                "exchange-sim",
                self.simulator.take(),
                Duration::from_secs(5),
                true,
            ),
        ] {
            let Some(mut child) = child else { continue };
            match terminate(&mut child, within) {
                Ok(status) if status.success() || !must_succeed => {}
                Ok(status) => problems.push(format!("{name} exited with {status}")),
                Err(e) => problems.push(format!("{name}: {e:#}")),
            }
        }
        // Last: the roles' Kafka clients close against it. SIGTERM, so that it
        // closes its log cleanly for the next run.
        if let Some(mut kafka) = self.kafka.take() {
            kafka.stop();
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(problems.join("; ")))
        }
    }

    fn print_log_tails(&self) {
        if !self.started {
            return; // the logs there are an earlier run's
        }
        for name in ["ledgerflow", "exchange-sim"] {
            let path = self.logs.join(format!("{name}.log"));
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("---- last lines of {} ----", path.display());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        // The Kafka node kills its broker when it is dropped.
        for child in [&mut self.ledgerflow, &mut self.simulator]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGTERM, then wait up to `within` (or until a second Ctrl-C), then SIGKILL.
fn terminate(child: &mut Child, within: Duration) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    cmd::read(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline || SIGNALS.load(Ordering::SeqCst) > 1 {
            child.kill()?;
            child.wait()?;
            bail!("did not stop within {within:?} of SIGTERM: killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------------- banner

/// The three lines that start a trade and follow it; the banner prints them
/// and the smoke run executes them, so what is printed is known to work.
fn trade_snippet(api: &str, key: &str, idempotency_key: &str) -> [String; 3] {
    let body = json!({
        "side": "buy",
        "base_asset": "BTC",
        "quote_asset": "USD",
        "base_amount": TRADE_BASE_AMOUNT,
        "limit_price": TRADE_LIMIT_PRICE,
    });
    [
        format!(
            "TRADE=$(curl -sS -X POST http://{api}/v1/trades -H 'Authorization: Bearer {key}' \
             -H 'Content-Type: application/json' -H \"Idempotency-Key: {idempotency_key}\" \
             -d '{body}'); echo \"$TRADE\""
        ),
        r#"TRADE_ID=$(echo "$TRADE" | sed -E 's/.*"id":"([^"]+)".*/\1/')"#.to_string(),
        format!("curl -sS http://{api}/v1/trades/$TRADE_ID -H 'Authorization: Bearer {key}'; echo"),
    ]
}

fn banner(args: &Args, ready: &Ready, brokers: &str) -> String {
    let s = &ready.seeded;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let balances: Vec<String> = s["balances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| format!("{} {}", text(&b["available"]), text(&b["asset"])))
        .collect();
    let [post, extract, get] =
        trade_snippet(&ready.addrs.api, &text(&s["api_key"]), "demo-$(date +%s%N)");
    let (api, admin, ops) = (&ready.addrs.api, &ready.addrs.admin, &ready.addrs.ops);
    format!(
        "
Ledgerflow is up.

  Swagger UI (public API)  http://{api}/docs
  admin console            http://{admin}/
  admin API (Swagger UI)   http://{admin}/docs
  metrics                  http://{ops}/metrics   (API metrics too; the public API serves none)
  health, readiness        http://{ops}/healthcheck   http://{ops}/readyz
  exchange simulator       http://{sim}/   (signed webhooks to http://{api}/v1/webhooks/{PROVIDER})
  database, broker         {db}   {brokers}
  logs                     {logs}/ledgerflow.log, exchange-sim.log

Demo data (new credentials on every run; `ledgerflow seed` made them):
  user {email} (id {user}), available: {balances}
  API key                  {key}
  admin demo-operator      {operator}   (role operator: retry, cancel, pause)
  admin demo-approver      {approver}   (role approver: approves or rejects withdrawals)
  admin demo-approver-2    {approver2}   (role approver: the second approver above the second threshold)
  admin demo-security      {security}   (role security: admins, API keys, withdrawal policy)

Withdrawal policy (LEDGERFLOW_WITHDRAWAL_POLICY; the console's Policy panel changes it):
  BTC: approval above 0.5, two approvers above 1, 1.9 per user and day
  USD: approval above 10000, two approvers above 50000, 100000 per user and day

Start a trade (buy {TRADE_BASE_AMOUNT} BTC at {TRADE_LIMIT_PRICE} USD) and follow it
(pending -> validated -> held -> placed -> filled -> settled):
  {post}
  {extract}
  {get}
",
        sim = ready.addrs.exchange,
        db = cmd::redact_url(&ready.database_url),
        logs = if args.smoke {
            "target/dev-smoke"
        } else {
            "target/dev"
        },
        email = text(&s["email"]),
        user = text(&s["user_id"]),
        balances = balances.join(", "),
        key = text(&s["api_key"]),
        operator = text(&s["admin_token"]),
        approver = text(&s["approver_token"]),
        approver2 = text(&s["approver2_token"]),
        security = text(&s["security_token"]),
    )
}

// -------------------------------------------------------------------- smoke

fn smoke(
    ready: &Ready,
    services: &mut Services,
    progress: &mut Progress,
    deadline: Instant,
) -> Result<()> {
    let api = ready.addrs.api.as_str();
    let key = ready.seeded["api_key"]
        .as_str()
        .context("seed JSON: api_key")?
        .to_string();
    let auth = format!("Bearer {key}");
    let run_id = random_hex(6)?;

    progress.step("smoke: one trade end to end (order placed -> fill webhook -> settled)");
    let before = balances(api, &auth)?;
    let idem = format!("smoke-trade-{run_id}");
    let trade_id = place_trade(api, &key, &idem)?;
    println!("      trade {trade_id} accepted");
    let trade = follow(
        services,
        deadline,
        "trade",
        || get_json(api, &auth, &format!("/v1/trades/{trade_id}")),
        &["settled"],
        &["rejected", "cancelled"],
    )?;
    println!("      trade {trade_id} {}", trade["status"]);
    // The same Idempotency-Key and body answer the same trade again.
    let replay = post_trade(api, &auth, &idem)?;
    if replay != trade_id {
        bail!("replaying the trade's Idempotency-Key gave trade {replay}, not {trade_id}");
    }
    let after_trade = balances(api, &auth)?;
    expect_change(&before, &after_trade, "USD", &format!("-{TRADE_USD_COST}"))?;
    expect_change(&before, &after_trade, "BTC", TRADE_BASE_AMOUNT)?;
    println!("      balances: USD -{TRADE_USD_COST}, BTC +{TRADE_BASE_AMOUNT}: as expected");

    progress
        .step("smoke: one withdrawal end to end (submitted -> confirmation webhook -> completed)");
    let body = json!({"asset": "BTC", "amount": WITHDRAWAL_AMOUNT, "address": WITHDRAWAL_ADDRESS});
    let idem = format!("smoke-withdrawal-{run_id}");
    let created = http::request(
        api,
        "POST",
        "/v1/withdrawals",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("idempotency-key", &idem),
        ],
        Some(&body.to_string()),
    )?;
    if created.status != 201 {
        bail!(
            "POST /v1/withdrawals answered {}: {}",
            created.status,
            created.body
        );
    }
    let withdrawal_id = created.json()?["id"]
        .as_str()
        .context("the withdrawal has no id")?
        .to_string();
    println!("      withdrawal {withdrawal_id} of {WITHDRAWAL_AMOUNT} BTC accepted");
    let withdrawal = follow(
        services,
        deadline,
        "withdrawal",
        || get_json(api, &auth, &format!("/v1/withdrawals/{withdrawal_id}")),
        &["completed"],
        &["rejected", "cancelled", "awaiting_approval"],
    )?;
    println!(
        "      withdrawal {withdrawal_id} {} (below the approval threshold: no approval needed)",
        withdrawal["status"]
    );
    let after = balances(api, &auth)?;
    expect_change(
        &after_trade,
        &after,
        "BTC",
        &format!("-{WITHDRAWAL_AMOUNT}"),
    )?;
    expect_change(&after_trade, &after, "USD", "0")?;
    for (asset, b) in &after {
        if units(&b.held)? != 0 {
            bail!(
                "{asset} still has {} held after both flows finished",
                b.held
            );
        }
    }
    println!("      balances: BTC -{WITHDRAWAL_AMOUNT}, nothing left held: as expected");

    progress
        .step("smoke: a large withdrawal through two distinct approvers (four-eyes) to completed");
    let id = post_withdrawal(
        api,
        &auth,
        LARGE_WITHDRAWAL_AMOUNT,
        &format!("smoke-large-{run_id}"),
    )?;
    wait_awaiting_approval(services, deadline, api, &auth, &id)?;
    let pending = admin_get(ready, "approver_token", "/v1/withdrawals/pending")?;
    let listed = pending["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["id"] == id.as_str())
        .with_context(|| format!("withdrawal {id} is not in the Approvals list: {pending}"))?;
    if listed["approvals_required"] != 2 || listed["user_email"] != ready.seeded["email"] {
        bail!("the Approvals list shows withdrawal {id} as {listed}");
    }
    let first = decide(ready, "approver_token", &id, "approve")?;
    if first.status != 200 || first.json()?["decision"] != "approval_recorded" {
        bail!(
            "the first approval of {id} answered {}: {}",
            first.status,
            first.body
        );
    }
    let twice = decide(ready, "approver_token", &id, "approve")?;
    if twice.status != 403 || !twice.body.contains("four-eyes") {
        bail!(
            "demo-approver approving {id} a second time answered {}: {}",
            twice.status,
            twice.body
        );
    }
    println!("      demo-approver approved; approving again was refused (403 four-eyes)");
    let second = decide(ready, "approver2_token", &id, "approve")?;
    if second.status != 200 || second.json()?["decision"] != "approved" {
        bail!(
            "the second approval of {id} answered {}: {}",
            second.status,
            second.body
        );
    }
    println!("      demo-approver-2 approved: two distinct approvers");
    let done = follow(
        services,
        deadline,
        "large withdrawal",
        || get_json(api, &auth, &format!("/v1/withdrawals/{id}")),
        &["completed"],
        &["rejected", "cancelled"],
    )?;
    println!(
        "      withdrawal {id} of {LARGE_WITHDRAWAL_AMOUNT} BTC {}",
        done["status"]
    );
    let after_large = balances(api, &auth)?;
    expect_change(
        &after,
        &after_large,
        "BTC",
        &format!("-{LARGE_WITHDRAWAL_AMOUNT}"),
    )?;

    progress.step("smoke: a withdrawal rejected by an approver (cancelled, hold released)");
    let id = post_withdrawal(
        api,
        &auth,
        REJECTED_WITHDRAWAL_AMOUNT,
        &format!("smoke-rejected-{run_id}"),
    )?;
    wait_awaiting_approval(services, deadline, api, &auth, &id)?;
    let held = balances(api, &auth)?;
    let held_btc = held.get("BTC").map(|b| units(&b.held)).transpose()?;
    if held_btc != Some(units(REJECTED_WITHDRAWAL_AMOUNT)?) {
        bail!("withdrawal {id} awaits approval without holding {REJECTED_WITHDRAWAL_AMOUNT} BTC");
    }
    // The wait may not be armed for a moment after the status shows (409): retry.
    let mut rejected = decide(ready, "approver_token", &id, "reject")?;
    while rejected.status == 409 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        rejected = decide(ready, "approver_token", &id, "reject")?;
    }
    if rejected.status != 200 {
        bail!(
            "rejecting {id} answered {}: {}",
            rejected.status,
            rejected.body
        );
    }
    let done = follow(
        services,
        deadline,
        "rejected withdrawal",
        || get_json(api, &auth, &format!("/v1/withdrawals/{id}")),
        &["rejected"],
        &["completed", "cancelled"],
    )?;
    println!("      withdrawal {id} {} by demo-approver", done["status"]);
    // The saga releases the hold after the status changes: wait for it.
    let released = loop {
        let now = balances(api, &auth)?;
        if now
            .get("BTC")
            .is_some_and(|b| units(&b.held).ok() == Some(0))
        {
            break now;
        }
        if Instant::now() > deadline {
            bail!("the hold of rejected withdrawal {id} was not released in time");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    expect_change(&after_large, &released, "BTC", "0")?;
    println!("      hold released: BTC balance unchanged, nothing held");

    progress.step("smoke: every catalogue metric exported, and in a real Prometheus with data for every dashboard panel");
    // A delivery without a signature: refused (401), and counted by reason.
    let unsigned = http::request(
        api,
        "POST",
        &format!("/v1/webhooks/{PROVIDER}"),
        &[("content-type", "application/json")],
        Some("{}"),
    )?;
    ensure!(
        unsigned.status == 401,
        "an unsigned webhook got HTTP {}, not 401",
        unsigned.status
    );
    crate::metrics_check::check_live(cmd::workspace_root(), &ready.addrs.ops)?;

    // Last, because it sends arbitrary (spec-valid and spec-invalid) requests to every
    // operation, including bulk operator actions, with the seeded credentials.
    progress.step("smoke: schemathesis over both OpenAPI specs (no 5xx, responses match)");
    let admin_token = ready.seeded["admin_token"]
        .as_str()
        .context("seed JSON: admin_token")?;
    crate::schemathesis::check(&crate::schemathesis::Args {
        api: format!("http://{api}"),
        admin: format!("http://{}", ready.addrs.admin),
        api_key: key.clone(),
        admin_token: admin_token.to_string(),
        max_examples: 100,
    })?;
    Ok(())
}

/// Places the smoke trade with the very commands the banner prints when
/// `curl` is installed (so they are known to work), else directly.
fn place_trade(api: &str, key: &str, idem: &str) -> Result<String> {
    if cmd::which("curl").is_none() || cmd::which("sh").is_none() {
        println!("      (curl is not installed: placing the trade without it)");
        return post_trade(api, &format!("Bearer {key}"), idem);
    }
    let [post, extract, get] = trade_snippet(api, key, idem);
    let script = format!("set -e\n{post}\n{extract}\necho \"TRADE_ID=$TRADE_ID\"\n{get}\n");
    let out = cmd::read(Command::new("sh").arg("-c").arg(&script))
        .context("the printed curl commands failed")?;
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("TRADE_ID="))
        .filter(|id| !id.is_empty() && !id.contains('{'))
        .with_context(|| format!("the printed curl commands gave no trade id: {out}"))?
        .to_string();
    let followed: Value = out
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("the printed GET gave no JSON: {out}"))?;
    if followed["id"] != id.as_str() {
        bail!("the printed GET answered {followed}, not trade {id}");
    }
    println!("      (placed and read back with the printed curl commands)");
    Ok(id)
}

/// POSTs the demo trade with `idem`; returns its id.
fn post_trade(api: &str, auth: &str, idem: &str) -> Result<String> {
    let body = json!({
        "side": "buy",
        "base_asset": "BTC",
        "quote_asset": "USD",
        "base_amount": TRADE_BASE_AMOUNT,
        "limit_price": TRADE_LIMIT_PRICE,
    });
    let r = http::request(
        api,
        "POST",
        "/v1/trades",
        &[
            ("authorization", auth),
            ("content-type", "application/json"),
            ("idempotency-key", idem),
        ],
        Some(&body.to_string()),
    )?;
    if r.status != 201 {
        bail!("POST /v1/trades answered {}: {}", r.status, r.body);
    }
    Ok(r.json()?["id"]
        .as_str()
        .context("the trade has no id")?
        .to_string())
}

/// POSTs a BTC withdrawal of `amount`; returns its id.
fn post_withdrawal(api: &str, auth: &str, amount: &str, idem: &str) -> Result<String> {
    let body = json!({"asset": "BTC", "amount": amount, "address": WITHDRAWAL_ADDRESS});
    let r = http::request(
        api,
        "POST",
        "/v1/withdrawals",
        &[
            ("authorization", auth),
            ("content-type", "application/json"),
            ("idempotency-key", idem),
        ],
        Some(&body.to_string()),
    )?;
    if r.status != 201 {
        bail!("POST /v1/withdrawals answered {}: {}", r.status, r.body);
    }
    let id = r.json()?["id"]
        .as_str()
        .context("the withdrawal has no id")?
        .to_string();
    println!("      withdrawal {id} of {amount} BTC accepted");
    Ok(id)
}

/// Waits until withdrawal `id` awaits approval.
fn wait_awaiting_approval(
    services: &mut Services,
    deadline: Instant,
    api: &str,
    auth: &str,
    id: &str,
) -> Result<()> {
    follow(
        services,
        deadline,
        "withdrawal",
        || get_json(api, auth, &format!("/v1/withdrawals/{id}")),
        &["awaiting_approval"],
        &["completed", "rejected", "cancelled", "submitted"],
    )?;
    println!("      withdrawal {id} awaits approval");
    Ok(())
}

/// GETs `path` on the admin API as the seeded admin whose token is `token_field`.
fn admin_get(ready: &Ready, token_field: &str, path: &str) -> Result<Value> {
    let token = ready.seeded[token_field]
        .as_str()
        .with_context(|| format!("seed JSON: {token_field}"))?;
    get_json(&ready.addrs.admin, &format!("Bearer {token}"), path)
}

/// POSTs `/v1/withdrawals/{id}/{action}` (approve, reject) on the admin API
/// as the seeded admin whose token is `token_field`.
fn decide(ready: &Ready, token_field: &str, id: &str, action: &str) -> Result<http::Response> {
    let token = ready.seeded[token_field]
        .as_str()
        .with_context(|| format!("seed JSON: {token_field}"))?;
    let auth = format!("Bearer {token}");
    let body = json!({"reason": "cargo xtask dev --smoke"}).to_string();
    http::request(
        &ready.addrs.admin,
        "POST",
        &format!("/v1/withdrawals/{id}/{action}"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        Some(&body),
    )
}

fn get_json(addr: &str, auth: &str, path: &str) -> Result<Value> {
    let r = http::request(addr, "GET", path, &[("authorization", auth)], None)?;
    if r.status != 200 {
        bail!("GET {path} answered {}: {}", r.status, r.body);
    }
    r.json()
}

/// Polls `get` until its `status` is one of `done` (returns it) or `failed`
/// (fails), while the services stay up and the deadline is not passed.
fn follow(
    services: &mut Services,
    deadline: Instant,
    what: &str,
    mut get: impl FnMut() -> Result<Value>,
    done: &[&str],
    failed: &[&str],
) -> Result<Value> {
    let mut seen: Vec<String> = Vec::new();
    loop {
        let v = get()?;
        let status = v["status"].as_str().unwrap_or_default().to_string();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if done.contains(&status.as_str()) {
            println!("      {what}: {}", seen.join(" -> "));
            return Ok(v);
        }
        if failed.contains(&status.as_str()) {
            bail!("the {what} ended {status}: {}", v["error"]);
        }
        services.check_alive()?;
        interrupted()?;
        if Instant::now() > deadline {
            bail!(
                "the smoke run's {}s deadline passed with the {what} still {status} \
                 (went {})",
                SMOKE_DEADLINE.as_secs(),
                seen.join(" -> ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A user_available account's money, as decimal strings.
struct Money {
    balance: String,
    held: String,
}

fn balances(api: &str, auth: &str) -> Result<BTreeMap<String, Money>> {
    let v = get_json(api, auth, "/v1/accounts/me/balances")?;
    let mut out = BTreeMap::new();
    for b in v["balances"].as_array().into_iter().flatten() {
        if b["kind"] != "user_available" {
            continue;
        }
        let field = |f: &str| {
            b[f].as_str()
                .map(str::to_string)
                .with_context(|| format!("balance without {f}: {b}"))
        };
        out.insert(
            field("asset")?,
            Money {
                balance: field("balance")?,
                held: field("held")?,
            },
        );
    }
    Ok(out)
}

/// Fails unless `asset`'s balance changed by exactly `delta`.
fn expect_change(
    before: &BTreeMap<String, Money>,
    after: &BTreeMap<String, Money>,
    asset: &str,
    delta: &str,
) -> Result<()> {
    let get = |m: &BTreeMap<String, Money>| {
        m.get(asset)
            .map(|b| b.balance.clone())
            .with_context(|| format!("the demo user has no {asset} account"))
    };
    let (b, a) = (get(before)?, get(after)?);
    if units(&a)? - units(&b)? != units(delta)? {
        bail!("{asset} balance went from {b} to {a}: expected a change of exactly {delta}");
    }
    Ok(())
}

/// A decimal string as an integer count of 10^-18 (exact for every asset
/// scale the platform uses; xtask has no decimal type).
fn units(s: &str) -> Result<i128> {
    const SCALE: usize = 18;
    let bad = || anyhow!("{s:?} is not a decimal amount");
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || frac.len() > SCALE || !all_digits(int) || !all_digits(frac) {
        return Err(bad());
    }
    let padded = format!("{int}{frac:0<SCALE$}");
    let value: i128 = padded.parse().map_err(|_| bad())?;
    Ok(if negative { -value } else { value })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_compare_exactly() {
        assert_eq!(units("100000.00").unwrap(), units("100000").unwrap());
        assert_eq!(
            units("99969.97").unwrap() - units("100000.00").unwrap(),
            units("-30.03").unwrap()
        );
        assert_eq!(
            units("2.00100000").unwrap() - units("2").unwrap(),
            units("0.001").unwrap()
        );
        assert_eq!(units("0").unwrap(), 0);
        for bad in [
            "",
            "-",
            "1.2.3",
            "1e5",
            "abc",
            ".5",
            "1.0000000000000000001",
        ] {
            assert!(units(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn database_names_are_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5432/ledgerflow", "x"),
            "postgres://u:p@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "x"),
            "postgres://h:5432/x"
        );
    }

    #[test]
    fn seed_json_is_found_among_log_lines() {
        let out = "2026-01-01 INFO starting\n{\n  \"user_id\": \"u\",\n  \"api_key\": \"lf_x\",\n  \
                   \"admin_token\": \"lfa_a\",\n  \"approver_token\": \"lfa_b\",\n  \
                   \"approver2_token\": \"lfa_c\",\n  \"security_token\": \"lfa_d\"\n}\nINFO bye\n";
        let v = seed_json(out).unwrap();
        assert_eq!(v["api_key"], "lf_x");
        // The smoke's second approver is required too.
        assert!(seed_json(&out.replace("approver2_token", "other")).is_err());
        assert!(seed_json("no json here").is_err());
        assert!(
            seed_json("{\n  \"user_id\": \"u\"\n}\n").is_err(),
            "missing fields"
        );
    }

    #[test]
    fn the_trade_snippet_quotes_its_json_and_key() {
        let [post, extract, get] = trade_snippet("127.0.0.1:8080", "lf_k", "demo-1");
        assert!(post.contains("-d '{\"base_amount\":\"0.001\""), "{post}");
        assert!(post.contains("\"Idempotency-Key: demo-1\""), "{post}");
        assert!(post.contains("'Authorization: Bearer lf_k'"), "{post}");
        assert!(extract.starts_with("TRADE_ID=$("));
        assert!(get.contains("/v1/trades/$TRADE_ID"), "{get}");
    }
}
