//! A process's logs and traces: the `tracing` subscriber every binary installs, with an
//! OpenTelemetry layer exporting over OTLP/HTTP (protobuf) when an endpoint is configured the
//! standard way (docs/decisions/0011).
//!
//! Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set and `OTEL_SDK_DISABLED` is not `true`. The SDK reads the rest from the standard
//! variables: `OTEL_SERVICE_NAME` (default here: `ledgerflow`), `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER`/`_ARG`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_HEADERS`/`_TIMEOUT`. Off,
//! the subscriber is exactly the plain log formatter it always was: no layer, no propagator,
//! and the engine's [`ledgerflow_engine::trace::enabled`] stays false, so spans for the trace
//! are not even built.
//!
//! Logs: text by default, JSON with `LEDGERFLOW_LOG_FORMAT=json`; with tracing on they are
//! JSON unless `LEDGERFLOW_LOG_FORMAT=text`, and each line carries the `trace_id` and
//! `span_id` of the span it was logged in. `LEDGERFLOW_TRACE_FILTER` (an `EnvFilter`
//! directive; default: Ledgerflow's own crates at `info`) picks the spans exported.
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::time::Duration;
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The spans exported when `LEDGERFLOW_TRACE_FILTER` is not set: Ledgerflow's own, none of its
/// dependencies' (a span per apalis task or hyper connection would bury the business ones).
const DEFAULT_TRACE_FILTER: &str = "off,ledgerflow=info,ledgerflow_engine=info,\
    ledgerflow_api=info,ledgerflow_workers=info,ledgerflow_payments=info";

/// What [`init`] installed; [`Telemetry::shutdown`] flushes the spans not exported yet.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// True when traces are exported.
    pub fn tracing(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered and stops the exporter (a no-op with tracing off).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK's shutdown blocks until its export thread is done, and that thread's HTTP
        // requests run on this runtime: block a blocking-pool thread, not a worker.
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            eprintln!("tracing: flushing spans at shutdown failed: {e}");
        }
    }
}

/// True when the environment asks for traces (see the module docs).
pub fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTo {
    Stdout,
    /// For binaries whose stdout is their result (the benchmark driver).
    Stderr,
}

impl LogTo {
    fn writer(self) -> BoxMakeWriter {
        match self {
            LogTo::Stdout => BoxMakeWriter::new(std::io::stdout),
            LogTo::Stderr => BoxMakeWriter::new(std::io::stderr),
        }
    }
}

/// Installs the process's subscriber: logs filtered by `RUST_LOG` (default
/// `default_log_filter`) and, when configured, the OpenTelemetry layer. Must run inside a
/// tokio runtime when tracing is on (the exporter sends on it).
pub fn init(default_log_filter: &str, log_to: LogTo) -> anyhow::Result<Telemetry> {
    let log_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_log_filter));
    let format = std::env::var("LEDGERFLOW_LOG_FORMAT").ok();
    if !otlp_configured() {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(log_filter)
            .with_writer(log_to.writer());
        if format.as_deref() == Some("json") {
            builder.json().init();
        } else {
            builder.init();
        }
        return Ok(Telemetry { provider: None });
    }
    let provider = provider()?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let trace_filter = std::env::var("LEDGERFLOW_TRACE_FILTER")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_TRACE_FILTER));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("ledgerflow"))
        .with_filter(trace_filter);
    let logs = if format.as_deref() == Some("text") {
        tracing_subscriber::fmt::layer()
            .with_writer(log_to.writer())
            .with_filter(log_filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(log_to.writer())
            .fmt_fields(JsonFields::new())
            .event_format(JsonWithTrace(tracing_subscriber::fmt::format().json()))
            .with_filter(log_filter)
            .boxed()
    };
    tracing_subscriber::registry().with(otel).with(logs).init();
    ledgerflow_engine::trace::enable();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The tracer provider: the OTLP/HTTP exporter behind the SDK's batch processor, with the
/// resource the standard variables describe.
fn provider() -> anyhow::Result<SdkTracerProvider> {
    let client = OtlpHttp {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
        runtime: tokio::runtime::Handle::try_current()
            .map_err(|_| anyhow::anyhow!("tracing needs a tokio runtime"))?,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(client)
        .build()?;
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains("service.name="));
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name("ledgerflow");
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The exporter's HTTP client: the workspace's reqwest (so no second HTTP stack is built). The
/// SDK's batch processor exports from a thread of its own, outside any runtime, so each request
/// is spawned on the process's runtime and awaited from there.
#[derive(Debug)]
struct OtlpHttp {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OtlpHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let send = async move {
            let (parts, body) = request.into_parts();
            let answer = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let status = answer.status();
            let headers = answer.headers().clone();
            let body = answer.bytes().await?;
            let mut response = Response::builder().status(status).body(body)?;
            *response.headers_mut() = headers;
            Ok::<_, HttpError>(response)
        };
        self.runtime.spawn(send).await?
    }
}

/// The JSON log line of `tracing_subscriber`, plus the `trace_id` and `span_id` of the span
/// the event was logged in (when it is part of a trace).
struct JsonWithTrace(Format<Json>);

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let cx = tracing::Span::current().context();
        let span = cx.span();
        let ids = span.span_context();
        match line.strip_suffix("}\n") {
            Some(object) if ids.is_valid() => {
                let (trace_id, span_id) = (ids.trace_id(), ids.span_id());
                writeln!(
                    writer,
                    "{object},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
                )
            }
            _ => writer.write_str(&line),
        }
    }
}
