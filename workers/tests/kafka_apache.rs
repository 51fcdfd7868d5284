//! What only a real Kafka broker shows, against Apache Kafka and a real Postgres: offsets
//! with gaps (transaction markers, aborted transactions, compaction), a cooperative-sticky
//! group of `ledgerflow` processes losing one to `kill -9` and gaining one, a broker stopped
//! for 30 s under load and restarted with its log, the relay's per-key order across a relay
//! `kill -9` and a broker `kill -9`, and consumer lag against the broker's own ListOffsets.
//!
//! Every test starts its own broker (`Broker::own`, even when `KAFKA_BROKERS` is set): they
//! stop and restart it, and they need the topic and group settings this file gives them.
#[path = "common/broker.rs"]
mod broker;
mod common;
use broker::{Broker, consume_all, enqueue, ingress_config, unique};
use common::{count, wait_for};
use ledgerflow_engine::Store;
use ledgerflow_engine::outbox::{NewOutboxEvent, outbox_insert_in};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_workers::ingress::Ingress;
use ledgerflow_workers::kafka::{ID_HEADER, RelayConfig, TopicConfig};
use ledgerflow_workers::relay::Relay;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ------------------------------------------------------------------- utils

/// Logs to the test's output when `RUST_LOG` asks for it.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn record<'a>(
    topic: &'a str,
    partition: i32,
    key: &'a str,
    id: &'a str,
    payload: &'a str,
) -> FutureRecord<'a, str, str> {
    FutureRecord::to(topic)
        .partition(partition)
        .key(key)
        .payload(payload)
        .headers(OwnedHeaders::new().insert(Header {
            key: ID_HEADER,
            value: Some(id),
        }))
}

/// Sends every `(partition, key, id)` at once (so librdkafka packs them into multi-record
/// batches) with payload `{"id": ...}`, and waits for every delivery.
async fn send_all(
    producer: &FutureProducer,
    topic: &str,
    messages: &[(i32, String, String)],
) -> TestResult {
    let mut pending = Vec::new();
    for (p, key, id) in messages {
        let payload = format!("{{\"id\":\"{id}\"}}");
        pending.push(
            producer
                .send_result(record(topic, *p, key, id, &payload))
                .map_err(|(e, _)| e.to_string())?,
        );
    }
    for delivery in futures::future::join_all(pending).await {
        delivery?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// The broker's high watermark of each partition of `topic` (ListOffsets).
fn high_watermarks(broker: &Broker, topic: &str, partitions: i32) -> Result<Vec<i64>, BoxError> {
    let consumer: BaseConsumer = broker.client().create()?;
    (0..partitions)
        .map(|p| {
            Ok(consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))?
                .1)
        })
        .collect()
}

/// The offsets `group` committed for each partition of `topic` (-1: none).
fn committed_offsets(
    broker: &Broker,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Result<Vec<i64>, BoxError> {
    let consumer: BaseConsumer = broker.client().set("group.id", group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
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

/// Waits until `group` has committed the high watermark of every partition of `topic`:
/// nothing left to consume, no partition behind.
async fn wait_committed_to_the_end(
    broker: &Broker,
    group: &str,
    topic: &str,
    partitions: i32,
    within: Duration,
) -> Result<Vec<i64>, BoxError> {
    let deadline = Instant::now() + within;
    loop {
        let high = high_watermarks(broker, topic, partitions)?;
        let committed = committed_offsets(broker, group, topic, partitions)?;
        if committed == high {
            return Ok(committed);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "group {group} committed {committed:?} of {topic}, high watermarks {high:?}"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every record of `topic` a `read_committed` consumer gets from the beginning:
/// (partition, offset). Reads until each partition's position reached its high
/// watermark, or nothing arrived for 3 s.
fn read_records(
    broker: &Broker,
    topic: &str,
    partitions: i32,
) -> Result<BTreeSet<(i32, i64)>, BoxError> {
    let consumer: BaseConsumer = broker
        .client()
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let high = high_watermarks(broker, topic, partitions)?;
    let mut next = vec![0i64; partitions as usize];
    let mut out = BTreeSet::new();
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(3) && next.iter().zip(&high).any(|(n, h)| n < h) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last = Instant::now();
                out.insert((m.partition(), m.offset()));
                next[m.partition() as usize] = m.offset() + 1;
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    Ok(out)
}

/// The (partition, offset) of every inbox row of `topic`.
async fn inbox_offsets(pool: &PgPool, topic: &str) -> Result<BTreeSet<(i32, i64)>, BoxError> {
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("SELECT \"partition\", \"offset\" FROM inbox WHERE topic = $1")
            .bind(topic)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `ledgerflow run` child process, killed (SIGKILL) when dropped.
struct Process {
    child: Child,
    ops: u16,
}

impl Process {
    /// `ledgerflow run --roles <roles>` on the test's database with `env`, its log in
    /// `$CARGO_TARGET_TMPDIR/kafka_apache/<name>.log`.
    fn spawn(
        name: &str,
        roles: &str,
        db: &TestDb,
        env: &[(&str, String)],
    ) -> Result<Self, BoxError> {
        let logs = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kafka_apache");
        std::fs::create_dir_all(&logs)?;
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        let ops = free_port()?;
        let child = Command::new(env!("CARGO_BIN_EXE_ledgerflow"))
            .args(["run", "--roles", roles])
            .arg(format!("--ops-addr=127.0.0.1:{ops}"))
            .arg(format!("--api-addr=127.0.0.1:{}", free_port()?))
            .arg(format!("--admin-addr=127.0.0.1:{}", free_port()?))
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env_remove("KAFKA_BROKERS")
            .env_remove("LEDGERFLOW_EXCHANGE_URL")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Self { child, ops })
    }

    /// SIGKILL, and reap it.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `GET /metrics` of an ops endpoint (HTTP/1.0), or `None` while nothing answers.
async fn metrics(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
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

/// partition -> `ledgerflow_kafka_consumer_lag` of `group`/`topic` on one process' `/metrics`.
async fn scrape_lag(port: u16, group: &str, topic: &str) -> Option<BTreeMap<i32, i64>> {
    let body = metrics(port).await?;
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

// ------------------------------------------------------------------- tests

/// Real Kafka leaves offsets no consumer ever gets: the marker that ends each
/// transaction, every record of an aborted transaction (a `read_committed` consumer skips
/// them), and the older values compaction removed. The ingress takes what the broker
/// serves, in order, without fetching anything twice; every committed record is applied
/// exactly once, nothing aborted is; and its committed offsets reach the high watermark
/// (past the last marker), so no lag is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_with_gaps_from_transactions_and_compaction_are_consumed_without_rewinding_or_loss()
-> TestResult {
    init_tracing();
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let broker = Broker::own()?;
    let txn_topic = unique("txn");
    let compacted = unique("compacted");
    broker.create_topics(&[&txn_topic]).await?;
    // A segment rolls every 100 ms (at the next write), and the cleaner compacts whatever
    // is dirty: closed segments lose every value but each key's last.
    broker
        .create_topics_with(
            &[&compacted],
            3,
            &[
                ("cleanup.policy", "compact"),
                ("segment.ms", "100"),
                ("min.cleanable.dirty.ratio", "0.01"),
                ("min.compaction.lag.ms", "0"),
                ("delete.retention.ms", "100"),
            ],
        )
        .await?;

    // Compacted topic: 8 keys per partition, 12 values each, one round per segment.
    const KEYS: usize = 8;
    const ROUNDS: usize = 12;
    let plain = broker.producer()?;
    for round in 0..ROUNDS {
        let wave: Vec<(i32, String, String)> = (0..3 * KEYS)
            .map(|k| {
                (
                    (k % 3) as i32,
                    format!("key{k}"),
                    format!("c-key{k}-r{round}"),
                )
            })
            .collect();
        send_all(&plain, &compacted, &wave).await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Rolls the last round's segment too.
    send_all(&plain, &compacted, &[(0, "roll".into(), "c-roll".into())]).await?;
    let produced_compacted = (ROUNDS * 3 * KEYS + 1) as i64;
    let deadline = Instant::now() + Duration::from_secs(90);
    let before = loop {
        let records = read_records(&broker, &compacted, 3)?;
        // Compacted once most of the older values are gone.
        if (records.len() as i64) < produced_compacted / 2 {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "the cleaner never compacted {compacted}: {} of {produced_compacted} records left",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // Transactional topic: 12 transactions of 3 records per partition; every third is
    // aborted. Each transaction leaves a marker in each partition it wrote.
    let txn: FutureProducer = broker
        .client()
        .set("transactional.id", unique("txn-producer"))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    txn.init_transactions(Duration::from_secs(30))?;
    let mut committed_ids = BTreeSet::new();
    let mut aborted_ids = BTreeSet::new();
    for t in 0..12 {
        txn.begin_transaction()?;
        let wave: Vec<(i32, String, String)> = (0..9i32)
            .map(|i| (i % 3, format!("k{i}"), format!("t{t}-{i}")))
            .collect();
        send_all(&txn, &txn_topic, &wave).await?;
        let ids = wave.into_iter().map(|(_, _, id)| id);
        if t % 3 == 2 {
            txn.abort_transaction(Duration::from_secs(30))?;
            aborted_ids.extend(ids);
        } else {
            txn.commit_transaction(Duration::from_secs(30))?;
            committed_ids.extend(ids);
        }
    }
    let txn_high = high_watermarks(&broker, &txn_topic, 3)?;
    assert_eq!(
        txn_high.iter().sum::<i64>(),
        12 * 9 + 12 * 3,
        "every record and one marker per transaction and partition"
    );

    let group = unique("ingress");
    let mut config = ingress_config(&broker, &txn_topic, &group, "unused-dlq");
    config.topics.push(TopicConfig {
        name: compacted.clone(),
        handler: "enqueue".to_string(),
        business_id: Default::default(),
        queue: Some("q".to_string()),
    });
    config.lag_interval = Duration::from_millis(200);
    // Small batches, so that batches end at and next to the gaps.
    config.partition_buffer = 4;
    let handle = Ingress::start(
        Store::new(db.pool.clone()),
        config,
        enqueue(),
        CancellationToken::new(),
    )?;
    let stats = handle.stats();
    wait_for(
        &db.pool,
        &format!("SELECT count(*) FROM inbox WHERE topic = '{txn_topic}'"),
        committed_ids.len() as i64,
        Duration::from_secs(60),
    )
    .await?;
    wait_committed_to_the_end(&broker, &group, &txn_topic, 3, Duration::from_secs(60)).await?;
    wait_committed_to_the_end(&broker, &group, &compacted, 3, Duration::from_secs(60)).await?;
    // The lag the ingress reports drops to 0 too (past the last marker).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lag = stats.consumer_lag();
        if lag.len() == 6 && lag.iter().all(|l| l.lag == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "lag stayed at {lag:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    handle.shutdown().await?;

    // Exactly the committed transactions' records, once each.
    let applied: BTreeSet<String> =
        sqlx::query_scalar("SELECT business_id FROM inbox WHERE topic = $1")
            .bind(&txn_topic)
            .fetch_all(&db.pool)
            .await?
            .into_iter()
            .collect();
    assert_eq!(applied, committed_ids, "aborted: {aborted_ids:?}");
    // The compacted topic: whatever was still there when the ingress read it; so at
    // least what is there now and at most what was there before, and every key's last
    // value (the cleaner never removes it).
    let after = read_records(&broker, &compacted, 3)?;
    let consumed = inbox_offsets(&db.pool, &compacted).await?;
    assert!(
        after.is_subset(&consumed),
        "lost: {:?}",
        after.difference(&consumed)
    );
    assert!(
        consumed.is_subset(&before),
        "never there: {:?}",
        consumed.difference(&before)
    );
    let last_values: BTreeSet<String> = (0..3 * KEYS)
        .map(|k| format!("c-key{k}-r{}", ROUNDS - 1))
        .chain(["c-roll".to_string()])
        .collect();
    let applied_compacted: BTreeSet<String> =
        sqlx::query_scalar("SELECT business_id FROM inbox WHERE topic = $1")
            .bind(&compacted)
            .fetch_all(&db.pool)
            .await?
            .into_iter()
            .collect();
    assert!(
        last_values.is_subset(&applied_compacted),
        "last values missing: {:?}",
        last_values.difference(&applied_compacted)
    );
    // One job per inbox row: nothing applied twice.
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE kind = 'ingested'"
        )
        .await,
        count(&db.pool, "SELECT count(*) FROM inbox").await
    );
    // Nothing was handed over twice (a re-fetch would have been an inbox duplicate).
    assert_eq!(stats.duplicates(), 0, "a record was fetched twice");
    eprintln!(
        "gaps test took {:?}: {} transactional records applied ({} aborted skipped), \
         {} of {produced_compacted} compacted records left and applied",
        t0.elapsed(),
        committed_ids.len(),
        aborted_ids.len(),
        consumed.len()
    );
    Ok(())
}

/// The lag the ingress reports equals what the broker's ListOffsets says and what the
/// test produced: messages produced (in multi-record batches) while the ingress cannot
/// apply them (its queue is full) are exactly the lag, partition by partition; once a
/// runner drains the queue it drops to 0 and the committed offsets are the high
/// watermarks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_equals_the_brokers_list_offsets_and_what_was_produced() -> TestResult {
    init_tracing();
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let broker = Broker::own()?;
    let topic = unique("lag");
    let group = unique("ingress");
    broker.create_topics(&[&topic]).await?;
    const LIMIT: i64 = 12;
    let mut config = ingress_config(&broker, &topic, &group, "unused-dlq");
    config.max_backlog = LIMIT;
    config.lag_interval = Duration::from_millis(100);
    let handle = Ingress::start(
        Store::new(db.pool.clone()),
        config,
        enqueue(),
        CancellationToken::new(),
    )?;
    let stats = handle.stats();
    let producer = broker.producer()?;
    let messages = |from: usize, to: usize| -> Vec<(i32, String, String)> {
        (from..to)
            .map(|i| ((i % 3) as i32, format!("k{i}"), format!("m{i}")))
            .collect()
    };
    // Fill the queue: the ingress can apply no more.
    send_all(&producer, &topic, &messages(0, LIMIT as usize)).await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM inbox",
        LIMIT,
        Duration::from_secs(60),
    )
    .await?;
    // Unequal shares per partition, so a mix-up between partitions shows.
    let later: Vec<(i32, String, String)> = (0..300)
        .map(|i| {
            (
                [0, 0, 0, 1, 1, 2][i % 6],
                format!("k{i}"),
                format!("later{i}"),
            )
        })
        .collect();
    send_all(&producer, &topic, &later).await?;
    let produced: Vec<i64> = (0..3)
        .map(|p| {
            (messages(0, LIMIT as usize).iter().chain(&later))
                .filter(|(q, _, _)| *q == p)
                .count() as i64
        })
        .collect();
    assert_eq!(high_watermarks(&broker, &topic, 3)?, produced);
    let applied: BTreeMap<i32, i64> =
        sqlx::query_as::<_, (i32, i64)>("SELECT \"partition\", count(*) FROM inbox GROUP BY 1")
            .fetch_all(&db.pool)
            .await?
            .into_iter()
            .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lag = stats.consumer_lag();
        let exact = lag.len() == 3
            && lag.iter().all(|l| {
                let p = l.partition as usize;
                l.high_watermark == produced[p]
                    && l.lag == produced[p] - applied.get(&l.partition).copied().unwrap_or(0)
            });
        if exact {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lag {lag:?}; produced {produced:?}, applied {applied:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, LIMIT);

    // A runner drains the queue: everything arrives, the lag drops to 0.
    let total = LIMIT + later.len() as i64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&db.pool, "SELECT count(*) FROM inbox").await < total {
        sqlx::query("DELETE FROM jobs WHERE queue = 'q' AND state = 'available'")
            .execute(&db.pool)
            .await?;
        assert!(Instant::now() < deadline, "not everything arrived");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let committed =
        wait_committed_to_the_end(&broker, &group, &topic, 3, Duration::from_secs(60)).await?;
    assert_eq!(committed, produced);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stats.consumer_lag().iter().all(|l| l.lag == 0) {
        assert!(Instant::now() < deadline, "lag {:?}", stats.consumer_lag());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    handle.shutdown().await?;
    assert_eq!(
        count(&db.pool, "SELECT count(DISTINCT business_id) FROM inbox").await,
        total
    );
    eprintln!("lag test took {:?}", t0.elapsed());
    Ok(())
}

/// The JSON `kafka` block of a `ledgerflow` process' ingress or relay config: the test
/// broker's client settings plus `extra`.
fn kafka_json(broker: &Broker, extra: &[(&str, &str)]) -> serde_json::Value {
    let mut kafka = serde_json::json!({ "bootstrap-servers": broker.servers() });
    for (k, v) in broker.kafka().properties {
        kafka[k] = v.into();
    }
    for (k, v) in extra {
        kafka[*k] = (*v).into();
    }
    kafka
}

/// Sends `n` messages `{prefix}{i}` round-robin over `partitions` partitions, in waves of
/// 200 (multi-record batches) with `pause` between waves.
async fn produce_waves(
    producer: &FutureProducer,
    topic: &str,
    partitions: i32,
    prefix: &str,
    n: usize,
    pause: Duration,
) -> TestResult {
    let ids: Vec<(i32, String, String)> = (0..n)
        .map(|i| {
            (
                (i as i32) % partitions,
                format!("k{i}"),
                format!("{prefix}{i}"),
            )
        })
        .collect();
    for wave in ids.chunks(200) {
        send_all(producer, topic, wave).await?;
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

/// Three `ledgerflow run --roles ingress` processes share a consumer group with the
/// cooperative-sticky assignor. One (which never commits offsets on its own) is killed with
/// SIGKILL while messages stream in and batches are being applied, holding applied but
/// uncommitted messages; a fourth joins later. Every message's effect exists exactly
/// once, every partition is consumed to its end (committed offset = high watermark), the
/// newcomer got partitions, and the lag the survivors export drops to 0 on all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooperative_group_of_three_processes_survives_a_kill_9_and_a_newcomer_with_every_message_once()
-> TestResult {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let broker = Broker::own()?;
    let topic = unique("group");
    let group = unique("ingress");
    const PARTITIONS: i32 = 6;
    const WAVE: usize = 3000;
    broker
        .create_topics_with(&[&topic], PARTITIONS, &[])
        .await?;
    let config = |commit_interval_ms: u64| {
        let config = serde_json::json!({
            "kafka": kafka_json(&broker, &[("partition.assignment.strategy", "cooperative-sticky")]),
            "group-id": group,
            "topics": [{ "name": topic, "handler": "enqueue:q:ingested", "queue": "q" }],
            "dead-letter-topic": "unused-dlq",
            "max-backlog": 1_000_000,
            "commit-interval-ms": commit_interval_ms,
            "lag-interval-ms": 200,
        });
        [("LEDGERFLOW_INGRESS_CONFIG", config.to_string())]
    };
    let env = config(200);
    // a never commits on its own: whatever it applied is uncommitted when it dies.
    let mut a = Process::spawn("group-a", "ingress", &db, &config(3_600_000))?;
    let b = Process::spawn("group-b", "ingress", &db, &env)?;
    let c = Process::spawn("group-c", "ingress", &db, &env)?;
    // All three joined: each reports the lag of the partitions it was given.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut assigned = BTreeSet::new();
        let mut each = true;
        for p in [&a, &b, &c] {
            let lag = scrape_lag(p.ops, &group, &topic).await.unwrap_or_default();
            each &= !lag.is_empty();
            assigned.extend(lag.into_keys());
        }
        if each && assigned.len() == PARTITIONS as usize {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group never formed: {assigned:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let producer = broker.producer()?;
    // The first wave streams in over a few seconds; a dies a third of the way through it,
    // with batches in flight (stored offsets not committed yet: its commit interval is
    // 200 ms, a batch takes less).
    let streaming = {
        let (producer, topic) = (producer.clone(), topic.clone());
        tokio::spawn(async move {
            produce_waves(
                &producer,
                &topic,
                PARTITIONS,
                "a",
                WAVE,
                Duration::from_millis(200),
            )
            .await
            .map_err(|e| e.to_string())
        })
    };
    wait_for(
        &db.pool,
        "SELECT count(*) FROM inbox",
        (WAVE / 3) as i64,
        Duration::from_secs(60),
    )
    .await?;
    let a_owns: BTreeSet<i32> = scrape_lag(a.ops, &group, &topic)
        .await
        .unwrap_or_default()
        .into_keys()
        .collect();
    a.kill9();
    let at_kill = count(&db.pool, "SELECT count(*) FROM inbox").await;
    // a died holding applied messages whose offsets it never committed: whoever owns its
    // partitions next gets them again, and the inbox must skip them.
    let committed_at_kill = committed_offsets(&broker, &group, &topic, PARTITIONS)?;
    let applied_by_a: i64 =
        sqlx::query_scalar("SELECT count(*) FROM inbox WHERE \"partition\" = ANY($1)")
            .bind(a_owns.iter().copied().collect::<Vec<i32>>())
            .fetch_one(&db.pool)
            .await?;
    assert!(!a_owns.is_empty(), "a owned no partition");
    assert!(applied_by_a > 0, "a applied nothing before it was killed");
    for p in &a_owns {
        assert!(
            committed_at_kill[*p as usize] <= 0,
            "a committed partition {p}: {committed_at_kill:?}"
        );
    }
    streaming.await??;
    // More while the group notices (session timeout) and moves a's partitions.
    produce_waves(
        &producer,
        &topic,
        PARTITIONS,
        "b",
        WAVE,
        Duration::from_millis(100),
    )
    .await?;
    let d = Process::spawn("group-d", "ingress", &db, &env)?;
    produce_waves(
        &producer,
        &topic,
        PARTITIONS,
        "c",
        WAVE,
        Duration::from_millis(100),
    )
    .await?;

    let total = 3 * WAVE as i64;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM inbox",
        total,
        Duration::from_secs(180),
    )
    .await?;
    let committed =
        wait_committed_to_the_end(&broker, &group, &topic, PARTITIONS, Duration::from_secs(60))
            .await?;
    // Lag 0 everywhere, every partition owned by a survivor or the newcomer, which has some.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut lags = BTreeMap::new();
        let mut newcomer = 0;
        for (i, p) in [&b, &c, &d].into_iter().enumerate() {
            let lag = scrape_lag(p.ops, &group, &topic).await.unwrap_or_default();
            if i == 2 {
                newcomer = lag.len();
            }
            lags.extend(lag);
        }
        if lags.len() == PARTITIONS as usize && lags.values().all(|&l| l == 0) && newcomer > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lag {lags:?}, newcomer owns {newcomer} partitions"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Exactly once: one inbox row and one job per message, per partition all of it.
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE kind = 'ingested'"
        )
        .await,
        total
    );
    assert_eq!(
        count(&db.pool, "SELECT count(DISTINCT business_id) FROM inbox").await,
        total
    );
    let per_partition: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM inbox GROUP BY \"partition\" ORDER BY \"partition\"",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(per_partition, committed, "partition by partition");
    eprintln!(
        "group test took {:?} (a killed owning partitions {a_owns:?} with {applied_by_a} of \
         their messages applied and none committed; {at_kill} applied in all; at the end \
         committed {committed:?})",
        t0.elapsed()
    );
    drop((b, c, d));
    Ok(())
}

fn relay_config(broker: &Broker) -> RelayConfig {
    let mut c = RelayConfig::new(broker.kafka());
    c.batch_size = 20;
    c.poll_interval = Duration::from_millis(50);
    c.retry_backoff = Duration::from_millis(100);
    c.max_backoff = Duration::from_millis(1000);
    c.delivery_timeout = Duration::from_secs(5);
    c
}

/// Writes outbox events `{key}:{seq}` for `keys`, one per key every `every`, until `stop`;
/// returns how many it wrote per key.
fn write_outbox_until(
    pool: PgPool,
    topic: String,
    keys: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<usize, String>> {
    tokio::spawn(async move {
        let mut seq = 0;
        while !stop.load(Ordering::SeqCst) {
            let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
            for k in 0..keys {
                let key = format!("key{k}");
                let payload = format!("{key}:{seq}");
                outbox_insert_in(
                    &mut tx,
                    &NewOutboxEvent {
                        topic: &topic,
                        key: Some(&key),
                        headers: None,
                        payload: payload.as_bytes(),
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            }
            tx.commit().await.map_err(|e| e.to_string())?;
            seq += 1;
            tokio::time::sleep(every).await;
        }
        Ok(seq)
    })
}

/// Per key, the sequence numbers in the order first seen on the topic (a copy published
/// twice carries the same id and is skipped), and how many copies were duplicates.
fn first_seen_per_key(seen: &[broker::Seen]) -> (BTreeMap<String, Vec<usize>>, usize) {
    let mut ids = HashSet::new();
    let mut duplicates = 0;
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for s in seen {
        if let Some(id) = &s.id
            && !ids.insert(id.clone())
        {
            duplicates += 1;
            continue;
        }
        let text = String::from_utf8_lossy(&s.payload);
        if let Some((key, seq)) = text.split_once(':')
            && let Ok(seq) = seq.parse()
        {
            out.entry(key.to_string()).or_default().push(seq);
        }
    }
    (out, duplicates)
}

/// Asserts that every key of `per_key` holds exactly 0..`per_key_written`, in order.
fn assert_in_order(per_key: &BTreeMap<String, Vec<usize>>, keys: usize, written: usize) {
    assert_eq!(per_key.len(), keys, "keys seen: {:?}", per_key.keys());
    for (key, seqs) in per_key {
        let want: Vec<usize> = (0..written).collect();
        if seqs != &want {
            let first_bad = seqs.iter().zip(&want).position(|(a, b)| a != b);
            panic!(
                "key {key}: {} of {written} events, first out of place at {first_bad:?}: {:?}",
                seqs.len(),
                &seqs[first_bad.unwrap_or(0).saturating_sub(3)
                    ..seqs.len().min(first_bad.unwrap_or(0) + 5)]
            );
        }
    }
}

/// The broker stops (SIGTERM) for 30 s while messages stream in and outbox events are
/// written, and starts again with its log. The ingress and the relay were never restarted:
/// they resume on their own. Every message produced is applied exactly once, every event
/// is on the topic in key order, and what was published before the outage is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopped_for_30_s_under_load_and_restarted_with_its_log_loses_and_duplicates_nothing()
-> TestResult {
    init_tracing();
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let mut broker = Broker::own()?;
    let topic_in = unique("in");
    let topic_out = unique("out");
    broker.create_topics(&[&topic_in, &topic_out]).await?;
    let store = Store::new(db.pool.clone());
    let ingress = Ingress::start(
        store.clone(),
        ingress_config(&broker, &topic_in, &unique("ingress"), "unused-dlq"),
        enqueue(),
        CancellationToken::new(),
    )?;
    let relay = Relay::start(store, relay_config(&broker), CancellationToken::new())?;

    // Load: a producer queues a message every 10 ms (librdkafka keeps them while the
    // broker is away: message.timeout.ms 120 s), and 4 outbox events every 40 ms.
    let stop = Arc::new(AtomicBool::new(false));
    const KEYS: usize = 4;
    let writer = write_outbox_until(
        db.pool.clone(),
        topic_out.clone(),
        KEYS,
        Duration::from_millis(40),
        stop.clone(),
    );
    let producer: FutureProducer = broker
        .producer_config()
        .set("message.timeout.ms", "120000")
        .create()?;
    let produced = Arc::new(AtomicUsize::new(0));
    let sending = {
        let (stop, produced, topic) = (stop.clone(), produced.clone(), topic_in.clone());
        tokio::spawn(async move {
            let mut pending = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let i = produced.fetch_add(1, Ordering::SeqCst);
                let (key, id) = (format!("k{i}"), format!("m{i}"));
                let payload = format!("{{\"n\":{i}}}");
                match producer.send_result(record(&topic, (i % 3) as i32, &key, &id, &payload)) {
                    Ok(delivery) => pending.push(delivery),
                    Err((e, _)) => return Err(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for delivery in futures::future::join_all(pending).await {
                match delivery {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => return Err(e.to_string()),
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(())
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let applied_before = count(&db.pool, "SELECT count(*) FROM inbox").await;
    let published_before = count(
        &db.pool,
        "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
    )
    .await;
    assert!(
        applied_before > 0 && published_before > 0,
        "no load before the outage"
    );

    broker.stop();
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    broker.up()?;
    let down_for = stopped.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    sending.await??;
    let seqs = writer.await??;
    let produced = produced.load(Ordering::SeqCst) as i64;

    // Everything arrives, through the same ingress and relay.
    wait_for(
        &db.pool,
        "SELECT count(*) FROM inbox",
        produced,
        Duration::from_secs(120),
    )
    .await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
        (seqs * KEYS) as i64,
        Duration::from_secs(120),
    )
    .await?;
    let is = ingress.stats();
    ingress.shutdown().await?;
    relay.shutdown().await?;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM inbox").await,
        produced
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE kind = 'ingested'"
        )
        .await,
        produced,
        "one effect per message"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(DISTINCT business_id) FROM inbox").await,
        produced
    );
    let seen = consume_all(&broker, &topic_out, seqs * KEYS, Duration::from_secs(60)).await?;
    let (per_key, duplicates) = first_seen_per_key(&seen);
    assert_in_order(&per_key, KEYS, seqs);
    eprintln!(
        "broker outage test took {:?}: broker down {down_for:?}; {produced} messages applied \
         once ({} inbox duplicates skipped), {} events in key order ({duplicates} published twice)",
        t0.elapsed(),
        is.duplicates(),
        seqs * KEYS
    );
    Ok(())
}

/// The relay's producer (`acks=all`, idempotence) keeps each key's order through a relay
/// process killed with SIGKILL (another one takes over) and the broker killed with SIGKILL
/// and restarted with its log: a consumer of the topic sees every event, and per key in the
/// order written (duplicates of an unmarked batch carry the same id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_order_per_key_survives_a_relay_kill_9_and_a_broker_kill_9() -> TestResult {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let mut broker = Broker::own()?;
    let topic = unique("events");
    broker.create_topics(&[&topic]).await?;
    let config = serde_json::json!({
        "kafka": kafka_json(&broker, &[]),
        "batch-size": 20,
        "poll-interval-ms": 50,
        "retry-backoff-ms": 100,
        "max-backoff-ms": 1000,
        "delivery-timeout-ms": 5000,
    });
    let env = [("LEDGERFLOW_RELAY_CONFIG", config.to_string())];
    const KEYS: usize = 8;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_outbox_until(
        db.pool.clone(),
        topic.clone(),
        KEYS,
        Duration::from_millis(20),
        stop.clone(),
    );
    let published = "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL";
    let mut first = Process::spawn("relay-a", "relay", &db, &env)?;
    wait_for(&db.pool, published, 300, Duration::from_secs(60)).await?;
    first.kill9();
    let at_kill = count(&db.pool, published).await;
    let second = Process::spawn("relay-b", "relay", &db, &env)?;
    wait_for(&db.pool, published, at_kill + 300, Duration::from_secs(60)).await?;
    broker.down();
    let at_broker_kill = count(&db.pool, published).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    broker.up()?;
    wait_for(
        &db.pool,
        published,
        at_broker_kill + 300,
        Duration::from_secs(90),
    )
    .await?;
    stop.store(true, Ordering::SeqCst);
    let seqs = writer.await??;
    wait_for(
        &db.pool,
        published,
        (seqs * KEYS) as i64,
        Duration::from_secs(90),
    )
    .await?;
    drop(second);

    let seen = consume_all(&broker, &topic, seqs * KEYS, Duration::from_secs(60)).await?;
    let (per_key, duplicates) = first_seen_per_key(&seen);
    assert_in_order(&per_key, KEYS, seqs);
    eprintln!(
        "relay order test took {:?}: {} events of {KEYS} keys in order ({duplicates} \
         published twice; relay killed at {at_kill}, broker at {at_broker_kill})",
        t0.elapsed(),
        seqs * KEYS
    );
    Ok(())
}
