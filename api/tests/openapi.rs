//! The committed OpenAPI specs (`api/openapi/*.json`) match what the code serves.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;

fn check(file: &str, generated: String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("openapi")
        .join(file);
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = if generated.ends_with('\n') {
        generated
    } else {
        generated + "\n"
    };
    assert!(
        committed == generated,
        "{} is stale: run `cargo xtask openapi` and commit",
        path.display()
    );
}

#[test]
fn public_spec_is_committed_and_fresh() {
    check("public.json", ledgerflow_api::public_spec());
}

#[test]
fn admin_spec_is_committed_and_fresh() {
    check("admin.json", ledgerflow_api::admin_spec());
}

#[test]
fn specs_document_problem_responses_and_bearer_auth() {
    let spec: serde_json::Value = serde_json::from_str(&ledgerflow_api::admin_spec()).unwrap();
    let retry = &spec["paths"]["/v1/jobs/{id}/retry"]["post"];
    assert!(retry["responses"]["409"]["content"]["application/problem+json"].is_object());
    assert!(spec["components"]["securitySchemes"]["AdminCredential"].is_object());
    let spec: serde_json::Value = serde_json::from_str(&ledgerflow_api::public_spec()).unwrap();
    assert!(spec["components"]["securitySchemes"]["UserApiKey"].is_object());
    assert!(spec["paths"]["/v1/accounts/me/balances"]["get"].is_object());
}

/// Issue 12 (5): the specs carry the rules the server enforces, so clients
/// and fuzzers see them: page limits, non-blank bounded reasons without
/// control characters, amount and asset patterns, a required and bounded
/// Idempotency-Key, bounded filters, and 429 for throttled authentication.
#[test]
fn specs_carry_the_servers_input_rules() {
    let admin: serde_json::Value = serde_json::from_str(&ledgerflow_api::admin_spec()).unwrap();
    let param = |op: &serde_json::Value, name: &str| {
        op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap()
    };
    let audit = &admin["paths"]["/v1/audit"]["get"];
    assert_eq!(param(audit, "limit")["schema"]["maximum"], 500.0);
    assert_eq!(param(audit, "limit")["schema"]["minimum"], 1.0);
    assert_eq!(param(audit, "action")["schema"]["maxLength"], 200);
    let jobs = &admin["paths"]["/v1/jobs"]["get"];
    assert_eq!(param(jobs, "limit")["schema"]["maximum"], 200.0);
    assert!(param(jobs, "q")["schema"]["pattern"].is_string());
    let reason = &admin["components"]["schemas"]["ActionRequest"]["properties"]["reason"];
    assert_eq!(
        (reason["minLength"].clone(), reason["maxLength"].clone()),
        (1.into(), 1000.into())
    );
    assert!(reason["pattern"].as_str().unwrap().contains(r"[^\s"));
    let bulk = &admin["components"]["schemas"]["BulkRequest"]["properties"];
    assert_eq!(bulk["limit"]["maximum"], 1000.0);
    assert!(admin["paths"]["/v1/jobs"]["get"]["responses"]["429"].is_object());
    // The server reads an optional field sent as null as absent; the spec says so.
    let filter = &admin["components"]["schemas"]["JobFilterBody"]["properties"];
    assert_eq!(filter["created_after"]["nullable"], true);
    assert_eq!(
        reason.get("nullable"),
        None,
        "a required field stays non-null"
    );

    let public: serde_json::Value = serde_json::from_str(&ledgerflow_api::public_spec()).unwrap();
    let create = &public["paths"]["/v1/trades"]["post"];
    let key = param(create, "Idempotency-Key");
    assert_eq!(key["required"], true);
    assert_eq!(key["schema"]["pattern"], r"^[\x21-\x7E]{1,255}$");
    let trade = &public["components"]["schemas"]["NewTrade"]["properties"];
    assert_eq!(
        trade["base_amount"]["pattern"],
        r"^(0|[1-9][0-9]*)(\.[0-9]+)?$"
    );
    assert_eq!(trade["base_asset"]["pattern"], "^[A-Z0-9]{2,16}$");
    let wd = &public["components"]["schemas"]["NewWithdrawal"]["properties"];
    assert_eq!(wd["address"]["maxLength"], 128);
    assert!(public["paths"]["/v1/metrics"].is_null());
}
