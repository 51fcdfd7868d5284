//! `ledgerflow admin …` and `ledgerflow api-key …`: credential management
//! for operators with database access, without SQL.
//!
//! Every change takes `--reason` and writes its audit row in the same
//! transaction, as the built-in `ledgerflow-cli` admin (the audit row's
//! details also name the operating-system user who ran it). Output is JSON;
//! a new or rotated credential appears in it once (only its hash is stored).
use anyhow::{Context, Result, bail};
use ledgerflow_payments::access::{self, AdminRecord, ApiKeyRecord};
use ledgerflow_payments::users::AdminRole;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

/// `ledgerflow admin …`.
#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// List every admin (never their credentials).
    List,
    /// Create an admin and print its credential (shown once).
    Create {
        /// Unique name, 1-100 characters.
        #[arg(long)]
        name: String,
        /// viewer, operator, approver or security.
        #[arg(long)]
        role: String,
        /// Link the admin to the user with this email (the same person): as
        /// an approver, they may not approve that user's withdrawals.
        #[arg(long)]
        user_email: Option<String>,
        /// Why (kept in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Disable an admin: its credential stops working at once.
    Disable {
        #[arg(long)]
        name: String,
        #[arg(long)]
        reason: String,
    },
    /// Replace an admin's credential and print the new one (shown once).
    Rotate {
        #[arg(long)]
        name: String,
        #[arg(long)]
        reason: String,
    },
}

/// `ledgerflow api-key …`.
#[derive(clap::Subcommand, Debug)]
pub enum ApiKeyCommand {
    /// List a user's API keys (never their secrets).
    List {
        /// The user's email.
        #[arg(long)]
        email: String,
    },
    /// Revoke an API key: the public API refuses it within a second.
    Revoke {
        /// The key's id, or its public part (`lf_<prefix>`).
        #[arg(long)]
        key: String,
        #[arg(long)]
        reason: String,
    },
}

fn admin_json(a: &AdminRecord) -> Value {
    json!({
        "id": a.id, "name": a.name, "role": a.role.as_str(),
        "credential_prefix": a.credential_prefix, "user_id": a.user_id,
        "user_email": a.user_email, "created_at": a.created_at, "disabled_at": a.disabled_at,
    })
}

fn key_json(k: &ApiKeyRecord) -> Value {
    json!({
        "id": k.id, "user_id": k.user_id, "prefix": k.prefix, "created_at": k.created_at,
        "expires_at": k.expires_at, "revoked_at": k.revoked_at,
    })
}

/// The reason as audited: the operator's words, and who ran the command.
fn cli_reason(reason: &str) -> Result<String> {
    let reason = ledgerflow_payments::audit::check_reason(reason)?;
    let who = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    Ok(format!("{reason} (ledgerflow CLI, run by {who})"))
}

async fn named(conn: &mut PgConnection, name: &str) -> Result<AdminRecord> {
    access::admin_by_name_any(conn, name)
        .await?
        .with_context(|| format!("no admin is called {name:?}"))
}

/// Runs an admin command.
pub async fn admin(conn: &mut PgConnection, command: AdminCommand) -> Result<Value> {
    let actor = access::cli_actor();
    match command {
        AdminCommand::List => {
            let admins = access::admins_list(conn).await?;
            Ok(json!({ "items": admins.iter().map(admin_json).collect::<Vec<_>>() }))
        }
        AdminCommand::Create {
            name,
            role,
            user_email,
            reason,
        } => {
            let role = AdminRole::parse(&role)?;
            let mut tx = conn.begin().await?;
            let created = access::admin_create_in(
                &mut tx,
                &actor,
                &name,
                role,
                user_email.as_deref(),
                &cli_reason(&reason)?,
            )
            .await?;
            tx.commit().await?;
            Ok(json!({
                "admin": admin_json(&created.admin),
                "credential": created.credential.expose_secret(),
                "audit_id": created.audit_id,
            }))
        }
        AdminCommand::Disable { name, reason } => {
            let mut tx = conn.begin().await?;
            let admin = named(&mut tx, &name).await?;
            let audit_id =
                access::admin_disable_in(&mut tx, &actor, admin.id, &cli_reason(&reason)?).await?;
            tx.commit().await?;
            let admin = named(conn, &name).await?;
            Ok(json!({
                "admin": admin_json(&admin),
                "changed": audit_id.is_some(),
                "audit_id": audit_id,
            }))
        }
        AdminCommand::Rotate { name, reason } => {
            let mut tx = conn.begin().await?;
            let admin = named(&mut tx, &name).await?;
            let (credential, audit_id) =
                access::admin_rotate_in(&mut tx, &actor, admin.id, &cli_reason(&reason)?).await?;
            tx.commit().await?;
            let admin = named(conn, &name).await?;
            Ok(json!({
                "admin": admin_json(&admin),
                "credential": credential.expose_secret(),
                "audit_id": audit_id,
            }))
        }
    }
}

/// Runs an API-key command.
pub async fn api_key(conn: &mut PgConnection, command: ApiKeyCommand) -> Result<Value> {
    match command {
        ApiKeyCommand::List { email } => {
            let keys = access::api_keys_of(conn, &email).await?;
            Ok(json!({ "items": keys.iter().map(key_json).collect::<Vec<_>>() }))
        }
        ApiKeyCommand::Revoke { key, reason } => {
            let mut tx = conn.begin().await?;
            let Some(found) = access::api_key_find(&mut tx, &key).await? else {
                bail!("no API key matches {key:?} (give its id or its lf_<prefix>)");
            };
            let audit_id = access::api_key_revoke_in(
                &mut tx,
                &access::cli_actor(),
                found.id,
                &cli_reason(&reason)?,
            )
            .await?;
            let now = access::api_key_find(&mut tx, &key)
                .await?
                .context("the key vanished")?;
            tx.commit().await?;
            Ok(json!({
                "key": key_json(&now),
                "changed": audit_id.is_some(),
                "audit_id": audit_id,
            }))
        }
    }
}
