//! The simulated email/push provider over HTTP: the endpoints [`mount`]
//! adds to the simulator server (`exchange-sim` serves the exchange and the
//! provider side by side, see [`crate::exchange::server`]), and
//! [`HttpNotifierControls`], the test-side [`NotifierControls`] over them.
//!
//! Behind the endpoints is one [`SimulatedNotifier`], so the HTTP provider
//! has exactly the in-process one's semantics (dedupe per id, fault modes);
//! this file only maps them onto HTTP:
//!
//! | method and path | answer |
//! |---|---|
//! | `POST /v1/notifications` ([`Notification`], header `Idempotency-Key: {id}`) | 201 [`SendReceipt`] (sent now), 200 (duplicate), 400/422 rejected, 503 unavailable, 504 after [`NotifyFault::AcceptThenTimeout`] or [`NotifyFault::LostBeforeDelivery`] |
//! | `GET /v1/notifications/{id}` (the reconcile query) | 200 [`Delivery`], 404, 503 while lookups are failed |
//! | `PUT /admin/notifications/fault` (`{"times": n, "fault": NotifyFault}`) | 204 |
//! | `PUT /admin/notifications/lookup-fault` (`{"times": n}`) | 204 |
//! | `GET /admin/notifications/deliveries/{id}` | 200 [`Delivery`], 404 (never failed, not counted) |
//! | `GET /admin/notifications/counters/{id}` | 200 [`DeliveryCounters`] |
//!
//! Errors are `{"error": "rejected"|"unknown"|"unavailable", "reason": "…"}`.
//! Under [`NotifyFault::AcceptThenTimeout`] the message is delivered and the
//! answer is held for the server's `hang_for` (then 504): a client with a
//! shorter timeout sees exactly what a lost answer looks like.
//! [`NotifyFault::LostBeforeDelivery`] looks the same to the client, but
//! nothing was delivered.

use super::http::{HttpConfig, HttpNotifier, IDEMPOTENCY_KEY_HEADER};
use super::{
    Delivery, DeliveryCounters, Error, Notification, Notifier, NotifierControls, NotifyFault,
    Result, SendReceipt, SimulatedNotifier,
};
use crate::exchange::server::json;
use async_trait::async_trait;
use poem::http::{HeaderMap, StatusCode};
use poem::web::{Data, Path};
use poem::{EndpointExt, Response, Route, get, handler, post, put};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// The provider behind the endpoints.
struct Provider {
    sim: SimulatedNotifier,
    hang_for: Duration,
}

/// The body of `PUT /admin/notifications/fault`.
#[derive(Debug, Serialize, Deserialize)]
struct FaultRequest {
    times: u32,
    fault: NotifyFault,
}

/// The body of `PUT /admin/notifications/lookup-fault`.
#[derive(Debug, Serialize, Deserialize)]
struct LookupFaultRequest {
    times: u32,
}

/// Adds the provider endpoints (with a fresh simulated provider whose lost
/// answers hang for `hang_for`) to `route`.
pub fn mount(route: Route, hang_for: Duration) -> Route {
    let provider = Arc::new(Provider {
        sim: SimulatedNotifier::new(),
        hang_for,
    });
    route
        .at(
            "/v1/notifications",
            post(send_notification).data(provider.clone()),
        )
        .at(
            "/v1/notifications/:id",
            get(get_notification).data(provider.clone()),
        )
        .at(
            "/admin/notifications/fault",
            put(set_fault).data(provider.clone()),
        )
        .at(
            "/admin/notifications/lookup-fault",
            put(set_lookup_fault).data(provider.clone()),
        )
        .at(
            "/admin/notifications/deliveries/:id",
            get(get_delivery).data(provider.clone()),
        )
        .at(
            "/admin/notifications/counters/:id",
            get(counters).data(provider),
        )
}

fn rejected(status: StatusCode, reason: String) -> Response {
    json(status, &Error::Rejected(reason))
}

#[handler]
async fn send_notification(
    Data(provider): Data<&Arc<Provider>>,
    headers: &HeaderMap,
    body: Vec<u8>,
) -> Response {
    let notification: Notification = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => {
            return rejected(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("bad request body: {e}"),
            );
        }
    };
    // The header is the dedupe key; the body's id must agree with it so that
    // a client bug can never dedupe one message under another's key.
    match headers
        .get(IDEMPOTENCY_KEY_HEADER)
        .map(|v| v.to_str().unwrap_or_default())
    {
        None | Some("") => {
            return rejected(
                StatusCode::BAD_REQUEST,
                format!("missing {IDEMPOTENCY_KEY_HEADER} header"),
            );
        }
        Some(key) if key != notification.id => {
            return rejected(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "{IDEMPOTENCY_KEY_HEADER} {key:?} differs from the notification id {:?}",
                    notification.id
                ),
            );
        }
        Some(_) => {}
    }
    match provider.sim.send(&notification).await {
        Ok(
            receipt @ SendReceipt {
                duplicate: false, ..
            },
        ) => json(StatusCode::CREATED, &receipt),
        Ok(receipt) => json(StatusCode::OK, &receipt),
        Err(e @ Error::Rejected(_)) => json(StatusCode::UNPROCESSABLE_ENTITY, &e),
        Err(e @ Error::Unavailable(_)) => json(StatusCode::SERVICE_UNAVAILABLE, &e),
        Err(e @ Error::Unknown(_)) => {
            // Delivered, then the answer is "lost": hold it past any sane
            // client timeout.
            tokio::time::sleep(provider.hang_for).await;
            json(StatusCode::GATEWAY_TIMEOUT, &e)
        }
    }
}

#[handler]
fn get_notification(Data(provider): Data<&Arc<Provider>>, Path(id): Path<String>) -> Response {
    match provider.sim.lookup(&id) {
        Ok(Some(d)) => json(StatusCode::OK, &d),
        Ok(None) => rejected(StatusCode::NOT_FOUND, format!("no delivery for {id:?}")),
        Err(e) => json(StatusCode::SERVICE_UNAVAILABLE, &e),
    }
}

#[handler]
fn get_delivery(Data(provider): Data<&Arc<Provider>>, Path(id): Path<String>) -> Response {
    match provider.sim.delivery(&id) {
        Some(d) => json(StatusCode::OK, &d),
        None => rejected(StatusCode::NOT_FOUND, format!("no delivery for {id:?}")),
    }
}

#[handler]
fn set_lookup_fault(Data(provider): Data<&Arc<Provider>>, body: Vec<u8>) -> Response {
    match serde_json::from_slice::<LookupFaultRequest>(&body) {
        Ok(req) => {
            provider.sim.fail_lookups(req.times);
            Response::builder().status(StatusCode::NO_CONTENT).finish()
        }
        Err(e) => rejected(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("bad request body: {e}"),
        ),
    }
}

#[handler]
fn set_fault(Data(provider): Data<&Arc<Provider>>, body: Vec<u8>) -> Response {
    match serde_json::from_slice::<FaultRequest>(&body) {
        Ok(req) => {
            provider.sim.fail_times(req.times, req.fault);
            Response::builder().status(StatusCode::NO_CONTENT).finish()
        }
        Err(e) => rejected(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("bad request body: {e}"),
        ),
    }
}

#[handler]
fn counters(Data(provider): Data<&Arc<Provider>>, Path(id): Path<String>) -> Response {
    let counters = DeliveryCounters {
        attempts: provider.sim.attempts(&id),
        delivered: u64::try_from(provider.sim.delivered_count(&id)).unwrap_or(u64::MAX),
        lookups: provider.sim.lookups(&id),
    };
    json(StatusCode::OK, &counters)
}

// ------------------------------------------------------ test-side helpers

/// [`NotifierControls`] over the simulator's admin endpoints.
#[derive(Debug)]
pub struct HttpNotifierControls {
    provider: HttpNotifier,
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
}

impl HttpNotifierControls {
    /// Controls for the simulator at `base_url`.
    pub fn new(base_url: &str) -> Result<Self> {
        Ok(HttpNotifierControls {
            provider: HttpNotifier::new(base_url, HttpConfig::default())?,
        })
    }
}

#[async_trait]
impl NotifierControls for HttpNotifierControls {
    async fn fail_next(&self, times: u32, fault: NotifyFault) -> Result<()> {
        let url = self.provider.url(&["admin", "notifications", "fault"])?;
        self.provider
            .request(reqwest::Method::PUT, url)
            .json(&FaultRequest { times, fault })
            .send()
            .await
            .map_err(unavailable)?
            .error_for_status()
            .map_err(unavailable)?;
        Ok(())
    }

    async fn fail_next_lookups(&self, times: u32) -> Result<()> {
        let url = self
            .provider
            .url(&["admin", "notifications", "lookup-fault"])?;
        self.provider
            .request(reqwest::Method::PUT, url)
            .json(&LookupFaultRequest { times })
            .send()
            .await
            .map_err(unavailable)?
            .error_for_status()
            .map_err(unavailable)?;
        Ok(())
    }

    async fn delivery(&self, id: &str) -> Result<Option<Delivery>> {
        // The admin read, not the reconcile query: a test's look must
        // neither count as a lookup nor use up a lookup fault.
        let url = self
            .provider
            .url(&["admin", "notifications", "deliveries", id])?;
        let resp = self
            .provider
            .request(reqwest::Method::GET, url)
            .send()
            .await
            .map_err(unavailable)?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        resp.error_for_status()
            .map_err(unavailable)?
            .json()
            .await
            .map(Some)
            .map_err(unavailable)
    }

    async fn counters(&self, id: &str) -> Result<DeliveryCounters> {
        let url = self
            .provider
            .url(&["admin", "notifications", "counters", id])?;
        self.provider
            .request(reqwest::Method::GET, url)
            .send()
            .await
            .map_err(unavailable)?
            .error_for_status()
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)
    }
}
