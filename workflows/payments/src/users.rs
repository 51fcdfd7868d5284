//! Users, their API keys, and admins with their credentials.
//!
//! Credentials are random tokens shown once: `lf_<prefix>_<secret>` for a
//! user's API key, `lfa_<prefix>_<secret>` for an admin (distinct, so one can
//! never authenticate as the other). Only the prefix (12 hex digits, to find
//! the row and to let humans tell keys apart) and SHA-256 of the secret (32
//! random bytes, 64 hex digits) are stored. A fast hash is enough for
//! 256-bit random secrets — see the migration's comment on `api_keys`.
use crate::error::{Error, Result, violated_constraint};
use crate::ids::{AdminId, ApiKeyId, UserId};
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, PgExecutor};
use std::fmt;
use std::time::Duration;
use subtle::ConstantTimeEq;

const USER_KEY_TAG: &str = "lf";
const ADMIN_KEY_TAG: &str = "lfa";
const PREFIX_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;
/// Prefix collisions (48 bits) are rare; a few retries make them invisible.
const PREFIX_ATTEMPTS: usize = 4;

/// A credential in plain text, returned once at creation. Its `Debug` and
/// `Display` hide the secret so it cannot end up in logs by accident; call
/// [`PlaintextKey::expose_secret`] to hand it to its owner.
#[derive(Clone, PartialEq, Eq)]
pub struct PlaintextKey(String);

impl PlaintextKey {
    /// The full credential, to be shown to its owner exactly once.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// The non-secret `tag_prefix` part, fine to log and show.
    pub fn public_part(&self) -> &str {
        match self.0.rfind('_') {
            Some(i) => &self.0[..i],
            None => "",
        }
    }
}

impl fmt::Debug for PlaintextKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PlaintextKey({}_…)", self.public_part())
    }
}

impl fmt::Display for PlaintextKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_…", self.public_part())
    }
}

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub id: UserId,
    pub email: String,
    pub display_name: String,
    pub created_at: DateTime<Utc>,
}

/// Creates a user. Emails are unique regardless of case
/// ([`Error::EmailTaken`]); the caller's transaction stays usable on that
/// refusal.
pub async fn create_user(
    conn: &mut PgConnection,
    email: &str,
    display_name: &str,
) -> Result<UserId> {
    let email = email.trim();
    let display_name = display_name.trim();
    if email.len() > 320 || !email.contains('@') || email.starts_with('@') || email.ends_with('@') {
        return Err(Error::Invalid(format!("{email:?} is not an email address")));
    }
    if display_name.is_empty() || display_name.chars().count() > 200 {
        return Err(Error::Invalid(
            "display name must be 1-200 characters".into(),
        ));
    }
    let id = UserId::new();
    let mut sp = conn.begin().await?;
    let result = sqlx::query("INSERT INTO users (id, email, display_name) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(email)
        .bind(display_name)
        .execute(&mut *sp)
        .await;
    match result {
        Ok(_) => {
            sp.commit().await?;
            Ok(id)
        }
        Err(e) => {
            sp.rollback().await?;
            match violated_constraint(&e) {
                Some("users_email_key") => Err(Error::EmailTaken(email.to_owned())),
                _ => Err(Error::Db(e)),
            }
        }
    }
}

/// The user with this id, if any.
pub async fn user(conn: &mut PgConnection, id: UserId) -> Result<Option<User>> {
    let row: Option<(UserId, String, String, DateTime<Utc>)> =
        sqlx::query_as("SELECT id, email, display_name, created_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(row.map(|(id, email, display_name, created_at)| User {
        id,
        email,
        display_name,
        created_at,
    }))
}

/// The user with this email (compared regardless of case, as the unique
/// index does), if any. Lets idempotent tools (`ledgerflow seed`) find a user
/// they created before.
pub async fn user_by_email(conn: &mut PgConnection, email: &str) -> Result<Option<User>> {
    let row: Option<(UserId, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, email, display_name, created_at FROM users WHERE lower(email) = lower($1)",
    )
    .bind(email.trim())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(id, email, display_name, created_at)| User {
        id,
        email,
        display_name,
        created_at,
    }))
}

/// Issues an API key for `user`, valid for `ttl` (forever if `None`; the
/// expiry is computed on the database clock, like the check in
/// [`authenticate_api_key`]). Returns the key's id and its plain text, which
/// is not stored and cannot be shown again.
pub async fn create_api_key(
    conn: &mut PgConnection,
    user: UserId,
    ttl: Option<Duration>,
) -> Result<(ApiKeyId, PlaintextKey)> {
    let ttl_micros = ttl
        .map(|d| i64::try_from(d.as_micros()))
        .transpose()
        .map_err(|_| Error::Invalid("API key lifetime too long".into()))?;
    for _ in 0..PREFIX_ATTEMPTS {
        let token = Token::generate(USER_KEY_TAG);
        let id = ApiKeyId::new();
        let mut sp = conn.begin().await?;
        let result: Result<Option<ApiKeyId>, sqlx::Error> = sqlx::query_scalar(
            "INSERT INTO api_keys (id, user_id, prefix, secret_hash, expires_at)
             VALUES ($1, $2, $3, $4,
                     CASE WHEN $5::bigint IS NULL THEN NULL
                          ELSE now() + $5::bigint * interval '1 microsecond' END)
             ON CONFLICT (prefix) DO NOTHING
             RETURNING id",
        )
        .bind(id)
        .bind(user)
        .bind(&token.prefix)
        .bind(token.hash.as_slice())
        .bind(ttl_micros)
        .fetch_optional(&mut *sp)
        .await;
        match result {
            Ok(Some(id)) => {
                sp.commit().await?;
                return Ok((id, token.plaintext));
            }
            Ok(None) => sp.rollback().await?,
            Err(e) => {
                sp.rollback().await?;
                return Err(match violated_constraint(&e) {
                    Some("api_keys_user_id_fkey") => Error::UserNotFound(user),
                    _ => Error::Db(e),
                });
            }
        }
    }
    Err(Error::Invalid(
        "could not find a free API key prefix; try again".into(),
    ))
}

/// The user a presented API key belongs to, or `None` if the key is
/// malformed, unknown, wrong, revoked or expired (indistinguishable to the
/// caller on purpose). Takes a pool or a connection.
pub async fn authenticate_api_key<'e, E: PgExecutor<'e>>(
    executor: E,
    presented: &str,
) -> Result<Option<UserId>> {
    Ok(authenticate_api_key_live(executor, presented)
        .await?
        .map(|live| live.user))
}

/// A valid API key's user and how much longer the key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveKey {
    /// The key's owner.
    pub user: UserId,
    /// Time left until the key expires, measured by the database's clock
    /// (`None`: it never expires). A cache of the answer must not outlive it.
    pub expires_in: Option<Duration>,
}

/// [`authenticate_api_key`] that also says how long the key lives, for
/// callers that cache the answer (the public API): same query, same checks.
pub async fn authenticate_api_key_live<'e, E: PgExecutor<'e>>(
    executor: E,
    presented: &str,
) -> Result<Option<LiveKey>> {
    let Some(parsed) = Presented::parse(presented, USER_KEY_TAG) else {
        return Ok(None);
    };
    // The remaining lifetime in whole microseconds, computed by the database
    // that also decides `live`, so no clock skew between hosts matters.
    let row: Option<(UserId, Vec<u8>, bool, Option<i64>)> = sqlx::query_as(
        "SELECT user_id, secret_hash,
                revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now()) AS live,
                floor(extract(epoch FROM expires_at - now()) * 1000000)::bigint
           FROM api_keys WHERE prefix = $1",
    )
    .bind(parsed.prefix)
    .fetch_optional(executor)
    .await?;
    Ok(match row {
        Some((user, hash, live, left_us)) if parsed.matches(&hash) && live => Some(LiveKey {
            user,
            expires_in: left_us.map(|us| Duration::from_micros(u64::try_from(us).unwrap_or(0))),
        }),
        _ => None,
    })
}

/// SHA-256 of a whole presented credential: an in-memory cache key that
/// does not keep the credential itself around.
pub fn credential_digest(presented: &str) -> [u8; 32] {
    sha256(presented)
}

/// Revokes an API key (from the next request on). Returns `true` if this
/// call revoked it, `false` if it was already revoked or does not exist.
pub async fn revoke_api_key(conn: &mut PgConnection, key: ApiKeyId) -> Result<bool> {
    let done =
        sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
            .bind(key)
            .execute(&mut *conn)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// What an admin may do on the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRole {
    /// Read-only.
    Viewer,
    /// Retry, cancel, pause, resolve.
    Operator,
    /// Read everything, approve or reject withdrawals that need approval;
    /// no operator actions (retry, cancel, pause, resolve): whoever releases
    /// money does not also steer the workflows that move it.
    Approver,
    /// Read everything; manage admins, users' API keys and the withdrawal
    /// policy. No operator actions, no approvals.
    Security,
}

impl AdminRole {
    /// The `admins.role` value.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::Viewer => "viewer",
            AdminRole::Operator => "operator",
            AdminRole::Approver => "approver",
            AdminRole::Security => "security",
        }
    }

    /// The role called `s` (an `admins.role` value).
    pub fn parse(s: &str) -> Result<AdminRole> {
        match s {
            "viewer" => Ok(AdminRole::Viewer),
            "operator" => Ok(AdminRole::Operator),
            "approver" => Ok(AdminRole::Approver),
            "security" => Ok(AdminRole::Security),
            other => Err(Error::Invalid(format!("unknown admin role {other:?}"))),
        }
    }
}

/// An authenticated admin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Admin {
    pub id: AdminId,
    pub name: String,
    pub role: AdminRole,
}

/// Creates an admin and returns its id and credential (shown once).
/// Names are unique ([`Error::AdminNameTaken`]).
pub async fn create_admin(
    conn: &mut PgConnection,
    name: &str,
    role: AdminRole,
) -> Result<(AdminId, PlaintextKey)> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(Error::Invalid("admin name must be 1-100 characters".into()));
    }
    for _ in 0..PREFIX_ATTEMPTS {
        let token = Token::generate(ADMIN_KEY_TAG);
        let id = AdminId::new();
        let mut sp = conn.begin().await?;
        let result: Result<Option<AdminId>, sqlx::Error> = sqlx::query_scalar(
            "INSERT INTO admins (id, name, role, credential_prefix, credential_hash)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (credential_prefix) DO NOTHING
             RETURNING id",
        )
        .bind(id)
        .bind(name)
        .bind(role.as_str())
        .bind(&token.prefix)
        .bind(token.hash.as_slice())
        .fetch_optional(&mut *sp)
        .await;
        match result {
            Ok(Some(id)) => {
                sp.commit().await?;
                return Ok((id, token.plaintext));
            }
            Ok(None) => sp.rollback().await?,
            Err(e) => {
                sp.rollback().await?;
                return Err(match violated_constraint(&e) {
                    Some("admins_name_key") => Error::AdminNameTaken(name.to_owned()),
                    _ => Error::Db(e),
                });
            }
        }
    }
    Err(Error::Invalid(
        "could not find a free credential prefix; try again".into(),
    ))
}

/// The admin a presented credential belongs to, or `None` if it is
/// malformed, unknown, wrong or the admin is disabled.
pub async fn authenticate_admin<'e, E: PgExecutor<'e>>(
    executor: E,
    presented: &str,
) -> Result<Option<Admin>> {
    let Some(parsed) = Presented::parse(presented, ADMIN_KEY_TAG) else {
        return Ok(None);
    };
    let row: Option<(AdminId, String, String, Vec<u8>, bool)> = sqlx::query_as(
        "SELECT id, name, role, credential_hash, disabled_at IS NULL AS live
           FROM admins WHERE credential_prefix = $1",
    )
    .bind(parsed.prefix)
    .fetch_optional(executor)
    .await?;
    match row {
        Some((id, name, role, hash, live)) if parsed.matches(&hash) && live => Ok(Some(Admin {
            id,
            name,
            role: AdminRole::parse(&role)?,
        })),
        _ => Ok(None),
    }
}

/// Disables an admin: its credential stops working. Returns `true` if this
/// call disabled it.
pub async fn disable_admin(conn: &mut PgConnection, admin: AdminId) -> Result<bool> {
    let done =
        sqlx::query("UPDATE admins SET disabled_at = now() WHERE id = $1 AND disabled_at IS NULL")
            .bind(admin)
            .execute(&mut *conn)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// The enabled admin called `name`, if any.
pub async fn admin_by_name(conn: &mut PgConnection, name: &str) -> Result<Option<Admin>> {
    let row: Option<(AdminId, String, String)> =
        sqlx::query_as("SELECT id, name, role FROM admins WHERE name = $1 AND disabled_at IS NULL")
            .bind(name.trim())
            .fetch_optional(&mut *conn)
            .await?;
    row.map(|(id, name, role)| {
        Ok(Admin {
            id,
            name,
            role: AdminRole::parse(&role)?,
        })
    })
    .transpose()
}

/// Replaces an enabled admin's credential with a fresh one (shown once); the
/// old one stops working at once. `None` if no enabled admin has this id.
/// For operators who lost a credential, and for `ledgerflow seed`, which
/// cannot recover the plain text of the credential it issued earlier.
pub async fn rotate_admin_credential(
    conn: &mut PgConnection,
    admin: AdminId,
) -> Result<Option<PlaintextKey>> {
    for _ in 0..PREFIX_ATTEMPTS {
        let token = Token::generate(ADMIN_KEY_TAG);
        let mut sp = conn.begin().await?;
        let result = sqlx::query(
            "UPDATE admins SET credential_prefix = $2, credential_hash = $3
             WHERE id = $1 AND disabled_at IS NULL",
        )
        .bind(admin)
        .bind(&token.prefix)
        .bind(token.hash.as_slice())
        .execute(&mut *sp)
        .await;
        match result {
            Ok(done) => {
                sp.commit().await?;
                return Ok((done.rows_affected() == 1).then_some(token.plaintext));
            }
            Err(e) => {
                sp.rollback().await?;
                // A prefix collision: try another token.
                if violated_constraint(&e) != Some("admins_credential_prefix_key") {
                    return Err(Error::Db(e));
                }
            }
        }
    }
    Err(Error::Invalid(
        "could not find a free credential prefix; try again".into(),
    ))
}

/// A freshly generated credential.
struct Token {
    prefix: String,
    hash: [u8; 32],
    plaintext: PlaintextKey,
}

impl Token {
    fn generate(tag: &str) -> Token {
        // ThreadRng is a CSPRNG seeded (and periodically reseeded) from the OS.
        let mut rng = rand::rng();
        let mut prefix = [0u8; PREFIX_BYTES];
        let mut secret = [0u8; SECRET_BYTES];
        rng.fill_bytes(&mut prefix);
        rng.fill_bytes(&mut secret);
        let prefix = hex::encode(prefix);
        let secret = hex::encode(secret);
        Token {
            hash: sha256(&secret),
            plaintext: PlaintextKey(format!("{tag}_{prefix}_{secret}")),
            prefix,
        }
    }
}

/// A credential as presented, split and syntax-checked.
struct Presented<'a> {
    prefix: &'a str,
    hash: [u8; 32],
}

impl<'a> Presented<'a> {
    fn parse(presented: &'a str, tag: &str) -> Option<Presented<'a>> {
        let rest = presented.strip_prefix(tag)?.strip_prefix('_')?;
        let (prefix, secret) = rest.split_once('_')?;
        let lower_hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !lower_hex(prefix, PREFIX_BYTES * 2) || !lower_hex(secret, SECRET_BYTES * 2) {
            return None;
        }
        Some(Presented {
            prefix,
            hash: sha256(secret),
        })
    }

    /// Constant-time comparison with the stored hash, so response timing
    /// does not reveal how many leading bytes of a guess were right.
    fn matches(&self, stored: &[u8]) -> bool {
        stored.len() == self.hash.len() && bool::from(self.hash.as_slice().ct_eq(stored))
    }
}

fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_documented_shape() {
        let t = Token::generate(USER_KEY_TAG);
        let s = t.plaintext.expose_secret();
        let parsed = Presented::parse(s, USER_KEY_TAG).unwrap();
        assert_eq!(parsed.prefix, t.prefix);
        assert!(parsed.matches(&t.hash));
        assert_eq!(s.len(), 3 + 12 + 1 + 64);
        // Not usable as the other kind of credential.
        assert!(Presented::parse(s, ADMIN_KEY_TAG).is_none());
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = Token::generate(ADMIN_KEY_TAG);
        let shown = format!("{:?} {}", t.plaintext, t.plaintext);
        let secret = t.plaintext.expose_secret().rsplit('_').next().unwrap();
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains(&t.prefix));
    }

    #[test]
    fn malformed_credentials_do_not_parse() {
        for s in [
            "",
            "lf_",
            "lf_abc_def",
            "lf_ABCDEF012345_0000000000000000000000000000000000000000000000000000000000000000",
            "lf_abcdef012345_000000000000000000000000000000000000000000000000000000000000000",
            "lf_abcdef012345_0000000000000000000000000000000000000000000000000000000000000000 ",
            "Bearer lf_abcdef012345_0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(Presented::parse(s, USER_KEY_TAG).is_none(), "{s:?}");
        }
    }
}
