//! The withdrawal workflow (`payments.withdrawal`).
//!
//! Steps (each one lease-fenced checkpoint; domain writes through `ctx.db()`):
//! 1. `validate`           — exact amount, asset, address, user; the per-user
//!    daily limit, summed in SQL under a per-user advisory lock held until
//!    the step commits (so concurrent requests are counted one after the
//!    other); inserts the `withdrawals` row.
//! 2. `hold`               — `place_hold` reference `withdrawal:{id}:hold`.
//!    Compensation: `release_hold`, withdrawal `cancelled`.
//! 3. `await_approval`     — above the asset's threshold, waits for signal
//!    `withdrawal.approved` keyed by the withdrawal id (sent by
//!    [`approve_in`], which refuses an approver who is the requester and
//!    audits the approval in the same transaction). Timeout → fail →
//!    release.
//! 4. `submit`             — one external call with key `{id}:submit`:
//!    `get_withdrawal_by_key` first, `submit_withdrawal` only if absent;
//!    `Unknown` → in doubt, reconciled with `get_withdrawal_by_key` (absent
//!    → never received: submitted again under the same key).
//! 5. `await_confirmation` — waits for `withdrawal.confirmed` keyed by the
//!    submit key; each timeout re-checks the exchange and waits again (a
//!    submitted withdrawal is never released: the money may be gone).
//! 6. `finalize`           — `capture_hold` into the asset's `external`
//!    account (reference `withdrawal:{id}:capture`), outbox event, user
//!    notification; finishes.
use super::steps::{self, Row};
use super::{
    Deps, compensate_fn, db, now_param, output, reconcile_fn, refusal_or_retry, step_fn, str_field,
};
use crate::exchange::{self, IdempotencyKey, WithdrawalRequest, WithdrawalState};
use crate::ids::{AccountId, AdminId, UserId};
use crate::ledger::{self, AccountKind};
use crate::money::{Amount, AmountStr, Asset};
use crate::notifier::Channel;
use crate::users::{Admin, AdminRole};
use ledgerflow_engine::workflow::{
    CallError, CompensationResult, ReconcileResult, Reconciled, StepResult,
};
use ledgerflow_engine::{
    SignalSent, StepCtx, StepOutcome, Store, Workflow, WorkflowRegistry, signal_send_in,
};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use std::sync::Arc;
use uuid::Uuid;

/// The workflow's kind.
pub const KIND: &str = "payments.withdrawal";
/// The approver's signal (correlation key: the withdrawal id).
pub const APPROVED_SIGNAL: &str = "withdrawal.approved";
/// The exchange's confirmation signal (correlation key: the submit key).
pub const CONFIRMED_SIGNAL: &str = "withdrawal.confirmed";
/// The step that submits to the exchange; its key is the withdrawal's key.
pub const SUBMIT_STEP: &str = "submit";
/// The withdrawal's row: `withdrawals`.
const ROW: Row = Row::Withdrawal;

/// What starts a withdrawal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WithdrawalInput {
    /// Whose funds.
    pub user_id: UserId,
    /// The asset's code.
    pub asset: String,
    /// How much (a string, parsed exactly).
    pub amount: AmountStr,
    /// Destination address.
    pub address: String,
    /// The admin who filed it on the user's behalf, if any: they may not
    /// approve it.
    #[serde(default)]
    pub requested_by: Option<AdminId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Validated {
    asset: Asset,
    amount: Decimal,
    account: AccountId,
    requires_approval: bool,
}

/// The hold's ledger reference.
pub fn hold_reference(id: Uuid) -> String {
    format!("withdrawal:{id}:hold")
}

/// The capture transfer's ledger reference.
pub fn capture_reference(id: Uuid) -> String {
    format!("withdrawal:{id}:capture")
}

/// The withdrawal's idempotency key at the exchange.
pub fn submit_key(id: Uuid) -> IdempotencyKey {
    IdempotencyKey::for_step(id, SUBMIT_STEP)
}

/// The definition, with the exchange injected.
pub(super) fn definition(deps: &Arc<Deps>, notifications: &Arc<WorkflowRegistry>) -> Workflow {
    let with_notif = Arc::new((Arc::clone(deps), Arc::clone(notifications)));
    Workflow::new(KIND, 1)
        .step("validate", step_fn(deps, validate))
        .step_with_compensation("hold", step_fn(deps, hold), compensate_fn(deps, release))
        .step("await_approval", step_fn(deps, await_approval))
        .step(SUBMIT_STEP, step_fn(deps, submit))
        .reconcile(reconcile_fn(deps, reconcile_submit))
        .step("await_confirmation", step_fn(deps, await_confirmation))
        .step("finalize", step_fn(&with_notif, finalize))
}

fn validated(ctx: &StepCtx) -> Result<Validated, String> {
    steps::journaled(ctx, "validate")
}

/// Step 1.
async fn validate(deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let input: WithdrawalInput = match ctx.input_as() {
        Ok(i) => i,
        Err(e) => return Ok(StepOutcome::Fail(e)),
    };
    let mut conn = db(&ctx).await?;
    steps::validated_outcome(validate_in(&mut conn, &deps, &ctx, &input).await)
}

async fn validate_in(
    conn: &mut PgConnection,
    deps: &Deps,
    ctx: &StepCtx,
    input: &WithdrawalInput,
) -> crate::Result<Validated> {
    use crate::Error;
    let asset = ledger::asset(conn, &input.asset)
        .await?
        .ok_or_else(|| Error::UnknownAsset(input.asset.clone()))?;
    let amount = input.amount.to_amount(asset.scale)?.value();
    let address = input.address.trim();
    if address.is_empty() || address.len() > 200 || address != input.address {
        return Err(Error::Invalid("address must be 1-200 characters".into()));
    }
    if crate::users::user(conn, input.user_id).await?.is_none() {
        return Err(Error::UserNotFound(input.user_id));
    }
    let account = ledger::ensure_user_accounts(conn, input.user_id, &[&asset.code])
        .await?
        .first()
        .map(|(_, id)| *id)
        .ok_or_else(|| Error::Invalid("no account".into()))?;
    let id = ctx.workflow_id();
    let requires_approval = deps
        .config
        .withdrawal_approval_threshold
        .get(&asset.code)
        .is_some_and(|t| amount > *t);
    // Serialize this user's withdrawal requests until this step commits.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("payments.withdrawal.daily:{}", input.user_id))
        .execute(&mut *conn)
        .await?;
    let mut refusal = None;
    if let Some(limit) = deps.config.withdrawal_daily_limit.get(&asset.code) {
        let today: Decimal = sqlx::query_scalar(
            "SELECT coalesce(sum(amount), 0) FROM withdrawals
             WHERE user_id = $1 AND asset = $2 AND id <> $3
               AND status NOT IN ('rejected', 'cancelled')
               AND requested_at >= date_trunc('day', coalesce($4::timestamptz, now()), 'UTC')",
        )
        .bind(input.user_id)
        .bind(&asset.code)
        .bind(id)
        .bind(now_param(ctx))
        .fetch_one(&mut *conn)
        .await?;
        if today + amount > *limit {
            refusal = Some(format!(
                "daily withdrawal limit of {limit} {} exceeded ({today} already today)",
                asset.code
            ));
        }
    }
    let status = if refusal.is_some() {
        "rejected"
    } else {
        "validated"
    };
    sqlx::query(
        "INSERT INTO withdrawals (id, user_id, asset, amount, address, status,
                                  requires_approval, error, requested_by, requested_at,
                                  updated_at)
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $10, n, n
         FROM (SELECT coalesce($9::timestamptz, now()) AS n) t
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(input.user_id)
    .bind(&asset.code)
    .bind(amount)
    .bind(&input.address)
    .bind(status)
    .bind(requires_approval)
    .bind(&refusal)
    .bind(now_param(ctx))
    .bind(input.requested_by)
    .execute(&mut *conn)
    .await?;
    if let Some(reason) = refusal {
        // The rejected row commits with the failed step (Fail keeps writes).
        return Err(Error::Invalid(reason));
    }
    Ok(Validated {
        asset,
        amount,
        account,
        requires_approval,
    })
}

/// Step 2.
async fn hold(_deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let v = validated(&ctx)?;
    let reference = hold_reference(ctx.workflow_id());
    let amount = Amount::from_decimal(v.amount, v.asset.scale).map_err(|e| e.to_string())?;
    steps::hold(&ctx, ROW, reference, v.account, amount).await
}

/// Compensation of `hold`: release it; the withdrawal is `cancelled`.
pub async fn release(_deps: Arc<Deps>, ctx: StepCtx, output: Value) -> CompensationResult {
    steps::release(&ctx, ROW, &output).await
}

/// Step 3.
async fn await_approval(deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let v = validated(&ctx)?;
    if !v.requires_approval {
        return Ok(StepOutcome::Continue(json!({ "required": false })));
    }
    let mut conn = db(&ctx).await?;
    if ctx.timed_out() {
        // An approver's rejection (`approvals::reject_in`) ends the wait early and has
        // already marked the withdrawal rejected with the approver's reason: keep that
        // reason rather than claiming nobody answered.
        let rejected: Option<Option<String>> = sqlx::query_scalar(
            "SELECT error FROM withdrawals WHERE id = $1 AND status = 'rejected'",
        )
        .bind(ctx.workflow_id())
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| format!("read withdrawal: {e}"))?;
        if let Some(reason) = rejected {
            return Ok(StepOutcome::Fail(
                reason.unwrap_or_else(|| "rejected by an approver".to_string()),
            ));
        }
        let reason = "no approval in time";
        ROW.set_status(&mut conn, &ctx, "rejected", Some(reason))
            .await?;
        return Ok(StepOutcome::Fail(reason.to_string()));
    }
    sqlx::query(
        "UPDATE withdrawals SET status = 'awaiting_approval'
         WHERE id = $1 AND status IN ('validated', 'held')",
    )
    .bind(ctx.workflow_id())
    .execute(&mut *conn)
    .await
    .map_err(|e| e.to_string())?;
    Ok(StepOutcome::wait_signal(
        APPROVED_SIGNAL,
        ctx.workflow_id().to_string(),
        deps.config.approval_timeout,
    ))
}

/// `(user_id, requires_approval, status, approved_by, requested_by)`.
type ApprovalRow = (Uuid, bool, String, Option<AdminId>, Option<AdminId>);

/// Approves withdrawal `id` as `admin` (admin API, on the caller's
/// transaction): checks the role and that the approver is not the
/// requester, records the approval and its audit row, and sends the
/// `withdrawal.approved` signal — all in the caller's transaction.
pub async fn approve_in(
    conn: &mut PgConnection,
    store: &Store,
    admin: &Admin,
    id: Uuid,
    reason: &str,
) -> crate::Result<SignalSent> {
    use crate::Error;
    if admin.role != AdminRole::Approver {
        return Err(Error::Forbidden(format!(
            "admin {} is not an approver",
            admin.name
        )));
    }
    let row: Option<ApprovalRow> = sqlx::query_as(
        "SELECT user_id, requires_approval, status, approved_by, requested_by
         FROM withdrawals WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let (user_id, requires, status, approved_by, requester) =
        row.ok_or_else(|| Error::Invalid(format!("no withdrawal {id}")))?;
    if !requires {
        return Err(Error::Invalid(format!("withdrawal {id} needs no approval")));
    }
    if approved_by.is_some() {
        return Ok(SignalSent::Duplicate);
    }
    if !matches!(status.as_str(), "validated" | "held" | "awaiting_approval") {
        return Err(Error::Invalid(format!(
            "withdrawal {id} is {status}; it cannot be approved"
        )));
    }
    if requester == Some(admin.id) || admin.id.0 == user_id {
        return Err(Error::Forbidden(
            "the requester of a withdrawal cannot approve it".into(),
        ));
    }
    crate::audit::record(
        &mut *conn,
        admin,
        &crate::audit::NewEntry {
            action: "withdrawal.approve",
            target_type: "withdrawal",
            target_id: &id.to_string(),
            reason,
            details: json!({ "user_id": user_id }),
        },
    )
    .await?;
    sqlx::query(
        "UPDATE withdrawals SET approved_by = $2, approved_at = coalesce($3::timestamptz, now()),
                status = 'approved'
         WHERE id = $1",
    )
    .bind(id)
    .bind(admin.id)
    .bind(store.now())
    .execute(&mut *conn)
    .await?;
    Ok(signal_send_in(
        conn,
        store,
        APPROVED_SIGNAL,
        &id.to_string(),
        &json!({ "approved_by": admin.id, "requester": user_id }),
        &format!("withdrawal:{id}:approved"),
    )
    .await?)
}

/// Step 4.
async fn submit(deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let v = validated(&ctx)?;
    let input: WithdrawalInput = ctx.input_as()?;
    let approval = output(&ctx, "await_approval")?;
    if v.requires_approval {
        // Defence in depth: approve_in already refused these.
        let approver: Option<AdminId> = approval
            .get("approved_by")
            .cloned()
            .and_then(|a| serde_json::from_value(a).ok());
        let Some(approver) = approver else {
            return Ok(StepOutcome::Fail("approval without an approver".into()));
        };
        if Some(approver) == input.requested_by || approver.0 == input.user_id.0 {
            return Ok(StepOutcome::Fail(
                "the requester cannot approve their own withdrawal".into(),
            ));
        }
    }
    let key = IdempotencyKey::new(ctx.idempotency_key());
    let request = WithdrawalRequest {
        idempotency_key: key.clone(),
        asset: v.asset.clone(),
        amount: Amount::from_decimal(v.amount, v.asset.scale).map_err(|e| e.to_string())?,
        address: input.address.clone(),
    };
    let exchange = Arc::clone(&deps.exchange);
    let answer = ctx
        .external_call(|_| async move { submit_once(exchange.as_ref(), &request).await })
        .await;
    match answer {
        Ok(ack) => {
            let wid = str_field(&ack, "withdrawal_id")?.to_owned();
            let mut conn = db(&ctx).await?;
            ROW.record_at_exchange(&mut conn, &ctx, &wid).await?;
            Ok(StepOutcome::Continue(
                json!({ "withdrawal_id": wid, "idempotency_key": key.as_str() }),
            ))
        }
        Err(e) => steps::exchange_call_failed(&ctx, ROW, "withdrawal", e).await,
    }
}

/// The call: reconcile query first, submit only when absent.
pub async fn submit_once(
    exchange: &dyn exchange::Exchange,
    request: &WithdrawalRequest,
) -> Result<Value, CallError> {
    match exchange
        .get_withdrawal_by_key(&request.idempotency_key)
        .await
    {
        Ok(Some(existing)) => {
            return Ok(
                json!({ "withdrawal_id": existing.withdrawal_id, "status": existing.state }),
            );
        }
        Ok(None) => {}
        Err(e) => return Err(super::trade::call_error(e)),
    }
    match exchange.submit_withdrawal(request).await {
        Ok(ack) => Ok(json!({ "withdrawal_id": ack.withdrawal_id, "status": ack.status })),
        Err(e) => Err(super::trade::call_error(e)),
    }
}

/// Reconcile hook of `submit`.
pub async fn reconcile_submit(deps: Arc<Deps>, ctx: StepCtx, key: String) -> ReconcileResult {
    let key = IdempotencyKey::new(key);
    match deps.exchange.get_withdrawal_by_key(&key).await {
        Ok(Some(status)) => {
            let mut conn = db(&ctx).await?;
            ROW.record_at_exchange(&mut conn, &ctx, &status.withdrawal_id)
                .await?;
            Ok(Reconciled::Succeeded(json!({
                "withdrawal_id": status.withdrawal_id,
                "idempotency_key": key.as_str(),
            })))
        }
        // Never received: the engine submits it again under the same key
        // (the exchange deduplicates by it), so a crash does not cancel it.
        Ok(None) => Ok(Reconciled::NotReceived(format!(
            "the exchange has no withdrawal with key {key}"
        ))),
        Err(exchange::Error::Unknown(_)) => Ok(Reconciled::Unknown),
        Err(e) => Err(e.to_string()),
    }
}

/// Step 5.
async fn await_confirmation(deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let submitted = output(&ctx, SUBMIT_STEP)?;
    let key = IdempotencyKey::new(str_field(submitted, "idempotency_key")?);
    if ctx.timed_out() {
        match deps.exchange.get_withdrawal_by_key(&key).await {
            Ok(Some(s)) if s.state == WithdrawalState::Confirmed => {
                return Ok(StepOutcome::Continue(json!({
                    "withdrawal_id": s.withdrawal_id,
                    "amount": s.amount,
                    "tx_hash": s.tx_hash,
                })));
            }
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(StepOutcome::wait_signal(
        CONFIRMED_SIGNAL,
        key.as_str(),
        deps.config.confirmation_poll,
    ))
}

/// Step 6.
async fn finalize(deps: Arc<(Arc<Deps>, Arc<WorkflowRegistry>)>, ctx: StepCtx) -> StepResult {
    let (_, notifications) = deps.as_ref();
    let v = validated(&ctx)?;
    let input: WithdrawalInput = ctx.input_as()?;
    let confirmed = output(&ctx, "await_confirmation")?.clone();
    let tx_hash = confirmed
        .get("tx_hash")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let id = ctx.workflow_id();
    let mut conn = db(&ctx).await?;
    let external =
        match ledger::system_account(&mut conn, &v.asset.code, AccountKind::External).await {
            Ok(a) => a,
            Err(e) => return refusal_or_retry(e),
        };
    let transfer = match ledger::capture_hold(
        &mut conn,
        &hold_reference(id),
        &capture_reference(id),
        external,
    )
    .await
    {
        Ok(p) => p.id(),
        Err(e) => return refusal_or_retry(e),
    };
    sqlx::query("UPDATE withdrawals SET tx_hash = $2 WHERE id = $1")
        .bind(id)
        .bind(&tx_hash)
        .execute(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    ROW.set_status(&mut conn, &ctx, "completed", None).await?;
    let event = json!({
        "type": "withdrawal.completed",
        "withdrawal_id": id,
        "user_id": input.user_id,
        "asset": v.asset.code,
        "amount": v.amount,
        "tx_hash": tx_hash,
        "transfer_id": transfer,
    });
    steps::emit_event(&mut conn, id, &event).await?;
    let notification = super::notification::NotificationInput {
        id: format!("withdrawal:{id}:completed"),
        user_id: input.user_id,
        channel: Channel::Email,
        template: "withdrawal.completed".to_string(),
        payload: json!({ "withdrawal_id": id, "amount": v.amount, "asset": v.asset.code,
                         "address": input.address, "tx_hash": tx_hash }),
    };
    steps::start_notification(&mut conn, &ctx, notifications, &notification).await?;
    Ok(StepOutcome::Finish(
        json!({ "withdrawal_id": id, "status": "completed", "transfer_id": transfer }),
    ))
}
