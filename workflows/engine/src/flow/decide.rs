//! The controlled claim's decision, pure: which candidates run now, which stay waiting for a
//! slot, and which are deferred until their rate-limit bucket will have refilled; and the
//! token-bucket arithmetic the external-call limiter shares.
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use uuid::Uuid;

/// A token bucket's settings: up to `capacity` weight, refilled by `refill` weight every
/// `window_ms`, continuously.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub capacity: i64,
    pub refill: i64,
    pub window_ms: i64,
}

/// A bucket's stored state, in thousandths of a weight, as of `at`: its level (what may be
/// spent now) and what it owes to deferred work (weight promised to callers that wait for
/// their turn; it decays at the refill rate, so a promise nobody comes back for lapses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    pub millis: i64,
    pub owed: i64,
    pub at: DateTime<Utc>,
}

/// A bucket at one instant: its level and what it owes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub level: i64,
    pub owed: i64,
}

impl Bucket {
    /// The level at `now` (full when never used; never above capacity; time that went
    /// backwards refills nothing).
    pub fn level(&self, stored: Option<Level>, now: DateTime<Utc>) -> i64 {
        let full = self.capacity.saturating_mul(1000);
        let Some(l) = stored else { return full };
        let elapsed = (now - l.at).num_milliseconds().max(0);
        let gained = i128::from(elapsed) * i128::from(self.refill) * 1000
            / i128::from(self.window_ms.max(1));
        let level = i128::from(l.millis) + gained;
        i64::try_from(level.min(i128::from(full))).unwrap_or(full)
    }

    /// The bucket at `now`: the level refilled, the debt decayed.
    pub fn at(&self, stored: Option<Level>, now: DateTime<Utc>) -> Now {
        let level = self.level(stored, now);
        let owed = stored.map_or(0, |l| {
            let elapsed = (now - l.at).num_milliseconds().max(0);
            let repaid = i128::from(elapsed) * i128::from(self.refill) * 1000
                / i128::from(self.window_ms.max(1));
            i64::try_from((i128::from(l.owed) - repaid).max(0)).unwrap_or(0)
        });
        Now { level, owed }
    }

    /// One use of `cost` at `now`. Every use is paid from the level at the moment it is
    /// admitted, so over any span no more passes than the bucket allows. A new caller also
    /// leaves what is owed to earlier deferred callers; a `returning` caller (deferred before,
    /// its turn come) takes from the level alone. Admitted: `None`. Deferred: how long until
    /// its turn — its weight is added to what is owed, so the deferred take their turns one
    /// after another instead of all waking at once (a returning caller that finds the level
    /// short, because it came late or others came early, takes the next turn).
    pub fn admit(&self, b: &mut Now, cost: i64, returning: bool) -> Option<i64> {
        let free = if returning { b.level } else { b.level - b.owed };
        if free >= cost {
            b.level -= cost;
            return None;
        }
        // Short: the caller (again, if it was already deferred) takes the next turn in line.
        b.owed += cost;
        Some(self.wait_ms(b.level, b.owed).max(1))
    }

    /// Milliseconds until a bucket at `level` holds `need` (thousandths), rounded up.
    pub fn wait_ms(&self, level: i64, need: i64) -> i64 {
        if level >= need {
            return 0;
        }
        let missing = i128::from(need - level);
        let per_ms_num = i128::from(self.refill) * 1000;
        let den = i128::from(self.window_ms.max(1));
        // missing / (per_ms_num / den), rounded up.
        let ms = (missing * den + per_ms_num - 1) / per_ms_num.max(1);
        i64::try_from(ms).unwrap_or(i64::MAX)
    }

    /// What one use costs, in thousandths. A weight above the capacity could never be paid
    /// in full: it costs a full bucket.
    pub fn cost(&self, weight: i64) -> i64 {
        weight.clamp(1, self.capacity.max(1)).saturating_mul(1000)
    }
}

/// One available job the claim locked, with the limits of its keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: Uuid,
    /// Its own flow key and that key's concurrency limit (`None`: unlimited).
    pub key: Option<(String, Option<i64>)>,
    /// The workflow-wide key of a workflow not admitted yet (the workflow, the key, its limit).
    pub workflow_key: Option<(Uuid, String, Option<i64>)>,
    /// Its rate-limit key, weight, and the key's bucket (`None`: the key has no rate limit).
    pub rate: Option<(String, i64, Option<Bucket>)>,
    /// The job was deferred before and its turn came (it holds a reservation).
    pub prepaid: bool,
}

/// What the claim found under the key locks.
#[derive(Debug, Clone, Default)]
pub struct Holders {
    /// Holders per concurrency key (running jobs, or admitted unfinished workflows).
    pub held: HashMap<String, i64>,
    /// The queue's own limit and how many of its jobs run.
    pub queue: Option<(i64, i64)>,
    /// Stored bucket levels per rate key.
    pub levels: HashMap<String, Level>,
}

/// The decision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Candidates to claim, in order.
    pub claim: Vec<Uuid>,
    /// Workflows the claimed jobs admit (they hold their key's slot from now on).
    pub admit: Vec<Uuid>,
    /// Candidates deferred, with when their turn comes (they come back as returning callers).
    pub defer: Vec<(Uuid, DateTime<Utc>)>,
    /// Claimed returning candidates, whose reservation (their turn) is used up.
    pub unreserve: Vec<Uuid>,
    /// Candidates left waiting for a concurrency slot.
    pub blocked: usize,
    /// New bucket levels to store.
    pub levels: Vec<(String, Level)>,
    /// Deferrals per rate key.
    pub deferred: Vec<(String, i64)>,
}

/// Decides over `cands` (in claim order) for at most `want` claims at `now`.
pub fn decide(cands: &[Candidate], want: usize, holders: &Holders, now: DateTime<Utc>) -> Decision {
    let mut held = holders.held.clone();
    let mut queue_running = holders.queue.map(|(_, running)| running);
    let mut levels: HashMap<&str, Now> = HashMap::new();
    let mut out = Decision::default();
    let mut deferred: HashMap<&str, i64> = HashMap::new();
    for c in cands {
        if out.claim.len() >= want {
            break;
        }
        if let (Some((limit, _)), Some(running)) = (holders.queue, queue_running)
            && running >= limit
        {
            out.blocked += 1;
            continue;
        }
        let full = |key: &str, limit: Option<i64>| {
            limit.is_some_and(|limit| held.get(key).copied().unwrap_or(0) >= limit)
        };
        if c.key.as_ref().is_some_and(|(k, l)| full(k, *l))
            || c.workflow_key.as_ref().is_some_and(|(_, k, l)| full(k, *l))
        {
            out.blocked += 1;
            continue;
        }
        if let Some((key, weight, Some(bucket))) = &c.rate {
            let stored = holders.levels.get(key).copied();
            let state = levels
                .entry(key.as_str())
                .or_insert_with(|| bucket.at(stored, now));
            match bucket.admit(state, bucket.cost(*weight), c.prepaid) {
                None if c.prepaid => out.unreserve.push(c.id),
                None => {}
                Some(wait) => {
                    out.defer
                        .push((c.id, now + chrono::Duration::milliseconds(wait)));
                    *deferred.entry(key.as_str()).or_insert(0) += 1;
                    continue;
                }
            }
        }
        if let Some((k, _)) = &c.key {
            *held.entry(k.clone()).or_insert(0) += 1;
        }
        if let Some((wf, k, _)) = &c.workflow_key {
            *held.entry(k.clone()).or_insert(0) += 1;
            out.admit.push(*wf);
        }
        if let Some(r) = queue_running.as_mut() {
            *r += 1;
        }
        out.claim.push(c.id);
    }
    let mut lv: Vec<(String, Level)> = levels
        .into_iter()
        .map(|(k, b)| {
            let level = Level {
                millis: b.level,
                owed: b.owed,
                at: now,
            };
            (k.to_string(), level)
        })
        .collect();
    lv.sort_by(|a, b| a.0.cmp(&b.0));
    out.levels = lv;
    let mut d: Vec<(String, i64)> = deferred
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect();
    d.sort();
    out.deferred = d;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 8, 0, 0, 0).unwrap()
    }

    fn job(n: u128, key: Option<(&str, Option<i64>)>) -> Candidate {
        Candidate {
            id: Uuid::from_u128(n),
            key: key.map(|(k, l)| (k.to_string(), l)),
            workflow_key: None,
            rate: None,
            prepaid: false,
        }
    }

    fn rated(n: u128, weight: i64, bucket: Bucket) -> Candidate {
        Candidate {
            id: Uuid::from_u128(n),
            key: None,
            workflow_key: None,
            rate: Some(("ex".into(), weight, Some(bucket))),
            prepaid: false,
        }
    }

    #[test]
    fn a_full_key_is_skipped_and_others_still_run() {
        let cands = [
            job(1, Some(("a", Some(1)))),
            job(2, Some(("a", Some(1)))),
            job(3, Some(("b", Some(2)))),
            job(4, Some(("b", Some(2)))),
            job(5, Some(("b", Some(2)))),
            job(6, None),
        ];
        let mut h = Holders::default();
        h.held.insert("b".into(), 1);
        let d = decide(&cands, 10, &h, t0());
        let ids: Vec<u128> = d.claim.iter().map(|id| id.as_u128()).collect();
        assert_eq!(ids, vec![1, 3, 6]);
        assert_eq!(d.blocked, 3);
    }

    #[test]
    fn zero_stops_a_key_and_none_is_unlimited() {
        let cands = [
            job(1, Some(("stopped", Some(0)))),
            job(2, Some(("free", None))),
            job(3, Some(("free", None))),
        ];
        let d = decide(&cands, 10, &Holders::default(), t0());
        assert_eq!(d.claim.len(), 2);
        assert_eq!(d.blocked, 1);
    }

    #[test]
    fn the_queue_limit_caps_every_claim() {
        let cands: Vec<Candidate> = (1..=10).map(|n| job(n, None)).collect();
        let h = Holders {
            queue: Some((4, 1)),
            ..Holders::default()
        };
        let d = decide(&cands, 10, &h, t0());
        assert_eq!(d.claim.len(), 3);
    }

    #[test]
    fn want_bounds_the_claim() {
        let cands: Vec<Candidate> = (1..=10).map(|n| job(n, None)).collect();
        assert_eq!(decide(&cands, 4, &Holders::default(), t0()).claim.len(), 4);
    }

    #[test]
    fn an_empty_bucket_defers_in_turn_without_claiming() {
        // 10 weight per second, bucket of 10: two jobs of 4 fit (2 left); the third is owed
        // 4 (its turn when the level reaches 4: 200 ms), the fourth 8 (600 ms).
        let b = Bucket {
            capacity: 10,
            refill: 10,
            window_ms: 1000,
        };
        let cands: Vec<Candidate> = (1..=4).map(|n| rated(n, 4, b)).collect();
        let d = decide(&cands, 10, &Holders::default(), t0());
        assert_eq!(d.claim.len(), 2);
        let waits: Vec<i64> = d
            .defer
            .iter()
            .map(|(_, at)| (*at - t0()).num_milliseconds())
            .collect();
        assert_eq!(waits, vec![200, 600]);
        let stored = Level {
            millis: 2000,
            owed: 8000,
            at: t0(),
        };
        assert_eq!(d.levels, vec![("ex".into(), stored)]);
        assert_eq!(d.deferred, vec![("ex".into(), 2)]);
        // 200 ms later the third comes back: it takes the level; a new job waits behind the
        // fourth (owed 8 - 2 decayed = 6, plus its 4: the level must reach 10).
        let later = t0() + chrono::Duration::milliseconds(200);
        let mut back = rated(3, 4, b);
        back.prepaid = true;
        let h = Holders {
            levels: [("ex".to_string(), stored)].into(),
            ..Holders::default()
        };
        let d = decide(&[back, rated(5, 4, b)], 10, &h, later);
        assert_eq!(d.claim, vec![Uuid::from_u128(3)]);
        assert_eq!(d.unreserve, vec![Uuid::from_u128(3)]);
        assert_eq!(
            d.defer,
            vec![(
                Uuid::from_u128(5),
                later + chrono::Duration::milliseconds(1000)
            )]
        );
    }

    #[test]
    fn a_returning_caller_that_is_late_still_pays_from_the_level() {
        let b = Bucket {
            capacity: 4,
            refill: 4,
            window_ms: 1000,
        };
        let empty = Level {
            millis: 0,
            owed: 0,
            at: t0(),
        };
        let mut now = b.at(Some(empty), t0());
        assert_eq!(b.admit(&mut now, 4000, true), Some(1000));
        assert_eq!(now.level, 0, "a deferral spends nothing");
        assert_eq!(now.owed, 4000, "it takes the next turn");
    }

    #[test]
    fn buckets_refill_with_time_up_to_capacity() {
        let b = Bucket {
            capacity: 1200,
            refill: 1200,
            window_ms: 60_000,
        };
        let stored = Level {
            millis: 0,
            owed: 0,
            at: t0(),
        };
        let later = t0() + chrono::Duration::seconds(1);
        assert_eq!(b.level(Some(stored), later), 20_000);
        let much_later = t0() + chrono::Duration::hours(1);
        assert_eq!(b.level(Some(stored), much_later), 1_200_000);
        // A clock that went backwards refills nothing.
        let earlier = t0() - chrono::Duration::seconds(5);
        assert_eq!(b.level(Some(stored), earlier), 0);
        assert_eq!(b.wait_ms(0, 1000), 50);
        assert_eq!(b.wait_ms(-1000, 0), 50);
        assert_eq!(b.cost(5000), 1_200_000);
    }

    #[test]
    fn a_workflow_key_admits_once() {
        let mut c = job(1, None);
        c.workflow_key = Some((Uuid::from_u128(10), "user:1".into(), Some(1)));
        let mut c2 = job(2, None);
        c2.workflow_key = Some((Uuid::from_u128(20), "user:1".into(), Some(1)));
        let d = decide(&[c, c2], 10, &Holders::default(), t0());
        assert_eq!(d.claim, vec![Uuid::from_u128(1)]);
        assert_eq!(d.admit, vec![Uuid::from_u128(10)]);
        assert_eq!(d.blocked, 1);
    }
}
