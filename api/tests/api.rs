//! The public and admin apps, in-process (`poem::test::TestClient`) against a
//! real Postgres (one cloned database per test): the authorization matrix,
//! audited mutations, bulk actions, filters, sorting and pagination.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

#[path = "common/admin_fixture.rs"]
mod fixture;
use fixture::*;

// ------------------------------------------------------- authorization

#[tokio::test]
async fn authorization_matrix() {
    let f = fixture().await;
    let k = &f.keys;
    // Targets so that every operator call can succeed.
    let job = insert(&f.store, "q", "k", json!({})).await;
    let cancelled = insert(&f.store, "q", "k", json!({})).await;
    let discardable = insert(&f.store, "q", "k", json!({})).await;
    {
        let mut conn = f.db.pool.acquire().await.unwrap();
        f.store
            .job_cancel_in(&mut conn, cancelled, "setup")
            .await
            .unwrap();
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Who {
        Anonymous,
        UserA,
        UserB,
        Expired,
        Revoked,
        Viewer,
        Operator,
        Approver,
        Disabled,
    }
    use Who::*;
    let token = |w: Who| -> Option<&str> {
        match w {
            Anonymous => None,
            UserA => Some(&k.user_a),
            UserB => Some(&k.user_b),
            Expired => Some(&k.expired),
            Revoked => Some(&k.revoked),
            Viewer => Some(&k.viewer),
            Operator => Some(&k.operator),
            Approver => Some(&k.approver),
            Disabled => Some(&k.disabled),
        }
    };
    let everyone = [
        Anonymous, UserA, UserB, Expired, Revoked, Viewer, Operator, Approver, Disabled,
    ];

    // Public: only live user keys.
    for who in everyone {
        let r = send(
            &f.public,
            Method::GET,
            "/v1/accounts/me/balances",
            token(who),
            None,
        )
        .await;
        match who {
            UserA | UserB => assert_eq!(r.status, StatusCode::OK, "{who:?}: {}", r.text),
            _ => assert_problem(&r, 401, "unauthorized"),
        }
    }

    // Admin reads: every live admin role; users and dead credentials get 401.
    let reads = [
        "/v1/jobs".to_string(),
        format!("/v1/jobs/{job}"),
        "/v1/queues".to_string(),
        "/v1/audit".to_string(),
    ];
    for path in &reads {
        for who in everyone {
            let r = send(&f.admin, Method::GET, path, token(who), None).await;
            match who {
                Viewer | Operator | Approver => {
                    assert_eq!(r.status, StatusCode::OK, "{who:?} {path}: {}", r.text)
                }
                _ => assert_problem(&r, 401, "unauthorized"),
            }
        }
    }

    // Admin mutations: operator only; viewer and approver 403.
    let mutations: Vec<(String, Value)> = vec![
        (
            format!("/v1/jobs/{cancelled}/retry"),
            json!({"reason": "matrix"}),
        ),
        (
            format!("/v1/jobs/{job}/cancel"),
            json!({"reason": "matrix"}),
        ),
        (
            format!("/v1/jobs/{discardable}/discard"),
            json!({"reason": "matrix"}),
        ),
        (
            "/v1/jobs/bulk-retry".to_string(),
            json!({"filter": {"queue": "none"}, "dry_run": true}),
        ),
        (
            "/v1/jobs/bulk-cancel".to_string(),
            json!({"filter": {"queue": "none"}, "dry_run": true}),
        ),
        (
            "/v1/queues/q/pause".to_string(),
            json!({"reason": "matrix"}),
        ),
        (
            "/v1/queues/q/resume".to_string(),
            json!({"reason": "matrix"}),
        ),
    ];
    for (path, body) in &mutations {
        for who in everyone {
            if who == Operator {
                continue; // last, once, so the targets are still valid for it
            }
            let r = send(&f.admin, Method::POST, path, token(who), Some(body.clone())).await;
            match who {
                Viewer | Approver => assert_problem(&r, 403, "forbidden"),
                _ => assert_problem(&r, 401, "unauthorized"),
            }
        }
        let r = send(
            &f.admin,
            Method::POST,
            path,
            token(Operator),
            Some(body.clone()),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "operator {path}: {}", r.text);
    }
    // Refused attempts changed nothing: only the operator's 5 real mutations
    // (the two dry runs are not mutations) are in the log.
    assert_eq!(audit_rows(&f).await, 5);

    // An admin credential is not a user key, and the public app has no admin routes.
    let r = send(&f.public, Method::GET, "/v1/jobs", token(Operator), None).await;
    assert_problem(&r, 404, "not-found");
    // Malformed Authorization headers.
    for value in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "lfa_x_y"] {
        let r = f
            .admin
            .get("/v1/jobs")
            .header(header::AUTHORIZATION, value)
            .send()
            .await;
        assert_problem(&into_reply(r.0).await, 401, "unauthorized");
    }
}

#[tokio::test]
async fn users_see_only_their_own_balances_as_strings() {
    let f = fixture().await;
    let r = send(
        &f.public,
        Method::GET,
        "/v1/accounts/me/balances",
        Some(&f.keys.user_a),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let balances = r.json["balances"].as_array().unwrap();
    assert_eq!(balances.len(), 2);
    assert_eq!(balances[0]["asset"], "BTC");
    assert_eq!(balances[0]["balance"], "0.10000000");
    assert_eq!(balances[0]["available"], "0.10000000");
    assert_eq!(balances[1]["asset"], "USD");
    assert_eq!(balances[1]["balance"], "250.50");
    assert_eq!(balances[1]["held"], "0.00");
    for b in balances {
        let id: uuid::Uuid = b["account_id"].as_str().unwrap().parse().unwrap();
        assert!(f.accounts_a.contains(&id));
    }
    let r = send(
        &f.public,
        Method::GET,
        "/v1/accounts/me/balances",
        Some(&f.keys.user_b),
        None,
    )
    .await;
    let balances = r.json["balances"].as_array().unwrap();
    assert_eq!(balances.len(), 1);
    assert_eq!(balances[0]["balance"], "7.00");
    for b in balances {
        let id: uuid::Uuid = b["account_id"].as_str().unwrap().parse().unwrap();
        assert!(!f.accounts_a.contains(&id));
    }
}

// ------------------------------------------------------------- audit

#[tokio::test]
async fn a_mutation_writes_exactly_one_audit_row_and_a_refused_one_none() {
    let f = fixture().await;
    let op = Some(f.keys.operator.as_str());
    let id = insert(&f.store, "q", "k", json!({})).await;

    // Cancel: job cancelled + one audit row with who/what/why.
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/jobs/{id}/cancel"),
        op,
        Some(json!({"reason": "  customer asked  "})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["job"]["state"], "cancelled");
    assert_eq!(state_of(&f.store, id).await, JobState::Cancelled);
    let row: (String, String, String, String, String, String, Value) = sqlx::query_as(
        "SELECT admin_name, admin_role, action, target_type, target_id, reason, details FROM audit_log",
    )
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (
            row.0.as_str(),
            row.1.as_str(),
            row.2.as_str(),
            row.3.as_str()
        ),
        ("otto", "operator", "job.cancel", "job")
    );
    assert_eq!(row.4, id.to_string());
    assert_eq!(row.5, "customer asked");
    assert_eq!(row.6["state_after"], "cancelled");
    assert_eq!(r.json["audit_id"].as_str().unwrap().len(), 36);

    // Cancelling again is a conflict: 409, nothing written.
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/jobs/{id}/cancel"),
        op,
        reason(),
    )
    .await;
    assert_problem(&r, 409, "conflict");
    assert_eq!(audit_rows(&f).await, 1);

    // Retry of a running job: 409, job still running, no audit row.
    let running = insert(&f.store, "busy", "k", json!({})).await;
    let lease = claim(&f.store, "busy").await;
    assert_eq!(lease.job_id, running);
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/jobs/{running}/retry"),
        op,
        reason(),
    )
    .await;
    assert_problem(&r, 409, "conflict");
    assert_eq!(state_of(&f.store, running).await, JobState::Running);
    assert_eq!(audit_rows(&f).await, 1);

    // Unknown job: 404, nothing written.
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/jobs/{}/retry", uuid::Uuid::now_v7()),
        op,
        reason(),
    )
    .await;
    assert_problem(&r, 404, "not-found");

    // Missing, blank or oversized reason: 400, nothing changed.
    for body in [
        json!({}),
        json!({"reason": ""}),
        json!({"reason": " \n\t"}),
        json!({"reason": "x".repeat(1001)}),
    ] {
        let r = send(
            &f.admin,
            Method::POST,
            &format!("/v1/jobs/{id}/retry"),
            op,
            Some(body),
        )
        .await;
        assert_problem(&r, 400, "validation");
    }
    assert_eq!(state_of(&f.store, id).await, JobState::Cancelled);
    assert_eq!(audit_rows(&f).await, 1);

    // Retry it for real, then the audit log lists both, newest first.
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/jobs/{id}/retry"),
        op,
        reason(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(state_of(&f.store, id).await, JobState::Available);
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/audit",
        Some(&f.keys.viewer),
        None,
    )
    .await;
    let items = r.json["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["action"], "job.retry");
    assert_eq!(items[1]["action"], "job.cancel");
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/audit?limit=1&action=job.cancel",
        Some(&f.keys.viewer),
        None,
    )
    .await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 1);
    assert!(r.json["next_cursor"].is_null());

    // Queue pause/resume, audited too (a queue exists once it has a job).
    insert(&f.store, "mail", "email.send", json!({})).await;
    let r = send(
        &f.admin,
        Method::POST,
        "/v1/queues/mail/pause",
        op,
        reason(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(f.store.queue_is_paused("mail").await.unwrap());
    let r = send(&f.admin, Method::GET, "/v1/queues", op, None).await;
    let mail = r.json["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "mail")
        .cloned()
        .unwrap();
    assert_eq!(mail["paused"], true);
    let r = send(
        &f.admin,
        Method::POST,
        "/v1/queues/mail/resume",
        op,
        reason(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!f.store.queue_is_paused("mail").await.unwrap());
    assert_eq!(audit_rows(&f).await, 4);

    // Issue 12 (5): a queue that does not exist is a 404, and neither
    // created, paused nor audited.
    for action in ["pause", "resume"] {
        let r = send(
            &f.admin,
            Method::POST,
            &format!("/v1/queues/no-such-queue/{action}"),
            op,
            reason(),
        )
        .await;
        assert_problem(&r, 404, "not-found");
    }
    assert!(!f.store.queue_is_paused("no-such-queue").await.unwrap());
    let r = send(&f.admin, Method::GET, "/v1/queues", op, None).await;
    assert!(
        !r.json["queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == "no-such-queue"),
        "{}",
        r.text
    );
    assert_eq!(audit_rows(&f).await, 4);

    // The log is append-only.
    let e = sqlx::query("DELETE FROM audit_log")
        .execute(&f.db.pool)
        .await;
    assert!(e.is_err());
}

#[tokio::test]
async fn the_change_and_its_audit_row_commit_together() {
    let f = fixture().await;
    let id = insert(&f.store, "q", "k", json!({})).await;
    // Make every audit insert fail: the change must roll back with it, and
    // the client must see a generic 500, not the database's words.
    sqlx::raw_sql(
        "CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'secret internal detail: audit_log is broken'; END $$;
         CREATE TRIGGER test_fail BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION test_fail();",
    )
    .execute(&f.db.pool)
    .await
    .unwrap();
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/jobs/{id}/cancel"),
        Some(&f.keys.operator),
        reason(),
    )
    .await;
    assert_problem(&r, 500, "internal");
    assert!(
        !r.text.contains("secret") && !r.text.contains("audit_log"),
        "{}",
        r.text
    );
    assert_eq!(state_of(&f.store, id).await, JobState::Available);

    let r = send(
        &f.admin,
        Method::POST,
        "/v1/queues/q/pause",
        Some(&f.keys.operator),
        reason(),
    )
    .await;
    assert_problem(&r, 500, "internal");
    assert!(!f.store.queue_is_paused("q").await.unwrap());
}

// -------------------------------------------------------------- bulk

#[tokio::test]
async fn bulk_retry_dry_run_counts_without_changing_anything() {
    let f = fixture().await;
    let op = Some(f.keys.operator.as_str());
    let mut cancelled = Vec::new();
    {
        let mut conn = f.db.pool.acquire().await.unwrap();
        for i in 0..3 {
            let id = insert(&f.store, "bulk", "report", json!({"n": i})).await;
            f.store.job_cancel_in(&mut conn, id, "setup").await.unwrap();
            cancelled.push(id);
        }
    }
    let other_queue = insert(&f.store, "other", "report", json!({})).await;
    {
        let mut conn = f.db.pool.acquire().await.unwrap();
        f.store
            .job_cancel_in(&mut conn, other_queue, "setup")
            .await
            .unwrap();
    }
    insert(&f.store, "bulk", "report", json!({})).await;
    let running = claim(&f.store, "bulk").await.job_id;

    let dry = json!({"filter": {"queue": "bulk"}, "dry_run": true});
    let r = send(&f.admin, Method::POST, "/v1/jobs/bulk-retry", op, Some(dry)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["count"], 3);
    assert_eq!(r.json["dry_run"], true);
    for id in &cancelled {
        assert_eq!(state_of(&f.store, *id).await, JobState::Cancelled);
    }
    assert_eq!(audit_rows(&f).await, 0);

    // States narrow the selection; a state the action can't apply to matches nothing.
    let r = send(
        &f.admin,
        Method::POST,
        "/v1/jobs/bulk-retry",
        op,
        Some(json!({"filter": {"queue": "bulk", "states": ["running"]}, "dry_run": true})),
    )
    .await;
    assert_eq!(r.json["count"], 0);

    // A real run needs a reason.
    let r = send(
        &f.admin,
        Method::POST,
        "/v1/jobs/bulk-retry",
        op,
        Some(json!({"filter": {"queue": "bulk"}})),
    )
    .await;
    assert_problem(&r, 400, "validation");

    let r = send(
        &f.admin,
        Method::POST,
        "/v1/jobs/bulk-retry",
        op,
        Some(json!({"filter": {"queue": "bulk"}, "reason": "provider back up"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["count"], 3);
    for id in &cancelled {
        assert_eq!(state_of(&f.store, *id).await, JobState::Available);
    }
    assert_eq!(state_of(&f.store, other_queue).await, JobState::Cancelled);
    assert_eq!(state_of(&f.store, running).await, JobState::Running);
    assert_eq!(audit_rows(&f).await, 1);
    let details: Value = sqlx::query_scalar("SELECT details FROM audit_log")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(details["count"], 3);
    assert_eq!(details["filter"]["queue"], "bulk");

    // Bulk cancel takes the running one too (its lease is revoked).
    let r = send(
        &f.admin,
        Method::POST,
        "/v1/jobs/bulk-cancel",
        op,
        Some(json!({"filter": {"queue": "bulk"}, "reason": "drain"})),
    )
    .await;
    assert_eq!(r.json["count"], 4, "{}", r.text);
    assert_eq!(state_of(&f.store, running).await, JobState::Cancelled);
    assert_eq!(audit_rows(&f).await, 2);
}

// ----------------------------------------------------- listing & hostile input

#[tokio::test]
async fn listing_filters_sorts_and_paginates() {
    let f = fixture().await;
    let v = Some(f.keys.viewer.as_str());
    let mut ids = Vec::new();
    for i in 0..5 {
        let job = NewJob::new("report", json!({"n": i}))
            .queue("pages")
            .priority(i16::try_from(i % 2).unwrap());
        ids.push(f.store.job_insert(&job).await.unwrap().id());
    }
    insert(
        &f.store,
        "elsewhere",
        "email.send",
        json!({"note": "50% off"}),
    )
    .await;
    insert(
        &f.store,
        "elsewhere",
        "email.send",
        json!({"note": "500 off"}),
    )
    .await;

    // Walk every page, newest first.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/jobs?queue=pages&limit=2".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let r = send(&f.admin, Method::GET, &path, v, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        for item in r.json["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap());
        }
        match r.json["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    // Ascending by priority, paged: priority 0 ones first, each group by id.
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/jobs?queue=pages&sort=priority&order=asc&limit=3",
        v,
        None,
    )
    .await;
    let items = r.json["items"].as_array().unwrap();
    assert_eq!(
        items
            .iter()
            .map(|j| j["priority"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 0, 0]
    );
    let c = r.json["next_cursor"].as_str().unwrap().to_string();
    let r = send(
        &f.admin,
        Method::GET,
        &format!("/v1/jobs?queue=pages&sort=priority&order=asc&limit=3&cursor={c}"),
        v,
        None,
    )
    .await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 2);
    // A cursor from another order is refused.
    let r = send(
        &f.admin,
        Method::GET,
        &format!("/v1/jobs?queue=pages&limit=3&cursor={c}"),
        v,
        None,
    )
    .await;
    assert_problem(&r, 400, "validation");

    // State and kind filters; `%` in a search is literal.
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/jobs?state=available,retryable&kind=email.send",
        v,
        None,
    )
    .await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 2);
    let r = send(&f.admin, Method::GET, "/v1/jobs?q=0%25%20off", v, None).await;
    let items = r.json["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", r.text);
    assert_eq!(items[0]["args"]["note"], "50% off");
    let r = send(&f.admin, Method::GET, "/v1/jobs?q=5_0", v, None).await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 0);

    // Created-at range.
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/jobs?created_after=2100-01-01T00:00:00Z",
        v,
        None,
    )
    .await;
    assert_eq!(r.json["items"].as_array().unwrap().len(), 0);
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/jobs?created_after=2100-01-01T00:00:00Z&created_before=2000-01-01T00:00:00Z",
        v,
        None,
    )
    .await;
    assert_problem(&r, 400, "validation");

    // Detail with attempts.
    let lease = claim(&f.store, "elsewhere").await;
    f.store
        .job_finish(&lease, &Outcome::retry("smtp timeout"))
        .await
        .unwrap();
    let r = send(
        &f.admin,
        Method::GET,
        &format!("/v1/jobs/{}", lease.job_id),
        v,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["job"]["state"], "retryable");
    let attempts = r.json["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["outcome"], "retry");
    assert_eq!(attempts[0]["error"], "smtp timeout");
    let r = send(&f.admin, Method::GET, "/v1/jobs/not-a-uuid", v, None).await;
    assert_problem(&r, 400, "validation");
}
