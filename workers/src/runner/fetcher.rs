//! The per-queue claim loop.
//!
//! Claims as many jobs as the queue has free capacity (handler slots plus
//! prefetch) in one statement. After a full batch it claims again at once —
//! there is probably more — otherwise it sleeps until a NOTIFY wake-up or the
//! poll interval, whichever comes first. Every claimed lease is registered in
//! the in-flight map before the job is handed on, so heartbeats cover jobs
//! waiting in the prefetch buffer too.
use super::backend::Claimed;
use super::{QueueConfig, Shared};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, mpsc};

pub(crate) async fn run(
    shared: Arc<Shared>,
    queue: QueueConfig,
    wake: Arc<Notify>,
    capacity: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Claimed>,
) {
    let max_batch = shared.config.max_claim_batch.max(1);
    let poll = shared.config.poll_interval;
    let mut more = true;
    let mut error_backoff = Duration::from_millis(50);
    loop {
        let first = tokio::select! {
            _ = shared.stop_claiming.cancelled() => return,
            p = capacity.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        if !more {
            tokio::select! {
                _ = shared.stop_claiming.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
        let mut permit = first;
        let extra = capacity.available_permits().min(max_batch - 1);
        if extra > 0
            && let Ok(p) = capacity
                .clone()
                .try_acquire_many_owned(u32::try_from(extra).unwrap_or(u32::MAX))
        {
            permit.merge(p);
        }
        let want = permit.num_permits();
        let claimed = shared
            .store
            .job_claim(
                &queue.name,
                &shared.owner,
                u32::try_from(want).unwrap_or(u32::MAX),
            )
            .await;
        match claimed {
            Ok(jobs) => {
                let claimed_at = std::time::Instant::now();
                error_backoff = Duration::from_millis(50);
                more = jobs.len() == want;
                for job in jobs {
                    shared.hold(job.id, job.lease.token);
                    // `split(1)` cannot fail: one permit per claimed job and
                    // we claimed at most `want` of them.
                    let Some(p) = permit.split(1) else { break };
                    if tx
                        .send(Claimed {
                            job,
                            permit: p,
                            claimed_at,
                        })
                        .is_err()
                    {
                        // The worker is gone (shutdown); the lease stays in
                        // the in-flight map and is released there.
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(queue = %queue.name, error = %e, "claim failed; retrying");
                more = true;
                drop(permit);
                tokio::select! {
                    _ = shared.stop_claiming.cancelled() => return,
                    _ = tokio::time::sleep(error_backoff) => {}
                }
                error_backoff = (error_backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
