//! [`SimulatedExchange`]: an in-process exchange for development and tests.
//!
//! Deterministic: ids derive from a seed and a counter, time is a logical
//! clock that moves only by [`SimulatedExchange::advance`], and events are
//! delivered only by `advance`/[`SimulatedExchange::deliver_pending`] — no
//! wall clock, no randomness, no background task. Orders fill completely at
//! their limit price, `fill_delay` after they are placed; withdrawals
//! confirm `confirm_delay` after they are submitted.
//!
//! Fault modes ([`Fault`]) are set globally (every call until cleared) or for
//! one idempotency key (consumed by the next call with that key):
//! accept-then-timeout, reject, duplicate event, late event.
//!
//! [`SimControls`] is the seam through which the conformance suite steers a
//! simulator, in-process or behind HTTP; it, the faults, the settings and the
//! counters live in `steering`, the exchange's state machine here.

use super::{
    Error, Event, EventKind, Exchange, IdempotencyKey, OrderAck, OrderRequest, OrderState,
    OrderStatus, Result, WithdrawalAck, WithdrawalRequest, WithdrawalState, WithdrawalStatus,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

mod steering;

pub use steering::{Counters, Fault, FillSink, KeyCounters, SimConfig, SimControls};

/// A [`FillSink`] that keeps every delivered event.
#[derive(Debug, Default)]
pub struct CollectingSink(Mutex<Vec<Event>>);

impl CollectingSink {
    /// Takes the events collected so far.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *lock(&self.0))
    }
}

impl FillSink for CollectingSink {
    fn deliver(&self, event: &Event) {
        lock(&self.0).push(event.clone());
    }
}

struct Order {
    request: OrderRequest,
    exchange_order_id: String,
    state: OrderState,
    filled_base: Decimal,
    price: Option<Decimal>,
    fee: Decimal,
}

impl Order {
    fn status(&self) -> OrderStatus {
        OrderStatus {
            exchange_order_id: self.exchange_order_id.clone(),
            idempotency_key: self.request.idempotency_key.clone(),
            client_order_id: self.request.client_order_id.clone(),
            state: self.state,
            filled_base: self.filled_base,
            price: self.price,
            fee: self.fee,
        }
    }
}

struct Withdrawal {
    request: WithdrawalRequest,
    withdrawal_id: String,
    state: WithdrawalState,
    tx_hash: Option<String>,
}

impl Withdrawal {
    fn status(&self) -> WithdrawalStatus {
        WithdrawalStatus {
            withdrawal_id: self.withdrawal_id.clone(),
            idempotency_key: self.request.idempotency_key.clone(),
            asset: self.request.asset.code.clone(),
            amount: self.request.amount.value(),
            address: self.request.address.clone(),
            state: self.state,
            tx_hash: self.tx_hash.clone(),
        }
    }
}

/// What becomes due: applied to the books when delivered, so that an order
/// is `open` until its (possibly late) fill arrives.
#[derive(Clone)]
enum Pending {
    Fill { key: IdempotencyKey, copies: u32 },
    Confirm { key: IdempotencyKey, copies: u32 },
    Ready { event: Box<Event> },
}

struct State {
    config: SimConfig,
    now: DateTime<Utc>,
    seq: u64,
    global_fault: Option<Fault>,
    key_faults: HashMap<IdempotencyKey, Fault>,
    orders: HashMap<IdempotencyKey, Order>,
    withdrawals: HashMap<IdempotencyKey, Withdrawal>,
    /// The keys whose order or withdrawal was rejected, with the reason: a repeat of the key
    /// and a look-up by it answer the same rejection (an idempotent API replays its answer).
    rejected: HashMap<IdempotencyKey, String>,
    /// Due time → items, in insertion order within one instant.
    pending: BTreeMap<(DateTime<Utc>, u64), Pending>,
    per_key: HashMap<IdempotencyKey, KeyCounters>,
    totals: Counters,
}

impl State {
    /// The rejection recorded for `key`, if any, as the error a repeat answers.
    fn rejection(&self, key: &IdempotencyKey) -> Result<()> {
        match self.rejected.get(key) {
            Some(reason) => Err(Error::Rejected(reason.clone())),
            None => Ok(()),
        }
    }

    /// Records that the request under `key` was rejected, and answers it.
    fn reject<T>(&mut self, key: &IdempotencyKey, e: Error) -> Result<T> {
        if let Error::Rejected(reason) = &e {
            self.rejected.insert(key.clone(), reason.clone());
        }
        Err(e)
    }

    fn next_id(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}_{:x}_{:06}", self.config.seed, self.seq)
    }

    /// The fault for this call: a key's one-shot fault wins over the global one.
    /// The fault for `key`, and whether it was the key's own (else the global one).
    fn take_fault_of(&mut self, key: &IdempotencyKey) -> (Option<Fault>, bool) {
        match self.key_faults.remove(key) {
            Some(f) => (Some(f), true),
            None => (self.global_fault.clone(), false),
        }
    }

    /// A [`Fault::Reject`]: the key's own is a decision about the request, recorded like any
    /// rejection; the global one is the venue refusing all business for a while (maintenance),
    /// not a decision about the key, so a later repeat may pass.
    fn refuse<T>(&mut self, key: &IdempotencyKey, own: bool, reason: &str) -> Result<T> {
        let e = Error::Rejected(reason.to_string());
        if own { self.reject(key, e) } else { Err(e) }
    }

    fn schedule(&mut self, delay_ms: u64, item: Pending) {
        self.seq += 1;
        let delay = i64::try_from(delay_ms)
            .ok()
            .and_then(chrono::TimeDelta::try_milliseconds)
            .unwrap_or(chrono::TimeDelta::MAX);
        let due = self
            .now
            .checked_add_signed(delay)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        self.pending.insert((due, self.seq), item);
    }

    fn counters(&mut self, key: &IdempotencyKey) -> &mut KeyCounters {
        self.per_key.entry(key.clone()).or_default()
    }

    /// Removes every item due by now, applies it, and returns the events to
    /// deliver (duplicates included).
    fn due_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let ((due, _), item) = entry.remove_entry();
            match item {
                Pending::Fill { key, copies } => {
                    if let Some(event) = self.apply_fill(&key, due) {
                        for _ in 0..copies {
                            out.push(event.clone());
                        }
                    }
                }
                Pending::Confirm { key, copies } => {
                    if let Some(event) = self.apply_confirm(&key, due) {
                        for _ in 0..copies {
                            out.push(event.clone());
                        }
                    }
                }
                Pending::Ready { event } => out.push(*event),
            }
        }
        self.totals.events_delivered += out.len() as u64;
        out
    }

    fn apply_fill(&mut self, key: &IdempotencyKey, at: DateTime<Utc>) -> Option<Event> {
        let fee_rate = self.config.fee_rate;
        let id = self.next_id("evt");
        let order = self.orders.get_mut(key)?;
        if order.state != OrderState::Open {
            return None; // cancelled meanwhile: no fill
        }
        let qty = order.request.base_amount.value();
        let price = order.request.limit_price;
        // Placement refused notionals that overflow, and the rate is a
        // fraction, so the product exists.
        let fee = qty
            .checked_mul(price)
            .and_then(|notional| notional.checked_mul(fee_rate))
            .unwrap_or(Decimal::ZERO)
            .round_dp_with_strategy(order.request.quote.scale, RoundingStrategy::ToZero);
        order.state = OrderState::Filled;
        order.filled_base = qty;
        order.price = Some(price);
        order.fee = fee;
        Some(Event {
            id,
            kind: EventKind::OrderFilled,
            idempotency_key: key.clone(),
            exchange_order_id: Some(order.exchange_order_id.clone()),
            filled_base: Some(qty),
            price: Some(price),
            fee: Some(fee),
            withdrawal_id: None,
            amount: None,
            tx_hash: None,
            created_at: at,
        })
    }

    fn apply_confirm(&mut self, key: &IdempotencyKey, at: DateTime<Utc>) -> Option<Event> {
        let id = self.next_id("evt");
        let seed = self.config.seed;
        let w = self.withdrawals.get_mut(key)?;
        if w.state != WithdrawalState::Pending {
            return None;
        }
        let tx_hash = format!(
            "0x{}",
            hex::encode(Sha256::digest(format!("{seed}:{}", w.withdrawal_id)))
        );
        w.state = WithdrawalState::Confirmed;
        w.tx_hash = Some(tx_hash.clone());
        Some(Event {
            id,
            kind: EventKind::WithdrawalConfirmed,
            idempotency_key: key.clone(),
            exchange_order_id: None,
            filled_base: None,
            price: None,
            fee: None,
            withdrawal_id: Some(w.withdrawal_id.clone()),
            amount: Some(w.request.amount.value()),
            tx_hash: Some(tx_hash),
            created_at: at,
        })
    }
}

/// The in-process simulated exchange. Cheap to share: clone the `Arc`.
pub struct SimulatedExchange {
    state: Mutex<State>,
    sinks: Mutex<Vec<Arc<dyn FillSink>>>,
    budget: Mutex<super::budget::BudgetLog>,
}

impl std::fmt::Debug for SimulatedExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedExchange").finish_non_exhaustive()
    }
}

// A std mutex, not tokio's: it is never held across an await, and a poisoned
// lock only means a test panicked mid-call — the data is still consistent
// enough to keep serving, so we take it back rather than propagate the panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for SimulatedExchange {
    fn default() -> Self {
        SimulatedExchange::new(SimConfig::default())
    }
}

impl SimulatedExchange {
    /// A simulator with `config` and no sinks.
    pub fn new(config: SimConfig) -> Self {
        SimulatedExchange {
            state: Mutex::new(State {
                now: config.start,
                config,
                seq: 0,
                global_fault: None,
                key_faults: HashMap::new(),
                orders: HashMap::new(),
                withdrawals: HashMap::new(),
                rejected: HashMap::new(),
                pending: BTreeMap::new(),
                per_key: HashMap::new(),
                totals: Counters::default(),
            }),
            sinks: Mutex::new(Vec::new()),
            budget: Mutex::new(super::budget::BudgetLog::default()),
        }
    }

    /// The API key of in-process calls.
    pub const IN_PROCESS_KEY: &'static str = "in-process";

    /// Charges `weight` to `api_key`'s request budget now, or says how long until it would
    /// fit (and counts the refusal).
    pub fn charge(&self, api_key: &str, weight: u32) -> std::result::Result<(), Duration> {
        let Some(budget) = lock(&self.state).config.budget else {
            return Ok(());
        };
        let charged = lock(&self.budget).charge(budget, api_key, weight, std::time::Instant::now());
        if charged.is_err() {
            lock(&self.state).totals.rate_limited += 1;
        }
        charged
    }

    fn charge_in_process(&self, weight: u32) -> Result<()> {
        self.charge(Self::IN_PROCESS_KEY, weight).map_err(|wait| {
            Error::Unavailable(format!(
                "rate limited: over the request budget, retry after {} ms",
                wait.as_millis()
            ))
        })
    }

    /// An order's status by key, without charging the budget (the HTTP server charges first):
    /// [`Error::Rejected`] when the order placed with the key was rejected.
    pub fn order_status(&self, key: &IdempotencyKey) -> Result<Option<OrderStatus>> {
        let st = lock(&self.state);
        st.rejection(key)?;
        Ok(st.orders.get(key).map(Order::status))
    }

    /// A withdrawal's status by key, without charging the budget: [`Error::Rejected`] when the
    /// withdrawal submitted with the key was rejected.
    pub fn withdrawal_status(&self, key: &IdempotencyKey) -> Result<Option<WithdrawalStatus>> {
        let st = lock(&self.state);
        st.rejection(key)?;
        Ok(st.withdrawals.get(key).map(Withdrawal::status))
    }

    /// Places an order without charging the budget.
    pub fn place_uncharged(&self, order: &OrderRequest) -> Result<OrderAck> {
        self.place(order)
    }

    /// Cancels without charging the budget.
    pub fn cancel_uncharged(&self, key: &IdempotencyKey) -> Result<OrderStatus> {
        self.cancel(key)
    }

    /// Submits a withdrawal without charging the budget.
    pub fn submit_uncharged(&self, w: &WithdrawalRequest) -> Result<WithdrawalAck> {
        self.submit(w)
    }

    /// Adds a sink that receives every delivered event.
    pub fn add_sink(&self, sink: Arc<dyn FillSink>) {
        lock(&self.sinks).push(sink);
    }

    /// Sets (or clears) the fault applied to every call.
    pub fn set_fault(&self, fault: Option<Fault>) {
        lock(&self.state).global_fault = fault;
    }

    /// Sets the fault for the next call with `key`.
    pub fn set_fault_for(&self, key: &IdempotencyKey, fault: Fault) {
        lock(&self.state).key_faults.insert(key.clone(), fault);
    }

    /// The logical time.
    pub fn now(&self) -> DateTime<Utc> {
        lock(&self.state).now
    }

    /// Moves the clock by `by`, then delivers what is due.
    pub fn advance(&self, by: Duration) -> Vec<Event> {
        {
            let mut st = lock(&self.state);
            let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
            st.now = st.now.checked_add_signed(by).unwrap_or(st.now);
        }
        self.deliver_pending()
    }

    /// Delivers every event due at the current time to the sinks and returns
    /// them (a duplicated event appears twice).
    pub fn deliver_pending(&self) -> Vec<Event> {
        let events = lock(&self.state).due_events();
        let sinks = lock(&self.sinks).clone();
        for event in &events {
            for sink in &sinks {
                sink.deliver(event);
            }
        }
        events
    }

    /// Puts an event back to be delivered again at the next delivery (the
    /// HTTP server does this when a webhook POST fails: at-least-once).
    pub fn redeliver(&self, event: Event) {
        let mut st = lock(&self.state);
        st.totals.events_delivered = st.totals.events_delivered.saturating_sub(1);
        st.schedule(
            0,
            Pending::Ready {
                event: Box::new(event),
            },
        );
    }

    /// The counters of `key`.
    pub fn counters_for(&self, key: &IdempotencyKey) -> KeyCounters {
        lock(&self.state)
            .per_key
            .get(key)
            .copied()
            .unwrap_or_default()
    }

    /// Totals over all keys.
    pub fn counters(&self) -> Counters {
        lock(&self.state).totals
    }

    fn place(&self, order: &OrderRequest) -> Result<OrderAck> {
        let mut st = lock(&self.state);
        let key = &order.idempotency_key;
        st.counters(key).place_calls += 1;
        if let Some(existing) = st.orders.get(key) {
            if existing.request != *order {
                return Err(Error::Rejected(format!(
                    "idempotency key {key} was already used for a different order"
                )));
            }
            return Ok(OrderAck {
                exchange_order_id: existing.exchange_order_id.clone(),
                status: existing.state,
            });
        }
        st.rejection(key)?;
        let (fault, own) = st.take_fault_of(key);
        if let Some(Fault::Reject { reason }) = &fault {
            return st.refuse(key, own, reason);
        }
        if let Some(Fault::RejectThenTimeout { reason }) = &fault {
            st.rejected.insert(key.clone(), reason.clone());
            return Err(Error::Unknown("simulated timeout after a rejection".into()));
        }
        if let Err(e) = validate_order(order) {
            return st.reject(key, e);
        }
        let exchange_order_id = st.next_id("ord");
        st.orders.insert(
            key.clone(),
            Order {
                request: order.clone(),
                exchange_order_id: exchange_order_id.clone(),
                state: OrderState::Open,
                filled_base: Decimal::ZERO,
                price: None,
                fee: Decimal::ZERO,
            },
        );
        st.counters(key).orders_created += 1;
        st.totals.orders_created += 1;
        let (delay, copies) = delay_and_copies(fault.as_ref(), st.config.fill_delay_ms);
        st.schedule(
            delay,
            Pending::Fill {
                key: key.clone(),
                copies,
            },
        );
        if fault == Some(Fault::AcceptThenTimeout) {
            return Err(Error::Unknown(
                "simulated timeout after the order was accepted".into(),
            ));
        }
        Ok(OrderAck {
            exchange_order_id,
            status: OrderState::Open,
        })
    }

    fn cancel(&self, key: &IdempotencyKey) -> Result<OrderStatus> {
        let mut st = lock(&self.state);
        let id = st.next_id("evt");
        let now = st.now;
        let Some(order) = st.orders.get_mut(key) else {
            return Err(Error::Rejected(format!(
                "no order with idempotency key {key}"
            )));
        };
        match order.state {
            OrderState::Cancelled => Ok(order.status()),
            OrderState::Filled => Err(Error::Rejected(format!(
                "order {} is already filled",
                order.exchange_order_id
            ))),
            OrderState::Open => {
                order.state = OrderState::Cancelled;
                let status = order.status();
                let event = Event {
                    id,
                    kind: EventKind::OrderCancelled,
                    idempotency_key: key.clone(),
                    exchange_order_id: Some(order.exchange_order_id.clone()),
                    filled_base: None,
                    price: None,
                    fee: None,
                    withdrawal_id: None,
                    amount: None,
                    tx_hash: None,
                    created_at: now,
                };
                st.schedule(
                    0,
                    Pending::Ready {
                        event: Box::new(event),
                    },
                );
                Ok(status)
            }
        }
    }

    fn submit(&self, w: &WithdrawalRequest) -> Result<WithdrawalAck> {
        let mut st = lock(&self.state);
        let key = &w.idempotency_key;
        st.counters(key).withdrawal_calls += 1;
        if let Some(existing) = st.withdrawals.get(key) {
            if existing.request != *w {
                return Err(Error::Rejected(format!(
                    "idempotency key {key} was already used for a different withdrawal"
                )));
            }
            return Ok(WithdrawalAck {
                withdrawal_id: existing.withdrawal_id.clone(),
                status: existing.state,
            });
        }
        st.rejection(key)?;
        let (fault, own) = st.take_fault_of(key);
        if let Some(Fault::Reject { reason }) = &fault {
            return st.refuse(key, own, reason);
        }
        if let Some(Fault::RejectThenTimeout { reason }) = &fault {
            st.rejected.insert(key.clone(), reason.clone());
            return Err(Error::Unknown("simulated timeout after a rejection".into()));
        }
        if w.amount.is_negative() {
            return st.reject(key, Error::Rejected("amount must be positive".into()));
        }
        if w.address.trim().is_empty() {
            return st.reject(key, Error::Rejected("address is empty".into()));
        }
        let withdrawal_id = st.next_id("wd");
        st.withdrawals.insert(
            key.clone(),
            Withdrawal {
                request: w.clone(),
                withdrawal_id: withdrawal_id.clone(),
                state: WithdrawalState::Pending,
                tx_hash: None,
            },
        );
        st.counters(key).withdrawals_created += 1;
        st.totals.withdrawals_created += 1;
        let (delay, copies) = delay_and_copies(fault.as_ref(), st.config.confirm_delay_ms);
        st.schedule(
            delay,
            Pending::Confirm {
                key: key.clone(),
                copies,
            },
        );
        if fault == Some(Fault::AcceptThenTimeout) {
            return Err(Error::Unknown(
                "simulated timeout after the withdrawal was accepted".into(),
            ));
        }
        Ok(WithdrawalAck {
            withdrawal_id,
            status: WithdrawalState::Pending,
        })
    }
}

fn delay_and_copies(fault: Option<&Fault>, default_delay_ms: u64) -> (u64, u32) {
    match fault {
        Some(Fault::LateFill { delay_ms }) => (*delay_ms, 1),
        Some(Fault::DuplicateFill) => (default_delay_ms, 2),
        _ => (default_delay_ms, 1),
    }
}

fn validate_order(order: &OrderRequest) -> Result<()> {
    if order.client_order_id.trim().is_empty() {
        return Err(Error::Rejected("client_order_id is empty".into()));
    }
    if order.base.code == order.quote.code {
        return Err(Error::Rejected("base and quote are the same asset".into()));
    }
    if order.base_amount.is_negative() {
        return Err(Error::Rejected("base_amount must be positive".into()));
    }
    if order.limit_price <= Decimal::ZERO {
        return Err(Error::Rejected("limit_price must be positive".into()));
    }
    if order
        .base_amount
        .value()
        .checked_mul(order.limit_price)
        .is_none()
    {
        return Err(Error::Rejected("notional is too large".into()));
    }
    Ok(())
}

#[async_trait]
impl Exchange for SimulatedExchange {
    async fn place_order(&self, order: &OrderRequest) -> Result<OrderAck> {
        self.charge_in_process(super::weight::PLACE_ORDER)?;
        self.place(order)
    }

    async fn cancel_order(&self, key: &IdempotencyKey) -> Result<OrderStatus> {
        self.charge_in_process(super::weight::CANCEL_ORDER)?;
        self.cancel(key)
    }

    async fn get_order_by_key(&self, key: &IdempotencyKey) -> Result<Option<OrderStatus>> {
        self.charge_in_process(super::weight::ORDER_LOOKUP)?;
        self.order_status(key)
    }

    async fn submit_withdrawal(&self, withdrawal: &WithdrawalRequest) -> Result<WithdrawalAck> {
        self.charge_in_process(super::weight::SUBMIT_WITHDRAWAL)?;
        self.submit(withdrawal)
    }

    async fn get_withdrawal_by_key(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Option<WithdrawalStatus>> {
        self.charge_in_process(super::weight::WITHDRAWAL_LOOKUP)?;
        self.withdrawal_status(key)
    }
}

#[async_trait]
impl SimControls for SimulatedExchange {
    async fn set_fault(&self, fault: Option<Fault>) -> Result<()> {
        SimulatedExchange::set_fault(self, fault);
        Ok(())
    }

    async fn set_fault_for(&self, key: &IdempotencyKey, fault: Fault) -> Result<()> {
        SimulatedExchange::set_fault_for(self, key, fault);
        Ok(())
    }

    async fn advance(&self, by: Duration) -> Result<Vec<Event>> {
        Ok(SimulatedExchange::advance(self, by))
    }

    async fn counters_for(&self, key: &IdempotencyKey) -> Result<KeyCounters> {
        Ok(SimulatedExchange::counters_for(self, key))
    }
}
