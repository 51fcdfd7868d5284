//! The outbox relay: publishes the `outbox` table to Kafka.
//!
//! A loop claims a batch with [`outbox_claim_in`] (per-key advisory locks, so
//! several relays never publish one key out of order — see the engine's
//! `outbox` module), hands every row to an idempotent producer
//! (`enable.idempotence=true`, `acks=all`) with its id in the
//! `ledgerflow-id` header, waits for the delivery reports, marks the
//! delivered rows published and commits. Per key only the delivered prefix
//! is marked, so a key's later row is never marked while an earlier one is
//! retried. A broker outage only delays: the batch's transaction is rolled
//! back (or commits just the delivered prefix) and retried with backoff;
//! nothing is lost, and anything published twice carries the same id.
use crate::kafka::{ID_HEADER, RelayConfig, backoff};
use ledgerflow_engine::Store;
use ledgerflow_engine::outbox::{OutboxRow, outbox_claim_in, outbox_mark_published_in};
use ledgerflow_engine::trace::TRACEPARENT;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::collections::HashSet;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A running relay; see [`Relay::start`].
#[derive(Debug)]
pub struct RelayHandle {
    cancel: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RelayHandle {
    /// Stops after the batch in flight and waits for the loop to end.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.task.await?
    }

    /// Waits for the loop to end (it ends only when cancelled or on a
    /// configuration error).
    pub async fn join(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

/// The outbox relay.
#[derive(Debug)]
pub struct Relay;

impl Relay {
    /// Builds the idempotent producer and starts the relay loop on the
    /// current runtime. Cancel `cancel` (or call [`RelayHandle::shutdown`])
    /// to stop.
    pub fn start(
        store: Store,
        config: RelayConfig,
        cancel: CancellationToken,
    ) -> anyhow::Result<RelayHandle> {
        let producer = build_producer(&config)?;
        let task = tokio::spawn(run(store, config, producer, cancel.clone()));
        Ok(RelayHandle { cancel, task })
    }
}

/// The idempotent producer (`enable.idempotence=true`, `acks=all`).
fn build_producer(config: &RelayConfig) -> anyhow::Result<FutureProducer> {
    let timeout = config.delivery_timeout.as_millis().to_string();
    Ok(config
        .kafka
        .client_config(&[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("message.timeout.ms", &timeout),
            ("linger.ms", "5"),
        ])
        .create()?)
}

/// What one pass did.
enum Pass {
    /// No rows were waiting.
    Idle,
    /// All claimed rows were published.
    Published(usize),
    /// Some rows could not be published (broker trouble); retry later.
    Partial(usize, String),
}

async fn run(
    store: Store,
    config: RelayConfig,
    mut producer: FutureProducer,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mut failures: u32 = 0;
    while !cancel.is_cancelled() {
        let delay = match relay_once(&store, &config, &producer).await {
            Ok(Pass::Published(n)) => {
                tracing::debug!(published = n, "outbox batch published");
                failures = 0;
                Duration::ZERO
            }
            Ok(Pass::Idle) => {
                failures = 0;
                config.poll_interval
            }
            Ok(Pass::Partial(n, error)) => {
                failures += 1;
                tracing::warn!(published = n, %error, failures, "outbox batch partly published; retrying");
                backoff(config.retry_backoff, failures, config.max_backoff)
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "outbox relay pass failed; retrying");
                backoff(config.retry_backoff, failures, config.max_backoff)
            }
        };
        // An idempotent producer can hit a fatal error, or stay wedged after
        // the broker lost its producer state (a broker restarted with
        // empty storage): after a fatal error or a few failed passes in a
        // row, start a fresh producer (rows not marked are simply re-sent,
        // with the same ids).
        let fatal = producer.client().fatal_error();
        if failures > 0 && (fatal.is_some() || failures.is_multiple_of(3)) {
            tracing::warn!(?fatal, failures, "recreating the producer");
            match build_producer(&config) {
                Ok(p) => producer = p,
                Err(e) => tracing::warn!(error = %e, "recreating the producer failed"),
            }
        }
        if !delay.is_zero() {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
    // Deliver whatever librdkafka still holds (already marked or not: a row
    // not marked is simply published again by the next relay, same id).
    let _ = producer.flush(Duration::from_secs(5));
    Ok(())
}

async fn relay_once(
    store: &Store,
    config: &RelayConfig,
    producer: &FutureProducer,
) -> anyhow::Result<Pass> {
    let mut tx = store.pool().begin().await?;
    let rows = outbox_claim_in(&mut tx, config.batch_size).await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(Pass::Idle);
    }
    // Enqueue the whole batch first (librdkafka keeps per-partition order),
    // then collect the delivery reports in the same order.
    let mut pending = Vec::with_capacity(rows.len());
    for row in &rows {
        pending.push(send(producer, row));
    }
    let mut delivered: Vec<Uuid> = Vec::with_capacity(rows.len());
    let mut failed_keys: HashSet<(&str, String)> = HashSet::new();
    let mut first_error: Option<String> = None;
    for (row, fut) in rows.iter().zip(pending) {
        let result = match fut {
            Ok(fut) => match fut.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e.to_string()),
                Err(_cancelled) => Err("delivery report lost".to_string()),
            },
            Err(e) => Err(e),
        };
        let key = (row.topic.as_str(), order_key(row));
        match result {
            Ok(()) if !failed_keys.contains(&key) => delivered.push(row.id),
            Ok(()) => {}
            Err(e) => {
                if let Some(m) = &config.metrics {
                    m.failed();
                }
                first_error.get_or_insert(e);
                failed_keys.insert(key);
            }
        }
    }
    outbox_mark_published_in(&mut tx, &delivered).await?;
    tx.commit().await?;
    if let Some(m) = &config.metrics {
        // Measured once the marks committed: the lag is to the row's durable publication.
        let now = chrono::Utc::now();
        let marked: HashSet<&Uuid> = delivered.iter().collect();
        for row in rows.iter().filter(|r| marked.contains(&r.id)) {
            m.published(
                &row.topic,
                (now - row.created_at).to_std().unwrap_or_default(),
            );
        }
    }
    Ok(match first_error {
        None => Pass::Published(delivered.len()),
        Some(e) => Pass::Partial(delivered.len(), e),
    })
}

/// With tracing on, the `traceparent` of a `kafka.publish` span continuing the row's stored
/// context (the span of the transaction that wrote it), which the message carries instead of
/// the stored one; `None` (the stored header, if any, goes as it is) with tracing off.
fn publish_traceparent(row: &OutboxRow) -> Option<String> {
    if !ledgerflow_engine::trace::enabled() {
        return None;
    }
    let span = tracing::info_span!(
        "kafka.publish",
        otel.name = %format_args!("{} publish", row.topic),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.destination = %row.topic,
        outbox.id = %row.id,
    );
    ledgerflow_engine::trace::continue_from(
        &span,
        row.headers.get(TRACEPARENT).and_then(|v| v.as_str()),
    );
    ledgerflow_engine::trace::traceparent_of(&span)
}

/// The key a row is ordered by (its id when it has no key).
fn order_key(row: &OutboxRow) -> String {
    row.key.clone().unwrap_or_else(|| row.id.to_string())
}

fn send(
    producer: &FutureProducer,
    row: &OutboxRow,
) -> Result<rdkafka::producer::DeliveryFuture, String> {
    let id = row.id.to_string();
    let mut headers = OwnedHeaders::new().insert(Header {
        key: ID_HEADER,
        value: Some(id.as_str()),
    });
    let traceparent = publish_traceparent(row);
    if let Some(tp) = &traceparent {
        headers = headers.insert(Header {
            key: TRACEPARENT,
            value: Some(tp.as_str()),
        });
    }
    if let Some(map) = row.headers.as_object() {
        for (k, v) in map {
            if k == ID_HEADER || (k == TRACEPARENT && traceparent.is_some()) {
                continue;
            }
            let value = match v {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            };
            headers = headers.insert(Header {
                key: k.as_str(),
                value: value.as_deref(),
            });
        }
    }
    let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&row.topic)
        .payload(row.payload.as_slice())
        .headers(headers);
    if let Some(key) = &row.key {
        record = record.key(key.as_str());
    }
    producer.send_result(record).map_err(|(e, _)| e.to_string())
}
