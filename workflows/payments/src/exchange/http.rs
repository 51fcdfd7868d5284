//! [`HttpExchange`]: the [`Exchange`] trait over the simulator's HTTP API
//! (`exchange-sim`, see [`super::server`]) with reqwest.
//!
//! The part that matters is the error mapping, because it decides between a
//! retry and an `in_doubt` step:
//!
//! | what happened | mutating call | read |
//! |---|---|---|
//! | connection refused / DNS / connect timeout (nothing sent) | `Unavailable` | `Unavailable` |
//! | request timeout, reset, body cut off (sent, no answer) | `Unknown` | `Unavailable` |
//! | 2xx with a body we cannot parse | `Unknown` | `Unavailable` |
//! | 400/404/409/422 | `Rejected(reason)` | 404 → `None` |
//! | 429 (refused before processing) | `Unavailable` | `Unavailable` |
//! | other 5xx (may have been processed) | `Unknown` | `Unavailable` |
//!
//! A read has no effect, so it is never "in doubt": it is simply retried.

use super::{
    Error, Exchange, IdempotencyKey, OrderAck, OrderRequest, OrderStatus, Result, WithdrawalAck,
    WithdrawalRequest, WithdrawalStatus,
};
use async_trait::async_trait;
use reqwest::{StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// Client settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Whole-request timeout: past it a mutating call is `Unknown`.
    pub timeout: Duration,
    /// Connect timeout: past it the call is `Unavailable` (nothing was sent).
    pub connect_timeout: Duration,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            api_key: None,
        }
    }
}

/// An exchange reached over HTTP.
#[derive(Debug, Clone)]
pub struct HttpExchange {
    base: Url,
    client: reqwest::Client,
    api_key: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Call {
    Mutating,
    Read,
}

impl HttpExchange {
    /// A client for the API at `base_url` (e.g. `http://127.0.0.1:7070/`).
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
        Ok(HttpExchange {
            base,
            client,
            api_key: config.api_key,
        })
    }

    fn url(&self, segments: &[&str]) -> Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Error::Unavailable("base url cannot have paths".into()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        call: Call,
        method: reqwest::Method,
        url: Url,
        body: Option<Vec<u8>>,
    ) -> Result<Option<T>> {
        let mut req = self.client.request(method, url);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        if let Some(bytes) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes);
        }
        let resp = req.send().await.map_err(|e| transport_error(call, &e))?;
        let status = resp.status();
        if status.is_success() {
            let bytes = resp.bytes().await.map_err(|e| transport_error(call, &e))?;
            return serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                unknown_or_unavailable(call, format!("unparsable {status} body: {e}"))
            });
        }
        let reason = resp
            .text()
            .await
            .ok()
            .and_then(|t| {
                serde_json::from_str::<Error>(&t)
                    .ok()
                    .map(|e| match e {
                        Error::Rejected(r) | Error::Unknown(r) | Error::Unavailable(r) => r,
                    })
                    .or(Some(t))
            })
            .unwrap_or_default();
        match status {
            StatusCode::NOT_FOUND if call == Call::Read => Ok(None),
            StatusCode::BAD_REQUEST
            | StatusCode::NOT_FOUND
            | StatusCode::CONFLICT
            | StatusCode::UNPROCESSABLE_ENTITY => Err(Error::Rejected(reason)),
            StatusCode::TOO_MANY_REQUESTS => Err(Error::Unavailable(format!("{status}: {reason}"))),
            _ => Err(unknown_or_unavailable(call, format!("{status}: {reason}"))),
        }
    }

    async fn send_required<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: Url,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        self.send(Call::Mutating, method, url, body)
            .await?
            .ok_or_else(|| Error::Unknown("empty answer".into()))
    }
}

/// A request body; failing to serialize is our bug, and nothing was sent.
fn json_body<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value)
        .map_err(|e| Error::Unavailable(format!("request does not serialize: {e}")))
}

fn unknown_or_unavailable(call: Call, reason: String) -> Error {
    match call {
        Call::Mutating => Error::Unknown(reason),
        Call::Read => Error::Unavailable(reason),
    }
}

/// Connect failures happen before a byte of the request is written; anything
/// later (timeout, reset, truncated body) may have reached the server.
fn transport_error(call: Call, e: &reqwest::Error) -> Error {
    if e.is_connect() || e.is_builder() {
        Error::Unavailable(format!("not sent: {e}"))
    } else {
        unknown_or_unavailable(call, format!("no answer: {e}"))
    }
}

#[async_trait]
impl Exchange for HttpExchange {
    async fn place_order(&self, order: &OrderRequest) -> Result<OrderAck> {
        let url = self.url(&["v1", "orders"])?;
        self.send_required(reqwest::Method::POST, url, Some(json_body(order)?))
            .await
    }

    async fn cancel_order(&self, key: &IdempotencyKey) -> Result<OrderStatus> {
        let url = self.url(&["v1", "orders", "by-key", key.as_str(), "cancel"])?;
        self.send_required(reqwest::Method::POST, url, None).await
    }

    async fn get_order_by_key(&self, key: &IdempotencyKey) -> Result<Option<OrderStatus>> {
        let url = self.url(&["v1", "orders", "by-key", key.as_str()])?;
        self.send(Call::Read, reqwest::Method::GET, url, None).await
    }

    async fn submit_withdrawal(&self, withdrawal: &WithdrawalRequest) -> Result<WithdrawalAck> {
        let url = self.url(&["v1", "withdrawals"])?;
        self.send_required(reqwest::Method::POST, url, Some(json_body(withdrawal)?))
            .await
    }

    async fn get_withdrawal_by_key(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Option<WithdrawalStatus>> {
        let url = self.url(&["v1", "withdrawals", "by-key", key.as_str()])?;
        self.send(Call::Read, reqwest::Method::GET, url, None).await
    }
}
