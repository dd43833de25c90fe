//! Reload (what SIGHUP does): routes and keys change for new requests, requests in flight
//! finish under the old rules, a gateway key is rotated from its file, a bad reload
//! changes nothing, and breaker and health state carry over for an unchanged gateway.

use crate::common;

use std::{collections::HashMap, time::Duration};

use common::{chat_body, spawn_app_with};
use futures_util::StreamExt;
use lifeboat::{
    app::{self, AppState},
    config::{Config, RouteConfig},
    mock_upstream::{FaultMode, MockSettings, MockUpstream, mock_text},
};
use serde_json::json;
use tokio::net::TcpListener;

#[tokio::test]
async fn keys_and_routes_change_without_dropping_a_stream() {
    let settings = MockSettings {
        tokens: 10,
        inter_token_delay: Duration::from_millis(30),
        ..MockSettings::default()
    };
    let mock = MockUpstream::start(settings).await.expect("mock");
    let mut env = HashMap::new();
    env.insert("KEY_OLD".to_string(), "old-key".to_string());
    env.insert("KEY_NEW".to_string(), "new-key".to_string());
    let mut config: Config = mock.gateway_config();
    config.server.client_api_key_envs = vec!["KEY_OLD".into()];
    let state = AppState::from_config(&config, &env).expect("state");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(app::run(
        listener,
        app::app(state.clone()),
        std::future::pending(),
        Duration::ZERO,
    ));
    lifeboat::upstream::install_crypto_provider();
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/chat/completions");

    let mut body = chat_body(true);
    body["max_tokens"] = json!(10);
    let in_flight = client
        .post(&url)
        .bearer_auth("old-key")
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(in_flight.status(), 200);
    let mut stream = in_flight.bytes_stream();
    let first = stream.next().await.expect("first chunk").expect("bytes");

    config.server.client_api_key_envs = vec!["KEY_NEW".into()];
    config.routes.push(RouteConfig {
        name: "deepseek-v3".into(),
        remote: "gateway".into(),
        remote_model: Some("deepseek-chat".into()),
        ..RouteConfig::default()
    });
    state.reload(&config, &env).expect("reload");

    let mut text = String::from_utf8_lossy(&first).to_string();
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("the stream survives the reload"),
        ));
    }
    let sse = common::SseBody::parse(&text);
    assert_eq!(sse.content(), mock_text(10));
    assert_eq!(sse.done_count(), 1);

    let old = client
        .post(&url)
        .bearer_auth("old-key")
        .json(&chat_body(false))
        .send()
        .await
        .expect("sent");
    assert_eq!(old.status(), 401, "the rotated-out key is refused");
    let mut aliased = chat_body(false);
    aliased["model"] = json!("deepseek-v3");
    let new = client
        .post(&url)
        .bearer_auth("new-key")
        .json(&aliased)
        .send()
        .await
        .expect("sent");
    assert_eq!(new.status(), 200, "new key and new route");

    config.local.model = Some("/nonexistent".into());
    let err = state.reload(&config, &env).expect_err("model change refused");
    assert!(err.to_string().contains("needs a restart"), "{err}");
    let still = client
        .post(&url)
        .bearer_auth("new-key")
        .json(&aliased)
        .send()
        .await
        .expect("sent");
    assert_eq!(still.status(), 200, "a failed reload changes nothing");
}

#[tokio::test]
async fn a_gateway_key_is_rotated_from_its_file() {
    let dir = tempfile::tempdir().expect("dir");
    let key_file = dir.path().join("gateway.key");
    std::fs::write(&key_file, "sk-one\n").expect("write");
    let settings = MockSettings {
        api_key: Some("sk-one".into()),
        ..MockSettings::default()
    };
    let path = key_file.clone();
    let app = spawn_app_with(
        settings,
        move |config| {
            let gateway = config.remotes.get_mut("gateway").expect("gateway");
            gateway.api_key_file = Some(path);
            config.router.failure_threshold = 100;
            config.router.error_rate_threshold = 2.0;
        },
        HashMap::new(),
    )
    .await;
    assert_eq!(
        app.post_json("/v1/chat/completions", &chat_body(false))
            .await
            .status(),
        200
    );
    // The gateway rotates the key: lifeboat's old one is refused...
    app.mock.update_settings(|s| s.api_key = Some("sk-two".into()));
    let refused = app.post_json("/v1/chat/completions", &chat_body(false)).await;
    assert_eq!(refused.status(), 502);
    // ...until the new key is in the file and lifeboat reloads.
    std::fs::write(&key_file, "sk-two\n").expect("write");
    let mut config = app.mock.gateway_config();
    config.remotes.get_mut("gateway").expect("gateway").api_key_file = Some(key_file.clone());
    app.state
        .reload(&config, &HashMap::<String, String>::new())
        .expect("reload");
    assert_eq!(
        app.post_json("/v1/chat/completions", &chat_body(false))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.mock.last_request().and_then(|r| r.authorization).as_deref(),
        Some("Bearer sk-two")
    );
}

/// A reload (say, to rotate a key) does not forget that a gateway is down: its breaker
/// stays open and its health history stays; a remote moved to another URL starts afresh.
#[tokio::test]
async fn a_reload_keeps_an_open_breaker_and_the_health_history() {
    let tweak = |config: &mut Config| {
        config.router.failure_threshold = 2;
        config.router.max_retries = 0;
        config.router.cooldown = Duration::from_secs(600);
        config.router.max_cooldown = Duration::from_secs(600);
        config.router.probe_interval = Duration::ZERO;
    };
    let app = spawn_app_with(MockSettings::default(), tweak, HashMap::new()).await;
    app.mock.set_fault(FaultMode::Http500).await.expect("fault");
    for _ in 0..2 {
        let failed = app.post_json("/v1/chat/completions", &chat_body(false)).await;
        assert_eq!(failed.status(), 502);
    }
    let gateway_health = || async {
        let health: serde_json::Value = app.get("/health").await.json().await.expect("json");
        health["backends"]["gateway"].clone()
    };
    assert_eq!(gateway_health().await["breaker"], "open");

    // The gateway recovers, the operator reloads: the breaker is still open (no call goes
    // out before its cooldown) and the two failures are still in the record.
    app.mock.set_fault(FaultMode::None).await.expect("fault");
    let mut config = common::test_config(&app.mock);
    tweak(&mut config);
    app.state
        .reload(&config, &HashMap::<String, String>::new())
        .expect("reload");
    let calls_before = app.mock.requests_in(FaultMode::None);
    let skipped = app.post_json("/v1/chat/completions", &chat_body(false)).await;
    assert_eq!(skipped.status(), 503);
    assert_eq!(
        app.mock.requests_in(FaultMode::None),
        calls_before,
        "no call while open"
    );
    let health = gateway_health().await;
    assert_eq!(health["breaker"], "open", "{health}");
    let failures = health["recent"]
        .as_array()
        .expect("recent")
        .iter()
        .filter(|e| e["outcome"] != "ok")
        .count();
    assert_eq!(failures, 2, "{health}");

    // The same name at another URL is another gateway: a fresh breaker.
    let moved = config.remotes.get_mut("gateway").expect("gateway");
    moved.base_url = format!("http://localhost:{}/v1", app.mock.addr().port());
    app.state
        .reload(&config, &HashMap::<String, String>::new())
        .expect("reload");
    assert_eq!(gateway_health().await["breaker"], "closed");
    let served = app.post_json("/v1/chat/completions", &chat_body(false)).await;
    assert_eq!(served.status(), 200);
}

/// A canary's count carries over a reload, so its share stays exact: with a share of one
/// half, the request after a reload goes where the next one would have gone anyway.
#[tokio::test]
async fn a_canary_keeps_its_count_across_a_reload() {
    let canary = MockUpstream::start(MockSettings::default())
        .await
        .expect("canary mock");
    let canary_url = canary.url();
    let with_canary =
        move |config: &mut Config| common::add_canary_route(config, &canary_url, "deepseek-chat", 0.5);
    let app = spawn_app_with(MockSettings::default(), with_canary.clone(), HashMap::new()).await;
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    let backend = |response: reqwest::Response| {
        response.headers()["x-lifeboat-backend"]
            .to_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        backend(app.post_json("/v1/chat/completions", &body).await),
        "gateway"
    );
    let mut config = common::test_config(&app.mock);
    with_canary(&mut config);
    app.state
        .reload(&config, &HashMap::<String, String>::new())
        .expect("reload");
    assert_eq!(
        backend(app.post_json("/v1/chat/completions", &body).await),
        "canary"
    );
    assert_eq!(
        backend(app.post_json("/v1/chat/completions", &body).await),
        "gateway"
    );
}
