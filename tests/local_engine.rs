//! The local engine end to end on a tiny generated model: served through the same API,
//! deterministic when greedy or seeded, stop strings, reasoning split, exact usage,
//! readiness, admission control and precise load errors.

use crate::common;

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use common::{TestApp, read_sse, spawn_app_with, spawn_local_app, spawn_local_app_with};
use futures_util::StreamExt;
use lifeboat::{
    backend::{Backend, BackendRequest, ChatMessage, ErrorKind, GenerationRequest, SamplingParams},
    engine::{Arch, LocalBackend, LocalSettings, load::loader, read_info, testing::tiny::make_tiny},
    mock_upstream::MockSettings,
};
use serde_json::{Value, json};

const MODEL: &str = "tiny-r1";

fn tiny_model(arch: Arch) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    make_tiny(arch, dir.path(), 7).expect("tiny model");
    dir
}

async fn local_app(model: &Path) -> TestApp {
    spawn_local_app(model, MODEL).await
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello there, tiny model"}],
        "max_tokens": 12,
        "temperature": 0,
    });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    body
}

async fn complete(app: &TestApp, body: &Value) -> Value {
    let response = app.post_json("/v1/chat/completions", body).await;
    assert_eq!(
        response.status(),
        200,
        "{}",
        response.text().await.unwrap_or_default()
    );
    response.json().await.expect("json")
}

/// Reasoning then content of choice 0 (the R1 template opens `<think>`, so a random
/// model's text is reasoning unless it happens to emit `</think>`).
fn text_of(body: &Value) -> String {
    let message = &body["choices"][0]["message"];
    format!(
        "{}{}",
        message["reasoning_content"].as_str().unwrap_or_default(),
        message["content"].as_str().unwrap_or_default()
    )
}

#[tokio::test]
async fn greedy_chat_is_served_deterministically_with_exact_usage() {
    let dir = tiny_model(Arch::Qwen2);
    let app = local_app(dir.path()).await;
    let ready: Value = app.get("/ready").await.json().await.expect("json");
    assert_eq!(ready["phases"]["local"], "ready");
    let models: Value = app.get("/v1/models").await.json().await.expect("json");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["owned_by"], "local");

    let response = app.post_json("/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(response.headers()["x-lifeboat-backend"], "local");
    let first: Value = response.json().await.expect("json");
    let second = complete(&app, &chat(json!({}))).await;
    assert_eq!(text_of(&first), text_of(&second), "greedy is deterministic");
    assert!(!text_of(&first).is_empty());
    assert_eq!(first["model"], MODEL);
    assert_eq!(first["choices"][0]["finish_reason"], "length");
    assert!(
        first["choices"][0]["message"]["reasoning_content"].is_string(),
        "{first}"
    );

    // Usage: the exact prompt length under the model's own template and tokenizer.
    let info = read_info(dir.path()).expect("info");
    let rendered = info
        .template
        .as_ref()
        .expect("template")
        .render(&[ChatMessage::text("user", "Hello there, tiny model")], None)
        .expect("renders");
    let prompt_tokens = info.tokenizer.encode(&rendered, false).expect("encodes").len();
    assert_eq!(first["usage"]["prompt_tokens"], prompt_tokens as u64);
    assert_eq!(first["usage"]["completion_tokens"], 12);
    assert_eq!(first["usage"]["total_tokens"], prompt_tokens as u64 + 12);
}

#[tokio::test]
async fn streaming_matches_non_streaming_and_ends_once() {
    let dir = tiny_model(Arch::Qwen2);
    let app = local_app(dir.path()).await;
    let whole = complete(&app, &chat(json!({}))).await;
    let response = app
        .post_json(
            "/v1/chat/completions",
            &chat(json!({"stream": true, "stream_options": {"include_usage": true}})),
        )
        .await;
    assert_eq!(response.status(), 200);
    let sse = read_sse(response).await;
    assert_eq!(sse.done_count(), 1);
    let chunks = sse.json();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| {
            format!(
                "{}{}",
                c["delta"]["reasoning_content"].as_str().unwrap_or_default(),
                c["delta"]["content"].as_str().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(streamed, text_of(&whole));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 12);
}

#[tokio::test]
async fn stop_strings_cut_the_answer_and_are_not_emitted() {
    let dir = tiny_model(Arch::Qwen2);
    let app = local_app(dir.path()).await;
    let full = text_of(&complete(&app, &chat(json!({"max_tokens": 24}))).await);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 8, "need some text to cut: {full:?}");
    let stop: String = chars[4..7].iter().collect();
    let cut = &full[..full.find(&stop).expect("stop occurs")];
    let stopped = complete(
        &app,
        &chat(json!({"max_tokens": 24, "stop": [stop.clone(), "never-appears"]})),
    )
    .await;
    assert_eq!(text_of(&stopped), cut, "stop {stop:?}");
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    let streamed = read_sse(
        app.post_json(
            "/v1/chat/completions",
            &chat(json!({"max_tokens": 24, "stop": stop.clone(), "stream": true})),
        )
        .await,
    )
    .await;
    let text: String = streamed
        .json()
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| {
            c["delta"]["reasoning_content"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(text, cut, "streamed text is cut the same way");
}

#[tokio::test]
async fn seeds_make_sampling_reproducible_and_n_gives_choices() {
    let dir = tiny_model(Arch::Qwen2);
    let app = local_app(dir.path()).await;
    let sampled = |seed: u64| chat(json!({"temperature": 1.0, "seed": seed, "max_tokens": 16}));
    let a = text_of(&complete(&app, &sampled(1)).await);
    let b = text_of(&complete(&app, &sampled(1)).await);
    let c = text_of(&complete(&app, &sampled(2)).await);
    assert_eq!(a, b, "same seed, same text");
    assert_ne!(a, c, "another seed, another text");
    let two = complete(&app, &chat(json!({"n": 2, "temperature": 1.0, "seed": 5}))).await;
    assert_eq!(two["choices"].as_array().map(Vec::len), Some(2));
    assert_eq!(two["choices"][1]["index"], 1);
    assert_eq!(two["usage"]["completion_tokens"], 24);
}

#[tokio::test]
async fn every_architecture_serves_and_legacy_completions_work() {
    for arch in [Arch::Llama, Arch::Qwen3, Arch::DeepseekV2] {
        let dir = tiny_model(arch);
        let app = local_app(dir.path()).await;
        let body = complete(&app, &chat(json!({}))).await;
        assert_eq!(body["usage"]["completion_tokens"], 12, "{arch:?}");
        let response = app
            .post_json(
                "/v1/completions",
                &json!({"model": MODEL, "prompt": "The quick brown", "max_tokens": 5, "temperature": 0}),
            )
            .await;
        assert_eq!(response.status(), 200, "{arch:?}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["usage"]["completion_tokens"], 5);
    }
}

#[tokio::test]
async fn prompt_longer_than_the_context_is_a_400() {
    let dir = tiny_model(Arch::Qwen2);
    let app = local_app(dir.path()).await;
    let long = "numbers ".repeat(600);
    let response = app
        .post_json(
            "/v1/chat/completions",
            &chat(json!({"messages": [{"role": "user", "content": long}]})),
        )
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("512"),
        "{body}"
    );
    let response = app
        .post_json("/v1/chat/completions", &chat(json!({"max_tokens": 600})))
        .await;
    assert_eq!(
        response.status(),
        400,
        "max_tokens beyond the context is refused, as vLLM does"
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["param"], "max_tokens");
}

#[tokio::test]
async fn broken_model_folders_fail_with_the_file_named() {
    let dir = tiny_model(Arch::Qwen2);
    let config_path = dir.path().join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("read")).expect("json");
    config["num_hidden_layers"] = json!(3);
    std::fs::write(&config_path, config.to_string()).expect("write");
    let model = dir.path().to_path_buf();
    let app = spawn_app_with(
        MockSettings::default(),
        move |c| {
            c.remotes.clear();
            c.local.model = Some(model);
            c.local.served_model_name = Some(MODEL.into());
        },
        HashMap::new(),
    )
    .await;
    let mut ready = Value::Null;
    for _ in 0..300 {
        ready = app.get("/ready").await.json().await.expect("json");
        if ready["phases"]["local"]
            .as_str()
            .is_some_and(|p| p.starts_with("failed"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let phase = ready["phases"]["local"].as_str().expect("phase").to_string();
    assert!(
        phase.contains("missing tensor model.layers.2.self_attn.q_proj.weight"),
        "{phase}"
    );
    let response = app.post_json("/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "backend_unavailable");

    config["architectures"] = json!(["MambaForCausalLM"]);
    std::fs::write(&config_path, config.to_string()).expect("write");
    let err = read_info(dir.path()).expect_err("unknown arch");
    assert!(
        err.to_string().contains("config.json") && err.to_string().contains("MambaForCausalLM"),
        "{err}"
    );
}

#[test]
fn broken_deepseek2_folders_name_the_tensor_or_the_setting() {
    let dir = tiny_model(Arch::DeepseekV2);
    let config_path = dir.path().join("config.json");
    let original = std::fs::read_to_string(&config_path).expect("read");
    let write = |change: &dyn Fn(&mut Value)| {
        let mut config: Value = serde_json::from_str(&original).expect("json");
        change(&mut config);
        std::fs::write(&config_path, config.to_string()).expect("write");
    };
    let load_error = || match loader::load(dir.path(), &candle_core::Device::Cpu) {
        Ok(_) => panic!("a broken folder loaded"),
        Err(err) => err.to_string(),
    };

    // More experts than the weights hold: the router's shape gives it away.
    write(&|c| c["n_routed_experts"] = json!(5));
    let err = load_error();
    assert!(
        err.contains("tensor model.layers.1.mlp.gate.weight has shape [4, 64], config.json implies [5, 64]"),
        "{err}"
    );
    // A third layer the weights do not have: the first absent tensor is named.
    write(&|c| c["num_hidden_layers"] = json!(3));
    let err = load_error();
    assert!(
        err.contains("missing tensor model.layers.2.self_attn.q_proj.weight"),
        "{err}"
    );
    // A latent width the weights do not have: the tensor, its shape and the implied one.
    write(&|c| c["kv_lora_rank"] = json!(16));
    let err = load_error();
    assert!(
        err.contains("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
            && err.contains("[40, 64]")
            && err.contains("[24, 64]"),
        "{err}"
    );
    // The 236B models' routing is refused by name, not served wrongly.
    write(&|c| c["topk_method"] = json!("group_limited_greedy"));
    let err = load_error();
    assert!(
        err.contains("config.json") && err.contains("group_limited_greedy"),
        "{err}"
    );
}

/// `--chat-template`: a Jinja file, or another model's template, replaces the model's own
/// and is rendered with this model's special tokens; a missing file names the setting.
#[tokio::test]
async fn a_chat_template_override_is_rendered_with_the_models_tokens() {
    let dir = tiny_model(Arch::Qwen2);
    let custom = "{{ bos_token }}Q: {% for m in messages %}{{ m.content }}{% endfor %}\nA:";
    let tokenizer = lifeboat::engine::testing::tiny::tiny_tokenizer().expect("tokenizer");
    // trim_blocks (as Hugging Face renders) drops the newline after `{% endfor %}`.
    let expected = format!(
        "{}Q: Hello there, tiny modelA:",
        lifeboat::engine::testing::tiny::BOS
    );
    let expected_tokens = tokenizer.encode(expected, false).expect("encode").len();

    // The template from a file, then the same template taken from another model folder.
    let file = dir.path().join("custom.jinja");
    std::fs::write(&file, custom).expect("write");
    let donor = tiny_model(Arch::Llama);
    let donor_config = donor.path().join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&donor_config).expect("read")).expect("json");
    config["chat_template"] = json!(custom);
    config["bos_token"] = json!("<unused-bos>");
    std::fs::write(&donor_config, config.to_string()).expect("write");

    for source in [file, donor.path().to_path_buf()] {
        let template = source.clone();
        let app = spawn_local_app_with(dir.path(), MODEL, move |c| {
            c.local.chat_template = Some(template);
        })
        .await;
        let body = complete(&app, &chat(json!({}))).await;
        assert_eq!(
            body["usage"]["prompt_tokens"],
            expected_tokens,
            "{}: {body}",
            source.display()
        );
    }

    let mut config = lifeboat::config::Config::default();
    config.local.model = Some(dir.path().to_path_buf());
    config.local.chat_template = Some(dir.path().join("absent.jinja"));
    let err = match lifeboat::app::AppState::from_config(&config, &HashMap::<String, String>::new()) {
        Ok(_) => panic!("a missing chat template was accepted"),
        Err(err) => err.to_string(),
    };
    assert!(
        err.starts_with("local.chat_template: ") && err.contains("absent.jinja"),
        "{err}"
    );
}

fn request(max_tokens: u32) -> BackendRequest {
    BackendRequest::new(
        MODEL,
        Arc::new(GenerationRequest::chat(
            MODEL,
            "Count for me",
            SamplingParams {
                max_tokens: Some(max_tokens),
                temperature: Some(0.0),
                ..SamplingParams::default()
            },
        )),
    )
}

#[tokio::test]
async fn a_full_queue_is_rate_limited_and_a_dropped_client_frees_the_engine() {
    let dir = tiny_model(Arch::Qwen2);
    let backend = LocalBackend::start(&LocalSettings {
        queue_capacity: 1,
        max_batch: 1,
        ..LocalSettings::new(dir.path())
    })
    .expect("starts");
    backend.wait_ready().await.expect("ready");
    // A is never read: its sequence pauses once its 64-event buffer is full, keeping the
    // only slot.
    let stalled = backend.generate(request(400)).await.expect("A accepted");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queued = backend.generate(request(4)).await.expect("B waits in the queue");
    let refused = backend.generate(request(4)).await.err().expect("C is refused");
    assert_eq!(refused.kind, ErrorKind::RateLimited);
    assert_eq!(refused.retry_after, Some(Duration::from_secs(1)));
    // The client of A leaves: the engine stops A and serves B.
    drop(stalled);
    let events: Vec<_> = tokio::time::timeout(Duration::from_secs(30), queued.collect::<Vec<_>>())
        .await
        .expect("B finishes");
    assert!(events.iter().all(Result::is_ok), "{events:?}");
    assert!(events.len() >= 2, "B produced text and a finish: {events:?}");
}
