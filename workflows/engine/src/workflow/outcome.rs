//! What a step, a compensation, a reconcile hook and an external call answer (layer 1: pure).
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::time::Duration;

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

/// What a compensation returns: its output (journaled as the step's
/// `compensation_output`), or a transient error, retried with backoff.
pub type CompensationResult = std::result::Result<Value, String>;

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

/// How an admin settles an in-doubt step ([`workflow_resolve_in`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// The call took effect: the step completes with this output.
    Succeeded(Value),
    /// It did not: the step fails (→ compensation).
    Failed(String),
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
    /// The call's rate limit had no room: nothing was sent, and whatever the step returns
    /// now, it runs again when the limit's bucket will have refilled, without using an attempt.
    #[error("external call deferred by its rate limit for {0:?}")]
    Deferred(std::time::Duration),
}

impl From<ExternalError> for String {
    fn from(e: ExternalError) -> Self {
        e.to_string()
    }
}

/// What [`StepCtx::external_call`] returns.
pub type ExternalResult = std::result::Result<Value, ExternalError>;
