//! Background services of a runner: heartbeats, the lease reaper, the
//! promoter of due jobs, priority aging, and the pruner of old history.
//!
//! Every worker process runs them; they are safe to run concurrently because
//! each statement skips rows other sessions hold (`SKIP LOCKED`).
use super::Shared;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Runs `tick` every `every` until the runner's services stop.
async fn every<F, Fut>(shared: &Shared, every: Duration, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        tokio::select! {
            _ = shared.stop_services.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        tick().await;
    }
}

/// Extends the leases of every attempt this process holds.
pub(crate) async fn heartbeat(shared: Arc<Shared>) {
    let s = shared.clone();
    every(&shared, shared.config.heartbeat_interval, || {
        let s = s.clone();
        async move {
            let held = s.held();
            if held.is_empty() {
                return;
            }
            if let Err(e) = s.store.job_heartbeat(&held).await {
                tracing::warn!(error = %e, leases = held.len(), "heartbeat failed");
            }
        }
    })
    .await;
}

/// Rescues jobs whose lease expired.
pub(crate) async fn reaper(shared: Arc<Shared>) {
    let s = shared.clone();
    every(&shared, shared.config.rescue_interval, || {
        let s = s.clone();
        async move {
            match s.store.job_rescue_expired(1000).await {
                Ok(n) if n > 0 => tracing::info!(rescued = n, "rescued jobs with expired leases"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "lease reaper failed"),
            }
        }
    })
    .await;
}

/// Makes due scheduled and retryable jobs available.
pub(crate) async fn promoter(shared: Arc<Shared>) {
    let s = shared.clone();
    every(&shared, shared.config.promote_interval, || {
        let s = s.clone();
        async move {
            // Keep going while full batches come back, so a large backlog of
            // due jobs is promoted without waiting an interval per batch.
            while let Ok(5000) = s.store.job_promote_due(5000).await {}
        }
    })
    .await;
}

/// Moves long-waiting low-priority jobs up a level, once per aging period.
pub(crate) async fn ager(shared: Arc<Shared>) {
    let Some(period) = shared.config.priority_aging else {
        return;
    };
    let s = shared.clone();
    every(&shared, period, || {
        let s = s.clone();
        async move {
            match s.store.job_age_priorities(period, 10_000).await {
                Ok(n) if n > 0 => tracing::debug!(aged = n, "aged waiting low-priority jobs"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "priority aging failed"),
            }
        }
    })
    .await;
}

/// Deletes finished jobs older than the retention.
pub(crate) async fn pruner(shared: Arc<Shared>) {
    let Some(retention) = shared.config.retention else {
        return;
    };
    let s = shared.clone();
    every(&shared, Duration::from_secs(60), || {
        let s = s.clone();
        async move {
            let now = s.store.now().unwrap_or_else(chrono::Utc::now);
            let cut =
                |d: Duration| now - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
            match s
                .store
                .job_prune(cut(retention.completed), cut(retention.dead), 10_000)
                .await
            {
                Ok(n) if n > 0 => tracing::debug!(pruned = n, "pruned finished jobs"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning failed"),
            }
            if let Err(e) = s.store.flow_prune_reservations(10_000).await {
                tracing::warn!(error = %e, "pruning rate-limit reservations failed");
            }
        }
    })
    .await;
}
