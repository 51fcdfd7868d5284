//! Flow control's upkeep: priority aging — a job that has waited long enough moves up one
//! priority level per period of waiting, down to 0 (the default priority), so low priorities
//! are never starved forever by a steady stream of higher ones — and the pruning of
//! reservations whose job is gone.
use crate::{Result, Store};
use std::time::Duration;

impl Store {
    /// Moves every available job with a priority above 0 that became due more than `period`
    /// ago up one level (at most `limit` jobs). Run once per `period`, a job waiting `w` gains
    /// about `w / period - 1` levels. Returns how many moved.
    pub async fn job_age_priorities(&self, period: Duration, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "WITH t AS (SELECT coalesce($1::timestamptz, now()) AS n),
             old AS (
               SELECT j.id FROM jobs j, t
               WHERE j.state = 'available' AND j.priority > 0
                 AND j.run_at < t.n - $2 * interval '1 millisecond'
               ORDER BY j.run_at
               LIMIT $3
               FOR UPDATE OF j SKIP LOCKED
             )
             UPDATE jobs j SET priority = j.priority - 1 FROM old WHERE j.id = old.id",
        )
        .bind(self.now())
        .bind(crate::store::ms(period))
        .bind(i64::from(limit))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Deletes up to `limit` rate-limit reservations older than an hour whose job no longer
    /// exists (pruned or deleted before its turn came). Returns how many.
    pub async fn flow_prune_reservations(&self, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM flow_reservations WHERE (job_id, key) IN (
               SELECT r.job_id, r.key FROM flow_reservations r
               WHERE r.created_at < now() - interval '1 hour'
                 AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = r.job_id)
               LIMIT $1)",
        )
        .bind(i64::from(limit))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }
}
