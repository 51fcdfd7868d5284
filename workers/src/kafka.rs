//! Kafka settings shared by the ingress consumers and the outbox relay.
//!
//! Every struct here deserializes from kebab-case keys (a config file or the
//! environment, as the binary chooses). Any librdkafka property can be passed
//! through: unknown keys of [`KafkaConfig`] are collected into `properties`
//! (dotted librdkafka names, e.g. `security.protocol`), and they override the
//! defaults the roles set.
use rdkafka::ClientConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// The header every Ledgerflow message carries with its id (the outbox id for
/// egress; ingress reads the business id from it by default).
pub const ID_HEADER: &str = "ledgerflow-id";

/// The connection to the cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// librdkafka properties passed through as they are.
    #[serde(flatten)]
    pub properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// A config for `bootstrap_servers` with no extra properties.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            properties: BTreeMap::new(),
        }
    }

    /// A librdkafka client config: `defaults` first, then the pass-through
    /// properties (which win), then `bootstrap.servers`.
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.bootstrap_servers);
        c
    }
}

/// Where an ingress topic's handler finds the message's business id.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BusinessId {
    /// A header (default `ledgerflow-id`).
    Header(String),
    /// A top-level string (or number) field of the JSON payload.
    Field(String),
    /// None: messages are deduplicated by topic/partition/offset only.
    None,
}

impl Default for BusinessId {
    fn default() -> Self {
        BusinessId::Header(ID_HEADER.to_string())
    }
}

/// One consumed topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TopicConfig {
    /// The topic.
    pub name: String,
    /// The name of the registered [`crate::ingress::MessageHandler`].
    pub handler: String,
    /// Where the business id is (default: the `ledgerflow-id` header).
    #[serde(default)]
    pub business_id: BusinessId,
    /// The job queue this topic feeds, watched for backpressure.
    #[serde(default)]
    pub queue: Option<String>,
}

/// The ingress role.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct IngressConfig {
    /// The cluster.
    pub kafka: KafkaConfig,
    /// `group.id` of the consumer group.
    pub group_id: String,
    /// The topics and their handlers.
    pub topics: Vec<TopicConfig>,
    /// Where copies of poison messages are published; the durable record is
    /// the `dead_letters` row, written first (see [`crate::dead_letters`]).
    pub dead_letter_topic: String,
    /// Most payload bytes a dead letter keeps (row and topic copy); a larger
    /// message keeps its first bytes plus its size and SHA-256.
    #[serde(default = "default_dead_letter_max_payload")]
    pub dead_letter_max_payload_bytes: usize,
    /// Attempts a failing message gets before it is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay of a failing message (doubles per attempt, capped at 30 s).
    #[serde(
        default = "default_retry_backoff",
        with = "millis",
        rename = "retry-backoff-ms"
    )]
    pub retry_backoff: Duration,
    /// Most `available` jobs this process lets its topic's queue hold: a
    /// partition applies a batch only into room below this, and is paused
    /// while there is none (resumed once runners drain the queue).
    #[serde(default = "default_max_backlog")]
    pub max_backlog: i64,
    /// How often stored offsets are committed, and the longest a measured
    /// queue backlog is trusted (a paused partition re-checks at least every
    /// 250 ms).
    #[serde(
        default = "default_commit_interval",
        with = "millis",
        rename = "commit-interval-ms"
    )]
    pub commit_interval: Duration,
    /// Most messages a partition holds in memory (received, not yet
    /// committed): at this many the consumer waits for the partition's worker
    /// (pausing the partition if that takes over a second); half of it is
    /// the largest batch applied in one transaction.
    #[serde(default = "default_partition_buffer")]
    pub partition_buffer: usize,
    /// How often the consumer lag of the assigned partitions (high watermark
    /// minus the group's position) is measured for `/metrics`; a partition
    /// that should be fetching but has received nothing for a while is also
    /// checked against it (see [`crate::ingress`], "Fetch positions").
    #[serde(
        default = "default_lag_interval",
        with = "millis",
        rename = "lag-interval-ms"
    )]
    pub lag_interval: Duration,
}

/// The outbox relay role.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RelayConfig {
    /// The cluster.
    pub kafka: KafkaConfig,
    /// Most rows published per transaction.
    #[serde(default = "default_batch_size")]
    pub batch_size: i64,
    /// How often to look for rows when the last batch was empty.
    #[serde(
        default = "default_poll_interval",
        with = "millis",
        rename = "poll-interval-ms"
    )]
    pub poll_interval: Duration,
    /// First delay after a failure (doubles, capped at `max-backoff-ms`).
    #[serde(
        default = "default_retry_backoff",
        with = "millis",
        rename = "retry-backoff-ms"
    )]
    pub retry_backoff: Duration,
    /// Longest delay between retries.
    #[serde(
        default = "default_max_backoff",
        with = "millis",
        rename = "max-backoff-ms"
    )]
    pub max_backoff: Duration,
    /// How long one batch may wait for delivery reports before it is rolled
    /// back and retried (`message.timeout.ms` defaults to this).
    #[serde(
        default = "default_delivery_timeout",
        with = "millis",
        rename = "delivery-timeout-ms"
    )]
    pub delivery_timeout: Duration,
    /// Where publish lag and counts are recorded (set by the process, not
    /// by the JSON configuration; `None`: not measured).
    #[serde(skip)]
    pub metrics: Option<crate::metrics::RelayMetrics>,
}

impl RelayConfig {
    /// Defaults for everything but the cluster.
    pub fn new(kafka: KafkaConfig) -> Self {
        Self {
            kafka,
            batch_size: default_batch_size(),
            poll_interval: default_poll_interval(),
            retry_backoff: default_retry_backoff(),
            max_backoff: default_max_backoff(),
            delivery_timeout: default_delivery_timeout(),
            metrics: None,
        }
    }
}

impl IngressConfig {
    /// Defaults for everything but the cluster, group, topics and dead-letter topic.
    pub fn new(
        kafka: KafkaConfig,
        group_id: impl Into<String>,
        topics: Vec<TopicConfig>,
        dead_letter_topic: impl Into<String>,
    ) -> Self {
        Self {
            kafka,
            group_id: group_id.into(),
            topics,
            dead_letter_topic: dead_letter_topic.into(),
            dead_letter_max_payload_bytes: default_dead_letter_max_payload(),
            max_attempts: default_max_attempts(),
            retry_backoff: default_retry_backoff(),
            max_backlog: default_max_backlog(),
            commit_interval: default_commit_interval(),
            partition_buffer: default_partition_buffer(),
            lag_interval: default_lag_interval(),
        }
    }
}

fn default_dead_letter_max_payload() -> usize {
    1024 * 1024
}
fn default_max_attempts() -> u32 {
    5
}
fn default_retry_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_max_backlog() -> i64 {
    10_000
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_partition_buffer() -> usize {
    500
}
fn default_lag_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_batch_size() -> i64 {
    256
}
fn default_poll_interval() -> Duration {
    Duration::from_millis(200)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(10)
}
fn default_delivery_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Durations as whole milliseconds.
mod millis {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Headers of a message as a JSON object (`name -> string`, `null` for a
/// header without a value; non-UTF-8 values are hex-escaped lossily).
pub fn headers_to_json<H: rdkafka::message::Headers>(headers: Option<&H>) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    if let Some(h) = headers {
        for header in h.iter() {
            let value = header
                .value
                .map(|v| serde_json::Value::String(String::from_utf8_lossy(v).into_owned()))
                .unwrap_or(serde_json::Value::Null);
            map.insert(header.key.to_string(), value);
        }
    }
    serde_json::Value::Object(map)
}

/// Backoff for attempt `n` (1-based): `base * 2^(n-1)`, capped at `max`.
pub(crate) fn backoff(base: Duration, n: u32, max: Duration) -> Duration {
    let factor = 1u32 << n.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(max)
}
