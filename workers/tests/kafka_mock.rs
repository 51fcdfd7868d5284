//! Kafka faults a real broker cannot produce on demand, on librdkafka's
//! in-process mock cluster (`rdkafka::mocking::MockCluster`, the real
//! protocol with fault injection) and a real Postgres: offset commits that
//! fail, and a broker that goes down and comes back with its log intact.
//! The same scenarios against a real broker are in `tests/kafka.rs`.
mod common;
use common::{count, wait_for};
use ledgerflow_engine::Store;
use ledgerflow_engine::outbox::{NewOutboxEvent, outbox_insert_in};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_workers::ingress::{EnqueueJob, HandlerRegistry, Ingress};
use ledgerflow_workers::kafka::{ID_HEADER, IngressConfig, KafkaConfig, RelayConfig, TopicConfig};
use ledgerflow_workers::relay::Relay;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
type Cluster = MockCluster<'static, DefaultProducerContext>;

const PARTITIONS: i32 = 3;

fn unique(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4().simple())
}

fn cluster(topics: &[&str]) -> Result<Cluster, Box<dyn std::error::Error + Send + Sync>> {
    let cluster = MockCluster::new(1)?;
    for t in topics {
        cluster.create_topic(t, PARTITIONS, 1)?;
    }
    Ok(cluster)
}

fn kafka(cluster: &Cluster) -> KafkaConfig {
    let mut k = KafkaConfig::new(cluster.bootstrap_servers());
    for (key, value) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
        ("topic.metadata.refresh.interval.ms", "1000"),
        ("reconnect.backoff.max.ms", "500"),
    ] {
        k.properties.insert(key.into(), value.into());
    }
    k
}

fn client(cluster: &Cluster) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cluster.bootstrap_servers());
    c
}

fn producer(cluster: &Cluster) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    client(cluster)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "120000")
        .create()
}

fn ingress_config(cluster: &Cluster, topic: &str, group: &str, dlq: &str) -> IngressConfig {
    let mut c = IngressConfig::new(
        kafka(cluster),
        group,
        vec![TopicConfig {
            name: topic.to_string(),
            handler: "enqueue".to_string(),
            business_id: Default::default(),
            queue: Some("q".to_string()),
        }],
        dlq,
    );
    c.retry_backoff = Duration::from_millis(20);
    c.commit_interval = Duration::from_millis(200);
    c
}

fn enqueue() -> HandlerRegistry {
    HandlerRegistry::new().register(
        "enqueue",
        EnqueueJob {
            queue: "q".into(),
            kind: "ingested".into(),
        },
    )
}

/// Starts delivering `(partition, id, payload)` messages; the returned
/// future resolves when every delivery report arrived.
fn send_all(
    producer: &FutureProducer,
    topic: &str,
    messages: &[(i32, String, String)],
) -> impl std::future::Future<Output = TestResult> + use<> {
    let mut pending = Vec::with_capacity(messages.len());
    for (p, id, payload) in messages {
        let record: FutureRecord<'_, str, str> = FutureRecord::to(topic)
            .partition(*p)
            .key(id.as_str())
            .payload(payload.as_str())
            .headers(OwnedHeaders::new().insert(Header {
                key: ID_HEADER,
                value: Some(id.as_str()),
            }));
        pending.push(producer.send_result(record).map_err(|(e, _)| e));
    }
    async move {
        for r in pending {
            r?.await
                .map_err(|_| "delivery report lost")?
                .map_err(|(e, _)| e)?;
        }
        Ok(())
    }
}

fn messages(prefix: &str, range: std::ops::Range<usize>) -> Vec<(i32, String, String)> {
    range
        .map(|i| {
            (
                (i % 3) as i32,
                format!("{prefix}{i}"),
                format!("{{\"n\":\"{prefix}{i}\"}}"),
            )
        })
        .collect()
}

fn committed_offsets(
    cluster: &Cluster,
    group: &str,
    topic: &str,
) -> Result<Vec<i64>, Box<dyn std::error::Error + Send + Sync>> {
    let consumer: BaseConsumer = client(cluster).set("group.id", group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
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

/// Reads `topic` from the beginning with a fresh group: per message, its
/// id header and payload, until `want` distinct ids arrived or `within` passed.
async fn read_topic(
    cluster: &Cluster,
    topic: &str,
    want: usize,
    within: Duration,
) -> Result<Vec<(String, String)>, Box<dyn std::error::Error + Send + Sync>> {
    let consumer: StreamConsumer = client(cluster)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut out = Vec::new();
    let mut ids = HashSet::new();
    let deadline = Instant::now() + within;
    while ids.len() < want && Instant::now() < deadline {
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        else {
            continue;
        };
        let id = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == ID_HEADER))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
        ids.insert(id.clone());
        out.push((id, payload));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_offset_commits_mean_redelivery_and_each_message_applied_once() -> TestResult {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let topic = unique("orders");
    let group = unique("ingress");
    let cluster = cluster(&[&topic])?;
    let producer = producer(&cluster)?;
    send_all(&producer, &topic, &messages("e", 0..30)).await?;

    // Every OffsetCommit fails (far more injected errors than the consumer
    // can send requests in this test).
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 100_000],
    );
    let first = Ingress::start(
        Store::new(db.pool.clone()),
        ingress_config(&cluster, &topic, &group, "unused-dlq"),
        enqueue(),
        CancellationToken::new(),
    )?;
    let applied = first.stats();
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE kind = 'ingested'",
        30,
        Duration::from_secs(60),
    )
    .await?;
    // Several commit rounds fail, then the final synchronous commit fails too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.shutdown().await?;
    assert_eq!(applied.applied(), 30);
    cluster.clear_request_errors(RDKafkaApiKey::OffsetCommit);
    let committed = committed_offsets(&cluster, &group, &topic)?;
    assert!(
        committed.iter().all(|o| *o <= 0),
        "offsets were committed despite the injected errors: {committed:?}"
    );

    // The next member of the group gets everything again and applies none
    // of it twice; then three new messages, one per partition.
    send_all(&producer, &topic, &messages("end", 0..3)).await?;
    let second = Ingress::start(
        Store::new(db.pool.clone()),
        ingress_config(&cluster, &topic, &group, "unused-dlq"),
        enqueue(),
        CancellationToken::new(),
    )?;
    let stats = second.stats();
    wait_for(
        &db.pool,
        "SELECT count(*) FROM inbox WHERE business_id LIKE 'end%'",
        3,
        Duration::from_secs(60),
    )
    .await?;
    // Commits work again: wait until the group is past every message.
    let deadline = Instant::now() + Duration::from_secs(30);
    while committed_offsets(&cluster, &group, &topic)?
        .iter()
        .sum::<i64>()
        != 33
    {
        assert!(Instant::now() < deadline, "offsets never committed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    second.shutdown().await?;
    assert_eq!(stats.duplicates(), 30, "every message redelivered");
    assert_eq!(stats.applied(), 3);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE kind = 'ingested'"
        )
        .await,
        33
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, 33);
    eprintln!("failing commit test took {:?}", t0.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_broker_down_and_up_consumer_relay_and_dead_letters_resume() -> TestResult {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let topic_in = unique("in");
    let topic_out = unique("out");
    let dlq = unique("dlq");
    let cluster = cluster(&[&topic_in, &topic_out, &dlq])?;
    let store = Store::new(db.pool.clone());
    let ingress = Ingress::start(
        store.clone(),
        ingress_config(&cluster, &topic_in, &unique("ingress"), &dlq),
        enqueue(),
        CancellationToken::new(),
    )?;
    let mut relay_config = RelayConfig::new(kafka(&cluster));
    relay_config.batch_size = 20;
    relay_config.poll_interval = Duration::from_millis(50);
    relay_config.retry_backoff = Duration::from_millis(100);
    relay_config.max_backoff = Duration::from_millis(500);
    relay_config.delivery_timeout = Duration::from_secs(3);
    let relay = Relay::start(store, relay_config, CancellationToken::new())?;
    let producer = producer(&cluster)?;

    // Before: messages in, a poison message dead-lettered, events out.
    send_all(&producer, &topic_in, &messages("before", 0..9)).await?;
    send_all(
        &producer,
        &topic_in,
        &[(0, "poison-before".into(), "not json".into())],
    )
    .await?;
    write_outbox(&db.pool, &topic_out, 0..3).await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE kind = 'ingested'",
        9,
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
    wait_for(
        &db.pool,
        "SELECT count(*) FROM dead_letters",
        1,
        Duration::from_secs(60),
    )
    .await?;

    // Down: new outbox events wait; messages produced now wait in the
    // producer.
    cluster.broker_down(1)?;
    write_outbox(&db.pool, &topic_out, 3..8).await?;
    let sent = tokio::spawn(send_all(&producer, &topic_in, &messages("during", 0..9)));
    let poison = tokio::spawn(send_all(
        &producer,
        &topic_in,
        &[(1, "poison-during".into(), "not json".into())],
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        )
        .await,
        10
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE kind = 'ingested'"
        )
        .await,
        9
    );

    // Up: everything resumes, nothing lost.
    cluster.broker_up(1)?;
    sent.await??;
    poison.await??;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE kind = 'ingested'",
        18,
        Duration::from_secs(90),
    )
    .await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
        16,
        Duration::from_secs(90),
    )
    .await?;
    // Both letters recorded, and both copies published once the broker is back.
    wait_for(
        &db.pool,
        "SELECT count(*) FROM dead_letters WHERE copy_state = 'published'",
        2,
        Duration::from_secs(90),
    )
    .await?;
    ingress.shutdown().await?;
    relay.shutdown().await?;
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, 18);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE kind = 'ingested'"
        )
        .await,
        18
    );

    // Every event reached the topic, each key in order.
    let seen = read_topic(&cluster, &topic_out, 16, Duration::from_secs(30)).await?;
    let mut ids = HashSet::new();
    let mut per_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (id, payload) in &seen {
        if !ids.insert(id.clone()) {
            continue; // a re-send after the outage: same id, dropped by consumers
        }
        if let Some((key, seq)) = payload.split_once(':') {
            per_key.entry(key.into()).or_default().push(seq.parse()?);
        }
    }
    for key in ["x", "y"] {
        assert_eq!(per_key.get(key), Some(&(0..8).collect()), "key {key}");
    }
    let dead: HashSet<String> = read_topic(&cluster, &dlq, 2, Duration::from_secs(30))
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        dead,
        HashSet::from(["poison-before".to_string(), "poison-during".to_string()])
    );
    eprintln!("mock broker restart test took {:?}", t0.elapsed());
    Ok(())
}

/// Outbox events `x:seq` and `y:seq` for `seqs`, in one transaction.
async fn write_outbox(pool: &PgPool, topic: &str, seqs: std::ops::Range<usize>) -> TestResult {
    let mut tx = pool.begin().await?;
    for seq in seqs {
        for key in ["x", "y"] {
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

/// Reads one message of `topic` (from the beginning): its payload and headers.
async fn read_one(
    cluster: &Cluster,
    topic: &str,
    within: Duration,
) -> Result<(Vec<u8>, BTreeMap<String, String>), Box<dyn std::error::Error + Send + Sync>> {
    let consumer: StreamConsumer = client(cluster)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let m = tokio::time::timeout(within, consumer.recv())
        .await
        .map_err(|_| format!("nothing on {topic} within {within:?}"))??;
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .filter_map(|h| {
                    Some((
                        h.key.to_string(),
                        String::from_utf8_lossy(h.value?).into_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((m.payload().unwrap_or_default().to_vec(), headers))
}

/// The dead letter of `topic` as `(copy_state, copy_attempts, copy_error)`.
async fn copy_of(pool: &PgPool, topic: &str) -> Result<(String, i32, Option<String>), sqlx::Error> {
    sqlx::query_as(
        "SELECT copy_state, copy_attempts, copy_error FROM dead_letters WHERE topic = $1",
    )
    .bind(topic)
    .fetch_one(pool)
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_refusing_writes_neither_stops_the_partition_nor_loses_the_copy()
-> TestResult {
    let db = TestDb::new().await?;
    let topic = unique("in");
    let dlq = unique("dlq");
    let cluster = cluster(&[&topic, &dlq])?;
    // The poison message and the events behind it, all on one partition.
    let producer = producer(&cluster)?;
    let mut batch = vec![(0, "poison".to_string(), "not json".to_string())];
    batch.extend(
        messages("after", 0..5)
            .into_iter()
            .map(|(_, id, p)| (0, id, p)),
    );
    send_all(&producer, &topic, &batch).await?;
    // From now on the broker refuses every produce request for a while.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 4],
    );
    let mut config = ingress_config(&cluster, &topic, &unique("ingress"), &dlq);
    config.retry_backoff = Duration::from_millis(50);
    let ingress = Ingress::start(
        Store::new(db.pool.clone()),
        config,
        enqueue(),
        CancellationToken::new(),
    )?;
    // The partition moves on while the topic refuses the copy.
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE kind = 'ingested'",
        5,
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM dead_letters").await,
        1
    );
    // The copy arrives once the topic accepts it, with what was refused
    // recorded on the way.
    wait_for(
        &db.pool,
        "SELECT count(*) FROM dead_letters WHERE copy_state = 'published'",
        1,
        Duration::from_secs(60),
    )
    .await?;
    let (state, attempts, error) = copy_of(&db.pool, &topic).await?;
    assert_eq!(state, "published");
    assert!(attempts >= 2, "the refused tries are counted: {attempts}");
    assert_eq!(error, None, "a published copy carries no error");
    let (payload, headers) = read_one(&cluster, &dlq, Duration::from_secs(30)).await?;
    assert_eq!(payload, b"not json");
    assert_eq!(headers.get(ID_HEADER).map(String::as_str), Some("poison"));
    assert_eq!(headers.get("ledgerflow-source-topic"), Some(&topic));
    assert_eq!(
        headers.get("ledgerflow-source-offset").map(String::as_str),
        Some("0")
    );
    ingress.shutdown().await?;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE kind = 'ingested'"
        )
        .await,
        5,
        "every event behind the poison message applied once"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM dead_letters").await,
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_refused_for_its_size_is_sent_again_as_a_prefix_with_its_size_and_hash() -> TestResult
{
    let db = TestDb::new().await?;
    let topic = unique("in");
    let dlq = unique("dlq");
    let cluster = cluster(&[&topic, &dlq])?;
    let big: String = "x".repeat(200_000);
    let producer = producer(&cluster)?;
    send_all(&producer, &topic, &[(1, "big-poison".into(), big.clone())]).await?;
    send_all(&producer, &topic, &[(1, "ok".into(), "{\"n\":1}".into())]).await?;
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let ingress = Ingress::start(
        Store::new(db.pool.clone()),
        ingress_config(&cluster, &topic, &unique("ingress"), &dlq),
        enqueue(),
        CancellationToken::new(),
    )?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM dead_letters WHERE copy_state = 'published'",
        1,
        Duration::from_secs(60),
    )
    .await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE kind = 'ingested'",
        1,
        Duration::from_secs(60),
    )
    .await?;
    ingress.shutdown().await?;
    // The row keeps the whole message (it is under the payload limit).
    let (stored, size): (Vec<u8>, i32) =
        sqlx::query_as("SELECT payload, payload_size FROM dead_letters WHERE topic = $1")
            .bind(&topic)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(stored.len(), big.len());
    assert_eq!(size, 200_000);
    // The topic got a prefix, and the headers say what the whole was.
    let (payload, headers) = read_one(&cluster, &dlq, Duration::from_secs(30)).await?;
    assert_eq!(payload.len(), 64 * 1024);
    assert_eq!(&payload[..], &big.as_bytes()[..64 * 1024]);
    assert_eq!(
        headers
            .get("ledgerflow-payload-truncated")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(
        headers.get("ledgerflow-payload-size").map(String::as_str),
        Some("200000")
    );
    let sha: Vec<u8> = sqlx::query_scalar("SELECT sha256($1::bytea)")
        .bind(big.as_bytes())
        .fetch_one(&db.pool)
        .await?;
    let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(headers.get("ledgerflow-payload-sha256"), Some(&hex));
    Ok(())
}
