//! Flow-control gauges of the API's `/metrics`, read from Postgres at scrape time: per limit
//! row (an operator-configured key, class or queue, so the label set stays bounded), its
//! holders, waiters, bucket tokens and deferrals so far.
use ledgerflow_engine::flow::limits;
use prometheus::{IntGaugeVec, Opts, Registry};
use sqlx::PgPool;

/// The gauges.
#[derive(Debug, Clone)]
pub(crate) struct FlowGauges {
    holders: IntGaugeVec,
    waiters: IntGaugeVec,
    tokens: IntGaugeVec,
    deferred: IntGaugeVec,
}

impl FlowGauges {
    /// The gauges, registered in `registry`.
    pub(crate) fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["key"]);
        let g = Self {
            holders: gauge(
                "ledgerflow_flow_holders",
                "Running jobs (or admitted workflows) holding a slot of a flow limit",
            )?,
            waiters: gauge(
                "ledgerflow_flow_waiters",
                "Jobs (or workflows) waiting for a flow limit's slot or bucket",
            )?,
            tokens: gauge(
                "ledgerflow_flow_tokens",
                "Weight in a rate limit's bucket now (what deferred callers are owed is not deducted)",
            )?,
            deferred: gauge(
                "ledgerflow_flow_deferrals",
                "Jobs and calls a rate limit deferred so far (kept in Postgres)",
            )?,
        };
        for v in [&g.holders, &g.waiters, &g.tokens, &g.deferred] {
            registry.register(Box::new(v.clone()))?;
        }
        Ok(g)
    }

    /// Reads every limit's status.
    pub(crate) async fn refresh(&self, pool: &PgPool) -> ledgerflow_engine::Result<()> {
        let status = limits::status(pool, None).await?;
        for v in [&self.holders, &self.waiters, &self.tokens, &self.deferred] {
            v.reset();
        }
        for s in status {
            let key = [s.limit.key.as_str()];
            self.holders.with_label_values(&key).set(s.holders);
            self.waiters.with_label_values(&key).set(s.waiters);
            self.deferred.with_label_values(&key).set(s.deferred);
            if let Some(t) = s.tokens {
                self.tokens.with_label_values(&key).set(t);
            }
        }
        Ok(())
    }
}
