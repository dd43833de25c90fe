//! `lifeboat model make-tiny --gguf`: the tiny test model as one GGUF file (f32 tensors
//! under llama.cpp's names, its metadata keys, the tokenizer in `tokenizer.ggml.*`), so the
//! GGUF path runs in tests without downloads and meets the same reference logits.

use std::{fs::File, io::BufWriter, path::Path};

use candle_core::{
    Device, Tensor,
    quantized::{GgmlDType, QTensor, gguf_file},
};
use serde_json::Value as Json;

use super::tiny::{self, R1_TEMPLATE};
use crate::engine::{EngineError, load::gguf::gguf_tensor_name, models::Arch};

/// Metadata and tensors of a GGUF file before writing; tests edit them to make broken files.
#[derive(Debug)]
pub struct GgufParts {
    pub metadata: Vec<(String, gguf_file::Value)>,
    pub tensors: Vec<(String, QTensor)>,
}

impl GgufParts {
    /// Replace (or add) one metadata entry.
    pub fn set(&mut self, key: &str, value: gguf_file::Value) {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value));
    }
}

/// llama.cpp's converter reorders the rows of Q and K for llama so that its interleaved
/// RoPE (pairs 2i, 2i+1) computes what Hugging Face's half-split RoPE does.
fn permute_for_interleaved_rope(weight: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    weight
        .reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

fn tokenizer_metadata(
    tokenizer: &tokenizers::Tokenizer,
) -> Result<Vec<(String, gguf_file::Value)>, EngineError> {
    use gguf_file::Value;
    let vocab = tokenizer.get_vocab(true);
    let mut tokens = vec![String::new(); vocab.len()];
    for (token, id) in &vocab {
        if let Some(slot) = tokens.get_mut(*id as usize) {
            slot.clone_from(token);
        }
    }
    let added = tokenizer.get_added_tokens_decoder();
    let types: Vec<Value> = (0..tokens.len() as u32)
        .map(|id| match added.get(&id) {
            Some(token) if token.special => Value::I32(3),
            Some(_) => Value::I32(4),
            None => Value::I32(1),
        })
        .collect();
    let json: Json = serde_json::from_str(
        &tokenizer
            .to_string(false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?,
    )
    .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    let merges: Vec<Value> = json["model"]["merges"]
        .as_array()
        .map(|merges| {
            merges
                .iter()
                .filter_map(|m| match m {
                    Json::String(s) => Some(s.clone()),
                    Json::Array(pair) => {
                        Some(format!("{} {}", pair.first()?.as_str()?, pair.get(1)?.as_str()?))
                    }
                    _ => None,
                })
                .map(Value::String)
                .collect()
        })
        .unwrap_or_default();
    let id = |t: &str| Value::U32(tokenizer.token_to_id(t).unwrap_or(0));
    Ok(vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), id(tiny::BOS)),
        ("tokenizer.ggml.eos_token_id".into(), id(tiny::EOS)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        (
            "tokenizer.chat_template".into(),
            Value::String(R1_TEMPLATE.into()),
        ),
    ])
}

/// The tiny `arch` model (the same weights `make_tiny` writes for `seed`) as GGUF parts.
pub fn tiny_gguf_parts(arch: Arch, seed: u64) -> Result<GgufParts, EngineError> {
    use gguf_file::Value;
    if arch == Arch::DeepseekV2 {
        return Err(EngineError::Tokenizer("deepseek2 has no tiny GGUF form".into()));
    }
    let tokenizer = tiny::tiny_tokenizer()?;
    let dims = tiny::tiny_dims(arch, tokenizer.get_vocab_size(true));
    let name = arch.short_name();
    let key = |suffix: &str| format!("{name}.{suffix}");
    let mut metadata = vec![
        ("general.architecture".to_string(), Value::String(name.into())),
        (
            "general.name".to_string(),
            Value::String(format!("lifeboat tiny {name}")),
        ),
        (key("context_length"), Value::U32(dims.max_context as u32)),
        (key("embedding_length"), Value::U32(dims.hidden as u32)),
        (key("feed_forward_length"), Value::U32(dims.intermediate as u32)),
        (key("block_count"), Value::U32(dims.layers as u32)),
        (key("attention.head_count"), Value::U32(dims.heads as u32)),
        (key("attention.head_count_kv"), Value::U32(dims.kv_heads as u32)),
        (key("attention.key_length"), Value::U32(dims.head_dim as u32)),
        (key("attention.value_length"), Value::U32(dims.head_dim as u32)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (key("rope.freq_base"), Value::F32(10000.0)),
        (key("rope.dimension_count"), Value::U32(dims.head_dim as u32)),
    ];
    metadata.extend(tokenizer_metadata(&tokenizer)?);

    let mut tensors = Vec::new();
    let mut weights: Vec<(String, Tensor)> = tiny::random_tensors(&dims, seed)?.into_iter().collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    for (hf_name, mut tensor) in weights {
        if arch == Arch::Llama {
            if hf_name.ends_with("self_attn.q_proj.weight") {
                tensor = permute_for_interleaved_rope(&tensor, dims.heads)?;
            } else if hf_name.ends_with("self_attn.k_proj.weight") {
                tensor = permute_for_interleaved_rope(&tensor, dims.kv_heads)?;
            }
        }
        let tensor = tensor.to_device(&Device::Cpu)?;
        tensors.push((
            gguf_tensor_name(&hf_name),
            QTensor::quantize(&tensor, GgmlDType::F32)?,
        ));
    }
    Ok(GgufParts { metadata, tensors })
}

/// Write `parts` as a GGUF file.
pub fn write_gguf(path: &Path, parts: &GgufParts) -> Result<(), EngineError> {
    let file = File::create(path).map_err(|e| EngineError::load(path, format!("cannot create: {e}")))?;
    let mut writer = BufWriter::new(file);
    let metadata: Vec<(&str, &gguf_file::Value)> =
        parts.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = parts.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut writer, &metadata, &tensors)
        .map_err(|e| EngineError::load(path, format!("cannot write GGUF: {e}")))?;
    std::io::Write::flush(&mut writer).map_err(|e| EngineError::load(path, format!("cannot write: {e}")))
}

/// Write the tiny `arch` model as one `.gguf` file.
pub fn make_tiny_gguf(arch: Arch, out: &Path, seed: u64) -> Result<(), EngineError> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| EngineError::load(parent, format!("cannot create: {e}")))?;
    }
    write_gguf(out, &tiny_gguf_parts(arch, seed)?)
}
