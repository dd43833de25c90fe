//! Hedging (opt-in per route): if the remote has not produced its first token after a
//! delay and the local model has a free slot, start the local attempt too. The first
//! token wins; the loser's stream is dropped, which cancels it (the remote request is
//! aborted, the local engine stops at its next step).

use std::{sync::Arc, time::Duration};

use super::stream::commit;
use crate::{
    backend::{Backend, BackendError, BackendRequest, EventStream},
    metrics,
};

/// The local side of a hedge.
#[derive(Debug, Clone)]
pub(super) struct HedgePlan {
    pub local: Arc<dyn Backend>,
    pub model: String,
    pub delay: Duration,
}

/// How a (possibly hedged) attempt ended.
pub(super) enum Outcome {
    /// The primary answered first, or failed and no hedge won.
    Primary(Result<EventStream, BackendError>),
    /// The local hedge produced the first token.
    HedgeWon(HedgeWin),
}

/// What a local hedge that answered first brings back.
pub(super) struct HedgeWin {
    /// The local backend's id.
    pub backend: String,
    /// The model it served.
    pub model: String,
    pub events: EventStream,
    /// Set when the primary had already failed by then (it is accounted as a failure).
    pub primary_error: Option<BackendError>,
}

async fn start(backend: &dyn Backend, request: BackendRequest) -> Result<EventStream, BackendError> {
    match backend.generate(request).await {
        Ok(events) => commit(events).await,
        Err(error) => Err(error),
    }
}

/// Run `primary` with `request`, hedged by `plan` if given.
pub(super) async fn attempt(
    primary: &dyn Backend,
    request: BackendRequest,
    plan: Option<HedgePlan>,
) -> Outcome {
    let hedge_request = BackendRequest::new(
        plan.as_ref().map(|p| p.model.clone()).unwrap_or_default(),
        request.request.clone(),
    );
    let first = start(primary, request);
    let Some(plan) = plan else {
        return Outcome::Primary(first.await);
    };
    tokio::pin!(first);
    tokio::select! {
        result = &mut first => return Outcome::Primary(result),
        () = tokio::time::sleep(plan.delay) => {}
    }
    if !plan.local.has_capacity() {
        return Outcome::Primary(first.await);
    }
    tracing::debug!(primary = primary.id(), delay = ?plan.delay, "no first token yet: hedging locally");
    metrics::attempt_started(plan.local.id(), plan.local.kind());
    let second = start(plan.local.as_ref(), hedge_request);
    tokio::pin!(second);
    tokio::select! {
        result = &mut first => match result {
            Ok(events) => {
                metrics::hedge("primary_won");
                Outcome::Primary(Ok(events))
            }
            // The primary failed while the hedge runs: the hedge is the answer now.
            Err(error) => match second.await {
                Ok(events) => {
                    metrics::hedge("hedge_won");
                    Outcome::HedgeWon(won(&plan, events, Some(error)))
                }
                Err(_) => Outcome::Primary(Err(error)),
            },
        },
        result = &mut second => match result {
            Ok(events) => {
                metrics::hedge("hedge_won");
                Outcome::HedgeWon(won(&plan, events, None))
            }
            Err(error) => {
                tracing::debug!(%error, "hedge failed; waiting for the primary");
                metrics::hedge("hedge_failed");
                Outcome::Primary(first.await)
            }
        },
    }
}

fn won(plan: &HedgePlan, events: EventStream, primary_error: Option<BackendError>) -> HedgeWin {
    HedgeWin {
        backend: plan.local.id().to_string(),
        model: plan.model.clone(),
        events,
        primary_error,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use tokio::time::Instant;

    use super::*;
    use crate::backend::{
        BackendKind, ChoiceDelta, ErrorKind, GenerationEvent, GenerationRequest, SamplingParams,
    };

    /// A backend whose first token (or failure) comes after `delay`.
    #[derive(Debug)]
    struct Fake {
        kind: BackendKind,
        delay: Duration,
        fail: bool,
        started: AtomicUsize,
    }

    fn fake(kind: BackendKind, millis: u64, fail: bool) -> Arc<Fake> {
        Arc::new(Fake {
            kind,
            delay: Duration::from_millis(millis),
            fail,
            started: AtomicUsize::new(0),
        })
    }

    #[async_trait]
    impl Backend for Fake {
        fn id(&self) -> &str {
            self.kind.as_str()
        }
        fn kind(&self) -> BackendKind {
            self.kind
        }
        async fn generate(&self, _: BackendRequest) -> Result<EventStream, BackendError> {
            self.started.fetch_add(1, Ordering::SeqCst);
            let (delay, fail, origin) = (self.delay, self.fail, self.kind);
            Ok(Box::pin(futures_util::stream::once(async move {
                tokio::time::sleep(delay).await;
                if fail {
                    Err(BackendError::new(ErrorKind::ServerError, "boom"))
                } else {
                    Ok(GenerationEvent::Delta(ChoiceDelta {
                        content: Some(origin.as_str().to_string()),
                        ..ChoiceDelta::default()
                    }))
                }
            })))
        }
    }

    fn request() -> BackendRequest {
        BackendRequest::new(
            "m",
            Arc::new(GenerationRequest::chat("m", "hi", SamplingParams::default())),
        )
    }

    fn plan(local: &Arc<Fake>) -> Option<HedgePlan> {
        Some(HedgePlan {
            local: local.clone(),
            model: "local".into(),
            delay: Duration::from_millis(100),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_primary_never_starts_the_hedge() {
        let (remote, local) = (
            fake(BackendKind::Remote, 50, false),
            fake(BackendKind::Local, 10, false),
        );
        let outcome = attempt(remote.as_ref(), request(), plan(&local)).await;
        assert!(matches!(outcome, Outcome::Primary(Ok(_))));
        assert_eq!(local.started.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_primary_loses_to_the_hedge() {
        let (remote, local) = (
            fake(BackendKind::Remote, 1000, false),
            fake(BackendKind::Local, 10, false),
        );
        let started = Instant::now();
        let outcome = attempt(remote.as_ref(), request(), plan(&local)).await;
        assert!(matches!(
            outcome,
            Outcome::HedgeWon(HedgeWin {
                primary_error: None,
                ..
            })
        ));
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(110),
            "delay + the hedge's first token"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_primary_failing_during_the_hedge_is_accounted() {
        let (remote, local) = (
            fake(BackendKind::Remote, 200, true),
            fake(BackendKind::Local, 500, false),
        );
        let outcome = attempt(remote.as_ref(), request(), plan(&local)).await;
        let Outcome::HedgeWon(HedgeWin { primary_error, .. }) = outcome else {
            panic!("the hedge should answer")
        };
        assert_eq!(primary_error.map(|e| e.kind), Some(ErrorKind::ServerError));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_hedge_leaves_the_primary_to_answer() {
        let (remote, local) = (
            fake(BackendKind::Remote, 1000, false),
            fake(BackendKind::Local, 10, true),
        );
        let started = Instant::now();
        let outcome = attempt(remote.as_ref(), request(), plan(&local)).await;
        assert!(matches!(outcome, Outcome::Primary(Ok(_))));
        assert_eq!(started.elapsed(), Duration::from_millis(1000));
    }
}
