//! The payments workflows against a real database and the simulated exchange:
//! trades (happy path, saga on rejection, in-doubt placement reconciled,
//! fill timeout, duplicate fill), withdrawals (below/above the approval
//! threshold, daily limit, concurrent requests racing for one balance), and
//! the ledger summing to zero per asset after each of them.
//!
//! Steps run in-process through the engine's `WorkflowHarness` on a
//! `ManualClock`; exchange events are delivered by hand and processed by the
//! `payments.webhook` workflow, exactly as the webhook intake would.
use ledgerflow_engine::workflow_testing::WorkflowHarness;
use ledgerflow_engine::{RetryPolicy, Store, StoreConfig};
use ledgerflow_payments::exchange::IdempotencyKey;
use ledgerflow_payments::exchange::sim::Fault;
use ledgerflow_payments::ledger;
use ledgerflow_payments::notifier::SimulatedNotifier;
use ledgerflow_payments::users::AdminRole;
use ledgerflow_payments::workflows::{self, Deps, trade, webhook, withdrawal};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

mod payments_env;

use payments_env::{Env, TestResult, dec};

#[tokio::test]
async fn trade_settles_end_to_end() -> TestResult {
    let env = Env::new().await?;
    let user = env.user_with("USDT", "1000").await?;
    let id = env.start_trade(user, "buy", "0.5", "100").await?;
    env.run().await?;
    assert_eq!(env.state(id).await?, "waiting");
    // Held: notional 50 plus the maximum fee (0.1 %).
    assert_eq!(
        env.balance(user, "USDT").await?,
        (dec("1000"), dec("50.05"))
    );

    let events = env.deliver().await?;
    assert_eq!(events.len(), 1);
    assert_eq!(env.state(id).await?, "completed");
    assert_eq!(env.row_status("trades", id).await?, "settled");
    // Paid 50 + fee 0.05 (the simulator's 0.1 %); received 0.5 BTC.
    assert_eq!(env.balance(user, "USDT").await?, (dec("949.95"), dec("0")));
    assert_eq!(env.balance(user, "BTC").await?, (dec("0.5"), dec("0")));
    let key = trade::order_key(id);
    assert_eq!(env.sim.counters_for(&key).orders_created, 1);
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM ledger_transfers WHERE reference = $1",
            &trade::settle_reference(id)
        )
        .await?,
        1
    );
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM outbox WHERE key = $1",
            &id.to_string()
        )
        .await?,
        1
    );
    // The notification workflow ran and delivered once.
    let nid = format!("trade:{id}:settled");
    assert_eq!(env.notifier.delivered_count(&nid), 1);
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM notifications WHERE id = $1 AND status = 'sent'",
            &nid
        )
        .await?,
        1
    );
    env.assert_ledger_balanced().await
}

#[tokio::test]
async fn sell_trade_settles() -> TestResult {
    let env = Env::new().await?;
    let user = env.user_with("BTC", "2").await?;
    let id = env.start_trade(user, "sell", "1.5", "200").await?;
    env.run().await?;
    assert_eq!(env.balance(user, "BTC").await?, (dec("2"), dec("1.5")));
    env.deliver().await?;
    assert_eq!(env.state(id).await?, "completed");
    // 300 notional less the 0.3 fee.
    assert_eq!(env.balance(user, "BTC").await?, (dec("0.5"), dec("0")));
    assert_eq!(env.balance(user, "USDT").await?, (dec("299.7"), dec("0")));
    env.assert_ledger_balanced().await
}

#[tokio::test]
async fn rejected_order_releases_the_hold() -> TestResult {
    let env = Env::new().await?;
    let user = env.user_with("USDT", "1000").await?;
    let id = env.start_trade(user, "buy", "0.5", "100").await?;
    env.sim
        .set_fault_for(&trade::order_key(id), Fault::reject("no liquidity"));
    env.run().await?;
    assert_eq!(env.state(id).await?, "compensated");
    assert_eq!(env.row_status("trades", id).await?, "rejected");
    assert_eq!(env.balance(user, "USDT").await?, (dec("1000"), dec("0")));
    assert_eq!(
        env.sim.counters_for(&trade::order_key(id)).orders_created,
        0
    );
    let mut conn = env.db.pool.acquire().await?;
    let hold = ledger::hold(&mut conn, &trade::hold_reference(id))
        .await?
        .expect("the hold exists");
    assert_eq!(hold.state, ledger::HoldState::Released);
    env.assert_ledger_balanced().await
}

#[tokio::test]
async fn accept_then_timeout_is_reconciled_with_one_order() -> TestResult {
    let env = Env::new().await?;
    let user = env.user_with("USDT", "1000").await?;
    let id = env.start_trade(user, "buy", "0.5", "100").await?;
    let key = trade::order_key(id);
    env.sim.set_fault_for(&key, Fault::AcceptThenTimeout);
    env.run().await?;
    // Reconciled by key: the order exists, the trade waits for its fill.
    assert_eq!(env.state(id).await?, "waiting");
    let journal = env.h.journal(id).await?;
    let placed = journal
        .iter()
        .find(|s| s.step == trade::PLACE_ORDER_STEP)
        .expect("the step is journaled");
    assert_eq!(placed.status, "completed");
    env.deliver().await?;
    assert_eq!(env.state(id).await?, "completed");
    let c = env.sim.counters_for(&key);
    assert_eq!(c.place_calls, 1, "never re-sent");
    assert_eq!(c.orders_created, 1);
    assert_eq!(env.balance(user, "BTC").await?, (dec("0.5"), dec("0")));
    env.assert_ledger_balanced().await
}

/// The exchange refused the order and the answer was lost: the step goes in doubt, and the
/// reconcile look-up finds the rejection, so the trade is rejected as the answer would have
/// made it — the order is not sent again (a re-send would let a crash change the outcome).
#[tokio::test]
async fn a_lost_rejection_is_reconciled_as_the_rejection() -> TestResult {
    let env = Env::new().await?;
    let user = env.user_with("USDT", "1000").await?;
    let id = env.start_trade(user, "buy", "0.5", "100").await?;
    let key = trade::order_key(id);
    env.sim.set_fault_for(
        &key,
        Fault::RejectThenTimeout {
            reason: "no liquidity".into(),
        },
    );
    env.run().await?;
    assert_eq!(env.state(id).await?, "compensated");
    assert_eq!(env.row_status("trades", id).await?, "rejected");
    let placed = env
        .h
        .journal(id)
        .await?
        .into_iter()
        .find(|s| s.step == trade::PLACE_ORDER_STEP)
        .ok_or("the step is journaled")?;
    assert_eq!(placed.resolved_by.as_deref(), Some("reconcile"));
    let c = env.sim.counters_for(&key);
    assert_eq!(c.place_calls, 1, "never re-sent");
    assert_eq!(c.orders_created, 0);
    assert_eq!(env.balance(user, "USDT").await?, (dec("1000"), dec("0")));
    env.assert_ledger_balanced().await
}

#[tokio::test]
async fn unfilled_order_times_out_cancels_and_releases() -> TestResult {
    let env = Env::new().await?;
    let user = env.user_with("USDT", "1000").await?;
    let id = env.start_trade(user, "buy", "0.5", "100").await?;
    env.run().await?;
    assert_eq!(env.state(id).await?, "waiting");
    env.clock
        .advance(env.config.fill_timeout + Duration::from_secs(1));
    env.run().await?;
    assert_eq!(env.state(id).await?, "compensated");
    assert_eq!(env.balance(user, "USDT").await?, (dec("1000"), dec("0")));
    // Its owner reads why (the read behind `GET /v1/trades/{id}`).
    let mut conn = env.db.pool.acquire().await?;
    let seen = ledgerflow_payments::idempotency::trade(&mut conn, user, id)
        .await?
        .ok_or("the owner sees the trade")?;
    assert_eq!(seen.status, "cancelled");
    let reason = seen.error.ok_or("a cancelled trade says why")?;
    assert!(reason.contains("fill"), "{reason}");
    drop(conn);
    let status = env.sim.as_ref().counters_for(&trade::order_key(id));
    assert_eq!(status.orders_created, 1);
    // The exchange's (late) fill never comes: the order is cancelled.
    env.deliver().await?;
    assert_eq!(env.balance(user, "BTC").await?, (dec("0"), dec("0")));
    env.assert_ledger_balanced().await
}

#[tokio::test]
async fn duplicate_fill_is_applied_once() -> TestResult {
    let env = Env::new().await?;
    let user = env.user_with("USDT", "1000").await?;
    let id = env.start_trade(user, "buy", "0.5", "100").await?;
    env.sim
        .set_fault_for(&trade::order_key(id), Fault::DuplicateFill);
    env.run().await?;
    let events = env.deliver().await?;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].id, events[1].id);
    assert_eq!(env.state(id).await?, "completed");
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM signals WHERE dedupe_key = $1",
            &events[0].id
        )
        .await?,
        1
    );
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM ledger_transfers WHERE reference = $1",
            &trade::settle_reference(id)
        )
        .await?,
        1
    );
    assert_eq!(env.balance(user, "USDT").await?, (dec("949.95"), dec("0")));
    assert_eq!(env.balance(user, "BTC").await?, (dec("0.5"), dec("0")));
    env.assert_ledger_balanced().await
}

#[tokio::test]
async fn insufficient_funds_fails_the_trade_without_touching_money() -> TestResult {
    let env = Env::new().await?;
    let user = env.user_with("USDT", "10").await?;
    let id = env.start_trade(user, "buy", "0.5", "100").await?;
    env.run().await?;
    assert_eq!(env.state(id).await?, "failed");
    assert_eq!(env.row_status("trades", id).await?, "rejected");
    assert_eq!(env.balance(user, "USDT").await?, (dec("10"), dec("0")));
    assert_eq!(env.sim.counters_for(&trade::order_key(id)).place_calls, 0);
    env.assert_ledger_balanced().await
}

#[tokio::test]
async fn small_withdrawal_completes_end_to_end() -> TestResult {
    let env = Env::new().await?;
    let user = env.user_with("BTC", "2").await?;
    let id = env.start_withdrawal(user, "0.5", None).await?;
    env.run().await?;
    assert_eq!(env.state(id).await?, "waiting");
    assert_eq!(env.row_status("withdrawals", id).await?, "submitted");
    assert_eq!(env.balance(user, "BTC").await?, (dec("2"), dec("0.5")));
    env.deliver().await?;
    assert_eq!(env.state(id).await?, "completed");
    assert_eq!(env.row_status("withdrawals", id).await?, "completed");
    assert_eq!(env.balance(user, "BTC").await?, (dec("1.5"), dec("0")));
    assert_eq!(
        env.sim
            .counters_for(&withdrawal::submit_key(id))
            .withdrawals_created,
        1
    );
    assert_eq!(
        env.notifier
            .delivered_count(&format!("withdrawal:{id}:completed")),
        1
    );
    env.assert_ledger_balanced().await
}

#[tokio::test]
async fn large_withdrawal_waits_for_a_second_admin() -> TestResult {
    let env = Env::new().await?;
    let user = env.user_with("BTC", "5").await?;
    let filer = env.admin("filer", AdminRole::Approver).await?;
    let viewer = env.admin("viewer", AdminRole::Viewer).await?;
    let approver = env.admin("approver", AdminRole::Approver).await?;
    let id = env
        .start_withdrawal(user, "1.5", Some(json!(filer.id)))
        .await?;
    env.run().await?;
    assert_eq!(env.state(id).await?, "waiting");
    assert_eq!(
        env.row_status("withdrawals", id).await?,
        "awaiting_approval"
    );
    assert_eq!(
        env.sim
            .counters_for(&withdrawal::submit_key(id))
            .withdrawal_calls,
        0
    );

    let store = env.h.store().clone();
    for (who, why) in [(&filer, "own request"), (&viewer, "not an approver")] {
        let mut tx = env.db.pool.begin().await?;
        let refused = withdrawal::approve_in(&mut tx, &store, who, id, "looks fine").await;
        assert!(
            matches!(refused, Err(ledgerflow_payments::Error::Forbidden(_))),
            "{why}: {refused:?}"
        );
        tx.rollback().await?;
    }
    let mut tx = env.db.pool.begin().await?;
    let sent = withdrawal::approve_in(&mut tx, &store, &approver, id, "verified by phone").await?;
    assert!(sent.is_new());
    tx.commit().await?;
    env.run().await?;
    assert_eq!(env.row_status("withdrawals", id).await?, "submitted");
    env.deliver().await?;
    assert_eq!(env.state(id).await?, "completed");
    assert_eq!(env.balance(user, "BTC").await?, (dec("3.5"), dec("0")));
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM audit_log WHERE action = 'withdrawal.approve' AND target_id = $1",
            &id.to_string()
        )
        .await?,
        1
    );
    env.assert_ledger_balanced().await
}

#[tokio::test]
async fn a_rejected_large_withdrawal_releases_its_hold_and_keeps_the_reason() -> TestResult {
    let env = Env::new().await?;
    let user = env.user_with("BTC", "5").await?;
    let approver = env.admin("approver", AdminRole::Approver).await?;
    let id = env.start_withdrawal(user, "1.5", None).await?;
    env.run().await?;
    assert_eq!(env.state(id).await?, "waiting");
    assert_eq!(env.balance(user, "BTC").await?, (dec("5"), dec("1.5")));

    let store = env.h.store().clone();
    let mut tx = env.db.pool.begin().await?;
    ledgerflow_payments::approvals::reject_in(
        &mut tx,
        &store,
        &approver,
        id,
        "address on a blocklist",
    )
    .await?;
    tx.commit().await?;
    env.run().await?;

    // The saga unwound (the hold released), so the workflow ends compensated.
    assert_eq!(env.state(id).await?, "compensated");
    assert_eq!(env.row_status("withdrawals", id).await?, "rejected");
    let error: String = sqlx::query_scalar("SELECT error FROM withdrawals WHERE id = $1")
        .bind(id)
        .fetch_one(&env.db.pool)
        .await?;
    assert!(error.contains("address on a blocklist"), "{error}");
    // Nothing went to the exchange, and the hold is gone: the balance is whole again.
    assert_eq!(
        env.sim
            .counters_for(&withdrawal::submit_key(id))
            .withdrawal_calls,
        0
    );
    assert_eq!(env.balance(user, "BTC").await?, (dec("5"), dec("0")));
    env.assert_ledger_balanced().await
}

#[tokio::test]
async fn daily_limit_refuses_the_excess() -> TestResult {
    let mut config = Env::default_config();
    config
        .withdrawal_policy
        .entry("BTC".to_string())
        .or_default()
        .daily_limit = Some(dec("1"));
    let env = Env::with_config(config).await?;
    let user = env.user_with("BTC", "5").await?;
    let first = env.start_withdrawal(user, "0.6", None).await?;
    env.run().await?;
    let second = env.start_withdrawal(user, "0.6", None).await?;
    env.run().await?;
    assert_eq!(env.state(second).await?, "failed");
    assert_eq!(env.row_status("withdrawals", second).await?, "rejected");
    env.deliver().await?;
    assert_eq!(env.state(first).await?, "completed");
    assert_eq!(env.balance(user, "BTC").await?, (dec("4.4"), dec("0")));
    env.assert_ledger_balanced().await
}

#[tokio::test]
async fn concurrent_withdrawals_never_overdraw() -> TestResult {
    let env = Env::new().await?;
    let user = env.user_with("BTC", "1").await?;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(env.start_withdrawal(user, "0.3", None).await?);
    }
    // Four workers race over the step jobs.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let h = env.h.clone();
        tasks.push(tokio::spawn(async move {
            let mut idle = 0;
            while idle < 3 {
                match h.run_next_step().await {
                    Ok(Some(_)) => idle = 0,
                    Ok(None) => {
                        idle += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    env.run().await?;
    env.deliver().await?;
    let mut completed = 0;
    let mut failed = 0;
    for id in &ids {
        match env.state(*id).await?.as_str() {
            "completed" => completed += 1,
            "failed" => failed += 1,
            other => panic!("withdrawal {id} ended {other}"),
        }
    }
    assert_eq!((completed, failed), (3, 2));
    assert_eq!(env.balance(user, "BTC").await?, (dec("0.1"), dec("0")));
    env.assert_ledger_balanced().await
}

#[tokio::test]
async fn redelivered_webhook_event_is_a_duplicate_signal() -> TestResult {
    let env = Env::new().await?;
    let user = env.user_with("USDT", "1000").await?;
    let id = env.start_trade(user, "buy", "0.1", "100").await?;
    env.run().await?;
    let events = env.sim.deliver_pending();
    let event = events.first().expect("a fill");
    assert_eq!(
        event.idempotency_key,
        IdempotencyKey::for_step(id, "place_order")
    );
    let store = env.h.store().clone();
    let mut tx = env.db.pool.begin().await?;
    let first = webhook::signal_event_in(&mut tx, &store, event).await?;
    let again = webhook::signal_event_in(&mut tx, &store, event).await?;
    tx.commit().await?;
    assert!(first.is_new());
    assert!(!again.is_new());
    env.run().await?;
    assert_eq!(env.state(id).await?, "completed");
    env.assert_ledger_balanced().await
}

// ------------------------------------------------------------ kill -9 test
//
// The crash test re-runs this test binary with `LF_PAY_CHILD_DB` set, which
// turns `pay_child_worker` into a worker process. Both processes talk to one
// simulated exchange over HTTP, so the exchange outlives the child.

const CHILD_DB: &str = "LF_PAY_CHILD_DB";
const CHILD_SIM: &str = "LF_PAY_CHILD_SIM";

/// An exchange that never returns from a `place_order` that succeeded: the
/// child is killed while the step holds the answer, before its checkpoint.
struct HangAfterPlace(ledgerflow_payments::exchange::http::HttpExchange);

#[async_trait::async_trait]
impl ledgerflow_payments::exchange::Exchange for HangAfterPlace {
    async fn place_order(
        &self,
        order: &ledgerflow_payments::exchange::OrderRequest,
    ) -> ledgerflow_payments::exchange::Result<ledgerflow_payments::exchange::OrderAck> {
        let ack = self.0.place_order(order).await?;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(ack)
    }
    async fn cancel_order(
        &self,
        key: &IdempotencyKey,
    ) -> ledgerflow_payments::exchange::Result<ledgerflow_payments::exchange::OrderStatus> {
        self.0.cancel_order(key).await
    }
    async fn get_order_by_key(
        &self,
        key: &IdempotencyKey,
    ) -> ledgerflow_payments::exchange::Result<Option<ledgerflow_payments::exchange::OrderStatus>>
    {
        self.0.get_order_by_key(key).await
    }
    async fn submit_withdrawal(
        &self,
        w: &ledgerflow_payments::exchange::WithdrawalRequest,
    ) -> ledgerflow_payments::exchange::Result<ledgerflow_payments::exchange::WithdrawalAck> {
        self.0.submit_withdrawal(w).await
    }
    async fn get_withdrawal_by_key(
        &self,
        key: &IdempotencyKey,
    ) -> ledgerflow_payments::exchange::Result<
        Option<ledgerflow_payments::exchange::WithdrawalStatus>,
    > {
        self.0.get_withdrawal_by_key(key).await
    }
}

fn real_clock_store(pool: &sqlx::PgPool) -> Store {
    Store::with_config(
        pool.clone(),
        StoreConfig {
            lease_ttl: Duration::from_secs(1),
            notify: false,
            retry: RetryPolicy {
                base: Duration::from_millis(100),
                max: Duration::from_secs(1),
                jitter: 0.0,
            },
        },
    )
}

/// Not a test of its own: the body of the child worker. Returns at once
/// unless `LF_PAY_CHILD_DB` is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pay_child_worker() -> TestResult {
    let (Ok(url), Ok(sim)) = (std::env::var(CHILD_DB), std::env::var(CHILD_SIM)) else {
        return Ok(());
    };
    let pool = sqlx::PgPool::connect(&url).await?;
    let http = ledgerflow_payments::exchange::http::HttpExchange::new(&sim, Default::default())?;
    let registry = workflows::registry(Deps {
        exchange: Arc::new(HangAfterPlace(http)),
        notifier: Arc::new(SimulatedNotifier::new()),
        config: Env::default_config(),
    })?;
    let h = WorkflowHarness::new(real_clock_store(&pool), registry);
    h.run_until_idle().await?;
    // Only reached if nothing hung: stay alive until killed.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_between_order_and_checkpoint_places_one_order_and_settles_once() -> TestResult {
    use ledgerflow_payments::exchange::server::{
        HttpSimControls, RunningSimulator, SimServerConfig,
    };
    use ledgerflow_payments::exchange::sim::SimControls;
    let sim = RunningSimulator::start(SimServerConfig::default()).await?;
    let controls = HttpSimControls::new(&sim.base_url(), None)?;
    let env = Env::new().await?;
    let user = env.user_with("USDT", "1000").await?;
    let store = real_clock_store(&env.db.pool);
    let http = ledgerflow_payments::exchange::http::HttpExchange::new(
        &sim.base_url(),
        Default::default(),
    )?;
    let registry = workflows::registry(Deps {
        exchange: Arc::new(http),
        notifier: Arc::new(SimulatedNotifier::new()),
        config: Env::default_config(),
    })?;
    let h = WorkflowHarness::new(store.clone(), registry);
    let id = h
        .start(
            trade::KIND,
            &json!({ "user_id": user, "side": "buy", "base": "BTC", "quote": "USDT",
                     "base_amount": "0.5", "limit_price": "100" }),
        )
        .await?;
    let key = trade::order_key(id);

    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            "pay_child_worker",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB, &env.db.url)
        .env(CHILD_SIM, sim.base_url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let placed = loop {
        if controls.counters_for(&key).await?.orders_created == 1 {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    child.kill()?; // SIGKILL: the order exists, its step never checkpointed
    child.wait()?;
    assert!(placed, "the child placed the order");
    let calling: String = sqlx::query_scalar(
        "SELECT status FROM workflow_steps WHERE workflow_id = $1 AND step = 'place_order'",
    )
    .bind(id)
    .fetch_one(&env.db.pool)
    .await?;
    assert_eq!(calling, "calling", "only the call's intent was committed");
    assert_eq!(env.row_status("trades", id).await?, "held");

    // The survivor: rescue the dead worker's lease, then run on.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.job_rescue_expired(100).await? == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease was rescued"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.run_until_idle().await?;
    assert_eq!(h.state(id).await?.state, "waiting");
    let events = controls.advance(Duration::from_millis(1)).await?;
    assert_eq!(events.len(), 1);
    for event in &events {
        h.start(webhook::KIND, &json!({ "event": event })).await?;
    }
    h.run_until_idle().await?;
    assert_eq!(h.state(id).await?.state, "completed");

    let c = controls.counters_for(&key).await?;
    assert_eq!((c.place_calls, c.orders_created), (1, 1), "never re-sent");
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM ledger_transfers WHERE reference = $1",
            &trade::settle_reference(id)
        )
        .await?,
        1
    );
    assert_eq!(env.balance(user, "USDT").await?, (dec("949.95"), dec("0")));
    assert_eq!(env.balance(user, "BTC").await?, (dec("0.5"), dec("0")));
    env.assert_ledger_balanced().await?;
    sim.stop().await?;
    Ok(())
}
