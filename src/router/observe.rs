//! What happens to a backend's health after the commit point: late failures of a
//! committed stream, the whole-stream verdict on a half-open trial, and the one place a
//! breaker transition is logged, counted and alerted.

use super::{
    alerts,
    breaker::{self, BreakerState, CircuitBreaker, Transition},
    health::{Availability, HealthRecord, Source},
    policy,
    stream::observed,
};
use crate::{
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
    metrics::breaker_transition(backend, t.to);
    if let Some(alerter) = alerter {
        let availability = health.map_or(
            Availability {
                last_minute: None,
                last_hour: None,
                last_day: None,
            },
            HealthRecord::availability,
        );
        alerter.send(alerts::alert_body(backend, &t, availability));
    }
    if t.to == BreakerState::Open {
        tracing::warn!(backend, from = t.from.as_str(), to = t.to.as_str(), reason = %t.reason, "breaker");
    } else {
        tracing::info!(backend, from = t.from.as_str(), to = t.to.as_str(), reason = %t.reason, "breaker");
    }
}

/// Feeds failures after the commit point (a cut or stalled stream) back into the
/// backend's health and breaker: a gateway that cuts every stream is not healthy, even
/// though each request looked fine at its first token.
#[derive(Debug, Clone)]
pub(super) struct AfterCommit {
    pub(super) backend: String,
    pub(super) breaker: Option<CircuitBreaker>,
    pub(super) health: Option<HealthRecord>,
    pub(super) alerter: Option<alerts::Alerter>,
}

impl AfterCommit {
    /// Watch a committed stream: late failures count against the backend, and a clean end
    /// records the attempt's whole latency.
    pub(super) fn observe(self, events: EventStream, started: tokio::time::Instant) -> EventStream {
        let on_error = self.clone();
        observed(
            events,
            move |error| on_error.failed(error),
            move || {
                if let Some(health) = &self.health {
                    health.observe_latency(started.elapsed());
                }
            },
        )
    }

    /// Pass a trial's stream through; report success when it ends cleanly, failure when
    /// it breaks (a dropped stream releases the trial unjudged).
    pub(super) fn judge_trial(self, events: EventStream, permit: breaker::Permit) -> EventStream {
        use futures_util::StreamExt;
        let state = (events, Some(permit), self);
        Box::pin(futures_util::stream::unfold(
            state,
            |(mut events, mut permit, watcher)| async move {
                match events.next().await {
                    Some(Ok(event)) => Some((Ok(event), (events, permit, watcher))),
                    Some(Err(error)) => {
                        if let Some(permit) = permit.take() {
                            if let Some(health) = &watcher.health {
                                health.observe(
                                    Source::Request,
                                    error.kind.as_str(),
                                    std::time::Duration::ZERO,
                                );
                            }
                            let reason =
                                format!("trial broke after the first token: {}", error.kind.as_str());
                            let transition = permit.failure(&reason);
                            report(
                                &watcher.backend,
                                transition,
                                watcher.health.as_ref(),
                                watcher.alerter.as_ref(),
                            );
                        }
                        Some((Err(error), (events, permit, watcher)))
                    }
                    None => {
                        if let Some(permit) = permit.take() {
                            let transition = permit.success();
                            report(
                                &watcher.backend,
                                transition,
                                watcher.health.as_ref(),
                                watcher.alerter.as_ref(),
                            );
                        }
                        None
                    }
                }
            },
        ))
    }

    fn failed(&self, error: &BackendError) {
        if !policy::counts_against_health(error) {
            return;
        }
        if let Some(health) = &self.health {
            health.observe(Source::Request, error.kind.as_str(), std::time::Duration::ZERO);
        }
        if let Some(breaker) = &self.breaker {
            let transition =
                breaker.record_failure(&format!("after the first token: {}", error.kind.as_str()));
            report(
                &self.backend,
                transition,
                self.health.as_ref(),
                self.alerter.as_ref(),
            );
        }
    }
}
