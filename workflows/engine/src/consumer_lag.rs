//! Kafka consumer lag in Postgres: the ingress records what it measures, every `/metrics` reads it.
//!
//! The lag is measured where the partitions are consumed (the ingress role), but the API's
//! `/metrics` should show it too, and in a deployment the two are different processes. So each
//! ingress process overwrites one row per group and partition it holds, and readers take the rows
//! measured recently (a partition whose consumer went away stops being reported rather than
//! repeating its last value forever).
use crate::{Result, Store};
use std::time::Duration;

/// One partition's lag as measured.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PartitionLag {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    /// The offset the next message produced to the partition gets.
    pub high_watermark: i64,
    /// Where the group goes on from.
    pub position: i64,
    /// `high_watermark - position`, never negative.
    pub lag: i64,
}

impl Store {
    /// Records `lags` (measured now) in one statement, overwriting earlier
    /// measurements of the same partitions.
    pub async fn consumer_lag_record(&self, lags: &[PartitionLag]) -> Result<()> {
        if lags.is_empty() {
            return Ok(());
        }
        let groups: Vec<&str> = lags.iter().map(|l| l.group.as_str()).collect();
        let topics: Vec<&str> = lags.iter().map(|l| l.topic.as_str()).collect();
        let partitions: Vec<i32> = lags.iter().map(|l| l.partition).collect();
        let highs: Vec<i64> = lags.iter().map(|l| l.high_watermark).collect();
        let positions: Vec<i64> = lags.iter().map(|l| l.position).collect();
        let values: Vec<i64> = lags.iter().map(|l| l.lag.max(0)).collect();
        sqlx::query(
            "INSERT INTO kafka_consumer_lag (consumer_group, topic, \"partition\", high_watermark,
                                            \"position\", lag, measured_at)
             SELECT g, t, p, h, o, l, coalesce($7::timestamptz, now())
             FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::bigint[],
                         $6::bigint[]) AS x(g, t, p, h, o, l)
             ON CONFLICT (consumer_group, topic, \"partition\") DO UPDATE
             SET high_watermark = EXCLUDED.high_watermark, \"position\" = EXCLUDED.\"position\",
                 lag = EXCLUDED.lag, measured_at = EXCLUDED.measured_at",
        )
        .bind(&groups)
        .bind(&topics)
        .bind(&partitions)
        .bind(&highs)
        .bind(&positions)
        .bind(&values)
        .bind(self.now())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The partitions whose lag was measured within `max_age`, ordered by
    /// group, topic and partition.
    pub async fn consumer_lag_recent(&self, max_age: Duration) -> Result<Vec<PartitionLag>> {
        let max_age_ms = crate::store::ms(max_age);
        Ok(sqlx::query_as(
            "SELECT consumer_group AS \"group\", topic, \"partition\", high_watermark,
                    \"position\", lag
             FROM kafka_consumer_lag
             WHERE measured_at >= coalesce($1::timestamptz, now())
                                  - $2 * interval '1 millisecond'
             ORDER BY consumer_group, topic, \"partition\"",
        )
        .bind(self.now())
        .bind(max_age_ms)
        .fetch_all(self.pool())
        .await?)
    }
}
