//! How a test steers and reads a simulator: the faults it injects ([`Fault`]), the
//! simulator's settings ([`SimConfig`]), its counters, and [`SimControls`], the seam the
//! conformance suite drives in process or over HTTP.
use crate::exchange::{Event, IdempotencyKey, Result};
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A fault to inject into the next call(s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Fault {
    /// Record the order/withdrawal, then answer [`Error::Unknown`] (over HTTP:
    /// hang past the client's timeout).
    AcceptThenTimeout,
    /// Deliver the fill/confirmation event twice, with the same event id.
    DuplicateFill,
    /// Deliver the fill/confirmation this long after the call instead of the
    /// configured delay.
    LateFill {
        /// The delay in milliseconds.
        delay_ms: u64,
    },
    /// Refuse the call with this reason ([`Error::Rejected`]). A key's own
    /// rejection is remembered: a repeat and a look-up of the key answer it.
    /// The global one (the venue refusing everything for a while) is not.
    Reject {
        /// The reason returned.
        reason: String,
    },
    /// Refuse the call (remembered like a key's own [`Fault::Reject`]), then
    /// lose the answer ([`Error::Unknown`]): the caller must reconcile.
    RejectThenTimeout {
        /// The reason recorded.
        reason: String,
    },
}

impl Fault {
    /// [`Fault::LateFill`] with a [`Duration`].
    pub fn late_fill(delay: Duration) -> Fault {
        Fault::LateFill {
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// [`Fault::Reject`].
    pub fn reject(reason: impl Into<String>) -> Fault {
        Fault::Reject {
            reason: reason.into(),
        }
    }
}

/// How the simulator behaves when no fault is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimConfig {
    /// Seeds every id, so two simulators never hand out the same event ids
    /// (the inbox dedupes on them) and one seed always gives the same ids.
    pub seed: u64,
    /// The logical clock's start.
    pub start: DateTime<Utc>,
    /// Fee rate on the quote notional, e.g. `0.001`.
    pub fee_rate: Decimal,
    /// Delay between placing an order and its fill.
    pub fill_delay_ms: u64,
    /// Delay between submitting a withdrawal and its confirmation.
    pub confirm_delay_ms: u64,
    /// The request budget per API key (`None`: unlimited). Over it a request is refused
    /// before it is processed: `Unavailable` in process, HTTP 429 with `Retry-After`.
    pub budget: Option<crate::exchange::budget::RequestBudget>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            start: Utc
                .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
                .single()
                .unwrap_or(DateTime::UNIX_EPOCH),
            fee_rate: Decimal::new(1, 3),
            fill_delay_ms: 0,
            confirm_delay_ms: 0,
            budget: None,
        }
    }
}

/// Receives events as the simulator delivers them.
pub trait FillSink: Send + Sync {
    /// Called once per delivery (twice for a duplicated event).
    fn deliver(&self, event: &Event);
}

/// Per-key counters: tests assert exactly one order per trade.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCounters {
    /// `place_order` calls received with this key (retries included).
    pub place_calls: u64,
    /// Orders created for this key (0 or 1 for a correct exchange).
    pub orders_created: u64,
    /// `submit_withdrawal` calls received with this key.
    pub withdrawal_calls: u64,
    /// Withdrawals created for this key (0 or 1).
    pub withdrawals_created: u64,
}

/// Totals over all keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Orders created.
    pub orders_created: u64,
    /// Withdrawals created.
    pub withdrawals_created: u64,
    /// Events delivered (a duplicate counts twice).
    pub events_delivered: u64,
    /// Requests refused by the request budget (HTTP 429).
    #[serde(default)]
    pub rate_limited: u64,
}

/// Steers a simulator from a test. Implemented in-process by
/// [`SimulatedExchange`] and over HTTP by
/// [`super::server::HttpSimControls`].
#[async_trait]
pub trait SimControls: Send + Sync {
    /// Sets (or with `None` clears) the fault for every call.
    async fn set_fault(&self, fault: Option<Fault>) -> Result<()>;
    /// Sets the fault for the next call with `key` only.
    async fn set_fault_for(&self, key: &IdempotencyKey, fault: Fault) -> Result<()>;
    /// Moves the clock by `by` and delivers every event now due; returns the
    /// events as the receiving end got them (over HTTP: the verified webhook
    /// bodies), duplicates included.
    async fn advance(&self, by: Duration) -> Result<Vec<Event>>;
    /// The counters of `key`.
    async fn counters_for(&self, key: &IdempotencyKey) -> Result<KeyCounters>;
}
