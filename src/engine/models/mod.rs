//! The models: the interface the engine needs (as small as candle's: forward and clear the
//! cache), the supported architectures, and the tensors each one must have. Beside it,
//! DeepSeek-V2 (`deepseek2`), lifeboat's own decoder for GGUF models
//! (`quantized_decoder`, several sequences per step), its quantized linear layer
//! (`qlinear`, which picks a kernel), decode attention on slices (`decode_attention`) and
//! the per-slot KV cache (`kv_cache`).
//!
//! The layer code is candle-transformers'; this module checks every tensor's presence
//! and shape first, because some candle loaders panic on a missing tensor.

mod decode_attention;
pub mod deepseek2;
mod kv_cache;
pub mod qlinear;
pub mod quantized_decoder;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, qwen2, qwen3};
use serde_json::Value;

use deepseek2::MlaMoe;

/// A causal language model with its own KV cache: one sequence at a time, or — when
/// [`CausalLm::max_sequences`] says so — several in one step, each in its own cache slot.
pub trait CausalLm: Send {
    /// Logits for the last position of `ids` (`[1, seq]`), as a `[vocab]` tensor;
    /// `pos` is the number of tokens already in the cache.
    fn forward(&mut self, ids: &Tensor, pos: usize) -> candle_core::Result<Tensor>;
    fn clear_kv_cache(&mut self);

    /// Sequences one step may carry (1: the model has a single cache).
    fn max_sequences(&self) -> usize {
        1
    }

    /// Memory one cached position takes, for the KV budget (0: not known).
    fn kv_bytes_per_token(&self) -> usize {
        0
    }

    /// One step for several sequences; returns each step's last-position logits
    /// (`[vocab]`). `pos` 0 starts the slot's sequence afresh.
    fn forward_slots(&mut self, steps: &[SlotStep<'_>], device: &Device) -> candle_core::Result<Vec<Tensor>> {
        let [step] = steps else {
            candle_core::bail!("this model decodes one sequence at a time, got {}", steps.len());
        };
        let ids = Tensor::new(step.tokens, device)?.unsqueeze(0)?;
        Ok(vec![self.forward(&ids, step.pos)?])
    }

    /// The slot's sequence is over: its cache may be dropped.
    fn release_slot(&mut self, _slot: usize) {
        self.clear_kv_cache();
    }
}

/// New tokens for one sequence in a batched step.
#[derive(Debug, Clone, Copy)]
pub struct SlotStep<'a> {
    /// The sequence's cache slot (below the number of sequences in flight).
    pub slot: usize,
    pub tokens: &'a [u32],
    /// Positions already in the slot's cache.
    pub pos: usize,
}

/// Architectures from `config.json` `architectures`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Qwen2,
    Llama,
    Qwen3,
    DeepseekV2,
}

impl Arch {
    pub const ALL: [Arch; 4] = [Arch::Qwen2, Arch::Llama, Arch::Qwen3, Arch::DeepseekV2];

    /// The Hugging Face class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::DeepseekV2 => "DeepseekV2ForCausalLM",
        }
    }

    /// Short name for `--arch` and logs.
    pub fn short_name(self) -> &'static str {
        match self {
            Arch::Qwen2 => "qwen2",
            Arch::Llama => "llama",
            Arch::Qwen3 => "qwen3",
            Arch::DeepseekV2 => "deepseek2",
        }
    }

    pub fn from_short_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.short_name() == name)
    }

    /// The first known class among `architectures`; a precise error otherwise.
    pub fn from_architectures(names: &[String]) -> Result<Arch, String> {
        names
            .iter()
            .find_map(|n| Arch::ALL.into_iter().find(|a| a.class_name() == n))
            .ok_or_else(|| {
                let known: Vec<&str> = Arch::ALL.iter().map(|a| a.class_name()).collect();
                format!(
                    "unsupported architecture {names:?}; lifeboat serves {}",
                    known.join(", ")
                )
            })
    }
}

/// The shape facts shared by the dense architectures, read from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dims {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub tie_embeddings: bool,
    /// q/k/v projections have biases (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k (Qwen3).
    pub qk_norm: bool,
    pub max_context: usize,
    /// DeepSeek-V2's latent attention and experts (`head_dim` is then the query/key width).
    pub mla: Option<MlaMoe>,
}

/// A positive integer of `config.json`, or an error naming the key.
pub(super) fn field(config: &Value, key: &str) -> Result<usize, String> {
    config
        .get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| format!("config.json: `{key}` is missing or not a positive integer"))
}

impl Dims {
    pub fn from_config(arch: Arch, config: &Value) -> Result<Dims, String> {
        let hidden = field(config, "hidden_size")?;
        let heads = field(config, "num_attention_heads")?;
        if heads == 0 || hidden % heads != 0 {
            return Err(format!(
                "config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
            ));
        }
        let kv_heads = field(config, "num_key_value_heads").unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(format!(
                "config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            ));
        }
        let mla = match arch {
            Arch::DeepseekV2 => Some(MlaMoe::from_config(config)?),
            _ => None,
        };
        let head_dim = match (arch, &mla) {
            (_, Some(mla)) => mla.q_head_dim(),
            (Arch::Qwen3, None) => field(config, "head_dim").unwrap_or(hidden / heads),
            _ => hidden / heads,
        };
        Ok(Dims {
            vocab: field(config, "vocab_size")?,
            hidden,
            intermediate: field(config, "intermediate_size")?,
            layers: field(config, "num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            tie_embeddings: config
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2,
            qk_norm: arch == Arch::Qwen3,
            max_context: field(config, "max_position_embeddings")?,
            mla,
        })
    }

    /// Every tensor the model reads, with its shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, q, kv) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        );
        let mut tensors = vec![
            ("model.embed_tokens.weight".to_string(), vec![self.vocab, h]),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !self.tie_embeddings {
            tensors.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        if let Some(mla) = &self.mla {
            for i in 0..self.layers {
                tensors.extend(mla.layer_tensors(i, h, self.heads, self.intermediate));
            }
            return tensors;
        }
        for i in 0..self.layers {
            let p = |name: &str| format!("model.layers.{i}.{name}");
            tensors.extend([
                (p("self_attn.q_proj.weight"), vec![q, h]),
                (p("self_attn.k_proj.weight"), vec![kv, h]),
                (p("self_attn.v_proj.weight"), vec![kv, h]),
                (p("self_attn.o_proj.weight"), vec![h, q]),
                (p("mlp.gate_proj.weight"), vec![self.intermediate, h]),
                (p("mlp.up_proj.weight"), vec![self.intermediate, h]),
                (p("mlp.down_proj.weight"), vec![h, self.intermediate]),
                (p("input_layernorm.weight"), vec![h]),
                (p("post_attention_layernorm.weight"), vec![h]),
            ]);
            if self.qkv_bias {
                tensors.extend([
                    (p("self_attn.q_proj.bias"), vec![q]),
                    (p("self_attn.k_proj.bias"), vec![kv]),
                    (p("self_attn.v_proj.bias"), vec![kv]),
                ]);
            }
            if self.qk_norm {
                tensors.extend([
                    (p("self_attn.q_norm.weight"), vec![self.head_dim]),
                    (p("self_attn.k_norm.weight"), vec![self.head_dim]),
                ]);
            }
        }
        tensors
    }
}

struct Qwen2(qwen2::ModelForCausalLM);
struct Qwen3(qwen3::ModelForCausalLM);
struct Llama {
    model: llama::Llama,
    cache: llama::Cache,
    config: llama::Config,
    dtype: DType,
    device: Device,
}

/// `[.., vocab]` of the last position → `[vocab]`.
fn last_logits(logits: Tensor) -> candle_core::Result<Tensor> {
    let vocab = logits.dim(candle_core::D::Minus1)?;
    let flat = logits.flatten_all()?;
    let n = flat.dim(0)?;
    flat.narrow(0, n - vocab, vocab)
}

impl CausalLm for Qwen2 {
    fn forward(&mut self, ids: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        last_logits(self.0.forward(ids, pos)?)
    }
    fn clear_kv_cache(&mut self) {
        self.0.clear_kv_cache();
    }
}

impl CausalLm for Qwen3 {
    fn forward(&mut self, ids: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        last_logits(self.0.forward(ids, pos)?)
    }
    fn clear_kv_cache(&mut self) {
        self.0.clear_kv_cache();
    }
}

impl CausalLm for Llama {
    fn forward(&mut self, ids: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        last_logits(self.model.forward(ids, pos, &mut self.cache)?)
    }
    fn clear_kv_cache(&mut self) {
        // candle's llama cache has no reset; a fresh one is cheap (masks are lazy).
        if let Ok(cache) = llama::Cache::new(true, self.dtype, &self.config, &self.device) {
            self.cache = cache;
        }
    }
}

/// The `type` (or `rope_type`) of `config.json`'s `rope_scaling`, if it has one.
fn rope_scaling_type(config: &Value) -> Option<String> {
    let scaling = config.get("rope_scaling").filter(|s| !s.is_null())?;
    Some(
        ["rope_type", "type"]
            .iter()
            .find_map(|key| scaling.get(*key).and_then(Value::as_str))
            .unwrap_or("(no type)")
            .to_string(),
    )
}

/// candle's Qwen2/Qwen3 ignore `rope_scaling`; serving such a model unscaled would be
/// silently wrong beyond its original context, so it is refused.
fn refuse_rope_scaling(arch: Arch, config: &Value) -> Result<(), String> {
    match rope_scaling_type(config) {
        Some(kind) if kind != "default" => Err(format!(
            "config.json: rope_scaling `{kind}` is not supported for {} (only unscaled RoPE)",
            arch.class_name()
        )),
        _ => Ok(()),
    }
}

/// Remove a linear `rope_scaling` from a Llama config and return its factor; llama3 stays
/// for candle, anything else is refused by name.
fn take_linear_rope_scaling(config: &mut Value) -> Result<Option<f32>, String> {
    match rope_scaling_type(config).as_deref() {
        None | Some("llama3") | Some("default") => Ok(None),
        Some("linear") => {
            let factor = config["rope_scaling"]
                .get("factor")
                .and_then(Value::as_f64)
                .filter(|f| *f >= 1.0)
                .ok_or("config.json: rope_scaling.factor must be a number ≥ 1 for linear scaling")?;
            if let Some(object) = config.as_object_mut() {
                object.remove("rope_scaling");
            }
            Ok(Some(factor as f32))
        }
        Some(kind) => Err(format!(
            "config.json: rope_scaling `{kind}` is not supported for LlamaForCausalLM (linear and llama3 are)"
        )),
    }
}

/// Build the model from checked tensors.
pub fn build(
    arch: Arch,
    config: &Value,
    vb: VarBuilder<'static>,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn CausalLm>, String> {
    let parse_error =
        |err: serde_json::Error| format!("config.json does not describe a {}: {err}", arch.class_name());
    let model: Box<dyn CausalLm> = match arch {
        Arch::Qwen2 => {
            refuse_rope_scaling(arch, config)?;
            let cfg: qwen2::Config = serde_json::from_value(config.clone()).map_err(parse_error)?;
            Box::new(Qwen2(
                qwen2::ModelForCausalLM::new(&cfg, vb).map_err(|e| e.to_string())?,
            ))
        }
        Arch::Qwen3 => {
            refuse_rope_scaling(arch, config)?;
            let cfg: qwen3::Config = serde_json::from_value(config.clone()).map_err(parse_error)?;
            Box::new(Qwen3(
                qwen3::ModelForCausalLM::new(&cfg, vb).map_err(|e| e.to_string())?,
            ))
        }
        Arch::Llama => {
            let mut config = config.clone();
            let linear = take_linear_rope_scaling(&mut config)?;
            let cfg: llama::LlamaConfig = serde_json::from_value(config).map_err(parse_error)?;
            let mut cfg = cfg.into_config(false);
            if let Some(factor) = linear {
                // Linear scaling (deepseek-coder) divides every RoPE frequency by `factor`.
                // candle's llama knows only the llama3 rule; with both wavelength bounds at
                // zero every frequency falls in its "low" band, which is divided by `factor`.
                cfg.rope_scaling = Some(llama::Llama3RopeConfig {
                    factor,
                    low_freq_factor: f32::INFINITY,
                    high_freq_factor: f32::INFINITY,
                    original_max_position_embeddings: cfg.max_position_embeddings,
                    rope_type: llama::Llama3RopeType::Llama3,
                });
            }
            let cache = llama::Cache::new(true, dtype, &cfg, device).map_err(|e| e.to_string())?;
            Box::new(Llama {
                model: llama::Llama::load(vb, &cfg).map_err(|e| e.to_string())?,
                cache,
                config: cfg,
                dtype,
                device: device.clone(),
            })
        }
        Arch::DeepseekV2 => deepseek2::build(config, vb)?,
    };
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_are_recognised_or_refused_precisely() {
        assert_eq!(
            Arch::from_architectures(&["Qwen2ForCausalLM".into()]),
            Ok(Arch::Qwen2)
        );
        let err = Arch::from_architectures(&["MambaForCausalLM".into()]).expect_err("unknown");
        assert!(
            err.contains("MambaForCausalLM") && err.contains("Qwen2ForCausalLM"),
            "{err}"
        );
    }

    #[test]
    fn rope_scaling_is_mapped_or_refused_by_name() {
        let mut llama = serde_json::json!({"rope_scaling": {"type": "linear", "factor": 4.0}});
        assert_eq!(take_linear_rope_scaling(&mut llama), Ok(Some(4.0)));
        assert!(llama.get("rope_scaling").is_none(), "{llama}");
        let mut llama3 = serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}});
        assert_eq!(take_linear_rope_scaling(&mut llama3), Ok(None));
        assert!(llama3.get("rope_scaling").is_some());
        let mut dynamic = serde_json::json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}});
        let err = take_linear_rope_scaling(&mut dynamic).expect_err("refused");
        assert!(
            err.contains("dynamic") && err.contains("linear and llama3"),
            "{err}"
        );
        let qwen = serde_json::json!({"rope_scaling": {"type": "yarn", "factor": 4.0}});
        let err = refuse_rope_scaling(Arch::Qwen2, &qwen).expect_err("refused");
        assert!(err.contains("yarn") && err.contains("Qwen2ForCausalLM"), "{err}");
        assert!(refuse_rope_scaling(Arch::Qwen3, &serde_json::json!({"rope_scaling": null})).is_ok());
    }

    #[test]
    fn bad_dims_are_named() {
        let config = serde_json::json!({"hidden_size": 10, "num_attention_heads": 3});
        let err = Dims::from_config(Arch::Qwen2, &config).expect_err("indivisible");
        assert!(err.contains("not divisible"), "{err}");
        let config = serde_json::json!({"hidden_size": 8, "num_attention_heads": 2});
        let err = Dims::from_config(Arch::Qwen2, &config).expect_err("missing");
        assert!(err.contains("vocab_size"), "{err}");
    }
}
