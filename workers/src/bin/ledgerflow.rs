//! The `ledgerflow` binary: one image, every role chosen by subcommand/flags.
//!
//! `ledgerflow migrate` applies the schema (the Helm migration Job runs it);
//! `ledgerflow run --roles worker,...` runs the selected roles in one process
//! until SIGTERM/Ctrl-C, then drains gracefully; `ledgerflow seed` creates
//! demo data for a local system (see `ledgerflow/seed.rs`); `ledgerflow
//! admin …` and `ledgerflow api-key …` manage credentials, audited
//! (`ledgerflow/access.rs`); `ledgerflow withdrawal-policy` shows the
//! withdrawal policy `run` applies (`ledgerflow/policy.rs`).
#[path = "ledgerflow/access.rs"]
mod access;
#[path = "ledgerflow/policy.rs"]
mod policy;
#[path = "ledgerflow/seed.rs"]
mod seed;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use ledgerflow_engine::{
    JobState, NewJob, Outcome, Store, StoreConfig, WorkflowRegistry, WorkflowRuntime,
};
use ledgerflow_payments::exchange::budget::RequestBudget;
use ledgerflow_payments::exchange::http::{HttpConfig, HttpExchange};
use ledgerflow_payments::notifier::http::{HttpConfig as NotifierHttpConfig, HttpNotifier};
use ledgerflow_payments::notifier::{Notifier, SimulatedNotifier};
use ledgerflow_payments::workflows::{
    Deps, WorkflowsConfig, digest::NotificationDigest, flow_limits, registry as payments_registry,
};
use ledgerflow_workers::ingress::{
    EnqueueJob, HandlerRegistry, Ingress, IngressHandle, SendSignal,
};
use ledgerflow_workers::kafka::{IngressConfig, KafkaConfig, RelayConfig};
use ledgerflow_workers::metrics::{CronMetrics, RelayMetrics, RunnerMetrics};
use ledgerflow_workers::relay::{Relay, RelayHandle};
use ledgerflow_workers::runner::{JobContext, QueueConfig, Registry, Runner, RunnerConfig};
use ledgerflow_workers::telemetry::{self, LogTo};
use ledgerflow_workers::{ops, scheduler};
use sqlx::Connection;
use sqlx::postgres::PgPoolOptions;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "ledgerflow",
    version,
    about = "Durable workflows and jobs on PostgreSQL and Kafka"
)]
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
    /// Enqueue one job (for operators and smoke tests).
    Enqueue(EnqueueArgs),
    /// Create (or find) demo data and print it as JSON: a funded user with a
    /// new API key, an operator and an approver admin with new credentials.
    Seed(seed::SeedArgs),
    /// Manage admins: list, create, disable, rotate a credential (audited).
    #[command(subcommand)]
    Admin(access::AdminCommand),
    /// Manage users' API keys: list, revoke (audited).
    #[command(subcommand)]
    ApiKey(access::ApiKeyCommand),
    /// Print the effective withdrawal policy of every asset (this
    /// configuration plus admins' overrides) as JSON.
    WithdrawalPolicy(policy::PolicyArgs),
}

#[derive(Parser, Debug)]
struct EnqueueArgs {
    /// The job kind (e.g. ledgerflow.noop).
    #[arg(long)]
    kind: String,
    /// JSON arguments.
    #[arg(long, default_value = "{}")]
    args: String,
    /// Queue.
    #[arg(long, default_value = "default")]
    queue: String,
    /// Unique key: at most one job with this key exists.
    #[arg(long)]
    unique: Option<String>,
    /// Wait up to this many seconds for the job to finish; exit non-zero
    /// unless it completed.
    #[arg(long)]
    wait_secs: Option<u64>,
}

#[derive(Parser, Debug)]
struct RunArgs {
    /// Roles to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "worker")]
    roles: Vec<Role>,

    /// Queues for the worker role: name=concurrency[:prefetch], comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "default=32", env = "LEDGERFLOW_QUEUES",
          value_parser = QueueConfig::parse)]
    queues: Vec<QueueConfig>,

    /// Seconds in-flight jobs get to finish on shutdown.
    #[arg(long, env = "LEDGERFLOW_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    grace_secs: u64,

    /// Address of the public API (api role).
    #[arg(long, env = "LEDGERFLOW_API_ADDR", default_value = "0.0.0.0:8080")]
    api_addr: SocketAddr,

    /// Address of the admin API and console (admin role).
    #[arg(long, env = "LEDGERFLOW_ADMIN_ADDR", default_value = "0.0.0.0:8081")]
    admin_addr: SocketAddr,

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

    /// The exchange's request budget per API key, `weight/seconds` (`none`: unlimited): the
    /// payments workflows keep their exchange calls under it (a shared rate limit).
    #[arg(long, env = "LEDGERFLOW_EXCHANGE_BUDGET", default_value = "1200/60")]
    exchange_budget: String,
    /// Withdrawals of one user that may run at once (0: no limit).
    #[arg(long, env = "LEDGERFLOW_WITHDRAWALS_PER_USER", default_value_t = 1)]
    withdrawals_per_user: i32,
    /// One user's notifications go out as one digest this many milliseconds after the latest
    /// (0: each event sends its own).
    #[arg(long, env = "LEDGERFLOW_NOTIFY_DIGEST_MS", default_value_t = 1000)]
    notify_digest_ms: u64,
    /// ...and no later than this many milliseconds after the first it carries.
    #[arg(
        long,
        env = "LEDGERFLOW_NOTIFY_DIGEST_MAX_MS",
        default_value_t = 10_000
    )]
    notify_digest_max_ms: u64,
    /// Postgres is reached through PgBouncer (or another pooler) in transaction mode: keep no
    /// session state. Implies --no-notify (a LISTEN would be lost with its server connection;
    /// fetchers poll every --poll-ms). See docs/decisions/0009 for the PgBouncer version this
    /// needs (named prepared statements).
    #[arg(long, env = "LEDGERFLOW_PGBOUNCER")]
    pgbouncer: bool,

    #[command(flatten)]
    policy: policy::PolicyArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
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

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // Logs, and traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (docs/decisions/0011).
    let telemetry = telemetry::init("info", LogTo::Stdout)?;
    let result = command(cli).await;
    telemetry.shutdown().await;
    result
}

async fn command(cli: Cli) -> Result<()> {
    let url = cli
        .database_url
        .context("DATABASE_URL is not set (e.g. postgres://user:pass@host:5432/db)")?;
    match cli.command {
        Command::Migrate => {
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .connect(&url)
                .await?;
            ledgerflow_engine::MIGRATOR.run(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Run(args) => run(&url, args).await,
        Command::Enqueue(args) => enqueue(&url, args).await,
        Command::Seed(args) => {
            let mut conn = sqlx::PgConnection::connect(&url)
                .await
                .context("connecting to PostgreSQL")?;
            let seeded = seed::seed(&mut conn, &args).await?;
            println!("{}", serde_json::to_string_pretty(&seeded)?);
            Ok(())
        }
        Command::Admin(command) => {
            let mut conn = connect(&url).await?;
            let out = access::admin(&mut conn, command).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Command::ApiKey(command) => {
            let mut conn = connect(&url).await?;
            let out = access::api_key(&mut conn, command).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Command::WithdrawalPolicy(args) => {
            let mut conn = connect(&url).await?;
            let out = policy::show(&mut conn, &args).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
    }
}

async fn connect(url: &str) -> Result<sqlx::PgConnection> {
    sqlx::PgConnection::connect(url)
        .await
        .context("connecting to PostgreSQL")
}

async fn enqueue(url: &str, args: EnqueueArgs) -> Result<()> {
    let pool = PgPoolOptions::new().max_connections(2).connect(url).await?;
    let store = Store::new(pool);
    let json: serde_json::Value =
        serde_json::from_str(&args.args).context("--args must be a JSON value")?;
    let mut job = NewJob::new(args.kind, json).queue(args.queue);
    if let Some(key) = args.unique {
        job = job.unique(key);
    }
    let inserted = store.job_insert(&job).await?;
    println!(
        "{} job {}",
        if inserted.is_new() {
            "enqueued"
        } else {
            "existing"
        },
        inserted.id()
    );
    let Some(secs) = args.wait_secs else {
        return Ok(());
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let job = store
            .job_get(inserted.id())
            .await?
            .context("the job disappeared")?;
        if job.state.is_finished() {
            println!("job {} {}", job.id, job.state);
            if job.state == JobState::Completed {
                return Ok(());
            }
            bail!(
                "job {} ended {}: {}",
                job.id,
                job.state,
                job.last_error.unwrap_or_default()
            );
        }
        if tokio::time::Instant::now() > deadline {
            bail!("job {} still {} after {secs}s", job.id, job.state);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run(url: &str, args: RunArgs) -> Result<()> {
    let roles: std::collections::BTreeSet<Role> = args.roles.iter().copied().collect();
    let no_notify = args.no_notify || args.pgbouncer;
    if args.pgbouncer {
        tracing::info!("behind PgBouncer: no LISTEN/NOTIFY, fetchers poll");
    }
    let queues = args.queues;
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
            notify: !no_notify,
            ..StoreConfig::default()
        },
    );
    let stop = CancellationToken::new();
    let mut background = Vec::new();
    let withdrawal_policy = args.policy.load()?;
    let digest = (args.notify_digest_ms > 0).then(|| NotificationDigest {
        window: Duration::from_millis(args.notify_digest_ms),
        max_wait: Duration::from_millis(args.notify_digest_max_ms.max(args.notify_digest_ms)),
    });
    let workflows = payments_workflows(&withdrawal_policy, digest)?;
    if workflows.is_some() {
        let budget = match args.exchange_budget.as_str() {
            "none" => None,
            b => Some(RequestBudget::parse(b).map_err(anyhow::Error::msg)?),
        };
        let per_user = (args.withdrawals_per_user > 0).then_some(args.withdrawals_per_user);
        let limits = flow_limits(&WorkflowsConfig::default(), budget, per_user);
        ledgerflow_engine::flow::limits::declare(&pool, &limits)
            .await
            .context("declaring the payments flow limits")?;
    }

    // The process's own metrics: each role registers its own here, the ops
    // endpoint serves them all (docs/metrics.md).
    let metrics = prometheus::Registry::new();
    let runner = if roles.contains(&Role::Worker) {
        let config = RunnerConfig {
            metrics: Some(RunnerMetrics::new(&metrics)?),
            queues,
            listen: !no_notify,
            poll_interval: Duration::from_millis(args.poll_ms.max(10)),
            heartbeat_interval: Duration::from_secs(args.lease_ttl_secs.max(1)) / 3,
            ..RunnerConfig::default()
        };
        let runtime = workflows
            .clone()
            .map(|registry| WorkflowRuntime::new(store.clone(), registry));
        if let Some(m) = runtime.as_ref().and_then(WorkflowRuntime::metrics) {
            m.register_in(&metrics)?;
        }
        let runner =
            Runner::start(store.clone(), worker_handlers(runtime.as_ref()), config).await?;
        tracing::info!(worker = runner.worker_id(), "worker role running");
        Some((runner, runtime))
    } else {
        None
    };
    if roles.contains(&Role::Scheduler) {
        let schedules = match std::env::var("LEDGERFLOW_CRON_SCHEDULES") {
            Ok(json) => scheduler::schedules_from_json(&json)
                .context("LEDGERFLOW_CRON_SCHEDULES must be a JSON array of schedules")?,
            Err(_) => Vec::new(),
        };
        tracing::info!(config_schedules = schedules.len(), "scheduler role running");
        let (store, stop) = (store.clone(), stop.clone());
        let config = scheduler::SchedulerConfig {
            metrics: Some(CronMetrics::new(&metrics)?),
            ..scheduler::SchedulerConfig::default()
        };
        background.push(tokio::spawn(async move {
            scheduler::run_with_config(store, schedules, config, stop)
                .await
                .map_err(anyhow::Error::from)
        }));
    }
    let mut api_metrics: Option<ops::MetricsSource> = None;
    if roles.contains(&Role::Api) || roles.contains(&Role::Admin) {
        let webhooks =
            ledgerflow_api::webhooks::WebhookProviders::from_env().map_err(anyhow::Error::msg)?;
        let mut state = ledgerflow_api::AppState::with_config(
            store.clone(),
            ledgerflow_api::ApiConfig {
                webhooks,
                withdrawal_policy: withdrawal_policy.clone(),
                ..ledgerflow_api::ApiConfig::default()
            },
        )?;
        if let Some(workflows) = &workflows {
            state = state.with_workflows(workflows.clone());
        }
        if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
            // `/readyz` also needs the brokers when the process talks to Kafka.
            state = state.with_check(Arc::new(KafkaReady::new(&brokers)?));
        }
        // The API's metrics are scraped on the ops port, never the public one.
        let scraped = state.clone();
        api_metrics = Some(Arc::new(move || {
            let state = scraped.clone();
            Box::pin(async move { state.metrics.render(&state.store).await })
        }));
        if roles.contains(&Role::Api) {
            let (state, stop) = (state.clone(), stop.clone());
            let addr = args.api_addr;
            tracing::info!(%addr, "api role listening");
            background.push(tokio::spawn(async move {
                ledgerflow_api::serve_public(addr, state, stop.cancelled_owned())
                    .await
                    .map_err(anyhow::Error::from)
            }));
        }
        if roles.contains(&Role::Admin) {
            let stop = stop.clone();
            let addr = args.admin_addr;
            tracing::info!(%addr, "admin role listening");
            background.push(tokio::spawn(async move {
                ledgerflow_api::serve_admin(addr, state, stop.cancelled_owned())
                    .await
                    .map_err(anyhow::Error::from)
            }));
        }
    }
    let mut kafka_roles = Vec::new();
    if roles.contains(&Role::Relay) {
        let mut config: RelayConfig = match std::env::var("LEDGERFLOW_RELAY_CONFIG") {
            Ok(json) => serde_json::from_str(&json).context("LEDGERFLOW_RELAY_CONFIG")?,
            Err(_) => RelayConfig::new(KafkaConfig::new(kafka_brokers()?)),
        };
        config.metrics = Some(RelayMetrics::new(&metrics)?);
        tracing::info!("relay role running");
        kafka_roles.push(KafkaRole::Relay(Relay::start(
            store.clone(),
            config,
            stop.clone(),
        )?));
    }
    let mut ingress_metrics = Vec::new();
    if roles.contains(&Role::Ingress) {
        let json = std::env::var("LEDGERFLOW_INGRESS_CONFIG").context(
            "the ingress role needs LEDGERFLOW_INGRESS_CONFIG (JSON: kafka, group-id, topics, dead-letter-topic)",
        )?;
        let config: IngressConfig =
            serde_json::from_str(&json).context("LEDGERFLOW_INGRESS_CONFIG")?;
        let handlers = ingress_handlers(&config)?;
        tracing::info!(topics = config.topics.len(), "ingress role running");
        let ingress = Ingress::start(store.clone(), config, handlers, stop.clone())?;
        // Its consumer lag is exported on the ops endpoint's /metrics.
        ingress_metrics.push(ingress.stats());
        kafka_roles.push(KafkaRole::Ingress(ingress));
    }
    let ops = ops::serve_with(
        args.ops_addr,
        pool.clone(),
        ingress_metrics,
        api_metrics,
        metrics,
    )
    .await?;

    shutdown_signal().await;
    tracing::info!(grace_secs = args.grace_secs, "shutting down");
    stop.cancel();
    if let Some((runner, runtime)) = runner {
        let report = runner.shutdown(Duration::from_secs(args.grace_secs)).await;
        if let Some(runtime) = runtime {
            // Its batching tasks send what they hold, then end.
            runtime.shutdown().await;
        }
        tracing::info!(
            aborted = report.aborted,
            released = report.released,
            "worker stopped"
        );
    }
    for role in kafka_roles {
        let stopped = match role {
            KafkaRole::Ingress(h) => h.shutdown().await,
            KafkaRole::Relay(h) => h.shutdown().await,
        };
        if let Err(e) = stopped {
            tracing::error!(error = %e, "kafka role stopped with an error");
        }
    }
    for task in background {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "role stopped with an error"),
            Err(e) => tracing::error!(error = %e, "role panicked"),
        }
    }
    ops.abort();
    Ok(())
}

/// `/readyz`'s Kafka check: the brokers answer a metadata request. One
/// client is kept for the process (librdkafka keeps its connections warm);
/// the blocking request runs off the async threads.
struct KafkaReady(Arc<rdkafka::consumer::BaseConsumer>);

impl KafkaReady {
    fn new(brokers: &str) -> Result<Self> {
        let consumer = KafkaConfig::new(brokers)
            .client_config(&[])
            .create::<rdkafka::consumer::BaseConsumer>()
            .context("Kafka client for the readiness check")?;
        Ok(Self(Arc::new(consumer)))
    }
}

impl ledgerflow_api::ReadinessCheck for KafkaReady {
    fn name(&self) -> &str {
        "kafka"
    }

    fn check(&self) -> futures::future::BoxFuture<'_, std::result::Result<(), String>> {
        let consumer = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                rdkafka::consumer::Consumer::fetch_metadata(
                    consumer.as_ref(),
                    None,
                    Duration::from_millis(1500),
                )
                .map(|_| ())
                .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }
}

enum KafkaRole {
    Ingress(IngressHandle),
    Relay(RelayHandle),
}

fn kafka_brokers() -> Result<String> {
    std::env::var("KAFKA_BROKERS").context("KAFKA_BROKERS is not set (e.g. kafka:9092)")
}

/// Builds the ingress handlers named by the topics. A topic's `handler` is a
/// spec: `enqueue:<queue>:<job kind>` turns each message into a job, and
/// `signal:<name>:<payload field>` into a workflow signal correlated by that
/// payload field.
fn ingress_handlers(config: &IngressConfig) -> Result<HandlerRegistry> {
    let mut registry = HandlerRegistry::new();
    for topic in &config.topics {
        let spec = topic.handler.as_str();
        let parts: Vec<&str> = spec.splitn(3, ':').collect();
        registry = match parts.as_slice() {
            ["enqueue", queue, kind] if !queue.is_empty() && !kind.is_empty() => registry.register(
                spec,
                EnqueueJob {
                    queue: (*queue).to_string(),
                    kind: (*kind).to_string(),
                },
            ),
            ["signal", name, field] if !name.is_empty() && !field.is_empty() => registry.register(
                spec,
                SendSignal {
                    name: (*name).to_string(),
                    correlation_field: (*field).to_string(),
                },
            ),
            _ => bail!(
                "topic {:?}: handler {spec:?} is not enqueue:<queue>:<kind> or signal:<name>:<field>",
                topic.name
            ),
        };
    }
    Ok(registry)
}

/// The payments workflows, when an exchange is configured
/// (`LEDGERFLOW_EXCHANGE_URL`): the worker role runs their steps, the api
/// role starts them (trades, withdrawals, webhook processing).
fn payments_workflows(
    withdrawal_policy: &ledgerflow_payments::policy::Policy,
    notification_digest: Option<NotificationDigest>,
) -> Result<Option<Arc<WorkflowRegistry>>> {
    let Ok(url) = std::env::var("LEDGERFLOW_EXCHANGE_URL") else {
        tracing::info!("LEDGERFLOW_EXCHANGE_URL is not set: payments workflows are off");
        return Ok(None);
    };
    let exchange = HttpExchange::new(&url, HttpConfig::default())
        .map_err(|e| anyhow::anyhow!("LEDGERFLOW_EXCHANGE_URL: {e}"))?;
    // Without a provider URL notifications go to the in-process simulated
    // provider (nothing leaves the process), and the log says so.
    let notifier: Arc<dyn Notifier> = match std::env::var("LEDGERFLOW_NOTIFIER_URL") {
        Ok(url) => Arc::new(
            HttpNotifier::new(
                &url,
                NotifierHttpConfig {
                    api_key: std::env::var("LEDGERFLOW_NOTIFIER_API_KEY").ok(),
                    ..NotifierHttpConfig::default()
                },
            )
            .map_err(|e| anyhow::anyhow!("LEDGERFLOW_NOTIFIER_URL: {e}"))?,
        ),
        Err(_) => {
            tracing::warn!(
                "LEDGERFLOW_NOTIFIER_URL is not set: notifications use the in-process simulated provider"
            );
            Arc::new(SimulatedNotifier::new())
        }
    };
    Ok(Some(Arc::new(payments_registry(Deps {
        exchange: Arc::new(exchange),
        notifier,
        config: WorkflowsConfig {
            withdrawal_policy: withdrawal_policy.clone(),
            notification_digest,
            ..WorkflowsConfig::default()
        },
    })?)))
}

/// The no-op's arguments: `{"sleep_ms": n}` holds the job `running` for `n` ms (at most
/// [`NOOP_MAX_SLEEP_MS`]) before it completes. Fault tests of the shipped binary need a job
/// that occupies its lease and its flow slot for a while; anything else is ignored, so every
/// existing `ledgerflow.noop` job still completes at once.
#[derive(serde::Deserialize, Default)]
struct NoopArgs {
    #[serde(default)]
    sleep_ms: u64,
}

/// Bounds the no-op's sleep, so a mistyped argument cannot hold a worker slot for hours.
const NOOP_MAX_SLEEP_MS: u64 = 60_000;

/// The worker role's handlers: the built-in no-op, and the workflow runtime's step handler
/// when payments workflows are configured.
fn worker_handlers(workflows: Option<&WorkflowRuntime>) -> Registry {
    let registry = Registry::new().register("ledgerflow.noop", |ctx: JobContext| async move {
        // Arguments that are not an object (or have no sleep) mean no sleep: the no-op never
        // fails on its input.
        let args: NoopArgs = ctx.args().unwrap_or_default();
        if args.sleep_ms > 0 {
            let ms = args.sleep_ms.min(NOOP_MAX_SLEEP_MS);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        Outcome::Complete
    });
    match workflows {
        Some(runtime) => registry.workflows(runtime.handler()),
        None => registry,
    }
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
