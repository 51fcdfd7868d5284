//! The admin audit log: who did what to which target, and why.
//!
//! [`record`] takes the caller's connection on purpose: the admin API calls
//! it inside the transaction that makes the change, so the change and its
//! audit row commit together or not at all (DESIGN.md, contract rule 7). The
//! table is append-only (a trigger refuses UPDATE, DELETE and TRUNCATE).
use crate::error::{Error, Result};
use crate::ids::AdminId;
use crate::users::Admin;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, Postgres, QueryBuilder};
use uuid::Uuid;

/// The longest reason accepted (characters).
pub const MAX_REASON_CHARS: usize = 1000;

/// The most rows one [`list`] call returns.
pub const MAX_PAGE: u32 = 500;

/// One admin action to record.
#[derive(Debug, Clone)]
pub struct NewEntry<'a> {
    /// What was done, e.g. `job.retry` (lowercase, dotted).
    pub action: &'a str,
    /// What it was done to, e.g. `job`, `queue`.
    pub target_type: &'a str,
    /// Which one (a job id, a queue name, a bulk filter's summary).
    pub target_id: &'a str,
    /// Why, in the admin's words. Required.
    pub reason: &'a str,
    /// Anything else worth keeping (previous state, affected ids, the filter).
    pub details: serde_json::Value,
}

/// An audit row as stored.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Entry {
    pub id: Uuid,
    pub admin_id: AdminId,
    pub admin_name: String,
    pub admin_role: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub reason: String,
    pub details: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// Checks a reason the way the table does: not blank, at most
/// [`MAX_REASON_CHARS`] characters. Returns it trimmed.
pub fn check_reason(reason: &str) -> Result<&str> {
    let trimmed = reason.trim();
    if trimmed.is_empty() {
        return Err(Error::Invalid("a reason is required".into()));
    }
    if trimmed.chars().count() > MAX_REASON_CHARS {
        return Err(Error::Invalid(format!(
            "reason must be at most {MAX_REASON_CHARS} characters"
        )));
    }
    Ok(trimmed)
}

/// Writes one audit row for `admin` on the caller's connection — call it in
/// the transaction that makes the change. Returns the row's id.
pub async fn record<'e, E: PgExecutor<'e>>(
    executor: E,
    admin: &Admin,
    entry: &NewEntry<'_>,
) -> Result<Uuid> {
    let reason = check_reason(entry.reason)?;
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO audit_log
             (id, admin_id, admin_name, admin_role, action, target_type, target_id, reason, details)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(admin.id)
    .bind(&admin.name)
    .bind(admin.role.as_str())
    .bind(entry.action)
    .bind(entry.target_type)
    .bind(entry.target_id)
    .bind(reason)
    .bind(&entry.details)
    .execute(executor)
    .await?;
    Ok(id)
}

/// Which audit rows [`list`] returns; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub admin_id: Option<AdminId>,
    pub action: Option<String>,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    /// Rows strictly older than this (created_at, id): the previous page's last row.
    pub before: Option<(DateTime<Utc>, Uuid)>,
}

/// Audit rows matching `filter`, newest first, at most `limit`: 1 to
/// [`MAX_PAGE`] + 1, so that a caller serving pages of up to [`MAX_PAGE`]
/// rows can fetch one more to learn whether another page follows.
pub async fn list<'e, E: PgExecutor<'e>>(
    executor: E,
    filter: &Filter,
    limit: u32,
) -> Result<Vec<Entry>> {
    if limit == 0 || limit > MAX_PAGE + 1 {
        return Err(Error::Invalid(format!(
            "limit must be 1..={}",
            MAX_PAGE + 1
        )));
    }
    let mut q = QueryBuilder::<Postgres>::new(
        "SELECT id, admin_id, admin_name, admin_role, action, target_type, target_id, reason,
                details, created_at
           FROM audit_log WHERE true",
    );
    if let Some(admin) = filter.admin_id {
        q.push(" AND admin_id = ").push_bind(admin);
    }
    if let Some(action) = &filter.action {
        q.push(" AND action = ").push_bind(action.clone());
    }
    if let Some(t) = &filter.target_type {
        q.push(" AND target_type = ").push_bind(t.clone());
    }
    if let Some(t) = &filter.target_id {
        q.push(" AND target_id = ").push_bind(t.clone());
    }
    if let Some((at, id)) = filter.before {
        q.push(" AND (created_at, id) < (")
            .push_bind(at)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(i64::from(limit));
    Ok(q.build_query_as::<Entry>().fetch_all(executor).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_required_and_bounded() {
        assert!(check_reason("").is_err());
        assert!(check_reason("  \n\t ").is_err());
        assert_eq!(check_reason("  stuck job ").ok(), Some("stuck job"));
        assert!(check_reason(&"x".repeat(MAX_REASON_CHARS)).is_ok());
        assert!(check_reason(&"x".repeat(MAX_REASON_CHARS + 1)).is_err());
    }
}
