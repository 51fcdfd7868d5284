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
    let task = ops::serve_with(
        addr,
        db.pool.clone(),
        Vec::new(),
        Some(source),
        prometheus::Registry::new(),
    )
    .await
    .unwrap();
    let text = http_get(port, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(r#"ledgerflow_queue_jobs{queue="mail",state="available"} 1"#),
        "{text}"
    );
    // One name per thing: the worker's old `ledgerflow_jobs` is the API's gauge now.
    assert!(!text.contains("ledgerflow_jobs{"), "{text}");
    for family in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert_eq!(
            text.lines().filter(|l| *l == family).count(),
            1,
            "{family} twice"
        );
    }
    task.abort();
}

/// A process without the api role: the ops endpoint reads `ledgerflow_queue_jobs` itself
/// (the API's name, not a second one) and serves the process registry, where the runner
/// records each attempt's duration and outcome and its claim-to-start wait.
#[tokio::test]
async fn a_worker_process_serves_queue_depth_and_its_job_metrics() {
    use ledgerflow_engine::Outcome;
    use ledgerflow_workers::metrics::{CronMetrics, RelayMetrics, RunnerMetrics};
    use ledgerflow_workers::{JobContext, QueueConfig, Registry, Runner, RunnerConfig};
    use std::time::Duration;

    let db = TestDb::new().await.unwrap();
    let store = Store::new(db.pool.clone());
    for kind in ["email.send", "email.send", "email.bounce"] {
        store
            .job_insert(&NewJob::new(kind, serde_json::json!({})).queue("mail"))
            .await
            .unwrap();
    }
    store
        .job_insert(&NewJob::new("report.build", serde_json::json!({})).queue("reports"))
        .await
        .unwrap();
    let process = prometheus::Registry::new();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let task = ops::serve_with(addr, db.pool.clone(), Vec::new(), None, process.clone())
        .await
        .unwrap();

    // Before any worker: the queue's depth, under the one name.
    let text = http_get(port, "/metrics").await;
    assert!(
        text.contains(r#"ledgerflow_queue_jobs{queue="mail",state="available"} 3"#),
        "{text}"
    );
    // A live queue has all four states, 0 where it has no job: its series do not come and go.
    for state in ["scheduled", "retryable", "running"] {
        assert!(
            text.contains(&format!(
                r#"ledgerflow_queue_jobs{{queue="mail",state="{state}"}} 0"#
            )),
            "{text}"
        );
    }
    assert!(!text.contains("ledgerflow_jobs{"), "{text}");

    let registry = Registry::new()
        .register("email.send", |_: JobContext| async { Outcome::Complete })
        .register("email.bounce", |_: JobContext| async {
            Outcome::fail("mailbox gone")
        });
    let config = RunnerConfig {
        queues: vec![QueueConfig::new("mail", 4)],
        poll_interval: Duration::from_millis(50),
        metrics: Some(RunnerMetrics::new(&process).unwrap()),
        ..RunnerConfig::default()
    };
    // The other roles' metrics register beside the runner's without a clash.
    CronMetrics::new(&process).unwrap();
    RelayMetrics::new(&process).unwrap();
    let runner = Runner::start(store.clone(), registry, config)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = http_get(port, "/metrics").await;
        if text.contains(r#"ledgerflow_queue_jobs{queue="reports",state="available"} 1"#)
            && !text.contains(r#"ledgerflow_queue_jobs{queue="mail""#)
            && text.contains(r#"outcome="fail""#)
        {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let sample = |series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
    };
    assert_eq!(
        sample(
            r#"ledgerflow_job_duration_seconds_count{kind="email.send",outcome="complete",queue="mail"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            r#"ledgerflow_job_duration_seconds_count{kind="email.bounce",outcome="fail",queue="mail"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(r#"ledgerflow_job_claim_to_start_seconds_count{queue="mail"}"#),
        Some(3.0),
        "{text}"
    );
    // Families without a label are there from the start, at zero.
    assert_eq!(
        sample("ledgerflow_outbox_relay_lag_seconds_count"),
        Some(0.0)
    );
    assert_eq!(
        sample("ledgerflow_outbox_publish_failures_total"),
        Some(0.0)
    );
    for family in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert_eq!(
            text.lines().filter(|l| *l == family).count(),
            1,
            "{family} twice"
        );
    }
    runner.shutdown(Duration::from_secs(5)).await;
    task.abort();
}
