//! Notification digests: one user's notifications debounced into one message.
//!
//! With [`NotificationDigest`] configured, an event (a settled trade, a completed withdrawal)
//! does not start its own notification workflow: its step writes the notification row marked
//! `batched` and starts the user's digest, a `payments.notification` instance with the
//! [`TEMPLATE`] template, debounced under `notify:user:{id}`
//! ([`workflow_start_debounced_in`]) — all in the step's transaction. The digest's first step
//! begins `window` after the user's latest event (at most `max_wait` after the first) and
//! takes every batched row of the user no digest has taken yet ([`gather`]); its send carries
//! them under the digest's own id, and marks them all sent.
//!
//! Nothing is lost between the two. An event whose start finds the digest pending locks its
//! first job's row until the event commits, so the claim that begins the digest (which skips
//! locked rows) comes after the event's row is visible; an event that finds the digest begun
//! starts the next one. A row is taken by one digest only (`digest_id IS NULL` is rechecked
//! under the row lock), and a digest that finds nothing left finishes without a message.
use super::notification::{self, NotificationInput, insert_row};
use crate::ids::UserId;
use crate::notifier::Channel;
use ledgerflow_engine::{
    StartDebounce, StepCtx, WorkflowId, WorkflowRegistry, workflow_start_debounced_in,
};
use serde_json::{Value, json};
use sqlx::PgConnection;
use std::time::Duration;

/// The template of a digest's notification input.
pub const TEMPLATE: &str = "digest";

/// How one user's notifications are debounced into a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotificationDigest {
    /// The digest goes out this long after the user's latest notification…
    pub window: Duration,
    /// …and no later than this long after the first one it carries.
    pub max_wait: Duration,
}

/// The debounce key of `user`'s digest.
pub fn key(user: UserId) -> String {
    format!("notify:user:{user}")
}

/// The provider message id of the digest run by workflow `id`.
pub fn message_id(id: WorkflowId) -> String {
    format!("digest:{id}")
}

/// Writes `input`'s notification row for a digest and starts (or pushes back) its user's
/// digest, on the step's connection. Returns the digest's workflow id.
pub(super) async fn enqueue(
    conn: &mut PgConnection,
    ctx: &StepCtx,
    notifications: &WorkflowRegistry,
    input: &NotificationInput,
    digest: &NotificationDigest,
) -> Result<WorkflowId, String> {
    insert_row(conn, ctx, input, true).await?;
    let digest_input = NotificationInput {
        id: TEMPLATE.to_string(),
        user_id: input.user_id,
        channel: Channel::Email,
        template: TEMPLATE.to_string(),
        payload: json!({}),
    };
    let args = serde_json::to_value(&digest_input).map_err(|e| e.to_string())?;
    let key = key(input.user_id);
    workflow_start_debounced_in(
        conn,
        ctx.store(),
        notifications,
        notification::KIND,
        &args,
        &StartDebounce {
            key: &key,
            window: digest.window,
            max_wait: Some(digest.max_wait),
        },
    )
    .await
    .map_err(|e| format!("start notification digest: {e}"))
}

/// One notification a digest carries.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(super) struct Item {
    id: String,
    template: String,
    payload: Value,
}

/// Takes every batched row of `user` that no digest has taken yet for digest `digest_id`, in
/// the order they were written.
pub(super) async fn gather(
    conn: &mut PgConnection,
    user: UserId,
    digest_id: &str,
) -> Result<Vec<Item>, String> {
    sqlx::query_as(
        "WITH taken AS (
           UPDATE notifications SET digest_id = $2
           WHERE user_id = $1 AND batched AND digest_id IS NULL
           RETURNING id, template, payload, created_at
         )
         SELECT id, template, payload FROM taken ORDER BY created_at, id",
    )
    .bind(user)
    .bind(digest_id)
    .fetch_all(conn)
    .await
    .map_err(|e| format!("gather the digest: {e}"))
}

/// The digest's subject and body: one line per notification, as its own template renders it.
pub(super) fn render(items: &[Item]) -> (String, String) {
    let subject = match items {
        [one] => notification::render_template(&one.template, &one.payload).0,
        _ => format!("{} updates on your account", items.len()),
    };
    let body = items
        .iter()
        .map(|i| {
            format!(
                "- {}",
                notification::render_template(&i.template, &i.payload).1
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    (subject, body)
}

/// The ids of the notifications a digest carries (the step's output, for audit).
pub(super) fn ids(items: &[Item]) -> Vec<&str> {
    items.iter().map(|i| i.id.as_str()).collect()
}
