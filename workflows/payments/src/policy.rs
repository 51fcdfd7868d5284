//! The withdrawal policy of each asset: above which amount a withdrawal needs
//! an approver, above which it needs two distinct approvers, and how much
//! one user may withdraw per UTC day.
//!
//! Two sources, one answer per asset ([`effective_in`]): an override an
//! admin of the `security` role set through the admin API ([`set_in`],
//! audited with a reason in the same transaction; kept in
//! `withdrawal_policies`), else the process configuration
//! (`LEDGERFLOW_WITHDRAWAL_POLICY` / `LEDGERFLOW_WITHDRAWAL_POLICY_FILE`,
//! parsed by [`parse_config`]). The withdrawal workflow reads it in its
//! `validate` step, so a change applies to withdrawals requested after it.
//!
//! Amounts are exact decimals written as JSON strings (`"1.5"`, never
//! `1.5`): [`AmountStr`] refuses numbers.
use crate::audit::{self, NewEntry};
use crate::error::{Error, Result};
use crate::ids::AdminId;
use crate::ledger;
use crate::money::{AmountStr, Asset};
use crate::users::Admin;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgConnection;
use std::collections::BTreeMap;
use uuid::Uuid;

/// One asset's policy; `None` means "no threshold" / "no limit".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AssetPolicy {
    /// A withdrawal of more than this needs one approver.
    pub approval_threshold: Option<Decimal>,
    /// A withdrawal of more than this needs two distinct approvers.
    pub second_approval_threshold: Option<Decimal>,
    /// The most one user may withdraw per UTC day.
    pub daily_limit: Option<Decimal>,
}

impl AssetPolicy {
    /// How many distinct approvers a withdrawal of `amount` needs: 0, 1 or 2.
    pub fn approvals_required(&self, amount: Decimal) -> u8 {
        if self.second_approval_threshold.is_some_and(|t| amount > t) {
            2
        } else if self.approval_threshold.is_some_and(|t| amount > t) {
            1
        } else {
            0
        }
    }

    /// Checks what a policy must satisfy whatever its source: the second
    /// threshold needs the first, and the first is not above it.
    pub fn check(&self) -> Result<()> {
        match (self.approval_threshold, self.second_approval_threshold) {
            (None, Some(_)) => Err(Error::Invalid(
                "a second-approval threshold needs an approval threshold".into(),
            )),
            (Some(first), Some(second)) if first > second => Err(Error::Invalid(format!(
                "the approval threshold ({first}) is above the second-approval threshold ({second})"
            ))),
            _ => Ok(()),
        }
    }

    /// [`AssetPolicy::check`] plus the asset's scale for every amount.
    fn check_for(&self, asset: &Asset) -> Result<()> {
        self.check()?;
        for value in [
            self.approval_threshold,
            self.second_approval_threshold,
            self.daily_limit,
        ]
        .into_iter()
        .flatten()
        {
            crate::money::Amount::from_decimal(value, asset.scale)?;
        }
        Ok(())
    }
}

/// An asset's policy as written in configuration and on the wire: amounts
/// as decimal strings, absent or `null` for none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AssetPolicySpec {
    #[serde(default)]
    pub approval_threshold: Option<AmountStr>,
    #[serde(default)]
    pub second_approval_threshold: Option<AmountStr>,
    #[serde(default)]
    pub daily_limit: Option<AmountStr>,
}

impl AssetPolicySpec {
    /// The exact policy (amounts parsed; ordering checked).
    pub fn to_policy(&self) -> Result<AssetPolicy> {
        let exact = |a: &Option<AmountStr>| a.as_ref().map(decimal).transpose();
        let policy = AssetPolicy {
            approval_threshold: exact(&self.approval_threshold)?,
            second_approval_threshold: exact(&self.second_approval_threshold)?,
            daily_limit: exact(&self.daily_limit)?,
        };
        policy.check()?;
        Ok(policy)
    }
}

fn decimal(a: &AmountStr) -> Result<Decimal> {
    Decimal::from_str_exact(a.as_str())
        .map_err(|e| Error::Invalid(format!("amount {:?}: {e}", a.as_str())))
}

/// The configured policy: asset code → policy.
pub type Policy = BTreeMap<String, AssetPolicy>;

/// Parses the configuration's JSON object, e.g.
/// `{"BTC": {"approval-threshold": "1", "second-approval-threshold": "5",
/// "daily-limit": "10"}}`. Asset codes are checked against the database
/// when used, not here (the binary may start before the assets exist).
pub fn parse_config(json: &str) -> Result<Policy> {
    let specs: BTreeMap<String, AssetPolicySpec> = serde_json::from_str(json)
        .map_err(|e| Error::Invalid(format!("withdrawal policy: {e}")))?;
    specs
        .into_iter()
        .map(|(asset, spec)| {
            let policy = spec
                .to_policy()
                .map_err(|e| Error::Invalid(format!("withdrawal policy of {asset}: {e}")))?;
            Ok((asset, policy))
        })
        .collect()
}

/// Where an asset's effective policy comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// An admin set it through the admin API (`withdrawal_policies`).
    Admin,
    /// The process configuration.
    Config,
    /// Neither: no approval, no limit.
    None,
}

impl Source {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Admin => "admin",
            Source::Config => "config",
            Source::None => "none",
        }
    }
}

/// An asset's effective policy and where it comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    pub asset: String,
    pub policy: AssetPolicy,
    pub source: Source,
    /// The admin who set the override (source `admin`).
    pub updated_by: Option<AdminId>,
    pub updated_by_name: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
}

type OverrideRow = (
    String,
    Option<Decimal>,
    Option<Decimal>,
    Option<Decimal>,
    AdminId,
    String,
    DateTime<Utc>,
);

const OVERRIDES: &str = "SELECT p.asset, p.approval_threshold, p.second_approval_threshold,
                                p.daily_limit, p.updated_by, a.name, p.updated_at
                           FROM withdrawal_policies p JOIN admins a ON a.id = p.updated_by";

fn from_override(row: OverrideRow) -> Effective {
    let (asset, approval, second, limit, by, name, at) = row;
    Effective {
        asset,
        policy: AssetPolicy {
            approval_threshold: approval,
            second_approval_threshold: second,
            daily_limit: limit,
        },
        source: Source::Admin,
        updated_by: Some(by),
        updated_by_name: Some(name),
        updated_at: Some(at),
    }
}

fn from_config(asset: &str, configured: &Policy) -> Effective {
    let (policy, source) = match configured.get(asset) {
        Some(p) => (*p, Source::Config),
        None => (AssetPolicy::default(), Source::None),
    };
    Effective {
        asset: asset.to_owned(),
        policy,
        source,
        updated_by: None,
        updated_by_name: None,
        updated_at: None,
    }
}

/// The effective policy of `asset`: the admin's override, else `configured`.
pub async fn effective_in(
    conn: &mut PgConnection,
    configured: &Policy,
    asset: &str,
) -> Result<Effective> {
    let row: Option<OverrideRow> = sqlx::query_as(&format!("{OVERRIDES} WHERE p.asset = $1"))
        .bind(asset)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        Some(row) => from_override(row),
        None => from_config(asset, configured),
    })
}

/// The effective policy of every asset, by asset code.
pub async fn list(conn: &mut PgConnection, configured: &Policy) -> Result<Vec<Effective>> {
    let assets: Vec<String> = sqlx::query_scalar("SELECT code FROM assets ORDER BY code")
        .fetch_all(&mut *conn)
        .await?;
    let overrides: Vec<OverrideRow> = sqlx::query_as(OVERRIDES).fetch_all(&mut *conn).await?;
    let mut overrides: BTreeMap<String, Effective> = overrides
        .into_iter()
        .map(|r| (r.0.clone(), from_override(r)))
        .collect();
    Ok(assets
        .iter()
        .map(|a| {
            overrides
                .remove(a)
                .unwrap_or_else(|| from_config(a, configured))
        })
        .collect())
}

/// Sets `asset`'s policy to `policy` as `admin` (the API checks the role),
/// on the caller's transaction, with its audit row (the previous and the new
/// policy in its details). Returns the audit row's id.
pub async fn set_in(
    conn: &mut PgConnection,
    configured: &Policy,
    admin: &Admin,
    asset: &str,
    policy: &AssetPolicy,
    reason: &str,
) -> Result<Uuid> {
    let asset = ledger::asset(conn, asset)
        .await?
        .ok_or_else(|| Error::UnknownAsset(asset.to_owned()))?;
    policy.check_for(&asset)?;
    let before = effective_in(conn, configured, &asset.code).await?;
    let audit_id = audit::record(
        &mut *conn,
        admin,
        &NewEntry {
            action: "withdrawal_policy.set",
            target_type: "withdrawal_policy",
            target_id: &asset.code,
            reason,
            details: json!({
                "before": wire(&before.policy),
                "before_source": before.source.as_str(),
                "after": wire(policy),
            }),
        },
    )
    .await?;
    sqlx::query(
        "INSERT INTO withdrawal_policies
             (asset, approval_threshold, second_approval_threshold, daily_limit, updated_by)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (asset) DO UPDATE SET
             approval_threshold = EXCLUDED.approval_threshold,
             second_approval_threshold = EXCLUDED.second_approval_threshold,
             daily_limit = EXCLUDED.daily_limit,
             updated_by = EXCLUDED.updated_by,
             updated_at = now()",
    )
    .bind(&asset.code)
    .bind(policy.approval_threshold)
    .bind(policy.second_approval_threshold)
    .bind(policy.daily_limit)
    .bind(admin.id)
    .execute(&mut *conn)
    .await?;
    Ok(audit_id)
}

/// Removes `asset`'s override as `admin`, so the configuration applies
/// again, with its audit row. `None` (nothing written) when there was none.
pub async fn reset_in(
    conn: &mut PgConnection,
    configured: &Policy,
    admin: &Admin,
    asset: &str,
    reason: &str,
) -> Result<Option<Uuid>> {
    let removed: Option<(Option<Decimal>, Option<Decimal>, Option<Decimal>)> = sqlx::query_as(
        "DELETE FROM withdrawal_policies WHERE asset = $1
         RETURNING approval_threshold, second_approval_threshold, daily_limit",
    )
    .bind(asset)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((approval, second, limit)) = removed else {
        return Ok(None);
    };
    let before = AssetPolicy {
        approval_threshold: approval,
        second_approval_threshold: second,
        daily_limit: limit,
    };
    let after = from_config(asset, configured);
    let id = audit::record(
        &mut *conn,
        admin,
        &NewEntry {
            action: "withdrawal_policy.reset",
            target_type: "withdrawal_policy",
            target_id: asset,
            reason,
            details: json!({
                "before": wire(&before),
                "after": wire(&after.policy),
                "after_source": after.source.as_str(),
            }),
        },
    )
    .await?;
    Ok(Some(id))
}

/// A policy as JSON with amounts as strings (for audit details).
pub fn wire(p: &AssetPolicy) -> serde_json::Value {
    let s = |d: Option<Decimal>| d.map(|d| d.normalize().to_string());
    json!({
        "approval_threshold": s(p.approval_threshold),
        "second_approval_threshold": s(p.second_approval_threshold),
        "daily_limit": s(p.daily_limit),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str_exact(s).unwrap()
    }

    #[test]
    fn config_parses_strings_and_refuses_floats_and_bad_order() {
        let p = parse_config(
            r#"{"BTC": {"approval-threshold": "1", "second-approval-threshold": "5",
                        "daily-limit": "10"}, "USD": {"daily-limit": "50000.00"}}"#,
        )
        .unwrap();
        assert_eq!(p["BTC"].approval_threshold, Some(d("1")));
        assert_eq!(p["BTC"].second_approval_threshold, Some(d("5")));
        assert_eq!(p["USD"].daily_limit, Some(d("50000.00")));
        assert_eq!(p["USD"].approval_threshold, None);
        for bad in [
            r#"{"BTC": {"approval-threshold": 1}}"#,
            r#"{"BTC": {"approval-threshold": 1.5}}"#,
            r#"{"BTC": {"approval-threshold": "-1"}}"#,
            r#"{"BTC": {"approval-threshold": "0"}}"#,
            r#"{"BTC": {"approval-threshold": "1e3"}}"#,
            r#"{"BTC": {"approval-threshold": "5", "second-approval-threshold": "1"}}"#,
            r#"{"BTC": {"second-approval-threshold": "1"}}"#,
            r#"{"BTC": {"approval-treshold": "1"}}"#,
            r#"["BTC"]"#,
        ] {
            assert!(parse_config(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn approvals_required_counts_strictly_above_each_threshold() {
        let p = AssetPolicy {
            approval_threshold: Some(d("1")),
            second_approval_threshold: Some(d("5")),
            daily_limit: None,
        };
        assert_eq!(p.approvals_required(d("1")), 0);
        assert_eq!(p.approvals_required(d("1.00000001")), 1);
        assert_eq!(p.approvals_required(d("5")), 1);
        assert_eq!(p.approvals_required(d("5.1")), 2);
        assert_eq!(AssetPolicy::default().approvals_required(d("1000000")), 0);
    }
}
