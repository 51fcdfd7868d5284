//! The admin API's withdrawal policy, `/v1/me`, admin and API-key
//! management, and what the Approvals list shows, in-process against a real
//! Postgres: the role matrix over every new route, validation (amounts are
//! strings, never numbers), one audit row with the reason per change (none
//! for a refusal), credentials that work or stop working at once, and the
//! four-eyes refusals of a second approval by the same admin.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use ledgerflow_api::{ApiConfig, AppState, admin_app};
use ledgerflow_engine::Store;
use ledgerflow_engine::testing::TestDb;
use ledgerflow_payments::policy::{AssetPolicy, Policy};
use ledgerflow_payments::users::{self, AdminRole};
use poem::endpoint::BoxEndpoint;
use poem::http::{Method, header};
use poem::test::TestClient;
use poem::{EndpointExt, Response};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use uuid::Uuid;

type App = TestClient<BoxEndpoint<'static, Response>>;

struct Fixture {
    db: TestDb,
    admin: App,
    viewer: String,
    operator: String,
    approver: String,
    approver2: String,
    security: String,
    security_id: Uuid,
    user_id: Uuid,
    user_key_id: Uuid,
    user_key: String,
}

/// BTC configured: one approver above 1, two above 2.
fn configured() -> Policy {
    Policy::from([(
        "BTC".to_string(),
        AssetPolicy {
            approval_threshold: Some(Decimal::new(1, 0)),
            second_approval_threshold: Some(Decimal::new(2, 0)),
            daily_limit: None,
        },
    )])
}

async fn admin(conn: &mut sqlx::PgConnection, name: &str, role: AdminRole) -> (Uuid, String) {
    let (id, key) = users::create_admin(conn, name, role).await.unwrap();
    (id.0, key.expose_secret().to_string())
}

async fn fixture() -> Fixture {
    let db = TestDb::new().await.unwrap();
    let state = AppState::with_config(
        Store::new(db.pool.clone()),
        ApiConfig {
            withdrawal_policy: configured(),
            ..ApiConfig::default()
        },
    )
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let user = users::create_user(&mut conn, "erin@example.com", "Erin")
        .await
        .unwrap();
    let (user_key_id, user_key) = users::create_api_key(&mut conn, user, None).await.unwrap();
    let (_, viewer) = admin(&mut conn, "vera", AdminRole::Viewer).await;
    let (_, operator) = admin(&mut conn, "otto", AdminRole::Operator).await;
    let (_, approver) = admin(&mut conn, "anna", AdminRole::Approver).await;
    let (_, approver2) = admin(&mut conn, "abel", AdminRole::Approver).await;
    let (security_id, security) = admin(&mut conn, "sam", AdminRole::Security).await;
    drop(conn);
    Fixture {
        admin: TestClient::new(admin_app(state).boxed()),
        db,
        viewer,
        operator,
        approver,
        approver2,
        security,
        security_id,
        user_id: user.0,
        user_key_id: user_key_id.0,
        user_key: user_key.expose_secret().to_string(),
    }
}

struct Reply {
    status: u16,
    text: String,
    json: Value,
}

async fn send(f: &Fixture, method: Method, path: &str, key: &str, body: Option<Value>) -> Reply {
    let mut req = f
        .admin
        .request(method, path)
        .header(header::AUTHORIZATION, format!("Bearer {key}"));
    if let Some(body) = body {
        req = req.body_json(&body);
    }
    let resp = req.send().await.0;
    let status = resp.status().as_u16();
    let text = resp.into_body().into_string().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply { status, text, json }
}

fn problem(r: &Reply, status: u16, slug: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(
        r.json["type"],
        format!("https://ledgerflow.dev/problems/{slug}"),
        "{}",
        r.text
    );
}

async fn audits(f: &Fixture, action: &str) -> Vec<(String, String, Value)> {
    sqlx::query_as(
        "SELECT admin_name, reason, details FROM audit_log WHERE action = $1 ORDER BY created_at",
    )
    .bind(action)
    .fetch_all(&f.db.pool)
    .await
    .unwrap()
}

async fn audit_total(f: &Fixture) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&f.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn me_names_the_admin_their_role_and_rights() {
    let f = fixture().await;
    for (key, name, role, rights) in [
        (&f.viewer, "vera", "viewer", json!(["read"])),
        (&f.operator, "otto", "operator", json!(["read", "operate"])),
        (&f.approver, "anna", "approver", json!(["read", "approve"])),
        (
            &f.security,
            "sam",
            "security",
            json!(["read", "administer"]),
        ),
    ] {
        let r = send(&f, Method::GET, "/v1/me", key, None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["name"], name);
        assert_eq!(r.json["role"], role);
        assert_eq!(r.json["permissions"], rights);
    }
    let r = send(&f, Method::GET, "/v1/me", &f.user_key, None).await;
    problem(&r, 401, "unauthorized");
}

#[tokio::test]
async fn the_policy_is_read_by_all_changed_by_security_validated_and_audited() {
    let f = fixture().await;
    let r = send(&f, Method::GET, "/v1/withdrawal-policies", &f.viewer, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let btc = r.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["asset"] == "BTC")
        .unwrap()
        .clone();
    assert_eq!(btc["approval_threshold"], "1");
    assert_eq!(btc["second_approval_threshold"], "2");
    assert_eq!(btc["source"], "config");

    let path = "/v1/withdrawal-policies/BTC";
    let good = json!({ "approval_threshold": "0.5", "second_approval_threshold": "1.5",
                       "daily_limit": "4", "reason": "audit finding 7" });
    let before = audit_total(&f).await;
    for key in [&f.viewer, &f.operator, &f.approver] {
        let r = send(&f, Method::PUT, path, key, Some(good.clone())).await;
        problem(&r, 403, "forbidden");
    }
    for (bad, why) in [
        (
            json!({ "approval_threshold": 0.5, "reason": "x" }),
            "a float",
        ),
        (
            json!({ "approval_threshold": 1, "reason": "x" }),
            "a number",
        ),
        (
            json!({ "approval_threshold": "-1", "reason": "x" }),
            "negative",
        ),
        (
            json!({ "approval_threshold": "1e3", "reason": "x" }),
            "exponent",
        ),
        (
            json!({ "approval_threshold": "0.000000001", "reason": "x" }),
            "finer than the scale",
        ),
        (
            json!({ "approval_threshold": "3", "second_approval_threshold": "2", "reason": "x" }),
            "second below first",
        ),
        (
            json!({ "second_approval_threshold": "2", "reason": "x" }),
            "second without first",
        ),
        (
            json!({ "approval_threshold": "1", "reason": " " }),
            "no reason",
        ),
        (json!({ "approval_threshold": "1" }), "reason missing"),
        (
            json!({ "approval_threshold": "1", "reason": "x", "limit": "2" }),
            "unknown field",
        ),
    ] {
        let r = send(&f, Method::PUT, path, &f.security, Some(bad)).await;
        assert_eq!(r.status, 400, "{why}: {}", r.text);
    }
    let r = send(
        &f,
        Method::PUT,
        "/v1/withdrawal-policies/XYZ",
        &f.security,
        Some(good.clone()),
    )
    .await;
    problem(&r, 404, "not-found");
    assert_eq!(audit_total(&f).await, before, "refusals write no audit row");

    let r = send(&f, Method::PUT, path, &f.security, Some(good)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["policy"]["source"], "admin");
    assert_eq!(r.json["policy"]["approval_threshold"], "0.5");
    assert_eq!(r.json["policy"]["updated_by"], "sam");
    let rows = audits(&f, "withdrawal_policy.set").await;
    assert_eq!(rows.len(), 1);
    let (who, reason, details) = &rows[0];
    assert_eq!((who.as_str(), reason.as_str()), ("sam", "audit finding 7"));
    assert_eq!(details["before"]["approval_threshold"], "1");
    assert_eq!(details["before_source"], "config");
    assert_eq!(details["after"]["second_approval_threshold"], "1.5");
    assert_eq!(details["after"]["daily_limit"], "4");

    // Reset: the configuration applies again, audited; a second reset changes nothing.
    let reset = "/v1/withdrawal-policies/BTC/reset";
    let r = send(
        &f,
        Method::POST,
        reset,
        &f.operator,
        Some(json!({"reason": "x"})),
    )
    .await;
    problem(&r, 403, "forbidden");
    let r = send(
        &f,
        Method::POST,
        reset,
        &f.security,
        Some(json!({"reason": "back"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["policy"]["source"], "config");
    assert!(r.json["audit_id"].is_string());
    let r = send(
        &f,
        Method::POST,
        reset,
        &f.security,
        Some(json!({"reason": "again"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json.get("audit_id").is_none(), "{}", r.text);
    assert_eq!(audits(&f, "withdrawal_policy.reset").await.len(), 1);
}

#[tokio::test]
async fn security_manages_admins_and_every_change_is_audited() {
    let f = fixture().await;
    let create = json!({ "name": "nina", "role": "approver", "user_email": "erin@example.com",
                         "reason": "new hire" });
    let before = audit_total(&f).await;
    for key in [&f.viewer, &f.operator, &f.approver] {
        let r = send(&f, Method::POST, "/v1/admins", key, Some(create.clone())).await;
        problem(&r, 403, "forbidden");
        let r = send(&f, Method::GET, "/v1/admins", key, None).await;
        problem(&r, 403, "forbidden");
    }
    for (bad, status) in [
        (json!({ "name": "x", "role": "root", "reason": "r" }), 400),
        (json!({ "name": "x", "role": "viewer", "reason": "" }), 400),
        (
            json!({ "name": "x", "role": "viewer", "user_email": "nobody@example.com",
                    "reason": "r" }),
            400,
        ),
        (
            json!({ "name": "anna", "role": "viewer", "reason": "r" }),
            409,
        ),
    ] {
        let r = send(
            &f,
            Method::POST,
            "/v1/admins",
            &f.security,
            Some(bad.clone()),
        )
        .await;
        assert_eq!(r.status, status, "{bad}: {}", r.text);
    }
    assert_eq!(audit_total(&f).await, before, "refusals write no audit row");

    let r = send(&f, Method::POST, "/v1/admins", &f.security, Some(create)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let nina_id = r.json["admin"]["id"].as_str().unwrap().to_string();
    let nina_key = r.json["credential"].as_str().unwrap().to_string();
    assert_eq!(r.json["admin"]["user_id"], f.user_id.to_string());
    assert_eq!(r.json["admin"]["user_email"], "erin@example.com");
    let me = send(&f, Method::GET, "/v1/me", &nina_key, None).await;
    assert_eq!(me.json["role"], "approver", "{}", me.text);
    let listed = send(&f, Method::GET, "/v1/admins", &f.security, None).await;
    let names: Vec<&str> = listed.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["abel", "anna", "nina", "otto", "sam", "vera"]);

    // Rotate: the old credential stops working, the new one works.
    let rotate = format!("/v1/admins/{nina_id}/rotate");
    let r = send(
        &f,
        Method::POST,
        &rotate,
        &f.approver,
        Some(json!({"reason": "x"})),
    )
    .await;
    problem(&r, 403, "forbidden");
    let r = send(
        &f,
        Method::POST,
        &rotate,
        &f.security,
        Some(json!({"reason": "lost"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rotated = r.json["credential"].as_str().unwrap().to_string();
    let r = send(&f, Method::GET, "/v1/me", &nina_key, None).await;
    problem(&r, 401, "unauthorized");
    let r = send(&f, Method::GET, "/v1/me", &rotated, None).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Disable: the credential stops working; not oneself; twice changes nothing.
    let own = format!("/v1/admins/{}/disable", f.security_id);
    let r = send(
        &f,
        Method::POST,
        &own,
        &f.security,
        Some(json!({"reason": "x"})),
    )
    .await;
    problem(&r, 403, "forbidden");
    let disable = format!("/v1/admins/{nina_id}/disable");
    let r = send(
        &f,
        Method::POST,
        &disable,
        &f.security,
        Some(json!({"reason": "left"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["changed"], true);
    assert!(r.json["admin"]["disabled_at"].is_string());
    let r = send(&f, Method::GET, "/v1/me", &rotated, None).await;
    problem(&r, 401, "unauthorized");
    let r = send(
        &f,
        Method::POST,
        &disable,
        &f.security,
        Some(json!({"reason": "x"})),
    )
    .await;
    assert_eq!(r.json["changed"], false, "{}", r.text);
    let r = send(
        &f,
        Method::POST,
        &rotate,
        &f.security,
        Some(json!({"reason": "x"})),
    )
    .await;
    problem(&r, 409, "conflict");
    let missing = format!("/v1/admins/{}/disable", Uuid::now_v7());
    let r = send(
        &f,
        Method::POST,
        &missing,
        &f.security,
        Some(json!({"reason": "x"})),
    )
    .await;
    problem(&r, 404, "not-found");

    for (action, reason) in [
        ("admin.create", "new hire"),
        ("admin.rotate_credential", "lost"),
        ("admin.disable", "left"),
    ] {
        let rows = audits(&f, action).await;
        assert_eq!(rows.len(), 1, "{action}");
        assert_eq!((rows[0].0.as_str(), rows[0].1.as_str()), ("sam", reason));
    }
    // The audit log never holds a credential.
    let log: String = sqlx::query_scalar("SELECT string_agg(details::text, ' ') FROM audit_log")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    let secret = rotated.rsplit('_').next().unwrap();
    assert!(!log.contains(secret));
}

#[tokio::test]
async fn security_lists_and_revokes_api_keys_audited() {
    let f = fixture().await;
    let list = "/v1/api-keys?email=erin@example.com";
    let r = send(&f, Method::GET, list, &f.operator, None).await;
    problem(&r, 403, "forbidden");
    let r = send(&f, Method::GET, list, &f.security, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["items"][0]["id"], f.user_key_id.to_string());
    assert!(
        r.json["items"][0]["prefix"]
            .as_str()
            .unwrap()
            .starts_with("lf_")
    );
    let r = send(
        &f,
        Method::GET,
        "/v1/api-keys?email=no@x.y",
        &f.security,
        None,
    )
    .await;
    problem(&r, 404, "not-found");

    let revoke = format!("/v1/api-keys/{}/revoke", f.user_key_id);
    let r = send(
        &f,
        Method::POST,
        &revoke,
        &f.approver,
        Some(json!({"reason": "x"})),
    )
    .await;
    problem(&r, 403, "forbidden");
    let r = send(
        &f,
        Method::POST,
        &revoke,
        &f.security,
        Some(json!({"reason": "leaked"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["changed"], true);
    assert!(r.json["key"]["revoked_at"].is_string());
    let user = users::authenticate_api_key(&f.db.pool, &f.user_key)
        .await
        .unwrap();
    assert!(user.is_none(), "a revoked key still authenticates");
    let r = send(
        &f,
        Method::POST,
        &revoke,
        &f.security,
        Some(json!({"reason": "x"})),
    )
    .await;
    assert_eq!(r.json["changed"], false, "{}", r.text);
    let missing = format!("/v1/api-keys/{}/revoke", Uuid::now_v7());
    let r = send(
        &f,
        Method::POST,
        &missing,
        &f.security,
        Some(json!({"reason": "x"})),
    )
    .await;
    problem(&r, 404, "not-found");
    let rows = audits(&f, "api_key.revoke").await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].0.as_str(), rows[0].1.as_str()), ("sam", "leaked"));
    assert_eq!(rows[0].2["user_id"], f.user_id.to_string());
}

#[tokio::test]
async fn approvals_show_names_and_need_two_distinct_approvers_above_the_second_threshold() {
    let f = fixture().await;
    let w = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO withdrawals (id, user_id, asset, amount, address, status,
                                  requires_approval, approvals_required)
         VALUES ($1, $2, 'BTC', 2.5, 'addr-1', 'awaiting_approval', true, 2)",
    )
    .bind(w)
    .bind(f.user_id)
    .execute(&f.db.pool)
    .await
    .unwrap();
    let approve = format!("/v1/withdrawals/{w}/approve");
    let r = send(
        &f,
        Method::POST,
        &approve,
        &f.security,
        Some(json!({"reason": "x"})),
    )
    .await;
    problem(&r, 403, "forbidden");
    let r = send(
        &f,
        Method::POST,
        &approve,
        &f.approver,
        Some(json!({"reason": "ok"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["decision"], "approval_recorded");
    assert_eq!(
        (
            r.json["approvals"].clone(),
            r.json["approvals_required"].clone()
        ),
        (json!(1), json!(2))
    );

    let pending = send(&f, Method::GET, "/v1/withdrawals/pending", &f.viewer, None).await;
    let item = &pending.json["items"][0];
    assert_eq!(item["id"], w.to_string(), "{}", pending.text);
    assert_eq!(item["user_email"], "erin@example.com");
    assert_eq!(item["approvals_required"], 2);
    assert_eq!(item["approved_by"], json!(["anna"]));

    let r = send(
        &f,
        Method::POST,
        &approve,
        &f.approver,
        Some(json!({"reason": "again"})),
    )
    .await;
    problem(&r, 403, "four-eyes");
    assert_eq!(audits(&f, "withdrawal.approve").await.len(), 1);
    let r = send(
        &f,
        Method::POST,
        &approve,
        &f.approver2,
        Some(json!({"reason": "ok"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["decision"], "approved");
    let status: String = sqlx::query_scalar("SELECT status FROM withdrawals WHERE id = $1")
        .bind(w)
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "approved");
    assert_eq!(audits(&f, "withdrawal.approve").await.len(), 2);
}

#[tokio::test]
async fn security_and_approvers_do_not_operate_and_the_docs_agree() {
    let f = fixture().await;
    let before = audit_total(&f).await;
    for key in [&f.security, &f.approver] {
        let r = send(
            &f,
            Method::POST,
            "/v1/queues/default/pause",
            key,
            Some(json!({"reason": "x"})),
        )
        .await;
        problem(&r, 403, "forbidden");
    }
    assert_eq!(audit_total(&f).await, before);
    // The role's documentation says what the code does (read and approve, no operating).
    let doc = include_str!("../../workflows/payments/src/users.rs");
    assert!(!doc.contains("Operator rights plus approving"));
    assert!(doc.contains("no operator actions (retry, cancel, pause, resolve)"));
}

/// The dev smoke's schemathesis pass found `GET /v1/dead-letters?topic=%00`
/// answered 500: Postgres refuses a NUL byte in text. It is the client's input.
#[tokio::test]
async fn text_the_database_refuses_is_a_400_not_a_500() {
    let f = fixture().await;
    for path in ["/v1/dead-letters?topic=%1C%00O%10", "/v1/jobs?queue=a%00b"] {
        let r = send(&f, Method::GET, path, &f.viewer, None).await;
        problem(&r, 400, "validation");
    }
}
