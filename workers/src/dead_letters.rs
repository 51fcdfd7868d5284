//! Dead letters of the Kafka ingress: recorded in Postgres first, so a poison
//! message never stops its partition, and copied to the dead-letter topic
//! afterwards by a copier that retries from the row.
//!
//! [`record`] writes the `dead_letters` row (the payload, or its first
//! `dead-letter-max-payload-bytes` with the whole message's size and SHA-256)
//! and nothing else: the caller stores the message's offset once it returns.
//! No broker is involved, so neither a message larger than any producer
//! would send, nor a missing dead-letter topic, nor a broker refusing writes
//! can hold the partition back.
//!
//! [`Copier`] publishes the owed copies (`copy_state = 'pending'`): it claims
//! due rows for a short lease, publishes each with its provenance headers,
//! and records the outcome. A failed publish keeps its error on the row and
//! is retried with backoff (doubling from `retry-backoff-ms`, capped at
//! [`MAX_COPY_BACKOFF`]) for as long as it takes; the console shows it and an
//! operator can make it due at once. A copy the topic refuses for its size is
//! sent again at once with a shorter payload prefix (down to none), since
//! the topic will never take the original; the headers say so. The producer
//! is rebuilt after a fatal error or every third failure in a row (an
//! idempotent producer stays wedged when a broker restarts without its
//! producer state).
use crate::ingress::IngressMessage;
use crate::kafka::IngressConfig;
use ledgerflow_engine::Store;
use ledgerflow_engine::dead_letter::{
    DeadLetter, NewDeadLetter, dead_letter_copies_claim, dead_letter_copy_failed,
    dead_letter_copy_published, dead_letter_insert_in,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Longest wait between two publish attempts of one copy.
pub const MAX_COPY_BACKOFF: Duration = Duration::from_secs(300);

/// How long a claimed copy is left to its copier before another may take it.
const CLAIM_LEASE: Duration = Duration::from_secs(60);

/// Copies claimed at once.
const CLAIM_BATCH: i64 = 16;

/// How often the copier looks for due copies when nobody woke it.
const POLL: Duration = Duration::from_secs(1);

/// The longest last pass over due copies at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// Payload prefixes tried, in order, after the topic refused a copy for its
/// size (the first try sends the payload as recorded).
const SHRINK_STEPS: [usize; 2] = [64 * 1024, 0];

/// The longest `ledgerflow-error` header (the error text is also on the row).
const MAX_ERROR_HEADER: usize = 4096;

/// Counters of the dead-letter path, for tests and `/metrics`.
#[derive(Debug, Default)]
pub struct DeadLetterStats {
    recorded: AtomicU64,
    copies_published: AtomicU64,
    copy_failures: AtomicU64,
}

impl DeadLetterStats {
    /// Dead letters this process recorded in Postgres.
    pub fn recorded(&self) -> u64 {
        self.recorded.load(Ordering::SeqCst)
    }

    /// Copies this process published to the dead-letter topic.
    pub fn copies_published(&self) -> u64 {
        self.copies_published.load(Ordering::SeqCst)
    }

    /// Failed publish attempts of copies (each is retried).
    pub fn copy_failures(&self) -> u64 {
        self.copy_failures.load(Ordering::SeqCst)
    }
}

/// Records `msg` as a dead letter with `error` (after `attempts` tries),
/// retrying database errors until it is recorded (true) or `cancel` fires
/// first (false: the offset must not be stored). A message recorded before
/// (a redelivery after a crash) counts as recorded.
pub async fn record(
    store: &Store,
    config: &IngressConfig,
    stats: &DeadLetterStats,
    copier: &Notify,
    cancel: &CancellationToken,
    (msg, error, attempts): (&IngressMessage, &str, u32),
) -> bool {
    tracing::warn!(topic = %msg.topic, partition = msg.partition, offset = msg.offset,
        size = msg.payload.as_ref().map_or(0, Vec::len), %error, "dead-lettering message");
    let source = msg.source();
    let letter = NewDeadLetter {
        source: &source,
        topic: Some(&msg.topic),
        partition: Some(msg.partition),
        offset: Some(msg.offset),
        key: msg.key.as_deref(),
        payload: msg.payload.as_deref(),
        headers: Some(&msg.headers),
        error,
        attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
        copy_topic: Some(&config.dead_letter_topic),
        max_payload: Some(config.dead_letter_max_payload_bytes),
    };
    let mut failures: u32 = 0;
    loop {
        let result = async {
            let mut conn = store.pool().acquire().await?;
            dead_letter_insert_in(&mut conn, &letter).await
        }
        .await;
        match result {
            Ok(_) => {
                stats.recorded.fetch_add(1, Ordering::SeqCst);
                copier.notify_one();
                return true;
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "recording dead letter failed; retrying");
            }
        }
        let pause = crate::kafka::backoff(config.retry_backoff, failures, Duration::from_secs(10));
        tokio::select! {
            () = cancel.cancelled() => return false,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// The producer of dead-letter copies: idempotent, with bounded delivery
/// time (a wedged producer is noticed and rebuilt, not waited on for
/// minutes) and room for the largest payload a dead letter keeps.
fn build_producer(config: &IngressConfig) -> anyhow::Result<FutureProducer> {
    let max_bytes = config
        .dead_letter_max_payload_bytes
        .saturating_add(1024 * 1024)
        .clamp(1_000_000, 1_000_000_000)
        .to_string();
    Ok(config
        .kafka
        .client_config(&[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("message.timeout.ms", "10000"),
            ("message.max.bytes", &max_bytes),
        ])
        .create()?)
}

/// Publishes owed dead-letter copies from the `dead_letters` table.
pub struct Copier {
    store: Store,
    config: IngressConfig,
    producer: FutureProducer,
    stats: Arc<DeadLetterStats>,
    wake: Arc<Notify>,
    /// Failed publishes in a row (the producer is rebuilt every third).
    failing: u32,
}

impl Copier {
    /// A copier for `config`'s cluster; `wake` hurries it after a letter is
    /// recorded.
    pub fn new(
        store: Store,
        config: IngressConfig,
        stats: Arc<DeadLetterStats>,
        wake: Arc<Notify>,
    ) -> anyhow::Result<Self> {
        let producer = build_producer(&config)?;
        Ok(Self {
            store,
            config,
            producer,
            stats,
            wake,
            failing: 0,
        })
    }

    /// Publishes due copies until `cancel` fires, then makes one last pass
    /// (at most [`DRAIN`]) so letters recorded just before a graceful
    /// shutdown are not left for the next process.
    pub async fn run(mut self, cancel: CancellationToken) {
        let wake = Arc::clone(&self.wake);
        loop {
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.pass(&cancel).await {
                continue;
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = &mut woken => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
        let never = CancellationToken::new();
        let _ = tokio::time::timeout(DRAIN, self.pass(&never)).await;
    }

    /// Claims and publishes one batch of due copies; true when the batch was
    /// full (more may be due).
    async fn pass(&mut self, cancel: &CancellationToken) -> bool {
        let claimed = dead_letter_copies_claim(
            self.store.pool(),
            CLAIM_BATCH,
            CLAIM_LEASE,
            self.store.now(),
        )
        .await;
        match claimed {
            Ok(letters) => {
                let n = letters.len();
                for letter in letters {
                    if cancel.is_cancelled() {
                        return false;
                    }
                    self.copy(&letter).await;
                }
                i64::try_from(n).is_ok_and(|n| n == CLAIM_BATCH)
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming dead-letter copies failed");
                false
            }
        }
    }

    /// Publishes one copy and records the outcome on its row.
    async fn copy(&mut self, letter: &DeadLetter) {
        let result = self.publish(letter).await;
        let now = self.store.now();
        let recorded = match result {
            Ok(()) => {
                self.failing = 0;
                self.stats.copies_published.fetch_add(1, Ordering::SeqCst);
                dead_letter_copy_published(self.store.pool(), letter.id, now).await
            }
            Err(e) => {
                self.failing += 1;
                self.stats.copy_failures.fetch_add(1, Ordering::SeqCst);
                let tries = u32::try_from(letter.copy_attempts.max(0)).unwrap_or(0) + 1;
                let retry_in =
                    crate::kafka::backoff(self.config.retry_backoff, tries, MAX_COPY_BACKOFF);
                tracing::warn!(dead_letter = letter.id, topic = ?letter.copy_topic, error = %e,
                    ?retry_in, "dead-letter topic copy failed; it stays owed and is retried");
                self.rebuild_if_wedged(&e);
                dead_letter_copy_failed(self.store.pool(), letter.id, &e.to_string(), retry_in, now)
                    .await
                    .map(|_| true)
            }
        };
        if let Err(e) = recorded {
            // The claim's lease runs out and the copy is tried again.
            tracing::warn!(dead_letter = letter.id, error = %e, "recording a copy's outcome failed");
        }
    }

    /// Sends the copy, shrinking its payload while the topic refuses it for
    /// its size.
    async fn publish(&self, letter: &DeadLetter) -> Result<(), KafkaError> {
        let Some(topic) = letter.copy_topic.as_deref() else {
            return Ok(());
        };
        let payload = letter.payload.as_deref();
        let mut cut: Option<usize> = None;
        let mut steps = SHRINK_STEPS.iter();
        loop {
            let body = payload.map(|p| &p[..cut.map_or(p.len(), |c| c.min(p.len()))]);
            let truncated =
                letter.payload_truncated || body.map(<[u8]>::len) != payload.map(<[u8]>::len);
            let headers = copy_headers(letter, truncated);
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
            if let Some(p) = body {
                record = record.payload(p);
            }
            if let Some(k) = &letter.key {
                record = record.key(k.as_slice());
            }
            match self.producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => return Ok(()),
                Err((e, _)) if too_large(&e) => {
                    let sent = body.map_or(0, <[u8]>::len);
                    let Some(&next) = steps.by_ref().find(|&&n| n < sent) else {
                        return Err(e);
                    };
                    tracing::info!(
                        dead_letter = letter.id,
                        bytes = next,
                        "the dead-letter topic refused the copy for its size; sending a shorter prefix"
                    );
                    cut = Some(next);
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    fn rebuild_if_wedged(&mut self, e: &KafkaError) {
        let fatal = self.producer.client().fatal_error();
        if fatal.is_none() && !self.failing.is_multiple_of(3) {
            return;
        }
        tracing::warn!(?fatal, error = %e, failures = self.failing, "recreating the dead-letter producer");
        match build_producer(&self.config) {
            Ok(p) => self.producer = p,
            Err(e) => tracing::warn!(error = %e, "recreating the dead-letter producer failed"),
        }
    }
}

/// True when the producer or the broker refused a message for its size.
fn too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    )
}

/// The copy's headers: the original message's, then where it came from,
/// why it was dead-lettered, and what its payload is.
fn copy_headers(letter: &DeadLetter, truncated: bool) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(map) = letter.headers.as_object() {
        for (k, v) in map {
            headers = headers.insert(Header {
                key: k.as_str(),
                value: v.as_str(),
            });
        }
    }
    let error = cut_to(&letter.error, MAX_ERROR_HEADER);
    let id = letter.id.to_string();
    let partition = letter.partition.map(|p| p.to_string()).unwrap_or_default();
    let offset = letter.offset.map(|o| o.to_string()).unwrap_or_default();
    let size = letter
        .payload_size
        .map(|s| s.to_string())
        .unwrap_or_default();
    let sha = letter
        .payload_sha256
        .as_deref()
        .map(hex::encode)
        .unwrap_or_default();
    let mut pairs: Vec<(&str, &str)> = vec![
        ("ledgerflow-error", error),
        ("ledgerflow-dead-letter-id", &id),
        (
            "ledgerflow-source-topic",
            letter.topic.as_deref().unwrap_or(""),
        ),
        ("ledgerflow-source-partition", &partition),
        ("ledgerflow-source-offset", &offset),
        ("ledgerflow-payload-size", &size),
        ("ledgerflow-payload-sha256", &sha),
    ];
    if truncated {
        pairs.push(("ledgerflow-payload-truncated", "true"));
    }
    for (key, value) in pairs {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    headers
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut_to(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::cut_to;

    #[test]
    fn error_headers_are_cut_on_char_boundaries() {
        assert_eq!(cut_to("abc", 10), "abc");
        assert_eq!(cut_to("aé", 2), "a");
        assert_eq!(cut_to("aéb", 3), "aé");
    }
}
