//! Postgres taken away under load from the real `ledgerflow` processes,
//! three ways, in one run: `pg_terminate_backend` on every connection to
//! the database, `pg_ctl restart -m immediate` of the primary, and the
//! primary killed (`SIGKILL` to its whole process group, like a dead node)
//! with its synchronous standby promoted in its place.
//!
//! Topology: a primary and a streaming standby (`pg_basebackup`, two
//! private clusters on their own ports; `synchronous_commit = on` with the
//! standby in `synchronous_standby_names`, so a commit that returned is on
//! the standby). The processes reach Postgres through one address, a TCP
//! forwarder standing in for a Kubernetes Service or an RDS endpoint; after
//! the promotion the test repoints it at the standby.
//!
//! Load, all of it running across the three faults: API trades and
//! withdrawals (durable workflows calling the simulated exchange, settled by
//! its webhooks), plain jobs enqueued by the test, an every-second cron
//! schedule, and Kafka messages (tansu) turned into jobs by the ingress,
//! while the relay publishes the payments' outbox events.
//!
//! Then, over the final database state: every request that got a 2xx is
//! there and completed exactly once (exchange, books, balances); every
//! acknowledged plain job completed, once; every cron tick from the first
//! to the last is there once with its job completed (none skipped); every
//! Kafka message made exactly one job and none was dead-lettered; every
//! outbox event was published and is on the topic; no job is left
//! `running`; and no process exited: each reconnected on its own. The time
//! from each fault to the first job completed after it is printed.
//!
//! The same runs again with PgBouncer as that address instead (repointed by
//! a reload), with the processes' `LEDGERFLOW_PGBOUNCER` switch on.
//!
//! `LF_SEED=<n>` replays a seed (default [`DEFAULT_SEED`]): it plans the
//! requests and their gaps; the faults come at fixed offsets.
//! `TEST_LOG=1` prints the process logs' tails on success too. Logs:
//! `$CARGO_TARGET_TMPDIR/postgres_failover/{forwarder,pgbouncer}/`.
#[path = "common/broker.rs"]
mod broker;
#[path = "common/forwarder.rs"]
mod forwarder;
#[path = "common/payments_load.rs"]
mod payments_load;
#[path = "common/pgbouncer.rs"]
mod pgbouncer;
#[path = "common/private_pg.rs"]
mod private_pg;
#[path = "common/proc.rs"]
mod proc;

use broker::Broker;
use chrono::{DateTime, Utc};
use forwarder::Forwarder;
use ledgerflow_engine::{NewJob, Store};
use ledgerflow_payments::exchange::server::{HttpSimControls, RunningSimulator};
use ledgerflow_payments::exchange::sim::SimConfig;
use ledgerflow_payments::workflows::EVENTS_TOPIC;
use payments_load::PROVIDER;
use payments_load::{
    Accepted, Client, ExchangeCalls, Rng, TestResult, User, check_payments, env_u64, fund_user,
    plan, run_client,
};
use pgbouncer::PgBouncer;
use private_pg::PrivatePg;
use proc::Proc;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use uuid::Uuid;

const DEFAULT_SEED: u64 = 20_261_208;
const DATABASE: &str = "ledgerflow";
const STANDBY: &str = "standby1";
/// The webhook provider name the simulator posts as.
const USERS: usize = 3;
/// How long the load runs; the faults come at fixed points inside it.
const LOAD: Duration = Duration::from_secs(36);
/// When each fault happens, from the start of the load.
const FAULTS: [(Duration, Fault); 3] = [
    (Duration::from_secs(7), Fault::TerminateBackends),
    (Duration::from_secs(17), Fault::RestartImmediate),
    (Duration::from_secs(27), Fault::Failover),
];
/// One plain job and one Kafka message per this much time.
const TICK: Duration = Duration::from_millis(150);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// `pg_terminate_backend` on every backend of the database.
    TerminateBackends,
    /// `pg_ctl restart -m immediate` of the primary.
    RestartImmediate,
    /// `kill -9` of the primary, `pg_ctl promote` of the standby, the
    /// forwarder repointed at it.
    Failover,
}

/// The one address the processes reach Postgres through.
enum Front {
    /// A TCP forwarder, like a Kubernetes Service or an RDS endpoint.
    Forwarder(Forwarder),
    /// PgBouncer (session pooling, see the test), repointed by a reload.
    PgBouncer(PgBouncer),
}

impl Front {
    async fn start(pgbouncer: bool, primary: &PrivatePg) -> TestResult<Front> {
        Ok(if pgbouncer {
            Front::PgBouncer(PgBouncer::start(primary.addr(), "session")?)
        } else {
            Front::Forwarder(Forwarder::start(primary.addr()).await?)
        })
    }

    fn url(&self) -> String {
        match self {
            Front::Forwarder(f) => format!("postgres://postgres@{}/{DATABASE}", f.addr()),
            Front::PgBouncer(b) => b.url(DATABASE),
        }
    }

    fn repoint(&self, to: std::net::SocketAddr) -> TestResult {
        match self {
            Front::Forwarder(f) => f.repoint(to),
            Front::PgBouncer(b) => b.repoint(to)?,
        }
        Ok(())
    }
}

/// Everything the run started. Field order is drop order: processes first,
/// the clusters last.
struct Rig {
    api: Proc,
    worker: Proc,
    /// scheduler, ingress and relay.
    edge: Proc,
    sim: Option<RunningSimulator>,
    sim_url: String,
    controls: HttpSimControls,
    /// The test's own pool, through the forwarder like the processes'.
    pool: PgPool,
    api_addr: String,
    broker: Broker,
    input_topic: String,
    front: Front,
    standby: PrivatePg,
    primary: PrivatePg,
}

impl Rig {
    async fn start(seed: u64, pgbouncer: bool) -> TestResult<Rig> {
        let primary = PrivatePg::start(DATABASE)?;
        let standby = primary.standby(STANDBY)?;
        primary
            .require_sync_standby(STANDBY, Duration::from_secs(30))
            .await?;
        let front = Front::start(pgbouncer, &primary).await?;
        let url = front.url();
        let pool = PgPoolOptions::new()
            .max_connections(6)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&url)
            .await?;
        ledgerflow_engine::MIGRATOR.run(&pool).await?;

        let broker = Broker::start()?;
        let input_topic = broker::unique("failover-in");
        let dlq = broker::unique("failover-dlq");
        broker
            .create_topics(&[&input_topic, &dlq, EVENTS_TOPIC])
            .await?;

        let port = || private_pg::free_port().map(|p| format!("127.0.0.1:{p}"));
        let (api_addr, admin_addr) = (port()?, port()?);
        let secret = format!("failover-secret-{seed:x}-{}", Uuid::now_v7().simple());
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

        let ingress = json!({
            "kafka": {
                "bootstrap-servers": broker.servers(),
                "session.timeout.ms": "6000",
                "heartbeat.interval.ms": "500",
                "topic.metadata.refresh.interval.ms": "1000",
            },
            "group-id": broker::unique("failover-group"),
            "topics": [{
                "name": input_topic,
                "handler": "enqueue:ingress:ledgerflow.noop",
                "queue": "ingress",
            }],
            "dead-letter-topic": dlq,
            "retry-backoff-ms": 20,
            "commit-interval-ms": 200,
        });
        let schedules = json!([{
            "name": "every-second",
            "expression": "* * * * * *",
            "job-kind": "ledgerflow.noop",
            "job-queue": "cron",
        }]);
        let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("postgres_failover")
            .join(if pgbouncer { "pgbouncer" } else { "forwarder" });
        std::fs::create_dir_all(&logs)?;
        let env = || -> TestResult<Vec<(String, String)>> {
            Ok([
                ("DATABASE_URL", url.clone()),
                ("LEDGERFLOW_API_ADDR", api_addr.clone()),
                ("LEDGERFLOW_ADMIN_ADDR", admin_addr.clone()),
                ("LEDGERFLOW_OPS_ADDR", port()?),
                ("LEDGERFLOW_EXCHANGE_URL", sim_url.clone()),
                ("LEDGERFLOW_NOTIFIER_URL", sim_url.clone()),
                (
                    "LEDGERFLOW_WEBHOOK_PROVIDERS",
                    json!({ PROVIDER: {"scheme": "stripe"} }).to_string(),
                ),
                ("LEDGERFLOW_WEBHOOK_SECRETS_EXCHANGE", secret.clone()),
                ("KAFKA_BROKERS", broker.servers()),
                ("LEDGERFLOW_INGRESS_CONFIG", ingress.to_string()),
                ("LEDGERFLOW_CRON_SCHEDULES", schedules.to_string()),
                // A job whose worker lost its connection mid-attempt is
                // rescued 2 s after its last heartbeat.
                ("LEDGERFLOW_LEASE_TTL_SECS", "2".to_string()),
                ("LEDGERFLOW_POLL_MS", "200".to_string()),
                (
                    "LEDGERFLOW_QUEUES",
                    "default=8,plain=4,cron=2,ingress=4".to_string(),
                ),
                ("LEDGERFLOW_SHUTDOWN_GRACE_SECS", "5".to_string()),
                ("LEDGERFLOW_PGBOUNCER", pgbouncer.to_string()),
                (
                    "RUST_LOG",
                    std::env::var("LF_FAILOVER_LOG").unwrap_or_else(|_| "info".to_string()),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect())
        };
        let proc = |name: &'static str, roles: &'static str| -> TestResult<Proc> {
            Proc::new(name, roles, env()?, logs.join(format!("{name}.log")))
        };
        Ok(Rig {
            api: proc("api", "api,admin")?,
            worker: proc("worker", "worker")?,
            edge: proc("edge", "scheduler,ingress,relay")?,
            sim: Some(sim),
            sim_url,
            controls,
            pool,
            api_addr,
            broker,
            input_topic,
            front,
            standby,
            primary,
        })
    }

    fn procs(&mut self) -> [&mut Proc; 3] {
        [&mut self.api, &mut self.worker, &mut self.edge]
    }

    /// Notes (and restarts) a process that exited on its own; the final
    /// assertion fails on any.
    fn check_processes(&mut self) -> TestResult {
        for p in self.procs() {
            p.check()?;
        }
        Ok(())
    }

    async fn scalar_i64(&self, sql: &str) -> TestResult<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    /// Does `fault` to the database; returns the moment it struck (every
    /// connection gone) once it is over (for the failover: the standby
    /// promoted and the forwarder repointed).
    async fn inflict(&mut self, fault: Fault) -> TestResult<DateTime<Utc>> {
        Ok(match fault {
            Fault::TerminateBackends => {
                let mut admin = self.primary.admin().await?;
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                      WHERE datname = $1 AND pid <> pg_backend_pid()",
                )
                .bind(DATABASE)
                .fetch_one(&mut admin)
                .await?;
                let at = Utc::now();
                eprintln!("    terminated {n} backends");
                at
            }
            Fault::RestartImmediate => tokio::task::block_in_place(|| {
                self.primary.stop_immediate()?;
                let at = Utc::now();
                self.primary.start_again()?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(at)
            })?,
            Fault::Failover => {
                self.primary.kill_9()?;
                let at = Utc::now();
                tokio::task::block_in_place(|| self.standby.promote())?;
                self.front.repoint(self.standby.addr())?;
                at
            }
        })
    }

    fn print_tails(&self) {
        for p in [&self.api, &self.worker, &self.edge] {
            eprintln!(
                "---- last lines of {} ({}) ----\n{}",
                p.name,
                p.log.display(),
                p.tail(30)
            );
        }
        for pg in [&self.primary, &self.standby] {
            let log = std::fs::read_to_string(pg.log_path()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "---- last lines of {} ----\n{}",
                pg.log_path().display(),
                lines[lines.len().saturating_sub(10)..].join("\n")
            );
        }
    }
}

/// Enqueues one `ledgerflow.noop` job in queue `plain` per [`TICK`] until
/// `until`, as a careful producer: each with a unique key, retried with the
/// same key until the insert returns (the database may be gone for a
/// while). Returns the keys of the acknowledged inserts.
async fn plain_producer(pool: PgPool, until: Instant) -> TestResult<Vec<String>> {
    let store = Store::new(pool);
    let mut acked = Vec::new();
    let mut n = 0u64;
    while Instant::now() < until {
        let key = format!("plain-{n}");
        let job = NewJob::new("ledgerflow.noop", json!({ "n": n }))
            .queue("plain")
            .unique(key.clone());
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            match store.job_insert(&job).await {
                Ok(_) => break,
                Err(e) if Instant::now() > give_up => {
                    return Err(format!("enqueue {key} never succeeded: {e}").into());
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        acked.push(key);
        n += 1;
        tokio::time::sleep(TICK).await;
    }
    Ok(acked)
}

/// Produces one message per [`TICK`] to `topic` until `until`, each with its
/// own business id; returns how many.
async fn kafka_producer(
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    until: Instant,
) -> TestResult<u64> {
    let mut n = 0u64;
    while Instant::now() < until {
        let id = format!("msg-{n}");
        let payload = json!({ "n": n }).to_string();
        broker::produce(&producer, &topic, None, &id, Some(&id), payload.as_bytes()).await?;
        n += 1;
        tokio::time::sleep(TICK).await;
    }
    Ok(n)
}

/// Waits until a job completed after `since` (polling through the
/// forwarder, which fails while the database is away); returns when.
async fn first_completion_after(pool: &PgPool, since: DateTime<Utc>) -> TestResult<DateTime<Utc>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let first: Result<Option<DateTime<Utc>>, _> = sqlx::query_scalar(
            "SELECT min(finished_at) FROM jobs WHERE state = 'completed' AND finished_at > $1",
        )
        .bind(since)
        .fetch_one(pool)
        .await;
        if let Ok(Some(at)) = first {
            return Ok(at);
        }
        if Instant::now() > deadline {
            return Err(format!("no job completed within 60 s of the fault at {since}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `sql` (a count) until it is `want` or `within` passes, checking
/// the processes meanwhile.
async fn wait_count(rig: &mut Rig, sql: &str, want: i64, within: Duration) -> TestResult {
    let deadline = Instant::now() + within;
    loop {
        rig.check_processes()?;
        let n = rig.scalar_i64(sql).await.unwrap_or(-1);
        if n == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            let states: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT queue, state::text, count(*) FROM jobs GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .fetch_all(&rig.pool)
            .await
            .unwrap_or_default();
            return Err(
                format!("`{sql}` is {n}, not {want}, after {within:?}; jobs: {states:?}").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The processes reach Postgres through a TCP forwarder, repointed at the
/// promoted standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_restarted_and_failed_over_postgres_loses_and_repeats_nothing() -> TestResult {
    faults_under_load(false).await
}

/// The same through PgBouncer (with `LEDGERFLOW_PGBOUNCER=true`: no LISTEN,
/// the fetchers poll), which a reload repoints at the promoted standby.
/// Session pooling: Debian's PgBouncer 1.18 in transaction mode would hand
/// sqlx's Bind to another client's server connection (it tracks no prepared
/// statements; docs/decisions/0009).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_through_pgbouncer_loses_and_repeats_nothing() -> TestResult {
    faults_under_load(true).await
}

async fn faults_under_load(pgbouncer: bool) -> TestResult {
    let seed = env_u64("LF_SEED").unwrap_or(DEFAULT_SEED);
    eprintln!(
        "postgres failover ({}): seed = {seed} (replay with LF_SEED={seed})",
        if pgbouncer { "pgbouncer" } else { "forwarder" }
    );
    let started = Instant::now();
    let mut rig = Rig::start(seed, pgbouncer).await?;
    eprintln!(
        "  set up in {:.1}s; logs in {}",
        started.elapsed().as_secs_f64(),
        rig.api
            .log
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    let result = run(&mut rig, seed).await;
    if result.is_err() || std::env::var_os("TEST_LOG").is_some() {
        rig.print_tails();
    }
    for p in rig.procs() {
        p.kill()?;
    }
    if let Some(sim) = rig.sim.take() {
        sim.stop().await?;
    }
    eprintln!(
        "seed {seed}: finished in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    result
}

async fn run(rig: &mut Rig, seed: u64) -> TestResult {
    let mut rng = Rng(seed);
    let secs = usize::try_from(LOAD.as_secs()).unwrap_or(30);
    // About one trade per 1.5 s and one withdrawal per 3 s over all users.
    let plans = plan(&mut rng, USERS, secs * 2 / 3 / USERS, secs / 3 / USERS);
    let mut users = Vec::new();
    for (n, requests) in plans.into_iter().enumerate() {
        users.push(fund_user(&rig.pool, &format!("failover-{n}@example.com"), requests).await?);
    }
    for p in rig.procs() {
        p.spawn()?;
    }

    let load_start = Instant::now();
    let load_end = load_start + LOAD;
    let mut clients = Vec::new();
    for (n, user) in users.iter().enumerate() {
        clients.push(tokio::spawn(run_client(
            Client {
                prefix: "failover",
                user: n,
                api: rig.api_addr.clone(),
                api_key: user.api_key.clone(),
                seed: seed.wrapping_add(n as u64 + 1),
            },
            user.requests.clone(),
            LOAD * 9 / 10,
            load_end + Duration::from_secs(60),
        )));
    }
    let plain = tokio::spawn(plain_producer(rig.pool.clone(), load_end));
    let messages = tokio::spawn(kafka_producer(
        rig.broker.producer()?,
        rig.input_topic.clone(),
        load_end,
    ));

    let mut recoveries = Vec::new();
    for (offset, fault) in FAULTS {
        while load_start.elapsed() < offset {
            rig.check_processes()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("  +{:.1}s {fault:?}", load_start.elapsed().as_secs_f64());
        let at = rig.inflict(fault).await?;
        let over = (Utc::now() - at).to_std().unwrap_or_default();
        let first = first_completion_after(&rig.pool, at).await?;
        // `finished_at` is the completing transaction's `now()`: when it
        // began, on the database's clock (this machine's).
        let took = (first - at).to_std().unwrap_or_default();
        eprintln!(
            "    fault over {:.2}s after it struck; first job completed {:.2}s after it struck",
            over.as_secs_f64(),
            took.as_secs_f64()
        );
        recoveries.push((fault, at, took));
    }

    let mut accepted: Vec<Accepted> = Vec::new();
    for client in clients {
        while !client.is_finished() {
            rig.check_processes()?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        accepted.extend(client.await??);
    }
    let plain = plain.await??;
    let messages = i64::try_from(messages.await??)?;
    eprintln!(
        "  +{:.1}s load over: {} requests accepted, {} plain jobs acknowledged, {messages} Kafka \
         messages produced",
        load_start.elapsed().as_secs_f64(),
        accepted.len(),
        plain.len()
    );

    // Drain: every Kafka message applied, every outbox event published,
    // every workflow finished; then the edge stops (no more cron ticks) and
    // the queue drains.
    let drain = Duration::from_secs(60);
    wait_count(
        rig,
        "SELECT count(*) FROM jobs WHERE queue = 'ingress'",
        messages,
        drain,
    )
    .await?;
    wait_count(
        rig,
        "SELECT count(*) FROM workflows
          WHERE state NOT IN ('completed', 'compensated', 'failed', 'cancelled')",
        0,
        drain,
    )
    .await?;
    wait_count(
        rig,
        "SELECT count(*) FROM outbox WHERE published_at IS NULL",
        0,
        drain,
    )
    .await?;
    rig.check_processes()?;
    let exits: Vec<String> = rig
        .procs()
        .iter()
        .flat_map(|p| p.unexpected.iter().map(move |u| format!("{}: {u}", p.name)))
        .collect();
    assert!(
        exits.is_empty(),
        "seed {seed}: processes exited instead of reconnecting: {exits:?}"
    );
    // A graceful stop: SIGTERM, the drain, exit (blocking: off the async threads).
    tokio::task::block_in_place(|| rig.edge.stop(Duration::from_secs(15)))?;
    // Every job that is due has run (the workflows' timers for later, e.g.
    // a trade's fill timeout, wait on as `scheduled`).
    wait_count(
        rig,
        "SELECT count(*) FROM jobs
          WHERE state IN ('available', 'running', 'retryable')
             OR (state = 'scheduled' AND run_at <= now())",
        0,
        drain,
    )
    .await?;
    eprintln!("  +{:.1}s drained", load_start.elapsed().as_secs_f64());

    let failed_over = recoveries
        .iter()
        .find(|(f, ..)| *f == Fault::Failover)
        .map(|(_, at, _)| *at)
        .ok_or("no failover happened")?;
    check(rig, seed, &users, &accepted, &plain, messages).await?;
    worked_after(rig, seed, failed_over).await?;
    let summary: Vec<String> = recoveries
        .iter()
        .map(|(f, _, d)| format!("{f:?} {:.2}s", d.as_secs_f64()))
        .collect();
    eprintln!(
        "seed {seed}: fault → first completed job: {}",
        summary.join(", ")
    );
    Ok(())
}

/// The assertions over the final state.
async fn check(
    rig: &Rig,
    seed: u64,
    users: &[User],
    accepted: &[Accepted],
    plain: &[String],
    messages: i64,
) -> TestResult {
    let pool = &rig.pool;
    let ExchangeCalls {
        trades,
        withdrawals,
        ..
    } = check_payments(pool, &rig.controls, &rig.sim_url, seed, users, accepted).await?;

    // Plain jobs: each acknowledged one is there once and completed; none
    // that nobody acknowledged (a lost answer's insert is retried under the
    // same key, which finds it).
    let (rows, completed): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'completed')
           FROM jobs WHERE queue = 'plain' AND unique_key = ANY($1)",
    )
    .bind(plain)
    .fetch_one(pool)
    .await?;
    let n = i64::try_from(plain.len())?;
    assert_eq!(rows, n, "seed {seed}: acknowledged plain jobs present");
    assert_eq!(
        completed, n,
        "seed {seed}: acknowledged plain jobs completed"
    );
    assert_eq!(
        rig.scalar_i64("SELECT count(*) FROM jobs WHERE queue = 'plain'")
            .await?,
        n,
        "seed {seed}: plain jobs nobody acknowledged"
    );

    // Kafka ingress: one job per message, every one completed; nothing
    // dead-lettered (an unreachable database is not a poison message).
    let (jobs, distinct, done): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT args->>'n'), count(*) FILTER (WHERE state = 'completed')
           FROM jobs WHERE queue = 'ingress'",
    )
    .fetch_one(pool)
    .await?;
    assert_eq!(
        (jobs, distinct, done),
        (messages, messages, messages),
        "seed {seed}: Kafka messages → (jobs, distinct, completed)"
    );
    assert_eq!(
        rig.scalar_i64("SELECT count(*) FROM dead_letters").await?,
        0,
        "seed {seed}: dead letters"
    );

    // Cron: every second from the first tick to the last fired once and
    // its job completed; no tick skipped across the outages.
    let (ticks, span, enqueued, done): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*),
                    extract(epoch FROM max(t.fire_at) - min(t.fire_at))::bigint + 1,
                    count(*) FILTER (WHERE t.outcome = 'enqueued'),
                    count(j.id) FILTER (WHERE j.state = 'completed')
               FROM cron_ticks t LEFT JOIN jobs j ON j.id = t.job_id
              WHERE t.schedule = 'every-second'",
    )
    .fetch_one(pool)
    .await?;
    assert_eq!(ticks, span, "seed {seed}: cron ticks, one per second");
    assert_eq!(enqueued, ticks, "seed {seed}: cron ticks that enqueued");
    assert_eq!(done, ticks, "seed {seed}: cron ticks' jobs completed");
    assert_eq!(
        rig.scalar_i64("SELECT count(*) FROM jobs WHERE queue = 'cron'")
            .await?,
        ticks,
        "seed {seed}: cron jobs, one per tick"
    );

    // The relay: every outbox event published and on the topic.
    let events = rig.scalar_i64("SELECT count(*) FROM outbox").await?;
    let seen = broker::consume_all(
        &rig.broker,
        EVENTS_TOPIC,
        usize::try_from(events)?,
        Duration::from_secs(30),
    )
    .await?;
    let ids: std::collections::HashSet<String> = seen.iter().filter_map(|s| s.id.clone()).collect();
    let outbox_ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox")
        .fetch_all(pool)
        .await?;
    let missing: Vec<&Uuid> = outbox_ids
        .iter()
        .filter(|id| !ids.contains(&id.to_string()))
        .collect();
    assert!(
        missing.is_empty(),
        "seed {seed}: outbox events never published to {EVENTS_TOPIC}: {missing:?}"
    );

    // The queue: nothing running, let alone past its lease.
    assert_eq!(
        rig.scalar_i64("SELECT count(*) FROM jobs WHERE state = 'running'")
            .await?,
        0,
        "seed {seed}: jobs left running"
    );
    let rescued = rig
        .scalar_i64("SELECT count(*) FROM job_attempts WHERE outcome = 'lease_expired'")
        .await?;
    eprintln!(
        "seed {seed}: {trades} trades settled, {withdrawals} withdrawals completed, {n} plain \
         jobs, {messages} Kafka messages, {ticks} cron ticks, {events} outbox events ({} copies \
         on the topic); {rescued} attempts rescued after their lease",
        seen.len()
    );
    Ok(())
}

/// Every role did its work again after the failover without a restart:
/// the API started workflows, the worker completed jobs, the scheduler
/// fired ticks, the ingress turned messages into jobs and the relay
/// published events, all after the old primary died.
async fn worked_after(rig: &Rig, seed: u64, at: DateTime<Utc>) -> TestResult {
    let checks = [
        (
            "api",
            "SELECT count(*) FROM workflows WHERE created_at > $1",
        ),
        (
            "worker",
            "SELECT count(*) FROM jobs WHERE state = 'completed' AND finished_at > $1",
        ),
        (
            "scheduler",
            "SELECT count(*) FROM cron_ticks WHERE fire_at > $1",
        ),
        (
            "ingress",
            "SELECT count(*) FROM jobs WHERE queue = 'ingress' AND created_at > $1",
        ),
        (
            "relay",
            "SELECT count(*) FROM outbox WHERE published_at > $1",
        ),
    ];
    for (role, sql) in checks {
        let n: i64 = sqlx::query_scalar(sql)
            .bind(at)
            .fetch_one(&rig.pool)
            .await?;
        assert!(
            n > 0,
            "seed {seed}: the {role} role did nothing after the failover"
        );
    }
    Ok(())
}
