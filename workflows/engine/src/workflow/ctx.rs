//! What a step body, a compensation or a reconcile hook runs with (layer 4): [`StepCtx`] — who
//! it is, the workflow's input and past outputs, the lease-fenced transaction its domain
//! writes go into ([`StepCtx::db`]), and the one safe way to call the outside world
//! ([`StepCtx::external_call`]).
//!
//! The same body behaves the same on every execution path. On the locked path the transaction
//! is open before the body runs; on the lazy paths (a held first step, a successor run without
//! the lock) it is opened, and the workflow locked and checked unchanged, the first time the
//! body needs the database or makes its call.
use super::batch::held::HeldHandle;
use super::db::call::{self, Answer, Intent};
use super::db::lock::{Locked, PriorCall, lock_unchanged};
use super::db::{Unchanged, position};
use super::outcome::{CallError, ExternalError, ExternalResult};
use super::state::{CallState, WorkflowState};
use super::wire::{WorkflowId, idempotency_key};
use crate::metrics::{CallOutcome, Metrics};
use crate::{Error, FencedTx, Lease, Result, Store};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};
use tracing::Instrument;

/// What a step function gets: who it is, the workflow's input, the outputs of earlier steps,
/// and the lease-fenced transaction its domain writes go into.
#[derive(Clone)]
pub struct StepCtx {
    info: Arc<StepInfo>,
    tx: Slot,
}

/// Where a step's fenced transaction is kept while its body runs (the body's `db()` guards
/// borrow it; the runtime takes it back afterwards).
pub(crate) type Slot = Arc<Mutex<Option<FencedTx>>>;

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
    /// The step job's id (a rate-limited call's reservation is the job's).
    job_id: uuid::Uuid,
    timed_out: bool,
    store: Store,
    /// Where its external call's answer is counted (`None`: the runtime has no metrics).
    metrics: Option<Metrics>,
    /// The step's external call as an earlier attempt left it.
    prior_call: Option<PriorCall>,
    /// What runs: a step body (the only place `external_call` is allowed), a compensation or
    /// a reconcile hook.
    role: Role,
    track: std::sync::Mutex<CallTrack>,
    /// Set when the step runs without a transaction (the lazy paths): how to open one, lock the
    /// workflow and check that it is still where the step found it, the first time the step
    /// needs the database or makes its external call.
    lazy: Option<LazyTx>,
}

/// What opening a step's transaction on first use needs.
pub(crate) struct LazyTx {
    pub lease: Lease,
    pub state: WorkflowState,
    pub wait_seq: i32,
    /// Opened (or tried to) already: a failed attempt is not repeated.
    pub tried: AtomicBool,
    /// The locked batch holding the workflow row while the step runs (a delivery's first
    /// step): left, and its commit awaited, before the step takes the lock on its own.
    pub held: Option<Arc<HeldHandle>>,
}

/// What a [`StepCtx`] is handed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Step,
    Compensation,
    Reconcile,
}

/// What this run of the step did with its external call.
#[derive(Debug, Default)]
struct CallTrack {
    made: bool,
    in_doubt: Option<String>,
    /// The call's rate limit had no room for this long.
    deferred: Option<std::time::Duration>,
}

/// What a context is made for.
pub(crate) struct CtxFor<'a> {
    pub store: &'a Store,
    pub metrics: Option<&'a Metrics>,
    pub wf: &'a Locked,
    pub step: &'a str,
    pub index: usize,
    pub lease: &'a Lease,
    pub outputs: HashMap<String, Value>,
    pub role: Role,
    pub timed_out: bool,
    pub prior_call: Option<PriorCall>,
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

/// The step's database connection: the fenced transaction in which its checkpoint will
/// commit. Drop it before the step function returns.
pub type StepDb = OwnedMappedMutexGuard<Option<FencedTx>, PgConnection>;

impl StepCtx {
    /// A context around the fenced transaction `tx` (`None` with `lazy`: opened on first use);
    /// the slot is where the runtime takes the transaction back from.
    pub(crate) fn new(p: CtxFor<'_>, tx: Option<FencedTx>, lazy: Option<LazyTx>) -> (Self, Slot) {
        let slot = Arc::new(Mutex::new(tx));
        let key = idempotency_key(p.wf.id, p.step);
        let ctx = StepCtx {
            info: Arc::new(StepInfo {
                workflow_id: p.wf.id,
                kind: p.wf.kind.clone(),
                version: p.wf.version,
                step: p.step.to_string(),
                position: position(p.index),
                input: p.wf.input.clone(),
                outputs: p.outputs,
                idempotency_key: match p.role {
                    Role::Compensation => format!("{key}:compensate"),
                    Role::Step | Role::Reconcile => key,
                },
                attempt: p.lease.attempt,
                started_at: p.lease.attempted_at,
                job_id: p.lease.job_id,
                timed_out: p.timed_out,
                store: p.store.clone(),
                metrics: p.metrics.cloned(),
                prior_call: p.prior_call,
                role: p.role,
                track: std::sync::Mutex::new(CallTrack::default()),
                lazy,
            }),
            tx: slot.clone(),
        };
        (ctx, slot)
    }

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

    /// The step's deterministic idempotency key, `"{workflow_id}:{step}"`: pass it with every
    /// external call the step makes. In a compensation it is
    /// `"{workflow_id}:{step}:compensate"` (the undo is a call of its own); a reconcile hook
    /// gets the step's key.
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
    /// 1. The intent is committed first, in its own transaction, on the step's journal row
    ///    (`status = 'calling'`, with attempt and time).
    /// 2. `call` runs with the step's idempotency key.
    /// 3. Its answer is recorded, again in its own transaction. A definite answer is returned
    ///    (and a re-run of the step gets the recorded answer back without calling again);
    ///    [`CallError::Unknown`] marks the step in doubt: whatever the step then returns, its
    ///    writes are discarded and it goes `in_doubt` for its reconcile hook or an admin.
    ///
    /// A re-run that finds an intent without an answer (the process died during the call)
    /// never gets here: the step goes `in_doubt` first.
    pub async fn external_call<F, Fut>(&self, call: F) -> ExternalResult
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = std::result::Result<Value, CallError>>,
    {
        if let Some(answered) = self.before_call() {
            return answered;
        }
        self.call_now(call).await
    }

    /// [`Self::external_call`] under rate-limit key `key` (a `flow_limits` row of the key or
    /// its class, e.g. `exchange:sim`), charging `weight`. The bucket is charged right before
    /// the call, shared by every process through Postgres; when it lacks the weight nothing is
    /// sent, [`ExternalError::Deferred`] comes back, and the step — whatever it returns — runs
    /// again when the bucket will have refilled, without using an attempt. A key without a
    /// rate limit costs nothing. A re-run that finds the call answered is not charged again.
    pub async fn external_call_limited<F, Fut>(
        &self,
        key: &str,
        weight: u32,
        call: F,
    ) -> ExternalResult
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = std::result::Result<Value, CallError>>,
    {
        if let Some(answered) = self.before_call() {
            return answered;
        }
        self.rate_limit(key, weight).await?;
        self.call_now(call).await
    }

    /// Charges `weight` to rate-limit key `key` for a request this run makes outside
    /// [`Self::external_call_limited`]: a look-up, or a call from a compensation or a reconcile
    /// hook. When the bucket lacks the weight, [`ExternalError::Deferred`] comes back: make no
    /// request and return (any result) — the run's writes are discarded and its job runs again
    /// at the bucket's turn, without using an attempt (a reconcile hook's deferred run does
    /// not count as an ask). A key without a rate limit costs nothing.
    pub async fn rate_limit(
        &self,
        key: &str,
        weight: u32,
    ) -> std::result::Result<(), ExternalError> {
        match crate::flow::take(&self.info.store, self.info.job_id, key, weight).await {
            Ok(None) => Ok(()),
            Ok(Some(wait)) => {
                self.track().deferred = Some(wait);
                Err(ExternalError::Deferred(wait))
            }
            Err(e) => Err(ExternalError::NotMade(format!(
                "the rate limit of {key:?} could not be checked: {e}"
            ))),
        }
    }

    /// Makes the call (the checks of [`Self::before_call`] passed), in its span.
    async fn call_now<F, Fut>(&self, call: F) -> ExternalResult
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = std::result::Result<Value, CallError>>,
    {
        let span = self.call_span();
        self.make_call(call).instrument(span).await
    }

    /// The span of an external call (none with tracing off), with the idempotency key the
    /// other side sees: the key ties this span to that side's logs.
    fn call_span(&self) -> tracing::Span {
        if !crate::trace::enabled() {
            return tracing::Span::none();
        }
        tracing::info_span!(
            "external_call",
            workflow.id = %self.info.workflow_id,
            workflow.step = %self.info.step,
            idempotency_key = %self.info.idempotency_key,
        )
    }

    /// [`Self::external_call`] once it is to be made: intent, call, answer.
    async fn make_call<F, Fut>(&self, call: F) -> ExternalResult
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = std::result::Result<Value, CallError>>,
    {
        if self.info.lazy.is_some() {
            // The call is made under the workflow's lock, as on the locked path: an operator's
            // cancel waits for the step's checkpoint. While a step body runs, only its own
            // `db()` guard can hold the slot, and `db()` opens the transaction before handing
            // one out: a held slot means it is open already (waiting for it would wait for the
            // caller itself).
            if let Ok(mut slot) = self.tx.try_lock()
                && slot.is_none()
                && let Err(e) = self.open_lazily(&mut slot).await
            {
                return Err(ExternalError::NotMade(format!(
                    "the step's transaction could not be opened: {e}"
                )));
            }
        }
        self.record_intent().await?;
        let answer = call(self.info.idempotency_key.clone()).await;
        self.record_answer(answer).await
    }

    /// What an external call may not do, or what an earlier attempt's call answered: the
    /// answer to give without calling (`None`: make the call).
    fn before_call(&self) -> Option<ExternalResult> {
        if self.info.role != Role::Step {
            return Some(Err(ExternalError::NotMade(
                "external_call is for step bodies; a compensation or reconcile hook must be \
                 idempotent by its idempotency key"
                    .to_string(),
            )));
        }
        if std::mem::replace(&mut self.track().made, true) {
            return Some(Err(ExternalError::NotMade(
                "a step makes at most one external call; split it into steps".to_string(),
            )));
        }
        let prior = self.info.prior_call.as_ref()?;
        match prior.state {
            CallState::Answered => Some(Ok(prior.output.clone().unwrap_or(Value::Null))),
            CallState::Rejected => Some(Err(ExternalError::Rejected(
                prior.error.clone().unwrap_or_default(),
            ))),
            CallState::NotSent => None,
            CallState::Calling | CallState::Unknown => {
                // The earlier attempt's call is only now known to be in doubt: counted here.
                self.count_call(CallOutcome::InDoubt);
                let reason = "an earlier attempt's call has no answer".to_string();
                self.track().in_doubt = Some(reason.clone());
                Some(Err(ExternalError::InDoubt(reason)))
            }
        }
    }

    /// Commits the call's intent on the step's journal row.
    async fn record_intent(&self) -> std::result::Result<(), ExternalError> {
        let info = &self.info;
        let intent = Intent {
            workflow_id: info.workflow_id,
            step: &info.step,
            position: info.position,
            idempotency_key: &info.idempotency_key,
            attempt: info.attempt,
            started_at: info.started_at,
        };
        match call::intent(&info.store, &intent).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(ExternalError::NotMade(
                "the step is already journaled".to_string(),
            )),
            Err(e) => Err(ExternalError::NotMade(format!(
                "the call's intent could not be recorded: {e}"
            ))),
        }
    }

    /// Commits the call's answer and says what the step gets back.
    async fn record_answer(&self, answer: std::result::Result<Value, CallError>) -> ExternalResult {
        let (state, output, error) = match &answer {
            Ok(v) => (CallState::Answered, Some(v), None),
            Err(CallError::Rejected(e)) => (CallState::Rejected, None, Some(e.as_str())),
            Err(CallError::NotSent(e)) => (CallState::NotSent, None, Some(e.as_str())),
            Err(CallError::Unknown(e)) => (CallState::Unknown, None, Some(e.as_str())),
        };
        let record = Answer {
            workflow_id: self.info.workflow_id,
            step: &self.info.step,
            state,
            output,
            error,
        };
        let saved = call::answer(&self.info.store, &record).await;
        self.count_call(match (&answer, &saved) {
            (Err(CallError::Unknown(_)), _) | (_, Err(_)) => CallOutcome::InDoubt,
            (Ok(_), Ok(())) => CallOutcome::Answered,
            (Err(CallError::Rejected(_)), Ok(())) => CallOutcome::Rejected,
            (Err(CallError::NotSent(_)), Ok(())) => CallOutcome::NotSent,
        });
        let in_doubt = |reason: String| {
            self.track().in_doubt = Some(reason.clone());
            Err(ExternalError::InDoubt(reason))
        };
        match (answer, saved) {
            (Err(CallError::Unknown(e)), _) => in_doubt(e),
            (_, Err(e)) => in_doubt(format!("the call's answer could not be recorded: {e}")),
            (Ok(v), Ok(())) => Ok(v),
            (Err(CallError::Rejected(e)), Ok(())) => Err(ExternalError::Rejected(e)),
            (Err(CallError::NotSent(e)), Ok(())) => Err(ExternalError::NotSent(e)),
        }
    }

    fn count_call(&self, outcome: CallOutcome) {
        if let Some(m) = &self.info.metrics {
            m.call_answered(&self.info.kind, outcome);
        }
    }

    fn track(&self) -> std::sync::MutexGuard<'_, CallTrack> {
        self.info
            .track
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The in-doubt reason this run's external call left, taken (once).
    pub(crate) fn take_in_doubt(&self) -> Option<String> {
        self.track().in_doubt.take()
    }

    /// How long this run's rate-limited call was deferred, taken (once).
    pub(crate) fn take_deferred(&self) -> Option<std::time::Duration> {
        self.track().deferred.take()
    }

    /// The lease-fenced transaction, for the step's domain writes: they commit together with
    /// the step's checkpoint, or not at all. Hold the guard only while writing and drop it
    /// before returning.
    pub async fn db(&self) -> Result<StepDb> {
        // The span covers getting the transaction (on a lazy path: opening it and taking the
        // workflow's lock); the statements run through the guard are the caller's, after it.
        let span = if crate::trace::enabled() {
            tracing::info_span!("step.db", workflow.id = %self.info.workflow_id,
                workflow.step = %self.info.step)
        } else {
            tracing::Span::none()
        };
        async {
            let mut guard = self.tx.clone().lock_owned().await;
            if guard.is_none() {
                self.open_lazily(&mut guard).await?;
            }
            OwnedMutexGuard::try_map(guard, |slot| slot.as_mut().map(FencedTx::conn))
                .map_err(|_| Error::Invalid("the step's transaction is closed".to_string()))
        }
        .instrument(span)
        .await
    }

    /// On a lazy path (a step started without a transaction), opens the step's fenced
    /// transaction and locks its workflow row — unless the workflow moved on since the step
    /// started, which is an error: the step's run is then discarded and the job looked at
    /// again. From here on the step runs exactly as on the locked path.
    async fn open_lazily(&self, slot: &mut Option<FencedTx>) -> Result<()> {
        let Some(lazy) = &self.info.lazy else {
            return Ok(());
        };
        if lazy.tried.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(held) = &lazy.held {
            held.release().await;
        }
        let info = &self.info;
        let at = Unchanged {
            id: info.workflow_id,
            state: lazy.state,
            step: &info.step,
            wait_seq: lazy.wait_seq,
        };
        match lock_unchanged(&info.store, &lazy.lease, &at).await? {
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

/// Takes the step's transaction back once its body has returned.
pub(crate) async fn take_tx(slot: &Slot) -> Result<FencedTx> {
    slot.lock()
        .await
        .take()
        .ok_or_else(|| Error::Invalid("the step's transaction was taken".to_string()))
}
