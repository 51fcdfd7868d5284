//! Durable workflows: definitions, the step journal, timers and signal waits.
//!
//! A [`Workflow`] is a kind, a version and a list of named steps. An instance
//! is a row in `workflows`; each of its steps runs as a job of kind
//! [`WORKFLOW_JOB_KIND`] which a [`WorkflowRuntime`]'s handler runs. A step returns a
//! [`StepOutcome`], and its result is *checkpointed* in ONE transaction fenced
//! by the job's lease (contract rule 2): the journal row in `workflow_steps`,
//! the step's own domain writes (made through [`StepCtx::db`]), the workflow
//! row's new state, the next step's job, and the completion of the current
//! job. A crash anywhere leaves either no trace of the step or the whole
//! checkpoint; a stale lease applies nothing.
//!
//! Inline continuation ([`Inline`]): when a step's successor is due now in
//! the same queue, its checkpoint may move the same job row on to the
//! successor instead (same statement, same fence) and the successor runs in
//! the same delivery — one claim and one job row for a chain of steps, each
//! still checkpointed before the next starts. See [`StepHandler::run`] for when.
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
//!
//! # Layers
//!
//! The module tree is layered; a module imports only from layers below its own (checked by
//! `cargo xtask layers`):
//! 1. [`state`], [`outcome`], [`wire`] — stored states, what steps answer, the step jobs'
//!    wire format (pure, no SQL);
//! 2. [`db`] — every statement of the runtime, taking plain parameter structs;
//! 3. `batch` — the batching tasks (group commit of checkpoints and starts, locked batches,
//!    in-process turns), without their SQL;
//! 4. [`ctx`] — [`StepCtx`];
//! 5. [`definition`], [`registry`] — the [`Workflow`] builder and the [`WorkflowRegistry`];
//! 6. [`runtime`] — [`WorkflowRuntime`] and its [`ExecConfig`];
//! 7. `exec` — [`StepHandler`]: the execution paths (locked, held and optimistic, sagas,
//!    in-doubt);
//! 8. [`entry`] — starts and operator actions.
//!
//! The test harness (`crate::workflow_testing`, feature `testing`) sits on top.

pub(crate) mod batch;
pub mod ctx;
pub mod db;
pub mod definition;
pub mod entry;
pub(crate) mod exec;
pub mod outcome;
pub mod registry;
pub mod runtime;
pub mod state;
pub mod wire;

pub use batch::held::LockBatchStats;
pub use ctx::{StepCtx, StepDb};
pub use db::read::{StepRow, WorkflowRow, workflow_get_in, workflow_steps_in};
pub use definition::{
    CompensateFn, DEFAULT_MAX_RESENDS, DEFAULT_RECONCILE_ATTEMPTS, ReconcileFn, StepDef, StepFn,
    Workflow,
};
pub use entry::{
    StartDebounce, workflow_cancel_in, workflow_resolve_in, workflow_retry_in,
    workflow_start_debounced_in, workflow_start_for_inbox_in, workflow_start_in,
};
pub use exec::{StepHandler, StepsRun};
pub use outcome::{
    CallError, CompensationResult, ExternalError, ExternalResult, ReconcileResult, Reconciled,
    Resolution, StepOutcome, StepResult,
};
pub use registry::WorkflowRegistry;
pub use runtime::{ExecConfig, Inline, WorkflowRuntime};
pub use state::{CallState, StepStatus, WorkflowState};
pub use wire::{WORKFLOW_JOB_KIND, WorkflowId, idempotency_key};
