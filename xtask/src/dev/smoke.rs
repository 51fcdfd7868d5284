//! `cargo xtask dev --smoke`: a trade, withdrawals (approved and rejected) and the balances
//! they move, end to end against the running processes.
use super::*;

pub(super) fn smoke(
    ready: &Ready,
    services: &mut Services,
    progress: &mut Progress,
    deadline: Instant,
) -> Result<()> {
    let api = ready.addrs.api.as_str();
    let key = ready.seeded["api_key"]
        .as_str()
        .context("seed JSON: api_key")?
        .to_string();
    let auth = format!("Bearer {key}");
    let run_id = random_hex(6)?;

    progress.step("smoke: one trade end to end (order placed -> fill webhook -> settled)");
    let before = balances(api, &auth)?;
    let idem = format!("smoke-trade-{run_id}");
    let trade_id = place_trade(api, &key, &idem)?;
    println!("      trade {trade_id} accepted");
    let trade = follow(
        services,
        deadline,
        "trade",
        || get_json(api, &auth, &format!("/v1/trades/{trade_id}")),
        &["settled"],
        &["rejected", "cancelled"],
    )?;
    println!("      trade {trade_id} {}", trade["status"]);
    // The same Idempotency-Key and body answer the same trade again.
    let replay = post_trade(api, &auth, &idem)?;
    if replay != trade_id {
        bail!("replaying the trade's Idempotency-Key gave trade {replay}, not {trade_id}");
    }
    let after_trade = balances(api, &auth)?;
    expect_change(&before, &after_trade, "USD", &format!("-{TRADE_USD_COST}"))?;
    expect_change(&before, &after_trade, "BTC", TRADE_BASE_AMOUNT)?;
    println!("      balances: USD -{TRADE_USD_COST}, BTC +{TRADE_BASE_AMOUNT}: as expected");

    progress
        .step("smoke: one withdrawal end to end (submitted -> confirmation webhook -> completed)");
    let body = json!({"asset": "BTC", "amount": WITHDRAWAL_AMOUNT, "address": WITHDRAWAL_ADDRESS});
    let idem = format!("smoke-withdrawal-{run_id}");
    let created = http::request(
        api,
        "POST",
        "/v1/withdrawals",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("idempotency-key", &idem),
        ],
        Some(&body.to_string()),
    )?;
    if created.status != 201 {
        bail!(
            "POST /v1/withdrawals answered {}: {}",
            created.status,
            created.body
        );
    }
    let withdrawal_id = created.json()?["id"]
        .as_str()
        .context("the withdrawal has no id")?
        .to_string();
    println!("      withdrawal {withdrawal_id} of {WITHDRAWAL_AMOUNT} BTC accepted");
    let withdrawal = follow(
        services,
        deadline,
        "withdrawal",
        || get_json(api, &auth, &format!("/v1/withdrawals/{withdrawal_id}")),
        &["completed"],
        &["rejected", "cancelled", "awaiting_approval"],
    )?;
    println!(
        "      withdrawal {withdrawal_id} {} (below the approval threshold: no approval needed)",
        withdrawal["status"]
    );
    let after = balances(api, &auth)?;
    expect_change(
        &after_trade,
        &after,
        "BTC",
        &format!("-{WITHDRAWAL_AMOUNT}"),
    )?;
    expect_change(&after_trade, &after, "USD", "0")?;
    for (asset, b) in &after {
        if units(&b.held)? != 0 {
            bail!(
                "{asset} still has {} held after both flows finished",
                b.held
            );
        }
    }
    println!("      balances: BTC -{WITHDRAWAL_AMOUNT}, nothing left held: as expected");

    progress
        .step("smoke: a large withdrawal through two distinct approvers (four-eyes) to completed");
    let id = post_withdrawal(
        api,
        &auth,
        LARGE_WITHDRAWAL_AMOUNT,
        &format!("smoke-large-{run_id}"),
    )?;
    wait_awaiting_approval(services, deadline, api, &auth, &id)?;
    let pending = admin_get(ready, "approver_token", "/v1/withdrawals/pending")?;
    let listed = pending["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["id"] == id.as_str())
        .with_context(|| format!("withdrawal {id} is not in the Approvals list: {pending}"))?;
    if listed["approvals_required"] != 2 || listed["user_email"] != ready.seeded["email"] {
        bail!("the Approvals list shows withdrawal {id} as {listed}");
    }
    let first = decide(ready, "approver_token", &id, "approve")?;
    if first.status != 200 || first.json()?["decision"] != "approval_recorded" {
        bail!(
            "the first approval of {id} answered {}: {}",
            first.status,
            first.body
        );
    }
    let twice = decide(ready, "approver_token", &id, "approve")?;
    if twice.status != 403 || !twice.body.contains("four-eyes") {
        bail!(
            "demo-approver approving {id} a second time answered {}: {}",
            twice.status,
            twice.body
        );
    }
    println!("      demo-approver approved; approving again was refused (403 four-eyes)");
    let second = decide(ready, "approver2_token", &id, "approve")?;
    if second.status != 200 || second.json()?["decision"] != "approved" {
        bail!(
            "the second approval of {id} answered {}: {}",
            second.status,
            second.body
        );
    }
    println!("      demo-approver-2 approved: two distinct approvers");
    let done = follow(
        services,
        deadline,
        "large withdrawal",
        || get_json(api, &auth, &format!("/v1/withdrawals/{id}")),
        &["completed"],
        &["rejected", "cancelled"],
    )?;
    println!(
        "      withdrawal {id} of {LARGE_WITHDRAWAL_AMOUNT} BTC {}",
        done["status"]
    );
    let after_large = balances(api, &auth)?;
    expect_change(
        &after,
        &after_large,
        "BTC",
        &format!("-{LARGE_WITHDRAWAL_AMOUNT}"),
    )?;

    progress.step("smoke: a withdrawal rejected by an approver (cancelled, hold released)");
    let id = post_withdrawal(
        api,
        &auth,
        REJECTED_WITHDRAWAL_AMOUNT,
        &format!("smoke-rejected-{run_id}"),
    )?;
    wait_awaiting_approval(services, deadline, api, &auth, &id)?;
    let held = balances(api, &auth)?;
    let held_btc = held.get("BTC").map(|b| units(&b.held)).transpose()?;
    if held_btc != Some(units(REJECTED_WITHDRAWAL_AMOUNT)?) {
        bail!("withdrawal {id} awaits approval without holding {REJECTED_WITHDRAWAL_AMOUNT} BTC");
    }
    // The wait may not be armed for a moment after the status shows (409): retry.
    let mut rejected = decide(ready, "approver_token", &id, "reject")?;
    while rejected.status == 409 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        rejected = decide(ready, "approver_token", &id, "reject")?;
    }
    if rejected.status != 200 {
        bail!(
            "rejecting {id} answered {}: {}",
            rejected.status,
            rejected.body
        );
    }
    let done = follow(
        services,
        deadline,
        "rejected withdrawal",
        || get_json(api, &auth, &format!("/v1/withdrawals/{id}")),
        &["rejected"],
        &["completed", "cancelled"],
    )?;
    println!("      withdrawal {id} {} by demo-approver", done["status"]);
    // The saga releases the hold after the status changes: wait for it.
    let released = loop {
        let now = balances(api, &auth)?;
        if now
            .get("BTC")
            .is_some_and(|b| units(&b.held).ok() == Some(0))
        {
            break now;
        }
        if Instant::now() > deadline {
            bail!("the hold of rejected withdrawal {id} was not released in time");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    expect_change(&after_large, &released, "BTC", "0")?;
    println!("      hold released: BTC balance unchanged, nothing held");

    progress.step("smoke: every catalogue metric exported, and in a real Prometheus with data for every dashboard panel");
    // A delivery without a signature: refused (401), and counted by reason.
    let unsigned = http::request(
        api,
        "POST",
        &format!("/v1/webhooks/{PROVIDER}"),
        &[("content-type", "application/json")],
        Some("{}"),
    )?;
    ensure!(
        unsigned.status == 401,
        "an unsigned webhook got HTTP {}, not 401",
        unsigned.status
    );
    crate::metrics_check::check_live(cmd::workspace_root(), &ready.addrs.ops)?;

    // Last, because it sends arbitrary (spec-valid and spec-invalid) requests to every
    // operation, including bulk operator actions, with the seeded credentials.
    progress.step("smoke: schemathesis over both OpenAPI specs (no 5xx, responses match)");
    let admin_token = ready.seeded["admin_token"]
        .as_str()
        .context("seed JSON: admin_token")?;
    crate::schemathesis::check(&crate::schemathesis::Args {
        api: format!("http://{api}"),
        admin: format!("http://{}", ready.addrs.admin),
        api_key: key.clone(),
        admin_token: admin_token.to_string(),
        max_examples: 100,
    })?;
    Ok(())
}

/// Places the smoke trade with the very commands the banner prints when
/// `curl` is installed (so they are known to work), else directly.
pub(super) fn place_trade(api: &str, key: &str, idem: &str) -> Result<String> {
    if cmd::which("curl").is_none() || cmd::which("sh").is_none() {
        println!("      (curl is not installed: placing the trade without it)");
        return post_trade(api, &format!("Bearer {key}"), idem);
    }
    let [post, extract, get] = trade_snippet(api, key, idem);
    let script = format!("set -e\n{post}\n{extract}\necho \"TRADE_ID=$TRADE_ID\"\n{get}\n");
    let out = cmd::read(Command::new("sh").arg("-c").arg(&script))
        .context("the printed curl commands failed")?;
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("TRADE_ID="))
        .filter(|id| !id.is_empty() && !id.contains('{'))
        .with_context(|| format!("the printed curl commands gave no trade id: {out}"))?
        .to_string();
    let followed: Value = out
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("the printed GET gave no JSON: {out}"))?;
    if followed["id"] != id.as_str() {
        bail!("the printed GET answered {followed}, not trade {id}");
    }
    println!("      (placed and read back with the printed curl commands)");
    Ok(id)
}

/// POSTs the demo trade with `idem`; returns its id.
pub(super) fn post_trade(api: &str, auth: &str, idem: &str) -> Result<String> {
    let body = json!({
        "side": "buy",
        "base_asset": "BTC",
        "quote_asset": "USD",
        "base_amount": TRADE_BASE_AMOUNT,
        "limit_price": TRADE_LIMIT_PRICE,
    });
    let r = http::request(
        api,
        "POST",
        "/v1/trades",
        &[
            ("authorization", auth),
            ("content-type", "application/json"),
            ("idempotency-key", idem),
        ],
        Some(&body.to_string()),
    )?;
    if r.status != 201 {
        bail!("POST /v1/trades answered {}: {}", r.status, r.body);
    }
    Ok(r.json()?["id"]
        .as_str()
        .context("the trade has no id")?
        .to_string())
}

/// POSTs a BTC withdrawal of `amount`; returns its id.
pub(super) fn post_withdrawal(api: &str, auth: &str, amount: &str, idem: &str) -> Result<String> {
    let body = json!({"asset": "BTC", "amount": amount, "address": WITHDRAWAL_ADDRESS});
    let r = http::request(
        api,
        "POST",
        "/v1/withdrawals",
        &[
            ("authorization", auth),
            ("content-type", "application/json"),
            ("idempotency-key", idem),
        ],
        Some(&body.to_string()),
    )?;
    if r.status != 201 {
        bail!("POST /v1/withdrawals answered {}: {}", r.status, r.body);
    }
    let id = r.json()?["id"]
        .as_str()
        .context("the withdrawal has no id")?
        .to_string();
    println!("      withdrawal {id} of {amount} BTC accepted");
    Ok(id)
}

/// Waits until withdrawal `id` awaits approval.
pub(super) fn wait_awaiting_approval(
    services: &mut Services,
    deadline: Instant,
    api: &str,
    auth: &str,
    id: &str,
) -> Result<()> {
    follow(
        services,
        deadline,
        "withdrawal",
        || get_json(api, auth, &format!("/v1/withdrawals/{id}")),
        &["awaiting_approval"],
        &["completed", "rejected", "cancelled", "submitted"],
    )?;
    println!("      withdrawal {id} awaits approval");
    Ok(())
}

/// GETs `path` on the admin API as the seeded admin whose token is `token_field`.
pub(super) fn admin_get(ready: &Ready, token_field: &str, path: &str) -> Result<Value> {
    let token = ready.seeded[token_field]
        .as_str()
        .with_context(|| format!("seed JSON: {token_field}"))?;
    get_json(&ready.addrs.admin, &format!("Bearer {token}"), path)
}

/// POSTs `/v1/withdrawals/{id}/{action}` (approve, reject) on the admin API
/// as the seeded admin whose token is `token_field`.
pub(super) fn decide(
    ready: &Ready,
    token_field: &str,
    id: &str,
    action: &str,
) -> Result<http::Response> {
    let token = ready.seeded[token_field]
        .as_str()
        .with_context(|| format!("seed JSON: {token_field}"))?;
    let auth = format!("Bearer {token}");
    let body = json!({"reason": "cargo xtask dev --smoke"}).to_string();
    http::request(
        &ready.addrs.admin,
        "POST",
        &format!("/v1/withdrawals/{id}/{action}"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        Some(&body),
    )
}

pub(super) fn get_json(addr: &str, auth: &str, path: &str) -> Result<Value> {
    let r = http::request(addr, "GET", path, &[("authorization", auth)], None)?;
    if r.status != 200 {
        bail!("GET {path} answered {}: {}", r.status, r.body);
    }
    r.json()
}

/// Polls `get` until its `status` is one of `done` (returns it) or `failed`
/// (fails), while the services stay up and the deadline is not passed.
pub(super) fn follow(
    services: &mut Services,
    deadline: Instant,
    what: &str,
    mut get: impl FnMut() -> Result<Value>,
    done: &[&str],
    failed: &[&str],
) -> Result<Value> {
    let mut seen: Vec<String> = Vec::new();
    loop {
        let v = get()?;
        let status = v["status"].as_str().unwrap_or_default().to_string();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if done.contains(&status.as_str()) {
            println!("      {what}: {}", seen.join(" -> "));
            return Ok(v);
        }
        if failed.contains(&status.as_str()) {
            bail!("the {what} ended {status}: {}", v["error"]);
        }
        services.check_alive()?;
        interrupted()?;
        if Instant::now() > deadline {
            bail!(
                "the smoke run's {}s deadline passed with the {what} still {status} \
                 (went {})",
                SMOKE_DEADLINE.as_secs(),
                seen.join(" -> ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A user_available account's money, as decimal strings.
pub(super) struct Money {
    pub(super) balance: String,
    pub(super) held: String,
}

pub(super) fn balances(api: &str, auth: &str) -> Result<BTreeMap<String, Money>> {
    let v = get_json(api, auth, "/v1/accounts/me/balances")?;
    let mut out = BTreeMap::new();
    for b in v["balances"].as_array().into_iter().flatten() {
        if b["kind"] != "user_available" {
            continue;
        }
        let field = |f: &str| {
            b[f].as_str()
                .map(str::to_string)
                .with_context(|| format!("balance without {f}: {b}"))
        };
        out.insert(
            field("asset")?,
            Money {
                balance: field("balance")?,
                held: field("held")?,
            },
        );
    }
    Ok(out)
}

/// Fails unless `asset`'s balance changed by exactly `delta`.
pub(super) fn expect_change(
    before: &BTreeMap<String, Money>,
    after: &BTreeMap<String, Money>,
    asset: &str,
    delta: &str,
) -> Result<()> {
    let get = |m: &BTreeMap<String, Money>| {
        m.get(asset)
            .map(|b| b.balance.clone())
            .with_context(|| format!("the demo user has no {asset} account"))
    };
    let (b, a) = (get(before)?, get(after)?);
    if units(&a)? - units(&b)? != units(delta)? {
        bail!("{asset} balance went from {b} to {a}: expected a change of exactly {delta}");
    }
    Ok(())
}

/// A decimal string as an integer count of 10^-18 (exact for every asset
/// scale the platform uses; xtask has no decimal type).
pub(super) fn units(s: &str) -> Result<i128> {
    const SCALE: usize = 18;
    let bad = || anyhow!("{s:?} is not a decimal amount");
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || frac.len() > SCALE || !all_digits(int) || !all_digits(frac) {
        return Err(bad());
    }
    let padded = format!("{int}{frac:0<SCALE$}");
    let value: i128 = padded.parse().map_err(|_| bad())?;
    Ok(if negative { -value } else { value })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_compare_exactly() {
        assert_eq!(units("100000.00").unwrap(), units("100000").unwrap());
        assert_eq!(
            units("99969.97").unwrap() - units("100000.00").unwrap(),
            units("-30.03").unwrap()
        );
        assert_eq!(
            units("2.00100000").unwrap() - units("2").unwrap(),
            units("0.001").unwrap()
        );
        assert_eq!(units("0").unwrap(), 0);
        for bad in [
            "",
            "-",
            "1.2.3",
            "1e5",
            "abc",
            ".5",
            "1.0000000000000000001",
        ] {
            assert!(units(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn database_names_are_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5432/ledgerflow", "x"),
            "postgres://u:p@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "x"),
            "postgres://h:5432/x"
        );
    }

    #[test]
    fn seed_json_is_found_among_log_lines() {
        let out = "2026-01-01 INFO starting\n{\n  \"user_id\": \"u\",\n  \"api_key\": \"lf_x\",\n  \
                   \"admin_token\": \"lfa_a\",\n  \"approver_token\": \"lfa_b\",\n  \
                   \"approver2_token\": \"lfa_c\",\n  \"security_token\": \"lfa_d\"\n}\nINFO bye\n";
        let v = seed_json(out).unwrap();
        assert_eq!(v["api_key"], "lf_x");
        // The smoke's second approver is required too.
        assert!(seed_json(&out.replace("approver2_token", "other")).is_err());
        assert!(seed_json("no json here").is_err());
        assert!(
            seed_json("{\n  \"user_id\": \"u\"\n}\n").is_err(),
            "missing fields"
        );
    }

    #[test]
    fn the_trade_snippet_quotes_its_json_and_key() {
        let [post, extract, get] = trade_snippet("127.0.0.1:8080", "lf_k", "demo-1");
        assert!(post.contains("-d '{\"base_amount\":\"0.001\""), "{post}");
        assert!(post.contains("\"Idempotency-Key: demo-1\""), "{post}");
        assert!(post.contains("'Authorization: Bearer lf_k'"), "{post}");
        assert!(extract.starts_with("TRADE_ID=$("));
        assert!(get.contains("/v1/trades/$TRADE_ID"), "{get}");
    }
}
