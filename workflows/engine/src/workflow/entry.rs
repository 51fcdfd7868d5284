//! Entry points (layer 8): starting workflows and the operator actions on them.
//!
//! [`WorkflowRuntime::start`] starts in its own transaction, batched with concurrent starts.
//! The `_in` functions run on the caller's connection — inside their transaction, so a start
//! commits with the request's idempotency row, an operator action with its audit row — and
//! need only the store and the definitions (a step may start a workflow of another registry).
use super::batch::start::{Item, Submitted};
use super::db::debounce::{Delay, start_debounced_in};
use super::db::lock::lock_workflow;
use super::db::operator::{self, Resumed, step_status_in};
use super::db::start::{NewStart, start_for_inbox_in, start_in};
use super::definition::Workflow;
use super::exec::in_doubt::{Verdict, settle_in};
use super::outcome::Resolution;
use super::registry::WorkflowRegistry;
use super::runtime::WorkflowRuntime;
use super::state::{StepStatus, WorkflowState};
use super::wire::{Wake, WorkflowId, step_job};
use crate::inbox::{InboxEntry, InboxInserted};
use crate::{Error, NewJob, Result, Store};
use serde_json::Value;
use sqlx::PgConnection;
use tracing::Instrument;
use uuid::Uuid;

/// A start of `kind` at its newest registered version: the new instance's id, the definition,
/// and its first step's job.
struct Starting<'a> {
    id: WorkflowId,
    def: &'a Workflow,
    job: NewJob,
    flow_key: Option<String>,
}

impl<'a> Starting<'a> {
    fn new(registry: &'a WorkflowRegistry, kind: &str, input: &Value) -> Result<Self> {
        let def = registry
            .latest(kind)
            .ok_or_else(|| Error::Invalid(format!("no workflow of kind {kind:?} is registered")))?;
        let first = def
            .steps
            .first()
            .ok_or_else(|| Error::Invalid(format!("workflow {kind:?} has no steps")))?
            .name;
        let id = Uuid::now_v7();
        let max_attempts = Some(def.max_attempts);
        let job = step_job(id, &def.queue, first, Wake::Entry, None, max_attempts);
        job.validate()?;
        let flow_key = def.flow_key.as_ref().and_then(|f| f.key(input));
        if let Some(k) = &flow_key {
            crate::flow::check_key("workflow flow key", k)?;
        }
        Ok(Self {
            id,
            def,
            job,
            flow_key,
        })
    }

    fn start<'b>(&'b self, input: &'b Value, key: Option<&'b str>, notify: bool) -> NewStart<'b> {
        NewStart {
            id: self.id,
            kind: self.def.kind,
            version: self.def.version,
            input,
            first_step: self.def.steps[0].name,
            queue: &self.def.queue,
            unique_key: key,
            flow_key: self.flow_key.as_deref(),
            job: &self.job,
            notify,
        }
    }
}

impl WorkflowRuntime {
    /// Starts a workflow of `kind` at its newest registered version with `input`, in its own
    /// transaction: returns once the instance and its first job are committed. Concurrent calls
    /// share one statement and one commit. With a `unique_key`, starting again returns the
    /// existing instance's id and enqueues nothing.
    pub async fn start(
        &self,
        kind: &str,
        input: &Value,
        unique_key: Option<&str>,
    ) -> Result<WorkflowId> {
        let span = start_span(kind);
        // Built in the span: the workflow row and its first job store the span's context.
        let starting = span.in_scope(|| Starting::new(self.registry(), kind, input))?;
        span.record("workflow.id", tracing::field::display(starting.id));
        self.start_with(starting, input, unique_key)
            .instrument(span)
            .await
    }

    async fn start_with(
        &self,
        starting: Starting<'_>,
        input: &Value,
        unique_key: Option<&str>,
    ) -> Result<WorkflowId> {
        let store = self.store();
        let item = Item {
            id: starting.id,
            kind: starting.def.kind,
            version: starting.def.version,
            input: input.clone(),
            first_step: starting.def.steps[0].name,
            queue: starting.def.queue.clone(),
            unique_key: unique_key.map(str::to_owned),
            flow_key: starting.flow_key.clone(),
            job: starting.job.clone(),
            notify: store.config().notify,
        };
        let submitted = match self.start_batcher() {
            Some(batcher) => batcher.submit(item).await,
            None => Submitted::Unbatched,
        };
        match submitted {
            Submitted::Started(id) => Ok(id),
            Submitted::Failed(e) => Err(e),
            // The batch wrote nothing of it: one statement, atomic on its own.
            Submitted::Unbatched => {
                let mut conn = store.pool().acquire().await?;
                let start = starting.start(input, unique_key, store.config().notify);
                start_in(&mut conn, store, &start).await
            }
        }
    }
}

/// Starts a workflow of `kind` at its newest registered version on the caller's connection
/// (inside their transaction, if one is open): inserts the instance and enqueues its first
/// step's job. With a `unique_key`, starting again returns the existing instance's id and
/// enqueues nothing.
pub async fn workflow_start_in(
    conn: &mut PgConnection,
    store: &Store,
    registry: &WorkflowRegistry,
    kind: &str,
    input: &Value,
    unique_key: Option<&str>,
) -> Result<WorkflowId> {
    let span = start_span(kind);
    let starting = span.in_scope(|| Starting::new(registry, kind, input))?;
    span.record("workflow.id", tracing::field::display(starting.id));
    let start = starting.start(input, unique_key, store.config().notify);
    start_in(conn, store, &start).instrument(span).await
}

/// How [`workflow_start_debounced_in`] holds a start back.
#[derive(Debug, Clone, Copy)]
pub struct StartDebounce<'a> {
    /// The debounce key, e.g. `notify:user:{id}` (one namespace with [`NewJob::debounce`]'s).
    pub key: &'a str,
    /// The first step begins this long after the latest start under the key.
    pub window: std::time::Duration,
    /// ... and no later than this long after the first, so that a steady stream of starts
    /// cannot hold it back forever (`None`: no bound).
    pub max_wait: Option<std::time::Duration>,
}

/// Starts a workflow of `kind` debounced under a key (trailing), on the caller's connection:
/// while an instance started under the key has not begun its first step, starting again
/// returns that instance, gives it `input` and pushes its first step to `window` from now
/// (never past `max_wait` after the first start). Once its first step has begun, the next
/// start is a new instance. Starts of one key take turns on a lock held to the end of the
/// caller's transaction.
pub async fn workflow_start_debounced_in(
    conn: &mut PgConnection,
    store: &Store,
    registry: &WorkflowRegistry,
    kind: &str,
    input: &Value,
    debounce: &StartDebounce<'_>,
) -> Result<WorkflowId> {
    crate::flow::check_key("debounce key", debounce.key)?;
    let millis = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    if debounce.window.is_zero() {
        return Err(Error::Invalid("a debounce window must be positive".into()));
    }
    let delay = Delay {
        window_ms: millis(debounce.window),
        max_wait_ms: debounce.max_wait.map(millis),
    };
    let span = start_span(kind);
    let starting = span.in_scope(|| Starting::new(registry, kind, input))?;
    span.record("workflow.id", tracing::field::display(starting.id));
    // No NOTIFY: the first job is not due now.
    let start = starting.start(input, None, false);
    start_debounced_in(conn, store, &start, debounce.key, delay)
        .instrument(span)
        .await
}

/// The span of a workflow's start (none with tracing off): the workflow row and its first job
/// store its context, so every step of the instance continues this trace (decision 0011).
fn start_span(kind: &str) -> tracing::Span {
    if !crate::trace::enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "workflow.start",
        workflow.kind = kind,
        workflow.id = tracing::field::Empty
    )
}

/// Records `entry` in the inbox and, when it is new, starts a workflow of `kind` for it whose
/// input is `input` (an object) with `"inbox_id"` set to the new inbox row's id — in ONE
/// statement, atomic on its own: run it on a pooled connection, without a transaction around
/// it, and it is one round trip (the webhook intake's hot path). A duplicate entry starts
/// nothing and returns no workflow; a new entry whose workflow `unique_key` is taken returns
/// the existing instance, as [`workflow_start_in`] does.
pub async fn workflow_start_for_inbox_in(
    conn: &mut PgConnection,
    store: &Store,
    registry: &WorkflowRegistry,
    entry: &InboxEntry<'_>,
    (kind, input, unique_key): (&str, &Value, Option<&str>),
) -> Result<(InboxInserted, Option<WorkflowId>)> {
    entry.check()?;
    if !input.is_object() {
        return Err(Error::Invalid(
            "the input of a workflow started for an inbox entry must be a JSON object".into(),
        ));
    }
    let span = start_span(kind);
    let starting = span.in_scope(|| Starting::new(registry, kind, input))?;
    span.record("workflow.id", tracing::field::display(starting.id));
    let start = starting.start(input, unique_key, store.config().notify);
    start_for_inbox_in(conn, store, &start, entry)
        .instrument(span)
        .await
}

/// Cancels a workflow that has not finished (operator action, on the caller's connection so
/// the audit row commits with it). Its pending step jobs are cancelled; a step running right
/// now finishes first (it holds the workflow row) and its successor job is cancelled too.
/// Returns false when the workflow was already finished.
pub async fn workflow_cancel_in(
    conn: &mut PgConnection,
    store: &Store,
    id: WorkflowId,
    reason: &str,
) -> Result<bool> {
    operator::cancel_in(conn, store, id, reason).await
}

/// Resumes a failed workflow (operator action, on the caller's connection): a failed step runs
/// again; a workflow whose compensation exhausted its attempts resumes compensating at that
/// step. Returns false unless the workflow is `failed`.
pub async fn workflow_retry_in(
    conn: &mut PgConnection,
    store: &Store,
    id: WorkflowId,
) -> Result<bool> {
    let Some(Resumed {
        step,
        queue,
        seq,
        state,
        traceparent,
    }) = operator::retry_in(conn, store, id).await?
    else {
        return Ok(false);
    };
    let wake = if state == WorkflowState::Compensating {
        Wake::Compensate { seq }
    } else {
        Wake::Retry { seq }
    };
    let mut job = step_job(id, &queue, &step, wake, None, None);
    // The resumed step continues its workflow's trace, not the operator's request's.
    if traceparent.is_some() {
        job = job.traceparent(traceparent);
    }
    store.job_insert_in(conn, &job).await?;
    Ok(true)
}

/// Settles an in-doubt step (admin action, on the caller's connection so the audit row commits
/// with it): [`Resolution::Succeeded`] completes the step with the given output and enqueues
/// its successor (or completes the workflow); [`Resolution::Failed`] fails it, which
/// compensates the completed steps (or fails the workflow). Returns false when `step` of `id`
/// is not in doubt (already settled, or never was). Call it inside a transaction: the workflow
/// row is locked (`FOR NO KEY UPDATE`) until it commits, which serializes it with a reconcile
/// hook running right now. A pending reconcile job finds the step settled and does nothing.
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
    if step_status_in(conn, id, step).await? != Some(StepStatus::InDoubt) {
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
    settle_in(
        conn,
        store,
        (&wf, def, idx),
        Verdict::from(resolution),
        "admin",
    )
    .await?;
    Ok(true)
}
