//! Ledger and credential tests against a real Postgres (one cloned database per test).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use ledgerflow_engine::testing::TestDb;
use ledgerflow_payments::ledger::{self, AccountKind, HoldState, Posted};
use ledgerflow_payments::users::{self, AdminRole};
use ledgerflow_payments::{AccountId, Amount, Error, UserId};
use rust_decimal::Decimal;
use sqlx::{Connection, PgConnection};
use std::str::FromStr;
use std::time::Duration;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn usd(s: &str) -> Amount {
    Amount::parse(s, 2).unwrap()
}

fn btc(s: &str) -> Amount {
    Amount::parse(s, 8).unwrap()
}

fn constraint(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.constraint().map(str::to_owned),
        _ => None,
    }
}

/// A user with USD and BTC wallets.
async fn user_with_accounts(
    conn: &mut PgConnection,
    email: &str,
) -> Result<(UserId, AccountId, AccountId), Error> {
    let user = users::create_user(conn, email, "Test User").await?;
    let accounts = ledger::ensure_user_accounts(conn, user, &["USD", "BTC"]).await?;
    Ok((user, accounts[0].1, accounts[1].1))
}

/// Every test ends with the books in order.
async fn assert_books_balance(conn: &mut PgConnection) {
    for (asset, sum) in ledger::ledger_sums(conn).await.unwrap() {
        assert!(sum.is_zero(), "{asset} postings sum to {sum}");
    }
    assert_eq!(ledger::balance_drift(conn).await.unwrap(), vec![]);
    let negative: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM account_balances WHERE NOT allow_negative AND balance - held < 0",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(negative, 0);
}

#[tokio::test]
async fn deposit_then_balances() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let (user, usd_acct, btc_acct) = user_with_accounts(&mut conn, "alice@example.com").await?;

    let posted = ledger::deposit(&mut conn, "deposit:btc:tx1:0", btc_acct, btc("1.5")).await?;
    assert!(posted.is_new());
    ledger::deposit(&mut conn, "deposit:bank:42", usd_acct, usd("250.75")).await?;

    let balances = ledger::balances(&mut conn, user).await?;
    assert_eq!(balances.len(), 2);
    let b = &balances[0];
    assert_eq!(
        (b.asset.as_str(), b.kind.as_str()),
        ("BTC", "user_available")
    );
    assert_eq!(b.account_id, btc_acct);
    assert_eq!(b.balance, dec("1.5"));
    assert_eq!(
        b.balance.to_string(),
        "1.50000000",
        "shown at the asset's scale"
    );
    assert_eq!(b.held, Decimal::ZERO);
    assert_eq!(b.available, dec("1.5"));
    let u = &balances[1];
    assert_eq!(u.asset, "USD");
    assert_eq!(u.available.to_string(), "250.75");

    // The money came from the asset's external account, which went negative.
    let external = ledger::system_account(&mut conn, "BTC", AccountKind::External).await?;
    assert_eq!(
        ledger::account_balance(&mut conn, external).await?.balance,
        dec("-1.5")
    );
    // JSON shows amounts as strings.
    let json = serde_json::to_value(b)?;
    assert_eq!(json["available"], "1.50000000");

    assert_books_balance(&mut conn).await;
    Ok(())
}

#[tokio::test]
async fn unbalanced_postings_are_rejected_at_commit() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let (_, usd_acct, _) = user_with_accounts(&mut conn, "bob@example.com").await?;
    let external = ledger::system_account(&mut conn, "USD", AccountKind::External).await?;

    // Straight SQL, bypassing Rust: every statement succeeds, COMMIT fails.
    let mut tx = conn.begin().await?;
    let transfer_id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO ledger_transfers (id, kind, reference) VALUES ($1, 'deposit', 'raw:1')",
    )
    .bind(transfer_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO ledger_postings (transfer_id, account_id, asset, amount)
         VALUES ($1, $2, 'USD', -10), ($1, $3, 'USD', 9.99)",
    )
    .bind(transfer_id)
    .bind(external)
    .bind(usd_acct)
    .execute(&mut *tx)
    .await?;
    let err = tx.commit().await.unwrap_err();
    assert_eq!(
        constraint(&err).as_deref(),
        Some("ledger_transfer_balanced"),
        "{err}"
    );

    // A transfer with no postings at all is refused too.
    let mut tx = conn.begin().await?;
    sqlx::query("INSERT INTO ledger_transfers (id, kind, reference) VALUES ($1, 'x', 'raw:2')")
        .bind(uuid::Uuid::now_v7())
        .execute(&mut *tx)
        .await?;
    let err = tx.commit().await.unwrap_err();
    assert_eq!(
        constraint(&err).as_deref(),
        Some("ledger_transfer_balanced"),
        "{err}"
    );

    // Rust refuses it before SQL has to.
    let err = ledger::transfer(
        &mut conn,
        "bad:1",
        "deposit",
        &[(external, -usd("10")), (usd_acct, usd("9.99"))],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Unbalanced { ref asset, .. } if asset == "USD"),
        "{err}"
    );

    // Assets must match accounts: a USD posting on a BTC account is refused.
    let btc_ext = ledger::system_account(&mut conn, "BTC", AccountKind::External).await?;
    let mut tx = conn.begin().await?;
    let transfer_id = uuid::Uuid::now_v7();
    sqlx::query("INSERT INTO ledger_transfers (id, kind, reference) VALUES ($1, 'x', 'raw:3')")
        .bind(transfer_id)
        .execute(&mut *tx)
        .await?;
    let err = sqlx::query(
        "INSERT INTO ledger_postings (transfer_id, account_id, asset, amount)
         VALUES ($1, $2, 'USD', -1), ($1, $3, 'USD', 1)",
    )
    .bind(transfer_id)
    .bind(btc_ext)
    .bind(usd_acct)
    .execute(&mut *tx)
    .await
    .unwrap_err();
    assert_eq!(
        constraint(&err).as_deref(),
        Some("ledger_postings_account_fkey"),
        "{err}"
    );
    drop(tx);

    assert_eq!(ledger::ledger_sums(&mut conn).await?, vec![]);
    assert_books_balance(&mut conn).await;
    Ok(())
}

#[tokio::test]
async fn over_scale_amounts_are_rejected() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let (_, usd_acct, _) = user_with_accounts(&mut conn, "carol@example.com").await?;
    let external = ledger::system_account(&mut conn, "USD", AccountKind::External).await?;

    let mut tx = conn.begin().await?;
    let transfer_id = uuid::Uuid::now_v7();
    sqlx::query("INSERT INTO ledger_transfers (id, kind, reference) VALUES ($1, 'x', 'raw:scale')")
        .bind(transfer_id)
        .execute(&mut *tx)
        .await?;
    let err = sqlx::query(
        "INSERT INTO ledger_postings (transfer_id, account_id, asset, amount)
         VALUES ($1, $2, 'USD', -0.001), ($1, $3, 'USD', 0.001)",
    )
    .bind(transfer_id)
    .bind(external)
    .bind(usd_acct)
    .execute(&mut *tx)
    .await
    .unwrap_err();
    assert_eq!(
        constraint(&err).as_deref(),
        Some("amount_within_asset_scale"),
        "{err}"
    );
    drop(tx);

    // Trailing zeros are not extra precision: 1.500 USD is 1.50 USD.
    let mut tx = conn.begin().await?;
    let transfer_id = uuid::Uuid::now_v7();
    sqlx::query("INSERT INTO ledger_transfers (id, kind, reference) VALUES ($1, 'x', 'raw:zeros')")
        .bind(transfer_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO ledger_postings (transfer_id, account_id, asset, amount)
         VALUES ($1, $2, 'USD', -1.500), ($1, $3, 'USD', 1.500)",
    )
    .bind(transfer_id)
    .bind(external)
    .bind(usd_acct)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;

    // Rust: an amount checked against BTC's scale cannot go to a USD account.
    let err = ledger::transfer(
        &mut conn,
        "scale:1",
        "deposit",
        &[(external, -btc("0.001")), (usd_acct, btc("0.001"))],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::ScaleExceeded { scale: 2, .. }),
        "{err}"
    );
    let err = ledger::place_hold(&mut conn, "scale:hold", usd_acct, btc("0.005"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ScaleExceeded { .. }), "{err}");

    assert_books_balance(&mut conn).await;
    Ok(())
}

#[tokio::test]
async fn ledger_history_is_append_only() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let (_, usd_acct, _) = user_with_accounts(&mut conn, "dave@example.com").await?;
    let posted = ledger::deposit(&mut conn, "dep:1", usd_acct, usd("10")).await?;

    for sql in [
        "UPDATE ledger_postings SET amount = amount * 2",
        "DELETE FROM ledger_postings",
        "TRUNCATE ledger_postings",
        "UPDATE ledger_transfers SET reference = 'other'",
        "DELETE FROM ledger_transfers",
        "TRUNCATE ledger_transfers CASCADE",
        "UPDATE account_balances SET balance = 1000000",
        "DELETE FROM account_balances",
        "UPDATE accounts SET allow_negative = true",
    ] {
        let err = sqlx::query(sql).execute(&mut *conn).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("append-only")
                || msg.contains("ledger triggers only")
                || msg.contains("immutable"),
            "{sql}: {msg}"
        );
    }

    // A committed transfer is sealed: no new postings can join it, even balanced ones.
    let external = ledger::system_account(&mut conn, "USD", AccountKind::External).await?;
    let err = sqlx::query(
        "INSERT INTO ledger_postings (transfer_id, account_id, asset, amount)
         VALUES ($1, $2, 'USD', -5), ($1, $3, 'USD', 5)",
    )
    .bind(posted.id())
    .bind(external)
    .bind(usd_acct)
    .execute(&mut *conn)
    .await
    .unwrap_err();
    assert_eq!(
        constraint(&err).as_deref(),
        Some("ledger_transfer_sealed"),
        "{err}"
    );

    assert_eq!(
        ledger::account_balance(&mut conn, usd_acct).await?.balance,
        dec("10")
    );
    assert_books_balance(&mut conn).await;
    Ok(())
}

#[tokio::test]
async fn insufficient_funds_leave_the_callers_transaction_usable() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let (user, usd_acct, _) = user_with_accounts(&mut conn, "erin@example.com").await?;
    let fees = ledger::system_account(&mut conn, "USD", AccountKind::Fees).await?;
    ledger::deposit(&mut conn, "dep:1", usd_acct, usd("100")).await?;

    let mut tx = conn.begin().await?;
    let held = ledger::place_hold(&mut tx, "h:ok", usd_acct, usd("60")).await?;
    assert!(held.is_new());
    let err = ledger::place_hold(&mut tx, "h:too-much", usd_acct, usd("40.01"))
        .await
        .unwrap_err();
    match err {
        Error::InsufficientFunds {
            account,
            requested,
            available,
        } => {
            assert_eq!(account, usd_acct);
            assert_eq!(requested, dec("40.01"));
            assert_eq!(available, dec("40"));
        }
        other => panic!("expected InsufficientFunds, got {other}"),
    }
    // Same for a transfer that would overdraw what is not held.
    let err = ledger::transfer(
        &mut tx,
        "t:too-much",
        "fee",
        &[(usd_acct, -usd("41")), (fees, usd("41"))],
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::InsufficientFunds { .. }), "{err}");

    // The transaction goes on: more work, then commit.
    ledger::place_hold(&mut tx, "h:rest", usd_acct, usd("40")).await?;
    tx.commit().await?;

    let b = ledger::account_balance(&mut conn, usd_acct).await?;
    assert_eq!(
        (b.balance, b.held, b.available),
        (dec("100"), dec("100"), dec("0"))
    );
    assert!(ledger::hold(&mut conn, "h:too-much").await?.is_none());
    let refs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_transfers WHERE reference = 't:too-much'")
            .fetch_one(&mut *conn)
            .await?;
    assert_eq!(refs, 0);
    assert_eq!(
        ledger::balances(&mut conn, user).await?[1].available,
        Decimal::ZERO
    );

    // The SQL CHECK is the final word, whatever Rust thinks.
    let err = sqlx::query(
        "INSERT INTO holds (id, account_id, asset, amount, reference) VALUES ($1, $2, 'USD', 1, 'raw')",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(usd_acct)
    .execute(&mut *conn)
    .await
    .unwrap_err();
    assert_eq!(
        constraint(&err).as_deref(),
        Some("account_balances_available_nonnegative")
    );

    assert_books_balance(&mut conn).await;
    Ok(())
}

#[tokio::test]
async fn repeated_reference_posts_once() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let (_, usd_acct, btc_acct) = user_with_accounts(&mut conn, "frank@example.com").await?;
    let fees = ledger::system_account(&mut conn, "USD", AccountKind::Fees).await?;
    ledger::deposit(&mut conn, "dep:1", usd_acct, usd("100")).await?;

    let postings = [(usd_acct, -usd("2.50")), (fees, usd("2.5"))];
    let first = ledger::transfer(&mut conn, "trade:1:fee", "fee", &postings).await?;
    let Posted::New(id) = first else {
        panic!("first post should be new: {first:?}");
    };
    // Again, inside a caller's transaction: Existing, and the transaction is fine.
    let mut tx = conn.begin().await?;
    let again = ledger::transfer(&mut tx, "trade:1:fee", "fee", &postings).await?;
    assert_eq!(again, Posted::Existing(id));
    // Same reference, different movement: a conflict, not a silent success.
    let err = ledger::transfer(
        &mut tx,
        "trade:1:fee",
        "fee",
        &[(usd_acct, -usd("3")), (fees, usd("3"))],
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::ReferenceConflict { .. }), "{err}");
    ledger::deposit(&mut tx, "dep:1", usd_acct, usd("100")).await?;
    tx.commit().await?;

    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_transfers WHERE reference = 'trade:1:fee'")
            .fetch_one(&mut *conn)
            .await?;
    assert_eq!(rows, 1);
    let b = ledger::account_balance(&mut conn, usd_acct).await?;
    assert_eq!(b.balance, dec("97.50"));
    assert_eq!(
        ledger::account_balance(&mut conn, fees).await?.balance,
        dec("2.5")
    );

    // Holds too.
    let h1 = ledger::place_hold(&mut conn, "w:1:hold", usd_acct, usd("10")).await?;
    let h2 = ledger::place_hold(&mut conn, "w:1:hold", usd_acct, usd("10")).await?;
    assert_eq!(h2, Posted::Existing(h1.id()));
    let err = ledger::place_hold(&mut conn, "w:1:hold", usd_acct, usd("11"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ReferenceConflict { .. }), "{err}");
    let err = ledger::place_hold(&mut conn, "w:1:hold", btc_acct, btc("1"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ReferenceConflict { .. }), "{err}");
    assert_eq!(
        ledger::account_balance(&mut conn, usd_acct).await?.held,
        dec("10")
    );

    assert_books_balance(&mut conn).await;
    Ok(())
}

#[tokio::test]
async fn capture_and_release() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let (_, usd_acct, btc_acct) = user_with_accounts(&mut conn, "grace@example.com").await?;
    let external = ledger::system_account(&mut conn, "USD", AccountKind::External).await?;
    ledger::deposit(&mut conn, "dep:1", usd_acct, usd("100")).await?;

    ledger::place_hold(&mut conn, "h:1", usd_acct, usd("30")).await?;
    ledger::place_hold(&mut conn, "h:2", usd_acct, usd("20")).await?;
    let b = ledger::account_balance(&mut conn, usd_acct).await?;
    assert_eq!(
        (b.balance, b.held, b.available),
        (dec("100"), dec("50"), dec("50"))
    );

    // Release: available again; idempotent.
    assert!(ledger::release_hold(&mut conn, "h:1").await?);
    assert!(!ledger::release_hold(&mut conn, "h:1").await?);
    let b = ledger::account_balance(&mut conn, usd_acct).await?;
    assert_eq!(
        (b.balance, b.held, b.available),
        (dec("100"), dec("20"), dec("80"))
    );

    // Capture (a withdrawal leaving to the outside world): held → transferred.
    let captured = ledger::capture_hold(&mut conn, "h:2", "w:2:send", external).await?;
    assert!(captured.is_new());
    let again = ledger::capture_hold(&mut conn, "h:2", "w:2:send", external).await?;
    assert_eq!(again, Posted::Existing(captured.id()));
    let b = ledger::account_balance(&mut conn, usd_acct).await?;
    assert_eq!(
        (b.balance, b.held, b.available),
        (dec("80"), dec("0"), dec("80"))
    );
    let h = ledger::hold(&mut conn, "h:2").await?.unwrap();
    assert_eq!(h.state, HoldState::Captured);
    assert_eq!(h.captured_amount, Some(dec("20")));
    assert_eq!(h.capture_transfer_id, Some(captured.id()));

    // Wrong transitions are refused and change nothing.
    let err = ledger::release_hold(&mut conn, "h:2").await.unwrap_err();
    assert!(matches!(err, Error::HoldNotActive { .. }), "{err}");
    let err = ledger::capture_hold(&mut conn, "h:1", "w:1:send", external)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::HoldNotActive { .. }), "{err}");
    let err = ledger::capture_hold(&mut conn, "h:2", "w:2:other", external)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::HoldNotActive { .. }), "{err}");
    let err = ledger::release_hold(&mut conn, "nope").await.unwrap_err();
    assert!(matches!(err, Error::HoldNotFound(_)), "{err}");

    // A trade settlement: hold the most it may cost, settle what it did cost
    // (quote out, base in, fee), and the rest is no longer held.
    let omni_usd = ledger::system_account(&mut conn, "USD", AccountKind::ExchangeOmnibus).await?;
    let omni_btc = ledger::system_account(&mut conn, "BTC", AccountKind::ExchangeOmnibus).await?;
    let fees = ledger::system_account(&mut conn, "USD", AccountKind::Fees).await?;
    ledger::place_hold(&mut conn, "trade:7:hold", usd_acct, usd("60")).await?;
    let settle = [
        (usd_acct, -usd("55.10")),
        (omni_usd, usd("55.10")),
        (omni_btc, -btc("0.00061234")),
        (btc_acct, btc("0.00061234")),
        (usd_acct, -usd("0.11")),
        (fees, usd("0.11")),
    ];
    let meta = serde_json::json!({ "trade": 7 });
    let settled = ledger::settle_hold(
        &mut conn,
        "trade:7:hold",
        "trade:7:settle",
        "trade.settle",
        &settle,
        &meta,
    )
    .await?;
    assert!(settled.is_new());
    let again = ledger::settle_hold(
        &mut conn,
        "trade:7:hold",
        "trade:7:settle",
        "trade.settle",
        &settle,
        &meta,
    )
    .await?;
    assert_eq!(again, Posted::Existing(settled.id()));
    let b = ledger::account_balance(&mut conn, usd_acct).await?;
    assert_eq!(
        (b.balance, b.held, b.available),
        (dec("24.79"), dec("0"), dec("24.79"))
    );
    assert_eq!(
        ledger::account_balance(&mut conn, btc_acct).await?.balance,
        dec("0.00061234")
    );
    assert_eq!(
        ledger::hold(&mut conn, "trade:7:hold")
            .await?
            .unwrap()
            .captured_amount,
        Some(dec("55.21"))
    );

    // Settling for more than was held is refused.
    ledger::place_hold(&mut conn, "trade:8:hold", usd_acct, usd("10")).await?;
    let err = ledger::settle_hold(
        &mut conn,
        "trade:8:hold",
        "trade:8:settle",
        "trade.settle",
        &[(usd_acct, -usd("10.01")), (omni_usd, usd("10.01"))],
        &meta,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert_eq!(
        ledger::hold(&mut conn, "trade:8:hold")
            .await?
            .unwrap()
            .state,
        HoldState::Active
    );

    assert_books_balance(&mut conn).await;
    Ok(())
}

#[tokio::test]
async fn concurrent_holds_never_overdraw() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let (_, usd_acct, _) = user_with_accounts(&mut conn, "heidi@example.com").await?;
    ledger::deposit(&mut conn, "dep:1", usd_acct, usd("100")).await?;
    drop(conn);

    let opts = db.connect_options()?;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for i in 0..50 {
        let opts = opts.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect_with(&opts).await?;
            let mut tx = conn.begin().await?;
            barrier.wait().await;
            let r = ledger::place_hold(&mut tx, &format!("race:{i}"), usd_acct, usd("7")).await;
            // Commit either way: a refusal must leave the transaction usable.
            tx.commit().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(r)
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await?? {
            Ok(Posted::New(_)) => ok += 1,
            Err(Error::InsufficientFunds { available, .. }) => {
                assert!(
                    available >= Decimal::ZERO && available < dec("7"),
                    "{available}"
                );
                refused += 1;
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!((ok, refused), (14, 36));

    let mut conn = db.pool.acquire().await?;
    let b = ledger::account_balance(&mut conn, usd_acct).await?;
    assert_eq!(
        (b.balance, b.held, b.available),
        (dec("100"), dec("98"), dec("2"))
    );
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM holds WHERE state = 'active'")
        .fetch_one(&mut *conn)
        .await?;
    assert_eq!(active, 14);
    assert_books_balance(&mut conn).await;
    Ok(())
}

#[tokio::test]
async fn concurrent_transfers_never_overdraw() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let (_, usd_acct, _) = user_with_accounts(&mut conn, "ivan@example.com").await?;
    let (_, other_acct, _) = user_with_accounts(&mut conn, "judy@example.com").await?;
    ledger::deposit(&mut conn, "dep:1", usd_acct, usd("100")).await?;
    drop(conn);

    let opts = db.connect_options()?;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let opts = opts.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect_with(&opts).await?;
            let r = ledger::transfer(
                &mut conn,
                &format!("p2p:{i}"),
                "p2p",
                &[(other_acct, usd("7")), (usd_acct, -usd("7"))],
            )
            .await;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(r)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await?? {
            Ok(Posted::New(_)) => ok += 1,
            Err(Error::InsufficientFunds { .. }) => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(ok, 14);
    let mut conn = db.pool.acquire().await?;
    assert_eq!(
        ledger::account_balance(&mut conn, usd_acct)
            .await?
            .available,
        dec("2")
    );
    assert_eq!(
        ledger::account_balance(&mut conn, other_acct)
            .await?
            .available,
        dec("98")
    );
    assert_books_balance(&mut conn).await;
    Ok(())
}

#[tokio::test]
async fn accounts_are_unique_and_checked() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let user = users::create_user(&mut conn, "kim@example.com", "Kim").await?;
    let a = ledger::open_account(&mut conn, Some(user), "BTC", AccountKind::UserAvailable).await?;
    let b = ledger::open_account(&mut conn, Some(user), "BTC", AccountKind::UserAvailable).await?;
    assert_eq!(a, b);
    assert_eq!(ledger::user_account(&mut conn, user, "BTC").await?, Some(a));
    let s1 = ledger::system_account(&mut conn, "BTC", AccountKind::Fees).await?;
    let s2 = ledger::system_account(&mut conn, "BTC", AccountKind::Fees).await?;
    assert_eq!(s1, s2);

    let mut tx = conn.begin().await?;
    let err = ledger::open_account(&mut tx, Some(user), "DOGE", AccountKind::UserAvailable)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownAsset(_)), "{err}");
    let err = ledger::open_account(&mut tx, None, "BTC", AccountKind::UserAvailable)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    let err = ledger::open_account(
        &mut tx,
        Some(UserId::new()),
        "BTC",
        AccountKind::UserAvailable,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::UserNotFound(_)), "{err}");
    // Still usable after those refusals.
    ledger::create_asset(&mut tx, "DOGE", 8).await?;
    ledger::open_account(&mut tx, Some(user), "DOGE", AccountKind::UserAvailable).await?;
    tx.commit().await?;
    assert!(ledger::create_asset(&mut conn, "DOGE", 2).await.is_err());

    let err = users::create_user(&mut conn, "KIM@example.com", "Kim again")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::EmailTaken(_)), "{err}");
    Ok(())
}

#[tokio::test]
async fn api_keys_authenticate_until_expired_or_revoked() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let user = users::create_user(&mut conn, "leo@example.com", "Leo").await?;

    let (key_id, key) = users::create_api_key(&mut conn, user, None).await?;
    let plain = key.expose_secret().to_owned();
    assert!(plain.starts_with("lf_"));
    assert_eq!(
        users::authenticate_api_key(&db.pool, &plain).await?,
        Some(user)
    );
    assert_eq!(
        users::authenticate_api_key(&mut *conn, &plain).await?,
        Some(user)
    );

    // Wrong secret for a real prefix, unknown prefix, garbage.
    let mut wrong = plain.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    assert_eq!(users::authenticate_api_key(&db.pool, &wrong).await?, None);
    let unknown = format!("lf_000000000000_{}", &plain[plain.len() - 64..]);
    assert_eq!(users::authenticate_api_key(&db.pool, &unknown).await?, None);
    for garbage in ["", "lf_", "Bearer x", &plain[..plain.len() - 1]] {
        assert_eq!(
            users::authenticate_api_key(&db.pool, garbage).await?,
            None,
            "{garbage:?}"
        );
    }

    // Expired: a zero lifetime is over as soon as it starts.
    let (_, expired) = users::create_api_key(&mut conn, user, Some(Duration::ZERO)).await?;
    assert_eq!(
        users::authenticate_api_key(&db.pool, expired.expose_secret()).await?,
        None
    );
    let (_, hour) = users::create_api_key(&mut conn, user, Some(Duration::from_secs(3600))).await?;
    assert_eq!(
        users::authenticate_api_key(&db.pool, hour.expose_secret()).await?,
        Some(user)
    );

    // Revoked.
    assert!(users::revoke_api_key(&mut conn, key_id).await?);
    assert!(!users::revoke_api_key(&mut conn, key_id).await?);
    assert_eq!(users::authenticate_api_key(&db.pool, &plain).await?, None);

    // Only hashes are stored.
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys k WHERE row_to_json(k)::text LIKE '%' || $1 || '%'",
    )
    .bind(&plain[plain.len() - 64..])
    .fetch_one(&mut *conn)
    .await?;
    assert_eq!(stored, 0);

    let err = users::create_api_key(&mut conn, UserId::new(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UserNotFound(_)), "{err}");
    Ok(())
}

#[tokio::test]
async fn admins_authenticate_with_their_own_credentials() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let (admin_id, cred) = users::create_admin(&mut conn, "ops-alice", AdminRole::Approver).await?;
    assert!(cred.expose_secret().starts_with("lfa_"));
    let admin = users::authenticate_admin(&db.pool, cred.expose_secret())
        .await?
        .unwrap();
    assert_eq!(
        (admin.id, admin.name.as_str(), admin.role),
        (admin_id, "ops-alice", AdminRole::Approver)
    );

    let err = users::create_admin(&mut conn, "ops-alice", AdminRole::Viewer)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AdminNameTaken(_)), "{err}");

    // An admin credential is not an API key and vice versa.
    assert_eq!(
        users::authenticate_api_key(&db.pool, cred.expose_secret()).await?,
        None
    );
    let user = users::create_user(&mut conn, "mia@example.com", "Mia").await?;
    let (_, key) = users::create_api_key(&mut conn, user, None).await?;
    assert_eq!(
        users::authenticate_admin(&db.pool, key.expose_secret()).await?,
        None
    );

    assert!(users::disable_admin(&mut conn, admin_id).await?);
    assert_eq!(
        users::authenticate_admin(&db.pool, cred.expose_secret()).await?,
        None
    );
    Ok(())
}
