//! The notification workflow (`payments.notification`): render, then send
//! once through the injected [`Notifier`](crate::notifier::Notifier).
//!
//! Steps:
//! 1. `render` — insert the `notifications` row (id = the dedupe id,
//!    `ON CONFLICT DO NOTHING`) and render subject and body from the template;
//!    a digest ([`super::digest`]) instead takes its user's batched rows and
//!    renders them as one message under its own id (`digest:{workflow_id}`).
//! 2. `send`   — one external call ([`StepCtx::external_call`]: the intent is
//!    committed on the step's journal row, under the step's idempotency key,
//!    before anything goes out): `Notifier::send` with the notification's
//!    id, the provider's dedupe key. `Rejected` fails the workflow and marks
//!    the row `rejected`; `Unavailable` (not sent) is retried with the
//!    store's backoff; success marks the row `sent`. `Unknown` (maybe sent),
//!    or a re-run that finds the intent without an answer (the worker died
//!    during the send), puts the step `in_doubt` (contract rule 3) and
//!    [`reconcile_send`] asks the provider ([`Notifier::delivery_status`]):
//!    delivered → the row is `sent` with the provider's message id and the
//!    workflow completes, nothing is sent again; certainly not delivered →
//!    [`Reconciled::NotReceived`]: the engine runs `send` again, under the
//!    same id; no answer → still in doubt, asked again with backoff and,
//!    after the last ask, left for an admin.
//!
//! Why a re-send after "not found" is not the blind re-send rule 3 forbids:
//! it follows the provider's own answer, and it carries the same id, so even
//! a first request still in flight somewhere cannot make a second delivery
//! (the provider dedupes on the id). The rejected alternative, failing the
//! step on "not found", would drop a notification that nothing had sent.
//!
//! [`Notifier::delivery_status`]: crate::notifier::Notifier::delivery_status
//! [`StepCtx::external_call`]: ledgerflow_engine::StepCtx::external_call
use super::{
    Deps, db, digest, now_param, output, reconcile_fn, refusal_or_retry, step_fn, str_field,
};
use crate::ids::UserId;
use crate::notifier::{self, Channel, Notification, Notifier, SendReceipt};
use ledgerflow_engine::workflow::{
    CallError, ExternalError, ReconcileResult, Reconciled, StepResult,
};
use ledgerflow_engine::{StepCtx, StepOutcome, Workflow};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use std::sync::Arc;

/// The workflow's kind.
pub const KIND: &str = "payments.notification";

/// The step that calls the provider (its idempotency key is
/// `"{workflow_id}:send"`).
pub const SEND_STEP: &str = "send";

/// What starts a notification.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotificationInput {
    /// The dedupe id, e.g. `trade:{id}:settled`.
    pub id: String,
    /// The recipient.
    pub user_id: UserId,
    /// Email or push.
    pub channel: Channel,
    /// Which template renders it.
    pub template: String,
    /// The template's data.
    #[serde(default)]
    pub payload: Value,
}

/// The definition, with the notifier injected.
pub(super) fn definition(deps: &Arc<Deps>) -> Workflow {
    Workflow::new(KIND, 1)
        .step("render", step_fn(deps, render))
        .step(SEND_STEP, step_fn(deps, send))
        .reconcile(reconcile_fn(deps, reconcile_send))
        .max_attempts(deps.config.notification_attempts)
}

/// Subject and body of `template` with `payload` (plain text, no markup).
pub fn render_template(template: &str, payload: &Value) -> (String, String) {
    let field = |name: &str| {
        payload
            .get(name)
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_default()
    };
    match template {
        "trade.settled" => (
            "Your trade was executed".to_string(),
            format!(
                "Trade {} ({} {}/{}) was filled and settled.",
                field("trade_id"),
                field("side"),
                field("base"),
                field("quote")
            ),
        ),
        "withdrawal.completed" => (
            "Your withdrawal was sent".to_string(),
            format!(
                "Withdrawal {} of {} {} to {} is confirmed (tx {}).",
                field("withdrawal_id"),
                field("amount"),
                field("asset"),
                field("address"),
                field("tx_hash")
            ),
        ),
        other => (other.to_string(), payload.to_string()),
    }
}

async fn render(_deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let input: NotificationInput = match ctx.input_as() {
        Ok(i) => i,
        Err(e) => return Ok(StepOutcome::Fail(e)),
    };
    let mut conn = db(&ctx).await?;
    let user = match crate::users::user(&mut conn, input.user_id).await {
        Ok(Some(u)) => u,
        Ok(None) => return refusal_or_retry(crate::Error::UserNotFound(input.user_id)),
        Err(e) => return refusal_or_retry(e),
    };
    let to = match input.channel {
        Channel::Email => user.email,
        Channel::Push => user.id.to_string(),
    };
    if input.template == digest::TEMPLATE {
        let id = notification_id(&ctx, &input);
        let items = digest::gather(&mut conn, input.user_id, &id).await?;
        if items.is_empty() {
            // Every row was taken by the digest before this one: nothing to send.
            return Ok(StepOutcome::Finish(
                json!({ "notification_id": id, "notifications": [] }),
            ));
        }
        let (subject, body) = digest::render(&items);
        return Ok(StepOutcome::Continue(json!({
            "to": to, "subject": subject, "body": body, "notifications": digest::ids(&items),
        })));
    }
    insert_row(&mut conn, &ctx, &input, false).await?;
    let (subject, body) = render_template(&input.template, &input.payload);
    Ok(StepOutcome::Continue(
        json!({ "to": to, "subject": subject, "body": body }),
    ))
}

/// Writes `input`'s `notifications` row (once: the id is its key), `batched` when a digest is
/// to carry it.
pub(super) async fn insert_row(
    conn: &mut PgConnection,
    ctx: &StepCtx,
    input: &NotificationInput,
    batched: bool,
) -> Result<(), String> {
    let channel = match input.channel {
        Channel::Email => "email",
        Channel::Push => "push",
    };
    sqlx::query(
        "INSERT INTO notifications (id, user_id, channel, template, payload, status, batched,
                                    created_at)
         VALUES ($1, $2, $3, $4, $5, 'pending', $6, coalesce($7::timestamptz, now()))
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&input.id)
    .bind(input.user_id)
    .bind(channel)
    .bind(&input.template)
    .bind(&input.payload)
    .bind(batched)
    .bind(now_param(ctx))
    .execute(conn)
    .await
    .map_err(|e| format!("insert notification: {e}"))?;
    Ok(())
}

/// The provider's dedupe id of the message: the input's id, or a digest's own.
fn notification_id(ctx: &StepCtx, input: &NotificationInput) -> String {
    if input.template == digest::TEMPLATE {
        digest::message_id(ctx.workflow_id())
    } else {
        input.id.clone()
    }
}

/// The message the `send` step sends: the rendered output under the
/// notification's id.
fn message(ctx: &StepCtx, input: &NotificationInput) -> Result<Notification, String> {
    let rendered = output(ctx, "render")?;
    Ok(Notification {
        id: notification_id(ctx, input),
        channel: input.channel,
        to: str_field(rendered, "to")?.to_owned(),
        subject: str_field(rendered, "subject")?.to_owned(),
        body: str_field(rendered, "body")?.to_owned(),
    })
}

/// The provider's three error kinds as the engine's.
fn call_error(e: notifier::Error) -> CallError {
    match e {
        notifier::Error::Rejected(r) => CallError::Rejected(r),
        notifier::Error::Unavailable(r) => CallError::NotSent(r),
        notifier::Error::Unknown(r) => CallError::Unknown(r),
    }
}

/// The step's (and the workflow's) output for a delivered notification.
fn sent_output(id: &str, receipt: &SendReceipt) -> Value {
    json!({
        "notification_id": id,
        "provider_message_id": receipt.provider_message_id,
        "duplicate": receipt.duplicate,
    })
}

/// Marks the row `sent` with the provider's message id, in the step's (or
/// the reconcile hook's) transaction; for a digest, every row it carries.
async fn mark_sent(ctx: &StepCtx, id: &str, provider_message_id: &str) -> Result<(), String> {
    let mut conn = db(ctx).await?;
    sqlx::query(
        "UPDATE notifications
         SET status = 'sent', provider_message_id = $2, error = NULL,
             sent_at = coalesce($3::timestamptz, now())
         WHERE id = $1 OR digest_id = $1",
    )
    .bind(id)
    .bind(provider_message_id)
    .bind(now_param(ctx))
    .execute(&mut *conn)
    .await
    .map_err(|e| format!("mark sent: {e}"))?;
    Ok(())
}

/// Marks the row (a digest's rows) `rejected` with the provider's reason.
async fn mark_rejected(ctx: &StepCtx, id: &str, reason: &str) -> Result<(), String> {
    let mut conn = db(ctx).await?;
    sqlx::query(
        "UPDATE notifications SET status = 'rejected', error = $2
         WHERE id = $1 OR digest_id = $1",
    )
    .bind(id)
    .bind(reason)
    .execute(&mut *conn)
    .await
    .map_err(|e| format!("mark rejected: {e}"))?;
    Ok(())
}

/// Step 2: send, once, through the engine's external call.
async fn send(deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let input: NotificationInput = ctx.input_as()?;
    let message = message(&ctx, &input)?;
    let id = message.id.clone();
    let notifier = Arc::clone(&deps.notifier);
    let answer = ctx
        .external_call(|_key| async move {
            let receipt = notifier.send(&message).await.map_err(call_error)?;
            serde_json::to_value(receipt).map_err(|e| CallError::Unknown(e.to_string()))
        })
        .await;
    match answer {
        Ok(receipt) => {
            let receipt: SendReceipt =
                serde_json::from_value(receipt).map_err(|e| format!("send receipt: {e}"))?;
            mark_sent(&ctx, &id, &receipt.provider_message_id).await?;
            Ok(StepOutcome::Finish(sent_output(&id, &receipt)))
        }
        Err(ExternalError::Rejected(reason)) => {
            mark_rejected(&ctx, &id, &reason).await?;
            Ok(StepOutcome::Fail(format!(
                "notification rejected: {reason}"
            )))
        }
        // Maybe delivered: never sent again from here, the reconcile hook asks.
        Err(ExternalError::InDoubt(reason)) => Ok(StepOutcome::InDoubt(reason)),
        // Certainly not delivered: retried with backoff, under the same id.
        Err(
            e
            @ (ExternalError::NotSent(_) | ExternalError::NotMade(_) | ExternalError::Deferred(_)),
        ) => Err(e.to_string()),
    }
}

/// Reconcile hook of `send`: asks the provider what became of the in-doubt
/// notification (by its id, the provider's dedupe key; `_key` is the
/// engine's step key, under which the intent was journaled).
pub async fn reconcile_send(deps: Arc<Deps>, ctx: StepCtx, _key: String) -> ReconcileResult {
    let input: NotificationInput = ctx.input_as()?;
    let message = message(&ctx, &input)?;
    reconcile_with(deps.notifier.as_ref(), &ctx, &message).await
}

async fn reconcile_with(
    notifier: &dyn Notifier,
    ctx: &StepCtx,
    message: &Notification,
) -> ReconcileResult {
    let receipt = match notifier.delivery_status(&message.id).await {
        // Delivered: settle on the provider's receipt; nothing is sent.
        Ok(Some(receipt)) => receipt,
        // Certainly not delivered: the engine sends it again, under the same
        // id (see the module docs for why this is not a blind re-send).
        Ok(None) => {
            return Ok(Reconciled::NotReceived(format!(
                "the provider has no notification {}",
                message.id
            )));
        }
        // The provider can't be reached: still in doubt, ask again later
        // (the engine's backoff, then an admin).
        Err(e) => {
            tracing::info!(notification_id = %message.id, error = %e,
                "in-doubt notification: the provider did not answer the lookup");
            return Ok(Reconciled::Unknown);
        }
    };
    mark_sent(ctx, &message.id, &receipt.provider_message_id).await?;
    Ok(Reconciled::Succeeded(sent_output(&message.id, &receipt)))
}
