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

/// A bucket's stored level: thousandths of a weight, as of `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    pub millis: i64,
    pub at: DateTime<Utc>,
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

    /// What one use costs, in thousandths. A weight above the capacity is still charged in
    /// full: it waits for a full bucket and leaves it in debt, so no span ever passes more
    /// than the bucket allows.
    pub fn cost(&self, weight: i64) -> i64 {
        weight.max(1).saturating_mul(1000)
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
    /// The job reserved (paid) its weight when it was deferred.
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
    /// Candidates deferred, with when their turn comes: each reserved its weight (the bucket
    /// goes into debt), so it is not charged again then.
    pub defer: Vec<(Uuid, DateTime<Utc>)>,
    /// Claimed candidates whose reservation is used up.
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
    let mut levels: HashMap<&str, i64> = HashMap::new();
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
            if c.prepaid {
                out.unreserve.push(c.id);
            } else {
                let stored = holders.levels.get(key).copied();
                let level = levels
                    .entry(key.as_str())
                    .or_insert_with(|| bucket.level(stored, now));
                let cost = bucket.cost(*weight);
                let short = *level < cost;
                *level -= cost;
                if short {
                    let wait = bucket.wait_ms(*level, 0);
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
        .map(|(k, millis)| (k.to_string(), Level { millis, at: now }))
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
        // 10 weight per second, bucket of 10: two jobs of 4 fit; the third reserves its 4
        // (the bucket at -2: its turn in 200 ms), the fourth too (at -6: 600 ms).
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
        assert_eq!(d.levels, vec![("ex".into(), Level { millis: -6000, at: t0() })]);
        assert_eq!(d.deferred, vec![("ex".into(), 2)]);
        // A prepaid job is claimed without a charge.
        let mut paid = rated(9, 4, b);
        paid.prepaid = true;
        let h = Holders {
            levels: [("ex".to_string(), Level { millis: -6000, at: t0() })].into(),
            ..Holders::default()
        };
        let d = decide(&[paid], 10, &h, t0());
        assert_eq!(d.claim, vec![Uuid::from_u128(9)]);
        assert_eq!(d.unreserve, vec![Uuid::from_u128(9)]);
        assert!(d.levels.is_empty());
    }

    #[test]
    fn buckets_refill_with_time_up_to_capacity() {
        let b = Bucket {
            capacity: 1200,
            refill: 1200,
            window_ms: 60_000,
        };
        let stored = Level { millis: 0, at: t0() };
        let later = t0() + chrono::Duration::seconds(1);
        assert_eq!(b.level(Some(stored), later), 20_000);
        let much_later = t0() + chrono::Duration::hours(1);
        assert_eq!(b.level(Some(stored), much_later), 1_200_000);
        // A clock that went backwards refills nothing.
        let earlier = t0() - chrono::Duration::seconds(5);
        assert_eq!(b.level(Some(stored), earlier), 0);
        assert_eq!(b.wait_ms(0, 1000), 50);
        assert_eq!(b.wait_ms(-1000, 0), 50);
        assert_eq!(b.cost(5000), 5_000_000);
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
