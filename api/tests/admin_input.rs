//! Hostile input to the admin (and public) apps against a real Postgres:
//! injection strings, bad bodies, control characters, values the database
//! refuses, page limits, `Allow` and request ids, and the failed-login throttle.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

#[path = "common/admin_fixture.rs"]
mod fixture;
use fixture::*;

#[tokio::test]
async fn injection_strings_are_refused_or_literal_and_change_nothing() {
    let f = fixture().await;
    let v = Some(f.keys.viewer.as_str());
    for i in 0..3 {
        insert(&f.store, "q", "k", json!({"i": i})).await;
    }
    // A queue whose name is an injection string (pausing it below must
    // treat the name literally; an unknown queue would be a 404).
    insert(&f.store, "q'; DROP TABLE queues; --", "k", json!({})).await;
    let before = job_count(&f).await;

    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    // Treated literally: 200, nothing matches.
    for (param, value) in [
        ("q", "'; DROP TABLE jobs; --"),
        ("q", "%' OR '1'='1"),
        ("queue", "q' OR '1'='1"),
        ("kind", "k'); DELETE FROM jobs; --"),
    ] {
        let r = send(
            &f.admin,
            Method::GET,
            &format!("/v1/jobs?{param}={}", enc(value)),
            v,
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{param}={value}: {}", r.text);
        assert_eq!(
            r.json["items"].as_array().unwrap().len(),
            0,
            "{param}={value}"
        );
    }
    // Refused: 400 problems.
    for (param, value) in [
        ("state", "running' OR '1'='1"),
        ("sort", "id; DELETE FROM jobs"),
        ("sort", "created_at DESC, (SELECT 1)"),
        ("order", "desc; DROP TABLE jobs"),
        ("cursor", "'; DROP TABLE jobs; --"),
        ("limit", "1; DROP TABLE jobs"),
        ("limit", "100000"),
        ("created_after", "now()"),
    ] {
        let r = send(
            &f.admin,
            Method::GET,
            &format!("/v1/jobs?{param}={}", enc(value)),
            v,
            None,
        )
        .await;
        assert_problem(&r, 400, "validation");
        assert!(
            !r.text.to_lowercase().contains("syntax error"),
            "{}",
            r.text
        );
    }
    // Bulk filters too.
    let op = Some(f.keys.operator.as_str());
    let r = send(&f.admin, Method::POST, "/v1/jobs/bulk-cancel", op,
        Some(json!({"filter": {"queue": "q' OR '1'='1", "q": "'; DROP TABLE jobs; --"}, "reason": "x"}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["count"], 0);
    let r = send(
        &f.admin,
        Method::POST,
        "/v1/jobs/bulk-cancel",
        op,
        Some(json!({"filter": {"states": ["available' OR '1'='1"]}, "reason": "x"})),
    )
    .await;
    assert_problem(&r, 400, "validation");
    let r = send(
        &f.admin,
        Method::POST,
        &format!("/v1/queues/{}/pause", enc("q'; DROP TABLE queues; --")),
        op,
        reason(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a queue name is just a name: {}",
        r.text
    );

    assert_eq!(job_count(&f).await, before);
    let available: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'available'")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(available, before);
    assert!(!f.store.queue_is_paused("q").await.unwrap());
}

#[tokio::test]
async fn bad_bodies_get_problems() {
    let f = fixture_with(ApiConfig {
        request_timeout: Duration::from_millis(500),
        ..ApiConfig::default()
    })
    .await;
    let id = insert(&f.store, "q", "k", json!({})).await;
    let path = format!("/v1/jobs/{id}/cancel");
    let auth = format!("Bearer {}", f.keys.operator);
    let post = |body: Body, ct: Option<&'static str>| {
        let mut req = f
            .admin
            .post(&path)
            .header(header::AUTHORIZATION, auth.clone())
            .body(body);
        if let Some(ct) = ct {
            req = req.content_type(ct);
        }
        req
    };

    // Malformed JSON, wrong types, wrong shapes, empty: 400.
    for body in [
        "{\"reason\": ",
        "{\"reason\": 5}",
        "[\"reason\"]",
        "null",
        "",
        "{\"reason\": \"\\ud800\"}",
    ] {
        let r = into_reply(
            post(
                Body::from_string(body.to_string()),
                Some("application/json"),
            )
            .send()
            .await
            .0,
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body:?}: {}", r.text);
        assert_eq!(r.content_type, "application/problem+json");
    }
    // Not JSON at all.
    let r = into_reply(
        post(
            Body::from_string("reason=x".into()),
            Some("application/x-www-form-urlencoded"),
        )
        .send()
        .await
        .0,
    )
    .await;
    assert!(r.status.is_client_error(), "{}", r.status);
    assert_eq!(r.content_type, "application/problem+json");

    // 10 MB with Content-Length: 413.
    let big = vec![b' '; 10 * 1024 * 1024];
    let r = into_reply(
        post(Body::from(big.clone()), Some("application/json"))
            .send()
            .await
            .0,
    )
    .await;
    assert_problem(&r, 413, "payload-too-large");

    // 10 MB streamed without Content-Length: 413 as well.
    let chunks =
        futures::stream::iter((0..160).map(|_| Ok::<_, std::io::Error>(bytes_of(64 * 1024))));
    let r = into_reply(
        post(Body::from_bytes_stream(chunks), Some("application/json"))
            .send()
            .await
            .0,
    )
    .await;
    assert_problem(&r, 413, "payload-too-large");

    // A body that stalls: the request times out with a problem.
    let stalled = futures::stream::iter([Ok::<_, std::io::Error>(bytes_of(10))])
        .chain(futures::stream::pending());
    let r = into_reply(
        post(Body::from_bytes_stream(stalled), Some("application/json"))
            .send()
            .await
            .0,
    )
    .await;
    assert_problem(&r, 503, "timeout");

    assert_eq!(state_of(&f.store, id).await, JobState::Available);
    assert_eq!(audit_rows(&f).await, 0);

    // Unknown routes and methods are problems too.
    let r = send(&f.admin, Method::GET, "/nope", None, None).await;
    assert_problem(&r, 404, "not-found");
    let r = send(
        &f.public,
        Method::DELETE,
        "/v1/accounts/me/balances",
        Some(&f.keys.user_a),
        None,
    )
    .await;
    assert_problem(&r, 405, "method-not-allowed");
}

fn bytes_of(n: usize) -> Vec<u8> {
    vec![b' '; n]
}

/// `POST` of a raw JSON text as the bearer of `token`.
async fn post_raw(app: &App, path: &str, token: &str, body: &str) -> Reply {
    let resp = app
        .post(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .content_type("application/json")
        .body(body.to_string())
        .send()
        .await
        .0;
    into_reply(resp).await
}

/// Issue 12 (2): U+0000 and other control characters in any admin text —
/// list filters, reasons, queue names, bulk filters — are 400 problems,
/// never 500s, and change nothing; prose reasons keep their line breaks.
#[tokio::test]
async fn control_characters_in_admin_text_are_400_and_change_nothing() {
    let f = fixture().await;
    let v = Some(f.keys.viewer.as_str());
    let op = Some(f.keys.operator.as_str());
    let id = insert(&f.store, "q", "k", json!({})).await;
    for path in [
        "/v1/jobs?q=%00",
        "/v1/jobs?q=a%07b",
        "/v1/jobs?queue=%00",
        "/v1/jobs?kind=k%00",
        "/v1/jobs?q=%C2%85",
        "/v1/audit?action=%00",
        "/v1/audit?target_id=%1B%5B31m",
        "/v1/workflows?kind=%00",
        "/v1/dead-letters/jobs?queue=%00",
    ] {
        let r = send(&f.admin, Method::GET, path, v, None).await;
        assert_problem(&r, 400, "validation");
    }
    // Bidi controls in a filter arrive percent-encoded as UTF-8: refused by
    // the field's check, not the URI's.
    let r = send(&f.admin, Method::GET, "/v1/jobs?queue=q%E2%80%AE", v, None).await;
    assert_problem(&r, 400, "validation");

    let cancel = format!("/v1/jobs/{id}/cancel");
    for why in ["a\u{0}b", "bell\u{7}", "esc\u{1b}[2J", "rlo\u{202e}txt"] {
        let r = send(
            &f.admin,
            Method::POST,
            &cancel,
            op,
            Some(json!({ "reason": why })),
        )
        .await;
        assert_problem(&r, 400, "validation");
    }
    for path in ["/v1/queues/a%00b/pause", "/v1/queues/q%E2%80%AE/pause"] {
        let r = send(&f.admin, Method::POST, path, op, reason()).await;
        assert_problem(&r, 400, "validation");
    }
    for filter in [
        json!({"queue": "q\u{0}"}),
        json!({"q": "a\u{1}"}),
        json!({"kind": "k\u{200b}"}),
    ] {
        let r = send(
            &f.admin,
            Method::POST,
            "/v1/jobs/bulk-cancel",
            op,
            Some(json!({ "filter": filter, "reason": "x" })),
        )
        .await;
        assert_problem(&r, 400, "validation");
    }
    // Duplicate keys: which reason would the audit log keep?
    let r = post_raw(
        &f.admin,
        &cancel,
        &f.keys.operator,
        r#"{"reason":"shown to the approver","reason":"kept"}"#,
    )
    .await;
    assert_problem(&r, 400, "validation");
    assert_eq!(state_of(&f.store, id).await, JobState::Available);
    assert_eq!(audit_rows(&f).await, 0);

    // Prose may span lines.
    let r = send(
        &f.admin,
        Method::POST,
        &cancel,
        op,
        Some(json!({ "reason": "line one\nline two" })),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(audit_rows(&f).await, 1);
}

/// A value Postgres itself refuses (SQLSTATE class 22) is a 400 without
/// the database's text, not a 500 — the backstop behind input validation.
#[tokio::test]
async fn values_the_database_refuses_are_400_without_internals() {
    let f = fixture().await;
    let e = sqlx::query("SELECT $1::text")
        .bind("a\u{0}b")
        .execute(&f.db.pool)
        .await
        .unwrap_err();
    let p = ledgerflow_api::Error::from(e).problem();
    assert_eq!(p.status, 400);
    assert!(
        !p.detail.contains("0x00") && !p.detail.contains("UTF8"),
        "{}",
        p.detail
    );
    let e = sqlx::query("SELECT $1::int2")
        .bind(100_000_i32)
        .execute(&f.db.pool)
        .await
        .unwrap_err();
    assert_eq!(
        ledgerflow_api::Error::from(e).status(),
        StatusCode::BAD_REQUEST
    );
}

/// Issue 12 (5): the documented largest audit page works (the handler
/// fetches one row past it), one more is refused.
#[tokio::test]
async fn the_largest_audit_page_is_accepted() {
    let f = fixture().await;
    let v = Some(f.keys.viewer.as_str());
    let r = send(&f.admin, Method::GET, "/v1/audit?limit=500", v, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = send(&f.admin, Method::GET, "/v1/audit?limit=501", v, None).await;
    assert_problem(&r, 400, "validation");
}

/// Issue 12 (5): a 405 names the methods the resource answers (RFC 9110
/// §15.5.6), on both listeners; every answer carries a request id, and a
/// client's sane one is kept.
#[tokio::test]
async fn method_not_allowed_carries_allow_and_answers_carry_request_ids() {
    let f = fixture().await;
    let cases: [(&App, Method, &str, &str); 5] = [
        (
            &f.public,
            Method::DELETE,
            "/v1/accounts/me/balances",
            "GET, HEAD",
        ),
        (&f.public, Method::PUT, "/v1/trades", "POST"),
        (&f.admin, Method::POST, "/v1/jobs", "GET, HEAD"),
        (&f.admin, Method::GET, "/v1/jobs/0190/retry", "POST"),
        (&f.admin, Method::DELETE, "/healthcheck", "GET, HEAD"),
    ];
    for (app, method, path, allow) in cases {
        let resp = app.request(method.clone(), path).send().await.0;
        assert_eq!(
            resp.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        let got = resp
            .headers()
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        assert_eq!(got.as_deref(), Some(allow), "{method} {path}");
    }
    let resp = f.admin.get("/healthcheck").send().await.0;
    let id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok());
    assert!(
        id.is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()),
        "{id:?}"
    );
    let resp = f
        .public
        .get("/healthcheck")
        .header("x-request-id", "trace-42")
        .send()
        .await
        .0;
    assert_eq!(
        resp.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("trace-42")
    );
    let resp = f
        .public
        .get("/healthcheck")
        .header("x-request-id", "bad id\twith tab")
        .send()
        .await
        .0;
    let id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok());
    assert!(
        id.is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()),
        "{id:?}"
    );
}

/// One raw HTTP/1.1 request on a real socket (the throttle needs the
/// client's address, which only a real connection has): status line and
/// `Retry-After`.
async fn raw_get(addr: std::net::SocketAddr, path: &str, token: &str) -> (u16, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let retry = out.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("retry-after:")
            .map(|v| v.trim().to_string())
    });
    (status, retry)
}

/// Issue 12 (5): repeated failed authentication from one address, or
/// against one key prefix, is answered 429 with Retry-After; a key that
/// authenticated before keeps working.
#[tokio::test]
async fn failed_authentication_is_throttled_without_locking_out_a_good_key() {
    let f = fixture_with(ApiConfig {
        auth_throttle: ledgerflow_api::throttle::Limits {
            window: Duration::from_secs(60),
            per_address: 5,
            per_prefix: 3,
        },
        ..ApiConfig::default()
    })
    .await;
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
    let balances = "/v1/accounts/me/balances";
    // user_b's key authenticates first: it is trusted from then on.
    assert_eq!(raw_get(pa, balances, &f.keys.user_b).await.0, 200);
    let bogus = |i: usize| format!("lf_{i:012x}_{}", "0".repeat(64));
    for i in 0..5 {
        assert_eq!(raw_get(pa, balances, &bogus(i)).await.0, 401, "attempt {i}");
    }
    let (status, retry) = raw_get(pa, balances, &bogus(9)).await;
    assert_eq!(status, 429);
    let retry: u64 = retry.unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // The same address with a key that never authenticated: throttled too,
    // without a lookup; the trusted key still works.
    assert_eq!(raw_get(pa, balances, &f.keys.user_a).await.0, 429);
    assert_eq!(raw_get(pa, balances, &f.keys.user_b).await.0, 200);
    // The admin listener shares the counters (same process, same address).
    assert_eq!(raw_get(aa, "/v1/jobs", &f.keys.viewer).await.0, 429);
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // Against one prefix (here from an unknown address, as in-process):
    // after 3 failures, more attempts on that prefix get 429; another
    // prefix is still checked (401), and a trusted key still works.
    let prefix = f.keys.operator.rsplit_once('_').unwrap().0.to_string();
    let wrong = format!("{prefix}_{}", "f".repeat(64));
    let op = send(
        &f.admin,
        Method::GET,
        "/v1/jobs",
        Some(&f.keys.operator),
        None,
    )
    .await;
    assert_eq!(op.status, StatusCode::OK);
    for _ in 0..3 {
        let r = send(&f.admin, Method::GET, "/v1/jobs", Some(&wrong), None).await;
        assert_problem(&r, 401, "unauthorized");
    }
    let r = send(&f.admin, Method::GET, "/v1/jobs", Some(&wrong), None).await;
    assert_problem(&r, 429, "too-many-requests");
    let r = send(
        &f.admin,
        Method::GET,
        "/v1/jobs",
        Some(&f.keys.operator),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let other = format!("lfa_{}_{}", "e".repeat(12), "f".repeat(64));
    let r = send(&f.admin, Method::GET, "/v1/jobs", Some(&other), None).await;
    assert_problem(&r, 401, "unauthorized");
}
