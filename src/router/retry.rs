//! The retry loop's two small state machines: exponential backoff with full jitter, and a
//! retry budget (retries ≤ a fraction of recent requests plus a small floor) so an outage
//! never turns into a retry storm. Time is `tokio::time::Instant` for paused-time tests.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use rand::Rng;
use tokio::time::Instant;

/// Exponential backoff: the n-th retry waits a random time in `[0, min(max, min·2ⁿ)]`
/// ("full jitter"), or exactly that bound when jitter is off (tests).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    jitter: bool,
}

impl Backoff {
    /// `min` > 0 and `max` ≥ `min`, else a message saying which.
    pub fn try_new(min: Duration, max: Duration, jitter: bool) -> Result<Backoff, String> {
        if min.is_zero() {
            return Err("backoff minimum must be greater than 0".into());
        }
        if max < min {
            return Err(format!(
                "backoff maximum ({}) is below the minimum ({})",
                humantime::format_duration(max),
                humantime::format_duration(min)
            ));
        }
        Ok(Backoff { min, max, jitter })
    }

    /// Delay before retry number `retry` (0 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        let bound = self.min.saturating_mul(1u32 << retry.min(20)).min(self.max);
        if self.jitter {
            let nanos = rand::rng().random_range(0..=bound.as_nanos().min(u128::from(u64::MAX)) as u64);
            Duration::from_nanos(nanos)
        } else {
            bound
        }
    }
}

/// Retries allowed over a sliding window: `ratio` × requests seen + `floor`.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    floor: u32,
    window: Duration,
    inner: Arc<Mutex<Window>>,
}

#[derive(Debug, Default)]
struct Window {
    requests: VecDeque<Instant>,
    retries: VecDeque<Instant>,
}

impl RetryBudget {
    /// Defaults used by the router: 20 % of requests plus 10, over 10 s.
    pub fn new(ratio: f64, floor: u32, window: Duration) -> RetryBudget {
        RetryBudget {
            ratio,
            floor,
            window,
            inner: Arc::new(Mutex::new(Window::default())),
        }
    }

    fn prune(&self, window: &mut Window, now: Instant) {
        let horizon = now.checked_sub(self.window);
        for queue in [&mut window.requests, &mut window.retries] {
            while let (Some(front), Some(horizon)) = (queue.front(), horizon) {
                if *front > horizon {
                    break;
                }
                queue.pop_front();
            }
        }
    }

    /// Count one client request.
    pub fn deposit(&self) {
        let now = Instant::now();
        let mut window = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.prune(&mut window, now);
        window.requests.push_back(now);
    }

    /// Take one retry if the budget allows it.
    pub fn try_withdraw(&self) -> bool {
        let now = Instant::now();
        let mut window = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.prune(&mut window, now);
        let allowed = (window.requests.len() as f64 * self.ratio) as usize + self.floor as usize;
        if window.retries.len() < allowed {
            window.retries.push_back(now);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_validates_and_doubles_up_to_the_cap() {
        assert!(Backoff::try_new(Duration::ZERO, Duration::from_secs(1), false).is_err());
        let err =
            Backoff::try_new(Duration::from_secs(2), Duration::from_secs(1), false).expect_err("max < min");
        assert!(err.contains("below the minimum"), "{err}");
        let b =
            Backoff::try_new(Duration::from_millis(100), Duration::from_millis(700), false).expect("valid");
        let delays: Vec<u128> = (0..5).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 700, 700]);
        let jittered =
            Backoff::try_new(Duration::from_millis(100), Duration::from_millis(700), true).expect("valid");
        assert!((0..100).all(|_| jittered.delay(2) <= Duration::from_millis(400)));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_is_a_fraction_of_recent_requests_plus_a_floor() {
        let budget = RetryBudget::new(0.2, 2, Duration::from_secs(10));
        assert!(
            budget.try_withdraw() && budget.try_withdraw(),
            "the floor allows 2 with no traffic"
        );
        assert!(!budget.try_withdraw());
        for _ in 0..10 {
            budget.deposit();
        }
        assert!(
            budget.try_withdraw() && budget.try_withdraw(),
            "20 % of 10 requests"
        );
        assert!(!budget.try_withdraw(), "spent");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            budget.try_withdraw() && budget.try_withdraw(),
            "the window slid: floor again"
        );
        assert!(!budget.try_withdraw());
    }
}
