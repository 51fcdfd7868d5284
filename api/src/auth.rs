//! Credentials and roles.
//!
//! Users present an API key (`lf_…`) on the public listener; admins present
//! an admin credential (`lfa_…`) on the admin listener. The two shapes are
//! distinct and checked by different functions, so a user key is simply an
//! unknown credential on the admin listener (401), and vice versa.
//!
//! Admin rights are an explicit allow-list per [`Permission`], so a role or
//! permission added later is denied until someone grants it here.
//!
//! User API keys that authenticated are remembered for a short while
//! ([`KeyCache`], `ApiConfig::api_key_cache_ttl`, 1 s by default), so a
//! client sending many requests costs one key lookup per second instead of
//! one database round trip per request. Revoking a key therefore takes
//! effect within that TTL on every API process (instead of on the next
//! request), and a key is never served from the cache past its expiry.
//! Refusals are never cached: a new key works at once. Admin credentials
//! are looked up on every request (the admin API is not a hot path).
//!
//! Failed lookups are counted per client address and credential prefix;
//! past the limits, attempts get 429 without a lookup ([`crate::throttle`],
//! which also explains why a legitimate key is not locked out).
use crate::AppState;
use crate::error::{Error, Result};
use ledgerflow_payments::UserId;
use ledgerflow_payments::users::{self, Admin, AdminRole};
use poem_openapi::SecurityScheme;
use poem_openapi::auth::Bearer;
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// A user's API key, as `Authorization: Bearer lf_…`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", rename = "UserApiKey")]
pub struct UserKey(pub Bearer);

/// An admin credential, as `Authorization: Bearer lfa_…`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", rename = "AdminCredential")]
pub struct AdminKey(pub Bearer);

/// What an admin endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Read jobs, queues and the audit log.
    Read,
    /// Retry, cancel, discard jobs; pause and resume queues.
    Operate,
    /// Approve or reject withdrawals that need approval.
    Approve,
    /// Manage admins and users' API keys; change the withdrawal policy.
    Administer,
}

impl Permission {
    /// Every permission, for `/v1/me`.
    pub const ALL: [Permission; 4] = [
        Permission::Read,
        Permission::Operate,
        Permission::Approve,
        Permission::Administer,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Operate => "operate",
            Permission::Approve => "approve",
            Permission::Administer => "administer",
        }
    }
}

/// Whether `role` has `perm`. Every role reads; each other right belongs to
/// one role: operator operates, approver approves (and does not operate:
/// separation of duties), security administers. Deny by default.
pub fn allows(role: AdminRole, perm: Permission) -> bool {
    matches!(
        (role, perm),
        (
            AdminRole::Viewer | AdminRole::Operator | AdminRole::Approver | AdminRole::Security,
            Permission::Read
        ) | (AdminRole::Operator, Permission::Operate)
            | (AdminRole::Approver, Permission::Approve)
            | (AdminRole::Security, Permission::Administer)
    )
}

/// The most keys remembered at once; past it, the expired ones are
/// dropped, and if that is not enough, all of them (a burst of lookups
/// follows, nothing else).
const MAX_CACHED_KEYS: usize = 10_000;

/// Recently authenticated user API keys, by the SHA-256 of the whole
/// credential (the credential itself is not kept).
#[derive(Debug)]
pub struct KeyCache {
    ttl: Duration,
    keys: RwLock<HashMap<[u8; 32], (UserId, Instant)>>,
}

impl KeyCache {
    /// A cache that trusts a successful lookup for `ttl` (zero: no caching).
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            keys: RwLock::new(HashMap::new()),
        }
    }

    fn get(&self, digest: &[u8; 32], now: Instant) -> Option<UserId> {
        let keys = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        keys.get(digest)
            .and_then(|&(user, until)| (now < until).then_some(user))
    }

    fn put(&self, digest: [u8; 32], user: UserId, until: Instant) {
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if keys.len() >= MAX_CACHED_KEYS {
            let now = Instant::now();
            keys.retain(|_, &mut (_, until)| now < until);
            if keys.len() >= MAX_CACHED_KEYS {
                keys.clear();
            }
        }
        keys.insert(digest, (user, until));
    }
}

/// The user whose API key this is, or 401: from the [`KeyCache`] while the
/// key's last successful lookup is younger than the TTL, otherwise looked
/// up (on a pooled connection of its own; only the hot paths' cache hits
/// avoid the round trip).
pub async fn user(state: &AppState, key: &UserKey) -> Result<UserId> {
    let token = &key.0.token;
    let cache = &state.keys;
    let digest = users::credential_digest(token);
    // Taken before the lookup: the entry ends no later than the key does,
    // however long the answer takes to arrive.
    let asked = Instant::now();
    if !cache.ttl.is_zero()
        && let Some(user) = cache.get(&digest, asked)
    {
        return Ok(user);
    }
    let gate = Gate::new(state, token, digest, asked)?;
    if cache.ttl.is_zero() {
        let user = users::authenticate_api_key(state.pool(), token).await?;
        return gate.settle(user);
    }
    let Some(live) = users::authenticate_api_key_live(state.pool(), token).await? else {
        return gate.settle(None);
    };
    let trust = live
        .expires_in
        .map_or(cache.ttl, |left| left.min(cache.ttl));
    cache.put(digest, live.user, asked + trust);
    gate.settle(Some(live.user))
}

/// One credential check under the [`crate::throttle`]: refused with 429
/// before the lookup when its address or prefix failed too often; the
/// lookup's outcome is counted.
struct Gate<'a> {
    state: &'a AppState,
    client: Option<std::net::IpAddr>,
    prefix: &'a str,
    digest: [u8; 32],
    now: Instant,
}

impl<'a> Gate<'a> {
    fn new(state: &'a AppState, token: &'a str, digest: [u8; 32], now: Instant) -> Result<Self> {
        let client = crate::throttle::client();
        let prefix = crate::throttle::prefix_of(token);
        if let Err(wait) = state.throttle.admit(client, prefix, &digest, now) {
            tracing::warn!(?client, prefix, "authentication throttled");
            return Err(Error::TooManyRequests {
                retry_after_secs: wait.as_secs().max(1),
            });
        }
        Ok(Gate {
            state,
            client,
            prefix,
            digest,
            now,
        })
    }

    fn settle<T>(self, found: Option<T>) -> Result<T> {
        match found {
            Some(v) => {
                self.state.throttle.succeeded(self.digest, self.now);
                Ok(v)
            }
            None => {
                self.state
                    .throttle
                    .failed(self.client, self.prefix, self.now);
                Err(Error::Unauthorized)
            }
        }
    }
}

/// The admin whose credential this is (401 otherwise), if its role has
/// `perm` (403 otherwise).
pub async fn admin(state: &AppState, key: &AdminKey, perm: Permission) -> Result<Admin> {
    let token = &key.0.token;
    let digest = users::credential_digest(token);
    let gate = Gate::new(state, token, digest, Instant::now())?;
    let found = users::authenticate_admin(state.pool(), token).await?;
    let admin = gate.settle(found)?;
    if !allows(admin.role, perm) {
        return Err(Error::Forbidden(format!(
            "role {} may not do this",
            admin.role.as_str()
        )));
    }
    Ok(admin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_matrix() {
        use AdminRole::*;
        use Permission::*;
        assert!(allows(Viewer, Read) && allows(Operator, Read) && allows(Approver, Read));
        assert!(allows(Operator, Operate));
        assert!(!allows(Viewer, Operate));
        assert!(!allows(Approver, Operate));
        assert!(allows(Security, Read));
        assert!(allows(Approver, Approve) && allows(Security, Administer));
        for role in [Viewer, Operator, Approver, Security] {
            assert_eq!(allows(role, Operate), role == Operator, "{role:?}");
            assert_eq!(allows(role, Approve), role == Approver, "{role:?}");
            assert_eq!(allows(role, Administer), role == Security, "{role:?}");
        }
    }

    #[test]
    fn cached_keys_end_at_their_deadline() {
        let cache = KeyCache::new(Duration::from_secs(1));
        let user = UserId::new();
        let now = Instant::now();
        cache.put([1; 32], user, now + Duration::from_millis(10));
        assert_eq!(cache.get(&[1; 32], now), Some(user));
        assert_eq!(cache.get(&[2; 32], now), None);
        assert_eq!(cache.get(&[1; 32], now + Duration::from_millis(10)), None);
    }

    #[test]
    fn a_full_cache_drops_expired_keys_first() {
        let cache = KeyCache::new(Duration::from_secs(1));
        let now = Instant::now();
        let live = UserId::new();
        for i in 0..MAX_CACHED_KEYS {
            let mut digest = [0; 32];
            digest[..8].copy_from_slice(&(i as u64).to_le_bytes());
            // Every key but the first has already ended.
            let until = if i == 0 {
                now + Duration::from_secs(60)
            } else {
                now
            };
            cache.put(digest, live, until);
        }
        cache.put([9; 32], live, now + Duration::from_secs(60));
        assert_eq!(cache.get(&[0; 32], now), Some(live));
        assert_eq!(cache.get(&[9; 32], now), Some(live));
        let len = cache.keys.read().map(|k| k.len()).unwrap_or_default();
        assert_eq!(len, 2);
    }
}
