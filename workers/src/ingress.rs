//! Kafka ingress: consumer groups that turn messages into jobs, workflow
//! signals or workflow starts, exactly once per event.
//!
//! For every message, in ONE Postgres transaction: an `inbox` row keyed by
//! the message's business id (or, without one, by `topic/partition/offset`)
//! is inserted with `ON CONFLICT DO NOTHING`; if it is new, the topic's
//! [`MessageHandler`] applies the effect on the same connection. Only after
//! that transaction commits is the message's offset stored, and stored
//! offsets are committed every `commit-interval-ms`, before a rebalance
//! revokes partitions, and at shutdown (`enable.auto.commit=false`,
//! `enable.auto.offset.store=false`). A consumer killed between the two
//! commits gets its messages redelivered, and the inbox skips them.
//!
//! Ordering, batching and concurrency: one worker task per partition
//! processes that partition's messages in offset order; partitions run
//! concurrently. A worker takes every message waiting for it (up to half of
//! `partition-buffer`, so the next batch is fetched meanwhile) and applies
//! them in ONE transaction: one multi-row
//! inbox insert, then the handler's [`MessageHandler::handle_batch`] for the
//! new ones (one multi-row job insert for [`EnqueueJob`]), then one commit and
//! the offset of the last message is stored. If that transaction fails, the
//! batch is re-applied one message per transaction, so a poison message is
//! isolated and everything before and after it still applies once.
//!
//! Backpressure: a partition holds at most `partition-buffer` messages in
//! memory (handed to its worker and not yet committed); when it reaches that
//! the consumer loop waits (up to a second) for its worker to commit a batch,
//! so librdkafka's bounded prefetch queue (`queued.max.messages.kbytes`)
//! holds the rest; a partition whose worker is stuck longer is paused
//! (`consumer.pause`, which also drops librdkafka's prefetched messages of
//! it) and resumed at half, so it does not hold up the others. Waiting
//! instead of pausing keeps the fetch position where the broker left it:
//! a pause/resume cycle per batch costs a refetch of everything prefetched.
//! A topic with a `queue` also waits for
//! room in that job queue: its workers reserve room below `max-backlog`
//! available jobs (a shared estimate, re-measured at least every
//! `commit-interval-ms` and whenever it says full) before applying a batch,
//! and pause their partition while there is none; so this process never
//! fills the queue beyond `max-backlog`. Rebalances: stored offsets are
//! committed synchronously before partitions are revoked, and messages still
//! buffered for a revoked partition are dropped (the next owner gets them
//! from the committed offset; anything applied meanwhile is an inbox
//! duplicate for it).
//!
//! Fetch positions: the consumer takes messages in the order the broker serves
//! them, and offsets may have gaps no message is delivered for (a transaction's
//! marker, an aborted transaction's records, values removed by compaction).
//! When a partition's worker holds nothing uncommitted, the consumer stores its
//! fetch position, so its committed offset moves past a trailing gap as well
//! (see `store_positions_past_gaps`). A fetch resumed or started in the middle
//! of a producer's record batch gets the whole batch, and librdkafka drops the
//! records before the position.
//!
//! Consumer lag: every `lag-interval-ms` [`IngressStats::consumer_lag`] is
//! updated with, per assigned partition, the high watermark minus the
//! group's position (the committed offset, or this process's stored offset
//! when newer), from librdkafka's statistics plus one ListOffsets request for
//! paused partitions (see `lag_monitor`); the ops endpoint exports it on
//! `/metrics` as `ledgerflow_kafka_consumer_lag{group,topic,partition}`, and it
//! is recorded in Postgres (`kafka_consumer_lag`) for the API's `/metrics`.
//!
//! Poison messages — undecodable or invalid ([`HandlerError::Poison`]), or
//! failing `max-attempts` times ([`HandlerError::Failed`]) — are recorded in
//! `dead_letters`, then their offset is stored, so the partition keeps
//! moving whatever the message's size and whatever state the dead-letter
//! topic is in; their copy to the dead-letter topic is published afterwards
//! from the row by this process' copier ([`crate::dead_letters`]), retried
//! until the topic takes it. Database outages ([`HandlerError::Transient`])
//! are retried without limit and never dead-letter a message.
use crate::dead_letters::{self, Copier, DeadLetterStats};
use crate::kafka::{BusinessId, ID_HEADER, IngressConfig, TopicConfig, backoff, headers_to_json};
use async_trait::async_trait;
use ledgerflow_engine::inbox::{
    InboxEntry, InboxInserted, inbox_insert_in, inbox_insert_many_in, queue_available_backlog,
};
use ledgerflow_engine::{NewJob, Store, WorkflowRegistry, signal_send_in, workflow_start_in};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgConnection;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

// ----------------------------------------------------------------- handlers

/// A consumed message, detached from the consumer.
#[derive(Debug, Clone)]
pub struct IngressMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Headers as a JSON object (`name -> string or null`).
    pub headers: serde_json::Value,
    /// The business id found where the topic's config says, if any.
    pub business_id: Option<String>,
}

impl IngressMessage {
    /// The inbox source: `kafka:<topic>`.
    pub fn source(&self) -> String {
        format!("kafka:{}", self.topic)
    }

    /// The inbox dedupe key: `id:<business id>`, else
    /// `offset:<topic>/<partition>/<offset>`.
    pub fn dedupe_key(&self) -> String {
        match &self.business_id {
            Some(id) => format!("id:{id}"),
            None => format!("offset:{}/{}/{}", self.topic, self.partition, self.offset),
        }
    }

    /// A key unique to this event across topics, for the effects' own
    /// unique keys (signal dedupe keys, workflow unique keys).
    pub fn event_key(&self) -> String {
        format!("{}:{}", self.source(), self.dedupe_key())
    }

    /// The payload parsed as JSON; a missing or malformed payload is poison.
    pub fn json(&self) -> Result<serde_json::Value, HandlerError> {
        let bytes = self
            .payload
            .as_deref()
            .ok_or_else(|| HandlerError::Poison("message has no payload".into()))?;
        serde_json::from_slice(bytes)
            .map_err(|e| HandlerError::Poison(format!("payload is not JSON: {e}")))
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.as_str())
    }
}

/// Why a handler did not apply a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// The message can never be applied (undecodable, invalid): dead-letter it now.
    #[error("poison message: {0}")]
    Poison(String),
    /// This attempt failed; retried with backoff, dead-lettered after `max-attempts`.
    #[error("handler failed: {0}")]
    Failed(String),
    /// Infrastructure trouble (database unreachable, deadlock): retried
    /// without limit, never dead-lettered.
    #[error("transient failure: {0}")]
    Transient(String),
}

impl From<ledgerflow_engine::Error> for HandlerError {
    fn from(e: ledgerflow_engine::Error) -> Self {
        if e.is_transient() {
            HandlerError::Transient(e.to_string())
        } else if matches!(
            e,
            ledgerflow_engine::Error::Invalid(_) | ledgerflow_engine::Error::Args { .. }
        ) {
            HandlerError::Poison(e.to_string())
        } else {
            HandlerError::Failed(e.to_string())
        }
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        ledgerflow_engine::Error::from(e).into()
    }
}

/// Why a batch was not applied: the error, and which message of the batch
/// it is about when the handler knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// Index into the batch of the message that failed, if known.
    pub index: Option<usize>,
    /// What went wrong.
    pub error: HandlerError,
}

impl BatchError {
    /// An error about the batch as a whole.
    pub fn whole(error: impl Into<HandlerError>) -> Self {
        Self {
            index: None,
            error: error.into(),
        }
    }

    /// An error about message `index` of the batch.
    pub fn at(index: usize, error: impl Into<HandlerError>) -> Self {
        Self {
            index: Some(index),
            error: error.into(),
        }
    }
}

/// Turns messages into their effects on the caller's connection, which is
/// inside the transaction that also records the messages in the inbox. It
/// must write only through that connection (and never commit it).
#[async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    /// Applies `msg`.
    async fn handle(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msg: &IngressMessage,
    ) -> Result<(), HandlerError>;

    /// Applies several messages of one partition, in offset order, in one
    /// transaction. The default calls [`MessageHandler::handle`] for each;
    /// override it to write them with fewer statements. On an error the
    /// whole transaction is rolled back and the ingress re-applies the
    /// messages one by one, counting the error against `index`'s message.
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msgs: &[&IngressMessage],
    ) -> Result<(), BatchError> {
        for (i, msg) in msgs.iter().enumerate() {
            self.handle(&mut *conn, store, msg)
                .instrument(crate::ingress_trace::message_span(msg))
                .await
                .map_err(|e| BatchError::at(i, e))?;
        }
        Ok(())
    }
}

/// Enqueues a job whose args are the message's JSON payload.
#[derive(Debug, Clone)]
pub struct EnqueueJob {
    pub queue: String,
    pub kind: String,
}

#[async_trait]
impl MessageHandler for EnqueueJob {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msg: &IngressMessage,
    ) -> Result<(), HandlerError> {
        store.job_insert_in(conn, &self.job(msg)?).await?;
        Ok(())
    }

    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msgs: &[&IngressMessage],
    ) -> Result<(), BatchError> {
        let jobs = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                // Built in the message's span: the job continues the producer's trace.
                let _span = crate::ingress_trace::message_span(m).entered();
                self.job(m).map_err(|e| BatchError::at(i, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        store
            .job_insert_many_in(conn, &jobs)
            .await
            .map_err(BatchError::whole)?;
        Ok(())
    }
}

impl EnqueueJob {
    fn job(&self, msg: &IngressMessage) -> Result<NewJob, HandlerError> {
        Ok(NewJob::new(self.kind.clone(), msg.json()?).queue(self.queue.clone()))
    }
}

/// Sends a workflow signal named `name`; the correlation key is the payload's
/// top-level field `correlation_field` (a string or a number).
#[derive(Debug, Clone)]
pub struct SendSignal {
    pub name: String,
    pub correlation_field: String,
}

#[async_trait]
impl MessageHandler for SendSignal {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msg: &IngressMessage,
    ) -> Result<(), HandlerError> {
        let payload = msg.json()?;
        let key = json_text(payload.get(&self.correlation_field)).ok_or_else(|| {
            HandlerError::Poison(format!("payload has no field {:?}", self.correlation_field))
        })?;
        signal_send_in(conn, store, &self.name, &key, &payload, &msg.event_key()).await?;
        Ok(())
    }
}

/// Starts a workflow of `kind` with the JSON payload as input, unique per event.
#[derive(Debug, Clone)]
pub struct StartWorkflow {
    pub registry: Arc<WorkflowRegistry>,
    pub kind: String,
}

#[async_trait]
impl MessageHandler for StartWorkflow {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msg: &IngressMessage,
    ) -> Result<(), HandlerError> {
        let input = msg.json()?;
        workflow_start_in(
            conn,
            store,
            &self.registry,
            &self.kind,
            &input,
            Some(&msg.event_key()),
        )
        .await?;
        Ok(())
    }
}

/// Handlers by the name topics refer to in [`TopicConfig::handler`].
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    handlers: HashMap<String, Arc<dyn MessageHandler>>,
}

impl std::fmt::Debug for HandlerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}

impl HandlerRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` under `name`.
    pub fn register(mut self, name: impl Into<String>, handler: impl MessageHandler) -> Self {
        self.handlers.insert(name.into(), Arc::new(handler));
        self
    }

    fn get(&self, name: &str) -> Option<Arc<dyn MessageHandler>> {
        self.handlers.get(name).cloned()
    }
}

fn json_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------- consumer

/// Counters of a running ingress, for tests, benchmarks and metrics.
#[derive(Debug, Default)]
pub struct IngressStats {
    buffered: AtomicUsize,
    max_partition_buffered: AtomicUsize,
    paused: AtomicUsize,
    pauses: AtomicU64,
    applied: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    dead_letters: Arc<DeadLetterStats>,
    batches: AtomicU64,
    lag: Mutex<Vec<ConsumerLag>>,
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

/// Per-partition state shared by the consumer loop, the partition's worker
/// and the rebalance callbacks.
#[derive(Default)]
struct PartState {
    /// Bumped when the partition is revoked: buffered messages of an older
    /// epoch are dropped.
    epoch: AtomicU64,
    /// Messages handed to the worker and not yet committed or dropped.
    buffered: AtomicUsize,
    paused_buffer: AtomicBool,
    paused_backlog: AtomicBool,
    /// Serialises pause/resume decisions.
    gate: Mutex<()>,
    /// Signalled whenever buffered messages leave memory.
    room: Notify,
    /// One past the last offset stored in this assignment (0: none yet).
    stored_next: AtomicI64,
}

impl PartState {
    fn paused(&self) -> bool {
        self.paused_buffer.load(Ordering::SeqCst) || self.paused_backlog.load(Ordering::SeqCst)
    }
}

type Parts = Arc<Mutex<HashMap<(String, i32), Arc<PartState>>>>;

/// Topic name -> its config and handler.
type ByTopic = HashMap<String, (TopicConfig, Arc<dyn MessageHandler>)>;

/// librdkafka's figures of one partition, from its statistics.
#[derive(Debug, Clone, Copy)]
struct Figures {
    /// High watermark from the last fetch response (-1: none yet).
    high: i64,
    /// Log start offset (-1: unknown).
    low: i64,
    /// The group's committed offset as this consumer knows it (-1: none).
    committed: i64,
}

impl Default for Figures {
    fn default() -> Self {
        Self {
            high: -1,
            low: -1,
            committed: -1,
        }
    }
}

type PartitionFigures = Arc<Mutex<HashMap<(String, i32), Figures>>>;

struct IngressContext {
    parts: Parts,
    stats: Arc<IngressStats>,
    figures: PartitionFigures,
}

impl ClientContext for IngressContext {
    /// librdkafka's statistics (every `lag-interval-ms`): the figures the
    /// consumer lag is computed from, without asking the brokers.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut figures = self.figures.lock().unwrap_or_else(|p| p.into_inner());
        figures.clear();
        for (name, topic) in statistics.topics {
            for (partition, p) in topic.partitions {
                if partition >= 0 && p.desired {
                    let known = |o: i64| if o >= 0 { o } else { -1 };
                    figures.insert(
                        (name.clone(), partition),
                        Figures {
                            high: known(p.hi_offset),
                            low: known(p.lo_offset),
                            committed: known(p.committed_offset),
                        },
                    );
                }
            }
        }
    }
}

impl ConsumerContext for IngressContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Commit what is committed in Postgres before losing the partitions.
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync)
                && !is_no_offset(&e)
            {
                tracing::warn!(error = %e, "commit before revocation failed");
            }
            let parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
            for elem in tpl.elements() {
                if let Some(state) = parts.get(&(elem.topic().to_string(), elem.partition())) {
                    let _gate = state.gate.lock().unwrap_or_else(|p| p.into_inner());
                    state.epoch.fetch_add(1, Ordering::SeqCst);
                    if state.paused() {
                        self.stats.paused.fetch_sub(1, Ordering::SeqCst);
                    }
                    state.paused_buffer.store(false, Ordering::SeqCst);
                    state.paused_backlog.store(false, Ordering::SeqCst);
                    state.stored_next.store(0, Ordering::SeqCst);
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // A partition we paused, revoked and got back must not stay
            // paused: its state was reset at revocation.
            if let Err(e) = consumer.resume(tpl) {
                tracing::debug!(error = %e, "resume after assignment failed");
            }
            let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
            for elem in tpl.elements() {
                parts
                    .entry((elem.topic().to_string(), elem.partition()))
                    .or_default();
            }
        }
    }
}

type IngressConsumer = StreamConsumer<IngressContext>;

fn is_no_offset(e: &KafkaError) -> bool {
    matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))
}

/// A running ingress; see [`Ingress::start`].
#[derive(Debug)]
pub struct IngressHandle {
    cancel: CancellationToken,
    stats: Arc<IngressStats>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl IngressHandle {
    /// Stops consuming, lets each partition finish the batch in hand,
    /// commits stored offsets and leaves the group.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.task.await?
    }

    /// Waits for the ingress to end (when cancelled).
    pub async fn join(self) -> anyhow::Result<()> {
        self.task.await?
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<IngressStats> {
        self.stats.clone()
    }
}

/// The Kafka ingress role.
#[derive(Debug)]
pub struct Ingress;

/// Room in one job queue, shared by the partitions that feed it.
///
/// The estimate is the last measured count of available jobs plus every
/// reservation that measurement may have missed (batches in flight when it
/// started, and all made since), so it never under-counts what this process
/// added; runners only lower the true count.
#[derive(Default)]
struct Backlog {
    inner: Mutex<BacklogInner>,
}

#[derive(Default)]
struct BacklogInner {
    measured: i64,
    measured_at: Option<Instant>,
    since: i64,
    in_flight: i64,
    reserved_total: i64,
}

enum Room {
    /// Reserved this many jobs' room.
    Granted(usize),
    /// The estimate is stale or says full: measure first.
    Measure,
}

impl Backlog {
    fn lock(&self) -> std::sync::MutexGuard<'_, BacklogInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reserve(&self, want: usize, limit: i64, max_age: Duration) -> Room {
        let mut b = self.lock();
        let fresh = b.measured_at.is_some_and(|t| t.elapsed() < max_age);
        let room = limit - (b.measured + b.since);
        if !fresh || room <= 0 {
            return Room::Measure;
        }
        let n = i64::try_from(want).unwrap_or(i64::MAX).min(room);
        b.in_flight += n;
        b.reserved_total += n;
        b.since += n;
        Room::Granted(usize::try_from(n).unwrap_or(0))
    }

    /// What a measurement must add to its count: (in flight, total reserved) now.
    fn snapshot(&self) -> (i64, i64) {
        let b = self.lock();
        (b.in_flight, b.reserved_total)
    }

    fn measured(&self, count: i64, snapshot: (i64, i64)) {
        let mut b = self.lock();
        b.measured = count;
        b.measured_at = Some(Instant::now());
        b.since = snapshot.0 + (b.reserved_total - snapshot.1);
    }

    fn finished(&self, n: usize) {
        let mut b = self.lock();
        b.in_flight -= i64::try_from(n).unwrap_or(0);
    }
}

struct Shared {
    store: Store,
    config: IngressConfig,
    consumer: Arc<IngressConsumer>,
    figures: PartitionFigures,
    /// Wakes the dead-letter copier when a letter was recorded.
    copier: Arc<Notify>,
    backlogs: Mutex<HashMap<String, Arc<Backlog>>>,
    parts: Parts,
    stats: Arc<IngressStats>,
    cancel: CancellationToken,
}

impl Shared {
    fn backlog(&self, queue: &str) -> Arc<Backlog> {
        let mut map = self.backlogs.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(queue.to_string()).or_default().clone()
    }
}

impl Ingress {
    /// Subscribes to the configured topics and starts consuming on the
    /// current runtime. Every topic's handler must be in `handlers`.
    pub fn start(
        store: Store,
        config: IngressConfig,
        handlers: HandlerRegistry,
        cancel: CancellationToken,
    ) -> anyhow::Result<IngressHandle> {
        let mut by_topic: ByTopic = HashMap::new();
        for t in &config.topics {
            let h = handlers.get(&t.handler).ok_or_else(|| {
                anyhow::anyhow!("topic {:?}: no handler named {:?}", t.name, t.handler)
            })?;
            by_topic.insert(t.name.clone(), (t.clone(), h));
        }
        if by_topic.is_empty() {
            anyhow::bail!("ingress has no topics");
        }
        let parts: Parts = Arc::default();
        let stats = Arc::new(IngressStats::default());
        let figures = PartitionFigures::default();
        let lag_ms = config.lag_interval.as_millis().max(50).to_string();
        let consumer: IngressConsumer = config
            .kafka
            .client_config(&[
                ("group.id", &config.group_id),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("enable.partition.eof", "false"),
                ("queued.max.messages.kbytes", "4096"),
                // librdkafka waits this long (default 1 s) before fetching again
                // once its prefetch queue was full; with pause/resume
                // backpressure that wait would follow every resume.
                ("fetch.queue.backoff.ms", "20"),
                // A resumed partition is fetched again by the next Fetch
                // request, which a broker holds for up to this long while
                // the other partitions have less than `fetch.min.bytes`.
                ("fetch.wait.max.ms", "50"),
                ("statistics.interval.ms", &lag_ms),
            ])
            .create_with_context(IngressContext {
                parts: parts.clone(),
                stats: stats.clone(),
                figures: figures.clone(),
            })?;
        let topics: Vec<&str> = by_topic.keys().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let wake_copier = Arc::new(Notify::new());
        let copier = Copier::new(
            store.clone(),
            config.clone(),
            stats.dead_letters.clone(),
            wake_copier.clone(),
        )?;
        let shared = Arc::new(Shared {
            store,
            config,
            consumer: Arc::new(consumer),
            figures,
            copier: wake_copier,
            backlogs: Mutex::default(),
            parts: parts.clone(),
            stats: stats.clone(),
            cancel: cancel.clone(),
        });
        let copying = tokio::spawn(copier.run(cancel.clone()));
        let task = tokio::spawn(async move {
            let consumed = run(shared, Arc::new(by_topic), parts).await;
            let _ = copying.await;
            consumed
        });
        Ok(IngressHandle {
            cancel,
            stats,
            task,
        })
    }
}

struct Item {
    msg: IngressMessage,
    epoch: u64,
}

async fn run(shared: Arc<Shared>, by_topic: Arc<ByTopic>, parts: Parts) -> anyhow::Result<()> {
    let mut workers: HashMap<(String, i32), mpsc::UnboundedSender<Item>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let lag = tokio::spawn(lag_monitor(shared.clone()));
    let mut commit_tick = tokio::time::interval(shared.config.commit_interval);
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let high_water = shared.config.partition_buffer.max(1);
    loop {
        let received = tokio::select! {
            () = shared.cancel.cancelled() => break,
            _ = commit_tick.tick() => {
                store_positions_past_gaps(&shared);
                commit(&shared.consumer, CommitMode::Async);
                continue;
            }
            m = shared.consumer.recv() => m,
        };
        let m = match received {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "kafka consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((topic_cfg, handler)) = by_topic.get(m.topic()) else {
            continue;
        };
        let tp = (m.topic().to_string(), m.partition());
        let offset = m.offset();
        let state = {
            let mut map = parts.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(tp.clone()).or_default().clone()
        };
        let epoch = state.epoch.load(Ordering::SeqCst);
        let headers = headers_to_json(m.headers());
        let payload = m.payload().map(<[u8]>::to_vec);
        let business_id = business_id(&topic_cfg.business_id, &headers, payload.as_deref());
        let msg = IngressMessage {
            topic: tp.0.clone(),
            partition: tp.1,
            offset,
            key: m.key().map(<[u8]>::to_vec),
            payload,
            headers,
            business_id,
        };
        drop(m);
        tracing::trace!(topic = %msg.topic, partition = msg.partition, offset = msg.offset, "received");
        let sender = workers.entry(tp.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tasks.spawn(partition_worker(
                shared.clone(),
                tp.clone(),
                topic_cfg.clone(),
                handler.clone(),
                state.clone(),
                rx,
            ));
            tx
        });
        if sender.send(Item { msg, epoch }).is_err() {
            // Its worker is gone (shutting down). Counted as held and never
            // released, so that the partition's position, now past this
            // unapplied message, is never stored (`store_positions_past_gaps`).
            state.buffered.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let held = state.buffered.fetch_add(1, Ordering::SeqCst) + 1;
        shared.stats.buffered.fetch_add(1, Ordering::SeqCst);
        shared
            .stats
            .max_partition_buffered
            .fetch_max(held, Ordering::SeqCst);
        if held >= high_water
            && (state.paused() || !wait_for_worker(&shared, &state, high_water).await)
        {
            set_paused(&shared, &tp, &state, Reason::Buffer, true);
        }
    }
    // The monitor holds the consumer too: it must be gone before this
    // returns, or the consumer outlives `shutdown` (and its close commits
    // whenever it finally happens).
    let _ = lag.await;
    // Stop the workers (each finishes the batch in hand), then commit.
    drop(workers);
    while tasks.join_next().await.is_some() {}
    store_positions_past_gaps(&shared);
    commit(&shared.consumer, CommitMode::Sync);
    shared.consumer.unsubscribe();
    Ok(())
}

/// How long the consumer loop waits for a partition with a full buffer to
/// commit a batch before it pauses that partition instead.
const WAIT_BEFORE_PAUSE: Duration = Duration::from_secs(1);

/// Waits until the partition's buffer is below `high_water` (true) or
/// [`WAIT_BEFORE_PAUSE`] passed (false).
async fn wait_for_worker(shared: &Shared, state: &PartState, high_water: usize) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT_BEFORE_PAUSE;
    loop {
        let notified = state.room.notified();
        tokio::pin!(notified);
        // Registered before the check, so a release in between is not missed.
        notified.as_mut().enable();
        if state.buffered.load(Ordering::SeqCst) < high_water {
            return true;
        }
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep_until(deadline) => return false,
            () = shared.cancel.cancelled() => return true,
        }
    }
}

/// Measures the consumer lag every `lag-interval-ms` into the stats.
///
/// From librdkafka's own statistics (no requests): each partition's high
/// watermark as its last fetch response reported it, and the offset the
/// group last committed (read at assignment, then updated by each commit).
/// A paused partition is not fetched, so its high watermark would go stale:
/// for those (and any not fetched yet) the monitor asks the broker
/// (ListOffsets, one request for all of them) and keeps the larger value (a
/// fetch response newer than the listing may have seen more).
async fn lag_monitor(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.lag_interval.max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(assignment) = shared.consumer.assignment() else {
            continue;
        };
        let figures = shared
            .figures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut ask = TopicPartitionList::new();
        {
            let parts = shared.parts.lock().unwrap_or_else(|p| p.into_inner());
            for e in assignment.elements() {
                let tp = (e.topic().to_string(), e.partition());
                let paused = parts.get(&tp).is_some_and(|s| s.paused());
                if paused || figures.get(&tp).is_none_or(|f| f.high < 0) {
                    ask.add_partition(&tp.0, tp.1);
                }
            }
        }
        let mut listed: HashMap<(String, i32), i64> = HashMap::new();
        if ask.count() > 0 {
            let consumer = shared.consumer.clone();
            let got = tokio::task::spawn_blocking(move || latest_offsets(&consumer, ask)).await;
            match got {
                Ok(Ok(l)) => listed = l,
                Ok(Err(e)) => tracing::debug!(error = %e, "high watermarks not listed"),
                Err(_) => {}
            }
        }
        let mut lags = Vec::new();
        {
            let parts = shared.parts.lock().unwrap_or_else(|p| p.into_inner());
            for e in assignment.elements() {
                let tp = (e.topic().to_string(), e.partition());
                let f = figures.get(&tp).copied().unwrap_or_default();
                let high = f.high.max(listed.get(&tp).copied().unwrap_or(-1));
                if high < 0 {
                    continue; // unknown yet
                }
                let stored = parts
                    .get(&tp)
                    .map(|s| s.stored_next.load(Ordering::SeqCst))
                    .filter(|&o| o > 0);
                let committed = (f.committed >= 0).then_some(f.committed);
                let position = match (committed, stored) {
                    (Some(c), Some(s)) => c.max(s),
                    (Some(o), None) | (None, Some(o)) => o,
                    (None, None) => f.low.max(0),
                };
                lags.push(ConsumerLag {
                    group: shared.config.group_id.clone(),
                    topic: tp.0,
                    partition: tp.1,
                    high_watermark: high,
                    position,
                    lag: (high - position).max(0),
                });
            }
        }
        lags.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        // Also in Postgres, for the processes that consume nothing (the
        // API's /metrics). A failure only leaves that copy stale.
        if let Err(e) = shared.store.consumer_lag_record(&lags).await {
            tracing::warn!(error = %e, "consumer lag not recorded in Postgres");
        }
        *shared.stats.lag.lock().unwrap_or_else(|p| p.into_inner()) = lags;
    }
}

/// The high watermarks of `tpl`'s partitions (ListOffsets for the latest
/// offset: the special timestamp -1, which is how `Offset::End` is sent).
fn latest_offsets(
    consumer: &IngressConsumer,
    mut tpl: TopicPartitionList,
) -> Result<HashMap<(String, i32), i64>, KafkaError> {
    tpl.set_all_offsets(Offset::End)?;
    let got = consumer.offsets_for_times(tpl, Duration::from_secs(5))?;
    Ok(got
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) if e.error().is_ok() => {
                Some(((e.topic().to_string(), e.partition()), o))
            }
            _ => None,
        })
        .collect())
}

/// Stores the fetch position of every partition whose worker holds nothing uncommitted,
/// when it is beyond the offset stored last: the offsets in between are ones no message
/// was delivered for — the marker that ends a transaction, an aborted transaction's
/// records (skipped by `read_committed`), values compaction removed. Without this the
/// group's committed offset would stay on the last record before such a gap (on a
/// transaction's marker, typically) and the partition would show a lag that never drops
/// to 0.
///
/// Safe because it runs on the consumer loop, between two `recv` calls: librdkafka's
/// position (one past the last message or control record handed to the application in this
/// assignment; unset after an assignment or a seek until one is) then counts only messages
/// the loop already handed to the worker, and `buffered == 0` says each of those was
/// committed (or dropped as revoked, below the position of the assignment it came from). A
/// message the loop could not hand over (its worker gone at shutdown) stays counted.
fn store_positions_past_gaps(shared: &Shared) {
    let Ok(positions) = shared.consumer.position() else {
        return;
    };
    let mut store = TopicPartitionList::new();
    let mut stored = Vec::new();
    {
        let parts = shared.parts.lock().unwrap_or_else(|p| p.into_inner());
        for e in positions.elements() {
            let Offset::Offset(at) = e.offset() else {
                continue;
            };
            let tp = (e.topic().to_string(), e.partition());
            let Some(state) = parts.get(&tp) else {
                continue;
            };
            if state.buffered.load(Ordering::SeqCst) == 0
                && at > state.stored_next.load(Ordering::SeqCst)
                && store
                    .add_partition_offset(&tp.0, tp.1, Offset::Offset(at))
                    .is_ok()
            {
                stored.push((state.clone(), at));
            }
        }
    }
    if store.count() == 0 {
        return;
    }
    match shared.consumer.store_offsets(&store) {
        Ok(()) => {
            for (state, at) in stored {
                state.stored_next.fetch_max(at, Ordering::SeqCst);
            }
        }
        // Revoked meanwhile: the next owner starts from the committed offset.
        Err(e) => tracing::debug!(error = %e, "positions past gaps not stored"),
    }
}

fn commit(consumer: &IngressConsumer, mode: CommitMode) {
    if let Err(e) = consumer.commit_consumer_state(mode)
        && !is_no_offset(&e)
    {
        tracing::warn!(error = %e, "offset commit failed");
    }
}

#[derive(Clone, Copy)]
enum Reason {
    Buffer,
    Backlog,
}

/// Sets one pause reason and pauses/resumes the partition when the overall
/// state changes.
fn set_paused(shared: &Shared, tp: &(String, i32), state: &PartState, reason: Reason, on: bool) {
    let _gate = state.gate.lock().unwrap_or_else(|p| p.into_inner());
    let before = state.paused();
    match reason {
        Reason::Buffer => state.paused_buffer.store(on, Ordering::SeqCst),
        Reason::Backlog => state.paused_backlog.store(on, Ordering::SeqCst),
    }
    let after = state.paused();
    if before == after {
        return;
    }
    if after {
        shared.stats.paused.fetch_add(1, Ordering::SeqCst);
        shared.stats.pauses.fetch_add(1, Ordering::SeqCst);
    } else {
        shared.stats.paused.fetch_sub(1, Ordering::SeqCst);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    let result = if after {
        shared.consumer.pause(&tpl)
    } else {
        shared.consumer.resume(&tpl)
    };
    match result {
        Ok(()) => {
            tracing::debug!(topic = %tp.0, partition = tp.1, paused = after, "partition flow control")
        }
        Err(e) => {
            tracing::debug!(error = %e, topic = %tp.0, partition = tp.1, "pause/resume failed")
        }
    }
}

fn business_id(
    how: &BusinessId,
    headers: &serde_json::Value,
    payload: Option<&[u8]>,
) -> Option<String> {
    match how {
        BusinessId::Header(name) => headers
            .get(name)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        BusinessId::Field(field) => {
            let v: serde_json::Value = serde_json::from_slice(payload?).ok()?;
            json_text(v.get(field))
        }
        BusinessId::None => None,
    }
}

/// Processes one partition's messages in batches, in offset order.
async fn partition_worker(
    shared: Arc<Shared>,
    tp: (String, i32),
    topic: TopicConfig,
    handler: Arc<dyn MessageHandler>,
    state: Arc<PartState>,
    mut rx: mpsc::UnboundedReceiver<Item>,
) {
    // Double buffering: a batch is at most half the buffer, so while one is
    // being applied the next one is fetched (the partition stays resumed),
    // and committing a batch always brings the buffer down to half, where a
    // paused partition resumes.
    let low_water = shared.config.partition_buffer.max(1) / 2;
    let max_batch = low_water.max(1);
    let mut pending: VecDeque<Item> = VecDeque::new();
    loop {
        if pending.is_empty() {
            let first = tokio::select! {
                () = shared.cancel.cancelled() => return,
                item = rx.recv() => match item { Some(i) => i, None => return },
            };
            pending.push_back(first);
        }
        while pending.len() < max_batch {
            match rx.try_recv() {
                Ok(i) => pending.push_back(i),
                Err(_) => break,
            }
        }
        // Revoked since they were fetched: their next owner has them.
        let epoch = state.epoch.load(Ordering::SeqCst);
        let before = pending.len();
        pending.retain(|i| i.epoch == epoch);
        release(&shared, &tp, &state, before - pending.len(), low_water);
        if pending.is_empty() {
            continue;
        }
        let Some((room, backlog)) =
            wait_for_room(&shared, &topic, &tp, &state, pending.len()).await
        else {
            return;
        };
        if state.epoch.load(Ordering::SeqCst) != epoch {
            if let Some(b) = &backlog {
                b.finished(room);
            }
            continue; // revoked while waiting: drop the stale ones first
        }
        let batch: Vec<IngressMessage> = pending
            .drain(..room.min(pending.len()))
            .map(|i| i.msg)
            .collect();
        let done = process_batch(&shared, &*handler, &batch).await;
        if let Some(b) = &backlog {
            b.finished(room);
        }
        if !done {
            return;
        }
        release(&shared, &tp, &state, batch.len(), low_water);
    }
}

/// `n` messages of the partition left memory: count them out and resume the
/// partition once its buffer has drained to `low_water`.
fn release(shared: &Shared, tp: &(String, i32), state: &PartState, n: usize, low_water: usize) {
    if n == 0 {
        return;
    }
    let left = state
        .buffered
        .fetch_sub(n, Ordering::SeqCst)
        .saturating_sub(n);
    shared.stats.buffered.fetch_sub(n, Ordering::SeqCst);
    state.room.notify_waiters();
    if left <= low_water && state.paused_buffer.load(Ordering::SeqCst) {
        set_paused(shared, tp, state, Reason::Buffer, false);
    }
}

/// Waits until the topic's queue has room (pausing the partition while it
/// has none) and reserves it for up to `want` messages. Returns how many
/// may be applied now and the reservation to release afterwards; `None`
/// when cancelled while waiting.
async fn wait_for_room(
    shared: &Shared,
    topic: &TopicConfig,
    tp: &(String, i32),
    state: &PartState,
    want: usize,
) -> Option<(usize, Option<Arc<Backlog>>)> {
    let Some(queue) = &topic.queue else {
        return Some((want, None));
    };
    let backlog = shared.backlog(queue);
    let limit = shared.config.max_backlog.max(1);
    let max_age = shared.config.commit_interval;
    loop {
        if let Room::Granted(n) = backlog.reserve(want, limit, max_age) {
            if state.paused_backlog.load(Ordering::SeqCst) {
                set_paused(shared, tp, state, Reason::Backlog, false);
            }
            return Some((n, Some(backlog)));
        }
        let snapshot = backlog.snapshot();
        match queue_available_backlog(shared.store.pool(), queue, limit + 1).await {
            Ok(n) => {
                backlog.measured(n, snapshot);
                if let Room::Granted(n) = backlog.reserve(want, limit, max_age) {
                    if state.paused_backlog.load(Ordering::SeqCst) {
                        set_paused(shared, tp, state, Reason::Backlog, false);
                    }
                    return Some((n, Some(backlog)));
                }
                set_paused(shared, tp, state, Reason::Backlog, true);
            }
            Err(e) => tracing::warn!(error = %e, "backlog check failed"),
        }
        tokio::select! {
            () = shared.cancel.cancelled() => return None,
            () = tokio::time::sleep(shared.config.commit_interval.min(Duration::from_millis(250))) => {}
        }
    }
}

/// Applies a batch in one transaction and stores the last offset; on an
/// error, re-applies it one message at a time. False when cancelled before
/// everything was applied (offsets of the rest not stored).
async fn process_batch(
    shared: &Shared,
    handler: &dyn MessageHandler,
    batch: &[IngressMessage],
) -> bool {
    let Some(last) = batch.last() else {
        return true;
    };
    if batch.len() > 1 {
        match apply_batch(&shared.store, handler, batch).await {
            Ok(new) => {
                shared.stats.batches.fetch_add(1, Ordering::SeqCst);
                shared.stats.applied.fetch_add(new, Ordering::SeqCst);
                shared
                    .stats
                    .duplicates
                    .fetch_add(batch.len() as u64 - new, Ordering::SeqCst);
                store_offset(shared, last);
                return true;
            }
            Err(e) => {
                tracing::debug!(error = %e.error, index = ?e.index, size = batch.len(), "batch failed; applying its messages one by one");
                for (i, msg) in batch.iter().enumerate() {
                    let prior = (e.index == Some(i)).then(|| e.error.clone());
                    if !process(shared, handler, msg, prior).await {
                        return false;
                    }
                }
                return true;
            }
        }
    }
    process(shared, handler, last, None).await
}

fn store_offset(shared: &Shared, msg: &IngressMessage) {
    match shared
        .consumer
        .store_offset(&msg.topic, msg.partition, msg.offset)
    {
        Ok(()) => {
            let parts = shared.parts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(state) = parts.get(&(msg.topic.clone(), msg.partition)) {
                state
                    .stored_next
                    .fetch_max(msg.offset + 1, Ordering::SeqCst);
            }
        }
        // Revoked meanwhile: the next owner redelivers it and the inbox skips it.
        Err(e) => {
            tracing::debug!(error = %e, topic = %msg.topic, offset = msg.offset, "offset not stored")
        }
    }
}

/// Applies one message until it is applied, a duplicate or dead-lettered,
/// then stores its offset. `prior` is the error of an attempt already made
/// (in a failed batch). False when cancelled first (offset not stored).
async fn process(
    shared: &Shared,
    handler: &dyn MessageHandler,
    msg: &IngressMessage,
    mut prior: Option<HandlerError>,
) -> bool {
    let mut failures: u32 = 0;
    let mut transient: u32 = 0;
    let max = shared.config.max_attempts.max(1);
    loop {
        let result = match prior.take() {
            Some(e) => Err(e),
            None => apply(&shared.store, handler, msg).await,
        };
        let error = match result {
            Ok(inserted) => {
                let counter = if inserted.is_new() {
                    &shared.stats.applied
                } else {
                    &shared.stats.duplicates
                };
                counter.fetch_add(1, Ordering::SeqCst);
                break;
            }
            Err(HandlerError::Poison(e)) => {
                failures += 1;
                Some(format!("poison message: {e}"))
            }
            Err(HandlerError::Failed(e)) => {
                failures += 1;
                (failures >= max).then(|| format!("failed {failures} times; last error: {e}"))
            }
            Err(HandlerError::Transient(e)) => {
                transient += 1;
                tracing::warn!(error = %e, topic = %msg.topic, offset = msg.offset, "transient failure; retrying");
                None
            }
        };
        if let Some(error) = error {
            let recorded = dead_letters::record(
                &shared.store,
                &shared.config,
                &shared.stats.dead_letters,
                &shared.copier,
                &shared.cancel,
                (msg, &error, failures),
            )
            .await;
            if !recorded {
                return false;
            }
            shared.stats.dead_lettered.fetch_add(1, Ordering::SeqCst);
            break;
        }
        let delay = backoff(
            shared.config.retry_backoff,
            failures.max(transient),
            Duration::from_secs(30),
        );
        tokio::select! {
            () = shared.cancel.cancelled() => return false,
            () = tokio::time::sleep(delay) => {}
        }
    }
    store_offset(shared, msg);
    true
}

/// The message's inbox row (its source and dedupe key computed by the caller).
fn inbox_entry<'a>(
    msg: &'a IngressMessage,
    source: &'a str,
    dedupe_key: &'a str,
) -> InboxEntry<'a> {
    InboxEntry {
        source,
        dedupe_key,
        topic: Some(&msg.topic),
        partition: Some(msg.partition),
        offset: Some(msg.offset),
        business_id: msg.business_id.as_deref(),
        payload: msg.payload.as_deref(),
        headers: Some(&msg.headers),
        processed: true,
    }
}

/// One attempt: inbox row + effect in one transaction.
async fn apply(
    store: &Store,
    handler: &dyn MessageHandler,
    msg: &IngressMessage,
) -> Result<InboxInserted, HandlerError> {
    let mut tx = store.pool().begin().await?;
    let source = msg.source();
    let dedupe_key = msg.dedupe_key();
    let inserted = inbox_insert_in(&mut tx, &inbox_entry(msg, &source, &dedupe_key)).await?;
    if inserted.is_new() {
        handler
            .handle(&mut tx, store, msg)
            .instrument(crate::ingress_trace::message_span(msg))
            .await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

/// One attempt at a whole batch: its inbox rows (one statement) + the new
/// messages' effects, in one transaction. Returns how many were new.
async fn apply_batch(
    store: &Store,
    handler: &dyn MessageHandler,
    batch: &[IngressMessage],
) -> Result<u64, BatchError> {
    let mut tx = store.pool().begin().await.map_err(BatchError::whole)?;
    let keys: Vec<(String, String)> = batch.iter().map(|m| (m.source(), m.dedupe_key())).collect();
    let entries: Vec<InboxEntry<'_>> = batch
        .iter()
        .zip(&keys)
        .map(|(m, (source, key))| inbox_entry(m, source, key))
        .collect();
    let inserted = inbox_insert_many_in(&mut tx, &entries)
        .await
        .map_err(BatchError::whole)?;
    // Positions in `batch` of the new messages.
    let fresh: Vec<usize> = inserted
        .iter()
        .enumerate()
        .filter(|(_, i)| i.is_new())
        .map(|(n, _)| n)
        .collect();
    if !fresh.is_empty() {
        let msgs: Vec<&IngressMessage> = fresh.iter().map(|&n| &batch[n]).collect();
        handler
            .handle_batch(&mut tx, store, &msgs)
            .await
            .map_err(|e| BatchError {
                index: e.index.and_then(|i| fresh.get(i).copied()),
                error: e.error,
            })?;
    }
    tx.commit().await.map_err(BatchError::whole)?;
    Ok(fresh.len() as u64)
}

/// The id header name, re-exported for handlers and tests.
pub const BUSINESS_ID_HEADER: &str = ID_HEADER;
