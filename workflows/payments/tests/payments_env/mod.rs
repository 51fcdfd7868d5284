//! The in-process payments environment the workflow tests share: a database, a manual clock,
//! the simulated exchange and notifier, and the engine's `WorkflowHarness`.
#![allow(dead_code)]
use chrono::{DateTime, Utc};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::workflow_testing::WorkflowHarness;
use ledgerflow_engine::{ManualClock, WorkflowId};
use ledgerflow_payments::exchange::Event;
use ledgerflow_payments::exchange::sim::{SimConfig, SimulatedExchange};
use ledgerflow_payments::ledger;
use ledgerflow_payments::notifier::SimulatedNotifier;
use ledgerflow_payments::policy::AssetPolicy;
use ledgerflow_payments::users::{self, Admin, AdminRole};
use ledgerflow_payments::workflows::{self, Deps, WorkflowsConfig, trade, webhook, withdrawal};
use ledgerflow_payments::{Amount, UserId};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).expect("a decimal literal")
}

/// 2030-01-01T00:00:00Z.
pub fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).expect("a valid timestamp")
}

pub struct Env {
    pub db: TestDb,
    pub clock: ManualClock,
    pub sim: Arc<SimulatedExchange>,
    pub notifier: Arc<SimulatedNotifier>,
    pub h: WorkflowHarness,
    pub config: WorkflowsConfig,
}

impl Env {
    pub async fn new() -> TestResult<Self> {
        Self::with_config(Self::default_config()).await
    }

    pub fn default_config() -> WorkflowsConfig {
        WorkflowsConfig {
            fill_timeout: Duration::from_secs(600),
            withdrawal_policy: BTreeMap::from([(
                "BTC".to_string(),
                AssetPolicy {
                    approval_threshold: Some(dec("1")),
                    second_approval_threshold: None,
                    daily_limit: Some(dec("10")),
                },
            )]),
            ..WorkflowsConfig::default()
        }
    }

    pub async fn with_config(config: WorkflowsConfig) -> TestResult<Self> {
        let db = TestDb::with_pool_size(24).await?;
        let clock = ManualClock::new(t0());
        let store = ledgerflow_engine::testing::manual_store(&db.pool, &clock);
        let sim = Arc::new(SimulatedExchange::new(SimConfig::default()));
        let notifier = Arc::new(SimulatedNotifier::new());
        let registry = workflows::registry(Deps {
            exchange: sim.clone(),
            notifier: notifier.clone(),
            config: config.clone(),
        })?;
        let h = WorkflowHarness::new(store, registry);
        Ok(Env {
            db,
            clock,
            sim,
            notifier,
            h,
            config,
        })
    }

    /// A user with `amount` of `asset` deposited.
    pub async fn user_with(&self, asset: &str, amount: &str) -> TestResult<UserId> {
        let mut conn = self.db.pool.acquire().await?;
        let email = format!("u{}@example.com", uuid::Uuid::now_v7().simple());
        let user = users::create_user(&mut conn, &email, "Test User").await?;
        let accounts = ledger::ensure_user_accounts(&mut conn, user, &[asset]).await?;
        let scale = ledger::asset(&mut conn, asset)
            .await?
            .expect("a seeded asset")
            .scale;
        ledger::deposit(
            &mut conn,
            &format!("deposit:test:{user}:{asset}"),
            accounts[0].1,
            Amount::parse(amount, scale)?,
        )
        .await?;
        Ok(user)
    }

    /// `(balance, held)` of the user's `asset` account (zeros if none).
    pub async fn balance(&self, user: UserId, asset: &str) -> TestResult<(Decimal, Decimal)> {
        let mut conn = self.db.pool.acquire().await?;
        let b = ledger::balances(&mut conn, user).await?;
        Ok(b.iter()
            .find(|b| b.asset == asset)
            .map(|b| (b.balance.normalize(), b.held.normalize()))
            .unwrap_or_default())
    }

    pub async fn run(&self) -> TestResult {
        self.h.run_until_idle().await?;
        Ok(())
    }

    /// Delivers the exchange's due events through the webhook workflow,
    /// then runs everything that woke up. Returns the events.
    pub async fn deliver(&self) -> TestResult<Vec<Event>> {
        let events = self.sim.deliver_pending();
        for event in &events {
            self.h
                .start(webhook::KIND, &json!({ "event": event }))
                .await?;
        }
        self.run().await?;
        Ok(events)
    }

    pub async fn state(&self, id: WorkflowId) -> TestResult<String> {
        Ok(self.h.state(id).await?.state)
    }

    pub async fn scalar_i64(&self, sql: &str, bind: &str) -> TestResult<i64> {
        Ok(sqlx::query_scalar(sql)
            .bind(bind)
            .fetch_one(&self.db.pool)
            .await?)
    }

    pub async fn row_status(&self, table: &str, id: WorkflowId) -> TestResult<String> {
        let sql = match table {
            "trades" => "SELECT status FROM trades WHERE id = $1",
            _ => "SELECT status FROM withdrawals WHERE id = $1",
        };
        Ok(sqlx::query_scalar(sql)
            .bind(id)
            .fetch_one(&self.db.pool)
            .await?)
    }

    /// Every asset's postings sum to zero, and no balance drifted.
    pub async fn assert_ledger_balanced(&self) -> TestResult {
        let mut conn = self.db.pool.acquire().await?;
        for (asset, sum) in ledger::ledger_sums(&mut conn).await? {
            assert_eq!(sum, Decimal::ZERO, "postings of {asset} sum to {sum}");
        }
        assert!(ledger::balance_drift(&mut conn).await?.is_empty());
        Ok(())
    }

    pub async fn start_trade(
        &self,
        user: UserId,
        side: &str,
        amount: &str,
        price: &str,
    ) -> TestResult<WorkflowId> {
        Ok(self
            .h
            .start(
                trade::KIND,
                &json!({ "user_id": user, "side": side, "base": "BTC", "quote": "USDT",
                         "base_amount": amount, "limit_price": price }),
            )
            .await?)
    }

    pub async fn start_withdrawal(
        &self,
        user: UserId,
        amount: &str,
        requested_by: Option<Value>,
    ) -> TestResult<WorkflowId> {
        Ok(self
            .h
            .start(
                withdrawal::KIND,
                &json!({ "user_id": user, "asset": "BTC", "amount": amount,
                         "address": "bc1q2rv93cyctmx87czp32hse3dttpl59sjhs3fd6g", "requested_by": requested_by }),
            )
            .await?)
    }

    pub async fn admin(&self, name: &str, role: AdminRole) -> TestResult<Admin> {
        let mut conn = self.db.pool.acquire().await?;
        let (id, _) = users::create_admin(&mut conn, name, role).await?;
        Ok(Admin {
            id,
            name: name.to_string(),
            role,
        })
    }
}
