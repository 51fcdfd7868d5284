//! An in-process OTLP/HTTP trace receiver for the tests: it serves `POST /v1/traces` (protobuf
//! `ExportTraceServiceRequest`, what the processes' exporter sends), decodes it with the
//! `opentelemetry-proto` crate's prost types, and keeps every span flattened with its
//! service, ids, parent and attributes, for the test to query.
// Each test binary that includes this uses a different part of it.
#![allow(dead_code)]
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{
    Body, EndpointExt, Response, Route, Server, handler, http::StatusCode, post, web::Data,
};
use prost::Message;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One received span.
#[derive(Debug, Clone)]
pub struct Span {
    /// The resource's `service.name`.
    pub service: String,
    /// The resource's `service.instance.id`, when set.
    pub instance: Option<String>,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    pub attributes: HashMap<String, String>,
    /// `(trace id, span id)` of each link.
    pub links: Vec<(String, String)>,
}

impl Span {
    /// An attribute's value as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// The receiver; dropped, it stops serving.
pub struct Receiver {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn decode(body: &[u8]) -> Result<Vec<Span>, prost::DecodeError> {
    let request = ExportTraceServiceRequest::decode(body)?;
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let resource = rs
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        let instance = resource.get("service.instance.id").cloned();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Span {
                    service: service.clone(),
                    instance: instance.clone(),
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent_span_id: hex::encode(&s.parent_span_id),
                    name: s.name,
                    attributes: attributes(&s.attributes),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                        .collect(),
                });
            }
        }
    }
    Ok(out)
}

#[handler]
async fn traces(body: Body, Data(spans): Data<&Arc<Mutex<Vec<Span>>>>) -> Response {
    let Ok(bytes) = body.into_bytes().await else {
        return Response::builder().status(StatusCode::BAD_REQUEST).finish();
    };
    match decode(&bytes) {
        Ok(decoded) => {
            spans
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(decoded);
            // An empty `ExportTraceServiceResponse`: everything accepted.
            Response::builder()
                .status(StatusCode::OK)
                .content_type("application/x-protobuf")
                .body(Vec::<u8>::new())
        }
        Err(_) => Response::builder().status(StatusCode::BAD_REQUEST).finish(),
    }
}

impl Receiver {
    /// Serves on a free loopback port.
    pub async fn start() -> Result<Receiver, BoxError> {
        let acceptor = TcpListener::bind("127.0.0.1:0").into_acceptor().await?;
        let addr = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .ok_or("the receiver has no socket address")?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = Route::new()
            .at("/v1/traces", post(traces))
            .data(spans.clone());
        let task = tokio::spawn(async move {
            let _ = Server::new_with_acceptor(acceptor).run(app).await;
        });
        Ok(Receiver { addr, spans, task })
    }

    /// The value of `OTEL_EXPORTER_OTLP_ENDPOINT` for the processes.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The spans of `trace_id`.
    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Waits until `done` holds for the spans received, or fails after `within` with what
    /// was received.
    pub async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&[Span]) -> bool,
    ) -> Result<Vec<Span>, BoxError> {
        let deadline = Instant::now() + within;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return Ok(spans);
            }
            if Instant::now() > deadline {
                let names: Vec<String> = spans
                    .iter()
                    .map(|s| {
                        format!(
                            "{}:{}@{}",
                            s.service,
                            s.name,
                            &s.trace_id[..8.min(s.trace_id.len())]
                        )
                    })
                    .collect();
                return Err(format!("timed out waiting for {what}; received {names:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
