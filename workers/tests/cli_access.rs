//! The shipped `ledgerflow` binary's configuration and credential commands,
//! run as child processes against a real Postgres: the withdrawal policy
//! from `LEDGERFLOW_WITHDRAWAL_POLICY` is what `ledgerflow run` serves (the
//! admin API shows it) and what `ledgerflow withdrawal-policy` prints, a
//! policy with a float is refused at start; `ledgerflow admin create |
//! rotate | disable` and `ledgerflow api-key list | revoke` work without
//! SQL and write their audit rows as the `ledgerflow-cli` admin.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use ledgerflow_engine::testing::TestDb;
use ledgerflow_payments::users::{self, AdminRole};
use serde_json::Value;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POLICY: &str = r#"{"BTC": {"approval-threshold": "0.75", "second-approval-threshold": "3", "daily-limit": "9"}}"#;

/// Kills the child when the test ends, pass or fail.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ledgerflow(db: &TestDb) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ledgerflow"));
    c.env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .env_remove("LEDGERFLOW_WITHDRAWAL_POLICY")
        .env_remove("LEDGERFLOW_WITHDRAWAL_POLICY_FILE")
        .env_remove("LEDGERFLOW_EXCHANGE_URL")
        .env_remove("KAFKA_BROKERS");
    c
}

/// Runs the command; its stdout as JSON when it succeeded.
fn json(out: Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let start = stdout.find('{').unwrap();
    serde_json::from_str(&stdout[start..]).unwrap()
}

/// `GET path` with a bearer credential over HTTP/1.0, or `None` while the
/// server is not listening yet.
async fn get(port: u16, path: &str, token: &str) -> Option<(u16, Value)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req =
        format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    Some((status, serde_json::from_str(body).unwrap_or_default()))
}

#[tokio::test]
async fn the_configured_withdrawal_policy_is_what_the_binary_runs_with() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let (_, token) = users::create_admin(&mut conn, "sam", AdminRole::Security)
        .await
        .unwrap();
    drop(conn);

    // `ledgerflow withdrawal-policy` prints what the configuration says.
    let shown = json(
        ledgerflow(&db)
            .arg("withdrawal-policy")
            .env("LEDGERFLOW_WITHDRAWAL_POLICY", POLICY)
            .output()
            .unwrap(),
    );
    let btc = shown["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["asset"] == "BTC")
        .unwrap();
    assert_eq!(btc["source"], "config");
    assert_eq!(btc["approval_threshold"], "0.75");
    assert_eq!(btc["second_approval_threshold"], "3");
    assert_eq!(btc["daily_limit"], "9");

    // A float, or an unknown key, is refused before anything runs.
    for bad in [
        r#"{"BTC": {"approval-threshold": 0.75}}"#,
        r#"{"BTC": {"approval_threshold": "0.75"}}"#,
    ] {
        let out = ledgerflow(&db)
            .args(["run", "--roles", "admin"])
            .arg(format!("--admin-addr=127.0.0.1:{}", free_port()))
            .arg(format!("--ops-addr=127.0.0.1:{}", free_port()))
            .env("LEDGERFLOW_WITHDRAWAL_POLICY", bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("withdrawal policy"), "{err}");
    }

    // `ledgerflow run` serves the same policy on the admin API.
    let admin = free_port();
    let child = ledgerflow(&db)
        .args(["run", "--roles", "admin"])
        .arg(format!("--admin-addr=127.0.0.1:{admin}"))
        .arg(format!("--ops-addr=127.0.0.1:{}", free_port()))
        .env("LEDGERFLOW_WITHDRAWAL_POLICY", POLICY)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Guard(child);
    let token = token.expose_secret();
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        if let Some((200, body)) = get(admin, "/v1/withdrawal-policies", token).await {
            break body;
        }
        assert!(Instant::now() < deadline, "the admin API never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let btc = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["asset"] == "BTC")
        .unwrap();
    assert_eq!(btc["source"], "config", "{body}");
    assert_eq!(btc["approval_threshold"], "0.75");
    assert_eq!(btc["second_approval_threshold"], "3");
}

#[tokio::test]
async fn admins_and_api_keys_are_managed_without_sql_and_audited() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let user = users::create_user(&mut conn, "fay@example.com", "Fay")
        .await
        .unwrap();
    let (_, key) = users::create_api_key(&mut conn, user, None).await.unwrap();

    let created = json(
        ledgerflow(&db)
            .args(["admin", "create", "--name", "vic", "--role", "viewer"])
            .args(["--user-email", "fay@example.com", "--reason", "new hire"])
            .output()
            .unwrap(),
    );
    let first = created["credential"].as_str().unwrap().to_string();
    assert_eq!(created["admin"]["user_email"], "fay@example.com");
    let vic = users::authenticate_admin(&mut *conn, &first).await.unwrap();
    assert_eq!(vic.map(|a| a.role), Some(AdminRole::Viewer));

    let rotated = json(
        ledgerflow(&db)
            .args([
                "admin",
                "rotate",
                "--name",
                "vic",
                "--reason",
                "lost laptop",
            ])
            .output()
            .unwrap(),
    );
    let second = rotated["credential"].as_str().unwrap().to_string();
    assert!(
        users::authenticate_admin(&mut *conn, &first)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        users::authenticate_admin(&mut *conn, &second)
            .await
            .unwrap()
            .is_some()
    );

    let disabled = json(
        ledgerflow(&db)
            .args(["admin", "disable", "--name", "vic", "--reason", "left"])
            .output()
            .unwrap(),
    );
    assert_eq!(disabled["changed"], true);
    assert!(
        users::authenticate_admin(&mut *conn, &second)
            .await
            .unwrap()
            .is_none()
    );

    let keys = json(
        ledgerflow(&db)
            .args(["api-key", "list", "--email", "fay@example.com"])
            .output()
            .unwrap(),
    );
    let prefix = keys["items"][0]["prefix"].as_str().unwrap().to_string();
    assert!(key.expose_secret().starts_with(&prefix));
    let revoked = json(
        ledgerflow(&db)
            .args(["api-key", "revoke", "--key", &prefix, "--reason", "leaked"])
            .output()
            .unwrap(),
    );
    assert_eq!(revoked["changed"], true);
    let who = users::authenticate_api_key(&mut *conn, key.expose_secret())
        .await
        .unwrap();
    assert!(who.is_none(), "a revoked key still authenticates");

    // A blank reason is refused and changes nothing.
    let out = ledgerflow(&db)
        .args([
            "admin", "create", "--name", "x", "--role", "viewer", "--reason", " ",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());

    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT admin_name, action, reason FROM audit_log ORDER BY created_at, id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let actions: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        actions,
        [
            "admin.create",
            "admin.rotate_credential",
            "admin.disable",
            "api_key.revoke"
        ]
    );
    for (name, action, reason) in &rows {
        assert_eq!(name, "ledgerflow-cli", "{action}");
        assert!(reason.contains("(ledgerflow CLI, run by "), "{reason}");
    }
    assert!(rows[0].2.starts_with("new hire"));
    assert!(rows[3].2.starts_with("leaked"));
}
