//! The local model against hostile inputs: chat templates that loop or blow up a string
//! are refused naming the template, and sampling parameters that overflowed the sampler
//! (temperature or repetition penalty 1e-45, once a 500) are a 400 or a greedy answer.

use crate::common;

use std::{collections::HashMap, path::Path, time::Duration};

use common::{spawn_app_with, spawn_local_app, spawn_local_app_with};
use lifeboat::{
    engine::{Arch, testing::tiny::make_tiny},
    mock_upstream::MockSettings,
};
use serde_json::{Value, json};

const MODEL: &str = "tiny-r1";

fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    make_tiny(Arch::Qwen2, dir.path(), 7).expect("tiny model");
    dir
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello there, tiny model"}],
        "max_tokens": 4,
    });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    body
}

/// The local model's load error with `template` as its `--chat-template`.
async fn load_error(model: &Path, template: &Path) -> String {
    let (model, template) = (model.to_path_buf(), template.to_path_buf());
    let app = spawn_app_with(
        MockSettings::default(),
        move |config| {
            config.remotes.clear();
            config.local.model = Some(model);
            config.local.served_model_name = Some(MODEL.into());
            config.local.chat_template = Some(template);
        },
        HashMap::new(),
    )
    .await;
    let ready = tokio::time::timeout(Duration::from_secs(120), app.state.wait_local_ready()).await;
    match ready {
        Ok(Err(err)) => err,
        Ok(Ok(())) => panic!("a runaway chat template was accepted"),
        Err(_) => panic!("loading did not finish: the template check hangs"),
    }
}

#[tokio::test]
async fn looping_and_string_doubling_templates_are_refused_naming_the_template() {
    let dir = tiny_model();
    let cases = [
        (
            "loop.jinja",
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "out of fuel",
        ),
        (
            "double.jinja",
            "{% set ns = namespace(s='abc') %}{% for i in range(25) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "more than",
        ),
    ];
    for (file, source, expected) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, source).expect("write");
        let err = load_error(dir.path(), &path).await;
        assert!(
            err.contains(&path.display().to_string()) && err.contains("refused") && err.contains(expected),
            "{file}: {err}"
        );
    }
}

#[tokio::test]
async fn a_template_that_loops_on_one_message_fails_that_request_only() {
    let dir = tiny_model();
    let path = dir.path().join("trap.jinja");
    std::fs::write(
        &path,
        "{% for m in messages %}{% if m.content == 'spin' %}\
         {% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}\
         {% endif %}{{ m.content }}{% endfor %}",
    )
    .expect("write");
    let app = spawn_local_app_with(dir.path(), MODEL, move |c| c.local.chat_template = Some(path)).await;
    let trap = chat(json!({"messages": [{"role": "user", "content": "spin"}]}));
    let response = app.post_json("/v1/chat/completions", &trap).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("chat template") && message.contains("out of fuel"),
        "{body}"
    );
    // The engine is free again, and shutdown is not held up.
    let response = app.post_json("/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(response.status(), 200);
    let mut app = app;
    app.shutdown();
    let stopped = tokio::time::timeout(Duration::from_secs(30), &mut app.server).await;
    assert!(stopped.is_ok(), "the server did not stop");
}

#[tokio::test]
async fn tiny_temperature_is_greedy_and_tiny_repetition_penalty_is_a_400() {
    let dir = tiny_model();
    let app = spawn_local_app(dir.path(), MODEL).await;
    // Once a 500: 1 / 1e-45 is infinite, every logit too, and no token could be drawn.
    let tiny = app
        .post_json("/v1/chat/completions", &chat(json!({"temperature": 1e-45})))
        .await;
    assert_eq!(tiny.status(), 200, "{}", tiny.text().await.unwrap_or_default());
    let greedy = app
        .post_json("/v1/chat/completions", &chat(json!({"temperature": 0})))
        .await;
    let (tiny, greedy): (Value, Value) = (
        app.post_json("/v1/chat/completions", &chat(json!({"temperature": 1e-45})))
            .await
            .json()
            .await
            .expect("json"),
        greedy.json().await.expect("json"),
    );
    assert_eq!(
        tiny["choices"][0]["message"], greedy["choices"][0]["message"],
        "a temperature of 1e-45 samples greedily"
    );
    let response = app
        .post_json(
            "/v1/chat/completions",
            &chat(json!({"repetition_penalty": 1e-45})),
        )
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["param"], "repetition_penalty", "{body}");
}
