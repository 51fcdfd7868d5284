//! Accounts and the double-entry ledger: transfers, deposits, holds, balances.
//!
//! # Transactions
//!
//! Every function takes `&mut PgConnection` so that a workflow step can run
//! it inside its own fenced transaction (DESIGN.md, contract rule 2): the
//! ledger write then commits together with the step's checkpoint, or not at
//! all. Pass either
//! - a connection inside a sqlx `Transaction` (`&mut *tx`): the writes join
//!   that transaction, and each function wraps its own statements in a
//!   SAVEPOINT so that a refusal ([`Error::InsufficientFunds`],
//!   [`Error::ReferenceConflict`] …) leaves the caller's transaction usable; or
//! - an idle connection: the function then runs in a transaction of its own.
//!
//! A transaction opened with a raw `BEGIN` query (rather than sqlx's
//! `begin()`) is **not** supported: sqlx would not know it is in one.
//!
//! # Guarantees and where they come from
//!
//! The SQL schema (migration `20261126001000_payments.sql`) is the final
//! word: transfers balance per asset (checked at COMMIT), postings match their
//! account's asset and scale, history is append-only, balances are maintained
//! by triggers, and available (balance − held) never goes negative on a user
//! account. The Rust checks below exist to give precise errors, not to
//! enforce.
//!
//! # Idempotency
//!
//! Transfers and holds carry a caller-chosen `reference` that is unique
//! forever. Repeating a call with the same reference and the same content
//! returns [`Posted::Existing`] and changes nothing; the same reference with
//! different content is [`Error::ReferenceConflict`].
//!
//! # Locking
//!
//! Writers lock the balance rows they touch in account-id order (and a hold's
//! row before any balance row), so two transfers over the same accounts
//! cannot deadlock each other. System accounts (`external`, `fees`,
//! `exchange_omnibus`) are touched by many transfers: keep the transactions
//! that post to them short.
use crate::error::{Error, Result, violated_constraint};
use crate::ids::{AccountId, HoldId, TransferId, UserId};
use crate::money::{Amount, Asset, MAX_SCALE};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{Connection, PgConnection, Postgres, Row, Transaction};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Constraint names the schema uses for refusals we map to typed errors.
const AVAILABLE_CONSTRAINT: &str = "account_balances_available_nonnegative";
const SCALE_CONSTRAINT: &str = "amount_within_asset_scale";

/// What an account is for. User kinds belong to a user; the others are the
/// platform's system accounts (one per asset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    /// A user's wallet: deposits land here, holds and trades draw from it.
    UserAvailable,
    /// The outside world: the source of deposits and the destination of
    /// withdrawals. Its balance is minus the platform's net inflow, so it may
    /// go negative.
    External,
    /// The platform's position at the exchange, counterparty of every trade.
    /// It may go negative (we owe the exchange) between settlements.
    ExchangeOmnibus,
    /// Fees collected. Never negative.
    Fees,
}

impl AccountKind {
    /// The `accounts.kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::UserAvailable => "user_available",
            AccountKind::External => "external",
            AccountKind::ExchangeOmnibus => "exchange_omnibus",
            AccountKind::Fees => "fees",
        }
    }

    /// True for kinds owned by a user (`user_*` in SQL).
    pub fn is_user(self) -> bool {
        matches!(self, AccountKind::UserAvailable)
    }

    /// Whether accounts of this kind may hold a negative balance. Never for
    /// user accounts (the schema refuses that too).
    pub fn allows_negative(self) -> bool {
        matches!(self, AccountKind::External | AccountKind::ExchangeOmnibus)
    }
}

/// The result of an idempotent write: `New` if this call made it, `Existing`
/// if the same reference had already been written (nothing changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted<T = TransferId> {
    /// Written by this call.
    New(T),
    /// Already there from an earlier call with the same reference.
    Existing(T),
}

impl<T: Copy> Posted<T> {
    /// The id, either way.
    pub fn id(&self) -> T {
        match self {
            Posted::New(id) | Posted::Existing(id) => *id,
        }
    }

    /// True if this call wrote it.
    pub fn is_new(&self) -> bool {
        matches!(self, Posted::New(_))
    }
}

/// An account's money, as of the caller's transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Balance {
    pub account_id: AccountId,
    pub asset: String,
    /// `accounts.kind`, e.g. `user_available`.
    pub kind: String,
    /// Sum of all postings.
    pub balance: Decimal,
    /// Sum of active holds.
    pub held: Decimal,
    /// `balance - held`: what can be spent or held now.
    pub available: Decimal,
}

/// A hold's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldState {
    Active,
    Released,
    Captured,
}

impl HoldState {
    fn parse(s: &str) -> Result<HoldState> {
        match s {
            "active" => Ok(HoldState::Active),
            "released" => Ok(HoldState::Released),
            "captured" => Ok(HoldState::Captured),
            other => Err(Error::Invalid(format!("unknown hold state {other:?}"))),
        }
    }

    /// The `holds.state` value.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Active => "active",
            HoldState::Released => "released",
            HoldState::Captured => "captured",
        }
    }
}

/// A hold as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hold {
    pub id: HoldId,
    pub reference: String,
    pub account_id: AccountId,
    pub asset: String,
    pub amount: Decimal,
    pub state: HoldState,
    /// How much the capture debited (≤ `amount`); `None` unless captured.
    pub captured_amount: Option<Decimal>,
    /// The transfer that captured it; `None` unless captured.
    pub capture_transfer_id: Option<TransferId>,
}

// ---------------------------------------------------------------------------
// Assets and accounts
// ---------------------------------------------------------------------------

/// The asset with this code, if any.
pub async fn asset(conn: &mut PgConnection, code: &str) -> Result<Option<Asset>> {
    let row: Option<(String, i16)> =
        sqlx::query_as("SELECT code, scale FROM assets WHERE code = $1")
            .bind(code)
            .fetch_optional(&mut *conn)
            .await?;
    row.map(|(code, scale)| asset_from_row(code, scale))
        .transpose()
}

/// Registers an asset. Idempotent; an existing asset with another scale is an
/// error (a scale never changes once amounts exist in it).
pub async fn create_asset(conn: &mut PgConnection, code: &str, scale: u32) -> Result<Asset> {
    if scale > MAX_SCALE {
        return Err(Error::Invalid(format!(
            "asset scale {scale} exceeds the maximum of {MAX_SCALE}"
        )));
    }
    if code.len() < 2
        || code.len() > 16
        || !code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    {
        return Err(Error::Invalid(format!(
            "asset code {code:?} must be 2-16 characters of A-Z and 0-9"
        )));
    }
    // scale <= 18 was checked above, so the conversion cannot fail.
    let scale_sql = i16::try_from(scale).map_err(|_| Error::Invalid("scale".into()))?;
    sqlx::query("INSERT INTO assets (code, scale) VALUES ($1, $2) ON CONFLICT (code) DO NOTHING")
        .bind(code)
        .bind(scale_sql)
        .execute(&mut *conn)
        .await?;
    let existing = asset(conn, code)
        .await?
        .ok_or_else(|| Error::ReferenceNotVisible(code.to_owned()))?;
    if existing.scale != scale {
        return Err(Error::Invalid(format!(
            "asset {code} already exists with scale {}",
            existing.scale
        )));
    }
    Ok(existing)
}

/// Opens (or finds) the account of `owner` (`None` for a system account) for
/// `asset` and `kind`. Idempotent: there is one account per (owner, asset,
/// kind). Whether it may go negative follows from `kind`.
pub async fn open_account(
    conn: &mut PgConnection,
    owner: Option<UserId>,
    asset: &str,
    kind: AccountKind,
) -> Result<AccountId> {
    if owner.is_some() != kind.is_user() {
        return Err(Error::Invalid(format!(
            "a {} account {} an owner",
            kind.as_str(),
            if kind.is_user() {
                "needs"
            } else {
                "cannot have"
            }
        )));
    }
    let mut sp = conn.begin().await?;
    let result = open_account_in(&mut sp, owner, asset, kind).await;
    finish(sp, result).await
}

async fn open_account_in(
    conn: &mut PgConnection,
    owner: Option<UserId>,
    asset: &str,
    kind: AccountKind,
) -> Result<AccountId> {
    let inserted: Option<AccountId> = sqlx::query_scalar(
        "INSERT INTO accounts (id, owner_user_id, asset, kind, allow_negative)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT ON CONSTRAINT accounts_owner_asset_kind_key DO NOTHING
         RETURNING id",
    )
    .bind(AccountId::new())
    .bind(owner)
    .bind(asset)
    .bind(kind.as_str())
    .bind(kind.allows_negative())
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| match (violated_constraint(&e), owner) {
        (Some("accounts_asset_fkey"), _) => Error::UnknownAsset(asset.to_owned()),
        (Some("accounts_owner_user_id_fkey"), Some(owner)) => Error::UserNotFound(owner),
        _ => Error::Db(e),
    })?;
    if let Some(id) = inserted {
        return Ok(id);
    }
    find_account(conn, owner, asset, kind)
        .await?
        .ok_or_else(|| Error::ReferenceNotVisible(format!("account {asset}/{}", kind.as_str())))
}

async fn find_account(
    conn: &mut PgConnection,
    owner: Option<UserId>,
    asset: &str,
    kind: AccountKind,
) -> Result<Option<AccountId>> {
    // Two statements rather than `IS NOT DISTINCT FROM`, which cannot use the
    // unique index.
    let id =
        match owner {
            Some(owner) => {
                sqlx::query_scalar(
                    "SELECT id FROM accounts WHERE owner_user_id = $1 AND asset = $2 AND kind = $3",
                )
                .bind(owner)
                .bind(asset)
                .bind(kind.as_str())
                .fetch_optional(&mut *conn)
                .await?
            }
            None => sqlx::query_scalar(
                "SELECT id FROM accounts WHERE owner_user_id IS NULL AND asset = $1 AND kind = $2",
            )
            .bind(asset)
            .bind(kind.as_str())
            .fetch_optional(&mut *conn)
            .await?,
        };
    Ok(id)
}

/// The platform's `kind` account for `asset`, opened on first use.
pub async fn system_account(
    conn: &mut PgConnection,
    asset: &str,
    kind: AccountKind,
) -> Result<AccountId> {
    open_account(conn, None, asset, kind).await
}

/// Makes sure `user` has a `user_available` account for each of `assets`;
/// returns `(asset, account)` pairs in the order given.
pub async fn ensure_user_accounts(
    conn: &mut PgConnection,
    user: UserId,
    assets: &[&str],
) -> Result<Vec<(String, AccountId)>> {
    let mut out = Vec::with_capacity(assets.len());
    for asset in assets {
        let id = open_account(conn, Some(user), asset, AccountKind::UserAvailable).await?;
        out.push(((*asset).to_owned(), id));
    }
    Ok(out)
}

/// `user`'s `user_available` account for `asset`, if it exists.
pub async fn user_account(
    conn: &mut PgConnection,
    user: UserId,
    asset: &str,
) -> Result<Option<AccountId>> {
    find_account(conn, Some(user), asset, AccountKind::UserAvailable).await
}

// ---------------------------------------------------------------------------
// Transfers
// ---------------------------------------------------------------------------

/// Posts a transfer: `postings` are `(account, signed amount)` pairs that
/// must sum to zero per asset (debits negative, credits positive).
///
/// Idempotent on `reference`: a repeat with the same postings returns
/// [`Posted::Existing`] without touching anything (and without aborting the
/// caller's transaction — `ON CONFLICT DO NOTHING`, not a unique violation).
/// Fails with [`Error::InsufficientFunds`] if a non-negative account's
/// available balance would go below zero, leaving the caller's transaction
/// usable.
pub async fn transfer(
    conn: &mut PgConnection,
    reference: &str,
    kind: &str,
    postings: &[(AccountId, Amount)],
) -> Result<Posted> {
    transfer_with_metadata(conn, reference, kind, postings, &serde_json::json!({})).await
}

/// [`transfer`] with a JSON `metadata` object stored on the transfer (e.g.
/// the trade or workflow id it belongs to).
pub async fn transfer_with_metadata(
    conn: &mut PgConnection,
    reference: &str,
    kind: &str,
    postings: &[(AccountId, Amount)],
    metadata: &serde_json::Value,
) -> Result<Posted> {
    check_reference(reference)?;
    check_kind(kind)?;
    check_postings_shape(postings)?;
    let mut sp = conn.begin().await?;
    let result = transfer_in(&mut sp, reference, kind, postings, metadata, None).await;
    finish(sp, result).await
}

/// Credits `account` with `amount` from its asset's `external` system
/// account (the outside world). `reference` should name the external event,
/// e.g. `deposit:{chain}:{txid}:{vout}`, so a redelivered confirmation cannot
/// credit twice.
pub async fn deposit(
    conn: &mut PgConnection,
    reference: &str,
    account: AccountId,
    amount: Amount,
) -> Result<Posted> {
    if amount.is_negative() {
        return Err(Error::Invalid("a deposit amount must be positive".into()));
    }
    let asset = account_asset(conn, account).await?;
    let external = system_account(conn, &asset, AccountKind::External).await?;
    transfer(
        conn,
        reference,
        "deposit",
        &[(external, -amount), (account, amount)],
    )
    .await
}

/// Inside a savepoint: the transfer row, then the locked checks, then the
/// postings. `release` is a hold being captured by this transfer: its amount
/// counts as available (it is released in the same statement sequence,
/// before the postings).
async fn transfer_in(
    conn: &mut PgConnection,
    reference: &str,
    kind: &str,
    postings: &[(AccountId, Amount)],
    metadata: &serde_json::Value,
    release: Option<&ActiveHold>,
) -> Result<Posted> {
    let id = TransferId::new();
    let inserted: Option<TransferId> = sqlx::query_scalar(
        "INSERT INTO ledger_transfers (id, kind, reference, metadata)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (reference) DO NOTHING
         RETURNING id",
    )
    .bind(id)
    .bind(kind)
    .bind(reference)
    .bind(metadata)
    .fetch_optional(&mut *conn)
    .await?;
    if inserted.is_none() {
        let existing = existing_transfer(conn, reference, kind, postings).await?;
        if release.is_some() {
            // The hold is still active, so this reference was used by some
            // other transfer: posting "again" would not capture anything.
            return Err(Error::ReferenceConflict {
                reference: reference.to_owned(),
                detail: format!("transfer {existing} exists but did not capture this hold"),
            });
        }
        return Ok(Posted::Existing(existing));
    }

    let locked = lock_balances(conn, postings).await?;
    check_postings(&locked, postings, release)?;

    if let Some(hold) = release {
        sqlx::query(
            "UPDATE holds SET state = 'captured', captured_amount = $2, capture_transfer_id = $3
             WHERE id = $1",
        )
        .bind(hold.id)
        .bind(hold.debit)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }

    // Credits before debits: each posting's balance update is checked on its
    // own, so an account both credited and debited by one transfer must not
    // dip below zero in between.
    let mut ordered: Vec<&(AccountId, Amount)> = postings.iter().collect();
    ordered.sort_by_key(|(account, amount)| (amount.is_negative(), *account));
    let accounts: Vec<Uuid> = ordered.iter().map(|(a, _)| a.0).collect();
    let amounts: Vec<Decimal> = ordered.iter().map(|(_, m)| m.value()).collect();
    let assets: Vec<String> = ordered
        .iter()
        .map(|(a, _)| locked.get(a).map(|l| l.asset.clone()).unwrap_or_default())
        .collect();
    sqlx::query(
        "INSERT INTO ledger_postings (transfer_id, account_id, asset, amount)
         SELECT $1, p.account_id, p.asset, p.amount
           FROM unnest($2::uuid[], $3::text[], $4::numeric[]) WITH ORDINALITY
                AS p(account_id, asset, amount, ord)
          ORDER BY p.ord",
    )
    .bind(id)
    .bind(&accounts)
    .bind(&assets)
    .bind(&amounts)
    .execute(&mut *conn)
    .await
    .map_err(|e| map_posting_error(e, &locked, postings))?;
    Ok(Posted::New(id))
}

/// The transfer already posted under `reference`, after checking it is the
/// same money movement as the one requested.
async fn existing_transfer(
    conn: &mut PgConnection,
    reference: &str,
    kind: &str,
    postings: &[(AccountId, Amount)],
) -> Result<TransferId> {
    let row: Option<(TransferId, String)> =
        sqlx::query_as("SELECT id, kind FROM ledger_transfers WHERE reference = $1")
            .bind(reference)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((id, existing_kind)) = row else {
        return Err(Error::ReferenceNotVisible(reference.to_owned()));
    };
    let rows: Vec<(AccountId, Decimal)> = sqlx::query_as(
        "SELECT account_id, sum(amount) FROM ledger_postings WHERE transfer_id = $1 GROUP BY account_id",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let stored: BTreeMap<AccountId, Decimal> = rows.into_iter().collect();
    if existing_kind != kind || stored != net_by_account(postings) {
        return Err(Error::ReferenceConflict {
            reference: reference.to_owned(),
            detail: format!("transfer {id} ({existing_kind}) has different postings"),
        });
    }
    Ok(id)
}

fn net_by_account(postings: &[(AccountId, Amount)]) -> BTreeMap<AccountId, Decimal> {
    let mut net = BTreeMap::new();
    for (account, amount) in postings {
        *net.entry(*account).or_insert(Decimal::ZERO) += amount.value();
    }
    net
}

/// A balance row locked `FOR UPDATE`, with what the checks need.
#[derive(Debug)]
struct Locked {
    asset: String,
    scale: u32,
    allow_negative: bool,
    available: Decimal,
}

/// Locks the balance rows of every account in `postings`, in account-id
/// order (deadlock avoidance), and returns them. Unknown accounts are errors.
async fn lock_balances(
    conn: &mut PgConnection,
    postings: &[(AccountId, Amount)],
) -> Result<BTreeMap<AccountId, Locked>> {
    let ids: Vec<Uuid> = net_by_account(postings).keys().map(|a| a.0).collect();
    let rows = sqlx::query(
        "SELECT b.account_id, b.asset, s.scale, b.allow_negative, b.balance - b.held AS available
           FROM account_balances b
           JOIN assets s ON s.code = b.asset
          WHERE b.account_id = ANY($1)
          ORDER BY b.account_id
            FOR UPDATE OF b",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut locked = BTreeMap::new();
    for row in rows {
        let scale: i16 = row.try_get("scale")?;
        locked.insert(
            row.try_get::<AccountId, _>("account_id")?,
            Locked {
                asset: row.try_get("asset")?,
                scale: u32::try_from(scale).map_err(|_| Error::Invalid("asset scale".into()))?,
                allow_negative: row.try_get("allow_negative")?,
                available: row.try_get("available")?,
            },
        );
    }
    for id in &ids {
        let id = AccountId(*id);
        if !locked.contains_key(&id) {
            return Err(Error::UnknownAccount(id));
        }
    }
    Ok(locked)
}

/// The checks the schema will make anyway, done first for precise errors.
fn check_postings(
    locked: &BTreeMap<AccountId, Locked>,
    postings: &[(AccountId, Amount)],
    release: Option<&ActiveHold>,
) -> Result<()> {
    let mut per_asset: BTreeMap<&str, Decimal> = BTreeMap::new();
    for (account, amount) in postings {
        let l = locked.get(account).ok_or(Error::UnknownAccount(*account))?;
        if amount.value().normalize().scale() > l.scale {
            return Err(Error::ScaleExceeded {
                asset: l.asset.clone(),
                scale: l.scale,
                amount: amount.value(),
            });
        }
        *per_asset.entry(&l.asset).or_insert(Decimal::ZERO) += amount.value();
    }
    if let Some((asset, sum)) = per_asset.iter().find(|(_, sum)| !sum.is_zero()) {
        return Err(Error::Unbalanced {
            asset: (*asset).to_owned(),
            sum: *sum,
        });
    }
    for (account, net) in net_by_account(postings) {
        let Some(l) = locked.get(&account) else {
            continue;
        };
        let mut available = l.available;
        if let Some(hold) = release.filter(|h| h.account == account) {
            available += hold.amount;
        }
        if !l.allow_negative && net.is_sign_negative() && available + net < Decimal::ZERO {
            return Err(Error::InsufficientFunds {
                account,
                requested: -net,
                available,
            });
        }
    }
    Ok(())
}

/// Maps the schema's refusals of a posting insert to typed errors. Normally
/// unreachable (the locked pre-checks catch them), kept because the SQL is the
/// final word.
fn map_posting_error(
    e: sqlx::Error,
    locked: &BTreeMap<AccountId, Locked>,
    postings: &[(AccountId, Amount)],
) -> Error {
    match violated_constraint(&e) {
        Some(AVAILABLE_CONSTRAINT) => {
            let debited = net_by_account(postings).into_iter().find(|(a, net)| {
                net.is_sign_negative() && locked.get(a).is_some_and(|l| !l.allow_negative)
            });
            match debited {
                Some((account, net)) => Error::InsufficientFunds {
                    account,
                    requested: -net,
                    available: locked
                        .get(&account)
                        .map(|l| l.available)
                        .unwrap_or_default(),
                },
                None => Error::Db(e),
            }
        }
        Some(SCALE_CONSTRAINT) => Error::InvalidAmount {
            input: e.to_string(),
            reason: "more fractional digits than the asset's scale",
        },
        _ => Error::Db(e),
    }
}

// ---------------------------------------------------------------------------
// Holds
// ---------------------------------------------------------------------------

/// Reserves `amount` of `account`'s available funds under `reference`
/// (e.g. `withdrawal:{id}:hold`).
///
/// Idempotent: the same reference, account and amount again returns
/// [`Posted::Existing`] whatever the hold's state now. Fails with
/// [`Error::InsufficientFunds`] when available < amount, leaving the caller's
/// transaction usable.
pub async fn place_hold(
    conn: &mut PgConnection,
    reference: &str,
    account: AccountId,
    amount: Amount,
) -> Result<Posted<HoldId>> {
    check_reference(reference)?;
    if amount.is_negative() {
        return Err(Error::Invalid("a hold amount must be positive".into()));
    }
    let mut sp = conn.begin().await?;
    let result = place_hold_in(&mut sp, reference, account, amount).await;
    finish(sp, result).await
}

async fn place_hold_in(
    conn: &mut PgConnection,
    reference: &str,
    account: AccountId,
    amount: Amount,
) -> Result<Posted<HoldId>> {
    // Lock the balance first: concurrent holds on one account queue here and
    // each sees the previous one's effect.
    let locked = lock_balances(conn, &[(account, amount)]).await?;
    let l = locked.get(&account).ok_or(Error::UnknownAccount(account))?;
    if let Some(existing) = existing_hold(conn, reference, account, amount).await? {
        return Ok(Posted::Existing(existing));
    }
    if amount.value().normalize().scale() > l.scale {
        return Err(Error::ScaleExceeded {
            asset: l.asset.clone(),
            scale: l.scale,
            amount: amount.value(),
        });
    }
    if !l.allow_negative && l.available < amount.value() {
        return Err(Error::InsufficientFunds {
            account,
            requested: amount.value(),
            available: l.available,
        });
    }
    let inserted: Option<HoldId> = sqlx::query_scalar(
        "INSERT INTO holds (id, account_id, asset, amount, reference)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (reference) DO NOTHING
         RETURNING id",
    )
    .bind(HoldId::new())
    .bind(account)
    .bind(&l.asset)
    .bind(amount.value())
    .bind(reference)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| match violated_constraint(&e) {
        Some(AVAILABLE_CONSTRAINT) => Error::InsufficientFunds {
            account,
            requested: amount.value(),
            available: l.available,
        },
        _ => Error::Db(e),
    })?;
    match inserted {
        Some(id) => Ok(Posted::New(id)),
        // Placed concurrently (on another account, since we hold this
        // account's lock) and committed meanwhile.
        None => existing_hold(conn, reference, account, amount)
            .await?
            .map(Posted::Existing)
            .ok_or_else(|| Error::ReferenceNotVisible(reference.to_owned())),
    }
}

async fn existing_hold(
    conn: &mut PgConnection,
    reference: &str,
    account: AccountId,
    amount: Amount,
) -> Result<Option<HoldId>> {
    let row: Option<(HoldId, AccountId, Decimal)> =
        sqlx::query_as("SELECT id, account_id, amount FROM holds WHERE reference = $1")
            .bind(reference)
            .fetch_optional(&mut *conn)
            .await?;
    match row {
        None => Ok(None),
        Some((id, a, m)) if a == account && m == amount.value() => Ok(Some(id)),
        Some((id, a, m)) => Err(Error::ReferenceConflict {
            reference: reference.to_owned(),
            detail: format!("hold {id} is {m} on account {a}"),
        }),
    }
}

/// The hold with this reference, if any.
pub async fn hold(conn: &mut PgConnection, reference: &str) -> Result<Option<Hold>> {
    let row = sqlx::query(
        "SELECT id, reference, account_id, asset, amount, state, captured_amount, capture_transfer_id
           FROM holds WHERE reference = $1",
    )
    .bind(reference)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| {
        Ok(Hold {
            id: row.try_get("id")?,
            reference: row.try_get("reference")?,
            account_id: row.try_get("account_id")?,
            asset: row.try_get("asset")?,
            amount: row.try_get("amount")?,
            state: HoldState::parse(row.try_get("state")?)?,
            captured_amount: row.try_get("captured_amount")?,
            capture_transfer_id: row.try_get("capture_transfer_id")?,
        })
    })
    .transpose()
}

/// Releases an active hold: its amount becomes available again. Returns
/// `true` if this call released it, `false` if it already was released
/// (idempotent). A captured hold cannot be released
/// ([`Error::HoldNotActive`]): the money has moved, compensate with a transfer.
pub async fn release_hold(conn: &mut PgConnection, reference: &str) -> Result<bool> {
    let mut sp = conn.begin().await?;
    let result = release_hold_in(&mut sp, reference).await;
    finish(sp, result).await
}

async fn release_hold_in(conn: &mut PgConnection, reference: &str) -> Result<bool> {
    let row: Option<(HoldId, String)> =
        sqlx::query_as("SELECT id, state FROM holds WHERE reference = $1 FOR UPDATE")
            .bind(reference)
            .fetch_optional(&mut *conn)
            .await?;
    let (id, state) = row.ok_or_else(|| Error::HoldNotFound(reference.to_owned()))?;
    match HoldState::parse(&state)? {
        HoldState::Released => Ok(false),
        HoldState::Captured => Err(Error::HoldNotActive {
            reference: reference.to_owned(),
            state,
            action: "release",
        }),
        HoldState::Active => {
            sqlx::query("UPDATE holds SET state = 'released' WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            Ok(true)
        }
    }
}

/// Captures the whole hold: one transfer of the held amount from the held
/// account to `destination` (kind `hold.capture`), closing the hold in the
/// same step. Idempotent on `transfer_reference`.
pub async fn capture_hold(
    conn: &mut PgConnection,
    hold_reference: &str,
    transfer_reference: &str,
    destination: AccountId,
) -> Result<Posted> {
    let h = hold(conn, hold_reference)
        .await?
        .ok_or_else(|| Error::HoldNotFound(hold_reference.to_owned()))?;
    let scale = asset(conn, &h.asset)
        .await?
        .ok_or_else(|| Error::UnknownAsset(h.asset.clone()))?
        .scale;
    let amount = Amount::from_decimal(h.amount, scale)?;
    settle_hold(
        conn,
        hold_reference,
        transfer_reference,
        "hold.capture",
        &[(h.account_id, -amount), (destination, amount)],
        &serde_json::json!({ "hold": hold_reference }),
    )
    .await
}

/// Closes an active hold by posting `postings` as one transfer, atomically:
/// the hold's amount stops being held and the transfer debits the held
/// account by `d`, with `0 < d ≤ hold amount` (any rest simply becomes
/// available again). `postings` may move other assets and accounts too — a
/// trade settlement (quote out, base in, fee) is one call.
///
/// Idempotent: if the hold was already captured by a transfer with
/// `transfer_reference`, returns [`Posted::Existing`]. A released hold, or
/// one captured under another reference, is [`Error::HoldNotActive`].
pub async fn settle_hold(
    conn: &mut PgConnection,
    hold_reference: &str,
    transfer_reference: &str,
    kind: &str,
    postings: &[(AccountId, Amount)],
    metadata: &serde_json::Value,
) -> Result<Posted> {
    check_reference(hold_reference)?;
    check_reference(transfer_reference)?;
    check_kind(kind)?;
    check_postings_shape(postings)?;
    let mut sp = conn.begin().await?;
    let result = settle_hold_in(
        &mut sp,
        hold_reference,
        transfer_reference,
        kind,
        postings,
        metadata,
    )
    .await;
    finish(sp, result).await
}

/// An active hold being captured: what [`transfer_in`] needs to know.
#[derive(Debug)]
struct ActiveHold {
    id: HoldId,
    account: AccountId,
    amount: Decimal,
    debit: Decimal,
}

async fn settle_hold_in(
    conn: &mut PgConnection,
    hold_reference: &str,
    transfer_reference: &str,
    kind: &str,
    postings: &[(AccountId, Amount)],
    metadata: &serde_json::Value,
) -> Result<Posted> {
    // The hold's row first, then (in transfer_in) the balance rows in id
    // order: the same order release_hold uses.
    let row: Option<(HoldId, AccountId, Decimal, String, Option<TransferId>)> = sqlx::query_as(
        "SELECT id, account_id, amount, state, capture_transfer_id
           FROM holds WHERE reference = $1 FOR UPDATE",
    )
    .bind(hold_reference)
    .fetch_optional(&mut *conn)
    .await?;
    let (id, account, amount, state, captured_by) =
        row.ok_or_else(|| Error::HoldNotFound(hold_reference.to_owned()))?;
    match HoldState::parse(&state)? {
        HoldState::Active => {}
        HoldState::Captured => {
            let by: Option<String> =
                sqlx::query_scalar("SELECT reference FROM ledger_transfers WHERE id = $1")
                    .bind(captured_by)
                    .fetch_optional(&mut *conn)
                    .await?;
            if by.as_deref() == Some(transfer_reference) {
                let existing = existing_transfer(conn, transfer_reference, kind, postings).await?;
                return Ok(Posted::Existing(existing));
            }
            return Err(Error::HoldNotActive {
                reference: hold_reference.to_owned(),
                state,
                action: "capture",
            });
        }
        HoldState::Released => {
            return Err(Error::HoldNotActive {
                reference: hold_reference.to_owned(),
                state,
                action: "capture",
            });
        }
    }
    let debit = -net_by_account(postings)
        .get(&account)
        .copied()
        .unwrap_or_default();
    if debit <= Decimal::ZERO || debit > amount {
        return Err(Error::Invalid(format!(
            "capturing hold {hold_reference:?} must debit its account by more than 0 and at most {amount}, not {debit}"
        )));
    }
    let hold = ActiveHold {
        id,
        account,
        amount,
        debit,
    };
    transfer_in(
        conn,
        transfer_reference,
        kind,
        postings,
        metadata,
        Some(&hold),
    )
    .await
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/// `user`'s balances, one per account, ordered by asset. Amounts are shown at
/// their asset's scale (`1.50000000` BTC).
pub async fn balances(conn: &mut PgConnection, user: UserId) -> Result<Vec<Balance>> {
    let rows = sqlx::query(
        "SELECT b.account_id, b.asset, a.kind, s.scale, b.balance, b.held
           FROM accounts a
           JOIN account_balances b ON b.account_id = a.id
           JOIN assets s ON s.code = b.asset
          WHERE a.owner_user_id = $1
          ORDER BY b.asset, a.kind",
    )
    .bind(user)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(balance_from_row).collect()
}

/// One account's balance.
pub async fn account_balance(conn: &mut PgConnection, account: AccountId) -> Result<Balance> {
    let row = sqlx::query(
        "SELECT b.account_id, b.asset, a.kind, s.scale, b.balance, b.held
           FROM accounts a
           JOIN account_balances b ON b.account_id = a.id
           JOIN assets s ON s.code = b.asset
          WHERE a.id = $1",
    )
    .bind(account)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(Error::UnknownAccount(account))?;
    balance_from_row(&row)
}

fn balance_from_row(row: &sqlx::postgres::PgRow) -> Result<Balance> {
    let scale: i16 = row.try_get("scale")?;
    let scale = u32::try_from(scale).map_err(|_| Error::Invalid("asset scale".into()))?;
    // Stored values never exceed the scale (the schema refuses it), so
    // rescaling only pads zeros: it never rounds.
    let at_scale = |mut d: Decimal| {
        d.rescale(scale);
        d
    };
    let balance: Decimal = row.try_get("balance")?;
    let held: Decimal = row.try_get("held")?;
    Ok(Balance {
        account_id: row.try_get("account_id")?,
        asset: row.try_get("asset")?,
        kind: row.try_get("kind")?,
        balance: at_scale(balance),
        held: at_scale(held),
        available: at_scale(balance - held),
    })
}

/// Sum of all postings per asset. Double entry means every sum is zero;
/// tests and reconciliation jobs assert it.
pub async fn ledger_sums(conn: &mut PgConnection) -> Result<Vec<(String, Decimal)>> {
    Ok(sqlx::query_as(
        "SELECT asset, sum(amount) FROM ledger_postings GROUP BY asset ORDER BY asset",
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Accounts whose maintained `balance`/`held` disagree with their postings
/// and active holds. Always empty unless the triggers were bypassed; for
/// tests and reconciliation.
pub async fn balance_drift(conn: &mut PgConnection) -> Result<Vec<AccountId>> {
    Ok(sqlx::query_scalar(
        "SELECT b.account_id
           FROM account_balances b
           LEFT JOIN (SELECT account_id, sum(amount) AS s FROM ledger_postings GROUP BY account_id) p
                  ON p.account_id = b.account_id
           LEFT JOIN (SELECT account_id, sum(amount) AS s FROM holds WHERE state = 'active' GROUP BY account_id) h
                  ON h.account_id = b.account_id
          WHERE b.balance <> coalesce(p.s, 0) OR b.held <> coalesce(h.s, 0)
          ORDER BY b.account_id",
    )
    .fetch_all(&mut *conn)
    .await?)
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

async fn account_asset(conn: &mut PgConnection, account: AccountId) -> Result<String> {
    sqlx::query_scalar("SELECT asset FROM accounts WHERE id = $1")
        .bind(account)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(Error::UnknownAccount(account))
}

fn asset_from_row(code: String, scale: i16) -> Result<Asset> {
    let scale = u32::try_from(scale).map_err(|_| Error::Invalid(format!("asset {code} scale")))?;
    Ok(Asset { code, scale })
}

/// Ends a savepoint (or our own transaction): kept on success, rolled back on
/// error so a refusal leaves the caller's transaction as it was.
async fn finish<T>(sp: Transaction<'_, Postgres>, result: Result<T>) -> Result<T> {
    match result {
        Ok(v) => {
            // When this is our own transaction (not a savepoint), COMMIT is
            // where the schema's deferred double-entry check runs.
            sp.commit().await?;
            Ok(v)
        }
        Err(e) => {
            sp.rollback().await?;
            Err(e)
        }
    }
}

fn check_reference(reference: &str) -> Result<()> {
    if reference.is_empty() || reference.len() > 200 {
        return Err(Error::Invalid(format!(
            "reference must be 1-200 bytes, got {}",
            reference.len()
        )));
    }
    Ok(())
}

fn check_kind(kind: &str) -> Result<()> {
    let ok = kind.len() <= 63
        && kind.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
    if !ok {
        return Err(Error::Invalid(format!(
            "transfer kind {kind:?} must match [a-z][a-z0-9_.]{{0,62}}"
        )));
    }
    Ok(())
}

fn check_postings_shape(postings: &[(AccountId, Amount)]) -> Result<()> {
    if postings.len() < 2 {
        return Err(Error::Invalid(
            "a transfer needs at least two postings".into(),
        ));
    }
    Ok(())
}
