//! Operational endpoints: `/healthcheck` (liveness), `/readyz` (a list of
//! readiness checks: Postgres now, Kafka later) and `/metrics` (Prometheus).
//!
//! They are plain poem handlers, outside the OpenAPI spec: they are for
//! probes and scrapers, not API clients.
use crate::AppState;
use futures::future::BoxFuture;
use poem::http::StatusCode;
use poem::web::Data;
use poem::{IntoResponse, Response, handler};
use std::time::Duration;

/// One dependency `/readyz` checks. Add Kafka's with [`AppState::with_check`].
pub trait ReadinessCheck: Send + Sync {
    /// The name shown in `/readyz`'s body (`postgres`, `kafka`).
    fn name(&self) -> &str;
    /// `Ok` when the dependency is reachable. The error text is logged,
    /// never returned to the prober.
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// Postgres is reachable: a pooled connection answers a ping.
pub(crate) struct Postgres(pub sqlx::PgPool);

impl ReadinessCheck for Postgres {
    fn name(&self) -> &str {
        "postgres"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self.0.acquire().await.map_err(|e| e.to_string())?;
            sqlx::Connection::ping(&mut *conn)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Liveness: the process answers.
#[handler]
pub(crate) fn healthcheck() -> &'static str {
    "ok"
}

/// Readiness: every check passes within 2 s. 200 or 503, with a JSON body
/// naming each check's result.
#[handler]
pub(crate) async fn readyz(state: Data<&AppState>) -> Response {
    let mut results = serde_json::Map::new();
    let mut ready = true;
    for check in state.checks.iter() {
        let outcome = tokio::time::timeout(Duration::from_secs(2), check.check()).await;
        let ok = match outcome {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(check = check.name(), error = %e, "readiness check failed");
                false
            }
            Err(_) => {
                tracing::warn!(check = check.name(), "readiness check timed out");
                false
            }
        };
        ready &= ok;
        results.insert(
            check.name().to_string(),
            serde_json::Value::from(if ok { "ok" } else { "unavailable" }),
        );
    }
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": results,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    poem::web::Json(body).with_status(status).into_response()
}

/// Prometheus text exposition.
#[handler]
pub(crate) async fn metrics(state: Data<&AppState>) -> Response {
    let text = state.metrics.render(&state.store).await;
    Response::builder()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text)
}
