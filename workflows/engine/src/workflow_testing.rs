//! Testing helpers for workflow authors (feature `testing`), in the spirit of
//! Oban.Testing: start a workflow, run its step jobs in-process one at a
//! time, and assert on what was enqueued, signalled and journaled.
//!
//! ```ignore
//! let h = WorkflowHarness::new(store, registry);
//! let id = h.start("trade", &json!({ "amount": "1.5" })).await?;
//! h.run_until_idle().await?;
//! assert_eq!(h.state(id).await?.state, "completed");
//! h.assert_enqueued("notify", &json!({ "workflow_id": id })).await?;
//! ```
//!
//! The harness runs each claimed job with the runtime's production handler
//! ([`crate::workflow::WorkflowRuntime::handler`]) under the [`ExecConfig`] it was made with:
//! [`WorkflowHarness::new`] takes production's with inline continuation off, so that
//! [`WorkflowHarness::run_next_step`] runs exactly one step; [`WorkflowHarness::with_config`]
//! takes any (the engine's conformance suite runs every behaviour under each).
//!
//! The harness claims only [`WORKFLOW_JOB_KIND`] jobs that are due by the
//! store's clock (with a [`crate::ManualClock`], advance it to fire timers,
//! timeouts and backoffs), from any queue, and records their outcomes the way
//! the worker's runner does. Other jobs (notifications, outbox relays …) stay
//! enqueued for [`WorkflowHarness::assert_enqueued`].
use crate::job::JOB_COLUMNS;
use crate::lease::Lease;
use crate::signal::Signal;
use crate::store::ClaimedJob;
use crate::workflow::{
    ExecConfig, StepHandler, StepRow, WORKFLOW_JOB_KIND, WorkflowId, WorkflowRegistry, WorkflowRow,
    WorkflowRuntime, workflow_get_in, workflow_steps_in,
};
use crate::{Error, Job, Outcome, Result, Store};
use serde_json::Value;
use sqlx::Row;
use std::sync::Arc;
use std::time::Duration;

/// How many step jobs [`WorkflowHarness::run_until_idle`] runs at most
/// before it reports a workflow that never settles.
pub const RUN_UNTIL_IDLE_LIMIT: usize = 1000;

/// One step job the harness ran.
#[derive(Debug, Clone)]
pub struct RanStep {
    /// The job.
    pub job_id: crate::JobId,
    /// Its workflow.
    pub workflow_id: Option<WorkflowId>,
    /// The step it stood for.
    pub step: Option<String>,
    /// Its arguments (`wake` tells entry, signal, timeout, reconcile, compensate …).
    pub args: Value,
    /// What the attempt ended with.
    pub outcome: Outcome,
}

/// Runs workflows in-process for tests.
#[derive(Debug, Clone)]
pub struct WorkflowHarness {
    store: Store,
    runtime: WorkflowRuntime,
    handler: StepHandler,
    owner: Arc<str>,
}

impl WorkflowHarness {
    /// A harness on `store` running the definitions of `registry` the production way, one
    /// step per job (inline continuation off).
    pub fn new(store: Store, registry: WorkflowRegistry) -> Self {
        let config = ExecConfig::default().inline(crate::workflow::Inline::OFF);
        Self::with_config(store, registry, config)
    }

    /// A harness running the definitions of `registry` with the execution mechanisms of
    /// `config`.
    pub fn with_config(store: Store, registry: WorkflowRegistry, config: ExecConfig) -> Self {
        let runtime = WorkflowRuntime::with_config(store.clone(), registry, config);
        Self {
            store,
            handler: runtime.handler(),
            runtime,
            owner: Arc::from("workflow-harness"),
        }
    }

    /// The runtime the harness runs steps with.
    pub fn runtime(&self) -> &WorkflowRuntime {
        &self.runtime
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The registry.
    pub fn registry(&self) -> &WorkflowRegistry {
        self.runtime.registry()
    }

    /// Starts a workflow of `kind` (newest version) with `input`.
    pub async fn start(&self, kind: &str, input: &Value) -> Result<WorkflowId> {
        self.runtime.start(kind, input, None).await
    }

    /// Claims the next due workflow step job (oldest `run_at` first) and runs
    /// it (and, inline, its due successors); `None` when no step job is due.
    pub async fn run_next_step(&self) -> Result<Option<RanStep>> {
        self.store.job_promote_due(1000).await?;
        let Some(job) = self.claim_one().await? else {
            return Ok(None);
        };
        let outcome = self.handler.run(&job).await.outcome;
        if !job.lease.is_finished() {
            match self.store.job_finish(&job.lease, &outcome).await {
                Ok(()) | Err(Error::StaleLease { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Some(RanStep {
            job_id: job.id,
            workflow_id: job.workflow_id,
            step: job.workflow_step.clone(),
            args: job.args.clone(),
            outcome,
        }))
    }

    /// Runs due step jobs until none is left; returns what ran, in order.
    /// Fails after [`RUN_UNTIL_IDLE_LIMIT`] jobs (a workflow that never settles).
    pub async fn run_until_idle(&self) -> Result<Vec<RanStep>> {
        let mut ran = Vec::new();
        while let Some(step) = self.run_next_step().await? {
            ran.push(step);
            if ran.len() >= RUN_UNTIL_IDLE_LIMIT {
                return Err(Error::Invalid(format!(
                    "workflows still busy after {RUN_UNTIL_IDLE_LIMIT} step jobs"
                )));
            }
        }
        Ok(ran)
    }

    /// Jobs of `kind` not yet run (scheduled, available or retryable) whose
    /// args contain `args_subset` (JSON containment), oldest first.
    pub async fn enqueued(&self, kind: &str, args_subset: &Value) -> Result<Vec<Job>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE kind = $1 AND args @> $2
               AND state IN ('scheduled', 'available', 'retryable')
             ORDER BY created_at, id"
        );
        Ok(sqlx::query_as::<_, Job>(&sql)
            .bind(kind)
            .bind(args_subset)
            .fetch_all(self.store.pool())
            .await?)
    }

    /// The one pending job of `kind` whose args contain `args_subset`; an
    /// error naming what is enqueued instead when there is none.
    pub async fn assert_enqueued(&self, kind: &str, args_subset: &Value) -> Result<Job> {
        if let Some(job) = self.enqueued(kind, args_subset).await?.into_iter().next() {
            return Ok(job);
        }
        let pending: Vec<(String, Value)> = sqlx::query(
            "SELECT kind, args FROM jobs
             WHERE state IN ('scheduled', 'available', 'retryable')
             ORDER BY created_at, id LIMIT 20",
        )
        .fetch_all(self.store.pool())
        .await?
        .into_iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_>>()?;
        Err(Error::Invalid(format!(
            "expected a job of kind {kind:?} with args containing {args_subset}; \
             enqueued: {pending:?}"
        )))
    }

    /// An error when a pending job of `kind` with args containing
    /// `args_subset` exists.
    pub async fn refute_enqueued(&self, kind: &str, args_subset: &Value) -> Result<()> {
        let found = self.enqueued(kind, args_subset).await?;
        if found.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "expected no job of kind {kind:?} with args containing {args_subset}; \
                 found {}",
                found.len()
            )))
        }
    }

    /// Every job of `queue` not yet run, oldest first.
    pub async fn all_enqueued(&self, queue: &str) -> Result<Vec<Job>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE queue = $1 AND state IN ('scheduled', 'available', 'retryable')
             ORDER BY created_at, id"
        );
        Ok(sqlx::query_as::<_, Job>(&sql)
            .bind(queue)
            .fetch_all(self.store.pool())
            .await?)
    }

    /// Every signal named `name`, oldest first (consumed or not).
    pub async fn signals_sent(&self, name: &str) -> Result<Vec<Signal>> {
        Ok(sqlx::query_as::<_, Signal>(
            "SELECT id, workflow_id, name, correlation_key, payload, dedupe_key, received_at,
                    consumed_at, consumed_by_step
             FROM signals WHERE name = $1 ORDER BY id",
        )
        .bind(name)
        .fetch_all(self.store.pool())
        .await?)
    }

    /// The workflow instance.
    pub async fn state(&self, id: WorkflowId) -> Result<WorkflowRow> {
        let mut conn = self.store.pool().acquire().await?;
        workflow_get_in(&mut conn, id)
            .await?
            .ok_or_else(|| Error::Invalid(format!("workflow {id} not found")))
    }

    /// The workflow's step journal.
    pub async fn journal(&self, id: WorkflowId) -> Result<Vec<StepRow>> {
        let mut conn = self.store.pool().acquire().await?;
        workflow_steps_in(&mut conn, id).await
    }

    /// Claims one due workflow step job from any queue.
    async fn claim_one(&self) -> Result<Option<ClaimedJob>> {
        let ttl = crate::store::ms(self.store.config().lease_ttl);
        let Some(r) = sqlx::query(
            "WITH t AS (SELECT coalesce($2::timestamptz, now()) AS n),
             next AS (
               SELECT id FROM jobs
               WHERE state = 'available' AND kind = $1
               ORDER BY run_at, priority, id
               LIMIT 1
               FOR UPDATE SKIP LOCKED
             )
             UPDATE jobs j
             SET state = 'running', attempt = j.attempt + 1, attempted_at = t.n,
                 lease_owner = $3, lease_token = gen_random_uuid(),
                 lease_expires_at = t.n + $4 * interval '1 millisecond'
             FROM next, t
             WHERE j.id = next.id
             RETURNING j.id, j.queue, j.kind, j.args, j.priority, j.timeout_ms, j.workflow_id,
                       j.workflow_step, j.created_at, j.run_at, j.lease_token, j.attempt,
                       j.max_attempts, j.attempted_at, j.traceparent",
        )
        .bind(WORKFLOW_JOB_KIND)
        .bind(self.store.now())
        .bind(&*self.owner)
        .bind(ttl)
        .fetch_optional(self.store.pool())
        .await?
        else {
            return Ok(None);
        };
        let id: crate::JobId = r.try_get(0)?;
        let timeout_ms: Option<i32> = r.try_get(5)?;
        Ok(Some(ClaimedJob {
            id,
            queue: r.try_get(1)?,
            kind: r.try_get(2)?,
            args: r.try_get(3)?,
            priority: r.try_get(4)?,
            timeout: timeout_ms.map(|m| Duration::from_millis(u64::try_from(m).unwrap_or(0))),
            workflow_id: r.try_get(6)?,
            workflow_step: r.try_get(7)?,
            created_at: r.try_get(8)?,
            run_at: r.try_get(9)?,
            lease: Lease::new(
                id,
                r.try_get(10)?,
                self.owner.clone(),
                r.try_get(11)?,
                r.try_get(12)?,
                r.try_get(13)?,
            ),
            flow: false,
            traceparent: r.try_get(14)?,
        }))
    }
}
