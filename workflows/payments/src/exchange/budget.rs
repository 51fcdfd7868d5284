//! The simulated exchange's request budget, like a real exchange's: each request costs a
//! weight, and each API key may spend at most `weight` per sliding `window`; beyond it the
//! request is refused (HTTP 429 with `Retry-After`) before it is processed.
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A budget: at most `weight` per `window`, per API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RequestBudget {
    pub weight: u32,
    pub window: Duration,
}

impl RequestBudget {
    /// 1,200 weight per minute (a common exchange default).
    pub const DEFAULT: RequestBudget = RequestBudget {
        weight: 1200,
        window: Duration::from_secs(60),
    };

    /// Parses `weight/seconds`, e.g. `1200/60`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (w, secs) = s
            .split_once('/')
            .ok_or_else(|| format!("request budget {s:?} is not weight/seconds"))?;
        let weight: u32 = w
            .trim()
            .parse()
            .map_err(|_| format!("bad weight in request budget {s:?}"))?;
        let secs: f64 = secs
            .trim()
            .parse()
            .map_err(|_| format!("bad seconds in request budget {s:?}"))?;
        if weight == 0 || !(secs > 0.0) {
            return Err(format!("request budget {s:?} must be positive"));
        }
        Ok(Self {
            weight,
            window: Duration::from_secs_f64(secs),
        })
    }
}

/// What each API key spent, when.
#[derive(Debug, Default)]
pub struct BudgetLog {
    spent: HashMap<String, VecDeque<(Instant, u32)>>,
}

impl BudgetLog {
    /// Charges `weight` to `key` at `now`, or says how long until it would fit.
    pub fn charge(
        &mut self,
        budget: RequestBudget,
        key: &str,
        weight: u32,
        now: Instant,
    ) -> Result<(), Duration> {
        let log = self.spent.entry(key.to_string()).or_default();
        while log
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= budget.window)
        {
            log.pop_front();
        }
        let used: u64 = log.iter().map(|(_, w)| u64::from(*w)).sum();
        if used + u64::from(weight) <= u64::from(budget.weight) {
            log.push_back((now, weight));
            return Ok(());
        }
        // The earliest moment enough of the window's spending has aged out.
        let mut freed = 0u64;
        let need = used + u64::from(weight) - u64::from(budget.weight);
        for (at, w) in log.iter() {
            freed += u64::from(*w);
            if freed >= need {
                return Err((*at + budget.window).saturating_duration_since(now));
            }
        }
        Err(budget.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sliding_window_refuses_beyond_the_budget() {
        let b = RequestBudget {
            weight: 10,
            window: Duration::from_secs(10),
        };
        let t = Instant::now();
        let mut log = BudgetLog::default();
        assert!(log.charge(b, "k", 6, t).is_ok());
        assert!(log.charge(b, "k", 4, t + Duration::from_secs(5)).is_ok());
        assert_eq!(
            log.charge(b, "k", 1, t + Duration::from_secs(6)),
            Err(Duration::from_secs(4))
        );
        assert!(log.charge(b, "other", 10, t).is_ok(), "per API key");
        assert!(log.charge(b, "k", 6, t + Duration::from_secs(10)).is_ok());
        assert_eq!(RequestBudget::parse("1200/60"), Ok(RequestBudget::DEFAULT));
        assert!(RequestBudget::parse("0/60").is_err());
    }
}
