//! `ledgerflow-bench queue`: the two workloads of `../shared/bench/peers` (see its README),
//! each on a fresh database:
//!
//! - **W1**: `--jobs` no-op jobs enqueued with `Store::job_insert_many`, one call per 1000 jobs,
//!   while no worker runs (→ enqueue jobs/s); then one runner (`--concurrency`, `--prefetch`)
//!   drains them. Done is when a separate connection, polling every 50 ms, sees no unfinished
//!   row left (every job durably `completed`). Processing jobs/s is measured from just before
//!   `Runner::start` to that moment; the wall time from the first enqueue.
//! - **W2**: the runner is started and left idle for a second; `--latency-jobs` jobs are then
//!   enqueued one at a time (each `job_insert` awaited) at `--latency-rate` per second. Latency is
//!   handler start minus an instant taken just before the enqueue call (same process, monotonic
//!   clock: the send instant travels in the job's args as nanoseconds since a process anchor).
//!
//! - **fair**: fairness latency with a skewed backlog. `--fair-big` jobs of one key are
//!   enqueued, then `--fair-small-keys` keys with `--fair-small` jobs each, and only then is the
//!   runner started (a runner working during the enqueue keeps up with it on this machine, so
//!   no backlog would form). Reports
//!   the pickup latency (`attempted_at - created_at`, both on the database's clock) of the small
//!   keys' jobs and of the big key's, p50/p99/max. The keys carry no limit (fairness is the
//!   claim order alone); `--fair-baseline` enqueues the same jobs without keys (plain FIFO).
//!
//! `--flow` puts W1 under flow control (issue 14): `keys` gives job `j` the key
//! `k:{j % --flow-keys}` and declares `k:*` with a concurrency of `--flow-limit`; `queue`
//! declares `queue:bench` with a concurrency of `--flow-limit` and no keys. The limits are
//! declared before the enqueue, as code declares them at start.
//!
//! `--history N` first fills each database with N completed jobs and `--backlog N` with N
//! available jobs of another queue, so the effect of a large table can be measured.
//!
//! The machine's CPU use before each workload is reported as `bg_pct`. The results are printed
//! as a table and as a `RESULT` line that `../shared/bench/peers/table.py` tabulates with the
//! peers' lines; `--json` also writes them to a file.

use crate::common::{BenchDb, CommonArgs, PoolArgs, percentile, print_table, quiet, write_json};
use anyhow::{Context, Result, bail, ensure};
use ledgerflow_engine::flow::limits::{self, FlowLimit};
use ledgerflow_engine::{NewJob, Outcome, Store, StoreConfig};
use ledgerflow_workers::{JobContext, QueueConfig, Registry, Runner, RunnerConfig};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The queue the benchmark's jobs go to.
const QUEUE: &str = "bench";
/// The queue of `--backlog` jobs (no runner works it).
const BACKLOG_QUEUE: &str = "bench-backlog";
/// The job kind of every benchmark job.
const KIND: &str = "noop";
/// Jobs per `job_insert_many` call in W1 (the peers' `BATCH`).
const ENQUEUE_BATCH: usize = 1000;
/// How often the W1 poller looks for unfinished jobs (as the peers' scripts do).
const DONE_POLL: Duration = Duration::from_millis(50);
/// W1 gives up when this long passes without all jobs completing.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// W2 waits this long after the last enqueue for the last handler to start (as the peers do).
const LATENCY_DRAIN: Duration = Duration::from_secs(30);
/// Grace period for runner shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    common: CommonArgs,

    /// W1: no-op jobs enqueued in bulk, then drained.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,

    /// Handler slots of the runner's queue.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,

    /// Jobs claimed ahead of free handler slots.
    #[arg(long, default_value_t = 100)]
    prefetch: usize,

    /// W2: jobs enqueued one at a time.
    #[arg(long, default_value_t = 500)]
    latency_jobs: usize,

    /// W2: enqueues per second.
    #[arg(long, default_value_t = 50.0)]
    latency_rate: f64,

    /// Completed jobs inserted into each database before its workload.
    #[arg(long, default_value_t = 0)]
    history: u64,

    /// Available jobs of another queue (nobody works it) inserted before each workload.
    #[arg(long, default_value_t = 0)]
    backlog: u64,

    #[command(flatten)]
    pool: PoolArgs,

    /// Which workloads to run.
    #[arg(long, value_delimiter = ',', default_values = ["w1", "w2"])]
    workloads: Vec<Workload>,

    /// `RunnerConfig::max_claim_batch` (default: the runner's).
    #[arg(long)]
    max_claim_batch: Option<usize>,

    /// `RunnerConfig::max_complete_batch` (default: the runner's).
    #[arg(long)]
    max_complete_batch: Option<usize>,

    /// `RunnerConfig::poll_interval` in milliseconds (default: the runner's).
    #[arg(long)]
    poll_ms: Option<u64>,

    /// W1 under flow control: `none`, `keys` (per-key limit) or `queue` (a queue limit).
    #[arg(long, value_enum, default_value_t = Flow::None)]
    flow: Flow,

    /// `--flow keys`: how many keys the jobs spread over.
    #[arg(long, default_value_t = 1_000)]
    flow_keys: usize,

    /// `--flow keys`: each key's concurrency; `--flow queue`: the queue's.
    #[arg(long, default_value_t = 1)]
    flow_limit: i32,

    /// fair: jobs of the one big key, enqueued first.
    #[arg(long, default_value_t = 10_000)]
    fair_big: usize,

    /// fair: small keys, enqueued after the big key's jobs.
    #[arg(long, default_value_t = 20)]
    fair_small_keys: usize,

    /// fair: jobs per small key.
    #[arg(long, default_value_t = 10)]
    fair_small: usize,

    /// fair: the same jobs without flow keys (plain FIFO), for comparison.
    #[arg(long)]
    fair_baseline: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    W1,
    W2,
    Fair,
}

/// W1's flow control.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// No keys, no limits.
    None,
    /// `k:{j % --flow-keys}` with `k:*` limited to `--flow-limit`.
    Keys,
    /// `queue:bench` limited to `--flow-limit`.
    Queue,
}

/// The fair workload's figures: pickup latency of the small keys' jobs and the big key's.
#[derive(Debug, Clone, Copy)]
struct Fairness {
    small: Pickup,
    big: Pickup,
    /// When the last small job and the last big job were picked up, after the first enqueue.
    small_done_s: f64,
    big_done_s: f64,
    bg_pct: u32,
}

#[derive(Debug, Clone, Copy)]
struct Pickup {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Clone, Copy)]
struct Throughput {
    enqueue_per_s: f64,
    processing_per_s: f64,
    wall_s: f64,
    bg_pct: u32,
}

/// W2's figures.
#[derive(Debug, Clone, Copy)]
struct Latency {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// The `job_insert` call alone (included in the latency).
    insert_p50_ms: f64,
    insert_p99_ms: f64,
    bg_pct: u32,
}

pub async fn run(args: Args) -> Result<()> {
    ensure!(args.jobs > 0, "--jobs must be at least 1");
    ensure!(
        args.latency_rate > 0.0,
        "--latency-rate must be greater than 0"
    );
    let common = &args.common;
    let w1 = if args.workloads.contains(&Workload::W1) {
        let bg_pct = quiet(common).await?;
        let db = BenchDb::create(common, &args.pool).await?;
        let out = throughput(&args, &db, bg_pct).await;
        let r = db.finish(out).await?;
        print_w1(&r);
        Some(r)
    } else {
        None
    };
    let w2 = if args.workloads.contains(&Workload::W2) {
        let bg_pct = quiet(common).await?;
        let db = BenchDb::create(common, &args.pool).await?;
        let out = latency(&args, &db, bg_pct).await;
        let r = db.finish(out).await?;
        print_w2(&r);
        Some(r)
    } else {
        None
    };
    let fair = if args.workloads.contains(&Workload::Fair) {
        let bg_pct = quiet(common).await?;
        let db = BenchDb::create(common, &args.pool).await?;
        let out = fairness(&args, &db, bg_pct).await;
        let r = db.finish(out).await?;
        print_fair(&args, &r);
        Some(r)
    } else {
        None
    };
    report(&args, w1, w2, fair)
}

/// The store, runner settings and handler the workloads share.
fn store(db: &BenchDb) -> Store {
    Store::with_config(db.pool.clone(), StoreConfig::default())
}

fn runner_config(args: &Args) -> RunnerConfig {
    let mut config = RunnerConfig {
        queues: vec![QueueConfig::new(QUEUE, args.concurrency).prefetch(args.prefetch)],
        ..RunnerConfig::default()
    };
    if let Some(n) = args.max_claim_batch {
        config.max_claim_batch = n;
    }
    if let Some(n) = args.max_complete_batch {
        config.max_complete_batch = n;
    }
    if let Some(ms) = args.poll_ms {
        config.poll_interval = Duration::from_millis(ms);
    }
    config
}

/// Fills the database with `--history` completed and `--backlog` available jobs.
async fn prefill(args: &Args, db: &BenchDb) -> Result<()> {
    if args.history == 0 && args.backlog == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let insert = |state: &'static str, queue: &'static str, finished: bool| {
        // attempt/attempted_at/finished_at/completed_by only for finished rows, as the
        // runner would leave them; v4 ids, as ids of jobs enqueued long ago sort first anyway.
        format!(
            "INSERT INTO jobs (id, queue, kind, args, state, attempt, max_attempts, run_at,
                               created_at, attempted_at, finished_at, completed_by)
             SELECT gen_random_uuid(), '{queue}', '{KIND}', jsonb_build_object('i', g),
                    '{state}', {attempt}, 20, now(), now(), {at}, {at}, {by}
             FROM generate_series(1, $1) g",
            attempt = i32::from(finished),
            at = if finished { "now()" } else { "NULL" },
            by = if finished { "'history'" } else { "NULL" },
        )
    };
    if args.history > 0 {
        sqlx::query(&insert("completed", QUEUE, true))
            .bind(i64::try_from(args.history)?)
            .execute(&db.pool)
            .await
            .context("inserting --history jobs")?;
    }
    if args.backlog > 0 {
        sqlx::query(&insert("available", BACKLOG_QUEUE, false))
            .bind(i64::try_from(args.backlog)?)
            .execute(&db.pool)
            .await
            .context("inserting --backlog jobs")?;
    }
    // A long-lived production table is vacuumed and analyzed, and the WAL of the bulk load
    // should not be checkpointed in the middle of the measurement.
    sqlx::raw_sql("VACUUM (ANALYZE) jobs")
        .execute(&db.pool)
        .await?;
    if let Err(e) = sqlx::raw_sql("CHECKPOINT").execute(&db.pool).await {
        eprintln!("warning: CHECKPOINT after the prefill failed (needs superuser): {e}");
    }
    eprintln!(
        "prefilled {} completed + {} backlog jobs in {:.1}s",
        args.history,
        args.backlog,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// W1: bulk enqueue with no worker running, then one runner drains the queue.
async fn throughput(args: &Args, db: &BenchDb, bg_pct: u32) -> Result<Throughput> {
    prefill(args, db).await?;
    let store = store(db);
    let n = args.jobs;
    // The poller's own connection, opened before anything is timed.
    let mut poller = db.connect().await?;

    declare_flow(args, db).await?;

    let t0 = Instant::now();
    let mut i = 0;
    while i < n {
        let k = ENQUEUE_BATCH.min(n - i);
        let batch: Vec<NewJob> = (i..i + k)
            .map(|j| {
                let job = NewJob::new(KIND, json!({ "i": j })).queue(QUEUE);
                match args.flow {
                    Flow::Keys => job.flow_key(format!("k:{}", j % args.flow_keys)),
                    Flow::None | Flow::Queue => job,
                }
            })
            .collect();
        store.job_insert_many(&batch).await?;
        i += k;
    }
    let t1 = Instant::now();

    let registry = Registry::new().register(KIND, |_ctx: JobContext| async { Outcome::Complete });
    let runner = Runner::start(store.clone(), registry, runner_config(args)).await?;
    let deadline = t1 + DRAIN_TIMEOUT;
    loop {
        // One partial index per live state, so the poll stays cheap with a large table
        // (a plain `state IN (...)` filter is a seq scan once --backlog rows exist).
        let left: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'available')
                  + (SELECT count(*) FROM jobs WHERE state = 'running' AND queue = $1)
                  + (SELECT count(*) FROM jobs
                     WHERE state IN ('scheduled', 'retryable') AND queue = $1)",
        )
        .bind(QUEUE)
        .fetch_one(&mut poller.0)
        .await?;
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{left} of {n} jobs still unfinished after {}s",
                DRAIN_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(DONE_POLL).await;
    }
    let t2 = Instant::now();
    runner.shutdown(SHUTDOWN_GRACE).await;

    let completed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'completed'
           AND completed_by IS DISTINCT FROM 'history'",
    )
    .bind(QUEUE)
    .fetch_one(&mut poller.0)
    .await?;
    poller.close().await;
    ensure!(
        usize::try_from(completed)? == n,
        "only {completed} of {n} jobs completed (the others failed or were discarded)"
    );
    Ok(Throughput {
        enqueue_per_s: n as f64 / (t1 - t0).as_secs_f64(),
        processing_per_s: n as f64 / (t2 - t1).as_secs_f64(),
        wall_s: (t2 - t0).as_secs_f64(),
        bg_pct,
    })
}

/// W2: paced single enqueues to an idle runner; enqueue→handler-start latency.
async fn latency(args: &Args, db: &BenchDb, bg_pct: u32) -> Result<Latency> {
    prefill(args, db).await?;
    let store = store(db);
    let n = args.latency_jobs;
    let anchor = Instant::now();
    let samples: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));

    let seen = samples.clone();
    let registry = Registry::new().register(KIND, move |ctx: JobContext| {
        // Taken when the runner calls the handler, before anything else.
        let started = anchor.elapsed();
        if let Some(sent) = ctx.job().args.get("t").and_then(serde_json::Value::as_u64) {
            let ms = started.as_nanos().saturating_sub(u128::from(sent)) as f64 / 1e6;
            seen.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
        }
        async { Outcome::Complete }
    });
    let runner = Runner::start(store.clone(), registry, runner_config(args)).await?;
    // Let the runner connect, LISTEN and go idle, as the peers' scripts do.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // How long each awaited `job_insert` took (its commit included): the part of the latency
    // that is spent before the job exists for the runner.
    let mut inserts = Vec::with_capacity(n);
    let t0 = tokio::time::Instant::now();
    for i in 0..n {
        let due = t0 + Duration::from_secs_f64(i as f64 / args.latency_rate);
        tokio::time::sleep_until(due).await;
        let before = anchor.elapsed();
        let sent = u64::try_from(before.as_nanos())?;
        store
            .job_insert(&NewJob::new(KIND, json!({ "t": sent })).queue(QUEUE))
            .await?;
        inserts.push((anchor.elapsed() - before).as_secs_f64() * 1e3);
    }
    let deadline = Instant::now() + LATENCY_DRAIN;
    while samples.lock().unwrap_or_else(|p| p.into_inner()).len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    runner.shutdown(SHUTDOWN_GRACE).await;

    let mut xs = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    ensure!(!xs.is_empty(), "no job started within {LATENCY_DRAIN:?}");
    if xs.len() < n {
        eprintln!(
            "warning: only {} of {n} latency jobs started within {LATENCY_DRAIN:?}",
            xs.len()
        );
    }
    xs.sort_by(f64::total_cmp);
    inserts.sort_by(f64::total_cmp);
    Ok(Latency {
        n: xs.len(),
        p50_ms: percentile(&xs, 50.0),
        p99_ms: percentile(&xs, 99.0),
        max_ms: xs.last().copied().unwrap_or_default(),
        insert_p50_ms: percentile(&inserts, 50.0),
        insert_p99_ms: percentile(&inserts, 99.0),
        bg_pct,
    })
}

/// Declares W1's limits (`--flow`).
async fn declare_flow(args: &Args, db: &BenchDb) -> Result<()> {
    let limit = match args.flow {
        Flow::None => return Ok(()),
        Flow::Keys => {
            ensure!(args.flow_keys > 0, "--flow-keys must be at least 1");
            FlowLimit::new("k:*")
        }
        Flow::Queue => FlowLimit::new(ledgerflow_engine::flow::queue_key(QUEUE)),
    };
    limits::declare(&db.pool, &[limit.concurrency(args.flow_limit)]).await?;
    Ok(())
}

/// fair: a runner works the queue while one key's big backlog and then the small keys' jobs
/// are enqueued; pickup latency per group from the rows.
async fn fairness(args: &Args, db: &BenchDb, bg_pct: u32) -> Result<Fairness> {
    ensure!(
        args.fair_big > 0 && args.fair_small_keys > 0 && args.fair_small > 0,
        "--fair-big, --fair-small-keys and --fair-small must be at least 1"
    );
    prefill(args, db).await?;
    let store = store(db);
    let job = |group: &str, key: String, i: usize| {
        let job = NewJob::new(KIND, json!({ "g": group, "i": i })).queue(QUEUE);
        if args.fair_baseline {
            job
        } else {
            job.flow_key(key)
        }
    };
    let big: Vec<NewJob> = (0..args.fair_big)
        .map(|i| job("big", "big:0".into(), i))
        .collect();
    // Small keys interleaved in the batch, as independent users' jobs would arrive.
    let small: Vec<NewJob> = (0..args.fair_small_keys * args.fair_small)
        .map(|i| job("small", format!("small:{}", i % args.fair_small_keys), i))
        .collect();
    for batch in big.chunks(ENQUEUE_BATCH).chain(small.chunks(ENQUEUE_BATCH)) {
        store.job_insert_many(batch).await?;
    }
    let registry = Registry::new().register(KIND, |_ctx: JobContext| async { Outcome::Complete });
    let runner = Runner::start(store.clone(), registry, runner_config(args)).await?;
    let n = i64::try_from(big.len() + small.len())?;
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'completed'
               AND completed_by IS DISTINCT FROM 'history'",
        )
        .bind(QUEUE)
        .fetch_one(&db.pool)
        .await?;
        if done == n {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {n} jobs unfinished after {}s",
                n - done,
                DRAIN_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(DONE_POLL).await;
    }
    runner.shutdown(SHUTDOWN_GRACE).await;

    // Both instants are the database's: no clock between processes is involved.
    let rows: Vec<(String, f64, f64)> = sqlx::query_as(
        "SELECT args->>'g',
                extract(epoch FROM attempted_at - created_at)::float8 * 1000,
                extract(epoch FROM attempted_at - min(created_at) OVER ())::float8
         FROM jobs WHERE queue = $1 AND args ? 'g'",
    )
    .bind(QUEUE)
    .fetch_all(&db.pool)
    .await?;
    let group = |g: &str| -> (Pickup, f64) {
        let mut xs: Vec<f64> = rows.iter().filter(|r| r.0 == g).map(|r| r.1).collect();
        let last = rows
            .iter()
            .filter(|r| r.0 == g)
            .map(|r| r.2)
            .fold(0.0, f64::max);
        xs.sort_by(f64::total_cmp);
        let pickup = Pickup {
            n: xs.len(),
            p50_ms: percentile(&xs, 50.0),
            p99_ms: percentile(&xs, 99.0),
            max_ms: xs.last().copied().unwrap_or_default(),
        };
        (pickup, last)
    };
    let (small, small_done_s) = group("small");
    let (big, big_done_s) = group("big");
    Ok(Fairness {
        small,
        big,
        small_done_s,
        big_done_s,
        bg_pct,
    })
}

fn print_fair(args: &Args, r: &Fairness) {
    let mode = if args.fair_baseline {
        "no keys (FIFO)"
    } else {
        "keyed"
    };
    eprintln!(
        "fair ({mode}): small keys p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, last picked at {:.2}s; \
         big key p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, last picked at {:.2}s (bg {}%)",
        r.small.p50_ms,
        r.small.p99_ms,
        r.small.max_ms,
        r.small_done_s,
        r.big.p50_ms,
        r.big.p99_ms,
        r.big.max_ms,
        r.big_done_s,
        r.bg_pct
    );
}

fn print_w1(r: &Throughput) {
    eprintln!(
        "W1: enqueue {:.0} jobs/s, processing {:.0} jobs/s, wall {:.2}s (bg {}%)",
        r.enqueue_per_s, r.processing_per_s, r.wall_s, r.bg_pct
    );
}

fn print_w2(r: &Latency) {
    eprintln!(
        "W2: n={} p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; insert alone p50 {:.2} ms, p99 {:.2} ms (bg {}%)",
        r.n, r.p50_ms, r.p99_ms, r.max_ms, r.insert_p50_ms, r.insert_p99_ms, r.bg_pct
    );
}

fn report(
    args: &Args,
    w1: Option<Throughput>,
    w2: Option<Latency>,
    fair: Option<Fairness>,
) -> Result<()> {
    let flow = match args.flow {
        Flow::None => "none".to_string(),
        Flow::Keys => format!("{} keys, limit {} each", args.flow_keys, args.flow_limit),
        Flow::Queue => format!("queue limit {}", args.flow_limit),
    };
    let mut rows: Vec<(&str, String)> = vec![
        ("jobs (W1)", args.jobs.to_string()),
        ("flow control (W1)", flow.clone()),
        (
            "concurrency / prefetch",
            format!("{} / {}", args.concurrency, args.prefetch),
        ),
    ];
    if args.history > 0 || args.backlog > 0 {
        rows.push((
            "history / backlog rows",
            format!("{} / {}", args.history, args.backlog),
        ));
    }
    if let Some(r) = &w1 {
        rows.extend([
            ("enqueue jobs/s", format!("{:.0}", r.enqueue_per_s)),
            ("processing jobs/s", format!("{:.0}", r.processing_per_s)),
            ("W1 wall s", format!("{:.2}", r.wall_s)),
        ]);
    }
    if let Some(r) = &w2 {
        rows.extend([
            ("W2 samples", r.n.to_string()),
            ("W2 p50 ms", format!("{:.2}", r.p50_ms)),
            ("W2 p99 ms", format!("{:.2}", r.p99_ms)),
            ("W2 max ms", format!("{:.2}", r.max_ms)),
            ("W2 job_insert p50 ms", format!("{:.2}", r.insert_p50_ms)),
            ("W2 job_insert p99 ms", format!("{:.2}", r.insert_p99_ms)),
        ]);
    }
    if let Some(r) = &fair {
        rows.extend([
            ("fair small p50 ms", format!("{:.1}", r.small.p50_ms)),
            ("fair small p99 ms", format!("{:.1}", r.small.p99_ms)),
            ("fair small max ms", format!("{:.1}", r.small.max_ms)),
            ("fair big p50 ms", format!("{:.1}", r.big.p50_ms)),
            ("fair big p99 ms", format!("{:.1}", r.big.p99_ms)),
            (
                "fair small / big done s",
                format!("{:.2} / {:.2}", r.small_done_s, r.big_done_s),
            ),
            ("fair bg_pct", r.bg_pct.to_string()),
        ]);
    }
    let bg = format!(
        "{}/{}",
        w1.map_or("-".into(), |r| r.bg_pct.to_string()),
        w2.map_or("-".into(), |r| r.bg_pct.to_string())
    );
    rows.push(("bg_pct (W1/W2)", bg.clone()));

    print_table(&rows);

    // The peers' RESULT format, so table.py can put Ledgerflow in the same table.
    let mut line = format!(
        "RESULT peer=ledgerflow version={} conc={}(prefetch={})",
        env!("CARGO_PKG_VERSION"),
        args.concurrency,
        args.prefetch
    );
    if args.history > 0 || args.backlog > 0 {
        line.pop();
        line.push_str(&format!(
            ",history={},backlog={})",
            args.history, args.backlog
        ));
    }
    if let Some(r) = &w1 {
        line.push_str(&format!(
            " enq_per_s={:.0} proc_per_s={:.0} e2e_s={:.2}",
            r.enqueue_per_s, r.processing_per_s, r.wall_s
        ));
    }
    if let Some(r) = &w2 {
        line.push_str(&format!(
            " lat_n={} p50_ms={:.1} p99_ms={:.1}",
            r.n, r.p50_ms, r.p99_ms
        ));
    }
    // table.py parses both halves as integers.
    let bg_int = format!(
        "{}/{}",
        w1.map_or(0, |r| r.bg_pct),
        w2.map_or(0, |r| r.bg_pct)
    );
    line.push_str(&format!(" bg_pct={bg_int}"));
    println!("{line}");

    let doc = json!({
        "jobs": args.jobs,
        "enqueue_jobs_per_s": w1.map(|r| r.enqueue_per_s),
        "processing_jobs_per_s": w1.map(|r| r.processing_per_s),
        "wall_s": w1.map(|r| r.wall_s),
        "latency_n": w2.map(|r| r.n),
        "latency_p50_ms": w2.map(|r| r.p50_ms),
        "latency_p99_ms": w2.map(|r| r.p99_ms),
        "latency_max_ms": w2.map(|r| r.max_ms),
        "insert_p50_ms": w2.map(|r| r.insert_p50_ms),
        "insert_p99_ms": w2.map(|r| r.insert_p99_ms),
        "concurrency": args.concurrency,
        "prefetch": args.prefetch,
        "history": args.history,
        "backlog": args.backlog,
        "pool_size": args.pool.pool_size,
        "test_before_acquire": args.pool.test_before_acquire,
        "bg_pct": bg,
        "flow": flow,
        "fair_baseline": fair.map(|_| args.fair_baseline),
        "fair_small_n": fair.map(|r| r.small.n),
        "fair_small_p50_ms": fair.map(|r| r.small.p50_ms),
        "fair_small_p99_ms": fair.map(|r| r.small.p99_ms),
        "fair_small_max_ms": fair.map(|r| r.small.max_ms),
        "fair_big_n": fair.map(|r| r.big.n),
        "fair_big_p50_ms": fair.map(|r| r.big.p50_ms),
        "fair_big_p99_ms": fair.map(|r| r.big.p99_ms),
        "fair_small_done_s": fair.map(|r| r.small_done_s),
        "fair_big_done_s": fair.map(|r| r.big_done_s),
    });
    write_json(args.common.json.as_deref(), &doc)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    #[test]
    fn cli_parses_defaults() {
        let cli = Cli::try_parse_from(["ledgerflow-bench", "queue"]).expect("parses");
        #[allow(unreachable_patterns)] // refutable once there is more than one subcommand
        let q = match cli.command {
            Command::Queue(q) => q,
            _ => panic!("`queue` parsed as another subcommand"),
        };
        assert_eq!((q.jobs, q.concurrency, q.prefetch), (20_000, 32, 100));
        assert_eq!(q.workloads, vec![Workload::W1, Workload::W2]);
        assert_eq!((q.flow, q.flow_keys, q.flow_limit), (Flow::None, 1_000, 1));
    }
}
