//! The limiter of a step's rate-limited external call: charges the key's bucket right before
//! the call, or defers the step to its turn.
use super::{check_key, db, decide};
use crate::{Result, Store};
use std::time::Duration;

/// Charges `weight` to rate-limit key `key` for a call of job `job`, right before the call
/// (an external call's limiter): `None` when the call may go (the bucket paid, or the key has
/// no rate limit); else how long until its turn. A deferred call is owed its turn (see
/// [`decide::Bucket::admit`]): when it comes back it goes before new callers.
pub async fn take(
    store: &Store,
    job: uuid::Uuid,
    key: &str,
    weight: u32,
) -> Result<Option<Duration>> {
    check_key("rate-limit key", key)?;
    let mut tx = store.pool().begin().await?;
    let Some((bucket, stored, now)) = db::lock_bucket(&mut tx, key, store.now()).await? else {
        tx.commit().await?;
        return Ok(None);
    };
    let returning = db::take_reservation(&mut tx, job, key).await?;
    let mut state = bucket.at(stored, now);
    let verdict = bucket.admit(&mut state, bucket.cost(i64::from(weight)), returning);
    let left = decide::Level {
        millis: state.level,
        owed: state.owed,
        at: now,
    };
    let wait = match verdict {
        None => {
            db::store_bucket(&mut tx, key, Some(left), None).await?;
            None
        }
        Some(ms) => {
            db::store_bucket(&mut tx, key, Some(left), Some(now)).await?;
            db::reserve(&mut tx, job, key).await?;
            Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0).max(1)))
        }
    };
    tx.commit().await?;
    Ok(wait)
}
