//! `.gguf` file → ready-to-run model: the header picks the architecture, every tensor is
//! checked by name, shape, type and extent before any is read, then the tokenizer, chat
//! template and special ids come from the metadata.
//!
//! The layers run in lifeboat's own decoder ([`crate::engine::models::quantized_decoder`]), not candle-transformers'
//! quantized models, whose RoPE table, scaling and attention fall short (see there).

use std::{collections::HashMap, fs::File, io::BufReader, path::Path};

use candle_core::{
    Device,
    quantized::gguf_file::{Content, Value},
};

use super::loader::{Loaded, ModelInfo};
use crate::engine::{
    EngineError,
    models::{Arch, Dims, quantized_decoder::DecoderConfig},
    text::{
        chat_template::ChatTemplate,
        gguf_tokenizer::{self, GgufVocab, PreTokenizer},
        tokenizer::TextTokenizer,
    },
};

/// `general.architecture` values lifeboat runs from GGUF.
const GGUF_ARCHS: [(&str, Arch); 3] = [
    ("qwen2", Arch::Qwen2),
    ("llama", Arch::Llama),
    ("qwen3", Arch::Qwen3),
];

/// An open GGUF file with its parsed header.
pub(super) struct Header {
    pub(super) content: Content,
    pub(super) reader: BufReader<File>,
    file_len: u64,
}

fn open(path: &Path) -> Result<Header, EngineError> {
    let file = File::open(path).map_err(|err| EngineError::load(path, format!("cannot open: {err}")))?;
    let file_len = file
        .metadata()
        .map_err(|err| EngineError::load(path, format!("cannot stat: {err}")))?
        .len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let content = Content::read(&mut reader)
        .map_err(|err| EngineError::load(path, format!("not a readable GGUF file: {err}")))?;
    Ok(Header {
        content,
        reader,
        file_len,
    })
}

/// Metadata accessors that name the key in their errors.
pub(super) struct Meta<'a> {
    pub(super) path: &'a Path,
    pub(super) map: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    fn string(&self, key: &str) -> Result<&str, EngineError> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(self.wrong(key, "a string", other)),
            None => Err(EngineError::load(
                self.path,
                format!("metadata key {key} is missing"),
            )),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, EngineError> {
        match self.get(key) {
            Some(value) => value
                .to_u64()
                .map(|v| v as usize)
                .map_err(|_| self.wrong(key, "an unsigned integer", value)),
            None => Err(EngineError::load(
                self.path,
                format!("metadata key {key} is missing"),
            )),
        }
    }

    fn opt_usize(&self, key: &str) -> Option<usize> {
        self.get(key).and_then(|v| v.to_u64().ok()).map(|v| v as usize)
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, EngineError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.wrong(key, "an array of strings", other)),
                })
                .collect(),
            Some(other) => Err(self.wrong(key, "an array of strings", other)),
        }
    }

    fn ints(&self, key: &str) -> Result<Vec<i32>, EngineError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.to_i32()
                        .map_err(|_| self.wrong(key, "an array of i32", item))
                })
                .collect(),
            Some(other) => Err(self.wrong(key, "an array of i32", other)),
        }
    }

    fn wrong(&self, key: &str, expected: &str, got: &Value) -> EngineError {
        EngineError::load(
            self.path,
            format!(
                "metadata key {key} should be {expected}, found {:?}",
                got.value_type()
            ),
        )
    }
}

/// The GGUF name of a Hugging Face tensor name (the convention of llama.cpp's converter).
pub fn gguf_tensor_name(hf: &str) -> String {
    let renamed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, name)) = renamed.iter().find(|(from, _)| *from == hf) {
        return (*name).to_string();
    }
    let Some(rest) = hf.strip_prefix("model.layers.") else {
        return hf.to_string();
    };
    let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
    let parts = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    for (from, to) in parts {
        if let Some(suffix) = rest.strip_prefix(from) {
            return format!("blk.{layer}.{to}{suffix}");
        }
    }
    format!("blk.{layer}.{rest}")
}

/// Architecture and shapes from the header.
fn read_dims(meta: &Meta<'_>, content: &Content) -> Result<(Arch, Dims), EngineError> {
    let name = meta.string("general.architecture")?;
    let arch = GGUF_ARCHS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, arch)| *arch)
        .ok_or_else(|| {
            let known: Vec<&str> = GGUF_ARCHS.iter().map(|(n, _)| *n).collect();
            EngineError::load(
                meta.path,
                format!(
                    "unsupported GGUF architecture `{name}`; lifeboat serves {} from GGUF{}",
                    known.join(", "),
                    if name == "deepseek2" {
                        " (DeepSeek-V2 runs from its safetensors folder)"
                    } else {
                        ""
                    }
                ),
            )
        })?;
    let key = |suffix: &str| format!("{name}.{suffix}");
    let hidden = meta.usize(&key("embedding_length"))?;
    let heads = meta.usize(&key("attention.head_count"))?;
    let kv_heads = meta.opt_usize(&key("attention.head_count_kv")).unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(EngineError::load(
            meta.path,
            format!("{name}.attention.head_count {heads} is not a multiple of head_count_kv {kv_heads}"),
        ));
    }
    let head_dim = match meta.opt_usize(&key("attention.key_length")) {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(EngineError::load(
                meta.path,
                format!("{name}.embedding_length {hidden} is not divisible by head_count {heads}"),
            ));
        }
    };
    let vocab = match content.tensor_infos.get("token_embd.weight") {
        Some(info) => info.shape.dims().first().copied().unwrap_or(0),
        None => {
            return Err(EngineError::load(meta.path, "missing tensor token_embd.weight"));
        }
    };
    let max_context = meta.usize(&key("context_length"))?;
    Ok((
        arch,
        Dims {
            vocab,
            hidden,
            intermediate: meta.usize(&key("feed_forward_length"))?,
            layers: meta.usize(&key("block_count"))?,
            heads,
            kv_heads,
            head_dim,
            tie_embeddings: !content.tensor_infos.contains_key("output.weight"),
            qkv_bias: arch == Arch::Qwen2,
            qk_norm: arch == Arch::Qwen3,
            max_context,
            mla: None,
        },
    ))
}

/// Every tensor the model reads exists with the shape the header implies and lies
/// entirely inside the file (a truncated download is named here, not mid-load).
fn check_tensors(path: &Path, header: &Header, dims: &Dims) -> Result<(), EngineError> {
    let content = &header.content;
    for (hf_name, shape) in dims.expected_tensors() {
        let name = gguf_tensor_name(&hf_name);
        let info = content
            .tensor_infos
            .get(&name)
            .ok_or_else(|| EngineError::load(path, format!("missing tensor {name}")))?;
        if info.shape.dims() != shape.as_slice() {
            return Err(EngineError::load(
                path,
                format!(
                    "tensor {name} has shape {:?}, the header implies {shape:?}",
                    info.shape.dims()
                ),
            ));
        }
    }
    for (name, info) in &content.tensor_infos {
        let elems = info.shape.elem_count() as u64;
        let block = info.ggml_dtype.block_size() as u64;
        if !elems.is_multiple_of(block) {
            return Err(EngineError::load(
                path,
                format!(
                    "tensor {name}: {elems} elements do not fill {:?} blocks of {block}",
                    info.ggml_dtype
                ),
            ));
        }
        let end =
            content.tensor_data_offset + info.offset + elems / block * info.ggml_dtype.type_size() as u64;
        if end > header.file_len {
            return Err(EngineError::load(
                path,
                format!(
                    "truncated file: tensor {name} ends at byte {end}, the file has {} bytes",
                    header.file_len
                ),
            ));
        }
    }
    Ok(())
}

/// What the header says about text: tokenizer, chat template and special ids.
struct TextSide {
    tokenizer: TextTokenizer,
    template: Option<ChatTemplate>,
    eos_ids: Vec<u32>,
    /// Prepended to raw prompts (only when the file asks for BOS).
    bos_id: Option<u32>,
}

fn read_tokenizer(meta: &Meta<'_>) -> Result<TextSide, EngineError> {
    let vocab = GgufVocab {
        model: meta.string("tokenizer.ggml.model")?.to_string(),
        pre: match meta.get("tokenizer.ggml.pre") {
            Some(_) => meta.string("tokenizer.ggml.pre")?.to_string(),
            None => "default".to_string(),
        },
        tokens: meta.strings("tokenizer.ggml.tokens")?,
        token_types: meta.ints("tokenizer.ggml.token_type")?,
        merges: meta.strings("tokenizer.ggml.merges")?,
    };
    let tokenizer = gguf_tokenizer::build(&vocab).map_err(|message| EngineError::load(meta.path, message))?;
    let tokenizer = TextTokenizer::from_tokenizer(tokenizer);
    let token_text = |id: Option<usize>| {
        id.and_then(|id| vocab.tokens.get(id))
            .cloned()
            .unwrap_or_default()
    };
    let bos = meta.opt_usize("tokenizer.ggml.bos_token_id");
    let eos = meta.opt_usize("tokenizer.ggml.eos_token_id");
    let template = match meta.get("tokenizer.chat_template") {
        Some(_) => Some(
            ChatTemplate::new(
                meta.string("tokenizer.chat_template")?,
                &token_text(bos),
                &token_text(eos),
            )
            .map_err(|err| EngineError::load(meta.path, format!("tokenizer.chat_template: {err}")))?,
        ),
        None => None,
    };
    // Generation ends at EOS, at EOT (end of turn) and at `<|im_end|>`-style tokens the
    // converter marked as end-of-generation.
    let mut eos_ids: Vec<u32> = [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ]
    .iter()
    .filter_map(|key| meta.opt_usize(key))
    .map(|id| id as u32)
    .collect();
    for end in [
        "<|im_end|>",
        "<|endoftext|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end_of_text|>",
        "<｜end▁of▁sentence｜>",
    ] {
        if let Some(id) = tokenizer.token_id(end) {
            eos_ids.push(id);
        }
    }
    eos_ids.sort_unstable();
    eos_ids.dedup();
    let pre_default = PreTokenizer::for_name(&vocab.pre).is_some_and(|p| p.add_bos_default);
    let add_bos = match meta.get("tokenizer.ggml.add_bos_token") {
        Some(value) => value.to_bool().unwrap_or(pre_default),
        None => pre_default,
    };
    let bos_id = if add_bos { bos.map(|id| id as u32) } else { None };
    Ok(TextSide {
        tokenizer,
        template,
        eos_ids,
        bos_id,
    })
}

/// Read the header's facts without loading weights (`model inspect`, tokenizer tests).
pub fn read_info(path: &Path) -> Result<ModelInfo, EngineError> {
    let header = open(path)?;
    info_from_header(path, &header)
}

fn info_from_header(path: &Path, header: &Header) -> Result<ModelInfo, EngineError> {
    let meta = Meta {
        path,
        map: &header.content.metadata,
    };
    let (arch, dims) = read_dims(&meta, &header.content)?;
    let text = read_tokenizer(&meta)?;
    let mut weight_types = std::collections::BTreeMap::new();
    for info in header.content.tensor_infos.values() {
        *weight_types.entry(format!("{:?}", info.ggml_dtype)).or_insert(0) += 1;
    }
    Ok(ModelInfo {
        arch,
        dims,
        tokenizer: text.tokenizer,
        template: text.template,
        eos_ids: text.eos_ids,
        bos_id: text.bos_id,
        weight_types,
        tokenizer_source: format!(
            "GGUF metadata (tokenizer.ggml.pre {})",
            meta.get("tokenizer.ggml.pre")
                .and_then(|_| meta.string("tokenizer.ggml.pre").ok())
                .unwrap_or("(none: default)")
        ),
    })
}

/// The tokenizer alone (the DeepSeek header-only file has no usable tensors).
pub fn read_tokenizer_only(path: &Path) -> Result<TextTokenizer, EngineError> {
    let header = open(path)?;
    let meta = Meta {
        path,
        map: &header.content.metadata,
    };
    Ok(read_tokenizer(&meta)?.tokenizer)
}

/// The decoder's settings from the header (RoPE base, scaling, norm epsilon).
pub(super) fn decoder_config(
    meta: &Meta<'_>,
    info: &ModelInfo,
    freq_factors: Option<Vec<f32>>,
) -> Result<DecoderConfig, EngineError> {
    let name = info.arch.short_name();
    let key = |suffix: &str| format!("{name}.{suffix}");
    let float = |k: &str| meta.get(k).and_then(|v| v.to_f32().ok());
    let rms_eps = float(&key("attention.layer_norm_rms_epsilon")).ok_or_else(|| {
        EngineError::load(
            meta.path,
            format!("metadata key {name}.attention.layer_norm_rms_epsilon is missing"),
        )
    })?;
    if let Some(dims) = meta.opt_usize(&key("rope.dimension_count"))
        && dims != info.dims.head_dim
    {
        return Err(EngineError::load(
            meta.path,
            format!(
                "{name}.rope.dimension_count {dims} differs from the head size {}; partial RoPE is not supported",
                info.dims.head_dim
            ),
        ));
    }
    let scaling = match meta.get(&key("rope.scaling.type")) {
        Some(_) => meta.string(&key("rope.scaling.type"))?.to_string(),
        None => "none".to_string(),
    };
    let rope_linear_factor = match scaling.as_str() {
        "none" => float(&key("rope.scale_linear")).unwrap_or(1.0),
        "linear" => float(&key("rope.scaling.factor")).unwrap_or(1.0),
        other => {
            return Err(EngineError::load(
                meta.path,
                format!(
                    "{name}.rope.scaling.type `{other}` is not implemented (lifeboat implements none, linear and llama3 frequency factors)"
                ),
            ));
        }
    };
    if let Some(factors) = &freq_factors
        && factors.len() != info.dims.head_dim / 2
    {
        return Err(EngineError::load(
            meta.path,
            format!(
                "tensor rope_freqs.weight has {} entries, the head size {} needs {}",
                factors.len(),
                info.dims.head_dim,
                info.dims.head_dim / 2
            ),
        ));
    }
    Ok(DecoderConfig {
        arch: info.arch,
        hidden: info.dims.hidden,
        heads: info.dims.heads,
        kv_heads: info.dims.kv_heads,
        head_dim: info.dims.head_dim,
        rms_eps,
        rope_theta: float(&key("rope.freq_base")).unwrap_or(10_000.0),
        rope_linear_factor,
        rope_freq_factors: freq_factors,
        max_context: info.dims.max_context,
    })
}

/// Load a `.gguf` file onto `device`.
pub fn load(path: &Path, device: &Device) -> Result<Loaded, EngineError> {
    let header = open(path)?;
    let info = info_from_header(path, &header)?;
    check_tensors(path, &header, &info.dims)?;
    let model = super::gguf_weights::build_decoder(path, header, &info, device)?;
    Ok(Loaded {
        model: Box::new(model),
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_map_to_gguf_names() {
        assert_eq!(gguf_tensor_name("model.embed_tokens.weight"), "token_embd.weight");
        assert_eq!(gguf_tensor_name("lm_head.weight"), "output.weight");
        assert_eq!(
            gguf_tensor_name("model.layers.3.self_attn.q_proj.bias"),
            "blk.3.attn_q.bias"
        );
        assert_eq!(
            gguf_tensor_name("model.layers.11.post_attention_layernorm.weight"),
            "blk.11.ffn_norm.weight"
        );
        assert_eq!(
            gguf_tensor_name("model.layers.0.self_attn.k_norm.weight"),
            "blk.0.attn_k_norm.weight"
        );
    }
}
