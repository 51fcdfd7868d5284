//! Job rows, their states, and the `NewJob` builder used to enqueue work.
//!
//! A job's `kind` is a stable string chosen by the handler's author, separate
//! from any Rust type name, so renaming a type never orphans queued jobs. Its
//! `args` are a wire format (JSON): change them compatibly.
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use uuid::Uuid;

/// A job's id: a UUID v7, so ids sort by creation time.
pub type JobId = Uuid;

/// The queue a job goes to when none is given.
pub const DEFAULT_QUEUE: &str = "default";

/// Attempts a job gets when none is given.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 20;

/// Where a job is in its life; see `docs/state-machine.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "job_state", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for `run_at` (first run in the future, or snoozed).
    Scheduled,
    /// Ready to be claimed.
    Available,
    /// Claimed under a lease.
    Running,
    /// An attempt failed; waiting for its backoff `run_at`.
    Retryable,
    /// Finished successfully.
    Completed,
    /// The handler reported a permanent failure.
    Failed,
    /// Cancelled by the handler or an operator.
    Cancelled,
    /// Attempts exhausted or discarded by an operator (a dead letter).
    Discarded,
}

impl JobState {
    /// All states, in lifecycle order.
    pub const ALL: [JobState; 8] = [
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Retryable,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Discarded,
    ];

    /// The state's name as stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Retryable => "retryable",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Discarded => "discarded",
        }
    }

    /// True once the job will never run again on its own.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled | JobState::Discarded
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobState {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| crate::Error::Invalid(format!("unknown job state {s:?}")))
    }
}

/// A job to enqueue. Build with [`NewJob::new`] and the `with_*`/`unique`
/// methods, then hand it to [`crate::Store::insert`] (or `insert_in` inside
/// your own transaction, or `insert_many` for bulk).
#[derive(Debug, Clone)]
pub struct NewJob {
    pub(crate) id: JobId,
    pub(crate) queue: String,
    pub(crate) kind: String,
    pub(crate) args: serde_json::Value,
    pub(crate) priority: i16,
    pub(crate) max_attempts: i32,
    pub(crate) timeout: Option<Duration>,
    pub(crate) run_at: Option<DateTime<Utc>>,
    pub(crate) unique_key: Option<String>,
    pub(crate) workflow_id: Option<Uuid>,
    pub(crate) workflow_step: Option<String>,
    pub(crate) flow: crate::flow::JobFlow,
    pub(crate) traceparent: Option<String>,
}

impl NewJob {
    /// A job of `kind` with JSON `args` for the default queue.
    pub fn new(kind: impl Into<String>, args: serde_json::Value) -> Self {
        Self {
            id: Uuid::now_v7(),
            queue: DEFAULT_QUEUE.to_string(),
            kind: kind.into(),
            args,
            priority: 0,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            timeout: None,
            run_at: None,
            unique_key: None,
            workflow_id: None,
            workflow_step: None,
            flow: crate::flow::JobFlow::default(),
            // The enqueuer's span, so the job's attempts continue its trace (`None`, and no
            // cost beyond a branch, with tracing off).
            traceparent: crate::trace::current_traceparent(),
        }
    }

    /// A job whose args are any serializable value.
    pub fn from_args<T: Serialize>(kind: impl Into<String>, args: &T) -> crate::Result<Self> {
        let kind = kind.into();
        let value = serde_json::to_value(args).map_err(|source| crate::Error::Args {
            kind: kind.clone(),
            source,
        })?;
        Ok(Self::new(kind, value))
    }

    /// The job's id (assigned at construction, so callers can record it first).
    pub fn id(&self) -> JobId {
        self.id
    }

    /// Sends the job to `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Lower runs first; default 0.
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Total attempts before the job is discarded (at least 1).
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// A per-attempt time limit; an attempt that exceeds it is retried.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Don't run before `at`.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }

    /// At most one job with this key exists: inserting another returns the
    /// existing job instead (at READ COMMITTED it never aborts the caller's transaction).
    pub fn unique(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    /// Marks the job as a step of a workflow.
    pub fn workflow(mut self, workflow_id: Uuid, step: impl Into<String>) -> Self {
        self.workflow_id = Some(workflow_id);
        self.workflow_step = Some(step.into());
        self
    }

    /// Puts the job under flow key `key` (e.g. `user:42`, `exchange:sim`): at most the key's
    /// concurrency limit of such jobs run at once across every process (the limit is the
    /// `flow_limits` row of the key or of its class `user:*`; none: no limit), and a queue's
    /// claims alternate between keys (fairness, weighted by the key's `fair_weight`).
    pub fn flow_key(mut self, key: impl Into<String>) -> Self {
        self.flow.key = Some(key.into());
        self
    }

    /// Charges `weight` to rate-limit key `key` when the job is claimed: while the key's bucket
    /// lacks the weight, the job waits (`scheduled`, until the bucket will have refilled),
    /// without using an attempt or a handler slot.
    pub fn rate_limit(mut self, key: impl Into<String>, weight: u32) -> Self {
        self.flow.rate = Some((key.into(), weight.max(1)));
        self
    }

    /// Debounces the job under `key`: while a job with the key has not started, enqueueing
    /// another one does not add a job. [`crate::flow::Debounce::Trailing`] replaces the
    /// pending job's args and pushes its start to `window` after this call (one run, with the
    /// last args); [`crate::flow::Debounce::Leading`] runs the first at once and drops the
    /// others enqueued within `window` of it.
    pub fn debounce(
        mut self,
        key: impl Into<String>,
        window: Duration,
        mode: crate::flow::Debounce,
    ) -> Self {
        self.flow.gate = Some(crate::flow::Gate::Debounce {
            key: key.into(),
            window,
            mode,
        });
        self
    }

    /// Throttles enqueueing under `key` to `limit` jobs per `window` (by their start time):
    /// over the rate, [`crate::flow::Throttle::Drop`] adds nothing and
    /// [`crate::flow::Throttle::Delay`] starts the job at the next free place.
    pub fn throttle(
        mut self,
        key: impl Into<String>,
        limit: u32,
        window: Duration,
        mode: crate::flow::Throttle,
    ) -> Self {
        self.flow.gate = Some(crate::flow::Gate::Throttle {
            key: key.into(),
            limit: limit.max(1),
            window,
            mode,
        });
        self
    }

    /// The W3C `traceparent` the job's attempts continue (by default the current span's when
    /// the job was built; `None` starts none).
    pub fn traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }

    pub(crate) fn timeout_ms(&self) -> Option<i32> {
        self.timeout
            .map(|t| i32::try_from(t.as_millis().max(1)).unwrap_or(i32::MAX))
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
        let bad = |what: &str| Err(crate::Error::Invalid(what.to_string()));
        if self.queue.is_empty() || self.queue.len() > 128 {
            return bad("queue name must be 1..=128 bytes");
        }
        if self.kind.is_empty() || self.kind.len() > 128 {
            return bad("job kind must be 1..=128 bytes");
        }
        self.flow.validate()
    }
}

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new job row.
    New(JobId),
    /// The unique key was taken, or a pending job of the same debounce key absorbed this
    /// one: this is the job that holds it.
    Existing(JobId),
    /// A throttle over its rate, or a leading debounce within its window, dropped the job:
    /// nothing was added.
    Dropped,
}

impl Inserted {
    /// The id of the job, new or existing.
    pub fn id(self) -> JobId {
        match self {
            Inserted::New(id) | Inserted::Existing(id) => id,
            Inserted::Dropped => Uuid::nil(),
        }
    }

    /// True when a new row was written.
    pub fn is_new(self) -> bool {
        matches!(self, Inserted::New(_))
    }
}

/// A job row as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Job {
    pub id: JobId,
    pub queue: String,
    pub kind: String,
    pub args: serde_json::Value,
    pub state: JobState,
    pub priority: i16,
    pub attempt: i32,
    pub max_attempts: i32,
    pub timeout_ms: Option<i32>,
    pub run_at: DateTime<Utc>,
    pub unique_key: Option<String>,
    pub workflow_id: Option<Uuid>,
    pub workflow_step: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub attempted_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub completed_by: Option<String>,
}

/// One finished attempt that did not succeed, from `job_attempts`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Attempt {
    pub job_id: JobId,
    pub attempt: i32,
    pub worker: String,
    pub outcome: String,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// The columns of [`Job`], for `SELECT`s.
pub(crate) const JOB_COLUMNS: &str = "id, queue, kind, args, state, priority, attempt, \
    max_attempts, timeout_ms, run_at, unique_key, workflow_id, workflow_step, lease_owner, \
    lease_expires_at, last_error, created_at, attempted_at, finished_at, completed_by";
