//! Admin API over the withdrawal policy per asset: read it (every role) and
//! change or reset it (role `security`), each change with a reason and its
//! audit row in the same transaction (`ledgerflow_payments::policy`).
//!
//! Amounts are decimal strings (`"1.5"`); a JSON number is a 400, like every
//! amount on this API. `null` (or absent) means "no threshold" / "no limit".
use crate::AppState;
use crate::admin::{ActionRequest, log_action, reason};
use crate::auth::{self, AdminKey, Permission};
use crate::error::{Error, Result};
use crate::types::Text;
use chrono::{DateTime, Utc};
use ledgerflow_payments::money::AmountStr;
use ledgerflow_payments::policy::{self, AssetPolicy, AssetPolicySpec, Effective};
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use rust_decimal::Decimal;
use uuid::Uuid;

#[derive(Tags)]
enum Tag {
    /// The withdrawal policy per asset (approval thresholds, daily limit).
    WithdrawalPolicy,
}

/// An asset's effective withdrawal policy.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct PolicyView {
    pub asset: String,
    /// A withdrawal of more than this needs an approver (absent: never).
    pub approval_threshold: Option<String>,
    /// A withdrawal of more than this needs two distinct approvers.
    pub second_approval_threshold: Option<String>,
    /// The most one user may withdraw per UTC day (absent: no limit).
    pub daily_limit: Option<String>,
    /// `admin` (set through this API), `config` (the process configuration)
    /// or `none`.
    pub source: String,
    /// Who set it (source `admin`).
    pub updated_by: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
}

fn text(d: Option<Decimal>) -> Option<String> {
    d.map(|d| d.normalize().to_string())
}

impl From<Effective> for PolicyView {
    fn from(e: Effective) -> Self {
        Self {
            asset: e.asset,
            approval_threshold: text(e.policy.approval_threshold),
            second_approval_threshold: text(e.policy.second_approval_threshold),
            daily_limit: text(e.policy.daily_limit),
            source: e.source.as_str().into(),
            updated_by: e.updated_by_name,
            updated_at: e.updated_at,
        }
    }
}

/// Every asset's policy.
#[derive(Debug, Object)]
pub struct PolicyList {
    pub items: Vec<PolicyView>,
}

/// A new policy for one asset (all three values; `null` or absent: none).
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub struct PolicyRequest {
    /// Decimal string, e.g. `"1"`.
    pub approval_threshold: Option<Text>,
    /// Decimal string, at least `approval_threshold`.
    pub second_approval_threshold: Option<Text>,
    /// Decimal string.
    pub daily_limit: Option<Text>,
    /// Why (required; kept in the audit log).
    pub reason: Text,
}

/// A policy after a change.
#[derive(Debug, Object)]
pub struct PolicyChange {
    pub policy: PolicyView,
    /// The audit row written with the change (absent when nothing changed).
    #[oai(skip_serializing_if_is_none)]
    pub audit_id: Option<Uuid>,
}

fn amount(field: &str, v: &Option<Text>) -> Result<Option<AmountStr>> {
    v.as_ref()
        .map(|t| {
            AmountStr::parse(t.as_str()).map_err(|e| Error::Validation(format!("{field}: {e}")))
        })
        .transpose()
}

fn check_asset(asset: &str) -> Result<()> {
    if asset.is_empty() || asset.len() > 16 || !asset.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(Error::Validation(format!("{asset:?} is not an asset code")));
    }
    Ok(())
}

/// The policy operations of the admin API.
pub struct PolicyApi;

#[OpenApi]
impl PolicyApi {
    /// The effective withdrawal policy of every asset, and where it comes from.
    #[oai(
        path = "/v1/withdrawal-policies",
        method = "get",
        operation_id = "list_withdrawal_policies",
        tag = "Tag::WithdrawalPolicy"
    )]
    async fn list_policies(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
    ) -> Result<Json<PolicyList>> {
        auth::admin(&state, &key, Permission::Read).await?;
        let mut conn = state.pool().acquire().await?;
        let items = policy::list(&mut conn, &state.config.withdrawal_policy).await?;
        Ok(Json(PolicyList {
            items: items.into_iter().map(PolicyView::from).collect(),
        }))
    }

    /// Sets an asset's withdrawal policy (role `security`); it overrides the
    /// configuration and applies to withdrawals requested from now on.
    #[oai(
        path = "/v1/withdrawal-policies/:asset",
        method = "put",
        operation_id = "set_withdrawal_policy",
        tag = "Tag::WithdrawalPolicy"
    )]
    async fn set_policy(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        asset: Path<String>,
        body: Json<PolicyRequest>,
    ) -> Result<Json<PolicyChange>> {
        let admin = auth::admin(&state, &key, Permission::Administer).await?;
        let why = reason(body.reason.as_str())?;
        let asset = asset.0;
        check_asset(&asset)?;
        let spec = AssetPolicySpec {
            approval_threshold: amount("approval_threshold", &body.approval_threshold)?,
            second_approval_threshold: amount(
                "second_approval_threshold",
                &body.second_approval_threshold,
            )?,
            daily_limit: amount("daily_limit", &body.daily_limit)?,
        };
        let new: AssetPolicy = spec.to_policy()?;
        let configured = &state.config.withdrawal_policy;
        let mut tx = state.pool().begin().await?;
        let audit_id = policy::set_in(&mut tx, configured, &admin, &asset, &new, &why).await?;
        let now = policy::effective_in(&mut tx, configured, &asset).await?;
        tx.commit().await?;
        log_action(&admin, "withdrawal_policy.set", &asset);
        Ok(Json(PolicyChange {
            policy: now.into(),
            audit_id: Some(audit_id),
        }))
    }

    /// Removes an asset's override (role `security`): the configuration
    /// applies again. Nothing changes (no audit row) when there was none.
    #[oai(
        path = "/v1/withdrawal-policies/:asset/reset",
        method = "post",
        operation_id = "reset_withdrawal_policy",
        tag = "Tag::WithdrawalPolicy"
    )]
    async fn reset_policy(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        asset: Path<String>,
        body: Json<ActionRequest>,
    ) -> Result<Json<PolicyChange>> {
        let admin = auth::admin(&state, &key, Permission::Administer).await?;
        let why = reason(body.reason.as_str())?;
        let asset = asset.0;
        check_asset(&asset)?;
        let configured = &state.config.withdrawal_policy;
        let mut tx = state.pool().begin().await?;
        let audit_id = policy::reset_in(&mut tx, configured, &admin, &asset, &why).await?;
        let now = policy::effective_in(&mut tx, configured, &asset).await?;
        tx.commit().await?;
        if audit_id.is_some() {
            log_action(&admin, "withdrawal_policy.reset", &asset);
        }
        Ok(Json(PolicyChange {
            policy: now.into(),
            audit_id,
        }))
    }
}

/// Route templates, for metrics labels.
pub(crate) const ROUTES: &[&str] = &[
    "/v1/withdrawal-policies",
    "/v1/withdrawal-policies/{asset}",
    "/v1/withdrawal-policies/{asset}/reset",
];
