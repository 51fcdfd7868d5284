//! The transition of a step that waits for a signal: the workflow parks on it, and the wait's
//! timeout is a job due at its deadline.
use super::StepAt;
use crate::workflow::wire::Wake;
use crate::{Result, Store};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// A step that waits for signal `(name, correlation_key)` until `deadline`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SignalWait<'a> {
    pub at: StepAt<'a>,
    pub name: &'a str,
    pub correlation_key: &'a str,
    /// The wait's number (the workflow's new `wait_seq`): its timeout job's key.
    pub seq: i32,
    pub deadline: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

/// Parks the workflow on the signal and enqueues the wait's timeout job. The caller has
/// looked for the signal under its key's lock (`crate::signal`) and completes the job.
pub(crate) async fn wait_signal_in(
    conn: &mut PgConnection,
    store: &Store,
    w: &SignalWait<'_>,
) -> Result<()> {
    sqlx::query(
        "UPDATE workflows
         SET state = 'waiting', wait_reason = 'signal:' || $2 || ':' || $3,
             wait_signal_name = $2, wait_correlation_key = $3, wait_seq = $4,
             wait_until = $5, updated_at = $6
         WHERE id = $1",
    )
    .bind(w.at.workflow_id)
    .bind(w.name)
    .bind(w.correlation_key)
    .bind(w.seq)
    .bind(w.deadline)
    .bind(w.now)
    .execute(&mut *conn)
    .await?;
    let timeout = w.at.job(
        w.at.step,
        Wake::Timeout { wait_seq: w.seq },
        Some(w.deadline),
    );
    store.job_insert_in(conn, &timeout).await?;
    Ok(())
}
