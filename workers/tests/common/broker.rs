//! A Kafka-protocol broker for the workers' Kafka tests: a tansu child
//! process per test on a free port (killed on drop), or the external
//! `KAFKA_BROKERS`; and the producing and consuming helpers those tests share.
//! Included with `#[path]` by the test files that need a broker only.
// Each test binary that includes this uses a different part of it.
#![allow(dead_code)]
use ledgerflow_workers::ingress::{EnqueueJob, HandlerRegistry};
use ledgerflow_workers::kafka::{ID_HEADER, IngressConfig, KafkaConfig, TopicConfig};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A tansu broker child process on a fixed port, killed on drop; or the
/// external `KAFKA_BROKERS`.
pub struct Broker {
    pub port: u16,
    pub child: Option<Child>,
    pub external: Option<String>,
}

impl Broker {
    pub fn start() -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        if let Ok(b) = std::env::var("KAFKA_BROKERS")
            && !b.is_empty()
        {
            return Ok(Self {
                port: 0,
                child: None,
                external: Some(b),
            });
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut broker = Self {
            port,
            child: None,
            external: None,
        };
        broker.up()?;
        Ok(broker)
    }

    pub fn tansu() -> std::path::PathBuf {
        let home = std::env::var_os("CARGO_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo"))
            })
            .unwrap_or_default();
        let cargo_bin = home.join("bin").join("tansu");
        if cargo_bin.is_file() {
            cargo_bin
        } else {
            "tansu".into()
        }
    }

    pub fn up(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(Self::tansu())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if start.elapsed() > Duration::from_secs(20) {
                return Err("tansu did not start".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Kills the broker (memory storage: its data is gone).
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn can_restart(&self) -> bool {
        self.external.is_none()
    }

    pub fn servers(&self) -> String {
        self.external
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", self.port))
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

    pub async fn create_topics(&self, topics: &[&str]) -> TestResult {
        let admin: AdminClient<DefaultClientContext> = self.client().create()?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| NewTopic::new(t, 3, TopicReplication::Fixed(1)))
            .collect();
        let start = Instant::now();
        loop {
            match admin.create_topics(&new, &AdminOptions::new()).await {
                Ok(_) => return Ok(()),
                Err(e) if start.elapsed() < Duration::from_secs(20) => {
                    eprintln!("create topics: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn producer(&self) -> Result<FutureProducer, rdkafka::error::KafkaError> {
        self.client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.down();
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
