//! `lifeboat model make-tiny`: a tiny model with random weights (fixed seed), a small
//! real byte-level BPE tokenizer trained on a built-in text, and a DeepSeek-R1-style chat
//! template, so every engine code path runs in tests without downloads.

use std::{collections::HashMap, path::Path};

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::json;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerImpl,
    models::{
        TrainerWrapper,
        bpe::{BPE, BpeTrainerBuilder},
    },
    pre_tokenizers::byte_level::ByteLevel,
};

use crate::engine::{
    EngineError,
    models::{Arch, Dims, deepseek2::MlaMoe},
};

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
pub const USER: &str = "<｜User｜>";
pub const ASSISTANT: &str = "<｜Assistant｜>";

/// A chat template in the DeepSeek-R1 format (system text first, `<｜User｜>` /
/// `<｜Assistant｜>` turns, earlier answers without their reasoning, and the generation
/// prompt opening `<think>`), written for lifeboat's tests.
pub const R1_TEMPLATE: &str = concat!(
    "{{ bos_token }}",
    "{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}{% endif %}{% endfor %}",
    "{% for m in messages %}",
    "{% if m.role == 'user' %}<｜User｜>{{ m.content }}",
    "{% elif m.role == 'assistant' %}<｜Assistant｜>",
    "{% set c = m.content or '' %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1].lstrip() %}{% endif %}",
    "{{ c }}<｜end▁of▁sentence｜>",
    "{% elif m.role == 'tool' %}<｜tool▁output▁begin｜>{{ m.content }}<｜tool▁output▁end｜>",
    "{% endif %}{% endfor %}",
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
);

/// Text the tiny tokenizer learns its merges from.
const CORPUS: &str = "\
Lifeboat keeps the lights on when the gateway goes dark.
The quick brown fox jumps over the lazy dog while the model thinks.
A small model answers questions about numbers: one two three four five six seven eight nine ten.
def add(a, b):\n    return a + b\n
Hello, world! How are you today? I am fine, thank you.
Reasoning first, then the answer. Let me think step by step.
The server streams tokens to the client and counts every one of them.
東京は日本の首都です。 Emoji: 🚀🌍✨ and numbers 1234567890.
";

/// Train the tiny tokenizer.
pub fn tiny_tokenizer() -> Result<Tokenizer, EngineError> {
    let err = |e: tokenizers::Error| EngineError::Tokenizer(e.to_string());
    let mut tokenizer: TokenizerImpl<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(ModelWrapper::BPE(BPE::default()));
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, true, true,
    ))));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(400)
            .min_frequency(1)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    tokenizer
        .train(&mut trainer, CORPUS.lines().map(str::to_string))
        .map_err(err)?;
    let specials = [
        BOS,
        EOS,
        USER,
        ASSISTANT,
        "<｜tool▁output▁begin｜>",
        "<｜tool▁output▁end｜>",
    ];
    tokenizer.add_special_tokens(&specials.map(|t| AddedToken::from(t, true)));
    // Not special: they must survive decoding so reasoning can be split off.
    tokenizer.add_tokens(&[
        AddedToken::from("<think>", false),
        AddedToken::from("</think>", false),
    ]);
    Ok(Tokenizer::from(tokenizer))
}

/// Tiny dimensions for `arch`.
pub(super) fn tiny_dims(arch: Arch, vocab: usize) -> Dims {
    // DeepSeek-V2-Lite's layout in miniature: no query LoRA, a dense first layer, then MoE
    // layers of 4 routed experts (2 per token) and one shared expert.
    let mla = (arch == Arch::DeepseekV2).then_some(MlaMoe {
        q_lora_rank: None,
        kv_lora_rank: 32,
        qk_nope_head_dim: 16,
        qk_rope_head_dim: 8,
        v_head_dim: 16,
        routed_experts: 4,
        shared_experts: 1,
        experts_per_token: 2,
        moe_intermediate: 32,
        first_dense_layers: 1,
        moe_layer_freq: 1,
    });
    Dims {
        vocab,
        hidden: 64,
        intermediate: 128,
        layers: 2,
        heads: 4,
        kv_heads: if mla.is_some() { 4 } else { 2 },
        head_dim: mla.as_ref().map_or(16, MlaMoe::q_head_dim),
        tie_embeddings: !matches!(arch, Arch::Llama | Arch::DeepseekV2),
        qkv_bias: arch == Arch::Qwen2,
        qk_norm: arch == Arch::Qwen3,
        max_context: if mla.is_some() { 2048 } else { 512 },
        mla,
    }
}

/// The weights of a tiny model, by Hugging Face name, drawn from `seed` in a fixed order.
pub(super) fn random_tensors(dims: &Dims, seed: u64) -> Result<HashMap<String, Tensor>, EngineError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    for (name, shape) in dims.expected_tensors() {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            (0..count).map(|_| 1.0 + rng.random_range(-0.1..0.1)).collect()
        } else {
            // Wider than the usual 0.02 so the tiny model's logits are not all alike.
            (0..count).map(|_| rng.random_range(-0.15..0.15)).collect()
        };
        let tensor = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

/// Write a tiny `arch` model into `out` (created if needed), weights drawn from `seed`.
pub fn make_tiny(arch: Arch, out: &Path, seed: u64) -> Result<(), EngineError> {
    std::fs::create_dir_all(out).map_err(|e| EngineError::load(out, format!("cannot create: {e}")))?;
    let tokenizer = tiny_tokenizer()?;
    let vocab = tokenizer.get_vocab_size(true);
    let id = |t: &str| tokenizer.token_to_id(t).unwrap_or(0);
    let (bos, eos) = (id(BOS), id(EOS));
    let dims = tiny_dims(arch, vocab);

    let mut config = json!({
        "architectures": [arch.class_name()],
        "model_type": if arch == Arch::DeepseekV2 { "deepseek_v2" } else { arch.short_name() },
        "vocab_size": dims.vocab,
        "hidden_size": dims.hidden,
        "intermediate_size": dims.intermediate,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "max_position_embeddings": dims.max_context,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": dims.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    });
    if matches!(arch, Arch::Qwen2 | Arch::Qwen3) {
        config["sliding_window"] = json!(dims.max_context);
        config["max_window_layers"] = json!(dims.layers);
        config["use_sliding_window"] = json!(false);
    }
    if let Some(mla) = &dims.mla {
        let extra = json!({
            "q_lora_rank": mla.q_lora_rank,
            "kv_lora_rank": mla.kv_lora_rank,
            "qk_nope_head_dim": mla.qk_nope_head_dim,
            "qk_rope_head_dim": mla.qk_rope_head_dim,
            "v_head_dim": mla.v_head_dim,
            "n_routed_experts": mla.routed_experts,
            "n_shared_experts": mla.shared_experts,
            "num_experts_per_tok": mla.experts_per_token,
            "moe_intermediate_size": mla.moe_intermediate,
            "first_k_dense_replace": mla.first_dense_layers,
            "moe_layer_freq": mla.moe_layer_freq,
            "topk_method": "greedy",
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": false,
            "routed_scaling_factor": 1.0,
            "scoring_func": "softmax",
            "attention_bias": false,
            // V2-Lite's YaRN settings, with a context stretched 4× instead of 40×.
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": dims.max_context / 4,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 0.707,
                "mscale_all_dim": 0.707
            }
        });
        if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
            config.extend(extra.clone());
        }
    }
    if arch == Arch::Qwen3 {
        config["head_dim"] = json!(dims.head_dim);
        config["attention_bias"] = json!(false);
    }

    let tensors = random_tensors(&dims, seed)?;
    let weights = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights)?;

    let write = |name: &str, value: serde_json::Value| -> Result<(), EngineError> {
        let path = out.join(name);
        let text =
            serde_json::to_string_pretty(&value).map_err(|e| EngineError::load(&path, e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| EngineError::load(&path, format!("cannot write: {e}")))
    };
    write("config.json", config)?;
    write(
        "tokenizer_config.json",
        json!({
            "bos_token": BOS,
            "eos_token": EOS,
            "add_bos_token": true,
            "chat_template": R1_TEMPLATE,
        }),
    )?;
    write(
        "generation_config.json",
        json!({"bos_token_id": bos, "eos_token_id": eos}),
    )?;
    let path = out.join("tokenizer.json");
    tokenizer
        .save(&path, true)
        .map_err(|e| EngineError::load(&path, format!("cannot write: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_tokenizer_round_trips_and_knows_the_specials() {
        let tokenizer = tiny_tokenizer().expect("trains");
        let text = "<｜User｜>Hello, 東京 🚀!<｜Assistant｜><think>\nhmm</think>ok";
        let ids = tokenizer.encode(text, false).expect("encodes").get_ids().to_vec();
        assert!(ids.len() < text.len(), "merges were learned: {} ids", ids.len());
        assert!(ids.contains(&tokenizer.token_to_id(USER).expect("user token")));
        let decoded = tokenizer.decode(&ids, false).expect("decodes");
        assert_eq!(decoded, text);
        let shown = tokenizer.decode(&ids, true).expect("decodes");
        assert!(shown.contains("<think>") && !shown.contains(USER), "{shown}");
    }
}
