//! Admin API over flow-control limits: list them with their holders, waiters, tokens and
//! deferrals; set or remove one at runtime (audited, with a reason). A change applies to the
//! next claim of every worker process, without a restart.
use crate::AppState;
use crate::admin::{ActionRequest, log_action};
use crate::admin_params::reason;
use crate::auth::{self, AdminKey, Permission};
use crate::error::{Error, Result};
use crate::types::Reason;
use chrono::{DateTime, Utc};
use ledgerflow_engine::flow::{FlowLimit, KeyStatus, LimitChange, limits};
use ledgerflow_payments::audit::{self, NewEntry};
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use std::time::Duration;
use uuid::Uuid;

/// Longest key accepted in a path.
const KEY_MAX: usize = 256;

#[derive(Tags)]
enum Tag {
    /// Flow control: concurrency limits, rate limits and fairness weights per key.
    Flow,
}

/// A token bucket: up to `capacity` weight, refilled by `refill` weight every `window_ms`.
#[derive(Debug, Clone, Object)]
pub struct RateView {
    pub capacity: i64,
    pub refill: i64,
    pub window_ms: i64,
}

/// A limit with what holds and waits for it now.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct LimitView {
    /// An exact key (`user:42`), a class (`user:*`) or a queue (`queue:<name>`).
    pub key: String,
    /// Holders at once (0 stops the key; absent: no limit).
    pub concurrency: Option<i32>,
    pub rate: Option<RateView>,
    pub fair_weight: i32,
    /// `code` (declared by the application) or `admin` (changed here; code leaves it alone).
    pub source: String,
    pub reason: Option<String>,
    pub updated_by: Option<String>,
    pub updated_at: DateTime<Utc>,
    /// Running jobs (or admitted workflows) under the limit.
    pub holders: i64,
    /// Jobs (or workflows) waiting for it.
    pub waiters: i64,
    /// The bucket's tokens now (what is owed to deferred callers is not deducted).
    pub tokens: Option<i64>,
    /// Jobs and calls the bucket deferred so far.
    pub deferred: i64,
}

impl From<KeyStatus> for LimitView {
    fn from(s: KeyStatus) -> Self {
        Self {
            key: s.limit.key,
            concurrency: s.limit.concurrency,
            rate: s.limit.rate.map(|r| RateView {
                capacity: r.capacity,
                refill: r.refill,
                window_ms: r.window_ms(),
            }),
            fair_weight: s.limit.fair_weight,
            source: s.source,
            reason: s.reason,
            updated_by: s.updated_by,
            updated_at: s.updated_at,
            holders: s.holders,
            waiters: s.waiters,
            tokens: s.tokens,
            deferred: s.deferred,
        }
    }
}

/// Every limit, by key.
#[derive(Debug, Object)]
pub struct LimitList {
    pub limits: Vec<LimitView>,
}

/// A limit to set (the whole limit: what is absent is unset).
#[derive(Debug, Object)]
pub struct SetLimitRequest {
    /// Holders at once (0 stops the key; absent: no limit).
    pub concurrency: Option<i32>,
    pub rate: Option<RateView>,
    /// Share of claims relative to other keys, 1..=1000 (default 1).
    pub fair_weight: Option<i32>,
    /// Why (required); kept in the audit log and on the limit.
    pub reason: Reason,
}

/// A limit after a change.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct LimitActionResult {
    /// The limit as it is now (absent after a removal).
    pub limit: Option<LimitView>,
    pub audit_id: Uuid,
}

fn check_key(key: &str) -> Result<()> {
    crate::input::check_text("limit key", key, KEY_MAX, crate::input::TextKind::Line)?;
    if key.is_empty() {
        return Err(Error::Validation("limit key must not be empty".into()));
    }
    Ok(())
}

async fn one(state: &AppState, key: &str) -> Result<Option<LimitView>> {
    Ok(limits::status(state.pool(), Some(key))
        .await?
        .into_iter()
        .next()
        .map(LimitView::from))
}

/// The flow-control operations of the admin API.
pub struct FlowApi;

#[OpenApi]
impl FlowApi {
    /// Every limit with its holders, waiters, tokens and deferrals.
    #[oai(
        path = "/v1/flow/limits",
        method = "get",
        operation_id = "list_flow_limits",
        tag = "Tag::Flow"
    )]
    async fn list_limits(&self, state: Data<&AppState>, key: AdminKey) -> Result<Json<LimitList>> {
        auth::admin(&state, &key, Permission::Read).await?;
        let limits = limits::status(state.pool(), None).await?;
        Ok(Json(LimitList {
            limits: limits.into_iter().map(LimitView::from).collect(),
        }))
    }

    /// One limit.
    #[oai(
        path = "/v1/flow/limits/:limit_key",
        method = "get",
        operation_id = "get_flow_limit",
        tag = "Tag::Flow"
    )]
    async fn get_limit(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        limit_key: Path<String>,
    ) -> Result<Json<LimitView>> {
        auth::admin(&state, &key, Permission::Read).await?;
        check_key(&limit_key.0)?;
        one(&state, &limit_key.0)
            .await?
            .map(Json)
            .ok_or_else(|| Error::NotFound(format!("flow limit {:?} not found", limit_key.0)))
    }

    /// Sets a limit (creating it, or replacing it whole); audited.
    #[oai(
        path = "/v1/flow/limits/:limit_key",
        method = "put",
        operation_id = "set_flow_limit",
        tag = "Tag::Flow"
    )]
    async fn set_limit(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        limit_key: Path<String>,
        body: Json<SetLimitRequest>,
    ) -> Result<Json<LimitActionResult>> {
        let admin = auth::admin(&state, &key, Permission::Operate).await?;
        let why = reason(body.reason.as_str())?;
        check_key(&limit_key.0)?;
        let mut limit = FlowLimit::new(limit_key.0.clone());
        limit.concurrency = body.concurrency;
        limit.fair_weight = body.fair_weight.unwrap_or(1);
        if let Some(r) = &body.rate {
            let window = Duration::from_millis(u64::try_from(r.window_ms).unwrap_or(0));
            limit = limit.rate(r.capacity, r.refill, window);
        }
        limit
            .validate()
            .map_err(|e| Error::Validation(e.to_string()))?;
        let mut tx = state.pool().begin().await?;
        let by = admin.name.clone();
        limits::set_in(
            &mut tx,
            &LimitChange {
                limit: &limit,
                by: &by,
                reason: &why,
            },
        )
        .await?;
        let audit_id = audit::record(
            &mut *tx,
            &admin,
            &NewEntry {
                action: "flow.limit.set",
                target_type: "flow_limit",
                target_id: &limit_key.0,
                reason: &why,
                details: serde_json::to_value(&limit).unwrap_or_default(),
            },
        )
        .await?;
        tx.commit().await?;
        log_action(&admin, "flow.limit.set", &limit_key.0);
        Ok(Json(LimitActionResult {
            limit: one(&state, &limit_key.0).await?,
            audit_id,
        }))
    }

    /// Removes a limit (the key falls back to its class's limit, or none, until the
    /// application declares it again at its next start); audited.
    #[oai(
        path = "/v1/flow/limits/:limit_key/remove",
        method = "post",
        operation_id = "remove_flow_limit",
        tag = "Tag::Flow"
    )]
    async fn remove_limit(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        limit_key: Path<String>,
        body: Json<ActionRequest>,
    ) -> Result<Json<LimitActionResult>> {
        let admin = auth::admin(&state, &key, Permission::Operate).await?;
        let why = reason(body.reason.as_str())?;
        check_key(&limit_key.0)?;
        let mut tx = state.pool().begin().await?;
        if !limits::remove_in(&mut tx, &limit_key.0).await? {
            return Err(Error::NotFound(format!(
                "flow limit {:?} not found",
                limit_key.0
            )));
        }
        let audit_id = audit::record(
            &mut *tx,
            &admin,
            &NewEntry {
                action: "flow.limit.remove",
                target_type: "flow_limit",
                target_id: &limit_key.0,
                reason: &why,
                details: serde_json::json!({}),
            },
        )
        .await?;
        tx.commit().await?;
        log_action(&admin, "flow.limit.remove", &limit_key.0);
        Ok(Json(LimitActionResult {
            limit: None,
            audit_id,
        }))
    }
}

/// Route templates, for metrics labels.
pub(crate) const ROUTES: &[&str] = &[
    "/v1/flow/limits",
    "/v1/flow/limits/{limit_key}",
    "/v1/flow/limits/{limit_key}/remove",
];
