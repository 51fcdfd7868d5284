//! Routing a delivery to its path, and the locked path up to the step's run: open the fenced
//! transaction, lock the workflow row, read the journal, and decide.
use super::after::{Done, after_step, checkpoint_advance};
use super::optimistic::run_optimistic;
use super::{Continued, Run, Snapshot, in_doubt, saga, step_at, step_timed};
use crate::signal::signal_consume_in;
use crate::workflow::ctx::{CtxFor, Role, StepCtx, take_tx};
use crate::workflow::db::failure::{Doubt, in_doubt_in};
use crate::workflow::db::lock::{Journal, Locked, PriorCall, lock_step};
use crate::workflow::db::transition::Attempt;
use crate::workflow::definition::Workflow;
use crate::workflow::state::{StepStatus, WorkflowState};
use crate::workflow::wire::Wake;
use crate::{FencedTx, Outcome, Result};
use std::sync::Arc;

/// Runs the step a job stands for. A successor that this delivery moved its own row on to runs
/// optimistically against what that checkpoint wrote (`carried`); a delivery's first step runs
/// in a locked batch if one holds it; everything else — and whatever those paths hand back —
/// the locked way ([`prepare_locked`], then the step, then [`after_step`]).
pub(crate) async fn run_step(
    run: Run<'_>,
    carried: Option<Snapshot>,
    next: &mut Continued,
) -> Result<Outcome> {
    let Run { rt, job, args, .. } = run;
    if let Some(snap) = carried
        && args.wake() == Wake::Entry
        && snap.runs_optimistically(&args.step)
        && let Some(def) = rt.registry().get(&snap.wf.kind, snap.wf.version).cloned()
        && let Some(idx) = def.index_of(&args.step)
    {
        super::record_path("inline");
        return run_optimistic(run, snap, (&def, idx), None, next).await;
    }
    // A delivery's first step: one delivery of the workflow at a time in this process, and
    // under the workflow's lock — a locked batch's if one holds it, else a transaction of its
    // own.
    let _turn = rt.gates().enter(args.workflow_id).await;
    if args.wake() == Wake::Entry
        && let Some(batcher) = rt.lock_batcher()
        && let Some(held) = batcher
            .hold(
                job.lease.job_id,
                job.lease.token,
                args.workflow_id,
                &args.step,
            )
            .await
    {
        let handle = Arc::new(held.handle);
        let (wf, journal) = held.rows;
        let snap = Snapshot::of(wf, journal);
        if let Some(def) = rt.registry().get(&snap.wf.kind, snap.wf.version).cloned()
            && let Some(idx) = def.index_of(&args.step)
        {
            super::record_path("batch");
            return run_optimistic(run, snap, (&def, idx), Some(handle), next).await;
        }
        // Not a step this worker runs: the locked path says what becomes of the job, once the
        // batch let go of the row.
        handle.release().await;
    }
    super::record_path("locked");
    let ready = match prepare_locked(run, next).await? {
        Prepared::Done(outcome) => return Ok(outcome),
        Prepared::Run(ready) => *ready,
    };
    run_ready(run, ready, next).await
}

/// Runs a step the locked path found due, in its transaction, and finishes it.
async fn run_ready(run: Run<'_>, ready: Ready, next: &mut Continued) -> Result<Outcome> {
    let Ready {
        tx,
        wf,
        def,
        idx,
        journal,
        timed_out,
        prior_call,
    } = ready;
    let ctx_for = CtxFor {
        store: run.rt.store(),
        metrics: run.rt.metrics(),
        wf: &wf,
        step: def.steps[idx].name,
        index: idx,
        lease: &run.job.lease,
        outputs: journal.outputs.clone(),
        role: Role::Step,
        timed_out,
        prior_call,
    };
    let (ctx, slot) = StepCtx::new(ctx_for, Some(tx), None);
    let started = std::time::Instant::now();
    let result = def.steps[idx].run.call(ctx.clone()).await;
    let flagged = ctx.take_in_doubt();
    step_timed(
        run.rt,
        (&wf.kind, def.steps[idx].name),
        started,
        &result,
        flagged.is_some(),
    );
    let tx = take_tx(&slot).await?;
    if let Some(wait) = ctx.take_deferred() {
        // The step's rate-limited call found no room: nothing was sent, nothing is kept, and
        // the job waits for the bucket without using an attempt.
        tx.rollback().await?;
        return Ok(Outcome::Snooze(wait));
    }
    let done = Done {
        result,
        flagged,
        journal,
    };
    after_step(run, tx, (&wf, &def, idx), done, next).await
}

/// What [`prepare_locked`] leaves to do.
pub(crate) enum Prepared {
    /// Nothing to run: the job's outcome (committed unless it is a retry).
    Done(Outcome),
    /// The step runs now, in `Ready::tx`.
    Run(Box<Ready>),
}

/// A step ready to run on the locked path: the fenced transaction holding the workflow row,
/// the definition and the journal.
pub(crate) struct Ready {
    pub tx: FencedTx,
    pub wf: Locked,
    pub def: Arc<Workflow>,
    pub idx: usize,
    pub journal: Journal,
    pub timed_out: bool,
    pub prior_call: Option<PriorCall>,
}

/// The locked path up to the step's run: opens the fenced transaction, locks the workflow row,
/// reads the journal and decides. Finished and stray jobs, re-deliveries of journaled steps,
/// compensations, reconciles, signal waits (and their arrivals) end here; a step that is due
/// comes back ready to run.
pub(crate) async fn prepare_locked(run: Run<'_>, next: &mut Continued) -> Result<Prepared> {
    let Run { rt, job, args, .. } = run;
    let mut tx = FencedTx::begin_unfenced(rt.store(), &job.lease).await?;
    let Some((wf, journal)) = lock_step(&mut tx, args.workflow_id, &args.step).await? else {
        let outcome = Outcome::fail(format!("workflow {} not found", args.workflow_id));
        tx.finish(outcome.clone()).await?;
        return Ok(Prepared::Done(outcome));
    };
    let wake = args.wake();
    let compensating = wf.state == WorkflowState::Compensating;
    if wf.state.is_finished() || compensating != matches!(wake, Wake::Compensate { .. }) {
        // Finished, or a forward step job while compensating, or a compensation job while
        // not: nothing to do.
        tx.complete().await?;
        return Ok(Prepared::Done(Outcome::Complete));
    }
    let Some(def) = rt.registry().get(&wf.kind, wf.version).cloned() else {
        tx.rollback().await?;
        return Ok(Prepared::Done(Outcome::retry(format!(
            "workflow {} v{} is not registered in this worker",
            wf.kind, wf.version
        ))));
    };
    let Some(idx) = def.index_of(&args.step) else {
        let outcome = Outcome::fail(format!(
            "workflow {} v{} has no step {:?}",
            wf.kind, wf.version, args.step
        ));
        tx.finish(outcome.clone()).await?;
        return Ok(Prepared::Done(outcome));
    };
    match wake {
        Wake::Compensate { seq } => {
            let outcome = saga::run_compensation(run, tx, (&wf, &def, idx), journal.own, seq);
            return outcome.await.map(Prepared::Done);
        }
        Wake::Reconcile { seq, n } => {
            let outcome = in_doubt::run_reconcile(run, tx, (&wf, &def, idx), journal.own, (seq, n));
            return outcome.await.map(Prepared::Done);
        }
        _ => {}
    }
    decide(run, tx, (wf, def, idx), journal, next).await
}

/// The locked path's decision for a forward step job whose workflow is at the step (or was):
/// a re-delivery of a journaled step, a stray job, a signal wait and its arrival, an in-doubt
/// call, or a step to run.
async fn decide(
    run: Run<'_>,
    mut tx: FencedTx,
    (wf, def, idx): (Locked, Arc<Workflow>, usize),
    journal: Journal,
    next: &mut Continued,
) -> Result<Prepared> {
    let Run { rt, job, args, .. } = run;
    // A `failed` row on a workflow that is not finished means an operator retried it (or its
    // call is sent again): the step runs again. A `calling` row holds the intent of the
    // step's external call. `in_doubt` steps are never re-run blindly (contract rule 3).
    let status = journal.own.as_ref().map(|j| j.status);
    if !StepStatus::reruns(status) {
        if status == Some(StepStatus::Completed) {
            redeliver(run, &mut tx, &wf, &def, idx).await?;
        }
        tx.complete().await?;
        return Ok(Prepared::Done(Outcome::Complete));
    }
    if wf.current_step.as_deref() != Some(args.step.as_str()) {
        // Not this step's turn (a stray job): nothing to do.
        tx.complete().await?;
        return Ok(Prepared::Done(Outcome::Complete));
    }
    let mut timed_out = false;
    if wf.state == WorkflowState::Waiting
        && let (Some(name), Some(key)) = (&wf.wait_signal_name, &wf.wait_correlation_key)
    {
        // The step is waiting for a signal: if it is here, it is the output.
        let store = rt.store();
        if let Some(payload) =
            signal_consume_in(tx.conn(), store, wf.id, &args.step, name, key).await?
        {
            checkpoint_advance(run, tx, (&wf, &def, idx), &payload, None, next).await?;
            return Ok(Prepared::Done(Outcome::Complete));
        }
        match args.wake() {
            Wake::Timeout { wait_seq } if wait_seq == wf.wait_seq => timed_out = true,
            _ => {
                // A spurious or stale wake-up: keep waiting.
                tx.complete().await?;
                return Ok(Prepared::Done(Outcome::Complete));
            }
        }
    }
    // Only a `calling` row's call belongs to this run of the step; a `failed` row's (an
    // operator retry, a re-send) is sent again under the same key.
    let own = journal.own.clone();
    let prior_call = own
        .filter(|j| j.status == StepStatus::Calling)
        .and_then(|j| j.call);
    if let Some(call) = &prior_call
        && call.state.in_doubt()
    {
        // An earlier attempt recorded its call's intent but no definite answer (it died
        // during the call, or the answer was unknown): never send again; ask the reconcile
        // hook or an admin.
        let reason = call
            .error
            .clone()
            .unwrap_or_else(|| "the call's intent is recorded without an answer".to_string());
        let doubt = Doubt {
            at: step_at(&wf, &def, idx),
            reason: &reason,
            attempt: attempt_of(&job.lease),
            reconcile: def.steps[idx].reconcile.is_some(),
        };
        in_doubt_in(tx.conn(), rt.store(), &doubt).await?;
        tracing::warn!(workflow_id = %wf.id, step = %args.step, reason, "workflow step in doubt");
        tx.complete().await?;
        return Ok(Prepared::Done(Outcome::Complete));
    }
    Ok(Prepared::Run(Box::new(Ready {
        tx,
        wf,
        def,
        idx,
        journal,
        timed_out,
        prior_call,
    })))
}

/// A re-delivery of a completed step: never run it again; only make sure its successor is
/// enqueued (a no-op when it already is).
async fn redeliver(
    run: Run<'_>,
    tx: &mut FencedTx,
    wf: &Locked,
    def: &Workflow,
    idx: usize,
) -> Result<()> {
    if let Some(next) = def.steps.get(idx + 1)
        && wf.current_step.as_deref() == Some(next.name)
    {
        let run_at = if wf.state == WorkflowState::Waiting && wf.wait_signal_name.is_none() {
            wf.wait_until
        } else {
            None
        };
        let job = step_at(wf, def, idx).job(next.name, Wake::Entry, run_at);
        run.rt.store().job_insert_in(tx.conn(), &job).await?;
    }
    Ok(())
}

/// The attempt a lease stands for, as a journal row records it.
pub(crate) fn attempt_of(lease: &crate::Lease) -> Attempt {
    Attempt {
        attempt: lease.attempt,
        started_at: lease.attempted_at,
    }
}
