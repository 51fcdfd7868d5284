//! `ledgerflow-bench workflow`: durable three-step workflows through the real runner.
//!
//! A workflow of three no-op steps (`a` → `b` → `c`) runs on a [`WorkflowRuntime`]'s handler behind
//! the workers crate's [`Runner`], exactly as the `ledgerflow` binary's worker role runs the
//! payments workflows: a step runs under a claimed job's lease, and its journal row, the
//! workflow row's new state and either the next step's job plus the job's completion, or (inline
//! continuation, `--inline-steps`) the move of the same job row on to the next step, commit in
//! one lease-fenced transaction. A delivery's first step runs under the workflow row's lock; the
//! successors it moves on to inline run without it, and their checkpoints are group-committed
//! with other workflows' (one statement and one commit for many, each still fenced and checked).
//!
//! On a fresh database the runner is started, then `--starters` tasks start `--workflows`
//! workflows (`WorkflowRuntime::start`, as an API call would; concurrent starts share a commit),
//! keeping at most `--in-flight` of them unfinished (a closed loop: without a bound, a producer
//! faster than the workers would only grow a backlog and the latency with it). `--rate` paces
//! the starts instead (open loop; the bound still applies).
//!
//! - **workflows/s**: workflows finished ÷ (last finish − first start).
//! - **start→finish**: from just before a workflow's start call to just after the
//!   checkpoint of its last step committed (the runner's handler returns with the lease
//!   finished), on one monotonic clock in this process.
//!
//! Afterwards the database is checked: every workflow `completed` with three `completed` journal
//! rows, every step job `completed`.

use crate::common::{
    BenchDb, CommonArgs, CpuUse, PoolArgs, percentile, print_table, quiet, write_json,
};
use anyhow::{Context, Result, bail, ensure};
use ledgerflow_engine::{
    ExecConfig, Inline, Outcome, StepHandler, StepOutcome, Store, StoreConfig, Workflow,
    WorkflowRegistry, WorkflowRuntime,
};
use ledgerflow_workers::{JobContext, QueueConfig, Registry, Runner, RunnerConfig};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use uuid::Uuid;

/// The queue the step jobs go to.
const QUEUE: &str = "bench-wf";
/// The benchmark workflow's kind.
const KIND: &str = "bench.three_steps";
/// Its steps, in order.
const STEPS: [&str; 3] = ["a", "b", "c"];
/// Give up when this long passes without every workflow finishing.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// Grace period for runner shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    common: CommonArgs,

    /// Workflows started (and finished).
    #[arg(long, default_value_t = 10_000)]
    workflows: usize,

    /// At most this many workflows started and not yet finished.
    #[arg(long, default_value_t = 1024)]
    in_flight: usize,

    /// Tasks starting workflows concurrently. Enough to keep `--in-flight` workflows going, so
    /// that the run measures the engine rather than how fast a few callers can start (16 left
    /// the engine waiting for starts: p50 start→finish ~30 ms with ~100 in flight).
    #[arg(long, default_value_t = 32)]
    starters: usize,

    /// Starts per second in all (0: as fast as `--in-flight` allows).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,

    /// Handler slots of the runner's queue. A step on the locked path holds a connection, so
    /// the pool is raised to at least `--concurrency` + `--starters` + 8 (the `ledgerflow`
    /// binary sizes its pool the same way: handler slots + 8), but not beyond
    /// [`MAX_RAISED_POOL`]. A handler slot is a task, not a connection: a step that runs in a
    /// locked batch or lock-free holds none.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,

    /// Step jobs claimed ahead of free handler slots.
    #[arg(long, default_value_t = 64)]
    prefetch: usize,

    #[command(flatten)]
    pool: PoolArgs,

    /// `StoreConfig::notify`: NOTIFY on inserts (off: the runner finds new steps by polling).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    notify: bool,

    /// `RunnerConfig::poll_interval` in milliseconds (default: the runner's).
    #[arg(long)]
    poll_ms: Option<u64>,

    /// `Inline::max_steps`: steps one delivery may run after its own (0: every step is its
    /// own claimed job, as before inline continuation).
    #[arg(long, default_value_t = Inline::default().max_steps)]
    inline_steps: u32,

    /// Steady state: keep starting workflows for `--warmup-secs` plus this many seconds, and
    /// measure only this window (workflows finished in it, their CPU, and the start→finish
    /// times of those started and finished in it). 0: one burst of `--workflows`.
    #[arg(long, default_value_t = 0)]
    duration_secs: u64,

    /// Seconds of load before the steady-state window opens.
    #[arg(long, default_value_t = 10)]
    warmup_secs: u64,
}

/// The most connections the pool is raised to: Postgres' default `max_connections` is 100, and
/// the store's batching tasks and this process's CPU sampling hold connections of their own.
const MAX_RAISED_POOL: u32 = 80;

/// The measured figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    workflows: usize,
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    wall_s: f64,
    /// CPU milliseconds per workflow: this process (starters, runner, steps) and Postgres.
    cpu: CpuUse,
    bg_pct: u32,
}

pub async fn run(args: Args) -> Result<()> {
    ensure!(args.workflows > 0, "--workflows must be at least 1");
    ensure!(args.in_flight > 0, "--in-flight must be at least 1");
    ensure!(args.starters > 0, "--starters must be at least 1");
    ensure!(args.rate >= 0.0, "--rate must not be negative");
    let mut args = args;
    let needed = u32::try_from(args.concurrency + args.starters + 8)
        .unwrap_or(u32::MAX)
        .min(MAX_RAISED_POOL);
    if args.pool.pool_size < needed {
        println!(
            "pool raised from {} to {needed} connections (--concurrency + --starters + 8, \
             at most {MAX_RAISED_POOL})",
            args.pool.pool_size
        );
        args.pool.pool_size = needed;
    }
    let bg_pct = quiet(&args.common).await?;
    let db = BenchDb::create(&args.common, &args.pool).await?;
    let out = measure(&args, &db, bg_pct).await;
    let figures = db.finish(out).await?;
    report(&args, &figures)
}

/// The three no-op steps.
fn definition() -> Workflow {
    let noop = |_ctx| async { Ok(StepOutcome::Continue(Value::Null)) };
    STEPS
        .iter()
        .fold(Workflow::new(KIND, 1).queue(QUEUE), |wf, step| {
            wf.step(step, noop)
        })
}

/// Start instants of unfinished workflows and start and finish instants of finished ones.
#[derive(Default)]
struct Tracker {
    started: HashMap<Uuid, Instant>,
    /// Finishes seen before their start was recorded (the start call had not returned yet).
    early: HashMap<Uuid, Instant>,
    finished: Vec<(Instant, Instant)>,
    /// Starts that returned.
    starts: usize,
}

impl Tracker {
    fn start(&mut self, id: Uuid, at: Instant) {
        self.starts += 1;
        match self.early.remove(&id) {
            Some(done) => self.finish_at(at, done),
            None => {
                self.started.insert(id, at);
            }
        }
    }

    fn finish(&mut self, id: Uuid, done: Instant) {
        match self.started.remove(&id) {
            Some(at) => self.finish_at(at, done),
            None => {
                self.early.insert(id, done);
            }
        }
    }

    fn finish_at(&mut self, at: Instant, done: Instant) {
        self.finished.push((at, done));
    }
}

/// Where the figures come from: every workflow (a burst), or a window of a steady run.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: Instant,
    to: Option<Instant>,
}

impl Window {
    /// The finished workflows this window counts, their start→finish times (ms, sorted) and
    /// the window's length (a burst's: from the first start to the last finish).
    fn measure(&self, finished: &[(Instant, Instant)]) -> (usize, Vec<f64>, Duration) {
        match self.to {
            None => {
                let last = finished.iter().map(|(_, d)| *d).max().unwrap_or(self.from);
                let mut xs: Vec<f64> = finished.iter().map(|(a, d)| ms(*d - *a)).collect();
                xs.sort_by(f64::total_cmp);
                (finished.len(), xs, last - self.from)
            }
            Some(to) => {
                let done = finished
                    .iter()
                    .filter(|(_, d)| (self.from..to).contains(d))
                    .count();
                let mut xs: Vec<f64> = finished
                    .iter()
                    .filter(|(a, d)| *a >= self.from && *d < to)
                    .map(|(a, d)| ms(*d - *a))
                    .collect();
                xs.sort_by(f64::total_cmp);
                (done, xs, to - self.from)
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn measure(args: &Args, db: &BenchDb, bg_pct: u32) -> Result<Figures> {
    let store = Store::with_config(
        db.pool.clone(),
        StoreConfig {
            notify: args.notify,
            ..StoreConfig::default()
        },
    );
    let config = ExecConfig::default().inline(Inline {
        max_steps: args.inline_steps,
        ..Inline::default()
    });
    let runtime = WorkflowRuntime::with_config(
        store.clone(),
        WorkflowRegistry::new().register(definition())?,
        config,
    );
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    // One permit per workflow allowed in flight; the last step's handler gives it back.
    let slots = Arc::new(Semaphore::new(args.in_flight));

    let handler = {
        let steps = runtime.handler();
        let tracker = tracker.clone();
        let slots = slots.clone();
        move |ctx: JobContext| {
            let steps = steps.clone();
            let tracker = tracker.clone();
            let slots = slots.clone();
            async move {
                let ran = steps.run(ctx.job()).await;
                let outcome = ran.outcome;
                let job = ctx.job();
                // The lease is finished only when the step's checkpoint committed; on the last
                // step that checkpoint is the workflow's completion (the delivery may have
                // started at an earlier step and continued inline).
                if ran.last_step.as_deref() == Some(STEPS[2])
                    && ctx.lease().is_finished()
                    && outcome == Outcome::Complete
                    && let Some(id) = job.workflow_id
                {
                    let done = Instant::now();
                    tracker
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .finish(id, done);
                    slots.add_permits(1);
                }
                outcome
            }
        }
    };
    let registry = Registry::new().register(StepHandler::KIND, handler);
    let mut config = RunnerConfig {
        queues: vec![QueueConfig::new(QUEUE, args.concurrency).prefetch(args.prefetch)],
        ..RunnerConfig::default()
    };
    if let Some(ms) = args.poll_ms {
        config.poll_interval = Duration::from_millis(ms);
    }
    let runner = Runner::start(store.clone(), registry, config).await?;
    // Let the runner connect, LISTEN and go idle.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let next = Arc::new(AtomicUsize::new(0));
    let steady = args.duration_secs > 0;
    let cpu_start = CpuUse::now(&db.name);
    let t0 = Instant::now();
    let warmup = Duration::from_secs(if steady { args.warmup_secs } else { 0 });
    let end = steady.then(|| t0 + warmup + Duration::from_secs(args.duration_secs));
    let load = Load {
        runtime: runtime.clone(),
        tracker: tracker.clone(),
        slots,
        next,
        t0,
        until: end,
    };
    let starters: Vec<_> = (0..args.starters).map(|_| load.starter(args)).collect();
    // A steady run's window: CPU read as it opens and as it closes.
    let (window, cpu) = match end {
        Some(end) => {
            tokio::time::sleep_until((t0 + warmup).into()).await;
            let (from, cpu_from) = (Instant::now(), CpuUse::now(&db.name));
            tokio::time::sleep_until(end.into()).await;
            let cpu = CpuUse::now(&db.name).since(cpu_from);
            let window = Window {
                from,
                to: Some(Instant::now()),
            };
            (window, Some(cpu))
        }
        None => (Window { from: t0, to: None }, None),
    };
    for s in starters {
        s.await.context("starter task")??;
    }
    let total = drained(&tracker, args).await;
    let cpu = cpu.unwrap_or_else(|| CpuUse::now(&db.name).since(cpu_start));
    runner.shutdown(SHUTDOWN_GRACE).await;
    runtime.shutdown().await;
    let total = total?;
    verify(db, total).await?;

    let finished = std::mem::take(&mut tracker.lock().unwrap_or_else(|p| p.into_inner()).finished);
    let (count, xs, wall) = window.measure(&finished);
    ensure!(count > 0, "no workflow finished in the measured window");
    Ok(Figures {
        workflows: count,
        per_s: count as f64 / wall.as_secs_f64(),
        p50_ms: percentile(&xs, 50.0),
        p99_ms: percentile(&xs, 99.0),
        max_ms: xs.last().copied().unwrap_or_default(),
        wall_s: wall.as_secs_f64(),
        cpu: CpuUse {
            this_ms: cpu.this_ms / count as f64,
            postgres_ms: cpu.postgres_ms / count as f64,
        },
        bg_pct,
    })
}

/// What the starter tasks share.
#[derive(Clone)]
struct Load {
    runtime: WorkflowRuntime,
    tracker: Arc<Mutex<Tracker>>,
    slots: Arc<Semaphore>,
    next: Arc<AtomicUsize>,
    /// When the first start was due (`--rate` paces from here).
    t0: Instant,
    /// A steady run starts until then; a burst until `--workflows` are started.
    until: Option<Instant>,
}

impl Load {
    /// A task starting workflows (paced by `--rate`, bounded by `--in-flight`).
    fn starter(&self, args: &Args) -> tokio::task::JoinHandle<Result<()>> {
        let load = self.clone();
        let (n, rate) = (args.workflows, args.rate);
        let tokio_t0 = tokio::time::Instant::from_std(self.t0);
        tokio::spawn(async move {
            loop {
                let i = load.next.fetch_add(1, Ordering::Relaxed);
                let over = match load.until {
                    Some(end) => Instant::now() >= end,
                    None => i >= n,
                };
                if over {
                    return Ok(());
                }
                if rate > 0.0 {
                    let due = tokio_t0 + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due).await;
                }
                load.slots
                    .acquire()
                    .await
                    .context("in-flight bound")?
                    .forget();
                let at = Instant::now();
                let id = load.runtime.start(KIND, &json!({ "i": i }), None).await?;
                load.tracker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .start(id, at);
            }
        })
    }
}

/// Waits until every started workflow has finished; how many that is.
async fn drained(tracker: &Mutex<Tracker>, args: &Args) -> Result<usize> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let (done, started) = {
            let t = tracker.lock().unwrap_or_else(|p| p.into_inner());
            (t.finished.len(), t.starts)
        };
        let wanted = if args.duration_secs > 0 {
            started
        } else {
            args.workflows
        };
        if done >= wanted {
            return Ok(done);
        }
        if Instant::now() > deadline {
            bail!(
                "{done} of {wanted} workflows finished after {}s",
                DRAIN_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Checks the database agrees: `n` completed workflows, each with its three steps journaled,
/// and no step job left unfinished.
async fn verify(db: &BenchDb, n: usize) -> Result<()> {
    let mut conn = db.connect().await?;
    let (completed, journaled, jobs_left): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM workflows WHERE kind = $1 AND state = 'completed'),
                (SELECT count(*) FROM workflow_steps s JOIN workflows w ON w.id = s.workflow_id
                 WHERE w.kind = $1 AND s.status = 'completed'),
                (SELECT count(*) FROM jobs WHERE queue = $2 AND state <> 'completed')",
    )
    .bind(KIND)
    .bind(QUEUE)
    .fetch_one(&mut conn.0)
    .await?;
    conn.close().await;
    let n = i64::try_from(n)?;
    ensure!(
        completed == n && journaled == 3 * n && jobs_left == 0,
        "database disagrees: {completed} of {n} workflows completed, {journaled} of {} steps \
         journaled, {jobs_left} step jobs unfinished",
        3 * n
    );
    Ok(())
}

fn report(args: &Args, f: &Figures) -> Result<()> {
    eprintln!(
        "workflow: {} three-step workflows, {:.0} workflows/s, start→finish p50 {:.2} ms, \
         p99 {:.2} ms, max {:.2} ms (bg {}%)",
        f.workflows, f.per_s, f.p50_ms, f.p99_ms, f.max_ms, f.bg_pct
    );
    eprintln!(
        "CPU per workflow: bench process {:.3} ms, postgres {:.3} ms",
        f.cpu.this_ms, f.cpu.postgres_ms
    );
    let rows: Vec<(&str, String)> = vec![
        ("workflows (3 steps each)", f.workflows.to_string()),
        ("workflows/s", format!("{:.0}", f.per_s)),
        ("steps/s", format!("{:.0}", f.per_s * STEPS.len() as f64)),
        ("start→finish p50 ms", format!("{:.2}", f.p50_ms)),
        ("start→finish p99 ms", format!("{:.2}", f.p99_ms)),
        ("start→finish max ms", format!("{:.2}", f.max_ms)),
        ("wall s", format!("{:.2}", f.wall_s)),
        (
            "CPU ms/workflow: bench / postgres",
            format!("{:.3} / {:.3}", f.cpu.this_ms, f.cpu.postgres_ms),
        ),
        (
            "in-flight / starters / rate",
            format!("{} / {} / {}", args.in_flight, args.starters, args.rate),
        ),
        (
            "concurrency / prefetch / pool",
            format!(
                "{} / {} / {}",
                args.concurrency, args.prefetch, args.pool.pool_size
            ),
        ),
        (
            "window: warm-up / measured s",
            match args.duration_secs {
                0 => "burst".to_string(),
                d => format!("{} / {d}", args.warmup_secs),
            },
        ),
        ("bg_pct", f.bg_pct.to_string()),
    ];
    print_table(&rows);
    let doc = json!({
        "workflows": f.workflows,
        "workflows_per_s": f.per_s,
        "p99_ms": f.p99_ms,
        "p50_ms": f.p50_ms,
        "max_ms": f.max_ms,
        "wall_s": f.wall_s,
        "cpu_ms_per_workflow_bench": f.cpu.this_ms,
        "cpu_ms_per_workflow_postgres": f.cpu.postgres_ms,
        "in_flight": args.in_flight,
        "starters": args.starters,
        "rate": args.rate,
        "warmup_secs": args.warmup_secs,
        "duration_secs": args.duration_secs,
        "concurrency": args.concurrency,
        "prefetch": args.prefetch,
        "pool_size": args.pool.pool_size,
        "bg_pct": f.bg_pct,
    });
    write_json(args.common.json.as_deref(), &doc)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_pairs_starts_and_finishes_in_either_order() {
        let t0 = Instant::now();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut t = Tracker::default();
        t.start(a, t0);
        t.finish(a, t0 + Duration::from_millis(4));
        // b's last step committed before its start call returned.
        t.finish(b, t0 + Duration::from_millis(9));
        t.start(b, t0 + Duration::from_millis(1));
        let ms = Duration::from_millis;
        assert_eq!(t.finished, vec![(t0, t0 + ms(4)), (t0 + ms(1), t0 + ms(9))]);
        assert!(t.started.is_empty() && t.early.is_empty());
        assert_eq!(t.starts, 2);
        let burst = Window { from: t0, to: None }.measure(&t.finished);
        assert_eq!(burst, (2, vec![4.0, 8.0], ms(9)));
    }

    #[test]
    fn a_steady_window_counts_finishes_in_it_and_times_whole_runs_in_it() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let finished = [
            (t0, t0 + ms(5)),           // before the window
            (t0 + ms(8), t0 + ms(12)),  // started before, finished in it
            (t0 + ms(11), t0 + ms(14)), // wholly in it
            (t0 + ms(15), t0 + ms(25)), // finished after it
        ];
        let window = Window {
            from: t0 + ms(10),
            to: Some(t0 + ms(20)),
        };
        assert_eq!(window.measure(&finished), (2, vec![3.0], ms(10)));
    }
}
