//! Withdrawal approvals as the admin API sees them: the pending list, the
//! parties of a withdrawal (for the four-eyes check), and rejection.
//!
//! Approval itself is [`crate::workflows::withdrawal::approve_in`]. A
//! rejection marks the withdrawal `rejected` and makes the workflow's
//! approval wait time out now, so its `await_approval` step takes the same
//! path as an approval that never came: the step fails and the saga releases
//! the hold. Both run on the caller's transaction, next to the audit row.
use crate::ids::AdminId;
use crate::users::{Admin, AdminRole};
use crate::{Error, Result};
use chrono::{DateTime, Utc};
use ledgerflow_engine::Store;
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Statuses in which a withdrawal that needs approval can still get it.
const PENDING: &[&str] = &["validated", "held", "awaiting_approval"];

/// A withdrawal waiting for an approver.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct PendingWithdrawal {
    pub id: Uuid,
    pub user_id: Uuid,
    pub asset: String,
    pub amount: Decimal,
    pub address: String,
    /// validated, held or awaiting_approval.
    pub status: String,
    /// The admin who filed it for the user, if any (may not approve it).
    pub requested_by: Option<AdminId>,
    pub requested_at: DateTime<Utc>,
    /// The user's email, for humans.
    pub user_email: String,
    /// The name of `requested_by`.
    pub requested_by_name: Option<String>,
    /// Distinct approvers it needs (1 or 2).
    pub approvals_required: i16,
    /// The names of the approvers who approved it so far, in order.
    pub approved_by_names: Vec<String>,
}

/// Who asked for a withdrawal: its user and, if an admin filed it, that admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parties {
    pub user_id: Uuid,
    pub requested_by: Option<AdminId>,
}

impl Parties {
    /// True when `admin` is one of the requesting parties (four-eyes: they
    /// may not approve it).
    pub fn includes(&self, admin: &Admin) -> bool {
        self.requested_by == Some(admin.id) || admin.id.0 == self.user_id
    }
}

/// Pending withdrawals, oldest request first, strictly after `after`
/// (the previous page's last `(requested_at, id)`), at most `limit`.
pub async fn pending_list(
    pool: &PgPool,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: u32,
) -> Result<Vec<PendingWithdrawal>> {
    if limit == 0 || limit > 1000 {
        return Err(Error::Invalid("limit must be 1..=1000".into()));
    }
    let (after_t, after_id) = after.unzip();
    Ok(sqlx::query_as::<_, PendingWithdrawal>(
        "SELECT w.id, w.user_id, w.asset, w.amount, w.address, w.status, w.requested_by,
                w.requested_at, u.email AS user_email, r.name AS requested_by_name,
                w.approvals_required,
                ARRAY(SELECT a.name FROM withdrawal_approvals wa JOIN admins a ON a.id = wa.admin_id
                      WHERE wa.withdrawal_id = w.id ORDER BY wa.approved_at) AS approved_by_names
         FROM withdrawals w
         JOIN users u ON u.id = w.user_id
         LEFT JOIN admins r ON r.id = w.requested_by
         WHERE w.requires_approval AND w.approved_by IS NULL AND w.status = ANY($1)
           AND ($2::timestamptz IS NULL OR (w.requested_at, w.id) > ($2, $3))
         ORDER BY w.requested_at, w.id
         LIMIT $4",
    )
    .bind(PENDING)
    .bind(after_t)
    .bind(after_id)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?)
}

/// The parties of withdrawal `id`, locked (`FOR UPDATE`) until the caller's
/// transaction ends; `None` when there is no such withdrawal.
pub async fn parties_in(conn: &mut PgConnection, id: Uuid) -> Result<Option<Parties>> {
    let row: Option<(Uuid, Option<AdminId>)> =
        sqlx::query_as("SELECT user_id, requested_by FROM withdrawals WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(row.map(|(user_id, requested_by)| Parties {
        user_id,
        requested_by,
    }))
}

/// Rejects withdrawal `id` as `admin` (an approver), on the caller's
/// transaction: the withdrawal becomes `rejected` with `reason`, and its
/// workflow's approval wait times out now (the saga then releases the
/// hold). Only a withdrawal whose workflow is waiting for approval can be
/// rejected; anything else is [`Error::Invalid`] (nothing written).
pub async fn reject_in(
    conn: &mut PgConnection,
    store: &Store,
    admin: &Admin,
    id: Uuid,
    reason: &str,
) -> Result<()> {
    if admin.role != AdminRole::Approver {
        return Err(Error::Forbidden(format!(
            "admin {} is not an approver",
            admin.name
        )));
    }
    let row: Option<(bool, String, Option<AdminId>)> = sqlx::query_as(
        "SELECT requires_approval, status, approved_by FROM withdrawals WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let (requires, status, approved_by) =
        row.ok_or_else(|| Error::Invalid(format!("no withdrawal {id}")))?;
    if !requires || approved_by.is_some() || status != "awaiting_approval" {
        return Err(Error::Invalid(format!(
            "withdrawal {id} is {status}{}; only one awaiting approval can be rejected",
            if approved_by.is_some() {
                " (approved)"
            } else {
                ""
            }
        )));
    }
    if !store.workflow_expire_wait_in(conn, id).await? {
        return Err(Error::Invalid(format!(
            "withdrawal {id} is not waiting for approval yet; try again"
        )));
    }
    sqlx::query(
        "UPDATE withdrawals SET status = 'rejected', error = $2,
                updated_at = coalesce($3::timestamptz, now())
         WHERE id = $1",
    )
    .bind(id)
    .bind(format!("rejected by admin {}: {reason}", admin.name))
    .bind(store.now())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
