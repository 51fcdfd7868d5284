//! LISTEN/NOTIFY wake-ups.
//!
//! Inserts that make a job available send `NOTIFY ledgerflow_jobs, '<queue>'`
//! inside the inserting transaction; Postgres folds identical notifications of
//! one transaction into one, so a transaction wakes each queue at most once
//! however many rows it inserts. Workers also poll, so a lost notification —
//! or a pooler that cannot LISTEN — only adds latency, never loses work.
use crate::Result;
use sqlx::PgPool;
use sqlx::postgres::PgListener;

/// Channel for "jobs became available in queue <payload>".
pub const JOBS_CHANNEL: &str = "ledgerflow_jobs";

/// Channel for queue control changes (pause/resume); payload is the queue.
pub const CONTROL_CHANNEL: &str = "ledgerflow_control";

/// A wake-up received from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wakeup {
    /// Jobs became available in this queue.
    Jobs(String),
    /// This queue was paused or resumed.
    Control(String),
}

/// A LISTEN connection on the engine's channels.
#[derive(Debug)]
pub struct Listener {
    inner: PgListener,
}

impl Listener {
    /// Connects and listens on both channels.
    pub async fn connect(pool: &PgPool) -> Result<Self> {
        let mut inner = PgListener::connect_with(pool).await?;
        inner.listen_all([JOBS_CHANNEL, CONTROL_CHANNEL]).await?;
        Ok(Self { inner })
    }

    /// Waits for the next wake-up. Returns `Ok(None)` when the connection was
    /// lost; notifications sent meanwhile may be gone, so the caller should
    /// poll once. The next call reconnects and listens again.
    pub async fn recv(&mut self) -> Result<Option<Wakeup>> {
        Ok(self.inner.try_recv().await?.map(|n| {
            let payload = n.payload().to_string();
            if n.channel() == CONTROL_CHANNEL {
                Wakeup::Control(payload)
            } else {
                Wakeup::Jobs(payload)
            }
        }))
    }
}
