//! Chat templates render byte-identical to Hugging Face transformers (fixtures from
//! `scripts/make-fixtures templates`) for a table of conversations: system, multi-turn,
//! tool calls and results, prior `<think>` content, unicode.
//!
//! The tiny model's template always runs; the real models' templates come from the GGUF
//! files of `scripts/fetch-test-models` (required when `LIFEBOAT_REQUIRE_MODELS=1`).

use crate::common;

use std::path::PathBuf;

use lifeboat::{
    backend::ChatMessage,
    engine::{load::gguf, testing::tiny, text::chat_template::ChatTemplate},
};
use serde_json::Value;

fn manifest_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn message(value: &Value) -> ChatMessage {
    let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_string);
    ChatMessage {
        role: text("role").expect("role"),
        content: text("content"),
        name: text("name"),
        tool_calls: value.get("tool_calls").cloned(),
        tool_call_id: text("tool_call_id"),
        reasoning_content: text("reasoning_content"),
    }
}

fn check(fixture: &str, template: &ChatTemplate) {
    let text =
        std::fs::read_to_string(manifest_path("tests/fixtures/templates").join(fixture)).expect("fixture");
    let fixture: Value = serde_json::from_str(&text).expect("fixture JSON");
    let mut failures = Vec::new();
    for case in fixture["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(message)
            .collect();
        let got = template.render(&messages, case.get("tools"));
        match (case.get("rendered").and_then(Value::as_str), got) {
            (Some(want), Ok(got)) if got == want => {}
            (Some(want), Ok(got)) => failures.push(format!(
                "{name}:\n  transformers {want:?}\n  lifeboat     {got:?}"
            )),
            (Some(_), Err(err)) => {
                failures.push(format!("{name}: transformers renders it, lifeboat fails: {err}"))
            }
            (None, Err(_)) => {}
            (None, Ok(got)) => failures.push(format!(
                "{name}: transformers refuses it ({}), lifeboat renders {got:?}",
                case["error"]
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{fixture}:\n{}",
        failures.join("\n"),
        fixture = fixture["model"]
    );
}

fn gguf_template(file: &str) -> Option<ChatTemplate> {
    let path = common::model_file(file)?;
    let info = gguf::read_info(&path).expect("GGUF header");
    Some(info.template.expect("the GGUF has a chat template"))
}

#[test]
fn tiny_r1_template_matches_transformers() {
    let template = ChatTemplate::new(tiny::R1_TEMPLATE, tiny::BOS, tiny::EOS).expect("compiles");
    check("tiny-r1.json", &template);
}

#[test]
fn deepseek_r1_distill_template_matches_transformers() {
    if let Some(template) = gguf_template("DeepSeek-R1-Distill-Qwen-7B.header.gguf") {
        check("deepseek-r1-distill-qwen.json", &template);
    }
}

#[test]
fn qwen_coder_template_matches_transformers() {
    if let Some(template) = gguf_template("qwen2.5-coder-0.5b-instruct.gguf") {
        check("qwen2.5-coder.json", &template);
    }
}

#[test]
fn smollm2_template_matches_transformers() {
    if let Some(template) = gguf_template("SmolLM2-135M-Instruct.Q4_1.gguf") {
        check("smollm2.json", &template);
    }
}
