//! Poison messages against a real Postgres and Apache Kafka (a broker per
//! test, or `KAFKA_BROKERS`): any message the broker delivers can
//! be dead-lettered without stopping its partition — one as large as the
//! broker takes, one larger than a producer's default, and one whose
//! dead-letter topic does not exist yet. Each is recorded once in
//! `dead_letters`, the events behind it are applied once, and its topic copy
//! appears once the topic accepts it. (A topic that refuses writes, and one
//! that refuses a copy for its size, are in `tests/kafka_mock.rs`.)
#[path = "common/broker.rs"]
mod broker;
mod common;
use broker::{Broker, consume_all, enqueue, ingress_config, unique};
use common::{count, wait_for};
use ledgerflow_engine::Store;
use ledgerflow_engine::testing::TestDb;
use ledgerflow_workers::ingress::Ingress;
use ledgerflow_workers::kafka::ID_HEADER;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::HashSet;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// librdkafka's default `message.max.bytes`, which the dead-letter copy of a
/// large message used to exceed.
const PRODUCER_DEFAULT_MAX: usize = 1_000_000;

/// A producer that sends messages up to `max` bytes (not idempotent: the
/// probe's refused sends must not wedge it).
fn big_producer(broker: &Broker, max: usize) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    broker
        .client()
        .set("acks", "all")
        .set("message.max.bytes", (max + 64 * 1024).to_string())
        .create()
}

async fn send(
    producer: &FutureProducer,
    topic: &str,
    id: &str,
    payload: &[u8],
) -> Result<(), rdkafka::error::KafkaError> {
    let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
        .partition(0)
        .key("k")
        .payload(payload)
        .headers(OwnedHeaders::new().insert(Header {
            key: ID_HEADER,
            value: Some(id),
        }));
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
}

/// The largest payload the broker accepts on `topic`, from `start` down in
/// steps of 1 KiB (sent with id `probe`): the broker's maximum message size
/// less the record's own overhead. The probe is a poison message too.
async fn largest_accepted(
    producer: &FutureProducer,
    topic: &str,
    start: usize,
) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
    let mut size = start;
    loop {
        match send(producer, topic, "probe", &vec![b'#'; size]).await {
            Ok(()) => return Ok(size),
            Err(e) if size > 1024 * 1024 / 2 => {
                eprintln!("the broker refused {size} bytes ({e}); trying less");
                size -= 1024;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_as_large_as_the_broker_takes_are_dead_lettered_once() -> TestResult {
    let db = TestDb::new().await?;
    let broker = Broker::start()?;
    let topic = unique("requests");
    let dlq = unique("requests-dlq");
    broker.create_topics(&[&topic, &dlq]).await?;
    let producer = big_producer(&broker, 2 * 1024 * 1024)?;
    // The broker's largest, and one just over the producer's default, then
    // the events that must not wait behind them.
    let max = largest_accepted(&producer, &topic, 1024 * 1024 + 512).await?;
    let over_default = PRODUCER_DEFAULT_MAX + 10;
    if over_default <= max {
        send(&producer, &topic, "over-default", &vec![b'!'; over_default]).await?;
    }
    for n in 0..3 {
        send(
            &producer,
            &topic,
            &format!("ok{n}"),
            format!("{{\"n\":{n}}}").as_bytes(),
        )
        .await?;
    }
    eprintln!("broker takes {max}-byte payloads");

    let ingress = Ingress::start(
        Store::new(db.pool.clone()),
        ingress_config(&broker, &topic, &unique("ingress"), &dlq),
        enqueue(),
        CancellationToken::new(),
    )?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE kind = 'ingested'",
        3,
        Duration::from_secs(120),
    )
    .await?;
    let poison = if over_default <= max { 2 } else { 1 };
    wait_for(
        &db.pool,
        "SELECT count(*) FROM dead_letters WHERE copy_state = 'published'",
        poison,
        Duration::from_secs(120),
    )
    .await?;
    ingress.shutdown().await?;

    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE kind = 'ingested'"
        )
        .await,
        3,
        "every event behind the poison messages applied once"
    );
    let rows: Vec<(i32, bool, i32)> = sqlx::query_as(
        "SELECT payload_size, payload_truncated, octet_length(payload)
         FROM dead_letters WHERE topic = $1 ORDER BY \"offset\"",
    )
    .bind(&topic)
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(rows.len() as i64, poison, "each recorded once: {rows:?}");
    for (size, truncated, kept) in &rows {
        let size = usize::try_from(*size)?;
        assert!(size == max || size == over_default, "{rows:?}");
        // Under the default 1 MiB limit the row keeps all of it; above, its prefix.
        assert_eq!(*truncated, size > 1024 * 1024, "{rows:?}");
        assert_eq!(usize::try_from(*kept)?, size.min(1024 * 1024));
    }

    let copies = consume_all(&broker, &dlq, poison as usize, Duration::from_secs(60)).await?;
    let ids: HashSet<_> = copies.iter().filter_map(|c| c.id.clone()).collect();
    let want: HashSet<String> = if poison == 2 {
        ["probe", "over-default"].map(String::from).into()
    } else {
        ["probe".to_string()].into()
    };
    assert_eq!(ids, want);
    for c in &copies {
        let size: usize = c.headers["ledgerflow-payload-size"].parse()?;
        let cut = c
            .headers
            .get("ledgerflow-payload-truncated")
            .map(String::as_str)
            == Some("true");
        assert_eq!(c.payload.len() < size, cut, "a shorter copy says so");
        assert_eq!(
            c.headers.get("ledgerflow-payload-sha256").map(String::len),
            Some(64)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_topic_does_not_stop_the_partition_and_the_copy_follows_it()
-> TestResult {
    let db = TestDb::new().await?;
    let broker = Broker::start()?;
    let topic = unique("requests");
    let dlq = unique("requests-dlq");
    broker.create_topics(&[&topic]).await?;
    let producer = broker.producer()?;
    send(&producer, &topic, "poison", b"8 bytes!").await?;
    for n in 0..3 {
        send(
            &producer,
            &topic,
            &format!("ok{n}"),
            format!("{{\"n\":{n}}}").as_bytes(),
        )
        .await?;
    }
    let ingress = Ingress::start(
        Store::new(db.pool.clone()),
        ingress_config(&broker, &topic, &unique("ingress"), &dlq),
        enqueue(),
        CancellationToken::new(),
    )?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM jobs WHERE kind = 'ingested'",
        3,
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM dead_letters").await,
        1
    );
    // The copy is owed, and why it is not there yet is on the row.
    wait_for(
        &db.pool,
        "SELECT count(*) FROM dead_letters
         WHERE copy_state = 'pending' AND copy_attempts >= 1 AND copy_error IS NOT NULL",
        1,
        Duration::from_secs(60),
    )
    .await?;
    broker.create_topics(&[&dlq]).await?;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM dead_letters WHERE copy_state = 'published'",
        1,
        Duration::from_secs(120),
    )
    .await?;
    ingress.shutdown().await?;
    let copies = consume_all(&broker, &dlq, 1, Duration::from_secs(30)).await?;
    assert_eq!(copies.len(), 1, "one copy");
    assert_eq!(copies[0].id.as_deref(), Some("poison"));
    assert_eq!(copies[0].payload, b"8 bytes!");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM jobs WHERE kind = 'ingested'"
        )
        .await,
        3
    );
    Ok(())
}
