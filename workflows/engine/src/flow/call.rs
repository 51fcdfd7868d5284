//! The limiter of a step's rate-limited external call: charges the key's bucket right before
//! the call, or reserves the job's turn.
use super::{check_key, db, decide};
use crate::{Result, Store};
use std::time::Duration;

/// Charges `weight` to rate-limit key `key` for a call of job `job` now (an external call's
/// limiter): `None` when the call may go (the bucket paid, the job had reserved its weight
/// when it was deferred, or the key has no rate limit); else how long until its turn. A
/// deferred call reserves its weight (the bucket goes into debt), so deferred calls take
/// their turns one after another instead of all waking at once.
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
    if db::take_reservation(&mut tx, job, key).await? {
        tx.commit().await?;
        return Ok(None);
    }
    let level = bucket.level(stored, now);
    let cost = bucket.cost(i64::from(weight));
    let left = decide::Level {
        millis: level - cost,
        at: now,
    };
    let wait = if level >= cost {
        db::store_bucket(&mut tx, key, Some(left), None).await?;
        None
    } else {
        db::store_bucket(&mut tx, key, Some(left), Some(now)).await?;
        db::reserve(&mut tx, job, key).await?;
        let ms = bucket.wait_ms(left.millis, 0);
        Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0).max(1)))
    };
    tx.commit().await?;
    Ok(wait)
}

