//! The notification workflow (`payments.notification`): render, then send
//! once through the injected [`Notifier`](crate::notifier::Notifier).
//!
//! Steps:
//! 1. `render` — insert the `notifications` row (id = the dedupe id,
//!    `ON CONFLICT DO NOTHING`) and render subject and body from the template.
//! 2. `send`   — `Notifier::send` with the notification's id. The provider
//!    dedupes on that id, so `Unavailable` and `Unknown` are retried with the
//!    store's backoff (a repeat can't deliver twice); `Rejected` fails the
//!    workflow and marks the row `rejected`. Success marks it `sent`.
use super::{Deps, db, now_param, output, refusal_or_retry, step_fn, str_field};
use crate::ids::UserId;
use crate::notifier::{self, Channel, Notification};
use ledgerflow_engine::workflow::StepResult;
use ledgerflow_engine::{StepCtx, StepOutcome, Workflow};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;

/// The workflow's kind.
pub const KIND: &str = "payments.notification";

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
        .step("send", step_fn(deps, send))
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
    let channel = match input.channel {
        Channel::Email => "email",
        Channel::Push => "push",
    };
    sqlx::query(
        "INSERT INTO notifications (id, user_id, channel, template, payload, status, created_at)
         VALUES ($1, $2, $3, $4, $5, 'pending', coalesce($6::timestamptz, now()))
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&input.id)
    .bind(input.user_id)
    .bind(channel)
    .bind(&input.template)
    .bind(&input.payload)
    .bind(now_param(&ctx))
    .execute(&mut *conn)
    .await
    .map_err(|e| format!("insert notification: {e}"))?;
    let to = match input.channel {
        Channel::Email => user.email,
        Channel::Push => user.id.to_string(),
    };
    let (subject, body) = render_template(&input.template, &input.payload);
    Ok(StepOutcome::Continue(
        json!({ "to": to, "subject": subject, "body": body }),
    ))
}

async fn send(deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let input: NotificationInput = ctx.input_as()?;
    let rendered = output(&ctx, "render")?;
    let message = Notification {
        id: input.id.clone(),
        channel: input.channel,
        to: str_field(rendered, "to")?.to_owned(),
        subject: str_field(rendered, "subject")?.to_owned(),
        body: str_field(rendered, "body")?.to_owned(),
    };
    match deps.notifier.send(&message).await {
        Ok(receipt) => {
            let mut conn = db(&ctx).await?;
            sqlx::query(
                "UPDATE notifications
                 SET status = 'sent', provider_message_id = $2,
                     sent_at = coalesce($3::timestamptz, now())
                 WHERE id = $1",
            )
            .bind(&input.id)
            .bind(&receipt.provider_message_id)
            .bind(now_param(&ctx))
            .execute(&mut *conn)
            .await
            .map_err(|e| format!("mark sent: {e}"))?;
            Ok(StepOutcome::Finish(json!({
                "notification_id": input.id,
                "provider_message_id": receipt.provider_message_id,
                "duplicate": receipt.duplicate,
            })))
        }
        Err(notifier::Error::Rejected(reason)) => {
            let mut conn = db(&ctx).await?;
            sqlx::query("UPDATE notifications SET status = 'rejected', error = $2 WHERE id = $1")
                .bind(&input.id)
                .bind(&reason)
                .execute(&mut *conn)
                .await
                .map_err(|e| format!("mark rejected: {e}"))?;
            Ok(StepOutcome::Fail(format!(
                "notification rejected: {reason}"
            )))
        }
        // Not sent, or maybe sent: both are safe to retry, the provider
        // dedupes on the notification id.
        Err(e @ (notifier::Error::Unavailable(_) | notifier::Error::Unknown(_))) => {
            Err(e.to_string())
        }
    }
}
