//! The apalis service that runs one claimed job: look up its handler, run it
//! (on its own tokio task, so handlers use every core and a panic is caught),
//! apply the per-job timeout, then record the outcome through the lease fence.
use super::Shared;
use super::backend::Claimed;
use super::handler::JobContext;
use apalis_core::task::Task;
use futures::future::BoxFuture;
use ledgerflow_engine::{Error, JobId, Lease, Outcome};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;
use tracing::Instrument;

/// Handler tasks currently running, so shutdown can abort them after the
/// grace period.
#[derive(Debug, Default)]
pub(crate) struct Executing {
    tasks: Mutex<HashMap<JobId, AbortHandle>>,
}

impl Executing {
    fn insert(&self, id: JobId, h: AbortHandle) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, h);
    }

    fn remove(&self, id: JobId) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    pub(crate) fn abort_all(&self) -> usize {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for h in tasks.values() {
            h.abort();
        }
        tasks.len()
    }
}

#[derive(Clone)]
pub(crate) struct Dispatch {
    shared: Arc<Shared>,
    completer: mpsc::UnboundedSender<super::completer::Completion>,
    executing: Arc<Executing>,
    /// Wakes this queue's fetcher.
    wake: Arc<Notify>,
}

impl Dispatch {
    pub(crate) fn new(
        shared: Arc<Shared>,
        completer: mpsc::UnboundedSender<super::completer::Completion>,
        executing: Arc<Executing>,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            shared,
            completer,
            executing,
            wake,
        }
    }
}

impl tower::Service<Task<Claimed>> for Dispatch {
    type Response = ();
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<(), Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, task: Task<Claimed>) -> Self::Future {
        let this = self.clone();
        let Claimed {
            job,
            permit,
            claimed_at,
        } = task.args;
        Box::pin(async move {
            if this.shared.stop_claiming.is_cancelled() {
                // Shutting down: a prefetched job that has not started stays
                // unstarted; its lease is released with the others.
                drop(permit);
                return Ok(());
            }
            let lease = job.lease.clone();
            let flow = job.flow;
            let kind = job.kind.clone();
            let queue = job.queue.clone();
            let metrics = this.shared.config.metrics.clone();
            if let Some(m) = &metrics {
                m.started(&queue, claimed_at.elapsed());
            }
            let started = std::time::Instant::now();
            let timeout = job.timeout;
            let span = job_span(&job);
            let handler = this.shared.registry.get(&kind);
            let ctx = JobContext::new(job, this.shared.store.clone());
            let run_kind = kind.clone();
            let run = async move {
                let kind = run_kind;
                let Some(handler) = handler else {
                    return Outcome::retry(format!("no handler registered for job kind {kind:?}"));
                };
                match timeout {
                    Some(t) => tokio::time::timeout(t, handler.perform(ctx))
                        .await
                        .unwrap_or_else(|_| Outcome::retry(format!("timed out after {t:?}"))),
                    None => handler.perform(ctx).await,
                }
            };
            let spawned = tokio::spawn(run.instrument(span));
            this.executing.insert(lease.job_id, spawned.abort_handle());
            let joined = spawned.await;
            this.executing.remove(lease.job_id);
            drop(permit);
            if lease.wants_own_queue_woken() {
                // The handler committed work for this queue without a NOTIFY
                // (a workflow step's successor): claim it now.
                this.wake.notify_one();
            }
            let (outcome, label) = match joined {
                Ok(o) => {
                    let label = o.label();
                    (o, label)
                }
                Err(e) if e.is_panic() => (
                    Outcome::retry(format!("handler panicked: {}", panic_text(e))),
                    "panic",
                ),
                // Aborted at shutdown: its lease is released by the runner.
                Err(_) => return Ok(()),
            };
            if let Some(m) = &metrics {
                m.finished(&queue, &kind, label, started.elapsed());
            }
            finish(&this, &lease, outcome, flow).await;
            Ok(())
        })
    }
}

/// A short snooze (a step deferred to its rate limit's turn) comes back on time: this process
/// promotes due jobs and claims once the snooze is over, instead of waiting for the
/// promoter's next round.
fn wake_after(this: &Dispatch, d: Duration) {
    if d > Duration::from_secs(10) {
        return;
    }
    let (shared, wake) = (this.shared.clone(), this.wake.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = shared.stop_services.cancelled() => {}
            _ = tokio::time::sleep(d) => {
                if shared.store.job_promote_due(1000).await.is_ok() {
                    wake.notify_one();
                }
            }
        }
    });
}

/// The span of one attempt (none with tracing off): a child of the context the job was
/// enqueued under, so an attempt after a crash, a retry or a restart continues the trace of
/// the request that enqueued it (decision 0011).
fn job_span(job: &ledgerflow_engine::store::ClaimedJob) -> tracing::Span {
    if !ledgerflow_engine::trace::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "job",
        otel.name = %format_args!("job {}", job.kind),
        job.id = %job.id,
        job.kind = %job.kind,
        job.queue = %job.queue,
        attempt = job.lease.attempt,
    );
    ledgerflow_engine::trace::continue_from(&span, job.traceparent.as_deref());
    span
}

fn panic_text(e: tokio::task::JoinError) -> String {
    let p = e.into_panic();
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_string())
}

/// Records the outcome (unless the handler committed it). A job claimed under flow control
/// wakes its fetcher once its end is committed: it may have freed the slot a waiting job needs.
async fn finish(this: &Dispatch, lease: &Lease, outcome: Outcome, flow: bool) {
    let shared = &this.shared;
    if lease.is_finished() {
        // The handler committed its outcome in its own fenced transaction.
        shared.drop_lease(lease.job_id);
        if flow {
            this.wake.notify_one();
        }
        return;
    }
    if let Outcome::Snooze(d) = &outcome {
        wake_after(this, *d);
    }
    let wake = flow.then(|| this.wake.clone());
    if outcome == Outcome::Complete
        && this
            .completer
            .send((lease.job_id, lease.token, wake))
            .is_ok()
    {
        return;
    }
    let mut backoff = Duration::from_millis(20);
    loop {
        match shared.store.job_finish(lease, &outcome).await {
            Ok(()) => break,
            Err(Error::StaleLease { .. }) => {
                tracing::warn!(job_id = %lease.job_id, outcome = outcome.label(),
                    "outcome rejected: lease is stale (the job was rescued or cancelled)");
                break;
            }
            Err(e) if e.is_transient() && !shared.stop_services.is_cancelled() => {
                tracing::warn!(job_id = %lease.job_id, error = %e, "recording outcome failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(job_id = %lease.job_id, error = %e, "recording outcome failed");
                // Keep the lease registered: shutdown releases it, or it
                // expires and the job is rescued.
                return;
            }
        }
    }
    shared.drop_lease(lease.job_id);
    if flow {
        this.wake.notify_one();
    }
}
