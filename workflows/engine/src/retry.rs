//! Exponential backoff with jitter for failed attempts.
//!
//! The delay is computed here and stored durably as the job's `run_at`, so a
//! crash during backoff loses nothing and never retries sooner.
use rand::Rng;
use std::time::Duration;

/// `delay(n) = min(base · 2^(n-1), max)`, then scaled by a random factor in
/// `[1 - jitter, 1]` so that a burst of failures does not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt.
    pub base: Duration,
    /// Upper bound for any delay.
    pub max: Duration,
    /// Fraction of the delay that may be shaved off at random (0.0..=1.0).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60 * 60),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The delay before retrying after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: i32) -> Duration {
        self.backoff_with(attempt, rand::rng().random::<f64>())
    }

    /// [`RetryPolicy::backoff`] with the random draw (in `[0, 1)`) given, for tests.
    pub fn backoff_with(&self, attempt: i32, draw: f64) -> Duration {
        let exp = u32::try_from(attempt.saturating_sub(1).clamp(0, 62)).unwrap_or(62);
        let factor = 2u64.checked_pow(exp).unwrap_or(u64::MAX);
        let raw = self
            .base
            .checked_mul(u32::try_from(factor).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0) * draw.clamp(0.0, 1.0);
        raw.mul_f64(1.0 - jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_until_the_cap() {
        let p = RetryPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(10),
            jitter: 0.0,
        };
        let got: Vec<u64> = (1..=6).map(|n| p.backoff_with(n, 0.5).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn jitter_only_shortens_within_bounds() {
        let p = RetryPolicy {
            base: Duration::from_secs(8),
            max: Duration::from_secs(100),
            jitter: 0.25,
        };
        assert_eq!(p.backoff_with(1, 0.0), Duration::from_secs(8));
        assert_eq!(p.backoff_with(1, 1.0), Duration::from_secs(6));
        for _ in 0..1000 {
            let d = p.backoff(1);
            assert!(
                d <= Duration::from_secs(8) && d >= Duration::from_secs(6),
                "{d:?}"
            );
        }
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff_with(i32::MAX, 0.0), p.max);
        assert_eq!(p.backoff_with(0, 0.0), p.base);
        assert_eq!(p.backoff_with(-5, 0.0), p.base);
    }
}
