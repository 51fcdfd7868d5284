//! The one middleware both listeners wrap their routes in. In order, it:
//!
//! 1. counts the request in flight and starts its timer;
//! 2. refuses a body over the limit with 413 — by `Content-Length` when
//!    present, and otherwise by reading the body into memory up to the limit
//!    and stopping there (chunked bodies without a length are bounded the
//!    same way, so memory per request is bounded by the limit);
//! 3. runs the request under a deadline (503 `timeout` problem past it);
//! 4. turns any error poem or poem-openapi raised (unknown route, bad JSON,
//!    missing credentials …) into an RFC 7807 problem (see [`crate::error`]);
//! 5. records the status and latency under the matched route template.
//!
//! poem's own `SizeLimit` was not used: it answers 411 to bodies without a
//! `Content-Length` instead of bounding them.
use crate::error::{Error, from_poem};
use crate::metrics::Metrics;
use futures::StreamExt;
use poem::http::header;
use poem::{Body, Endpoint, IntoResponse, Request, Response};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Limits the middleware enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted request body, in bytes.
    pub body_bytes: usize,
    /// Longest time to answer a request (reading its body included).
    pub request_timeout: Duration,
}

/// Route templates of one listener, to label metrics without raw paths.
#[derive(Debug, Clone)]
pub struct Routes {
    templates: Vec<Vec<String>>,
}

impl Routes {
    /// Templates like `/v1/jobs/{id}`; `{…}` matches any one segment.
    pub fn new(templates: &[&str]) -> Self {
        Self {
            templates: templates
                .iter()
                .map(|t| t.split('/').map(str::to_string).collect())
                .collect(),
        }
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
            let route = routes.label(req.uri().path());
            let gauge = metrics.in_flight.with_label_values(&[listener]);
            gauge.inc();
            let resp = handle(&ep, req, &limits).await;
            gauge.dec();
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

async fn handle<E: Endpoint>(ep: &E, req: Request, limits: &Limits) -> Response {
    let seconds = limits.request_timeout.as_secs();
    let work = async {
        let req = match bound_body(req, limits.body_bytes).await {
            Ok(req) => req,
            Err(e) => return e.into_response(),
        };
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
}
