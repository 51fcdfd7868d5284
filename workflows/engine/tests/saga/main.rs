//! Sagas and in-doubt external calls against a real database, driven step by
//! step with the [`WorkflowHarness`] and a [`ManualClock`] (nothing sleeps).
//!
//! The "provider" is a fake in-process exchange that counts every call it
//! receives, so "never re-sent" is checked where it matters: at the provider.
use chrono::{DateTime, Utc};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::workflow::StepRow;
use ledgerflow_engine::workflow_testing::WorkflowHarness;
use ledgerflow_engine::{
    CallError, ExternalError, ManualClock, Reconciled, Resolution, Result, StepCtx, StepOutcome,
    Store, Workflow, WorkflowId, WorkflowRegistry, workflow_resolve_in, workflow_retry_in,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// 2030-01-01T00:00:00Z.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).expect("a valid timestamp")
}

struct Env {
    _db: TestDb,
    clock: ManualClock,
    store: Store,
}

impl Env {
    async fn new() -> Result<Self> {
        let db = TestDb::new().await?;
        let clock = ManualClock::new(t0());
        let store = ledgerflow_engine::testing::manual_store(&db.pool, &clock);
        Ok(Self {
            _db: db,
            clock,
            store,
        })
    }

    fn harness(&self, wf: Workflow) -> Result<WorkflowHarness> {
        Ok(WorkflowHarness::new(
            self.store.clone(),
            WorkflowRegistry::new().register(wf)?,
        ))
    }

    /// Runs until idle, advancing the clock by an hour between rounds so that
    /// backoffs and reconcile retries come due; `rounds` times.
    async fn settle(&self, h: &WorkflowHarness, rounds: usize) -> Result<usize> {
        let mut ran = 0;
        for _ in 0..rounds {
            ran += h.run_until_idle().await?.len();
            self.clock.advance(Duration::from_secs(3600));
        }
        Ok(ran)
    }
}

/// An ordered log of what ran.
#[derive(Default, Clone)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: impl Into<String>) {
        self.0.lock().expect("not poisoned").push(s.into());
    }

    fn get(&self) -> Vec<String> {
        self.0.lock().expect("not poisoned").clone()
    }

    fn count(&self, s: &str) -> usize {
        self.get().iter().filter(|x| *x == s).count()
    }
}

fn status_of<'a>(journal: &'a [StepRow], step: &str) -> &'a StepRow {
    journal
        .iter()
        .find(|r| r.step == step)
        .unwrap_or_else(|| panic!("step {step} is journaled"))
}

mod compensation;
mod in_doubt;
