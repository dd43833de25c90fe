//! A circuit breaker per remote: Closed → Open after N consecutive failures, or when the
//! error rate over the last minute passes a threshold (which also catches a gateway that
//! fails every other request and never fails N in a row) → HalfOpen
//! after a cooldown that doubles on every repeated trip (up to a cap) → one trial request
//! → Closed on success, Open again on failure.
//!
//! Vocabulary: a *trip* is a Closed/HalfOpen → Open transition; a *permit* is the right
//! to send one request. Time is `tokio::time::Instant`, so tests run on paused time.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker. Default 3.
    pub failure_threshold: u32,
    /// First cooldown before a trial. Default 1 s.
    pub cooldown: Duration,
    /// Cooldowns double per repeated trip up to this. Default 2 s.
    pub max_cooldown: Duration,
    /// Error share over `rate_window` that opens the breaker. Default 0.5.
    pub error_rate_threshold: f64,
    /// Outcomes needed in the window before the rate counts; low so that low traffic is
    /// protected too. Default 4.
    pub min_requests: u32,
    /// Window of the error rate. Default 60 s.
    pub rate_window: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 3,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(2),
            error_rate_threshold: 0.5,
            min_requests: 4,
            rate_window: Duration::from_secs(60),
        }
    }
}

/// The externally visible state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests pass.
    Closed,
    /// Requests are refused until the cooldown ends.
    Open,
    /// One trial request is let through.
    HalfOpen,
}

impl BreakerState {
    /// Label for metrics, logs and `/health`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial_in_flight: bool },
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Trips since the last success; sets the cooldown.
    trips: u32,
    /// Why the state is what it is (last failure or success).
    reason: String,
    /// Outcomes in the rate window while closed: (when, failed).
    outcomes: std::collections::VecDeque<(Instant, bool)>,
    /// Failures among `outcomes`, kept as a running count (the window can hold many
    /// thousands of outcomes under load; counting them per request was the hot spot).
    failures_in_window: usize,
}

/// A state change, for logs, metrics and alerts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The state left.
    pub from: BreakerState,
    /// The state entered.
    pub to: BreakerState,
    /// Why, for logs and alerts.
    pub reason: String,
}

/// One remote's breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Arc<Mutex<Inner>>,
    /// Counts trips, so requests still waiting on this remote learn of one at once (the
    /// router fails them over: in-flight rescue).
    trips: Arc<watch::Sender<u64>>,
}

/// The right to send one request; report its outcome with `success` or `failure`.
/// Dropping it unreported (the client left) releases a half-open trial.
#[derive(Debug)]
pub struct Permit {
    breaker: CircuitBreaker,
    trial: bool,
    reported: bool,
}

fn public(state: State) -> BreakerState {
    match state {
        State::Closed { .. } => BreakerState::Closed,
        State::Open { .. } => BreakerState::Open,
        State::HalfOpen { .. } => BreakerState::HalfOpen,
    }
}

impl CircuitBreaker {
    /// The same breaker (state, trips, error window) under new settings, for a reload.
    pub fn with_config(&self, config: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker {
            config,
            inner: self.inner.clone(),
            trips: self.trips.clone(),
        }
    }

    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker {
            config,
            inner: Arc::new(Mutex::new(Inner {
                state: State::Closed { failures: 0 },
                trips: 0,
                reason: "no requests yet".into(),
                outcomes: std::collections::VecDeque::new(),
                failures_in_window: 0,
            })),
            trips: Arc::new(watch::channel(0).0),
        }
    }

    /// Changes whenever the breaker trips (Closed or HalfOpen → Open).
    pub fn trips(&self) -> watch::Receiver<u64> {
        self.trips.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current state (an expired Open reads as HalfOpen) and its reason.
    pub fn state(&self) -> (BreakerState, String) {
        let inner = self.lock();
        let state = match inner.state {
            State::Open { until } if Instant::now() >= until => BreakerState::HalfOpen,
            other => public(other),
        };
        (state, inner.reason.clone())
    }

    /// Time left until an open breaker lets a trial through.
    pub fn retry_in(&self) -> Option<Duration> {
        match self.lock().state {
            State::Open { until } => Some(until.saturating_duration_since(Instant::now())),
            _ => None,
        }
    }

    fn cooldown(&self, trips: u32) -> Duration {
        let factor = 1u32 << trips.saturating_sub(1).min(16);
        self.config
            .cooldown
            .saturating_mul(factor)
            .min(self.config.max_cooldown)
    }

    /// A permit, or `None` while open (or while a half-open trial is running).
    pub fn try_acquire(&self) -> (Option<Permit>, Option<Transition>) {
        let mut inner = self.lock();
        match inner.state {
            State::Closed { .. } => (Some(self.permit(false)), None),
            State::Open { until } if Instant::now() >= until => {
                inner.state = State::HalfOpen {
                    trial_in_flight: true,
                };
                let transition = Transition {
                    from: BreakerState::Open,
                    to: BreakerState::HalfOpen,
                    reason: "cooldown over; sending one trial request".into(),
                };
                (Some(self.permit(true)), Some(transition))
            }
            State::HalfOpen {
                trial_in_flight: false,
            } => {
                inner.state = State::HalfOpen {
                    trial_in_flight: true,
                };
                (Some(self.permit(true)), None)
            }
            State::Open { .. }
            | State::HalfOpen {
                trial_in_flight: true,
            } => (None, None),
        }
    }

    fn permit(&self, trial: bool) -> Permit {
        Permit {
            breaker: self.clone(),
            trial,
            reported: false,
        }
    }
    /// Record an outcome in the rate window; returns the error rate when it counts.
    fn rate_after(&self, inner: &mut Inner, failed: bool) -> Option<f64> {
        let now = Instant::now();
        inner.outcomes.push_back((now, failed));
        inner.failures_in_window += usize::from(failed);
        while inner
            .outcomes
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > self.config.rate_window)
        {
            if let Some((_, old_failed)) = inner.outcomes.pop_front() {
                inner.failures_in_window -= usize::from(old_failed);
            }
        }
        let total = inner.outcomes.len();
        let failures = inner.failures_in_window;
        (total >= self.config.min_requests as usize).then(|| failures as f64 / total as f64)
    }

    fn on_success(&self) -> Option<Transition> {
        let mut inner = self.lock();
        if matches!(inner.state, State::Closed { .. }) {
            self.rate_after(&mut inner, false);
        }
        let from = public(inner.state);
        inner.state = State::Closed { failures: 0 };
        inner.trips = 0;
        inner.reason = "last request succeeded".into();
        (from != BreakerState::Closed).then(|| Transition {
            from,
            to: BreakerState::Closed,
            reason: "trial request succeeded".into(),
        })
    }

    fn on_failure(&self, reason: &str) -> Option<Transition> {
        let mut inner = self.lock();
        inner.reason = reason.to_string();
        let rate = match inner.state {
            State::Closed { .. } => self.rate_after(&mut inner, true),
            _ => None,
        };
        let rate_trips = rate.is_some_and(|r| r >= self.config.error_rate_threshold);
        match inner.state {
            State::Closed { failures } if failures + 1 < self.config.failure_threshold && !rate_trips => {
                inner.state = State::Closed {
                    failures: failures + 1,
                };
                None
            }
            State::Closed { .. } | State::HalfOpen { .. } => {
                let from = public(inner.state);
                inner.trips += 1;
                let cooldown = self.cooldown(inner.trips);
                inner.state = State::Open {
                    until: Instant::now() + cooldown,
                };
                inner.outcomes.clear();
                inner.failures_in_window = 0;
                let why = if from == BreakerState::Closed && rate_trips {
                    format!(
                        "error rate {:.0}% over the last {}, last: {reason}",
                        rate.unwrap_or(1.0) * 100.0,
                        humantime::format_duration(self.config.rate_window)
                    )
                } else if from == BreakerState::Closed {
                    format!(
                        "{} consecutive failures, last: {reason}",
                        self.config.failure_threshold
                    )
                } else {
                    format!("trial request failed: {reason}")
                };
                inner.reason = why.clone();
                self.trips.send_modify(|trips| *trips += 1);
                Some(Transition {
                    from,
                    to: BreakerState::Open,
                    reason: format!("{why}; cooldown {}", humantime::format_duration(cooldown)),
                })
            }
            // Late outcome of a request that started before the breaker opened.
            State::Open { .. } => None,
        }
    }

    /// A failure reported after the request's permit was spent (its stream broke after
    /// the first token); counts like any other failure.
    pub fn record_failure(&self, reason: &str) -> Option<Transition> {
        self.on_failure(reason)
    }

    fn release_trial(&self) {
        let mut inner = self.lock();
        if let State::HalfOpen {
            trial_in_flight: true,
        } = inner.state
        {
            inner.state = State::HalfOpen {
                trial_in_flight: false,
            };
        }
    }
}

impl Permit {
    /// Whether this permit is a half-open breaker's one trial.
    pub fn is_trial(&self) -> bool {
        self.trial
    }

    /// The attempt succeeded; the breaker's change, if any.
    pub fn success(mut self) -> Option<Transition> {
        self.reported = true;
        self.breaker.on_success()
    }

    /// The attempt failed for `reason`; the breaker's change, if any.
    pub fn failure(mut self, reason: &str) -> Option<Transition> {
        self.reported = true;
        self.breaker.on_failure(reason)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.trial && !self.reported {
            self.breaker.release_trial();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig {
            failure_threshold: 3,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(12),
            // Out of the way of the consecutive-failure tests.
            error_rate_threshold: 1.1,
            ..BreakerConfig::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn error_rate_trips_a_gateway_that_never_fails_three_times_in_a_row() {
        let b = CircuitBreaker::new(BreakerConfig::default());
        let ok = |b: &CircuitBreaker| b.try_acquire().0.expect("permit").success();
        ok(&b);
        assert!(fail(&b).is_none());
        ok(&b);
        let t = fail(&b).expect("2 of 4 failed: 50 % trips");
        assert_eq!(t.to, BreakerState::Open);
        assert!(t.reason.contains("error rate 50%"), "{}", t.reason);

        let b = CircuitBreaker::new(BreakerConfig::default());
        ok(&b);
        ok(&b);
        ok(&b);
        tokio::time::advance(Duration::from_secs(61)).await;
        fail(&b);
        assert_eq!(
            b.state().0,
            BreakerState::Closed,
            "old successes left the window; 1 outcome is too few"
        );
    }

    fn fail(b: &CircuitBreaker) -> Option<Transition> {
        b.try_acquire().0.expect("permit").failure("boom")
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_half_opens_after_cooldown() {
        let b = breaker();
        assert!(fail(&b).is_none());
        assert!(fail(&b).is_none());
        let t = fail(&b).expect("third failure trips");
        assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
        assert!(t.reason.contains("3 consecutive failures"), "{}", t.reason);
        assert!(b.try_acquire().0.is_none(), "open: no permits");
        assert_eq!(b.retry_in(), Some(Duration::from_secs(5)));

        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.state().0, BreakerState::HalfOpen);
        let (trial, t) = b.try_acquire();
        assert_eq!(t.map(|t| t.to), Some(BreakerState::HalfOpen));
        assert!(b.try_acquire().0.is_none(), "only one trial at a time");
        let t = trial.expect("trial").success().expect("closes");
        assert_eq!((t.from, t.to), (BreakerState::HalfOpen, BreakerState::Closed));
        assert_eq!(b.state().0, BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn cooldown_doubles_on_repeated_trips_up_to_the_cap() {
        let b = breaker();
        for _ in 0..3 {
            fail(&b);
        }
        assert_eq!(b.retry_in(), Some(Duration::from_secs(5)));
        tokio::time::advance(Duration::from_secs(5)).await;
        fail(&b).expect("failed trial re-opens");
        assert_eq!(b.retry_in(), Some(Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(10)).await;
        fail(&b);
        assert_eq!(b.retry_in(), Some(Duration::from_secs(12)), "capped");
        tokio::time::advance(Duration::from_secs(12)).await;
        b.try_acquire().0.expect("trial").success();
        for _ in 0..3 {
            fail(&b);
        }
        assert_eq!(
            b.retry_in(),
            Some(Duration::from_secs(5)),
            "a success resets the trips"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_the_count_and_abandoned_trials_are_released() {
        let b = breaker();
        fail(&b);
        fail(&b);
        b.try_acquire().0.expect("permit").success();
        fail(&b);
        fail(&b);
        assert_eq!(b.state().0, BreakerState::Closed, "not 3 in a row");
        fail(&b);
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(b.try_acquire().0.expect("trial"));
        assert!(b.try_acquire().0.is_some(), "the abandoned trial was released");
    }
}
