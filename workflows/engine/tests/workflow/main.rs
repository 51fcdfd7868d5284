//! Workflows against a real database: the step journal, re-delivery, signals, timers, fencing,
//! and the `WorkflowHarness` testing helpers.
//!
//! Each test gets its own migrated database and a [`ManualClock`]; step jobs
//! are claimed by hand and run with a runtime's handler (as the worker does),
//! so every interleaving is explicit and nothing sleeps.
use chrono::{DateTime, TimeDelta, Utc};
use ledgerflow_engine::signal::signal_list_in;
use ledgerflow_engine::store::ClaimedJob;
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::workflow::{StepRow, WorkflowRow, workflow_get_in, workflow_steps_in};
use ledgerflow_engine::workflow_testing::WorkflowHarness;
use ledgerflow_engine::{
    ExecConfig, Inline, ManualClock, NewJob, Outcome, Result, SignalSent, StepCtx, StepHandler,
    StepOutcome, Store, WORKFLOW_JOB_KIND, Workflow, WorkflowId, WorkflowRegistry, WorkflowRuntime,
    signal_send, workflow_cancel_in, workflow_retry_in,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// 2030-01-01T00:00:00Z.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).expect("a valid timestamp")
}

struct Env {
    db: TestDb,
    clock: ManualClock,
    store: Store,
    /// One runtime per registry and inline setting, as one process has one: deliveries of a
    /// workflow in one process share its in-process turns and batches.
    runtimes: Mutex<HashMap<(usize, u32, Duration), WorkflowRuntime>>,
}

impl Env {
    async fn new() -> Result<Self> {
        let db = TestDb::new().await?;
        let clock = ManualClock::new(t0());
        let store = ledgerflow_engine::testing::manual_store(&db.pool, &clock);
        sqlx::query("CREATE TABLE effects (workflow_id uuid NOT NULL, step text NOT NULL)")
            .execute(&db.pool)
            .await?;
        Ok(Self {
            db,
            clock,
            store,
            runtimes: Mutex::default(),
        })
    }

    fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    async fn count(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(self.pool()).await?)
    }

    async fn workflow(&self, id: WorkflowId) -> Result<WorkflowRow> {
        let mut conn = self.pool().acquire().await?;
        Ok(workflow_get_in(&mut conn, id)
            .await?
            .expect("the workflow exists"))
    }

    async fn journal(&self, id: WorkflowId) -> Result<Vec<StepRow>> {
        let mut conn = self.pool().acquire().await?;
        workflow_steps_in(&mut conn, id).await
    }

    async fn claim(&self, owner: &str, limit: u32) -> Result<Vec<ClaimedJob>> {
        self.store.job_promote_due(1000).await?;
        self.store
            .job_claim("default", &Arc::from(owner), limit)
            .await
    }

    /// Runs one claimed job the way the runner does, one step per delivery,
    /// then records the outcome unless the step already committed it.
    async fn run(&self, registry: &WorkflowRegistry, job: &ClaimedJob) -> Result<Outcome> {
        let outcome = steps(self, registry, Inline::OFF).run(job).await.outcome;
        if !job.lease.is_finished() {
            match self.store.job_finish(&job.lease, &outcome).await {
                Ok(()) | Err(ledgerflow_engine::Error::StaleLease { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(outcome)
    }

    /// Claims and runs due step jobs until none is left; returns how many ran.
    async fn drain(&self, registry: &WorkflowRegistry) -> Result<usize> {
        let mut ran = 0;
        loop {
            let jobs = self.claim("worker", 10).await?;
            if jobs.is_empty() {
                return Ok(ran);
            }
            for job in &jobs {
                self.run(registry, job).await?;
                ran += 1;
            }
        }
    }
}

/// The production handler of the test's runtime for `registry`, with `inline` continuation.
fn steps(env: &Env, registry: &WorkflowRegistry, inline: Inline) -> StepHandler {
    let key = (
        std::ptr::from_ref(registry) as usize,
        inline.max_steps,
        inline.budget,
    );
    let mut runtimes = env.runtimes.lock().expect("not poisoned");
    runtimes
        .entry(key)
        .or_insert_with(|| {
            let config = ExecConfig::default().inline(inline);
            WorkflowRuntime::with_config(env.store.clone(), registry.clone(), config)
        })
        .handler()
}

/// Starts a workflow (the runtime's batched start).
async fn workflow_start(
    store: &Store,
    registry: &WorkflowRegistry,
    kind: &str,
    input: &Value,
    key: Option<&str>,
) -> Result<WorkflowId> {
    let runtime = WorkflowRuntime::new(store.clone(), registry.clone());
    let started = runtime.start(kind, input, key).await;
    runtime.shutdown().await;
    started
}

/// Executions per step name.
#[derive(Default, Clone)]
struct Calls(Arc<Mutex<HashMap<String, usize>>>);

impl Calls {
    fn hit(&self, step: &str) {
        *self
            .0
            .lock()
            .expect("not poisoned")
            .entry(step.to_string())
            .or_default() += 1;
    }

    fn get(&self, step: &str) -> usize {
        self.0
            .lock()
            .expect("not poisoned")
            .get(step)
            .copied()
            .unwrap_or(0)
    }
}

async fn effect(ctx: &StepCtx) -> std::result::Result<(), String> {
    let mut db = ctx.db().await.map_err(|e| e.to_string())?;
    sqlx::query("INSERT INTO effects (workflow_id, step) VALUES ($1, $2)")
        .bind(ctx.workflow_id())
        .bind(ctx.step())
        .execute(&mut *db)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// reserve → execute → settle; each writes an effect in its fenced transaction.
fn three_steps(calls: &Calls, delay: Duration) -> Workflow {
    let (c1, c2, c3) = (calls.clone(), calls.clone(), calls.clone());
    Workflow::new("trade", 1)
        .step("reserve", move |ctx: StepCtx| {
            let calls = c1.clone();
            async move {
                calls.hit("reserve");
                tokio::time::sleep(delay).await;
                effect(&ctx).await?;
                Ok(StepOutcome::Continue(
                    json!({ "reserved": ctx.input()["amount"] }),
                ))
            }
        })
        .step("execute", move |ctx: StepCtx| {
            let calls = c2.clone();
            async move {
                calls.hit("execute");
                effect(&ctx).await?;
                let reserved = ctx.output("reserve").cloned().unwrap_or(Value::Null);
                Ok(StepOutcome::Continue(
                    json!({ "executed": reserved, "key": ctx.idempotency_key() }),
                ))
            }
        })
        .step("settle", move |ctx: StepCtx| {
            let calls = c3.clone();
            async move {
                calls.hit("settle");
                effect(&ctx).await?;
                let n = ctx.outputs().len();
                Ok(StepOutcome::Continue(json!({ "settled": true, "seen": n })))
            }
        })
}

fn registry(wf: Workflow) -> Result<WorkflowRegistry> {
    WorkflowRegistry::new().register(wf)
}

mod batches;
mod harness;
mod inline;
mod pure;
mod steps;
mod waits;
