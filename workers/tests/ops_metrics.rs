//! The ops endpoint carries the API's metrics (issue 12: the public
//! listener no longer serves `/metrics`, so the scrape of an api process
//! happens on its ops port, as the chart's annotations say).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{NewJob, Store};
use ledgerflow_workers::ops;
use std::net::TcpListener;
use std::sync::Arc;

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

#[tokio::test]
async fn the_ops_port_serves_the_api_metrics_once_each() {
    let db = TestDb::new().await.unwrap();
    let store = Store::new(db.pool.clone());
    store
        .job_insert(&NewJob::new("email.send", serde_json::json!({})).queue("mail"))
        .await
        .unwrap();
    let state = ledgerflow_api::AppState::new(store).unwrap();
    let source: ops::MetricsSource = Arc::new(move || {
        let state = state.clone();
        Box::pin(async move { state.metrics.render(&state.store).await })
    });
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let task = ops::serve_with(addr, db.pool.clone(), Vec::new(), Some(source))
        .await
        .unwrap();
    let text = http_get(port, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(r#"ledgerflow_queue_jobs{queue="mail",state="available"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"ledgerflow_jobs{queue="mail",state="available"} 1"#));
    for family in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert_eq!(
            text.lines().filter(|l| *l == family).count(),
            1,
            "{family} twice"
        );
    }
    task.abort();
}
