//! Adaptive deadlines: a remote's first-token and idle deadlines follow what it has shown
//! lately, so a hanging gateway costs seconds, not the configured 30 s ceiling.
//!
//! Per remote and model, the time to first output and the gaps between events of
//! committed answers go into two HDR histograms per minute; the effective deadline is
//! `clamp(multiplier × p99, floor, configured)` over the current and the previous minute,
//! and the configured value alone until enough samples exist. Reasoning deltas are output,
//! so an R1-style model thinking for a while is never cut for it. Time is
//! `tokio::time::Instant`, so tests run on paused time.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::backend::AttemptDeadlines;

/// First-output samples needed before the first-token deadline adapts.
const MIN_FIRST_TOKEN_SAMPLES: u64 = 20;
/// Gap samples needed before the idle deadline adapts.
const MIN_GAP_SAMPLES: u64 = 100;
/// One histogram per minute; the quantile looks at this one and the one before.
const WINDOW: Duration = Duration::from_secs(60);
/// Histogram range in microseconds: 1 µs to 1 h, two significant figures.
const MAX_MICROS: u64 = 3_600_000_000;

/// How a remote's deadlines adapt (`[remotes.NAME]` `deadline`, `deadline_multiplier`,
/// `first_token_floor`, `idle_floor`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeadlinePolicy {
    /// `false`: the configured deadlines only. Default `true`.
    pub adaptive: bool,
    /// The deadline is this many times the recent p99. Default 3.
    pub multiplier: f64,
    /// Never shorter than this before the first output. Default 1.5 s.
    pub first_token_floor: Duration,
    /// Never shorter than this between events. Default 1 s.
    pub idle_floor: Duration,
}

impl Default for DeadlinePolicy {
    fn default() -> Self {
        DeadlinePolicy {
            adaptive: true,
            multiplier: 3.0,
            first_token_floor: Duration::from_millis(1500),
            idle_floor: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone)]
struct Minute {
    first_token: Histogram<u64>,
    gap: Histogram<u64>,
}

impl Minute {
    fn new() -> Minute {
        let histogram = || {
            Histogram::new_with_bounds(1, MAX_MICROS, 2)
                .unwrap_or_else(|_| unreachable!("constant bounds are valid"))
        };
        Minute {
            first_token: histogram(),
            gap: histogram(),
        }
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    current: Minute,
    previous: Minute,
}

impl Window {
    fn new() -> Window {
        Window {
            started: Instant::now(),
            current: Minute::new(),
            previous: Minute::new(),
        }
    }

    /// Start a new minute when the current one is over (an empty one after a silence).
    fn rotate(&mut self) {
        let elapsed = self.started.elapsed();
        if elapsed < WINDOW {
            return;
        }
        self.previous = if elapsed < 2 * WINDOW {
            std::mem::replace(&mut self.current, Minute::new())
        } else {
            self.current = Minute::new();
            Minute::new()
        };
        self.started = Instant::now();
    }

    /// p99 over both minutes, if there are at least `min` samples.
    fn p99(&self, pick: fn(&Minute) -> &Histogram<u64>, min: u64) -> Option<Duration> {
        let mut both = pick(&self.current).clone();
        // Same bounds on both sides, so adding cannot fail.
        let _ = both.add(pick(&self.previous));
        (both.len() >= min).then(|| Duration::from_micros(both.value_at_quantile(0.99)))
    }
}

/// Recent first-token times and gaps of one backend, per model. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct LatencyWindows {
    by_model: Arc<Mutex<HashMap<String, Window>>>,
}

impl LatencyWindows {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Window>> {
        self.by_model.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, model: &str, value: Duration, pick: fn(&mut Minute) -> &mut Histogram<u64>) {
        let mut windows = self.lock();
        if !windows.contains_key(model) {
            windows.insert(model.to_string(), Window::new());
        }
        if let Some(window) = windows.get_mut(model) {
            window.rotate();
            let micros = u64::try_from(value.as_micros()).unwrap_or(MAX_MICROS);
            pick(&mut window.current).saturating_record(micros.clamp(1, MAX_MICROS));
        }
    }

    /// Time from sending a request to its first output.
    pub fn record_first_token(&self, model: &str, value: Duration) {
        self.record(model, value, |m| &mut m.first_token);
    }

    /// Gap between two events of a committed answer.
    pub fn record_gap(&self, model: &str, value: Duration) {
        self.record(model, value, |m| &mut m.gap);
    }

    /// The deadlines of the next attempt at `model` under `policy`; `None` when they do
    /// not adapt (yet). A deadline without enough samples is left at `Duration::MAX`, so
    /// the backend's configured value holds for it.
    pub fn deadlines(&self, model: &str, policy: &DeadlinePolicy) -> Option<AttemptDeadlines> {
        if !policy.adaptive {
            return None;
        }
        let mut windows = self.lock();
        let window = windows.get_mut(model)?;
        window.rotate();
        let scaled = |p99: Duration, floor: Duration| p99.mul_f64(policy.multiplier).max(floor);
        let first_token = window
            .p99(|m| &m.first_token, MIN_FIRST_TOKEN_SAMPLES)
            .map(|p| scaled(p, policy.first_token_floor));
        let idle = window
            .p99(|m| &m.gap, MIN_GAP_SAMPLES)
            .map(|p| scaled(p, policy.idle_floor));
        if first_token.is_none() && idle.is_none() {
            return None;
        }
        Some(AttemptDeadlines {
            first_token: first_token.unwrap_or(Duration::MAX),
            idle: idle.unwrap_or(Duration::MAX),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn configured_deadlines_hold_until_enough_samples() {
        let windows = LatencyWindows::default();
        let policy = DeadlinePolicy::default();
        assert_eq!(windows.deadlines("m", &policy), None);
        for _ in 0..MIN_FIRST_TOKEN_SAMPLES - 1 {
            windows.record_first_token("m", ms(100));
        }
        assert_eq!(windows.deadlines("m", &policy), None);
        windows.record_first_token("m", ms(100));
        let d = windows.deadlines("m", &policy).expect("adapted");
        assert_eq!(
            d.first_token, policy.first_token_floor,
            "3 × 100 ms is below the floor"
        );
        assert_eq!(d.idle, Duration::MAX, "no gaps seen yet");
        assert_eq!(windows.deadlines("other", &policy), None, "per model");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_healthy_gateway_gets_room_to_answer() {
        let windows = LatencyWindows::default();
        let policy = DeadlinePolicy::default();
        for i in 0..200 {
            windows.record_first_token("m", ms(1800 + i));
            windows.record_gap("m", ms(40));
        }
        let d = windows.deadlines("m", &policy).expect("adapted");
        assert!(d.first_token >= ms(5900) && d.first_token <= ms(6100), "{d:?}");
        assert_eq!(d.idle, policy.idle_floor);
        let fixed = DeadlinePolicy {
            adaptive: false,
            ..policy
        };
        assert_eq!(windows.deadlines("m", &fixed), None);
    }

    #[tokio::test(start_paused = true)]
    async fn old_minutes_age_out() {
        let windows = LatencyWindows::default();
        let policy = DeadlinePolicy::default();
        for _ in 0..50 {
            windows.record_first_token("m", ms(1000));
        }
        tokio::time::advance(WINDOW + ms(1)).await;
        let d = windows
            .deadlines("m", &policy)
            .expect("the previous minute still counts");
        assert!(d.first_token >= ms(2900), "{d:?}");
        tokio::time::advance(2 * WINDOW).await;
        assert_eq!(windows.deadlines("m", &policy), None, "nothing recent");
    }
}
