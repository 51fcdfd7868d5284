//! The worker process's own Prometheus metrics, one struct per role: the
//! runner's job durations, outcomes and claim-to-start latency, the
//! scheduler's cron tick lateness, the relay's publish lag. The binary
//! builds them in the one registry its ops endpoint serves (`ops.rs`) and
//! hands each role its struct through the role's config; a role without one
//! (tests, the benchmark) measures nothing. `docs/metrics.md` is the
//! catalogue; `tests/metrics_catalogue.rs` checks the code against it.
//!
//! Labels are queue names, job kinds, schedule names, topics and fixed
//! outcome sets: all chosen by the code or the operator's configuration,
//! never by a request, and never an id.
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use std::time::Duration;

/// From a millisecond (a no-op job) to a minute (a slow exchange call).
const JOB_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Waits and lags: from a fraction of a millisecond (an idle worker) to
/// minutes (a backlog, a scheduler that was down).
const WAIT_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0,
    300.0,
];

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> Result<HistogramVec, prometheus::Error> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

/// The job runner's metrics.
#[derive(Debug, Clone)]
pub struct RunnerMetrics {
    duration: HistogramVec,
    claim_to_start: HistogramVec,
}

impl RunnerMetrics {
    /// Registers the runner's metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        Ok(Self {
            duration: histogram_vec(
                registry,
                "ledgerflow_job_duration_seconds",
                "Time a job attempt's handler ran, per queue, kind and outcome (complete, retry, \
                 fail, cancel, snooze, panic); its count is the attempts finished",
                &JOB_BUCKETS,
                &["queue", "kind", "outcome"],
            )?,
            claim_to_start: histogram_vec(
                registry,
                "ledgerflow_job_claim_to_start_seconds",
                "Time from a job's claim (its lease) to its handler's start: the wait in this \
                 worker's prefetch buffer",
                &WAIT_BUCKETS,
                &["queue"],
            )?,
        })
    }

    /// Makes the series of `queues` exist (at 0) before their first job.
    pub(crate) fn declare_queues<'a>(&self, queues: impl Iterator<Item = &'a str>) {
        for q in queues {
            self.claim_to_start.with_label_values(&[q]);
        }
    }

    pub(crate) fn started(&self, queue: &str, waited: Duration) {
        self.claim_to_start
            .with_label_values(&[queue])
            .observe(waited.as_secs_f64());
    }

    pub(crate) fn finished(&self, queue: &str, kind: &str, outcome: &str, took: Duration) {
        self.duration
            .with_label_values(&[queue, kind, outcome])
            .observe(took.as_secs_f64());
    }
}

/// The cron scheduler's metrics.
#[derive(Debug, Clone)]
pub struct CronMetrics {
    lateness: HistogramVec,
    ticks: IntCounterVec,
}

impl CronMetrics {
    /// Registers the scheduler's metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let ticks = IntCounterVec::new(
            Opts::new(
                "ledgerflow_cron_ticks_total",
                "Cron ticks this scheduler handled, per schedule and outcome (enqueued, manual, \
                 skipped_overlap, skipped_catchup)",
            ),
            &["schedule", "outcome"],
        )?;
        registry.register(Box::new(ticks.clone()))?;
        Ok(Self {
            lateness: histogram_vec(
                registry,
                "ledgerflow_cron_tick_lateness_seconds",
                "How long after its fire time a cron tick was fired (its row and job committed)",
                &WAIT_BUCKETS,
                &["schedule"],
            )?,
            ticks,
        })
    }

    /// Makes the series of `schedules` exist (at 0) before their first tick.
    pub(crate) fn declare_schedules<'a>(&self, schedules: impl Iterator<Item = &'a str>) {
        for s in schedules {
            self.lateness.with_label_values(&[s]);
        }
    }

    pub(crate) fn fired(&self, schedule: &str, outcome: &str, late: Option<Duration>) {
        self.ticks.with_label_values(&[schedule, outcome]).inc();
        if let Some(late) = late {
            self.lateness
                .with_label_values(&[schedule])
                .observe(late.as_secs_f64());
        }
    }
}

/// The outbox relay's metrics.
#[derive(Debug, Clone)]
pub struct RelayMetrics {
    lag: Histogram,
    published: IntCounterVec,
    failures: IntCounter,
}

impl RelayMetrics {
    /// Registers the relay's metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let lag = Histogram::with_opts(
            HistogramOpts::new(
                "ledgerflow_outbox_relay_lag_seconds",
                "Time from an outbox row's commit to the broker's acknowledgement of its message",
            )
            .buckets(WAIT_BUCKETS.to_vec()),
        )?;
        let published = IntCounterVec::new(
            Opts::new(
                "ledgerflow_outbox_published_total",
                "Outbox rows published and marked, per topic",
            ),
            &["topic"],
        )?;
        let failures = IntCounter::new(
            "ledgerflow_outbox_publish_failures_total",
            "Outbox messages the broker did not acknowledge (each is sent again)",
        )?;
        registry.register(Box::new(lag.clone()))?;
        registry.register(Box::new(published.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        Ok(Self {
            lag,
            published,
            failures,
        })
    }

    pub(crate) fn published(&self, topic: &str, lag: Duration) {
        self.published.with_label_values(&[topic]).inc();
        self.lag.observe(lag.as_secs_f64());
    }

    pub(crate) fn failed(&self) {
        self.failures.inc();
    }
}
