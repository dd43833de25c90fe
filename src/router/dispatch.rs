//! One request's way through its targets: a short loop over the ordered targets, a
//! per-attempt step that ends `Committed`, `Skipped` or `Failed`, and the pure retry
//! decision of [`policy::after_failure`] in between.
//!
//! The commit point: a streaming client's answer is committed at its first output; a
//! JSON client's at its end, so a failure anywhere in its answer is still retried or
//! failed over invisibly. Before the commit point, an attempt waiting on a remote whose
//! breaker trips is failed over at once (in-flight rescue) instead of each request
//! waiting out its own deadline.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tracing::Instrument;

use super::{
    Route, RouteError, Routed, Router, Target,
    health::Source,
    hedge,
    policy::{self, Decision},
    stream::{complete, continuing},
    trace::{self, AttemptEnd, AttemptTrace},
};
use crate::{
    backend::{
        AttemptDeadlines, Backend, BackendError, BackendKind, BackendRequest, ErrorKind, EventStream,
        GenerationRequest, TimeoutPhase,
    },
    metrics,
    router::breaker::Permit,
};

/// How one attempt ended.
enum Attempt {
    Committed(Routed),
    Skipped(Skip),
    /// `accounted`: the breaker and health already heard of it (a failure after the first
    /// token, judged by the stream's watcher).
    Failed {
        error: BackendError,
        accounted: bool,
    },
}

/// Why a target was passed over without a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    /// Its breaker is open; it takes requests again in this long.
    BreakerOpen(Duration),
    /// The prompt cannot fit its context window.
    ContextWindow,
}

/// Where one attempt goes.
#[derive(Clone, Copy)]
struct Aim<'a> {
    route: &'a Route,
    target: &'a Target,
    backend: &'a dyn Backend,
    request: &'a Arc<GenerationRequest>,
}

/// What one request has been through so far.
#[derive(Debug, Default)]
struct Trail {
    attempts: u32,
    last_error: Option<(String, BackendKind, BackendError)>,
    /// Soonest an open breaker of a skipped target lets requests through again.
    retry_in: Option<Duration>,
    /// Why the request left the previous target (`x-lifeboat-fallback-reason`).
    reason: Option<&'static str>,
}

impl Trail {
    fn skipped(&mut self, backend: &str, skip: Skip) {
        let reason = match skip {
            Skip::BreakerOpen(_) => "breaker_open",
            Skip::ContextWindow => "context_window",
        };
        tracing::info!(backend, reason, "target skipped without a call");
        match skip {
            Skip::BreakerOpen(wait) => {
                self.retry_in = Some(self.retry_in.map_or(wait, |r| r.min(wait)));
                self.reason = Some("breaker_open");
            }
            Skip::ContextWindow => self.reason = Some("context_window"),
        }
    }

    /// Count an attempt on `backend` (a failover, if the last error was elsewhere); the
    /// attempt's trace starts with it.
    fn start(&mut self, backend: &dyn Backend) -> AttemptTrace {
        self.attempts += 1;
        if let Some((from, _, error)) = &self.last_error
            && from != backend.id()
        {
            metrics::failover(from, backend.id(), error.kind);
        }
        AttemptTrace::start(backend.id(), backend.kind(), self.attempts)
    }

    fn failed(&mut self, backend: &dyn Backend, error: BackendError) {
        self.reason = Some(error.kind.as_str());
        self.last_error = Some((backend.id().to_string(), backend.kind(), error));
    }

    /// The error for the client when `backend` refused with `error` for good.
    fn answer(self, backend: &dyn Backend, error: BackendError) -> RouteError {
        // The local model refusing a request it cannot take (too long for its context)
        // after the gateway failed: the gateway's failure is the news.
        if backend.kind() == BackendKind::Local
            && let Some((from, from_kind, original)) = self.last_error
        {
            tracing::info!(%error, "the local model cannot take this request; reporting the gateway's failure");
            return RouteError::Backend {
                backend: from,
                backend_kind: from_kind,
                error: original,
                attempts: self.attempts,
            };
        }
        RouteError::Backend {
            backend: backend.id().to_string(),
            backend_kind: backend.kind(),
            error,
            attempts: self.attempts,
        }
    }

    /// The error for the client when every target was tried or skipped.
    fn exhausted(self, route: &str) -> RouteError {
        match (self.last_error, self.retry_in) {
            (Some((backend, backend_kind, error)), _) => RouteError::Backend {
                backend,
                backend_kind,
                error,
                attempts: self.attempts,
            },
            (None, Some(retry_in)) => RouteError::AllOpen {
                model: route.to_string(),
                retry_in,
            },
            (None, None) => RouteError::NoBackend {
                model: route.to_string(),
            },
        }
    }
}

impl Router {
    /// Serve `request`: try the route's targets in order until one commits. Returns the
    /// committed stream, or the error that should reach the client. All of it, the
    /// committed stream included, runs in the request's span.
    pub async fn dispatch(&self, request: GenerationRequest) -> Result<Routed, RouteError> {
        let span = trace::request_span(&request);
        let mut routed = self.serve(request).instrument(span.clone()).await?;
        routed.events = trace::in_span(routed.events, span);
        Ok(routed)
    }

    /// [`Router::dispatch`] inside the request's span.
    async fn serve(&self, request: GenerationRequest) -> Result<Routed, RouteError> {
        let route = self
            .table
            .resolve(&request.model)
            .ok_or_else(|| RouteError::UnknownModel(request.model.clone()))?
            .clone();
        tracing::Span::current().record("route", route.name.as_str());
        let request = Arc::new(request);
        self.settings.retry.budget.deposit();
        let mut trail = Trail::default();
        for target in self.order(&route) {
            let Some(backend) = self.backends.get(&target.backend) else {
                continue;
            };
            let mut retries = 0u32;
            loop {
                let aim = Aim {
                    route: &route,
                    target,
                    backend: backend.as_ref(),
                    request: &request,
                };
                let (error, accounted) = match self.attempt(aim, &mut trail).await {
                    Attempt::Committed(routed) => return Ok(routed),
                    Attempt::Skipped(skip) => {
                        trail.skipped(backend.id(), skip);
                        break;
                    }
                    Attempt::Failed { error, accounted } => (error, accounted),
                };
                if !accounted {
                    self.account_failure(backend.as_ref(), &error);
                }
                let decision = policy::after_failure(&error, backend.kind(), retries, &self.settings.retry);
                trace::decided(backend.id(), &error, retries, decision);
                match decision {
                    Decision::Retry(wait) => {
                        metrics::retry(backend.id(), error.kind);
                        trail.failed(backend.as_ref(), error);
                        tokio::time::sleep(wait).await;
                        retries += 1;
                    }
                    Decision::FailOver => {
                        trail.failed(backend.as_ref(), error);
                        break;
                    }
                    Decision::Answer => return Err(trail.answer(backend.as_ref(), error)),
                }
            }
        }
        tracing::info!(decision = "answer", "no target left to try");
        Err(trail.exhausted(&route.name))
    }

    /// One attempt on `target`: skipped without a call, or run to its commit point.
    async fn attempt(&self, aim: Aim<'_>, trail: &mut Trail) -> Attempt {
        let Aim {
            route,
            target,
            backend,
            request,
        } = aim;
        let permit = match self.admit(backend, request) {
            Ok(permit) => permit,
            Err(skip) => return Attempt::Skipped(skip),
        };
        let trace = trail.start(backend);
        metrics::attempt_started(backend.id(), backend.kind());
        let started = Instant::now();
        let mut attempt = BackendRequest::new(target.model.clone(), request.clone());
        attempt.deadlines = self.adaptive_deadlines(backend.id(), &target.model);
        let plan = self.hedge_plan(route, backend);
        let work = hedge::attempt(backend, attempt, plan).instrument(trace.span().clone());
        let Some(outcome) = self.rescuable(backend.id(), work).await else {
            // The breaker is already open: this request only stopped waiting on it.
            let error = rescued(backend.id());
            trace.end(AttemptEnd::Failed(error.kind));
            return Attempt::Failed {
                error,
                accounted: true,
            };
        };
        let events = match outcome {
            hedge::Outcome::Primary(Ok(events)) => events,
            hedge::Outcome::Primary(Err(error)) => {
                trace.end(AttemptEnd::Failed(error.kind));
                if let Some(permit) = permit {
                    self.judge_early(backend.id(), &error, permit);
                }
                return Attempt::Failed {
                    error,
                    accounted: false,
                };
            }
            hedge::Outcome::HedgeWon(won) => return self.hedge_won(backend, won, permit, trace, trail),
        };
        trace.first_output();
        self.committed(aim, events, permit, started, trail, trace).await
    }

    /// Whether `backend` may be called for `request`: its context window holds it and its
    /// breaker lets the call through (the permit reports the outcome).
    fn admit(&self, backend: &dyn Backend, request: &GenerationRequest) -> Result<Option<Permit>, Skip> {
        if backend
            .context_window()
            .is_some_and(|window| estimated_tokens(request) > u64::from(window))
        {
            return Err(Skip::ContextWindow);
        }
        let Some(breaker) = self.breakers.get(backend.id()) else {
            return Ok(None);
        };
        let (permit, transition) = breaker.try_acquire();
        self.note(backend.id(), transition);
        match permit {
            Some(permit) => Ok(Some(permit)),
            None => Err(Skip::BreakerOpen(breaker.retry_in().unwrap_or_default())),
        }
    }

    /// The local hedge answered before the remote `primary`: the remote was slow (or failed
    /// meanwhile; only a failure counts against it), and the attempt's trace follows the
    /// answer it gave.
    fn hedge_won(
        &self,
        primary: &dyn Backend,
        won: hedge::HedgeWin,
        permit: Option<Permit>,
        trace: AttemptTrace,
        trail: &Trail,
    ) -> Attempt {
        if let (Some(error), Some(permit)) = (&won.primary_error, permit)
            && policy::counts_against_health(error)
        {
            self.note(primary.id(), permit.failure(error.kind.as_str()));
        }
        trace.first_output();
        trace.span().in_scope(|| {
            tracing::info!(
                primary_error = won.primary_error.as_ref().map(|e| e.kind.as_str()),
                "the local hedge answered first"
            );
        });
        trace.committed();
        Attempt::Committed(Routed {
            backend: won.backend,
            backend_kind: BackendKind::Local,
            model: won.model,
            attempts: trail.attempts + 1,
            fallback_reason: Some("hedge"),
            events: trace::traced(won.events, trace),
        })
    }

    /// The attempt's first output arrived: watch the rest of the stream (a JSON client's
    /// whole answer is read here, so a late failure is still this attempt's failure).
    async fn committed(
        &self,
        aim: Aim<'_>,
        events: EventStream,
        permit: Option<Permit>,
        started: Instant,
        trail: &Trail,
        trace: AttemptTrace,
    ) -> Attempt {
        let Aim {
            route,
            target,
            backend,
            request,
        } = aim;
        let first_output = started.elapsed();
        if let Some(record) = self.health.get(backend.id()) {
            record.observe(Source::Request, "ok", first_output);
        }
        if let Some(latency) = self.latency.get(backend.id()) {
            latency.record_first_token(&target.model, first_output);
        }
        let watcher = self.after_commit(backend.id(), &target.model);
        let attempt_span = trace.span().clone();
        if request.stream {
            trace.committed();
        }
        let mut events = watcher.watch(trace::traced(events, trace), permit, started);
        if let Some((local, model)) = self.continuation_target(route, backend)
            && request.sampling.n <= 1
        {
            events = continuing(events, request.clone(), backend.id().to_string(), local, model);
        }
        if !request.stream {
            events = match complete(events).instrument(attempt_span.clone()).await {
                Ok(events) => {
                    attempt_span.in_scope(|| tracing::info!(commit_point = "answer_complete", "committed"));
                    events
                }
                Err(error) => {
                    return Attempt::Failed {
                        error,
                        accounted: true,
                    };
                }
            };
        }
        Attempt::Committed(Routed {
            backend: backend.id().to_string(),
            backend_kind: backend.kind(),
            model: target.model.clone(),
            attempts: trail.attempts,
            fallback_reason: trail.reason,
            events,
        })
    }

    /// Run `work` (an attempt up to its first output) unless the breaker of `backend`
    /// trips first (`None`): then the request stops waiting on a remote known to fail.
    async fn rescuable(
        &self,
        backend: &str,
        work: impl std::future::Future<Output = hedge::Outcome>,
    ) -> Option<hedge::Outcome> {
        let Some(breaker) = self.breakers.get(backend) else {
            return Some(work.await);
        };
        let mut trips = breaker.trips();
        let tripped = async {
            if trips.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            outcome = work => Some(outcome),
            () = tripped => {
                metrics::rescued(backend);
                None
            }
        }
    }

    /// Report a failure before the first output (or a client mistake) to the breaker.
    fn judge_early(&self, backend: &str, error: &BackendError, permit: Permit) {
        if policy::counts_against_health(error) {
            self.note(backend, permit.failure(error.kind.as_str()));
        } else {
            // The client's mistake says nothing about the backend's health.
            self.note(backend, permit.success());
        }
    }

    /// Metrics and health of a failed attempt the stream watcher did not see.
    fn account_failure(&self, backend: &dyn Backend, error: &BackendError) {
        metrics::attempt_failed(backend.id(), error.kind);
        if let Some(record) = self.health.get(backend.id()) {
            record.observe(Source::Request, error.kind.as_str(), Duration::ZERO);
        }
        tracing::debug!(backend = %backend.id(), kind = error.kind.as_str(), %error, "attempt failed");
    }

    /// The deadlines of the next attempt on `backend` for `model`, if they adapt.
    fn adaptive_deadlines(&self, backend: &str, model: &str) -> Option<AttemptDeadlines> {
        let policy = self.settings.deadlines.get(backend).copied().unwrap_or_default();
        self.latency.get(backend)?.deadlines(model, &policy)
    }
}

/// The error of an attempt given up because its remote's breaker tripped meanwhile.
fn rescued(backend: &str) -> BackendError {
    BackendError::new(
        ErrorKind::Timeout(TimeoutPhase::FirstToken),
        format!("rescued: the breaker of `{backend}` opened while this request waited for its first token"),
    )
}

/// An estimate of the tokens a request needs, for skipping a target whose context window
/// cannot hold it: ~4 bytes per prompt token (OpenAI's rule of thumb for English) plus
/// the answer's `max_tokens`. It only decides skips; a backend still checks exactly.
fn estimated_tokens(request: &GenerationRequest) -> u64 {
    (request.prompt_bytes() as u64).div_ceil(4) + u64::from(request.sampling.max_tokens.unwrap_or(0))
}

#[cfg(test)]
#[path = "dispatch_tests.rs"]
mod tests;
