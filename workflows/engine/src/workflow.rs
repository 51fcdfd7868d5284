//! Durable workflows: definitions, the step journal, timers and signal waits.
//!
//! A [`Workflow`] is a kind, a version and a list of named steps. An instance
//! is a row in `workflows`; each of its steps runs as a job of kind
//! [`WORKFLOW_JOB_KIND`] whose handler calls [`run_step`]. A step returns a
//! [`StepOutcome`], and its result is *checkpointed* in ONE transaction fenced
//! by the job's lease (contract rule 2): the journal row in `workflow_steps`,
//! the step's own domain writes (made through [`StepCtx::db`]), the workflow
//! row's new state, the next step's job, and the completion of the current
//! job. A crash anywhere leaves either no trace of the step or the whole
//! checkpoint; a stale lease applies nothing.
//!
//! Re-delivery: a step whose journal row is `completed` is never run again; a
//! re-delivered job only re-enqueues the successor (idempotently, by unique
//! key) and completes. Concurrent deliveries of one step are serialized by a
//! `FOR UPDATE` lock on the workflow row, taken before the step runs.
//!
//! Job unique keys: `wf:{id}:{step}:0` enters a step, `wf:{id}:{step}:t{n}`
//! is the timeout of the step's n-th signal wait, and `wf:{id}:{step}:s{sig}`
//! wakes the step for signal `sig`.
//!
//! Each step has a deterministic idempotency key, `"{workflow_id}:{step}"`
//! ([`idempotency_key`]), that every external call it makes must carry
//! (contract rule 3).
//!
//! Costs to plan for: a running step holds its fenced transaction — one
//! pooled connection, its job row and its workflow row — for as long as its
//! function runs. Keep the workflow queue's concurrency below the pool size
//! (a step that also uses `ctx.store().pool()` needs a second connection).
//! While the job row is locked, heartbeats skip it and the reaper cannot
//! rescue it; if the worker dies, Postgres rolls the transaction back and the
//! reaper rescues the job once its lease has expired. Signal senders never
//! wait for a running step (they serialize with waiters on an advisory lock,
//! see [`crate::signal`]); operator actions on the workflow row do.
use crate::job::DEFAULT_MAX_ATTEMPTS;
use crate::signal::{lock_signal_key, signal_consume_in};
use crate::store::ClaimedJob;
use crate::{Error, FencedTx, NewJob, Outcome, Result, Store};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, Row};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};
use uuid::Uuid;

/// The job kind that runs workflow steps. Register a handler for it that calls
/// [`run_step`].
pub const WORKFLOW_JOB_KIND: &str = "ledgerflow.workflow";

/// A workflow instance's id (UUID v7).
pub type WorkflowId = Uuid;

/// The deterministic idempotency key of `step` in `workflow_id`.
pub fn idempotency_key(workflow_id: WorkflowId, step: &str) -> String {
    format!("{workflow_id}:{step}")
}

// ------------------------------------------------------------------ states

/// Where a workflow instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkflowState {
    /// A step is due or running.
    Running,
    /// Waiting for a signal or a timer.
    Waiting,
    /// Finished successfully.
    Completed,
    /// A step failed permanently.
    Failed,
    /// Undoing completed steps (sagas).
    Compensating,
    /// Completed steps were undone.
    Compensated,
    /// Stopped by an operator.
    Cancelled,
}

impl WorkflowState {
    /// All states.
    pub const ALL: [WorkflowState; 7] = [
        WorkflowState::Running,
        WorkflowState::Waiting,
        WorkflowState::Completed,
        WorkflowState::Failed,
        WorkflowState::Compensating,
        WorkflowState::Compensated,
        WorkflowState::Cancelled,
    ];

    /// The state's name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowState::Running => "running",
            WorkflowState::Waiting => "waiting",
            WorkflowState::Completed => "completed",
            WorkflowState::Failed => "failed",
            WorkflowState::Compensating => "compensating",
            WorkflowState::Compensated => "compensated",
            WorkflowState::Cancelled => "cancelled",
        }
    }

    /// True once no step of the instance will run again.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            WorkflowState::Completed
                | WorkflowState::Failed
                | WorkflowState::Compensated
                | WorkflowState::Cancelled
        )
    }
}

impl std::fmt::Display for WorkflowState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for WorkflowState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        WorkflowState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| Error::Invalid(format!("unknown workflow state {s:?}")))
    }
}

// ------------------------------------------------------------- definitions

/// What a step asks for next.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// Journal this output and go on to the next step (on the last step: the
    /// workflow completes with it as its output).
    Continue(Value),
    /// Journal this output and complete the workflow with it.
    Finish(Value),
    /// Journal the step and run the next one no earlier than this time (a
    /// durable timer: it is the next step job's `run_at`). On the last step
    /// the workflow simply completes.
    SleepUntil(DateTime<Utc>),
    /// Complete the step with the payload of signal `(name, correlation_key)`
    /// as its output — at once if one is pending (even if it arrived before
    /// anyone waited), else when it arrives. After `timeout` without it, the
    /// step function runs again with [`StepCtx::timed_out`] true and decides.
    WaitSignal {
        name: String,
        correlation_key: String,
        timeout: Duration,
    },
    /// Fail the workflow permanently with this error.
    Fail(String),
}

impl StepOutcome {
    /// A [`StepOutcome::WaitSignal`].
    pub fn wait_signal(
        name: impl Into<String>,
        correlation_key: impl Into<String>,
        timeout: Duration,
    ) -> Self {
        StepOutcome::WaitSignal {
            name: name.into(),
            correlation_key: correlation_key.into(),
            timeout,
        }
    }
}

/// What a step function returns: `Err` is a transient error, retried with
/// the job's backoff (and failing the workflow on the job's last attempt).
pub type StepResult = std::result::Result<StepOutcome, String>;

/// A step's body: an async function of its [`StepCtx`].
pub trait StepFn: Send + Sync + 'static {
    /// Runs the step once.
    fn call(&self, ctx: StepCtx) -> BoxFuture<'static, StepResult>;
}

impl<F, Fut> StepFn for F
where
    F: Fn(StepCtx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StepResult> + Send + 'static,
{
    fn call(&self, ctx: StepCtx) -> BoxFuture<'static, StepResult> {
        Box::pin(self(ctx))
    }
}

/// One named step of a workflow.
#[derive(Clone)]
pub struct StepDef {
    /// The step's name: stable, unique within the workflow (it is stored).
    pub name: &'static str,
    /// Its body.
    pub run: Arc<dyn StepFn>,
}

impl std::fmt::Debug for StepDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepDef").field("name", &self.name).finish()
    }
}

/// A workflow definition: one version of one kind.
#[derive(Debug, Clone)]
pub struct Workflow {
    /// A stable kind name (stored; never a Rust type name).
    pub kind: &'static str,
    /// The definition's version (≥ 1). Instances keep the version they
    /// started with; new starts use the newest registered.
    pub version: i32,
    /// The steps, in order.
    pub steps: Vec<StepDef>,
    /// The queue the step jobs go to.
    pub queue: String,
    /// Attempts each step job gets.
    pub max_attempts: i32,
}

impl Workflow {
    /// An empty definition of `kind` at `version`; add steps with [`Workflow::step`].
    pub fn new(kind: &'static str, version: i32) -> Self {
        Self {
            kind,
            version,
            steps: Vec::new(),
            queue: crate::job::DEFAULT_QUEUE.to_string(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }

    /// Appends a step.
    pub fn step(mut self, name: &'static str, run: impl StepFn) -> Self {
        self.steps.push(StepDef {
            name,
            run: Arc::new(run),
        });
        self
    }

    /// Sends the step jobs to `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Attempts per step job (at least 1).
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    fn index_of(&self, step: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == step)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.kind.is_empty() || self.kind.len() > 128 {
            return bad("workflow kind must be 1..=128 bytes".to_string());
        }
        if self.version < 1 {
            return bad(format!("workflow {} version must be >= 1", self.kind));
        }
        if self.steps.is_empty() {
            return bad(format!(
                "workflow {} v{} has no steps",
                self.kind, self.version
            ));
        }
        for (i, s) in self.steps.iter().enumerate() {
            if s.name.is_empty() || s.name.len() > 128 {
                return bad(format!(
                    "workflow {}: step names must be 1..=128 bytes",
                    self.kind
                ));
            }
            if self.steps[..i].iter().any(|o| o.name == s.name) {
                return bad(format!(
                    "workflow {}: duplicate step {:?}",
                    self.kind, s.name
                ));
            }
        }
        Ok(())
    }
}

/// The workflow definitions a process knows: several versions per kind.
#[derive(Debug, Clone, Default)]
pub struct WorkflowRegistry {
    kinds: HashMap<&'static str, BTreeMap<i32, Arc<Workflow>>>,
}

impl WorkflowRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a definition. Fails on an invalid definition or a (kind, version)
    /// registered twice.
    pub fn register(mut self, workflow: Workflow) -> Result<Self> {
        workflow.validate()?;
        let versions = self.kinds.entry(workflow.kind).or_default();
        if versions.contains_key(&workflow.version) {
            return Err(Error::Invalid(format!(
                "workflow {} v{} registered twice",
                workflow.kind, workflow.version
            )));
        }
        versions.insert(workflow.version, Arc::new(workflow));
        Ok(self)
    }

    /// The definition of `kind` at `version`.
    pub fn get(&self, kind: &str, version: i32) -> Option<&Arc<Workflow>> {
        self.kinds.get(kind)?.get(&version)
    }

    /// The newest definition of `kind`.
    pub fn latest(&self, kind: &str) -> Option<&Arc<Workflow>> {
        self.kinds.get(kind)?.values().next_back()
    }
}

// ----------------------------------------------------------------- context

/// What a step function gets: who it is, the workflow's input, the outputs of
/// earlier steps, and the lease-fenced transaction its domain writes go into.
#[derive(Clone)]
pub struct StepCtx {
    info: Arc<StepInfo>,
    tx: Arc<Mutex<Option<FencedTx>>>,
}

struct StepInfo {
    workflow_id: WorkflowId,
    kind: String,
    version: i32,
    step: String,
    input: Value,
    outputs: HashMap<String, Value>,
    idempotency_key: String,
    attempt: i32,
    timed_out: bool,
    store: Store,
}

impl std::fmt::Debug for StepCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepCtx")
            .field("workflow_id", &self.info.workflow_id)
            .field("kind", &self.info.kind)
            .field("version", &self.info.version)
            .field("step", &self.info.step)
            .field("attempt", &self.info.attempt)
            .field("timed_out", &self.info.timed_out)
            .finish_non_exhaustive()
    }
}

/// The step's database connection: the fenced transaction in which its
/// checkpoint will commit. Drop it before the step function returns.
pub type StepDb = OwnedMappedMutexGuard<Option<FencedTx>, PgConnection>;

impl StepCtx {
    /// The workflow instance.
    pub fn workflow_id(&self) -> WorkflowId {
        self.info.workflow_id
    }

    /// The workflow's kind.
    pub fn kind(&self) -> &str {
        &self.info.kind
    }

    /// The definition version this instance runs.
    pub fn version(&self) -> i32 {
        self.info.version
    }

    /// This step's name.
    pub fn step(&self) -> &str {
        &self.info.step
    }

    /// The workflow's input.
    pub fn input(&self) -> &Value {
        &self.info.input
    }

    /// The input decoded as `T`.
    pub fn input_as<T: serde::de::DeserializeOwned>(&self) -> std::result::Result<T, String> {
        T::deserialize(&self.info.input).map_err(|e| format!("bad workflow input: {e}"))
    }

    /// The journaled output of an earlier, completed step.
    pub fn output(&self, step: &str) -> Option<&Value> {
        self.info.outputs.get(step)
    }

    /// Every completed step's output, by step name.
    pub fn outputs(&self) -> &HashMap<String, Value> {
        &self.info.outputs
    }

    /// The step's deterministic idempotency key, `"{workflow_id}:{step}"`:
    /// pass it with every external call the step makes.
    pub fn idempotency_key(&self) -> &str {
        &self.info.idempotency_key
    }

    /// The job attempt running the step (1-based).
    pub fn attempt(&self) -> i32 {
        self.info.attempt
    }

    /// True when the step runs because its signal wait timed out.
    pub fn timed_out(&self) -> bool {
        self.info.timed_out
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.info.store
    }

    /// The lease-fenced transaction, for the step's domain writes: they
    /// commit together with the step's checkpoint, or not at all. Hold the
    /// guard only while writing and drop it before returning.
    pub async fn db(&self) -> Result<StepDb> {
        let guard = self.tx.clone().lock_owned().await;
        OwnedMutexGuard::try_map(guard, |slot| slot.as_mut().map(FencedTx::conn))
            .map_err(|_| Error::Invalid("the step's transaction is closed".to_string()))
    }
}

// -------------------------------------------------------------------- jobs

/// Why a step job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Wake {
    /// The step's first run (also after a timer).
    #[default]
    Entry,
    /// A signal arrived for the waiting step.
    Signal { signal_id: i64 },
    /// The step's `wait_seq`-th signal wait timed out.
    Timeout { wait_seq: i32 },
    /// An operator re-runs the failed step (`seq` is the workflow's `wait_seq`
    /// at the time, so each retry gets its own job).
    Retry { seq: i32 },
}

/// A step job's arguments (a wire format: change compatibly).
#[derive(Debug, Deserialize)]
struct StepArgs {
    workflow_id: WorkflowId,
    step: String,
    #[serde(default)]
    wake: Option<String>,
    #[serde(default)]
    signal_id: Option<i64>,
    #[serde(default)]
    wait_seq: Option<i32>,
}

impl StepArgs {
    fn wake(&self) -> Wake {
        match (self.wake.as_deref(), self.signal_id, self.wait_seq) {
            (Some("signal"), Some(signal_id), _) => Wake::Signal { signal_id },
            (Some("timeout"), _, Some(wait_seq)) => Wake::Timeout { wait_seq },
            (Some("retry"), _, Some(seq)) => Wake::Retry { seq },
            _ => Wake::Entry,
        }
    }
}

/// The job that runs `step` of `workflow_id`, under its unique key.
pub(crate) fn step_job(
    workflow_id: WorkflowId,
    queue: &str,
    step: &str,
    wake: Wake,
    run_at: Option<DateTime<Utc>>,
    max_attempts: Option<i32>,
) -> NewJob {
    let seq = match wake {
        Wake::Entry => "0".to_string(),
        Wake::Signal { signal_id } => format!("s{signal_id}"),
        Wake::Timeout { wait_seq } => format!("t{wait_seq}"),
        Wake::Retry { seq } => format!("r{seq}"),
    };
    let args = match wake {
        Wake::Entry => json!({ "workflow_id": workflow_id, "step": step, "wake": "entry" }),
        Wake::Signal { signal_id } => json!({
            "workflow_id": workflow_id, "step": step, "wake": "signal", "signal_id": signal_id
        }),
        Wake::Timeout { wait_seq } => json!({
            "workflow_id": workflow_id, "step": step, "wake": "timeout", "wait_seq": wait_seq
        }),
        Wake::Retry { seq } => json!({
            "workflow_id": workflow_id, "step": step, "wake": "retry", "wait_seq": seq
        }),
    };
    let mut job = NewJob::new(WORKFLOW_JOB_KIND, args)
        .queue(queue)
        .workflow(workflow_id, step)
        .unique(format!("wf:{workflow_id}:{step}:{seq}"));
    if let Some(at) = run_at {
        job = job.run_at(at);
    }
    if let Some(n) = max_attempts {
        job = job.max_attempts(n);
    }
    job
}

// ------------------------------------------------------------------- start

/// Starts a workflow in its own transaction; see [`workflow_start_in`].
pub async fn workflow_start(
    store: &Store,
    registry: &WorkflowRegistry,
    kind: &str,
    input: &Value,
    unique_key: Option<&str>,
) -> Result<WorkflowId> {
    let mut tx = store.pool().begin().await?;
    let id = workflow_start_in(&mut tx, store, registry, kind, input, unique_key).await?;
    tx.commit().await?;
    Ok(id)
}

/// Starts a workflow of `kind` at its newest registered version on the
/// caller's connection (inside their transaction, if one is open): inserts
/// the instance and enqueues its first step's job. With a `unique_key`,
/// starting again returns the existing instance's id and enqueues nothing.
pub async fn workflow_start_in(
    conn: &mut PgConnection,
    store: &Store,
    registry: &WorkflowRegistry,
    kind: &str,
    input: &Value,
    unique_key: Option<&str>,
) -> Result<WorkflowId> {
    let def = registry
        .latest(kind)
        .ok_or_else(|| Error::Invalid(format!("no workflow of kind {kind:?} is registered")))?;
    let first = def
        .steps
        .first()
        .ok_or_else(|| Error::Invalid(format!("workflow {kind:?} has no steps")))?;
    let id = Uuid::now_v7();
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO workflows (id, kind, version, state, input, current_step, queue, unique_key,
                                created_at, updated_at)
         SELECT $1, $2, $3, 'running', $4, $5, $6, $7, n, n
         FROM (SELECT coalesce($8::timestamptz, now()) AS n) t
         ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
         RETURNING id",
    )
    .bind(id)
    .bind(def.kind)
    .bind(def.version)
    .bind(input)
    .bind(first.name)
    .bind(&def.queue)
    .bind(unique_key)
    .bind(store.now())
    .fetch_optional(&mut *conn)
    .await?;
    if inserted.is_none() {
        let key = unique_key.unwrap_or_default();
        let existing: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM workflows WHERE unique_key = $1")
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?;
        return existing.ok_or_else(|| {
            Error::Invalid(format!(
                "workflow unique key {key:?} is taken by an instance this transaction cannot see"
            ))
        });
    }
    let job = step_job(
        id,
        &def.queue,
        first.name,
        Wake::Entry,
        None,
        Some(def.max_attempts),
    );
    store.job_insert_in(conn, &job).await?;
    Ok(id)
}

// --------------------------------------------------------------- operators

/// Cancels a workflow that has not finished (operator action, on the
/// caller's connection so the audit row commits with it). Its pending step
/// jobs are cancelled; a step running right now finishes first (it holds the
/// workflow row) and its successor job is cancelled too. Returns false when
/// the workflow was already finished.
pub async fn workflow_cancel_in(
    conn: &mut PgConnection,
    store: &Store,
    id: WorkflowId,
    reason: &str,
) -> Result<bool> {
    let cancelled: Option<Uuid> = sqlx::query_scalar(
        "UPDATE workflows
         SET state = 'cancelled', error = $2, wait_reason = NULL, wait_signal_name = NULL,
             wait_correlation_key = NULL, wait_until = NULL, updated_at = t.n, finished_at = t.n
         FROM (SELECT coalesce($3::timestamptz, now()) AS n) t
         WHERE id = $1 AND state IN ('running', 'waiting')
         RETURNING id",
    )
    .bind(id)
    .bind(reason)
    .bind(store.now())
    .fetch_optional(&mut *conn)
    .await?;
    if cancelled.is_none() {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE jobs
         SET state = 'cancelled', finished_at = coalesce($3::timestamptz, now()), last_error = $2
         WHERE workflow_id = $1 AND kind = $4 AND state IN ('scheduled', 'available', 'retryable')",
    )
    .bind(id)
    .bind(reason)
    .bind(store.now())
    .bind(WORKFLOW_JOB_KIND)
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

/// Runs a failed workflow's failed step again (operator action, on the
/// caller's connection). Returns false unless the workflow is `failed`.
pub async fn workflow_retry_in(
    conn: &mut PgConnection,
    store: &Store,
    id: WorkflowId,
) -> Result<bool> {
    let row = sqlx::query(
        "UPDATE workflows
         SET state = 'running', error = NULL, finished_at = NULL, wait_seq = wait_seq + 1,
             updated_at = coalesce($2::timestamptz, now())
         WHERE id = $1 AND state = 'failed' AND current_step IS NOT NULL
         RETURNING current_step, queue, wait_seq",
    )
    .bind(id)
    .bind(store.now())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(false);
    };
    let step: String = row.try_get(0)?;
    let queue: String = row.try_get(1)?;
    let seq: i32 = row.try_get(2)?;
    let job = step_job(id, &queue, &step, Wake::Retry { seq }, None, None);
    store.job_insert_in(conn, &job).await?;
    Ok(true)
}

// ------------------------------------------------------------------- reads

/// A workflow instance as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct WorkflowRow {
    pub id: WorkflowId,
    pub kind: String,
    pub version: i32,
    pub state: String,
    pub input: Value,
    pub output: Option<Value>,
    pub current_step: Option<String>,
    pub wait_reason: Option<String>,
    pub wait_until: Option<DateTime<Utc>>,
    pub queue: String,
    pub unique_key: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl WorkflowRow {
    /// The state, parsed.
    pub fn state(&self) -> Result<WorkflowState> {
        self.state.parse()
    }
}

/// A journal row of `workflow_steps`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StepRow {
    pub workflow_id: WorkflowId,
    pub step: String,
    /// The step's index in its workflow's definition.
    pub position: i32,
    pub status: String,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub idempotency_key: String,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One workflow instance.
pub async fn workflow_get_in(
    conn: &mut PgConnection,
    id: WorkflowId,
) -> Result<Option<WorkflowRow>> {
    Ok(sqlx::query_as::<_, WorkflowRow>(
        "SELECT id, kind, version, state, input, output, current_step, wait_reason, wait_until,
                queue, unique_key, error, created_at, updated_at, finished_at
         FROM workflows WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?)
}

/// An instance's step journal, in the order the steps finished.
pub async fn workflow_steps_in(conn: &mut PgConnection, id: WorkflowId) -> Result<Vec<StepRow>> {
    Ok(sqlx::query_as::<_, StepRow>(
        "SELECT workflow_id, step, position, status, output, error, idempotency_key, attempt,
                started_at, finished_at
         FROM workflow_steps WHERE workflow_id = $1
         ORDER BY position, step",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?)
}

// --------------------------------------------------------------- execution

/// The locked workflow row, as `run_step` needs it.
struct Locked {
    id: WorkflowId,
    kind: String,
    version: i32,
    state: WorkflowState,
    input: Value,
    current_step: Option<String>,
    wait_signal_name: Option<String>,
    wait_correlation_key: Option<String>,
    wait_seq: i32,
    wait_until: Option<DateTime<Utc>>,
    queue: String,
}

/// Runs the step a claimed `ledgerflow.workflow` job stands for, and
/// checkpoints its result in one lease-fenced transaction. This is what the
/// worker's handler for [`WORKFLOW_JOB_KIND`] calls. Whenever the step
/// checkpointed, the job's outcome is already committed with it (the lease
/// reports [`crate::Lease::is_finished`]); otherwise — a step error, a stale
/// lease, a database error — the returned `Retry` is for the runner to record.
pub async fn run_step(store: &Store, registry: &WorkflowRegistry, job: &ClaimedJob) -> Outcome {
    let args: StepArgs = match serde_json::from_value(job.args.clone()) {
        Ok(a) => a,
        Err(e) => return Outcome::fail(format!("bad workflow step arguments: {e}")),
    };
    match run_step_inner(store, registry, job, &args).await {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::warn!(job_id = %job.id, workflow_id = %args.workflow_id, step = %args.step,
                error = %e, "workflow step not checkpointed");
            Outcome::retry(e)
        }
    }
}

async fn run_step_inner(
    store: &Store,
    registry: &WorkflowRegistry,
    job: &ClaimedJob,
    args: &StepArgs,
) -> Result<Outcome> {
    let mut tx = FencedTx::begin(store, &job.lease).await?;
    let Some(wf) = lock_workflow(tx.conn(), args.workflow_id).await? else {
        let outcome = Outcome::fail(format!("workflow {} not found", args.workflow_id));
        tx.finish(outcome.clone()).await?;
        return Ok(outcome);
    };
    if wf.state.is_finished() || wf.state == WorkflowState::Compensating {
        tx.complete().await?;
        return Ok(Outcome::Complete);
    }
    let Some(def) = registry.get(&wf.kind, wf.version).cloned() else {
        tx.rollback().await?;
        return Ok(Outcome::retry(format!(
            "workflow {} v{} is not registered in this worker",
            wf.kind, wf.version
        )));
    };
    let Some(idx) = def.index_of(&args.step) else {
        let outcome = Outcome::fail(format!(
            "workflow {} v{} has no step {:?}",
            wf.kind, wf.version, args.step
        ));
        tx.finish(outcome.clone()).await?;
        return Ok(outcome);
    };
    let journaled: Option<String> = sqlx::query_scalar(
        "SELECT status FROM workflow_steps WHERE workflow_id = $1 AND step = $2",
    )
    .bind(wf.id)
    .bind(&args.step)
    .fetch_optional(tx.conn())
    .await?;
    // A `failed` row on a workflow that is not finished means an operator
    // retried it: the step runs again. `in_doubt` steps are never re-run
    // blindly (contract rule 3): they wait for a resolution.
    if let Some(status) = journaled.filter(|s| s != "failed") {
        if status == "completed" {
            // A re-delivery: never run a journaled step again; only make sure
            // its successor is enqueued (a no-op when it already is).
            if let Some(next) = def.steps.get(idx + 1)
                && wf.current_step.as_deref() == Some(next.name)
            {
                let run_at = if wf.state == WorkflowState::Waiting && wf.wait_signal_name.is_none()
                {
                    wf.wait_until
                } else {
                    None
                };
                let next_job = step_job(
                    wf.id,
                    &wf.queue,
                    next.name,
                    Wake::Entry,
                    run_at,
                    Some(def.max_attempts),
                );
                store.job_insert_in(tx.conn(), &next_job).await?;
            }
        }
        tx.complete().await?;
        return Ok(Outcome::Complete);
    }
    if wf.current_step.as_deref() != Some(args.step.as_str()) {
        // Not this step's turn (a stray job): nothing to do.
        tx.complete().await?;
        return Ok(Outcome::Complete);
    }

    let mut timed_out = false;
    if wf.state == WorkflowState::Waiting
        && let (Some(name), Some(key)) = (&wf.wait_signal_name, &wf.wait_correlation_key)
    {
        // The step is waiting for a signal: if it is here, it is the output.
        if let Some(payload) =
            signal_consume_in(tx.conn(), store, wf.id, &args.step, name, key).await?
        {
            checkpoint_advance(tx, store, &wf, &def, idx, &payload, &job.lease, None).await?;
            return Ok(Outcome::Complete);
        }
        match args.wake() {
            Wake::Timeout { wait_seq } if wait_seq == wf.wait_seq => timed_out = true,
            _ => {
                // A spurious or stale wake-up: keep waiting.
                tx.complete().await?;
                return Ok(Outcome::Complete);
            }
        }
    }

    let outputs = load_outputs(tx.conn(), wf.id).await?;
    let slot = Arc::new(Mutex::new(Some(tx)));
    let ctx = StepCtx {
        info: Arc::new(StepInfo {
            workflow_id: wf.id,
            kind: wf.kind.clone(),
            version: wf.version,
            step: args.step.clone(),
            input: wf.input.clone(),
            outputs,
            idempotency_key: idempotency_key(wf.id, &args.step),
            attempt: job.lease.attempt,
            timed_out,
            store: store.clone(),
        }),
        tx: slot.clone(),
    };
    let result = def.steps[idx].run.call(ctx).await;
    let tx = slot
        .lock()
        .await
        .take()
        .ok_or_else(|| Error::Invalid("the step's transaction was taken".to_string()))?;

    match result {
        Err(error) => {
            // The step's own writes are not applied.
            tx.rollback().await?;
            if !job.lease.is_last_attempt() {
                return Ok(Outcome::retry(error));
            }
            let mut tx = FencedTx::begin(store, &job.lease).await?;
            let Some(wf) = lock_workflow(tx.conn(), wf.id).await? else {
                tx.rollback().await?;
                return Ok(Outcome::retry(error));
            };
            checkpoint_fail(&mut tx, store, &wf, &def, idx, &job.lease, &error).await?;
            let outcome = Outcome::fail(&error);
            tx.finish(outcome.clone()).await?;
            Ok(outcome)
        }
        Ok(StepOutcome::Continue(output)) => {
            checkpoint_advance(tx, store, &wf, &def, idx, &output, &job.lease, None).await?;
            Ok(Outcome::Complete)
        }
        Ok(StepOutcome::Finish(output)) => {
            checkpoint_finish(tx, store, &wf, &def, idx, &output, &job.lease).await?;
            Ok(Outcome::Complete)
        }
        Ok(StepOutcome::SleepUntil(at)) => {
            let output = json!({ "sleep_until": at });
            checkpoint_advance(tx, store, &wf, &def, idx, &output, &job.lease, Some(at)).await?;
            Ok(Outcome::Complete)
        }
        Ok(StepOutcome::Fail(error)) => {
            let mut tx = tx;
            checkpoint_fail(&mut tx, store, &wf, &def, idx, &job.lease, &error).await?;
            tx.complete().await?;
            Ok(Outcome::Complete)
        }
        Ok(StepOutcome::WaitSignal {
            name,
            correlation_key,
            timeout,
        }) => {
            let mut tx = tx;
            // Serialize with senders of this signal, then look for it: a
            // sender either committed before (we see its row) or runs after
            // our commit (it sees us waiting).
            lock_signal_key(tx.conn(), &name, &correlation_key).await?;
            if let Some(payload) =
                signal_consume_in(tx.conn(), store, wf.id, &args.step, &name, &correlation_key)
                    .await?
            {
                checkpoint_advance(tx, store, &wf, &def, idx, &payload, &job.lease, None).await?;
                return Ok(Outcome::Complete);
            }
            let now = db_now(tx.conn(), store).await?;
            let timeout = chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
            let deadline = now
                .checked_add_signed(timeout)
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            let seq = wf.wait_seq.saturating_add(1);
            sqlx::query(
                "UPDATE workflows
                 SET state = 'waiting', wait_reason = 'signal:' || $2 || ':' || $3,
                     wait_signal_name = $2, wait_correlation_key = $3, wait_seq = $4,
                     wait_until = $5, updated_at = $6
                 WHERE id = $1",
            )
            .bind(wf.id)
            .bind(&name)
            .bind(&correlation_key)
            .bind(seq)
            .bind(deadline)
            .bind(now)
            .execute(tx.conn())
            .await?;
            let timeout_job = step_job(
                wf.id,
                &wf.queue,
                &args.step,
                Wake::Timeout { wait_seq: seq },
                Some(deadline),
                Some(def.max_attempts),
            );
            store.job_insert_in(tx.conn(), &timeout_job).await?;
            tx.complete().await?;
            Ok(Outcome::Complete)
        }
    }
}

async fn lock_workflow(conn: &mut PgConnection, id: WorkflowId) -> Result<Option<Locked>> {
    let Some(r) = sqlx::query(
        "SELECT id, kind, version, state, input, current_step, wait_signal_name,
                wait_correlation_key, wait_seq, wait_until, queue
         FROM workflows WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let state: String = r.try_get(3)?;
    Ok(Some(Locked {
        id: r.try_get(0)?,
        kind: r.try_get(1)?,
        version: r.try_get(2)?,
        state: state.parse()?,
        input: r.try_get(4)?,
        current_step: r.try_get(5)?,
        wait_signal_name: r.try_get(6)?,
        wait_correlation_key: r.try_get(7)?,
        wait_seq: r.try_get(8)?,
        wait_until: r.try_get(9)?,
        queue: r.try_get(10)?,
    }))
}

async fn load_outputs(conn: &mut PgConnection, id: WorkflowId) -> Result<HashMap<String, Value>> {
    let rows = sqlx::query(
        "SELECT step, output FROM workflow_steps WHERE workflow_id = $1 AND status = 'completed'",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            let step: String = r.try_get(0)?;
            let output: Option<Value> = r.try_get(1)?;
            Ok((step, output.unwrap_or(Value::Null)))
        })
        .collect()
}

async fn db_now(conn: &mut PgConnection, store: &Store) -> Result<DateTime<Utc>> {
    Ok(
        sqlx::query_scalar("SELECT coalesce($1::timestamptz, now())")
            .bind(store.now())
            .fetch_one(&mut *conn)
            .await?,
    )
}

/// Writes the step's journal row (overwriting anything but `completed`).
#[allow(clippy::too_many_arguments)]
async fn journal(
    conn: &mut PgConnection,
    store: &Store,
    wf: WorkflowId,
    (position, step): (usize, &str),
    status: &str,
    output: Option<&Value>,
    error: Option<&str>,
    lease: &crate::Lease,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO workflow_steps (workflow_id, step, position, status, output, error,
                                     idempotency_key, attempt, started_at, finished_at)
         VALUES ($1, $2, $10, $3, $4, $5, $6, $7, $8, coalesce($9::timestamptz, now()))
         ON CONFLICT (workflow_id, step) DO UPDATE
         SET status = EXCLUDED.status, output = EXCLUDED.output, error = EXCLUDED.error,
             attempt = EXCLUDED.attempt, started_at = EXCLUDED.started_at,
             finished_at = EXCLUDED.finished_at
         WHERE workflow_steps.status <> 'completed'",
    )
    .bind(wf)
    .bind(step)
    .bind(status)
    .bind(output)
    .bind(error)
    .bind(idempotency_key(wf, step))
    .bind(lease.attempt)
    .bind(lease.attempted_at)
    .bind(store.now())
    .bind(i32::try_from(position).unwrap_or(i32::MAX))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Journals `step` as completed with `output` and moves to the next step
/// (enqueued to run at `run_at`, a durable timer), or completes the
/// workflow after its last step; then completes the job. One transaction.
#[allow(clippy::too_many_arguments)]
async fn checkpoint_advance(
    mut tx: FencedTx,
    store: &Store,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    output: &Value,
    lease: &crate::Lease,
    run_at: Option<DateTime<Utc>>,
) -> Result<()> {
    let Some(next) = def.steps.get(idx + 1) else {
        return checkpoint_finish(tx, store, wf, def, idx, output, lease).await;
    };
    journal(
        tx.conn(),
        store,
        wf.id,
        (idx, def.steps[idx].name),
        "completed",
        Some(output),
        None,
        lease,
    )
    .await?;
    let sleeping = run_at.is_some();
    sqlx::query(
        "UPDATE workflows
         SET state = CASE WHEN $3 THEN 'waiting' ELSE 'running' END,
             wait_reason = CASE WHEN $3 THEN 'timer' END,
             wait_signal_name = NULL, wait_correlation_key = NULL, wait_until = $4,
             current_step = $2, updated_at = coalesce($5::timestamptz, now())
         WHERE id = $1",
    )
    .bind(wf.id)
    .bind(next.name)
    .bind(sleeping)
    .bind(run_at)
    .bind(store.now())
    .execute(tx.conn())
    .await?;
    let job = step_job(
        wf.id,
        &wf.queue,
        next.name,
        Wake::Entry,
        run_at,
        Some(def.max_attempts),
    );
    store.job_insert_in(tx.conn(), &job).await?;
    tx.complete().await
}

/// Journals `step` as completed and completes the workflow with `output`.
async fn checkpoint_finish(
    mut tx: FencedTx,
    store: &Store,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    output: &Value,
    lease: &crate::Lease,
) -> Result<()> {
    journal(
        tx.conn(),
        store,
        wf.id,
        (idx, def.steps[idx].name),
        "completed",
        Some(output),
        None,
        lease,
    )
    .await?;
    sqlx::query(
        "UPDATE workflows
         SET state = 'completed', output = $2, current_step = NULL, wait_reason = NULL,
             wait_signal_name = NULL, wait_correlation_key = NULL, wait_until = NULL,
             updated_at = t.n, finished_at = t.n
         FROM (SELECT coalesce($3::timestamptz, now()) AS n) t
         WHERE id = $1",
    )
    .bind(wf.id)
    .bind(output)
    .bind(store.now())
    .execute(tx.conn())
    .await?;
    tx.complete().await
}

/// Journals `step` as failed and fails the workflow (the caller finishes the job).
async fn checkpoint_fail(
    tx: &mut FencedTx,
    store: &Store,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    lease: &crate::Lease,
    error: &str,
) -> Result<()> {
    journal(
        tx.conn(),
        store,
        wf.id,
        (idx, def.steps[idx].name),
        "failed",
        None,
        Some(error),
        lease,
    )
    .await?;
    sqlx::query(
        "UPDATE workflows
         SET state = 'failed', error = $2, wait_reason = NULL, wait_signal_name = NULL,
             wait_correlation_key = NULL, wait_until = NULL, updated_at = t.n, finished_at = t.n
         FROM (SELECT coalesce($3::timestamptz, now()) AS n) t
         WHERE id = $1",
    )
    .bind(wf.id)
    .bind(error)
    .bind(store.now())
    .execute(tx.conn())
    .await?;
    Ok(())
}
