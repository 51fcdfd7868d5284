//! The payments workflows, built on the engine's durable steps.
//!
//! - [`trade`]        — `payments.trade`: validate → hold → place order →
//!   wait for the fill → settle → notify (saga: release the hold, cancel the
//!   order; in-doubt placement reconciled by idempotency key);
//! - [`withdrawal`]   — `payments.withdrawal`: validate (daily limit) → hold →
//!   approval above a threshold → submit → wait for confirmation → capture;
//! - [`notification`] — `payments.notification`: render → send (one external
//!   call deduplicated by notification id; in doubt → reconciled by asking
//!   the provider, re-sent under the same id only when it has nothing);
//! - [`digest`]       — one user's notifications debounced into one message, a
//!   `payments.notification` instance started debounced per user;
//! - [`webhook`]      — `payments.webhook`: a verified exchange event becomes
//!   the signal its workflow waits for;
//! - `steps`          — the step pieces trade and withdrawal share (row
//!   status, hold and release, exchange-call failures, event, notification).
//!
//! [`registry`] registers all of them, with the exchange and notifier
//! injected. Every step writes its domain rows and ledger postings through
//! `ctx.db()`, the step's lease-fenced transaction, so they commit with the
//! step's checkpoint or not at all (contract rule 2); every exchange and
//! provider call carries the step's idempotency key and goes through
//! `StepCtx::external_call` (contract rule 3).

pub mod digest;
pub mod notification;
mod steps;
pub mod trade;
pub mod webhook;
pub mod withdrawal;

use crate::exchange::Exchange;
use crate::notifier::Notifier;
use crate::policy::Policy;
use ledgerflow_engine::workflow::{CompensationResult, ReconcileResult, StepResult};
use ledgerflow_engine::{StepCtx, StepOutcome, WorkflowRegistry};
use rust_decimal::Decimal;
use serde_json::Value;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The Kafka topic the payments domain events go to (through the outbox).
pub const EVENTS_TOPIC: &str = "ledgerflow.payments.events";

/// Settings of the payments workflows (12-factor config fills it).
#[derive(Debug, Clone)]
pub struct WorkflowsConfig {
    /// How long a trade waits for its fill before it cancels the order.
    pub fill_timeout: Duration,
    /// The highest fee rate an exchange may charge (on the quote notional):
    /// a buy holds `notional × (1 + max_fee_rate)` of the quote asset.
    pub max_fee_rate: Decimal,
    /// The configured withdrawal policy per asset (approval thresholds,
    /// daily limit per user): what applies to an asset unless an admin set
    /// an override ([`crate::policy`]). An asset missing from both has no
    /// approval and no limit.
    pub withdrawal_policy: Policy,
    /// How long a withdrawal waits for its approval before it is cancelled.
    pub approval_timeout: Duration,
    /// How often a submitted withdrawal re-checks the exchange while it
    /// waits for its confirmation webhook.
    pub confirmation_poll: Duration,
    /// Attempts of a notification's send (retried with the store's backoff).
    pub notification_attempts: i32,
    /// One user's notifications are debounced into digests ([`digest`]); `None`: every event
    /// sends its own.
    pub notification_digest: Option<digest::NotificationDigest>,
    /// The rate-limit key of the exchange's API key: every call to the exchange charges it
    /// (see [`flow_limits`]).
    pub exchange_rate_key: String,
}

/// The flow key class of withdrawals: `withdrawals:user:{id}`, one workflow-wide key per user.
pub const WITHDRAWALS_PER_USER: &str = "withdrawals:user:*";

/// The domain's limits, declared in code at start (operators may change them at runtime):
/// - the exchange's request budget as a token bucket under `exchange_rate_key`, kept just
///   under the budget (a burst of 2 % but at least 6, two of the heaviest calls; refilled at
///   the rest less 1 %: over any window at most 99 % of the budget passes, leaving room for
///   calls that reach the exchange a little after their turn);
/// - `withdrawals_per_user` withdrawals of one user at a time.
pub fn flow_limits(
    config: &WorkflowsConfig,
    budget: Option<crate::exchange::budget::RequestBudget>,
    withdrawals_per_user: Option<i32>,
) -> Vec<ledgerflow_engine::flow::FlowLimit> {
    use ledgerflow_engine::flow::FlowLimit;
    let mut limits = Vec::new();
    if let Some(b) = budget {
        let weight = i64::from(b.weight);
        let burst = (weight / 50).max(6);
        let refill = (weight - burst - (weight / 100).max(1)).max(1);
        limits.push(FlowLimit::new(config.exchange_rate_key.clone()).rate(burst, refill, b.window));
    }
    if let Some(n) = withdrawals_per_user {
        limits.push(FlowLimit::new(WITHDRAWALS_PER_USER).concurrency(n));
    }
    limits
}

impl Default for WorkflowsConfig {
    fn default() -> Self {
        WorkflowsConfig {
            fill_timeout: Duration::from_secs(15 * 60),
            max_fee_rate: Decimal::new(1, 3),
            withdrawal_policy: Policy::new(),
            approval_timeout: Duration::from_secs(48 * 3600),
            confirmation_poll: Duration::from_secs(3600),
            notification_attempts: 10,
            notification_digest: None,
            exchange_rate_key: "exchange:sim".to_string(),
        }
    }
}

/// What the workflows need from the outside: injected so that tests use the
/// simulators and production the HTTP adapters.
#[derive(Clone)]
pub struct Deps {
    /// The trading venue.
    pub exchange: Arc<dyn Exchange>,
    /// The email/push provider.
    pub notifier: Arc<dyn Notifier>,
    /// Settings.
    pub config: WorkflowsConfig,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Every payments workflow, registered with `deps`.
pub fn registry(deps: Deps) -> ledgerflow_engine::Result<WorkflowRegistry> {
    let deps = Arc::new(deps);
    let notifications = Arc::new(notification_registry(&deps)?);
    WorkflowRegistry::new()
        .register(trade::definition(&deps, &notifications))?
        .register(withdrawal::definition(&deps, &notifications))?
        .register(notification::definition(&deps))?
        .register(webhook::definition())
}

/// A registry with only the notification workflow: what other workflows'
/// steps need to start one (`workflow_start_in` looks its first step up).
fn notification_registry(deps: &Arc<Deps>) -> ledgerflow_engine::Result<WorkflowRegistry> {
    WorkflowRegistry::new().register(notification::definition(deps))
}

// ------------------------------------------------------------------ helpers

/// Adapts `f(deps, ctx)` to a step body.
fn step_fn<D, F, Fut>(deps: &Arc<D>, f: F) -> impl Fn(StepCtx) -> Fut + Send + Sync + 'static
where
    D: Send + Sync + 'static + ?Sized,
    F: Fn(Arc<D>, StepCtx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StepResult> + Send + 'static,
{
    let deps = Arc::clone(deps);
    move |ctx| f(Arc::clone(&deps), ctx)
}

/// Adapts `f(deps, ctx, output)` to a compensation.
fn compensate_fn<D, F, Fut>(
    deps: &Arc<D>,
    f: F,
) -> impl Fn(StepCtx, Value) -> Fut + Send + Sync + 'static
where
    D: Send + Sync + 'static + ?Sized,
    F: Fn(Arc<D>, StepCtx, Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CompensationResult> + Send + 'static,
{
    let deps = Arc::clone(deps);
    move |ctx, output| f(Arc::clone(&deps), ctx, output)
}

/// Adapts `f(deps, ctx, key)` to a reconcile hook.
fn reconcile_fn<D, F, Fut>(
    deps: &Arc<D>,
    f: F,
) -> impl Fn(StepCtx, String) -> Fut + Send + Sync + 'static
where
    D: Send + Sync + 'static + ?Sized,
    F: Fn(Arc<D>, StepCtx, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ReconcileResult> + Send + 'static,
{
    let deps = Arc::clone(deps);
    move |ctx, key| f(Arc::clone(&deps), ctx, key)
}

/// Charges an exchange request of `weight` made outside `external_call_limited` (a look-up, a
/// cancel) to the exchange's rate-limit key. Over the budget the error says so and the run makes
/// no request: the engine discards the run and repeats it at the bucket's turn, without using
/// an attempt.
async fn charge_exchange(deps: &Deps, ctx: &StepCtx, weight: u32) -> Result<(), String> {
    ctx.rate_limit(&deps.config.exchange_rate_key, weight)
        .await
        .map_err(|e| e.to_string())
}

/// The step's fenced connection, or a transient error.
async fn db(ctx: &StepCtx) -> Result<ledgerflow_engine::workflow::StepDb, String> {
    ctx.db().await.map_err(|e| format!("step transaction: {e}"))
}

/// How a domain error ends a step: a business refusal fails it for good
/// (→ compensation), anything else is retried with backoff.
fn refusal_or_retry(e: crate::Error) -> StepResult {
    if is_refusal(&e) {
        Ok(StepOutcome::Fail(e.to_string()))
    } else {
        Err(e.to_string())
    }
}

/// True for the domain's final answers (the same input always gets them).
fn is_refusal(e: &crate::Error) -> bool {
    use crate::Error as E;
    matches!(
        e,
        E::InvalidAmount { .. }
            | E::InsufficientFunds { .. }
            | E::Unbalanced { .. }
            | E::ScaleExceeded { .. }
            | E::UnknownAsset(_)
            | E::UnknownAccount(_)
            | E::ReferenceConflict { .. }
            | E::HoldNotFound(_)
            | E::HoldNotActive { .. }
            | E::UserNotFound(_)
            | E::Invalid(_)
            | E::Forbidden(_)
    )
}

/// Reads `field` of a JSON object as a string.
fn str_field<'a>(v: &'a Value, field: &str) -> Result<&'a str, String> {
    v.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string field {field:?}"))
}

/// A journaled step output, or a (retried, then failing) error.
fn output<'a>(ctx: &'a StepCtx, step: &str) -> Result<&'a Value, String> {
    ctx.output(step)
        .ok_or_else(|| format!("step {step:?} has no journaled output"))
}

/// The database clock unless the store runs on a manual one.
fn now_param(ctx: &StepCtx) -> Option<chrono::DateTime<chrono::Utc>> {
    ctx.store().now()
}
