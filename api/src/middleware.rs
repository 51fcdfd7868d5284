//! The one middleware both listeners wrap their routes in. In order, it:
//!
//! 1. counts the request in flight and starts its timer;
//! 2. gives the request an id (a sane incoming `X-Request-Id`, or a new
//!    UUID), runs it in a `request` tracing span carrying that id — so an
//!    internal error is logged with it — and answers it in `X-Request-Id`;
//!    with tracing on, that span continues an incoming W3C `traceparent`
//!    (docs/decisions/0011);
//! 3. refuses a URI with a control character in its decoded path or query
//!    (400, [`crate::input::check_uri`]);
//! 4. refuses a body over the limit with 413 — by `Content-Length` when
//!    present, and otherwise by reading the body into memory up to the limit
//!    and stopping there (chunked bodies without a length are bounded the
//!    same way, so memory per request is bounded by the limit);
//! 5. refuses a JSON body with a duplicate key or a U+0000 (400,
//!    [`crate::json_body::check_json_body`]), except on the routes whose
//!    handlers verify raw bytes first ([`Limits::raw_bodies`]: webhooks,
//!    whose signature decides before anything else);
//! 6. runs the request under a deadline (503 `timeout` problem past it),
//!    with its client address at hand for [`crate::throttle`];
//! 7. turns any error poem or poem-openapi raised (unknown route, bad JSON,
//!    missing credentials …) into an RFC 7807 problem (see [`crate::error`]),
//!    adding the `Allow` header to a 405 (RFC 9110 §15.5.6);
//! 8. records the status and latency under the matched route template.
//!
//! poem's own `SizeLimit` was not used: it answers 411 to bodies without a
//! `Content-Length` instead of bounding them.
use crate::error::{Error, from_poem};
use crate::metrics::Metrics;
use futures::StreamExt;
use poem::http::{HeaderValue, Method, StatusCode, header};
use poem::{Body, Endpoint, IntoResponse, Request, Response};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// The header carrying a request's id, in both directions.
pub const REQUEST_ID: &str = "x-request-id";

/// Limits the middleware enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted request body, in bytes.
    pub body_bytes: usize,
    /// Longest time to answer a request (reading its body included).
    pub request_timeout: Duration,
    /// Path prefixes whose handlers read and verify the raw body themselves
    /// (webhooks): the middleware does not judge their JSON.
    pub raw_bodies: &'static [&'static str],
}

/// Route templates of one listener, to label metrics without raw paths.
#[derive(Debug, Clone)]
pub struct Routes {
    templates: Vec<Vec<String>>,
    /// The methods each template answers, for a 405's `Allow` header.
    methods: BTreeMap<String, Vec<Method>>,
}

impl Routes {
    /// Templates like `/v1/jobs/{id}`; `{…}` matches any one segment.
    pub fn new(templates: &[&str]) -> Self {
        Self {
            templates: templates
                .iter()
                .map(|t| t.split('/').map(str::to_string).collect())
                .collect(),
            methods: BTreeMap::new(),
        }
    }

    /// Records that `template` answers `method` (for the `Allow` header).
    pub fn allow(mut self, template: &str, method: Method) -> Self {
        let methods = self.methods.entry(template.to_string()).or_default();
        if !methods.contains(&method) {
            methods.push(method);
        }
        self
    }

    /// Records every operation of an OpenAPI document (its `paths`).
    pub fn allow_spec(mut self, spec: &str) -> Self {
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(spec) else {
            return self;
        };
        let Some(paths) = doc.get("paths").and_then(serde_json::Value::as_object) else {
            return self;
        };
        for (template, ops) in paths {
            for name in ops.as_object().into_iter().flat_map(|o| o.keys()) {
                if let Ok(method) = Method::from_bytes(name.to_ascii_uppercase().as_bytes()) {
                    self = self.allow(template, method);
                }
            }
        }
        self
    }

    /// The `Allow` value for `path`: the methods of the template it
    /// matches (`HEAD` wherever `GET` is answered, as poem answers it).
    pub fn allow_header(&self, path: &str) -> Option<String> {
        let methods = self.methods.get(&self.label(path))?;
        let mut names: Vec<&str> = methods.iter().map(Method::as_str).collect();
        if methods.contains(&Method::GET) && !methods.contains(&Method::HEAD) {
            names.push("HEAD");
        }
        Some(names.join(", "))
    }

    /// The template `path` matches (exact segments first), or `unmatched`.
    pub fn label(&self, path: &str) -> String {
        let segs: Vec<&str> = path.split('/').collect();
        let mut best: Option<(&Vec<String>, usize)> = None;
        for t in &self.templates {
            if t.len() != segs.len() {
                continue;
            }
            let mut exact = 0;
            let matches = t.iter().zip(&segs).all(|(a, b)| {
                if a.starts_with('{') {
                    true
                } else if a == b {
                    exact += 1;
                    true
                } else {
                    false
                }
            });
            if matches && best.is_none_or(|(_, e)| exact > e) {
                best = Some((t, exact));
            }
        }
        best.map_or_else(|| "unmatched".to_string(), |(t, _)| t.join("/"))
    }
}

/// Wraps `ep` with the behaviour described in the module docs.
pub fn wrap<E: Endpoint + 'static>(
    ep: E,
    listener: &'static str,
    routes: Routes,
    limits: Limits,
    metrics: Arc<Metrics>,
) -> impl Endpoint<Output = Response> {
    let routes = Arc::new(routes);
    poem::EndpointExt::around(ep, move |ep, req| {
        let routes = routes.clone();
        let limits = limits.clone();
        let metrics = metrics.clone();
        async move {
            let started = Instant::now();
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let route = routes.label(&path);
            let id = request_id(&req);
            let span = tracing::info_span!("request", request_id = %id, listener, %method, route,
                otel.name = tracing::field::Empty, otel.kind = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty);
            continue_trace(&span, &req, &method, &route);
            let gauge = metrics.in_flight.with_label_values(&[listener]);
            gauge.inc();
            let client = match req.remote_addr().0 {
                poem::Addr::SocketAddr(a) => Some(a.ip()),
                _ => None,
            };
            let span_of_status = span.clone();
            let work = handle(&ep, req, &limits).instrument(span);
            let mut resp = crate::throttle::CLIENT.scope(client, work).await;
            gauge.dec();
            if resp.status() == StatusCode::METHOD_NOT_ALLOWED
                && let Some(allow) = routes.allow_header(&path)
                && let Ok(value) = HeaderValue::from_str(&allow)
            {
                resp.headers_mut().insert(header::ALLOW, value);
            }
            if let Ok(value) = HeaderValue::from_str(&id) {
                resp.headers_mut().insert(REQUEST_ID, value);
            }
            if ledgerflow_engine::trace::enabled() {
                span_of_status.record("http.response.status_code", resp.status().as_u16());
            }
            let status = resp.status().as_u16().to_string();
            metrics
                .requests
                .with_label_values(&[listener, method.as_str(), route.as_str(), status.as_str()])
                .inc();
            metrics
                .duration
                .with_label_values(&[listener, method.as_str(), route.as_str()])
                .observe(started.elapsed().as_secs_f64());
            Ok(resp)
        }
    })
}

/// With tracing on, names the request's span for its trace (`POST /v1/trades`: the route
/// template, never the raw path) and makes it a child of the caller's span when the request
/// carries a W3C `traceparent` (a client, a webhook sender), else the root of a new trace.
fn continue_trace(span: &tracing::Span, req: &Request, method: &str, route: &str) {
    if !ledgerflow_engine::trace::enabled() {
        return;
    }
    span.record("otel.name", format!("{method} {route}"));
    span.record("otel.kind", "server");
    let incoming = req
        .headers()
        .get(ledgerflow_engine::trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok());
    ledgerflow_engine::trace::continue_from(span, incoming);
}

/// The client's `X-Request-Id` when it is 1–64 characters of
/// `[A-Za-z0-9._-]` (safe to log and echo), otherwise a new UUID.
fn request_id(req: &Request) -> String {
    req.headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_string)
}

/// Whether the request says its body is JSON (`application/json`, `…+json`).
fn is_json(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| v == "application/json" || v.ends_with("+json"))
}

async fn handle<E: Endpoint>(ep: &E, req: Request, limits: &Limits) -> Response {
    let seconds = limits.request_timeout.as_secs();
    let work = async {
        if let Err(e) = crate::input::check_uri(req.uri()) {
            return e.into_response();
        }
        let mut req = match bound_body(req, limits.body_bytes).await {
            Ok(req) => req,
            Err(e) => return e.into_response(),
        };
        let raw = limits
            .raw_bodies
            .iter()
            .any(|prefix| req.uri().path().starts_with(prefix));
        if !raw && is_json(&req) {
            let body = match req.take_body().into_bytes().await {
                Ok(b) => b,
                Err(e) => {
                    return Error::Validation(format!("could not read the body: {e}"))
                        .into_response();
                }
            };
            if !body.is_empty()
                && let Err(e) = crate::json_body::check_json_body(&body)
            {
                return e.into_response();
            }
            req.set_body(Body::from(body));
        }
        match ep.call(req).await {
            Ok(resp) => resp.into_response(),
            Err(e) => from_poem(e),
        }
    };
    match tokio::time::timeout(limits.request_timeout, work).await {
        Ok(resp) => resp,
        Err(_) => Error::Timeout { seconds }.into_response(),
    }
}

/// Reads the body into memory, refusing it as soon as it exceeds `limit`.
async fn bound_body(mut req: Request, limit: usize) -> Result<Request, Error> {
    let too_large = Error::PayloadTooLarge { limit };
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        if usize::try_from(len).map_or(true, |len| len > limit) {
            return Err(too_large);
        }
        if len == 0 {
            return Ok(req);
        }
    }
    let mut stream = req.take_body().into_bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| Error::Validation(format!("could not read the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large);
        }
        buf.extend_from_slice(&chunk);
    }
    req.set_body(Body::from(buf));
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_label_templates_not_paths() {
        let r = Routes::new(&[
            "/v1/jobs",
            "/v1/jobs/{id}",
            "/v1/jobs/bulk-retry",
            "/v1/jobs/{id}/retry",
        ]);
        assert_eq!(r.label("/v1/jobs"), "/v1/jobs");
        assert_eq!(r.label("/v1/jobs/0190"), "/v1/jobs/{id}");
        assert_eq!(r.label("/v1/jobs/bulk-retry"), "/v1/jobs/bulk-retry");
        assert_eq!(r.label("/v1/jobs/x/retry"), "/v1/jobs/{id}/retry");
        assert_eq!(r.label("/etc/passwd"), "unmatched");
    }

    #[test]
    fn allow_lists_the_templates_methods() {
        let spec = r#"{"paths":{"/v1/jobs":{"get":{}},"/v1/jobs/{id}/retry":{"post":{}}}}"#;
        let r = Routes::new(&["/v1/jobs", "/v1/jobs/{id}/retry", "/metrics"])
            .allow_spec(spec)
            .allow("/metrics", Method::GET);
        assert_eq!(r.allow_header("/v1/jobs").as_deref(), Some("GET, HEAD"));
        assert_eq!(r.allow_header("/v1/jobs/x/retry").as_deref(), Some("POST"));
        assert_eq!(r.allow_header("/nope"), None);
    }
}
