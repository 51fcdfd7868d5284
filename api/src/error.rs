//! The crate's one error type, rendered as RFC 7807 `application/problem+json`.
//!
//! Every failure a client can see is an [`Error`] variant with a stable
//! problem `type` URI. Internal failures (database, I/O) are logged with their
//! full text and answered with a generic 500 problem: SQL text, constraint
//! names and stack traces never reach a response. Errors that poem or
//! poem-openapi raise themselves (unknown route, unparsable JSON, missing
//! credentials …) are converted to the same shape by [`from_poem`], called
//! from the middleware in [`crate::middleware`].
use poem::http::{HeaderValue, StatusCode, header};
use poem::{IntoResponse, Response};
use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiResponse, Object};

/// `Result` with the crate's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Prefix of every problem `type` URI.
pub const PROBLEM_BASE: &str = "https://ledgerflow.dev/problems/";

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No credential, or one that is malformed, unknown, expired or revoked.
    #[error("valid credentials are required")]
    Unauthorized,
    /// Authenticated, but the role does not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// Four-eyes rule: the admin approving something is the one who
    /// requested it (problem type `four-eyes`, so clients can tell it from a
    /// missing role).
    #[error("{0}")]
    FourEyes(String),
    /// The input is malformed or out of range.
    #[error("{0}")]
    Validation(String),
    /// No such resource (or not visible to the caller).
    #[error("{0}")]
    NotFound(String),
    /// The resource's current state does not allow the action.
    #[error("{0}")]
    Conflict(String),
    /// Well-formed, but not acceptable (e.g. an `Idempotency-Key` reused
    /// with another request).
    #[error("{0}")]
    Unprocessable(String),
    /// The body is larger than the limit.
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The request took longer than the limit.
    #[error("request did not complete within {seconds} s")]
    Timeout { seconds: u64 },
    /// A dependency (the database) is unreachable.
    #[error("service unavailable")]
    Unavailable,
    /// Too many failed authentications from this client or against this
    /// credential; answered with `Retry-After`.
    #[error("too many failed authentication attempts; retry in {retry_after_secs} s")]
    TooManyRequests { retry_after_secs: u64 },
    /// A bug or an infrastructure failure; logged, never shown.
    #[error("internal error: {0}")]
    Internal(String),
    /// Binding or serving a listener failed.
    #[error("server I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) | Error::FourEyes(_) => StatusCode::FORBIDDEN,
            Error::Validation(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Timeout { .. } | Error::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Error::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Internal(_) | Error::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem body for this error. Internal variants are logged here
    /// and answered generically.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        match self {
            Error::Internal(_) | Error::Io(_) => {
                tracing::error!(error = %self, "request failed");
                Problem::new(
                    status,
                    "internal",
                    "An internal error occurred; it has been logged.",
                )
            }
            Error::Timeout { .. } => Problem::new(status, "timeout", &self.to_string()),
            Error::FourEyes(_) => Problem::new(status, "four-eyes", &self.to_string()),
            Error::Unavailable => Problem::new(
                status,
                "unavailable",
                "A dependency is unavailable; try again later.",
            ),
            _ => Problem::new(status, slug(status), &self.to_string()),
        }
    }
}

/// Engine errors: missing rows and impossible transitions are the client's
/// to see; everything else is internal.
impl From<ledgerflow_engine::Error> for Error {
    fn from(e: ledgerflow_engine::Error) -> Self {
        use ledgerflow_engine::Error as E;
        match e {
            E::JobNotFound(id) => Error::NotFound(format!("job {id} not found")),
            E::InvalidTransition {
                job_id,
                state,
                action,
            } => Error::Conflict(format!("job {job_id} is {state}; cannot {action} it")),
            E::Invalid(msg) => Error::Validation(msg),
            E::Db(ref db) if is_data_exception(db) => refused_by_database(&e),
            e if e.is_transient() => {
                tracing::warn!(error = %e, "transient database error");
                Error::Unavailable
            }
            other => Error::Internal(other.to_string()),
        }
    }
}

/// Whether Postgres refused a value itself (SQLSTATE class 22, "data
/// exception": text it cannot store, a number or time out of its range).
/// Input validation should have refused such a value first; this is the
/// backstop that keeps one from becoming a 500.
pub fn is_data_exception(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("22")))
}

/// The 400 for a value the database refused: logged in full (inside the
/// request's span, so with its id), answered without the database's text.
fn refused_by_database(e: &dyn std::fmt::Display) -> Error {
    tracing::warn!(error = %e, "the database refused a request's value");
    Error::Validation("a value is outside what can be stored (range or characters)".into())
}

/// Payments errors: input refusals are the client's; the rest is internal.
impl From<ledgerflow_payments::Error> for Error {
    fn from(e: ledgerflow_payments::Error) -> Self {
        use ledgerflow_payments::Error as E;
        match e {
            E::Invalid(msg) => Error::Validation(msg),
            // A refusal of the caller (a role without the right, an approver
            // approving their own request): 403, never a 500.
            E::Forbidden(msg) => Error::Forbidden(msg),
            E::FourEyes(msg) => Error::FourEyes(msg),
            e @ (E::InvalidAmount { .. } | E::ScaleExceeded { .. }) => {
                Error::Validation(e.to_string())
            }
            e @ (E::UnknownAsset(_) | E::UserNotFound(_) | E::AdminNotFound(_)) => {
                Error::NotFound(e.to_string())
            }
            e @ E::AdminNameTaken(_) => Error::Conflict(e.to_string()),
            E::Db(ref db) if is_data_exception(db) => refused_by_database(&e),
            e if e.is_transient() => {
                tracing::warn!(error = %e, "transient database error");
                Error::Unavailable
            }
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::from(ledgerflow_engine::Error::Db(e))
    }
}

/// An RFC 7807 problem body.
#[derive(Debug, Clone, PartialEq, Eq, Object, serde::Serialize)]
#[oai(rename = "Problem", skip_serializing_if_is_none)]
pub struct Problem {
    /// A stable URI naming the kind of problem, e.g.
    /// `https://ledgerflow.dev/problems/validation`.
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short, stable summary of the kind of problem.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request, for humans.
    pub detail: String,
}

impl Problem {
    /// A problem of kind `slug` (the last segment of its `type` URI).
    pub fn new(status: StatusCode, slug: &str, detail: &str) -> Self {
        Self {
            type_uri: format!("{PROBLEM_BASE}{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: detail.to_string(),
        }
    }

    /// The response: the problem as `application/problem+json`, with
    /// `WWW-Authenticate: Bearer` on a 401.
    pub fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = Response::builder()
            .status(status)
            .content_type(PROBLEM_JSON)
            .body(body);
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// The slug of a status's generic problem type.
pub fn slug(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "validation",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not-found",
        405 => "method-not-allowed",
        406 => "not-acceptable",
        409 => "conflict",
        411 => "length-required",
        413 => "payload-too-large",
        415 => "unsupported-media-type",
        422 => "unprocessable",
        429 => "too-many-requests",
        503 => "unavailable",
        s if s < 500 => "bad-request",
        _ => "internal",
    }
}

/// Converts an error raised by poem or poem-openapi (routing, extractors,
/// payload parsing, security schemes) to a problem response. Client errors
/// keep poem's message, which describes the input and never internal state;
/// server errors are logged and answered generically.
pub fn from_poem(err: poem::Error) -> Response {
    if err.is::<Error>() {
        // Our own errors render themselves (see `ResponseError` below).
        return err.into_response();
    }
    let status = err.status();
    if status.is_server_error() {
        tracing::error!(error = %err, %status, "request failed");
        return Error::Internal(String::new()).problem().into_response();
    }
    let detail = match status.as_u16() {
        401 => Error::Unauthorized.to_string(),
        404 => "no such resource".to_string(),
        405 => "method not allowed on this resource".to_string(),
        _ => {
            let mut text = err.to_string();
            if text.len() > 300 {
                let mut cut = 300;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push('…');
            }
            text
        }
    };
    Problem::new(status, slug(status), &detail).into_response()
}

impl poem::error::ResponseError for Error {
    fn status(&self) -> StatusCode {
        Error::status(self)
    }

    fn as_response(&self) -> Response {
        self.response()
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        self.response()
    }
}

impl Error {
    /// The problem response, with `Retry-After` on a 429.
    fn response(&self) -> Response {
        let mut resp = self.problem().into_response();
        if let Error::TooManyRequests { retry_after_secs } = self
            && let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// The error responses every operation may give, for the OpenAPI spec.
impl ApiResponse for Error {
    fn meta() -> MetaResponses {
        let problem = |description, status| MetaResponse {
            description,
            status: Some(status),
            status_range: None,
            content: vec![MetaMediaType {
                content_type: PROBLEM_JSON,
                schema: Problem::schema_ref(),
            }],
            headers: vec![],
        };
        MetaResponses {
            responses: vec![
                problem("Malformed or invalid input", 400),
                problem("Missing, unknown, expired or revoked credentials", 401),
                problem("The credential's role does not allow this", 403),
                problem("No such resource", 404),
                problem("The resource's state does not allow this", 409),
                problem("The request body is too large", 413),
                problem(
                    "The body is not `application/json` (or has no Content-Type)",
                    415,
                ),
                problem("Not acceptable (e.g. a reused Idempotency-Key)", 422),
                problem(
                    "Too many failed authentication attempts (see Retry-After)",
                    429,
                ),
                problem("Internal error (details are logged, never returned)", 500),
                problem("A dependency is unavailable or the request timed out", 503),
            ],
        }
    }

    fn register(registry: &mut Registry) {
        Problem::register(registry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_hide_their_text() {
        let p = Error::Internal("relation \"jobs\" does not exist".into()).problem();
        assert_eq!(p.status, 500);
        assert!(!p.detail.contains("jobs"));
        assert_eq!(p.type_uri, "https://ledgerflow.dev/problems/internal");
    }

    #[test]
    fn engine_errors_map_to_client_statuses() {
        let id = uuid::Uuid::nil();
        assert_eq!(
            Error::from(ledgerflow_engine::Error::JobNotFound(id)).status(),
            StatusCode::NOT_FOUND
        );
        let e = ledgerflow_engine::Error::InvalidTransition {
            job_id: id,
            state: "running".into(),
            action: "retry",
        };
        assert_eq!(Error::from(e).status(), StatusCode::CONFLICT);
    }

    #[test]
    fn domain_refusals_are_403_with_stable_types() {
        let e = Error::from(ledgerflow_payments::Error::Forbidden(
            "not an approver".into(),
        ));
        let p = e.problem();
        assert_eq!(
            (p.status, p.type_uri.as_str()),
            (403, "https://ledgerflow.dev/problems/forbidden")
        );
        let p = Error::FourEyes("own request".into()).problem();
        assert_eq!(
            (p.status, p.type_uri.as_str()),
            (403, "https://ledgerflow.dev/problems/four-eyes")
        );
    }
}
