//! The withdrawal workflow (`payments.withdrawal`).
//!
//! Steps (each one lease-fenced checkpoint; domain writes through `ctx.db()`):
//! 1. `validate`           — exact amount, asset, address, user; the asset's
//!    effective withdrawal policy ([`crate::policy`]: an admin's override,
//!    else the configuration) decides how many distinct approvers it needs
//!    (0, 1 above the approval threshold, 2 above the second one) and the
//!    per-user daily limit, summed in SQL under a per-user advisory lock
//!    held until the step commits (so concurrent requests are counted one
//!    after the other); inserts the `withdrawals` row.
//! 2. `hold`               — `place_hold` reference `withdrawal:{id}:hold`.
//!    Compensation: `release_hold`, withdrawal `cancelled`.
//! 3. `await_approval`     — when approval is needed, waits for signal
//!    `withdrawal.approved` keyed by the withdrawal id, sent by
//!    [`approve_in`] once the needed number of distinct approvers approved
//!    (four-eyes: never the requester, never an approver linked to the
//!    user, never the same admin twice; each approval audited in its
//!    transaction). Timeout or an approver's rejection → fail → release.
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
    Deps, charge_exchange, compensate_fn, db, now_param, output, reconcile_fn, refusal_or_retry,
    step_fn, str_field,
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
    /// Distinct approvers needed (journals older than this field: one when
    /// `requires_approval`).
    #[serde(default)]
    approvals_required: u8,
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
        // One withdrawal of a user at a time, when the limit of super::WITHDRAWALS_PER_USER
        // is declared (the worker does; see super::flow_limits).
        .flow_key(|input| {
            input
                .get("user_id")
                .and_then(|u| {
                    u.as_str()
                        .map(str::to_owned)
                        .or_else(|| u.as_i64().map(|n| n.to_string()))
                })
                .map(|u| format!("withdrawals:user:{u}"))
        })
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
    // The policy of this moment (an admin's override, else the
    // configuration) decides, and is journaled with the step's output.
    let policy = crate::policy::effective_in(conn, &deps.config.withdrawal_policy, &asset.code)
        .await?
        .policy;
    let approvals_required = policy.approvals_required(amount);
    let requires_approval = approvals_required > 0;
    // Serialize this user's withdrawal requests until this step commits.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("payments.withdrawal.daily:{}", input.user_id))
        .execute(&mut *conn)
        .await?;
    let mut refusal = None;
    if let Some(limit) = policy.daily_limit {
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
        if today + amount > limit {
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
                                  updated_at, approvals_required)
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $10, n, n, $11
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
    .bind(i16::from(approvals_required.max(1)))
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
        approvals_required,
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

/// `(user_id, requires_approval, status, approved_by, requested_by,
/// approvals_required)`.
type ApprovalRow = (Uuid, bool, String, Option<AdminId>, Option<AdminId>, i16);

/// What an approval did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// Recorded, and more distinct approvers are needed (`given` of
    /// `required` so far); the workflow keeps waiting.
    Recorded { given: u8, required: u8 },
    /// The last approval needed: the withdrawal is `approved` and its
    /// workflow's signal was sent (or it had been approved already:
    /// [`SignalSent::Duplicate`], nothing written).
    Approved(SignalSent),
}

impl Approval {
    /// True when this call wrote something (an approval, and perhaps the signal).
    pub fn is_new(&self) -> bool {
        match self {
            Approval::Recorded { .. } => true,
            Approval::Approved(sent) => sent.is_new(),
        }
    }
}

/// Approves withdrawal `id` as `admin` (admin API, on the caller's
/// transaction). Four-eyes: the approver must have the `approver` role, not
/// be the requester, not be linked to the withdrawal's user
/// (`admins.user_id`), and not have approved it already; a withdrawal above
/// the second-approval threshold needs two distinct approvers. Each approval
/// writes its `withdrawal_approvals` row and its audit row; the last one
/// needed also marks the withdrawal approved and sends the
/// `withdrawal.approved` signal — all in the caller's transaction.
pub async fn approve_in(
    conn: &mut PgConnection,
    store: &Store,
    admin: &Admin,
    id: Uuid,
    reason: &str,
) -> crate::Result<Approval> {
    use crate::Error;
    if admin.role != AdminRole::Approver {
        return Err(Error::Forbidden(format!(
            "admin {} is not an approver",
            admin.name
        )));
    }
    let row: Option<ApprovalRow> = sqlx::query_as(
        "SELECT user_id, requires_approval, status, approved_by, requested_by, approvals_required
         FROM withdrawals WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let (user_id, requires, status, approved_by, requester, required) =
        row.ok_or_else(|| Error::Invalid(format!("no withdrawal {id}")))?;
    if !requires {
        return Err(Error::Invalid(format!("withdrawal {id} needs no approval")));
    }
    if approved_by.is_some() {
        return Ok(Approval::Approved(SignalSent::Duplicate));
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
    let linked: Option<Uuid> =
        sqlx::query_scalar::<_, Option<Uuid>>("SELECT user_id FROM admins WHERE id = $1")
            .bind(admin.id)
            .fetch_optional(&mut *conn)
            .await?
            .flatten();
    if linked == Some(user_id) {
        return Err(Error::FourEyes(format!(
            "admin {} is linked to the withdrawal's user; another approver must decide",
            admin.name
        )));
    }
    let mut approvers: Vec<AdminId> = sqlx::query_scalar(
        "SELECT admin_id FROM withdrawal_approvals WHERE withdrawal_id = $1 ORDER BY approved_at",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    if approvers.contains(&admin.id) {
        return Err(Error::FourEyes(format!(
            "admin {} approved withdrawal {id} already; a different approver must give the next \
             approval",
            admin.name
        )));
    }
    let required = u8::try_from(required.clamp(1, 2)).unwrap_or(1);
    approvers.push(admin.id);
    let given = u8::try_from(approvers.len()).unwrap_or(u8::MAX);
    let audit_id = crate::audit::record(
        &mut *conn,
        admin,
        &crate::audit::NewEntry {
            action: "withdrawal.approve",
            target_type: "withdrawal",
            target_id: &id.to_string(),
            reason,
            details: json!({ "user_id": user_id, "approval": given, "required": required }),
        },
    )
    .await?;
    sqlx::query(
        "INSERT INTO withdrawal_approvals (withdrawal_id, admin_id, audit_id, approved_at)
         VALUES ($1, $2, $3, coalesce($4::timestamptz, now()))",
    )
    .bind(id)
    .bind(admin.id)
    .bind(audit_id)
    .bind(store.now())
    .execute(&mut *conn)
    .await?;
    if given < required {
        return Ok(Approval::Recorded { given, required });
    }
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
    Ok(Approval::Approved(
        signal_send_in(
            conn,
            store,
            APPROVED_SIGNAL,
            &id.to_string(),
            &json!({ "approved_by": admin.id, "approvers": approvers, "requester": user_id }),
            &format!("withdrawal:{id}:approved"),
        )
        .await?,
    ))
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
        // Two distinct approvers above the second threshold (approvals sent
        // before the `approvers` field existed name one approver).
        let mut approvers: Vec<AdminId> = approval
            .get("approvers")
            .cloned()
            .and_then(|a| serde_json::from_value(a).ok())
            .unwrap_or_else(|| vec![approver]);
        approvers.sort();
        approvers.dedup();
        if approvers.len() < usize::from(v.approvals_required) {
            return Ok(StepOutcome::Fail(format!(
                "{} distinct approvals needed, {} given",
                v.approvals_required,
                approvers.len()
            )));
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
        .external_call_limited(
            &deps.config.exchange_rate_key,
            exchange::weight::WITHDRAWAL_LOOKUP + exchange::weight::SUBMIT_WITHDRAWAL,
            |_| async move { submit_once(exchange.as_ref(), &request).await },
        )
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
    charge_exchange(&deps, &ctx, exchange::weight::WITHDRAWAL_LOOKUP).await?;
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
        // It arrived and was refused: the outcome the answer would have brought.
        Err(exchange::Error::Rejected(reason)) => {
            let mut conn = db(&ctx).await?;
            ROW.set_status(&mut conn, &ctx, "rejected", Some(&reason))
                .await?;
            Ok(Reconciled::Failed(format!("withdrawal rejected: {reason}")))
        }
        Err(exchange::Error::Unknown(_)) => Ok(Reconciled::Unknown),
        Err(e) => Err(e.to_string()),
    }
}

/// Step 5.
async fn await_confirmation(deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let submitted = output(&ctx, SUBMIT_STEP)?;
    let key = IdempotencyKey::new(str_field(submitted, "idempotency_key")?);
    if ctx.timed_out() {
        charge_exchange(&deps, &ctx, exchange::weight::WITHDRAWAL_LOOKUP).await?;
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
    let (deps, notifications) = deps.as_ref();
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
    steps::start_notification(
        &mut conn,
        &ctx,
        notifications,
        &notification,
        deps.config.notification_digest.as_ref(),
    )
    .await?;
    Ok(StepOutcome::Finish(
        json!({ "withdrawal_id": id, "status": "completed", "transfer_id": transfer }),
    ))
}
