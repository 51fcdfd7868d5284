//! Batched completion of successful attempts (group commit).
//!
//! Handlers that finish with `Outcome::Complete` (and did not already finish
//! inside their own fenced transaction) hand `(job, token)` here. Whatever
//! piles up while one statement is in flight goes out in the next, so under
//! load one commit completes hundreds of jobs, and at idle a completion waits
//! for nothing. Each row still only completes if its token is current. A completion of a job
//! claimed under flow control wakes its queue's fetcher once committed: the slot it held may
//! be what a waiting job needs.
use super::Shared;
use ledgerflow_engine::JobId;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// A successful attempt to complete: its lease, and the fetcher to wake once committed.
pub(crate) type Completion = (JobId, Uuid, Option<Arc<Notify>>);

#[derive(Debug)]
pub(crate) struct CompleterHandle {
    tx: mpsc::UnboundedSender<Completion>,
    task: JoinHandle<()>,
}

impl CompleterHandle {
    pub(crate) fn sender(&self) -> mpsc::UnboundedSender<Completion> {
        self.tx.clone()
    }

    /// Commits everything already handed over, then stops.
    pub(crate) async fn close(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

pub(crate) fn start(shared: Arc<Shared>) -> CompleterHandle {
    let (tx, mut rx) = mpsc::unbounded_channel::<Completion>();
    let max = shared.config.max_complete_batch.max(1);
    let task = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(max);
        // Ends when every sender is gone: the runner's handle and each
        // queue's dispatch service.
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(x) => batch.push(x),
                    Err(_) => break,
                }
            }
            flush(&shared, &batch).await;
            batch.clear();
        }
    });
    CompleterHandle { tx, task }
}

async fn flush(shared: &Shared, batch: &[Completion]) {
    let leases: Vec<(JobId, Uuid)> = batch.iter().map(|(id, t, _)| (*id, *t)).collect();
    complete(shared, &leases).await;
    let mut woken: Vec<&Arc<Notify>> = Vec::new();
    for wake in batch.iter().filter_map(|(_, _, w)| w.as_ref()) {
        if !woken.iter().any(|w| Arc::ptr_eq(w, wake)) {
            wake.notify_one();
            woken.push(wake);
        }
    }
}

async fn complete(shared: &Shared, batch: &[(JobId, Uuid)]) {
    let mut backoff = Duration::from_millis(20);
    loop {
        match shared.store.job_complete_many(batch).await {
            Ok(done) => {
                if done.len() != batch.len() {
                    let done: std::collections::HashSet<_> = done.into_iter().collect();
                    for (id, token) in batch.iter().filter(|(id, _)| !done.contains(id)) {
                        tracing::warn!(job_id = %id, token = %token,
                            "completion rejected: lease is stale (the job was rescued or cancelled)");
                    }
                }
                for (id, _) in batch {
                    shared.drop_lease(*id);
                }
                return;
            }
            Err(e) if e.is_transient() && !shared.stop_services.is_cancelled() => {
                tracing::warn!(error = %e, jobs = batch.len(), "completing jobs failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                // The leases stay held and heartbeated until shutdown releases
                // them or they expire; the jobs then run again (at least once).
                tracing::error!(error = %e, jobs = batch.len(), "completing jobs failed");
                return;
            }
        }
    }
}
