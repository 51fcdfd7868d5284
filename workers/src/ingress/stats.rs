//! The running ingress' counters and consumer lag, for tests, benchmarks and metrics.
use super::*;

/// Counters of a running ingress, for tests, benchmarks and metrics.
#[derive(Debug, Default)]
pub struct IngressStats {
    pub(super) buffered: AtomicUsize,
    pub(super) max_partition_buffered: AtomicUsize,
    pub(super) paused: AtomicUsize,
    pub(super) pauses: AtomicU64,
    pub(super) applied: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) dead_letters: Arc<DeadLetterStats>,
    pub(super) batches: AtomicU64,
    pub(super) lag: Mutex<Vec<ConsumerLag>>,
}

/// One assigned partition's consumer lag, as last measured: `position` is
/// the committed offset, or the offset this process stored (committed in
/// Postgres, not yet to Kafka) when newer; the log start when neither exists.
/// The engine's type, since the ingress also records it in Postgres for
/// every `/metrics` to export.
pub use ledgerflow_engine::consumer_lag::PartitionLag as ConsumerLag;

impl IngressStats {
    /// Messages held in memory now (received, not yet committed), over all
    /// partitions.
    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::SeqCst)
    }

    /// The most messages one partition ever held in memory at once (never
    /// more than `partition-buffer`).
    pub fn max_partition_buffered(&self) -> usize {
        self.max_partition_buffered.load(Ordering::SeqCst)
    }

    /// Partitions paused now (buffer full or their queue full).
    pub fn paused_partitions(&self) -> usize {
        self.paused.load(Ordering::SeqCst)
    }

    /// How many times a partition was paused.
    pub fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::SeqCst)
    }

    /// Messages whose effect this process committed.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }

    /// Messages found in the inbox already (redeliveries, re-sent events).
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::SeqCst)
    }

    /// Messages dead-lettered.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered.load(Ordering::SeqCst)
    }

    /// The dead-letter path's counters (recorded letters, topic copies).
    pub fn dead_letters(&self) -> &DeadLetterStats {
        &self.dead_letters
    }

    /// Transactions that applied a whole batch.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::SeqCst)
    }

    /// The consumer lag of each partition assigned to this consumer, as last
    /// measured (every `lag-interval-ms`), ordered by topic and partition.
    pub fn consumer_lag(&self) -> Vec<ConsumerLag> {
        self.lag.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
