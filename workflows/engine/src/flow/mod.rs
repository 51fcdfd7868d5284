//! Flow control: per-key concurrency limits, durable rate limits, fair claims across keys,
//! priority aging, debounce and throttle — enforced in Postgres, for every process.
//!
//! Decision 0010 has the design. In short:
//! - a concurrency slot *is* a running job row with the key (or, for a workflow-wide key, an
//!   admitted workflow that has not finished), so a slot frees exactly when its row leaves
//!   `running`: when the attempt finishes, or when the reaper rescues it after its lease
//!   expired — never while the lease is current;
//! - a queue whose jobs use keys is claimed through the controlled path ([`claim`]): it takes
//!   a transaction-scoped advisory lock per limited key (in one global order, so claimers
//!   never deadlock), and only then counts the holders with a fresh snapshot;
//! - rate limits are token buckets in `flow_buckets`, refilled on the database's clock, under
//!   the same locks; a job over the limit is deferred (`scheduled` until its bucket will have
//!   refilled), without using an attempt or a handler slot;
//! - fairness is an order: every keyed job gets a `fair_seq` one step (1000 / weight) after its
//!   key's last waiting job, or at the queue's head, and claims walk
//!   `(priority, fair_seq, run_at)`.
//!
//! Modules: [`decide`] (pure: which candidates run, wait or are deferred; the bucket
//! arithmetic), [`claim`] (the controlled claim), [`call`] (an external call's limiter), [`aging`],
//! [`limits`] (declaring, changing and listing limits), [`gate`] (debounce and throttle at
//! enqueue), [`db`] (their SQL).
use crate::{Error, Result};
use std::time::Duration;

pub mod aging;
pub mod call;
pub mod claim;
pub(crate) mod db;
pub mod decide;
pub(crate) mod gate;
pub mod limits;

pub use call::take;
pub use limits::{FlowLimit, KeyStatus, LimitChange, Rate};

/// Prefix of the key-less limit of a whole queue: `queue:<name>`.
pub const QUEUE_KEY_PREFIX: &str = "queue:";

/// The key of queue `queue`'s own limit.
pub fn queue_key(queue: &str) -> String {
    format!("{QUEUE_KEY_PREFIX}{queue}")
}

/// How a debounced job treats the triggers that follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Debounce {
    /// One run with the last args, `window` after the last trigger.
    Trailing,
    /// The first trigger runs at once; the others within `window` of it are dropped.
    Leading,
}

/// What a throttle does with a job over its rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// Nothing is enqueued ([`crate::Inserted::Dropped`]).
    Drop,
    /// The job starts at the next free place in the rate.
    Delay,
}

/// A gate at enqueue time.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Gate {
    Debounce {
        key: String,
        window: Duration,
        mode: Debounce,
    },
    Throttle {
        key: String,
        limit: u32,
        window: Duration,
        mode: Throttle,
    },
}

/// A job's flow-control settings (see the `NewJob` builders).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct JobFlow {
    pub key: Option<String>,
    pub rate: Option<(String, u32)>,
    pub gate: Option<Gate>,
}

/// Checks a flow key given in code or by an operator.
pub(crate) fn check_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 256 {
        return Err(Error::Invalid(format!("{what} must be 1..=256 bytes")));
    }
    if key.chars().any(char::is_control) {
        return Err(Error::Invalid(format!(
            "{what} must not contain control characters"
        )));
    }
    Ok(())
}

impl JobFlow {
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(k) = &self.key {
            check_key("flow key", k)?;
            if k.starts_with(QUEUE_KEY_PREFIX) {
                return Err(Error::Invalid(format!(
                    "flow key {k:?}: keys starting with {QUEUE_KEY_PREFIX:?} name queue limits"
                )));
            }
        }
        if let Some((k, _)) = &self.rate {
            check_key("rate-limit key", k)?;
        }
        match &self.gate {
            Some(Gate::Debounce { key, window, .. }) | Some(Gate::Throttle { key, window, .. }) => {
                check_key("debounce/throttle key", key)?;
                if self.controlled() {
                    return Err(Error::Invalid(
                        "a debounced or throttled job cannot also have a flow key or a rate \
                         limit"
                            .into(),
                    ));
                }
                if window.is_zero() {
                    return Err(Error::Invalid(
                        "a debounce or throttle window must be positive".into(),
                    ));
                }
            }
            None => {}
        }
        Ok(())
    }

    /// True when a claimer must take the controlled path for this job.
    pub(crate) fn controlled(&self) -> bool {
        self.key.is_some() || self.rate.is_some()
    }
}
