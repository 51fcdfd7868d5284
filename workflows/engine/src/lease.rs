//! A claimed attempt's lease (the fenced transaction built on it is in [`crate::fenced`]).
//!
//! Every attempt holds a lease: the worker that owns it, a fencing token that
//! is new for every claim, and an expiry that heartbeats push forward. When a
//! lease expires the reaper makes the job available again, and the next claim
//! mints a new token. Anything the old attempt then tries to write is fenced
//! off: every finishing statement matches on `lease_token`, and
//! [`crate::FencedTx`] locks the job row by its token before the handler writes, so
//! a stale attempt's transaction is rolled back instead of applied.
use crate::JobId;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use uuid::Uuid;

/// The lease of one attempt.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The job.
    pub job_id: JobId,
    /// The fencing token, new for every claim.
    pub token: Uuid,
    /// The worker that claimed it.
    pub owner: Arc<str>,
    /// This attempt's number (1-based).
    pub attempt: i32,
    /// The job's attempt budget.
    pub max_attempts: i32,
    /// When the attempt started.
    pub attempted_at: DateTime<Utc>,
    finished: Arc<AtomicBool>,
    wake_own_queue: Arc<AtomicBool>,
}

impl Lease {
    pub(crate) fn new(
        job_id: JobId,
        token: Uuid,
        owner: Arc<str>,
        attempt: i32,
        max_attempts: i32,
        attempted_at: DateTime<Utc>,
    ) -> Self {
        Self {
            job_id,
            token,
            owner,
            attempt,
            max_attempts,
            attempted_at,
            finished: Arc::new(AtomicBool::new(false)),
            wake_own_queue: Arc::new(AtomicBool::new(false)),
        }
    }

    /// True once the attempt's outcome has been committed through this lease
    /// (for instance by the handler's own [`FencedTx`]), so the runner must
    /// not record another.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    pub(crate) fn mark_finished(&self) {
        self.finished.store(true, Ordering::Release);
    }

    /// True when the attempt committed new work for its own queue without a
    /// NOTIFY (a workflow step's successor), so the runner that holds this
    /// lease should look for work in that queue at once instead of waiting
    /// for a wake-up. Other workers of the queue find it when they poll.
    pub fn wants_own_queue_woken(&self) -> bool {
        self.wake_own_queue.load(Ordering::Acquire)
    }

    pub(crate) fn mark_own_queue_fed(&self) {
        self.wake_own_queue.store(true, Ordering::Release);
    }

    /// The lease of the next workflow step that a checkpoint moved this job
    /// row on to (inline continuation): the same row, token and owner, and
    /// the same shared flags (the runner holding the original sees the
    /// outcome the last step commits); the step's own start and attempt
    /// budget. The attempt number is kept: a row is moved on only on its
    /// first attempt, which is the new step's first attempt too.
    pub(crate) fn for_next_step(&self, attempted_at: DateTime<Utc>, max_attempts: i32) -> Self {
        Self {
            attempted_at,
            max_attempts,
            ..self.clone()
        }
    }

    /// True when this is the job's last permitted attempt.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }
}
