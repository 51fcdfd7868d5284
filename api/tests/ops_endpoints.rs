//! The ops endpoints of the API process in-process and on real sockets:
//! health, readiness (without leaking why it fails), graceful shutdown.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

#[path = "common/admin_fixture.rs"]
mod fixture;
use fixture::*;

#[tokio::test]
async fn ops_endpoints_work() {
    let f = fixture().await;
    insert(&f.store, "mail", "email.send", json!({})).await;

    let r = send(&f.public, Method::GET, "/healthcheck", None, None).await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::OK, "ok"));
    let r = send(&f.admin, Method::GET, "/healthcheck", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(&f.admin, Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::OK);

    let r = send(&f.public, Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["checks"]["postgres"], "ok");

    // Some traffic, then the scrape shows it, by route template.
    let path = format!("/v1/jobs/{}", uuid::Uuid::now_v7());
    send(&f.admin, Method::GET, &path, Some(&f.keys.viewer), None).await;
    // Issue 12 (5): queue names, states and volumes are not for the
    // internet: the public listener serves no metrics; the admin one does
    // (and the binary's ops port).
    let r = send(&f.public, Method::GET, "/metrics", None, None).await;
    assert_problem(&r, 404, "not-found");
    assert!(!r.text.contains("ledgerflow_queue_jobs"));
    let r = send(&f.admin, Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type.starts_with("text/plain"));
    assert!(
        r.text
            .contains(r#"ledgerflow_queue_jobs{queue="mail",state="available"} 1"#),
        "{}",
        r.text
    );
    assert!(
        r.text
            .contains(r#"ledgerflow_queue_jobs{queue="mail",state="running"} 0"#),
        "{}",
        r.text
    );
    assert!(
        r.text.contains(r#"http_requests_total{listener="admin",method="GET",route="/v1/jobs/{id}",status="404"} 1"#),
        "{}",
        r.text
    );
    assert!(r.text.contains(r#"route="/readyz""#));
    assert!(r.text.contains("http_request_duration_seconds_bucket"));
    assert!(r.text.contains("ledgerflow_db_pool_connections"));
    assert!(!r.text.contains(&path), "raw paths never become labels");

    for app in [&f.public, &f.admin] {
        let r = send(app, Method::GET, "/openapi.json", None, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.json["openapi"].is_string());
        let r = send(app, Method::GET, "/docs", None, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.text.contains("swagger"),
            "{}",
            &r.text[..r.text.len().min(200)]
        );
    }
}

struct Down;
impl ReadinessCheck for Down {
    fn name(&self) -> &str {
        "kafka"
    }
    fn check(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Err("broker 10.0.0.1:9092 refused".to_string()) })
    }
}

#[tokio::test]
async fn readyz_fails_when_a_check_fails_without_leaking_why() {
    let f = fixture().await;
    let app = TestClient::new(public_app(f.state.clone().with_check(Arc::new(Down))).boxed());
    let r = send(&app, Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json["checks"]["postgres"], "ok");
    assert_eq!(r.json["checks"]["kafka"], "unavailable");
    assert!(!r.text.contains("10.0.0.1"));
}

#[tokio::test]
async fn serve_answers_on_real_sockets_and_shuts_down() {
    let f = fixture().await;
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (pa, aa) = (public.local_addr().unwrap(), admin.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ledgerflow_api::serve_listeners(
        public,
        admin,
        f.state.clone(),
        async {
            let _ = rx.await;
        },
    ));
    for addr in [pa, aa] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthcheck HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("ok"), "{out}");
    }
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
