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

// ------------------------------------------------------------ crash points

/// Where a planned workflow stops in the child (a `crash_plan.point`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Point {
    /// `before:S` — the job of step S is claimed and never run.
    Before(String),
    /// `after:S` — S's checkpoint committed; the next job blocks unrun.
    After(String),
    /// `waiting:S` — S's signal wait is checkpointed (the workflow waits);
    /// a wake-up job blocks unrun.
    Waiting(String),
    /// `hang_before:S` — S's external call has its intent recorded and is
    /// never sent.
    HangBefore(String),
    /// `hang_after:S` — S's external call reached the exchange; its answer
    /// is never recorded.
    HangAfter(String),
    /// `answered:S` — S's external call is answered and the answer
    /// recorded; the step's checkpoint never commits (its domain write
    /// waits for a row lock the child holds).
    Answered(String),
    /// `compensate:S` — the saga reached S: the job of S's compensation is
    /// claimed and never run.
    Compensate(String),
    /// `reconcile:S` — S is in doubt: the first job of its reconcile hook
    /// is claimed and never run.
    Reconcile(String),
}

/// What [`CrashExchange`] does with a planned call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hang {
    Before,
    After,
    Answered,
}

impl Point {
    fn parse(s: &str) -> Option<Point> {
        let (kind, step) = s.split_once(':')?;
        let step = step.to_string();
        Some(match kind {
            "before" => Point::Before(step),
            "after" => Point::After(step),
            "waiting" => Point::Waiting(step),
            "hang_before" => Point::HangBefore(step),
            "hang_after" => Point::HangAfter(step),
            "answered" => Point::Answered(step),
            "compensate" => Point::Compensate(step),
            "reconcile" => Point::Reconcile(step),
            _ => return None,
        })
    }
}

/// The child's view of the plan.
#[derive(Clone)]
struct Plan {
    pool: PgPool,
    points: Arc<HashMap<Uuid, Point>>,
}

impl Plan {
    async fn load(pool: &PgPool) -> TestResult<Plan> {
        let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT workflow_id, point FROM crash_plan")
            .fetch_all(pool)
            .await?;
        let mut points = HashMap::new();
        for (id, point) in rows {
            let parsed = Point::parse(&point).ok_or_else(|| format!("bad point {point:?}"))?;
            points.insert(id, parsed);
        }
        Ok(Plan {
            pool: pool.clone(),
            points: Arc::new(points),
        })
    }

    /// True once workflow `id` is at its `after`/`waiting` point.
    async fn reached(&self, id: Uuid, point: &Point) -> bool {
        let sql = match point {
            Point::After(_) => {
                "SELECT EXISTS (SELECT 1 FROM workflow_steps
                                WHERE workflow_id = $1 AND step = $2 AND status = 'completed')"
            }
            Point::Waiting(_) => {
                "SELECT EXISTS (SELECT 1 FROM workflows
                                WHERE id = $1 AND state = 'waiting' AND current_step = $2
                                  AND wait_signal_name IS NOT NULL)"
            }
            _ => return false,
        };
        let (Point::After(step) | Point::Waiting(step)) = point else {
            return false;
        };
        // A read error counts as "not yet": the step then simply runs, and
        // the parent's journal check catches a missed pause.
        sqlx::query_scalar(sql)
            .bind(id)
            .bind(step)
            .fetch_one(&self.pool)
            .await
            .unwrap_or(false)
    }

    /// Records that `id` reached its point (the parent waits for this).
    async fn mark(&self, id: Uuid) {
        loop {
            let done = sqlx::query(
                "INSERT INTO crash_paused (workflow_id) VALUES ($1) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .execute(&self.pool)
            .await;
            if done.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Marks `id` paused and never returns: the parent's SIGKILL ends it.
    async fn pause_forever(&self, id: Uuid) -> ! {
        self.mark(id).await;
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }

    /// The planned `hang_*` point of the call with idempotency `key`.
    fn hang_for(&self, key: &IdempotencyKey) -> Option<(Uuid, Hang)> {
        let (id, step) = key.as_str().split_once(':')?;
        let id: Uuid = id.parse().ok()?;
        match self.points.get(&id)? {
            Point::HangBefore(s) if s == step => Some((id, Hang::Before)),
            Point::HangAfter(s) if s == step => Some((id, Hang::After)),
            Point::Answered(s) if s == step => Some((id, Hang::Answered)),
            _ => None,
        }
    }

    /// Locks workflow `id`'s row in `table` (its step's domain write will
    /// wait for it) and returns once locked; marks the workflow paused once
    /// `step`'s answer is recorded. The lock is held until the process dies.
    async fn block_checkpoint(&self, id: Uuid, table: &'static str, step: &str) {
        let (locked, is_locked) = tokio::sync::oneshot::channel();
        let (plan, step) = (self.clone(), step.to_string());
        tokio::spawn(async move {
            let Ok(mut tx) = plan.pool.begin().await else {
                return;
            };
            let lock = format!("SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE");
            if sqlx::query(&lock).bind(id).execute(&mut *tx).await.is_err() {
                return;
            }
            let _ = locked.send(());
            loop {
                let answered: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM workflow_steps
                                    WHERE workflow_id = $1 AND step = $2
                                      AND status = 'calling' AND call_state = 'answered')",
                )
                .bind(id)
                .bind(&step)
                .fetch_one(&plan.pool)
                .await
                .unwrap_or(false);
                if answered {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            plan.mark(id).await;
            loop {
                // `tx` (and its row lock) lives as long as this task.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        });
        // If the lock could not be taken the step runs on, and the parent
        // reports the point as never reached.
        let _ = is_locked.await;
    }
}

/// The HTTP exchange, stopping the mutating calls the plan names: before
/// sending (`hang_before`), after the exchange answered (`hang_after`), or
/// after the answer is returned but before the step can checkpoint
/// (`answered`: `table` is the domain row the step writes next).
struct CrashExchange {
    inner: HttpExchange,
    plan: Plan,
}

impl CrashExchange {
    async fn call<T>(
        &self,
        key: &IdempotencyKey,
        table: &'static str,
        call: impl std::future::Future<Output = T>,
    ) -> T {
        match self.plan.hang_for(key) {
            None => call.await,
            Some((id, Hang::Before)) => self.plan.pause_forever(id).await,
            Some((id, Hang::After)) => {
                let _answer = call.await;
                self.plan.pause_forever(id).await
            }
            Some((id, Hang::Answered)) => {
                let answer = call.await;
                let step = key.as_str().split_once(':').map_or("", |(_, s)| s);
                self.plan.block_checkpoint(id, table, step).await;
                answer
            }
        }
    }
}

#[async_trait]
impl Exchange for CrashExchange {
    async fn place_order(&self, order: &OrderRequest) -> exchange::Result<OrderAck> {
        self.call(
            &order.idempotency_key,
            "trades",
            self.inner.place_order(order),
        )
        .await
    }

    async fn cancel_order(&self, key: &IdempotencyKey) -> exchange::Result<OrderStatus> {
        self.inner.cancel_order(key).await
    }

    async fn get_order_by_key(
        &self,
        key: &IdempotencyKey,
    ) -> exchange::Result<Option<OrderStatus>> {
        self.inner.get_order_by_key(key).await
    }

    async fn submit_withdrawal(&self, w: &WithdrawalRequest) -> exchange::Result<WithdrawalAck> {
        self.call(
            &w.idempotency_key,
            "withdrawals",
            self.inner.submit_withdrawal(w),
        )
        .await
    }

    async fn get_withdrawal_by_key(
        &self,
        key: &IdempotencyKey,
    ) -> exchange::Result<Option<WithdrawalStatus>> {
        self.inner.get_withdrawal_by_key(key).await
    }
}

/// The worker's handler for workflow step jobs, honouring the plan: a job
/// of a planned workflow that is at (or past) its point blocks unrun.
fn handlers(steps: StepHandler, plan: Plan) -> Registry {
    Registry::new().register(StepHandler::KIND, move |ctx: JobContext| {
        let (steps, plan) = (steps.clone(), plan.clone());
        async move {
            let job = ctx.job();
            let point = job
                .workflow_id
                .and_then(|id| Some((id, plan.points.get(&id)?)));
            let Some((id, point)) = point else {
                return steps.run(job).await.outcome;
            };
            let this_step = |step: &String| job.workflow_step.as_deref() == Some(step.as_str());
            let wake = job.args.get("wake").and_then(|w| w.as_str());
            match point {
                Point::Before(step) if this_step(step) => plan.pause_forever(id).await,
                Point::Compensate(step) if this_step(step) && wake == Some("compensate") => {
                    plan.pause_forever(id).await
                }
                Point::Reconcile(step) if this_step(step) && wake == Some("reconcile") => {
                    plan.pause_forever(id).await
                }
                Point::After(_) | Point::Waiting(_) if plan.reached(id, point).await => {
                    plan.pause_forever(id).await
                }
                _ => {}
            }
            let outcome = steps.run(job).await.outcome;
            if plan.reached(id, point).await {
                // The checkpoint is committed (with this job's completion);
                // the workflow's next job will block.
                plan.mark(id).await;
            }
            outcome
        }
    })
}

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

// ------------------------------------------------------------- the parent

/// The parent's side: database, simulator, and the current child.
struct Rig {
    db: TestDb,
    sim: Option<RunningSimulator>,
    sim_url: String,
    controls: HttpSimControls,
    /// The parent's own client, to ask the exchange what it holds.
    exchange: HttpExchange,
    store: Store,
    registry: WorkflowRegistry,
    approver: Admin,
    child: Option<Child>,
    generation: u32,
    /// `LF_PAYCRASH_WAITS_MS` for the children, if set.
    waits: Option<String>,
}

impl Rig {
    async fn new(sim_config: SimServerConfig) -> TestResult<Rig> {
        let db = TestDb::with_pool_size(10).await?;
        for sql in [
            "CREATE TABLE crash_plan (workflow_id uuid PRIMARY KEY, point text NOT NULL)",
            "CREATE TABLE crash_paused (workflow_id uuid PRIMARY KEY)",
        ] {
            sqlx::query(sql).execute(&db.pool).await?;
        }
        let sim = RunningSimulator::start(sim_config).await?;
        let controls = HttpSimControls::new(&sim.base_url(), None)?;
        let exchange = HttpExchange::new(&sim.base_url(), HttpConfig::default())?;
        let store = store(&db.pool);
        let registry = workflows::registry(Deps {
            exchange: Arc::new(HttpExchange::new(&sim.base_url(), HttpConfig::default())?),
            notifier: Arc::new(SimulatedNotifier::new()),
            config: workflows_config()?,
        })?;
        let mut conn = db.pool.acquire().await?;
        let (id, _) = users::create_admin(&mut conn, "second-eyes", AdminRole::Approver).await?;
        drop(conn);
        Ok(Rig {
            db,
            sim_url: sim.base_url(),
            sim: Some(sim),
            controls,
            exchange,
            store,
            registry,
            approver: Admin {
                id,
                name: "second-eyes".to_string(),
                role: AdminRole::Approver,
            },
            child: None,
            generation: 0,
            waits: None,
        })
    }

    fn worker_id(&self) -> String {
        format!("paycrash-g{}", self.generation)
    }

    /// Starts a new child worker process (a new generation).
    fn spawn(&mut self) -> TestResult {
        self.generation += 1;
        let stderr = if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        let mut command = Command::new(std::env::current_exe()?);
        if let Some(waits) = &self.waits {
            command.env(CHILD_WAITS, waits);
        }
        let child = command
            .args([
                "payments_crash_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DB, &self.db.url)
            .env(CHILD_SIM, &self.sim_url)
            .env(CHILD_WORKER, self.worker_id())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILLs the current child and reaps it.
    fn kill(&mut self) -> TestResult {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Fails if the current child exited on its own.
    fn check_child(&mut self) -> TestResult {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            return Err(format!("child worker {} exited: {status}", self.worker_id()).into());
        }
        Ok(())
    }

    /// A user with the given deposits (asset, amount).
    async fn user_with(&self, deposits: &[(&str, &str)]) -> TestResult<UserId> {
        let mut conn = self.db.pool.acquire().await?;
        let email = format!("u{}@example.com", Uuid::now_v7().simple());
        let user = users::create_user(&mut conn, &email, "Crash Test").await?;
        for (asset, amount) in deposits {
            let accounts = ledger::ensure_user_accounts(&mut conn, user, &[asset]).await?;
            let scale = ledger::asset(&mut conn, asset)
                .await?
                .ok_or("a seeded asset")?
                .scale;
            ledger::deposit(
                &mut conn,
                &format!("deposit:{user}:{asset}"),
                accounts[0].1,
                Amount::parse(amount, scale)?,
            )
            .await?;
        }
        Ok(user)
    }

    /// Starts a workflow of `kind` in its own statement.
    async fn start(
        &self,
        kind: &str,
        input: &serde_json::Value,
    ) -> ledgerflow_engine::Result<Uuid> {
        let mut conn = self.store.pool().acquire().await?;
        workflow_start_in(&mut conn, &self.store, &self.registry, kind, input, None).await
    }

    async fn start_trade(
        &self,
        user: UserId,
        side: &str,
        amount: &str,
        price: &str,
    ) -> TestResult<Uuid> {
        let input = json!({ "user_id": user, "side": side, "base": "BTC", "quote": "USDT",
                            "base_amount": amount, "limit_price": price });
        Ok(self.start(trade::KIND, &input).await?)
    }

    async fn start_withdrawal(&self, user: UserId, amount: &str) -> TestResult<Uuid> {
        let input = json!({ "user_id": user, "asset": "BTC", "amount": amount,
                            "address": "bc1q5l69k094s5qgfay7jpzf5dds375aalx7gdt6p4" });
        Ok(self.start(withdrawal::KIND, &input).await?)
    }

    /// Hands `event` to the webhook-processing workflow, as the intake does.
    async fn deliver(&self, event: &Event) -> TestResult {
        let mut tx = self.db.pool.begin().await?;
        webhook::start_in(&mut tx, &self.store, &self.registry, event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Moves the simulator's clock and returns the events now due.
    async fn due_events(&self, by: Duration) -> TestResult<Vec<Event>> {
        Ok(self.controls.advance(by).await?)
    }

    /// Withdrawals that wait for (or may already get) their approval.
    async fn approvable(&self) -> TestResult<Vec<Uuid>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM withdrawals
             WHERE requires_approval AND approved_by IS NULL
               AND status IN ('validated', 'held', 'awaiting_approval')
             ORDER BY id",
        )
        .fetch_all(&self.db.pool)
        .await?)
    }

    /// The second admin approves withdrawal `id`.
    /// A worker may refuse the withdrawal (funds, limit) between our read
    /// and the approval: then the approval is refused too, and changes
    /// nothing.
    async fn approve(&self, id: Uuid) -> TestResult {
        let mut tx = self.db.pool.begin().await?;
        match withdrawal::approve_in(&mut tx, &self.store, &self.approver, id, "crash test").await {
            Ok(_) => tx.commit().await?,
            Err(ledgerflow_payments::Error::Invalid(reason))
                if reason.contains("is rejected; it cannot be approved") =>
            {
                tx.rollback().await?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    async fn counters(&self, key: &IdempotencyKey) -> TestResult<KeyCounters> {
        Ok(self.controls.counters_for(key).await?)
    }

    async fn i64(&self, sql: &str, id: Uuid) -> TestResult<i64> {
        Ok(sqlx::query_scalar(sql)
            .bind(id)
            .fetch_one(&self.db.pool)
            .await?)
    }

    async fn text(&self, sql: &str, id: Uuid) -> TestResult<String> {
        Ok(sqlx::query_scalar(sql)
            .bind(id)
            .fetch_one(&self.db.pool)
            .await?)
    }

    async fn transfers(&self, reference: &str) -> TestResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM ledger_transfers WHERE reference = $1")
                .bind(reference)
                .fetch_one(&self.db.pool)
                .await?,
        )
    }

    /// `(balance, held)` of `user`'s `asset`, normalized ("949.95", "0").
    async fn balance(&self, user: UserId, asset: &str) -> TestResult<(String, String)> {
        let mut conn = self.db.pool.acquire().await?;
        let b = ledger::balances(&mut conn, user).await?;
        Ok(b.iter()
            .find(|b| b.asset == asset)
            .map(|b| {
                (
                    b.balance.normalize().to_string(),
                    b.held.normalize().to_string(),
                )
            })
            .unwrap_or_else(|| ("0".to_string(), "0".to_string())))
    }

    /// Accounts that may not go negative and are (balance, held or
    /// available): must always be none.
    async fn negative_accounts(&self) -> TestResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM account_balances
             WHERE NOT allow_negative AND (balance < 0 OR held < 0 OR balance - held < 0)",
        )
        .fetch_one(&self.db.pool)
        .await?)
    }

    /// Double entry holds, balances match postings and holds, nothing is
    /// negative, and the SQL constraint that forbids it is in force.
    async fn assert_books(&self) -> TestResult {
        let mut conn = self.db.pool.acquire().await?;
        let sums = ledger::ledger_sums(&mut conn).await?;
        assert!(!sums.is_empty(), "the run posted something");
        for (asset, sum) in sums {
            assert!(sum.is_zero(), "postings of {asset} sum to {sum}");
        }
        let drift = ledger::balance_drift(&mut conn).await?;
        assert!(
            drift.is_empty(),
            "balances drifted from postings: {drift:?}"
        );
        drop(conn);
        assert_eq!(
            self.negative_accounts().await?,
            0,
            "a balance went negative"
        );
        let enforced: bool = sqlx::query_scalar(
            "SELECT convalidated FROM pg_constraint
             WHERE conname = 'account_balances_available_nonnegative'
               AND conrelid = 'account_balances'::regclass",
        )
        .fetch_one(&self.db.pool)
        .await?;
        assert!(enforced, "the non-negative balance constraint is validated");
        Ok(())
    }

    /// Workflows that are neither finished nor waiting for an admin's
    /// in-doubt decision.
    async fn unsettled(&self) -> TestResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM workflows
             WHERE state NOT IN ('completed', 'compensated', 'failed', 'cancelled')
               AND NOT (state = 'waiting' AND wait_reason LIKE 'in\\_doubt:%')",
        )
        .fetch_one(&self.db.pool)
        .await?)
    }

    async fn state(&self, id: Uuid) -> TestResult<String> {
        self.text("SELECT state FROM workflows WHERE id = $1", id)
            .await
    }

    async fn step_status(&self, id: Uuid, step: &str) -> TestResult<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT status FROM workflow_steps WHERE workflow_id = $1 AND step = $2",
        )
        .bind(id)
        .bind(step)
        .fetch_optional(&self.db.pool)
        .await?)
    }

    async fn stop(mut self) -> TestResult {
        self.kill()?;
        if let Some(sim) = self.sim.take() {
            sim.stop().await?;
        }
        Ok(())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // A failed assertion must not leave a worker process behind.
        let _ = self.kill();
    }
}

// ------------------------------------------- kill -9 at every step boundary

#[derive(Debug, Clone, Copy, PartialEq)]
enum Flow {
    /// Buy 0.5 BTC at 100 USDT with 1000 USDT.
    Trade,
    /// 1.5 BTC of 5: above the threshold, needs the second admin.
    BigWithdrawal,
    /// 0.5 BTC of 2: no approval.
    SmallWithdrawal,
}

impl Flow {
    fn steps(self) -> &'static [&'static str; 6] {
        match self {
            Flow::Trade => &TRADE_STEPS,
            Flow::BigWithdrawal | Flow::SmallWithdrawal => &WITHDRAWAL_STEPS,
        }
    }

    /// The step that calls the exchange.
    fn call_step(self) -> &'static str {
        match self {
            Flow::Trade => "place_order",
            Flow::BigWithdrawal | Flow::SmallWithdrawal => "submit",
        }
    }
}

/// One workflow, stopped at one boundary.
struct Case {
    flow: Flow,
    point: &'static str,
    /// The second admin approves before the kill (the point lies past the
    /// approval); otherwise the approval comes while no worker is alive.
    approve: bool,
    /// The exchange's fill/confirmation is delivered before the kill (the
    /// point lies past its wait); otherwise it is held back until then, so
    /// that the workflow really waits at a `waiting:` point.
    events: bool,
    /// The saga undoes the workflow: its call was rejected; the hold is
    /// released. (A call never sent is sent again, not undone.)
    compensated: bool,
    /// Set at the exchange for the call's key before the first worker runs.
    fault: Option<Fault>,
}

fn case(flow: Flow, point: &'static str) -> Case {
    Case {
        flow,
        point,
        approve: false,
        events: false,
        compensated: false,
        fault: None,
    }
}

impl Case {
    fn approve(mut self) -> Self {
        self.approve = true;
        self
    }

    fn events(mut self) -> Self {
        self.events = true;
        self
    }

    fn compensated(mut self) -> Self {
        self.compensated = true;
        self
    }

    fn fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    fn rejected(&self) -> bool {
        matches!(self.fault, Some(Fault::Reject { .. }))
    }

    /// `(calls, created)` at the exchange once the workflow finished.
    fn calls_at_end(&self) -> (u64, u64) {
        match (self.compensated, self.rejected()) {
            (false, _) => (1, 1),
            (true, true) => (1, 0),
            (true, false) => (0, 0),
        }
    }
}

fn cases() -> Vec<Case> {
    use Flow::{BigWithdrawal as Big, SmallWithdrawal as Small, Trade};
    vec![
        case(Trade, "before:validate"),
        case(Trade, "after:validate"),
        case(Trade, "after:hold"),
        // Killed after the intent, before the call: the exchange never got
        // it, so it is placed again under the same key — the crash changes
        // nothing for the user.
        case(Trade, "hang_before:place_order"),
        case(Trade, "hang_after:place_order"),
        case(Trade, "answered:place_order"),
        case(Trade, "after:place_order"),
        case(Trade, "waiting:await_fill"),
        case(Trade, "after:await_fill").events(),
        case(Trade, "after:settle").events(),
        case(Trade, "after:notify").events(),
        case(Trade, "reconcile:place_order").fault(Fault::AcceptThenTimeout),
        case(Trade, "compensate:hold")
            .fault(Fault::reject("no liquidity"))
            .compensated(),
        case(Big, "before:validate"),
        case(Big, "after:validate"),
        case(Big, "after:hold"),
        case(Big, "waiting:await_approval"),
        case(Big, "after:await_approval").approve(),
        case(Big, "hang_before:submit").approve(),
        case(Big, "hang_after:submit").approve(),
        case(Big, "answered:submit").approve(),
        case(Big, "after:submit").approve(),
        case(Big, "waiting:await_confirmation").approve(),
        case(Big, "after:await_confirmation").approve().events(),
        case(Big, "after:finalize").approve().events(),
        case(Small, "after:await_approval"),
        case(Small, "hang_after:submit"),
        case(Small, "after:finalize").events(),
        case(Small, "reconcile:submit").fault(Fault::AcceptThenTimeout),
        case(Small, "compensate:hold")
            .fault(Fault::reject("address blocked"))
            .compensated(),
    ]
}

/// The steps journaled `completed` when the workflow sits at `point`.
fn completed_at(flow: Flow, point: &Point) -> Vec<String> {
    let steps = flow.steps();
    let (step, inclusive) = match point {
        Point::After(s) => (s, true),
        Point::Before(s)
        | Point::Waiting(s)
        | Point::HangBefore(s)
        | Point::HangAfter(s)
        | Point::Answered(s)
        | Point::Reconcile(s) => (s, false),
        // The saga starts once the call failed: everything before it is done.
        Point::Compensate(_) => (&flow.call_step().to_string(), false),
    };
    let at = steps.iter().position(|s| s == step).unwrap_or(steps.len());
    let end = if inclusive { at + 1 } else { at };
    steps[..end.min(steps.len())]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_every_step_boundary_then_restart_moves_money_once() -> TestResult {
    let mut rig = Rig::new(SimServerConfig::default()).await?;
    let cases = cases();
    struct Started<'a> {
        case: &'a Case,
        id: Uuid,
        user: UserId,
        point: Point,
    }
    let mut started = Vec::new();
    for case in &cases {
        let (user, id) = match case.flow {
            Flow::Trade => {
                let user = rig.user_with(&[("USDT", "1000")]).await?;
                (user, rig.start_trade(user, "buy", "0.5", "100").await?)
            }
            Flow::BigWithdrawal => {
                let user = rig.user_with(&[("BTC", "5")]).await?;
                (user, rig.start_withdrawal(user, "1.5").await?)
            }
            Flow::SmallWithdrawal => {
                let user = rig.user_with(&[("BTC", "2")]).await?;
                (user, rig.start_withdrawal(user, "0.5").await?)
            }
        };
        if let Some(fault) = &case.fault {
            let key = match case.flow {
                Flow::Trade => trade::order_key(id),
                _ => withdrawal::submit_key(id),
            };
            rig.controls.set_fault_for(&key, fault.clone()).await?;
        }
        sqlx::query("INSERT INTO crash_plan (workflow_id, point) VALUES ($1, $2)")
            .bind(id)
            .bind(case.point)
            .execute(&rig.db.pool)
            .await?;
        let point = Point::parse(case.point).ok_or("a valid point")?;
        started.push(Started {
            case,
            id,
            user,
            point,
        });
    }
    let by_id: HashMap<Uuid, &Started> = started.iter().map(|s| (s.id, s)).collect();

    // Generation 1 runs every workflow to its point. Events and approvals
    // go through only for workflows whose point lies past them.
    rig.spawn()?;
    let mut held_back: Vec<Event> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        rig.check_child()?;
        for event in rig.due_events(Duration::from_millis(1)).await? {
            let owner = event
                .idempotency_key
                .as_str()
                .split_once(':')
                .and_then(|(id, _)| id.parse::<Uuid>().ok());
            match owner.and_then(|id| by_id.get(&id)) {
                Some(s) if s.case.events => rig.deliver(&event).await?,
                _ => held_back.push(event),
            }
        }
        for id in rig.approvable().await? {
            if by_id.get(&id).is_some_and(|s| s.case.approve) {
                rig.approve(id).await?;
            }
        }
        let paused: i64 = sqlx::query_scalar("SELECT count(*) FROM crash_paused")
            .fetch_one(&rig.db.pool)
            .await?;
        if paused == i64::try_from(cases.len())? {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<String> = sqlx::query_scalar(
                "SELECT point FROM crash_plan p
                 WHERE NOT EXISTS (SELECT 1 FROM crash_paused c WHERE c.workflow_id = p.workflow_id)",
            )
            .fetch_all(&rig.db.pool)
            .await?;
            return Err(format!("never paused at: {missing:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rig.kill()?; // SIGKILL, every workflow at its boundary

    // The journal is exactly at each planned boundary.
    for s in &started {
        let completed: Vec<String> = sqlx::query_scalar(
            "SELECT step FROM workflow_steps
             WHERE workflow_id = $1 AND status = 'completed' ORDER BY position",
        )
        .bind(s.id)
        .fetch_all(&rig.db.pool)
        .await?;
        assert_eq!(
            completed,
            completed_at(s.case.flow, &s.point),
            "{:?} {}: journal at the crash",
            s.case.flow,
            s.case.point
        );
        let state = rig.state(s.id).await?;
        match &s.point {
            Point::Waiting(step) => {
                let reason = rig
                    .text("SELECT wait_reason FROM workflows WHERE id = $1", s.id)
                    .await?;
                assert_eq!(state, "waiting", "{}", s.case.point);
                assert!(reason.starts_with("signal:"), "{}: {reason}", s.case.point);
                assert_eq!(
                    rig.text("SELECT current_step FROM workflows WHERE id = $1", s.id)
                        .await?,
                    *step
                );
            }
            Point::HangBefore(step) | Point::HangAfter(step) => {
                let call: (String, Option<String>) = sqlx::query_as(
                    "SELECT status, call_state FROM workflow_steps
                     WHERE workflow_id = $1 AND step = $2",
                )
                .bind(s.id)
                .bind(step)
                .fetch_one(&rig.db.pool)
                .await?;
                assert_eq!(
                    call,
                    ("calling".to_string(), Some("calling".to_string())),
                    "{}: only the call's intent is committed",
                    s.case.point
                );
            }
            Point::Answered(step) => {
                let call: (String, Option<String>) = sqlx::query_as(
                    "SELECT status, call_state FROM workflow_steps
                     WHERE workflow_id = $1 AND step = $2",
                )
                .bind(s.id)
                .bind(step)
                .fetch_one(&rig.db.pool)
                .await?;
                assert_eq!(
                    call,
                    ("calling".to_string(), Some("answered".to_string())),
                    "{}: the answer is recorded, the checkpoint is not",
                    s.case.point
                );
            }
            Point::After(step) if step == "notify" || step == "finalize" => {
                assert_eq!(state, "completed", "{}", s.case.point);
            }
            Point::Before(_) | Point::After(_) => {
                assert_eq!(state, "running", "{}", s.case.point);
            }
            Point::Reconcile(step) => {
                let reason = rig
                    .text("SELECT wait_reason FROM workflows WHERE id = $1", s.id)
                    .await?;
                assert_eq!(
                    (state.as_str(), reason),
                    ("waiting", format!("in_doubt:{step}")),
                    "{}",
                    s.case.point
                );
            }
            Point::Compensate(step) => {
                let at = rig
                    .text("SELECT current_step FROM workflows WHERE id = $1", s.id)
                    .await?;
                assert_eq!(
                    (state.as_str(), at.as_str()),
                    ("compensating", step.as_str()),
                    "{}",
                    s.case.point
                );
            }
        }
        // What the exchange saw at the crash.
        let (key, sent) = match s.case.flow {
            Flow::Trade => {
                let c = rig.counters(&trade::order_key(s.id)).await?;
                (trade::order_key(s.id), (c.place_calls, c.orders_created))
            }
            _ => {
                let c = rig.counters(&withdrawal::submit_key(s.id)).await?;
                (
                    withdrawal::submit_key(s.id),
                    (c.withdrawal_calls, c.withdrawals_created),
                )
            }
        };
        let past_call = completed_at(s.case.flow, &s.point)
            .iter()
            .any(|st| st == s.case.flow.call_step())
            || matches!(
                &s.point,
                Point::HangAfter(_) | Point::Answered(_) | Point::Reconcile(_)
            );
        let expected = if s.case.rejected() {
            (1, 0)
        } else if past_call {
            (1, 1)
        } else {
            (0, 0)
        };
        assert_eq!(
            sent, expected,
            "{} at the crash: calls/created for {key}",
            s.case.point
        );
    }
    let dead_leases: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE state = 'running' AND lease_owner = 'paycrash-g1'",
    )
    .fetch_one(&rig.db.pool)
    .await?;
    assert!(
        dead_leases >= 2,
        "the dead worker holds leases of claimed jobs ({dead_leases})"
    );

    // While no worker is alive, the held-back events and approvals arrive:
    // they are kept for their waiters.
    for event in std::mem::take(&mut held_back) {
        rig.deliver(&event).await?;
    }
    for id in rig.approvable().await? {
        rig.approve(id).await?;
    }

    // Generation 2: no plan. Everything finishes.
    sqlx::query("DELETE FROM crash_plan")
        .execute(&rig.db.pool)
        .await?;
    rig.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        rig.check_child()?;
        for event in rig.due_events(Duration::from_millis(1)).await? {
            rig.deliver(&event).await?;
        }
        for id in rig.approvable().await? {
            rig.approve(id).await?;
        }
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM workflows
             WHERE state NOT IN ('completed', 'compensated', 'failed', 'cancelled')",
        )
        .fetch_one(&rig.db.pool)
        .await?;
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            let stuck: Vec<(String, String, Option<String>)> = sqlx::query_as(
                "SELECT kind, state, wait_reason FROM workflows
                 WHERE state NOT IN ('completed', 'compensated', 'failed', 'cancelled')",
            )
            .fetch_all(&rig.db.pool)
            .await?;
            return Err(format!("workflows never finished: {stuck:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rig.kill()?;

    for s in &started {
        let what = format!("{:?} killed at {}", s.case.flow, s.case.point);
        let state = rig.state(s.id).await?;
        let done = !s.case.compensated;
        // A rejected call keeps its row `rejected`; an undone one is `cancelled`.
        let undone = if s.case.rejected() {
            "rejected"
        } else {
            "cancelled"
        };
        assert_eq!(
            state,
            if done { "completed" } else { "compensated" },
            "{what}"
        );
        match s.case.flow {
            Flow::Trade => {
                let c = rig.counters(&trade::order_key(s.id)).await?;
                assert_eq!(
                    (c.place_calls, c.orders_created),
                    s.case.calls_at_end(),
                    "{what}: one order, never re-sent"
                );
                assert_eq!(
                    rig.transfers(&trade::settle_reference(s.id)).await?,
                    i64::from(done),
                    "{what}: settlement transfers"
                );
                let status = rig
                    .text("SELECT status FROM trades WHERE id = $1", s.id)
                    .await?;
                assert_eq!(status, if done { "settled" } else { undone }, "{what}");
                let error = rig
                    .text("SELECT coalesce(error, '') FROM trades WHERE id = $1", s.id)
                    .await?;
                assert_eq!(
                    error.is_empty(),
                    done,
                    "{what}: the reason it ended: {error:?}"
                );
                let (usdt, btc) = if done {
                    (("949.95", "0"), ("0.5", "0"))
                } else {
                    (("1000", "0"), ("0", "0"))
                };
                let pair = |(a, b): (&str, &str)| (a.to_string(), b.to_string());
                assert_eq!(rig.balance(s.user, "USDT").await?, pair(usdt), "{what}");
                assert_eq!(rig.balance(s.user, "BTC").await?, pair(btc), "{what}");
                let notified = rig
                    .i64(
                        "SELECT count(*) FROM notifications
                         WHERE id = 'trade:' || $1::text || ':settled' AND status = 'sent'",
                        s.id,
                    )
                    .await?;
                assert_eq!(notified, i64::from(done), "{what}: notification");
            }
            Flow::BigWithdrawal | Flow::SmallWithdrawal => {
                let c = rig.counters(&withdrawal::submit_key(s.id)).await?;
                assert_eq!(
                    (c.withdrawal_calls, c.withdrawals_created),
                    s.case.calls_at_end(),
                    "{what}: one withdrawal, never re-sent"
                );
                assert_eq!(
                    rig.transfers(&withdrawal::capture_reference(s.id)).await?,
                    i64::from(done),
                    "{what}: capture transfers"
                );
                let status = rig
                    .text("SELECT status FROM withdrawals WHERE id = $1", s.id)
                    .await?;
                assert_eq!(status, if done { "completed" } else { undone }, "{what}");
                let error = rig
                    .text(
                        "SELECT coalesce(error, '') FROM withdrawals WHERE id = $1",
                        s.id,
                    )
                    .await?;
                assert_eq!(
                    error.is_empty(),
                    done,
                    "{what}: the reason it ended: {error:?}"
                );
                let btc = match (s.case.flow, done) {
                    (Flow::BigWithdrawal, true) => "3.5",
                    (Flow::BigWithdrawal, false) => "5",
                    (_, true) => "1.5",
                    (_, false) => "2",
                };
                assert_eq!(
                    rig.balance(s.user, "BTC").await?,
                    (btc.to_string(), "0".to_string()),
                    "{what}"
                );
                let notified = rig
                    .i64(
                        "SELECT count(*) FROM notifications
                         WHERE id = 'withdrawal:' || $1::text || ':completed' AND status = 'sent'",
                        s.id,
                    )
                    .await?;
                assert_eq!(notified, i64::from(done), "{what}: notification");
            }
        }
        if let Point::HangBefore(step) | Point::HangAfter(step) | Point::Reconcile(step) = &s.point
        {
            // The crash between intent and answer (or during the reconcile)
            // was settled by the reconcile query, never by sending again.
            let resolved: Option<String> = sqlx::query_scalar(
                "SELECT resolved_by FROM workflow_steps WHERE workflow_id = $1 AND step = $2",
            )
            .bind(s.id)
            .bind(step)
            .fetch_one(&rig.db.pool)
            .await?;
            assert_eq!(resolved.as_deref(), Some("reconcile"), "{what}");
            let status = rig.step_status(s.id, step).await?;
            let expected = if done { "completed" } else { "failed" };
            assert_eq!(status.as_deref(), Some(expected), "{what}");
        }
        if let Point::Answered(step) = &s.point {
            // The recorded answer was reused: no reconcile, no second call.
            let row: (String, Option<String>) = sqlx::query_as(
                "SELECT status, resolved_by FROM workflow_steps
                 WHERE workflow_id = $1 AND step = $2",
            )
            .bind(s.id)
            .bind(step)
            .fetch_one(&rig.db.pool)
            .await?;
            assert_eq!(row, ("completed".to_string(), None), "{what}");
        }
    }
    // The dead worker's claimed jobs were rescued, not lost.
    let expired: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_attempts WHERE outcome = 'lease_expired' AND worker = 'paycrash-g1'",
    )
    .fetch_one(&rig.db.pool)
    .await?;
    assert!(
        expired >= 2,
        "rescued attempts of the killed worker: {expired}"
    );
    rig.assert_books().await?;
    rig.stop().await
}

// ------------------------------------------------------- randomized chaos

/// SplitMix64: a tiny, seedable generator (no dependency needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        let i = usize::try_from(self.below(items.len() as u64)).unwrap_or(0);
        &items[i]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

fn seed() -> u64 {
    match std::env::var("LF_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => seed,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(42),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Trade,
    Withdrawal,
}

/// Starts a random trade or withdrawal for a random user, with a random
/// exchange fault set for its idempotency key. The start commits only after
/// the fault is in place, so a live worker can't make the call first.
async fn start_random(
    rig: &Rig,
    rng: &mut Rng,
    users: &[UserId],
    flows: &mut Vec<(Uuid, Kind, &'static str)>,
    faults: &mut BTreeMap<&'static str, u32>,
) -> TestResult {
    let user = *rng.pick(users);
    let roll = rng.below(100);
    let (kind, input) = if roll < 65 {
        let (side, amount, price) = if roll < 45 {
            (
                "buy",
                *rng.pick(&["0.5", "1", "2", "3"]),
                *rng.pick(&["50", "100", "150"]),
            )
        } else {
            (
                "sell",
                *rng.pick(&["0.5", "1", "1.5"]),
                *rng.pick(&["80", "120"]),
            )
        };
        let input = json!({ "user_id": user, "side": side, "base": "BTC", "quote": "USDT",
                            "base_amount": amount, "limit_price": price });
        (Kind::Trade, input)
    } else {
        let amount = *rng.pick(&["0.2", "0.7", "1.2", "2"]);
        let input = json!({ "user_id": user, "asset": "BTC", "amount": amount,
                            "address": "bc1q5l69k094s5qgfay7jpzf5dds375aalx7gdt6p4" });
        (Kind::Withdrawal, input)
    };
    let fault = match rng.below(100) {
        0..40 => None,
        40..55 => Some(("accept_then_timeout", Fault::AcceptThenTimeout)),
        55..70 => Some(("duplicate_fill", Fault::DuplicateFill)),
        70..85 => Some(("late_fill", Fault::late_fill(rng.millis(200, 3000)))),
        _ => Some(("reject", Fault::reject("simulated rejection"))),
    };
    let mut tx = rig.db.pool.begin().await?;
    let (id, key) = match kind {
        Kind::Trade => {
            let id = workflow_start_in(
                &mut tx,
                &rig.store,
                &rig.registry,
                trade::KIND,
                &input,
                None,
            )
            .await?;
            (id, trade::order_key(id))
        }
        Kind::Withdrawal => {
            let id = workflow_start_in(
                &mut tx,
                &rig.store,
                &rig.registry,
                withdrawal::KIND,
                &input,
                None,
            )
            .await?;
            (id, withdrawal::submit_key(id))
        }
    };
    let label = match fault {
        Some((label, fault)) => {
            rig.controls.set_fault_for(&key, fault).await?;
            label
        }
        None => "none",
    };
    tx.commit().await?;
    *faults.entry(label).or_default() += 1;
    flows.push((id, kind, label));
    Ok(())
}

/// One parent-side iteration of the chaos: deliver what the exchange has
/// due (losing one webhook in ten: the fill timeout and the confirmation
/// poll must find out from the exchange), approve some withdrawals, and
/// check no balance is negative. Returns how many events were lost.
async fn chaos_tick(rig: &Rig, rng: &mut Rng, approve_all: bool) -> TestResult<u32> {
    let mut lost = 0;
    for event in rig.due_events(rng.millis(50, 400)).await? {
        if rng.chance(10) {
            lost += 1;
            continue;
        }
        rig.deliver(&event).await?;
    }
    for id in rig.approvable().await? {
        if approve_all || rng.chance(40) {
            rig.approve(id).await?;
        }
    }
    assert_eq!(
        rig.negative_accounts().await?,
        0,
        "a balance is negative mid-run"
    );
    Ok(lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_trades_and_withdrawals_with_faults_and_kills_keep_the_books() -> TestResult {
    let seed = seed();
    eprintln!("randomized payments crash test: seed = {seed} (replay with LF_SEED={seed})");
    let mut rng = Rng(seed);
    let mut rig = Rig::new(SimServerConfig {
        // Longer than the children's 2 s client timeout: an
        // accept-then-time-out answer is lost.
        hang_for: Duration::from_secs(4),
        ..SimServerConfig::default()
    })
    .await?;

    // Tight balances: most users can't afford everything they ask for.
    let mut users = Vec::new();
    for _ in 0..6 {
        users.push(rig.user_with(&[("USDT", "400"), ("BTC", "3")]).await?);
    }
    rig.waits = Some("4000,3000".to_string());
    let mut lost = 0;
    let total = 60 + rng.below(21); // 60..=80
    let mut flows: Vec<(Uuid, Kind, &'static str)> = Vec::new();
    let mut faults: BTreeMap<&'static str, u32> = BTreeMap::new();
    // Workflows start all along, with workers alive or dead, so that every
    // kill lands on work in flight.
    let kills = 4 + rng.below(3); // 4..=6
    for _ in 0..kills {
        rig.spawn()?;
        let life = rng.millis(400, 2500);
        let born = Instant::now();
        while born.elapsed() < life {
            rig.check_child()?;
            if (flows.len() as u64) < total && rng.chance(70) {
                start_random(&rig, &mut rng, &users, &mut flows, &mut faults).await?;
            }
            lost += chaos_tick(&rig, &mut rng, false).await?;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        rig.kill()?;
        // Requests, events and approvals keep coming while no worker is alive.
        let down = rng.millis(0, 800);
        let died = Instant::now();
        while died.elapsed() < down {
            if (flows.len() as u64) < total && rng.chance(70) {
                start_random(&rig, &mut rng, &users, &mut flows, &mut faults).await?;
            }
            lost += chaos_tick(&rig, &mut rng, false).await?;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    while (flows.len() as u64) < total {
        start_random(&rig, &mut rng, &users, &mut flows, &mut faults).await?;
    }

    // The last generation runs until nothing is left to do.
    rig.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(100);
    let mut quiet = 0;
    while quiet < 3 {
        rig.check_child()?;
        lost += chaos_tick(&rig, &mut rng, true).await?;
        quiet = if rig.unsettled().await? == 0 {
            quiet + 1
        } else {
            0
        };
        if Instant::now() > deadline {
            let stuck: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT kind, state, current_step, wait_reason FROM workflows
                 WHERE state NOT IN ('completed', 'compensated', 'failed', 'cancelled')",
            )
            .fetch_all(&rig.db.pool)
            .await?;
            return Err(format!("seed {seed}: workflows never settled: {stuck:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rig.kill()?;

    // Every workflow is finished or waits for a named reason.
    let open: Vec<(Uuid, String, Option<String>)> = sqlx::query_as(
        "SELECT id, state, wait_reason FROM workflows
         WHERE state NOT IN ('completed', 'compensated', 'failed', 'cancelled')",
    )
    .fetch_all(&rig.db.pool)
    .await?;
    for (id, state, reason) in &open {
        let named = state == "waiting"
            && reason
                .as_deref()
                .is_some_and(|r| r.starts_with("in_doubt:") || r.starts_with("signal:"));
        assert!(named, "seed {seed}: workflow {id} is {state} ({reason:?})");
    }

    let mut tally: BTreeMap<String, u32> = BTreeMap::new();
    let mut settled_keys = HashSet::new();
    for (id, kind, fault) in &flows {
        let what = format!("seed {seed}: {kind:?} {id} (fault {fault})");
        let state = rig.state(*id).await?;
        *tally.entry(format!("{kind:?}:{state}")).or_default() += 1;
        if state == "failed" {
            // Only a business refusal may fail a workflow (no retries ran
            // out, no crash left it half done).
            let error = rig
                .text(
                    "SELECT coalesce(error, '') FROM workflows WHERE id = $1",
                    *id,
                )
                .await?;
            assert!(
                error.contains("insufficient funds") || error.contains("daily withdrawal limit"),
                "{what}: failed with {error:?}"
            );
        }
        let active_holds = rig
            .i64(
                "SELECT count(*) FROM holds
                 WHERE state = 'active' AND reference LIKE '%' || $1::text || '%'",
                *id,
            )
            .await?;
        if state != "waiting" {
            assert_eq!(
                active_holds, 0,
                "{what}: finished ({state}) with an active hold"
            );
        }
        match kind {
            Kind::Trade => {
                let key = trade::order_key(*id);
                let c = rig.counters(&key).await?;
                let placed = rig.step_status(*id, "place_order").await?;
                assert!(
                    c.place_calls <= 1,
                    "{what}: order sent {} times",
                    c.place_calls
                );
                assert_eq!(
                    c.orders_created,
                    // `compensated`: placed, then cancelled by the saga.
                    u64::from(matches!(
                        placed.as_deref(),
                        Some("completed" | "compensated")
                    )),
                    "{what}: orders at the exchange vs place_order {placed:?}"
                );
                let settled = rig.transfers(&trade::settle_reference(*id)).await?;
                assert_eq!(
                    settled,
                    i64::from(state == "completed"),
                    "{what}: settlements"
                );
                let status = rig
                    .text("SELECT status FROM trades WHERE id = $1", *id)
                    .await?;
                match state.as_str() {
                    "completed" => assert_eq!(status, "settled", "{what}"),
                    "compensated" => assert!(
                        status == "cancelled" || status == "rejected",
                        "{what}: {status}"
                    ),
                    "failed" => assert_eq!(status, "rejected", "{what}"),
                    _ => {}
                }
                if state == "completed" {
                    settled_keys.insert(format!("trade:{id}:settled"));
                }
                // The books agree with the exchange: a settled trade's order
                // filled there, an undone trade's order (if any) is cancelled,
                // and the key of an order the exchange rejected answers that.
                let order = match rig.exchange.get_order_by_key(&key).await {
                    Ok(order) => order,
                    Err(ledgerflow_payments::exchange::Error::Rejected(_))
                        if status == "rejected" =>
                    {
                        None
                    }
                    Err(e) => return Err(e.into()),
                };
                let expected = match state.as_str() {
                    "completed" => Some(OrderState::Filled),
                    _ if c.orders_created == 1 => Some(OrderState::Cancelled),
                    _ => None,
                };
                assert_eq!(
                    order.map(|o| o.state),
                    expected,
                    "{what}: order at the exchange"
                );
            }
            Kind::Withdrawal => {
                let key = withdrawal::submit_key(*id);
                let c = rig.counters(&key).await?;
                let submitted = rig.step_status(*id, "submit").await?;
                assert!(
                    c.withdrawal_calls <= 1,
                    "{what}: withdrawal sent {} times",
                    c.withdrawal_calls
                );
                assert_eq!(
                    c.withdrawals_created,
                    u64::from(matches!(
                        submitted.as_deref(),
                        Some("completed" | "compensated")
                    )),
                    "{what}: withdrawals at the exchange vs submit {submitted:?}"
                );
                let captured = rig.transfers(&withdrawal::capture_reference(*id)).await?;
                assert_eq!(
                    captured,
                    i64::from(state == "completed"),
                    "{what}: captures"
                );
                if state == "completed" {
                    settled_keys.insert(format!("withdrawal:{id}:completed"));
                    let at_exchange = rig.exchange.get_withdrawal_by_key(&key).await?;
                    assert_eq!(
                        at_exchange.map(|w| w.state),
                        Some(WithdrawalState::Confirmed),
                        "{what}: withdrawal at the exchange"
                    );
                }
            }
        }
    }
    // One notification per completed trade or withdrawal, each sent once.
    let sent: Vec<String> =
        sqlx::query_scalar("SELECT id FROM notifications WHERE status = 'sent' ORDER BY id")
            .fetch_all(&rig.db.pool)
            .await?;
    let sent: HashSet<String> = sent.into_iter().collect();
    assert_eq!(sent, settled_keys, "seed {seed}: notifications");
    rig.assert_books().await?;
    let completed = tally
        .iter()
        .filter(|(k, _)| k.ends_with(":completed"))
        .map(|(_, n)| *n)
        .sum::<u32>();
    assert!(completed > 0, "seed {seed}: nothing completed: {tally:?}");
    let rescued: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_attempts WHERE outcome = 'lease_expired'")
            .fetch_one(&rig.db.pool)
            .await?;
    let reconciled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM workflow_steps WHERE resolved_by = 'reconcile'")
            .fetch_one(&rig.db.pool)
            .await?;
    eprintln!(
        "seed {seed}: {} workflows, {kills} kills ({rescued} attempts rescued from dead \
         workers, {reconciled} in-doubt calls reconciled, {lost} webhooks lost), faults {faults:?}, \
         outcomes {tally:?}",
        flows.len(),
    );
    rig.stop().await
}
