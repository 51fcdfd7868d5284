//! Credential management without SQL: admins (list, create, disable, rotate
//! a credential) and users' API keys (list, revoke), each change audited in
//! the caller's transaction with the acting admin and a reason.
//!
//! Two callers: the admin API (an admin of the `security` role acts) and the
//! binary's `ledgerflow admin …` / `ledgerflow api-key …` commands, whose
//! actor is [`cli_actor`], the built-in `ledgerflow-cli` admin (created
//! disabled by the migration, so it can never sign in; it exists so that
//! the audit log names who acted). The role checks are the API's; these
//! functions trust their `actor`.
use crate::audit::{self, NewEntry};
use crate::error::{Error, Result};
use crate::ids::{AdminId, ApiKeyId, UserId};
use crate::users::{self, Admin, AdminRole, PlaintextKey};
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

/// The id of the built-in `ledgerflow-cli` admin (see the migration
/// `20261207120000_withdrawal_policy_and_admin_management.sql`).
pub const CLI_ADMIN_ID: Uuid = Uuid::from_u128(0x0000_0000_0000_7000_8000_0000_0000_c1c1);

/// The actor of the binary's credential commands.
pub fn cli_actor() -> Admin {
    Admin {
        id: AdminId(CLI_ADMIN_ID),
        name: "ledgerflow-cli".into(),
        role: AdminRole::Security,
    }
}

/// An admin as the management views show it (never its credential).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRecord {
    pub id: AdminId,
    pub name: String,
    pub role: AdminRole,
    /// The non-secret part of its credential (`lfa_<prefix>`).
    pub credential_prefix: String,
    /// The user account of the same person, if linked.
    pub user_id: Option<UserId>,
    pub user_email: Option<String>,
    pub created_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
}

type AdminRow = (
    AdminId,
    String,
    String,
    String,
    Option<UserId>,
    Option<String>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

const ADMINS: &str = "SELECT a.id, a.name, a.role, a.credential_prefix, a.user_id, u.email,
                             a.created_at, a.disabled_at
                        FROM admins a LEFT JOIN users u ON u.id = a.user_id
                       WHERE a.id <> $1";

fn admin_record(row: AdminRow) -> Result<AdminRecord> {
    let (id, name, role, prefix, user_id, user_email, created_at, disabled_at) = row;
    Ok(AdminRecord {
        id,
        name,
        role: AdminRole::parse(&role)?,
        credential_prefix: format!("lfa_{prefix}"),
        user_id,
        user_email,
        created_at,
        disabled_at,
    })
}

/// Every admin but the built-in CLI actor, by name.
pub async fn admins_list(conn: &mut PgConnection) -> Result<Vec<AdminRecord>> {
    let rows: Vec<AdminRow> = sqlx::query_as(&format!("{ADMINS} ORDER BY a.name"))
        .bind(CLI_ADMIN_ID)
        .fetch_all(&mut *conn)
        .await?;
    rows.into_iter().map(admin_record).collect()
}

/// The admin with this id (enabled or not; never the CLI actor).
pub async fn admin_get(conn: &mut PgConnection, id: AdminId) -> Result<Option<AdminRecord>> {
    let row: Option<AdminRow> = sqlx::query_as(&format!("{ADMINS} AND a.id = $2"))
        .bind(CLI_ADMIN_ID)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(admin_record).transpose()
}

/// The admin called `name` (enabled or not; never the CLI actor).
pub async fn admin_by_name_any(conn: &mut PgConnection, name: &str) -> Result<Option<AdminRecord>> {
    let row: Option<AdminRow> = sqlx::query_as(&format!("{ADMINS} AND a.name = $2"))
        .bind(CLI_ADMIN_ID)
        .bind(name.trim())
        .fetch_optional(&mut *conn)
        .await?;
    row.map(admin_record).transpose()
}

/// What [`admin_create_in`] made.
#[derive(Debug)]
pub struct CreatedAdmin {
    pub admin: AdminRecord,
    /// Its credential, shown once.
    pub credential: PlaintextKey,
    pub audit_id: Uuid,
}

/// Creates an admin as `actor`, linked to the user with `user_email` when
/// given (an approver is then refused on that user's withdrawals), with its
/// audit row.
pub async fn admin_create_in(
    conn: &mut PgConnection,
    actor: &Admin,
    name: &str,
    role: AdminRole,
    user_email: Option<&str>,
    reason: &str,
) -> Result<CreatedAdmin> {
    audit::check_reason(reason)?;
    let user = match user_email.map(str::trim).filter(|e| !e.is_empty()) {
        Some(email) => Some(
            users::user_by_email(conn, email)
                .await?
                .ok_or_else(|| Error::Invalid(format!("no user has the email {email:?}")))?,
        ),
        None => None,
    };
    let (id, credential) = users::create_admin(conn, name, role).await?;
    if let Some(user) = &user {
        sqlx::query("UPDATE admins SET user_id = $2 WHERE id = $1")
            .bind(id)
            .bind(user.id)
            .execute(&mut *conn)
            .await?;
    }
    let audit_id = audit::record(
        &mut *conn,
        actor,
        &NewEntry {
            action: "admin.create",
            target_type: "admin",
            target_id: &id.to_string(),
            reason,
            details: json!({
                "name": name.trim(),
                "role": role.as_str(),
                "user_id": user.as_ref().map(|u| u.id),
                "credential_prefix": credential.public_part(),
            }),
        },
    )
    .await?;
    let admin = admin_get(conn, id).await?.ok_or(Error::AdminNotFound(id))?;
    Ok(CreatedAdmin {
        admin,
        credential,
        audit_id,
    })
}

/// Disables admin `id` as `actor`: its credential stops working at once.
/// `Ok(None)` (nothing written) when it was disabled already; an admin may
/// not disable themselves (someone else must, so nobody locks the door from
/// inside by mistake).
pub async fn admin_disable_in(
    conn: &mut PgConnection,
    actor: &Admin,
    id: AdminId,
    reason: &str,
) -> Result<Option<Uuid>> {
    audit::check_reason(reason)?;
    if id == actor.id {
        return Err(Error::Forbidden(
            "an admin cannot disable themselves".into(),
        ));
    }
    let admin = admin_get(conn, id).await?.ok_or(Error::AdminNotFound(id))?;
    if !users::disable_admin(conn, id).await? {
        return Ok(None);
    }
    let audit_id = audit::record(
        &mut *conn,
        actor,
        &NewEntry {
            action: "admin.disable",
            target_type: "admin",
            target_id: &id.to_string(),
            reason,
            details: json!({ "name": admin.name, "role": admin.role.as_str() }),
        },
    )
    .await?;
    Ok(Some(audit_id))
}

/// Replaces enabled admin `id`'s credential as `actor` (the old one stops
/// working at once) and returns the new one (shown once) with the audit id.
pub async fn admin_rotate_in(
    conn: &mut PgConnection,
    actor: &Admin,
    id: AdminId,
    reason: &str,
) -> Result<(PlaintextKey, Uuid)> {
    audit::check_reason(reason)?;
    let admin = admin_get(conn, id).await?.ok_or(Error::AdminNotFound(id))?;
    let credential = users::rotate_admin_credential(conn, id)
        .await?
        .ok_or_else(|| Error::Invalid(format!("admin {} is disabled", admin.name)))?;
    let audit_id = audit::record(
        &mut *conn,
        actor,
        &NewEntry {
            action: "admin.rotate_credential",
            target_type: "admin",
            target_id: &id.to_string(),
            reason,
            details: json!({
                "name": admin.name,
                "old_prefix": admin.credential_prefix,
                "new_prefix": credential.public_part(),
            }),
        },
    )
    .await?;
    Ok((credential, audit_id))
}

/// A user's API key as the management views show it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ApiKeyRecord {
    pub id: ApiKeyId,
    pub user_id: UserId,
    /// The non-secret part (`lf_<prefix>`).
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The API keys of the user with `email`, newest first.
pub async fn api_keys_of(conn: &mut PgConnection, email: &str) -> Result<Vec<ApiKeyRecord>> {
    let user = users::user_by_email(conn, email)
        .await?
        .ok_or_else(|| Error::Invalid(format!("no user has the email {:?}", email.trim())))?;
    Ok(sqlx::query_as(
        "SELECT id, user_id, 'lf_' || prefix AS prefix, created_at, expires_at, revoked_at
           FROM api_keys WHERE user_id = $1 ORDER BY created_at DESC, id DESC",
    )
    .bind(user.id)
    .fetch_all(&mut *conn)
    .await?)
}

/// The API key with this id, or the one whose public part (`lf_<prefix>`
/// or the bare prefix) is `key`.
pub async fn api_key_find(conn: &mut PgConnection, key: &str) -> Result<Option<ApiKeyRecord>> {
    let key = key.trim();
    let id = Uuid::parse_str(key).ok();
    let prefix = key.strip_prefix("lf_").unwrap_or(key);
    Ok(sqlx::query_as(
        "SELECT id, user_id, 'lf_' || prefix AS prefix, created_at, expires_at, revoked_at
           FROM api_keys WHERE id = $1 OR prefix = $2",
    )
    .bind(id)
    .bind(prefix)
    .fetch_optional(&mut *conn)
    .await?)
}

/// Revokes API key `id` as `actor`, with its audit row; `Ok(None)` (nothing
/// written) when it was revoked already. The public API stops accepting it
/// within its key cache's TTL (1 s by default).
pub async fn api_key_revoke_in(
    conn: &mut PgConnection,
    actor: &Admin,
    id: ApiKeyId,
    reason: &str,
) -> Result<Option<Uuid>> {
    audit::check_reason(reason)?;
    let Some(key) = api_key_find(conn, &id.to_string()).await? else {
        return Err(Error::Invalid(format!("no API key {id}")));
    };
    if !users::revoke_api_key(conn, id).await? {
        return Ok(None);
    }
    let audit_id = audit::record(
        &mut *conn,
        actor,
        &NewEntry {
            action: "api_key.revoke",
            target_type: "api_key",
            target_id: &id.to_string(),
            reason,
            details: json!({ "user_id": key.user_id, "prefix": key.prefix }),
        },
    )
    .await?;
    Ok(Some(audit_id))
}
