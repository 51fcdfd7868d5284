//! Job wake-ups sent after the commit, coalesced per queue.
//!
//! The public POSTs start their workflows without the in-transaction
//! `NOTIFY` (see `Store::with_notify`): a notifying commit takes Postgres'
//! global notify lock and holds it through its WAL flush, so notifying
//! commits run one at a time (about 750/s on this project's 2-core machine)
//! and the POSTs would queue behind each other. Instead, after its commit a
//! handler calls [`Wakeups::wake`]: per queue at most one `pg_notify` is in
//! flight, on its own pooled connection and its own tiny transaction, and
//! a wake asked for while one is in flight sends exactly one more after it.
//! So every commit is followed by a notification sent after it, and a burst
//! of commits costs a handful of notifications instead of one each.
//!
//! The notification's transaction commits with `synchronous_commit = off`:
//! it writes nothing durable worth waiting for (the jobs are already
//! committed), and a notification lost to a crash only costs a poll
//! interval — workers poll anyway, which is also the fallback when sending
//! fails.
use ledgerflow_engine::notify::JOBS_CHANNEL;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// What a queue's sender has to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sending {
    /// One notification is in flight; nobody asked since it was started.
    Once,
    /// Asked again while one was in flight: send one more after it.
    Again,
}

/// The coalescing sender (one per [`crate::AppState`]).
#[derive(Debug)]
pub struct Wakeups {
    pool: PgPool,
    queues: Mutex<HashMap<String, Sending>>,
}

impl Wakeups {
    /// Wake-ups sent on `pool`'s connections.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            queues: Mutex::new(HashMap::new()),
        }
    }

    fn queues(&self) -> MutexGuard<'_, HashMap<String, Sending>> {
        // The map stays consistent whatever panicked while holding it.
        self.queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes sure a notification for `queue` is sent after this call (call it
    /// after the commit that made the jobs available). Never blocks on I/O.
    pub fn wake(self: &Arc<Self>, queue: &str) {
        self.wake_lingering(queue, Duration::ZERO);
    }

    /// [`Wakeups::wake`], but each notification first waits `linger`, so
    /// that every commit asking within that window shares it: a steady
    /// stream of commits costs one notification per `linger` instead of
    /// about one per commit when few are concurrent. The jobs wait at most
    /// `linger` longer for a worker; for work that runs after the answer
    /// (webhook processing) that is nothing next to the poll interval.
    pub fn wake_lingering(self: &Arc<Self>, queue: &str, linger: Duration) {
        let mut queues = self.queues();
        match queues.get_mut(queue) {
            Some(state) => *state = Sending::Again,
            None => {
                queues.insert(queue.to_string(), Sending::Once);
                tokio::spawn(Arc::clone(self).send(queue.to_string(), linger));
            }
        }
    }

    /// Sends for `queue` until no wake-up was asked for during the last send.
    async fn send(self: Arc<Self>, queue: String, linger: Duration) {
        loop {
            if !linger.is_zero() {
                tokio::time::sleep(linger).await;
            }
            let sent = sqlx::query(
                "SELECT pg_notify($1, $2), set_config('synchronous_commit', 'off', true)",
            )
            .bind(JOBS_CHANNEL)
            .bind(&queue)
            .execute(&self.pool)
            .await;
            if let Err(e) = sent {
                tracing::warn!(queue, error = %e, "job wake-up not sent; workers will poll");
            }
            let mut queues = self.queues();
            match queues.get_mut(&queue) {
                Some(state) if *state == Sending::Again => *state = Sending::Once,
                _ => {
                    queues.remove(&queue);
                    return;
                }
            }
        }
    }
}
