//! DeepSeek-V2 (`DeepseekV2ForCausalLM`: DeepSeek-V2-Lite(-Chat), DeepSeek-Coder-V2-Lite):
//! multi-head latent attention (MLA) and a mixture of experts with shared experts.
//!
//! The shapes are read and every tensor checked here; the layers are candle-transformers'
//! `deepseek2`, whose logits match Hugging Face transformers on the tiny model (see
//! tests/logits.rs). Configurations its code gets wrong are refused instead of served:
//! `group_limited_greedy` routing (the 236B models; candle's version selects groups from
//! the wrong scores) and scoring functions other than softmax (DeepSeek-V3's sigmoid).

use candle_core::Tensor;
use candle_nn::VarBuilder;
use candle_transformers::models::deepseek2;
use serde_json::Value;

use super::{CausalLm, field};

/// The MLA and MoE dimensions of a DeepSeek-V2 model, from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaMoe {
    /// Queries through a low-rank projection (the 236B models); `None` in the Lite ones.
    pub q_lora_rank: Option<usize>,
    /// Width of the compressed key/value latent that the cache would hold.
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub routed_experts: usize,
    pub shared_experts: usize,
    pub experts_per_token: usize,
    pub moe_intermediate: usize,
    /// Layers before this one use a dense MLP.
    pub first_dense_layers: usize,
    /// Every this many layers (after the dense ones) is a MoE layer.
    pub moe_layer_freq: usize,
}

fn optional(config: &Value, key: &str, default: usize) -> Result<usize, String> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(_) => field(config, key),
    }
}

impl MlaMoe {
    pub fn from_config(config: &Value) -> Result<MlaMoe, String> {
        let text = |key: &str| config.get(key).and_then(Value::as_str);
        if let Some(method) = text("topk_method").filter(|m| *m != "greedy") {
            return Err(format!(
                "config.json: topk_method `{method}` is not supported (lifeboat serves DeepSeek-V2 \
                 models with greedy expert routing: V2-Lite, Coder-V2-Lite)"
            ));
        }
        if let Some(scoring) = text("scoring_func").filter(|s| *s != "softmax") {
            return Err(format!(
                "config.json: scoring_func `{scoring}` is not supported (DeepSeek-V2 uses softmax)"
            ));
        }
        let mla = MlaMoe {
            q_lora_rank: match config.get("q_lora_rank") {
                None | Some(Value::Null) => None,
                Some(_) => Some(field(config, "q_lora_rank")?),
            },
            kv_lora_rank: field(config, "kv_lora_rank")?,
            qk_nope_head_dim: field(config, "qk_nope_head_dim")?,
            qk_rope_head_dim: field(config, "qk_rope_head_dim")?,
            v_head_dim: field(config, "v_head_dim")?,
            routed_experts: optional(config, "n_routed_experts", 0)?,
            shared_experts: optional(config, "n_shared_experts", 0)?,
            experts_per_token: optional(config, "num_experts_per_tok", 0)?,
            moe_intermediate: optional(config, "moe_intermediate_size", 0)?,
            first_dense_layers: optional(config, "first_k_dense_replace", 0)?,
            moe_layer_freq: optional(config, "moe_layer_freq", 1)?,
        };
        if !mla.qk_rope_head_dim.is_multiple_of(2) {
            return Err(format!(
                "config.json: qk_rope_head_dim {} must be even (RoPE rotates pairs)",
                mla.qk_rope_head_dim
            ));
        }
        if mla.routed_experts > 0 {
            if mla.experts_per_token == 0 || mla.experts_per_token > mla.routed_experts {
                return Err(format!(
                    "config.json: num_experts_per_tok {} must be between 1 and n_routed_experts {}",
                    mla.experts_per_token, mla.routed_experts
                ));
            }
            if mla.moe_intermediate == 0 || mla.moe_layer_freq == 0 {
                return Err(
                    "config.json: a MoE model needs moe_intermediate_size and moe_layer_freq ≥ 1".into(),
                );
            }
        }
        Ok(mla)
    }

    /// Width of one query/key head: the part without position plus the rotated part.
    pub fn q_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether layer `index` is a MoE layer (the rule of the reference code).
    pub fn is_moe_layer(&self, index: usize) -> bool {
        self.routed_experts > 0
            && index >= self.first_dense_layers
            && index.is_multiple_of(self.moe_layer_freq)
    }

    /// The tensors of layer `index` (prefix `model.layers.{index}.`), with their shapes.
    pub fn layer_tensors(
        &self,
        index: usize,
        hidden: usize,
        heads: usize,
        intermediate: usize,
    ) -> Vec<(String, Vec<usize>)> {
        let p = |name: &str| format!("model.layers.{index}.{name}");
        let q_out = heads * self.q_head_dim();
        let mut tensors = Vec::new();
        match self.q_lora_rank {
            Some(rank) => tensors.extend([
                (p("self_attn.q_a_proj.weight"), vec![rank, hidden]),
                (p("self_attn.q_a_layernorm.weight"), vec![rank]),
                (p("self_attn.q_b_proj.weight"), vec![q_out, rank]),
            ]),
            None => tensors.push((p("self_attn.q_proj.weight"), vec![q_out, hidden])),
        }
        tensors.extend([
            (
                p("self_attn.kv_a_proj_with_mqa.weight"),
                vec![self.kv_lora_rank + self.qk_rope_head_dim, hidden],
            ),
            (p("self_attn.kv_a_layernorm.weight"), vec![self.kv_lora_rank]),
            (
                p("self_attn.kv_b_proj.weight"),
                vec![
                    heads * (self.qk_nope_head_dim + self.v_head_dim),
                    self.kv_lora_rank,
                ],
            ),
            (
                p("self_attn.o_proj.weight"),
                vec![hidden, heads * self.v_head_dim],
            ),
            (p("input_layernorm.weight"), vec![hidden]),
            (p("post_attention_layernorm.weight"), vec![hidden]),
        ]);
        let mlp = |prefix: String, width: usize| {
            [
                (format!("{prefix}.gate_proj.weight"), vec![width, hidden]),
                (format!("{prefix}.up_proj.weight"), vec![width, hidden]),
                (format!("{prefix}.down_proj.weight"), vec![hidden, width]),
            ]
        };
        if self.is_moe_layer(index) {
            tensors.push((p("mlp.gate.weight"), vec![self.routed_experts, hidden]));
            for expert in 0..self.routed_experts {
                tensors.extend(mlp(p(&format!("mlp.experts.{expert}")), self.moe_intermediate));
            }
            if self.shared_experts > 0 {
                tensors.extend(mlp(
                    p("mlp.shared_experts"),
                    self.moe_intermediate * self.shared_experts,
                ));
            }
        } else {
            tensors.extend(mlp(p("mlp"), intermediate));
        }
        tensors
    }
}

struct DeepseekV2(deepseek2::DeepSeekV2);

impl CausalLm for DeepseekV2 {
    fn forward(&mut self, ids: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        // candle's model already returns the last position's logits, `[1, vocab]`.
        self.0.forward(ids, pos)?.flatten_all()
    }
    fn clear_kv_cache(&mut self) {
        self.0.clear_kv_cache();
    }
}

/// Build the model from checked tensors.
pub fn build(config: &Value, vb: VarBuilder<'static>) -> Result<Box<dyn CausalLm>, String> {
    MlaMoe::from_config(config)?;
    let mut config = config.clone();
    // Lite configs leave these out; candle's parser needs them (one group: no grouping).
    for key in ["n_group", "topk_group"] {
        if config.get(key).is_none_or(Value::is_null) {
            config[key] = Value::from(1);
        }
    }
    let cfg: deepseek2::DeepSeekV2Config = serde_json::from_value(config)
        .map_err(|err| format!("config.json does not describe a DeepseekV2ForCausalLM: {err}"))?;
    let model = deepseek2::DeepSeekV2::new(&cfg, vb).map_err(|e| e.to_string())?;
    Ok(Box::new(DeepseekV2(model)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lite() -> Value {
        json!({
            "kv_lora_rank": 512, "q_lora_rank": null, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
            "n_shared_experts": 2, "num_experts_per_tok": 6, "moe_intermediate_size": 1408,
            "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy",
            "scoring_func": "softmax"
        })
    }

    #[test]
    fn lite_dims_and_layer_kinds() {
        let mla = MlaMoe::from_config(&lite()).expect("V2-Lite config");
        assert_eq!(mla.q_head_dim(), 192);
        assert!(!mla.is_moe_layer(0) && mla.is_moe_layer(1) && mla.is_moe_layer(26));
        let layer1 = mla.layer_tensors(1, 2048, 16, 10944);
        // q, kv_a, kv_a_norm, kv_b, o, two norms, the router, 64 experts × 3, shared × 3.
        assert_eq!(layer1.len(), 7 + 1 + 64 * 3 + 3);
        assert!(layer1.contains(&(
            "model.layers.1.self_attn.kv_b_proj.weight".to_string(),
            vec![16 * 256, 512]
        )));
        assert!(layer1.contains(&(
            "model.layers.1.mlp.shared_experts.up_proj.weight".to_string(),
            vec![2 * 1408, 2048]
        )));
        let layer0 = mla.layer_tensors(0, 2048, 16, 10944);
        assert!(layer0.contains(&("model.layers.0.mlp.up_proj.weight".to_string(), vec![10944, 2048])));
    }

    #[test]
    fn unsupported_routing_is_refused_by_name() {
        let mut config = lite();
        config["topk_method"] = json!("group_limited_greedy");
        let err = MlaMoe::from_config(&config).expect_err("refused");
        assert!(err.contains("group_limited_greedy"), "{err}");
        let mut config = lite();
        config["scoring_func"] = json!("sigmoid");
        assert!(
            MlaMoe::from_config(&config)
                .expect_err("refused")
                .contains("sigmoid")
        );
        let mut config = lite();
        config["num_experts_per_tok"] = json!(65);
        assert!(
            MlaMoe::from_config(&config)
                .expect_err("refused")
                .contains("num_experts_per_tok")
        );
        let mut config = lite();
        config.as_object_mut().expect("object").remove("kv_lora_rank");
        assert!(
            MlaMoe::from_config(&config)
                .expect_err("refused")
                .contains("kv_lora_rank")
        );
    }
}
