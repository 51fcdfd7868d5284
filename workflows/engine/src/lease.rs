//! A claimed attempt's lease, and the fenced transaction built on it.
//!
//! Every attempt holds a lease: the worker that owns it, a fencing token that
//! is new for every claim, and an expiry that heartbeats push forward. When a
//! lease expires the reaper makes the job available again, and the next claim
//! mints a new token. Anything the old attempt then tries to write is fenced
//! off: every finishing statement matches on `lease_token`, and
//! [`FencedTx`] locks the job row by its token before the handler writes, so
//! a stale attempt's transaction is rolled back instead of applied.
use crate::{Error, JobId, Outcome, Result, Store};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, Transaction};
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

/// A transaction that commits only while its lease is current.
///
/// [`FencedTx::begin`] opens a transaction and locks the job row by id *and*
/// token: if the lease was lost it fails with [`Error::StaleLease`] before any
/// write. While the lock is held neither the reaper nor a new claim can take
/// the job (both skip locked rows), so the handler's writes, the job's
/// completion, and anything enqueued on the same connection commit together
/// or not at all.
pub struct FencedTx {
    tx: Transaction<'static, Postgres>,
    lease: Lease,
    store: Store,
}

impl std::fmt::Debug for FencedTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FencedTx")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl FencedTx {
    /// Begins a transaction fenced by `lease`.
    pub async fn begin(store: &Store, lease: &Lease) -> Result<Self> {
        let mut tx = Self::begin_unfenced(store, lease).await?;
        tx.check_fence().await?;
        Ok(tx)
    }

    /// Begins the transaction WITHOUT locking the job row yet: the caller's
    /// first statement must lock it by id and token itself (the workflow
    /// step path does so together with the workflow row and the journal),
    /// or call [`FencedTx::check_fence`], before anything is written.
    pub(crate) async fn begin_unfenced(store: &Store, lease: &Lease) -> Result<Self> {
        Ok(Self {
            tx: store.pool().begin().await?,
            lease: lease.clone(),
            store: store.clone(),
        })
    }

    /// Locks the job row by id and lease token; [`Error::StaleLease`] when
    /// the lease is no longer current.
    pub(crate) async fn check_fence(&mut self) -> Result<()> {
        let held: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM jobs WHERE id = $1 AND lease_token = $2 AND state = 'running' FOR UPDATE",
        )
        .bind(self.lease.job_id)
        .bind(self.lease.token)
        .fetch_optional(&mut *self.tx)
        .await?;
        if held.is_none() {
            return Err(Error::StaleLease {
                job_id: self.lease.job_id,
                token: self.lease.token,
            });
        }
        Ok(())
    }

    /// The connection to run the handler's own statements on.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// The lease this transaction is fenced by.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Records `outcome` for the job and commits everything. Fails with
    /// [`Error::StaleLease`] (and rolls back) if the lease is no longer current.
    pub async fn finish(mut self, outcome: Outcome) -> Result<()> {
        self.store
            .job_finish_in(&mut self.tx, &self.lease, &outcome)
            .await?;
        self.tx.commit().await?;
        self.lease.mark_finished();
        Ok(())
    }

    /// Completes the job and commits: `finish(Outcome::Complete)`.
    pub async fn complete(self) -> Result<()> {
        self.finish(Outcome::Complete).await
    }

    /// Commits the handler's writes *without* finishing the job (the lease
    /// stays held). Rarely what you want; workflows checkpoint this way.
    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }

    /// Rolls everything back.
    pub async fn rollback(self) -> Result<()> {
        self.tx.rollback().await?;
        Ok(())
    }
}
