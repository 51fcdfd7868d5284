//! The exchange conformance suite: one [`exercise`] that every [`Exchange`]
//! implementation must pass, called once per implementation (as River's
//! `riverdrivertest` does for its drivers).
//!
//! It needs a fresh simulator behind `exchange` (it uses fixed keys) and the
//! [`SimControls`] that steer it. It panics, with the case's name, on the
//! first deviation: it is test code shipped in the library so that the
//! in-process and the HTTP adapter, and any future one, share it.
//!
//! Covered: idempotent place (one order per key, same ack), key reuse with
//! other parameters, reject, accept-then-timeout with reconcile, duplicate
//! fill (same event id twice), late fill, cancel (idempotent; filled and
//! unknown orders refused), withdrawals (idempotent, reject, in doubt and
//! reconciled, confirmation event), and a global fault.

use super::sim::{Fault, SimControls};
use super::{
    Error, Event, EventKind, Exchange, IdempotencyKey, OrderRequest, OrderState, Result, Side,
    WithdrawalRequest, WithdrawalState,
};
use crate::money::{Amount, Asset};
use rust_decimal::Decimal;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

fn ok<T>(r: Result<T>, case: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("[{case}] unexpected error: {e}"),
    }
}

fn dec(s: &str) -> Decimal {
    match Decimal::from_str(s) {
        Ok(d) => d,
        Err(e) => panic!("bad decimal literal {s:?}: {e}"),
    }
}

fn btc() -> Asset {
    Asset {
        code: "BTC".into(),
        scale: 8,
    }
}

fn usd() -> Asset {
    Asset {
        code: "USD".into(),
        scale: 2,
    }
}

fn amount(s: &str, scale: u32) -> Amount {
    match Amount::parse(s, scale) {
        Ok(a) => a,
        Err(e) => panic!("bad amount literal {s:?}: {e}"),
    }
}

/// A buy of 0.5 BTC at 43210.12 USD with `key`.
pub fn sample_order(key: &str) -> OrderRequest {
    OrderRequest {
        idempotency_key: IdempotencyKey::new(key),
        client_order_id: format!("trade-{key}"),
        side: Side::Buy,
        base: btc(),
        quote: usd(),
        base_amount: amount("0.5", 8),
        limit_price: dec("43210.12"),
    }
}

/// A withdrawal of 0.25 BTC with `key`.
pub fn sample_withdrawal(key: &str) -> WithdrawalRequest {
    WithdrawalRequest {
        idempotency_key: IdempotencyKey::new(key),
        asset: btc(),
        amount: amount("0.25", 8),
        address: "bc1qmt4npcrde7q9vkkfxhk23mp7s73v6uv5h06myw".into(),
    }
}

fn for_key<'a>(events: &'a [Event], key: &str) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.idempotency_key.as_str() == key)
        .collect()
}

fn expect_rejected<T: std::fmt::Debug>(r: Result<T>, case: &str) -> String {
    match r {
        Err(Error::Rejected(reason)) => reason,
        other => panic!("[{case}] expected Rejected, got {other:?}"),
    }
}

/// Runs every case against `exchange`, steered by `controls`.
pub async fn exercise(exchange: Arc<dyn Exchange>, controls: &dyn SimControls) {
    idempotent_place(&*exchange, controls).await;
    key_reuse_with_other_parameters(&*exchange).await;
    reject(&*exchange, controls).await;
    accept_then_timeout(&*exchange, controls).await;
    duplicate_fill(&*exchange, controls).await;
    late_fill(&*exchange, controls).await;
    cancel(&*exchange, controls).await;
    withdrawals(&*exchange, controls).await;
    global_fault(&*exchange, controls).await;
}

async fn idempotent_place(ex: &dyn Exchange, c: &dyn SimControls) {
    let case = "idempotent place";
    let order = sample_order("conf:idem");
    let first = ok(ex.place_order(&order).await, case);
    assert_eq!(first.status, OrderState::Open, "[{case}]");
    let again = ok(ex.place_order(&order).await, case);
    assert_eq!(
        again.exchange_order_id, first.exchange_order_id,
        "[{case}] a repeat must return the original order"
    );
    let counters = ok(c.counters_for(&order.idempotency_key).await, case);
    assert_eq!(counters.orders_created, 1, "[{case}] exactly one order");
    assert_eq!(counters.place_calls, 2, "[{case}] both calls arrived");

    let events = ok(c.advance(Duration::ZERO).await, case);
    let fills = for_key(&events, "conf:idem");
    assert_eq!(fills.len(), 1, "[{case}] one fill: {events:?}");
    let fill = fills[0];
    assert_eq!(fill.kind, EventKind::OrderFilled, "[{case}]");
    assert_eq!(
        fill.exchange_order_id.as_deref(),
        Some(first.exchange_order_id.as_str())
    );
    assert_eq!(fill.filled_base, Some(dec("0.5")), "[{case}] filled_base");
    assert_eq!(fill.price, Some(dec("43210.12")), "[{case}] price");
    // 0.5 × 43210.12 × 0.001 = 21.60506, truncated to USD's 2 decimals.
    assert_eq!(fill.fee, Some(dec("21.60")), "[{case}] fee");

    let status = ok(ex.get_order_by_key(&order.idempotency_key).await, case)
        .unwrap_or_else(|| panic!("[{case}] order not found"));
    assert_eq!(status.state, OrderState::Filled, "[{case}]");
    assert_eq!(status.filled_base, dec("0.5"), "[{case}]");
    assert_eq!(status.client_order_id, "trade-conf:idem", "[{case}]");
    // After the fill a repeat still answers with the same order.
    let third = ok(ex.place_order(&order).await, case);
    assert_eq!(third.exchange_order_id, first.exchange_order_id, "[{case}]");
    assert_eq!(third.status, OrderState::Filled, "[{case}]");
}

async fn key_reuse_with_other_parameters(ex: &dyn Exchange) {
    let case = "key reuse with other parameters";
    let mut order = sample_order("conf:idem");
    order.base_amount = amount("0.6", 8);
    expect_rejected(ex.place_order(&order).await, case);
}

async fn reject(ex: &dyn Exchange, c: &dyn SimControls) {
    let case = "reject";
    let order = sample_order("conf:reject");
    ok(
        c.set_fault_for(
            &order.idempotency_key,
            Fault::reject("insufficient balance"),
        )
        .await,
        case,
    );
    let reason = expect_rejected(ex.place_order(&order).await, case);
    assert!(reason.contains("insufficient balance"), "[{case}] {reason}");
    // The key keeps its answer: a look-up and a repeat (a retry after a lost answer) get the
    // same rejection, and no order exists.
    let looked_up = expect_rejected(ex.get_order_by_key(&order.idempotency_key).await, case);
    assert_eq!(
        looked_up, reason,
        "[{case}] the look-up answers the rejection"
    );
    let again = expect_rejected(ex.place_order(&order).await, case);
    assert_eq!(again, reason, "[{case}] a repeat answers the rejection");
    let counters = ok(c.counters_for(&order.idempotency_key).await, case);
    assert_eq!(counters.orders_created, 0, "[{case}]");
}

async fn accept_then_timeout(ex: &dyn Exchange, c: &dyn SimControls) {
    let case = "accept then timeout";
    let order = sample_order("conf:in-doubt");
    ok(
        c.set_fault_for(&order.idempotency_key, Fault::AcceptThenTimeout)
            .await,
        case,
    );
    match ex.place_order(&order).await {
        Err(e @ Error::Unknown(_)) => assert!(e.is_in_doubt()),
        other => panic!("[{case}] expected Unknown, got {other:?}"),
    }
    // The reconcile query finds what the lost answer would have said.
    let found = ok(ex.get_order_by_key(&order.idempotency_key).await, case)
        .unwrap_or_else(|| panic!("[{case}] reconcile must find the accepted order"));
    assert_eq!(found.idempotency_key, order.idempotency_key, "[{case}]");
    // And even a (discouraged) re-send creates nothing new.
    let ack = ok(ex.place_order(&order).await, case);
    assert_eq!(ack.exchange_order_id, found.exchange_order_id, "[{case}]");
    let counters = ok(c.counters_for(&order.idempotency_key).await, case);
    assert_eq!(counters.orders_created, 1, "[{case}] exactly one order");
    let events = ok(c.advance(Duration::ZERO).await, case);
    assert_eq!(for_key(&events, "conf:in-doubt").len(), 1, "[{case}]");
}

async fn duplicate_fill(ex: &dyn Exchange, c: &dyn SimControls) {
    let case = "duplicate fill";
    let order = sample_order("conf:dup");
    ok(
        c.set_fault_for(&order.idempotency_key, Fault::DuplicateFill)
            .await,
        case,
    );
    ok(ex.place_order(&order).await, case);
    let events = ok(c.advance(Duration::ZERO).await, case);
    let fills = for_key(&events, "conf:dup");
    assert_eq!(fills.len(), 2, "[{case}] delivered twice: {events:?}");
    assert_eq!(fills[0].id, fills[1].id, "[{case}] same event id");
    assert_eq!(fills[0], fills[1], "[{case}] same event");
    let counters = ok(c.counters_for(&order.idempotency_key).await, case);
    assert_eq!(counters.orders_created, 1, "[{case}]");
}

async fn late_fill(ex: &dyn Exchange, c: &dyn SimControls) {
    let case = "late fill";
    let order = sample_order("conf:late");
    ok(
        c.set_fault_for(
            &order.idempotency_key,
            Fault::late_fill(Duration::from_secs(30)),
        )
        .await,
        case,
    );
    ok(ex.place_order(&order).await, case);
    let events = ok(c.advance(Duration::from_secs(29)).await, case);
    assert!(
        for_key(&events, "conf:late").is_empty(),
        "[{case}] too early"
    );
    let status = ok(ex.get_order_by_key(&order.idempotency_key).await, case)
        .unwrap_or_else(|| panic!("[{case}] order not found"));
    assert_eq!(status.state, OrderState::Open, "[{case}] open until filled");
    assert_eq!(status.filled_base, Decimal::ZERO, "[{case}]");
    let events = ok(c.advance(Duration::from_secs(1)).await, case);
    assert_eq!(for_key(&events, "conf:late").len(), 1, "[{case}] on time");
    let status = ok(ex.get_order_by_key(&order.idempotency_key).await, case)
        .unwrap_or_else(|| panic!("[{case}] order not found"));
    assert_eq!(status.state, OrderState::Filled, "[{case}]");
}

async fn cancel(ex: &dyn Exchange, c: &dyn SimControls) {
    let case = "cancel";
    let order = sample_order("conf:cancel");
    ok(
        c.set_fault_for(
            &order.idempotency_key,
            Fault::late_fill(Duration::from_secs(60)),
        )
        .await,
        case,
    );
    let ack = ok(ex.place_order(&order).await, case);
    let cancelled = ok(ex.cancel_order(&order.idempotency_key).await, case);
    assert_eq!(cancelled.state, OrderState::Cancelled, "[{case}]");
    assert_eq!(
        cancelled.exchange_order_id, ack.exchange_order_id,
        "[{case}]"
    );
    let again = ok(ex.cancel_order(&order.idempotency_key).await, case);
    assert_eq!(again.state, OrderState::Cancelled, "[{case}] idempotent");
    let events = ok(c.advance(Duration::from_secs(61)).await, case);
    let mine = for_key(&events, "conf:cancel");
    assert_eq!(
        mine.len(),
        1,
        "[{case}] one cancel event, no fill: {mine:?}"
    );
    assert_eq!(mine[0].kind, EventKind::OrderCancelled, "[{case}]");
    let status = ok(ex.get_order_by_key(&order.idempotency_key).await, case)
        .unwrap_or_else(|| panic!("[{case}] order not found"));
    assert_eq!(status.state, OrderState::Cancelled, "[{case}]");
    // A filled order and an unknown one cannot be cancelled.
    expect_rejected(
        ex.cancel_order(&IdempotencyKey::new("conf:idem")).await,
        case,
    );
    expect_rejected(
        ex.cancel_order(&IdempotencyKey::new("conf:never-placed"))
            .await,
        case,
    );
}

async fn withdrawals(ex: &dyn Exchange, c: &dyn SimControls) {
    let case = "withdrawal idempotent";
    let w = sample_withdrawal("conf:wd");
    let first = ok(ex.submit_withdrawal(&w).await, case);
    assert_eq!(first.status, WithdrawalState::Pending, "[{case}]");
    let again = ok(ex.submit_withdrawal(&w).await, case);
    assert_eq!(again.withdrawal_id, first.withdrawal_id, "[{case}]");
    let counters = ok(c.counters_for(&w.idempotency_key).await, case);
    assert_eq!(counters.withdrawals_created, 1, "[{case}]");
    assert_eq!(counters.withdrawal_calls, 2, "[{case}]");
    let events = ok(c.advance(Duration::ZERO).await, case);
    let mine = for_key(&events, "conf:wd");
    assert_eq!(mine.len(), 1, "[{case}] {events:?}");
    assert_eq!(mine[0].kind, EventKind::WithdrawalConfirmed, "[{case}]");
    assert_eq!(mine[0].amount, Some(dec("0.25")), "[{case}]");
    let status = ok(ex.get_withdrawal_by_key(&w.idempotency_key).await, case)
        .unwrap_or_else(|| panic!("[{case}] withdrawal not found"));
    assert_eq!(status.state, WithdrawalState::Confirmed, "[{case}]");
    assert_eq!(status.tx_hash, mine[0].tx_hash, "[{case}]");
    assert!(status.tx_hash.is_some(), "[{case}]");

    let case = "withdrawal key reuse";
    let mut other = sample_withdrawal("conf:wd");
    other.address = "bc1qu6p0py2tgnljt5xyrrfltkjzs865x45m5te026".into();
    expect_rejected(ex.submit_withdrawal(&other).await, case);

    let case = "withdrawal reject";
    let w = sample_withdrawal("conf:wd-reject");
    ok(
        c.set_fault_for(&w.idempotency_key, Fault::reject("address not whitelisted"))
            .await,
        case,
    );
    let reason = expect_rejected(ex.submit_withdrawal(&w).await, case);
    assert!(reason.contains("whitelisted"), "[{case}] {reason}");
    let looked_up = expect_rejected(ex.get_withdrawal_by_key(&w.idempotency_key).await, case);
    assert_eq!(
        looked_up, reason,
        "[{case}] the look-up answers the rejection"
    );
    let again = expect_rejected(ex.submit_withdrawal(&w).await, case);
    assert_eq!(again, reason, "[{case}] a repeat answers the rejection");
    let counters = ok(c.counters_for(&w.idempotency_key).await, case);
    assert_eq!(counters.withdrawals_created, 0, "[{case}]");

    let case = "withdrawal in doubt";
    let w = sample_withdrawal("conf:wd-doubt");
    ok(
        c.set_fault_for(&w.idempotency_key, Fault::AcceptThenTimeout)
            .await,
        case,
    );
    match ex.submit_withdrawal(&w).await {
        Err(Error::Unknown(_)) => {}
        other => panic!("[{case}] expected Unknown, got {other:?}"),
    }
    let found = ok(ex.get_withdrawal_by_key(&w.idempotency_key).await, case)
        .unwrap_or_else(|| panic!("[{case}] reconcile must find it"));
    assert_eq!(found.amount, dec("0.25"), "[{case}]");
    let counters = ok(c.counters_for(&w.idempotency_key).await, case);
    assert_eq!(counters.withdrawals_created, 1, "[{case}]");

    let case = "withdrawal duplicate confirmation";
    let w = sample_withdrawal("conf:wd-dup");
    ok(
        c.set_fault_for(&w.idempotency_key, Fault::DuplicateFill)
            .await,
        case,
    );
    ok(ex.submit_withdrawal(&w).await, case);
    let events = ok(c.advance(Duration::ZERO).await, case);
    let mine = for_key(&events, "conf:wd-dup");
    assert_eq!(mine.len(), 2, "[{case}]");
    assert_eq!(mine[0].id, mine[1].id, "[{case}]");
}

async fn global_fault(ex: &dyn Exchange, c: &dyn SimControls) {
    let case = "global fault";
    ok(c.set_fault(Some(Fault::reject("maintenance"))).await, case);
    for key in ["conf:global-1", "conf:global-2"] {
        let reason = expect_rejected(ex.place_order(&sample_order(key)).await, case);
        assert!(reason.contains("maintenance"), "[{case}] {reason}");
    }
    expect_rejected(
        ex.submit_withdrawal(&sample_withdrawal("conf:global-wd"))
            .await,
        case,
    );
    ok(c.set_fault(None).await, case);
    ok(ex.place_order(&sample_order("conf:global-1")).await, case);
    let counters = ok(
        c.counters_for(&IdempotencyKey::new("conf:global-1")).await,
        case,
    );
    assert_eq!(counters.orders_created, 1, "[{case}]");
    assert_eq!(counters.place_calls, 2, "[{case}]");
}
