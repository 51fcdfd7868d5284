//! The public money endpoints (`/v1/trades`, `/v1/withdrawals`) in-process
//! against a real Postgres (one cloned database per test), with the payments
//! workflows registered on a `SimulatedExchange` (no runner: a 201 must leave
//! a committed workflow and its first job behind): authentication and
//! ownership, `Idempotency-Key` semantics (replay, mismatch, 50 concurrent
//! requests), key revocation and caching, shared transactions, reasons.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

#[path = "common/public_fixture.rs"]
mod fixture;
use fixture::*;

// ------------------------------------------------------ API key cache

/// An app on `f`'s database with `config` (the fixture's app uses the
/// defaults).
fn app_with(f: &Fixture, config: ledgerflow_api::ApiConfig) -> App {
    let registry = workflows::registry(Deps {
        exchange: Arc::new(SimulatedExchange::new(SimConfig::default())),
        notifier: Arc::new(SimulatedNotifier::new()),
        config: WorkflowsConfig::default(),
    })
    .unwrap();
    let state = AppState::with_config(Store::new(f.db.pool.clone()), config)
        .unwrap()
        .with_workflows(Arc::new(registry));
    TestClient::new(public_app(state).boxed())
}

/// A fresh user with one API key of `lifetime`: (key id, plain key).
async fn user_with_key(
    f: &Fixture,
    email: &str,
    lifetime: Option<Duration>,
) -> (ledgerflow_payments::ApiKeyId, String) {
    let mut conn = f.db.pool.acquire().await.unwrap();
    let user = users::create_user(&mut conn, email, "C").await.unwrap();
    let (id, key) = users::create_api_key(&mut conn, user, lifetime)
        .await
        .unwrap();
    (id, key.expose_secret().to_string())
}

/// Sends `GET /v1/accounts/me/balances` with `key` every 50 ms until it is
/// refused (asserting every earlier answer was a 200); returns how long
/// that took, or panics after `deadline`.
async fn until_refused(app: &App, key: &str, deadline: Duration) -> Duration {
    let start = std::time::Instant::now();
    loop {
        let r = send(
            app,
            Method::GET,
            "/v1/accounts/me/balances",
            Some(key),
            None,
            None,
        )
        .await;
        if r.status == StatusCode::UNAUTHORIZED {
            assert_problem(&r, 401, "unauthorized");
            return start.elapsed();
        }
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(
            start.elapsed() < deadline,
            "the key still works after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn post_trade_starts_the_workflow_and_answers_201() {
    let f = fixture(8).await;
    let r = post_trade(&f.app, &f.user_a, "t-1").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.json["id"].as_str().unwrap().to_string();
    assert_eq!(r.json["status"], "pending");
    assert_eq!(r.json["side"], "buy");
    assert_eq!(r.json["base_asset"], "BTC");
    assert_eq!(r.json["quote_asset"], "USD");
    assert_eq!(r.json["base_amount"], "0.5");
    assert_eq!(r.json["limit_price"], "30000.00");
    // Committed before the answer: the workflow and its first job exist.
    assert_eq!(workflows_of(&f, "payments.trade").await, 1);
    assert_eq!(jobs_of(&f, &id).await, 1);
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM idempotency_keys WHERE resource_id = $1::uuid AND response_status = 201",
    )
    .bind(&id)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(stored, 1);

    let got = send(
        &f.app,
        Method::GET,
        &format!("/v1/trades/{id}"),
        Some(&f.user_a),
        None,
        None,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert_eq!(got.json, r.json);
}

#[tokio::test]
async fn a_created_trade_wakes_its_queue_after_the_commit() {
    // The workflow starts without an in-transaction NOTIFY; the API sends the
    // wake-up itself once the commit is done.
    let f = fixture(8).await;
    let mut listener = ledgerflow_engine::notify::Listener::connect(&f.db.pool)
        .await
        .unwrap();
    let r = post_trade(&f.app, &f.user_a, "wake-1").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let queue: String = sqlx::query_scalar("SELECT queue FROM jobs WHERE workflow_id = $1::uuid")
        .bind(r.json["id"].as_str().unwrap())
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a wake-up within 10 s")
        .unwrap();
    assert_eq!(woken, Some(ledgerflow_engine::notify::Wakeup::Jobs(queue)));
}

#[tokio::test]
async fn post_withdrawal_starts_the_workflow_and_answers_201() {
    let f = fixture(8).await;
    let r = send(
        &f.app,
        Method::POST,
        "/v1/withdrawals",
        Some(&f.user_a),
        Some("w-1"),
        Some(&withdrawal_body()),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.json["id"].as_str().unwrap().to_string();
    assert_eq!(r.json["status"], "pending");
    assert_eq!(r.json["amount"], "0.01");
    assert_eq!(r.json["asset"], "BTC");
    assert_eq!(workflows_of(&f, "payments.withdrawal").await, 1);
    assert_eq!(jobs_of(&f, &id).await, 1);

    let got = send(
        &f.app,
        Method::GET,
        &format!("/v1/withdrawals/{id}"),
        Some(&f.user_a),
        None,
        None,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json, r.json);
    // Same key, same body: the first answer again, no second workflow.
    let again = send(
        &f.app,
        Method::POST,
        "/v1/withdrawals",
        Some(&f.user_a),
        Some("w-1"),
        Some(&withdrawal_body()),
    )
    .await;
    assert_eq!(
        (again.status, again.text.as_str()),
        (r.status, r.text.as_str())
    );
    assert_eq!(workflows_of(&f, "payments.withdrawal").await, 1);
}

// ------------------------------------------------------------------ auth

#[tokio::test]
async fn auth_and_ownership() {
    let f = fixture(8).await;
    for (method, path, body) in [
        (Method::POST, "/v1/trades", Some(trade_body())),
        (Method::POST, "/v1/withdrawals", Some(withdrawal_body())),
        (
            Method::GET,
            "/v1/trades/0190f5a4-0000-7000-8000-000000000000",
            None,
        ),
        (
            Method::GET,
            "/v1/withdrawals/0190f5a4-0000-7000-8000-000000000000",
            None,
        ),
    ] {
        let r = send(&f.app, method.clone(), path, None, Some("k"), body.as_ref()).await;
        assert_problem(&r, 401, "unauthorized");
        let r = send(
            &f.app,
            method,
            path,
            Some(&f.expired),
            Some("k"),
            body.as_ref(),
        )
        .await;
        assert_problem(&r, 401, "unauthorized");
    }
    assert_nothing_written(&f).await;

    let trade = post_trade(&f.app, &f.user_a, "t-1").await;
    assert_eq!(trade.status, StatusCode::CREATED);
    let wd = send(
        &f.app,
        Method::POST,
        "/v1/withdrawals",
        Some(&f.user_a),
        Some("w-1"),
        Some(&withdrawal_body()),
    )
    .await;
    assert_eq!(wd.status, StatusCode::CREATED);
    let trade_path = format!("/v1/trades/{}", trade.json["id"].as_str().unwrap());
    let wd_path = format!("/v1/withdrawals/{}", wd.json["id"].as_str().unwrap());

    // B can't see A's resources: 404, like a missing one.
    let r = send(
        &f.app,
        Method::GET,
        &trade_path,
        Some(&f.user_b),
        None,
        None,
    )
    .await;
    assert_problem(&r, 404, "not-found");
    let r = send(&f.app, Method::GET, &wd_path, Some(&f.user_b), None, None).await;
    assert_problem(&r, 404, "not-found");
    // A trade id is not a withdrawal id.
    let crossed = format!("/v1/withdrawals/{}", trade.json["id"].as_str().unwrap());
    let r = send(&f.app, Method::GET, &crossed, Some(&f.user_a), None, None).await;
    assert_problem(&r, 404, "not-found");
    // The expired key of A can't read A's trade either.
    let r = send(
        &f.app,
        Method::GET,
        &trade_path,
        Some(&f.expired),
        None,
        None,
    )
    .await;
    assert_problem(&r, 401, "unauthorized");
    // Keys are scoped per user: B's "t-1" is a different request.
    let r = post_trade(&f.app, &f.user_b, "t-1").await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_ne!(r.json["id"], trade.json["id"]);
}

// ----------------------------------------------------------- idempotency

#[tokio::test]
async fn idempotency_key_replays_and_refuses_mismatches() {
    let f = fixture(8).await;
    // Missing key: 400 and nothing written.
    let r = send(
        &f.app,
        Method::POST,
        "/v1/trades",
        Some(&f.user_a),
        None,
        Some(&trade_body()),
    )
    .await;
    assert_problem(&r, 400, "validation");
    assert!(
        r.json["detail"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key")
    );
    let r = send(
        &f.app,
        Method::POST,
        "/v1/withdrawals",
        Some(&f.user_a),
        None,
        Some(&withdrawal_body()),
    )
    .await;
    assert_problem(&r, 400, "validation");
    assert_nothing_written(&f).await;

    let first = post_trade(&f.app, &f.user_a, "same").await;
    assert_eq!(first.status, StatusCode::CREATED);
    // Same key, same body (other key order): the identical response.
    let reordered = json!({
        "limit_price": "30000.00",
        "base_amount": "0.5",
        "quote_asset": "USD",
        "base_asset": "BTC",
        "side": "buy",
    });
    let second = send(
        &f.app,
        Method::POST,
        "/v1/trades",
        Some(&f.user_a),
        Some("same"),
        Some(&reordered),
    )
    .await;
    assert_eq!(second.status, first.status);
    assert_eq!(second.text, first.text);
    assert_eq!(workflows_of(&f, "payments.trade").await, 1);

    // Same key, different body: 422, nothing new.
    let mut other = trade_body();
    other["base_amount"] = json!("0.6");
    let r = send(
        &f.app,
        Method::POST,
        "/v1/trades",
        Some(&f.user_a),
        Some("same"),
        Some(&other),
    )
    .await;
    assert_problem(&r, 422, "unprocessable");
    // Same key on another endpoint: also a different request.
    let r = send(
        &f.app,
        Method::POST,
        "/v1/withdrawals",
        Some(&f.user_a),
        Some("same"),
        Some(&withdrawal_body()),
    )
    .await;
    assert_problem(&r, 422, "unprocessable");
    assert_eq!(count(&f, "SELECT count(*) FROM workflows").await, 1);
    assert_eq!(count(&f, "SELECT count(*) FROM idempotency_keys").await, 1);
}

#[tokio::test]
async fn fifty_concurrent_requests_with_one_key_create_one_trade() {
    let f = fixture(20).await;
    let body = trade_body();
    let replies = futures::future::join_all((0..50).map(|_| {
        send(
            &f.app,
            Method::POST,
            "/v1/trades",
            Some(&f.user_a),
            Some("burst"),
            Some(&body),
        )
    }))
    .await;
    assert_eq!(workflows_of(&f, "payments.trade").await, 1);
    assert_eq!(count(&f, "SELECT count(*) FROM jobs").await, 1);
    let created: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .collect();
    assert!(!created.is_empty());
    // Every 201 is the same answer; anything else is the documented 409
    // "in progress" (only if a waiter outlived the lock timeout).
    for r in &replies {
        if r.status == StatusCode::CREATED {
            assert_eq!(r.text, created[0].text);
        } else {
            assert_problem(r, 409, "conflict");
        }
    }
}

// ------------------------------------------------------------- bad input

#[tokio::test]
async fn a_revoked_key_stops_working_within_the_key_cache_ttl() {
    let f = fixture(8).await;
    let (id, key) = user_with_key(&f, "c@example.com", None).await;
    // Used once: now remembered by the app's key cache (TTL 1 s by default).
    let r = send(
        &f.app,
        Method::GET,
        "/v1/accounts/me/balances",
        Some(&key),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let mut conn = f.db.pool.acquire().await.unwrap();
    assert!(users::revoke_api_key(&mut conn, id).await.unwrap());
    // Refused once the cached answer is older than the TTL (generous
    // deadline: a loaded machine may be slow to send the requests).
    until_refused(&f.app, &key, Duration::from_secs(20)).await;
    // ...and a POST with it writes nothing.
    let r = post_trade(&f.app, &key, "after-revocation").await;
    assert_problem(&r, 401, "unauthorized");
    assert_nothing_written(&f).await;
}

#[tokio::test]
async fn without_a_key_cache_a_revoked_key_is_refused_at_once() {
    let f = fixture(8).await;
    let app = app_with(
        &f,
        ledgerflow_api::ApiConfig {
            api_key_cache_ttl: Duration::ZERO,
            ..Default::default()
        },
    );
    let (id, key) = user_with_key(&f, "c@example.com", None).await;
    let r = send(
        &app,
        Method::GET,
        "/v1/accounts/me/balances",
        Some(&key),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let mut conn = f.db.pool.acquire().await.unwrap();
    assert!(users::revoke_api_key(&mut conn, id).await.unwrap());
    let r = send(
        &app,
        Method::GET,
        "/v1/accounts/me/balances",
        Some(&key),
        None,
        None,
    )
    .await;
    assert_problem(&r, 401, "unauthorized");
}

#[tokio::test]
async fn a_cached_key_is_not_trusted_past_its_expiry() {
    let f = fixture(8).await;
    // A cache TTL far longer than the key's life: only the expiry bound
    // can end the cached answer within the deadline.
    let app = app_with(
        &f,
        ledgerflow_api::ApiConfig {
            api_key_cache_ttl: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    let (_, key) = user_with_key(&f, "c@example.com", Some(Duration::from_secs(3))).await;
    let r = send(
        &app,
        Method::GET,
        "/v1/accounts/me/balances",
        Some(&key),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    until_refused(&app, &key, Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_post_does_not_lock_its_users_row() {
    // Concurrent POSTs of one user must not queue on the user's row: hold
    // it FOR UPDATE (which a foreign key check's FOR KEY SHARE would wait
    // for, past the POST's 5 s lock timeout) and POST meanwhile.
    let f = fixture(8).await;
    let mut tx = f.db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM users WHERE email = 'a@example.com' FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let r = post_trade(&f.app, &f.user_a, "while-locked").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    tx.rollback().await.unwrap();
    assert_eq!(workflows_of(&f, "payments.trade").await, 1);
    assert_eq!(count(&f, "SELECT count(*) FROM idempotency_keys").await, 1);
}

// ------------------------------------------------------- group commit

/// `ledgerflow_api_post_batch_size`'s (count, sum) from `/metrics` (of the
/// admin listener: the public one has none): POSTs' transactions and the
/// POSTs they committed.
async fn batch_sizes(app: &App) -> (f64, f64) {
    let r = send(app, Method::GET, "/metrics", None, None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let value = |name: &str| {
        r.text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("ledgerflow_api_post_batch_size_count"),
        value("ledgerflow_api_post_batch_size_sum"),
    )
}

#[tokio::test]
async fn concurrent_posts_share_transactions_and_each_gets_its_own_answer() {
    let f = fixture(20).await;
    // One POST first, so the key and the assets are cached and the burst
    // below reaches the batcher without awaiting anything.
    let first = post_trade(&f.app, &f.user_a, "warm").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    let keys: Vec<String> = (0..40).map(|i| format!("burst-{i}")).collect();
    let replies = futures::future::join_all(keys.iter().enumerate().map(|(i, k)| {
        let (path, body) = if i % 4 == 0 {
            ("/v1/withdrawals", withdrawal_body())
        } else {
            ("/v1/trades", trade_body())
        };
        let app = &f.app;
        let key = f.user_a.clone();
        async move { send(app, Method::POST, path, Some(&key), Some(k), Some(&body)).await }
    }))
    .await;
    for (k, r) in keys.iter().zip(&replies) {
        assert_eq!(r.status, StatusCode::CREATED, "{k}: {}", r.text);
        // Each answer is its own resource, committed with its record.
        let stored: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM idempotency_keys k JOIN workflows w ON w.id = k.resource_id
             JOIN jobs j ON j.workflow_id = w.id
             WHERE k.key = $1 AND w.id = $2::uuid AND k.response_status = 201",
        )
        .bind(k)
        .bind(r.json["id"].as_str().unwrap())
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
        assert_eq!(stored, 1, "{k}");
    }
    assert_eq!(count(&f, "SELECT count(*) FROM workflows").await, 41);
    assert_eq!(count(&f, "SELECT count(*) FROM jobs").await, 41);
    assert_eq!(count(&f, "SELECT count(*) FROM idempotency_keys").await, 41);
    // Fewer transactions than POSTs: some were committed together.
    let (transactions, posts) = batch_sizes(&f.admin).await;
    assert_eq!(posts, 41.0);
    assert!(transactions < posts, "{transactions} transactions");
}

#[tokio::test]
async fn a_shared_transaction_with_a_repeated_or_reused_key_answers_each_request_alone() {
    let f = fixture(20).await;
    let warm = post_trade(&f.app, &f.user_a, "warm").await;
    assert_eq!(warm.status, StatusCode::CREATED, "{}", warm.text);
    // Ten trades, "dup-3" twice more, and a withdrawal reusing "dup-5":
    // whichever of a pair runs first wins, the other replays or gets a 422.
    let mut posts: Vec<(&str, String, Value)> = (0..10)
        .map(|i| ("/v1/trades", format!("dup-{i}"), trade_body()))
        .collect();
    posts.push(("/v1/trades", "dup-3".into(), trade_body()));
    posts.push(("/v1/trades", "dup-3".into(), trade_body()));
    posts.push(("/v1/withdrawals", "dup-5".into(), withdrawal_body()));
    let replies = futures::future::join_all(posts.iter().map(|(path, k, body)| {
        let app = &f.app;
        let key = f.user_a.clone();
        async move { send(app, Method::POST, path, Some(&key), Some(k), Some(body)).await }
    }))
    .await;
    let dup3: Vec<&Reply> = posts
        .iter()
        .zip(&replies)
        .filter(|((_, k, _), _)| k == "dup-3")
        .map(|(_, r)| r)
        .collect();
    for r in &dup3 {
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.text, dup3[0].text, "one answer for one key");
    }
    let dup5: Vec<&Reply> = posts
        .iter()
        .zip(&replies)
        .filter(|((_, k, _), _)| k == "dup-5")
        .map(|(_, r)| r)
        .collect();
    let created = dup5
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .count();
    assert_eq!(created, 1, "{:?}", dup5);
    for r in dup5.iter().filter(|r| r.status != StatusCode::CREATED) {
        assert_problem(r, 422, "unprocessable");
    }
    for ((_, k, _), r) in posts.iter().zip(&replies) {
        if k != "dup-3" && k != "dup-5" {
            assert_eq!(r.status, StatusCode::CREATED, "{k}: {}", r.text);
        }
    }
    // One workflow, job and record per key; nothing of a losing request.
    assert_eq!(count(&f, "SELECT count(*) FROM workflows").await, 11);
    assert_eq!(count(&f, "SELECT count(*) FROM jobs").await, 11);
    assert_eq!(count(&f, "SELECT count(*) FROM idempotency_keys").await, 11);
}

#[tokio::test]
async fn every_way_of_ending_without_success_tells_the_owner_why() {
    let f = fixture(8).await;
    let trade = post_trade(&f.app, &f.user_a, "t-why").await;
    assert_eq!(trade.status, StatusCode::CREATED, "{}", trade.text);
    let withdrawal = send(
        &f.app,
        Method::POST,
        "/v1/withdrawals",
        Some(&f.user_a),
        Some("w-why"),
        Some(&withdrawal_body()),
    )
    .await;
    assert_eq!(
        withdrawal.status,
        StatusCode::CREATED,
        "{}",
        withdrawal.text
    );
    // An operator cancels the trade's workflow before it ran; the
    // withdrawal's fails (e.g. its first step exhausted its attempts).
    let end = |id: &Value, state: &str, why: &str| {
        sqlx::query(
            "UPDATE workflows SET state = $2, error = $3, finished_at = now() WHERE id = $1::uuid",
        )
        .bind(id.as_str().unwrap().to_string())
        .bind(state.to_string())
        .bind(why.to_string())
        .execute(&f.db.pool)
    };
    end(
        &trade.json["id"],
        "cancelled",
        "cancelled by admin ops: duplicate order",
    )
    .await
    .unwrap();
    end(
        &withdrawal.json["id"],
        "failed",
        "validate: the exchange was unreachable",
    )
    .await
    .unwrap();
    for (path, id, status, why) in [
        ("trades", &trade.json["id"], "cancelled", "duplicate order"),
        (
            "withdrawals",
            &withdrawal.json["id"],
            "rejected",
            "unreachable",
        ),
    ] {
        let got = send(
            &f.app,
            Method::GET,
            &format!("/v1/{path}/{}", id.as_str().unwrap()),
            Some(&f.user_a),
            None,
            None,
        )
        .await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text);
        assert_eq!(got.json["status"], status, "{}", got.text);
        let error = got.json["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{path}: {}", got.text);
    }
}
