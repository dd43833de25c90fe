//! Every endpoint over a real socket, in front of the mock upstream.

use crate::common;

use std::collections::HashMap;

use common::{chat_body, read_sse, spawn_app, spawn_app_with};
use lifeboat::{
    config::RouteConfig,
    mock_upstream::{MockSettings, mock_text},
};
use serde_json::{Value, json};

#[tokio::test]
async fn chat_completion_non_streaming() {
    let app = spawn_app().await;
    let response = app.post_json("/v1/chat/completions", &chat_body(false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-lifeboat-backend"], "gateway");
    assert_eq!(response.headers()["x-lifeboat-attempts"], "1");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().expect("id").starts_with("chatcmpl-"));
    assert_eq!(body["model"], "deepseek-chat");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], mock_text(8));
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 8);
    assert_eq!(body["usage"]["prompt_tokens"], 2);
    assert_eq!(body["usage"]["total_tokens"], 10);
}

#[tokio::test]
async fn upstream_gets_the_body_verbatim_with_model_renamed_usage_forced_and_key_injected() {
    let mut env = HashMap::new();
    env.insert("GW_KEY".to_string(), "sk-gateway-secret".to_string());
    let settings = MockSettings {
        models: vec!["deepseek-chat".into()],
        api_key: Some("sk-gateway-secret".into()),
        ..MockSettings::default()
    };
    let app = spawn_app_with(
        settings,
        |config| {
            let gateway = config.remotes.get_mut("gateway").expect("gateway");
            gateway.api_key_env = Some("GW_KEY".into());
            gateway.models.clear();
            config.routes.push(RouteConfig {
                name: "deepseek-v3".into(),
                aliases: vec!["deepseek/deepseek-v3".into()],
                remote: "gateway".into(),
                remote_model: Some("deepseek-chat".into()),
                ..RouteConfig::default()
            });
        },
        env,
    )
    .await;
    let request = json!({
        "model": "deepseek/deepseek-v3",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        "stream": false,
        "temperature": 0.3,
        "seed": 7,
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "stop": ["\n\n"],
        "logprobs": false,
        "user": "alice",
        "thinking": {"type": "enabled", "budget": 12},
        "x_vendor_extension": [1, 2, 3]
    });
    let response = app.post_json("/v1/chat/completions", &request).await;
    assert_eq!(
        response.status(),
        200,
        "{}",
        response.text().await.unwrap_or_default()
    );
    let seen = app.mock.last_request().expect("mock saw the request");
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.authorization.as_deref(), Some("Bearer sk-gateway-secret"));
    assert_eq!(seen.body["model"], "deepseek-chat", "route renames the model");
    assert_eq!(
        seen.body["stream"], true,
        "lifeboat always streams from the gateway"
    );
    assert_eq!(seen.body["stream_options"]["include_usage"], true);
    for field in [
        "messages",
        "temperature",
        "seed",
        "tools",
        "tool_choice",
        "response_format",
        "stop",
        "user",
        "thinking",
        "x_vendor_extension",
    ] {
        assert_eq!(seen.body[field], request[field], "{field} forwarded verbatim");
    }
}

#[tokio::test]
async fn legacy_completions_json_and_stream() {
    let app = spawn_app().await;
    let body = json!({"model": "deepseek-chat", "prompt": "Once upon a time", "max_tokens": 4});
    let response = app.post_json("/v1/completions", &body).await;
    assert_eq!(response.status(), 200);
    let json: Value = response.json().await.expect("json");
    assert_eq!(json["object"], "text_completion");
    assert!(json["id"].as_str().expect("id").starts_with("cmpl-"));
    assert_eq!(json["choices"][0]["text"], mock_text(4));
    assert_eq!(json["usage"]["prompt_tokens"], 4);
    assert_eq!(app.mock.last_request().expect("seen").path, "/v1/completions");

    let mut body = body;
    body["stream"] = json!(true);
    let sse = read_sse(app.post_json("/v1/completions", &body).await).await;
    assert_eq!(sse.done_count(), 1);
    let chunks = sse.json();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, mock_text(4));
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(
        chunks.last().expect("chunk")["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test]
async fn models_list_and_get() {
    let app = spawn_app_with(
        MockSettings::default(),
        |config| {
            config.routes.push(RouteConfig {
                name: "deepseek/deepseek-v3".into(),
                aliases: vec!["ds-v3".into()],
                remote: "gateway".into(),
                remote_model: Some("deepseek-chat".into()),
                ..RouteConfig::default()
            });
        },
        HashMap::new(),
    )
    .await;
    let list: Value = app.get("/v1/models").await.json().await.expect("json");
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec!["deepseek-chat", "deepseek/deepseek-v3"],
        "aliases are not listed"
    );
    assert_eq!(list["data"][0]["object"], "model");
    assert_eq!(list["data"][0]["owned_by"], "gateway");

    let one = app.get("/v1/models/deepseek/deepseek-v3").await;
    assert_eq!(one.status(), 200);
    let one: Value = one.json().await.expect("json");
    assert_eq!(one["id"], "deepseek/deepseek-v3");

    let missing = app.get("/v1/models/gpt-5").await;
    assert_eq!(missing.status(), 404);
    let missing: Value = missing.json().await.expect("json");
    assert_eq!(missing["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let app = spawn_app().await;
    let health = app.get("/health").await;
    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<Value>().await.expect("json")["status"], "ok");
    let ready = app.get("/ready").await;
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<Value>().await.expect("json")["backends"],
        json!(["gateway"])
    );

    assert_eq!(
        app.post_json("/v1/chat/completions", &chat_body(false))
            .await
            .status(),
        200
    );
    let health: Value = app.get("/health").await.json().await.expect("json");
    let gateway = &health["backends"]["gateway"];
    assert!(
        gateway["ttft_ewma_ms"].is_number() && gateway["latency_ewma_ms"].is_number(),
        "{health}"
    );
    assert_eq!(gateway["availability"]["1m"], 1.0);
    let metrics = app.get("/metrics").await;
    assert_eq!(metrics.status(), 200);
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    let text = metrics.text().await.expect("text");
    for name in [
        "lifeboat_requests_total",
        "lifeboat_request_duration_seconds_bucket",
        "lifeboat_time_to_first_token_seconds_bucket",
        "lifeboat_attempts_total",
        "lifeboat_tokens_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert!(
        text.contains(r#"lifeboat_requests_total{endpoint="chat",backend="gateway",status="200"}"#),
        "{text}"
    );
}

#[tokio::test]
async fn ready_is_503_without_backends() {
    let app = spawn_app_with(
        MockSettings::default(),
        |config| config.remotes.clear(),
        HashMap::new(),
    )
    .await;
    let ready = app.get("/ready").await;
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["status"], "no_backend");
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("--remote-url")
    );
    let models: Value = app.get("/v1/models").await.json().await.expect("json");
    assert_eq!(models["data"], json!([]));
}
