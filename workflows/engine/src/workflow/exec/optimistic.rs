//! The lazy paths: a step run without a transaction of its own — a delivery's first step held
//! by a locked batch, or a successor against the snapshot its predecessor's checkpoint left.
//!
//! When the step needed nothing but its checkpoint (no `db()`, no external call) and ends in a
//! successor that may run inline too, or in the workflow's end, the checkpoint goes to its
//! batch or to the group committer, which fence and re-check it inside their statement.
//! Otherwise — the step opened its transaction (and holds the lock since), it ends another way,
//! or the batch did not apply it — the locked path finishes: the job is looked at under the
//! lock as on any delivery and the step's result checkpointed if the step is still due.
//!
//! Safe because a step's run has no effect until it commits: the step's database writes and
//! its external call happen only under the lock ([`crate::StepCtx::db`] and
//! [`crate::StepCtx::external_call`] take it first, checking that the workflow did not move),
//! and a checkpoint against a workflow that moved (an operator's cancel) is discarded. What the
//! lock-free run gives up: an operator's cancel does not wait for such a step, whose result is
//! then dropped; and in the rare case that another job also stands for the successor (a
//! re-delivery of an earlier step enqueued it — the batched move keeps the row's unique key, so
//! nothing stops that), both may run the step's body: one checkpoint wins, the other finds the
//! step journaled.
use super::after::{Done, after_step};
use super::locked::{Prepared, prepare_locked};
use super::{Continued, Run, Snapshot, step_timed};
use crate::workflow::batch::held::HeldHandle;
use crate::workflow::ctx::{CtxFor, LazyTx, Role, StepCtx};
use crate::workflow::db::lock::Journal;
use crate::workflow::db::transition::{Applied, BatchItem, BatchNext};
use crate::workflow::definition::Workflow;
use crate::workflow::outcome::{StepOutcome, StepResult};
use crate::workflow::wire::{Wake, idempotency_key};
use crate::{Outcome, Result};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Runs step `idx` of `def` against `snap` without a transaction (held by a locked batch when
/// `held` is set), then checkpoints it the cheapest way that is still safe.
pub(crate) async fn run_optimistic(
    run: Run<'_>,
    snap: Snapshot,
    (def, idx): (&Workflow, usize),
    held: Option<Arc<HeldHandle>>,
    next: &mut Continued,
) -> Result<Outcome> {
    let lease = &run.job.lease;
    let lazy = LazyTx {
        lease: lease.clone(),
        state: snap.wf.state,
        wait_seq: snap.wf.wait_seq,
        tried: AtomicBool::new(false),
        held: held.clone(),
    };
    let ctx_for = CtxFor {
        store: run.rt.store(),
        metrics: run.rt.metrics(),
        wf: &snap.wf,
        step: def.steps[idx].name,
        index: idx,
        lease,
        outputs: snap.outputs.clone(),
        role: Role::Step,
        timed_out: false,
        prior_call: None,
    };
    let (ctx, slot) = StepCtx::new(ctx_for, None, Some(lazy));
    let started = std::time::Instant::now();
    let result = def.steps[idx].run.call(ctx.clone()).await;
    let tx = slot.lock().await.take();
    if let Some(wait) = ctx.take_deferred() {
        // As on the locked path: nothing sent, nothing kept, no attempt used.
        if let Some(tx) = tx {
            tx.rollback().await?;
        }
        if let Some(held) = &held {
            held.release().await;
        }
        return Ok(Outcome::Snooze(wait));
    }
    let flagged = ctx.take_in_doubt();
    step_timed(
        run.rt,
        (&snap.wf.kind, def.steps[idx].name),
        started,
        &result,
        flagged.is_some(),
    );
    if let Some(tx) = tx {
        // The step opened its transaction: it holds the lock and finishes as a locked step.
        let journal = Journal {
            own: None,
            names: snap.journaled,
            outputs: snap.outputs,
        };
        let done = Done {
            result,
            flagged,
            journal,
        };
        return after_step(run, tx, (&snap.wf, def, idx), done, next).await;
    }
    if flagged.is_none()
        && let Some(item) = batchable(run, &snap, (def, idx), &result)
    {
        if let Some(outcome) = batched(run, snap, item, held.as_deref(), next).await {
            return Ok(outcome);
        }
        // Not applied: nothing was written; the locked path re-checks.
        return relock(run, def, idx, (result, None), held, next).await;
    }
    relock(run, def, idx, (result, flagged), held, next).await
}

/// The batched checkpoint of a step that ended in its successor (due now, and allowed to run
/// inline) or in the workflow's end; `None` for any other ending.
fn batchable(
    run: Run<'_>,
    snap: &Snapshot,
    (def, idx): (&Workflow, usize),
    result: &StepResult,
) -> Option<BatchItem> {
    let (output, next) = match result {
        Ok(StepOutcome::Finish(output)) => (output, None),
        Ok(StepOutcome::Continue(output)) => match def.steps.get(idx + 1) {
            None => (output, None),
            Some(n) if run.may_move(&snap.wf, def) => (output, Some(n.name)),
            Some(_) => return None,
        },
        _ => return None,
    };
    let wf = &snap.wf;
    let step = def.steps[idx].name;
    let next = match next {
        Some(name) => {
            let job = super::step_at(wf, def, idx).job(name, Wake::Entry, None);
            job.validate().ok()?;
            Some(BatchNext {
                step: name.to_string(),
                args: job.args,
                max_attempts: job.max_attempts,
            })
        }
        None => None,
    };
    let lease = &run.job.lease;
    Some(BatchItem {
        workflow_id: wf.id,
        step: step.to_string(),
        position: crate::workflow::db::position(idx),
        idempotency_key: idempotency_key(wf.id, step),
        output: output.clone(),
        attempt: lease.attempt,
        started_at: lease.attempted_at,
        job_id: lease.job_id,
        token: lease.token,
        state: wf.state.as_str(),
        wait_seq: wf.wait_seq,
        next,
    })
}

/// Hands the checkpoint to the step's locked batch (unless the batch went on without it) or to
/// the group committer. `Some` when it was applied: the job row moved on (the successor runs
/// next, against the snapshot, unless a transaction waited for the batch's locks — then it
/// takes the locked path behind it) or finished.
async fn batched(
    run: Run<'_>,
    snap: Snapshot,
    item: BatchItem,
    held: Option<&HeldHandle>,
    next: &mut Continued,
) -> Option<Outcome> {
    let lease = &run.job.lease;
    let output = item.output.clone();
    let step = item.step.clone();
    let successor = item
        .next
        .as_ref()
        .map(|n| (n.step.clone(), n.args.clone(), n.max_attempts));
    let group = |item| async {
        match run.rt.checkpointer() {
            Some(c) => c.submit(item).await,
            None => Applied::Rejected,
        }
    };
    let (applied, waited) = match held {
        Some(h) => match h.checkpoint(item).await {
            Ok(answer) => answer,
            Err(item) => (group(*item).await, false),
        },
        None => (group(item).await, false),
    };
    match (applied, successor) {
        (Applied::Finished, None) => {
            lease.mark_finished();
            Some(Outcome::Complete)
        }
        (Applied::Moved(attempted_at), Some((name, args, max_attempts))) => {
            let mut moved = run.job.clone();
            moved.args = args;
            moved.workflow_step = Some(name.clone());
            moved.lease = lease.for_next_step(attempted_at, max_attempts);
            next.moved = Some(moved);
            let Snapshot {
                mut wf,
                mut journaled,
                mut outputs,
            } = snap;
            journaled.insert(step.clone());
            outputs.insert(step, output);
            wf.moved_on_to(&name);
            next.carry = (!waited).then_some(Snapshot {
                wf,
                journaled,
                outputs,
            });
            Some(Outcome::Complete)
        }
        _ => None,
    }
}

/// The locked path for a step that ran lock-free: the job looked at under the lock, and the
/// step's result checkpointed if the step is still due exactly as the run found it.
async fn relock(
    run: Run<'_>,
    def: &Workflow,
    idx: usize,
    (result, flagged): (StepResult, Option<String>),
    held: Option<Arc<HeldHandle>>,
    next: &mut Continued,
) -> Result<Outcome> {
    if let Some(held) = &held {
        held.release().await;
    }
    let step = def.steps[idx].name;
    let ready = match prepare_locked(run, next).await? {
        Prepared::Done(outcome) => return Ok(outcome),
        Prepared::Run(ready) => *ready,
    };
    if ready.def.steps[ready.idx].name != step || ready.prior_call.is_some() || ready.timed_out {
        // Due again, but not as this run found it: run it afresh later.
        ready.tx.rollback().await?;
        return Ok(Outcome::retry(format!(
            "workflow {} moved while its step {step:?} ran; it runs again",
            ready.wf.id
        )));
    }
    let done = Done {
        result,
        flagged,
        journal: ready.journal,
    };
    after_step(run, ready.tx, (&ready.wf, def, idx), done, next).await
}
