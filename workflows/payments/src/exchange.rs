//! Exchange adapters: the [`Exchange`] trait every venue implements, its
//! request/response types, the webhook event format and signatures.
//!
//! Layout:
//! - this file — the trait, the wire types and [`Error`];
//! - [`sim`] — [`sim::SimulatedExchange`], an in-process, deterministic
//!   exchange with fault modes, and the [`sim::SimControls`] seam tests use
//!   to steer any simulator;
//! - [`server`] — `serve_simulator`: the same simulator over HTTP (poem),
//!   delivering events as signed webhooks; the `exchange-sim` binary wraps it;
//! - [`http`] — [`http::HttpExchange`], the reqwest client for that API;
//! - [`signature`] — Stripe-style and GitHub-style webhook HMACs;
//! - [`conformance`] — the one behavioural suite every implementation passes.
//!
//! # How a workflow step calls an exchange (contract rule 3)
//!
//! Every call carries the step's deterministic idempotency key
//! (`"{workflow_id}:{step}"`, see [`IdempotencyKey::for_step`]); the exchange
//! never creates a second order or withdrawal for a key it has seen and
//! answers a repeat with the original ack. The three error kinds decide what
//! the step does next:
//!
//! - [`Error::Rejected`] — a definite "no": nothing exists at the exchange;
//!   the step fails (or compensates) with the reason.
//! - [`Error::Unavailable`] — the request was definitely not sent (connection
//!   refused, rate-limited before processing): retry with backoff.
//! - [`Error::Unknown`] — sent, but no answer (timeout, reset): the order may
//!   or may not exist. The step goes `in_doubt` and is resolved by the
//!   reconcile query [`Exchange::get_order_by_key`] /
//!   [`Exchange::get_withdrawal_by_key`] (found → continue with it; absent
//!   after the venue's settle time → safe to place again) or by an admin —
//!   never by a blind re-send.
//!
//! Amounts and prices are `rust_decimal::Decimal` in Rust and JSON strings on
//! the wire; incoming amounts are parsed through [`AmountStr`], so a JSON
//! number, an exponent or a sign is refused, never rounded.

pub mod budget;
pub mod conformance;
pub mod http;
pub mod server;
pub mod signature;
pub mod sim;

use crate::money::{Amount, AmountStr, Asset};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::fmt;

/// `Result` with the exchange [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How an exchange call failed. The variants are exactly the three cases a
/// workflow must tell apart (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", content = "reason", rename_all = "snake_case")]
pub enum Error {
    /// A definite "no": the exchange refused and recorded nothing.
    #[error("rejected by the exchange: {0}")]
    Rejected(String),
    /// The request may have been processed (timeout or connection lost after
    /// sending): the step is in doubt until reconciled.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// The request definitely did not reach the exchange: safe to retry.
    #[error("exchange unavailable (request not sent): {0}")]
    Unavailable(String),
}

/// The name the issue uses for [`Error`].
pub use self::Error as ExchangeError;

/// What each request costs against the exchange's request budget
/// ([`budget::RequestBudget`]): look-ups cost more than writes, as on real exchanges.
pub mod weight {
    pub const PLACE_ORDER: u32 = 1;
    pub const CANCEL_ORDER: u32 = 1;
    pub const ORDER_LOOKUP: u32 = 2;
    pub const SUBMIT_WITHDRAWAL: u32 = 1;
    pub const WITHDRAWAL_LOOKUP: u32 = 2;
}

impl Error {
    /// True when the call's outcome is unknown: the step goes `in_doubt`.
    pub fn is_in_doubt(&self) -> bool {
        matches!(self, Error::Unknown(_))
    }

    /// True when retrying the same call is safe without reconciling first.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

/// The deterministic key that makes an external call idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Wraps an existing key (e.g. a journal row's `idempotency_key`).
    pub fn new(key: impl Into<String>) -> Self {
        IdempotencyKey(key.into())
    }

    /// The key of `step` in workflow `workflow_id`: `"{workflow_id}:{step}"`,
    /// the same text as `ledgerflow_engine::workflow::idempotency_key`.
    pub fn for_step(workflow_id: impl fmt::Display, step: &str) -> Self {
        IdempotencyKey(format!("{workflow_id}:{step}"))
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Buy or sell the base asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// Buy `base_amount` of the base asset, paying in the quote asset.
    Buy,
    /// Sell `base_amount` of the base asset for the quote asset.
    Sell,
}

/// A limit order. Serialized with amounts as strings; deserialized strictly
/// (see [`AmountStr`]) and checked against the assets' scales.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "OrderRequestWire")]
pub struct OrderRequest {
    /// Deterministic per workflow step; the exchange dedupes on it.
    pub idempotency_key: IdempotencyKey,
    /// Our own order reference (e.g. the trade id), echoed in statuses.
    pub client_order_id: String,
    /// Buy or sell.
    pub side: Side,
    /// The asset bought or sold.
    pub base: Asset,
    /// The asset it is priced in.
    pub quote: Asset,
    /// How much of the base asset.
    pub base_amount: Amount,
    /// The worst acceptable price, in quote per base (a string on the wire).
    pub limit_price: Decimal,
}

#[derive(Deserialize)]
struct OrderRequestWire {
    idempotency_key: IdempotencyKey,
    client_order_id: String,
    side: Side,
    base: Asset,
    quote: Asset,
    base_amount: AmountStr,
    limit_price: AmountStr,
}

impl TryFrom<OrderRequestWire> for OrderRequest {
    type Error = crate::Error;

    fn try_from(w: OrderRequestWire) -> crate::Result<Self> {
        let base_amount = w.base_amount.to_amount(w.base.scale)?;
        let limit_price = w.limit_price.to_amount(w.quote.scale)?.value();
        Ok(OrderRequest {
            idempotency_key: w.idempotency_key,
            client_order_id: w.client_order_id,
            side: w.side,
            base: w.base,
            quote: w.quote,
            base_amount,
            limit_price,
        })
    }
}

/// Where an order is at the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    /// Accepted, not filled yet.
    Open,
    /// Completely filled.
    Filled,
    /// Cancelled before it filled.
    Cancelled,
}

/// The exchange's answer to a placed order (the same one for every repeat of
/// its idempotency key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderAck {
    /// The exchange's id for the order.
    pub exchange_order_id: String,
    /// Its state when the ack was sent.
    pub status: OrderState,
}

/// An order as the exchange currently sees it: the answer of the reconcile
/// query [`Exchange::get_order_by_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderStatus {
    /// The exchange's id for the order.
    pub exchange_order_id: String,
    /// The key it was placed with.
    pub idempotency_key: IdempotencyKey,
    /// Our reference, as sent.
    pub client_order_id: String,
    /// Current state.
    pub state: OrderState,
    /// Base amount filled so far (zero while open).
    pub filled_base: Decimal,
    /// Execution price, once filled.
    pub price: Option<Decimal>,
    /// Fee charged in the quote asset (zero while open).
    pub fee: Decimal,
}

/// A withdrawal to an external address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WithdrawalRequestWire")]
pub struct WithdrawalRequest {
    /// Deterministic per workflow step; the exchange dedupes on it.
    pub idempotency_key: IdempotencyKey,
    /// The asset withdrawn.
    pub asset: Asset,
    /// How much.
    pub amount: Amount,
    /// The destination address.
    pub address: String,
}

#[derive(Deserialize)]
struct WithdrawalRequestWire {
    idempotency_key: IdempotencyKey,
    asset: Asset,
    amount: AmountStr,
    address: String,
}

impl TryFrom<WithdrawalRequestWire> for WithdrawalRequest {
    type Error = crate::Error;

    fn try_from(w: WithdrawalRequestWire) -> crate::Result<Self> {
        let amount = w.amount.to_amount(w.asset.scale)?;
        Ok(WithdrawalRequest {
            idempotency_key: w.idempotency_key,
            asset: w.asset,
            amount,
            address: w.address,
        })
    }
}

/// Where a withdrawal is at the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WithdrawalState {
    /// Accepted, not yet confirmed on chain.
    Pending,
    /// Confirmed on chain.
    Confirmed,
}

/// The exchange's answer to a submitted withdrawal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WithdrawalAck {
    /// The exchange's id for the withdrawal.
    pub withdrawal_id: String,
    /// Its state when the ack was sent.
    pub status: WithdrawalState,
}

/// A withdrawal as the exchange currently sees it (reconcile query).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WithdrawalStatus {
    /// The exchange's id for the withdrawal.
    pub withdrawal_id: String,
    /// The key it was submitted with.
    pub idempotency_key: IdempotencyKey,
    /// Asset code.
    pub asset: String,
    /// Amount withdrawn.
    pub amount: Decimal,
    /// Destination.
    pub address: String,
    /// Current state.
    pub state: WithdrawalState,
    /// The chain transaction, once confirmed.
    pub tx_hash: Option<String>,
}

/// What an event reports. Stable strings on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// An order filled (`filled_base`, `price`, `fee` are set).
    #[serde(rename = "order.filled")]
    OrderFilled,
    /// An order was cancelled.
    #[serde(rename = "order.cancelled")]
    OrderCancelled,
    /// A withdrawal confirmed (`withdrawal_id`, `amount`, `tx_hash` are set).
    #[serde(rename = "withdrawal.confirmed")]
    WithdrawalConfirmed,
}

impl EventKind {
    /// The wire name, e.g. `"order.filled"`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::OrderFilled => "order.filled",
            EventKind::OrderCancelled => "order.cancelled",
            EventKind::WithdrawalConfirmed => "withdrawal.confirmed",
        }
    }
}

/// An asynchronous notification from the exchange (a webhook body). `id` is
/// unique per event and is the inbox's dedupe key: a redelivered event keeps
/// its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The provider's event id.
    pub id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// The idempotency key of the order or withdrawal concerned.
    pub idempotency_key: IdempotencyKey,
    /// Order events: the exchange's order id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange_order_id: Option<String>,
    /// `order.filled`: base amount filled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filled_base: Option<Decimal>,
    /// `order.filled`: execution price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Decimal>,
    /// `order.filled`: fee in the quote asset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fee: Option<Decimal>,
    /// Withdrawal events: the exchange's withdrawal id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withdrawal_id: Option<String>,
    /// `withdrawal.confirmed`: amount sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Decimal>,
    /// `withdrawal.confirmed`: chain transaction hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_hash: Option<String>,
    /// When the exchange emitted it.
    pub created_at: DateTime<Utc>,
}

/// A trading venue. Object safe: hold it as `Arc<dyn Exchange>`.
///
/// Mutating calls are idempotent per [`IdempotencyKey`]; reads never fail
/// with [`Error::Unknown`] (a failed read is [`Error::Unavailable`]: just
/// retry it).
#[async_trait]
pub trait Exchange: Send + Sync {
    /// Places a limit order; a repeat of the key returns the original ack, or
    /// the original rejection (a repeat with different parameters is
    /// [`Error::Rejected`]).
    async fn place_order(&self, order: &OrderRequest) -> Result<OrderAck>;

    /// Cancels the order placed with `key`. Idempotent: cancelling a
    /// cancelled order returns its status again; a filled or unknown order is
    /// [`Error::Rejected`].
    async fn cancel_order(&self, key: &IdempotencyKey) -> Result<OrderStatus>;

    /// The reconcile query: the order placed with `key`, if the exchange has
    /// one; [`Error::Rejected`] when the order placed with `key` was rejected
    /// (a repeat of the key would be rejected the same way).
    async fn get_order_by_key(&self, key: &IdempotencyKey) -> Result<Option<OrderStatus>>;

    /// Submits a withdrawal; a repeat of the key returns the original ack.
    async fn submit_withdrawal(&self, withdrawal: &WithdrawalRequest) -> Result<WithdrawalAck>;

    /// The reconcile query for withdrawals (a rejected one: [`Error::Rejected`]).
    async fn get_withdrawal_by_key(&self, key: &IdempotencyKey)
    -> Result<Option<WithdrawalStatus>>;
}
