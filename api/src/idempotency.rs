//! `Idempotency-Key` handling for the public POSTs.
//!
//! Every POST must carry an `Idempotency-Key` header (1–255 visible ASCII
//! characters; missing or malformed → 400 problem). Keys are scoped per user.
//! The record is stored by `ledgerflow_payments::idempotency` in the SAME
//! transaction that starts the workflow, so "answered 201" and "workflow
//! exists" commit together (contract rule 1). A POST runs:
//!
//! 1. [`begin`]: the transaction, with [`LOCK_TIMEOUT_MS`] as its
//!    `lock_timeout`;
//! 2. the workflow start, with a unique key made of user and key
//!    (`api:trade:{user}:{key}`);
//! 3. `record_trade` / `record_withdrawal` of
//!    `ledgerflow_payments::idempotency`: the record, its fingerprint and the
//!    response (the created resource read back) in one statement; [`settle`]
//!    turns what it found into the answer:
//!    - new key → [`Settled::Created`]: the handler commits and answers 201;
//!    - key already used with the same fingerprint → [`Settled::Replay`]
//!      with the stored first response (same status and body); the
//!      transaction is rolled back (the start found the first request's
//!      workflow and inserted nothing);
//!    - key already used with another request → 422 problem
//!      (`unprocessable`), rolled back.
//! - **Concurrency (chosen behaviour):** a second request with a key whose
//!   first request has not committed yet *waits* on the workflow's unique
//!   key (up to [`LOCK_TIMEOUT_MS`]) and then replays the committed
//!   response; if the first request rolled back, the waiter becomes the
//!   first. Only when the wait exceeds the timeout is the answer 409
//!   `conflict` ("request in progress"), and the client should retry with
//!   the same key.
//!
//! Validation errors (bad JSON, bad amounts, unknown assets) are answered
//! before the transaction starts: they store nothing and change nothing.
use crate::error::{Error, Result};
use ledgerflow_payments::idempotency::{self, Recorded};
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

/// What [`settle`] decided.
#[derive(Debug)]
pub enum Settled {
    /// A new key: commit the transaction, then answer with this body (201).
    Created(Value),
    /// A repeated request: answer with the stored status and body (the
    /// transaction wrote nothing; drop it).
    Replay { status: u16, body: Value },
}

fn in_progress() -> Error {
    Error::Conflict(format!(
        "a request with this {HEADER} is in progress; retry it later with the same key"
    ))
}

/// Opens the protocol's transaction on `conn`, with [`LOCK_TIMEOUT_MS`] as
/// its `lock_timeout` (one round trip).
pub async fn begin(conn: &mut PgConnection) -> Result<Transaction<'_, Postgres>> {
    Ok(conn
        .begin_with(idempotency::begin_statement(LOCK_TIMEOUT_MS))
        .await?)
}

/// A failed workflow start: a wait for a concurrent request with the same
/// key that outlived the lock timeout is a 409; anything else as usual.
pub fn start_failed(e: ledgerflow_engine::Error) -> Error {
    match &e {
        ledgerflow_engine::Error::Db(db) if idempotency::is_lock_timeout(db) => in_progress(),
        _ => e.into(),
    }
}

/// The answer for what `record_trade` / `record_withdrawal` found, for a
/// request with `fingerprint` that created `what` (named in the error when
/// the created resource could not be read back).
pub fn settle(recorded: Option<Recorded>, fingerprint: &str, what: &str) -> Result<Settled> {
    match recorded {
        Some(Recorded::New(body)) => Ok(Settled::Created(body)),
        Some(Recorded::InProgress) => Err(in_progress()),
        Some(Recorded::Existing(record)) => {
            if record.fingerprint != fingerprint {
                return Err(Error::Unprocessable(format!(
                    "this {HEADER} was already used with a different request"
                )));
            }
            match (record.response_status, record.response_body) {
                (Some(status), Some(body)) => Ok(Settled::Replay { status, body }),
                _ => Err(in_progress()),
            }
        }
        None => Err(Error::Internal(format!("{what} vanished"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledgerflow_payments::idempotency::Record;
    use serde_json::json;

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

    #[test]
    fn settling_replays_only_the_same_request() {
        let record = |fingerprint: &str| {
            Some(Recorded::Existing(Record {
                fingerprint: fingerprint.to_string(),
                response_status: Some(201),
                response_body: Some(json!({"id": "x"})),
                resource_id: None,
            }))
        };
        assert!(matches!(
            settle(Some(Recorded::New(json!({}))), "a", "trade"),
            Ok(Settled::Created(_))
        ));
        assert!(matches!(
            settle(record("a"), "a", "trade"),
            Ok(Settled::Replay { status: 201, .. })
        ));
        assert!(matches!(
            settle(record("b"), "a", "trade"),
            Err(Error::Unprocessable(_))
        ));
        assert!(matches!(
            settle(Some(Recorded::InProgress), "a", "trade"),
            Err(Error::Conflict(_))
        ));
        assert!(matches!(
            settle(None, "a", "trade"),
            Err(Error::Internal(_))
        ));
    }
}
