//! In-doubt steps: asking a step's reconcile hook what became of its external call, and
//! settling the step by the answer — or, from an admin, by [`settle_in`].
use super::after::On;
use super::{Run, step_at};
use crate::workflow::ctx::{CtxFor, Role, StepCtx, take_tx};
use crate::workflow::db::failure::{
    Failure, fail_step_in, mark_resolved_in, reconcile_asked_in, resend_in,
};
use crate::workflow::db::lock::{Journaled, db_now, load_outputs};
use crate::workflow::db::transition::{Checkpoint, Next, checkpoint_in};
use crate::workflow::outcome::{Reconciled, Resolution};
use crate::workflow::state::{StepStatus, WorkflowState};
use crate::workflow::wire::{Wake, idempotency_key};
use crate::{FencedTx, Outcome, Result, Store};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// Asks the reconcile hook of in-doubt step `idx` (the `n`-th ask in the doubt that began at
/// the workflow's `wait_seq` `seq`) what became of its call, in `tx`.
pub(crate) async fn run_reconcile(
    run: Run<'_>,
    mut tx: FencedTx,
    on: On<'_>,
    own: Option<Journaled>,
    (seq, n): (i32, i32),
) -> Result<Outcome> {
    let (wf, def, idx) = on;
    let step = def.steps[idx].name;
    let in_doubt = own
        .as_ref()
        .is_some_and(|j| j.status == StepStatus::InDoubt);
    let Some(reconcile) = def.steps[idx].reconcile.clone().filter(|_| {
        in_doubt
            && wf.state == WorkflowState::Waiting
            && wf.current_step.as_deref() == Some(step)
            && wf.wait_seq == seq
    }) else {
        // Settled meanwhile (by an earlier hook run or an admin): nothing to do.
        tx.complete().await?;
        return Ok(Outcome::Complete);
    };
    let ctx_for = CtxFor {
        store: run.rt.store(),
        metrics: run.rt.metrics(),
        wf,
        step,
        index: idx,
        lease: &run.job.lease,
        outputs: load_outputs(tx.conn(), wf.id).await?,
        role: Role::Reconcile,
        timed_out: false,
        prior_call: own.and_then(|j| j.call),
    };
    let (ctx, slot) = StepCtx::new(ctx_for, Some(tx), None);
    let result = reconcile
        .call(ctx.clone(), idempotency_key(wf.id, step))
        .await;
    let mut tx = take_tx(&slot).await?;
    if let Some(wait) = ctx.take_deferred() {
        // Its rate-limited look-up found no room: not an ask; again at the bucket's turn.
        tx.rollback().await?;
        return Ok(Outcome::Snooze(wait));
    }
    reconcile_asked_in(tx.conn(), wf.id, step, n).await?;
    let store = run.rt.store();
    let verdict = match result {
        Err(error) => {
            tx.rollback().await?;
            return Ok(Outcome::retry(error));
        }
        Ok(Reconciled::Unknown) => {
            if n < def.reconcile_attempts {
                let now = db_now(tx.conn(), store).await?;
                let delay = chrono::Duration::from_std(store.config().retry.backoff(n))
                    .unwrap_or(chrono::Duration::MAX);
                let at = now
                    .checked_add_signed(delay)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                let ask = Wake::Reconcile { seq, n: n + 1 };
                let job = step_at(wf, def, idx).job(step, ask, Some(at));
                store.job_insert_in(tx.conn(), &job).await?;
            }
            // Else: it stays in doubt, waiting for an admin.
            tx.complete().await?;
            return Ok(Outcome::Complete);
        }
        Ok(Reconciled::Succeeded(output)) => Verdict::Succeeded(output),
        Ok(Reconciled::Failed(error)) => Verdict::Failed(error),
        Ok(Reconciled::NotReceived(reason)) => Verdict::NotReceived(reason),
    };
    settle_in(tx.conn(), store, on, verdict, "reconcile").await?;
    tx.complete().await?;
    Ok(Outcome::Complete)
}

/// How an in-doubt step is settled.
pub(crate) enum Verdict {
    /// The call took effect: the step completes with this output.
    Succeeded(serde_json::Value),
    /// It did not: the step fails (→ compensation).
    Failed(String),
    /// It never arrived: the step runs again and re-sends under the same key.
    NotReceived(String),
}

impl From<Resolution> for Verdict {
    fn from(r: Resolution) -> Self {
        match r {
            Resolution::Succeeded(output) => Verdict::Succeeded(output),
            Resolution::Failed(error) => Verdict::Failed(error),
        }
    }
}

/// Settles in-doubt step `idx` by `verdict`, recording who did (`by`), on the caller's
/// connection (which holds the workflow row).
pub(crate) async fn settle_in(
    conn: &mut PgConnection,
    store: &Store,
    (wf, def, idx): On<'_>,
    verdict: Verdict,
    by: &str,
) -> Result<()> {
    let at = step_at(wf, def, idx);
    mark_resolved_in(conn, wf.id, at.step, by).await?;
    let compensable = def.compensable(idx);
    let fail = |error| Failure {
        at,
        error,
        attempt: None,
        compensable: &compensable,
    };
    match verdict {
        Verdict::Succeeded(output) => {
            let next = match def.steps.get(idx + 1) {
                Some(n) => Next::Advance {
                    step: n.name,
                    run_at: None,
                },
                None => Next::Finish,
            };
            let cp = Checkpoint {
                at,
                output: &output,
                next,
                attempt: None,
                fence: None,
                notify: store.config().notify,
            };
            checkpoint_in(conn, store, &cp).await?;
        }
        Verdict::Failed(error) => fail_step_in(conn, store, &fail(&error)).await?,
        Verdict::NotReceived(reason) => {
            let sends = (reason.as_str(), def.max_resends);
            match resend_in(conn, store, &at, sends).await? {
                Some(resent) => tracing::info!(workflow_id = %wf.id, step = at.step, resent,
                    reason, "in-doubt call never received: sending it again under the same key"),
                None => {
                    let error = format!(
                        "the call was never received after {} sends: {reason}",
                        def.max_resends + 1
                    );
                    fail_step_in(conn, store, &fail(&error)).await?;
                }
            }
        }
    }
    Ok(())
}
