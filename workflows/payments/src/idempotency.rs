//! Idempotency records of the public API's POSTs, and the read models of
//! the resources those POSTs create (trades and withdrawals as their owner
//! sees them).
//!
//! The protocol (table `idempotency_keys`, PK `(user_id, key)`), all inside
//! the one transaction that also starts the workflow, opened with
//! [`begin_statement`] (so the claim's `lock_timeout` costs no extra round
//! trip):
//! 1. [`claim`] inserts the row first with `ON CONFLICT DO NOTHING`. The
//!    first request gets [`Claim::New`]; a concurrent request with the same
//!    key blocks inside that insert until the first transaction ends, then
//!    reads the committed row ([`Claim::Existing`]). If the first one rolled
//!    back, the waiting insert succeeds and that request becomes the first.
//!    A wait longer than the transaction's `lock_timeout` is
//!    [`Claim::InProgress`] (the caller answers 409 and should retry).
//! 2. The caller does its work (starts the workflow) on the same connection.
//! 3. [`complete`] stores the response — or, in one statement with the
//!    read-back of the created resource, [`complete_trade`] /
//!    [`complete_withdrawal`]; the commit publishes row, workflow and
//!    response together (contract rule 1).
//!
//! The request [`fingerprint`] is the SHA-256 of method, path and the
//! canonical JSON body (object keys sorted, no insignificant whitespace).
use crate::error::Result;
use crate::ids::UserId;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

/// Postgres' `lock_not_available` (raised when `lock_timeout` expires).
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// A stored idempotency record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Hex SHA-256 of the first request (see [`fingerprint`]).
    pub fingerprint: String,
    /// The first response's status (None only inside its own transaction).
    pub response_status: Option<u16>,
    /// The first response's body.
    pub response_body: Option<Value>,
    /// The resource the first request created.
    pub resource_id: Option<Uuid>,
}

type RecordRow = (String, Option<i16>, Option<Value>, Option<Uuid>);

/// What [`claim`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The key is new: this transaction owns it until it commits.
    New,
    /// The key was used before (by a committed transaction).
    Existing(Record),
    /// Another transaction holds the key and did not finish within the
    /// transaction's `lock_timeout`. The transaction is aborted: roll it back.
    InProgress,
}

/// The fingerprint of a request: hex SHA-256 over `method`, `path` and the
/// canonical form of `body`, separated by newlines.
pub fn fingerprint(method: &str, path: &str, body: &Value) -> String {
    let mut canonical = String::new();
    write_canonical(body, &mut canonical);
    let mut hasher = Sha256::new();
    hasher.update(method.to_ascii_uppercase().as_bytes());
    hasher.update(b"\n");
    hasher.update(path.as_bytes());
    hasher.update(b"\n");
    hasher.update(canonical.as_bytes());
    hex::encode(hasher.finalize())
}

/// JSON with object keys sorted, whatever the map implementation's order.
fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(child) = map.get(k) {
                    write_canonical(child, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The statement that opens the protocol's transaction: `BEGIN` and a
/// transaction-local `lock_timeout` of `lock_timeout_ms` (one simple query,
/// one round trip), for `Connection::begin_with`.
pub fn begin_statement(lock_timeout_ms: u32) -> String {
    format!("BEGIN; SET LOCAL lock_timeout = {lock_timeout_ms}")
}

/// Step 1 of the protocol: claims `(user, key)` for a request with
/// `fingerprint`. Run it inside a transaction opened with
/// [`begin_statement`]: a concurrent holder is waited for at most that
/// statement's `lock_timeout` (without one, Postgres waits indefinitely).
pub async fn claim(
    conn: &mut PgConnection,
    user: UserId,
    key: &str,
    fingerprint: &str,
) -> Result<Claim> {
    let inserted = sqlx::query_scalar::<_, bool>(
        "INSERT INTO idempotency_keys (user_id, key, fingerprint)
         VALUES ($1, $2, $3)
         ON CONFLICT (user_id, key) DO NOTHING
         RETURNING true",
    )
    .bind(user)
    .bind(key)
    .bind(fingerprint)
    .fetch_optional(&mut *conn)
    .await;
    match inserted {
        Ok(Some(_)) => return Ok(Claim::New),
        Ok(None) => {}
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some(LOCK_NOT_AVAILABLE) => {
            return Ok(Claim::InProgress);
        }
        Err(e) => return Err(e.into()),
    }
    let row: Option<RecordRow> = sqlx::query_as(
        "SELECT fingerprint, response_status, response_body, resource_id
         FROM idempotency_keys WHERE user_id = $1 AND key = $2",
    )
    .bind(user)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some((fingerprint, status, body, resource_id)) => Ok(Claim::Existing(Record {
            fingerprint,
            response_status: status.and_then(|s| u16::try_from(s).ok()),
            response_body: body,
            resource_id,
        })),
        // Only if the row vanished between the two statements (pruning):
        // the caller may simply retry.
        None => Ok(Claim::InProgress),
    }
}

/// Step 3 of the protocol: stores the response of the claimed request.
pub async fn complete(
    conn: &mut PgConnection,
    user: UserId,
    key: &str,
    status: u16,
    body: &Value,
    resource_id: Option<Uuid>,
) -> Result<()> {
    sqlx::query(
        "UPDATE idempotency_keys
         SET response_status = $3, response_body = $4, resource_id = $5
         WHERE user_id = $1 AND key = $2",
    )
    .bind(user)
    .bind(key)
    .bind(i16::try_from(status).unwrap_or(500))
    .bind(body)
    .bind(resource_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A trade as its owner sees it. Before the workflow's `validate` step has
/// written the `trades` row, the fields come from the workflow's input and
/// the status is `pending` (or `rejected`/`cancelled` if the workflow ended
/// without one). Amounts are decimal strings, never floats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TradeRecord {
    pub id: Uuid,
    pub side: String,
    pub base_asset: String,
    pub quote_asset: String,
    pub base_amount: String,
    pub limit_price: String,
    pub status: String,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A withdrawal as its owner sees it (same conventions as [`TradeRecord`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithdrawalRecord {
    pub id: Uuid,
    pub asset: String,
    pub amount: String,
    pub address: String,
    pub status: String,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// The status of a workflow that has no domain row yet.
const PENDING_STATUS: &str = "CASE WHEN w.state = 'cancelled' THEN 'cancelled'
                                   WHEN w.state IN ('running', 'waiting') THEN 'pending'
                                   ELSE 'rejected' END";

type TradeRow = (
    Uuid,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    DateTime<Utc>,
);

/// The query behind [`trade`] and [`complete_trade`]: trade `$1` if user
/// `$2` owns it, `$3` being the trade workflow's kind.
fn trade_sql() -> String {
    format!(
        "SELECT w.id,
                coalesce(t.side, w.input->>'side', '') AS side,
                coalesce(t.base_asset, w.input->>'base', '') AS base_asset,
                coalesce(t.quote_asset, w.input->>'quote', '') AS quote_asset,
                coalesce(t.base_amount::text, w.input->>'base_amount', '') AS base_amount,
                coalesce(t.limit_price::text, w.input->>'limit_price', '') AS limit_price,
                coalesce(t.status, {PENDING_STATUS}) AS status,
                t.error,
                w.created_at
         FROM workflows w LEFT JOIN trades t ON t.id = w.id
         WHERE w.id = $1 AND w.kind = $3 AND w.input->>'user_id' = ($2::uuid)::text"
    )
}

/// A timestamp as RFC 3339 in UTC with microseconds and `Z`, like the API's
/// `created_at` fields (`chrono`'s `to_rfc3339_opts(Micros, true)`).
const RFC3339_MICROS: &str =
    "to_char(v.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";

/// Step 3 of the protocol for a trade, folded with its read-back: stores
/// status 201 and trade `id` as `user` sees it (the body of
/// `POST /v1/trades`: the [`trade`] record as JSON, `error` omitted when
/// null, `created_at` as RFC 3339) and returns that body. None when `user`
/// owns no trade `id` (nothing is stored then).
pub async fn complete_trade(
    conn: &mut PgConnection,
    user: UserId,
    key: &str,
    id: Uuid,
) -> Result<Option<Value>> {
    let sql = format!(
        "WITH v AS ({}),
         body AS (
           SELECT v.id, jsonb_strip_nulls(jsonb_build_object(
             'id', v.id, 'side', v.side, 'base_asset', v.base_asset,
             'quote_asset', v.quote_asset, 'base_amount', v.base_amount,
             'limit_price', v.limit_price, 'status', v.status, 'error', v.error,
             'created_at', {RFC3339_MICROS})) AS b
           FROM v
         )
         UPDATE idempotency_keys k
         SET response_status = 201, response_body = body.b, resource_id = body.id
         FROM body WHERE k.user_id = $2 AND k.key = $4
         RETURNING k.response_body",
        trade_sql()
    );
    Ok(sqlx::query_scalar(&sql)
        .bind(id)
        .bind(user)
        .bind(crate::workflows::trade::KIND)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?)
}

/// Trade `id` if `user` owns it (None otherwise: another user's trade is
/// indistinguishable from a missing one).
pub async fn trade(conn: &mut PgConnection, user: UserId, id: Uuid) -> Result<Option<TradeRecord>> {
    let sql = trade_sql();
    let row: Option<TradeRow> = sqlx::query_as(&sql)
        .bind(id)
        .bind(user)
        .bind(crate::workflows::trade::KIND)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(
        |(
            id,
            side,
            base_asset,
            quote_asset,
            base_amount,
            limit_price,
            status,
            error,
            created_at,
        )| {
            TradeRecord {
                id,
                side,
                base_asset,
                quote_asset,
                base_amount,
                limit_price,
                status,
                error,
                created_at,
            }
        },
    ))
}

type WithdrawalRow = (
    Uuid,
    String,
    String,
    String,
    String,
    Option<String>,
    DateTime<Utc>,
);

/// The query behind [`withdrawal`] and [`complete_withdrawal`]: withdrawal
/// `$1` if user `$2` owns it, `$3` being the withdrawal workflow's kind.
fn withdrawal_sql() -> String {
    format!(
        "SELECT w.id,
                coalesce(d.asset, w.input->>'asset', '') AS asset,
                coalesce(d.amount::text, w.input->>'amount', '') AS amount,
                coalesce(d.address, w.input->>'address', '') AS address,
                coalesce(d.status, {PENDING_STATUS}) AS status,
                d.error,
                w.created_at
         FROM workflows w LEFT JOIN withdrawals d ON d.id = w.id
         WHERE w.id = $1 AND w.kind = $3 AND w.input->>'user_id' = ($2::uuid)::text"
    )
}

/// [`complete_trade`] for a withdrawal: stores status 201 and the
/// [`withdrawal`] record as JSON (the body of `POST /v1/withdrawals`) and
/// returns that body; None when `user` owns no withdrawal `id`.
pub async fn complete_withdrawal(
    conn: &mut PgConnection,
    user: UserId,
    key: &str,
    id: Uuid,
) -> Result<Option<Value>> {
    let sql = format!(
        "WITH v AS ({}),
         body AS (
           SELECT v.id, jsonb_strip_nulls(jsonb_build_object(
             'id', v.id, 'asset', v.asset, 'amount', v.amount, 'address', v.address,
             'status', v.status, 'error', v.error, 'created_at', {RFC3339_MICROS})) AS b
           FROM v
         )
         UPDATE idempotency_keys k
         SET response_status = 201, response_body = body.b, resource_id = body.id
         FROM body WHERE k.user_id = $2 AND k.key = $4
         RETURNING k.response_body",
        withdrawal_sql()
    );
    Ok(sqlx::query_scalar(&sql)
        .bind(id)
        .bind(user)
        .bind(crate::workflows::withdrawal::KIND)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?)
}

/// Withdrawal `id` if `user` owns it (None otherwise).
pub async fn withdrawal(
    conn: &mut PgConnection,
    user: UserId,
    id: Uuid,
) -> Result<Option<WithdrawalRecord>> {
    let sql = withdrawal_sql();
    let row: Option<WithdrawalRow> = sqlx::query_as(&sql)
        .bind(id)
        .bind(user)
        .bind(crate::workflows::withdrawal::KIND)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(
        |(id, asset, amount, address, status, error, created_at)| WithdrawalRecord {
            id,
            asset,
            amount,
            address,
            status,
            error,
            created_at,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fingerprint_ignores_key_order_but_not_values_or_paths() {
        let a = fingerprint(
            "POST",
            "/v1/trades",
            &json!({"a": "1", "b": {"y": 1, "x": 2}}),
        );
        let b = fingerprint(
            "post",
            "/v1/trades",
            &json!({"b": {"x": 2, "y": 1}, "a": "1"}),
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        let c = fingerprint(
            "POST",
            "/v1/trades",
            &json!({"a": "2", "b": {"y": 1, "x": 2}}),
        );
        assert_ne!(a, c);
        let d = fingerprint(
            "POST",
            "/v1/withdrawals",
            &json!({"a": "1", "b": {"y": 1, "x": 2}}),
        );
        assert_ne!(a, d);
    }
}
