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
