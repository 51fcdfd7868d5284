//! `ledgerflow seed`: demo data for a local system (`cargo xtask dev` runs it).
//!
//! Creates, or finds when they already exist:
//! - a demo user (`demo@ledgerflow.local`) with funded `user_available`
//!   accounts (by default 100,000 USD and 2 BTC);
//! - the demo admins: `demo-operator` (role `operator`: retry, cancel,
//!   pause…), `demo-approver` and `demo-approver-2` (role `approver`:
//!   approve or reject withdrawals; two, because a withdrawal above the
//!   second-approval threshold needs two distinct approvers) and
//!   `demo-security` (role `security`: admins, API keys, withdrawal policy).
//!
//! Idempotent: running it again never creates a second user, admin or
//! deposit. Credentials are generated at random (nothing secret is
//! committed to the repository), and only their hashes are stored, so a
//! re-run cannot show the earlier plain text again. It mints a new API key
//! for the user (earlier keys stay valid: a curl pasted from an earlier run
//! keeps working). Existing admins keep their credentials unless
//! `--rotate-admin-credentials` is given (`cargo xtask dev` gives it, so it
//! can print working ones): seeding another user never locks the demo
//! admins out. The JSON printed says which of these happened.
//!
//! Funding is a deposit from the asset's `external` account with reference
//! `seed:{user id}:{asset}`, so each asset is funded once per user: a re-run
//! shows the balances as they are now (trades and withdrawals move them), it
//! does not top them up.
//!
//! Everything is written in one transaction: a failed seed leaves nothing
//! half-made, and two concurrent runs end with one user (the second waits on
//! the unique email and then finds the first one's user).
use anyhow::{Context, Result, bail};
use ledgerflow_payments::users::{self, AdminRole};
use ledgerflow_payments::{ledger, money};
use serde::Serialize;
use sqlx::{Connection, PgConnection};

/// What to seed.
#[derive(clap::Args, Debug, Clone)]
pub struct SeedArgs {
    /// The demo user's email.
    #[arg(long, default_value = "demo@ledgerflow.local")]
    pub email: String,
    /// Initial funds of the demo user, ASSET=amount, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "USD=100000,BTC=2")]
    pub fund: Vec<String>,
    /// Name of the admin with the `operator` role.
    #[arg(long, default_value = "demo-operator")]
    pub operator: String,
    /// Name of the admin with the `approver` role.
    #[arg(long, default_value = "demo-approver")]
    pub approver: String,
    /// Name of the second admin with the `approver` role.
    #[arg(long, default_value = "demo-approver-2")]
    pub approver2: String,
    /// Name of the admin with the `security` role.
    #[arg(long, default_value = "demo-security")]
    pub security: String,
    /// Replace the credentials of admins that exist already (the old ones
    /// stop working) so that this run can print working ones.
    #[arg(long)]
    pub rotate_admin_credentials: bool,
}

/// What `ledgerflow seed` prints (JSON on stdout).
#[derive(Debug, Serialize)]
pub struct Seeded {
    pub user_id: String,
    pub email: String,
    /// Whether this run created the user (false: it existed).
    pub user_created: bool,
    /// A new API key (`lf_…`), valid until revoked.
    pub api_key: String,
    /// The operator admin's credential (`lfa_…`); absent when it existed
    /// and was not rotated.
    pub admin_token: Option<String>,
    /// The approver admin's credential (`lfa_…`), likewise.
    pub approver_token: Option<String>,
    /// The second approver's credential, likewise.
    pub approver2_token: Option<String>,
    /// The security admin's credential, likewise.
    pub security_token: Option<String>,
    pub admins: Vec<SeededAdmin>,
    /// The demo user's balances after seeding.
    pub balances: Vec<SeededBalance>,
    /// What this run did, in words.
    pub notes: Vec<String>,
}

/// One seeded admin.
#[derive(Debug, Serialize)]
pub struct SeededAdmin {
    pub id: String,
    pub name: String,
    pub role: &'static str,
    /// Whether this run created the admin.
    pub created: bool,
    /// Whether this run replaced its credential.
    pub rotated: bool,
}

/// One of the demo user's accounts.
#[derive(Debug, Serialize)]
pub struct SeededBalance {
    pub asset: String,
    /// Decimal strings at the asset's scale.
    pub balance: String,
    pub held: String,
    pub available: String,
}

/// Seeds in one transaction on `conn` and commits.
pub async fn seed(conn: &mut PgConnection, args: &SeedArgs) -> Result<Seeded> {
    let funds = parse_funds(&args.fund)?;
    let mut tx = conn.begin().await?;
    let mut notes = Vec::new();

    let (user_id, user_created) = match users::user_by_email(&mut tx, &args.email).await? {
        Some(user) => {
            notes.push(format!("user {} existed: reused it", user.email));
            (user.id, false)
        }
        None => {
            let id = users::create_user(&mut tx, &args.email, "Demo User")
                .await
                .with_context(|| format!("creating user {}", args.email))?;
            notes.push(format!("created user {}", args.email));
            (id, true)
        }
    };
    let (_, key) = users::create_api_key(&mut tx, user_id, None).await?;
    if !user_created {
        notes.push(
            "minted a new API key (an earlier key's plain text cannot be recovered; \
             earlier keys stay valid)"
                .into(),
        );
    }

    let mut admins = Vec::new();
    let mut tokens = Vec::new();
    for (name, role) in [
        (&args.operator, AdminRole::Operator),
        (&args.approver, AdminRole::Approver),
        (&args.approver2, AdminRole::Approver),
        (&args.security, AdminRole::Security),
    ] {
        let (admin, token, created) = match users::admin_by_name(&mut tx, name).await? {
            Some(admin) if admin.role != role => bail!(
                "admin {name:?} exists with role {}, not {}: pass another name",
                admin.role.as_str(),
                role.as_str()
            ),
            Some(admin) if args.rotate_admin_credentials => {
                let token = users::rotate_admin_credential(&mut tx, admin.id)
                    .await?
                    .with_context(|| format!("admin {name:?} vanished while seeding"))?;
                notes.push(format!(
                    "admin {name} existed: rotated its credential (the old one no longer works)"
                ));
                (admin.id, Some(token), false)
            }
            Some(admin) => {
                notes.push(format!(
                    "admin {name} existed: kept its credential (--rotate-admin-credentials \
                     replaces it)"
                ));
                (admin.id, None, false)
            }
            None => {
                let (id, token) = users::create_admin(&mut tx, name, role)
                    .await
                    .with_context(|| format!("creating admin {name:?}"))?;
                notes.push(format!("created admin {name} ({})", role.as_str()));
                (id, Some(token), true)
            }
        };
        admins.push(SeededAdmin {
            id: admin.to_string(),
            name: name.trim().to_string(),
            role: role.as_str(),
            created,
            rotated: token.is_some() && !created,
        });
        tokens.push(token.map(|t| t.expose_secret().to_string()));
    }

    for (code, amount) in &funds {
        let asset = ledger::asset(&mut tx, code)
            .await?
            .with_context(|| format!("--fund: unknown asset {code:?}"))?;
        let amount: money::Amount = asset
            .amount(amount)
            .with_context(|| format!("--fund {code}={amount}"))?;
        let account = ledger::ensure_user_accounts(&mut tx, user_id, &[&asset.code])
            .await?
            .first()
            .map(|(_, id)| *id)
            .context("no account opened")?;
        let reference = format!("seed:{user_id}:{}", asset.code);
        let posted = ledger::deposit(&mut tx, &reference, account, amount).await?;
        if posted.is_new() {
            notes.push(format!("deposited {amount} {}", asset.code));
        } else {
            notes.push(format!(
                "{} was funded by an earlier seed: not topped up",
                asset.code
            ));
        }
    }

    let balances = ledger::balances(&mut tx, user_id)
        .await?
        .into_iter()
        .filter(|b| b.kind == ledger::AccountKind::UserAvailable.as_str())
        .map(|b| SeededBalance {
            asset: b.asset,
            balance: b.balance.to_string(),
            held: b.held.to_string(),
            available: b.available.to_string(),
        })
        .collect();
    tx.commit().await?;

    let mut tokens = tokens.into_iter();
    Ok(Seeded {
        user_id: user_id.to_string(),
        email: args.email.trim().to_string(),
        user_created,
        api_key: key.expose_secret().to_string(),
        admin_token: tokens.next().flatten(),
        approver_token: tokens.next().flatten(),
        approver2_token: tokens.next().flatten(),
        security_token: tokens.next().flatten(),
        admins,
        balances,
        notes,
    })
}

/// `["USD=100000", "BTC=2"]` → `[("USD", "100000"), ("BTC", "2")]`.
fn parse_funds(specs: &[String]) -> Result<Vec<(String, String)>> {
    specs
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| match s.split_once('=') {
            Some((asset, amount)) if !asset.trim().is_empty() && !amount.trim().is_empty() => {
                Ok((asset.trim().to_string(), amount.trim().to_string()))
            }
            _ => bail!("--fund {s:?}: expected ASSET=amount, e.g. USD=100000"),
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use ledgerflow_engine::testing::TestDb;

    fn args() -> SeedArgs {
        SeedArgs {
            email: "demo@ledgerflow.local".into(),
            fund: vec!["USD=100000".into(), "BTC=2".into()],
            operator: "demo-operator".into(),
            approver: "demo-approver".into(),
            approver2: "demo-approver-2".into(),
            security: "demo-security".into(),
            rotate_admin_credentials: true,
        }
    }

    fn balance<'a>(s: &'a Seeded, asset: &str) -> &'a SeededBalance {
        s.balances.iter().find(|b| b.asset == asset).unwrap()
    }

    #[test]
    fn funds_parse() {
        let parsed = parse_funds(&["USD=100000".into(), " BTC = 2 ".into(), String::new()]);
        assert_eq!(
            parsed.unwrap(),
            vec![("USD".into(), "100000".into()), ("BTC".into(), "2".into())]
        );
        assert!(parse_funds(&["USD".into()]).is_err());
        assert!(parse_funds(&["=5".into()]).is_err());
    }

    #[tokio::test]
    async fn seeding_twice_reuses_rows_and_issues_working_credentials() {
        let db = TestDb::new().await.unwrap();
        let mut conn = db.pool.acquire().await.unwrap();

        let first = seed(&mut conn, &args()).await.unwrap();
        assert!(first.user_created);
        assert!(first.admins.iter().all(|a| a.created));
        assert_eq!(balance(&first, "USD").available, "100000.00");
        assert_eq!(balance(&first, "BTC").available, "2.00000000");
        let user = users::authenticate_api_key(&mut *conn, &first.api_key)
            .await
            .unwrap();
        assert_eq!(user.map(|u| u.to_string()), Some(first.user_id.clone()));
        let operator = users::authenticate_admin(&mut *conn, first.admin_token.as_ref().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(operator.role, AdminRole::Operator);
        let approver =
            users::authenticate_admin(&mut *conn, first.approver_token.as_ref().unwrap())
                .await
                .unwrap()
                .unwrap();
        assert_eq!(approver.role, AdminRole::Approver);

        let second = seed(&mut conn, &args()).await.unwrap();
        assert_eq!(second.user_id, first.user_id);
        assert!(!second.user_created);
        assert!(second.admins.iter().all(|a| !a.created));
        assert_eq!(
            second.admins.iter().map(|a| &a.id).collect::<Vec<_>>(),
            first.admins.iter().map(|a| &a.id).collect::<Vec<_>>()
        );
        // Funded once, not twice.
        assert_eq!(balance(&second, "USD").balance, "100000.00");
        assert_eq!(balance(&second, "BTC").balance, "2.00000000");
        // A new API key; the earlier one still works.
        assert_ne!(second.api_key, first.api_key);
        for key in [&first.api_key, &second.api_key] {
            let user = users::authenticate_api_key(&mut *conn, key).await.unwrap();
            assert_eq!(user.map(|u| u.to_string()), Some(first.user_id.clone()));
        }
        // Admin credentials were rotated: only the new ones work.
        for old in [&first.admin_token, &first.approver_token] {
            let old = old.as_ref().unwrap();
            let admin = users::authenticate_admin(&mut *conn, old).await.unwrap();
            assert!(admin.is_none(), "an old admin credential still works");
        }
        for (new, role) in [
            (&second.admin_token, AdminRole::Operator),
            (&second.approver_token, AdminRole::Approver),
        ] {
            let new = new.as_ref().unwrap();
            let admin = users::authenticate_admin(&mut *conn, new).await.unwrap();
            assert_eq!(admin.map(|a| a.role), Some(role));
        }
    }

    #[tokio::test]
    async fn seeding_another_user_keeps_the_demo_admins_credentials() {
        let db = TestDb::new().await.unwrap();
        let mut conn = db.pool.acquire().await.unwrap();
        let first = seed(&mut conn, &args()).await.unwrap();
        let other = SeedArgs {
            email: "someone-else@ledgerflow.local".into(),
            rotate_admin_credentials: false,
            ..args()
        };
        let second = seed(&mut conn, &other).await.unwrap();
        assert!(second.user_created);
        assert_ne!(second.user_id, first.user_id);
        assert!(second.admins.iter().all(|a| !a.created && !a.rotated));
        assert!(second.admin_token.is_none() && second.approver_token.is_none());
        // Every demo admin's credential from the first run still works.
        for (token, role) in [
            (&first.admin_token, AdminRole::Operator),
            (&first.approver_token, AdminRole::Approver),
            (&first.approver2_token, AdminRole::Approver),
            (&first.security_token, AdminRole::Security),
        ] {
            let admin = users::authenticate_admin(&mut *conn, token.as_ref().unwrap())
                .await
                .unwrap();
            assert_eq!(admin.map(|a| a.role), Some(role));
        }
    }

    #[tokio::test]
    async fn an_admin_name_with_another_role_is_refused_and_nothing_is_written() {
        let db = TestDb::new().await.unwrap();
        let mut conn = db.pool.acquire().await.unwrap();
        users::create_admin(&mut conn, "demo-operator", AdminRole::Viewer)
            .await
            .unwrap();
        let err = seed(&mut conn, &args()).await.unwrap_err();
        assert!(err.to_string().contains("role viewer"), "{err:#}");
        let user = users::user_by_email(&mut conn, "demo@ledgerflow.local")
            .await
            .unwrap();
        assert!(user.is_none(), "a failed seed left its user behind");
    }
}
