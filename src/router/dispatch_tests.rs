//! The router core on paused time with scripted backends: retries, failover, the JSON
//! commit point, whole-stream judgement, in-flight rescue and fallback chains.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use async_trait::async_trait;
use futures_util::StreamExt;

use super::*;
use crate::{
    backend::{ChoiceDelta, FinishReason, GenerationEvent, SamplingParams},
    config::Config,
    router::{RouteTable, RouterSettings, breaker::BreakerState},
};

/// What a scripted backend does with one request.
#[derive(Debug, Clone, Copy)]
enum Act {
    /// "ok" and a finish.
    Answer,
    /// Fail before any output.
    Fail(ErrorKind),
    /// One word, then the stream breaks.
    CutAfterFirst,
    /// Never answer.
    Hang,
}

#[derive(Debug)]
struct Scripted {
    id: &'static str,
    kind: BackendKind,
    script: Mutex<VecDeque<Act>>,
    then: Act,
    calls: AtomicUsize,
}

fn scripted(id: &'static str, kind: BackendKind, script: &[Act], then: Act) -> Arc<Scripted> {
    Arc::new(Scripted {
        id,
        kind,
        script: Mutex::new(script.iter().copied().collect()),
        then,
        calls: AtomicUsize::new(0),
    })
}

fn delta(content: Option<&str>, finish: Option<&str>) -> Result<GenerationEvent, BackendError> {
    Ok(GenerationEvent::Delta(ChoiceDelta {
        content: content.map(str::to_string),
        finish_reason: finish.map(FinishReason::from_wire),
        ..ChoiceDelta::default()
    }))
}

#[async_trait]
impl Backend for Scripted {
    fn id(&self) -> &str {
        self.id
    }
    fn kind(&self) -> BackendKind {
        self.kind
    }
    async fn generate(&self, _: BackendRequest) -> Result<EventStream, BackendError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let act = self
            .script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
            .unwrap_or(self.then);
        match act {
            Act::Answer => Ok(Box::pin(futures_util::stream::iter(vec![
                delta(Some(self.id), None),
                delta(None, Some("stop")),
            ]))),
            Act::Fail(kind) => Err(BackendError::new(kind, "scripted failure")),
            Act::CutAfterFirst => Ok(Box::pin(futures_util::stream::iter(vec![
                delta(Some(self.id), None),
                Err(BackendError::new(ErrorKind::StreamCut, "cut")),
            ]))),
            Act::Hang => Ok(Box::pin(futures_util::stream::pending())),
        }
    }
}

/// Route `chat` over remotes `a`, `b` (a fallback) and the local model.
fn router(backends: Vec<Arc<Scripted>>) -> Router {
    let config = Config::from_toml(
        "[remotes.a]\nbase_url = \"http://a/v1\"\n[remotes.b]\nbase_url = \"http://b/v1\"\n\
         [local]\nmodel = \"m\"\nserved_model_name = \"tiny\"\n\
         [[routes]]\nname = \"chat\"\nremote = \"a\"\nfallbacks = [{ remote = \"b\" }]\n",
        "test",
    )
    .expect("parses");
    let mut settings = RouterSettings::default();
    settings.retry.backoff =
        crate::router::retry::Backoff::try_new(Duration::from_millis(100), Duration::from_secs(1), false)
            .expect("valid");
    let backends = backends.into_iter().map(|b| b as Arc<dyn Backend>).collect();
    Router::new(RouteTable::from_config(&config), backends, settings)
}

fn request(stream: bool) -> GenerationRequest {
    let mut request = GenerationRequest::chat("chat", "hi", SamplingParams::default());
    request.stream = stream;
    request
}

async fn text(routed: Routed) -> Result<String, BackendError> {
    let mut text = String::new();
    let mut events = routed.events;
    while let Some(event) = events.next().await {
        if let GenerationEvent::Delta(d) = event? {
            text.push_str(d.content.as_deref().unwrap_or_default());
        }
    }
    Ok(text)
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_is_retried_on_the_same_remote() {
    let a = scripted(
        "a",
        BackendKind::Remote,
        &[Act::Fail(ErrorKind::ServerError)],
        Act::Answer,
    );
    let local = scripted("local", BackendKind::Local, &[], Act::Answer);
    let router = router(vec![a.clone(), local.clone()]);
    let routed = router.dispatch(request(true)).await.expect("served");
    assert_eq!((routed.backend.as_str(), routed.attempts), ("a", 2));
    assert_eq!(routed.fallback_reason, Some("server_error"));
    assert_eq!(local.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn the_chain_is_tried_in_order_then_the_local_model() {
    let a = scripted(
        "a",
        BackendKind::Remote,
        &[],
        Act::Fail(ErrorKind::PaymentRequired),
    );
    let b = scripted("b", BackendKind::Remote, &[], Act::Fail(ErrorKind::Unauthorized));
    let local = scripted("local", BackendKind::Local, &[], Act::Answer);
    let router = router(vec![a.clone(), b.clone(), local]);
    let routed = router.dispatch(request(false)).await.expect("served");
    assert_eq!((routed.backend.as_str(), routed.attempts), ("local", 3));
    assert_eq!(routed.fallback_reason, Some("unauthorized"));
    assert_eq!(text(routed).await.expect("whole"), "local");

    let b_ok = scripted("b", BackendKind::Remote, &[], Act::Answer);
    let router = router_with(vec![a, b_ok]);
    let routed = router.dispatch(request(false)).await.expect("served");
    assert_eq!(
        routed.backend, "b",
        "the second gateway serves before the local model"
    );
}

fn router_with(remotes: Vec<Arc<Scripted>>) -> Router {
    let mut all = remotes;
    all.push(scripted("local", BackendKind::Local, &[], Act::Answer));
    router(all)
}

#[tokio::test(start_paused = true)]
async fn a_client_mistake_is_answered_not_failed_over() {
    let a = scripted("a", BackendKind::Remote, &[], Act::Fail(ErrorKind::BadRequest));
    let router = router_with(vec![a]);
    let Err(RouteError::Backend {
        backend,
        error,
        attempts,
        ..
    }) = router.dispatch(request(true)).await
    else {
        panic!("a 400 reaches the client")
    };
    assert_eq!(
        (backend.as_str(), error.kind, attempts),
        ("a", ErrorKind::BadRequest, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_json_answer_cut_after_its_first_token_is_restarted_invisibly() {
    let a = scripted("a", BackendKind::Remote, &[], Act::CutAfterFirst);
    let b = scripted("b", BackendKind::Remote, &[], Act::CutAfterFirst);
    let router = router_with(vec![a, b]);
    let routed = router.dispatch(request(false)).await.expect("served");
    assert_eq!(routed.backend, "local");
    assert_eq!(text(routed).await.expect("no error"), "local");

    // A streaming client has seen the first word: its stream ends with the error.
    let routed = router.dispatch(request(true)).await.expect("committed");
    assert_eq!(routed.backend, "a");
    assert!(text(routed).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn cuts_after_the_first_token_open_the_breaker() {
    let a = scripted("a", BackendKind::Remote, &[], Act::CutAfterFirst);
    let b = scripted("b", BackendKind::Remote, &[], Act::Answer);
    let router = router_with(vec![a.clone(), b]);
    for _ in 0..3 {
        let routed = router.dispatch(request(true)).await.expect("committed");
        let _ = text(routed).await;
    }
    let health = router.health();
    let a_health = health.iter().find(|h| h.id == "a").expect("a");
    assert_eq!(a_health.breaker, BreakerState::Open, "{}", a_health.reason);
    let calls = a.calls.load(Ordering::SeqCst);
    let routed = router.dispatch(request(true)).await.expect("served");
    assert_eq!(routed.backend, "b");
    assert_eq!(routed.fallback_reason, Some("breaker_open"));
    assert_eq!(
        a.calls.load(Ordering::SeqCst),
        calls,
        "no call to an open breaker"
    );
}

#[tokio::test(start_paused = true)]
async fn requests_waiting_on_a_remote_are_rescued_when_its_breaker_trips() {
    let a = scripted("a", BackendKind::Remote, &[], Act::Hang);
    let b = scripted("b", BackendKind::Remote, &[], Act::Answer);
    let router = Arc::new(router_with(vec![a, b]));
    let waiting: Vec<_> = (0..4)
        .map(|i| {
            let router = router.clone();
            tokio::spawn(async move { router.dispatch(request(i % 2 == 0)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(waiting.iter().all(|w| !w.is_finished()), "the remote hangs");
    let breaker = router.breakers.get("a").expect("breaker");
    for _ in 0..3 {
        router.note("a", breaker.record_failure("elsewhere"));
    }
    let started = Instant::now();
    for task in waiting {
        let routed = task.await.expect("task").expect("served");
        assert_eq!(routed.backend, "b");
    }
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "rescued at once, not at a deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn an_answer_with_nothing_in_it_fails_over() {
    #[derive(Debug)]
    struct Empty;
    #[async_trait]
    impl Backend for Empty {
        fn id(&self) -> &str {
            "a"
        }
        fn kind(&self) -> BackendKind {
            BackendKind::Remote
        }
        async fn generate(&self, _: BackendRequest) -> Result<EventStream, BackendError> {
            Ok(Box::pin(futures_util::stream::empty()))
        }
    }
    let b = scripted("b", BackendKind::Remote, &[], Act::Answer);
    let local = scripted("local", BackendKind::Local, &[], Act::Answer);
    let config_router = router(vec![b, local]);
    let mut backends: Vec<Arc<dyn Backend>> = config_router.backends.values().cloned().collect();
    backends.push(Arc::new(Empty));
    let router = Router::new(config_router.table.clone(), backends, RouterSettings::default());
    let routed = router.dispatch(request(false)).await.expect("served");
    assert_eq!(routed.backend, "b");
    assert_eq!(routed.fallback_reason, Some("empty"));
}
