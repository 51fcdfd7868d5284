//! What a handler returns; the engine decides what it means for the row.
use std::time::Duration;

/// The typed result of one attempt. Handlers never touch job state directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done. (If the handler already finished the job inside its own
    /// [`crate::FencedTx`], returning this again is a no-op.)
    Complete,
    /// Try again later: after `delay` if given, else after the retry policy's
    /// backoff. The job is discarded when this was its last attempt.
    Retry {
        error: String,
        delay: Option<Duration>,
    },
    /// A permanent failure: no further attempts.
    Fail { error: String },
    /// Stop: the work is no longer wanted.
    Cancel { reason: String },
    /// Not now: run again after the delay. Snoozing does not use up an attempt.
    Snooze(Duration),
}

impl Outcome {
    /// A retry with the policy's backoff.
    pub fn retry(error: impl std::fmt::Display) -> Self {
        Outcome::Retry {
            error: error.to_string(),
            delay: None,
        }
    }

    /// A permanent failure.
    pub fn fail(error: impl std::fmt::Display) -> Self {
        Outcome::Fail {
            error: error.to_string(),
        }
    }

    /// A cancellation.
    pub fn cancel(reason: impl std::fmt::Display) -> Self {
        Outcome::Cancel {
            reason: reason.to_string(),
        }
    }

    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Retry { .. } => "retry",
            Outcome::Fail { .. } => "fail",
            Outcome::Cancel { .. } => "cancel",
            Outcome::Snooze(_) => "snooze",
        }
    }
}

impl<E: std::fmt::Display> From<Result<(), E>> for Outcome {
    /// `Ok` completes; `Err` retries with the error's text.
    fn from(r: Result<(), E>) -> Self {
        match r {
            Ok(()) => Outcome::Complete,
            Err(e) => Outcome::retry(e),
        }
    }
}
