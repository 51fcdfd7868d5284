//! Webhook intake: `POST /v1/webhooks/{provider}` on the public listener.
//!
//! A delivery is verified over the **raw body bytes** (never re-serialized
//! JSON) with the provider's scheme from
//! [`ledgerflow_payments::exchange::signature`]:
//!
//! - `stripe` — header `Stripe-Signature: t=…,v1=…`, MAC over `"{t}.{body}"`,
//!   timestamp within ±`tolerance_s` (default 300 s) of now;
//! - `github` — header `X-Hub-Signature-256: sha256=<hex>` over the body.
//!
//! Any of the provider's live secrets may match (rotation); MACs are compared
//! in constant time by the signature helpers.
//!
//! Outcomes (DESIGN.md contract rules 1 and 6):
//!
//! - unknown provider → 404 problem;
//! - missing, malformed, stale or wrong signature → 401 problem, nothing
//!   stored, `ledgerflow_webhook_rejected_total{provider,reason}` incremented;
//! - signed but without an event id, or not an exchange event → 400 problem,
//!   nothing stored;
//! - valid → in ONE transaction the raw body goes to the inbox (source
//!   `webhook:{provider}`, dedupe key = the payload's own event `id`, so a
//!   redelivery under a new delivery id is a duplicate; the configured
//!   `event_id` only where the payload has none) and, when the
//!   row is new, the `payments.webhook` workflow is started (unique key
//!   `webhook:{event id}`, inbox row id in its input), which turns the event
//!   into its signal and marks the inbox row processed in that same
//!   transaction. Only after
//!   the commit is `200 {"status":"accepted"}` (or `{"status":"duplicate"}`)
//!   answered; a database failure is a 503 problem so the provider retries.
//!
//! A delivery costs one statement on one pooled connection, committed on its
//! own: the inbox row, and when it is new the processing workflow and its
//! first job (`ledgerflow_engine::workflow_start_for_inbox_in`). Unlike the
//! public POSTs, the processing workflow's queue is woken after the commit,
//! not by a `NOTIFY` inside it: a notifying commit holds Postgres' global
//! notify lock through its WAL flush, which capped deliveries at ~2,300/s
//! with 16 clients (~3,900/s without). The wake-up lingers [`WAKE_LINGER`]
//! before it is sent ([`crate::wakeup::Wakeups::wake_lingering`]), so the
//! deliveries of that window share one notification; without the linger
//! few wake-ups coalesced at low concurrency (4 clients: 8,564 wake-ups for
//! 10,016 deliveries, ~0.1 ms more CPU each).
//!
//! # Configuration
//!
//! `LEDGERFLOW_WEBHOOK_PROVIDERS` holds a JSON object, provider name →
//! settings:
//!
//! ```json
//! {
//!   "exchange": { "scheme": "stripe", "tolerance_s": 300, "event_id": { "json_field": "id" } },
//!   "gh":       { "scheme": "github", "event_id": { "header": "X-GitHub-Delivery" } }
//! }
//! ```
//!
//! `tolerance_s` defaults to 300 and `event_id` to `{"json_field": "id"}`.
//! Whatever `event_id` says, deliveries are deduplicated by the payload's own
//! `id` (every exchange event has one): GitHub-style providers redeliver an
//! event under a fresh `X-GitHub-Delivery`.
//! Secrets never appear in that JSON: they come from
//! `LEDGERFLOW_WEBHOOK_SECRETS_<PROVIDER>` (name upper-cased, every
//! non-alphanumeric character replaced by `_`), comma-separated, one per live
//! secret. A configured provider without a secret is a startup error. Secrets
//! are redacted from `Debug` output and never logged.
use crate::AppState;
use crate::error::Error;
use crate::metrics::Metrics;
use chrono::Utc;
use ledgerflow_engine::WorkflowRegistry;
use ledgerflow_engine::inbox::InboxEntry;
use ledgerflow_payments::exchange::Event;
use ledgerflow_payments::exchange::signature::{
    self, GITHUB_DELIVERY_HEADER, GITHUB_EVENT_HEADER, GITHUB_HEADER, STRIPE_HEADER, Scheme,
};
use ledgerflow_payments::workflows::webhook;
use poem::http::{HeaderMap, StatusCode};
use poem::web::{Data, Json, Path};
use poem::{IntoResponse, Response, handler};
use prometheus::{IntCounterVec, Opts};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Environment variable holding the providers' JSON settings.
pub const PROVIDERS_ENV: &str = "LEDGERFLOW_WEBHOOK_PROVIDERS";
/// Prefix of the per-provider secrets variables.
pub const SECRETS_ENV_PREFIX: &str = "LEDGERFLOW_WEBHOOK_SECRETS_";
/// Default Stripe-style timestamp tolerance, in seconds.
pub const DEFAULT_TOLERANCE_S: i64 = 300;

/// The route template, for metrics labels.
pub(crate) const ROUTES: &[&str] = &["/v1/webhooks/{provider}"];

/// One webhook signing secret; its `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where a provider puts its delivery's id: required on every delivery, and
/// the inbox's dedupe key only when the payload carries no `id` of its own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum EventIdSource {
    /// A top-level field of the JSON body (string or integer).
    JsonField(String),
    /// A request header.
    Header(String),
}

impl Default for EventIdSource {
    fn default() -> Self {
        EventIdSource::JsonField("id".to_string())
    }
}

fn default_tolerance() -> i64 {
    DEFAULT_TOLERANCE_S
}

/// One provider's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    /// Header style.
    pub scheme: Scheme,
    /// Stripe style: largest accepted `|now - t|`, in seconds.
    #[serde(default = "default_tolerance")]
    pub tolerance_s: i64,
    /// Where the event id is.
    #[serde(default)]
    pub event_id: EventIdSource,
    /// Live secrets (any may match). Never read from the JSON.
    #[serde(skip)]
    pub secrets: Vec<Secret>,
}

impl Provider {
    /// A provider with default tolerance and event id (`id` JSON field).
    pub fn new(scheme: Scheme, secrets: &[&str]) -> Self {
        Provider {
            scheme,
            tolerance_s: DEFAULT_TOLERANCE_S,
            event_id: EventIdSource::default(),
            secrets: secrets.iter().map(|s| Secret::new(s.as_bytes())).collect(),
        }
    }
}

/// Every configured provider, by name.
#[derive(Debug, Clone, Default)]
pub struct WebhookProviders {
    providers: BTreeMap<String, Provider>,
}

impl WebhookProviders {
    /// No provider (every delivery is a 404).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `name`.
    pub fn with(mut self, name: impl Into<String>, provider: Provider) -> Self {
        self.providers.insert(name.into(), provider);
        self
    }

    /// The provider called `name`.
    pub fn get(&self, name: &str) -> Option<&Provider> {
        self.providers.get(name)
    }

    /// Reads [`PROVIDERS_ENV`] and each provider's secrets variable. No
    /// variable means no provider.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(PROVIDERS_ENV) {
            Ok(json) => Self::parse(&json, |var| std::env::var(var).ok()),
            Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Err(e) => Err(format!("{PROVIDERS_ENV}: {e}")),
        }
    }

    /// Parses the providers' JSON, looking each provider's secrets up with
    /// `lookup(variable name)`.
    pub fn parse(json: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut providers: BTreeMap<String, Provider> =
            serde_json::from_str(json).map_err(|e| format!("{PROVIDERS_ENV}: {e}"))?;
        for (name, provider) in &mut providers {
            let var = secrets_var(name);
            let secrets: Vec<Secret> = lookup(&var)
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Secret::new(s.as_bytes()))
                .collect();
            if secrets.is_empty() {
                return Err(format!("webhook provider {name:?} has no secret in {var}"));
            }
            if provider.tolerance_s <= 0 {
                return Err(format!(
                    "webhook provider {name:?}: tolerance_s must be > 0"
                ));
            }
            provider.secrets = secrets;
        }
        Ok(Self { providers })
    }
}

/// The secrets variable of provider `name`.
pub fn secrets_var(name: &str) -> String {
    let suffix: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{SECRETS_ENV_PREFIX}{suffix}")
}

/// What the intake needs at request time (held by [`AppState`]).
#[derive(Debug, Clone)]
pub struct Intake {
    providers: Arc<WebhookProviders>,
    workflows: Option<Arc<WorkflowRegistry>>,
    rejected: IntCounterVec,
    accepted: IntCounterVec,
}

impl Intake {
    /// Registers the acceptance and rejection counters in `metrics`' registry.
    pub(crate) fn new(
        metrics: &Metrics,
        providers: WebhookProviders,
    ) -> Result<Self, prometheus::Error> {
        let rejected = IntCounterVec::new(
            Opts::new(
                "ledgerflow_webhook_rejected_total",
                "Webhook deliveries refused before anything was stored",
            ),
            &["provider", "reason"],
        )?;
        let accepted = IntCounterVec::new(
            Opts::new(
                "ledgerflow_webhook_accepted_total",
                "Webhook deliveries committed to the inbox (status: accepted, or duplicate of \
                 one already there)",
            ),
            &["provider", "status"],
        )?;
        metrics.registry().register(Box::new(rejected.clone()))?;
        metrics.registry().register(Box::new(accepted.clone()))?;
        // Every configured provider's series exist from the start (at 0), so
        // a rate over them is defined before the first delivery.
        for name in providers.providers.keys() {
            for status in ["accepted", "duplicate"] {
                accepted.with_label_values(&[name.as_str(), status]);
            }
        }
        Ok(Self {
            providers: Arc::new(providers),
            workflows: None,
            rejected,
            accepted,
        })
    }

    /// The same intake, starting workflows from `registry`.
    pub(crate) fn with_workflows(&self, registry: Arc<WorkflowRegistry>) -> Self {
        Self {
            workflows: Some(registry),
            ..self.clone()
        }
    }

    fn reject(&self, provider: &str, reason: &str) {
        self.rejected.with_label_values(&[provider, reason]).inc();
    }
}

/// Why a delivery was refused with 401 (the metric's `reason` label).
fn verify(
    provider: &Provider,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), &'static str> {
    let secrets: Vec<&[u8]> = provider.secrets.iter().map(|s| s.0.as_slice()).collect();
    let header_name = match provider.scheme {
        Scheme::Stripe => STRIPE_HEADER,
        Scheme::Github => GITHUB_HEADER,
    };
    let header = headers
        .get(header_name)
        .ok_or("missing_signature")?
        .to_str()
        .map_err(|_| "malformed_signature")?;
    let checked = match provider.scheme {
        Scheme::Stripe => {
            signature::verify_stripe(&secrets, header, body, now, provider.tolerance_s).map(|_| ())
        }
        Scheme::Github => signature::verify_github(&secrets, header, body),
    };
    checked.map_err(|e| match e {
        signature::Error::Malformed(_) => "malformed_signature",
        signature::Error::Stale { .. } => "stale_timestamp",
        signature::Error::Mismatch => "bad_signature",
    })
}

fn event_id(source: &EventIdSource, headers: &HeaderMap, json: &Value) -> Option<String> {
    let id = match source {
        EventIdSource::JsonField(field) => match json.get(field)? {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return None,
        },
        EventIdSource::Header(name) => headers.get(name.as_str())?.to_str().ok()?.to_string(),
    };
    let id = id.trim().to_string();
    (!id.is_empty() && id.len() <= 256).then_some(id)
}

/// The headers kept with the inbox row (never a secret; signatures are MACs).
fn kept_headers(headers: &HeaderMap) -> Value {
    let mut map = serde_json::Map::new();
    for name in [
        "content-type",
        "user-agent",
        GITHUB_DELIVERY_HEADER,
        GITHUB_EVENT_HEADER,
    ] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            map.insert(name.to_ascii_lowercase(), Value::String(v.to_string()));
        }
    }
    Value::Object(map)
}

fn db_unavailable(provider: &str, what: &str, e: &dyn std::fmt::Display) -> Response {
    tracing::error!(provider, error = %e, "webhook intake: {what} failed");
    Error::Unavailable.into_response()
}

/// How long a delivery's wake-up of its processing queue waits for others
/// to share it.
pub const WAKE_LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// `POST /v1/webhooks/{provider}`; see the module docs.
#[handler]
pub async fn receive(
    Path(name): Path<String>,
    headers: &HeaderMap,
    body: poem::Body,
    state: Data<&AppState>,
) -> Response {
    let intake = &state.webhooks;
    let Some(provider) = intake.providers.get(&name) else {
        return Error::NotFound(format!("no webhook provider {name:?}")).into_response();
    };
    // The middleware has already buffered the body within the limit.
    let body = match body.into_bytes().await {
        Ok(b) => b,
        Err(e) => {
            return Error::Validation(format!("could not read the body: {e}")).into_response();
        }
    };
    let now = state.store.now().unwrap_or_else(Utc::now).timestamp();
    if let Err(reason) = verify(provider, headers, &body, now) {
        intake.reject(&name, reason);
        tracing::warn!(provider = %name, reason, "webhook refused");
        return Error::Unauthorized.into_response();
    }
    // Signed, but still judged like every other JSON body: no duplicate
    // key (which of two ids would the provider have meant?), no U+0000.
    let checked = crate::json_body::check_json_body(&body).and_then(|()| {
        serde_json::from_slice::<Value>(&body)
            .map_err(|_| Error::Validation("the body is not JSON".into()))
    });
    let json: Value = match checked {
        Ok(v) => v,
        Err(_) => {
            intake.reject(&name, "invalid_body");
            return Error::Validation("the body is not JSON".into()).into_response();
        }
    };
    let Some(id) = event_id(&provider.event_id, headers, &json) else {
        intake.reject(&name, "no_event_id");
        return Error::Validation("the delivery carries no event id".into()).into_response();
    };
    let event: Event = match serde_json::from_value(json) {
        Ok(e) => e,
        Err(e) => {
            intake.reject(&name, "invalid_event");
            return Error::Validation(format!("not an exchange event: {e}")).into_response();
        }
    };
    let Some(registry) = intake.workflows.as_deref() else {
        tracing::error!(provider = %name, "webhook intake: no workflow registry configured");
        return Error::Unavailable.into_response();
    };

    // The payload's own id is the event's identity: a provider that
    // redelivers the same event under a new delivery id (GitHub-style
    // `X-GitHub-Delivery`) must find it a duplicate. The configured id
    // stands in only for a payload without one.
    let dedupe_key = if event.id.trim().is_empty() {
        id.clone()
    } else {
        event.id.trim().to_string()
    };
    let source = format!("webhook:{name}");
    let kept = kept_headers(headers);
    let entry = InboxEntry {
        source: &source,
        dedupe_key: &dedupe_key,
        business_id: Some(&event.id),
        payload: Some(&body),
        headers: Some(&kept),
        processed: false,
        ..InboxEntry::default()
    };
    // The inbox row and the processing workflow's start are ONE statement,
    // committed on its own before the 2xx (no BEGIN/COMMIT round trips).
    let mut conn = match state.pool.acquire().await {
        Ok(conn) => conn,
        Err(e) => return db_unavailable(&name, "connection", &e),
    };
    let inserted = match webhook::record_and_start_in(
        &mut conn,
        &state.store.clone().with_notify(false),
        registry,
        &entry,
        &event,
    )
    .await
    {
        Ok(i) => i,
        Err(e) => return db_unavailable(&name, "inbox insert and workflow start", &e),
    };
    drop(conn);
    if inserted.is_new()
        && let Some(def) = registry.latest(webhook::KIND)
    {
        state.wakeups.wake_lingering(&def.queue, WAKE_LINGER);
    }
    let status = if inserted.is_new() {
        tracing::info!(provider = %name, event_id = %id, "webhook accepted");
        "accepted"
    } else {
        tracing::info!(provider = %name, event_id = %id, "webhook duplicate");
        "duplicate"
    };
    intake.accepted.with_label_values(&[&name, status]).inc();
    (StatusCode::OK, Json(json!({ "status": status }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_providers_and_secrets() {
        let json = r#"{"exchange":{"scheme":"stripe"},
                       "gh-app":{"scheme":"github","event_id":{"header":"X-GitHub-Delivery"}}}"#;
        let p = WebhookProviders::parse(json, |var| match var {
            "LEDGERFLOW_WEBHOOK_SECRETS_EXCHANGE" => Some("old, new".into()),
            "LEDGERFLOW_WEBHOOK_SECRETS_GH_APP" => Some("k".into()),
            _ => None,
        })
        .expect("valid config");
        let ex = p.get("exchange").expect("exchange");
        assert_eq!(ex.scheme, Scheme::Stripe);
        assert_eq!(ex.tolerance_s, 300);
        assert_eq!(ex.event_id, EventIdSource::JsonField("id".into()));
        assert_eq!(ex.secrets, vec![Secret::new("old"), Secret::new("new")]);
        assert!(!format!("{p:?}").contains("old"));
        let gh = p.get("gh-app").expect("gh-app");
        assert_eq!(
            gh.event_id,
            EventIdSource::Header("X-GitHub-Delivery".into())
        );

        assert!(WebhookProviders::parse(json, |_| None).is_err());
        assert!(
            WebhookProviders::parse(r#"{"x":{"scheme":"md5"}}"#, |_| Some("k".into())).is_err()
        );
    }
}
