//! Sagas: running the compensation of a completed step while the workflow is `compensating`,
//! then moving compensation on to the previous completed step (or ending `compensated`).
use super::after::On;
use super::{Run, step_at};
use crate::workflow::ctx::{CtxFor, Role, StepCtx, take_tx};
use crate::workflow::db::failure::{compensated_in, compensation_failed_in};
use crate::workflow::db::lock::{Journaled, load_outputs};
use crate::workflow::state::StepStatus;
use crate::{FencedTx, Outcome, Result};
use serde_json::Value;

/// Runs the compensation of completed step `idx` (the workflow is `compensating` and at this
/// step, in its `seq`-th wait), in `tx`, and journals it; a stale job does nothing.
pub(crate) async fn run_compensation(
    run: Run<'_>,
    mut tx: FencedTx,
    on: On<'_>,
    own: Option<Journaled>,
    seq: i32,
) -> Result<Outcome> {
    let (wf, def, idx) = on;
    let step = def.steps[idx].name;
    let completed = own.filter(|j| j.status == StepStatus::Completed);
    let Some(compensate) = def.steps[idx].compensate.clone().filter(|_| {
        completed.is_some() && wf.current_step.as_deref() == Some(step) && wf.wait_seq == seq
    }) else {
        // Stale (already compensated, or not this step's turn).
        tx.complete().await?;
        return Ok(Outcome::Complete);
    };
    let output = completed.and_then(|j| j.output).unwrap_or(Value::Null);
    let ctx_for = CtxFor {
        store: run.rt.store(),
        metrics: run.rt.metrics(),
        wf,
        step,
        index: idx,
        lease: &run.job.lease,
        outputs: load_outputs(tx.conn(), wf.id).await?,
        role: Role::Compensation,
        timed_out: false,
        prior_call: None,
    };
    let (ctx, slot) = StepCtx::new(ctx_for, Some(tx), None);
    let result = compensate.call(ctx.clone(), output).await;
    let mut tx = take_tx(&slot).await?;
    if let Some(wait) = ctx.take_deferred() {
        // Its rate-limited call found no room: nothing kept, no attempt used.
        tx.rollback().await?;
        return Ok(Outcome::Snooze(wait));
    }
    let at = step_at(wf, def, idx);
    let lease = &run.job.lease;
    match result {
        Ok(comp_output) => {
            let compensable = def.compensable(idx);
            let done = (&comp_output, lease.attempt);
            compensated_in(tx.conn(), run.rt.store(), &at, done, &compensable).await?;
            tx.complete().await?;
            Ok(Outcome::Complete)
        }
        Err(error) => {
            tx.rollback().await?;
            if !lease.is_last_attempt() {
                return Ok(Outcome::retry(error));
            }
            // Exhausted: the workflow fails and needs an operator.
            let mut tx = FencedTx::begin(run.rt.store(), lease).await?;
            compensation_failed_in(tx.conn(), run.rt.store(), &at, (&error, lease.attempt)).await?;
            let outcome = Outcome::fail(&error);
            tx.finish(outcome.clone()).await?;
            Ok(outcome)
        }
    }
}
