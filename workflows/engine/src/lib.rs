//! The durable runtime of Ledgerflow, with no domain knowledge.
//!
//! Everything that must survive a crash goes through this crate, and all of the
//! runtime's SQL lives here (Architecture Invariant: handlers never build SQL).
//!
//! Layout, one concept per module:
//! - [`job`]      — job rows, states, and the `NewJob` builder used to enqueue;
//! - [`store`]    — the queue's SQL: insert, claim, heartbeat, finish, rescue,
//!   promote, prune and the operator actions (retry, cancel, discard);
//! - [`lease`]    — a claimed attempt's lease; [`fenced`] — the fenced transaction that
//!   lets a handler commit its own writes together with the job's completion;
//! - [`outcome`]  — what a handler returns (complete, retry, fail, cancel, snooze);
//! - [`retry`]    — exponential backoff with jitter;
//! - [`queue`]    — queue controls (pause/resume) and statistics;
//! - [`notify`]   — LISTEN/NOTIFY channel names and the wake-up listener;
//! - [`clock`]    — the injectable clock (database clock by default);
//! - [`consumer_lag`] — Kafka consumer lag as the ingress measured it, for
//!   every `/metrics` to export;
//! - [`inbox`], [`outbox`] — deduplicated intake of external events; the
//!   transactional outbox and its ordered claims;
//! - [`dead_letter`] — poison messages recorded in Postgres first, their
//!   dead-letter topic copies published afterwards from the row;
//! - [`workflow`] — durable workflows: definitions, the step journal, durable
//!   timers, signal waits, sagas and in-doubt calls, run by a
//!   [`WorkflowRuntime`] (its own layered module tree: states and wire format,
//!   SQL, batching tasks, step context, definitions, runtime, execution paths,
//!   entry points);
//! - [`signal`]   — signals that waiting workflows consume (deduplicated, kept
//!   until consumed);
//! - [`testing`]  — (feature `testing`) per-test databases and helpers;
//! - [`admin_query`] — operators' filtered, paginated reads of jobs and workflows;
//! - [`cron`] — durable cron schedules and their catch-up;
//! - [`error`] — the engine's error type;
//! - [`trace`] — the W3C trace context stored with jobs, workflows and outbox rows, and
//!   whether tracing is on (docs/decisions/0011);
//! - `workflow_testing` — (feature `testing`) `WorkflowHarness`, which runs
//!   workflow step jobs in-process with a runtime's production handler and
//!   asserts on jobs, signals and journals.
//!
//! The schema is in the workspace's `migrations/` folder and is applied with
//! [`MIGRATOR`], the one migrator that binaries, tests and the Helm migration
//! Job all use.

pub mod admin_query;
pub mod claimed;
pub mod clock;
pub mod consumer_lag;
pub mod cron;
pub mod dead_letter;
pub mod error;
pub mod fenced;
pub mod flow;
pub mod inbox;
pub mod job;
pub mod lease;
pub mod metrics;
pub mod notify;
pub mod outbox;
pub mod outcome;
pub mod queue;
pub mod retry;
pub mod signal;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;
pub mod workflow;
#[cfg(feature = "testing")]
pub mod workflow_testing;

pub use clock::{Clock, DbClock, ManualClock};
pub use error::{Error, Result};
pub use fenced::FencedTx;
pub use job::{Inserted, Job, JobId, JobState, NewJob};
pub use lease::Lease;
pub use outcome::Outcome;
pub use retry::RetryPolicy;
pub use signal::{SignalSent, signal_send, signal_send_in};
pub use store::{Store, StoreConfig};
pub use workflow::{
    CallError, ExecConfig, ExternalError, ExternalResult, Inline, LockBatchStats, Reconciled,
    Resolution, StartDebounce, StepCtx, StepDef, StepHandler, StepOutcome, StepsRun,
    WORKFLOW_JOB_KIND, Workflow, WorkflowId, WorkflowRegistry, WorkflowRuntime, WorkflowState,
    workflow_cancel_in, workflow_resolve_in, workflow_retry_in, workflow_start_debounced_in,
    workflow_start_for_inbox_in, workflow_start_in,
};

/// The workspace's migrations, embedded at compile time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");
