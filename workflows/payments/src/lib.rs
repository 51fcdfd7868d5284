//! Ledgerflow's payments domain: accounts, the double-entry ledger and the money workflows.
//!
//! Modules:
//! - [`money`]  — assets, exact [`Amount`]s, and the strict JSON wire type [`AmountStr`];
//! - [`ledger`] — accounts, idempotent transfers, deposits, holds and balances,
//!   all on a caller-supplied connection so they join the caller's (fenced)
//!   transaction;
//! - [`users`]  — users, API keys, admins and their credentials;
//! - [`access`] — audited management of admins and API keys (admin API, CLI);
//! - [`address`] — withdrawal destinations per asset (alphabet, checksum);
//! - [`ids`]    — typed row ids;
//! - [`idempotency`] — the public API's idempotency records and resource read models;
//! - [`error`]  — the crate's one [`Error`] type;
//! - [`workflows`] — the trade, withdrawal, notification and webhook workflows;
//! - [`approvals`] — pending withdrawal approvals and rejection, for the admin API;
//! - [`policy`] — the withdrawal policy per asset (approval thresholds, daily
//!   limit) from configuration and admin overrides;
//! - [`exchange`], [`notifier`] — the exchange and email/push provider
//!   adapters: trait, simulator with fault modes, HTTP client, conformance
//!   suite.
//!
//! The invariants that keep money safe (double entry, no negative available
//! balance, append-only history, asset scales) are enforced by the schema in
//! `migrations/20261126001000_payments.sql`; this crate adds precise errors
//! and idempotency on top.

pub mod access;
pub mod address;
pub mod approvals;
pub mod audit;
pub mod error;
pub mod exchange;
pub mod idempotency;
pub mod ids;
pub mod ledger;
pub mod money;
pub mod notifier;
pub mod policy;
pub mod users;
pub mod workflows;

pub use error::{Error, Result};
pub use ids::{AccountId, AdminId, ApiKeyId, HoldId, TransferId, UserId};
pub use ledger::{AccountKind, Balance, Hold, HoldState, Posted};
pub use money::{Amount, AmountStr, Asset};
pub use users::{Admin, AdminRole, PlaintextKey, User};
