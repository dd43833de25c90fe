//! lifeboat's own decoder for GGUF models (qwen2, llama, qwen3): quantized matmuls from
//! candle, with the parts candle-transformers gets wrong or limits for DeepSeek's distills
//! done here — a RoPE table as long as the model's context (candle's quantized llama stops
//! at 4096), llama3 frequency factors (`rope_freqs.weight`) and linear RoPE scaling
//! (deepseek-coder), exact f32 attention (candle's quantized qwen3 uses an approximate CPU
//! kernel, off the reference by more than the logits tests allow), and a preallocated KV
//! cache that grows by doubling instead of concatenating every step (`kv_cache`).
//!
//! It decodes several sequences in one step (continuous batching): each sequence has its
//! own KV cache slot, the weight matmuls run once over every sequence's new tokens, and
//! only attention is per sequence. On the CPU a decode token's attention (RoPE, cache write,
//! softmax(q·Kᵀ)·V) runs on slices (`decode_attention`) rather than as ~20 tensor ops.

use std::sync::Arc;

use candle_core::{
    DType, Device, Module, Tensor,
    quantized::{QTensor, ggml_file::qtensor_from_ggml},
};
use candle_nn::Embedding;

use super::{
    Arch, CausalLm, SlotStep,
    decode_attention::{self, CachedKv, Heads, rope_token},
    kv_cache::KvCache,
    qlinear::QLinear,
};
use crate::engine::kernels::TiledWeight;

/// What the decoder needs besides its weights.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    /// Positions are divided by this (linear RoPE scaling); 1 when unscaled.
    pub rope_linear_factor: f32,
    /// Per-frequency divisors (llama3 scaling, GGUF `rope_freqs.weight`).
    pub rope_freq_factors: Option<Vec<f32>>,
    pub max_context: usize,
}

/// Weights of one transformer block.
#[derive(Debug)]
pub struct BlockWeights {
    pub attn_norm: Tensor,
    pub q: QLinear,
    pub k: QLinear,
    pub v: QLinear,
    /// Qwen2 has q/k/v biases.
    pub qkv_bias: Option<(Tensor, Tensor, Tensor)>,
    /// Qwen3 normalises each head of q and k.
    pub qk_norm: Option<(Tensor, Tensor)>,
    pub o: QLinear,
    pub ffn_norm: Tensor,
    pub gate: QLinear,
    pub up: QLinear,
    pub down: QLinear,
}

/// The token embedding table. On the CPU it stays in its GGUF quant type and only the
/// looked-up rows are dequantized (the table is several times larger in f32 than as
/// stored, and usually the same tensor as the output layer); on a GPU it is dense.
#[derive(Debug)]
pub enum TokenEmbedding {
    Dense(Embedding),
    Quantized {
        table: Arc<QTensor>,
        hidden: usize,
    },
    /// A tied table in lifeboat's tiles (shared with the output layer).
    Tiled(TiledTable),
}

/// A tied embedding table in lifeboat's tiles (CPU).
#[derive(Debug)]
pub struct TiledTable(Arc<TiledWeight>);

impl TokenEmbedding {
    /// The table `[vocab, hidden]`, kept quantized on the CPU.
    pub fn new(table: Arc<QTensor>, device: &Device) -> candle_core::Result<TokenEmbedding> {
        let (_, hidden) = table.shape().dims2()?;
        if device.is_cpu() && hidden % table.dtype().block_size() == 0 {
            Ok(TokenEmbedding::Quantized { table, hidden })
        } else {
            Ok(TokenEmbedding::Dense(Embedding::new(
                table.dequantize(device)?,
                hidden,
            )))
        }
    }

    /// A tied table held in tiles for the output layer (CPU only).
    pub(crate) fn tiled(table: Arc<TiledWeight>) -> TokenEmbedding {
        TokenEmbedding::Tiled(TiledTable(table))
    }

    /// `[b, t]` token ids → `[b, t, hidden]` f32.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (table, hidden) = match self {
            TokenEmbedding::Dense(embedding) => return embedding.forward(ids),
            TokenEmbedding::Quantized { table, hidden } => (table, *hidden),
            TokenEmbedding::Tiled(TiledTable(table)) => return Self::from_tiles(table, ids),
        };
        let dtype = table.dtype();
        let row_bytes = hidden / dtype.block_size() * dtype.type_size();
        let vocab = table.shape().dims()[0];
        let data = table.data()?;
        let mut rows = Vec::with_capacity(ids.elem_count());
        for id in ids.flatten_all()?.to_vec1::<u32>()? {
            let id = id as usize;
            if id >= vocab {
                candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
            }
            let raw = &data[id * row_bytes..(id + 1) * row_bytes];
            rows.push(qtensor_from_ggml(dtype, raw, vec![hidden], &Device::Cpu)?.dequantize(&Device::Cpu)?);
        }
        let mut shape = ids.dims().to_vec();
        shape.push(hidden);
        Tensor::stack(&rows, 0)?.reshape(shape)
    }

    fn from_tiles(table: &TiledWeight, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (vocab, hidden) = table.dims();
        let mut rows = Vec::with_capacity(ids.elem_count());
        for id in ids.flatten_all()?.to_vec1::<u32>()? {
            let Some(raw) = table.stored_row(id as usize) else {
                candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
            };
            rows.push(
                qtensor_from_ggml(table.dtype(), &raw, vec![hidden], &Device::Cpu)?
                    .dequantize(&Device::Cpu)?,
            );
        }
        let mut shape = ids.dims().to_vec();
        shape.push(hidden);
        Tensor::stack(&rows, 0)?.reshape(shape)
    }
}

/// A dense decoder-only transformer with one KV cache per sequence slot.
#[derive(Debug)]
pub struct QuantizedDecoder {
    config: DecoderConfig,
    embed: TokenEmbedding,
    blocks: Vec<BlockWeights>,
    /// `caches[slot][block]`, grown as slots are used.
    caches: Vec<Vec<KvCache>>,
    norm: Tensor,
    output: QLinear,
    cos: Tensor,
    sin: Tensor,
}

fn rope_tables(config: &DecoderConfig, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let half = config.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let base = 1.0 / config.rope_theta.powf(2.0 * i as f32 / config.head_dim as f32);
            let factor = config
                .rope_freq_factors
                .as_ref()
                .and_then(|f| f.get(i).copied())
                .unwrap_or(1.0);
            base / factor
        })
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let positions = Tensor::arange(0u32, config.max_context as u32, device)?
        .to_dtype(DType::F32)?
        .affine(1.0 / f64::from(config.rope_linear_factor), 0.0)?
        .reshape((config.max_context, 1))?;
    let angles = positions.broadcast_mul(&inv_freq)?;
    Ok((angles.cos()?, angles.sin()?))
}

impl QuantizedDecoder {
    pub fn new(
        config: DecoderConfig,
        embed: TokenEmbedding,
        blocks: Vec<BlockWeights>,
        norm: Tensor,
        output: QLinear,
    ) -> candle_core::Result<QuantizedDecoder> {
        let device = norm.device().clone();
        let (cos, sin) = rope_tables(&config, &device)?;
        let caches = Vec::new();
        Ok(QuantizedDecoder {
            embed,
            config,
            blocks,
            caches,
            norm,
            output,
            cos,
            sin,
        })
    }

    fn rope(&self, x: &Tensor, pos: usize, len: usize) -> candle_core::Result<Tensor> {
        let cos = self.cos.narrow(0, pos, len)?;
        let sin = self.sin.narrow(0, pos, len)?;
        // llama.cpp's converter permutes llama's q/k rows for interleaved pairs; Qwen keeps
        // Hugging Face's half split.
        if self.config.arch == Arch::Llama {
            candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
        }
    }

    /// Self-attention of one block for every step's new tokens (`x` is `[1, total, hidden]`,
    /// the steps' tokens one after another).
    fn attention(
        &mut self,
        index: usize,
        x: &Tensor,
        steps: &[SlotStep<'_>],
        masks: &[Option<Tensor>],
    ) -> candle_core::Result<Tensor> {
        let (q, k, v) = self.project_qkv(index, x)?;
        // Decode tokens on the CPU take the slice path (`decode_attention`); the result of a
        // sequence is the same whichever path its neighbours in the step take.
        let on_slices = x.device().is_cpu() && q.dtype() == DType::F32;
        if on_slices && steps.iter().all(|s| s.tokens.len() == 1) {
            let out = self.decode_attention(index, &q, &k, &v, steps)?;
            return self.blocks[index].o.forward(&out);
        }
        let mut outs = Vec::with_capacity(steps.len());
        let mut offset = 0;
        for (i, (step, mask)) in steps.iter().zip(masks).enumerate() {
            let len = step.tokens.len();
            let one = |t: &Tensor| t.narrow(1, offset, len);
            let out = if on_slices && len == 1 {
                self.decode_attention(index, &one(&q)?, &one(&k)?, &one(&v)?, &steps[i..=i])?
            } else {
                self.prompt_attention(index, [one(&q)?, one(&k)?, one(&v)?], step, mask.as_ref())?
            };
            outs.push(out);
            offset += len;
        }
        let out = if outs.len() == 1 {
            outs.swap_remove(0)
        } else {
            Tensor::cat(&outs, 1)?
        };
        self.blocks[index].o.forward(&out)
    }

    /// The q, k and v projections of `x` (`[1, total, hidden]`) with their biases (Qwen2).
    fn project_qkv(&self, index: usize, x: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let block = &self.blocks[index];
        let [mut q, mut k, mut v] = QLinear::forward_group([&block.q, &block.k, &block.v], x)?;
        if let Some((qb, kb, vb)) = &block.qkv_bias {
            q = q.broadcast_add(qb)?;
            k = k.broadcast_add(kb)?;
            v = v.broadcast_add(vb)?;
        }
        Ok((q, k, v))
    }

    /// Attention of one step's tokens through tensor ops (prompts, and every step off the
    /// CPU): `qkv` are the step's `[1, len, width]` projections; appends its keys and values
    /// to the slot's cache and returns `[1, len, heads × head_dim]`.
    fn prompt_attention(
        &mut self,
        index: usize,
        qkv: [Tensor; 3],
        step: &SlotStep<'_>,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let len = step.tokens.len();
        let (q, k, v) = self.prompt_heads(index, qkv, step)?;
        let c = &self.config;
        let (k_all, v_all) = self.caches[step.slot][index].append(&k, &v, c.max_context)?;
        let total = k_all.dim(2)?;
        let groups = c.heads / c.kv_heads;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        // Grouped-query attention without copying K/V per query head: the query heads
        // that share a KV head are rows of one matmul against that head's cache.
        let q = q.reshape((1, c.kv_heads, groups * len, c.head_dim))?;
        let mut scores = (q.matmul(&k_all.t()?)? * scale)?;
        if let Some(mask) = mask {
            scores = scores
                .reshape((1, c.heads, len, total))?
                .broadcast_add(mask)?
                .reshape((1, c.kv_heads, groups * len, total))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs
            .matmul(&v_all)?
            .reshape((1, c.heads, len, c.head_dim))?
            .transpose(1, 2)?
            .reshape((1, len, c.heads * c.head_dim))
    }

    /// One step's projections as heads: q `[1, heads, len, head_dim]` and k, v
    /// `[1, kv_heads, len, head_dim]`, q and k normalised per head (Qwen3) and rotated.
    fn prompt_heads(
        &self,
        index: usize,
        [q, k, v]: [Tensor; 3],
        step: &SlotStep<'_>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let len = step.tokens.len();
        let q = q.reshape((1, len, c.heads, c.head_dim))?;
        let k = k.reshape((1, len, c.kv_heads, c.head_dim))?;
        let v = v.reshape((1, len, c.kv_heads, c.head_dim))?.transpose(1, 2)?;
        let (q, k) = match &self.blocks[index].qk_norm {
            Some((qn, kn)) => (
                candle_nn::ops::rms_norm(&q.contiguous()?, qn, c.rms_eps)?,
                candle_nn::ops::rms_norm(&k.contiguous()?, kn, c.rms_eps)?,
            ),
            None => (q, k),
        };
        let q = self.rope(&q.transpose(1, 2)?, step.pos, len)?;
        let k = self.rope(&k.transpose(1, 2)?, step.pos, len)?;
        Ok((q, k, v))
    }

    /// Attention of one new token per step on the CPU (see `decode_attention`): `q`, `k`, `v`
    /// are `[1, steps, heads × head_dim]` (`kv_heads` for k and v) after the biases; returns
    /// `[1, steps, heads × head_dim]` for the output projection.
    fn decode_attention(
        &mut self,
        index: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        steps: &[SlotStep<'_>],
    ) -> candle_core::Result<Tensor> {
        let (mut q, mut k, v) = self.decode_values(index, q, k, v, steps.len())?;
        self.rope_tokens(&mut q, &mut k, steps)?;
        self.append_positions(index, &k, &v, steps)?;
        let mut out = vec![0f32; q.len()];
        self.attend_cached(index, &q, steps, &mut out)?;
        let q_width = self.config.heads * self.config.head_dim;
        Tensor::from_vec(out, (1, steps.len(), q_width), self.cos.device())
    }

    /// The values of `n` decode tokens' q, k (normalised per head for Qwen3) and v, checked
    /// to hold `n` tokens each.
    fn decode_values(
        &self,
        index: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        n: usize,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let c = &self.config;
        let d = c.head_dim;
        let (q, k) = match &self.blocks[index].qk_norm {
            Some((qn, kn)) => (
                candle_nn::ops::rms_norm(&q.reshape((1, n, c.heads, d))?.contiguous()?, qn, c.rms_eps)?,
                candle_nn::ops::rms_norm(&k.reshape((1, n, c.kv_heads, d))?.contiguous()?, kn, c.rms_eps)?,
            ),
            None => (q.clone(), k.clone()),
        };
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        let (q_width, kv_width) = (c.heads * d, c.kv_heads * d);
        if q.len() != n * q_width || k.len() != n * kv_width || v.len() != n * kv_width {
            candle_core::bail!("decode attention: q/k/v do not hold {n} tokens");
        }
        Ok((q, k, v))
    }

    /// RoPE on each step's token in place (`q`, `k`: one token per step), at the step's
    /// position.
    fn rope_tokens(&self, q: &mut [f32], k: &mut [f32], steps: &[SlotStep<'_>]) -> candle_core::Result<()> {
        let c = &self.config;
        let d = c.head_dim;
        let (q_width, kv_width) = (c.heads * d, c.kv_heads * d);
        let (cos_storage, cos_layout) = self.cos.storage_and_layout();
        let (sin_storage, sin_layout) = self.sin.storage_and_layout();
        let cos = decode_attention::cpu_values(&cos_storage, cos_layout, "the RoPE table")?;
        let sin = decode_attention::cpu_values(&sin_storage, sin_layout, "the RoPE table")?;
        let half = d / 2;
        let interleaved = c.arch == Arch::Llama;
        for (i, step) in steps.iter().enumerate() {
            let row = step.pos * half..(step.pos + 1) * half;
            let (Some(cos), Some(sin)) = (cos.get(row.clone()), sin.get(row)) else {
                candle_core::bail!(
                    "position {} is beyond the model's context ({})",
                    step.pos,
                    c.max_context
                );
            };
            rope_token(&mut q[i * q_width..(i + 1) * q_width], d, cos, sin, interleaved);
            rope_token(&mut k[i * kv_width..(i + 1) * kv_width], d, cos, sin, interleaved);
        }
        Ok(())
    }

    /// Each step's new key and value (one token per step) into its slot's cache of block
    /// `index`.
    fn append_positions(
        &mut self,
        index: usize,
        k: &[f32],
        v: &[f32],
        steps: &[SlotStep<'_>],
    ) -> candle_core::Result<()> {
        let c = &self.config;
        let kv_width = c.kv_heads * c.head_dim;
        for (i, step) in steps.iter().enumerate() {
            let part = i * kv_width..(i + 1) * kv_width;
            self.caches[step.slot][index].append_position(
                &k[part.clone()],
                &v[part],
                c.max_context,
                &self.cos,
                c.kv_heads,
                c.head_dim,
            )?;
        }
        Ok(())
    }

    /// `out` = each step's token's attention over its slot's cache of block `index` (its
    /// own position included), read in place from the cache buffers.
    fn attend_cached(
        &self,
        index: usize,
        q: &[f32],
        steps: &[SlotStep<'_>],
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let buffers = steps
            .iter()
            .map(|step| {
                let cache = &self.caches[step.slot][index];
                match (&cache.k, &cache.v) {
                    (Some(k), Some(v)) => Ok((
                        k.storage_and_layout(),
                        v.storage_and_layout(),
                        cache.capacity(),
                        cache.len,
                    )),
                    _ => candle_core::bail!("KV cache buffers missing"),
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let caches = buffers
            .iter()
            .map(|((k, k_layout), (v, v_layout), capacity, len)| {
                Ok(CachedKv {
                    keys: decode_attention::cpu_values(k, k_layout, "the key cache")?,
                    values: decode_attention::cpu_values(v, v_layout, "the value cache")?,
                    capacity: *capacity,
                    len: *len,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let c = &self.config;
        let heads = Heads {
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
        };
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        decode_attention::attend(q, &caches, heads, scale, out);
        Ok(())
    }

    /// Causal mask for `len` new positions after `pos` cached ones: `[len, pos + len]`.
    fn mask(len: usize, pos: usize, device: &Device) -> candle_core::Result<Tensor> {
        let total = pos + len;
        let values: Vec<f32> = (0..len)
            .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(values, (len, total), device)
    }
}

impl QuantizedDecoder {
    /// Make `step.slot`'s cache ready for its tokens at `step.pos`.
    fn prepare_slot(&mut self, step: &SlotStep<'_>) -> candle_core::Result<()> {
        let blocks = self.blocks.len();
        while self.caches.len() <= step.slot {
            self.caches
                .push((0..blocks).map(|_| KvCache::default()).collect());
        }
        let caches = &mut self.caches[step.slot];
        if step.pos == 0 {
            caches.iter_mut().for_each(KvCache::clear);
        }
        let cached = caches.first().map_or(0, |c| c.len);
        if cached != step.pos {
            candle_core::bail!(
                "slot {} holds {cached} positions but the step starts at {}",
                step.slot,
                step.pos
            );
        }
        if step.tokens.is_empty() {
            candle_core::bail!("a step for slot {} has no tokens", step.slot);
        }
        Ok(())
    }
}

impl CausalLm for QuantizedDecoder {
    fn forward(&mut self, ids: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let tokens = ids.flatten_all()?.to_vec1::<u32>()?;
        let device = ids.device().clone();
        let steps = [SlotStep {
            slot: 0,
            tokens: &tokens,
            pos,
        }];
        let mut logits = self.forward_slots(&steps, &device)?;
        logits
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("no logits for the step".into()))
    }

    fn clear_kv_cache(&mut self) {
        for slot in &mut self.caches {
            slot.iter_mut().for_each(KvCache::clear);
        }
    }

    fn max_sequences(&self) -> usize {
        usize::MAX
    }

    fn kv_bytes_per_token(&self) -> usize {
        let c = &self.config;
        // Keys and values in f32 for every block.
        self.blocks.len() * 2 * c.kv_heads * c.head_dim * 4
    }

    fn release_slot(&mut self, slot: usize) {
        if let Some(caches) = self.caches.get_mut(slot) {
            caches.iter_mut().for_each(KvCache::release);
        }
    }

    fn forward_slots(&mut self, steps: &[SlotStep<'_>], device: &Device) -> candle_core::Result<Vec<Tensor>> {
        for step in steps {
            self.prepare_slot(step)?;
        }
        let ids: Vec<u32> = steps.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let total = ids.len();
        let ids = Tensor::from_vec(ids, (1, total), device)?;
        let masks = steps
            .iter()
            .map(|s| {
                let len = s.tokens.len();
                (len > 1).then(|| Self::mask(len, s.pos, device)).transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let eps = self.config.rms_eps;
        let mut x = self.embed.forward(&ids)?;
        for index in 0..self.blocks.len() {
            let h = candle_nn::ops::rms_norm(&x, &self.blocks[index].attn_norm, eps)?;
            x = (x + self.attention(index, &h, steps, &masks)?)?;
            let block = &self.blocks[index];
            let h = candle_nn::ops::rms_norm(&x, &block.ffn_norm, eps)?;
            let [gate, up] = QLinear::forward_group([&block.gate, &block.up], &h)?;
            let gated = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + block.down.forward(&gated)?)?;
        }
        // Only each step's last position needs logits.
        let mut end = 0;
        let lasts = steps
            .iter()
            .map(|s| {
                end += s.tokens.len();
                x.narrow(1, end - 1, 1)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let last = if lasts.len() == 1 {
            lasts[0].contiguous()?
        } else {
            Tensor::cat(&lasts, 1)?
        };
        let last = candle_nn::ops::rms_norm(&last, &self.norm, eps)?;
        let logits = self.output.forward(&last)?.squeeze(0)?.to_dtype(DType::F32)?;
        (0..steps.len()).map(|i| logits.get(i)).collect()
    }
}
