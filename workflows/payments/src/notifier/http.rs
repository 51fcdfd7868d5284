//! [`HttpNotifier`]: the [`Notifier`] trait over an email/push provider's
//! HTTP API (the simulator's is served by `exchange-sim`, see
//! [`super::server`]) with reqwest.
//!
//! A send is `POST {base}/v1/notifications` with the [`Notification`] as JSON
//! and its id in the `Idempotency-Key` header; the provider delivers each id
//! at most once and answers a repeat with the original receipt. That dedupe
//! is what makes every non-final error safe to retry, so the mapping below
//! only has to separate "final" from "try again" — and, for the logs and the
//! step journal, "not sent" from "maybe sent":
//!
//! | what happened | error |
//! |---|---|
//! | 2xx with a [`SendReceipt`] body | `Ok(receipt)` |
//! | connection refused / DNS / connect timeout (nothing sent) | `Unavailable` |
//! | request timeout, reset, body cut off (sent, no answer) | `Unknown` |
//! | 2xx with a body we cannot parse | `Unknown` |
//! | 408, 409 (same key in flight), 429, 503 (refused before processing) | `Unavailable` |
//! | any other 4xx (bad address, unsubscribed, id reused for another message) | `Rejected(reason)` |
//! | any other 5xx (may have been processed) | `Unknown` |
//!
//! The rejected alternative was to treat every 5xx as "not sent": a 502 or
//! 504 from a proxy can follow a delivery, and calling that `Unavailable`
//! would misreport the step as never having reached the provider.
//!
//! The reconcile query ([`Notifier::delivery_status`]) is
//! `GET {base}/v1/notifications/{id}`: 200 with a [`Delivery`] is "delivered",
//! 404 *with the provider's error body* is "certainly not delivered" (the
//! workflow then sends again under the same id), anything else — no answer,
//! another status, a bare 404 from a proxy or a wrong base path — is
//! `Unavailable`, i.e. no answer: the step stays in doubt. Reading a bare
//! 404 as "absent" would turn a misrouted query into a re-send.

use super::{Delivery, Error, Notification, Notifier, Result, SendReceipt};
use async_trait::async_trait;
use reqwest::{StatusCode, Url};

/// The header carrying the notification id; the provider dedupes on it.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// Client settings: the same as the exchange client's (past `timeout` a
/// send is `Unknown`, past `connect_timeout` it is `Unavailable`).
pub use crate::exchange::http::HttpConfig;

/// A notification provider reached over HTTP.
#[derive(Debug, Clone)]
pub struct HttpNotifier {
    base: Url,
    client: reqwest::Client,
    api_key: Option<String>,
}

impl HttpNotifier {
    /// A client for the provider API at `base_url` (e.g.
    /// `http://127.0.0.1:7070/`).
    pub fn new(base_url: &str, config: HttpConfig) -> Result<Self> {
        let base = Url::parse(base_url)
            .map_err(|e| Error::Unavailable(format!("bad base url {base_url:?}: {e}")))?;
        if base.cannot_be_a_base() {
            return Err(Error::Unavailable(format!(
                "base url {base_url:?} cannot have paths"
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(|e| Error::Unavailable(format!("building the HTTP client: {e}")))?;
        Ok(HttpNotifier {
            base,
            client,
            api_key: config.api_key,
        })
    }

    /// `{base}/{segments…}`, each segment percent-encoded.
    pub(crate) fn url(&self, segments: &[&str]) -> Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Error::Unavailable("base url cannot have paths".into()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    /// A request with the client's timeouts and credentials.
    pub(crate) fn request(&self, method: reqwest::Method, url: Url) -> reqwest::RequestBuilder {
        let req = self.client.request(method, url);
        match &self.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    /// The reconcile query: what the provider delivered for `id`, if
    /// anything. A read has no effect, so every failure is `Unavailable`.
    pub async fn delivery(&self, id: &str) -> Result<Option<Delivery>> {
        let url = self.url(&["v1", "notifications", id])?;
        let resp = self
            .request(reqwest::Method::GET, url)
            .send()
            .await
            .map_err(|e| Error::Unavailable(format!("no answer: {e}")))?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            // Only the provider's own "no such notification" is an answer.
            let text = resp.text().await.unwrap_or_default();
            return match serde_json::from_str::<Error>(&text) {
                Ok(_) => Ok(None),
                Err(_) => Err(Error::Unavailable(format!(
                    "{status} without the provider's error body: {text:?}"
                ))),
            };
        }
        if !status.is_success() {
            let reason = error_reason(resp).await;
            return Err(Error::Unavailable(format!("{status}: {reason}")));
        }
        resp.json()
            .await
            .map(Some)
            .map_err(|e| Error::Unavailable(format!("unparsable {status} body: {e}")))
    }
}

/// The provider's reason: the `reason` of an `{"error", "reason"}` body, or
/// the body text.
async fn error_reason(resp: reqwest::Response) -> String {
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<Error>(&text) {
        Ok(Error::Rejected(r) | Error::Unknown(r) | Error::Unavailable(r)) => r,
        Err(_) => text,
    }
}

/// How a non-2xx answer to a send maps onto [`Error`] (the table above).
fn status_error(status: StatusCode, reason: String) -> Error {
    match status {
        StatusCode::REQUEST_TIMEOUT
        | StatusCode::CONFLICT
        | StatusCode::TOO_MANY_REQUESTS
        | StatusCode::SERVICE_UNAVAILABLE => Error::Unavailable(format!("{status}: {reason}")),
        s if s.is_client_error() => Error::Rejected(reason),
        _ => Error::Unknown(format!("{status}: {reason}")),
    }
}

/// Connect failures happen before a byte of the request is written; anything
/// later (timeout, reset, truncated body) may have reached the provider.
fn transport_error(e: &reqwest::Error) -> Error {
    if e.is_connect() || e.is_builder() {
        Error::Unavailable(format!("not sent: {e}"))
    } else {
        Error::Unknown(format!("no answer: {e}"))
    }
}

#[async_trait]
impl Notifier for HttpNotifier {
    async fn send(&self, notification: &Notification) -> Result<SendReceipt> {
        let url = self.url(&["v1", "notifications"])?;
        // Failing to serialize is our bug, and nothing was sent.
        let body = serde_json::to_vec(notification)
            .map_err(|e| Error::Unavailable(format!("request does not serialize: {e}")))?;
        let resp = self
            .request(reqwest::Method::POST, url)
            .header(IDEMPOTENCY_KEY_HEADER, &notification.id)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error(&e))?;
        let status = resp.status();
        if status.is_success() {
            let bytes = resp.bytes().await.map_err(|e| transport_error(&e))?;
            return serde_json::from_slice(&bytes)
                .map_err(|e| Error::Unknown(format!("unparsable {status} body: {e}")));
        }
        let reason = error_reason(resp).await;
        Err(status_error(status, reason))
    }

    async fn delivery_status(&self, id: &str) -> Result<Option<SendReceipt>> {
        Ok(self.delivery(id).await?.map(|d| d.receipt()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_separates_final_from_retryable() {
        let r = || "x".to_string();
        for s in [400, 401, 403, 404, 410, 422] {
            let status = StatusCode::from_u16(s).unwrap_or(StatusCode::IM_A_TEAPOT);
            assert_eq!(status_error(status, r()), Error::Rejected(r()), "{s}");
        }
        for s in [408, 409, 429, 503] {
            let status = StatusCode::from_u16(s).unwrap_or(StatusCode::IM_A_TEAPOT);
            let e = status_error(status, r());
            assert!(matches!(e, Error::Unavailable(_)), "{s}: {e:?}");
        }
        for s in [500, 502, 504] {
            let status = StatusCode::from_u16(s).unwrap_or(StatusCode::IM_A_TEAPOT);
            let e = status_error(status, r());
            assert!(matches!(e, Error::Unknown(_)), "{s}: {e:?}");
            assert!(e.is_retryable());
        }
    }

    #[test]
    fn base_url_must_take_paths() {
        assert!(HttpNotifier::new("mailto:ops@example.com", HttpConfig::default()).is_err());
        assert!(HttpNotifier::new("not a url", HttpConfig::default()).is_err());
        let n = HttpNotifier::new("http://127.0.0.1:1/provider/", HttpConfig::default());
        let url = n.and_then(|n| n.url(&["v1", "notifications", "wf:1 notify"]));
        assert_eq!(
            url.map(|u| u.to_string()),
            Ok("http://127.0.0.1:1/provider/v1/notifications/wf:1%20notify".to_string())
        );
    }
}
