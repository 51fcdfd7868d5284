//! A claimed job: what a handler gets, the one `UPDATE … SET` that leases the jobs a claim
//! chose (the fast and the controlled claims both use it), and its row mapping.
use crate::Result;
use crate::lease::Lease;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// A job claimed under a lease, ready for its handler.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: crate::JobId,
    pub queue: String,
    pub kind: String,
    pub args: serde_json::Value,
    pub priority: i16,
    pub timeout: Option<Duration>,
    pub workflow_id: Option<Uuid>,
    pub workflow_step: Option<String>,
    pub created_at: DateTime<Utc>,
    pub run_at: DateTime<Utc>,
    /// The attempt's lease (attempt number, token, owner).
    pub lease: Lease,
    /// Claimed through flow control (its queue has keys or limits): its end may free a slot
    /// that a job left waiting needs, so the runner looks again for work when it ends.
    pub flow: bool,
    /// The W3C trace context the job was enqueued under (`None`: tracing was off).
    pub traceparent: Option<String>,
}

/// `UPDATE jobs j SET <lease> FROM <from> WHERE <where> RETURNING <claimed columns>`: the one
/// statement part that leases chosen jobs, for the fast and the controlled claims. `t.n` is
/// "now", `$lease_ms` the lease's length and `$owner` its owner; the columns are those
/// [`claimed_from_row`] reads.
macro_rules! lease_update {
    ($from:literal, $where:literal, $owner:literal, $lease_ms:literal) => {
        concat!(
            "UPDATE jobs j
             SET state = 'running', attempt = j.attempt + 1, attempted_at = t.n,
                 lease_owner = ",
            $owner,
            ", lease_token = gen_random_uuid(),
                 lease_expires_at = t.n + ",
            $lease_ms,
            " * interval '1 millisecond'
             FROM ",
            $from,
            " WHERE ",
            $where,
            " RETURNING j.id, j.kind, j.args, j.priority, j.timeout_ms, j.workflow_id,
                       j.workflow_step, j.created_at, j.run_at, j.lease_token, j.attempt,
                       j.max_attempts, j.attempted_at, j.traceparent"
        )
    };
}
pub(crate) use lease_update;

/// A claimed job from a row of [`lease_update`]'s columns.
pub(crate) fn claimed_from_row(
    r: &PgRow,
    queue: &str,
    owner: &Arc<str>,
    flow: bool,
) -> Result<ClaimedJob> {
    let id: Uuid = r.try_get(0)?;
    let timeout_ms: Option<i32> = r.try_get(4)?;
    Ok(ClaimedJob {
        id,
        queue: queue.to_string(),
        kind: r.try_get(1)?,
        args: r.try_get(2)?,
        priority: r.try_get(3)?,
        timeout: timeout_ms.map(|m| Duration::from_millis(u64::try_from(m).unwrap_or(0))),
        workflow_id: r.try_get(5)?,
        workflow_step: r.try_get(6)?,
        created_at: r.try_get(7)?,
        run_at: r.try_get(8)?,
        lease: Lease::new(
            id,
            r.try_get(9)?,
            owner.clone(),
            r.try_get(10)?,
            r.try_get(11)?,
            r.try_get(12)?,
        ),
        flow,
        traceparent: r.try_get(13)?,
    })
}
