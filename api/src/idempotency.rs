//! `Idempotency-Key` handling for the public POSTs.
//!
//! Every POST must carry an `Idempotency-Key` header (1–255 visible ASCII
//! characters; missing or malformed → 400 problem). Keys are scoped per user.
//! The record is stored by `ledgerflow_payments::idempotency` in the SAME
//! transaction that starts the workflow, so "answered 201" and "workflow
//! exists" commit together (contract rule 1):
//!
//! - [`begin`] opens the transaction on the caller's connection and claims
//!   the key (insert first, `ON CONFLICT DO NOTHING`).
//!   - new key → [`Begun::New`] with the open transaction: the handler starts
//!     the workflow on it, stores the response (`complete_trade` /
//!     `complete_withdrawal` of `ledgerflow_payments::idempotency`, which
//!     read the created resource back in the same statement) and commits;
//!   - key already used with the same fingerprint → [`Begun::Replay`] with the
//!     stored first response (same status and body);
//!   - key already used with another request → 422 problem (`unprocessable`).
//! - **Concurrency (chosen behaviour):** a second request with a key whose
//!   first request has not committed yet *waits* on the row lock (up to
//!   [`LOCK_TIMEOUT_MS`]) and then replays the committed response; if the
//!   first request rolled back, the waiter becomes the first. Only when the
//!   wait exceeds the timeout is the answer 409 `conflict` ("request in
//!   progress"), and the client should retry with the same key.
//!
//! Validation errors (bad JSON, bad amounts, unknown assets) are answered
//! before the key is claimed: they store nothing and change nothing.
use crate::error::{Error, Result};
use ledgerflow_payments::UserId;
use ledgerflow_payments::idempotency::{self, Claim};
use serde_json::Value;
use sqlx::{Connection, PgConnection, Postgres, Transaction};

/// The request header.
pub const HEADER: &str = "Idempotency-Key";

/// The longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

/// How long a request waits for a concurrent one with the same key.
pub const LOCK_TIMEOUT_MS: u32 = 5_000;

/// The header's value, checked: required, 1–255 visible ASCII characters.
pub fn require_key(value: Option<&str>) -> Result<String> {
    let key = value.ok_or_else(|| {
        Error::Validation(format!("the {HEADER} header is required on this request"))
    })?;
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Validation(format!(
            "the {HEADER} header must be 1 to {MAX_KEY_LEN} visible ASCII characters"
        )));
    }
    Ok(key.to_string())
}

/// What [`begin`] decided.
pub enum Begun<'c> {
    /// A new key: do the work on this transaction, store the response, commit.
    New(Transaction<'c, Postgres>),
    /// A repeated request: answer with the stored status and body.
    Replay { status: u16, body: Value },
}

impl std::fmt::Debug for Begun<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Begun::New(_) => f.write_str("Begun::New"),
            Begun::Replay { status, .. } => write!(f, "Begun::Replay({status})"),
        }
    }
}

fn in_progress() -> Error {
    Error::Conflict(format!(
        "a request with this {HEADER} is in progress; retry it later with the same key"
    ))
}

/// Opens the transaction on `conn` (with [`LOCK_TIMEOUT_MS`] as its
/// `lock_timeout`) and claims `key` for the request `method path body`.
pub async fn begin<'c>(
    conn: &'c mut PgConnection,
    user: UserId,
    key: &str,
    method: &str,
    path: &str,
    body: &Value,
) -> Result<Begun<'c>> {
    let fingerprint = idempotency::fingerprint(method, path, body);
    let mut tx = conn
        .begin_with(idempotency::begin_statement(LOCK_TIMEOUT_MS))
        .await?;
    match idempotency::claim(&mut tx, user, key, &fingerprint).await? {
        Claim::New => Ok(Begun::New(tx)),
        Claim::InProgress => Err(in_progress()),
        Claim::Existing(record) => {
            if record.fingerprint != fingerprint {
                return Err(Error::Unprocessable(format!(
                    "this {HEADER} was already used with a different request"
                )));
            }
            match (record.response_status, record.response_body) {
                (Some(status), Some(body)) => Ok(Begun::Replay { status, body }),
                _ => Err(in_progress()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_required_and_bounded() {
        assert!(require_key(None).is_err());
        assert!(require_key(Some("")).is_err());
        assert!(require_key(Some("has space")).is_err());
        assert!(require_key(Some(&"k".repeat(256))).is_err());
        assert_eq!(
            require_key(Some("order-1")).ok().as_deref(),
            Some("order-1")
        );
    }
}
