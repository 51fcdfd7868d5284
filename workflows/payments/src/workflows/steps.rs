//! Step pieces the trade and withdrawal workflows share: the status of their
//! domain row, the funds hold and its release, the failure arms of their one
//! exchange call, the domain event and the user's notification.
//!
//! The two workflows differ here only in their table (`trades` /
//! `withdrawals`) and a few words, so [`Row`] names the table and each
//! statement stays a complete static string per table: no SQL is assembled
//! at run time (the rejected alternative, `format!` with a table name, would
//! make every statement's text depend on a branch nobody reads in review).
use super::digest::NotificationDigest;
use super::notification::{self, NotificationInput};
use super::{EVENTS_TOPIC, db, now_param, output, refusal_or_retry, str_field};
use crate::ids::AccountId;
use crate::ledger;
use crate::money::Amount;
use ledgerflow_engine::outbox::{NewOutboxEvent, outbox_insert_in};
use ledgerflow_engine::workflow::{CompensationResult, ExternalError, StepResult};
use ledgerflow_engine::{StepCtx, StepOutcome, WorkflowId, WorkflowRegistry, workflow_start_in};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sqlx::PgConnection;

/// The domain row a money workflow keeps its status in (its id is the
/// workflow id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Row {
    /// `trades`.
    Trade,
    /// `withdrawals`.
    Withdrawal,
}

impl Row {
    /// Sets the row's status (and its error, when one is given).
    pub(super) async fn set_status(
        self,
        conn: &mut PgConnection,
        ctx: &StepCtx,
        status: &str,
        error: Option<&str>,
    ) -> Result<(), String> {
        let (sql, what) = match self {
            Row::Trade => (
                "UPDATE trades SET status = $2, error = coalesce($3, error),
                        updated_at = coalesce($4::timestamptz, now())
                 WHERE id = $1",
                "update trade",
            ),
            Row::Withdrawal => (
                "UPDATE withdrawals SET status = $2, error = coalesce($3, error),
                        updated_at = coalesce($4::timestamptz, now())
                 WHERE id = $1",
                "update withdrawal",
            ),
        };
        sqlx::query(sql)
            .bind(ctx.workflow_id())
            .bind(status)
            .bind(error)
            .bind(now_param(ctx))
            .execute(conn)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        Ok(())
    }

    /// Records the exchange's id for the order or withdrawal and moves the
    /// row to `placed` / `submitted`.
    pub(super) async fn record_at_exchange(
        self,
        conn: &mut PgConnection,
        ctx: &StepCtx,
        exchange_id: &str,
    ) -> Result<(), String> {
        let (sql, status) = match self {
            Row::Trade => (
                "UPDATE trades SET exchange_order_id = $2 WHERE id = $1",
                "placed",
            ),
            Row::Withdrawal => (
                "UPDATE withdrawals SET exchange_withdrawal_id = $2 WHERE id = $1",
                "submitted",
            ),
        };
        sqlx::query(sql)
            .bind(ctx.workflow_id())
            .bind(exchange_id)
            .execute(&mut *conn)
            .await
            .map_err(|e| e.to_string())?;
        self.set_status(conn, ctx, status, None).await
    }
}

/// A journaled step output as `T`.
pub(super) fn journaled<T: DeserializeOwned>(ctx: &StepCtx, step: &str) -> Result<T, String> {
    T::deserialize(output(ctx, step)?).map_err(|e| format!("{step} output: {e}"))
}

/// How a `validate` step ends: its checked value is journaled for the later
/// steps; a business refusal fails the workflow, anything else retries.
pub(super) fn validated_outcome<T: Serialize>(checked: crate::Result<T>) -> StepResult {
    match checked {
        Ok(v) => Ok(StepOutcome::Continue(
            serde_json::to_value(v).map_err(|e| e.to_string())?,
        )),
        Err(e) => refusal_or_retry(e),
    }
}

/// The `hold` step: reserve `amount` in `account` under `reference`; a
/// refusal (e.g. insufficient funds) marks the row `rejected` and fails.
pub(super) async fn hold(
    ctx: &StepCtx,
    row: Row,
    reference: String,
    account: AccountId,
    amount: Amount,
) -> StepResult {
    let mut conn = db(ctx).await?;
    match ledger::place_hold(&mut conn, &reference, account, amount).await {
        Ok(_) => {
            let sql = match row {
                Row::Trade => "UPDATE trades SET hold_reference = $2 WHERE id = $1",
                Row::Withdrawal => "UPDATE withdrawals SET hold_reference = $2 WHERE id = $1",
            };
            sqlx::query(sql)
                .bind(ctx.workflow_id())
                .bind(&reference)
                .execute(&mut *conn)
                .await
                .map_err(|e| e.to_string())?;
            row.set_status(&mut conn, ctx, "held", None).await?;
            Ok(StepOutcome::Continue(
                json!({ "hold_reference": reference }),
            ))
        }
        Err(e) => {
            let outcome = refusal_or_retry(e)?;
            if let StepOutcome::Fail(reason) = &outcome {
                row.set_status(&mut conn, ctx, "rejected", Some(reason))
                    .await?;
            }
            Ok(outcome)
        }
    }
}

/// Compensation of `hold`: release it (idempotent); the row is `cancelled`,
/// with the reason the workflow failed, unless it already reached its final
/// state.
pub(super) async fn release(ctx: &StepCtx, row: Row, output: &Value) -> CompensationResult {
    let reference = str_field(output, "hold_reference")?.to_owned();
    let mut conn = db(ctx).await?;
    let released = match ledger::release_hold(&mut conn, &reference).await {
        Ok(released) => released,
        Err(crate::Error::HoldNotFound(_)) => false,
        Err(e) => return Err(e.to_string()),
    };
    let sql = match row {
        Row::Trade => {
            "UPDATE trades
             SET status = 'cancelled', updated_at = coalesce($2::timestamptz, now()),
                 error = coalesce(error, (SELECT w.error FROM workflows w WHERE w.id = $1))
             WHERE id = $1 AND status NOT IN ('settled', 'rejected')"
        }
        Row::Withdrawal => {
            "UPDATE withdrawals
             SET status = 'cancelled', updated_at = coalesce($2::timestamptz, now()),
                 error = coalesce(error, (SELECT w.error FROM workflows w WHERE w.id = $1))
             WHERE id = $1 AND status NOT IN ('completed', 'rejected')"
        }
    };
    sqlx::query(sql)
        .bind(ctx.workflow_id())
        .bind(now_param(ctx))
        .execute(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(json!({ "hold_reference": reference, "released": released }))
}

/// How the exchange call of a step ends when it has no answer: a refusal
/// marks the row `rejected` and fails the step (→ compensation, `what` names
/// the thing refused); an unknown outcome puts the step in doubt; a call not
/// sent (or not made) is retried.
pub(super) async fn exchange_call_failed(
    ctx: &StepCtx,
    row: Row,
    what: &str,
    e: ExternalError,
) -> StepResult {
    match e {
        ExternalError::Rejected(reason) => {
            let mut conn = db(ctx).await?;
            row.set_status(&mut conn, ctx, "rejected", Some(&reason))
                .await?;
            Ok(StepOutcome::Fail(format!("{what} rejected: {reason}")))
        }
        ExternalError::InDoubt(reason) => Ok(StepOutcome::InDoubt(reason)),
        e
        @ (ExternalError::NotSent(_) | ExternalError::NotMade(_) | ExternalError::Deferred(_)) => {
            Err(e.to_string())
        }
    }
}

/// Writes domain `event` to the outbox (keyed by workflow `id`, so a
/// workflow's events stay in order) in the step's transaction.
pub(super) async fn emit_event(
    conn: &mut PgConnection,
    id: WorkflowId,
    event: &Value,
) -> Result<(), String> {
    let payload = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    let key = id.to_string();
    outbox_insert_in(
        conn,
        &NewOutboxEvent {
            topic: EVENTS_TOPIC,
            key: Some(&key),
            headers: None,
            payload: &payload,
        },
    )
    .await
    .map_err(|e| format!("outbox: {e}"))?;
    Ok(())
}

/// Starts the user's notification workflow in the step's transaction, once
/// (unique key `notification:{id}`), or, with `digest`, writes the notification for the
/// user's debounced digest ([`super::digest`]); returns the workflow id.
pub(super) async fn start_notification(
    conn: &mut PgConnection,
    ctx: &StepCtx,
    notifications: &WorkflowRegistry,
    input: &NotificationInput,
    digest: Option<&NotificationDigest>,
) -> Result<WorkflowId, String> {
    if let Some(digest) = digest {
        return super::digest::enqueue(conn, ctx, notifications, input, digest).await;
    }
    let args = serde_json::to_value(input).map_err(|e| e.to_string())?;
    let unique = format!("notification:{}", input.id);
    workflow_start_in(
        conn,
        ctx.store(),
        notifications,
        notification::KIND,
        &args,
        Some(&unique),
    )
    .await
    .map_err(|e| format!("start notification: {e}"))
}
