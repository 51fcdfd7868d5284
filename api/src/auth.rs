//! Credentials and roles.
//!
//! Users present an API key (`lf_…`) on the public listener; admins present
//! an admin credential (`lfa_…`) on the admin listener. The two shapes are
//! distinct and checked by different functions, so a user key is simply an
//! unknown credential on the admin listener (401), and vice versa.
//!
//! Admin rights are an explicit allow-list per [`Permission`], so a role or
//! permission added later is denied until someone grants it here.
use crate::AppState;
use crate::error::{Error, Result};
use ledgerflow_payments::UserId;
use ledgerflow_payments::users::{self, Admin, AdminRole};
use poem_openapi::SecurityScheme;
use poem_openapi::auth::Bearer;
use sqlx::PgConnection;

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
}

/// Whether `role` has `perm`. Viewer < operator for operations; approver is a
/// separate role (approvals) that may read but not operate. Deny by default.
pub fn allows(role: AdminRole, perm: Permission) -> bool {
    matches!(
        (role, perm),
        (
            AdminRole::Viewer | AdminRole::Operator | AdminRole::Approver,
            Permission::Read
        ) | (AdminRole::Operator, Permission::Operate)
    )
}

/// The user whose API key this is, or 401. Looked up on the caller's
/// connection (the public handlers reuse it for the rest of the request, one
/// pool checkout instead of two). Not cached: a revoked or expired key is
/// refused from the next request on.
pub async fn user(conn: &mut PgConnection, key: &UserKey) -> Result<UserId> {
    users::authenticate_api_key(&mut *conn, &key.0.token)
        .await?
        .ok_or(Error::Unauthorized)
}

/// The admin whose credential this is (401 otherwise), if its role has
/// `perm` (403 otherwise).
pub async fn admin(state: &AppState, key: &AdminKey, perm: Permission) -> Result<Admin> {
    let admin = users::authenticate_admin(state.pool(), &key.0.token)
        .await?
        .ok_or(Error::Unauthorized)?;
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
    }
}
