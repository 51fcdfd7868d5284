//! The execution-path conformance suite: every workflow behaviour, run under each
//! [`ExecConfig`] — the locked path only; inline continuation without group commit; inline
//! with group commit; production's default with locked batches — must leave the same rows.
//!
//! Each scenario runs on a fresh database with a [`ManualClock`] and returns a normalised dump
//! of `workflows`, `workflow_steps`, the jobs that are not done with (anything but `completed`
//! and `cancelled`: how many step job rows a path uses is its own business) and the steps'
//! effects; ids, times and tokens are left out (workflow ids become `WF1`, `WF2`… in start
//! order). The dumps of all configurations must be equal, and each scenario also asserts what
//! the behaviour means.
use chrono::{DateTime, Utc};
use ledgerflow_engine::store::ClaimedJob;
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{
    CallError, ExecConfig, Inline, ManualClock, NewJob, Outcome, Reconciled, Resolution, StepCtx,
    StepHandler, StepOutcome, Store, WORKFLOW_JOB_KIND, Workflow, WorkflowId, WorkflowRegistry,
    WorkflowRuntime, signal_send, workflow_cancel_in, workflow_resolve_in, workflow_retry_in,
};
use serde_json::{Value, json};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The configurations every behaviour runs under. Inline continuation gets a budget no wait in
/// these tests can use up (the default 250 ms is a time limit, which a loaded machine would
/// turn into a different path).
fn configs() -> Vec<(&'static str, ExecConfig)> {
    let inline = Inline {
        budget: Duration::from_secs(120),
        ..Inline::default()
    };
    vec![
        ("locked only", ExecConfig::LOCKED_ONLY),
        (
            "inline, no group commit",
            ExecConfig::LOCKED_ONLY.inline(inline),
        ),
        (
            "inline with group commit",
            ExecConfig::LOCKED_ONLY.inline(inline).group_commit(true),
        ),
        ("default", ExecConfig::default().inline(inline)),
    ]
}

/// 2030-01-01T00:00:00Z.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).expect("a valid timestamp")
}

/// One configuration's run of a scenario.
struct Rig {
    db: TestDb,
    clock: ManualClock,
    store: Store,
    runtime: WorkflowRuntime,
    handler: StepHandler,
    owner: Arc<str>,
}

impl Rig {
    async fn new(registry: WorkflowRegistry, config: ExecConfig) -> TestResult<Self> {
        let db = TestDb::with_pool_size(16).await?;
        let clock = ManualClock::new(t0());
        let store = ledgerflow_engine::testing::manual_store(&db.pool, &clock);
        sqlx::query("CREATE TABLE effects (workflow_id uuid NOT NULL, what text NOT NULL)")
            .execute(&db.pool)
            .await?;
        let runtime = WorkflowRuntime::with_config(store.clone(), registry, config);
        Ok(Self {
            handler: runtime.handler(),
            runtime,
            db,
            clock,
            store,
            owner: Arc::from("conformance"),
        })
    }

    async fn start(&self, kind: &str) -> TestResult<WorkflowId> {
        Ok(self.runtime.start(kind, &json!({}), None).await?)
    }

    async fn claim(&self, limit: u32) -> TestResult<Vec<ClaimedJob>> {
        self.store.job_promote_due(1000).await?;
        Ok(self.store.job_claim("default", &self.owner, limit).await?)
    }

    /// Runs a claimed job as the runner does: the handler, then the outcome recorded unless
    /// a checkpoint committed it.
    async fn run(&self, job: &ClaimedJob) -> TestResult<Outcome> {
        let outcome = self.handler.run(job).await.outcome;
        if !job.lease.is_finished() {
            match self.store.job_finish(&job.lease, &outcome).await {
                Ok(()) | Err(ledgerflow_engine::Error::StaleLease { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(outcome)
    }

    /// Runs due jobs until none is left.
    async fn drain(&self) -> TestResult {
        for _ in 0..200 {
            let jobs = self.claim(10).await?;
            if jobs.is_empty() {
                return Ok(());
            }
            for job in &jobs {
                self.run(job).await?;
            }
        }
        Err("still busy after 200 rounds".into())
    }

    /// Drains, advancing the clock an hour between rounds so backoffs, timers and timeouts
    /// come due; `rounds` times.
    async fn settle(&self, rounds: usize) -> TestResult {
        for _ in 0..rounds {
            self.drain().await?;
            self.clock.advance(Duration::from_secs(3600));
        }
        self.drain().await
    }

    async fn state(&self, id: WorkflowId) -> TestResult<String> {
        Ok(
            sqlx::query_scalar("SELECT state FROM workflows WHERE id = $1")
                .bind(id)
                .fetch_one(&self.db.pool)
                .await?,
        )
    }

    async fn effects(&self) -> TestResult<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT what FROM effects ORDER BY what")
            .fetch_all(&self.db.pool)
            .await?)
    }

    /// The normalised dump (see the module's doc).
    async fn dump(&self) -> TestResult<Value> {
        let ids: Vec<WorkflowId> = sqlx::query_scalar("SELECT id FROM workflows ORDER BY id")
            .fetch_all(&self.db.pool)
            .await?;
        let rows: Value = sqlx::query_scalar(
            "SELECT json_build_object(
               'workflows', (SELECT coalesce(json_agg(json_build_object(
                   'kind', kind, 'state', state, 'output', output, 'current_step', current_step,
                   'wait_reason', wait_reason, 'error', error, 'wait_seq', wait_seq,
                   'finished', finished_at IS NOT NULL) ORDER BY id), '[]') FROM workflows),
               'steps', (SELECT coalesce(json_agg(json_build_object(
                   'workflow', workflow_id, 'step', step, 'position', position, 'status', status,
                   'output', output, 'error', error, 'key', idempotency_key, 'attempt', attempt,
                   'call_state', call_state, 'call_output', call_output, 'call_error', call_error,
                   'call_resends', call_resends, 'reconcile_attempts', reconcile_attempts,
                   'resolved_by', resolved_by, 'compensation_output', compensation_output,
                   'compensation_error', compensation_error,
                   'compensated', compensated_at IS NOT NULL)
                   ORDER BY workflow_id, position), '[]') FROM workflow_steps),
               'pending_jobs', (SELECT coalesce(json_agg(json_build_object(
                   'workflow', workflow_id, 'step', workflow_step, 'state', state,
                   'wake', args->>'wake', 'last_error', last_error)
                   ORDER BY workflow_id, workflow_step, state, args->>'wake'), '[]')
                   FROM jobs WHERE state NOT IN ('completed', 'cancelled')),
               'effects', (SELECT coalesce(json_agg(json_build_object(
                   'workflow', workflow_id, 'what', what) ORDER BY workflow_id, what), '[]')
                   FROM effects))",
        )
        .fetch_one(&self.db.pool)
        .await?;
        let mut text = rows.to_string();
        for (n, id) in ids.iter().enumerate() {
            text = text.replace(&id.to_string(), &format!("WF{}", n + 1));
        }
        Ok(serde_json::from_str(&text)?)
    }
}

/// Runs `scenario` under every configuration and asserts the dumps are equal.
async fn conforms<F, Fut>(registry: impl Fn() -> WorkflowRegistry, scenario: F) -> TestResult
where
    F: Fn(Rig) -> Fut,
    Fut: Future<Output = TestResult<Value>>,
{
    let mut first: Option<(&str, Value)> = None;
    for (name, config) in configs() {
        let rig = Rig::new(registry(), config).await?;
        let runtime = rig.runtime.clone();
        let dump = scenario(rig)
            .await
            .map_err(|e| format!("under {name}: {e}"))?;
        runtime.shutdown().await;
        match &first {
            None => first = Some((name, dump)),
            Some((base, expected)) => assert_eq!(
                &dump, expected,
                "{name} left other rows than {base}:\n{name}: {dump:#}\n{base}: {expected:#}"
            ),
        }
    }
    Ok(())
}

/// Records `what` for the step's workflow in its fenced transaction.
async fn effect(ctx: &StepCtx, what: &str) -> Result<(), String> {
    let mut db = ctx.db().await.map_err(|e| e.to_string())?;
    sqlx::query("INSERT INTO effects (workflow_id, what) VALUES ($1, $2)")
        .bind(ctx.workflow_id())
        .bind(what)
        .execute(&mut *db)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn registry(wf: Workflow) -> WorkflowRegistry {
    WorkflowRegistry::new()
        .register(wf)
        .expect("a valid definition")
}

mod calls;
mod operators;
mod steps;
mod waits;
