//! Notification providers (email, push): the [`Notifier`] trait and
//! [`SimulatedNotifier`], an in-process provider with fault modes.
//!
//! Layout (the same shape as [`crate::exchange`]):
//! - this file — the trait, the wire types, [`Error`], [`SimulatedNotifier`]
//!   and [`NotifierControls`], the seam tests use to steer any simulator;
//! - [`http`] — [`http::HttpNotifier`], the reqwest client for a provider's
//!   HTTP API (the simulator's, see [`server`]);
//! - [`server`] — the provider simulator's HTTP endpoints, mounted by the
//!   `exchange-sim` server beside the exchange's, and
//!   [`server::HttpNotifierControls`];
//! - [`conformance`] — the one behavioural suite every implementation passes.
//!
//! Same contract as the exchange (rule 3): every [`Notification`] carries a
//! deterministic `id` (derived from the workflow id and step), the provider
//! delivers each id at most once, and a repeat returns the original
//! [`SendReceipt`] (with `duplicate: true`). [`Error`] has the exchange's three
//! kinds: `Rejected` (final), `Unavailable` (not sent, retry) and `Unknown`
//! (maybe sent). An `Unknown` send is not simply sent again: the notification
//! workflow puts its step in doubt and asks [`Notifier::delivery_status`], the
//! reconcile query, what the provider holds for the id (found → delivered;
//! certainly absent → send again with the same id; no answer → ask later).

pub mod conformance;
pub mod http;
pub mod server;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// `Result` with the notifier [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a send failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", content = "reason", rename_all = "snake_case")]
pub enum Error {
    /// A definite "no" (bad address, unsubscribed …): do not retry.
    #[error("rejected by the provider: {0}")]
    Rejected(String),
    /// Sent, no answer: may have been delivered. Sending again with the same
    /// id could not deliver twice (the provider dedupes), but the workflow
    /// still reconciles first ([`Notifier::delivery_status`], rule 3).
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// Definitely not sent: retry.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
}

/// The name the issue uses for [`Error`].
pub use self::Error as NotifyError;

impl Error {
    /// True when sending the same notification again is safe and may
    /// succeed: not sent ([`Error::Unavailable`]), or maybe sent
    /// ([`Error::Unknown`] — safe only because the provider dedupes on the
    /// id; the workflow asks [`Notifier::delivery_status`] before it does).
    /// [`Error::Rejected`] is final.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Unknown(_))
    }
}

/// Delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// E-mail.
    Email,
    /// Mobile push.
    Push,
}

/// One message to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// Dedupe key: deterministic per workflow step (`"{workflow_id}:{step}"`).
    pub id: String,
    /// Email or push.
    pub channel: Channel,
    /// Address or device token.
    pub to: String,
    /// Subject / title.
    pub subject: String,
    /// Text.
    pub body: String,
}

/// The provider's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReceipt {
    /// The provider's message id (the same for every repeat of an id).
    pub provider_message_id: String,
    /// True when this id had already been delivered and nothing was sent now.
    pub duplicate: bool,
}

/// An email/push provider. Object safe: hold it as `Arc<dyn Notifier>`.
#[async_trait]
pub trait Notifier: Send + Sync {
    /// Sends `notification` unless its id was already delivered.
    async fn send(&self, notification: &Notification) -> Result<SendReceipt>;

    /// The reconcile query: the receipt of the delivery of `id` (with
    /// `duplicate: true`, since nothing is sent now), or `None` when the
    /// provider has certainly not delivered it. A read has no effect, so
    /// every failure is [`Error::Unavailable`]: no answer, ask again later.
    async fn delivery_status(&self, id: &str) -> Result<Option<SendReceipt>>;
}

/// What a provider holds for a delivered notification id: the message as
/// first sent and the provider's message id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The message that went out (the first send of its id).
    pub notification: Notification,
    /// The provider's id for it.
    pub provider_message_id: String,
}

impl Delivery {
    /// What a repeat send of the id would answer: the original message id,
    /// `duplicate: true`.
    pub fn receipt(&self) -> SendReceipt {
        SendReceipt {
            provider_message_id: self.provider_message_id.clone(),
            duplicate: true,
        }
    }
}

/// Per-id counters of a simulated provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryCounters {
    /// Send calls received for the id (retries and duplicates included).
    pub attempts: u64,
    /// Times a message with the id actually went out (0 or 1).
    pub delivered: u64,
    /// Reconcile queries ([`Notifier::delivery_status`]) received for the id,
    /// failed ones included.
    #[serde(default)]
    pub lookups: u64,
}

/// The seam tests use to steer and inspect a simulated provider, in process
/// ([`SimulatedNotifier`]) or over HTTP ([`server::HttpNotifierControls`]).
#[async_trait]
pub trait NotifierControls: Send + Sync {
    /// Fails the next `times` sends (of any id not yet delivered) with
    /// `fault`; `times == 0` clears the fault.
    async fn fail_next(&self, times: u32, fault: NotifyFault) -> Result<()>;

    /// Fails the next `times` reconcile queries
    /// ([`Notifier::delivery_status`], of any id) as a provider that cannot
    /// be reached; `times == 0` clears it. The controls' own
    /// [`NotifierControls::delivery`] reads are not affected.
    async fn fail_next_lookups(&self, times: u32) -> Result<()>;

    /// The delivery recorded for `id`, if one went out.
    async fn delivery(&self, id: &str) -> Result<Option<Delivery>>;

    /// How often `id` was sent and delivered.
    async fn counters(&self, id: &str) -> Result<DeliveryCounters>;
}

/// How [`SimulatedNotifier`] fails the next sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum NotifyFault {
    /// Fail without sending ([`Error::Unavailable`]).
    Unavailable,
    /// Deliver, then answer [`Error::Unknown`].
    AcceptThenTimeout,
    /// Answer [`Error::Unknown`] without delivering: the request was lost
    /// on its way in (the reconcile query then finds nothing).
    LostBeforeDelivery,
    /// Refuse ([`Error::Rejected`]).
    Reject {
        /// The reason returned.
        reason: String,
    },
}

#[derive(Default)]
struct State {
    fault: Option<(NotifyFault, u32)>,
    lookup_faults: u32,
    seq: u64,
    delivered: HashMap<String, (Notification, String)>,
    attempts: HashMap<String, u64>,
    lookups: HashMap<String, u64>,
    deliveries: Vec<Notification>,
}

/// An in-process provider: dedupes on id, counts attempts, and fails the
/// next N sends on request.
#[derive(Default)]
pub struct SimulatedNotifier {
    state: Mutex<State>,
}

impl std::fmt::Debug for SimulatedNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedNotifier").finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Never held across an await; a poisoned lock only means a test panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SimulatedNotifier {
    /// A provider that succeeds.
    pub fn new() -> Self {
        SimulatedNotifier::default()
    }

    /// Fails the next `times` sends with `fault`, then succeeds again.
    pub fn fail_times(&self, times: u32, fault: NotifyFault) {
        lock(&self.state).fault = (times > 0).then_some((fault, times));
    }

    /// Fails the next `times` reconcile queries (of any id) as
    /// [`Error::Unavailable`], then answers them again.
    pub fn fail_lookups(&self, times: u32) {
        lock(&self.state).lookup_faults = times;
    }

    /// `send` calls received for `id` (retries included).
    pub fn attempts(&self, id: &str) -> u64 {
        lock(&self.state).attempts.get(id).copied().unwrap_or(0)
    }

    /// Reconcile queries received for `id` (failed ones included).
    pub fn lookups(&self, id: &str) -> u64 {
        lock(&self.state).lookups.get(id).copied().unwrap_or(0)
    }

    /// Times a message with `id` actually went out (0 or 1).
    pub fn delivered_count(&self, id: &str) -> usize {
        lock(&self.state)
            .deliveries
            .iter()
            .filter(|n| n.id == id)
            .count()
    }

    /// Every message that went out, in order.
    pub fn deliveries(&self) -> Vec<Notification> {
        lock(&self.state).deliveries.clone()
    }

    /// The reconcile query as the provider answers it (counted, and failed
    /// while [`SimulatedNotifier::fail_lookups`] says so); the HTTP
    /// simulator's `GET /v1/notifications/{id}` serves it.
    pub fn lookup(&self, id: &str) -> Result<Option<Delivery>> {
        {
            let mut st = lock(&self.state);
            *st.lookups.entry(id.to_owned()).or_default() += 1;
            if st.lookup_faults > 0 {
                st.lookup_faults -= 1;
                return Err(Error::Unavailable("simulated provider outage".into()));
            }
        }
        Ok(self.delivery(id))
    }

    /// The delivery recorded for `id`, if one went out (a test's read: not
    /// counted, never failed).
    pub fn delivery(&self, id: &str) -> Option<Delivery> {
        lock(&self.state)
            .delivered
            .get(id)
            .map(|(notification, message_id)| Delivery {
                notification: notification.clone(),
                provider_message_id: message_id.clone(),
            })
    }
}

#[async_trait]
impl NotifierControls for SimulatedNotifier {
    async fn fail_next(&self, times: u32, fault: NotifyFault) -> Result<()> {
        self.fail_times(times, fault);
        Ok(())
    }

    async fn fail_next_lookups(&self, times: u32) -> Result<()> {
        self.fail_lookups(times);
        Ok(())
    }

    async fn delivery(&self, id: &str) -> Result<Option<Delivery>> {
        Ok(SimulatedNotifier::delivery(self, id))
    }

    async fn counters(&self, id: &str) -> Result<DeliveryCounters> {
        Ok(DeliveryCounters {
            attempts: self.attempts(id),
            delivered: u64::try_from(self.delivered_count(id)).unwrap_or(u64::MAX),
            lookups: self.lookups(id),
        })
    }
}

impl State {
    fn take_fault(&mut self) -> Option<NotifyFault> {
        let (fault, left) = self.fault.take()?;
        if left > 1 {
            self.fault = Some((fault.clone(), left - 1));
        }
        Some(fault)
    }

    fn deliver(&mut self, n: &Notification) -> String {
        self.seq += 1;
        let message_id = format!("msg_{:06}", self.seq);
        self.delivered
            .insert(n.id.clone(), (n.clone(), message_id.clone()));
        self.deliveries.push(n.clone());
        message_id
    }
}

#[async_trait]
impl Notifier for SimulatedNotifier {
    async fn send(&self, n: &Notification) -> Result<SendReceipt> {
        let mut st = lock(&self.state);
        *st.attempts.entry(n.id.clone()).or_default() += 1;
        if let Some((first, message_id)) = st.delivered.get(&n.id) {
            if first != n {
                return Err(Error::Rejected(format!(
                    "notification id {} was already used for a different message",
                    n.id
                )));
            }
            return Ok(SendReceipt {
                provider_message_id: message_id.clone(),
                duplicate: true,
            });
        }
        if n.to.trim().is_empty() {
            return Err(Error::Rejected("empty recipient".into()));
        }
        match st.take_fault() {
            Some(NotifyFault::Unavailable) => {
                Err(Error::Unavailable("simulated provider outage".into()))
            }
            Some(NotifyFault::Reject { reason }) => Err(Error::Rejected(reason)),
            Some(NotifyFault::AcceptThenTimeout) => {
                st.deliver(n);
                Err(Error::Unknown("simulated timeout after delivery".into()))
            }
            Some(NotifyFault::LostBeforeDelivery) => Err(Error::Unknown(
                "simulated timeout, the request never arrived".into(),
            )),
            None => Ok(SendReceipt {
                provider_message_id: st.deliver(n),
                duplicate: false,
            }),
        }
    }

    async fn delivery_status(&self, id: &str) -> Result<Option<SendReceipt>> {
        Ok(self.lookup(id)?.map(|d| d.receipt()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn note(id: &str) -> Notification {
        Notification {
            id: id.into(),
            channel: Channel::Email,
            to: "ada@example.com".into(),
            subject: "Trade filled".into(),
            body: "0.5 BTC bought".into(),
        }
    }

    #[tokio::test]
    async fn dedupes_per_id() {
        let p = SimulatedNotifier::new();
        let a = p.send(&note("wf1:notify")).await.unwrap();
        assert!(!a.duplicate);
        let b = p.send(&note("wf1:notify")).await.unwrap();
        assert!(b.duplicate);
        assert_eq!(a.provider_message_id, b.provider_message_id);
        assert_eq!(p.delivered_count("wf1:notify"), 1);
        assert_eq!(p.attempts("wf1:notify"), 2);
        let mut other = note("wf1:notify");
        other.body = "something else".into();
        assert!(matches!(p.send(&other).await, Err(Error::Rejected(_))));
    }

    #[tokio::test]
    async fn fails_n_times_then_succeeds() {
        let p = SimulatedNotifier::new();
        p.fail_times(2, NotifyFault::Unavailable);
        let n = note("wf2:notify");
        assert!(matches!(p.send(&n).await, Err(Error::Unavailable(_))));
        assert!(matches!(p.send(&n).await, Err(Error::Unavailable(_))));
        assert!(!p.send(&n).await.unwrap().duplicate);
        assert_eq!(p.attempts("wf2:notify"), 3);
        assert_eq!(p.delivered_count("wf2:notify"), 1);
    }

    #[tokio::test]
    async fn accept_then_timeout_delivers_once() {
        let p = SimulatedNotifier::new();
        p.fail_times(1, NotifyFault::AcceptThenTimeout);
        let n = note("wf3:notify");
        assert!(matches!(p.send(&n).await, Err(Error::Unknown(_))));
        // The retry after an unknown outcome is answered from the dedupe table.
        assert!(p.send(&n).await.unwrap().duplicate);
        assert_eq!(p.delivered_count("wf3:notify"), 1);
    }

    #[tokio::test]
    async fn lookups_see_deliveries_and_fail_on_request() {
        let p = SimulatedNotifier::new();
        let n = note("wf5:notify");
        assert_eq!(p.delivery_status(&n.id).await, Ok(None));
        p.fail_times(1, NotifyFault::LostBeforeDelivery);
        assert!(matches!(p.send(&n).await, Err(Error::Unknown(_))));
        assert_eq!(
            p.delivery_status(&n.id).await,
            Ok(None),
            "lost, not delivered"
        );
        let sent = p.send(&n).await.unwrap();
        p.fail_lookups(1);
        assert!(matches!(
            p.delivery_status(&n.id).await,
            Err(Error::Unavailable(_))
        ));
        let found = p.delivery_status(&n.id).await.unwrap().unwrap();
        assert_eq!(found.provider_message_id, sent.provider_message_id);
        assert!(found.duplicate);
        assert_eq!((p.attempts(&n.id), p.lookups(&n.id)), (2, 4));
        assert_eq!(p.delivered_count(&n.id), 1);
    }

    #[tokio::test]
    async fn reject_is_final() {
        let p = SimulatedNotifier::new();
        p.fail_times(
            1,
            NotifyFault::Reject {
                reason: "unsubscribed".into(),
            },
        );
        assert_eq!(
            p.send(&note("wf4:notify")).await,
            Err(Error::Rejected("unsubscribed".into()))
        );
        assert_eq!(p.delivered_count("wf4:notify"), 0);
        assert!(p.deliveries().is_empty());
    }
}
