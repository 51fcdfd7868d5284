//! The controlled claim of a flow-controlled queue: one transaction of three statements.
//!
//! 1. Lock a window of available jobs in claim order (`SKIP LOCKED`), resolve their keys'
//!    limits, and take the advisory lock of every limited key in one global order. When full
//!    keys' backlogs hid the free keys from the usual look-ahead, start again with a deeper one.
//! 2. Count the holders of those keys. This statement's snapshot is taken after the locks,
//!    and a claimer releases its locks only when it commits, so every earlier claim of those
//!    keys is visible: two claimers can never both see the last free slot.
//! 3. Lease what [`super::decide::decide`] chose, defer what its bucket cannot pay for yet.
//!
//! A key with no limit costs no lock; a queue whose keys have no limits (fairness only) takes
//! statements 1 and 3.
use super::db::{self, Apply};
use super::decide::{Holders, decide};
use crate::claimed::{ClaimedJob, claimed_from_row};
use crate::{Result, Store};
use std::sync::Arc;

/// How many candidates a claim for `want` jobs locks: a quarter more than it wants, for the
/// few a concurrent claim fills first (keys already full, and a key's jobs beyond its limit,
/// are left out before locking), bounded so a claim stays one short statement.
fn window(want: u32) -> i64 {
    let want = i64::from(want);
    (want + (want / 4).max(4)).clamp(1, 2_000)
}

/// How far past the window a claim looks for candidates before locking (× the window): the
/// usual look-ahead, and the deeper one a claim retries with when the usual one ended short
/// among full keys' backlogs (which the per-key cap leaves out).
const LOOK_AHEAD: i64 = 8;
const DEEP_LOOK_AHEAD: i64 = 40;

/// Claims up to `want` jobs of flow-controlled `queue` for `owner`.
pub async fn claim(
    store: &Store,
    queue: &str,
    owner: &Arc<str>,
    want: u32,
) -> Result<Vec<ClaimedJob>> {
    let mut tx = store.pool().begin().await?;
    let mut found = db::lock_candidates(&mut tx, queue, window(want), LOOK_AHEAD).await?;
    if found.short_of_depth {
        // Behind a full key's backlog: look again, deeper, from scratch (no lock is taken
        // twice, so the global lock order holds).
        tx.rollback().await?;
        tx = store.pool().begin().await?;
        found = db::lock_candidates(&mut tx, queue, window(want), DEEP_LOOK_AHEAD).await?;
    }
    if found.candidates.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    let now = store.now();
    let (holders, at) = if found.limits.is_empty() {
        (Holders::default(), now.unwrap_or_else(chrono::Utc::now))
    } else {
        let keys: Vec<&str> = found.limits.keys().map(String::as_str).collect();
        let queue_limit = found
            .limits
            .get(&super::queue_key(queue))
            .and_then(|l| l.concurrency);
        db::holders(&mut tx, queue, &keys, queue_limit, now).await?
    };
    let want = usize::try_from(want).unwrap_or(usize::MAX);
    let d = decide(&found.candidates, want, &holders, at);
    let rows = db::apply(
        &mut tx,
        &Apply {
            claim: &d.claim,
            admit: &d.admit,
            defer: &d.defer,
            unreserve: &d.unreserve,
            levels: &d.levels,
            deferred: &d.deferred,
            owner: owner.as_ref(),
            lease_ms: crate::store::ms(store.config().lease_ttl),
            now,
        },
    )
    .await?;
    tx.commit().await?;
    rows.iter()
        .map(|r| claimed_from_row(r, queue, owner, true))
        .collect()
}
