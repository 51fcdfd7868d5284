//! Prometheus metrics of the API process, in a registry owned by the
//! [`crate::AppState`] (not the global default registry, so tests running in
//! parallel do not see each other's counts).
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `http_requests_total` | counter | listener, method, route, status | requests answered |
//! | `http_request_duration_seconds` | histogram | listener, method, route | time to answer |
//! | `http_requests_in_flight` | gauge | listener | requests being answered |
//! | `ledgerflow_queue_jobs` | gauge | queue, state | live jobs (available, scheduled, retryable, running; a queue with any live job has all four), read at scrape time from the partial indexes |
//! | `ledgerflow_queue_oldest_available_seconds` | gauge | queue | how long the oldest available job of the queue has been due (the wait before a worker picks a job up); 0 for a queue with live jobs but none available |
//! | `ledgerflow_workflows` | gauge | state (running, waiting, compensating, failed) | workflow instances per state, zeros included (finished history is not counted on every scrape) |
//! | `ledgerflow_outbox_unpublished` | gauge | — | outbox rows the relay has not published yet |
//! | `ledgerflow_outbox_oldest_unpublished_seconds` | gauge | — | age of the oldest unpublished outbox row (0 when none) |
//! | `ledgerflow_dead_letters_pending` | gauge | — | Kafka dead letters not redriven |
//! | `ledgerflow_workflow_steps_in_doubt` | gauge | — | workflow steps whose external call's outcome is unknown, waiting for their reconcile hook or an admin |
//! | `ledgerflow_dead_letter_copies_pending` | gauge | — | dead letters whose copy the dead-letter topic has not accepted yet (each failed try is on the row, shown in the console) |
//! | `ledgerflow_kafka_consumer_lag` | gauge | group, topic, partition | messages after the consumer group's position, as the ingress measured it within the last minute (recorded in Postgres) |
//! | `ledgerflow_db_pool_connections` | gauge | state (idle, in_use) | the API's Postgres pool |
//! | `ledgerflow_metrics_scrape_errors_total` | counter | — | scrapes whose queue query failed |
//! | `ledgerflow_api_post_batch_size` | histogram | — | public POSTs committed per transaction ([`crate::batch`]) |
//! | `ledgerflow_webhook_accepted_total` | counter | provider, status (accepted, duplicate) | webhook deliveries committed to the inbox ([`crate::webhooks`]) |
//! | `ledgerflow_webhook_rejected_total` | counter | provider, reason | webhook deliveries refused before anything was stored |
//! | `ledgerflow_flow_holders` | gauge | key (a `flow_limits` row) | running jobs or admitted workflows holding the limit's slots |
//! | `ledgerflow_flow_waiters` | gauge | key | jobs or workflows waiting for the limit |
//! | `ledgerflow_flow_tokens` | gauge | key | weight in the rate limit's bucket now |
//! | `ledgerflow_flow_deferrals` | gauge | key | jobs and calls the rate limit deferred so far |
//!
//! `docs/metrics.md` is the catalogue of every process's metrics; a test
//! (`workers/tests/metrics_catalogue.rs`) checks the two agree.
//!
//! `route` is the matched route template (`/v1/jobs/{id}`), never the raw
//! path, so ids and queue names cannot blow up the label cardinality;
//! unknown paths are counted as `unmatched`.
//!
//! The ingress consumers run in the worker processes, not in the API's: they
//! record the consumer lag they measure in Postgres, from where it is
//! exported here (the ingress processes' own ops `/metrics` has it live).
//! Job run times and outcomes belong to the runners, which time them; the
//! API exports the queue wait that Postgres can tell cheaply.
use ledgerflow_engine::Store;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The API's metrics and the registry they live in.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub(crate) requests: IntCounterVec,
    pub(crate) duration: HistogramVec,
    pub(crate) in_flight: IntGaugeVec,
    queue_jobs: IntGaugeVec,
    queue_wait: GaugeVec,
    workflows: IntGaugeVec,
    outbox_unpublished: IntGauge,
    outbox_oldest: Gauge,
    dead_letters: IntGauge,
    dead_letter_copies: IntGauge,
    in_doubt: IntGauge,
    consumer_lag: IntGaugeVec,
    pool: IntGaugeVec,
    flow: crate::flow_metrics::FlowGauges,
    scrape_errors: IntCounter,
}

/// Lag measurements older than this are not exported (their consumer is
/// gone, or its partition moved to another that reports it).
const CONSUMER_LAG_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

impl Metrics {
    /// Fresh metrics in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests answered"),
            &["listener", "method", "route", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time to answer an HTTP request",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["listener", "method", "route"],
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new("http_requests_in_flight", "HTTP requests being answered"),
            &["listener"],
        )?;
        let queue_jobs = IntGaugeVec::new(
            Opts::new(
                "ledgerflow_queue_jobs",
                "Live jobs per queue and state (available, scheduled, retryable, running)",
            ),
            &["queue", "state"],
        )?;
        let queue_wait = GaugeVec::new(
            Opts::new(
                "ledgerflow_queue_oldest_available_seconds",
                "How long the oldest available job of a queue has been due",
            ),
            &["queue"],
        )?;
        let workflows = IntGaugeVec::new(
            Opts::new("ledgerflow_workflows", "Workflow instances per state"),
            &["state"],
        )?;
        let outbox_unpublished = IntGauge::new(
            "ledgerflow_outbox_unpublished",
            "Outbox rows not yet published to Kafka",
        )?;
        let outbox_oldest = Gauge::new(
            "ledgerflow_outbox_oldest_unpublished_seconds",
            "Age of the oldest unpublished outbox row (0 when none)",
        )?;
        let dead_letters = IntGauge::new(
            "ledgerflow_dead_letters_pending",
            "Kafka dead letters not redriven",
        )?;
        let dead_letter_copies = IntGauge::new(
            "ledgerflow_dead_letter_copies_pending",
            "Dead letters whose copy the dead-letter topic has not accepted yet",
        )?;
        let in_doubt = IntGauge::new(
            "ledgerflow_workflow_steps_in_doubt",
            "Workflow steps whose external call's outcome is unknown, waiting for their \
             reconcile hook or an admin",
        )?;
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "ledgerflow_kafka_consumer_lag",
                "Messages in a partition after the consumer group's position, as the ingress \
                 measured it within the last minute",
            ),
            &["group", "topic", "partition"],
        )?;
        let pool = IntGaugeVec::new(
            Opts::new(
                "ledgerflow_db_pool_connections",
                "Connections of the API's Postgres pool",
            ),
            &["state"],
        )?;
        let scrape_errors = IntCounter::new(
            "ledgerflow_metrics_scrape_errors_total",
            "Scrapes whose database query failed",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(queue_jobs.clone()))?;
        registry.register(Box::new(queue_wait.clone()))?;
        registry.register(Box::new(workflows.clone()))?;
        registry.register(Box::new(outbox_unpublished.clone()))?;
        registry.register(Box::new(outbox_oldest.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(dead_letter_copies.clone()))?;
        registry.register(Box::new(in_doubt.clone()))?;
        registry.register(Box::new(consumer_lag.clone()))?;
        registry.register(Box::new(pool.clone()))?;
        registry.register(Box::new(scrape_errors.clone()))?;
        let flow = crate::flow_metrics::FlowGauges::new(&registry)?;
        Ok(Self {
            flow,
            registry,
            requests,
            duration,
            in_flight,
            queue_jobs,
            queue_wait,
            workflows,
            outbox_unpublished,
            outbox_oldest,
            dead_letters,
            dead_letter_copies,
            in_doubt,
            consumer_lag,
            pool,
            scrape_errors,
        })
    }

    /// The registry, to register more collectors (e.g. the webhook intake's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Refreshes the queue wait, workflow, Kafka-edge and consumer lag gauges; a failed
    /// query counts a scrape error and leaves that gauge as it was. `live_queues` (those
    /// with live jobs) wait 0 s when none of their jobs is available, so their series
    /// exist whenever the queue does.
    async fn render_backlogs(&self, store: &Store, live_queues: &[String]) {
        match store.queue_oldest_available().await {
            Ok(ages) => {
                self.queue_wait.reset();
                for queue in live_queues {
                    self.queue_wait
                        .with_label_values(&[queue.as_str()])
                        .set(0.0);
                }
                for (queue, age) in ages {
                    self.queue_wait
                        .with_label_values(&[queue.as_str()])
                        .set(age);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: queue wait query failed");
                self.scrape_errors.inc();
            }
        }
        match store.workflow_state_counts().await {
            Ok(counts) => {
                for (state, n) in counts {
                    self.workflows.with_label_values(&[state.as_str()]).set(n);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: workflow state query failed");
                self.scrape_errors.inc();
            }
        }
        match store.edge_backlog().await {
            Ok(b) => {
                self.outbox_unpublished.set(b.outbox_unpublished);
                self.outbox_oldest.set(b.outbox_oldest_age_secs);
                self.dead_letters.set(b.dead_letters_pending);
                self.dead_letter_copies.set(b.dead_letter_copies_pending);
                self.in_doubt.set(b.steps_in_doubt);
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: outbox/dead-letter query failed");
                self.scrape_errors.inc();
            }
        }
        if let Err(e) = self.flow.refresh(store.pool()).await {
            tracing::warn!(error = %e, "metrics: flow limits query failed");
            self.scrape_errors.inc();
        }
        match store.consumer_lag_recent(CONSUMER_LAG_MAX_AGE).await {
            Ok(lags) => {
                // Reset first so a partition nobody measures any more drops out.
                self.consumer_lag.reset();
                for l in lags {
                    let partition = l.partition.to_string();
                    self.consumer_lag
                        .with_label_values(&[l.group.as_str(), l.topic.as_str(), &partition])
                        .set(l.lag);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: consumer lag query failed");
                self.scrape_errors.inc();
            }
        }
    }

    /// Refreshes the database-backed gauges and renders everything in the
    /// Prometheus text format.
    pub async fn render(&self, store: &Store) -> String {
        let mut live_queues = Vec::new();
        match store.queue_depths().await {
            Ok(depths) => {
                // Reset first so a queue that drained disappears instead of
                // repeating its last value forever.
                self.queue_jobs.reset();
                for (queue, state, n) in depths {
                    self.queue_jobs
                        .with_label_values(&[queue.as_str(), state.as_str()])
                        .set(n);
                    if !live_queues.contains(&queue) {
                        live_queues.push(queue);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: queue depth query failed");
                self.scrape_errors.inc();
            }
        }
        self.render_backlogs(store, &live_queues).await;
        let size = i64::from(store.pool().size());
        let idle = i64::try_from(store.pool().num_idle()).unwrap_or(i64::MAX);
        self.pool.with_label_values(&["idle"]).set(idle);
        self.pool
            .with_label_values(&["in_use"])
            .set(size.saturating_sub(idle));
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics: encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
