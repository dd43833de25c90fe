//! Ordered fallback chains over real sockets: a route on gateway A with gateway B as its
//! fallback and the tiny local model last. Each fails in turn and the next one answers;
//! the headers say who served and why; a gateway whose context window cannot hold the
//! request is skipped without a call.

use crate::common;

use std::{collections::HashMap, sync::Arc};

use common::{TestApp, spawn_app_with};
use lifeboat::{
    config::{FallbackConfig, RemoteConfig, RouteConfig},
    engine::{Arch, testing::tiny::make_tiny},
    mock_upstream::{FaultMode, MockSettings, MockUpstream},
};
use serde_json::{Value, json};

struct Chain {
    app: TestApp,
    b: Arc<MockUpstream>,
    _model: tempfile::TempDir,
}

/// Route `chat`: the test app's `gateway` (A, its own mock), then `gw-b`, then local.
async fn chain(b_context_window: Option<u32>, a_context_window: Option<u32>) -> Chain {
    let b = Arc::new(
        MockUpstream::start(MockSettings::default())
            .await
            .expect("mock b"),
    );
    let model = tempfile::tempdir().expect("temp dir");
    make_tiny(Arch::Qwen2, model.path(), 7).expect("tiny model");
    let (path, b_url) = (model.path().to_path_buf(), b.url());
    let app = spawn_app_with(
        MockSettings::default(),
        move |config| {
            if let Some(a) = config.remotes.get_mut("gateway") {
                a.context_window = a_context_window;
            }
            config.remotes.insert(
                "gw-b".into(),
                RemoteConfig {
                    base_url: b_url,
                    context_window: b_context_window,
                    ..RemoteConfig::default()
                },
            );
            config.routes.push(RouteConfig {
                name: "chat".into(),
                remote: "gateway".into(),
                remote_model: Some("deepseek-chat".into()),
                fallbacks: vec![FallbackConfig {
                    remote: "gw-b".into(),
                    remote_model: None,
                }],
                ..RouteConfig::default()
            });
            config.local.model = Some(path);
            config.local.served_model_name = Some("tiny".into());
        },
        HashMap::new(),
    )
    .await;
    common::wait_until_ready(&app).await;
    Chain {
        app,
        b,
        _model: model,
    }
}

/// (backend, fallback reason) of one JSON request for `chat` with `content`.
async fn served(app: &TestApp, content: &str) -> (String, String) {
    let body = json!({
        "model": "chat",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0,
    });
    let response = app.post_json("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let header = |name: &str| response.headers()[name].to_str().expect("header").to_string();
    let who = (header("x-lifeboat-backend"), header("x-lifeboat-fallback-reason"));
    let answer: Value = response.json().await.expect("json");
    assert!(answer["choices"][0]["finish_reason"].is_string(), "{answer}");
    who
}

#[tokio::test]
async fn each_target_fails_in_turn_and_the_next_one_answers() {
    let Chain { app, b, _model } = chain(None, None).await;
    assert_eq!(served(&app, "hi").await, ("gateway".into(), "none".into()));

    app.mock.set_fault(FaultMode::Http402).await.expect("fault a");
    assert_eq!(
        served(&app, "hi").await,
        ("gw-b".into(), "payment_required".into())
    );
    assert_eq!(b.total_requests(), 1, "the second gateway was called once");

    b.set_fault(FaultMode::Http503).await.expect("fault b");
    let (backend, reason) = served(&app, "hi").await;
    assert_eq!(backend, "local");
    assert!(reason == "server_error" || reason == "breaker_open", "{reason}");

    // A client mistake is not passed down the chain.
    app.mock.set_fault(FaultMode::None).await.expect("recover a");
    let bad = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000});
    let response = app.post_json("/v1/chat/completions", &bad).await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-lifeboat-backend"], "gateway");
}

#[tokio::test]
async fn a_gateway_whose_context_window_cannot_hold_the_request_is_skipped() {
    let Chain { app, b, _model } = chain(Some(1_000_000), Some(64)).await;
    let long = "word ".repeat(100);
    assert_eq!(
        served(&app, &long).await,
        ("gw-b".into(), "context_window".into())
    );
    assert_eq!(
        app.mock.total_requests(),
        0,
        "no call to the gateway that cannot fit it"
    );
    assert_eq!(b.total_requests(), 1);
    assert_eq!(
        served(&app, "hi").await.0,
        "gateway",
        "a short request still fits"
    );
}
