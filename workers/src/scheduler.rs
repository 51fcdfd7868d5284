//! The cron scheduler role: fires due cron ticks into the job queue.
//!
//! Run any number of replicas. At start each one upserts the configured
//! schedules (which keeps their `next_fire_at`, so ticks missed while every
//! scheduler was down are caught up per policy), then loops: fire due ticks
//! with [`Store::cron_fire_due`] (one transaction per schedule, rows locked
//! `FOR UPDATE SKIP LOCKED`, each tick's row and job committed together),
//! then sleep until the earliest `next_fire_at` on the database's timeline,
//! capped at [`SchedulerConfig::max_sleep`] so that schedules added through
//! the database or the admin API are noticed. Exactly-once firing does not
//! depend on this loop's timing: it comes from the engine's unique
//! `(schedule, fire_at)` tick rows.
use crate::metrics::CronMetrics;
use ledgerflow_engine::cron::{FiredTick, ScheduleDef, TickOutcome};
use ledgerflow_engine::{Result, Store};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Settings of the scheduler loop.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Longest sleep between passes (how soon a new schedule is noticed).
    pub max_sleep: Duration,
    /// Shortest sleep between passes (keeps a replica from spinning on a
    /// schedule another replica holds locked).
    pub min_sleep: Duration,
    /// Most schedules handled per pass.
    pub batch: u32,
    /// Sleep after a failed pass (e.g. the database restarting).
    pub error_backoff: Duration,
    /// Where tick lateness and outcomes are recorded (`None`: not measured).
    pub metrics: Option<CronMetrics>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_sleep: Duration::from_secs(1),
            min_sleep: Duration::from_millis(20),
            batch: 100,
            error_backoff: Duration::from_secs(1),
            metrics: None,
        }
    }
}

/// Parses schedules from JSON: an array of [`ScheduleDef`] objects with
/// kebab-case keys (for an environment variable or a file).
pub fn schedules_from_json(json: &str) -> std::result::Result<Vec<ScheduleDef>, serde_json::Error> {
    serde_json::from_str(json)
}

/// Runs the scheduler with default settings until `stop` is cancelled.
pub async fn run(store: Store, schedules: Vec<ScheduleDef>, stop: CancellationToken) -> Result<()> {
    run_with_config(store, schedules, SchedulerConfig::default(), stop).await
}

/// Upserts `schedules` (all in one transaction; an invalid one fails the
/// start), then fires due ticks until `stop` is cancelled. Errors after the
/// start are logged and retried, never fatal.
pub async fn run_with_config(
    store: Store,
    schedules: Vec<ScheduleDef>,
    config: SchedulerConfig,
    stop: CancellationToken,
) -> Result<()> {
    upsert_all(&store, &schedules).await?;
    if let Some(m) = &config.metrics {
        m.declare_schedules(schedules.iter().map(|s| s.name.as_str()));
    }
    tracing::info!(schedules = schedules.len(), "cron scheduler started");
    while !stop.is_cancelled() {
        let sleep = match pass(&store, config.batch, config.metrics.as_ref()).await {
            Ok(()) => match store.cron_wait_hint().await {
                Ok(Some(hint)) => hint.clamp(config.min_sleep, config.max_sleep),
                Ok(None) => config.max_sleep,
                Err(e) => {
                    tracing::warn!(error = %e, "cron scheduler: reading the next fire time failed");
                    config.error_backoff
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cron scheduler: firing due ticks failed; retrying");
                config.error_backoff
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(sleep) => {}
        }
    }
    tracing::info!("cron scheduler stopped");
    Ok(())
}

async fn upsert_all(store: &Store, schedules: &[ScheduleDef]) -> Result<()> {
    for def in schedules {
        def.validate()?;
    }
    let mut tx = store.pool().begin().await?;
    for def in schedules {
        store.cron_upsert_in(&mut tx, def).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn pass(store: &Store, batch: u32, metrics: Option<&CronMetrics>) -> Result<()> {
    for tick in store.cron_fire_due(batch).await? {
        log_tick(&tick);
        if let Some(m) = metrics {
            // Lateness is for ticks that fired: a dropped range is not late, it is gone
            // by policy (counted under its outcome).
            let late = match tick.outcome {
                TickOutcome::Enqueued | TickOutcome::Manual => Some(
                    (chrono::Utc::now() - tick.fire_at)
                        .to_std()
                        .unwrap_or_default(),
                ),
                TickOutcome::SkippedOverlap | TickOutcome::SkippedCatchup => None,
            };
            m.fired(&tick.schedule, tick.outcome.as_str(), late);
        }
    }
    Ok(())
}

fn log_tick(t: &FiredTick) {
    match t.outcome {
        TickOutcome::Enqueued | TickOutcome::Manual => {
            tracing::info!(schedule = %t.schedule, fire_at = %t.fire_at, job_id = ?t.job_id, "cron tick fired");
        }
        TickOutcome::SkippedOverlap => {
            tracing::info!(schedule = %t.schedule, fire_at = %t.fire_at, "cron tick skipped: previous job unfinished");
        }
        TickOutcome::SkippedCatchup => {
            // The engine already warns with the range.
            tracing::debug!(schedule = %t.schedule, from = %t.fire_at, until = ?t.skipped_until,
                "missed cron ticks dropped by the catch-up policy");
        }
    }
}
