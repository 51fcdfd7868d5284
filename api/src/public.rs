//! The public API (`/v1`, bearer user API key). Amounts travel as decimal
//! strings at their asset's scale, never as JSON numbers (DESIGN.md rule 4).
//!
//! Trades and withdrawals are added here by the issues that build their
//! workflows.
use crate::AppState;
use crate::auth::{self, UserKey};
use crate::error::Error;
use ledgerflow_payments::ledger;
use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};

#[derive(Tags)]
enum Tag {
    /// The caller's accounts.
    Accounts,
}

/// One account's money.
#[derive(Debug, Object)]
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
pub struct Balances {
    pub balances: Vec<BalanceView>,
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
}

/// The route templates of the public listener, for metrics labels.
pub(crate) const ROUTES: &[&str] = &[
    "/v1/accounts/me/balances",
    "/healthcheck",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
];
