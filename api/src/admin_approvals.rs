//! Admin API over withdrawal approvals (four-eyes): the pending list, approve
//! and reject.
//!
//! Only the `approver` role may approve or reject (others: 403 `forbidden`);
//! an approver who requested the withdrawal (filed it for the user, or is
//! the user) is refused with 403 `four-eyes`, a distinct problem type so a
//! client can tell "wrong person" from "wrong role". The parties are read
//! under a row lock in the same transaction as the approval, its audit row
//! and the workflow's signal.
use crate::AppState;
use crate::admin::{ActionRequest, decode_cursor, encode_cursor, log_action, page_limit, reason};
use crate::auth::{self, AdminKey, Permission};
use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use ledgerflow_payments::approvals::{self, PendingWithdrawal};
use ledgerflow_payments::audit::{self, NewEntry};
use ledgerflow_payments::users::Admin;
use ledgerflow_payments::workflows::withdrawal::{Approval, approve_in};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const PAGE: u32 = 50;
const PAGE_MAX: u32 = 200;

#[derive(Tags)]
enum Tag {
    /// Withdrawal approvals (four-eyes).
    Approvals,
}

/// A withdrawal waiting for an approver.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct PendingWithdrawalView {
    pub id: Uuid,
    pub user_id: Uuid,
    pub asset: String,
    /// Exact decimal, as a string.
    pub amount: String,
    pub address: String,
    /// validated, held or awaiting_approval.
    pub status: String,
    /// The admin who filed it for the user, if any (may not approve it).
    pub requested_by: Option<Uuid>,
    pub requested_at: DateTime<Utc>,
    /// The user's email.
    pub user_email: String,
    /// The name of the admin who filed it, if any.
    pub requested_by_name: Option<String>,
    /// Distinct approvers it needs: 1, or 2 above the asset's
    /// second-approval threshold.
    pub approvals_required: i16,
    /// Names of the approvers who approved it so far.
    pub approved_by: Vec<String>,
}

impl From<PendingWithdrawal> for PendingWithdrawalView {
    fn from(w: PendingWithdrawal) -> Self {
        Self {
            id: w.id,
            user_id: w.user_id,
            asset: w.asset,
            amount: w.amount.normalize().to_string(),
            address: w.address,
            status: w.status,
            requested_by: w.requested_by.map(|a| a.0),
            requested_at: w.requested_at,
            user_email: w.user_email,
            requested_by_name: w.requested_by_name,
            approvals_required: w.approvals_required,
            approved_by: w.approved_by_names,
        }
    }
}

/// A page of pending withdrawals, oldest request first.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct PendingPage {
    pub items: Vec<PendingWithdrawalView>,
    pub next_cursor: Option<String>,
}

/// What an approval or rejection did.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ApprovalResult {
    pub withdrawal_id: Uuid,
    /// approved, rejected, or `approval_recorded` (one more distinct
    /// approver is needed).
    pub decision: String,
    /// False when it had been approved already (nothing changed).
    pub changed: bool,
    /// The audit row written with the decision (absent when nothing changed).
    pub audit_id: Option<Uuid>,
    /// Approvals given so far and needed (approvals only).
    pub approvals: Option<u8>,
    pub approvals_required: Option<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CursorWire {
    t: DateTime<Utc>,
    id: Uuid,
}

/// The approver, or 401/403.
async fn approver(state: &AppState, key: &AdminKey) -> Result<Admin> {
    auth::admin(state, key, Permission::Approve).await
}

/// The approval operations of the admin API.
pub struct ApprovalsApi;

#[OpenApi]
impl ApprovalsApi {
    /// Withdrawals waiting for an approver, oldest first.
    #[oai(
        path = "/v1/withdrawals/pending",
        method = "get",
        operation_id = "list_pending_withdrawals",
        tag = "Tag::Approvals"
    )]
    async fn list_pending(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Page size, 1..=200 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "200")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<PendingPage>> {
        auth::admin(&state, &key, Permission::Read).await?;
        let after = cursor
            .0
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(decode_cursor::<CursorWire>)
            .transpose()?
            .map(|c| (c.t, c.id));
        let limit = page_limit(limit.0, PAGE, PAGE_MAX)?;
        let mut rows = approvals::pending_list(state.pool(), after, limit + 1).await?;
        let next_cursor = crate::admin::next_page(&mut rows, limit, |r| {
            encode_cursor(&CursorWire {
                t: r.requested_at,
                id: r.id,
            })
        })?;
        Ok(Json(PendingPage {
            items: rows.into_iter().map(PendingWithdrawalView::from).collect(),
            next_cursor,
        }))
    }

    /// Approves a withdrawal (role `approver`; 403 `four-eyes` for the
    /// requester, an approver linked to the withdrawal's user, or one who
    /// approved it already). Above the asset's second-approval threshold a
    /// second, distinct approver must approve too (the first answer's
    /// decision is `approval_recorded`). Approving one approved already
    /// changes nothing.
    #[oai(
        path = "/v1/withdrawals/:id/approve",
        method = "post",
        operation_id = "approve_withdrawal",
        tag = "Tag::Approvals"
    )]
    async fn approve(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
        body: Json<ActionRequest>,
    ) -> Result<Json<ApprovalResult>> {
        let admin = approver(&state, &key).await?;
        let why = reason(body.reason.as_str())?;
        let id = id.0;
        let mut tx = state.pool().begin().await?;
        let parties = approvals::parties_in(&mut tx, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        if parties.includes(&admin) {
            return Err(Error::FourEyes(
                "the requester of a withdrawal cannot approve it; another approver must".into(),
            ));
        }
        // approve_in checks the state, writes the audit row and sends the
        // workflow's signal, all on this transaction.
        let sent = approve_in(&mut tx, &state.store, &admin, id, &why)
            .await
            .map_err(state_conflict)?;
        let changed = sent.is_new();
        let (decision, approvals, approvals_required) = match sent {
            Approval::Recorded { given, required } => {
                ("approval_recorded", Some(given), Some(required))
            }
            Approval::Approved(_) => ("approved", None, None),
        };
        let audit_id = if changed {
            // approve_in wrote it on this transaction; read its id back.
            let filter = audit::Filter {
                admin_id: Some(admin.id),
                action: Some("withdrawal.approve".into()),
                target_type: Some("withdrawal".into()),
                target_id: Some(id.to_string()),
                before: None,
            };
            audit::list(&mut *tx, &filter, 1)
                .await?
                .first()
                .map(|e| e.id)
        } else {
            None
        };
        tx.commit().await?;
        log_action(&admin, "withdrawal.approve", &id.to_string());
        Ok(Json(ApprovalResult {
            withdrawal_id: id,
            decision: decision.into(),
            changed,
            audit_id,
            approvals,
            approvals_required,
        }))
    }

    /// Rejects a withdrawal waiting for approval (role `approver`): it
    /// becomes `rejected` and its hold is released by the workflow.
    #[oai(
        path = "/v1/withdrawals/:id/reject",
        method = "post",
        operation_id = "reject_withdrawal",
        tag = "Tag::Approvals"
    )]
    async fn reject(
        &self,
        state: Data<&AppState>,
        key: AdminKey,
        id: Path<Uuid>,
        body: Json<ActionRequest>,
    ) -> Result<Json<ApprovalResult>> {
        let admin = approver(&state, &key).await?;
        let why = reason(body.reason.as_str())?;
        let id = id.0;
        let mut tx = state.pool().begin().await?;
        if approvals::parties_in(&mut tx, id).await?.is_none() {
            return Err(not_found(id));
        }
        approvals::reject_in(&mut tx, &state.store, &admin, id, &why)
            .await
            .map_err(state_conflict)?;
        let audit_id = audit::record(
            &mut *tx,
            &admin,
            &NewEntry {
                action: "withdrawal.reject",
                target_type: "withdrawal",
                target_id: &id.to_string(),
                reason: &why,
                details: serde_json::json!({}),
            },
        )
        .await?;
        tx.commit().await?;
        log_action(&admin, "withdrawal.reject", &id.to_string());
        Ok(Json(ApprovalResult {
            withdrawal_id: id,
            decision: "rejected".into(),
            changed: true,
            audit_id: Some(audit_id),
            approvals: None,
            approvals_required: None,
        }))
    }
}

/// The withdrawal exists (checked first), so the domain's `Invalid` here
/// means its state does not allow the decision: 409, not 400.
fn state_conflict(e: ledgerflow_payments::Error) -> Error {
    match e {
        ledgerflow_payments::Error::Invalid(msg) => Error::Conflict(msg),
        other => Error::from(other),
    }
}

fn not_found(id: Uuid) -> Error {
    Error::NotFound(format!("withdrawal {id} not found"))
}

/// Route templates, for metrics labels.
pub(crate) const ROUTES: &[&str] = &[
    "/v1/withdrawals/pending",
    "/v1/withdrawals/{id}/approve",
    "/v1/withdrawals/{id}/reject",
];
