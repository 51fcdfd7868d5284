//! The claim: the fast statement for queues without flow control, and the dispatch to the
//! controlled claim ([`crate::flow::claim`]) for queues with it.
use super::{ClaimedJob, Store, ms};
use crate::Result;
use crate::claimed::{claimed_from_row, lease_update};
use std::sync::Arc;

impl Store {
    /// Claims up to `limit` available jobs of `queue` for `owner`, in priority, fairness and
    /// then `run_at` order, skipping rows other workers hold. Each claimed job gets a new
    /// lease token and `attempt + 1`. A paused queue yields nothing. A flow-controlled queue
    /// (its jobs have keys, or it has a limit) is claimed within its limits.
    pub async fn job_claim(
        &self,
        queue: &str,
        owner: &Arc<str>,
        limit: u32,
    ) -> Result<Vec<ClaimedJob>> {
        if self.is_flow_queue(queue) {
            return crate::flow::claim::claim(self, queue, owner, limit).await;
        }
        let jobs = self.claim_fast(queue, owner, limit).await?;
        if jobs.is_empty() && crate::flow::db::queue_is_flow(self.pool(), queue).await? {
            self.mark_flow_queue(queue);
            return crate::flow::claim::claim(self, queue, owner, limit).await;
        }
        Ok(jobs)
    }

    fn is_flow_queue(&self, queue: &str) -> bool {
        self.flow_queues
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(queue)
    }

    pub(crate) fn mark_flow_queue(&self, queue: &str) {
        self.flow_queues
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(queue.to_string());
    }

    /// The claim of a queue without flow control: one statement. It claims nothing from a
    /// queue flagged for flow control (the flag commits with the first keyed job, so a claimer
    /// that could see that job sees the flag).
    async fn claim_fast(
        &self,
        queue: &str,
        owner: &Arc<str>,
        limit: u32,
    ) -> Result<Vec<ClaimedJob>> {
        // The claim commits asynchronously (`synchronous_commit` off for this
        // statement's own transaction only): a claim lost to a database crash just
        // leaves the job `available`, and the attempt that believed it held the lease
        // is fenced off when its completion finds no matching token. Every later
        // synchronous commit (the handler's FencedTx, the completion) flushes the WAL
        // up to and including this claim, so nothing that depends on it can be
        // durable without it. This saves an fsync per claim batch.
        const SQL: &str = concat!(
            "WITH t AS (SELECT coalesce($4::timestamptz, now()) AS n,
                               set_config('synchronous_commit', 'off', true) AS async_commit),
             next AS (
               SELECT id FROM jobs
               WHERE state = 'available' AND queue = $1
                 AND NOT EXISTS (SELECT 1 FROM queues q
                                 WHERE q.name = $1 AND (q.paused OR q.flow))
               ORDER BY priority, fair_seq, run_at, id
               LIMIT $2
               FOR UPDATE SKIP LOCKED
             )
             ",
            lease_update!("next, t", "j.id = next.id", "$3", "$5")
        );
        let rows = sqlx::query(SQL)
            .bind(queue)
            .bind(i64::from(limit))
            .bind(&**owner)
            .bind(self.now())
            .bind(ms(self.config.lease_ttl))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| claimed_from_row(r, queue, owner, false))
            .collect()
    }
}
