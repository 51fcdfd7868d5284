//! One trace per business operation, across the real processes, checked against a real OTLP
//! receiver (`common/otlp.rs`, in this process): a trade POSTed with a W3C `traceparent` runs
//! through `ledgerflow` processes for the API, the worker and the Kafka edge (relay and
//! ingress, against Apache Kafka), the worker is killed with `kill -9` while the trade's
//! exchange call hangs, and a fresh worker finishes it. Checked:
//!
//! - the API's request span continues the caller's `traceparent`; the workflow's start is its
//!   child, and the workflow row stores that context;
//! - the restarted worker's attempts continue the ORIGINAL trace from the context stored with
//!   the jobs (a child of the workflow's start, not a new root), with the step attempt's
//!   fields (workflow id, step, attempt, lease token, execution path) and the external call's
//!   idempotency key;
//! - the trade's domain event goes outbox row → relay → Kafka (`traceparent` header) →
//!   ingress → job, each a child of the one before, still in the caller's trace;
//! - every span the API, the restarted worker and the edge exported in that trace has its
//!   parent in the trace (or is the caller's child): no orphan, no second root;
//! - the logs are JSON, and a line logged in the trade's steps carries its trace id;
//! - a webhook that arrives with a `traceparent` continues its sender's trace: the intake's
//!   request span and the start of the workflow that processes it.
//!
//! Logs: `$CARGO_TARGET_TMPDIR/tracing_e2e/`.
#[path = "common/broker.rs"]
mod broker;
mod common;
#[path = "common/otlp.rs"]
mod otlp;
#[path = "common/payments_load.rs"]
mod payments_load;
#[path = "common/private_pg.rs"]
mod private_pg;
#[path = "common/proc.rs"]
mod proc;

use broker::Broker;
use common::wait_for;
use ledgerflow_engine::testing::TestDb;
use ledgerflow_payments::exchange::sim::SimConfig;
use ledgerflow_payments::workflows::EVENTS_TOPIC;
use otlp::{Receiver, Span};
use payments_load::PROVIDER;
use payments_load::{Request, Side, TestResult, fund_user};
use proc::Proc;
use serde_json::json;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The queue the ingress turns the trade's events into; no worker runs it, so the job stays
/// for the test to read.
const CONSUMED_QUEUE: &str = "traced";
const CONSUMED_KIND: &str = "payments.event.consumed";

/// A server that accepts connections and never answers: the first worker's exchange, so its
/// order call hangs after its intent was recorded, until the worker is killed.
async fn black_hole() -> TestResult<(String, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    Ok((url, task))
}

fn by_name<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn one<'a>(spans: &'a [Span], name: &str) -> TestResult<&'a Span> {
    match by_name(spans, name).as_slice() {
        [s] => Ok(s),
        other => Err(format!("expected one {name:?} span, got {}", other.len()).into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trade_is_one_trace_across_api_worker_kill_9_restart_and_kafka() -> TestResult {
    let t0 = Instant::now();
    let db = TestDb::new().await?;
    let broker = Broker::own()?;
    broker.create_topics(&[EVENTS_TOPIC]).await?;
    let receiver = Receiver::start().await?;
    let (hang_url, _hang) = black_hole().await?;

    let port = || private_pg::free_port().map(|p| format!("127.0.0.1:{p}"));
    let (api_addr, admin_addr) = (port()?, port()?);
    let secret = format!("tracing-secret-{}", Uuid::now_v7().simple());
    let sim = payments_load::start_simulator(
        &api_addr,
        &secret,
        SimConfig {
            fill_delay_ms: 200,
            ..SimConfig::default()
        },
    )
    .await?;
    let sim_url = sim.base_url();

    let kafka = json!({ "bootstrap-servers": broker.servers() });
    let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tracing_e2e");
    std::fs::create_dir_all(&logs)?;
    let env = |name: &str, exchange: &str, generation: u32| -> Vec<(String, String)> {
        [
            ("DATABASE_URL", db.url.clone()),
            ("LEDGERFLOW_API_ADDR", api_addr.clone()),
            ("LEDGERFLOW_ADMIN_ADDR", admin_addr.clone()),
            ("LEDGERFLOW_OPS_ADDR", "127.0.0.1:0".to_string()),
            ("LEDGERFLOW_EXCHANGE_URL", exchange.to_string()),
            ("LEDGERFLOW_NOTIFIER_URL", sim_url.clone()),
            (
                "LEDGERFLOW_WEBHOOK_PROVIDERS",
                json!({ PROVIDER: {"scheme": "stripe"} }).to_string(),
            ),
            ("LEDGERFLOW_WEBHOOK_SECRETS_EXCHANGE", secret.clone()),
            ("LEDGERFLOW_LEASE_TTL_SECS", "2".to_string()),
            ("LEDGERFLOW_POLL_MS", "200".to_string()),
            ("LEDGERFLOW_QUEUES", "default=8".to_string()),
            ("LEDGERFLOW_SHUTDOWN_GRACE_SECS", "2".to_string()),
            (
                "LEDGERFLOW_RELAY_CONFIG",
                json!({ "kafka": kafka, "poll-interval-ms": 50 }).to_string(),
            ),
            (
                "LEDGERFLOW_INGRESS_CONFIG",
                json!({
                    "kafka": kafka,
                    "group-id": format!("tracing-{}", Uuid::now_v7().simple()),
                    "topics": [{
                        "name": EVENTS_TOPIC,
                        "handler": format!("enqueue:{CONSUMED_QUEUE}:{CONSUMED_KIND}"),
                        "queue": CONSUMED_QUEUE,
                    }],
                    "dead-letter-topic": "tracing-dlq",
                    "commit-interval-ms": 200,
                })
                .to_string(),
            ),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_SERVICE_NAME", format!("ledgerflow-{name}")),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                format!("service.instance.id={name}-{generation}"),
            ),
            // Export within 100 ms, so the first worker's finished spans are out before
            // its kill.
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
            ("RUST_LOG", "info,librdkafka=warn,rdkafka=warn".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    let log = |name: &str| logs.join(format!("{name}.log"));
    let mut api = Proc::new("api", "api,admin", env("api", &sim_url, 1), log("api"))?;
    let mut worker = Proc::new(
        "worker",
        "worker",
        env("worker", &hang_url, 1),
        log("worker"),
    )?;
    let mut edge = Proc::new(
        "edge",
        "relay,ingress",
        env("edge", &sim_url, 1),
        log("edge"),
    )?;
    api.spawn()?;
    worker.spawn()?;
    edge.spawn()?;

    let result = async {
        let trade = Request::Trade {
            side: Side::Buy,
            qty: 1_000_000,
            price: 100_000,
        };
        let user = fund_user(&db.pool, "traced@example.com", vec![trade.clone()]).await?;
        // The caller's span: the API's request span must be its child.
        let (caller_trace, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let accepted = loop {
            let sent = client
                .post(format!("http://{api_addr}{}", trade.path()))
                .bearer_auth(&user.api_key)
                .header("Idempotency-Key", "traced-trade-1")
                .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
                .json(&trade.body())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => break r.json::<serde_json::Value>().await?,
                Ok(r) if r.status().is_client_error() => {
                    return Err(format!("trade refused: {}", r.text().await?).into());
                }
                _ if Instant::now() > deadline => return Err("the API never accepted".into()),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        assert!(accepted["id"].is_string(), "{accepted}");
        let workflow: Uuid =
            sqlx::query_scalar("SELECT id FROM workflows WHERE kind = 'payments.trade'")
                .fetch_one(&db.pool)
                .await?;
        let stored: Option<String> =
            sqlx::query_scalar("SELECT traceparent FROM workflows WHERE id = $1")
                .bind(workflow)
                .fetch_one(&db.pool)
                .await?;
        let stored = stored.ok_or("the workflow stored no trace context")?;
        if !stored.starts_with(&format!("00-{caller_trace}-")) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Err(format!(
                "the workflow stored {stored}, not the caller's trace; received {:#?}",
                receiver.spans()
            )
            .into());
        }

        // The first worker hangs in the order call, its intent recorded: kill -9 it there.
        wait_for(
            &db.pool,
            "SELECT count(*) FROM workflow_steps
             WHERE step = 'place_order' AND call_state = 'calling'",
            1,
            Duration::from_secs(60),
        )
        .await?;
        // Its finished spans (validate, hold) go out within the export delay.
        receiver
            .wait_until(
                "the first worker's validate step",
                Duration::from_secs(10),
                |s| {
                    s.iter().any(|s| {
                        s.instance.as_deref() == Some("worker-1") && s.name == "step validate"
                    })
                },
            )
            .await?;
        worker.kill()?;
        worker.env = env("worker", &sim_url, 2);
        worker.spawn()?;

        wait_for(
            &db.pool,
            &format!(
                "SELECT count(*) FROM workflows WHERE id = '{workflow}' AND state = 'completed'"
            ),
            1,
            Duration::from_secs(90),
        )
        .await?;
        wait_for(
            &db.pool,
            &format!("SELECT count(*) FROM jobs WHERE kind = '{CONSUMED_KIND}'"),
            1,
            Duration::from_secs(60),
        )
        .await?;
        let consumed: Option<String> = sqlx::query_scalar(&format!(
            "SELECT traceparent FROM jobs WHERE kind = '{CONSUMED_KIND}' ORDER BY id LIMIT 1"
        ))
        .fetch_one(&db.pool)
        .await?;
        let consumed = consumed.ok_or("the consumed event's job stored no trace context")?;

        // A webhook that arrives with the sender's traceparent: its intake and the workflow it
        // starts continue the sender's trace.
        let (sender_trace, sender_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
        let body = serde_json::to_vec(&json!({
            "id": "evt_traced_sender",
            "type": "order.cancelled",
            "idempotency_key": "traced-nobody:place_order",
            "exchange_order_id": "ord_traced_nobody",
            "created_at": chrono::Utc::now(),
        }))?;
        let signature = ledgerflow_payments::exchange::signature::stripe_header(
            secret.as_bytes(),
            chrono::Utc::now().timestamp(),
            &body,
        );
        let answer = client
            .post(format!("http://{api_addr}/v1/webhooks/{PROVIDER}"))
            .header(ledgerflow_payments::exchange::signature::STRIPE_HEADER, signature)
            .header("content-type", "application/json")
            .header("traceparent", format!("00-{sender_trace}-{sender_span}-01"))
            .body(body)
            .send()
            .await?;
        assert!(answer.status().is_success(), "{}", answer.text().await?);
        let started: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM workflows WHERE kind = 'payments.webhook' AND traceparent LIKE $1",
        )
        .bind(format!("00-{sender_trace}-%"))
        .fetch_one(&db.pool)
        .await?;
        assert_eq!(started, 1, "the webhook's workflow continues the sender's trace");

        // Stop everything gracefully: whatever is buffered is exported.
        for p in [&mut api, &mut worker, &mut edge] {
            p.stop(Duration::from_secs(10))?;
        }
        let intake = receiver.trace(sender_trace);
        let request = one(&intake, "POST /v1/webhooks/{provider}")?;
        assert_eq!(request.parent_span_id, sender_span, "the intake continues the sender");
        let start = one(&intake, "workflow.start")?;
        assert_eq!(start.parent_span_id, request.span_id);
        let spans = receiver.trace(caller_trace);
        check_trace(&spans, caller_span, workflow, &consumed)?;
        check_logs(&worker.log, caller_trace)
    }
    .await;
    if result.is_err() {
        for p in [&api, &worker, &edge] {
            eprintln!("---- last lines of {} ----\n{}", p.name, p.tail(40));
        }
    }
    for p in [&mut api, &mut worker, &mut edge] {
        let _ = p.stop(Duration::from_secs(5));
    }
    sim.stop().await?;
    eprintln!("tracing e2e finished in {:.1}s", t0.elapsed().as_secs_f64());
    result
}

/// With tracing on the logs are JSON, and what the restarted worker logged about the trade's
/// in-doubt call (the intent the killed worker left) carries the caller's trace id.
fn check_logs(log: &std::path::Path, caller_trace: &str) -> TestResult {
    let text = std::fs::read_to_string(log)?;
    let second = text
        .split("===== worker generation 2 =====")
        .nth(1)
        .ok_or("no second worker generation in the log")?;
    let line = second
        .lines()
        .find(|l| l.contains("workflow step in doubt"))
        .ok_or("the restarted worker logged no in-doubt step")?;
    let json: serde_json::Value = serde_json::from_str(line)?;
    assert_eq!(json["trace_id"], caller_trace, "{line}");
    assert_eq!(json["span_id"].as_str().map(str::len), Some(16), "{line}");
    Ok(())
}

/// The assertions over the caller's trace (see the module docs).
fn check_trace(spans: &[Span], caller_span: &str, workflow: Uuid, consumed: &str) -> TestResult {
    let wf = workflow.to_string();
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();

    // API: the request continues the caller; the start is its child.
    let request = one(spans, "POST /v1/trades")?;
    assert_eq!(request.service, "ledgerflow-api");
    assert_eq!(
        request.parent_span_id, caller_span,
        "the request continues the caller"
    );
    let start = by_name(spans, "workflow.start")
        .into_iter()
        .find(|s| s.attr("workflow.id") == Some(wf.as_str()))
        .ok_or("no workflow.start span for the trade")?;
    assert_eq!(start.parent_span_id, request.span_id);

    // The first worker ran the first steps in this trace before it died.
    assert!(
        spans
            .iter()
            .any(|s| s.instance.as_deref() == Some("worker-1") && s.name == "step validate"),
        "the first worker's validate step is in the trace"
    );

    // The restarted worker continues the stored context: a job span whose parent is the
    // workflow's start (what the rescued job row stores), not a new root.
    let second: Vec<&Span> = spans
        .iter()
        .filter(|s| s.instance.as_deref() == Some("worker-2"))
        .collect();
    assert!(
        second
            .iter()
            .any(|s| s.name == "job ledgerflow.workflow" && s.parent_span_id == start.span_id),
        "a job of the restarted worker continues the workflow's start"
    );
    for step in ["place_order", "settle", "notify"] {
        let name = format!("step {step}");
        let run = second
            .iter()
            .find(|s| s.name == name && s.attr("workflow.id") == Some(wf.as_str()))
            .ok_or_else(|| format!("the restarted worker's {name:?} is not in the trace"))?;
        for field in ["attempt", "lease.token", "job.id", "exec.path"] {
            assert!(
                run.attr(field).is_some_and(|v| !v.is_empty()),
                "{name} has {field}: {:?}",
                run.attributes
            );
        }
        assert!(
            ["inline", "batch", "locked"].contains(&run.attr("exec.path").unwrap_or_default()),
            "{:?}",
            run.attributes
        );
    }
    let call = second
        .iter()
        .find(|s| s.name == "external_call")
        .ok_or("the restarted worker's order call is not in the trace")?;
    assert!(
        call.attr("idempotency_key").is_some_and(|k| !k.is_empty()),
        "{:?}",
        call.attributes
    );
    let call_parent = spans
        .iter()
        .find(|s| s.span_id == call.parent_span_id)
        .ok_or("the call's parent is missing")?;
    assert_eq!(call_parent.name, "step place_order");

    // Outbox row → relay → Kafka → ingress → job.
    let outbox = one(spans, "outbox.insert")?;
    assert_eq!(outbox.instance.as_deref(), Some("worker-2"));
    let publish = one(spans, &format!("{EVENTS_TOPIC} publish"))?;
    assert_eq!(publish.service, "ledgerflow-edge");
    assert_eq!(
        publish.parent_span_id, outbox.span_id,
        "the relay continues the outbox row"
    );
    let process = one(spans, &format!("{EVENTS_TOPIC} process"))?;
    assert_eq!(process.service, "ledgerflow-edge");
    assert_eq!(
        process.parent_span_id, publish.span_id,
        "the ingress continues the message"
    );
    assert!(
        consumed.contains(&process.span_id),
        "the consumed event's job ({consumed}) continues the ingress span {}",
        process.span_id
    );

    // No orphans from the processes that lived to export everything.
    for s in spans {
        let whole = s.service != "ledgerflow-worker" || s.instance.as_deref() == Some("worker-2");
        if whole && s.span_id != request.span_id {
            assert!(
                ids.contains(s.parent_span_id.as_str()),
                "{}:{} ({:?}) has a parent outside the trace",
                s.service,
                s.name,
                s.instance
            );
        }
    }
    Ok(())
}
