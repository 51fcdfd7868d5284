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
//! Ordering and concurrency: one worker task per partition processes that
//! partition's messages one at a time, in offset order; partitions run
//! concurrently. Backpressure: a partition is paused (`consumer.pause`) while
//! its worker's buffer is full or while its topic's job queue has more than
//! `max-backlog` available jobs, and resumed when that drains. Rebalances:
//! stored offsets are committed synchronously before partitions are revoked,
//! and messages still buffered for a revoked partition are dropped (the next
//! owner gets them from the committed offset).
//!
//! Poison messages — undecodable or invalid ([`HandlerError::Poison`]), or
//! failing `max-attempts` times ([`HandlerError::Failed`]) — are published to
//! the dead-letter topic and recorded in `dead_letters`, then their offset is
//! stored, so the partition keeps moving. Database outages
//! ([`HandlerError::Transient`]) are retried without limit and never
//! dead-letter a message.
use crate::kafka::{BusinessId, ID_HEADER, IngressConfig, TopicConfig, backoff, headers_to_json};
use async_trait::async_trait;
use ledgerflow_engine::inbox::{
    InboxEntry, InboxInserted, NewDeadLetter, dead_letter_insert_in, inbox_insert_in,
    queue_available_backlog,
};
use ledgerflow_engine::{NewJob, Store, WorkflowRegistry, signal_send_in, workflow_start_in};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, TopicPartitionList};
use sqlx::PgConnection;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

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

/// Turns one message into its effect on the caller's connection, which is
/// inside the transaction that also records the message in the inbox. It must
/// write only through that connection (and never commit it).
#[async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    /// Applies `msg`.
    async fn handle(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msg: &IngressMessage,
    ) -> Result<(), HandlerError>;
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
        let args = msg.json()?;
        let job = NewJob::new(self.kind.clone(), args).queue(self.queue.clone());
        store.job_insert_in(conn, &job).await?;
        Ok(())
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

/// Per-partition state shared by the consumer loop, the partition's worker
/// and the rebalance callback.
#[derive(Default)]
struct PartState {
    /// Bumped when the partition is revoked: buffered messages of an older
    /// epoch are dropped.
    epoch: AtomicU64,
    /// Messages handed to the worker and not yet taken.
    buffered: AtomicUsize,
    paused_buffer: AtomicBool,
    paused_backlog: AtomicBool,
    /// Serialises pause/resume decisions.
    gate: Mutex<()>,
}

type Parts = Arc<Mutex<HashMap<(String, i32), Arc<PartState>>>>;

/// Topic name -> its config and handler.
type ByTopic = HashMap<String, (TopicConfig, Arc<dyn MessageHandler>)>;

struct IngressContext {
    parts: Parts,
}

impl ClientContext for IngressContext {}

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
                    state.epoch.fetch_add(1, Ordering::SeqCst);
                    state.paused_buffer.store(false, Ordering::SeqCst);
                    state.paused_backlog.store(false, Ordering::SeqCst);
                }
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
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl IngressHandle {
    /// Stops consuming, lets each partition finish the message in hand,
    /// commits stored offsets and leaves the group.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.task.await?
    }

    /// Waits for the ingress to end (when cancelled).
    pub async fn join(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

/// The Kafka ingress role.
#[derive(Debug)]
pub struct Ingress;

struct Shared {
    store: Store,
    config: IngressConfig,
    consumer: Arc<IngressConsumer>,
    producer: FutureProducer,
    cancel: CancellationToken,
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
        let consumer: IngressConsumer = config
            .kafka
            .client_config(&[
                ("group.id", &config.group_id),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("enable.partition.eof", "false"),
                ("queued.max.messages.kbytes", "4096"),
            ])
            .create_with_context(IngressContext {
                parts: parts.clone(),
            })?;
        let topics: Vec<&str> = by_topic.keys().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let producer: FutureProducer = config
            .kafka
            .client_config(&[("enable.idempotence", "true"), ("acks", "all")])
            .create()?;
        let shared = Arc::new(Shared {
            store,
            config,
            consumer: Arc::new(consumer),
            producer,
            cancel: cancel.clone(),
        });
        let task = tokio::spawn(run(shared, Arc::new(by_topic), parts));
        Ok(IngressHandle { cancel, task })
    }
}

struct Item {
    msg: IngressMessage,
    epoch: u64,
}

async fn run(shared: Arc<Shared>, by_topic: Arc<ByTopic>, parts: Parts) -> anyhow::Result<()> {
    let mut workers: HashMap<(String, i32), mpsc::UnboundedSender<Item>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut commit_tick = tokio::time::interval(shared.config.commit_interval);
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let high_water = shared.config.partition_buffer.max(1);
    loop {
        let received = tokio::select! {
            () = shared.cancel.cancelled() => break,
            _ = commit_tick.tick() => {
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
        let headers = headers_to_json(m.headers());
        let payload = m.payload().map(<[u8]>::to_vec);
        let business_id = business_id(&topic_cfg.business_id, &headers, payload.as_deref());
        let msg = IngressMessage {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload,
            headers,
            business_id,
        };
        drop(m);
        let tp = (msg.topic.clone(), msg.partition);
        let state = {
            let mut map = parts.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(tp.clone()).or_default().clone()
        };
        let sender = workers.entry(tp.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tasks.spawn(partition_worker(
                shared.clone(),
                topic_cfg.clone(),
                handler.clone(),
                state.clone(),
                rx,
            ));
            tx
        });
        let epoch = state.epoch.load(Ordering::SeqCst);
        if sender.send(Item { msg, epoch }).is_err() {
            continue;
        }
        if state.buffered.fetch_add(1, Ordering::SeqCst) + 1 >= high_water {
            set_paused(&shared.consumer, &tp, &state, Reason::Buffer, true);
        }
    }
    // Stop the workers (each finishes the message in hand), then commit.
    drop(workers);
    while tasks.join_next().await.is_some() {}
    commit(&shared.consumer, CommitMode::Sync);
    shared.consumer.unsubscribe();
    Ok(())
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
fn set_paused(
    consumer: &IngressConsumer,
    tp: &(String, i32),
    state: &PartState,
    reason: Reason,
    on: bool,
) {
    let _gate = state.gate.lock().unwrap_or_else(|p| p.into_inner());
    let before =
        state.paused_buffer.load(Ordering::SeqCst) || state.paused_backlog.load(Ordering::SeqCst);
    match reason {
        Reason::Buffer => state.paused_buffer.store(on, Ordering::SeqCst),
        Reason::Backlog => state.paused_backlog.store(on, Ordering::SeqCst),
    }
    let after =
        state.paused_buffer.load(Ordering::SeqCst) || state.paused_backlog.load(Ordering::SeqCst);
    if before == after {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    let result = if after {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
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

async fn partition_worker(
    shared: Arc<Shared>,
    topic: TopicConfig,
    handler: Arc<dyn MessageHandler>,
    state: Arc<PartState>,
    mut rx: mpsc::UnboundedReceiver<Item>,
) {
    let low_water = shared.config.partition_buffer.max(1) / 2;
    loop {
        let item = tokio::select! {
            () = shared.cancel.cancelled() => return,
            item = rx.recv() => match item { Some(i) => i, None => return },
        };
        let left = state
            .buffered
            .fetch_sub(1, Ordering::SeqCst)
            .saturating_sub(1);
        let tp = (item.msg.topic.clone(), item.msg.partition);
        if left <= low_water && state.paused_buffer.load(Ordering::SeqCst) {
            set_paused(&shared.consumer, &tp, &state, Reason::Buffer, false);
        }
        if item.epoch != state.epoch.load(Ordering::SeqCst) {
            continue; // revoked since it was fetched; its next owner has it
        }
        if !wait_for_backlog(&shared, &topic, &tp, &state).await {
            return;
        }
        if !process(&shared, &*handler, &item.msg).await {
            return;
        }
    }
}

/// Pauses the partition while the topic's queue is over its backlog limit.
/// False when cancelled while waiting.
async fn wait_for_backlog(
    shared: &Shared,
    topic: &TopicConfig,
    tp: &(String, i32),
    state: &PartState,
) -> bool {
    let Some(queue) = &topic.queue else {
        return true;
    };
    let limit = shared.config.max_backlog;
    loop {
        match queue_available_backlog(shared.store.pool(), queue, limit + 1).await {
            Ok(n) if n <= limit => {
                if state.paused_backlog.load(Ordering::SeqCst) {
                    set_paused(&shared.consumer, tp, state, Reason::Backlog, false);
                }
                return true;
            }
            Ok(_) => set_paused(&shared.consumer, tp, state, Reason::Backlog, true),
            Err(e) => tracing::warn!(error = %e, "backlog check failed"),
        }
        tokio::select! {
            () = shared.cancel.cancelled() => return false,
            () = tokio::time::sleep(shared.config.commit_interval) => {}
        }
    }
}

/// Applies one message until it is applied, a duplicate or dead-lettered,
/// then stores its offset. False when cancelled first (offset not stored).
async fn process(shared: &Shared, handler: &dyn MessageHandler, msg: &IngressMessage) -> bool {
    let mut failures: u32 = 0;
    let mut transient: u32 = 0;
    let max = shared.config.max_attempts.max(1);
    loop {
        let error = match apply(&shared.store, handler, msg).await {
            Ok(_) => break,
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
            if !dead_letter(shared, msg, &error, failures).await {
                return false;
            }
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
    if let Err(e) = shared
        .consumer
        .store_offset(&msg.topic, msg.partition, msg.offset)
    {
        // Revoked meanwhile: the next owner redelivers it and the inbox skips it.
        tracing::debug!(error = %e, topic = %msg.topic, offset = msg.offset, "offset not stored");
    }
    true
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
    let inserted = inbox_insert_in(
        &mut tx,
        &InboxEntry {
            source: &source,
            dedupe_key: &dedupe_key,
            topic: Some(&msg.topic),
            partition: Some(msg.partition),
            offset: Some(msg.offset),
            business_id: msg.business_id.as_deref(),
            payload: msg.payload.as_deref(),
            headers: Some(&msg.headers),
            processed: true,
        },
    )
    .await?;
    if inserted.is_new() {
        handler.handle(&mut tx, store, msg).await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

/// Publishes to the dead-letter topic and records the letter, retrying both
/// until they succeed. False when cancelled first.
async fn dead_letter(shared: &Shared, msg: &IngressMessage, error: &str, attempts: u32) -> bool {
    tracing::warn!(topic = %msg.topic, partition = msg.partition, offset = msg.offset, %error, "dead-lettering message");
    let mut n: u32 = 0;
    let pause = |n: u32| backoff(shared.config.retry_backoff, n, Duration::from_secs(10));
    loop {
        let partition = msg.partition.to_string();
        let offset = msg.offset.to_string();
        let mut headers = OwnedHeaders::new();
        if let Some(map) = msg.headers.as_object() {
            for (k, v) in map {
                headers = headers.insert(Header {
                    key: k.as_str(),
                    value: v.as_str(),
                });
            }
        }
        let headers = headers
            .insert(Header {
                key: "ledgerflow-error",
                value: Some(error),
            })
            .insert(Header {
                key: "ledgerflow-source-topic",
                value: Some(msg.topic.as_str()),
            })
            .insert(Header {
                key: "ledgerflow-source-partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "ledgerflow-source-offset",
                value: Some(offset.as_str()),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&shared.config.dead_letter_topic).headers(headers);
        if let Some(p) = &msg.payload {
            record = record.payload(p.as_slice());
        }
        if let Some(k) = &msg.key {
            record = record.key(k.as_slice());
        }
        match shared.producer.send(record, Duration::from_secs(5)).await {
            Ok(_) => break,
            Err((e, _)) => {
                n += 1;
                tracing::warn!(error = %e, "dead-letter topic publish failed; retrying");
            }
        }
        tokio::select! {
            () = shared.cancel.cancelled() => return false,
            () = tokio::time::sleep(pause(n)) => {}
        }
    }
    let source = msg.source();
    let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
    loop {
        let letter = NewDeadLetter {
            source: &source,
            topic: Some(&msg.topic),
            partition: Some(msg.partition),
            offset: Some(msg.offset),
            key: msg.key.as_deref(),
            payload: msg.payload.as_deref(),
            headers: Some(&msg.headers),
            error,
            attempts,
        };
        let result = async {
            let mut conn = shared.store.pool().acquire().await?;
            dead_letter_insert_in(&mut conn, &letter).await
        }
        .await;
        match result {
            Ok(_) => return true,
            Err(e) => {
                n += 1;
                tracing::warn!(error = %e, "recording dead letter failed; retrying");
            }
        }
        tokio::select! {
            () = shared.cancel.cancelled() => return false,
            () = tokio::time::sleep(pause(n)) => {}
        }
    }
}

/// The id header name, re-exported for handlers and tests.
pub const BUSINESS_ID_HEADER: &str = ID_HEADER;
