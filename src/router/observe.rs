//! What happens to a backend's health after the commit point: late failures of a
//! committed stream, the whole-stream verdict on a half-open trial, and the one place a
//! breaker transition is logged, counted and alerted.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

use super::{
    breaker::{self, BreakerState, CircuitBreaker, Transition},
    deadlines::LatencyWindows,
    health::{Availability, HealthRecord, Source},
    policy,
};
use crate::{
    alerts,
    backend::{BackendError, EventStream},
    metrics,
};

/// Log, count and alert a breaker transition.
pub(super) fn report(
    backend: &str,
    transition: Option<Transition>,
    health: Option<&HealthRecord>,
    alerter: Option<&alerts::Alerter>,
) {
    let Some(t) = transition else { return };
    metrics::breaker_transition(backend, t.to.as_str(), t.to.gauge());
    if let Some(alerter) = alerter {
        let availability = health.map(HealthRecord::availability);
        let share = |pick: fn(&Availability) -> Option<f64>| availability.as_ref().and_then(pick);
        alerter.send(alerts::alert_body(&alerts::BreakerAlert {
            backend,
            from: t.from.as_str(),
            to: t.to.as_str(),
            reason: &t.reason,
            availability: [
                share(|a| a.last_minute),
                share(|a| a.last_hour),
                share(|a| a.last_day),
            ],
        }));
    }
    if t.to == BreakerState::Open {
        tracing::warn!(backend, from = t.from.as_str(), to = t.to.as_str(), reason = %t.reason, "breaker");
    } else {
        tracing::info!(backend, from = t.from.as_str(), to = t.to.as_str(), reason = %t.reason, "breaker");
    }
}

/// Judges a committed answer by its whole stream: a clean end is the attempt's success
/// (closing a half-open breaker, recording the whole latency), a failure after the first
/// token counts against the backend like any other (a gateway that cuts every stream is
/// not healthy, even though each request looked fine at its first token), and a stream the
/// client dropped is judged neither way. Gaps between events feed the adaptive deadlines.
#[derive(Debug, Clone)]
pub(super) struct AfterCommit {
    pub(super) backend: String,
    /// The model at the backend (adaptive deadlines are per model).
    pub(super) model: String,
    pub(super) breaker: Option<CircuitBreaker>,
    pub(super) health: Option<HealthRecord>,
    pub(super) latency: Option<LatencyWindows>,
    pub(super) alerter: Option<alerts::Alerter>,
}

/// The watcher's state between two events.
struct Watch {
    events: EventStream,
    permit: Option<breaker::Permit>,
    watcher: AfterCommit,
    started: Instant,
    last_event: Instant,
}

impl AfterCommit {
    /// Pass `events` through, judging the attempt (and its `permit`, if any) at the end.
    pub(super) fn watch(
        self,
        events: EventStream,
        permit: Option<breaker::Permit>,
        started: Instant,
    ) -> EventStream {
        let state = Watch {
            events,
            permit,
            watcher: self,
            started,
            last_event: Instant::now(),
        };
        Box::pin(futures_util::stream::unfold(Some(state), |state| async move {
            let mut state = state?;
            match state.events.next().await {
                Some(Ok(event)) => {
                    if let Some(latency) = &state.watcher.latency {
                        latency.record_gap(&state.watcher.model, state.last_event.elapsed());
                    }
                    state.last_event = Instant::now();
                    Some((Ok(event), Some(state)))
                }
                Some(Err(error)) => {
                    state.watcher.failed(&error, state.permit.take());
                    Some((Err(error), Some(state)))
                }
                None => {
                    state.watcher.completed(state.permit.take(), state.started);
                    None
                }
            }
        }))
    }

    fn completed(&self, permit: Option<breaker::Permit>, started: Instant) {
        if let Some(health) = &self.health {
            health.observe_latency(started.elapsed());
        }
        if let Some(permit) = permit {
            self.report(permit.success());
        }
    }

    fn failed(&self, error: &BackendError, permit: Option<breaker::Permit>) {
        if !policy::counts_against_health(error) {
            return;
        }
        if let Some(health) = &self.health {
            health.observe(Source::Request, error.kind.as_str(), Duration::ZERO);
        }
        let reason = format!("after the first token: {}", error.kind.as_str());
        let transition = match (permit, &self.breaker) {
            (Some(permit), _) => permit.failure(&reason),
            (None, Some(breaker)) => breaker.record_failure(&reason),
            (None, None) => None,
        };
        self.report(transition);
    }

    fn report(&self, transition: Option<Transition>) {
        report(
            &self.backend,
            transition,
            self.health.as_ref(),
            self.alerter.as_ref(),
        );
    }
}
