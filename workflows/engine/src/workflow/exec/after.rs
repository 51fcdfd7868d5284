//! What follows a step's run on the locked path: its checkpoint (or its failure, its doubt,
//! its signal wait) in the fenced transaction that holds the workflow row.
use super::locked::attempt_of;
use super::{Continued, Run, Snapshot, step_at};
use crate::signal::{lock_signal_key, signal_consume_in};
use crate::workflow::db::failure::{Doubt, Failure, fail_step_in, in_doubt_in};
use crate::workflow::db::lock::{
    Journal, Locked, db_now, let_waiters_finish, lock_waiters, lock_workflow,
};
use crate::workflow::db::transition::{
    Checkpoint, Fence, Move, Next, checkpoint_in, checkpoint_move_in, stale,
};
use crate::workflow::db::wait::{SignalWait, wait_signal_in};
use crate::workflow::definition::Workflow;
use crate::workflow::outcome::{StepOutcome, StepResult};
use crate::workflow::wire::Wake;
use crate::{FencedTx, Outcome, Result};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::time::Duration;

/// A step's run as [`after_step`] gets it: what the step returned, the in-doubt reason its
/// external call left (if any), and the journal it ran against, from which the successor's
/// snapshot is made when the row moves on inline.
pub(crate) struct Done {
    pub result: StepResult,
    pub flagged: Option<String>,
    pub journal: Journal,
}

/// A step of a definition on a locked workflow row.
pub(crate) type On<'a> = (&'a Locked, &'a Workflow, usize);

/// Finishes a step's run in `tx`, which holds the workflow row.
pub(crate) async fn after_step(
    run: Run<'_>,
    tx: FencedTx,
    on: On<'_>,
    done: Done,
    next: &mut Continued,
) -> Result<Outcome> {
    let Done {
        result,
        flagged,
        journal,
    } = done;
    let in_doubt = match (&result, flagged) {
        (Ok(StepOutcome::InDoubt(reason)), _) => Some(reason.clone()),
        (_, Some(reason)) => Some(reason),
        _ => None,
    };
    if let Some(reason) = in_doubt {
        // The step's own writes are not applied; the step waits in doubt.
        tx.rollback().await?;
        return park_in_doubt(run, on, &reason).await;
    }
    let (wf, def, idx) = on;
    match result {
        Err(error) => {
            // The step's own writes are not applied.
            tx.rollback().await?;
            fail_or_retry(run, on, error).await
        }
        Ok(StepOutcome::Continue(output)) => {
            let contended = checkpoint_advance(run, tx, on, &output, None, next).await?;
            if let Some(step) = next.moved.as_ref().and_then(|m| m.workflow_step.clone())
                && !contended
            {
                // The row moved on inline: the successor runs against what this checkpoint
                // wrote, without the lock. Not when another transaction was waiting for this
                // one's locks (an operator's cancel, a duplicate delivery): the successor then
                // queues for the workflow's lock behind it on the locked path.
                let mut snap = Snapshot::of(wf.clone(), journal);
                let name = def.steps[idx].name.to_string();
                snap.journaled.insert(name.clone());
                snap.outputs.insert(name, output);
                snap.wf.moved_on_to(&step);
                next.carry = Some(snap);
            }
            Ok(Outcome::Complete)
        }
        Ok(StepOutcome::Finish(output)) => {
            checkpoint_step(run, tx, on, &output, Next::Finish, next).await?;
            Ok(Outcome::Complete)
        }
        Ok(StepOutcome::SleepUntil(at)) => {
            let output = json!({ "sleep_until": at });
            checkpoint_advance(run, tx, on, &output, Some(at), next).await?;
            Ok(Outcome::Complete)
        }
        Ok(StepOutcome::Fail(error)) => {
            let mut tx = tx;
            fail_in(run, &mut tx, on, &error).await?;
            tx.complete().await?;
            Ok(Outcome::Complete)
        }
        Ok(StepOutcome::InDoubt(reason)) => {
            // Handled above; kept for exhaustiveness.
            tx.rollback().await?;
            Ok(Outcome::retry(reason))
        }
        Ok(StepOutcome::WaitSignal {
            name,
            correlation_key,
            timeout,
        }) => wait_signal(run, tx, on, (&name, &correlation_key, timeout), next).await,
    }
}

/// Journals the step failed with `error` under this attempt (→ compensation or failure).
async fn fail_in(run: Run<'_>, tx: &mut FencedTx, on: On<'_>, error: &str) -> Result<()> {
    let (wf, def, idx) = on;
    let compensable = def.compensable(idx);
    let failure = Failure {
        at: step_at(wf, def, idx),
        error,
        attempt: Some(attempt_of(&run.job.lease)),
        compensable: &compensable,
    };
    fail_step_in(tx.conn(), run.rt.store(), &failure).await
}

/// A step error: retried with backoff, or on the job's last attempt the step fails.
async fn fail_or_retry(run: Run<'_>, on: On<'_>, error: String) -> Result<Outcome> {
    let lease = &run.job.lease;
    if !lease.is_last_attempt() {
        return Ok(Outcome::retry(error));
    }
    let mut tx = FencedTx::begin(run.rt.store(), lease).await?;
    let Some(wf) = lock_workflow(tx.conn(), on.0.id).await? else {
        tx.rollback().await?;
        return Ok(Outcome::retry(error));
    };
    fail_in(run, &mut tx, (&wf, on.1, on.2), &error).await?;
    let outcome = Outcome::fail(&error);
    tx.finish(outcome.clone()).await?;
    Ok(outcome)
}

/// The step's call is in doubt: in a new transaction (the step's writes were rolled back), the
/// step goes `in_doubt` and the workflow waits for its reconcile hook or an admin.
async fn park_in_doubt(run: Run<'_>, on: On<'_>, reason: &str) -> Result<Outcome> {
    let (_, def, idx) = on;
    let mut tx = FencedTx::begin(run.rt.store(), &run.job.lease).await?;
    let Some(wf) = lock_workflow(tx.conn(), on.0.id).await? else {
        tx.rollback().await?;
        return Ok(Outcome::retry(reason));
    };
    let doubt = Doubt {
        at: step_at(&wf, def, idx),
        reason,
        attempt: attempt_of(&run.job.lease),
        reconcile: def.steps[idx].reconcile.is_some(),
    };
    in_doubt_in(tx.conn(), run.rt.store(), &doubt).await?;
    tracing::warn!(workflow_id = %wf.id, step = def.steps[idx].name, reason,
        "workflow step in doubt");
    tx.complete().await?;
    Ok(Outcome::Complete)
}

/// A step that waits for a signal: the signal's payload at once if it is here (serialized with
/// its senders by the key's lock: a sender either committed before and we see its row, or runs
/// after our commit and sees us waiting), else the workflow parks with a timeout job.
async fn wait_signal(
    run: Run<'_>,
    mut tx: FencedTx,
    on: On<'_>,
    (name, key, timeout): (&str, &str, Duration),
    next: &mut Continued,
) -> Result<Outcome> {
    let (wf, def, idx) = on;
    let store = run.rt.store();
    lock_signal_key(tx.conn(), name, key).await?;
    if let Some(payload) =
        signal_consume_in(tx.conn(), store, wf.id, &run.args.step, name, key).await?
    {
        checkpoint_advance(run, tx, on, &payload, None, next).await?;
        return Ok(Outcome::Complete);
    }
    let now = db_now(tx.conn(), store).await?;
    let timeout = chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
    let wait = SignalWait {
        at: step_at(wf, def, idx),
        name,
        correlation_key: key,
        seq: wf.wait_seq.saturating_add(1),
        deadline: now
            .checked_add_signed(timeout)
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
        now,
    };
    wait_signal_in(tx.conn(), store, &wait).await?;
    tx.complete().await?;
    Ok(Outcome::Complete)
}

/// Journals the step completed with `output` and moves to the next step (due at `run_at`, a
/// durable timer), or completes the workflow after its last step. Returns whether another
/// transaction was waiting for this one's locks when the row moved on inline.
pub(crate) async fn checkpoint_advance(
    run: Run<'_>,
    tx: FencedTx,
    on: On<'_>,
    output: &Value,
    run_at: Option<DateTime<Utc>>,
    next: &mut Continued,
) -> Result<bool> {
    let (_, def, idx) = on;
    let then = match def.steps.get(idx + 1) {
        Some(n) => Next::Advance {
            step: n.name,
            run_at,
        },
        None => Next::Finish,
    };
    checkpoint_step(run, tx, on, output, then, next).await
}

/// A step's checkpoint in ONE statement, then the commit: its journal row, the workflow row (on
/// to the next step, or completed), the next step's job and the completion of the current job
/// — or, when the successor is due now and may run inline, this job row moved on to it
/// ([`move_on`]).
///
/// A successor due now in the queue the job came from is enqueued WITHOUT a NOTIFY; the lease
/// asks its runner to look at that queue at once instead
/// ([`crate::Lease::wants_own_queue_woken`]). Postgres serializes the commits of notifying
/// transactions (one at a time, each with its WAL flush), which capped workflows at roughly
/// one step per fsync; without it concurrent checkpoints share their flushes (group commit).
async fn checkpoint_step(
    run: Run<'_>,
    mut tx: FencedTx,
    on: On<'_>,
    output: &Value,
    then: Next<'_>,
    next: &mut Continued,
) -> Result<bool> {
    let (wf, def, idx) = on;
    let lease = &run.job.lease;
    if let Next::Advance { step, run_at: None } = then
        && run.may_move(wf, def)
    {
        return move_on(run, tx, on, output, step, next).await;
    }
    let own_queue = matches!(then, Next::Advance { run_at: None, .. }) && wf.queue == run.job.queue;
    let fence = Fence {
        job_id: lease.job_id,
        token: lease.token,
    };
    let cp = Checkpoint {
        at: step_at(wf, def, idx),
        output,
        next: then,
        attempt: Some(attempt_of(lease)),
        fence: Some(fence),
        notify: run.rt.store().config().notify && !own_queue,
    };
    if !checkpoint_in(tx.conn(), run.rt.store(), &cp).await? {
        tx.rollback().await?;
        return Err(stale(fence));
    }
    tx.commit().await?;
    if own_queue {
        lease.mark_own_queue_fed();
    }
    lease.mark_finished();
    Ok(false)
}

/// The checkpoint of a step whose successor runs inline: commits the move and hands the job
/// on as the successor's delivery (the lease is not finished: the same call runs the successor
/// next). When another transaction waits for this one's locks (an operator's cancel), it is
/// let finish before the successor asks for the workflow's lock — as a locked batch does
/// (decision 0004) — and the successor takes the locked path. Returns whether one waited.
async fn move_on(
    run: Run<'_>,
    mut tx: FencedTx,
    on: On<'_>,
    output: &Value,
    step: &str,
    next: &mut Continued,
) -> Result<bool> {
    let (wf, def, idx) = on;
    let lease = &run.job.lease;
    let at = step_at(wf, def, idx);
    let next_job = at.job(step, Wake::Entry, None);
    next_job.validate()?;
    let fence = Fence {
        job_id: lease.job_id,
        token: lease.token,
    };
    let m = Move {
        at,
        output,
        attempt: attempt_of(lease),
        fence,
        next_step: step,
        next_args: &next_job.args,
        next_key: next_job.unique_key.as_deref(),
        ttl_ms: crate::store::ms(run.rt.store().config().lease_ttl),
    };
    let Some((attempted_at, contended)) = checkpoint_move_in(tx.conn(), run.rt.store(), &m).await?
    else {
        tx.rollback().await?;
        return Err(stale(fence));
    };
    let waiters = if contended {
        lock_waiters(tx.conn()).await.ok()
    } else {
        None
    };
    tx.commit().await?;
    if let Some((Some(pids), since)) = waiters {
        let _ = let_waiters_finish(run.rt.store().pool(), &pids, since).await;
    }
    let mut moved = run.job.clone();
    moved.args = next_job.args;
    moved.workflow_step = Some(step.to_string());
    moved.lease = lease.for_next_step(attempted_at, next_job.max_attempts);
    next.moved = Some(moved);
    Ok(contended)
}
