//! Real GGUF files from `scripts/fetch-test-models`: the tokenizer built from GGUF
//! metadata against llama.cpp's ids (committed fixtures), and a pinned greedy answer.
//!
//! The files are not committed. Without them these tests say so and pass, unless
//! `LIFEBOAT_REQUIRE_MODELS=1` (set by `scripts/test`, so CI cannot skip them silently).

use crate::common;

use std::path::PathBuf;

use lifeboat::engine::load::gguf;
use serde_json::{Value, json};

fn check_tokenizer_fixture(fixture: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(fixture);
    let text = std::fs::read_to_string(&path).expect("fixture");
    let fixture: Value = serde_json::from_str(&text).expect("fixture JSON");
    let Some(model) = common::model_file(fixture["model"].as_str().expect("model")) else {
        return;
    };
    let tokenizer = gguf::read_tokenizer_only(&model).expect("tokenizer from GGUF");
    let mut failures = Vec::new();
    let cases = fixture["cases"].as_array().expect("cases");
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = case["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        let got = tokenizer.encode(text, false).expect("encode");
        if let Some(quirk) = case.get("llama_cpp_quirk").and_then(Value::as_str) {
            // lifeboat keeps Hugging Face's reading here (see scripts/tokenizer_fixtures.py):
            // the text stays ordinary tokens that decode back to itself.
            assert_ne!(got, want, "{text:?} no longer shows the llama.cpp quirk: {quirk}");
            assert_eq!(tokenizer.decode(&got).expect("decode"), text, "{text:?}");
            continue;
        }
        if got != want {
            failures.push(format!("{text:?}\n   llama.cpp {want:?}\n   lifeboat  {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{}: {} of {} texts differ from llama.cpp:\n{}",
        fixture["model"],
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn deepseek_r1_distill_tokenizer_matches_llama_cpp() {
    check_tokenizer_fixture("deepseek-r1-distill-qwen.json");
}

#[test]
fn qwen_coder_tokenizer_matches_llama_cpp() {
    check_tokenizer_fixture("qwen2.5-coder.json");
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    check_tokenizer_fixture("smollm2.json");
}

/// The real SmolLM2-135M-Instruct (Q4_1, llama architecture) answers through the API
/// exactly as pinned: GGUF loading, its tokenizer and template, greedy decoding, usage.
#[tokio::test]
async fn smollm2_greedy_answer_is_pinned() {
    let Some(model) = common::model_file("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let app = common::spawn_local_app(&model, "smollm2").await;
    let body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        "max_tokens": 30,
        "temperature": 0,
    });
    let response = app.post_json("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("json");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["usage"]["prompt_tokens"], 42);
    assert_eq!(answer["usage"]["completion_tokens"], 8);
    assert_eq!(answer["model"], "smollm2");

    // The same answer streamed, and a `stop` string cut across tokens.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stop"] = json!(["of France"]);
    let response = app.post_json("/v1/chat/completions", &streamed).await;
    let frames = common::read_sse(response).await.json();
    let text: String = frames
        .iter()
        .filter_map(|f| f["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "The capital ");
}

/// DeepSeek's tool-call markup written by the real R1-Distill tokenizer (plain text there:
/// its vocabulary has no `<｜tool▁…｜>` tokens, so the markup is many pieces) comes back
/// through the incremental decoder and parses into the call.
#[test]
fn deepseek_tool_call_markup_is_decoded_and_parsed() {
    use lifeboat::engine::text::{
        tokenizer::IncrementalDecoder,
        tool_calls::{ToolCallFormat, ToolCallParser},
    };
    let Some(model) = common::model_file("DeepSeek-R1-Distill-Qwen-7B.header.gguf") else {
        return;
    };
    let tokenizer = gguf::read_tokenizer_only(&model).expect("tokenizer from GGUF");
    let text = "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"東京\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let ids = tokenizer.encode(text, false).expect("encode");
    let mut decoder = IncrementalDecoder::with_tool_markup();
    let mut parser = ToolCallParser::new(ToolCallFormat::DeepSeek, vec!["get_weather".into()]);
    let (mut content, mut calls) = (String::new(), Vec::new());
    let pieces = ids
        .iter()
        .filter_map(|id| decoder.push(&tokenizer, *id).expect("decode"))
        .collect::<Vec<_>>();
    for piece in pieces
        .iter()
        .map(String::as_str)
        .chain([decoder.finish(&tokenizer).expect("finish").as_str()])
    {
        let parsed = parser.push(piece);
        content.push_str(&parsed.content);
        calls.extend(parsed.calls);
    }
    let rest = parser.finish();
    content.push_str(&rest.content);
    calls.extend(rest.calls);
    assert_eq!(content, "Checking.");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].name, "get_weather");
    assert_eq!(calls[0].arguments, "{\"city\": \"東京\"}");
}
