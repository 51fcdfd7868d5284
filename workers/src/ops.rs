//! The operations endpoint of every process: `/healthcheck` (liveness),
//! `/readyz` (PostgreSQL reachable) and `/metrics` (Prometheus text: the
//! process's own registry — job durations and outcomes, workflow steps and
//! external calls, cron tick lateness, relay lag, see `metrics.rs` — the
//! Kafka consumer lag of this process's ingress consumers and their
//! dead-letter counters, and — in a process with the api or admin role — the
//! API's whole registry: HTTP requests, queue depth and wait, workflow
//! states, backlogs; without it, `ledgerflow_queue_jobs` is read here). The
//! public API listener serves no metrics: queue names, states and volumes
//! are not for the internet. `docs/metrics.md` is the catalogue.
//!
//! A deliberately tiny HTTP/1.1 responder on a tokio listener: probes and
//! scrapes only need a status line and a short body, and this keeps the
//! worker image free of a web framework.
use crate::ingress::IngressStats;
use futures::future::BoxFuture;
use ledgerflow_engine::Store;
use prometheus::{Encoder, Registry, TextEncoder};
use sqlx::PgPool;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// More Prometheus text for `/metrics`: the API's registry, rendered on
/// each scrape (`ledgerflow_api::AppState::metrics`).
pub type MetricsSource = Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>;

/// Binds `addr` and serves until the returned task is aborted.
pub async fn serve(addr: SocketAddr, pool: PgPool) -> std::io::Result<JoinHandle<()>> {
    serve_with(addr, pool, Vec::new(), None, Registry::new()).await
}

/// Like [`serve`]; `/metrics` also exports the consumer lag that each of
/// `ingress` measures (`ledgerflow_kafka_consumer_lag{group,topic,partition}`),
/// and `api`'s text when given. The API's text carries its own
/// `ledgerflow_kafka_consumer_lag` (the copy in Postgres), so with `api`
/// the live one is left out: one family of a name per scrape. The same holds
/// for `ledgerflow_queue_jobs`. `registry` is the process's own (the
/// roles' metrics, `crate::metrics`).
pub async fn serve_with(
    addr: SocketAddr,
    pool: PgPool,
    ingress: Vec<Arc<IngressStats>>,
    api: Option<MetricsSource>,
    registry: Registry,
) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "ops endpoint listening");
    let ingress = Arc::new(ingress);
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let pool = pool.clone();
            let ingress = ingress.clone();
            let api = api.clone();
            let registry = registry.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n =
                    match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                        Ok(Ok(n)) => n,
                        _ => return,
                    };
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = respond(path, &pool, &ingress, api.as_ref(), &registry).await;
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    }))
}

async fn respond(
    path: &str,
    pool: &PgPool,
    ingress: &[Arc<IngressStats>],
    api: Option<&MetricsSource>,
    registry: &Registry,
) -> (&'static str, String) {
    match path {
        "/healthcheck" => ("200 OK", "ok\n".into()),
        "/readyz" => {
            let ping = tokio::time::timeout(
                Duration::from_secs(2),
                sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool),
            )
            .await;
            match ping {
                Ok(Ok(_)) => ("200 OK", "ready\n".into()),
                _ => ("503 Service Unavailable", "postgres unreachable\n".into()),
            }
        }
        "/metrics" => {
            let mut out = own_metrics(registry);
            match api {
                Some(api) => out.push_str(&api().await),
                None => {
                    queue_jobs(&mut out, pool).await;
                    consumer_lag(&mut out, ingress);
                }
            }
            dead_letter_copies(&mut out, ingress);
            ("200 OK", out)
        }
        _ => ("404 Not Found", "not found\n".into()),
    }
}

/// The process registry's metrics in the text format.
fn own_metrics(registry: &Registry) -> String {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::error!(error = %e, "metrics: encoding failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// `ledgerflow_queue_jobs`, the same gauge (name, labels, query:
/// `Store::queue_depths`) as the API's, for a process without the API's registry.
async fn queue_jobs(out: &mut String, pool: &PgPool) {
    out.push_str(
        "# HELP ledgerflow_queue_jobs Live jobs per queue and state (available, scheduled, \
         retryable, running)\n# TYPE ledgerflow_queue_jobs gauge\n",
    );
    // Live states only: each is served by a partial index, so this stays
    // cheap however much finished history the table holds.
    let depths = match Store::new(pool.clone()).queue_depths().await {
        Ok(depths) => depths,
        Err(e) => {
            tracing::warn!(error = %e, "metrics: queue depth query failed");
            Vec::new()
        }
    };
    for (queue, state, n) in depths {
        let queue = escape_label(&queue);
        let _ = writeln!(
            out,
            "ledgerflow_queue_jobs{{queue=\"{queue}\",state=\"{}\"}} {n}",
            state.as_str()
        );
    }
}

/// The lag of every partition assigned to one of `ingress`, as its consumer
/// last measured it (every `lag-interval-ms`; a scrape never waits on the
/// brokers).
fn consumer_lag(out: &mut String, ingress: &[Arc<IngressStats>]) {
    if ingress.is_empty() {
        return;
    }
    out.push_str(
        "# HELP ledgerflow_kafka_consumer_lag Messages in a partition after the consumer \
         group's position (high watermark minus the committed offset, or the offset this \
         process stored when newer), per partition assigned to this process.\n\
         # TYPE ledgerflow_kafka_consumer_lag gauge\n",
    );
    for stats in ingress {
        for l in stats.consumer_lag() {
            let _ = writeln!(
                out,
                "ledgerflow_kafka_consumer_lag{{group=\"{}\",topic=\"{}\",partition=\"{}\"}} {}",
                escape_label(&l.group),
                escape_label(&l.topic),
                l.partition,
                l.lag
            );
        }
    }
}

/// This process' dead letters and their topic copies (counters since start;
/// the copies still owed are `ledgerflow_dead_letter_copies_pending` on the
/// API's `/metrics`, read from Postgres).
fn dead_letter_copies(out: &mut String, ingress: &[Arc<IngressStats>]) {
    if ingress.is_empty() {
        return;
    }
    let sum = |f: fn(&IngressStats) -> u64| ingress.iter().map(|s| f(s)).sum::<u64>();
    for (name, help, value) in [
        (
            "ledgerflow_dead_letters_recorded_total",
            "Poison messages this process recorded in dead_letters.",
            sum(|s| s.dead_letters().recorded()),
        ),
        (
            "ledgerflow_dead_letter_copies_published_total",
            "Dead-letter copies this process published to the dead-letter topic.",
            sum(|s| s.dead_letters().copies_published()),
        ),
        (
            "ledgerflow_dead_letter_copy_failures_total",
            "Failed publish attempts of dead-letter copies (each is retried).",
            sum(|s| s.dead_letters().copy_failures()),
        ),
    ] {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
        );
    }
}

/// Escapes a Prometheus label value (queue names are user-chosen).
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
