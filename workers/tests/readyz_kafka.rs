//! `/readyz` of the real `ledgerflow` binary checks Kafka when `KAFKA_BROKERS`
//! is set: ready while the brokers answer (an in-process librdkafka mock
//! cluster, reached over real TCP by the child process), not ready once they
//! are gone, and the body names the failing check without saying why.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use ledgerflow_engine::testing::TestDb;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// `GET path` over HTTP/1.0: the status and the body, or `None` while the
/// server is not listening yet.
async fn get(port: u16, path: &str) -> Option<(u16, serde_json::Value)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    Some((status, serde_json::from_str(body).unwrap_or_default()))
}

/// Polls `/readyz` until it answers `want` (generous deadline: the machine is shared).
async fn wait_for(port: u16, want: u16) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some((status, body)) = get(port, "/readyz").await {
            if status == want {
                return body;
            }
            last = Some((status, body));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("/readyz never answered {want}; last: {last:?}");
}

#[tokio::test]
async fn readyz_follows_the_kafka_brokers() {
    let db = TestDb::new().await.unwrap();
    let cluster = MockCluster::<'static, DefaultProducerContext>::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let admin = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_ledgerflow"))
        .args(["run", "--roles", "admin"])
        .arg(format!("--admin-addr=127.0.0.1:{admin}"))
        .arg(format!("--api-addr=127.0.0.1:{}", free_port()))
        .arg(format!("--ops-addr=127.0.0.1:{}", free_port()))
        .env("DATABASE_URL", &db.url)
        .env("KAFKA_BROKERS", &brokers)
        .env_remove("LEDGERFLOW_EXCHANGE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Guard(child);

    let body = wait_for(admin, 200).await;
    assert_eq!(body["checks"]["postgres"], "ok");
    assert_eq!(body["checks"]["kafka"], "ok");

    drop(cluster); // the brokers go away
    let body = wait_for(admin, 503).await;
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["kafka"], "unavailable");
    assert_eq!(body["checks"]["postgres"], "ok");
    assert_eq!(
        body["checks"].as_object().map(|m| m.len()),
        Some(2),
        "no error text leaks: {body}"
    );
}
