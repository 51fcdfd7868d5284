//! Webhook processing (`payments.webhook`): a verified, stored exchange
//! event becomes the signal its workflow waits for.
//!
//! The intake (api) verifies the signature and commits the raw body to the
//! inbox, then starts this workflow with the event's JSON (unique key
//! `webhook:{event id}`, see [`start_in`]). Its one step, `signal`, sends
//! signal `event.type` (`order.filled`, `order.cancelled`,
//! `withdrawal.confirmed`) with correlation key = the event's idempotency
//! key and dedupe key = the event id, in the step's fenced transaction: a
//! redelivered event is applied once, and a signal that arrives before its
//! waiter is kept for it. When the intake passed the event's inbox row
//! (`inbox_id` in the input), the same transaction marks that row processed,
//! so `inbox.processed_at` is set exactly when the signal is committed.
use super::db;
use crate::exchange::Event;
use ledgerflow_engine::inbox::{InboxEntry, InboxInserted, inbox_mark_processed_in};
use ledgerflow_engine::workflow::StepResult;
use ledgerflow_engine::{
    SignalSent, StepCtx, StepOutcome, Store, Workflow, WorkflowId, WorkflowRegistry,
    signal_send_in, workflow_start_for_inbox_in, workflow_start_in,
};
use serde_json::json;
use sqlx::PgConnection;

/// The workflow's kind.
pub const KIND: &str = "payments.webhook";

/// The definition (no injected dependency: it only writes a signal).
pub(super) fn definition() -> Workflow {
    Workflow::new(KIND, 1).step("signal", signal_step)
}

/// Sends the signal of `event` on the caller's connection (inside their
/// transaction).
pub async fn signal_event_in(
    conn: &mut PgConnection,
    store: &Store,
    event: &Event,
) -> crate::Result<SignalSent> {
    let payload = serde_json::to_value(event)
        .map_err(|e| crate::Error::Invalid(format!("event payload: {e}")))?;
    Ok(signal_send_in(
        conn,
        store,
        event.kind.as_str(),
        event.idempotency_key.as_str(),
        &payload,
        &event.id,
    )
    .await?)
}

/// Starts the processing of a verified event (once per event id).
pub async fn start_in(
    conn: &mut PgConnection,
    store: &Store,
    registry: &WorkflowRegistry,
    event: &Event,
) -> crate::Result<WorkflowId> {
    start_for_inbox_in(conn, store, registry, event, None).await
}

/// Starts the processing of a verified event stored as inbox row `inbox_id`
/// (once per event id); the step marks that row processed when it commits
/// the signal.
pub async fn start_for_inbox_in(
    conn: &mut PgConnection,
    store: &Store,
    registry: &WorkflowRegistry,
    event: &Event,
    inbox_id: Option<i64>,
) -> crate::Result<WorkflowId> {
    // `inbox_id` is optional in the input (a wire format): workflows started
    // before it existed, or by callers without an inbox row, still run.
    let input = match inbox_id {
        Some(id) => json!({ "event": event, "inbox_id": id }),
        None => json!({ "event": event }),
    };
    Ok(workflow_start_in(
        conn,
        store,
        registry,
        KIND,
        &input,
        Some(&format!("webhook:{}", event.id)),
    )
    .await?)
}

/// Stores a verified delivery in the inbox and, when it is new, starts its
/// processing workflow (input `{"event", "inbox_id"}`, as
/// [`start_for_inbox_in`] gives it) — one statement, atomic on its own, so
/// the webhook intake runs it without a transaction around it. Returns the
/// inbox outcome (a duplicate starts nothing).
pub async fn record_and_start_in(
    conn: &mut PgConnection,
    store: &Store,
    registry: &WorkflowRegistry,
    entry: &InboxEntry<'_>,
    event: &Event,
) -> crate::Result<InboxInserted> {
    let input = json!({ "event": event });
    let key = format!("webhook:{}", event.id);
    let (inserted, _workflow) =
        workflow_start_for_inbox_in(conn, store, registry, entry, (KIND, &input, Some(&key)))
            .await?;
    Ok(inserted)
}

async fn signal_step(ctx: StepCtx) -> StepResult {
    let event: Event = match ctx
        .input()
        .get("event")
        .cloned()
        .map(serde_json::from_value)
    {
        Some(Ok(e)) => e,
        Some(Err(e)) => return Ok(StepOutcome::Fail(format!("not an exchange event: {e}"))),
        None => return Ok(StepOutcome::Fail("input has no event".to_string())),
    };
    let inbox_id = ctx
        .input()
        .get("inbox_id")
        .and_then(serde_json::Value::as_i64);
    let mut conn = db(&ctx).await?;
    let sent = signal_event_in(&mut conn, ctx.store(), &event)
        .await
        .map_err(|e| e.to_string())?;
    // Same fenced transaction as the signal: the row is processed iff the
    // signal committed (a retried step finds it processed already: false).
    if let Some(id) = inbox_id {
        inbox_mark_processed_in(&mut conn, id)
            .await
            .map_err(|e| format!("marking inbox row {id} processed: {e}"))?;
    }
    let woke = match &sent {
        SignalSent::New { woke, .. } => woke.clone(),
        SignalSent::Duplicate => Vec::new(),
    };
    Ok(StepOutcome::Finish(json!({
        "event_id": event.id,
        "signal": event.kind.as_str(),
        "new": sent.is_new(),
        "woke": woke,
    })))
}
