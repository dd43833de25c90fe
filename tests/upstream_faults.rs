//! Every fault mode of the mock upstream is classified into the right `BackendError`
//! kind by the remote backend, and into the right HTTP answer by the API.

use crate::common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::{chat_body, spawn_app_with};
use futures_util::StreamExt;
use lifeboat::{
    backend::{
        Backend, BackendError, BackendRequest, ErrorKind, GenerationEvent, GenerationRequest, SamplingParams,
        TimeoutPhase,
    },
    config::{RemoteConfig, Secret},
    mock_upstream::{FaultMode, MockSettings, MockUpstream},
    upstream::RemoteBackend,
};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_millis(300);

fn request(model: &str, max_tokens: u32) -> BackendRequest {
    let sampling = SamplingParams {
        max_tokens: Some(max_tokens),
        ..SamplingParams::default()
    };
    BackendRequest::new(model, Arc::new(GenerationRequest::chat(model, "hello", sampling)))
}

fn backend_for(url: String, tweak: impl FnOnce(&mut RemoteConfig)) -> RemoteBackend {
    let mut config = RemoteConfig {
        base_url: url,
        first_token_timeout: DEADLINE,
        idle_timeout: DEADLINE,
        ..RemoteConfig::default()
    };
    tweak(&mut config);
    RemoteBackend::new("gateway", &config, Some(Secret::new("sk-test"))).expect("backend builds")
}

/// Run one attempt to the end: the events before the failure and the failure, if any.
async fn attempt(
    backend: &RemoteBackend,
    request: BackendRequest,
) -> (Vec<GenerationEvent>, Option<BackendError>) {
    let mut events = match backend.generate(request).await {
        Ok(events) => events,
        Err(error) => return (Vec::new(), Some(error)),
    };
    let mut seen = Vec::new();
    while let Some(item) = events.next().await {
        match item {
            Ok(event) => seen.push(event),
            Err(error) => return (seen, Some(error)),
        }
    }
    (seen, None)
}

fn output_count(events: &[GenerationEvent]) -> usize {
    events
        .iter()
        .filter(
            |e| matches!(e, GenerationEvent::Delta(d) if d.content.as_deref().is_some_and(|c| !c.is_empty())),
        )
        .count()
}

#[tokio::test]
async fn every_fault_mode_is_classified() {
    let settings = MockSettings {
        retry_after: Duration::from_secs(2),
        cut_after: 2,
        slow_first_token: Duration::from_millis(900),
        keepalive_interval: Duration::from_millis(50),
        ..MockSettings::default()
    };
    let mock = MockUpstream::start(settings).await.expect("mock");
    let backend = backend_for(mock.url(), |_| {});
    let cases: &[(FaultMode, ErrorKind, Option<u16>)] = &[
        (FaultMode::Refuse, ErrorKind::Connect, None),
        (FaultMode::Http500, ErrorKind::ServerError, Some(500)),
        (FaultMode::Http503, ErrorKind::ServerError, Some(503)),
        (FaultMode::Http429, ErrorKind::RateLimited, Some(429)),
        (FaultMode::Http402, ErrorKind::PaymentRequired, Some(402)),
        (FaultMode::Http401, ErrorKind::Unauthorized, Some(401)),
        (
            FaultMode::Hang,
            ErrorKind::Timeout(TimeoutPhase::FirstToken),
            None,
        ),
        (
            FaultMode::Keepalive,
            ErrorKind::Timeout(TimeoutPhase::FirstToken),
            None,
        ),
        (FaultMode::MidstreamCut, ErrorKind::StreamCut, None),
        (FaultMode::Malformed, ErrorKind::MalformedFrame, None),
        (
            FaultMode::Slow,
            ErrorKind::Timeout(TimeoutPhase::FirstToken),
            None,
        ),
    ];
    for &(mode, kind, status) in cases {
        mock.set_fault(mode).await.expect("switch fault");
        let (events, error) = attempt(&backend, request("deepseek-chat", 8)).await;
        let error = error.unwrap_or_else(|| panic!("{mode}: expected {kind:?}, got success"));
        assert_eq!(error.kind, kind, "{mode}: {error}");
        assert_eq!(error.status, status, "{mode}");
        if mode == FaultMode::Http429 {
            assert_eq!(error.retry_after, Some(Duration::from_secs(2)));
        }
        if mode == FaultMode::MidstreamCut {
            assert_eq!(output_count(&events), 2, "two chunks arrived before the cut");
        }
        assert!(!error.message.contains("sk-test"), "{mode}: key leaked: {error}");
        let expected_calls = u64::from(mode != FaultMode::Refuse);
        assert_eq!(
            mock.requests_in(mode),
            expected_calls,
            "{mode}: one upstream call, none when refused"
        );
    }
    mock.set_fault(FaultMode::None).await.expect("recover");
    let (events, error) = attempt(&backend, request("deepseek-chat", 8)).await;
    assert!(error.is_none(), "recovered after refuse: {error:?}");
    assert_eq!(output_count(&events), 8);
}

#[tokio::test]
async fn slow_within_the_deadline_succeeds() {
    let settings = MockSettings {
        slow_first_token: Duration::from_millis(150),
        keepalive_interval: Duration::from_millis(30),
        ..MockSettings::default()
    };
    let mock = MockUpstream::start(settings).await.expect("mock");
    mock.set_fault(FaultMode::Slow).await.expect("fault");
    let (events, error) = attempt(&backend_for(mock.url(), |_| {}), request("deepseek-chat", 4)).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(output_count(&events), 4);
}

#[tokio::test]
async fn idle_and_total_deadlines() {
    let settings = MockSettings {
        inter_token_delay: Duration::from_millis(500),
        ..MockSettings::default()
    };
    let mock = MockUpstream::start(settings).await.expect("mock");
    let (events, error) = attempt(&backend_for(mock.url(), |_| {}), request("deepseek-chat", 8)).await;
    assert_eq!(
        error.map(|e| e.kind),
        Some(ErrorKind::Timeout(TimeoutPhase::Idle))
    );
    assert_eq!(
        output_count(&events),
        1,
        "the first token came, the second was too late"
    );

    mock.update_settings(|s| s.inter_token_delay = Duration::from_millis(100));
    let backend = backend_for(mock.url(), |c| c.total_timeout = Duration::from_millis(350));
    let (_, error) = attempt(&backend, request("deepseek-chat", 8)).await;
    assert_eq!(
        error.map(|e| e.kind),
        Some(ErrorKind::Timeout(TimeoutPhase::Total))
    );
}

#[tokio::test]
async fn gateway_404_and_400_and_nothing_listening() {
    let mock = MockUpstream::start(MockSettings::default()).await.expect("mock");
    let backend = backend_for(mock.url(), |_| {});
    let (_, error) = attempt(&backend, request("deepseek-unknown", 8)).await;
    let error = error.expect("404");
    assert_eq!((error.kind, error.status), (ErrorKind::NotFound, Some(404)));

    let (_, error) = attempt(&backend, request("deepseek-chat", 100_000)).await;
    let error = error.expect("400");
    assert_eq!(error.kind, ErrorKind::BadRequest);
    assert_eq!(error.param.as_deref(), Some("max_tokens"));
    assert!(error.message.contains("valid range"), "{error}");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = listener.local_addr().expect("addr");
    drop(listener);
    let (_, error) = attempt(
        &backend_for(format!("http://{dead}/v1"), |_| {}),
        request("deepseek-chat", 8),
    )
    .await;
    assert_eq!(error.map(|e| e.kind), Some(ErrorKind::Connect));
}

/// The same faults through the API: status, OpenAI error code, one upstream call each.
#[tokio::test]
async fn faults_become_openai_errors_at_the_api() {
    let settings = MockSettings {
        retry_after: Duration::from_secs(3),
        cut_after: 0,
        keepalive_interval: Duration::from_millis(50),
        ..MockSettings::default()
    };
    let app = spawn_app_with(
        settings,
        |config| {
            let gateway = config.remotes.get_mut("gateway").expect("gateway");
            gateway.first_token_timeout = DEADLINE;
            gateway.idle_timeout = DEADLINE;
            // This test is about classification; breaker and retries have their own tests.
            config.router.failure_threshold = u32::MAX;
            config.router.error_rate_threshold = 2.0;
            config.router.max_retries = 0;
        },
        HashMap::new(),
    )
    .await;
    let cases: &[(FaultMode, u16, &str)] = &[
        (FaultMode::Refuse, 502, "upstream_unreachable"),
        (FaultMode::Http500, 502, "upstream_error"),
        (FaultMode::Http503, 502, "upstream_error"),
        (FaultMode::Http429, 429, "rate_limit_exceeded"),
        (FaultMode::Http402, 502, "upstream_out_of_credit"),
        (FaultMode::Http401, 502, "upstream_auth_failed"),
        (FaultMode::Hang, 504, "upstream_timeout"),
        (FaultMode::Keepalive, 504, "upstream_timeout"),
        (FaultMode::MidstreamCut, 502, "upstream_stream_cut"),
        (FaultMode::Malformed, 502, "upstream_malformed_response"),
    ];
    for &(mode, status, code) in cases {
        app.mock.set_fault(mode).await.expect("fault");
        for stream in [false, true] {
            let response = app.post_json("/v1/chat/completions", &chat_body(stream)).await;
            assert_eq!(response.status().as_u16(), status, "{mode} stream={stream}");
            assert_eq!(response.headers()["x-lifeboat-backend"], "gateway");
            if mode == FaultMode::Http429 {
                assert_eq!(response.headers()["retry-after"], "3");
            }
            let body: Value = response.json().await.expect("json error");
            assert_eq!(body["error"]["code"], code, "{mode} stream={stream}: {body}");
        }
        let expected = if mode == FaultMode::Refuse { 0 } else { 2 };
        assert_eq!(
            app.mock.requests_in(mode),
            expected,
            "{mode}: no retries in front of one gateway"
        );
    }
    app.mock.set_fault(FaultMode::None).await.expect("recover");
    assert_eq!(
        app.post_json("/v1/chat/completions", &chat_body(false))
            .await
            .status(),
        200
    );

    let mut body = chat_body(false);
    body["max_tokens"] = json!(100_000);
    let response = app.post_json("/v1/chat/completions", &body).await;
    assert_eq!(
        response.status(),
        400,
        "the client's own mistake keeps its status"
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["param"], "max_tokens");
    assert_eq!(body["error"]["code"], "invalid_value");
}

/// Without a fallback, an open breaker answers at once: 503 with `Retry-After`, and no
/// call reaches the gateway until the cooldown is over.
#[tokio::test]
async fn open_breaker_without_fallback_fails_fast() {
    let app = spawn_app_with(
        MockSettings::default(),
        |config| {
            config.router.failure_threshold = 2;
            config.router.max_retries = 0;
            config.router.cooldown = Duration::from_secs(30);
            config.router.max_cooldown = Duration::from_secs(30);
        },
        HashMap::new(),
    )
    .await;
    app.mock.set_fault(FaultMode::Http503).await.expect("fault");
    for _ in 0..2 {
        assert_eq!(
            app.post_json("/v1/chat/completions", &chat_body(false))
                .await
                .status(),
            502
        );
    }
    let response = app.post_json("/v1/chat/completions", &chat_body(false)).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "30");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "all_backends_failing");
    assert_eq!(
        app.mock.requests_in(FaultMode::Http503),
        2,
        "the open breaker made no call"
    );
    let health: Value = app.get("/health").await.json().await.expect("json");
    assert_eq!(health["backends"]["gateway"]["breaker"], "open");
    assert!(
        health["backends"]["gateway"]["reason"]
            .as_str()
            .expect("reason")
            .contains("server_error"),
        "{health}"
    );
}
