//! The payments load that the end-to-end fault tests drive through the real
//! `ledgerflow` processes, and the checks over what it leaves behind:
//! seeded requests (trades and withdrawals) per user, careful clients that
//! POST each with an `Idempotency-Key` until a 2xx, users funded with exactly
//! what their requests hold, and [`check_payments`]: every accepted request
//! settled exactly once, at the exchange and in the books.
//!
//! Shared by `payments_kill_loop.rs` (processes killed) and
//! `postgres_failover.rs` (the database taken away).
// Each test binary that includes this uses a different part of it.
#![allow(dead_code)]
use ledgerflow_payments::exchange::server::{
    HttpSimControls, RunningSimulator, SimServerConfig, WebhookTarget,
};
use ledgerflow_payments::exchange::signature::Scheme;
use ledgerflow_payments::exchange::sim::{Counters, SimConfig, SimControls};
use ledgerflow_payments::exchange::{OrderState, WithdrawalState};
use ledgerflow_payments::workflows::{trade, withdrawal};
use ledgerflow_payments::{Amount, UserId, ledger, users};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Scales: BTC in satoshis (8), USD in cents (2).
pub const BTC_SCALE: u32 = 8;
pub const USD_SCALE: u32 = 2;

// -------------------------------------------------------------------- rng

/// SplitMix64: small, seedable, good enough to pick moments and amounts.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[usize::try_from(self.below(items.len() as u64)).unwrap_or(0)]
    }
}

/// The webhook provider name the end-to-end tests register (Stripe-style signatures).
pub const PROVIDER: &str = "exchange";

/// The exchange simulator of the end-to-end tests: `sim`'s behaviour, its events signed with
/// `secret` and POSTed to the API at `api_addr` (`/v1/webhooks/{PROVIDER}`) as they fall due,
/// every 100 ms of wall time.
pub async fn start_simulator(
    api_addr: &str,
    secret: &str,
    sim: SimConfig,
) -> TestResult<RunningSimulator> {
    Ok(RunningSimulator::start(SimServerConfig {
        sim,
        webhook: Some(WebhookTarget {
            url: format!("http://{api_addr}/v1/webhooks/{PROVIDER}"),
            secret: secret.to_string(),
            scheme: Scheme::Stripe,
        }),
        tick: Some(Duration::from_millis(100)),
        delivery_timeout: Duration::from_secs(3),
        ..SimServerConfig::default()
    })
    .await?)
}

pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok())
}

// ---------------------------------------------------------------- requests

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Buy,
    Sell,
}

/// One request a client sends, with its exact money effects in minor units.
#[derive(Debug, Clone)]
pub enum Request {
    Trade {
        side: Side,
        /// Satoshis.
        qty: i128,
        /// Cents per BTC.
        price: i128,
    },
    Withdrawal {
        /// Satoshis.
        amount: i128,
    },
}

impl Request {
    /// Cents of notional (qty × price, exact for the amounts used).
    pub fn notional(qty: i128, price: i128) -> i128 {
        qty * price / 10i128.pow(BTC_SCALE)
    }

    /// The simulator's fee: 0.1 % of the notional, rounded toward zero at
    /// the quote scale.
    pub fn fee(qty: i128, price: i128) -> i128 {
        Self::notional(qty, price) / 1000
    }

    /// (USD, BTC) the user must have before the request: what its hold takes.
    pub fn needs(&self) -> (i128, i128) {
        match *self {
            Request::Trade {
                side: Side::Buy,
                qty,
                price,
            } => (Self::notional(qty, price) + Self::fee(qty, price), 0),
            Request::Trade {
                side: Side::Sell,
                qty,
                ..
            } => (0, qty),
            Request::Withdrawal { amount } => (0, amount),
        }
    }

    /// (USD, BTC) the user gets once it completed.
    pub fn gets(&self) -> (i128, i128) {
        match *self {
            Request::Trade {
                side: Side::Buy,
                qty,
                ..
            } => (0, qty),
            Request::Trade {
                side: Side::Sell,
                qty,
                price,
            } => (Self::notional(qty, price) - Self::fee(qty, price), 0),
            Request::Withdrawal { .. } => (0, 0),
        }
    }

    pub fn path(&self) -> &'static str {
        match self {
            Request::Trade { .. } => "/v1/trades",
            Request::Withdrawal { .. } => "/v1/withdrawals",
        }
    }

    pub fn body(&self) -> Value {
        match *self {
            Request::Trade { side, qty, price } => json!({
                "side": if side == Side::Buy { "buy" } else { "sell" },
                "base_asset": "BTC",
                "quote_asset": "USD",
                "base_amount": decimal(qty, BTC_SCALE),
                "limit_price": decimal(price, USD_SCALE),
            }),
            Request::Withdrawal { amount } => json!({
                "asset": "BTC",
                "amount": decimal(amount, BTC_SCALE),
                "address": "bc1qmt4npcrde7q9vkkfxhk23mp7s73v6uv5h06myw",
            }),
        }
    }
}

/// `units` minor units at `scale` as a decimal string ("0.01000000").
pub fn decimal(units: i128, scale: u32) -> String {
    let sign = if units < 0 { "-" } else { "" };
    let p = 10i128.pow(scale);
    let (int, frac) = (units.abs() / p, units.abs() % p);
    format!("{sign}{int}.{frac:0width$}", width = scale as usize)
}

/// A user of the run: credentials and the requests their client sends.
pub struct User {
    pub id: UserId,
    pub api_key: String,
    pub requests: Vec<Request>,
}

/// What a client learned about one request.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub user: usize,
    pub request: Request,
    pub id: Uuid,
    /// POSTs it took (retries with the same key included).
    pub attempts: u32,
}

/// Plans the requests of `users` users from the seed.
pub fn plan(
    rng: &mut Rng,
    users: usize,
    per_user_trades: usize,
    per_user_withdrawals: usize,
) -> Vec<Vec<Request>> {
    (0..users)
        .map(|_| {
            let mut reqs = Vec::new();
            for _ in 0..per_user_trades {
                reqs.push(Request::Trade {
                    side: if rng.chance(50) {
                        Side::Buy
                    } else {
                        Side::Sell
                    },
                    // 0.01, 0.02 or 0.05 BTC at 1000, 2000 or 3000 USD: the
                    // notional is a multiple of 10 USD, so the 0.1 % fee is
                    // whole cents and every expected balance is exact.
                    qty: rng.pick(&[1_000_000, 2_000_000, 5_000_000]),
                    price: rng.pick(&[100_000, 200_000, 300_000]),
                });
            }
            for _ in 0..per_user_withdrawals {
                reqs.push(Request::Withdrawal {
                    amount: rng.pick(&[100_000, 200_000, 500_000]),
                });
            }
            // Interleave trades and withdrawals.
            for i in (1..reqs.len()).rev() {
                let j = usize::try_from(rng.below(i as u64 + 1)).unwrap_or(0);
                reqs.swap(i, j);
            }
            reqs
        })
        .collect()
}

/// POSTs `request` with `key` until a 2xx, retrying the SAME request and
/// key on connection errors, timeouts, 409 and 5xx, as a careful client.
pub async fn post_until_accepted(
    client: &reqwest::Client,
    api: &str,
    api_key: &str,
    key: &str,
    request: &Request,
    deadline: Instant,
) -> TestResult<(Uuid, u32)> {
    let body = request.body();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let sent = client
            .post(format!("http://{api}{}", request.path()))
            .bearer_auth(api_key)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await;
        let retry_why = match sent {
            Ok(resp) if resp.status().is_success() => {
                let v: Value = resp.json().await?;
                let id = v["id"]
                    .as_str()
                    .ok_or_else(|| format!("no id in {v}"))?
                    .parse()?;
                return Ok((id, attempts));
            }
            Ok(resp) if resp.status().as_u16() == 409 || resp.status().is_server_error() => {
                format!("{}", resp.status())
            }
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                return Err(format!(
                    "POST {} (key {key}) refused: {status} {text}",
                    request.path()
                )
                .into());
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(format!(
                "POST {} (key {key}) never accepted after {attempts} attempts: {retry_why}",
                request.path()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Who a client is and where it sends its requests.
pub struct Client {
    /// Starts every `Idempotency-Key` (with the seed, user and request number).
    pub prefix: &'static str,
    /// The user's index.
    pub user: usize,
    /// `host:port` of the public API.
    pub api: String,
    pub api_key: String,
    /// Seeds the gaps between requests.
    pub seed: u64,
}

/// One user's client: sends its requests one after another with random
/// gaps spread over `spread`.
pub async fn run_client(
    who: Client,
    requests: Vec<Request>,
    spread: Duration,
    deadline: Instant,
) -> TestResult<Vec<Accepted>> {
    let Client {
        prefix,
        user,
        api,
        api_key,
        seed,
    } = who;
    let mut rng = Rng(seed);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let gap_ms = u64::try_from(spread.as_millis()).unwrap_or(0) / requests.len().max(1) as u64;
    let mut out = Vec::new();
    for (n, request) in requests.into_iter().enumerate() {
        tokio::time::sleep(rng.millis(0, 2 * gap_ms)).await;
        let key = format!("{prefix}-{seed:x}-u{user}-{n}");
        let (id, attempts) =
            post_until_accepted(&client, &api, &api_key, &key, &request, deadline).await?;
        out.push(Accepted {
            user,
            request,
            id,
            attempts,
        });
    }
    Ok(out)
}

/// A user funded with exactly what `requests` hold, and an API key.
pub async fn fund_user(pool: &PgPool, email: &str, requests: Vec<Request>) -> TestResult<User> {
    let (usd, btc) = requests.iter().fold((0, 0), |(u, b), r| {
        let (nu, nb) = r.needs();
        (u + nu, b + nb)
    });
    let mut tx = pool.begin().await?;
    let id = users::create_user(&mut tx, email, "Load Test").await?;
    let (_, key) = users::create_api_key(&mut tx, id, None).await?;
    for (asset, units, scale) in [("USD", usd, USD_SCALE), ("BTC", btc, BTC_SCALE)] {
        let accounts = ledger::ensure_user_accounts(&mut tx, id, &[asset]).await?;
        if units > 0 {
            ledger::deposit(
                &mut tx,
                &format!("deposit:{id}:{asset}"),
                accounts[0].1,
                Amount::parse(&decimal(units, scale), scale)?,
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(User {
        id,
        api_key: key.expose_secret().to_string(),
        requests,
    })
}

/// What the exchange saw while the accepted requests were carried out.
pub struct ExchangeCalls {
    pub trades: usize,
    pub withdrawals: usize,
    /// `POST /v1/orders` calls (retries with the same key included).
    pub place_calls: u64,
    /// `POST /v1/withdrawals` calls.
    pub withdrawal_calls: u64,
}

async fn scalar_i64(pool: &PgPool, sql: &str) -> TestResult<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

async fn sim_totals(sim_url: &str) -> TestResult<Counters> {
    let url = format!("{sim_url}admin/counters");
    Ok(reqwest::get(url).await?.error_for_status()?.json().await?)
}

/// The assertions over the payments' final state: every request accepted
/// once, its workflow completed, one order/withdrawal per request at the
/// exchange and nothing else there, one ledger transfer per settlement or
/// capture, exact balances, double entry and no drift, no hold left.
pub async fn check_payments(
    pool: &PgPool,
    controls: &HttpSimControls,
    sim_url: &str,
    seed: u64,
    users: &[User],
    accepted: &[Accepted],
) -> TestResult<ExchangeCalls> {
    let planned: usize = users.iter().map(|u| u.requests.len()).sum();
    assert_eq!(
        accepted.len(),
        planned,
        "seed {seed}: every request accepted"
    );
    let trades = accepted
        .iter()
        .filter(|a| matches!(a.request, Request::Trade { .. }))
        .count();
    let withdrawals = accepted.len() - trades;
    let mut ids = std::collections::HashSet::new();
    for a in accepted {
        assert!(
            ids.insert(a.id),
            "seed {seed}: two requests answered {}",
            a.id
        );
    }

    // One domain row per accepted request, none more (a retried POST
    // replayed, it did not create a second one).
    let rows: i64 = scalar_i64(pool, "SELECT count(*) FROM trades").await?;
    assert_eq!(rows, trades as i64, "seed {seed}: trade rows");
    let rows: i64 = scalar_i64(pool, "SELECT count(*) FROM withdrawals").await?;
    assert_eq!(rows, withdrawals as i64, "seed {seed}: withdrawal rows");

    let mut place_calls = 0;
    let mut withdrawal_calls = 0;
    for a in accepted {
        let what = format!("seed {seed}: {:?} {} (user {})", a.request, a.id, a.user);
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM workflows WHERE id = $1")
            .bind(a.id)
            .fetch_optional(pool)
            .await?;
        assert_eq!(
            state.as_deref(),
            Some("completed"),
            "{what}: workflow state"
        );
        let compensated: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM workflow_steps
             WHERE workflow_id = $1 AND status NOT IN ('completed')",
        )
        .bind(a.id)
        .fetch_one(pool)
        .await?;
        assert_eq!(compensated, 0, "{what}: steps not completed (compensated?)");
        match a.request {
            Request::Trade { qty, .. } => {
                let status: String = sqlx::query_scalar("SELECT status FROM trades WHERE id = $1")
                    .bind(a.id)
                    .fetch_one(pool)
                    .await?;
                assert_eq!(status, "settled", "{what}: trade status");
                let key = trade::order_key(a.id);
                let c = controls.counters_for(&key).await?;
                place_calls += c.place_calls;
                assert_eq!(c.orders_created, 1, "{what}: orders at the exchange");
                let order = ledgerflow_payments::exchange::Exchange::get_order_by_key(
                    &ledgerflow_payments::exchange::http::HttpExchange::new(
                        sim_url,
                        ledgerflow_payments::exchange::http::HttpConfig::default(),
                    )?,
                    &key,
                )
                .await?
                .ok_or_else(|| format!("{what}: no order at the exchange"))?;
                assert_eq!(order.state, OrderState::Filled, "{what}: order state");
                assert_eq!(
                    units(&order.filled_base.to_string(), BTC_SCALE)?,
                    qty,
                    "{what}: filled quantity"
                );
                let settlements = transfers(pool, &trade::settle_reference(a.id)).await?;
                assert_eq!(settlements, 1, "{what}: settlement transfers");
            }
            Request::Withdrawal { .. } => {
                let status: String =
                    sqlx::query_scalar("SELECT status FROM withdrawals WHERE id = $1")
                        .bind(a.id)
                        .fetch_one(pool)
                        .await?;
                assert_eq!(status, "completed", "{what}: withdrawal status");
                let key = withdrawal::submit_key(a.id);
                let c = controls.counters_for(&key).await?;
                withdrawal_calls += c.withdrawal_calls;
                assert_eq!(
                    c.withdrawals_created, 1,
                    "{what}: withdrawals at the exchange"
                );
                let at_exchange = ledgerflow_payments::exchange::Exchange::get_withdrawal_by_key(
                    &ledgerflow_payments::exchange::http::HttpExchange::new(
                        sim_url,
                        ledgerflow_payments::exchange::http::HttpConfig::default(),
                    )?,
                    &key,
                )
                .await?
                .ok_or_else(|| format!("{what}: no withdrawal at the exchange"))?;
                assert_eq!(
                    at_exchange.state,
                    WithdrawalState::Confirmed,
                    "{what}: withdrawal at the exchange"
                );
                let captures = transfers(pool, &withdrawal::capture_reference(a.id)).await?;
                assert_eq!(captures, 1, "{what}: capture transfers");
            }
        }
    }

    // Nothing at the exchange that no accepted request asked for.
    let totals = sim_totals(sim_url).await?;
    assert_eq!(
        totals.orders_created, trades as u64,
        "seed {seed}: orders at the exchange"
    );
    assert_eq!(
        totals.withdrawals_created, withdrawals as u64,
        "seed {seed}: withdrawals at the exchange"
    );

    // Exact balances: funded with exactly what the holds take, each user
    // ends with exactly what the fills give.
    for user in users {
        let (usd, btc) = user.requests.iter().fold((0, 0), |(u, b), r| {
            let (gu, gb) = r.gets();
            (u + gu, b + gb)
        });
        for (asset, expected, scale) in [("USD", usd, USD_SCALE), ("BTC", btc, BTC_SCALE)] {
            let (balance, held): (String, String) = sqlx::query_as(
                "SELECT b.balance::text, b.held::text
                   FROM accounts a JOIN account_balances b ON b.account_id = a.id
                  WHERE a.owner_user_id = $1 AND a.kind = 'user_available' AND a.asset = $2",
            )
            .bind(user.id)
            .bind(asset)
            .fetch_one(pool)
            .await?;
            assert_eq!(
                units(&balance, scale)?,
                expected,
                "seed {seed}: user {} {asset} balance {balance}, expected {}",
                user.id,
                decimal(expected, scale)
            );
            assert_eq!(
                units(&held, scale)?,
                0,
                "seed {seed}: user {} {asset} held",
                user.id
            );
        }
    }

    // The books: double entry per asset, balances match postings, no hold
    // left active, one transfer per reference.
    let mut conn = pool.acquire().await?;
    for (asset, sum) in ledger::ledger_sums(&mut conn).await? {
        assert!(
            sum.is_zero(),
            "seed {seed}: postings of {asset} sum to {sum}"
        );
    }
    let drift = ledger::balance_drift(&mut conn).await?;
    assert!(drift.is_empty(), "seed {seed}: balances drifted: {drift:?}");
    drop(conn);
    assert_eq!(
        scalar_i64(pool, "SELECT count(*) FROM holds WHERE state = 'active'").await?,
        0,
        "seed {seed}: active holds"
    );
    assert_eq!(
        scalar_i64(
            pool,
            "SELECT count(*) FROM ledger_transfers WHERE reference LIKE 'trade:%:settle'"
        )
        .await?,
        trades as i64,
        "seed {seed}: settlement transfers in all"
    );
    assert_eq!(
        scalar_i64(
            pool,
            "SELECT count(*) FROM ledger_transfers WHERE reference LIKE 'withdrawal:%:capture'"
        )
        .await?,
        withdrawals as i64,
        "seed {seed}: capture transfers in all"
    );
    Ok(ExchangeCalls {
        trades,
        withdrawals,
        place_calls,
        withdrawal_calls,
    })
}

async fn transfers(pool: &PgPool, reference: &str) -> TestResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM ledger_transfers WHERE reference = $1")
            .bind(reference)
            .fetch_one(pool)
            .await?,
    )
}

/// A decimal string ("12.3400") as minor units at `scale` (exactly).
pub fn units(s: &str, scale: u32) -> TestResult<i128> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let frac = frac.trim_end_matches('0');
    if frac.len() > scale as usize {
        return Err(format!("{s} has more than {scale} decimals").into());
    }
    let v: i128 = format!("{int}{frac:0<width$}", width = scale as usize).parse()?;
    Ok(if neg { -v } else { v })
}
