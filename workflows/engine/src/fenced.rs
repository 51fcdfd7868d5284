//! The fenced transaction: a transaction that commits only while its attempt's lease is
//! current, so a handler's writes and its job's completion commit together or not at all.
use crate::lease::Lease;
use crate::{Error, Outcome, Result, Store};
use sqlx::{PgConnection, Postgres, Transaction};

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
