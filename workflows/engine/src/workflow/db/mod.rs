//! Every statement of the workflow runtime (layer 2), one file per concern: locks and journal
//! reads ([`lock`]), the transitions side by side ([`transition`], [`failure`], [`wait`]), the
//! external call's intent and answer ([`call`]), starts ([`start`], [`debounce`]), operator
//! statements ([`operator`]) and reads ([`read`]).
//!
//! Functions here take plain parameter structs (a step's place, a completion, a checkpoint
//! item) — never a definition, a step context or the runtime — so the execution layer decides
//! and this layer only writes. Nothing above this layer calls `sqlx` directly.
use crate::NewJob;
use crate::workflow::state::WorkflowState;
use crate::workflow::wire::{Wake, WorkflowId, step_job};
use chrono::{DateTime, Utc};

pub(crate) mod call;
pub(crate) mod debounce;
pub(crate) mod failure;
pub(crate) mod lock;
pub(crate) mod operator;
pub mod read;
pub(crate) mod start;
pub(crate) mod transition;
pub(crate) mod wait;

/// A step of a workflow instance, as the statements that journal it and enqueue its jobs need
/// it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepAt<'a> {
    pub workflow_id: WorkflowId,
    /// The queue the workflow's step jobs go to.
    pub queue: &'a str,
    pub step: &'a str,
    /// The step's index in its definition.
    pub position: i32,
    /// Attempts each of the workflow's step jobs gets.
    pub max_attempts: i32,
}

impl StepAt<'_> {
    /// The job that wakes `step` of this workflow for `wake`, due at `run_at` (now: `None`).
    pub fn job(&self, step: &str, wake: Wake, run_at: Option<DateTime<Utc>>) -> NewJob {
        step_job(
            self.workflow_id,
            self.queue,
            step,
            wake,
            run_at,
            Some(self.max_attempts),
        )
    }
}

/// Where a step that ran without the workflow's lock found the workflow: it may take the lock
/// and go on only if the workflow is still there ([`lock::lock_unchanged`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Unchanged<'a> {
    pub id: WorkflowId,
    pub state: WorkflowState,
    pub step: &'a str,
    pub wait_seq: i32,
}

/// A position as stored (`i32`), saturating.
pub(crate) fn position(index: usize) -> i32 {
    i32::try_from(index).unwrap_or(i32::MAX)
}

/// Prices sequential scans out of a batching task's own connection's plans (see
/// `batch::conn::BatchConn` on why): every lookup of the batch statements has an index.
pub(crate) async fn batch_session_in(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await?;
    Ok(())
}
