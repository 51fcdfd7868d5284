//! The withdrawal policy and four-eyes approvals, with the real withdrawal
//! workflow against a real database and the simulated exchange: one
//! approver between the thresholds, two distinct approvers above the second
//! one, the same approver twice refused, an approver linked to the user
//! refused, and an admin's audited override taking effect for the next
//! withdrawal.
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::workflow_testing::WorkflowHarness;
use ledgerflow_engine::{Store, StoreConfig, WorkflowId};
use ledgerflow_payments::exchange::sim::{SimConfig, SimulatedExchange};
use ledgerflow_payments::ledger;
use ledgerflow_payments::notifier::SimulatedNotifier;
use ledgerflow_payments::policy::{self, AssetPolicy, Policy};
use ledgerflow_payments::users::{self, Admin, AdminRole};
use ledgerflow_payments::workflows::withdrawal::{self, Approval};
use ledgerflow_payments::workflows::{self, Deps, WorkflowsConfig, webhook};
use ledgerflow_payments::{Amount, Error, UserId, access};
use rust_decimal::Decimal;
use serde_json::json;
use std::str::FromStr;
use std::sync::Arc;

type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).expect("a decimal literal")
}

/// BTC: one approver above 1, two above 2, 10 a day.
fn btc_policy() -> Policy {
    Policy::from([(
        "BTC".to_string(),
        AssetPolicy {
            approval_threshold: Some(dec("1")),
            second_approval_threshold: Some(dec("2")),
            daily_limit: Some(dec("10")),
        },
    )])
}

struct Env {
    db: TestDb,
    sim: Arc<SimulatedExchange>,
    h: WorkflowHarness,
    store: Store,
    configured: Policy,
}

impl Env {
    async fn new(configured: Policy) -> TestResult<Self> {
        let db = TestDb::new().await?;
        let store = Store::with_config(
            db.pool.clone(),
            StoreConfig {
                notify: false,
                ..StoreConfig::default()
            },
        );
        let sim = Arc::new(SimulatedExchange::new(SimConfig::default()));
        let registry = workflows::registry(Deps {
            exchange: sim.clone(),
            notifier: Arc::new(SimulatedNotifier::new()),
            config: WorkflowsConfig {
                withdrawal_policy: configured.clone(),
                ..WorkflowsConfig::default()
            },
        })?;
        Ok(Env {
            h: WorkflowHarness::new(store.clone(), registry),
            db,
            sim,
            store,
            configured,
        })
    }

    async fn user_with_btc(&self, email: &str, amount: &str) -> TestResult<UserId> {
        let mut conn = self.db.pool.acquire().await?;
        let user = users::create_user(&mut conn, email, "Test User").await?;
        let accounts = ledger::ensure_user_accounts(&mut conn, user, &["BTC"]).await?;
        ledger::deposit(
            &mut conn,
            &format!("deposit:test:{user}"),
            accounts[0].1,
            Amount::parse(amount, 8)?,
        )
        .await?;
        Ok(user)
    }

    async fn admin(&self, name: &str, role: AdminRole) -> TestResult<Admin> {
        let mut conn = self.db.pool.acquire().await?;
        let (id, _) = users::create_admin(&mut conn, name, role).await?;
        Ok(Admin {
            id,
            name: name.to_string(),
            role,
        })
    }

    async fn withdraw(&self, user: UserId, amount: &str) -> TestResult<WorkflowId> {
        let id = self
            .h
            .start(
                withdrawal::KIND,
                &json!({ "user_id": user, "asset": "BTC", "amount": amount,
                         "address": "bc1qexampleaddress" }),
            )
            .await?;
        self.h.run_until_idle().await?;
        Ok(id)
    }

    async fn approve(&self, who: &Admin, id: WorkflowId) -> ledgerflow_payments::Result<Approval> {
        let mut tx = self.db.pool.begin().await?;
        let done = withdrawal::approve_in(&mut tx, &self.store, who, id, "checked").await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Delivers the exchange's events and runs what woke up.
    async fn deliver(&self) -> TestResult {
        for event in self.sim.deliver_pending() {
            self.h
                .start(webhook::KIND, &json!({ "event": event }))
                .await?;
        }
        self.h.run_until_idle().await?;
        Ok(())
    }

    async fn status(&self, id: WorkflowId) -> TestResult<(String, String, i16)> {
        let (status, required): (String, i16) =
            sqlx::query_as("SELECT status, approvals_required FROM withdrawals WHERE id = $1")
                .bind(id)
                .fetch_one(&self.db.pool)
                .await?;
        Ok((self.h.state(id).await?.state, status, required))
    }

    async fn count(&self, sql: &str, id: WorkflowId) -> TestResult<i64> {
        Ok(sqlx::query_scalar(sql)
            .bind(id.to_string())
            .fetch_one(&self.db.pool)
            .await?)
    }

    fn submits(&self, id: WorkflowId) -> u64 {
        self.sim
            .counters_for(&withdrawal::submit_key(id))
            .withdrawal_calls
    }
}

#[tokio::test]
async fn between_the_thresholds_one_approver_is_enough() -> TestResult {
    let env = Env::new(btc_policy()).await?;
    let user = env.user_with_btc("one@example.com", "5").await?;
    let anna = env.admin("anna", AdminRole::Approver).await?;
    let small = env.withdraw(user, "1").await?;
    assert_eq!(
        env.status(small).await?.1,
        "submitted",
        "at the threshold: no approval"
    );
    let id = env.withdraw(user, "1.5").await?;
    assert_eq!(
        env.status(id).await?,
        ("waiting".into(), "awaiting_approval".into(), 1)
    );
    assert_eq!(env.submits(id), 0);
    assert!(matches!(env.approve(&anna, id).await?, Approval::Approved(ref s) if s.is_new()));
    env.h.run_until_idle().await?;
    assert_eq!(env.status(id).await?.1, "submitted");
    Ok(())
}

#[tokio::test]
async fn above_the_second_threshold_two_distinct_approvers_are_needed() -> TestResult {
    let env = Env::new(btc_policy()).await?;
    let user = env.user_with_btc("two@example.com", "5").await?;
    let anna = env.admin("anna", AdminRole::Approver).await?;
    let abel = env.admin("abel", AdminRole::Approver).await?;
    let id = env.withdraw(user, "2.5").await?;
    assert_eq!(
        env.status(id).await?,
        ("waiting".into(), "awaiting_approval".into(), 2)
    );

    // The first approval is recorded; the workflow keeps waiting.
    let first = env.approve(&anna, id).await?;
    assert_eq!(
        first,
        Approval::Recorded {
            given: 1,
            required: 2
        }
    );
    env.h.run_until_idle().await?;
    assert_eq!(
        env.status(id).await?,
        ("waiting".into(), "awaiting_approval".into(), 2)
    );
    assert_eq!(env.submits(id), 0);

    // The same admin approving again is refused and writes nothing.
    let again = env.approve(&anna, id).await;
    assert!(matches!(again, Err(Error::FourEyes(_))), "{again:?}");
    let audits = "SELECT count(*) FROM audit_log WHERE action = 'withdrawal.approve' \
                  AND target_id = $1";
    assert_eq!(env.count(audits, id).await?, 1);

    // A second, different approver completes the approval.
    let second = env.approve(&abel, id).await?;
    assert!(
        matches!(second, Approval::Approved(ref s) if s.is_new()),
        "{second:?}"
    );
    assert_eq!(env.count(audits, id).await?, 2);
    let approvers: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT admin_id FROM withdrawal_approvals WHERE withdrawal_id = $1 ORDER BY approved_at",
    )
    .bind(id)
    .fetch_all(&env.db.pool)
    .await?;
    assert_eq!(approvers, vec![anna.id.0, abel.id.0]);
    env.h.run_until_idle().await?;
    assert_eq!(env.status(id).await?.1, "submitted");
    env.deliver().await?;
    assert_eq!(env.status(id).await?.0, "completed");
    assert_eq!(env.submits(id), 1);
    Ok(())
}

#[tokio::test]
async fn an_approver_linked_to_the_users_identity_is_refused() -> TestResult {
    let env = Env::new(btc_policy()).await?;
    let user = env.user_with_btc("carol@example.com", "5").await?;
    // Carol is also an approver: her admin identity is linked to her user.
    let mut tx = env.db.pool.begin().await?;
    let carol = access::admin_create_in(
        &mut tx,
        &access::cli_actor(),
        "carol",
        AdminRole::Approver,
        Some("carol@example.com"),
        "hired",
    )
    .await?;
    tx.commit().await?;
    let carol = Admin {
        id: carol.admin.id,
        name: carol.admin.name,
        role: AdminRole::Approver,
    };
    let anna = env.admin("anna", AdminRole::Approver).await?;
    let id = env.withdraw(user, "1.5").await?;
    let refused = env.approve(&carol, id).await;
    assert!(matches!(refused, Err(Error::FourEyes(_))), "{refused:?}");
    let audits = "SELECT count(*) FROM audit_log WHERE action = 'withdrawal.approve' \
                  AND target_id = $1";
    assert_eq!(env.count(audits, id).await?, 0);
    assert_eq!(env.status(id).await?.1, "awaiting_approval");
    // Someone else may approve it.
    assert!(env.approve(&anna, id).await?.is_new());
    env.h.run_until_idle().await?;
    assert_eq!(env.status(id).await?.1, "submitted");
    Ok(())
}

#[tokio::test]
async fn an_admin_override_applies_to_the_next_withdrawal_and_is_audited() -> TestResult {
    // Nothing configured: no approval at all.
    let env = Env::new(Policy::new()).await?;
    let user = env.user_with_btc("dave@example.com", "5").await?;
    let before = env.withdraw(user, "1.5").await?;
    assert_eq!(env.status(before).await?.1, "submitted");

    let sam = env.admin("sam", AdminRole::Security).await?;
    let mut tx = env.db.pool.begin().await?;
    let new = AssetPolicy {
        approval_threshold: Some(dec("1")),
        second_approval_threshold: None,
        daily_limit: Some(dec("3")),
    };
    let audit_id = policy::set_in(&mut tx, &env.configured, &sam, "BTC", &new, "too loose").await?;
    tx.commit().await?;
    let (reason, details): (String, serde_json::Value) =
        sqlx::query_as("SELECT reason, details FROM audit_log WHERE id = $1")
            .bind(audit_id)
            .fetch_one(&env.db.pool)
            .await?;
    assert_eq!(reason, "too loose");
    assert_eq!(details["before_source"], "none");
    assert_eq!(details["after"]["approval_threshold"], "1");
    assert_eq!(details["after"]["daily_limit"], "3");

    let after = env.withdraw(user, "1.5").await?;
    assert_eq!(env.status(after).await?.1, "awaiting_approval");
    // The daily limit counts the first withdrawal: 1.5 + 1.5 + 0.5 > 3.
    let third = env.withdraw(user, "0.5").await?;
    assert_eq!(env.status(third).await?.1, "rejected");

    // Invalid overrides are refused and write nothing.
    let mut tx = env.db.pool.begin().await?;
    for bad in [
        AssetPolicy {
            approval_threshold: Some(dec("2")),
            second_approval_threshold: Some(dec("1")),
            daily_limit: None,
        },
        AssetPolicy {
            approval_threshold: Some(dec("0.000000001")), // finer than BTC's scale
            second_approval_threshold: None,
            daily_limit: None,
        },
    ] {
        let refused = policy::set_in(&mut tx, &env.configured, &sam, "BTC", &bad, "x").await;
        assert!(refused.is_err(), "{bad:?}");
    }
    let unknown = policy::set_in(&mut tx, &env.configured, &sam, "XYZ", &new, "x").await;
    assert!(
        matches!(unknown, Err(Error::UnknownAsset(_))),
        "{unknown:?}"
    );
    tx.rollback().await?;
    let mut conn = env.db.pool.acquire().await?;
    let now = policy::effective_in(&mut conn, &env.configured, "BTC").await?;
    assert_eq!((now.policy, now.source), (new, policy::Source::Admin));
    Ok(())
}
