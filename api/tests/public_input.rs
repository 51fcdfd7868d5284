//! Bad input to the public money endpoints against a real Postgres: strict
//! amounts, the field allow-list, control characters, duplicate JSON keys and
//! withdrawal addresses per asset — each a problem that changes nothing.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

#[path = "common/public_fixture.rs"]
mod fixture;
use fixture::*;

#[tokio::test]
async fn bad_input_is_a_problem_and_changes_nothing() {
    let f = fixture(8).await;
    let with = |field: &str, value: Value| {
        let mut b = trade_body();
        b[field] = value;
        b
    };
    let mut cases: Vec<(&str, Value)> = vec![
        ("number amount", with("base_amount", json!(0.5))),
        ("number price", with("limit_price", json!(30000))),
        (
            "over scale (BTC has 8)",
            with("base_amount", json!("0.123456789")),
        ),
        (
            "over scale (USD has 2)",
            with("limit_price", json!("30000.001")),
        ),
        (
            "29 digits",
            with("base_amount", json!("12345678901234567890123456789")),
        ),
        ("negative", with("base_amount", json!("-1"))),
        ("zero", with("base_amount", json!("0"))),
        ("zero with decimals", with("limit_price", json!("0.00"))),
        ("NaN", with("base_amount", json!("NaN"))),
        ("Infinity", with("limit_price", json!("Infinity"))),
        ("exponent", with("base_amount", json!("1e5"))),
        ("empty", with("base_amount", json!(""))),
        ("null amount", with("base_amount", Value::Null)),
        ("unknown asset", with("base_asset", json!("DOGE"))),
        ("same assets", with("quote_asset", json!("BTC"))),
        ("bad side", with("side", json!("short"))),
        ("numeric asset", with("base_asset", json!(5))),
        ("mass-assigned status", with("status", json!("settled"))),
        ("mass-assigned fee", with("fee", json!("0"))),
        (
            "mass-assigned user_id",
            with("user_id", json!(uuid::Uuid::nil())),
        ),
    ];
    let mut missing = trade_body();
    missing.as_object_mut().unwrap().remove("limit_price");
    cases.push(("missing field", missing));
    cases.push(("not an object", json!(["buy"])));
    for (name, body) in &cases {
        let r = send(
            &f.app,
            Method::POST,
            "/v1/trades",
            Some(&f.user_a),
            Some(&key_of(name)),
            Some(body),
        )
        .await;
        assert!(
            matches!(r.status.as_u16(), 400 | 422),
            "{name}: {} {}",
            r.status,
            r.text
        );
        assert_eq!(r.content_type, "application/problem+json", "{name}");
        assert!(
            r.json["type"]
                .as_str()
                .unwrap()
                .starts_with("https://ledgerflow.dev/problems/")
        );
    }
    let wd = |field: &str, value: Value| {
        let mut b = withdrawal_body();
        b[field] = value;
        b
    };
    let cases = [
        ("wd number", wd("amount", json!(0.01))),
        ("wd over scale", wd("amount", json!("0.000000001"))),
        ("wd negative", wd("amount", json!("-0.01"))),
        ("wd zero", wd("amount", json!("0"))),
        ("wd NaN", wd("amount", json!("NaN"))),
        (
            "wd 29 digits",
            wd("amount", json!("99999999999999999999999999999")),
        ),
        ("wd empty address", wd("address", json!(""))),
        ("wd status", wd("status", json!("completed"))),
    ];
    for (name, body) in &cases {
        let r = send(
            &f.app,
            Method::POST,
            "/v1/withdrawals",
            Some(&f.user_a),
            Some(&key_of(name)),
            Some(body),
        )
        .await;
        assert!(
            matches!(r.status.as_u16(), 400 | 422),
            "{name}: {} {}",
            r.status,
            r.text
        );
        assert_eq!(r.content_type, "application/problem+json", "{name}");
    }
    // A bad Idempotency-Key is refused too.
    let r = send(
        &f.app,
        Method::POST,
        "/v1/trades",
        Some(&f.user_a),
        Some(&"k".repeat(300)),
        Some(&trade_body()),
    )
    .await;
    assert_problem(&r, 400, "validation");
    assert_nothing_written(&f).await;
}

/// `POST` of a raw JSON text (a `Value` cannot hold a duplicate key).
async fn send_raw(app: &App, path: &str, token: &str, key: &str, body: &str) -> Reply {
    let resp = app
        .post(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header("Idempotency-Key", key)
        .content_type("application/json")
        .body(body.to_string())
        .send()
        .await
        .0;
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = resp.into_body().into_string().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        content_type,
        text,
        json,
    }
}

/// Issue 12 (2, 3): U+0000 and other control characters in asset codes
/// and addresses, duplicate keys, and addresses that read differently from
/// what they are (bidi, invisible characters) or fail their checksum are
/// 400 problems — never a 500 — and write nothing.
#[tokio::test]
async fn control_characters_duplicate_keys_and_bad_addresses_are_refused() {
    let f = fixture(8).await;
    let with = |field: &str, value: &str| {
        let mut b = trade_body();
        b[field] = json!(value);
        b
    };
    let wd = |value: &str| {
        let mut b = withdrawal_body();
        b["address"] = json!(value);
        b
    };
    let cases: Vec<(&str, &str, Value)> = vec![
        (
            "nul base asset",
            "/v1/trades",
            with("base_asset", "BT\u{0}C"),
        ),
        (
            "nul quote asset",
            "/v1/trades",
            with("quote_asset", "USD\0"),
        ),
        ("bell asset", "/v1/trades", with("base_asset", "BTC\u{7}")),
        ("lowercase asset", "/v1/trades", with("base_asset", "btc")),
        ("nul amount", "/v1/trades", with("base_amount", "0.5\0")),
        ("nul address", "/v1/withdrawals", wd("bc1q\0")),
        (
            "bell address",
            "/v1/withdrawals",
            wd("bc1q2rv93cyctmx87czp32hse3dttpl59sjhs3fd6g\u{7}"),
        ),
        (
            "rlo address",
            "/v1/withdrawals",
            wd("bc1q\u{202e}lacol-kcatta"),
        ),
        (
            "zero-width address",
            "/v1/withdrawals",
            wd("bc1q2rv93cyctmx87czp32\u{200b}hse3dttpl59sjhs3fd6g"),
        ),
        (
            "bad checksum",
            "/v1/withdrawals",
            wd("bc1q2rv93cyctmx87czp32hse3dttpl59sjhs3fd6h"),
        ),
        ("not bech32", "/v1/withdrawals", wd("bc1qexampleaddress")),
        (
            "mixed case",
            "/v1/withdrawals",
            wd("bc1Q2rv93cyctmx87czp32hse3dttpl59sjhs3fd6g"),
        ),
        (
            "ETH address for BTC",
            "/v1/withdrawals",
            wd("0x52908400098527886E0F7030069857D2E4169EE7"),
        ),
    ];
    for (name, path, body) in &cases {
        let r = send(
            &f.app,
            Method::POST,
            path,
            Some(&f.user_a),
            Some(&key_of(name)),
            Some(body),
        )
        .await;
        assert_problem(&r, 400, "validation");
        assert!(!r.text.contains('\0'), "{name}: the problem echoes no NUL");
    }
    // A NUL in the Idempotency-Key cannot even be sent (not a header value).
    // Duplicate keys, even with the same value: a reader taking the first
    // would see another amount than the server.
    let raw = [
        r#"{"side":"buy","base_asset":"BTC","quote_asset":"USD","base_amount":"0.001","limit_price":"30000.00","base_amount":"1.9"}"#,
        r#"{"side":"buy","side":"buy","base_asset":"BTC","quote_asset":"USD","base_amount":"0.5","limit_price":"30000.00"}"#,
    ];
    for (i, body) in raw.iter().enumerate() {
        let r = send_raw(&f.app, "/v1/trades", &f.user_a, &format!("dup-{i}"), body).await;
        assert_problem(&r, 400, "validation");
        assert!(r.text.contains("duplicate key"), "{}", r.text);
    }
    let r = send_raw(
        &f.app,
        "/v1/withdrawals",
        &f.user_a,
        "dup-wd",
        r#"{"asset":"BTC","amount":"0.01","address":"bc1q2rv93cyctmx87czp32hse3dttpl59sjhs3fd6g","address":"bc1qu6p0py2tgnljt5xyrrfltkjzs865x45m5te026"}"#,
    )
    .await;
    assert_problem(&r, 400, "validation");
    // An escaped NUL in raw JSON too.
    let r = send_raw(
        &f.app,
        "/v1/trades",
        &f.user_a,
        "nul-raw",
        r#"{"side":"buy","base_asset":"BTC\u0000","quote_asset":"USD","base_amount":"0.5","limit_price":"30000.00"}"#,
    )
    .await;
    assert_problem(&r, 400, "validation");
    assert_nothing_written(&f).await;

    // The same bodies without the defect are accepted.
    for (key, address) in [
        ("ok-segwit", "bc1q2rv93cyctmx87czp32hse3dttpl59sjhs3fd6g"),
        (
            "ok-taproot",
            "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",
        ),
        ("ok-legacy", "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2"),
    ] {
        let r = send(
            &f.app,
            Method::POST,
            "/v1/withdrawals",
            Some(&f.user_a),
            Some(key),
            Some(&wd(address)),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{address}: {}", r.text);
    }
}
