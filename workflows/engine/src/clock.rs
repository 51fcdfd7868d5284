//! The injectable clock.
//!
//! By default every time comparison (lease expiry, due `run_at`, backoff) is
//! made with the *database's* clock, so that workers on machines with skewed
//! clocks agree on one timeline. Tests swap in a [`ManualClock`] to move time
//! forward without sleeping: the store's SQL takes the clock's reading as a
//! parameter and falls back to `now()` when the clock returns `None`.
use chrono::{DateTime, Utc};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A source of "now" for the store.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// `None` means "use the database's `now()`".
    fn now(&self) -> Option<DateTime<Utc>>;
}

/// The production clock: the database's `now()`.
#[derive(Debug, Default, Clone, Copy)]
pub struct DbClock;

impl Clock for DbClock {
    fn now(&self) -> Option<DateTime<Utc>> {
        None
    }
}

/// A clock that only moves when told to. Cloning shares the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *now += by;
    }

    /// Sets the clock.
    pub fn set(&self, to: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) = to;
    }

    /// The current reading.
    pub fn get(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Option<DateTime<Utc>> {
        Some(self.get())
    }
}
