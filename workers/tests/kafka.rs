//! Kafka ingress and outbox relay against a real Postgres and Apache Kafka,
//! a broker started per test on free ports with its log on disk (or
//! `KAFKA_BROKERS`, with unique topic names).
//!
//! Tests that need a process to die re-run this test binary with
//! `LF_CHILD_ROLE` set, which turns `child_role` into a long-running ingress
//! or relay that the parent kills with `kill -9`.
#[path = "common/broker.rs"]
mod broker;
mod common;
use broker::{Broker, Seen, consume_all, enqueue, ingress_config, produce, unique};
use common::{count, wait_for};
use ledgerflow_engine::Store;
use ledgerflow_engine::outbox::{NewOutboxEvent, outbox_insert_in};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_workers::ingress::{
    EnqueueJob, HandlerError, HandlerRegistry, Ingress, IngressMessage, MessageHandler,
};
use ledgerflow_workers::kafka::{ID_HEADER, RelayConfig};
use ledgerflow_workers::relay::Relay;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{PgConnection, PgPool};
use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const CHILD_ROLE: &str = "LF_CHILD_ROLE";
const CHILD_DB: &str = "LF_CHILD_DB";
const CHILD_BROKERS: &str = "LF_CHILD_BROKERS";
const CHILD_TOPIC: &str = "LF_CHILD_TOPIC";
const CHILD_GROUP: &str = "LF_CHILD_GROUP";

// ------------------------------------------------------------------- utils

fn relay_config(broker: &Broker, batch: i64) -> RelayConfig {
    let mut c = RelayConfig::new(broker.kafka());
    c.batch_size = batch;
    c.poll_interval = Duration::from_millis(50);
    c.retry_backoff = Duration::from_millis(100);
    c.max_backoff = Duration::from_millis(500);
    c.delivery_timeout = Duration::from_secs(3);
    c
}

async fn write_outbox(pool: &PgPool, topic: &str, keys: &[&str], per_key: usize) -> TestResult {
    let mut tx = pool.begin().await?;
    for seq in 0..per_key {
        for key in keys {
            let payload = format!("{key}:{seq}");
            outbox_insert_in(
                &mut tx,
                &NewOutboxEvent {
                    topic,
                    key: Some(key),
                    headers: None,
                    payload: payload.as_bytes(),
                },
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Per key, the sequence numbers in the order first seen (duplicates, which
/// a consumer drops by id, are skipped).
fn first_seen_per_key(seen: &[Seen]) -> BTreeMap<String, Vec<usize>> {
    let mut ids = HashSet::new();
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for s in seen {
        if let Some(id) = &s.id
            && !ids.insert(id.clone())
        {
            continue;
        }
        let text = String::from_utf8_lossy(&s.payload);
        if let Some((key, seq)) = text.split_once(':')
            && let Ok(seq) = seq.parse()
        {
            out.entry(key.to_string()).or_default().push(seq);
        }
    }
    out
}

fn spawn_child(
    role: &str,
    db: &TestDb,
    broker: &Broker,
    topic: &str,
    group: &str,
) -> std::io::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["child_role", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .env(CHILD_DB, &db.url)
        .env(CHILD_BROKERS, broker.servers())
        .env(CHILD_TOPIC, topic)
        .env(CHILD_GROUP, group)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// Not a test of its own: the body of a child ingress or relay process.
/// Returns at once unless `LF_CHILD_ROLE` is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_role() -> TestResult {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return Ok(());
    };
    let pool = PgPool::connect(&std::env::var(CHILD_DB)?).await?;
    let store = Store::new(pool);
    let broker = Broker::external(std::env::var(CHILD_BROKERS)?);
    let topic = std::env::var(CHILD_TOPIC)?;
    let cancel = CancellationToken::new();
    if role == "ingress" {
        let mut config =
            ingress_config(&broker, &topic, &std::env::var(CHILD_GROUP)?, "unused-dlq");
        // Never commit on its own: the parent kills it after the DB commits
        // and before any offset commit.
        config.commit_interval = Duration::from_secs(3600);
        Ingress::start(store, config, enqueue(), cancel)?
            .join()
            .await?;
    } else {
        Relay::start(store, relay_config(&broker, 10), cancel)?
            .join()
            .await?;
    }
    Ok(())
}

// ------------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_offset_commit_then_redelivered_and_duplicates_apply_once() -> TestResult {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let broker = Broker::start()?;
    let topic = unique("orders");
    let group = unique("ingress");
    broker.create_topics(&[&topic]).await?;
    let producer = broker.producer()?;
    for i in 0..30 {
        let id = format!("e{i}");
        produce(
            &producer,
            &topic,
            None,
            &format!("k{}", i % 7),
            Some(&id),
            format!("{{\"n\":{i}}}").as_bytes(),
        )
        .await?;
    }

    // A child ingress applies all 30 and is killed before committing offsets.
    let mut child = spawn_child("ingress", &db, &broker, &topic, &group)?;
    let applied = wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE kind = 'ingested'",
        30,
        Duration::from_secs(60),
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    applied?;
    let committed = committed_offsets(&broker, &group, &topic)?;
    assert!(
        committed.iter().all(|o| *o <= 0),
        "the killed consumer committed offsets {committed:?}"
    );

    // The same business events again, at new offsets.
    for i in 0..5 {
        let id = format!("e{i}");
        produce(
            &producer,
            &topic,
            None,
            "dup",
            Some(&id),
            format!("{{\"n\":{i}}}").as_bytes(),
        )
        .await?;
    }
    // One new event per partition, last: once they are applied, everything
    // before them in each partition was (re)processed.
    for p in 0..3 {
        produce(
            &producer,
            &topic,
            Some(p),
            "end",
            Some(&format!("end{p}")),
            b"{}",
        )
        .await?;
    }
    let store = Store::new(db.pool.clone());
    let handle = Ingress::start(
        store,
        ingress_config(&broker, &topic, &group, "unused-dlq"),
        enqueue(),
        CancellationToken::new(),
    )?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM inbox WHERE business_id LIKE 'end%'",
        3,
        Duration::from_secs(60),
    )
    .await?;
    handle.shutdown().await?;

    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE kind = 'ingested'"
        )
        .await,
        33
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, 33);
    assert_eq!(
        count(&db.pool, "SELECT count(DISTINCT business_id) FROM inbox").await,
        33
    );
    // The survivor committed past every message.
    let committed = committed_offsets(&broker, &group, &topic)?;
    assert_eq!(committed.iter().sum::<i64>(), 38, "committed {committed:?}");
    eprintln!("redelivery test took {:?}", t0.elapsed());
    Ok(())
}

fn committed_offsets(
    broker: &Broker,
    group: &str,
    topic: &str,
) -> Result<Vec<i64>, Box<dyn std::error::Error + Send + Sync>> {
    let consumer: BaseConsumer = broker.client().set("group.id", group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(topic, p);
    }
    let got = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(got
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => -1,
        })
        .collect())
}

/// Fails every attempt for payloads `{"fail": true}`, counting attempts.
struct Flaky {
    inner: EnqueueJob,
    attempts: Arc<AtomicU32>,
}

#[async_trait::async_trait]
impl MessageHandler for Flaky {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msg: &IngressMessage,
    ) -> Result<(), HandlerError> {
        let v = msg.json()?;
        if v.get("fail") == Some(&serde_json::Value::Bool(true)) {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            return Err(HandlerError::Failed("downstream says no".into()));
        }
        self.inner.handle(conn, store, msg).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_their_partition_keeps_moving() -> TestResult {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let broker = Broker::start()?;
    let topic = unique("requests");
    let dlq = unique("requests-dlq");
    broker.create_topics(&[&topic, &dlq]).await?;
    let producer = broker.producer()?;
    produce(&producer, &topic, Some(0), "a", Some("ok1"), b"{\"n\":1}").await?;
    produce(
        &producer,
        &topic,
        Some(0),
        "a",
        Some("bad"),
        b"not json at all",
    )
    .await?;
    produce(
        &producer,
        &topic,
        Some(0),
        "a",
        Some("fails"),
        b"{\"fail\":true}",
    )
    .await?;
    produce(&producer, &topic, Some(0), "a", Some("ok2"), b"{\"n\":2}").await?;

    let attempts = Arc::new(AtomicU32::new(0));
    let handlers = HandlerRegistry::new().register(
        "enqueue",
        Flaky {
            inner: EnqueueJob {
                queue: "q".into(),
                kind: "ingested".into(),
            },
            attempts: attempts.clone(),
        },
    );
    let mut config = ingress_config(&broker, &topic, &unique("ingress"), &dlq);
    config.max_attempts = 3;
    let handle = Ingress::start(
        Store::new(db.pool.clone()),
        config,
        handlers,
        CancellationToken::new(),
    )?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM inbox WHERE business_id = 'ok2'",
        1,
        Duration::from_secs(60),
    )
    .await?;
    // The copies follow the rows; they are published once the topic takes them.
    wait_for(
        &db.pool,
        "SELECT count(*) FROM dead_letters WHERE copy_state = 'published'",
        2,
        Duration::from_secs(60),
    )
    .await?;
    handle.shutdown().await?;

    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE kind = 'ingested'"
        )
        .await,
        2
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    let letters: Vec<(i64, i32, String)> = sqlx::query_as(
        "SELECT \"offset\", attempts, error FROM dead_letters WHERE topic = $1 ORDER BY \"offset\"",
    )
    .bind(&topic)
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!((letters[0].0, letters[0].1), (1, 1));
    assert!(letters[0].2.contains("not JSON"), "{}", letters[0].2);
    assert_eq!((letters[1].0, letters[1].1), (2, 3));
    assert!(
        letters[1].2.contains("downstream says no"),
        "{}",
        letters[1].2
    );
    // Neither poison message left a trace in the inbox.
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, 2);

    let dead = consume_all(&broker, &dlq, 2, Duration::from_secs(30)).await?;
    assert_eq!(dead.len(), 2);
    let ids: HashSet<_> = dead.iter().filter_map(|d| d.id.clone()).collect();
    assert_eq!(ids, HashSet::from(["bad".to_string(), "fails".to_string()]));
    assert!(
        dead.iter()
            .all(|d| d.headers.contains_key("ledgerflow-error"))
    );
    eprintln!("poison test took {:?}", t0.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_batch_publishes_every_event_at_least_once_in_key_order() -> TestResult {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let broker = Broker::start()?;
    let topic = unique("events");
    broker.create_topics(&[&topic]).await?;
    let keys = ["a", "b", "c", "d", "e"];
    write_outbox(&db.pool, &topic, &keys, 200).await?;

    let mut child = spawn_child("relay", &db, &broker, &topic, "unused")?;
    let some = wait_for(
        &db.pool,
        "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
        50,
        Duration::from_secs(60),
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    some?;
    let left = count(
        &db.pool,
        "SELECT count(*) FROM outbox WHERE published_at IS NULL",
    )
    .await;
    eprintln!("relay killed with {left} of 1000 unpublished");

    let relay = Relay::start(
        Store::new(db.pool.clone()),
        relay_config(&broker, 50),
        CancellationToken::new(),
    )?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
        1000,
        Duration::from_secs(60),
    )
    .await?;
    relay.shutdown().await?;

    let seen = consume_all(&broker, &topic, 1000, Duration::from_secs(60)).await?;
    let ids: HashSet<_> = seen.iter().filter_map(|s| s.id.clone()).collect();
    let expected: HashSet<String> = sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM outbox")
        .fetch_all(&db.pool)
        .await?
        .into_iter()
        .map(|u| u.to_string())
        .collect();
    assert_eq!(ids, expected, "every outbox id published");
    for (key, seqs) in first_seen_per_key(&seen) {
        assert_eq!(seqs, (0..200).collect::<Vec<_>>(), "order of key {key}");
    }
    eprintln!(
        "relay kill test took {:?} ({} messages incl. duplicates)",
        t0.elapsed(),
        seen.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_at_once_keep_every_key_in_order() -> TestResult {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let broker = Broker::start()?;
    let topic = unique("events");
    broker.create_topics(&[&topic]).await?;
    let keys = ["a", "b", "c", "d", "e", "f"];
    let r1 = Relay::start(
        Store::new(db.pool.clone()),
        relay_config(&broker, 7),
        CancellationToken::new(),
    )?;
    let r2 = Relay::start(
        Store::new(db.pool.clone()),
        relay_config(&broker, 7),
        CancellationToken::new(),
    )?;
    // Written in several transactions while both relays run.
    for _ in 0..5 {
        write_outbox(&db.pool, &topic, &keys, 20).await?;
    }
    wait_for(
        &db.pool,
        "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
        600,
        Duration::from_secs(60),
    )
    .await?;
    r1.shutdown().await?;
    r2.shutdown().await?;
    let seen = consume_all(&broker, &topic, 600, Duration::from_secs(60)).await?;
    assert_eq!(seen.len(), 600, "no duplicates without a crash");
    let per_key = first_seen_per_key(&seen);
    assert_eq!(per_key.len(), 6);
    for (key, seqs) in per_key {
        // write_outbox numbers 0..20 per call: five runs of 0..20 in order.
        let expected: Vec<usize> = (0..5).flat_map(|_| 0..20).collect();
        assert_eq!(seqs, expected, "order of key {key}");
    }
    eprintln!("two relays test took {:?}", t0.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_and_back_delays_ingress_and_relay_but_loses_nothing() -> TestResult {
    init_tracing();
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let mut broker = Broker::start()?;
    if !broker.can_restart() {
        eprintln!("KAFKA_BROKERS is set: skipping the restart test");
        return Ok(());
    }
    let topic_in = unique("in");
    let topic_out = unique("out");
    let dlq = unique("dlq");
    broker.create_topics(&[&topic_in, &topic_out, &dlq]).await?;
    let store = Store::new(db.pool.clone());
    let ingress = Ingress::start(
        store.clone(),
        ingress_config(&broker, &topic_in, &unique("ingress"), &dlq),
        enqueue(),
        CancellationToken::new(),
    )?;
    let relay = Relay::start(store, relay_config(&broker, 20), CancellationToken::new())?;

    let producer = broker.producer()?;
    // Before the outage everything goes to partition 0 and after it to
    // partitions 1 and 2 (the restart with load on every partition is
    // `kafka_apache.rs`'s).
    for i in 0..5 {
        produce(
            &producer,
            &topic_in,
            Some(0),
            &format!("k{i}"),
            Some(&format!("before{i}")),
            b"{}",
        )
        .await?;
    }
    // A poison message, so the dead-letter copier has published (and its
    // producer holds idempotence state) before the broker goes away.
    produce(
        &producer,
        &topic_in,
        Some(0),
        "p",
        Some("poison-before"),
        b"not json",
    )
    .await?;
    write_outbox(&db.pool, &topic_out, &["x", "y"], 3).await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE kind = 'ingested'",
        5,
        Duration::from_secs(60),
    )
    .await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM dead_letters WHERE copy_state = 'published'",
        1,
        Duration::from_secs(60),
    )
    .await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
        6,
        Duration::from_secs(60),
    )
    .await?;
    drop(producer);

    // Down: events written meanwhile stay in the outbox.
    broker.down();
    let mut tx = db.pool.begin().await?;
    for seq in 3..8 {
        for key in ["x", "y"] {
            let payload = format!("{key}:{seq}");
            outbox_insert_in(
                &mut tx,
                &NewOutboxEvent {
                    topic: &topic_out,
                    key: Some(key),
                    headers: None,
                    payload: payload.as_bytes(),
                },
            )
            .await?;
        }
    }
    tx.commit().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        )
        .await,
        10
    );

    // Back on the same port, with its log.
    broker.up()?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
        16,
        Duration::from_secs(90),
    )
    .await?;
    // After the restart: partitions 1 and 2, which the consumer had fetched
    // nothing from before it.
    let producer = broker.producer()?;
    produce(
        &producer,
        &topic_in,
        Some(1),
        "p",
        Some("poison-after"),
        b"not json either",
    )
    .await?;
    for i in 0..5 {
        produce(
            &producer,
            &topic_in,
            Some(1 + i % 2),
            &format!("k{i}"),
            Some(&format!("after{i}")),
            b"{}",
        )
        .await?;
    }
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE kind = 'ingested'",
        10,
        Duration::from_secs(90),
    )
    .await?;
    // The dead-letter copier works against the restarted broker too: both
    // letters recorded, and both copies accepted by a broker.
    wait_for(
        &db.pool,
        "SELECT count(*) FROM dead_letters WHERE copy_state = 'published'",
        2,
        Duration::from_secs(90),
    )
    .await?;
    ingress.shutdown().await?;
    relay.shutdown().await?;
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, 10);
    // The broker kept its log across the restart: both copies are on the
    // dead-letter topic.
    let dead = consume_all(&broker, &dlq, 2, Duration::from_secs(30)).await?;
    let dead_ids: HashSet<_> = dead.iter().filter_map(|d| d.id.clone()).collect();
    assert_eq!(
        dead_ids,
        HashSet::from(["poison-before".to_string(), "poison-after".to_string()])
    );

    // Everything written before the outage and while the broker was down
    // reached it, in key order.
    let seen = consume_all(&broker, &topic_out, 16, Duration::from_secs(30)).await?;
    let per_key = first_seen_per_key(&seen);
    for key in ["x", "y"] {
        assert_eq!(
            per_key.get(key),
            Some(&(0..8).collect::<Vec<_>>()),
            "order of key {key}: {per_key:?}"
        );
    }
    eprintln!("broker restart test took {:?}", t0.elapsed());
    Ok(())
}

/// Logs to the test's output when `RUST_LOG` asks for it.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Messages `m{i}` with body `{"n": i}` for `i` in `range`, spread over three
/// partitions, as `produce_many` takes them.
fn numbered_messages(range: std::ops::Range<usize>) -> Vec<(i32, String, String)> {
    range
        .map(|i| ((i % 3) as i32, format!("m{i}"), format!("{{\"n\":{i}}}")))
        .collect()
}

/// Produces every `(partition, id, payload)`, one delivery at a time, so
/// each message is its own record batch (`produce_batched` makes
/// multi-record batches).
async fn produce_many(
    producer: &FutureProducer,
    topic: &str,
    messages: &[(i32, String, String)],
) -> TestResult {
    for (p, id, payload) in messages {
        produce(producer, topic, Some(*p), id, Some(id), payload.as_bytes()).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_pauses_partitions_with_bounded_memory_and_everything_arrives_once_it_drains()
-> TestResult {
    init_tracing();
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let broker = Broker::start()?;
    let topic = unique("flood");
    broker.create_topics(&[&topic]).await?;
    const TOTAL: usize = 600;
    const LIMIT: i64 = 20;
    const BUFFER: usize = 8;
    let messages = numbered_messages(0..TOTAL);
    produce_many(&broker.producer()?, &topic, &messages).await?;

    let mut config = ingress_config(&broker, &topic, &unique("ingress"), "unused-dlq");
    config.max_backlog = LIMIT;
    config.partition_buffer = BUFFER;
    let handle = Ingress::start(
        Store::new(db.pool.clone()),
        config,
        enqueue(),
        CancellationToken::new(),
    )?;
    let stats = handle.stats();
    let available = "SELECT count(*) FROM jobs WHERE queue = 'q' AND state = 'available'";

    // No runner: the queue fills to the limit and the partitions pause.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(count(&db.pool, available).await >= LIMIT && stats.paused_partitions() == 3) {
        assert!(
            Instant::now() < deadline,
            "never saturated: {} available, {} paused, per partition {:?}",
            count(&db.pool, available).await,
            stats.paused_partitions(),
            sqlx::query_as::<_, (i32, i64)>(
                "SELECT \"partition\", count(*) FROM inbox GROUP BY 1 ORDER BY 1"
            )
            .fetch_all(&db.pool)
            .await?
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // While it stays full nothing more is applied and memory stays bounded.
    let saturated_at = count(&db.pool, "SELECT count(*) FROM inbox").await;
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(3) {
        assert!(count(&db.pool, available).await <= LIMIT);
        assert!(
            stats.buffered() <= 3 * BUFFER,
            "buffered {}",
            stats.buffered()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM inbox").await,
        saturated_at
    );
    assert!(
        saturated_at <= LIMIT,
        "{saturated_at} applied into a queue of {LIMIT}"
    );
    assert_eq!(stats.paused_partitions(), 3);

    // A "runner" drains the queue; ingestion resumes, never over the limit.
    let mut drained: u64 = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = count(&db.pool, available).await;
        assert!(n <= LIMIT, "{n} available jobs, limit {LIMIT}");
        assert!(
            stats.buffered() <= 3 * BUFFER,
            "buffered {}",
            stats.buffered()
        );
        drained += sqlx::query("DELETE FROM jobs WHERE queue = 'q' AND state = 'available'")
            .execute(&db.pool)
            .await?
            .rows_affected();
        if count(&db.pool, "SELECT count(*) FROM inbox").await == TOTAL as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "not all messages arrived");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    handle.shutdown().await?;
    drained += sqlx::query("DELETE FROM jobs WHERE queue = 'q'")
        .execute(&db.pool)
        .await?
        .rows_affected();
    assert_eq!(drained, TOTAL as u64, "one job per message");
    assert_eq!(
        count(&db.pool, "SELECT count(DISTINCT business_id) FROM inbox").await,
        TOTAL as i64
    );
    assert!(
        stats.max_partition_buffered() <= BUFFER,
        "a partition held {} messages",
        stats.max_partition_buffered()
    );
    assert!(stats.pauses() >= 3);
    assert_eq!(stats.applied(), TOTAL as u64);
    eprintln!(
        "backpressure test took {:?} ({} pauses)",
        t0.elapsed(),
        stats.pauses()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_joining_mid_stream_rebalances_without_loss_or_double_apply() -> TestResult {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let broker = Broker::start()?;
    let topic = unique("stream");
    let group = unique("ingress");
    broker.create_topics(&[&topic]).await?;
    let producer = broker.producer()?;
    let wave = |from: usize, to: usize| -> Vec<(i32, String, String)> {
        (from..to)
            .map(|i| ((i % 3) as i32, format!("m{i}"), format!("{{\"n\":{i}}}")))
            .collect()
    };
    produce_many(&producer, &topic, &wave(0, 300)).await?;

    // Small batches, so that the first consumer is mid-stream when the
    // second one joins.
    let config = || {
        let mut c = ingress_config(&broker, &topic, &group, "unused-dlq");
        c.partition_buffer = 4;
        c
    };
    let a = Ingress::start(
        Store::new(db.pool.clone()),
        config(),
        enqueue(),
        CancellationToken::new(),
    )?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM inbox",
        30,
        Duration::from_secs(60),
    )
    .await?;
    let b = Ingress::start(
        Store::new(db.pool.clone()),
        config(),
        enqueue(),
        CancellationToken::new(),
    )?;
    // More messages while the group rebalances and after.
    for w in 0..30 {
        produce_many(&producer, &topic, &wave(300 + w * 10, 310 + w * 10)).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for(
        &db.pool,
        "SELECT count(*) FROM inbox",
        600,
        Duration::from_secs(120),
    )
    .await?;
    let (sa, sb) = (a.stats(), b.stats());
    a.shutdown().await?;
    b.shutdown().await?;

    // Every message's effect exactly once.
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE kind = 'ingested'"
        )
        .await,
        600
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(DISTINCT args->>'n') FROM jobs WHERE kind = 'ingested'"
        )
        .await,
        600
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, 600);
    assert_eq!(sa.applied() + sb.applied(), 600);
    assert!(
        sb.applied() > 0,
        "the second consumer never got a partition"
    );
    // Both committed what they applied: the group is past every message.
    let committed = committed_offsets(&broker, &group, &topic)?;
    assert_eq!(
        committed.iter().sum::<i64>(),
        600,
        "committed {committed:?}"
    );
    eprintln!(
        "rebalance test took {:?} (a applied {}, b applied {}, duplicates {})",
        t0.elapsed(),
        sa.applied(),
        sb.applied(),
        sa.duplicates() + sb.duplicates()
    );
    Ok(())
}

/// Produces `messages` (partition, id, payload) the way real producers do:
/// every send queued at once with a long `linger.ms`, so librdkafka packs
/// each partition's messages into a few multi-record batches.
async fn produce_batched(
    broker: &Broker,
    topic: &str,
    messages: &[(i32, String, String)],
) -> TestResult {
    let producer: FutureProducer = broker
        .client()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "200")
        .create()?;
    let mut pending = Vec::new();
    for (p, id, payload) in messages {
        let record: FutureRecord<'_, str, str> = FutureRecord::to(topic)
            .partition(*p)
            .key(id.as_str())
            .payload(payload.as_str())
            .headers(OwnedHeaders::new().insert(Header {
                key: ID_HEADER,
                value: Some(id.as_str()),
            }));
        pending.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| e.to_string())?,
        );
    }
    for delivery in futures::future::join_all(pending).await {
        delivery?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Deletes available jobs of queue `q` (a "runner") until the inbox holds
/// `want` rows; returns how many jobs it deleted.
async fn drain_until(pool: &PgPool, want: i64, within: Duration) -> Result<u64, String> {
    let deadline = Instant::now() + within;
    let mut drained = 0;
    loop {
        drained += sqlx::query("DELETE FROM jobs WHERE queue = 'q' AND state = 'available'")
            .execute(pool)
            .await
            .map_err(|e| e.to_string())?
            .rows_affected();
        let n = count(pool, "SELECT count(*) FROM inbox").await;
        if n >= want {
            return Ok(drained);
        }
        if Instant::now() > deadline {
            return Err(format!("only {n} of {want} messages arrived"));
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Real producers put many records in one batch, and a consumer paused for
/// backpressure, or restarted from a committed offset, resumes in the middle
/// of one: the broker serves the whole batch and librdkafka drops the records
/// before the position. Nothing may be lost or applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_record_batches_survive_pauses_and_a_restart_mid_batch() -> TestResult {
    init_tracing();
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let broker = Broker::start()?;
    let topic = unique("batched");
    let group = unique("ingress");
    broker.create_topics(&[&topic]).await?;
    const TOTAL: usize = 900;
    let messages = numbered_messages(0..TOTAL);
    // Three waves: several batches per partition, so a position in the
    // middle of one has a later batch (skipped) or none (a stall).
    for wave in messages.chunks(TOTAL / 3) {
        produce_batched(&broker, &topic, wave).await?;
    }
    let config = || {
        let mut c = ingress_config(&broker, &topic, &group, "unused-dlq");
        // Tiny buffer and queue: partitions pause and resume mid-batch all the time.
        c.partition_buffer = 8;
        c.max_backlog = 20;
        c.lag_interval = Duration::from_millis(200);
        c
    };
    let first = Ingress::start(
        Store::new(db.pool.clone()),
        config(),
        enqueue(),
        CancellationToken::new(),
    )?;
    let mut drained = drain_until(&db.pool, 250, Duration::from_secs(120)).await?;
    let pauses = first.stats().pauses();
    first.shutdown().await?;
    // Its committed offsets are (almost surely) in the middle of batches.
    let committed = committed_offsets(&broker, &group, &topic)?;
    assert!(
        committed.iter().sum::<i64>() >= 1,
        "committed {committed:?}"
    );

    let second = Ingress::start(
        Store::new(db.pool.clone()),
        config(),
        enqueue(),
        CancellationToken::new(),
    )?;
    drained += drain_until(&db.pool, TOTAL as i64, Duration::from_secs(120)).await?;
    // Everything is in; the second consumer's offsets reach the end.
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed_offsets(&broker, &group, &topic)?
        .iter()
        .sum::<i64>()
        < TOTAL as i64
    {
        assert!(
            Instant::now() < deadline,
            "offsets never committed to the end"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = second.stats();
    second.shutdown().await?;
    drained += sqlx::query("DELETE FROM jobs WHERE queue = 'q'")
        .execute(&db.pool)
        .await?
        .rows_affected();
    assert_eq!(drained, TOTAL as u64, "one job per message");
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM inbox").await,
        TOTAL as i64
    );
    assert_eq!(
        count(&db.pool, "SELECT count(DISTINCT business_id) FROM inbox").await,
        TOTAL as i64
    );
    assert_eq!(
        committed_offsets(&broker, &group, &topic)?
            .iter()
            .sum::<i64>(),
        TOTAL as i64
    );
    assert!(pauses > 0, "the first consumer never paused");
    eprintln!(
        "batched test took {:?} (first consumer {pauses} pauses; second: {} pauses, {} duplicates)",
        t0.elapsed(),
        stats.pauses(),
        stats.duplicates()
    );
    Ok(())
}

/// `GET path` from 127.0.0.1:`port` (HTTP/1.0): the body, or `None` while
/// nothing answers.
async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw);
    text.starts_with("HTTP/1.1 200").then(|| {
        text.split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string()
    })
}

/// `ledgerflow_kafka_consumer_lag` of `group` and `topic` on the ops
/// endpoint's `/metrics`: partition -> lag.
async fn scrape_lag(port: u16, group: &str, topic: &str) -> Option<BTreeMap<i32, i64>> {
    let body = http_get(port, "/metrics").await?;
    let prefix =
        format!("ledgerflow_kafka_consumer_lag{{group=\"{group}\",topic=\"{topic}\",partition=\"");
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let (partition, value) = rest.split_once("\"} ")?;
        out.insert(partition.parse().ok()?, value.trim().parse().ok()?);
    }
    Some(out)
}

/// Polls `/metrics` until the lag of all 3 partitions satisfies `want`.
async fn wait_for_lag(
    port: u16,
    group: &str,
    topic: &str,
    want: impl Fn(&BTreeMap<i32, i64>) -> bool,
    what: &str,
) -> Result<BTreeMap<i32, i64>, String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(lag) = scrape_lag(port, group, topic).await {
            if lag.len() == 3 && want(&lag) {
                return Ok(lag);
            }
            last = Some(lag);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("consumer lag never {what}; last scraped {last:?}"))
}

/// Kills the child process when the test ends, pass or fail.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real `ledgerflow run --roles ingress` process exports its consumer
/// group's lag per partition on the ops endpoint's `/metrics`: messages
/// produced while it cannot consume (its queue is full) show up as lag, and
/// the lag drops to 0 once they are consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_is_on_the_ops_metrics_and_drops_to_zero_once_consumed() -> TestResult {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let broker = Broker::start()?;
    let topic = unique("lagging");
    let group = unique("ingress");
    broker.create_topics(&[&topic]).await?;
    const LIMIT: usize = 9;
    const LATER: usize = 45;
    let mut kafka = serde_json::json!({ "bootstrap-servers": broker.servers() });
    for (k, v) in broker.kafka().properties {
        kafka[k] = v.into();
    }
    let config = serde_json::json!({
        "kafka": kafka,
        "group-id": group,
        "topics": [{ "name": topic, "handler": "enqueue:q:ingested", "queue": "q" }],
        "dead-letter-topic": "unused-dlq",
        "max-backlog": LIMIT,
        "commit-interval-ms": 200,
        "lag-interval-ms": 200,
    });
    let free_port =
        || -> std::io::Result<u16> { Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
    let ops = free_port()?;
    let _child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_ledgerflow"))
            .args(["run", "--roles", "ingress"])
            .arg(format!("--ops-addr=127.0.0.1:{ops}"))
            .arg(format!("--api-addr=127.0.0.1:{}", free_port()?))
            .arg(format!("--admin-addr=127.0.0.1:{}", free_port()?))
            .env("DATABASE_URL", &db.url)
            .env("LEDGERFLOW_INGRESS_CONFIG", config.to_string())
            .env_remove("KAFKA_BROKERS")
            .env_remove("LEDGERFLOW_EXCHANGE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );

    // Assigned, nothing produced: no lag.
    wait_for_lag(
        ops,
        &group,
        &topic,
        |l| l.values().all(|&n| n == 0),
        "0 at the start",
    )
    .await?;

    // The first messages fill the queue (no runner drains it) ...
    let producer = broker.producer()?;
    produce_many(&producer, &topic, &numbered_messages(0..LIMIT)).await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM inbox",
        LIMIT as i64,
        Duration::from_secs(60),
    )
    .await?;
    // ... so what is produced now waits in Kafka: exactly that is the lag.
    produce_many(&producer, &topic, &numbered_messages(LIMIT..LIMIT + LATER)).await?;
    let lag = wait_for_lag(
        ops,
        &group,
        &topic,
        |l| l.values().sum::<i64>() == LATER as i64,
        "the messages produced while the queue was full",
    )
    .await?;
    assert_eq!(lag.values().filter(|&&n| n > 0).count(), 3, "lag {lag:?}");
    // The same lag reaches Postgres, for the API's /metrics.
    let recorded = format!(
        "SELECT coalesce(sum(lag), 0)::bigint FROM kafka_consumer_lag WHERE consumer_group = '{group}'"
    );
    wait_for(&db.pool, &recorded, LATER as i64, Duration::from_secs(60)).await?;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM inbox").await,
        LIMIT as i64
    );

    // A "runner" drains the queue: everything is consumed, the lag drops to 0.
    drain_until(&db.pool, (LIMIT + LATER) as i64, Duration::from_secs(120)).await?;
    wait_for_lag(
        ops,
        &group,
        &topic,
        |l| l.values().all(|&n| n == 0),
        "back to 0",
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = sqlx::query_scalar(&recorded).fetch_one(&db.pool).await?;
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the recorded lag stayed at {left}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        count(&db.pool, "SELECT count(DISTINCT business_id) FROM inbox").await,
        (LIMIT + LATER) as i64
    );
    // The dead-letter counters are exported next to the lag (none here).
    let metrics = http_get(ops, "/metrics").await.ok_or("metrics answered")?;
    for line in [
        "ledgerflow_dead_letters_recorded_total 0",
        "ledgerflow_dead_letter_copies_published_total 0",
        "ledgerflow_dead_letter_copy_failures_total 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    eprintln!("consumer lag test took {:?}", t0.elapsed());
    Ok(())
}
