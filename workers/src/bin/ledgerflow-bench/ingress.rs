//! `ledgerflow-bench ingress`: the two ways events come in — Kafka messages turned into committed
//! jobs by the ingress consumer, and signed webhook deliveries answered 2xx by the api.
//!
//! **Kafka** (on a fresh database): an Apache Kafka broker (a single KRaft node with Kafka's
//! own JVM settings, its log in a temporary directory, from the jars `cargo xtask bench`
//! resolves: `LEDGERFLOW_KAFKA_LIBS`; or `KAFKA_BROKERS`) is started on free local ports, a
//! topic with `--partitions` partitions is created and `--messages` JSON messages (distinct
//! `ledgerflow-id` headers, keys spread over the partitions) are produced before anything is
//! timed. Then `--consumers` real [`Ingress`] consumers (default 1; more share one fresh
//! consumer group, each with its own librdkafka client, in this process) start with the
//! default settings (`EnqueueJob` handler: per partition, batches of up to `partition-buffer`
//! messages, each batch's inbox rows and jobs in one transaction, the offset stored after the
//! commit; backpressure on). They feed a job queue with no runner, so `max-backlog` is set
//! above `--messages`. **msgs/s** = messages ÷ (time the last one's transaction committed −
//! time the first one's did); the time to join the group and fetch the first batch is
//! reported apart. Afterwards the database must hold exactly one inbox row and one job per
//! message.
//!
//! Messages are produced as real producers do: librdkafka batches them per partition
//! (`linger.ms` = `--linger-ms`, default 5; default `batch.size`), so a record batch holds
//! hundreds to thousands of them. `--one-per-batch` produces one message per batch instead (how
//! this bench ran against tansu before the ingress handled its mid-batch fetches, for A/B
//! comparisons).
//!
//! **Webhooks** (on another fresh database): the real api (`ledgerflow_api::serve_listeners`) on
//! a port-0 socket, with a Stripe-style provider and the payments workflows registered, and
//! `--concurrency` client tasks (one keep-alive HTTP client) POSTing `--webhooks` deliveries,
//! each a distinct exchange event signed `t=…,v1=…` over `"{t}.{body}"`. Each 2xx means the raw
//! body and the processing workflow's start committed. **webhooks/s** = deliveries ÷ wall time;
//! **p99** over each request's send→response time. Afterwards the inbox must hold one row per
//! delivery.

use crate::apache_kafka::{Jars, KAFKA_VERSION, Node, Profile};
use crate::common::{
    BenchDb, CommonArgs, CpuUse, PoolArgs, percentile, print_table, quiet, write_json,
};
use anyhow::{Context, Result, bail, ensure};
use ledgerflow_api::webhooks::{Provider, WebhookProviders};
use ledgerflow_api::{ApiConfig, AppState, serve_listeners};
use ledgerflow_engine::Store;
use ledgerflow_payments::exchange::signature::{STRIPE_HEADER, Scheme, stripe_header};
use ledgerflow_payments::exchange::sim::SimulatedExchange;
use ledgerflow_payments::notifier::SimulatedNotifier;
use ledgerflow_payments::workflows::{self, Deps, WorkflowsConfig};
use ledgerflow_workers::ingress::{EnqueueJob, HandlerRegistry, Ingress};
use ledgerflow_workers::kafka::{ID_HEADER, IngressConfig, KafkaConfig, TopicConfig};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The job queue the ingested messages go to.
const QUEUE: &str = "bench-ingress";
/// The webhook provider's name and signing secret.
const PROVIDER: &str = "exchange";
const SECRET: &str = "whsec_bench";
/// Give up when the consumer has not committed everything within this long.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    common: CommonArgs,

    /// Kafka messages produced and then ingested (0: skip the Kafka part).
    #[arg(long, default_value_t = 100_000)]
    messages: usize,

    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,

    /// Ingress consumers in the consumer group (in this process).
    #[arg(long, default_value_t = 1)]
    consumers: usize,

    /// `partition-buffer` of the ingress (default: its default).
    #[arg(long)]
    partition_buffer: Option<usize>,

    /// The producer's `linger.ms`: how long librdkafka waits to fill a record batch.
    #[arg(long, default_value_t = 5)]
    linger_ms: u32,

    /// Produce one message per record batch (`batch.num.messages=1`) instead.
    #[arg(long)]
    one_per_batch: bool,

    /// Webhook deliveries (0: skip the webhook part).
    #[arg(long, default_value_t = 20_000)]
    webhooks: usize,

    /// Concurrent webhook client tasks.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,

    #[command(flatten)]
    pool: PoolArgs,
}

#[derive(Debug, Clone, Copy, Default)]
struct KafkaFigures {
    messages: usize,
    per_s: f64,
    join_s: f64,
    produce_s: f64,
    /// Broker CPU milliseconds per message while ingesting.
    broker_ms: f64,
    batches: u64,
    pauses: u64,
    consumers: usize,
    cpu: CpuUse,
    bg_pct: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct WebhookFigures {
    deliveries: usize,
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu: CpuUse,
    bg_pct: u32,
}

pub async fn run(args: Args) -> Result<()> {
    ensure!(args.partitions > 0, "--partitions must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.consumers > 0, "--consumers must be at least 1");
    let kafka = if args.messages > 0 {
        let bg_pct = quiet(&args.common).await?;
        let db = BenchDb::create(&args.common, &args.pool).await?;
        let out = kafka(&args, &db, bg_pct).await;
        Some(db.finish(out).await?)
    } else {
        None
    };
    let webhooks = if args.webhooks > 0 {
        let bg_pct = quiet(&args.common).await?;
        let db = BenchDb::create(&args.common, &args.pool).await?;
        let out = webhooks(&args, &db, bg_pct).await;
        Some(db.finish(out).await?)
    } else {
        None
    };
    report(&args, kafka, webhooks)
}

// ------------------------------------------------------------------- kafka

/// An Apache Kafka broker of this run (stopped when dropped); or the external `KAFKA_BROKERS`.
struct Broker {
    servers: String,
    node: Option<Node>,
}

impl Broker {
    fn start() -> Result<Self> {
        if let Ok(b) = std::env::var("KAFKA_BROKERS")
            && !b.trim().is_empty()
        {
            return Ok(Self {
                servers: b,
                node: None,
            });
        }
        let jars = Jars::find().context(
            "no Apache Kafka jars: run this through `cargo xtask bench ingress` (it resolves \
             them with Maven), or set LEDGERFLOW_KAFKA_LIBS or KAFKA_BROKERS",
        )?;
        let mut node = Node::ephemeral(jars, "bench")
            .map_err(anyhow::Error::msg)?
            .with_profile(Profile::Server);
        let t = Instant::now();
        node.start().map_err(anyhow::Error::msg)?;
        eprintln!(
            "kafka: Apache Kafka {KAFKA_VERSION} ready on {} in {:.1} s",
            node.bootstrap(),
            t.elapsed().as_secs_f64()
        );
        Ok(Self {
            servers: node.bootstrap(),
            node: Some(node),
        })
    }

    /// CPU milliseconds the broker process used so far (0 for an external broker).
    fn cpu_ms(&self) -> f64 {
        let Some(pid) = self.node.as_ref().and_then(Node::pid) else {
            return 0.0;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return 0.0;
        };
        // Fields after `(comm)`: utime and stime are the 12th and 13th (clock ticks of 10 ms).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (tick(11) + tick(12)) * 10.0
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.servers);
        c
    }
}

async fn create_topic(broker: &Broker, topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = broker.client().create()?;
    let new = [NewTopic::new(topic, partitions, TopicReplication::Fixed(1))];
    let start = Instant::now();
    loop {
        match admin.create_topics(&new, &AdminOptions::new()).await {
            Ok(results) => {
                for r in results {
                    if let Err((t, e)) = r {
                        bail!("creating topic {t}: {e}");
                    }
                }
                return Ok(());
            }
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                eprintln!("create topic: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Produces `n` messages (all sends in flight at once, bounded by librdkafka's queue) and waits
/// for every delivery report.
async fn produce(args: &Args, broker: &Broker, topic: &str) -> Result<()> {
    let n = args.messages;
    let mut client = broker.client();
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", args.linger_ms.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", "300000");
    if args.one_per_batch {
        client.set("batch.num.messages", "1");
    }
    let producer: FutureProducer = client.create()?;
    const WINDOW: usize = 20_000;
    let mut i = 0;
    while i < n {
        let end = (i + WINDOW).min(n);
        let mut pending = Vec::with_capacity(end - i);
        for k in i..end {
            let id = format!("m{k}");
            let key = format!("k{}", k % 1024);
            let payload = format!(r#"{{"n":{k},"kind":"bench"}}"#);
            let record: FutureRecord<'_, str, str> = FutureRecord::to(topic)
                .key(key.as_str())
                .payload(payload.as_str())
                .headers(OwnedHeaders::new().insert(Header {
                    key: ID_HEADER,
                    value: Some(id.as_str()),
                }));
            let delivery = producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .context("queueing a message")?;
            pending.push(delivery);
        }
        for r in futures::future::join_all(pending).await {
            r.context("delivery report lost")?
                .map_err(|(e, _)| e)
                .context("producing")?;
        }
        i = end;
    }
    Ok(())
}

async fn kafka(args: &Args, db: &BenchDb, bg_pct: u32) -> Result<KafkaFigures> {
    let broker = Broker::start()?;
    let topic = format!("bench-ingress-{}", uuid::Uuid::new_v4().simple());
    create_topic(&broker, &topic, args.partitions).await?;
    let t = Instant::now();
    produce(args, &broker, &topic).await?;
    let produce_s = t.elapsed().as_secs_f64();
    eprintln!(
        "kafka: produced {} messages in {produce_s:.1} s",
        args.messages
    );

    let mut config = IngressConfig::new(
        KafkaConfig::new(broker.servers.clone()),
        format!("bench-{}", uuid::Uuid::new_v4().simple()),
        vec![TopicConfig {
            name: topic.clone(),
            handler: "enqueue".into(),
            business_id: Default::default(),
            queue: Some(QUEUE.into()),
        }],
        format!("{topic}-dlq"),
    );
    // No runner drains the queue here: let it hold every message.
    config.max_backlog = i64::try_from(args.messages)? + 1;
    if let Some(n) = args.partition_buffer {
        config.partition_buffer = n;
    }
    let handlers = HandlerRegistry::new().register(
        "enqueue",
        EnqueueJob {
            queue: QUEUE.into(),
            kind: "bench.ingested".into(),
        },
    );
    let cpu0 = CpuUse::now(&db.name);
    let broker0 = broker.cpu_ms();
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..args.consumers {
        handles.push(Ingress::start(
            Store::new(db.pool.clone()),
            config.clone(),
            handlers.clone(),
            CancellationToken::new(),
        )?);
    }
    let stats: Vec<_> = handles.iter().map(|h| h.stats()).collect();
    let total = args.messages as u64;
    let mut first: Option<(Instant, u64)> = None;
    let done = loop {
        let applied: u64 = stats.iter().map(|s| s.applied()).sum();
        let now = Instant::now();
        if applied > 0 && first.is_none() {
            first = Some((now, applied));
        }
        if applied >= total {
            break now;
        }
        if started.elapsed() > DRAIN_TIMEOUT {
            bail!("only {applied} of {total} messages committed after {DRAIN_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let cpu = CpuUse::now(&db.name).since(cpu0);
    let broker_ms = (broker.cpu_ms() - broker0) / args.messages as f64;
    for handle in handles {
        handle.shutdown().await?;
    }
    let (first_at, first_n) = first.context("nothing was committed")?;
    // Rate over what was committed after the first commit was seen.
    let span = done.duration_since(first_at).as_secs_f64();
    let per_s = if span > 0.0 {
        (total - first_n) as f64 / span
    } else {
        f64::INFINITY
    };

    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = $1")
        .bind(QUEUE)
        .fetch_one(&db.pool)
        .await?;
    let inbox: i64 = sqlx::query_scalar("SELECT count(DISTINCT business_id) FROM inbox")
        .fetch_one(&db.pool)
        .await?;
    ensure!(
        jobs == total as i64 && inbox == total as i64,
        "expected {total} jobs and inbox rows, found {jobs} jobs and {inbox} inbox rows"
    );
    Ok(KafkaFigures {
        messages: args.messages,
        per_s,
        join_s: first_at.duration_since(started).as_secs_f64(),
        produce_s,
        broker_ms,
        batches: stats.iter().map(|s| s.batches()).sum(),
        pauses: stats.iter().map(|s| s.pauses()).sum(),
        consumers: args.consumers,
        cpu: per_item(cpu, args.messages),
        bg_pct,
    })
}

// ---------------------------------------------------------------- webhooks

/// An exchange event body with id `id`.
fn event_body(id: &str) -> String {
    json!({
        "id": id,
        "type": "order.filled",
        "idempotency_key": format!("bench:{id}:place"),
        "exchange_order_id": format!("ord-{id}"),
        "filled_base": "0.10000000",
        "price": "100.00",
        "fee": "0.01",
        "created_at": "2026-01-01T00:00:00Z",
    })
    .to_string()
}

async fn webhooks(args: &Args, db: &BenchDb, bg_pct: u32) -> Result<WebhookFigures> {
    let store = Store::new(db.pool.clone());
    let registry = workflows::registry(Deps {
        exchange: Arc::new(SimulatedExchange::default()),
        notifier: Arc::new(SimulatedNotifier::new()),
        config: WorkflowsConfig::default(),
    })?;
    let state = AppState::with_config(
        store,
        ApiConfig {
            webhooks: WebhookProviders::new()
                .with(PROVIDER, Provider::new(Scheme::Stripe, &[SECRET])),
            ..ApiConfig::default()
        },
    )?
    .with_workflows(Arc::new(registry));
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/webhooks/{PROVIDER}", public.local_addr()?);
    let stop = CancellationToken::new();
    let server = {
        let stop = stop.clone();
        tokio::spawn(serve_listeners(public, admin, state, async move {
            stop.cancelled().await
        }))
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;

    // Warm up connections and caches (not counted; distinct ids so they are real deliveries).
    deliver_all(
        &client,
        &url,
        "warm",
        0..args.concurrency * 4,
        args.concurrency,
    )
    .await?;

    let cpu0 = CpuUse::now(&db.name);
    let t0 = Instant::now();
    let mut latencies =
        deliver_all(&client, &url, "evt", 0..args.webhooks, args.concurrency).await?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = CpuUse::now(&db.name).since(cpu0);
    stop.cancel();
    server.await??;

    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM inbox WHERE source = $1 AND dedupe_key LIKE 'evt%'",
    )
    .bind(format!("webhook:{PROVIDER}"))
    .fetch_one(&db.pool)
    .await?;
    ensure!(
        stored == args.webhooks as i64,
        "expected {} stored deliveries, found {stored}",
        args.webhooks
    );
    latencies.sort_by(f64::total_cmp);
    Ok(WebhookFigures {
        deliveries: args.webhooks,
        per_s: args.webhooks as f64 / wall,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        max_ms: latencies.last().copied().unwrap_or(0.0),
        cpu: per_item(cpu, args.webhooks),
        bg_pct,
    })
}

/// POSTs deliveries `{prefix}{i}` for `range` from `concurrency` tasks; every answer must be a
/// 2xx "accepted". Returns each request's latency in milliseconds.
async fn deliver_all(
    client: &reqwest::Client,
    url: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
    concurrency: usize,
) -> Result<Vec<f64>> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(range.start));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, prefix, next) = (
            client.clone(),
            url.to_string(),
            prefix.to_string(),
            next.clone(),
        );
        let end = range.end;
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= end {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let body = event_body(&format!("{prefix}{i}"));
                let t = chrono::Utc::now().timestamp();
                let signature = stripe_header(SECRET.as_bytes(), t, body.as_bytes());
                let sent = Instant::now();
                let resp = client
                    .post(&url)
                    .header(STRIPE_HEADER, signature)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                let status = resp.status();
                let text = resp.text().await?;
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                ensure!(
                    status.is_success() && text.contains("accepted"),
                    "delivery {prefix}{i}: {status} {text}"
                );
            }
        });
    }
    let mut all = Vec::with_capacity(range.len());
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok(all)
}

// ------------------------------------------------------------------ report

/// CPU milliseconds per item.
fn per_item(cpu: CpuUse, n: usize) -> CpuUse {
    let n = n.max(1) as f64;
    CpuUse {
        this_ms: cpu.this_ms / n,
        postgres_ms: cpu.postgres_ms / n,
    }
}

fn report(args: &Args, k: Option<KafkaFigures>, w: Option<WebhookFigures>) -> Result<()> {
    let mut rows: Vec<(&str, String)> = Vec::new();
    if let Some(k) = &k {
        eprintln!(
            "ingress/kafka: {} messages → committed jobs at {:.0} msgs/s with {} consumer(s) \
             (group join + first batch {:.2} s; {} batch transactions, {} pauses; bg {}%)",
            k.messages, k.per_s, k.consumers, k.join_s, k.batches, k.pauses, k.bg_pct
        );
        rows.extend([
            ("kafka messages", k.messages.to_string()),
            ("kafka msgs/s (→ committed jobs)", format!("{:.0}", k.per_s)),
            ("kafka join + first batch s", format!("{:.2}", k.join_s)),
            ("kafka produce s (not timed)", format!("{:.1}", k.produce_s)),
            ("kafka batch transactions", k.batches.to_string()),
            ("kafka partition pauses", k.pauses.to_string()),
            ("kafka consumers (one group)", k.consumers.to_string()),
            (
                "kafka record batches",
                if args.one_per_batch {
                    "one message each".to_string()
                } else {
                    format!("linger.ms {}", args.linger_ms)
                },
            ),
            (
                "kafka CPU ms/msg: bench / postgres / broker",
                format!(
                    "{:.3} / {:.3} / {:.3}",
                    k.cpu.this_ms, k.cpu.postgres_ms, k.broker_ms
                ),
            ),
            ("kafka bg_pct", k.bg_pct.to_string()),
        ]);
    }
    if let Some(w) = &w {
        eprintln!(
            "ingress/webhooks: {} deliveries at {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms \
             ({} clients; bg {}%)",
            w.deliveries, w.per_s, w.p50_ms, w.p99_ms, w.max_ms, args.concurrency, w.bg_pct
        );
        rows.extend([
            ("webhook deliveries", w.deliveries.to_string()),
            ("webhooks/s (→ 2xx)", format!("{:.0}", w.per_s)),
            ("webhook p50 ms", format!("{:.2}", w.p50_ms)),
            ("webhook p99 ms", format!("{:.2}", w.p99_ms)),
            ("webhook max ms", format!("{:.2}", w.max_ms)),
            ("webhook clients", args.concurrency.to_string()),
            (
                "webhook CPU ms/delivery: bench+api / postgres",
                format!("{:.3} / {:.3}", w.cpu.this_ms, w.cpu.postgres_ms),
            ),
            ("webhook bg_pct", w.bg_pct.to_string()),
        ]);
    }
    print_table(&rows);
    let doc = json!({
        "kafka_msgs_per_s": k.map(|k| k.per_s),
        "webhooks_per_s": w.map(|w| w.per_s),
        "webhook_p99_ms": w.map(|w| w.p99_ms),
        "webhook_p50_ms": w.map(|w| w.p50_ms),
        "kafka_messages": k.map(|k| k.messages),
        "kafka_join_s": k.map(|k| k.join_s),
        "webhook_deliveries": w.map(|w| w.deliveries),
        "webhook_clients": args.concurrency,
        "kafka_bg_pct": k.map(|k| k.bg_pct),
        "webhook_bg_pct": w.map(|w| w.bg_pct),
    });
    write_json(args.common.json.as_deref(), &doc)?;
    Ok(())
}
