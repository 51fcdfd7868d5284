//! The exchange's request budget, end to end: trades pushed through the HTTP exchange
//! simulator (which answers 429 beyond its budget, as a real exchange does) faster than the
//! budget allows, by a real runner with the payments workflows. The shared rate limit keeps
//! every call within the budget — not one 429 — while most of the budget is used.
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{Store, StoreConfig, WorkflowRuntime};
use ledgerflow_payments::exchange::budget::RequestBudget;
use ledgerflow_payments::exchange::http::HttpExchange;
use ledgerflow_payments::exchange::server::{RunningSimulator, SimServerConfig};
use ledgerflow_payments::exchange::sim::{Counters, SimConfig};
use ledgerflow_payments::money::Amount;
use ledgerflow_payments::notifier::SimulatedNotifier;
use ledgerflow_payments::workflows::{self, Deps, WorkflowsConfig, trade};
use ledgerflow_payments::{ledger, users};
use ledgerflow_workers::runner::{QueueConfig, Registry, Runner, RunnerConfig};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// What one trade's exchange call costs: the look-up before placing, and the order.
const TRADE_WEIGHT: u64 = 3;

async fn counters(base: &str) -> Result<Counters, Box<dyn std::error::Error + Send + Sync>> {
    Ok(
        reqwest::get(format!("{}/admin/counters", base.trim_end_matches('/')))
            .await?
            .json()
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trades_faster_than_the_budget_get_no_429_and_most_of_the_budget() -> TestResult {
    let budget = RequestBudget {
        weight: 300,
        window: Duration::from_secs(10),
    };
    let db = TestDb::with_pool_size(40).await?;
    let sim = RunningSimulator::start(SimServerConfig {
        sim: SimConfig {
            budget: Some(budget),
            ..SimConfig::default()
        },
        ..SimServerConfig::default()
    })
    .await?;
    let base = sim.base_url();
    let config = WorkflowsConfig::default();
    ledgerflow_engine::flow::limits::declare(
        &db.pool,
        &workflows::flow_limits(&config, Some(budget), None),
    )
    .await?;
    let registry = workflows::registry(Deps {
        exchange: Arc::new(HttpExchange::new(&base, Default::default())?),
        notifier: Arc::new(SimulatedNotifier::new()),
        config,
    })?;
    let store = Store::with_config(db.pool.clone(), StoreConfig::default());
    let runtime = WorkflowRuntime::new(store.clone(), registry);

    // One user, funded for every trade; twice as many trades as the whole run can place.
    let mut conn = db.pool.acquire().await?;
    let user = users::create_user(&mut conn, "budget@example.com", "Budget").await?;
    let accounts = ledger::ensure_user_accounts(&mut conn, user, &["USDT"]).await?;
    let scale = ledger::asset(&mut conn, "USDT")
        .await?
        .map_or(2, |a| a.scale);
    ledger::deposit(
        &mut conn,
        "deposit:budget",
        accounts[0].1,
        Amount::parse("1000000", scale)?,
    )
    .await?;
    drop(conn);
    for _ in 0..400 {
        runtime
            .start(
                trade::KIND,
                &json!({ "user_id": user, "side": "buy", "base": "BTC", "quote": "USDT",
                         "base_amount": "0.001", "limit_price": "100" }),
                None,
            )
            .await?;
    }

    let runner = Runner::start(
        store,
        Registry::new().workflows(runtime.handler()),
        RunnerConfig {
            queues: vec![QueueConfig::new("default", 32)],
            promote_interval: Duration::from_millis(50),
            ..RunnerConfig::default()
        },
    )
    .await?;
    // The first window includes the bucket's burst; measure the two after it.
    let start = Instant::now();
    tokio::time::sleep(budget.window).await;
    let before = counters(&base).await?;
    tokio::time::sleep(budget.window * 2).await;
    let after = counters(&base).await?;
    let elapsed = start.elapsed();
    let deferrals: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(deferred), 0)::bigint FROM flow_deferrals")
            .fetch_one(&db.pool)
            .await?;

    runner.shutdown(Duration::from_secs(5)).await;
    runtime.shutdown().await;
    sim.stop().await?;

    eprintln!(
        "exchange budget used: {} of {} weight in two windows, {deferrals} deferrals",
        (after.orders_created - before.orders_created) * TRADE_WEIGHT,
        2 * budget.weight
    );
    assert_eq!(after.rate_limited, 0, "the exchange answered 429");
    let spent = (after.orders_created - before.orders_created) * TRADE_WEIGHT;
    let allowed = 2 * u64::from(budget.weight);
    assert!(
        spent <= allowed,
        "{spent} weight in two windows, budget {allowed}"
    );
    // The bucket keeps its burst and 1 % of the budget in reserve for calls that reach the
    // exchange late, so about 97 % is the ceiling; measured 95-96.5 % (docs/benchmarks.md).
    assert!(
        spent * 100 >= allowed * 90,
        "only {spent} weight of {allowed} in two windows ({elapsed:?}, {deferrals} deferrals)"
    );
    Ok(())
}
