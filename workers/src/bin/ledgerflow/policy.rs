//! The withdrawal policy's configuration (`--withdrawal-policy` /
//! `LEDGERFLOW_WITHDRAWAL_POLICY`, JSON; or `--withdrawal-policy-file` /
//! `LEDGERFLOW_WITHDRAWAL_POLICY_FILE`, a JSON file) and `ledgerflow
//! withdrawal-policy`, which prints the effective policy of every asset.
//!
//! `ledgerflow run` loads it with [`PolicyArgs::load`] and hands the same
//! value to the workers (the withdrawal workflow's `validate` step) and to
//! the admin API (which shows it for assets without an admin's override).
use anyhow::{Context, Result, bail};
use ledgerflow_payments::policy::{self, Policy};
use serde_json::json;
use sqlx::PgConnection;

/// Where the configured policy comes from.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PolicyArgs {
    /// Withdrawal policy per asset, JSON, amounts as strings, e.g.
    /// {"BTC": {"approval-threshold": "1", "second-approval-threshold": "5",
    /// "daily-limit": "10"}}.
    #[arg(long, env = "LEDGERFLOW_WITHDRAWAL_POLICY")]
    pub withdrawal_policy: Option<String>,
    /// A file holding the same JSON (e.g. a mounted ConfigMap).
    #[arg(long, env = "LEDGERFLOW_WITHDRAWAL_POLICY_FILE")]
    pub withdrawal_policy_file: Option<std::path::PathBuf>,
}

impl PolicyArgs {
    /// The configured policy (empty when neither is given; both is an error).
    pub fn load(&self) -> Result<Policy> {
        let json = match (&self.withdrawal_policy, &self.withdrawal_policy_file) {
            (Some(_), Some(_)) => bail!(
                "set LEDGERFLOW_WITHDRAWAL_POLICY or LEDGERFLOW_WITHDRAWAL_POLICY_FILE, not both"
            ),
            (Some(json), None) => json.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
            (None, None) => return Ok(Policy::new()),
        };
        let policy = policy::parse_config(&json)?;
        if policy.is_empty() {
            tracing::warn!("the withdrawal policy is empty: no withdrawal needs an approval");
        }
        Ok(policy)
    }
}

/// `ledgerflow withdrawal-policy`: the effective policy of every asset as
/// JSON (the configuration given to this command, and admins' overrides).
pub async fn show(conn: &mut PgConnection, args: &PolicyArgs) -> Result<serde_json::Value> {
    let configured = args.load()?;
    for asset in configured.keys() {
        if ledgerflow_payments::ledger::asset(conn, asset)
            .await?
            .is_none()
        {
            bail!("the withdrawal policy names asset {asset:?}, which does not exist");
        }
    }
    let items: Vec<_> = policy::list(conn, &configured)
        .await?
        .into_iter()
        .map(|e| {
            let mut v = policy::wire(&e.policy);
            v["asset"] = json!(e.asset);
            v["source"] = json!(e.source.as_str());
            v["updated_by"] = json!(e.updated_by_name);
            v
        })
        .collect();
    Ok(json!({ "items": items }))
}
