//! The crate's one error type, `payments::Error`, and its `Result` alias.
use crate::ids::{AccountId, UserId};
use rust_decimal::Decimal;

/// `Result` with the crate's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the payments domain can fail with.
///
/// Business refusals ([`Error::InsufficientFunds`], [`Error::InvalidAmount`],
/// [`Error::ReferenceConflict`] …) are distinct variants so that workflows and
/// the API can tell "the user can't do this" (final, 4xx) from "the database
/// hiccupped" ([`Error::Db`], possibly transient — see [`Error::is_transient`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused or failed an operation not mapped to a variant below.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),

    /// A money amount was malformed or outside what its asset allows.
    #[error("invalid amount {input:?}: {reason}")]
    InvalidAmount { input: String, reason: &'static str },

    /// Available funds (balance − held) would go negative.
    #[error(
        "insufficient funds in account {account}: requested {requested}, available {available}"
    )]
    InsufficientFunds {
        account: AccountId,
        requested: Decimal,
        available: Decimal,
    },

    /// A transfer's postings do not sum to zero for an asset.
    #[error("unbalanced transfer: {asset} postings sum to {sum}")]
    Unbalanced { asset: String, sum: Decimal },

    /// An amount has more fractional digits than its asset's scale.
    #[error("amount {amount} exceeds the scale of {asset} ({scale} fractional digits)")]
    ScaleExceeded {
        asset: String,
        scale: u32,
        amount: Decimal,
    },

    /// No asset has this code.
    #[error("unknown asset {0:?}")]
    UnknownAsset(String),

    /// No account has this id.
    #[error("unknown account {0}")]
    UnknownAccount(AccountId),

    /// The reference (idempotency key) is already used by a different
    /// transfer or hold than the one requested: a caller bug, never retried.
    #[error("reference {reference:?} is already used for something else: {detail}")]
    ReferenceConflict { reference: String, detail: String },

    /// The reference's row exists but was committed after this transaction's
    /// snapshot (REPEATABLE READ / SERIALIZABLE), so it cannot be read back.
    #[error("reference {0:?} is taken by a row this transaction's snapshot cannot see")]
    ReferenceNotVisible(String),

    /// No hold has this reference.
    #[error("hold {0:?} not found")]
    HoldNotFound(String),

    /// The hold was already released or captured (differently).
    #[error("hold {reference:?} is {state}; cannot {action}")]
    HoldNotActive {
        reference: String,
        state: String,
        action: &'static str,
    },

    /// Another user already has this email.
    #[error("email {0:?} is already registered")]
    EmailTaken(String),

    /// Another admin already has this name.
    #[error("admin name {0:?} is taken")]
    AdminNameTaken(String),

    /// No user has this id.
    #[error("user {0} not found")]
    UserNotFound(UserId),

    /// Any other input out of range.
    #[error("invalid input: {0}")]
    Invalid(String),

    /// An exchange call failed (rejected, in doubt or not sent).
    #[error("exchange: {0}")]
    Exchange(#[from] crate::exchange::Error),

    /// A notification provider call failed.
    #[error("notifier: {0}")]
    Notify(#[from] crate::notifier::Error),

    /// The caller may not do this (e.g. an approver approving their own
    /// withdrawal, or an admin without the `approver` role).
    #[error("forbidden: {0}")]
    Forbidden(String),

    /// The four-eyes rule refuses this admin for this decision (they
    /// approved it already, or the withdrawal's user is linked to them).
    #[error("four-eyes: {0}")]
    FourEyes(String),

    /// No admin has this id (or it is the built-in CLI actor).
    #[error("admin {0} not found")]
    AdminNotFound(crate::ids::AdminId),

    /// The workflow engine failed (starting a workflow, sending a signal).
    #[error("engine: {0}")]
    Engine(#[from] ledgerflow_engine::Error),
}

impl Error {
    /// True for errors worth retrying on a fresh transaction: the server went
    /// away, a deadlock or a serialization failure. Every other variant is a
    /// final answer for the same input.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Db(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => matches!(
                    db.code().as_deref(),
                    // serialization_failure, deadlock_detected, admin_shutdown,
                    // crash_shutdown, cannot_connect_now
                    Some("40001" | "40P01" | "57P01" | "57P02" | "57P03")
                ),
                _ => false,
            },
            _ => false,
        }
    }
}

/// The name of the constraint a database error violated, if any. Our own
/// triggers raise with `USING CONSTRAINT = …`, so they are matched the same way.
pub(crate) fn violated_constraint(e: &sqlx::Error) -> Option<&str> {
    match e {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}
