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
//! Inline continuation ([`run_steps`]): when a step's successor is due now in
//! the same queue, its checkpoint may move the same job row on to the
//! successor instead (same statement, same fence) and the successor runs in
//! the same delivery — one claim and one job row for a chain of steps, each
//! still checkpointed before the next starts. See [`run_steps`] for when.
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
//! Sagas: a step may register a compensation
//! ([`Workflow::step_with_compensation`]). When a step fails permanently (its
//! [`StepOutcome::Fail`], its retries exhausted, its in-doubt call resolved
//! as failed), the workflow goes `compensating` and the compensations of the
//! *completed* steps run in reverse order, each as its own lease-fenced job
//! (unique key `wf:{id}:{step}:x{seq}`), journaled (step status
//! `compensated` with the compensation's output) and retried like any step.
//! The workflow ends `compensated`, or `failed` when a compensation exhausts
//! its attempts (an operator's [`workflow_retry_in`] resumes compensating).
//! With nothing to compensate, a failed step fails the workflow.
//!
//! External calls (contract rule 3): [`StepCtx::external_call`] commits the
//! call's *intent* on the step's journal row (status `calling`) in its own
//! transaction, makes the call with the step's idempotency key, and records
//! the answer. An unknown outcome ([`CallError::Unknown`] or
//! [`StepOutcome::InDoubt`]), or a re-run that finds an intent without an
//! answer (the process died in between), puts the step `in_doubt` (the
//! workflow `waiting`, `wait_reason = 'in_doubt:<step>'`): the call is never
//! re-sent blindly. The step's reconcile hook ([`Workflow::reconcile`]) is
//! asked what happened, at once and then with backoff (unique keys
//! `wf:{id}:{step}:q{seq}.{n}`); [`Reconciled::Unknown`] after the last try
//! leaves it for an admin, who settles it with [`workflow_resolve_in`].
//! The one rule for every workflow: a crash must not change the business
//! outcome. When the hook learns authoritatively that the call never arrived
//! ([`Reconciled::NotReceived`]), the step runs again and sends the call
//! again under the same idempotency key (at most [`Workflow::max_resends`]
//! times); only a real refusal ([`Reconciled::Failed`]) fails the step.
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
//! [`StepCtx::external_call`] writes its intent and answer on a second pooled
//! connection: the step's transaction holds the workflow row `FOR NO KEY
//! UPDATE`, which lets that connection's journal insert pass its foreign-key
//! check, and the job row lock it also holds keeps the lease from moving
//! while the call is in flight.
use crate::checkpoint;
use crate::held::HeldHandle;
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

/// Default of [`Workflow::reconcile_attempts`].
pub const DEFAULT_RECONCILE_ATTEMPTS: i32 = 5;

/// Default of [`Workflow::max_resends`].
pub const DEFAULT_MAX_RESENDS: i32 = 5;

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
    /// Fail the step permanently with this error: the completed steps are
    /// compensated (sagas), or the workflow fails when there is nothing to
    /// compensate.
    Fail(String),
    /// The outcome of the step's external call is unknown (a timeout, a
    /// connection reset after sending): the step's writes are discarded, it
    /// goes `in_doubt` and its reconcile hook or an admin decides. Never
    /// re-sent blindly (contract rule 3).
    InDoubt(String),
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

/// What a compensation returns: its output (journaled as the step's
/// `compensation_output`), or a transient error, retried with backoff.
pub type CompensationResult = std::result::Result<Value, String>;

/// A step's compensation: undoes the step, given its context and the step's
/// journaled output (e.g. the hold reference to release).
pub trait CompensateFn: Send + Sync + 'static {
    /// Runs the compensation once.
    fn call(&self, ctx: StepCtx, output: Value) -> BoxFuture<'static, CompensationResult>;
}

impl<F, Fut> CompensateFn for F
where
    F: Fn(StepCtx, Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CompensationResult> + Send + 'static,
{
    fn call(&self, ctx: StepCtx, output: Value) -> BoxFuture<'static, CompensationResult> {
        Box::pin(self(ctx, output))
    }
}

/// What a reconcile hook found out about an in-doubt external call.
#[derive(Debug, Clone, PartialEq)]
pub enum Reconciled {
    /// The call took effect: the step completes with this output.
    Succeeded(Value),
    /// The call did not take effect: the step fails (→ compensation).
    Failed(String),
    /// The other side says, authoritatively, that it never received the
    /// call (it has no record under the step's idempotency key). Nothing
    /// happened, so the business outcome must not change: the step runs
    /// again and sends the call again under the same idempotency key, which
    /// the other side deduplicates — this is not a blind re-send. At most
    /// [`Workflow::max_resends`] times; after that the step fails.
    NotReceived(String),
    /// Still unknown: ask again later, then leave it to an admin.
    Unknown,
}

/// What a reconcile hook returns; `Err` is a transient error (retried).
pub type ReconcileResult = std::result::Result<Reconciled, String>;

/// A step's reconcile hook: asks the outside world (by the step's
/// idempotency key) what became of an in-doubt call.
pub trait ReconcileFn: Send + Sync + 'static {
    /// Runs the hook once.
    fn call(&self, ctx: StepCtx, idempotency_key: String) -> BoxFuture<'static, ReconcileResult>;
}

impl<F, Fut> ReconcileFn for F
where
    F: Fn(StepCtx, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ReconcileResult> + Send + 'static,
{
    fn call(&self, ctx: StepCtx, idempotency_key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self(ctx, idempotency_key))
    }
}

/// How an admin settles an in-doubt step ([`workflow_resolve_in`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// The call took effect: the step completes with this output.
    Succeeded(Value),
    /// It did not: the step fails (→ compensation).
    Failed(String),
}

/// One named step of a workflow.
#[derive(Clone)]
pub struct StepDef {
    /// The step's name: stable, unique within the workflow (it is stored).
    pub name: &'static str,
    /// Its body.
    pub run: Arc<dyn StepFn>,
    /// Undoes the completed step when a later step fails (sagas).
    pub compensate: Option<Arc<dyn CompensateFn>>,
    /// Settles the step's in-doubt external call.
    pub reconcile: Option<Arc<dyn ReconcileFn>>,
}

impl std::fmt::Debug for StepDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepDef")
            .field("name", &self.name)
            .field("compensate", &self.compensate.is_some())
            .field("reconcile", &self.reconcile.is_some())
            .finish()
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
    /// How many times a step's reconcile hook is asked (at once, then with
    /// the store's backoff) before an in-doubt step is left to an admin.
    pub reconcile_attempts: i32,
    /// How many times one step's call is sent again after its reconcile hook
    /// found it [`Reconciled::NotReceived`] before the step fails instead.
    pub max_resends: i32,
    misplaced: Option<String>,
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
            reconcile_attempts: DEFAULT_RECONCILE_ATTEMPTS,
            max_resends: DEFAULT_MAX_RESENDS,
            misplaced: None,
        }
    }

    /// Appends a step.
    pub fn step(mut self, name: &'static str, run: impl StepFn) -> Self {
        self.steps.push(StepDef {
            name,
            run: Arc::new(run),
            compensate: None,
            reconcile: None,
        });
        self
    }

    /// Appends a step with its compensation, which receives the step's
    /// journaled output when a later step fails.
    pub fn step_with_compensation(
        self,
        name: &'static str,
        run: impl StepFn,
        compensate: impl CompensateFn,
    ) -> Self {
        self.step(name, run).compensate(compensate)
    }

    /// Sets the compensation of the last step added.
    pub fn compensate(mut self, compensate: impl CompensateFn) -> Self {
        match self.steps.last_mut() {
            Some(step) => step.compensate = Some(Arc::new(compensate)),
            None => self.misplaced = Some("compensate() before any step".to_string()),
        }
        self
    }

    /// Sets the reconcile hook of the last step added: asked what became of
    /// the step's external call when its outcome is unknown.
    pub fn reconcile(mut self, reconcile: impl ReconcileFn) -> Self {
        match self.steps.last_mut() {
            Some(step) => step.reconcile = Some(Arc::new(reconcile)),
            None => self.misplaced = Some("reconcile() before any step".to_string()),
        }
        self
    }

    /// How many times reconcile hooks are asked (at least 1).
    pub fn reconcile_attempts(mut self, n: i32) -> Self {
        self.reconcile_attempts = n.max(1);
        self
    }

    /// How many times a step's call is sent again after a reconcile hook
    /// found it never received (at least 0).
    pub fn max_resends(mut self, n: i32) -> Self {
        self.max_resends = n.max(0);
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
        if let Some(m) = &self.misplaced {
            return bad(format!("workflow {}: {m}", self.kind));
        }
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
    position: i32,
    input: Value,
    outputs: HashMap<String, Value>,
    idempotency_key: String,
    attempt: i32,
    started_at: DateTime<Utc>,
    timed_out: bool,
    store: Store,
    /// The step's external call as an earlier attempt left it.
    prior_call: Option<PriorCall>,
    /// What runs: a step body (the only place `external_call` is allowed),
    /// a compensation or a reconcile hook.
    role: Role,
    track: std::sync::Mutex<CallTrack>,
    /// Set when the step runs without a transaction (the optimistic path):
    /// how to open one, lock the workflow and check that it is still where
    /// the step found it, the first time the step needs the database or
    /// makes its external call.
    lazy: Option<LazyTx>,
}

/// What opening a step's transaction on first use needs ([`StepInfo::lazy`]).
struct LazyTx {
    lease: crate::Lease,
    state: WorkflowState,
    wait_seq: i32,
    /// Opened (or tried to) already: a failed attempt is not repeated.
    tried: std::sync::atomic::AtomicBool,
    /// The locked batch holding the workflow row while the step runs (a
    /// delivery's first step, `crate::held`): left, and its commit awaited,
    /// before the step takes the lock on its own.
    held: Option<Arc<HeldHandle>>,
}

/// What a [`StepCtx`] is handed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Step,
    Compensation,
    Reconcile,
}

/// An external call recorded on the step's journal row.
#[derive(Debug, Clone)]
struct PriorCall {
    state: String,
    output: Option<Value>,
    error: Option<String>,
}

/// What this run of the step did with its external call.
#[derive(Debug, Default)]
struct CallTrack {
    made: bool,
    in_doubt: Option<String>,
}

/// How an external call ended, as the closure given to
/// [`StepCtx::external_call`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// A definite "no": the provider refused and nothing happened.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The request certainly never reached the provider (connection refused,
    /// DNS failure): safe to send again with the same key.
    #[error("not sent: {0}")]
    NotSent(String),
    /// It may or may not have taken effect (timeout or reset after sending).
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

/// Why [`StepCtx::external_call`] has no successful answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExternalError {
    /// The provider refused (recorded; a re-run gets the same answer).
    #[error("external call rejected: {0}")]
    Rejected(String),
    /// Not delivered; returning it as the step's `Err` retries the step,
    /// which sends again with the same key.
    #[error("external call not sent: {0}")]
    NotSent(String),
    /// Unknown outcome: whatever the step returns now, it goes `in_doubt`.
    #[error("external call in doubt: {0}")]
    InDoubt(String),
    /// The call was not made (a second call in one step, the intent could
    /// not be recorded, the step is already journaled).
    #[error("external call not made: {0}")]
    NotMade(String),
}

impl From<ExternalError> for String {
    fn from(e: ExternalError) -> Self {
        e.to_string()
    }
}

/// What [`StepCtx::external_call`] returns.
pub type ExternalResult = std::result::Result<Value, ExternalError>;

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
    /// pass it with every external call the step makes. In a compensation it
    /// is `"{workflow_id}:{step}:compensate"` (the undo is a call of its own);
    /// a reconcile hook gets the step's key.
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

    /// When this attempt started (recorded with the external call's intent).
    pub fn started_at(&self) -> DateTime<Utc> {
        self.info.started_at
    }

    /// Calls the outside world safely (contract rule 3); at most once per step.
    ///
    /// 1. The intent is committed first, in its own transaction, on the
    ///    step's journal row (`status = 'calling'`, with attempt and time).
    /// 2. `call` runs with the step's idempotency key.
    /// 3. Its answer is recorded, again in its own transaction. A definite
    ///    answer is returned (and a re-run of the step gets the recorded
    ///    answer back without calling again); [`CallError::Unknown`] marks
    ///    the step in doubt: whatever the step then returns, its writes are
    ///    discarded and it goes `in_doubt` for its reconcile hook or an admin.
    ///
    /// A re-run that finds an intent without an answer (the process died
    /// during the call) never gets here: the step goes `in_doubt` first.
    pub async fn external_call<F, Fut>(&self, call: F) -> ExternalResult
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = std::result::Result<Value, CallError>>,
    {
        if self.info.role != Role::Step {
            return Err(ExternalError::NotMade(
                "external_call is for step bodies; a compensation or reconcile hook must be \
                 idempotent by its idempotency key"
                    .to_string(),
            ));
        }
        if std::mem::replace(&mut self.track().made, true) {
            return Err(ExternalError::NotMade(
                "a step makes at most one external call; split it into steps".to_string(),
            ));
        }
        if let Some(prior) = &self.info.prior_call {
            match prior.state.as_str() {
                "answered" => return Ok(prior.output.clone().unwrap_or(Value::Null)),
                "rejected" => {
                    return Err(ExternalError::Rejected(
                        prior.error.clone().unwrap_or_default(),
                    ));
                }
                "not_sent" => {}
                _ => {
                    let reason = "an earlier attempt's call has no answer".to_string();
                    self.track().in_doubt = Some(reason.clone());
                    return Err(ExternalError::InDoubt(reason));
                }
            }
        }
        if self.info.lazy.is_some() {
            // The call is made under the workflow's lock, as on the locked
            // path: an operator's cancel waits for the step's checkpoint.
            // While a step body runs, only its own `db()` guard can hold the
            // slot, and `db()` opens the transaction before handing one out:
            // a held slot means it is open already (waiting for it would
            // wait for the caller itself).
            if let Ok(mut slot) = self.tx.try_lock()
                && slot.is_none()
                && let Err(e) = self.open_lazily(&mut slot).await
            {
                return Err(ExternalError::NotMade(format!(
                    "the step's transaction could not be opened: {e}"
                )));
            }
        }
        let info = &self.info;
        let intent: std::result::Result<Option<i32>, sqlx::Error> = sqlx::query_scalar(
            "INSERT INTO workflow_steps (workflow_id, step, position, status, idempotency_key,
                                         attempt, started_at, call_state, call_attempt,
                                         call_started_at)
             VALUES ($1, $2, $3, 'calling', $4, $5, $6, 'calling', $5,
                     coalesce($7::timestamptz, now()))
             ON CONFLICT (workflow_id, step) DO UPDATE
             SET status = 'calling', output = NULL, error = NULL, attempt = EXCLUDED.attempt,
                 started_at = EXCLUDED.started_at, call_state = 'calling',
                 call_attempt = EXCLUDED.call_attempt, call_started_at = EXCLUDED.call_started_at,
                 call_finished_at = NULL, call_output = NULL, call_error = NULL
             WHERE workflow_steps.status IN ('failed', 'calling')
             RETURNING 1",
        )
        .bind(info.workflow_id)
        .bind(&info.step)
        .bind(info.position)
        .bind(&info.idempotency_key)
        .bind(info.attempt)
        .bind(info.started_at)
        .bind(info.store.now())
        .fetch_optional(info.store.pool())
        .await;
        match intent {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(ExternalError::NotMade(
                    "the step is already journaled".to_string(),
                ));
            }
            Err(e) => {
                return Err(ExternalError::NotMade(format!(
                    "the call's intent could not be recorded: {e}"
                )));
            }
        }
        let answer = call(info.idempotency_key.clone()).await;
        let (state, output, error) = match &answer {
            Ok(v) => ("answered", Some(v), None),
            Err(CallError::Rejected(e)) => ("rejected", None, Some(e.as_str())),
            Err(CallError::NotSent(e)) => ("not_sent", None, Some(e.as_str())),
            Err(CallError::Unknown(e)) => ("unknown", None, Some(e.as_str())),
        };
        let saved = sqlx::query(
            "UPDATE workflow_steps
             SET call_state = $3, call_output = $4, call_error = $5,
                 call_finished_at = coalesce($6::timestamptz, now())
             WHERE workflow_id = $1 AND step = $2 AND status = 'calling'",
        )
        .bind(info.workflow_id)
        .bind(&info.step)
        .bind(state)
        .bind(output)
        .bind(error)
        .bind(info.store.now())
        .execute(info.store.pool())
        .await;
        let in_doubt = |reason: String| {
            self.track().in_doubt = Some(reason.clone());
            Err(ExternalError::InDoubt(reason))
        };
        match (answer, saved) {
            (Err(CallError::Unknown(e)), _) => in_doubt(e),
            (_, Err(e)) => in_doubt(format!("the call's answer could not be recorded: {e}")),
            (Ok(v), Ok(_)) => Ok(v),
            (Err(CallError::Rejected(e)), Ok(_)) => Err(ExternalError::Rejected(e)),
            (Err(CallError::NotSent(e)), Ok(_)) => Err(ExternalError::NotSent(e)),
        }
    }

    fn track(&self) -> std::sync::MutexGuard<'_, CallTrack> {
        self.info
            .track
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The lease-fenced transaction, for the step's domain writes: they
    /// commit together with the step's checkpoint, or not at all. Hold the
    /// guard only while writing and drop it before returning.
    pub async fn db(&self) -> Result<StepDb> {
        let mut guard = self.tx.clone().lock_owned().await;
        if guard.is_none() {
            self.open_lazily(&mut guard).await?;
        }
        OwnedMutexGuard::try_map(guard, |slot| slot.as_mut().map(FencedTx::conn))
            .map_err(|_| Error::Invalid("the step's transaction is closed".to_string()))
    }

    /// On the optimistic path (a step started without a transaction), opens
    /// the step's fenced transaction and locks its workflow row — unless the
    /// workflow moved on since the step started, which is an error: the
    /// step's run is then discarded and the job looked at again. From here
    /// on the step runs exactly as on the locked path.
    async fn open_lazily(&self, slot: &mut Option<FencedTx>) -> Result<()> {
        let Some(lazy) = &self.info.lazy else {
            return Ok(());
        };
        if lazy.tried.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(held) = &lazy.held {
            held.release().await;
        }
        let info = &self.info;
        match lock_unchanged(
            &info.store,
            &lazy.lease,
            info.workflow_id,
            (lazy.state, &info.step, lazy.wait_seq),
        )
        .await?
        {
            Some(tx) => {
                *slot = Some(tx);
                Ok(())
            }
            None => Err(Error::Invalid(format!(
                "workflow {} changed while its step {:?} ran",
                info.workflow_id, info.step
            ))),
        }
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
    /// The `n`-th ask of the reconcile hook of the step that went in doubt
    /// at the workflow's `wait_seq` `seq`.
    Reconcile { seq: i32, n: i32 },
    /// Run the completed step's compensation (`seq`: the workflow's
    /// `wait_seq` when compensating reached the step).
    Compensate { seq: i32 },
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
    #[serde(default)]
    n: Option<i32>,
}

impl StepArgs {
    fn wake(&self) -> Wake {
        match (self.wake.as_deref(), self.signal_id, self.wait_seq) {
            (Some("signal"), Some(signal_id), _) => Wake::Signal { signal_id },
            (Some("timeout"), _, Some(wait_seq)) => Wake::Timeout { wait_seq },
            (Some("retry"), _, Some(seq)) => Wake::Retry { seq },
            (Some("reconcile"), _, Some(seq)) => Wake::Reconcile {
                seq,
                n: self.n.unwrap_or(1),
            },
            (Some("compensate"), _, Some(seq)) => Wake::Compensate { seq },
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
        Wake::Reconcile { seq, n } => format!("q{seq}.{n}"),
        Wake::Compensate { seq } => format!("x{seq}"),
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
        Wake::Reconcile { seq, n } => json!({
            "workflow_id": workflow_id, "step": step, "wake": "reconcile", "wait_seq": seq, "n": n
        }),
        Wake::Compensate { seq } => json!({
            "workflow_id": workflow_id, "step": step, "wake": "compensate", "wait_seq": seq
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
/// Returns once the instance and its first job are committed; concurrent
/// calls share one statement and one commit (`start_batch.rs`).
pub async fn workflow_start(
    store: &Store,
    registry: &WorkflowRegistry,
    kind: &str,
    input: &Value,
    unique_key: Option<&str>,
) -> Result<WorkflowId> {
    let start = StartBinds::new(registry, kind)?;
    let item = crate::start_batch::Item {
        id: start.id,
        kind: start.def.kind,
        version: start.def.version,
        input: input.clone(),
        first_step: start.first,
        queue: start.def.queue.clone(),
        unique_key: unique_key.map(str::to_owned),
        job: start.job,
        notify: store.config().notify,
    };
    match store.start_batcher().submit(item).await {
        crate::start_batch::Submitted::Started(id) => Ok(id),
        crate::start_batch::Submitted::Failed(e) => Err(e),
        // The batch wrote nothing of it: `workflow_start_in` writes the
        // instance and its first job in ONE statement, atomic on its own.
        crate::start_batch::Submitted::Unbatched => {
            let mut conn = store.pool().acquire().await?;
            workflow_start_in(&mut conn, store, registry, kind, input, unique_key).await
        }
    }
}

/// The start statement: `$inbox` is an extra CTE (or nothing) that `$input`
/// and `$from` may use; the workflow row and its first step's job (due now,
/// with its NOTIFY unless `$17` is false) are inserted by the same parts in
/// both forms. The job part says what `Store::job_insert_in` says for a job
/// due now. `BATCH_SQL` in `start_batch.rs` says the same over arrays.
macro_rules! start_sql {
    ($inbox:literal, $input:literal, $from:literal, $select:literal) => {
        concat!(
            "WITH t AS (SELECT coalesce($8::timestamptz, now()) AS n)",
            $inbox,
            ",
         wf AS (
           INSERT INTO workflows (id, kind, version, state, input, current_step, queue,
                                  unique_key, created_at, updated_at)
           SELECT $1, $2, $3, 'running', ",
            $input,
            ", $5, $6, $7, t.n, t.n FROM ",
            $from,
            "
           ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
           RETURNING id
         ),
         job AS (
           INSERT INTO jobs (id, queue, kind, args, state, priority, max_attempts, timeout_ms,
                             run_at, unique_key, workflow_id, workflow_step, created_at)
           SELECT $9, $6, $10, $11, 'available'::job_state, $12, $13, $14, t.n, $15, wf.id,
                  $5, t.n
           FROM wf, t
           ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
           RETURNING queue
         ),
         ntf AS (
           SELECT count(pg_notify($16, queue)) AS n
           FROM (SELECT DISTINCT queue FROM job WHERE $17) q
         )
         SELECT ",
            $select
        )
    };
}

/// What a start binds as `$1`–`$17` ([`start_sql`]): the instance of `kind`
/// at its newest version with `input` as `$4`, and its first step's job.
struct StartBinds<'a> {
    id: WorkflowId,
    def: &'a Workflow,
    first: &'static str,
    job: NewJob,
}

impl<'a> StartBinds<'a> {
    fn new(registry: &'a WorkflowRegistry, kind: &str) -> Result<Self> {
        let def = registry
            .latest(kind)
            .ok_or_else(|| Error::Invalid(format!("no workflow of kind {kind:?} is registered")))?;
        let first = def
            .steps
            .first()
            .ok_or_else(|| Error::Invalid(format!("workflow {kind:?} has no steps")))?
            .name;
        let id = Uuid::now_v7();
        let job = step_job(
            id,
            &def.queue,
            first,
            Wake::Entry,
            None,
            Some(def.max_attempts),
        );
        job.validate()?;
        Ok(Self {
            id,
            def,
            first,
            job,
        })
    }

    fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
        store: &Store,
        input: &'q Value,
        unique_key: Option<&'q str>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(self.id)
            .bind(self.def.kind)
            .bind(self.def.version)
            .bind(input)
            .bind(self.first)
            .bind(&self.def.queue)
            .bind(unique_key)
            .bind(store.now())
            .bind(self.job.id)
            .bind(&self.job.kind)
            .bind(&self.job.args)
            .bind(self.job.priority)
            .bind(self.job.max_attempts)
            .bind(self.job.timeout_ms())
            .bind(&self.job.unique_key)
            .bind(crate::notify::JOBS_CHANNEL)
            .bind(store.config().notify)
    }
}

/// The instance holding workflow unique key `key`, after a start found it
/// taken.
async fn started_with_key(conn: &mut PgConnection, key: Option<&str>) -> Result<WorkflowId> {
    let key = key.unwrap_or_default();
    let existing: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM workflows WHERE unique_key = $1")
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
    existing.ok_or_else(|| {
        Error::Invalid(format!(
            "workflow unique key {key:?} is taken by an instance this transaction cannot see"
        ))
    })
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
    let start = StartBinds::new(registry, kind)?;
    // The instance and its first step's job in one statement (one round trip
    // instead of two on every start).
    const SQL: &str = start_sql!("", "$4", "t", "wf.id, (SELECT n FROM ntf) FROM wf");
    let inserted: Option<(Uuid, i64)> = start
        .bind(sqlx::query_as(SQL), store, input, unique_key)
        .fetch_optional(&mut *conn)
        .await?;
    match inserted {
        Some(_) => Ok(start.id),
        None => started_with_key(conn, unique_key).await,
    }
}

/// Records `entry` in the inbox and, when it is new, starts a workflow of
/// `kind` for it whose input is `input` (an object) with `"inbox_id"` set to
/// the new inbox row's id — in ONE statement, atomic on its own: run it on a
/// pooled connection, without a transaction around it, and it is one round
/// trip (the webhook intake's hot path). A duplicate entry starts nothing
/// and returns no workflow; a new entry whose workflow `unique_key` is taken
/// returns the existing instance, as [`workflow_start_in`] does.
pub async fn workflow_start_for_inbox_in(
    conn: &mut PgConnection,
    store: &Store,
    registry: &WorkflowRegistry,
    entry: &crate::inbox::InboxEntry<'_>,
    (kind, input, unique_key): (&str, &Value, Option<&str>),
) -> Result<(crate::inbox::InboxInserted, Option<WorkflowId>)> {
    use crate::inbox::InboxInserted;
    entry.check()?;
    if !input.is_object() {
        return Err(Error::Invalid(
            "the input of a workflow started for an inbox entry must be a JSON object".into(),
        ));
    }
    let start = StartBinds::new(registry, kind)?;
    const SQL: &str = start_sql!(
        ",
         ib AS (
           INSERT INTO inbox (source, dedupe_key, topic, \"partition\", \"offset\", business_id,
                              payload, headers, processed_at)
           SELECT $18, $19, $20, $21, $22, $23, $24, $25, CASE WHEN $26 THEN t.n END FROM t
           ON CONFLICT (source, dedupe_key) DO NOTHING
           RETURNING id
         )",
        "$4::jsonb || jsonb_build_object('inbox_id', ib.id)",
        "t, ib",
        "(SELECT id FROM ib), (SELECT id FROM wf), (SELECT n FROM ntf)"
    );
    let (inbox_id, workflow_id, _notified): (Option<i64>, Option<Uuid>, i64) = entry
        .bind(start.bind(sqlx::query_as(SQL), store, input, unique_key))
        .fetch_one(&mut *conn)
        .await?;
    match (inbox_id, workflow_id) {
        (None, _) => Ok((InboxInserted::Duplicate, None)),
        (Some(id), Some(wf)) => Ok((InboxInserted::Inserted(id), Some(wf))),
        (Some(id), None) => {
            // The event was already taken by the workflow an earlier entry
            // started (same unique key, e.g. a redelivery under another
            // source): this entry's effect is that workflow's, so it is
            // processed; left unmarked, nothing would ever mark it.
            let existing = started_with_key(conn, unique_key).await?;
            crate::inbox::inbox_mark_processed_in(conn, id).await?;
            Ok((InboxInserted::Inserted(id), Some(existing)))
        }
    }
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

/// Resumes a failed workflow (operator action, on the caller's connection):
/// a failed step runs again; a workflow whose compensation exhausted its
/// attempts resumes compensating at that step. Returns false unless the
/// workflow is `failed`.
pub async fn workflow_retry_in(
    conn: &mut PgConnection,
    store: &Store,
    id: WorkflowId,
) -> Result<bool> {
    // The current step's journal row tells which way the workflow failed: a
    // `completed` row means its compensation failed.
    let row = sqlx::query(
        "UPDATE workflows w
         SET state = CASE WHEN s.status = 'completed' THEN 'compensating' ELSE 'running' END,
             error = CASE WHEN s.status = 'completed' THEN w.error END,
             finished_at = NULL, wait_seq = w.wait_seq + 1,
             updated_at = coalesce($2::timestamptz, now())
         FROM (SELECT w0.id, (SELECT ws.status FROM workflow_steps ws
                              WHERE ws.workflow_id = w0.id AND ws.step = w0.current_step) AS status
               FROM workflows w0 WHERE w0.id = $1 FOR NO KEY UPDATE) s
         WHERE w.id = s.id AND w.state = 'failed' AND w.current_step IS NOT NULL
         RETURNING w.current_step, w.queue, w.wait_seq, w.state",
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
    let state: String = row.try_get(3)?;
    let wake = if state == "compensating" {
        Wake::Compensate { seq }
    } else {
        Wake::Retry { seq }
    };
    let job = step_job(id, &queue, &step, wake, None, None);
    store.job_insert_in(conn, &job).await?;
    Ok(true)
}

/// Settles an in-doubt step (admin action, on the caller's connection so the
/// audit row commits with it): [`Resolution::Succeeded`] completes the step
/// with the given output and enqueues its successor (or completes the
/// workflow); [`Resolution::Failed`] fails it, which compensates the
/// completed steps (or fails the workflow). Returns false when `step` of
/// `id` is not in doubt (already settled, or never was). Call it inside a
/// transaction: the workflow row is locked (`FOR NO KEY UPDATE`) until it
/// commits, which serializes it with a reconcile hook running right now.
/// A pending reconcile job finds the step settled and does nothing.
pub async fn workflow_resolve_in(
    conn: &mut PgConnection,
    store: &Store,
    registry: &WorkflowRegistry,
    id: WorkflowId,
    step: &str,
    resolution: Resolution,
) -> Result<bool> {
    let Some(wf) = lock_workflow(conn, id).await? else {
        return Ok(false);
    };
    if wf.state != WorkflowState::Waiting || wf.current_step.as_deref() != Some(step) {
        return Ok(false);
    }
    let status: Option<String> = sqlx::query_scalar(
        "SELECT status FROM workflow_steps WHERE workflow_id = $1 AND step = $2",
    )
    .bind(id)
    .bind(step)
    .fetch_optional(&mut *conn)
    .await?;
    if status.as_deref() != Some("in_doubt") {
        return Ok(false);
    }
    let def = registry.get(&wf.kind, wf.version).ok_or_else(|| {
        Error::Invalid(format!(
            "workflow {} v{} is not registered",
            wf.kind, wf.version
        ))
    })?;
    let idx = def.index_of(step).ok_or_else(|| {
        Error::Invalid(format!(
            "workflow {} v{} has no step {step:?}",
            wf.kind, wf.version
        ))
    })?;
    mark_resolved(conn, id, step, "admin").await?;
    match resolution {
        Resolution::Succeeded(output) => {
            advance_in(conn, store, &wf, def, idx, &output, None, None).await?;
        }
        Resolution::Failed(reason) => {
            fail_step_in(conn, store, &wf, def, idx, None, &reason).await?;
        }
    }
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
    /// `calling`, `completed`, `failed`, `in_doubt` or `compensated`.
    pub status: String,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub idempotency_key: String,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The external call: `calling` (intent only), `answered`, `rejected`,
    /// `not_sent` or `unknown`.
    pub call_state: Option<String>,
    pub call_output: Option<Value>,
    pub call_error: Option<String>,
    /// Reconcile hook runs in the current in-doubt episode.
    pub reconcile_attempts: i32,
    /// Who settled the in-doubt step: `reconcile` or `admin`.
    pub resolved_by: Option<String>,
    pub compensation_output: Option<Value>,
    /// The last error of a compensation that exhausted its attempts.
    pub compensation_error: Option<String>,
    pub compensated_at: Option<DateTime<Utc>>,
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

/// An instance's step journal, in the steps' definition order.
pub async fn workflow_steps_in(conn: &mut PgConnection, id: WorkflowId) -> Result<Vec<StepRow>> {
    Ok(sqlx::query_as::<_, StepRow>(
        "SELECT workflow_id, step, position, status, output, error, idempotency_key, attempt,
                started_at, finished_at, call_state, call_output, call_error,
                reconcile_attempts, resolved_by, compensation_output, compensation_error,
                compensated_at
         FROM workflow_steps WHERE workflow_id = $1
         ORDER BY position, step",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?)
}

// --------------------------------------------------------------- execution

/// The locked workflow row, as `run_step` needs it.
#[derive(Clone)]
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

impl Locked {
    /// The row as an inline move on to `step` leaves it (running, no wait).
    fn moved_on_to(&mut self, step: &str) {
        self.state = WorkflowState::Running;
        self.current_step = Some(step.to_string());
        self.wait_signal_name = None;
        self.wait_correlation_key = None;
        self.wait_until = None;
    }
}

/// A step's journal row, as `run_step` needs it.
struct Journaled {
    status: String,
    output: Option<Value>,
    call: Option<PriorCall>,
}

/// Runs the step a claimed `ledgerflow.workflow` job stands for, and
/// checkpoints its result in one lease-fenced transaction. This is what the
/// worker's handler for [`WORKFLOW_JOB_KIND`] calls. Whenever the step
/// checkpointed, the job's outcome is already committed with it (the lease
/// reports [`crate::Lease::is_finished`]); otherwise — a step error, a stale
/// lease, a database error — the returned `Retry` is for the runner to record.
/// The same job kind runs compensations and reconcile hooks.
pub async fn run_step(store: &Store, registry: &WorkflowRegistry, job: &ClaimedJob) -> Outcome {
    run_steps(store, registry, job, Inline::OFF).await.outcome
}

/// How far one delivery of a step job may carry its workflow inline
/// ([`run_steps`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inline {
    /// Steps run after the delivered one, at most.
    pub max_steps: u32,
    /// No step is moved on to once this long has passed since the delivery
    /// started, so one workflow does not hold a worker slot for long.
    pub budget: Duration,
}

impl Inline {
    /// One step per delivery: every successor is enqueued as its own job.
    pub const OFF: Inline = Inline {
        max_steps: 0,
        budget: Duration::ZERO,
    };
}

impl Default for Inline {
    /// Up to 8 more steps within 250 ms: enough to run short workflows in one
    /// delivery, short enough that a long chain yields its slot (and the
    /// next delivery is claimed in priority order like any other job).
    fn default() -> Self {
        Self {
            max_steps: 8,
            budget: Duration::from_millis(250),
        }
    }
}

/// What [`run_steps`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepsRun {
    /// The outcome for the runner, as [`run_step`] returns it.
    pub outcome: Outcome,
    /// The step the last run was for (`None` when the job's arguments were
    /// not a step's).
    pub last_step: Option<String>,
    /// How many steps ran (1 + those continued inline).
    pub steps: u32,
}

/// [`run_step`], continuing inline: when a step's checkpoint finds its
/// successor due now in the same queue, that checkpoint moves THIS job row on
/// to the successor (instead of inserting a job and completing this one) and
/// the successor runs at once, in this call, under the same lease token.
/// Every step still commits its own lease-fenced checkpoint before the next
/// one starts, so a crash between steps leaves the row `running` on the next
/// step; its lease expires, the reaper makes it available again and the
/// re-delivery reads the journal (a completed step never runs again).
///
/// A row is moved on only when the per-step attempt accounting stays exact:
/// on its first attempt (the successor starts at attempt 1 too, and the row
/// has no `job_attempts` rows to collide with), with the workflow's attempt
/// budget, and without a job timeout (the runner's timeout covers the whole
/// call, which could cut a later step short). Timers, signal waits,
/// compensations, in-doubt steps, other queues and a cancelled workflow end
/// the chain the ordinary way; so does `inline`'s bound. The outcome of an
/// inlined step that did not checkpoint (a retry, a failure) is recorded
/// here with that step's lease.
pub async fn run_steps(
    store: &Store,
    registry: &WorkflowRegistry,
    job: &ClaimedJob,
    inline: Inline,
) -> StepsRun {
    let deadline = std::time::Instant::now().checked_add(inline.budget);
    let mut current = std::borrow::Cow::Borrowed(job);
    let mut steps: u32 = 0;
    // What the optimistic path knows of the workflow after moving the row on
    // itself: the successor runs against it without reading it again.
    let mut carried: Option<Snapshot> = None;
    loop {
        let args: StepArgs = match serde_json::from_value(current.args.clone()) {
            Ok(a) => a,
            Err(e) => {
                let outcome = Outcome::fail(format!("bad workflow step arguments: {e}"));
                return StepsRun {
                    outcome: record_inlined(store, &current, steps, outcome).await,
                    last_step: None,
                    steps,
                };
            }
        };
        // Checked again at the checkpoint: the step's own run counts too.
        let may_move =
            (steps < inline.max_steps && current.timeout.is_none() && current.lease.attempt == 1)
                .then_some(deadline)
                .flatten();
        let mut moved = None;
        let mut carry = None;
        let run = Run {
            job: &current,
            args: &args,
            inline: may_move,
        };
        let outcome = match run_step_inner(
            store,
            registry,
            run,
            carried.take(),
            &mut moved,
            &mut carry,
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(job_id = %current.id, workflow_id = %args.workflow_id,
                    step = %args.step, error = %e, "workflow step not checkpointed");
                Outcome::retry(e)
            }
        };
        steps = steps.saturating_add(1);
        match moved {
            Some(next) => {
                current = std::borrow::Cow::Owned(next);
                carried = carry;
            }
            None => {
                return StepsRun {
                    outcome: record_inlined(store, &current, steps, outcome).await,
                    last_step: Some(args.step),
                    steps,
                };
            }
        }
    }
}

/// Records the outcome of a step that ran inline and did not commit one
/// itself, with that step's own lease (its start; the runner's copy has the
/// first step's). When that fails the runner records it with its copy,
/// which has the same token, attempt and budget.
async fn record_inlined(store: &Store, job: &ClaimedJob, steps: u32, outcome: Outcome) -> Outcome {
    if steps <= 1 || job.lease.is_finished() {
        return outcome;
    }
    match store.job_finish(&job.lease, &outcome).await {
        Ok(()) => job.lease.mark_finished(),
        Err(e) => tracing::warn!(job_id = %job.id, error = %e,
            "recording an inlined step's outcome failed; left to the runner"),
    }
    outcome
}

/// One delivery's step run: the job, its decoded arguments, and until when
/// (if at all) the successor may run inline.
#[derive(Clone, Copy)]
struct Run<'a> {
    job: &'a ClaimedJob,
    args: &'a StepArgs,
    inline: Option<std::time::Instant>,
}

/// Runs the step a job stands for. A successor that this delivery moved its
/// own row on to, right after checkpointing its predecessor under the lock,
/// runs the optimistic way ([`run_optimistic`]) against what that
/// checkpoint wrote; everything else — a delivery's first step, signals,
/// timeouts, retries, compensations, reconciles, re-deliveries — the locked
/// way ([`prepare_locked`], then the step, then [`after_step`]).
async fn run_step_inner(
    store: &Store,
    registry: &WorkflowRegistry,
    run: Run<'_>,
    carried: Option<Snapshot>,
    moved: &mut Option<ClaimedJob>,
    carry: &mut Option<Snapshot>,
) -> Result<Outcome> {
    let Run { job, args, .. } = run;
    if let Some(snap) = carried
        && args.wake() == Wake::Entry
        && snap.runs_optimistically(&args.step)
        && let Some(def) = registry.get(&snap.wf.kind, snap.wf.version).cloned()
        && let Some(idx) = def.index_of(&args.step)
    {
        return run_optimistic(store, registry, run, snap, &def, idx, None, moved, carry).await;
    }
    // A delivery's first step: one delivery of the workflow at a time in
    // this process, and under the workflow's lock — a locked batch's if one
    // holds it (`crate::held`), else a transaction of its own.
    let _turn = store.gates().enter(args.workflow_id).await;
    if args.wake() == Wake::Entry
        && let Some(held) = store
            .lock_batcher()
            .hold(
                job.lease.job_id,
                job.lease.token,
                args.workflow_id,
                &args.step,
            )
            .await
    {
        let handle = Arc::new(held.handle);
        match held_snapshot(&held.rows, &args.step) {
            Ok(snap) => {
                if let Some(def) = registry.get(&snap.wf.kind, snap.wf.version).cloned()
                    && let Some(idx) = def.index_of(&args.step)
                {
                    let held = Some(handle);
                    return run_optimistic(
                        store, registry, run, snap, &def, idx, held, moved, carry,
                    )
                    .await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "unreadable locked batch row"),
        }
        // Not a step this worker runs: the locked path says what becomes of
        // the job, once the batch let go of the row.
        handle.release().await;
    }
    let ready = match prepare_locked(store, registry, run, moved).await? {
        Prepared::Done(outcome) => return Ok(outcome),
        Prepared::Run(ready) => *ready,
    };
    let Ready {
        tx,
        wf,
        def,
        idx,
        journaled,
        outputs,
        timed_out,
        prior_call,
    } = ready;
    let (ctx, slot) = step_ctx(
        store,
        &wf,
        &def,
        idx,
        outputs.clone(),
        job,
        timed_out,
        prior_call,
        Role::Step,
        Some(tx),
        None,
    );
    let result = def.steps[idx].run.call(ctx.clone()).await;
    let tx = take_tx(&slot).await?;
    let flagged = ctx.track().in_doubt.take();
    let done = Done {
        result,
        flagged,
        journal: (journaled, outputs),
    };
    after_step(store, tx, &wf, &def, idx, run, done, moved, carry).await
}

/// What [`prepare_locked`] leaves to do.
enum Prepared {
    /// Nothing to run: the job's outcome (committed unless it is a retry).
    Done(Outcome),
    /// The step runs now, in `Ready::tx`.
    Run(Box<Ready>),
}

/// A step ready to run on the locked path: the fenced transaction holding
/// the workflow row, the definition and the journal.
struct Ready {
    tx: FencedTx,
    wf: Locked,
    def: Arc<Workflow>,
    idx: usize,
    /// Steps with a journal row, and the outputs of the completed ones.
    journaled: std::collections::HashSet<String>,
    outputs: HashMap<String, Value>,
    timed_out: bool,
    prior_call: Option<PriorCall>,
}

/// The locked path up to the step's run: opens the fenced transaction,
/// locks the workflow row, reads the journal and decides. Finished and
/// stray jobs, re-deliveries of journaled steps, compensations, reconciles,
/// signal waits (and their arrivals) end here; a step that is due comes
/// back ready to run.
async fn prepare_locked(
    store: &Store,
    registry: &WorkflowRegistry,
    run: Run<'_>,
    moved: &mut Option<ClaimedJob>,
) -> Result<Prepared> {
    let Run { job, args, inline } = run;
    let mut tx = FencedTx::begin_unfenced(store, &job.lease).await?;
    let Some((wf, (journaled, names, outputs))) =
        lock_step(&mut tx, args.workflow_id, &args.step).await?
    else {
        let outcome = Outcome::fail(format!("workflow {} not found", args.workflow_id));
        tx.finish(outcome.clone()).await?;
        return Ok(Prepared::Done(outcome));
    };
    let wake = args.wake();
    let compensating = wf.state == WorkflowState::Compensating;
    if wf.state.is_finished() || compensating != matches!(wake, Wake::Compensate { .. }) {
        // Finished, or a forward step job while compensating, or a
        // compensation job while not: nothing to do.
        tx.complete().await?;
        return Ok(Prepared::Done(Outcome::Complete));
    }
    let Some(def) = registry.get(&wf.kind, wf.version).cloned() else {
        tx.rollback().await?;
        return Ok(Prepared::Done(Outcome::retry(format!(
            "workflow {} v{} is not registered in this worker",
            wf.kind, wf.version
        ))));
    };
    let Some(idx) = def.index_of(&args.step) else {
        let outcome = Outcome::fail(format!(
            "workflow {} v{} has no step {:?}",
            wf.kind, wf.version, args.step
        ));
        tx.finish(outcome.clone()).await?;
        return Ok(Prepared::Done(outcome));
    };
    match wake {
        Wake::Compensate { seq } => {
            let outcome = run_compensation(store, tx, &wf, &def, idx, job, journaled, seq).await;
            return outcome.map(Prepared::Done);
        }
        Wake::Reconcile { seq, n } => {
            let outcome = run_reconcile(store, tx, &wf, &def, idx, job, journaled, (seq, n)).await;
            return outcome.map(Prepared::Done);
        }
        _ => {}
    }
    // A `failed` row on a workflow that is not finished means an operator
    // retried it: the step runs again. A `calling` row holds the intent of
    // the step's external call. `in_doubt` steps are never re-run blindly
    // (contract rule 3): they wait for a resolution.
    let status = journaled.as_ref().map(|j| j.status.as_str());
    if let Some(status) = status.filter(|s| !matches!(*s, "failed" | "calling")) {
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
        return Ok(Prepared::Done(Outcome::Complete));
    }
    if wf.current_step.as_deref() != Some(args.step.as_str()) {
        // Not this step's turn (a stray job): nothing to do.
        tx.complete().await?;
        return Ok(Prepared::Done(Outcome::Complete));
    }

    let mut timed_out = false;
    if wf.state == WorkflowState::Waiting
        && let (Some(name), Some(key)) = (&wf.wait_signal_name, &wf.wait_correlation_key)
    {
        // The step is waiting for a signal: if it is here, it is the output.
        if let Some(payload) =
            signal_consume_in(tx.conn(), store, wf.id, &args.step, name, key).await?
        {
            *moved = checkpoint_advance(tx, store, &wf, &def, idx, &payload, job, None, inline)
                .await?
                .map(|(job, _)| job);
            return Ok(Prepared::Done(Outcome::Complete));
        }
        match wake {
            Wake::Timeout { wait_seq } if wait_seq == wf.wait_seq => timed_out = true,
            _ => {
                // A spurious or stale wake-up: keep waiting.
                tx.complete().await?;
                return Ok(Prepared::Done(Outcome::Complete));
            }
        }
    }

    // Only a `calling` row's call belongs to this run of the step; a `failed`
    // row's (an operator retry) is sent again under the same key.
    let prior_call = journaled
        .filter(|j| j.status == "calling")
        .and_then(|j| j.call);
    if let Some(call) = &prior_call
        && matches!(call.state.as_str(), "calling" | "unknown")
    {
        // An earlier attempt recorded its call's intent but no definite
        // answer (it died during the call, or the answer was unknown):
        // never send again; ask the reconcile hook or an admin.
        let reason = call
            .error
            .clone()
            .unwrap_or_else(|| "the call's intent is recorded without an answer".to_string());
        checkpoint_in_doubt(&mut tx, store, &wf, &def, idx, &job.lease, &reason).await?;
        tx.complete().await?;
        return Ok(Prepared::Done(Outcome::Complete));
    }

    Ok(Prepared::Run(Box::new(Ready {
        tx,
        wf,
        def,
        idx,
        journaled: names,
        outputs,
        timed_out,
        prior_call,
    })))
}

/// A successor's run without a transaction, against the snapshot its
/// predecessor's checkpoint left ([`run_steps`] carries it). When the step
/// needed nothing but its checkpoint (no `db()`, no external call) and ends
/// in a successor that may run inline too, or in the workflow's end, the
/// checkpoint goes to the group committer ([`crate::checkpoint`]), which
/// fences and re-checks it inside its batch statement. Otherwise — the step
/// opened its transaction (and holds the lock since), it ends another way,
/// or the batch did not apply it — the locked path finishes: the job is
/// looked at under the lock as on any delivery ([`prepare_locked`]) and the
/// step's result checkpointed if the step is still due ([`after_step`]).
///
/// Safe because a step's run has no effect until it commits: the step's
/// database writes and its external call happen only under the lock
/// ([`StepCtx::db`], [`StepCtx::external_call`] take it first, checking that
/// the workflow did not move), and a checkpoint against a workflow that
/// moved (an operator's cancel) is discarded. What the lock-free run gives
/// up: an operator's cancel does not wait for such a step, whose result is
/// then dropped; and in the rare case that another job also stands for the
/// successor (a re-delivery of an earlier step enqueued it — the lock-free
/// move keeps the row's unique key, see `checkpoint::BATCH_SQL`, so nothing
/// stops that), both may run the step's body: one checkpoint wins, the
/// other finds the step journaled.
#[allow(clippy::too_many_arguments)]
async fn run_optimistic(
    store: &Store,
    registry: &WorkflowRegistry,
    run: Run<'_>,
    snap: Snapshot,
    def: &Workflow,
    idx: usize,
    held: Option<Arc<HeldHandle>>,
    moved: &mut Option<ClaimedJob>,
    carry: &mut Option<Snapshot>,
) -> Result<Outcome> {
    let Run { job, inline, .. } = run;
    let Snapshot {
        mut wf,
        mut journaled,
        mut outputs,
    } = snap;
    let lease = &job.lease;
    let lazy = LazyTx {
        lease: lease.clone(),
        state: wf.state,
        wait_seq: wf.wait_seq,
        tried: std::sync::atomic::AtomicBool::new(false),
        held: held.clone(),
    };
    let (ctx, slot) = step_ctx(
        store,
        &wf,
        def,
        idx,
        outputs.clone(),
        job,
        false,
        None,
        Role::Step,
        None,
        Some(lazy),
    );
    let result = def.steps[idx].run.call(ctx.clone()).await;
    let tx = slot.lock().await.take();
    let flagged = ctx.track().in_doubt.take();
    let step = def.steps[idx].name;
    if let Some(tx) = tx {
        let done = Done {
            result,
            flagged,
            journal: (journaled, outputs),
        };
        return after_step(store, tx, &wf, def, idx, run, done, moved, carry).await;
    }
    let batched = match (&result, &flagged) {
        (Ok(StepOutcome::Finish(output)), None) => Some((output, None)),
        (Ok(StepOutcome::Continue(output)), None) => match def.steps.get(idx + 1) {
            None => Some((output, None)),
            Some(next)
                if wf.queue == job.queue
                    && lease.max_attempts == def.max_attempts
                    && inline.is_some_and(|d| std::time::Instant::now() < d) =>
            {
                Some((output, Some(next.name)))
            }
            Some(_) => None,
        },
        _ => None,
    };
    if let Some((output, next)) = batched {
        let next_job = next.map(|name| {
            step_job(
                wf.id,
                &wf.queue,
                name,
                Wake::Entry,
                None,
                Some(def.max_attempts),
            )
        });
        if let Some(j) = &next_job {
            j.validate()?;
        }
        let item = checkpoint::Item {
            workflow_id: wf.id,
            step: step.to_string(),
            position: i32::try_from(idx).unwrap_or(i32::MAX),
            idempotency_key: idempotency_key(wf.id, step),
            output: output.clone(),
            attempt: lease.attempt,
            started_at: lease.attempted_at,
            job_id: lease.job_id,
            token: lease.token,
            state: wf.state.as_str(),
            wait_seq: wf.wait_seq,
            next: next
                .zip(next_job.as_ref())
                .map(|(name, j)| checkpoint::Next {
                    step: name.to_string(),
                    args: j.args.clone(),
                    max_attempts: j.max_attempts,
                }),
        };
        // A held step's checkpoint goes out with its batch (unless the batch
        // went on without it); a transaction waiting for the batch's locks
        // (an operator's cancel) then goes before the successor, which takes
        // the locked path behind it.
        let (applied, waited) = match &held {
            Some(h) => match h.checkpoint(item).await {
                Ok(answer) => answer,
                Err(item) => (store.checkpointer().submit(*item).await, false),
            },
            None => (store.checkpointer().submit(item).await, false),
        };
        match (applied, next.zip(next_job)) {
            (checkpoint::Applied::Finished, None) => {
                lease.mark_finished();
                return Ok(Outcome::Complete);
            }
            (checkpoint::Applied::Moved(attempted_at), Some((name, next_job))) => {
                let mut successor = job.clone();
                successor.args = next_job.args;
                successor.workflow_step = Some(name.to_string());
                successor.lease = lease.for_next_step(attempted_at, next_job.max_attempts);
                *moved = Some(successor);
                journaled.insert(step.to_string());
                outputs.insert(step.to_string(), output.clone());
                wf.moved_on_to(name);
                *carry = (!waited).then_some(Snapshot {
                    wf,
                    journaled,
                    outputs,
                });
                return Ok(Outcome::Complete);
            }
            // Not applied: nothing was written; the locked path re-checks.
            _ => {}
        }
    }
    if let Some(held) = &held {
        held.release().await;
    }
    let ready = match prepare_locked(store, registry, run, moved).await? {
        Prepared::Done(outcome) => return Ok(outcome),
        Prepared::Run(ready) => *ready,
    };
    if ready.def.steps[ready.idx].name != step || ready.prior_call.is_some() || ready.timed_out {
        // Due again, but not as this run found it: run it afresh later.
        ready.tx.rollback().await?;
        return Ok(Outcome::retry(format!(
            "workflow {} moved while its step {step:?} ran; it runs again",
            wf.id
        )));
    }
    let done = Done {
        result,
        flagged,
        journal: (ready.journaled, ready.outputs),
    };
    after_step(
        store, ready.tx, &ready.wf, def, idx, run, done, moved, carry,
    )
    .await
}

/// A step's run as [`after_step`] gets it: what the step returned, the
/// in-doubt reason its external call left (if any), and the journal it ran
/// against (step names and completed outputs), from which the successor's
/// snapshot is made when the row moves on inline.
struct Done {
    result: StepResult,
    flagged: Option<String>,
    journal: (std::collections::HashSet<String>, HashMap<String, Value>),
}

/// What follows a step's run on the locked path: its checkpoint (or its
/// failure, its doubt, its signal wait) in the fenced transaction `tx`,
/// which holds the workflow row `wf` locked.
#[allow(clippy::too_many_arguments)]
async fn after_step(
    store: &Store,
    tx: FencedTx,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    run: Run<'_>,
    done: Done,
    moved: &mut Option<ClaimedJob>,
    carry: &mut Option<Snapshot>,
) -> Result<Outcome> {
    let Run { job, args, inline } = run;
    let Done {
        result,
        flagged,
        journal: (mut journaled, mut outputs),
    } = done;
    let in_doubt = match (&result, flagged) {
        (Ok(StepOutcome::InDoubt(reason)), _) => Some(reason.clone()),
        (_, Some(reason)) => Some(reason),
        _ => None,
    };
    if let Some(reason) = in_doubt {
        // The step's own writes are not applied; the step waits in doubt.
        tx.rollback().await?;
        let mut tx = FencedTx::begin(store, &job.lease).await?;
        let Some(wf) = lock_workflow(tx.conn(), wf.id).await? else {
            tx.rollback().await?;
            return Ok(Outcome::retry(reason));
        };
        checkpoint_in_doubt(&mut tx, store, &wf, def, idx, &job.lease, &reason).await?;
        tx.complete().await?;
        return Ok(Outcome::Complete);
    }

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
            fail_step_in(tx.conn(), store, &wf, def, idx, Some(&job.lease), &error).await?;
            let outcome = Outcome::fail(&error);
            tx.finish(outcome.clone()).await?;
            Ok(outcome)
        }
        Ok(StepOutcome::Continue(output)) => {
            let advanced =
                checkpoint_advance(tx, store, wf, def, idx, &output, job, None, inline).await?;
            let contended = advanced.as_ref().is_some_and(|(_, c)| *c);
            *moved = advanced.map(|(job, _)| job);
            if let Some(next) = moved.as_ref().and_then(|m| m.workflow_step.as_deref())
                && !contended
            {
                // The row moved on inline: the successor runs against what
                // this checkpoint wrote, without the lock. Not when another
                // transaction was waiting for this one's locks (an
                // operator's cancel waiting for this step's checkpoint, a
                // duplicate delivery): the successor then queues for the
                // workflow's lock behind it on the locked path.
                let step = def.steps[idx].name.to_string();
                journaled.insert(step.clone());
                outputs.insert(step, output);
                let mut wf = wf.clone();
                wf.moved_on_to(next);
                *carry = Some(Snapshot {
                    wf,
                    journaled,
                    outputs,
                });
            }
            Ok(Outcome::Complete)
        }
        Ok(StepOutcome::Finish(output)) => {
            checkpoint_step(tx, store, wf, def, idx, &output, job, None, None).await?;
            Ok(Outcome::Complete)
        }
        Ok(StepOutcome::SleepUntil(at)) => {
            let output = json!({ "sleep_until": at });
            checkpoint_advance(tx, store, wf, def, idx, &output, job, Some(at), None).await?;
            Ok(Outcome::Complete)
        }
        Ok(StepOutcome::Fail(error)) => {
            let mut tx = tx;
            fail_step_in(tx.conn(), store, wf, def, idx, Some(&job.lease), &error).await?;
            tx.complete().await?;
            Ok(Outcome::Complete)
        }
        Ok(StepOutcome::InDoubt(reason)) => {
            // Handled above; kept for exhaustiveness.
            tx.rollback().await?;
            Ok(Outcome::retry(reason))
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
                *moved = checkpoint_advance(tx, store, wf, def, idx, &payload, job, None, inline)
                    .await?
                    .map(|(job, _)| job);
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

/// Builds the context a step, compensation or reconcile hook runs with,
/// around the fenced transaction (returned as the slot to take it back from).
#[allow(clippy::too_many_arguments)]
fn step_ctx(
    store: &Store,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    outputs: HashMap<String, Value>,
    job: &ClaimedJob,
    timed_out: bool,
    prior_call: Option<PriorCall>,
    role: Role,
    tx: Option<FencedTx>,
    lazy: Option<LazyTx>,
) -> (StepCtx, Arc<Mutex<Option<FencedTx>>>) {
    let step = def.steps[idx].name;
    let slot = Arc::new(Mutex::new(tx));
    let ctx = StepCtx {
        info: Arc::new(StepInfo {
            workflow_id: wf.id,
            kind: wf.kind.clone(),
            version: wf.version,
            step: step.to_string(),
            position: i32::try_from(idx).unwrap_or(i32::MAX),
            input: wf.input.clone(),
            outputs,
            idempotency_key: match role {
                Role::Compensation => format!("{}:compensate", idempotency_key(wf.id, step)),
                Role::Step | Role::Reconcile => idempotency_key(wf.id, step),
            },
            attempt: job.lease.attempt,
            started_at: job.lease.attempted_at,
            timed_out,
            store: store.clone(),
            prior_call,
            role,
            track: std::sync::Mutex::new(CallTrack::default()),
            lazy,
        }),
        tx: slot.clone(),
    };
    (ctx, slot)
}

async fn take_tx(slot: &Arc<Mutex<Option<FencedTx>>>) -> Result<FencedTx> {
    slot.lock()
        .await
        .take()
        .ok_or_else(|| Error::Invalid("the step's transaction was taken".to_string()))
}

/// Runs the compensation of completed step `idx` (the workflow is
/// `compensating` and at this step), then moves on to the previous completed
/// step with a compensation, or ends the workflow `compensated`.
#[allow(clippy::too_many_arguments)]
async fn run_compensation(
    store: &Store,
    tx: FencedTx,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    job: &ClaimedJob,
    journaled: Option<Journaled>,
    seq: i32,
) -> Result<Outcome> {
    let mut tx = tx;
    let step = def.steps[idx].name;
    let completed = journaled.filter(|j| j.status == "completed");
    let Some(compensate) = def.steps[idx].compensate.clone().filter(|_| {
        completed.is_some() && wf.current_step.as_deref() == Some(step) && wf.wait_seq == seq
    }) else {
        // Stale (already compensated, or not this step's turn).
        tx.complete().await?;
        return Ok(Outcome::Complete);
    };
    let output = completed.and_then(|j| j.output).unwrap_or(Value::Null);
    let outputs = load_outputs(tx.conn(), wf.id).await?;
    let (ctx, slot) = step_ctx(
        store,
        wf,
        def,
        idx,
        outputs,
        job,
        false,
        None,
        Role::Compensation,
        Some(tx),
        None,
    );
    let result = compensate.call(ctx, output).await;
    let mut tx = take_tx(&slot).await?;
    match result {
        Ok(comp_output) => {
            sqlx::query(
                "UPDATE workflow_steps
                 SET status = 'compensated', compensation_output = $3, compensation_error = NULL,
                     compensation_attempt = $4, compensated_at = coalesce($5::timestamptz, now())
                 WHERE workflow_id = $1 AND step = $2",
            )
            .bind(wf.id)
            .bind(step)
            .bind(&comp_output)
            .bind(job.lease.attempt)
            .bind(store.now())
            .execute(tx.conn())
            .await?;
            compensate_next_in(tx.conn(), store, wf, def, idx, None).await?;
            tx.complete().await?;
            Ok(Outcome::Complete)
        }
        Err(error) => {
            tx.rollback().await?;
            if !job.lease.is_last_attempt() {
                return Ok(Outcome::retry(error));
            }
            // Exhausted: the workflow fails and needs an operator.
            let mut tx = FencedTx::begin(store, &job.lease).await?;
            sqlx::query(
                "UPDATE workflow_steps SET compensation_error = $3, compensation_attempt = $4
                 WHERE workflow_id = $1 AND step = $2",
            )
            .bind(wf.id)
            .bind(step)
            .bind(&error)
            .bind(job.lease.attempt)
            .execute(tx.conn())
            .await?;
            sqlx::query(
                "UPDATE workflows
                 SET state = 'failed', error = $2, updated_at = t.n, finished_at = t.n
                 FROM (SELECT coalesce($3::timestamptz, now()) AS n) t
                 WHERE id = $1 AND state = 'compensating'",
            )
            .bind(wf.id)
            .bind(format!("compensation of step {step:?} failed: {error}"))
            .bind(store.now())
            .execute(tx.conn())
            .await?;
            let outcome = Outcome::fail(&error);
            tx.finish(outcome.clone()).await?;
            Ok(outcome)
        }
    }
}

/// Asks the reconcile hook of in-doubt step `idx` what became of its call.
#[allow(clippy::too_many_arguments)]
async fn run_reconcile(
    store: &Store,
    tx: FencedTx,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    job: &ClaimedJob,
    journaled: Option<Journaled>,
    (seq, n): (i32, i32),
) -> Result<Outcome> {
    let mut tx = tx;
    let step = def.steps[idx].name;
    let in_doubt = journaled.as_ref().is_some_and(|j| j.status == "in_doubt");
    let Some(reconcile) = def.steps[idx].reconcile.clone().filter(|_| {
        in_doubt
            && wf.state == WorkflowState::Waiting
            && wf.current_step.as_deref() == Some(step)
            && wf.wait_seq == seq
    }) else {
        // Settled meanwhile (by an earlier hook run or an admin): nothing to do.
        tx.complete().await?;
        return Ok(Outcome::Complete);
    };
    let outputs = load_outputs(tx.conn(), wf.id).await?;
    let prior_call = journaled.and_then(|j| j.call);
    let (ctx, slot) = step_ctx(
        store,
        wf,
        def,
        idx,
        outputs,
        job,
        false,
        prior_call,
        Role::Reconcile,
        Some(tx),
        None,
    );
    let result = reconcile.call(ctx, idempotency_key(wf.id, step)).await;
    let mut tx = take_tx(&slot).await?;
    sqlx::query(
        "UPDATE workflow_steps SET reconcile_attempts = $3 WHERE workflow_id = $1 AND step = $2",
    )
    .bind(wf.id)
    .bind(step)
    .bind(n)
    .execute(tx.conn())
    .await?;
    match result {
        Err(error) => {
            tx.rollback().await?;
            Ok(Outcome::retry(error))
        }
        Ok(Reconciled::Succeeded(output)) => {
            mark_resolved(tx.conn(), wf.id, step, "reconcile").await?;
            advance_in(tx.conn(), store, wf, def, idx, &output, None, None).await?;
            tx.complete().await?;
            Ok(Outcome::Complete)
        }
        Ok(Reconciled::Failed(error)) => {
            mark_resolved(tx.conn(), wf.id, step, "reconcile").await?;
            fail_step_in(tx.conn(), store, wf, def, idx, None, &error).await?;
            tx.complete().await?;
            Ok(Outcome::Complete)
        }
        Ok(Reconciled::NotReceived(reason)) => {
            mark_resolved(tx.conn(), wf.id, step, "reconcile").await?;
            resend_in(tx.conn(), store, wf, def, idx, &reason).await?;
            tx.complete().await?;
            Ok(Outcome::Complete)
        }
        Ok(Reconciled::Unknown) => {
            if n < def.reconcile_attempts {
                let now = db_now(tx.conn(), store).await?;
                let delay = chrono::Duration::from_std(store.config().retry.backoff(n))
                    .unwrap_or(chrono::Duration::MAX);
                let at = now
                    .checked_add_signed(delay)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                let next = step_job(
                    wf.id,
                    &wf.queue,
                    step,
                    Wake::Reconcile { seq, n: n + 1 },
                    Some(at),
                    Some(def.max_attempts),
                );
                store.job_insert_in(tx.conn(), &next).await?;
            }
            // Else: it stays in doubt, waiting for an admin.
            tx.complete().await?;
            Ok(Outcome::Complete)
        }
    }
}

/// The columns [`locked_from_row`] reads, first in a row, of table `$t`.
macro_rules! locked_columns {
    ($t:literal) => {
        concat!(
            $t,
            ".id, ",
            $t,
            ".kind, ",
            $t,
            ".version, ",
            $t,
            ".state, ",
            $t,
            ".input, ",
            $t,
            ".current_step, ",
            $t,
            ".wait_signal_name, ",
            $t,
            ".wait_correlation_key, ",
            $t,
            ".wait_seq, ",
            $t,
            ".wait_until, ",
            $t,
            ".queue"
        )
    };
}
pub(crate) use locked_columns;

async fn lock_workflow(conn: &mut PgConnection, id: WorkflowId) -> Result<Option<Locked>> {
    // NO KEY UPDATE: serializes deliveries and operators like FOR UPDATE,
    // but lets `external_call`'s own transaction insert the step's journal
    // row (its foreign-key check takes KEY SHARE on this row).
    let row = sqlx::query(concat!(
        "SELECT ",
        locked_columns!("workflows"),
        " FROM workflows WHERE id = $1 FOR NO KEY UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(locked_from_row).transpose()
}

/// A workflow row as [`locked_columns`] selected it.
fn locked_from_row(r: &sqlx::postgres::PgRow) -> Result<Locked> {
    let state: String = r.try_get(3)?;
    Ok(Locked {
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
    })
}

/// The workflow row and the names and outputs of its journaled steps as a
/// checkpoint that moved its job row on inline left them: what the
/// successor runs against without a lock ([`run_optimistic`]).
struct Snapshot {
    wf: Locked,
    /// Steps with a journal row (any status).
    journaled: std::collections::HashSet<String>,
    /// Outputs of the completed (and compensated) steps.
    outputs: HashMap<String, Value>,
}

impl Snapshot {
    /// True when `step` may run optimistically: it is the workflow's current
    /// step, never journaled (no earlier attempt left an intent, a failure or
    /// a doubt behind), and the workflow runs or sleeps on a timer. Anything
    /// else takes the locked path.
    fn runs_optimistically(&self, step: &str) -> bool {
        let runnable = match self.wf.state {
            WorkflowState::Running => true,
            WorkflowState::Waiting => self.wf.wait_signal_name.is_none(),
            _ => false,
        };
        runnable && self.wf.current_step.as_deref() == Some(step) && !self.journaled.contains(step)
    }
}

/// Opens the step's fenced transaction (failing with [`Error::StaleLease`]
/// when the lease is lost) and locks the workflow row, if the workflow is
/// still in `state` on `step` at `wait_seq` with no journal row for the step
/// — where the optimistic path found it. `None` (rolled back) when it moved.
async fn lock_unchanged(
    store: &Store,
    lease: &crate::Lease,
    id: WorkflowId,
    (state, step, wait_seq): (WorkflowState, &str, i32),
) -> Result<Option<FencedTx>> {
    let mut tx = FencedTx::begin(store, lease).await?;
    let same: Option<bool> = sqlx::query_scalar(
        "SELECT coalesce(w.state = $2 AND w.current_step = $3 AND w.wait_seq = $4
                         AND NOT EXISTS (SELECT 1 FROM workflow_steps s
                                         WHERE s.workflow_id = w.id AND s.step = $3), false)
         FROM workflows w WHERE w.id = $1 FOR NO KEY UPDATE OF w",
    )
    .bind(id)
    .bind(state.as_str())
    .bind(step)
    .bind(wait_seq)
    .fetch_optional(tx.conn())
    .await?;
    if same == Some(true) {
        Ok(Some(tx))
    } else {
        tx.rollback().await?;
        Ok(None)
    }
}

/// What one journal read gives the locked path: the step's own row, the
/// names of every journaled step, and the outputs of the completed (and
/// compensated) ones.
type JournalRead = (
    Option<Journaled>,
    std::collections::HashSet<String>,
    HashMap<String, Value>,
);

/// Locks the job row by id and lease token and the workflow row, and reads
/// the workflow's journal, in ONE statement (one row per journal row): the
/// locked path's first round trip, where it used to take three. `Ok(None)`
/// when nothing matched: the lease is stale ([`Error::StaleLease`] is
/// returned instead) or the workflow does not exist.
async fn lock_step(
    tx: &mut FencedTx,
    id: WorkflowId,
    step: &str,
) -> Result<Option<(Locked, JournalRead)>> {
    let lease = tx.lease().clone();
    let rows = sqlx::query(concat!(
        "SELECT ",
        locked_columns!("w"),
        journal_columns!(),
        "
         FROM jobs j
         JOIN workflows w ON w.id = $3
         LEFT JOIN workflow_steps s ON s.workflow_id = w.id
         WHERE j.id = $1 AND j.lease_token = $2 AND j.state = 'running'
         FOR UPDATE OF j FOR NO KEY UPDATE OF w"
    ))
    .bind(lease.job_id)
    .bind(lease.token)
    .bind(id)
    .fetch_all(tx.conn())
    .await?;
    let Some(first) = rows.first() else {
        // Told apart only now, off the hot path: a lost lease, or no
        // workflow row.
        tx.check_fence().await?;
        return Ok(None);
    };
    let wf = locked_from_row(first)?;
    let journal = journal_from_rows(&rows, step)?;
    Ok(Some((wf, journal)))
}

/// The columns [`journal_from_rows`] reads, after [`locked_columns`]: one
/// journal row of the workflow per result row (NULLs when it has none).
macro_rules! journal_columns {
    () => {
        ", s.step, s.status, s.output, s.call_state, s.call_output, s.call_error"
    };
}
pub(crate) use journal_columns;

/// Reads the journal from rows of [`locked_columns`] then [`journal_columns`]
/// ([`lock_step`], `held::LOCK_SQL`): `step`'s own row, the names of every
/// journaled step, and the outputs of the completed (and compensated) ones.
fn journal_from_rows(rows: &[sqlx::postgres::PgRow], step: &str) -> Result<JournalRead> {
    let mut journaled = None;
    let mut names = std::collections::HashSet::with_capacity(rows.len());
    let mut outputs = HashMap::with_capacity(rows.len());
    for r in rows {
        let Some(name) = r.try_get::<Option<String>, _>(11)? else {
            continue;
        };
        names.insert(name.clone());
        let status: String = r.try_get(12)?;
        let output: Option<Value> = r.try_get(13)?;
        if matches!(status.as_str(), "completed" | "compensated") {
            outputs.insert(name.clone(), output.clone().unwrap_or(Value::Null));
        }
        if name == step {
            let call_state: Option<String> = r.try_get(14)?;
            let call = match call_state {
                Some(state) => Some(PriorCall {
                    state,
                    output: r.try_get(15)?,
                    error: r.try_get(16)?,
                }),
                None => None,
            };
            journaled = Some(Journaled {
                status,
                output,
                call,
            });
        }
    }
    Ok((journaled, names, outputs))
}

/// The snapshot a locked batch's rows give a held delivery of `step`
/// (`held::LOCK_SQL` holds only deliveries whose step is not journaled).
fn held_snapshot(rows: &[sqlx::postgres::PgRow], step: &str) -> Result<Snapshot> {
    let first = rows
        .first()
        .ok_or_else(|| Error::Invalid("a locked batch held a delivery without rows".into()))?;
    let (_, journaled, outputs) = journal_from_rows(rows, step)?;
    Ok(Snapshot {
        wf: locked_from_row(first)?,
        journaled,
        outputs,
    })
}

/// The outputs of the completed (and compensated) steps, by name.
async fn load_outputs(conn: &mut PgConnection, id: WorkflowId) -> Result<HashMap<String, Value>> {
    let rows = sqlx::query(
        "SELECT step, output FROM workflow_steps
         WHERE workflow_id = $1 AND status IN ('completed', 'compensated')",
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
/// With a lease, the row records that attempt; without (a reconcile hook's
/// or an admin's resolution) it keeps the step's own attempt and start.
#[allow(clippy::too_many_arguments)]
async fn journal(
    conn: &mut PgConnection,
    store: &Store,
    wf: WorkflowId,
    (position, step): (usize, &str),
    status: &str,
    output: Option<&Value>,
    error: Option<&str>,
    lease: Option<&crate::Lease>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO workflow_steps (workflow_id, step, position, status, output, error,
                                     idempotency_key, attempt, started_at, finished_at)
         VALUES ($1, $2, $10, $3, $4, $5, $6, coalesce($7::integer, 1),
                 coalesce($8::timestamptz, $9::timestamptz, now()),
                 coalesce($9::timestamptz, now()))
         ON CONFLICT (workflow_id, step) DO UPDATE
         SET status = EXCLUDED.status, output = EXCLUDED.output, error = EXCLUDED.error,
             attempt = coalesce($7::integer, workflow_steps.attempt),
             started_at = CASE WHEN $7::integer IS NULL THEN workflow_steps.started_at
                               ELSE EXCLUDED.started_at END,
             finished_at = EXCLUDED.finished_at
         WHERE workflow_steps.status <> 'completed'",
    )
    .bind(wf)
    .bind(step)
    .bind(status)
    .bind(output)
    .bind(error)
    .bind(idempotency_key(wf, step))
    .bind(lease.map(|l| l.attempt))
    .bind(lease.map(|l| l.attempted_at))
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
    tx: FencedTx,
    store: &Store,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    output: &Value,
    job: &ClaimedJob,
    run_at: Option<DateTime<Utc>>,
    inline: Option<std::time::Instant>,
) -> Result<Option<(ClaimedJob, bool)>> {
    let next = def.steps.get(idx + 1).map(|n| (n.name, run_at));
    checkpoint_step(tx, store, wf, def, idx, output, job, next, inline).await
}

/// The start of every one-step checkpoint statement: "now" as `t` (`$4`)
/// and the step's journal row as completed — workflow `$1`, step `$2` at
/// position `$3` with output `$5`, key `$6`, attempt `$7` started at `$8`.
macro_rules! step_journal_sql {
    () => {
        concat!(
            "WITH t AS (SELECT coalesce($4::timestamptz, now()) AS n),
             journal AS (
               INSERT INTO workflow_steps (workflow_id, step, position, status, output,
                                           idempotency_key, attempt, started_at, finished_at)
               SELECT $1, $2, $3, 'completed', $5, $6, $7, $8, t.n FROM t",
            crate::checkpoint::journal_completed_on_conflict!(),
            "
             ),"
        )
    };
}

/// Binds what every statement starting with [`step_journal_sql`] takes:
/// `$1`–`$8` for step `step` (at `idx`) of workflow `id` completed with
/// `output`, then the job (`$9`) and lease token (`$10`) that fence it.
fn bind_step_journal<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    store: &Store,
    (id, step, idx): (WorkflowId, &'q str, usize),
    output: &'q Value,
    lease: &crate::Lease,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    query
        .bind(id)
        .bind(step)
        .bind(i32::try_from(idx).unwrap_or(i32::MAX))
        .bind(store.now())
        .bind(output)
        .bind(idempotency_key(id, step))
        .bind(lease.attempt)
        .bind(lease.attempted_at)
        .bind(lease.job_id)
        .bind(lease.token)
}

/// The checkpoint statement: `$workflow` updates the workflow row, `$next`
/// enqueues the next step's job (and its NOTIFY) or is empty, `$select`
/// selects the NOTIFY count (or 0). The journal upsert, the job-insert and
/// the job-completion parts say what [`journal`], [`Store::job_insert_in`]
/// and [`Store::job_finish_in`] (for `Outcome::Complete`) say; keep them in
/// step.
macro_rules! checkpoint_sql {
    ($workflow:literal, $next:literal, $select:literal) => {
        concat!(
            step_journal_sql!(),
            "
             done AS (
               UPDATE jobs j
               SET state = 'completed', finished_at = t.n, completed_by = j.lease_owner,
                   lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
               FROM t
               WHERE j.id = $9 AND j.lease_token = $10 AND j.state = 'running'
               RETURNING j.id
             ),
             wf AS (",
            $workflow,
            ")",
            $next,
            " SELECT (SELECT count(*) FROM done), ",
            $select
        )
    };
}

/// [`checkpoint_sql`] for a step with a successor (`$11` its name, `$12`
/// whether it waits for `$13`, a timer).
const CHECKPOINT_ADVANCE_SQL: &str = checkpoint_sql!(
    "UPDATE workflows
     SET state = CASE WHEN $12 THEN 'waiting' ELSE 'running' END,
         wait_reason = CASE WHEN $12 THEN 'timer' END,
         wait_signal_name = NULL, wait_correlation_key = NULL, wait_until = $13::timestamptz,
         current_step = $11, updated_at = t.n
     FROM t WHERE id = $1",
    ", next AS (
       INSERT INTO jobs (id, queue, kind, args, state, priority, max_attempts, timeout_ms,
                         run_at, unique_key, workflow_id, workflow_step, created_at)
       SELECT $14, $15, $16, $17,
              CASE WHEN coalesce($13::timestamptz, t.n) <= t.n THEN 'available'::job_state
                   ELSE 'scheduled'::job_state END,
              $18, $19, $20, coalesce($13::timestamptz, t.n), $21, $1, $11, t.n
       FROM t
       ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
       RETURNING state, queue
     ),
     ntf AS (
       SELECT count(pg_notify($22, queue)) AS n
       FROM (SELECT DISTINCT queue FROM next WHERE $23 AND state = 'available') q
     )",
    "(SELECT n FROM ntf)"
);

/// [`checkpoint_sql`] for the last step: the workflow completes with `$5`.
const CHECKPOINT_FINISH_SQL: &str = checkpoint_sql!(
    "UPDATE workflows
     SET state = 'completed', output = $5, current_step = NULL, wait_reason = NULL,
         wait_signal_name = NULL, wait_correlation_key = NULL, wait_until = NULL,
         updated_at = t.n, finished_at = t.n
     FROM t WHERE id = $1",
    "",
    "0::bigint"
);

/// The checkpoint of a step whose successor runs inline ([`run_steps`]):
/// the journal row and the workflow row as in [`CHECKPOINT_ADVANCE_SQL`]
/// (due now, so `running`), and instead of a new job and the completion of
/// this one, this job row moved on to the successor (`$11`, its arguments
/// `$12`, budget `$13`, unique key `$14`) under the same lease token, its
/// lease extended by `$15` ms. Returns the row's new `attempted_at`, NULL
/// when the lease is stale. The successor takes the unique key a new job
/// would have had, so a re-delivery of an earlier step (which enqueues the
/// successor by that key) finds it; another row holding that key already
/// stands for the successor, and the moved row then takes none (both
/// serialize on the workflow row, and the later finds the step done).
const CHECKPOINT_MOVE_SQL: &str = concat!(
    step_journal_sql!(),
    "
     moved AS (
       UPDATE jobs j
       SET args = $12, workflow_step = $11, max_attempts = $13,
           unique_key = CASE WHEN EXISTS (SELECT 1 FROM jobs o WHERE o.unique_key = $14)
                             THEN NULL ELSE $14 END,
           run_at = t.n, attempted_at = t.n,
           lease_expires_at = t.n + $15 * interval '1 millisecond'
       FROM t
       WHERE j.id = $9 AND j.lease_token = $10 AND j.state = 'running'
       RETURNING j.attempted_at
     ),
     wf AS (
       UPDATE workflows
       SET state = 'running', wait_reason = NULL, wait_signal_name = NULL,
           wait_correlation_key = NULL, wait_until = NULL, current_step = $11, updated_at = t.n
       FROM t WHERE id = $1
     )
     SELECT (SELECT attempted_at FROM moved),
            EXISTS (SELECT 1 FROM pg_locks l
                    WHERE l.locktype = 'transactionid' AND NOT l.granted
                      AND l.transactionid = pg_current_xact_id()::text::xid)"
);

/// A step's checkpoint in ONE statement, then the commit: its journal row,
/// the workflow row (on to `next`, a step name and its timer, or completed
/// with `output` when `next` is `None`), the next step's job and the
/// completion of the current job. The same writes as [`advance_in`] and
/// [`finish_in`] plus `FencedTx::complete`, in one round trip instead of
/// four: the hot path of every workflow.
///
/// A successor due now in the queue `job` came from is enqueued WITHOUT a
/// NOTIFY; the lease asks its runner to look at that queue at once instead
/// ([`crate::Lease::wants_own_queue_woken`]). Postgres serializes the
/// commits of notifying transactions (one at a time, each with its WAL
/// flush), which capped workflows at roughly one step per fsync; without it
/// concurrent checkpoints share their flushes (group commit). Other workers
/// of the queue find the job when they poll.
#[allow(clippy::too_many_arguments)]
async fn checkpoint_step(
    mut tx: FencedTx,
    store: &Store,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    output: &Value,
    job: &ClaimedJob,
    next: Option<(&str, Option<DateTime<Utc>>)>,
    inline: Option<std::time::Instant>,
) -> Result<Option<(ClaimedJob, bool)>> {
    let lease = &job.lease;
    let step = def.steps[idx].name;
    if let Some((name, None)) = next
        && wf.queue == job.queue
        && lease.max_attempts == def.max_attempts
        && inline.is_some_and(|deadline| std::time::Instant::now() < deadline)
    {
        return checkpoint_move(tx, store, wf, def, idx, output, job, name)
            .await
            .map(Some);
    }
    let own_queue = next.is_some_and(|(_, run_at)| run_at.is_none()) && wf.queue == job.queue;
    let query = bind_step_journal(
        sqlx::query_as::<_, (i64, i64)>(match next {
            Some(_) => CHECKPOINT_ADVANCE_SQL,
            None => CHECKPOINT_FINISH_SQL,
        }),
        store,
        (wf.id, step, idx),
        output,
        lease,
    );
    let next_job;
    let query = match next {
        None => query,
        Some((name, run_at)) => {
            next_job = step_job(
                wf.id,
                &wf.queue,
                name,
                Wake::Entry,
                run_at,
                Some(def.max_attempts),
            );
            next_job.validate()?;
            query
                .bind(name)
                .bind(run_at.is_some())
                .bind(run_at)
                .bind(next_job.id)
                .bind(&next_job.queue)
                .bind(&next_job.kind)
                .bind(&next_job.args)
                .bind(next_job.priority)
                .bind(next_job.max_attempts)
                .bind(next_job.timeout_ms())
                .bind(&next_job.unique_key)
                .bind(crate::notify::JOBS_CHANNEL)
                .bind(store.config().notify && !own_queue)
        }
    };
    let (completed, _notified) = query.fetch_one(tx.conn()).await?;
    if completed == 0 {
        tx.rollback().await?;
        return Err(Error::StaleLease {
            job_id: lease.job_id,
            token: lease.token,
        });
    }
    tx.commit().await?;
    if own_queue {
        lease.mark_own_queue_fed();
    }
    lease.mark_finished();
    Ok(None)
}

/// [`checkpoint_step`] for a successor that runs inline: commits
/// [`CHECKPOINT_MOVE_SQL`] and returns the job as the successor's delivery
/// (the lease is not finished: the same call runs the successor next).
#[allow(clippy::too_many_arguments)]
async fn checkpoint_move(
    mut tx: FencedTx,
    store: &Store,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    output: &Value,
    job: &ClaimedJob,
    next: &str,
) -> Result<(ClaimedJob, bool)> {
    let lease = &job.lease;
    let step = def.steps[idx].name;
    let next_job = step_job(
        wf.id,
        &wf.queue,
        next,
        Wake::Entry,
        None,
        Some(def.max_attempts),
    );
    next_job.validate()?;
    let ttl_ms = crate::store::ms(store.config().lease_ttl);
    let (attempted_at, contended): (Option<DateTime<Utc>>, bool) = bind_step_journal(
        sqlx::query_as(CHECKPOINT_MOVE_SQL),
        store,
        (wf.id, step, idx),
        output,
        lease,
    )
    .bind(next)
    .bind(&next_job.args)
    .bind(next_job.max_attempts)
    .bind(&next_job.unique_key)
    .bind(ttl_ms)
    .fetch_one(tx.conn())
    .await?;
    let Some(attempted_at) = attempted_at else {
        tx.rollback().await?;
        return Err(Error::StaleLease {
            job_id: lease.job_id,
            token: lease.token,
        });
    };
    tx.commit().await?;
    let mut moved = job.clone();
    moved.args = next_job.args;
    moved.workflow_step = Some(next.to_string());
    moved.lease = lease.for_next_step(attempted_at, next_job.max_attempts);
    Ok((moved, contended))
}

/// The writes of [`checkpoint_advance`], on the caller's connection.
#[allow(clippy::too_many_arguments)]
async fn advance_in(
    conn: &mut PgConnection,
    store: &Store,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    output: &Value,
    lease: Option<&crate::Lease>,
    run_at: Option<DateTime<Utc>>,
) -> Result<()> {
    let Some(next) = def.steps.get(idx + 1) else {
        return finish_in(conn, store, wf, def, idx, output, lease).await;
    };
    journal(
        conn,
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
    .execute(&mut *conn)
    .await?;
    let job = step_job(
        wf.id,
        &wf.queue,
        next.name,
        Wake::Entry,
        run_at,
        Some(def.max_attempts),
    );
    store.job_insert_in(conn, &job).await?;
    Ok(())
}

/// Journals `step` as completed and completes the workflow with `output`.
async fn finish_in(
    conn: &mut PgConnection,
    store: &Store,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    output: &Value,
    lease: Option<&crate::Lease>,
) -> Result<()> {
    journal(
        conn,
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
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Journals `step` as failed; then compensates the completed steps (the
/// workflow goes `compensating`), or fails the workflow when none has a
/// compensation. The caller finishes the job.
async fn fail_step_in(
    conn: &mut PgConnection,
    store: &Store,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    lease: Option<&crate::Lease>,
    error: &str,
) -> Result<()> {
    journal(
        conn,
        store,
        wf.id,
        (idx, def.steps[idx].name),
        "failed",
        None,
        Some(error),
        lease,
    )
    .await?;
    if compensate_next_in(conn, store, wf, def, idx, Some(error)).await? {
        return Ok(());
    }
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
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Moves compensation to the latest completed step before `below` that has
/// a compensation: the workflow is `compensating` at that step (with `error`
/// recorded when compensation starts) and its compensation job is enqueued.
/// Without one: when compensation had started (`error` is `None`) the
/// workflow ends `compensated`; returns false when there was nothing to
/// compensate at all.
async fn compensate_next_in(
    conn: &mut PgConnection,
    store: &Store,
    wf: &Locked,
    def: &Workflow,
    below: usize,
    error: Option<&str>,
) -> Result<bool> {
    let done: Vec<String> = sqlx::query_scalar(
        "SELECT step FROM workflow_steps WHERE workflow_id = $1 AND status = 'completed'",
    )
    .bind(wf.id)
    .fetch_all(&mut *conn)
    .await?;
    let next = def.steps[..below]
        .iter()
        .rev()
        .find(|s| s.compensate.is_some() && done.iter().any(|d| d == s.name));
    let Some(next) = next else {
        if error.is_some() {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE workflows
             SET state = 'compensated', current_step = NULL, wait_reason = NULL,
                 wait_signal_name = NULL, wait_correlation_key = NULL, wait_until = NULL,
                 updated_at = t.n, finished_at = t.n
             FROM (SELECT coalesce($2::timestamptz, now()) AS n) t
             WHERE id = $1",
        )
        .bind(wf.id)
        .bind(store.now())
        .execute(&mut *conn)
        .await?;
        return Ok(true);
    };
    let seq: i32 = sqlx::query_scalar(
        "UPDATE workflows
         SET state = 'compensating', error = coalesce($3, error), current_step = $2,
             wait_reason = NULL, wait_signal_name = NULL, wait_correlation_key = NULL,
             wait_until = NULL, wait_seq = wait_seq + 1,
             updated_at = coalesce($4::timestamptz, now())
         WHERE id = $1
         RETURNING wait_seq",
    )
    .bind(wf.id)
    .bind(next.name)
    .bind(error)
    .bind(store.now())
    .fetch_one(&mut *conn)
    .await?;
    let job = step_job(
        wf.id,
        &wf.queue,
        next.name,
        Wake::Compensate { seq },
        None,
        Some(def.max_attempts),
    );
    store.job_insert_in(conn, &job).await?;
    Ok(true)
}

/// Journals `step` as in doubt and parks the workflow (`waiting`,
/// `wait_reason = 'in_doubt:<step>'`); enqueues the first ask of its
/// reconcile hook, if it has one. The caller completes the job.
#[allow(clippy::too_many_arguments)]
async fn checkpoint_in_doubt(
    tx: &mut FencedTx,
    store: &Store,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    lease: &crate::Lease,
    reason: &str,
) -> Result<()> {
    let step = def.steps[idx].name;
    journal(
        tx.conn(),
        store,
        wf.id,
        (idx, step),
        "in_doubt",
        None,
        Some(reason),
        Some(lease),
    )
    .await?;
    sqlx::query(
        "UPDATE workflow_steps
         SET reconcile_attempts = 0, resolved_by = NULL,
             call_state = CASE WHEN call_state = 'calling' THEN 'unknown' ELSE call_state END
         WHERE workflow_id = $1 AND step = $2",
    )
    .bind(wf.id)
    .bind(step)
    .execute(tx.conn())
    .await?;
    let seq: i32 = sqlx::query_scalar(
        "UPDATE workflows
         SET state = 'waiting', wait_reason = 'in_doubt:' || $2, wait_signal_name = NULL,
             wait_correlation_key = NULL, wait_until = NULL, wait_seq = wait_seq + 1,
             updated_at = coalesce($3::timestamptz, now())
         WHERE id = $1
         RETURNING wait_seq",
    )
    .bind(wf.id)
    .bind(step)
    .bind(store.now())
    .fetch_one(tx.conn())
    .await?;
    if def.steps[idx].reconcile.is_some() {
        let job = step_job(
            wf.id,
            &wf.queue,
            step,
            Wake::Reconcile { seq, n: 1 },
            None,
            Some(def.max_attempts),
        );
        store.job_insert_in(tx.conn(), &job).await?;
    }
    tracing::warn!(workflow_id = %wf.id, step, reason, "workflow step in doubt");
    Ok(())
}

/// Settles in-doubt step `idx` whose call the other side never received:
/// the step goes back to `failed` with its call `not_sent` (so its re-run
/// sends the call again under the same idempotency key, as an operator
/// retry does), the workflow runs again at the step, and a job re-runs it.
/// After [`Workflow::max_resends`] such sends the step fails instead.
async fn resend_in(
    conn: &mut PgConnection,
    store: &Store,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
    reason: &str,
) -> Result<()> {
    let step = def.steps[idx].name;
    let resent: Option<i32> = sqlx::query_scalar(
        "UPDATE workflow_steps
         SET status = 'failed', error = $3, call_state = 'not_sent', call_error = $3,
             call_resends = call_resends + 1
         WHERE workflow_id = $1 AND step = $2 AND status = 'in_doubt' AND call_resends < $4
         RETURNING call_resends",
    )
    .bind(wf.id)
    .bind(step)
    .bind(reason)
    .bind(def.max_resends)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(resent) = resent else {
        let error = format!(
            "the call was never received after {} sends: {reason}",
            def.max_resends + 1
        );
        return fail_step_in(conn, store, wf, def, idx, None, &error).await;
    };
    let seq: i32 = sqlx::query_scalar(
        "UPDATE workflows
         SET state = 'running', wait_reason = NULL, wait_signal_name = NULL,
             wait_correlation_key = NULL, wait_until = NULL, wait_seq = wait_seq + 1,
             updated_at = coalesce($2::timestamptz, now())
         WHERE id = $1
         RETURNING wait_seq",
    )
    .bind(wf.id)
    .bind(store.now())
    .fetch_one(&mut *conn)
    .await?;
    let job = step_job(
        wf.id,
        &wf.queue,
        step,
        Wake::Retry { seq },
        None,
        Some(def.max_attempts),
    );
    store.job_insert_in(conn, &job).await?;
    tracing::info!(workflow_id = %wf.id, step, resent, reason,
        "in-doubt call never received: sending it again under the same key");
    Ok(())
}

/// Records who settled an in-doubt step.
async fn mark_resolved(
    conn: &mut PgConnection,
    id: WorkflowId,
    step: &str,
    by: &str,
) -> Result<()> {
    sqlx::query("UPDATE workflow_steps SET resolved_by = $3 WHERE workflow_id = $1 AND step = $2")
        .bind(id)
        .bind(step)
        .bind(by)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
