//! Throttling of failed authentication: after repeated failures from one
//! client address, or against one credential prefix, further attempts are
//! answered 429 (with `Retry-After`) without being checked, until the
//! window that counted them ends.
//!
//! A legitimate key is not locked out by someone else's failures: a
//! credential that authenticated recently (within [`TRUSTED_FOR`]) is
//! checked whatever the counters say — only its holder can present it —
//! and the per-prefix counter only refuses addresses that have failed
//! themselves, so an attacker hammering a victim's prefix from elsewhere
//! does not shut the victim out.
//!
//! The client address is the TCP peer, set per request by the middleware
//! (a task-local, so the many handlers need not pass it along). Behind a
//! load balancer every client shares its addresses; the per-prefix rule and
//! the trusted credentials still hold there. The counters live in this
//! process (fixed windows; one replica's view): enough to make guessing
//! slow, without a shared store.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a credential that authenticated bypasses the throttle.
pub const TRUSTED_FOR: Duration = Duration::from_secs(15 * 60);
/// Most entries per map; past it the ended ones are dropped, then all.
const MAX_ENTRIES: usize = 50_000;

tokio::task_local! {
    /// The client address of the request being served.
    pub static CLIENT: Option<IpAddr>;
}

/// The current request's client address, if the middleware set one.
pub fn client() -> Option<IpAddr> {
    CLIENT.try_with(|c| *c).ok().flatten()
}

/// Limits of the throttle.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Failures counted together.
    pub window: Duration,
    /// Failures from one address within a window before it gets 429s.
    pub per_address: u32,
    /// Failures against one credential prefix within a window before
    /// addresses that failed on it get 429s.
    pub per_prefix: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            per_address: 60,
            per_prefix: 30,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    started: Instant,
    failures: u32,
}

#[derive(Debug, Default)]
struct Counters {
    addresses: HashMap<IpAddr, Bucket>,
    prefixes: HashMap<String, Bucket>,
    trusted: HashMap<[u8; 32], Instant>,
}

/// The failure counters of one process.
#[derive(Debug, Default)]
pub struct AuthThrottle {
    limits: Limits,
    counters: Mutex<Counters>,
}

fn live(b: Option<&Bucket>, window: Duration, now: Instant) -> Option<Bucket> {
    b.copied()
        .filter(|b| now.saturating_duration_since(b.started) < window)
}

fn bump<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Bucket>,
    key: K,
    window: Duration,
    now: Instant,
) {
    if map.len() >= MAX_ENTRIES {
        map.retain(|_, b| now.saturating_duration_since(b.started) < window);
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
    }
    let b = map.entry(key).or_insert(Bucket {
        started: now,
        failures: 0,
    });
    if now.saturating_duration_since(b.started) >= window {
        *b = Bucket {
            started: now,
            failures: 0,
        };
    }
    b.failures = b.failures.saturating_add(1);
}

impl AuthThrottle {
    /// A throttle with `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            counters: Mutex::default(),
        }
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Err(retry_after)` when an attempt with this credential (`digest`,
    /// `prefix`) from `addr` must not be checked now.
    pub fn admit(
        &self,
        addr: Option<IpAddr>,
        prefix: &str,
        digest: &[u8; 32],
        now: Instant,
    ) -> Result<(), Duration> {
        let c = self.counters();
        if c.trusted.get(digest).is_some_and(|&until| now < until) {
            return Ok(());
        }
        let window = self.limits.window;
        let retry = |b: Bucket| window.saturating_sub(now.saturating_duration_since(b.started));
        let from_addr = addr.and_then(|a| live(c.addresses.get(&a), window, now));
        if let Some(b) = from_addr
            && b.failures >= self.limits.per_address
        {
            return Err(retry(b));
        }
        // The prefix rule refuses only addresses that failed themselves
        // (or unknown ones), so the key's owner elsewhere is still checked.
        let failed_here = addr.is_none() || from_addr.is_some();
        if let Some(b) = live(c.prefixes.get(prefix), window, now)
            && b.failures >= self.limits.per_prefix
            && failed_here
        {
            return Err(retry(b));
        }
        Ok(())
    }

    /// Counts a failed attempt.
    pub fn failed(&self, addr: Option<IpAddr>, prefix: &str, now: Instant) {
        let window = self.limits.window;
        let mut c = self.counters();
        if let Some(a) = addr {
            bump(&mut c.addresses, a, window, now);
        }
        bump(&mut c.prefixes, prefix.to_string(), window, now);
    }

    /// Remembers a credential that authenticated (it bypasses the throttle
    /// for [`TRUSTED_FOR`]).
    pub fn succeeded(&self, digest: [u8; 32], now: Instant) {
        let mut c = self.counters();
        if c.trusted.len() >= MAX_ENTRIES {
            c.trusted.retain(|_, until| now < *until);
            if c.trusted.len() >= MAX_ENTRIES {
                c.trusted.clear();
            }
        }
        c.trusted.insert(digest, now + TRUSTED_FOR);
    }
}

/// The non-secret part of a presented credential that names the key
/// (`lf_<prefix>` / `lfa_<prefix>`), or `malformed` when it has none.
pub fn prefix_of(token: &str) -> &str {
    match token.rfind('_') {
        Some(i) if i > 0 && token[..i].len() <= 40 => &token[..i],
        _ => "malformed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            window: Duration::from_secs(60),
            per_address: 5,
            per_prefix: 3,
        }
    }

    #[test]
    fn an_address_that_keeps_failing_is_throttled_until_the_window_ends() {
        let t = AuthThrottle::new(limits());
        let now = Instant::now();
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        for i in 0..5 {
            assert!(t.admit(a, &format!("lf_{i}"), &[0; 32], now).is_ok());
            t.failed(a, &format!("lf_{i}"), now);
        }
        assert!(t.admit(a, "lf_new", &[0; 32], now).is_err());
        let other = Some(IpAddr::from([10, 0, 0, 2]));
        assert!(t.admit(other, "lf_new", &[0; 32], now).is_ok());
        assert!(
            t.admit(a, "lf_new", &[0; 32], now + Duration::from_secs(60))
                .is_ok()
        );
    }

    #[test]
    fn a_hammered_prefix_does_not_lock_out_its_owner() {
        let t = AuthThrottle::new(limits());
        let now = Instant::now();
        let attacker = Some(IpAddr::from([192, 0, 2, 1]));
        let owner = Some(IpAddr::from([198, 51, 100, 7]));
        for _ in 0..3 {
            t.failed(attacker, "lf_abc", now);
        }
        assert!(t.admit(attacker, "lf_abc", &[1; 32], now).is_err());
        // The owner, from an address that never failed: checked.
        assert!(t.admit(owner, "lf_abc", &[2; 32], now).is_ok());
        // A credential that authenticated is checked from anywhere.
        t.succeeded([2; 32], now);
        assert!(t.admit(attacker, "lf_abc", &[2; 32], now).is_ok());
        assert!(t.admit(attacker, "lf_abc", &[3; 32], now).is_err());
    }

    #[test]
    fn prefixes_are_the_public_part() {
        assert_eq!(prefix_of("lf_0123abcd_secret"), "lf_0123abcd");
        assert_eq!(prefix_of("lfa_0123abcd_secret"), "lfa_0123abcd");
        assert_eq!(prefix_of("nounderscore"), "malformed");
        assert_eq!(prefix_of(&format!("{}_x", "a".repeat(100))), "malformed");
    }
}
