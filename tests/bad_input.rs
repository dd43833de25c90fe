//! Every malformed request gets a precise OpenAI error, never a panic or a dropped
//! connection; client authentication.

use crate::common;

use std::collections::HashMap;

use common::{chat_body, spawn_app, spawn_app_with};
use lifeboat::mock_upstream::MockSettings;
use serde_json::{Value, json};

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("error bodies are JSON");
    let error = body
        .get("error")
        .cloned()
        .unwrap_or_else(|| panic!("no error object: {body}"));
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "error.{key} missing: {error}");
    }
    (status, error)
}

#[tokio::test]
async fn invalid_json_is_400() {
    let app = spawn_app().await;
    for body in [
        "{",
        "not json",
        "",
        "[1,2]",
        "\"text\"",
        "{\"model\": \"deepseek-chat\",}",
    ] {
        let (status, error) = error_of(app.post_raw("/v1/chat/completions", body).await).await;
        assert_eq!(status, 400, "body {body:?}");
        assert_eq!(error["type"], "invalid_request_error");
    }
    let (status, _) = error_of(app.post_raw("/v1/chat/completions", vec![0xff, 0xfe, 0x00]).await).await;
    assert_eq!(status, 400, "non-UTF-8 bytes");
    let deep = "[".repeat(10_000);
    let (status, _) = error_of(app.post_raw("/v1/chat/completions", deep).await).await;
    assert_eq!(
        status, 400,
        "deep nesting hits the parser's recursion limit, not the stack"
    );
    assert_eq!(
        app.mock.total_requests(),
        0,
        "nothing invalid reaches the gateway"
    );
}

#[tokio::test]
async fn missing_empty_and_mistyped_fields_name_the_param() {
    let app = spawn_app().await;
    let cases = [
        (json!({"model": "deepseek-chat"}), "messages"),
        (json!({"model": "deepseek-chat", "messages": []}), "messages"),
        (json!({"model": "deepseek-chat", "messages": null}), "messages"),
        (json!({"messages": [{"role": "user", "content": "x"}]}), "model"),
        (
            json!({"model": 42, "messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (
            json!({"model": "deepseek-chat", "messages": [{"content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            "temperature",
        ),
        (
            json!({"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
            "stream",
        ),
        (
            json!({"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}),
            "max_tokens",
        ),
        (
            json!({"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}], "top_p": 7}),
            "top_p",
        ),
    ];
    for (body, param) in cases {
        let (status, error) = error_of(app.post_json("/v1/chat/completions", &body).await).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error["param"], param, "{body} → {error}");
        assert!(
            error["message"].as_str().expect("message").contains(param),
            "{error}"
        );
    }
    let (status, error) = error_of(
        app.post_json("/v1/completions", &json!({"model": "deepseek-chat"}))
            .await,
    )
    .await;
    assert_eq!((status, error["param"].as_str()), (400, Some("prompt")));
}

#[tokio::test]
async fn unknown_model_is_404() {
    let app = spawn_app().await;
    let mut body = chat_body(false);
    body["model"] = json!("gpt-4o");
    let (status, error) = error_of(app.post_json("/v1/chat/completions", &body).await).await;
    assert_eq!(status, 404);
    assert_eq!(error["code"], "model_not_found");
    assert!(error["message"].as_str().expect("message").contains("gpt-4o"));
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let app = spawn_app_with(
        MockSettings::default(),
        |config| config.server.max_body_bytes = 1024,
        HashMap::new(),
    )
    .await;
    let mut body = chat_body(false);
    body["messages"][0]["content"] = json!("x".repeat(2048));
    let (status, error) = error_of(app.post_json("/v1/chat/completions", &body).await).await;
    assert_eq!(status, 413);
    assert_eq!(error["code"], "request_too_large");
    assert!(error["message"].as_str().expect("message").contains("1024"));
    // Just under the limit is fine.
    body["messages"][0]["content"] = json!("x".repeat(800));
    assert_eq!(app.post_json("/v1/chat/completions", &body).await.status(), 200);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_openai_errors() {
    let app = spawn_app().await;
    let (status, error) = error_of(app.get("/v1/embeddings").await).await;
    assert_eq!((status, error["code"].as_str()), (404, Some("unknown_url")));
    let (status, error) = error_of(app.get("/v1/chat/completions").await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
}

#[tokio::test]
async fn client_keys_are_enforced_when_configured() {
    let mut env = HashMap::new();
    env.insert("CLIENT_KEY_A".to_string(), "key-a".to_string());
    env.insert("CLIENT_KEY_B".to_string(), "key-b".to_string());
    let app = spawn_app_with(
        MockSettings::default(),
        |config| config.server.client_api_key_envs = vec!["CLIENT_KEY_A".into(), "CLIENT_KEY_B".into()],
        env,
    )
    .await;
    let url = app.url("/v1/chat/completions");
    let missing = app
        .client
        .post(&url)
        .json(&chat_body(false))
        .send()
        .await
        .expect("sent");
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    let (status, error) = error_of(missing).await;
    assert_eq!((status, error["code"].as_str()), (401, Some("invalid_api_key")));
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("didn't provide")
    );

    let wrong = app
        .client
        .post(&url)
        .bearer_auth("key-c")
        .json(&chat_body(false))
        .send()
        .await
        .expect("sent");
    let (status, error) = error_of(wrong).await;
    assert_eq!(status, 401);
    assert!(error["message"].as_str().expect("message").contains("Incorrect"));

    for key in ["key-a", "key-b"] {
        let ok = app
            .client
            .post(&url)
            .bearer_auth(key)
            .json(&chat_body(false))
            .send()
            .await
            .expect("sent");
        assert_eq!(ok.status(), 200, "{key}");
    }
    let ok = app
        .client
        .get(app.url("/v1/models"))
        .header("x-api-key", "key-b")
        .send()
        .await
        .expect("sent");
    assert_eq!(ok.status(), 200);
    let denied = app.client.get(app.url("/v1/models")).send().await.expect("sent");
    assert_eq!(denied.status(), 401);
    // Liveness and metrics stay open for probes.
    assert_eq!(app.get("/health").await.status(), 200);
    assert_eq!(app.get("/metrics").await.status(), 200);
    assert_eq!(
        app.mock.total_requests(),
        2,
        "only authenticated requests reached the gateway"
    );
}

#[tokio::test]
async fn a_burst_of_garbage_leaves_the_server_answering() {
    let app = spawn_app().await;
    let bodies: Vec<Vec<u8>> = vec![
        b"{\"model\":\"deepseek-chat\",\"messages\":[{\"role\":\"user\",\"content\":{\"a\":1}}]}".to_vec(),
        b"{\"model\":\"deepseek-chat\",\"messages\":[{\"role\":\"user\",\"content\":[1,2]}]}".to_vec(),
        b"{\"model\":\"deepseek-chat\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"n\":1e10}".to_vec(),
        b"{\"model\":\"deepseek-chat\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"seed\":99999999999999999999999}".to_vec(),
        b"{\"model\":\"deepseek-chat\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stop\":[null]}".to_vec(),
        b"{\"model\":\"deepseek-chat\",\"messages\":[{\"role\":\"user\",\"content\":\"\\ud800\"}]}".to_vec(),
        vec![b'{'; 5000],
    ];
    for body in bodies {
        let response = app.post_raw("/v1/chat/completions", body.clone()).await;
        assert_eq!(response.status(), 400, "{}", String::from_utf8_lossy(&body));
    }
    assert_eq!(
        app.post_json("/v1/chat/completions", &chat_body(false))
            .await
            .status(),
        200
    );
}
