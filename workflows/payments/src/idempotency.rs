//! Idempotency records of the public API's POSTs, and the read models of
//! the resources those POSTs create (trades and withdrawals as their owner
//! sees them).
//!
//! The protocol (table `idempotency_keys`, PK `(user_id, key)`), all inside
//! the one transaction that also starts the workflow, opened with
//! [`begin_statement`] (so the waits' `lock_timeout` costs no extra round
//! trip):
//! 1. The caller starts the workflow with a unique key derived from
//!    `(user, key)` (`api:trade:{user}:{key}`). A concurrent request with the
//!    same key blocks inside that insert until the first transaction ends,
//!    then gets the first one's workflow (nothing inserted); if the first one
//!    rolled back, the waiter's insert goes through and it becomes the first.
//! 2. [`record_trade`] / [`record_withdrawal`] insert the record together
//!    with the response — the created resource read back as JSON — in ONE
//!    statement (`ON CONFLICT DO NOTHING`). A key used before (committed)
//!    is [`Recorded::Existing`]: the caller rolls back and replays the
//!    stored response or refuses a different request (its [`fingerprint`]
//!    differs). The commit publishes record, workflow and response together
//!    (contract rule 1).
//!
//! The record is written after the workflow start rather than claimed
//! before it: the workflow's unique key already serializes requests with
//! one key, and one statement for the record instead of a claim plus an
//! update saves a round trip and a dead row version per request. The table
//! has no foreign key to `users` on purpose: an FK check takes a `FOR KEY
//! SHARE` lock on the user's row, so every concurrent POST of one user
//! queued on that one row and minted a MultiXact (see the migration
//! `20261126001310`); the user id always comes from an authenticated API key.
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
pub const LOCK_NOT_AVAILABLE: &str = "55P03";

/// A stored idempotency record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Hex SHA-256 of the first request (see [`fingerprint`]).
    pub fingerprint: String,
    /// The first response's status (always set on a committed record).
    pub response_status: Option<u16>,
    /// The first response's body.
    pub response_body: Option<Value>,
    /// The resource the first request created.
    pub resource_id: Option<Uuid>,
}

type RecordRow = (String, Option<i16>, Option<Value>, Option<Uuid>);

/// What [`record_trade`] / [`record_withdrawal`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// The key is new: the record is stored (uncommitted) with status 201
    /// and this body, the created resource as its owner sees it.
    New(Value),
    /// The key was used before (by a committed transaction): nothing was
    /// written; roll back and answer from this record.
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

/// Whether `e` is Postgres' `lock_timeout` expiring.
pub fn is_lock_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some(LOCK_NOT_AVAILABLE))
}

/// The committed record of `(user, key)`, if any.
pub async fn record(conn: &mut PgConnection, user: UserId, key: &str) -> Result<Option<Record>> {
    let row: Option<RecordRow> = sqlx::query_as(
        "SELECT fingerprint, response_status, response_body, resource_id
         FROM idempotency_keys WHERE user_id = $1 AND key = $2",
    )
    .bind(user)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(fingerprint, status, body, resource_id)| Record {
        fingerprint,
        response_status: status.and_then(|s| u16::try_from(s).ok()),
        response_body: body,
        resource_id,
    }))
}

/// Runs a record statement (`$1` resource id, `$2` user, `$3` workflow
/// kind, `$4` key, `$5` fingerprint; returns the stored body when it
/// inserted) and tells the outcome. None: `user` owns no such resource.
async fn record_with(
    conn: &mut PgConnection,
    sql: &str,
    kind: &str,
    user: UserId,
    key: &str,
    fingerprint: &str,
    id: Uuid,
) -> Result<Option<Recorded>> {
    let inserted = sqlx::query_scalar::<_, Value>(sql)
        .bind(id)
        .bind(user)
        .bind(kind)
        .bind(key)
        .bind(fingerprint)
        .fetch_optional(&mut *conn)
        .await;
    match inserted {
        Ok(Some(body)) => return Ok(Some(Recorded::New(body))),
        Ok(None) => {}
        Err(e) if is_lock_timeout(&e) => return Ok(Some(Recorded::InProgress)),
        Err(e) => return Err(e.into()),
    }
    // Nothing inserted: the key is taken (the conflicting insert has ended,
    // so this statement's fresh snapshot sees its row), or the resource is
    // not the user's (no row at all, nothing stored).
    Ok(record(conn, user, key).await?.map(Recorded::Existing))
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

/// Workflow `$1` by primary key only, as `w`, for the read models below.
///
/// Materialized so that the `kind` and owner checks are applied to the one
/// row found, never pushed down into the scan: with `w.kind = $3` next to
/// `w.id = $1` in one scan, a `workflows` table without statistics yet (a
/// fresh database before its first autoanalyze, as in every benchmark run)
/// costs the `workflows_kind_created` index the same as the primary key, and
/// the planner picked it — a scan over every workflow of the kind for each
/// request, 8,000–10,500 buffer hits and 7–14 ms per call as the table grew
/// (`pg_stat_statements`), until autovacuum happened to analyze the table.
const WORKFLOW_BY_ID: &str = "w AS MATERIALIZED (
           SELECT id, kind, state, input, error, created_at FROM workflows WHERE id = $1)";

/// The status of a workflow that has no domain row yet.
macro_rules! pending_status {
    () => {
        "CASE WHEN w.state = 'cancelled' THEN 'cancelled'
              WHEN w.state IN ('running', 'waiting') THEN 'pending'
              ELSE 'rejected' END"
    };
}
const PENDING_STATUS: &str = pending_status!();

/// Why a resource (domain row `$row`, workflow `w`) in a terminal state
/// that is not success (`rejected`, `cancelled`) ended there: its own error,
/// else its workflow's (a compensation or an operator's cancel records the
/// reason there only).
macro_rules! failure_reason {
    ($row:literal) => {
        concat!(
            "coalesce(",
            $row,
            ".error, CASE WHEN coalesce(",
            $row,
            ".status, ",
            pending_status!(),
            ") IN ('rejected', 'cancelled') THEN coalesce(w.error, ",
            "CASE WHEN w.state = 'cancelled' THEN 'cancelled by an operator' END) END)"
        )
    };
}
const TRADE_ERROR: &str = failure_reason!("t");
const WITHDRAWAL_ERROR: &str = failure_reason!("d");

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

/// The query behind [`trade`] and [`record_trade`]: trade `$1` if user
/// `$2` owns it, `$3` being the trade workflow's kind.
fn trade_sql() -> String {
    format!(
        "WITH {WORKFLOW_BY_ID}
         SELECT w.id,
                coalesce(t.side, w.input->>'side', '') AS side,
                coalesce(t.base_asset, w.input->>'base', '') AS base_asset,
                coalesce(t.quote_asset, w.input->>'quote', '') AS quote_asset,
                coalesce(t.base_amount::text, w.input->>'base_amount', '') AS base_amount,
                coalesce(t.limit_price::text, w.input->>'limit_price', '') AS limit_price,
                coalesce(t.status, {PENDING_STATUS}) AS status,
                {TRADE_ERROR} AS error,
                w.created_at
         FROM w LEFT JOIN trades t ON t.id = w.id
         WHERE w.kind = $3 AND w.input->>'user_id' = ($2::uuid)::text"
    )
}

/// A timestamp as RFC 3339 in UTC with microseconds and `Z`, like the API's
/// `created_at` fields (`chrono`'s `to_rfc3339_opts(Micros, true)`).
const RFC3339_MICROS: &str =
    "to_char(v.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";

/// The record statement over `view` (the resource's read, `$1` id, `$2`
/// user, `$3` kind): the response body is `id`, the resource's `fields`
/// (`'name', v.column` pairs), `status`, `error` (omitted when null) and
/// `created_at`. Built once per resource kind.
fn record_sql(view: &str, fields: &str) -> String {
    format!(
        "WITH v AS ({view}),
         body AS (
           SELECT v.id, jsonb_strip_nulls(jsonb_build_object(
             'id', v.id, {fields}, 'status', v.status, 'error', v.error,
             'created_at', {RFC3339_MICROS})) AS b
           FROM v
         )
         INSERT INTO idempotency_keys (user_id, key, fingerprint, response_status,
                                       response_body, resource_id)
         SELECT $2, $4, $5, 201, body.b, body.id FROM body
         ON CONFLICT (user_id, key) DO NOTHING
         RETURNING response_body"
    )
}

/// Step 2 of the protocol for a trade: stores `(user, key)` with
/// `fingerprint`, status 201 and trade `id` as `user` sees it (the body of
/// `POST /v1/trades`: the [`trade`] record as JSON, `error` omitted when
/// null, `created_at` as RFC 3339), all in one statement. None when `user`
/// owns no trade `id` and the key is unused (nothing is stored then).
pub async fn record_trade(
    conn: &mut PgConnection,
    user: UserId,
    key: &str,
    fingerprint: &str,
    id: Uuid,
) -> Result<Option<Recorded>> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        record_sql(
            &trade_sql(),
            "'side', v.side, 'base_asset', v.base_asset, 'quote_asset', v.quote_asset,
             'base_amount', v.base_amount, 'limit_price', v.limit_price",
        )
    });
    record_with(
        conn,
        &SQL,
        crate::workflows::trade::KIND,
        user,
        key,
        fingerprint,
        id,
    )
    .await
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

/// The query behind [`withdrawal`] and [`record_withdrawal`]: withdrawal
/// `$1` if user `$2` owns it, `$3` being the withdrawal workflow's kind.
fn withdrawal_sql() -> String {
    format!(
        "WITH {WORKFLOW_BY_ID}
         SELECT w.id,
                coalesce(d.asset, w.input->>'asset', '') AS asset,
                coalesce(d.amount::text, w.input->>'amount', '') AS amount,
                coalesce(d.address, w.input->>'address', '') AS address,
                coalesce(d.status, {PENDING_STATUS}) AS status,
                {WITHDRAWAL_ERROR} AS error,
                w.created_at
         FROM w LEFT JOIN withdrawals d ON d.id = w.id
         WHERE w.kind = $3 AND w.input->>'user_id' = ($2::uuid)::text"
    )
}

/// [`record_trade`] for a withdrawal: stores the record with status 201
/// and the [`withdrawal`] record as JSON (the body of `POST /v1/withdrawals`).
pub async fn record_withdrawal(
    conn: &mut PgConnection,
    user: UserId,
    key: &str,
    fingerprint: &str,
    id: Uuid,
) -> Result<Option<Recorded>> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        record_sql(
            &withdrawal_sql(),
            "'asset', v.asset, 'amount', v.amount, 'address', v.address",
        )
    });
    record_with(
        conn,
        &SQL,
        crate::workflows::withdrawal::KIND,
        user,
        key,
        fingerprint,
        id,
    )
    .await
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

    /// The plan of the read model `sql` (params: workflow id, user, kind)
    /// for a workflow on a fresh database, as text.
    async fn plan_on_fresh_database(sql: &str, kind: &str) -> String {
        let db = ledgerflow_engine::testing::TestDb::new()
            .await
            .expect("test database");
        let user = Uuid::now_v7();
        let id = Uuid::now_v7();
        // Never analyzed, like every benchmark database when it starts.
        sqlx::query(
            "INSERT INTO workflows (id, kind, version, state, input, current_step, queue,
                                    created_at, updated_at)
             VALUES ($1, $2, 1, 'running', jsonb_build_object('user_id', $3::uuid),
                     'validate', 'payments', now(), now())",
        )
        .bind(id)
        .bind(kind)
        .bind(user)
        .execute(&db.pool)
        .await
        .expect("workflow row");
        let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {sql}"))
            .bind(id)
            .bind(user)
            .bind(kind)
            .fetch_all(&db.pool)
            .await
            .expect("plan");
        lines.join("\n")
    }

    #[tokio::test]
    async fn read_models_find_the_workflow_by_primary_key_without_statistics() {
        for (sql, kind) in [
            (trade_sql(), crate::workflows::trade::KIND),
            (withdrawal_sql(), crate::workflows::withdrawal::KIND),
        ] {
            let plan = plan_on_fresh_database(&sql, kind).await;
            assert!(plan.contains("workflows_pkey"), "{plan}");
            assert!(!plan.contains("workflows_kind_created"), "{plan}");
        }
    }

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
