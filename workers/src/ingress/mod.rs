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
//! Layout: this file is the consumer loop (assignment, rebalances, buffering, pausing, offset
//! commits); `handlers` what a message becomes, `worker` a partition's batches, `backlog`
//! room in the job queue, `lag` the lag monitor, `stats` the counters, [`trace`] the message's
//! trace.
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

mod backlog;
mod handlers;
mod lag;
mod stats;
pub mod trace;
mod worker;

use backlog::{Backlog, Room};
use handlers::json_text;
pub use handlers::{
    BatchError, EnqueueJob, HandlerError, HandlerRegistry, IngressMessage, MessageHandler,
    SendSignal, StartWorkflow,
};
use lag::lag_monitor;
pub use stats::{ConsumerLag, IngressStats};
use worker::{business_id, partition_worker};

// ---------------------------------------------------------------- consumer

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

/// The id header name, re-exported for handlers and tests.
pub const BUSINESS_ID_HEADER: &str = ID_HEADER;
