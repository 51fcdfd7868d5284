//! Group commit of the public POSTs: concurrent `POST /v1/trades` and
//! `POST /v1/withdrawals` share one transaction.
//!
//! A POST's database work is small (the workflow start and the idempotency
//! record, one statement each); most of its cost is the transaction around
//! it — `BEGIN`, `COMMIT` with its WAL flush, a pool checkout with its
//! pings — and the round trips. So a handler hands its validated request to
//! the [`Batcher`] and waits for the answer. At most
//! [`ApiConfig::post_transactions`](crate::ApiConfig) runners are busy at
//! once; a POST that finds one free starts it, and a busy runner takes every
//! POST queued meanwhile (up to [`ApiConfig::post_batch`](crate::ApiConfig))
//! into its next transaction. An idle API therefore runs each POST at once in
//! a transaction of its own, exactly as before, and a loaded one commits many
//! per transaction (like the queue's completer).
//!
//! Contract rule 1 holds per request: every handler answers only after the
//! transaction holding its workflow and its record committed. A shared
//! transaction commits only if EVERY member is a new key (its workflow and
//! record freshly inserted). Anything else — a replay, a key reused with
//! another request, two members with one key, a lock timeout, a deadlock (two
//! shared transactions holding the same keys in opposite order) or any
//! database error — rolls it back, and its members run again one transaction each
//! (the protocol of [`crate::idempotency`], which gives each its own answer).
//! Running them again is safe: the workflow's unique key and the record make
//! every step idempotent, also after a `COMMIT` whose outcome was unknown.
use crate::AppState;
use crate::error::{Error, Result};
use crate::idempotency::{self, Settled};
use futures::FutureExt;
use ledgerflow_engine::workflow_start_in;
use ledgerflow_payments::UserId;
use ledgerflow_payments::idempotency::{self as records, Recorded};
use ledgerflow_payments::workflows::{trade, withdrawal};
use prometheus::{Histogram, HistogramOpts};
use serde_json::Value;
use std::collections::{BTreeSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;
use tracing::Instrument;
use uuid::Uuid;

/// What a POST creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resource {
    /// A trade (`payments.trade` workflow).
    Trade,
    /// A withdrawal (`payments.withdrawal` workflow).
    Withdrawal,
}

impl Resource {
    fn kind(self) -> &'static str {
        match self {
            Resource::Trade => trade::KIND,
            Resource::Withdrawal => withdrawal::KIND,
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Resource::Trade => "trade",
            Resource::Withdrawal => "withdrawal",
        }
    }
}

/// A validated POST, ready to be written.
#[derive(Debug, Clone)]
pub(crate) struct Creation {
    pub resource: Resource,
    pub user: UserId,
    /// The `Idempotency-Key`.
    pub key: String,
    /// The request's fingerprint (`ledgerflow_payments::idempotency::fingerprint`).
    pub fingerprint: String,
    /// The workflow's input.
    pub input: Value,
    /// The request's span ([`Creation::request_span`]): the transaction runner writes the
    /// start in it, so the workflow's trace is the request's.
    pub span: tracing::Span,
}

impl Creation {
    /// The current request's span with tracing on; none (and no cost) with it off.
    pub(crate) fn request_span() -> tracing::Span {
        if ledgerflow_engine::trace::enabled() {
            tracing::Span::current()
        } else {
            tracing::Span::none()
        }
    }

    /// The workflow's unique key: what makes a concurrent request with the
    /// same `Idempotency-Key` wait for the first one.
    fn unique_key(&self) -> String {
        format!("api:{}:{}:{}", self.resource.noun(), self.user, self.key)
    }
}

type Reply = oneshot::Sender<Result<Settled>>;

#[derive(Debug, Default)]
struct Queue {
    waiting: VecDeque<(Creation, Reply)>,
    runners: usize,
}

/// The POSTs' transaction runners (one per [`AppState`]).
#[derive(Debug)]
pub struct Batcher {
    max_runners: usize,
    max_batch: usize,
    queue: Mutex<Queue>,
    sizes: Histogram,
}

impl Batcher {
    /// At most `max_runners` transactions at once, each with at most
    /// `max_batch` POSTs (both at least 1); the batch-size histogram is
    /// registered in `registry`.
    pub(crate) fn new(
        max_runners: usize,
        max_batch: usize,
        registry: &prometheus::Registry,
    ) -> std::result::Result<Self, prometheus::Error> {
        let sizes = Histogram::with_opts(
            HistogramOpts::new(
                "ledgerflow_api_post_batch_size",
                "Public POSTs per transaction (trades and withdrawals committed together)",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
        )?;
        registry.register(Box::new(sizes.clone()))?;
        Ok(Self {
            max_runners: max_runners.max(1),
            max_batch: max_batch.max(1),
            queue: Mutex::new(Queue::default()),
            sizes,
        })
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // The queue stays consistent whatever panicked while holding it.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes `creation` (in a transaction shared with other POSTs when the
    /// API is busy) and returns its answer once that transaction ended.
    pub(crate) async fn create(&self, state: &AppState, creation: Creation) -> Result<Settled> {
        let (reply, answer) = oneshot::channel();
        let start_runner = {
            let mut queue = self.queue();
            queue.waiting.push_back((creation, reply));
            let start = queue.runners < self.max_runners;
            if start {
                queue.runners += 1;
            }
            start
        };
        if start_runner {
            tokio::spawn(drain(state.clone()));
        }
        answer
            .await
            .map_err(|_| Error::Internal("the POST's transaction runner stopped".into()))?
    }
}

/// A runner: takes the queued POSTs in batches until none is left.
async fn drain(state: AppState) {
    let batcher = Arc::clone(&state.batcher);
    loop {
        let batch: Vec<(Creation, Reply)> = {
            let mut queue = batcher.queue();
            if queue.waiting.is_empty() {
                // Under the same lock as the check: a POST queued after it
                // sees one runner fewer and starts its own.
                queue.runners -= 1;
                return;
            }
            let n = queue.waiting.len().min(batcher.max_batch);
            queue.waiting.drain(..n).collect()
        };
        // A panic loses this batch's answers (their handlers get a 500), not
        // the runner: later POSTs still find it counted and running.
        if AssertUnwindSafe(run(&state, batch))
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!("a POST transaction runner panicked; its batch was answered 500");
        }
    }
}

/// Runs one batch and answers each member.
async fn run(state: &AppState, batch: Vec<(Creation, Reply)>) {
    if batch.len() > 1 {
        let creations: Vec<&Creation> = batch.iter().map(|(c, _)| c).collect();
        match together(state, &creations).await {
            Ok(Some(bodies)) => {
                state.batcher.sizes.observe(batch.len() as f64);
                for ((_, reply), body) in batch.into_iter().zip(bodies) {
                    // A handler that went away (client gone) just misses its answer.
                    let _ = reply.send(Ok(Settled::Created(body)));
                }
                return;
            }
            Ok(None) => {
                tracing::debug!(
                    size = batch.len(),
                    "shared POST transaction rolled back (not all keys new); one transaction each"
                );
            }
            Err(e) => {
                tracing::info!(
                    size = batch.len(),
                    error = %e,
                    "shared POST transaction failed; one transaction each"
                );
            }
        }
    }
    for (creation, reply) in batch {
        let answer = alone(state, &creation).await;
        if answer.is_ok() {
            state.batcher.sizes.observe(1.0);
        }
        let _ = reply.send(answer);
    }
}

/// Starts `c`'s workflow and stores its record on `tx`.
async fn write(
    state: &AppState,
    tx: &mut sqlx::PgConnection,
    c: &Creation,
) -> Result<(Uuid, Option<Recorded>)> {
    let registry = state.workflows.as_deref().ok_or_else(|| {
        tracing::error!("public API has no workflow registry (AppState::with_workflows)");
        Error::Unavailable
    })?;
    let id = workflow_start_in(
        &mut *tx,
        &state.store.clone().with_notify(false),
        registry,
        c.resource.kind(),
        &c.input,
        Some(&c.unique_key()),
    )
    .instrument(c.span.clone())
    .await
    .map_err(idempotency::start_failed)?;
    let recorded = match c.resource {
        Resource::Trade => records::record_trade(tx, c.user, &c.key, &c.fingerprint, id).await,
        Resource::Withdrawal => {
            records::record_withdrawal(tx, c.user, &c.key, &c.fingerprint, id).await
        }
    }?;
    Ok((id, recorded))
}

/// Sends the wake-ups for the queues of `kinds`' workflows (after their commit).
fn wake<'a>(state: &AppState, kinds: impl IntoIterator<Item = &'a str>) {
    if !state.store.config().notify {
        return;
    }
    let Some(registry) = state.workflows.as_deref() else {
        return;
    };
    let queues: BTreeSet<&str> = kinds
        .into_iter()
        .filter_map(|kind| registry.latest(kind).map(|def| def.queue.as_str()))
        .collect();
    for queue in queues {
        state.wakeups.wake(queue);
    }
}

/// One POST in a transaction of its own: the protocol of
/// [`crate::idempotency`], with the request's own answer for every case.
async fn alone(state: &AppState, c: &Creation) -> Result<Settled> {
    let mut conn = state.pool().acquire().await?;
    let mut tx = idempotency::begin(&mut conn).await?;
    let (id, recorded) = write(state, &mut tx, c).await?;
    let settled = idempotency::settle(
        recorded,
        &c.fingerprint,
        &format!("{} {id}", c.resource.noun()),
    )?;
    if matches!(settled, Settled::Created(_)) {
        tx.commit().await?;
        wake(state, [c.resource.kind()]);
    }
    // A replay wrote nothing worth keeping (dropping `tx` rolls it back).
    Ok(settled)
}

/// All of `creations` in one transaction: their response bodies once it
/// committed, or None (rolled back) unless every one was a new key.
async fn together(state: &AppState, creations: &[&Creation]) -> Result<Option<Vec<Value>>> {
    let mut conn = state.pool().acquire().await?;
    let mut tx = idempotency::begin(&mut conn).await?;
    let mut bodies = Vec::with_capacity(creations.len());
    for c in creations {
        match write(state, &mut tx, c).await? {
            (_, Some(Recorded::New(body))) => bodies.push(body),
            _ => return Ok(None),
        }
    }
    tx.commit().await?;
    wake(state, creations.iter().map(|c| c.resource.kind()));
    Ok(Some(bodies))
}
