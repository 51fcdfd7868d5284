//! The public API (`/v1`, bearer user API key). Amounts travel as decimal
//! strings at their asset's scale, never as JSON numbers (DESIGN.md rule 4).
//!
//! - `GET  /v1/accounts/me/balances` — the caller's balances;
//! - `POST /v1/trades`, `GET /v1/trades/{id}` — limit orders (workflow
//!   `payments.trade`);
//! - `POST /v1/withdrawals`, `GET /v1/withdrawals/{id}` — withdrawals
//!   (workflow `payments.withdrawal`).
//!
//! Request bodies are explicit allow-lists (`deny_unknown_fields`): a field a
//! client may not set (`status`, `fee`, `user_id` …) is a 400 problem, never
//! mass-assigned. Every POST needs an `Idempotency-Key` (see
//! [`crate::idempotency`]); it is validated completely (amounts parsed at the
//! asset's scale) before anything is written, then starts its workflow with
//! `workflow_start_in` in the same transaction as the idempotency record and
//! answers 201 only after the commit. A user sees only their own trades and
//! withdrawals: another user's id is a 404, like a missing one.
//!
//! The POSTs are the hot path (`cargo xtask bench api`). The API key comes
//! from [`crate::auth::KeyCache`] and assets from [`AssetCache`] (a lookup
//! only on a miss), so validation needs no database. The writes are two
//! statements per POST — workflow + first job, then the idempotency record
//! stored together with the response and the read-back of the new resource
//! — inside `BEGIN` (with the lock timeout) … `COMMIT`, a transaction that
//! concurrent POSTs share when the API is busy ([`crate::batch`]). The
//! workflow is started without the in-transaction `NOTIFY` (which would
//! serialize the commits on Postgres' notify lock); the wake-up is sent after
//! the commit by [`crate::wakeup::Wakeups`].
use crate::AppState;
use crate::auth::{self, UserKey};
use crate::batch::{Creation, Resource};
use crate::error::Error;
use crate::idempotency::{self, Settled};
use crate::input::{TextKind, check_text};
use crate::types::{AddressText, AmountText, AssetCode};
use ledgerflow_payments::exchange::Side;
use ledgerflow_payments::idempotency::{self as records, TradeRecord, WithdrawalRecord};
use ledgerflow_payments::ledger;
use ledgerflow_payments::money::{Amount, AmountStr, Asset};
use ledgerflow_payments::workflows::trade::TradeInput;
use ledgerflow_payments::workflows::withdrawal::WithdrawalInput;
use poem::web::Data;
use poem_openapi::param::{Header, Path};
use poem_openapi::payload::Json;
use poem_openapi::types::{ParseFromJSON, ToJSON};
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, Tags};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::RwLock;

/// Longest asset code (2–16 of `A–Z 0–9`, as `ledger::create_asset` requires).
const ASSET_CODE_MAX: usize = 16;
/// Longest withdrawal address.
const ADDRESS_MAX: usize = 128;

#[derive(Tags)]
enum Tag {
    /// The caller's accounts.
    Accounts,
    /// Limit orders.
    Trades,
    /// Withdrawals to external addresses.
    Withdrawals,
}

/// One account's money.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct BalanceView {
    pub account_id: uuid::Uuid,
    /// Asset code, e.g. `BTC`.
    pub asset: String,
    /// Account kind, e.g. `user_available`.
    pub kind: String,
    /// Sum of all postings, a decimal string at the asset's scale (`"1.50000000"`).
    pub balance: String,
    /// Funds reserved by pending withdrawals, a decimal string.
    pub held: String,
    /// `balance - held`: what can be spent now, a decimal string.
    pub available: String,
}

/// The caller's balances.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Balances {
    pub balances: Vec<BalanceView>,
}

/// Buy or sell the base asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum TradeSide {
    /// Buy `base_amount` of the base asset, paying in the quote asset.
    Buy,
    /// Sell `base_amount` of the base asset for the quote asset.
    Sell,
}

/// A new limit order. Exactly these fields; any other is refused.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields, skip_serializing_if_is_none)]
pub struct NewTrade {
    /// `buy` or `sell` the base asset.
    pub side: TradeSide,
    /// The base asset's code, e.g. `BTC`.
    pub base_asset: AssetCode,
    /// The quote asset's code, e.g. `USD`.
    pub quote_asset: AssetCode,
    /// How much of the base asset: a decimal STRING within the asset's scale (`"0.5"`).
    pub base_amount: AmountText,
    /// The worst acceptable price (quote per base): a decimal STRING within
    /// the quote asset's scale (`"30000.00"`).
    pub limit_price: AmountText,
}

/// A trade as its owner sees it.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct TradeView {
    pub id: uuid::Uuid,
    /// `buy` or `sell`.
    pub side: String,
    pub base_asset: String,
    pub quote_asset: String,
    /// A decimal string.
    pub base_amount: String,
    /// A decimal string.
    pub limit_price: String,
    /// `pending` (accepted, not yet validated by its workflow), then
    /// `validated`, `held`, `placed`, `filled`, `settled`, or `rejected`,
    /// `cancelled`.
    pub status: String,
    /// Why the trade was rejected or cancelled, if it was.
    pub error: Option<String>,
    /// When the trade was accepted (RFC 3339).
    pub created_at: String,
}

/// A new withdrawal. Exactly these fields; any other is refused.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields, skip_serializing_if_is_none)]
pub struct NewWithdrawal {
    /// The asset's code, e.g. `BTC`.
    pub asset: AssetCode,
    /// How much: a decimal STRING within the asset's scale (`"0.01"`).
    pub amount: AmountText,
    /// The destination address, in the asset's format with its checksum:
    /// BTC bech32/bech32m (`bc1…`) or base58check (`1…`, `3…`); ETH and
    /// USDT `0x` + 40 hex digits (EIP-55 checksum when in mixed case); USD
    /// and EUR an IBAN. Visible ASCII only,
    /// 1–128 characters.
    pub address: AddressText,
}

/// A withdrawal as its owner sees it.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct WithdrawalView {
    pub id: uuid::Uuid,
    pub asset: String,
    /// A decimal string.
    pub amount: String,
    pub address: String,
    /// `pending` (accepted, not yet validated by its workflow), then
    /// `validated`, `held`, `awaiting_approval`, `approved`, `submitted`,
    /// `completed`, or `rejected`, `cancelled`.
    pub status: String,
    /// Why the withdrawal was rejected or cancelled, if it was.
    pub error: Option<String>,
    /// When the withdrawal was accepted (RFC 3339).
    pub created_at: String,
}

/// A created trade (or, for a repeated `Idempotency-Key`, the first answer).
#[derive(ApiResponse)]
pub enum TradeCreated {
    /// The trade's workflow is started and committed.
    #[oai(status = 201)]
    Created(Json<TradeView>),
}

/// A created withdrawal (or, for a repeated `Idempotency-Key`, the first answer).
#[derive(ApiResponse)]
pub enum WithdrawalCreated {
    /// The withdrawal's workflow is started and committed.
    #[oai(status = 201)]
    Created(Json<WithdrawalView>),
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl From<TradeRecord> for TradeView {
    fn from(r: TradeRecord) -> Self {
        TradeView {
            id: r.id,
            side: r.side,
            base_asset: r.base_asset,
            quote_asset: r.quote_asset,
            base_amount: r.base_amount,
            limit_price: r.limit_price,
            status: r.status,
            error: r.error,
            created_at: rfc3339(r.created_at),
        }
    }
}

impl From<WithdrawalRecord> for WithdrawalView {
    fn from(r: WithdrawalRecord) -> Self {
        WithdrawalView {
            id: r.id,
            asset: r.asset,
            amount: r.amount,
            address: r.address,
            status: r.status,
            error: r.error,
            created_at: rfc3339(r.created_at),
        }
    }
}

/// 503 unless the POSTs have a workflow registry to start workflows from
/// (checked before validation, so nothing is queued without one).
fn require_registry(state: &AppState) -> Result<(), Error> {
    if state.workflows.is_none() {
        tracing::error!("public API has no workflow registry (AppState::with_workflows)");
        return Err(Error::Unavailable);
    }
    Ok(())
}

/// Registered assets by code, as the POSTs found them. Only found assets are
/// kept, so a newly registered asset is seen on its first use, and the map
/// holds at most the registered assets. Never stale: assets are never
/// deleted and an asset's scale never changes (`ledger::create_asset`
/// refuses another scale).
#[derive(Debug, Default)]
pub struct AssetCache {
    known: RwLock<HashMap<String, Asset>>,
}

impl AssetCache {
    fn get(&self, code: &str) -> Option<Asset> {
        self.known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(code)
            .cloned()
    }

    fn put(&self, asset: &Asset) {
        self.known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(asset.code.clone(), asset.clone());
    }
}

/// A registered asset, or a 400 problem.
async fn asset(state: &AppState, field: &str, code: &str) -> Result<Asset, Error> {
    check_text(field, code, ASSET_CODE_MAX, TextKind::Line)?;
    if !(2..=ASSET_CODE_MAX).contains(&code.len())
        || !code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    {
        return Err(Error::Validation(format!("{field}: unknown asset")));
    }
    if let Some(known) = state.assets.get(code) {
        return Ok(known);
    }
    let mut conn = state.pool().acquire().await?;
    let found = ledger::asset(&mut conn, code)
        .await?
        .ok_or_else(|| Error::Validation(format!("{field}: unknown asset {code:?}")))?;
    state.assets.put(&found);
    Ok(found)
}

/// A money field: a plain positive decimal string within `asset`'s scale
/// (no sign, exponent, NaN, zero, or more than 28 digits), or a 400 problem.
fn amount(field: &str, text: &str, asset: &Asset) -> Result<(AmountStr, Amount), Error> {
    let bad = |e: ledgerflow_payments::Error| Error::Validation(format!("{field}: {e}"));
    let parsed = AmountStr::parse(text).map_err(bad)?;
    let exact = parsed.to_amount(asset.scale).map_err(bad)?;
    Ok((parsed, exact))
}

/// The replayed or fresh 201 body, parsed back into its view type (so a
/// replay is serialized exactly like the first answer).
fn stored<T: ParseFromJSON>(status: u16, body: Value) -> Result<T, Error> {
    if status != 201 {
        return Err(Error::Internal(format!(
            "stored idempotent response has status {status}"
        )));
    }
    T::parse_from_json(Some(body))
        .map_err(|e| Error::Internal(format!("stored idempotent response: {}", e.message())))
}

/// The public operations.
pub struct PublicApi;

#[OpenApi]
impl PublicApi {
    /// The caller's balances, one per account, ordered by asset.
    #[oai(
        path = "/v1/accounts/me/balances",
        method = "get",
        operation_id = "get_my_balances",
        tag = "Tag::Accounts"
    )]
    async fn my_balances(
        &self,
        state: Data<&AppState>,
        key: UserKey,
    ) -> Result<Json<Balances>, Error> {
        let user = auth::user(&state, &key).await?;
        let mut conn = state.pool().acquire().await?;
        let rows = ledger::balances(&mut conn, user).await?;
        Ok(Json(Balances {
            balances: rows
                .into_iter()
                .map(|b| BalanceView {
                    account_id: b.account_id.into(),
                    asset: b.asset,
                    kind: b.kind,
                    balance: b.balance.to_string(),
                    held: b.held.to_string(),
                    available: b.available.to_string(),
                })
                .collect(),
        }))
    }

    /// Places a limit order. Needs an `Idempotency-Key`: the same key with
    /// the same body answers the first response again; with another body, 422.
    /// Answers 201 after the trade's workflow is committed; its status is
    /// `pending` until the workflow validates it.
    #[oai(
        path = "/v1/trades",
        method = "post",
        operation_id = "create_trade",
        tag = "Tag::Trades"
    )]
    async fn create_trade(
        &self,
        state: Data<&AppState>,
        key: UserKey,
        /// A client-chosen key (1–255 visible ASCII characters), unique per request.
        #[oai(name = "Idempotency-Key", validator(pattern = r"^[\x21-\x7E]{1,255}$"))]
        idempotency_key: Header<String>,
        body: Json<NewTrade>,
    ) -> Result<TradeCreated, Error> {
        let user = auth::user(&state, &key).await?;
        let idem = idempotency::require_key(Some(&idempotency_key.0))?;
        require_registry(&state)?;
        let req = body.0;
        let (base_code, quote_code) = (req.base_asset.as_str(), req.quote_asset.as_str());
        if base_code == quote_code {
            return Err(Error::Validation(
                "base_asset and quote_asset must differ".into(),
            ));
        }
        let base = asset(&state, "base_asset", base_code).await?;
        let quote = asset(&state, "quote_asset", quote_code).await?;
        let (base_amount, _) = amount("base_amount", req.base_amount.as_str(), &base)?;
        let (limit_price, _) = amount("limit_price", req.limit_price.as_str(), &quote)?;
        let side = match req.side {
            TradeSide::Buy => Side::Buy,
            TradeSide::Sell => Side::Sell,
        };
        let canonical = json!({
            "side": req.side.to_json(),
            "base_asset": base_code,
            "quote_asset": quote_code,
            "base_amount": base_amount.as_str(),
            "limit_price": limit_price.as_str(),
        });
        let fingerprint = records::fingerprint("POST", "/v1/trades", &canonical);
        let input = TradeInput {
            user_id: user,
            side,
            base: base_code.to_string(),
            quote: quote_code.to_string(),
            base_amount,
            limit_price,
        };
        let input = serde_json::to_value(&input).map_err(|e| Error::Internal(e.to_string()))?;
        let creation = Creation {
            span: Creation::request_span(),
            resource: Resource::Trade,
            user,
            key: idem,
            fingerprint,
            input,
        };
        // Parsed back like a replay, so both answers serialize alike.
        Ok(TradeCreated::Created(Json(
            match state.batcher.create(&state, creation).await? {
                Settled::Created(body) => stored(201, body)?,
                Settled::Replay { status, body } => stored(status, body)?,
            },
        )))
    }

    /// One of the caller's trades (another user's is a 404).
    #[oai(
        path = "/v1/trades/:id",
        method = "get",
        operation_id = "get_trade",
        tag = "Tag::Trades"
    )]
    async fn get_trade(
        &self,
        state: Data<&AppState>,
        key: UserKey,
        id: Path<uuid::Uuid>,
    ) -> Result<Json<TradeView>, Error> {
        let user = auth::user(&state, &key).await?;
        let mut conn = state.pool().acquire().await?;
        records::trade(&mut conn, user, id.0)
            .await?
            .map(|r| Json(r.into()))
            .ok_or_else(|| Error::NotFound(format!("trade {} not found", id.0)))
    }

    /// Requests a withdrawal. Needs an `Idempotency-Key` (as for trades).
    /// Answers 201 after the withdrawal's workflow is committed; its status
    /// is `pending` until the workflow validates it.
    #[oai(
        path = "/v1/withdrawals",
        method = "post",
        operation_id = "create_withdrawal",
        tag = "Tag::Withdrawals"
    )]
    async fn create_withdrawal(
        &self,
        state: Data<&AppState>,
        key: UserKey,
        /// A client-chosen key (1–255 visible ASCII characters), unique per request.
        #[oai(name = "Idempotency-Key", validator(pattern = r"^[\x21-\x7E]{1,255}$"))]
        idempotency_key: Header<String>,
        body: Json<NewWithdrawal>,
    ) -> Result<WithdrawalCreated, Error> {
        let user = auth::user(&state, &key).await?;
        let idem = idempotency::require_key(Some(&idempotency_key.0))?;
        require_registry(&state)?;
        let req = body.0;
        let address = req.address.as_str();
        check_text("address", address, ADDRESS_MAX, TextKind::Line)?;
        if address.trim().is_empty() || address.trim() != address {
            return Err(Error::Validation(
                "address: 1 to 128 characters without surrounding whitespace".into(),
            ));
        }
        let code = req.asset.as_str();
        let asset = asset(&state, "asset", code).await?;
        // What an approver reads must be what is paid: the asset's format
        // and checksum (ledgerflow_payments::address).
        ledgerflow_payments::address::check(code, address)?;
        let amount_str = amount("amount", req.amount.as_str(), &asset)?.0;
        let canonical = json!({
            "asset": code,
            "amount": amount_str.as_str(),
            "address": address,
        });
        let fingerprint = records::fingerprint("POST", "/v1/withdrawals", &canonical);
        let input = WithdrawalInput {
            user_id: user,
            asset: code.to_string(),
            amount: amount_str,
            address: address.to_string(),
            requested_by: None,
        };
        let input = serde_json::to_value(&input).map_err(|e| Error::Internal(e.to_string()))?;
        let creation = Creation {
            span: Creation::request_span(),
            resource: Resource::Withdrawal,
            user,
            key: idem,
            fingerprint,
            input,
        };
        Ok(WithdrawalCreated::Created(Json(
            match state.batcher.create(&state, creation).await? {
                Settled::Created(body) => stored(201, body)?,
                Settled::Replay { status, body } => stored(status, body)?,
            },
        )))
    }

    /// One of the caller's withdrawals (another user's is a 404).
    #[oai(
        path = "/v1/withdrawals/:id",
        method = "get",
        operation_id = "get_withdrawal",
        tag = "Tag::Withdrawals"
    )]
    async fn get_withdrawal(
        &self,
        state: Data<&AppState>,
        key: UserKey,
        id: Path<uuid::Uuid>,
    ) -> Result<Json<WithdrawalView>, Error> {
        let user = auth::user(&state, &key).await?;
        let mut conn = state.pool().acquire().await?;
        records::withdrawal(&mut conn, user, id.0)
            .await?
            .map(|r| Json(r.into()))
            .ok_or_else(|| Error::NotFound(format!("withdrawal {} not found", id.0)))
    }
}

/// The route templates of the public listener, for metrics labels.
pub(crate) const ROUTES: &[&str] = &[
    "/v1/accounts/me/balances",
    "/v1/trades",
    "/v1/trades/{id}",
    "/v1/withdrawals",
    "/v1/withdrawals/{id}",
    "/healthcheck",
    "/readyz",
    "/openapi.json",
    "/docs",
];
