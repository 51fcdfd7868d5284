//! Admin API over who may do what: `/v1/me` (the signed-in admin, their role
//! and rights, for the console), admin management and users' API keys.
//!
//! Managing admins and API keys needs the `security` role (403 `forbidden`
//! otherwise). Every change takes a reason and writes its audit row in the
//! same transaction (`ledgerflow_payments::access`). A new or rotated
//! credential is in the answer exactly once; only its hash is stored.
use crate::AppState;
use crate::admin::{ActionRequest, log_action, reason};
use crate::auth::{self, AdminKey, Permission};
use crate::error::{Error, Result};
use crate::types::Text;
use chrono::{DateTime, Utc};
use ledgerflow_payments::access::{self, AdminRecord, ApiKeyRecord};
use ledgerflow_payments::users::AdminRole;
use ledgerflow_payments::{AdminId, ApiKeyId};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use uuid::Uuid;

#[derive(Tags)]
enum Tag {
    /// The signed-in admin, admins and users' API keys.
    Access,
}

/// The signed-in admin.
#[derive(Debug, Object)]
pub struct Me {
    pub id: Uuid,
    pub name: String,
    /// viewer, operator, approver or security.
    pub role: String,
    /// What this role may do: read, operate, approve, administer.
    pub permissions: Vec<String>,
}

/// An admin (never its credential).
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct AdminView {
    pub id: Uuid,
    pub name: String,
    pub role: String,
    /// The non-secret part of its credential, `lfa_<prefix>`.
    pub credential_prefix: String,
    /// The linked user (an approver may not approve that user's withdrawals).
    pub user_id: Option<Uuid>,
    pub user_email: Option<String>,
    pub created_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
}

impl From<AdminRecord> for AdminView {
    fn from(a: AdminRecord) -> Self {
        Self {
            id: a.id.0,
            name: a.name,
            role: a.role.as_str().into(),
            credential_prefix: a.credential_prefix,
            user_id: a.user_id.map(|u| u.0),
            user_email: a.user_email,
            created_at: a.created_at,
            disabled_at: a.disabled_at,
        }
    }
}

/// Every admin.
#[derive(Debug, Object)]
pub struct AdminList {
    pub items: Vec<AdminView>,
}

/// A new admin.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct CreateAdminRequest {
    /// 1-100 characters, unique.
    pub name: Text,
    /// viewer, operator, approver or security.
    pub role: Text,
    /// Links the admin to the user with this email (the same person).
    pub user_email: Option<Text>,
    /// Why (required; kept in the audit log).
    pub reason: Text,
}

/// An admin with a credential to hand over (shown once).
#[derive(Debug, Object)]
pub struct AdminCredential {
    pub admin: AdminView,
    /// `lfa_…`: give it to its owner; it cannot be shown again.
    pub credential: String,
    pub audit_id: Uuid,
}

/// What disabling did.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct AdminDisabled {
    pub admin: AdminView,
    /// False when it was disabled already (nothing written).
    pub changed: bool,
    pub audit_id: Option<Uuid>,
}

/// A user's API key (never its secret).
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ApiKeyView {
    pub id: Uuid,
    pub user_id: Uuid,
    /// `lf_<prefix>`, the non-secret part.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRecord> for ApiKeyView {
    fn from(k: ApiKeyRecord) -> Self {
        Self {
            id: k.id.0,
            user_id: k.user_id.0,
            prefix: k.prefix,
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// A user's API keys, newest first.
#[derive(Debug, Object)]
pub struct ApiKeyList {
    pub items: Vec<ApiKeyView>,
}

/// What revoking did.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ApiKeyRevoked {
    pub key: ApiKeyView,
    /// False when it was revoked already (nothing written).
    pub changed: bool,
    pub audit_id: Option<Uuid>,
}

async fn admin_view(state: &AppState, id: AdminId) -> Result<AdminView> {
    let mut conn = state.pool().acquire().await?;
    access::admin_get(&mut conn, id)
        .await?
        .map(AdminView::from)
        .ok_or_else(|| Error::NotFound(format!("admin {id} not found")))
}

/// The access operations of the admin API.
pub struct AccessApi;

#[OpenApi]
impl AccessApi {
    /// The signed-in admin: name, role and what the role may do.
    #[oai(
        path = "/v1/me",
        method = "get",
        operation_id = "get_me",
        tag = "Tag::Access"
    )]
    async fn me(&self, state: Data<&AppState>, key: AdminKey) -> Result<Json<Me>> {
        let admin = auth::admin(&state, &key, Permission::Read).await?;
        Ok(Json(Me {
            id: admin.id.0,
            name: admin.name,
            role: admin.role.as_str().into(),
            permissions: Permission::ALL
                .into_iter()
                .filter(|p| auth::allows(admin.role, *p))
                .map(|p| p.as_str().to_string())
                .collect(),
        }))
    }

    /// Every admin (role `security`).
    #[oai(
        path = "/v1/admins",
        method = "get",
        operation_id = "list_admins",
        tag = "Tag::Access"
    )]
    async fn list_admins(&self, state: Data<&AppState>, key: AdminKey) -> Result<Json<AdminList>> {
        auth::admin(&state, &key, Permission::Administer).await?;
        let mut conn = state.pool().acquire().await?;
        let items = access::admins_list(&mut conn).await?;
        Ok(Json(AdminList {
            items: items.into_iter().map(AdminView::from).collect(),
        }))
    }

    /// Creates an admin (role `security`); the answer holds its credential, once.
    #[oai(
        path = "/v1/admins",
        method = "post",
        operation_id = "create_admin",
        tag = "Tag::Access"
    )]
    async fn create_admin(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        body: Json<CreateAdminRequest>,
    ) -> Result<Json<AdminCredential>> {
        let actor = auth::admin(&state, &key, Permission::Administer).await?;
        let why = reason(body.reason.as_str())?;
        let role = AdminRole::parse(body.role.as_str())?;
        let mut tx = state.pool().begin().await?;
        let created = access::admin_create_in(
            &mut tx,
            &actor,
            body.name.as_str(),
            role,
            body.user_email.as_ref().map(Text::as_str),
            &why,
        )
        .await?;
        tx.commit().await?;
        log_action(&actor, "admin.create", &created.admin.id.to_string());
        Ok(Json(AdminCredential {
            credential: created.credential.expose_secret().to_string(),
            admin: created.admin.into(),
            audit_id: created.audit_id,
        }))
    }

    /// Disables an admin (role `security`; not yourself): its credential
    /// stops working at once.
    #[oai(
        path = "/v1/admins/:id/disable",
        method = "post",
        operation_id = "disable_admin",
        tag = "Tag::Access"
    )]
    async fn disable_admin(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
        body: Json<ActionRequest>,
    ) -> Result<Json<AdminDisabled>> {
        let actor = auth::admin(&state, &key, Permission::Administer).await?;
        let why = reason(body.reason.as_str())?;
        let id = AdminId(id.0);
        let mut tx = state.pool().begin().await?;
        let audit_id = access::admin_disable_in(&mut tx, &actor, id, &why).await?;
        tx.commit().await?;
        if audit_id.is_some() {
            log_action(&actor, "admin.disable", &id.to_string());
        }
        Ok(Json(AdminDisabled {
            admin: admin_view(&state, id).await?,
            changed: audit_id.is_some(),
            audit_id,
        }))
    }

    /// Replaces an admin's credential (role `security`): the old one stops
    /// working at once; the answer holds the new one, once.
    #[oai(
        path = "/v1/admins/:id/rotate",
        method = "post",
        operation_id = "rotate_admin_credential",
        tag = "Tag::Access"
    )]
    async fn rotate_admin(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
        body: Json<ActionRequest>,
    ) -> Result<Json<AdminCredential>> {
        let actor = auth::admin(&state, &key, Permission::Administer).await?;
        let why = reason(body.reason.as_str())?;
        let id = AdminId(id.0);
        let mut tx = state.pool().begin().await?;
        let (credential, audit_id) = access::admin_rotate_in(&mut tx, &actor, id, &why)
            .await
            .map_err(|e| match e {
                ledgerflow_payments::Error::Invalid(msg) => Error::Conflict(msg),
                other => other.into(),
            })?;
        tx.commit().await?;
        log_action(&actor, "admin.rotate_credential", &id.to_string());
        Ok(Json(AdminCredential {
            admin: admin_view(&state, id).await?,
            credential: credential.expose_secret().to_string(),
            audit_id,
        }))
    }

    /// The API keys of the user with this email (role `security`).
    #[oai(
        path = "/v1/api-keys",
        method = "get",
        operation_id = "list_api_keys",
        tag = "Tag::Access"
    )]
    async fn list_api_keys(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        /// The user's email.
        email: Query<String>,
    ) -> Result<Json<ApiKeyList>> {
        auth::admin(&state, &key, Permission::Administer).await?;
        let mut conn = state.pool().acquire().await?;
        let items = access::api_keys_of(&mut conn, &email.0)
            .await
            .map_err(|e| match e {
                ledgerflow_payments::Error::Invalid(msg) => Error::NotFound(msg),
                other => other.into(),
            })?;
        Ok(Json(ApiKeyList {
            items: items.into_iter().map(ApiKeyView::from).collect(),
        }))
    }

    /// Revokes a user's API key (role `security`); the public API refuses
    /// it within its key cache's TTL (1 s by default).
    #[oai(
        path = "/v1/api-keys/:id/revoke",
        method = "post",
        operation_id = "revoke_api_key",
        tag = "Tag::Access"
    )]
    async fn revoke_api_key(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
        body: Json<ActionRequest>,
    ) -> Result<Json<ApiKeyRevoked>> {
        let actor = auth::admin(&state, &key, Permission::Administer).await?;
        let why = reason(body.reason.as_str())?;
        let id = ApiKeyId(id.0);
        let mut tx = state.pool().begin().await?;
        let audit_id = access::api_key_revoke_in(&mut tx, &actor, id, &why)
            .await
            .map_err(|e| match e {
                ledgerflow_payments::Error::Invalid(msg) => Error::NotFound(msg),
                other => other.into(),
            })?;
        let key = access::api_key_find(&mut tx, &id.to_string())
            .await?
            .ok_or_else(|| Error::NotFound(format!("API key {id} not found")))?;
        tx.commit().await?;
        if audit_id.is_some() {
            log_action(&actor, "api_key.revoke", &id.to_string());
        }
        Ok(Json(ApiKeyRevoked {
            key: key.into(),
            changed: audit_id.is_some(),
            audit_id,
        }))
    }
}

/// Route templates, for metrics labels.
pub(crate) const ROUTES: &[&str] = &[
    "/v1/me",
    "/v1/admins",
    "/v1/admins/{id}/disable",
    "/v1/admins/{id}/rotate",
    "/v1/api-keys",
    "/v1/api-keys/{id}/revoke",
];
