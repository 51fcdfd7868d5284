//! The Kafka broker of the workers' Kafka tests: Apache Kafka (a single KRaft node, its
//! log in a temporary directory on disk) started per test on free ports and killed on drop,
//! from the jars `cargo xtask test` resolves (`LEDGERFLOW_KAFKA_LIBS`, or the default cache
//! `$HOME/.cache/ledgerflow/kafka-<version>/libs`); or the external `KAFKA_BROKERS`. Also
//! the producing and consuming helpers those tests share. Included with `#[path]` by the
//! test files that need a broker only.
// Each test binary that includes this uses a different part of it.
#![allow(dead_code)]
#[path = "../../testkit/apache_kafka.rs"]
mod apache_kafka;
pub use apache_kafka::{Jars, Node};
use ledgerflow_workers::ingress::{EnqueueJob, HandlerRegistry};
use ledgerflow_workers::kafka::{ID_HEADER, IngressConfig, KafkaConfig, TopicConfig};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An Apache Kafka broker of this test (stopped, killed and restarted at will, its log
/// kept on disk in between), or the external `KAFKA_BROKERS`.
pub struct Broker {
    pub node: Option<Node>,
    pub external: Option<String>,
}

impl Broker {
    /// `KAFKA_BROKERS` when set, else a fresh Apache Kafka broker of this test.
    pub fn start() -> Result<Self, BoxError> {
        if let Ok(b) = std::env::var("KAFKA_BROKERS")
            && !b.is_empty()
        {
            return Ok(Self::external(b));
        }
        Self::own()
    }

    /// A fresh Apache Kafka broker of this test even when `KAFKA_BROKERS` is set (the
    /// tests that stop and restart it).
    pub fn own() -> Result<Self, BoxError> {
        let jars = Jars::find().ok_or(
            "no Apache Kafka jars: run `cargo xtask test` once (it resolves them with Maven \
             into ~/.cache/ledgerflow), or set LEDGERFLOW_KAFKA_LIBS (or KAFKA_BROKERS)",
        )?;
        let mut node = Node::ephemeral(jars, "test")?;
        node.start()?;
        Ok(Self {
            node: Some(node),
            external: None,
        })
    }

    /// The brokers at `servers` (a child process's view of its parent's broker).
    pub fn external(servers: String) -> Self {
        Self {
            node: None,
            external: Some(servers),
        }
    }

    /// Starts the broker again on the same ports, with the log it had.
    pub fn up(&mut self) -> Result<(), BoxError> {
        let node = self
            .node
            .as_mut()
            .ok_or("an external broker cannot be started")?;
        node.start()?;
        Ok(())
    }

    /// Kills the broker (SIGKILL); its log stays on disk and is recovered by [`Broker::up`].
    pub fn down(&mut self) {
        if let Some(node) = self.node.as_mut() {
            node.kill();
        }
    }

    /// Stops the broker cleanly (SIGTERM); [`Broker::up`] starts it again.
    pub fn stop(&mut self) {
        if let Some(node) = self.node.as_mut() {
            node.stop();
        }
    }

    pub fn can_restart(&self) -> bool {
        self.node.is_some()
    }

    pub fn servers(&self) -> String {
        match (&self.external, &self.node) {
            (Some(external), _) => external.clone(),
            (None, Some(node)) => node.bootstrap(),
            (None, None) => String::new(),
        }
    }

    pub fn kafka(&self) -> KafkaConfig {
        let mut k = KafkaConfig::new(self.servers());
        k.properties
            .insert("session.timeout.ms".into(), "6000".into());
        k.properties
            .insert("heartbeat.interval.ms".into(), "500".into());
        k.properties
            .insert("topic.metadata.refresh.interval.ms".into(), "1000".into());
        k
    }

    pub fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.servers());
        c
    }

    /// Creates `topics` with 3 partitions each (an existing one is left as it is).
    pub async fn create_topics(&self, topics: &[&str]) -> TestResult {
        self.create_topics_with(topics, 3, &[]).await
    }

    /// Creates `topics` with `partitions` partitions each and the topic configs
    /// `config` (e.g. `cleanup.policy=compact`).
    pub async fn create_topics_with(
        &self,
        topics: &[&str],
        partitions: i32,
        config: &[(&str, &str)],
    ) -> TestResult {
        let admin: AdminClient<DefaultClientContext> = self.client().create()?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| {
                config.iter().fold(
                    NewTopic::new(t, partitions, TopicReplication::Fixed(1)),
                    |n, (k, v)| n.set(k, v),
                )
            })
            .collect();
        let start = Instant::now();
        loop {
            let failed = match admin.create_topics(&new, &AdminOptions::new()).await {
                Ok(results) => results
                    .into_iter()
                    .filter_map(Result::err)
                    .find(|(_, code)| *code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)
                    .map(|(topic, code)| format!("{topic}: {code}")),
                Err(e) => Some(e.to_string()),
            };
            match failed {
                None => return Ok(()),
                Some(e) if start.elapsed() < Duration::from_secs(20) => {
                    eprintln!("create topics: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Some(e) => return Err(e.into()),
            }
        }
    }

    pub fn producer(&self) -> Result<FutureProducer, rdkafka::error::KafkaError> {
        self.producer_config().create()
    }

    /// An idempotent producer's settings (`acks=all`), to add to.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = self.client();
        c.set("enable.idempotence", "true").set("acks", "all");
        c
    }
}

pub fn unique(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4().simple())
}

pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    key: &str,
    id: Option<&str>,
    payload: &[u8],
) -> TestResult {
    let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).key(key).payload(payload);
    if let Some(id) = id {
        record = record.headers(OwnedHeaders::new().insert(Header {
            key: ID_HEADER,
            value: Some(id),
        }));
    }
    if let Some(p) = partition {
        record = record.partition(p);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// A consumed message: its id header, payload and headers.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: Option<String>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads `topic` from the beginning with a fresh group until `want` distinct
/// messages (by id header) arrived or `within` passed.
pub async fn consume_all(
    broker: &Broker,
    topic: &str,
    want: usize,
    within: Duration,
) -> Result<Vec<Seen>, Box<dyn std::error::Error + Send + Sync>> {
    let consumer: rdkafka::consumer::StreamConsumer = broker
        .client()
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    let mut distinct = HashSet::new();
    while distinct.len() < want && Instant::now() < deadline {
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        else {
            continue;
        };
        let mut headers = HashMap::new();
        if let Some(h) = m.headers() {
            for hd in h.iter() {
                if let Some(v) = hd.value {
                    headers.insert(hd.key.to_string(), String::from_utf8_lossy(v).into_owned());
                }
            }
        }
        distinct.insert(
            headers
                .get(ID_HEADER)
                .cloned()
                .unwrap_or_else(|| format!("#{}", out.len())),
        );
        out.push(Seen {
            id: headers.get(ID_HEADER).cloned(),
            payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers,
        });
    }
    Ok(out)
}

/// An ingress of `topic` into queue `q` (handler `enqueue`), with short
/// retry and commit intervals for tests.
pub fn ingress_config(broker: &Broker, topic: &str, group: &str, dlq: &str) -> IngressConfig {
    let mut c = IngressConfig::new(
        broker.kafka(),
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

/// The `enqueue` handler: every message becomes an `ingested` job in `q`.
pub fn enqueue() -> HandlerRegistry {
    HandlerRegistry::new().register(
        "enqueue",
        EnqueueJob {
            queue: "q".into(),
            kind: "ingested".into(),
        },
    )
}
