//! The store, manual clock and database the flow-control tests share.
#![allow(dead_code)]
use chrono::{DateTime, TimeDelta, Utc};
use ledgerflow_engine::flow::{self, FlowLimit, LimitChange};
use ledgerflow_engine::store::ClaimedJob;
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{Inserted, ManualClock, NewJob, Result, Store};
use std::sync::Arc;

pub type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).expect("a valid timestamp")
}

pub struct Env {
    pub db: TestDb,
    pub clock: ManualClock,
    pub store: Store,
}

impl Env {
    pub async fn new() -> Result<Self> {
        let db = TestDb::new().await?;
        let clock = ManualClock::new(t0());
        let store = Self::store_on(&db, &clock);
        Ok(Self { db, clock, store })
    }

    pub fn store_on(db: &TestDb, clock: &ManualClock) -> Store {
        ledgerflow_engine::testing::manual_store(&db.pool, clock)
    }

    /// Another process's store: its own cache of flow-controlled queues.
    pub fn other(&self) -> Store {
        Self::store_on(&self.db, &self.clock)
    }

    pub async fn claim(&self, queue: &str, n: u32) -> Result<Vec<ClaimedJob>> {
        self.store.job_claim(queue, &Arc::from("w"), n).await
    }

    pub async fn insert(&self, job: NewJob) -> Result<Inserted> {
        self.store.job_insert(&job).await
    }

    pub async fn complete(&self, jobs: &[ClaimedJob]) -> Result<()> {
        let leases: Vec<_> = jobs.iter().map(|j| (j.id, j.lease.token)).collect();
        self.store.job_complete_many(&leases).await?;
        Ok(())
    }

    pub async fn count(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.db.pool).await?)
    }

    pub async fn admin_set(&self, limit: &FlowLimit) -> Result<()> {
        let mut conn = self.db.pool.acquire().await?;
        flow::limits::set_in(
            &mut conn,
            &LimitChange {
                limit,
                by: "test-admin",
                reason: "test",
            },
        )
        .await
    }

    pub fn advance_ms(&self, ms: i64) {
        self.clock
            .set(self.clock.get() + TimeDelta::milliseconds(ms));
    }
}
