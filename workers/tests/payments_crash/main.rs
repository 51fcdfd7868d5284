//! Fault tests of the payments workflows on real worker processes:
//!
//! - `kill -9` at every step boundary of a trade and of a withdrawal
//!   (including the four-eyes approval wait, the fill and confirmation
//!   waits, the exchange call between its recorded intent and its answer
//!   and between its recorded answer and its checkpoint, a pending reconcile
//!   of an in-doubt call, and a pending compensation), then a restart →
//!   exactly one order per trade and one withdrawal per withdrawal at the
//!   exchange (a call whose intent was recorded but that never reached the
//!   exchange is sent again under its key: the crash changes no outcome),
//!   exactly one ledger transfer per settlement, every workflow finishes;
//! - a seeded randomized run: many concurrent trades and withdrawals over a
//!   few tightly funded users, random exchange faults and random `kill -9`s
//!   of the worker → the ledger sums to zero per asset, no balance is ever
//!   negative, every workflow is terminal (or waits for a named reason),
//!   exactly one order per placed trade.
//!
//! How: this test binary re-executes itself with `LF_PAYCRASH_DB` set, which
//! turns `payments_crash_child` into a long-running worker process (a
//! `Runner` with the payments workflows). The exchange is the HTTP simulator
//! (`RunningSimulator`) running in the parent, so its per-key counters
//! survive the child's death. The parent kills the child with SIGKILL and
//! starts another.
//!
//! Deterministic crash points: before starting a child the parent writes a
//! `crash_plan` row per workflow naming where that workflow must stop; the
//! child honours it (see [`Point`]) and records `crash_paused` when it got
//! there. The parent waits for every planned workflow to be paused, checks
//! the journal is exactly at the planned boundary, then kills the child. So
//! one child process and one kill cover every boundary at once, each in its
//! own workflow, which keeps the test fast.
//!
//! Seeds: the randomized test prints its seed; `LF_SEED=<n>` replays it.
//! `TEST_LOG=1` lets the children's stderr through.
use async_trait::async_trait;
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{
    ExecConfig, Inline, RetryPolicy, StepHandler, Store, StoreConfig, WorkflowRegistry,
    WorkflowRuntime, workflow_start_in,
};
use ledgerflow_payments::exchange::http::{HttpConfig, HttpExchange};
use ledgerflow_payments::exchange::server::{HttpSimControls, RunningSimulator, SimServerConfig};
use ledgerflow_payments::exchange::sim::{Fault, KeyCounters, SimControls};
use ledgerflow_payments::exchange::{
    self, Event, Exchange, IdempotencyKey, OrderAck, OrderRequest, OrderState, OrderStatus,
    WithdrawalAck, WithdrawalRequest, WithdrawalState, WithdrawalStatus,
};
use ledgerflow_payments::notifier::SimulatedNotifier;
use ledgerflow_payments::policy::AssetPolicy;
use ledgerflow_payments::users::{self, Admin, AdminRole};
use ledgerflow_payments::workflows::{self, Deps, WorkflowsConfig, trade, webhook, withdrawal};
use ledgerflow_payments::{Amount, UserId, ledger};
use ledgerflow_workers::runner::{JobContext, QueueConfig, Registry, Runner, RunnerConfig};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const CHILD_DB: &str = "LF_PAYCRASH_DB";
const CHILD_SIM: &str = "LF_PAYCRASH_SIM";
const CHILD_WORKER: &str = "LF_PAYCRASH_WORKER";
/// `"{fill_timeout_ms},{confirmation_poll_ms}"`: shorter waits for a child.
const CHILD_WAITS: &str = "LF_PAYCRASH_WAITS_MS";

/// The lease a child's attempts hold: after a kill, its jobs are rescued
/// this long after the last heartbeat.
const LEASE_TTL: Duration = Duration::from_secs(2);

const TRADE_STEPS: [&str; 6] = [
    "validate",
    "hold",
    "place_order",
    "await_fill",
    "settle",
    "notify",
];
const WITHDRAWAL_STEPS: [&str; 6] = [
    "validate",
    "hold",
    "await_approval",
    "submit",
    "await_confirmation",
    "finalize",
];

/// The payments settings both parent and children use: BTC withdrawals
/// above 1 need an approver; fills and confirmations arrive as signals, and
/// the waits for them time out after 10 minutes unless `LF_PAYCRASH_WAITS_MS`
/// shortens them (to exercise the fill timeout's cancel-or-find-the-fill and
/// the confirmation poll).
fn workflows_config() -> TestResult<WorkflowsConfig> {
    let (fill, poll) = match std::env::var(CHILD_WAITS) {
        Ok(v) => {
            let (f, p) = v.split_once(',').ok_or("waits are \"fill,poll\"")?;
            (f.parse()?, p.parse()?)
        }
        Err(_) => (600_000, 600_000),
    };
    Ok(WorkflowsConfig {
        fill_timeout: Duration::from_millis(fill),
        withdrawal_policy: BTreeMap::from([(
            "BTC".to_string(),
            AssetPolicy {
                approval_threshold: Some("1".parse()?),
                second_approval_threshold: None,
                daily_limit: Some("10".parse()?),
            },
        )]),
        approval_timeout: Duration::from_secs(600),
        confirmation_poll: Duration::from_millis(poll),
        ..WorkflowsConfig::default()
    })
}

fn store(pool: &PgPool) -> Store {
    Store::with_config(
        pool.clone(),
        StoreConfig {
            lease_ttl: LEASE_TTL,
            notify: true,
            retry: RetryPolicy {
                base: Duration::from_millis(100),
                max: Duration::from_secs(1),
                jitter: 0.0,
            },
        },
    )
}

mod boundaries;
mod chaos;
mod points;
mod rig;

use points::*;
use rig::*;

/// Not a test of its own: the body of a child worker process. Returns at
/// once unless `LF_PAYCRASH_DB` is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_crash_child() -> TestResult {
    let (Ok(url), Ok(sim)) = (std::env::var(CHILD_DB), std::env::var(CHILD_SIM)) else {
        return Ok(());
    };
    let worker = std::env::var(CHILD_WORKER).unwrap_or_else(|_| "paycrash-child".to_string());
    let pool = PgPoolOptions::new()
        .max_connections(24)
        .connect(&url)
        .await?;
    let plan = Plan::load(&pool).await?;
    let http = HttpExchange::new(
        &sim,
        HttpConfig {
            timeout: Duration::from_secs(2),
            ..HttpConfig::default()
        },
    )?;
    let registry = workflows::registry(Deps {
        exchange: Arc::new(CrashExchange {
            inner: http,
            plan: plan.clone(),
        }),
        notifier: Arc::new(SimulatedNotifier::new()),
        config: workflows_config()?,
    })?;
    // One step per delivery: the plan pauses a workflow at a step's job.
    let config = ExecConfig::default().inline(Inline::OFF);
    let runtime = WorkflowRuntime::with_config(store(&pool), registry, config);
    let _runner = Runner::start(
        store(&pool),
        handlers(runtime.handler(), plan),
        RunnerConfig {
            worker_id: worker,
            // Paused workflows each keep one slot busy (a blocked job) but no
            // connection, so the slots outnumber the pool.
            queues: vec![QueueConfig::new("default", 32)],
            poll_interval: Duration::from_millis(200),
            heartbeat_interval: Duration::from_millis(400),
            rescue_interval: Duration::from_millis(200),
            promote_interval: Duration::from_millis(100),
            ..RunnerConfig::default()
        },
    )
    .await?;
    // Normally the parent SIGKILLs us; if the parent itself dies first, go
    // too rather than linger holding connections.
    let parent = std::os::unix::process::parent_id();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(0);
        }
    }
}
