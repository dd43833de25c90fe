//! Decides who serves a request: resolves the public model name through the route table
//! to an ordered list of targets (remote first, the local model last), skips remotes whose
//! breaker is open, and fails over on any failure before the commit point (the first real
//! output), so a failure before it never reaches the client.
//!
//! No HTTP types in here: the API layer turns [`RouteError`] into a response.

#![warn(missing_docs)]

pub mod breaker;
pub mod deadlines;
mod dispatch;
pub mod health;
mod hedge;
mod observe;
pub mod policy;
pub mod retry;
mod routes;
mod stream;
mod trace;

use observe::{AfterCommit, report};
pub use routes::{Canary, ModelInfo, Route, RouteTable, Target};

use std::{collections::HashMap, sync::Arc};

use crate::backend::{Backend, BackendError, BackendKind, EventStream};
use breaker::{BreakerConfig, BreakerState, CircuitBreaker, Transition};
use deadlines::{DeadlinePolicy, LatencyWindows};
use health::{Availability, HealthEvent, HealthRecord, Source};
use policy::RetryRules;
use retry::{Backoff, RetryBudget};

/// Hedge delay when the route sets none and the remote has too few TTFT samples.
const DEFAULT_HEDGE_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// How the router retries and when it gives a remote a rest.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    /// When a remote's breaker opens and how long it rests.
    pub breaker: BreakerConfig,
    /// Retries on the same remote: at most 1 by default, `Retry-After` honoured up to
    /// 2 s, backoff 100 ms–2 s with jitter, a budget of 20 % of requests plus 10 per 10 s.
    pub retry: RetryRules,
    /// How each remote's deadlines adapt, by id; a remote not listed gets the default.
    pub deadlines: HashMap<String, DeadlinePolicy>,
    /// How often each remote is probed (`GET /models`); zero turns probing off.
    pub probe_interval: std::time::Duration,
    /// Where breaker changes are posted, if anywhere.
    pub alerter: Option<crate::alerts::Alerter>,
}

impl Default for RouterSettings {
    fn default() -> Self {
        use std::time::Duration;
        RouterSettings {
            breaker: BreakerConfig::default(),
            retry: RetryRules {
                max_retries: 1,
                retry_after_cap: Duration::from_secs(2),
                backoff: Backoff::try_new(Duration::from_millis(100), Duration::from_secs(2), true)
                    .unwrap_or_else(|_| unreachable!("valid constants")),
                budget: RetryBudget::new(0.2, 10, Duration::from_secs(10)),
            },
            deadlines: HashMap::new(),
            probe_interval: Duration::from_secs(10),
            alerter: None,
        }
    }
}

/// Why no response could be produced.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    /// No route has this public name or alias.
    UnknownModel(String),
    #[error("the model `{model}` has no available backend")]
    /// The route has no target that exists.
    NoBackend {
        /// The public model name.
        model: String,
    },
    /// Every target was skipped because its breaker is open.
    #[error("every backend for `{model}` is failing; retry in {}", humantime::format_duration(*retry_in))]
    AllOpen {
        /// The public model name.
        model: String,
        /// Until the soonest breaker lets a trial through.
        retry_in: std::time::Duration,
    },
    #[error("{error}")]
    /// The last target failed (or refused) for good.
    Backend {
        /// Id of the backend whose error this is.
        backend: String,
        /// Remote or local: a gateway's own words are not passed to clients.
        backend_kind: BackendKind,
        /// Its classified error.
        error: BackendError,
        /// Attempts made in all; more than one means lifeboat already retried.
        attempts: u32,
    },
}

/// A response that has passed the commit point.
pub struct Routed {
    /// Id of the backend that serves it (`x-lifeboat-backend`).
    pub backend: String,
    /// Remote or local.
    pub backend_kind: BackendKind,
    /// The model name that backend served (`model` field of the response).
    pub model: String,
    /// How many attempts were made (`x-lifeboat-attempts`).
    pub attempts: u32,
    /// Why an earlier target did not serve it (`x-lifeboat-fallback-reason`): an error
    /// kind, `breaker_open`, `context_window` or `hedge`.
    pub fallback_reason: Option<&'static str>,
    /// Every event from the first one on, including those held back before the commit point.
    pub events: EventStream,
}

impl std::fmt::Debug for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routed")
            .field("backend", &self.backend)
            .field("backend_kind", &self.backend_kind)
            .field("model", &self.model)
            .field("attempts", &self.attempts)
            .field("fallback_reason", &self.fallback_reason)
            .finish_non_exhaustive()
    }
}

/// One backend's health as `/health` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendHealth {
    /// Backend id.
    pub id: String,
    /// Remote or local.
    pub kind: BackendKind,
    /// `closed`, `open` or `half_open`; the local model has no breaker (`closed`).
    pub breaker: BreakerState,
    /// Why the breaker is where it is.
    pub reason: String,
    /// Share of successful observations per window.
    pub availability: Availability,
    /// Smoothed time to first token.
    pub ttft_ewma: Option<std::time::Duration>,
    /// Smoothed time to a whole answer.
    pub latency_ewma: Option<std::time::Duration>,
    /// The latest observations, newest last.
    pub recent: Vec<HealthEvent>,
}

/// The request router.
#[derive(Debug)]
pub struct Router {
    table: RouteTable,
    backends: HashMap<String, Arc<dyn Backend>>,
    /// One per remote. The local model is the last resort and never cooled down: its
    /// queue is its admission control.
    breakers: HashMap<String, CircuitBreaker>,
    health: HashMap<String, HealthRecord>,
    /// Recent first-token times and gaps per remote, for adaptive deadlines.
    latency: HashMap<String, LatencyWindows>,
    /// Requests seen per route with a canary.
    canary_counters: HashMap<String, std::sync::atomic::AtomicU64>,
    settings: RouterSettings,
}

impl Router {
    /// A router over `table` with `backends`, each remote with a fresh breaker and health record.
    pub fn new(table: RouteTable, backends: Vec<Arc<dyn Backend>>, settings: RouterSettings) -> Router {
        let breakers = backends
            .iter()
            .filter(|b| b.kind() == BackendKind::Remote)
            .map(|b| (b.id().to_string(), CircuitBreaker::new(settings.breaker)))
            .collect();
        let health = backends
            .iter()
            .map(|b| (b.id().to_string(), HealthRecord::new()))
            .collect();
        let latency = backends
            .iter()
            .filter(|b| b.kind() == BackendKind::Remote)
            .map(|b| (b.id().to_string(), LatencyWindows::default()))
            .collect();
        let canary_counters = table
            .public()
            .iter()
            .filter(|r| r.canary.is_some())
            .map(|r| (r.name.clone(), std::sync::atomic::AtomicU64::new(0)))
            .collect();
        let backends = backends.into_iter().map(|b| (b.id().to_string(), b)).collect();
        Router {
            table,
            backends,
            breakers,
            health,
            latency,
            canary_counters,
            settings,
        }
    }

    /// After a reload: take over `previous`'s breaker state and health history for every
    /// backend that is still there under the same id and endpoint, so a SIGHUP (say, to
    /// rotate a key) neither forgets that a gateway is down nor its availability figures.
    /// A remote whose base URL changed starts afresh. A route's canary count carries on
    /// too, so its share stays exact across reloads.
    pub fn carry_state_from(&mut self, previous: &Router) {
        use std::sync::atomic::Ordering;
        for (route, counter) in &self.canary_counters {
            if let Some(old) = previous.canary_counters.get(route) {
                counter.store(old.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        for (id, backend) in &self.backends {
            let Some(old) = previous.backends.get(id) else {
                continue;
            };
            if old.kind() != backend.kind() || old.endpoint() != backend.endpoint() {
                continue;
            }
            if let Some(record) = previous.health.get(id) {
                self.health.insert(id.clone(), record.clone());
            }
            if let Some(latency) = previous.latency.get(id) {
                self.latency.insert(id.clone(), latency.clone());
            }
            if let (Some(breaker), true) = (previous.breakers.get(id), self.breakers.contains_key(id)) {
                self.breakers
                    .insert(id.clone(), breaker.with_config(self.settings.breaker));
            }
        }
    }

    /// Probe every remote in the background every `probe_interval`, and as soon as an
    /// open breaker's cooldown ends. A probe goes through the breaker like a request: it
    /// can open it, and when the cooldown is over it is the trial, so no client request
    /// has to be and a recovered gateway is back within a cooldown. Tasks end when the
    /// router is dropped.
    pub fn spawn_probes(self: &Arc<Self>) {
        let interval = self.settings.probe_interval;
        if interval.is_zero() {
            return;
        }
        for id in self.breakers.keys() {
            let router = Arc::downgrade(self);
            let id = id.clone();
            tokio::spawn(async move {
                loop {
                    let wait = match router.upgrade() {
                        Some(router) => router.next_probe_in(&id, interval),
                        None => return,
                    };
                    tokio::time::sleep(wait).await;
                    let Some(router) = router.upgrade() else { return };
                    crate::tasks::survive("probe", router.probe_once(&id)).await;
                }
            });
        }
    }

    /// When to probe `id` next: after `interval`, or when its open breaker's cooldown ends.
    fn next_probe_in(&self, id: &str, interval: std::time::Duration) -> std::time::Duration {
        self.breakers
            .get(id)
            .and_then(CircuitBreaker::retry_in)
            // A moment past the end of the cooldown, so the probe finds it over.
            .map_or(interval, |cooldown| {
                interval.min(cooldown + std::time::Duration::from_millis(1))
            })
    }

    /// One probe of backend `id`, if its breaker lets it through.
    pub async fn probe_once(&self, id: &str) {
        let (Some(backend), Some(breaker)) = (self.backends.get(id), self.breakers.get(id)) else {
            return;
        };
        let (permit, transition) = breaker.try_acquire();
        self.note(id, transition);
        let Some(permit) = permit else { return };
        let started = tokio::time::Instant::now();
        let outcome = backend.probe().await;
        let record = self.health.get(id);
        match outcome {
            Ok(()) => {
                if let Some(record) = record {
                    record.observe(Source::Probe, "ok", started.elapsed());
                }
                self.note(id, permit.success());
            }
            Err(error) => {
                if let Some(record) = record {
                    record.observe(Source::Probe, error.kind.as_str(), started.elapsed());
                }
                tracing::debug!(backend = id, %error, "probe failed");
                self.note(id, permit.failure(&format!("probe: {}", error.kind.as_str())));
            }
        }
    }

    /// Breaker state of every backend, sorted by id.
    pub fn health(&self) -> Vec<BackendHealth> {
        let mut health: Vec<BackendHealth> = self
            .backends
            .values()
            .map(|b| {
                let (breaker, reason) = self
                    .breakers
                    .get(b.id())
                    .map_or((BreakerState::Closed, b.status().detail), CircuitBreaker::state);
                let record = self.health.get(b.id()).cloned().unwrap_or_default();
                BackendHealth {
                    id: b.id().to_string(),
                    kind: b.kind(),
                    breaker,
                    reason,
                    availability: record.availability(),
                    ttft_ewma: record.ttft_ewma(),
                    latency_ewma: record.latency_ewma(),
                    recent: record.recent(),
                }
            })
            .collect();
        health.sort_by(|a, b| a.id.cmp(&b.id));
        health
    }

    /// Public model names for `/v1/models`.
    pub fn models(&self) -> Vec<ModelInfo> {
        self.table
            .public()
            .iter()
            .map(|route| ModelInfo {
                id: route.name.clone(),
                owned_by: route
                    .targets
                    .first()
                    .map(|t| t.backend.clone())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Whether any backend is configured at all (`/ready`).
    pub fn has_backends(&self) -> bool {
        !self.backends.is_empty()
    }

    /// The route table (`/ready` checks that every route has a usable target).
    pub fn routes(&self) -> &RouteTable {
        &self.table
    }

    /// Ids of the configured backends.
    pub fn backend_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.backends.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Each backend's readiness, by id.
    pub fn backend_statuses(&self) -> Vec<(String, crate::backend::BackendStatus)> {
        let mut statuses: Vec<_> = self
            .backends
            .iter()
            .map(|(id, b)| (id.clone(), b.status()))
            .collect();
        statuses.sort_by(|a, b| a.0.cmp(&b.0));
        statuses
    }

    /// The targets for one request: the route's own, or — for its share of requests —
    /// the canary first with the route's own behind it. The share is kept exactly by
    /// counting (request i goes to the canary when ⌊(i+1)·share⌋ > ⌊i·share⌋), so a 10 %
    /// canary gets every tenth request, not a random tenth.
    fn order<'r>(&self, route: &'r Route) -> Vec<&'r Target> {
        let Some(canary) = &route.canary else {
            return route.targets.iter().collect();
        };
        let counter = self.canary_counters.get(&route.name);
        let i = counter.map_or(0, |c| c.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) as f64;
        if ((i + 1.0) * canary.share).floor() > (i * canary.share).floor() {
            std::iter::once(&canary.target).chain(&route.targets).collect()
        } else {
            route.targets.iter().collect()
        }
    }

    /// The hedge for an attempt on `primary`: only for remotes on routes with `hedge`, to
    /// the route's local target, after the route's delay or the remote's p95 TTFT.
    fn hedge_plan(&self, route: &Route, primary: &dyn Backend) -> Option<hedge::HedgePlan> {
        if !route.hedge || primary.kind() != BackendKind::Remote {
            return None;
        }
        let target = route.local_target()?;
        let local = self.backends.get(&target.backend)?.clone();
        let observed = self.health.get(primary.id()).and_then(HealthRecord::ttft_p95);
        let delay = route.hedge_after.or(observed).unwrap_or(DEFAULT_HEDGE_DELAY);
        Some(hedge::HedgePlan {
            local,
            model: target.model.clone(),
            delay,
        })
    }

    /// The local target that continues a broken stream of `served_by`, if the route
    /// asks for it.
    fn continuation_target(
        &self,
        route: &Route,
        served_by: &dyn Backend,
    ) -> Option<(Arc<dyn Backend>, String)> {
        if !route.continue_locally || served_by.kind() == BackendKind::Local {
            return None;
        }
        let target = route.local_target()?;
        Some((self.backends.get(&target.backend)?.clone(), target.model.clone()))
    }

    /// Log and count a breaker transition.
    fn note(&self, backend: &str, transition: Option<Transition>) {
        report(
            backend,
            transition,
            self.health.get(backend),
            self.settings.alerter.as_ref(),
        );
    }

    /// What watches a committed stream of `backend` serving `model`.
    fn after_commit(&self, backend: &str, model: &str) -> AfterCommit {
        AfterCommit {
            backend: backend.to_string(),
            model: model.to_string(),
            breaker: self.breakers.get(backend).cloned(),
            health: self.health.get(backend).cloned(),
            latency: self.latency.get(backend).cloned(),
            alerter: self.settings.alerter.clone(),
        }
    }
}
