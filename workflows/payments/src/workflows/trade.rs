//! The trade workflow (`payments.trade`): a user's limit order, end to end.
//!
//! Steps (each one lease-fenced checkpoint; domain writes through `ctx.db()`):
//! 1. `validate`    — parse the input exactly, check assets, user and
//!    accounts, size the hold; insert the `trades` row.
//! 2. `hold`        — `place_hold` reference `trade:{id}:hold` (buy: quote
//!    notional at the limit plus the maximum fee; sell: the base amount).
//!    Compensation: `release_hold`, trade `cancelled`.
//! 3. `place_order` — one external call with key `{id}:place_order`:
//!    `get_order_by_key` first, `place_order` only when the exchange has no
//!    order for the key. `Rejected` fails the step (→ compensation);
//!    `Unavailable` retries; `Unknown` puts the step in doubt and the
//!    reconcile hook asks `get_order_by_key` (found → continue with it,
//!    absent → never received: placed again under the same key) — never a
//!    blind re-send.
//!    Compensation: `cancel_order` (idempotent by key).
//! 4. `await_fill`  — waits for signal `order.filled` keyed by the order's
//!    idempotency key. On timeout it cancels the order at the exchange: a
//!    cancelled order fails the step (→ cancel + release), an order that
//!    filled meanwhile continues with the exchange's fill.
//! 5. `settle`      — `settle_hold` reference `trade:{id}:settle`: one
//!    transfer moving both assets against the exchange omnibus account; the
//!    `trade.settled` domain event goes to the outbox in the same
//!    transaction.
//! 6. `notify`      — starts the `payments.notification` workflow (unique
//!    key `notification:trade:{id}:settled`) and finishes.
use super::steps::{self, Row};
use super::{
    Deps, charge_exchange, compensate_fn, db, now_param, output, reconcile_fn, refusal_or_retry,
    step_fn, str_field,
};
use crate::exchange::{self, IdempotencyKey, OrderRequest, OrderState, OrderStatus, Side};
use crate::ids::{AccountId, UserId};
use crate::ledger::{self, AccountKind};
use crate::money::{Amount, AmountStr, Asset};
use crate::notifier::Channel;
use ledgerflow_engine::workflow::{
    CallError, CompensationResult, ReconcileResult, Reconciled, StepResult,
};
use ledgerflow_engine::{StepCtx, StepOutcome, Workflow, WorkflowRegistry};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use std::sync::Arc;

/// The workflow's kind.
pub const KIND: &str = "payments.trade";
/// The signal a placed order waits for.
pub const FILL_SIGNAL: &str = "order.filled";
/// The step that places the order; its idempotency key is the order's key.
pub const PLACE_ORDER_STEP: &str = "place_order";
/// The trade's row: `trades`.
const ROW: Row = Row::Trade;

/// What starts a trade (amounts are strings, parsed exactly).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TradeInput {
    /// Whose trade.
    pub user_id: UserId,
    /// Buy or sell the base asset.
    pub side: Side,
    /// The base asset's code.
    pub base: String,
    /// The quote asset's code.
    pub quote: String,
    /// How much of the base asset.
    pub base_amount: AmountStr,
    /// The worst acceptable price, quote per base.
    pub limit_price: AmountStr,
}

/// A fill, as the `order.filled` event (or the exchange's order status)
/// reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fill {
    /// The exchange's order id.
    #[serde(default)]
    pub exchange_order_id: Option<String>,
    /// Base amount filled.
    pub filled_base: Decimal,
    /// Execution price.
    pub price: Decimal,
    /// Fee in the quote asset.
    pub fee: Decimal,
}

/// What `validate` journals for the later steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Validated {
    base: Asset,
    quote: Asset,
    base_amount: Decimal,
    limit_price: Decimal,
    base_account: AccountId,
    quote_account: AccountId,
    hold_account: AccountId,
    hold_amount: Decimal,
    hold_scale: u32,
}

/// The order's idempotency key in trade `id`.
pub fn order_key(id: uuid::Uuid) -> IdempotencyKey {
    IdempotencyKey::for_step(id, PLACE_ORDER_STEP)
}

/// The hold's ledger reference.
pub fn hold_reference(id: uuid::Uuid) -> String {
    format!("trade:{id}:hold")
}

/// The settlement transfer's ledger reference.
pub fn settle_reference(id: uuid::Uuid) -> String {
    format!("trade:{id}:settle")
}

/// The definition, with the exchange injected.
pub(super) fn definition(deps: &Arc<Deps>, notifications: &Arc<WorkflowRegistry>) -> Workflow {
    let with_notif = Arc::new((Arc::clone(deps), Arc::clone(notifications)));
    Workflow::new(KIND, 1)
        .step("validate", step_fn(deps, validate))
        .step_with_compensation("hold", step_fn(deps, hold), compensate_fn(deps, release))
        .step_with_compensation(
            PLACE_ORDER_STEP,
            step_fn(deps, place_order),
            compensate_fn(deps, cancel_order),
        )
        .reconcile(reconcile_fn(deps, reconcile_order))
        .step("await_fill", step_fn(deps, await_fill))
        .step("settle", step_fn(deps, settle))
        .step("notify", step_fn(&with_notif, notify))
}

fn validated(ctx: &StepCtx) -> Result<Validated, String> {
    steps::journaled(ctx, "validate")
}

/// Step 1: exact parsing and checks; the trade row.
async fn validate(deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let input: TradeInput = match ctx.input_as() {
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
    input: &TradeInput,
) -> crate::Result<Validated> {
    use crate::Error;
    if input.base == input.quote {
        return Err(Error::Invalid("base and quote must differ".into()));
    }
    let base = ledger::asset(conn, &input.base)
        .await?
        .ok_or_else(|| Error::UnknownAsset(input.base.clone()))?;
    let quote = ledger::asset(conn, &input.quote)
        .await?
        .ok_or_else(|| Error::UnknownAsset(input.quote.clone()))?;
    let base_amount = input.base_amount.to_amount(base.scale)?.value();
    let limit_price = input.limit_price.to_amount(quote.scale)?.value();
    if crate::users::user(conn, input.user_id).await?.is_none() {
        return Err(Error::UserNotFound(input.user_id));
    }
    let accounts =
        ledger::ensure_user_accounts(conn, input.user_id, &[&base.code, &quote.code]).await?;
    let account_of = |code: &str| {
        accounts
            .iter()
            .find(|(a, _)| a == code)
            .map(|(_, id)| *id)
            .ok_or_else(|| Error::Invalid(format!("no account for {code}")))
    };
    let base_account = account_of(&base.code)?;
    let quote_account = account_of(&quote.code)?;
    let overflow = || Error::Invalid("trade size overflows".into());
    let (hold_account, hold_amount, hold_scale) = match input.side {
        Side::Sell => (base_account, base_amount, base.scale),
        Side::Buy => {
            let notional = base_amount.checked_mul(limit_price).ok_or_else(overflow)?;
            let with_fee = notional
                .checked_mul(Decimal::ONE + deps.config.max_fee_rate)
                .ok_or_else(overflow)?
                .round_dp_with_strategy(quote.scale, RoundingStrategy::AwayFromZero);
            (quote_account, with_fee, quote.scale)
        }
    };
    // The hold must be a valid amount of its asset (non-zero, within scale).
    Amount::from_decimal(hold_amount, hold_scale)?;
    let side = match input.side {
        Side::Buy => "buy",
        Side::Sell => "sell",
    };
    sqlx::query(
        "INSERT INTO trades (id, user_id, side, base_asset, quote_asset, base_amount,
                             limit_price, status, created_at, updated_at)
         SELECT $1, $2, $3, $4, $5, $6, $7, 'validated', n, n
         FROM (SELECT coalesce($8::timestamptz, now()) AS n) t
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(ctx.workflow_id())
    .bind(input.user_id)
    .bind(side)
    .bind(&base.code)
    .bind(&quote.code)
    .bind(base_amount)
    .bind(limit_price)
    .bind(now_param(ctx))
    .execute(&mut *conn)
    .await?;
    Ok(Validated {
        base,
        quote,
        base_amount,
        limit_price,
        base_account,
        quote_account,
        hold_account,
        hold_amount,
        hold_scale,
    })
}

/// Step 2: reserve the funds.
async fn hold(_deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let v = validated(&ctx)?;
    let reference = hold_reference(ctx.workflow_id());
    let amount = Amount::from_decimal(v.hold_amount, v.hold_scale).map_err(|e| e.to_string())?;
    steps::hold(&ctx, ROW, reference, v.hold_account, amount).await
}

/// Compensation of `hold`: release it (idempotent).
pub async fn release(_deps: Arc<Deps>, ctx: StepCtx, output: Value) -> CompensationResult {
    steps::release(&ctx, ROW, &output).await
}

fn order_output(status_id: &str, key: &IdempotencyKey) -> Value {
    json!({ "exchange_order_id": status_id, "idempotency_key": key.as_str() })
}

/// Step 3: place the order, at most once per key.
async fn place_order(deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let v = validated(&ctx)?;
    let input: TradeInput = ctx.input_as()?;
    let key = IdempotencyKey::new(ctx.idempotency_key());
    let base_amount =
        Amount::from_decimal(v.base_amount, v.base.scale).map_err(|e| e.to_string())?;
    let request = OrderRequest {
        idempotency_key: key.clone(),
        client_order_id: ctx.workflow_id().to_string(),
        side: input.side,
        base: v.base.clone(),
        quote: v.quote.clone(),
        base_amount,
        limit_price: v.limit_price,
    };
    let exchange = Arc::clone(&deps.exchange);
    let answer = ctx
        .external_call_limited(
            &deps.config.exchange_rate_key,
            exchange::weight::ORDER_LOOKUP + exchange::weight::PLACE_ORDER,
            |_| async move { place_once(exchange.as_ref(), &request).await },
        )
        .await;
    match answer {
        Ok(ack) => {
            let order_id = str_field(&ack, "exchange_order_id")?.to_owned();
            let mut conn = db(&ctx).await?;
            ROW.record_at_exchange(&mut conn, &ctx, &order_id).await?;
            Ok(StepOutcome::Continue(order_output(&order_id, &key)))
        }
        Err(e) => steps::exchange_call_failed(&ctx, ROW, "order", e).await,
    }
}

/// The call itself: the reconcile query first, so a retry after a lost
/// answer finds the order instead of sending it again.
pub async fn place_once(
    exchange: &dyn exchange::Exchange,
    request: &OrderRequest,
) -> Result<Value, CallError> {
    match exchange.get_order_by_key(&request.idempotency_key).await {
        Ok(Some(existing)) => {
            return Ok(json!({
                "exchange_order_id": existing.exchange_order_id,
                "status": existing.state,
            }));
        }
        Ok(None) => {}
        Err(e) => return Err(call_error(e)),
    }
    match exchange.place_order(request).await {
        Ok(ack) => Ok(json!({
            "exchange_order_id": ack.exchange_order_id,
            "status": ack.status,
        })),
        Err(e) => Err(call_error(e)),
    }
}

/// The exchange's three error kinds as the engine's.
pub(super) fn call_error(e: exchange::Error) -> CallError {
    match e {
        exchange::Error::Rejected(r) => CallError::Rejected(r),
        exchange::Error::Unavailable(r) => CallError::NotSent(r),
        exchange::Error::Unknown(r) => CallError::Unknown(r),
    }
}

/// Reconcile hook of `place_order`: what became of the in-doubt order?
pub async fn reconcile_order(deps: Arc<Deps>, ctx: StepCtx, key: String) -> ReconcileResult {
    let key = IdempotencyKey::new(key);
    charge_exchange(&deps, &ctx, exchange::weight::ORDER_LOOKUP).await?;
    match deps.exchange.get_order_by_key(&key).await {
        Ok(Some(status)) => {
            let mut conn = db(&ctx).await?;
            ROW.record_at_exchange(&mut conn, &ctx, &status.exchange_order_id)
                .await?;
            Ok(Reconciled::Succeeded(order_output(
                &status.exchange_order_id,
                &key,
            )))
        }
        // The simulator (and any venue we integrate) records an order before
        // answering, so "absent" after an unknown answer means never placed:
        // the engine places it again under the same key (the exchange
        // deduplicates by it), so a crash does not cancel the trade.
        Ok(None) => Ok(Reconciled::NotReceived(format!(
            "the exchange has no order with key {key}"
        ))),
        // It arrived and was refused: the outcome the answer would have brought.
        Err(exchange::Error::Rejected(reason)) => {
            let mut conn = db(&ctx).await?;
            ROW.set_status(&mut conn, &ctx, "rejected", Some(&reason))
                .await?;
            Ok(Reconciled::Failed(format!("order rejected: {reason}")))
        }
        Err(exchange::Error::Unknown(_)) => Ok(Reconciled::Unknown),
        Err(e) => Err(e.to_string()),
    }
}

/// Compensation of `place_order`: cancel the order (idempotent by key).
/// A filled order cannot be undone here: the compensation keeps failing
/// and the workflow ends `failed` for an operator.
pub async fn cancel_order(deps: Arc<Deps>, ctx: StepCtx, output: Value) -> CompensationResult {
    let key = IdempotencyKey::new(str_field(&output, "idempotency_key")?);
    charge_exchange(&deps, &ctx, exchange::weight::CANCEL_ORDER).await?;
    match deps.exchange.cancel_order(&key).await {
        Ok(status) => Ok(json!({ "cancelled": status.exchange_order_id })),
        Err(exchange::Error::Rejected(reason)) => {
            charge_exchange(&deps, &ctx, exchange::weight::ORDER_LOOKUP).await?;
            match deps
                .exchange
                .get_order_by_key(&key)
                .await
                .map_err(|e| e.to_string())?
            {
                None => Ok(json!({ "cancelled": Value::Null })),
                Some(s) if s.state == OrderState::Cancelled => {
                    Ok(json!({ "cancelled": s.exchange_order_id }))
                }
                Some(_) => Err(format!("order {key} cannot be cancelled: {reason}")),
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

fn fill_from_status(status: &OrderStatus) -> Result<Value, String> {
    let fill = Fill {
        exchange_order_id: Some(status.exchange_order_id.clone()),
        filled_base: status.filled_base,
        price: status
            .price
            .ok_or_else(|| "a filled order without a price".to_string())?,
        fee: status.fee,
    };
    serde_json::to_value(fill).map_err(|e| e.to_string())
}

/// Step 4: wait for the fill; on timeout cancel the order.
async fn await_fill(deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let placed = output(&ctx, PLACE_ORDER_STEP)?;
    let key = IdempotencyKey::new(str_field(placed, "idempotency_key")?);
    if !ctx.timed_out() {
        return Ok(StepOutcome::wait_signal(
            FILL_SIGNAL,
            key.as_str(),
            deps.config.fill_timeout,
        ));
    }
    // Timed out: cancel at the exchange (idempotent by key), unless it filled.
    charge_exchange(&deps, &ctx, exchange::weight::CANCEL_ORDER).await?;
    match deps.exchange.cancel_order(&key).await {
        Ok(status) if status.state == OrderState::Filled => {
            Ok(StepOutcome::Continue(fill_from_status(&status)?))
        }
        Ok(_) => {
            let mut conn = db(&ctx).await?;
            let reason = "not filled in time; order cancelled";
            ROW.set_status(&mut conn, &ctx, "cancelled", Some(reason))
                .await?;
            Ok(StepOutcome::Fail(reason.to_string()))
        }
        Err(exchange::Error::Rejected(reason)) => {
            charge_exchange(&deps, &ctx, exchange::weight::ORDER_LOOKUP).await?;
            match deps
                .exchange
                .get_order_by_key(&key)
                .await
                .map_err(|e| e.to_string())?
            {
                Some(s) if s.state == OrderState::Filled => {
                    Ok(StepOutcome::Continue(fill_from_status(&s)?))
                }
                _ => Err(format!("cancelling {key} refused: {reason}")),
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The settlement postings of `fill` (pure, exact).
fn settlement_postings(
    side: Side,
    v: &Validated,
    omnibus_base: AccountId,
    omnibus_quote: AccountId,
    fill: &Fill,
) -> crate::Result<Vec<(AccountId, Amount)>> {
    use crate::Error;
    let overflow = || Error::Invalid("settlement overflows".into());
    let notional = fill
        .filled_base
        .checked_mul(fill.price)
        .ok_or_else(overflow)?;
    let base = Amount::from_decimal(fill.filled_base, v.base.scale)?;
    Ok(match side {
        Side::Buy => {
            // The user pays the notional (rounded up) plus the fee.
            let pay = notional
                .round_dp_with_strategy(v.quote.scale, RoundingStrategy::AwayFromZero)
                .checked_add(fill.fee)
                .ok_or_else(overflow)?;
            let pay = Amount::from_decimal(pay, v.quote.scale)?;
            vec![
                (v.quote_account, -pay),
                (omnibus_quote, pay),
                (omnibus_base, -base),
                (v.base_account, base),
            ]
        }
        Side::Sell => {
            // The user gets the notional (rounded down) less the fee.
            let get = notional
                .round_dp_with_strategy(v.quote.scale, RoundingStrategy::ToZero)
                .checked_sub(fill.fee)
                .ok_or_else(overflow)?;
            let get = Amount::from_decimal(get, v.quote.scale)?;
            vec![
                (v.base_account, -base),
                (omnibus_base, base),
                (omnibus_quote, -get),
                (v.quote_account, get),
            ]
        }
    })
}

/// Step 5: settle in the ledger and emit the domain event.
async fn settle(_deps: Arc<Deps>, ctx: StepCtx) -> StepResult {
    let v = validated(&ctx)?;
    let input: TradeInput = ctx.input_as()?;
    let fill =
        Fill::deserialize(output(&ctx, "await_fill")?).map_err(|e| format!("fill payload: {e}"))?;
    let id = ctx.workflow_id();
    let mut conn = db(&ctx).await?;
    let omnibus_base =
        match ledger::system_account(&mut conn, &v.base.code, AccountKind::ExchangeOmnibus).await {
            Ok(a) => a,
            Err(e) => return refusal_or_retry(e),
        };
    let omnibus_quote = match ledger::system_account(
        &mut conn,
        &v.quote.code,
        AccountKind::ExchangeOmnibus,
    )
    .await
    {
        Ok(a) => a,
        Err(e) => return refusal_or_retry(e),
    };
    let postings = match settlement_postings(input.side, &v, omnibus_base, omnibus_quote, &fill) {
        Ok(p) => p,
        Err(e) => return refusal_or_retry(e),
    };
    let metadata = json!({ "trade_id": id, "exchange_order_id": fill.exchange_order_id });
    let transfer = match ledger::settle_hold(
        &mut conn,
        &hold_reference(id),
        &settle_reference(id),
        "trade.settle",
        &postings,
        &metadata,
    )
    .await
    {
        Ok(posted) => posted.id(),
        Err(e) => return refusal_or_retry(e),
    };
    ROW.set_status(&mut conn, &ctx, "settled", None).await?;
    let event = json!({
        "type": "trade.settled",
        "trade_id": id,
        "user_id": input.user_id,
        "side": input.side,
        "base": v.base.code,
        "quote": v.quote.code,
        "filled_base": fill.filled_base,
        "price": fill.price,
        "fee": fill.fee,
        "transfer_id": transfer,
    });
    steps::emit_event(&mut conn, id, &event).await?;
    Ok(StepOutcome::Continue(
        json!({ "transfer_id": transfer, "fill": fill }),
    ))
}

/// Step 6: enqueue the user's notification (once, by unique key).
async fn notify(deps: Arc<(Arc<Deps>, Arc<WorkflowRegistry>)>, ctx: StepCtx) -> StepResult {
    let (deps, notifications) = deps.as_ref();
    let input: TradeInput = ctx.input_as()?;
    let id = ctx.workflow_id();
    let settled = output(&ctx, "settle")?.clone();
    let notification = super::notification::NotificationInput {
        id: format!("trade:{id}:settled"),
        user_id: input.user_id,
        channel: Channel::Email,
        template: "trade.settled".to_string(),
        payload: json!({ "trade_id": id, "side": input.side, "base": input.base,
                         "quote": input.quote, "settlement": settled }),
    };
    let mut conn = db(&ctx).await?;
    let started = steps::start_notification(
        &mut conn,
        &ctx,
        notifications,
        &notification,
        deps.config.notification_digest.as_ref(),
    )
    .await?;
    Ok(StepOutcome::Finish(
        json!({ "trade_id": id, "status": "settled", "notification_workflow": started }),
    ))
}
