//! The banner `cargo xtask dev` prints once everything is up: addresses, keys and a trade to
//! paste.
use super::*;

/// The three lines that start a trade and follow it; the banner prints them
/// and the smoke run executes them, so what is printed is known to work.
pub(super) fn trade_snippet(api: &str, key: &str, idempotency_key: &str) -> [String; 3] {
    let body = json!({
        "side": "buy",
        "base_asset": "BTC",
        "quote_asset": "USD",
        "base_amount": TRADE_BASE_AMOUNT,
        "limit_price": TRADE_LIMIT_PRICE,
    });
    [
        format!(
            "TRADE=$(curl -sS -X POST http://{api}/v1/trades -H 'Authorization: Bearer {key}' \
             -H 'Content-Type: application/json' -H \"Idempotency-Key: {idempotency_key}\" \
             -d '{body}'); echo \"$TRADE\""
        ),
        r#"TRADE_ID=$(echo "$TRADE" | sed -E 's/.*"id":"([^"]+)".*/\1/')"#.to_string(),
        format!("curl -sS http://{api}/v1/trades/$TRADE_ID -H 'Authorization: Bearer {key}'; echo"),
    ]
}

pub(super) fn banner(args: &Args, ready: &Ready, brokers: &str) -> String {
    let s = &ready.seeded;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let balances: Vec<String> = s["balances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| format!("{} {}", text(&b["available"]), text(&b["asset"])))
        .collect();
    let [post, extract, get] =
        trade_snippet(&ready.addrs.api, &text(&s["api_key"]), "demo-$(date +%s%N)");
    let (api, admin, ops) = (&ready.addrs.api, &ready.addrs.admin, &ready.addrs.ops);
    format!(
        "
Ledgerflow is up.

  Swagger UI (public API)  http://{api}/docs
  admin console            http://{admin}/
  admin API (Swagger UI)   http://{admin}/docs
  metrics                  http://{ops}/metrics   (API metrics too; the public API serves none)
  health, readiness        http://{ops}/healthcheck   http://{ops}/readyz
  exchange simulator       http://{sim}/   (signed webhooks to http://{api}/v1/webhooks/{PROVIDER})
  database, broker         {db}   {brokers}
  logs                     {logs}/ledgerflow.log, exchange-sim.log

Demo data (new credentials on every run; `ledgerflow seed` made them):
  user {email} (id {user}), available: {balances}
  API key                  {key}
  admin demo-operator      {operator}   (role operator: retry, cancel, pause)
  admin demo-approver      {approver}   (role approver: approves or rejects withdrawals)
  admin demo-approver-2    {approver2}   (role approver: the second approver above the second threshold)
  admin demo-security      {security}   (role security: admins, API keys, withdrawal policy)

Withdrawal policy (LEDGERFLOW_WITHDRAWAL_POLICY; the console's Policy panel changes it):
  BTC: approval above 0.5, two approvers above 1, 1.9 per user and day
  USD: approval above 10000, two approvers above 50000, 100000 per user and day

Start a trade (buy {TRADE_BASE_AMOUNT} BTC at {TRADE_LIMIT_PRICE} USD) and follow it
(pending -> validated -> held -> placed -> filled -> settled):
  {post}
  {extract}
  {get}
",
        sim = ready.addrs.exchange,
        db = cmd::redact_url(&ready.database_url),
        logs = if args.smoke {
            "target/dev-smoke"
        } else {
            "target/dev"
        },
        email = text(&s["email"]),
        user = text(&s["user_id"]),
        balances = balances.join(", "),
        key = text(&s["api_key"]),
        operator = text(&s["admin_token"]),
        approver = text(&s["approver_token"]),
        approver2 = text(&s["approver2_token"]),
        security = text(&s["security_token"]),
    )
}
