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
//! `--history N` first fills each database with N completed jobs and `--backlog N` with N
//! available jobs of another queue, so the effect of a large table can be measured.
//!
//! The machine's CPU use before each workload is reported as `bg_pct`. The results are printed
//! as a table and as a `RESULT` line that `../shared/bench/peers/table.py` tabulates with the
//! peers' lines; `--json` also writes them to a file.

use crate::common::{BenchDb, CommonArgs, PoolArgs, percentile, print_table, quiet, write_json};
use anyhow::{Context, Result, bail, ensure};
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
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    W1,
    W2,
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
    report(&args, w1, w2)
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

    let t0 = Instant::now();
    let mut i = 0;
    while i < n {
        let k = ENQUEUE_BATCH.min(n - i);
        let batch: Vec<NewJob> = (i..i + k)
            .map(|j| NewJob::new(KIND, json!({ "i": j })).queue(QUEUE))
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

fn report(args: &Args, w1: Option<Throughput>, w2: Option<Latency>) -> Result<()> {
    let mut rows: Vec<(&str, String)> = vec![
        ("jobs (W1)", args.jobs.to_string()),
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
    }
}
