//! The local engine's logits match Hugging Face transformers (CPU, f32) to max-abs ≤ 1e-4
//! for a tiny model of each architecture: after the prompt and after each decode step
//! through the KV cache — for GGUF also as one sequence of a batched step beside another.
//! Fixtures from `scripts/make-fixtures logits`.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use lifeboat::engine::{
    Arch,
    load::loader,
    models::SlotStep,
    testing::{tiny::make_tiny, tiny_gguf::make_tiny_gguf},
};
use serde_json::Value;
use sha2::{Digest, Sha256};

const TOLERANCE: f32 = 1e-4;

/// Where the model under test comes from.
#[derive(Clone, Copy)]
enum Format {
    Safetensors,
    /// The same weights as f32 GGUF, through candle's quantized model code.
    Gguf,
    /// The GGUF model with the fixture's sequence in cache slot 1 of every step, while
    /// another sequence runs in slot 0 (continuous batching).
    GgufInBatch,
}

fn check(arch: Arch) {
    check_format(arch, Format::Safetensors);
}

fn check_format(arch: Arch, format: Format) {
    check_fixture(arch.short_name(), format);
}

/// Compare with `tests/fixtures/logits/tiny-{name}.json`: its architecture's tiny model,
/// with the fixture's `config_changes` applied to config.json.
fn check_fixture(name: &str, format: Format) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/logits")
        .join(format!("tiny-{name}.json"));
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("JSON");
    let arch = Arch::from_short_name(fixture["arch"].as_str().expect("arch")).expect("known arch");
    let dir = tempfile::tempdir().expect("temp dir");
    let seed = fixture["seed"].as_u64().expect("seed");
    make_tiny(arch, dir.path(), seed).expect("tiny model");
    if let Some(changes) = fixture["config_changes"].as_object() {
        let config_path = dir.path().join("config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).expect("config")).expect("JSON");
        for (key, value) in changes {
            config[key] = value.clone();
        }
        std::fs::write(&config_path, config.to_string()).expect("write config");
    }
    let weights = std::fs::read(dir.path().join("model.safetensors")).expect("weights");
    let digest: String = Sha256::digest(&weights)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        digest, fixture["weights_sha256"],
        "make-tiny writes different weights than the fixture was made from; run scripts/make-fixtures logits"
    );

    let source = match format {
        Format::Safetensors => dir.path().to_path_buf(),
        Format::Gguf | Format::GgufInBatch => {
            let file = dir.path().join("tiny.gguf");
            make_tiny_gguf(arch, &file, seed).expect("tiny GGUF");
            file
        }
    };
    let mut loaded = loader::load(&source, &Device::Cpu).expect("loads");
    let mut pos = 0;
    // The other sequence of a batched step: a prompt of its own, then one token per step.
    let mut neighbour_pos = 0;
    for (step, expected) in fixture["steps"].as_array().expect("steps").iter().enumerate() {
        let ids: Vec<u32> = expected["input"]
            .as_array()
            .expect("input")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        let logits: Vec<f32> = match format {
            Format::GgufInBatch => {
                let neighbour: Vec<u32> = if neighbour_pos == 0 {
                    ids.iter().rev().chain(&ids).copied().collect()
                } else {
                    vec![ids[0]]
                };
                let steps = [
                    SlotStep {
                        slot: 0,
                        tokens: &neighbour,
                        pos: neighbour_pos,
                    },
                    SlotStep {
                        slot: 1,
                        tokens: &ids,
                        pos,
                    },
                ];
                neighbour_pos += neighbour.len();
                let mut both = loaded
                    .model
                    .forward_slots(&steps, &Device::Cpu)
                    .expect("batched forward");
                assert_eq!(both.len(), 2);
                both.pop().and_then(|t| t.to_vec1().ok()).expect("slot 1 logits")
            }
            _ => {
                let input = Tensor::new(ids.as_slice(), &Device::Cpu)
                    .and_then(|t| t.unsqueeze(0))
                    .expect("tensor");
                loaded
                    .model
                    .forward(&input, pos)
                    .and_then(|t| t.to_vec1())
                    .expect("forward")
            }
        };
        pos += ids.len();
        let want: Vec<f32> = expected["logits"]
            .as_array()
            .expect("logits")
            .iter()
            .map(|v| v.as_f64().expect("float") as f32)
            .collect();
        assert_eq!(logits.len(), want.len(), "vocabulary size");
        let (worst, at) = logits
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .enumerate()
            .fold(
                (0f32, 0),
                |(max, at), (i, d)| if d > max { (d, i) } else { (max, at) },
            );
        let label = match format {
            Format::Safetensors => "safetensors",
            Format::Gguf => "gguf",
            Format::GgufInBatch => "gguf in a batch",
        };
        eprintln!("{name} {label} step {step}: max |Δ| = {worst:e}");
        assert!(
            worst <= TOLERANCE,
            "{name} {label}: step {step} logit {at} differs by {worst:e} (lifeboat {}, transformers {})",
            logits[at],
            want[at]
        );
    }
}

#[test]
fn qwen2_logits_match_transformers() {
    check(Arch::Qwen2);
}

#[test]
fn llama_logits_match_transformers() {
    check(Arch::Llama);
}

#[test]
fn qwen3_logits_match_transformers() {
    check(Arch::Qwen3);
}

/// MLA with YaRN RoPE, a dense first layer and a MoE layer (routed + shared experts).
#[test]
fn deepseek2_logits_match_transformers() {
    check(Arch::DeepseekV2);
}

/// deepseek-coder's linear RoPE scaling, through candle's llama.
#[test]
fn llama_linear_rope_scaling_logits_match_transformers() {
    check_fixture("llama-linear", Format::Safetensors);
}

/// DeepSeek-R1-Distill-Llama's llama3 RoPE scaling, all three frequency bands.
#[test]
fn llama_llama3_rope_scaling_logits_match_transformers() {
    check_fixture("llama-llama3", Format::Safetensors);
}

#[test]
fn qwen2_gguf_logits_match_transformers() {
    check_format(Arch::Qwen2, Format::Gguf);
}

#[test]
fn llama_gguf_logits_match_transformers() {
    check_format(Arch::Llama, Format::Gguf);
}

#[test]
fn qwen3_gguf_logits_match_transformers() {
    check_format(Arch::Qwen3, Format::Gguf);
}

#[test]
fn gguf_logits_match_transformers_inside_a_batch() {
    for arch in [Arch::Qwen2, Arch::Llama, Arch::Qwen3] {
        check_format(arch, Format::GgufInBatch);
    }
}
