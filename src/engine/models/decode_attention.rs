//! Attention for decode steps on the CPU: one new token per sequence against its cached
//! keys and values, computed on slices.
//!
//! Why: through tensor ops a decode token's attention is ~20 small ops per sequence and
//! block (narrow, transpose, contiguous copies, RoPE, cache writes, two matmuls, softmax),
//! each paying candle's dispatch and allocation, which costs several times the arithmetic
//! itself and a noticeable share of a decode step. Prompts
//! keep the tensor path (real matrix products there).
//!
//! A sequence's result does not depend on the others in the step: each (sequence, KV head)
//! pair is computed alone, in a fixed order, so batched and unbatched logits are equal.

use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor};

use crate::engine::kernels::shared_out::SharedOut;

/// The attention heads of a block.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// One sequence's keys and values of one block, as stored by the KV cache:
/// `[kv_heads][capacity][head_dim]`, the first `len` positions filled.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CachedKv<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub capacity: usize,
    pub len: usize,
}

/// Rotate the heads of one token in place by its position's angles (RoPE); `cos` and `sin`
/// hold `head_dim / 2` values. `interleaved` rotates pairs (2i, 2i+1), as llama.cpp's
/// permuted llama weights need (candle's `rope_i`); otherwise (i, i + head_dim/2), as
/// Hugging Face's Qwen (candle's `rope`). Same arithmetic as candle's one-token kernels.
pub(crate) fn rope_token(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// `out` (`steps × heads × head_dim`, one token per step) = softmax(q·Kᵀ·scale)·V for every
/// query head of every step, `q` laid out like `out` and `caches[step]` holding that step's
/// keys and values (its new token included). Work items are (step, KV head) pairs on
/// candle's CPU thread pool.
pub(crate) fn attend(q: &[f32], caches: &[CachedKv<'_>], heads: Heads, scale: f32, out: &mut [f32]) {
    let Heads {
        heads: query_heads,
        kv_heads,
        head_dim,
    } = heads;
    let groups = query_heads / kv_heads.max(1);
    // The query heads sharing KV head g are g·groups..(g+1)·groups: item (step, g) owns one
    // contiguous run of `groups · head_dim` outputs.
    let item_len = groups * head_dim;
    let items = caches.len() * kv_heads;
    debug_assert_eq!(q.len(), items * item_len);
    debug_assert_eq!(out.len(), items * item_len);
    let out = SharedOut::new(out);
    candle_core::utils::barrier_pool().execute_chunked(items, |range| {
        let out = &out;
        let mut scores = Vec::new();
        let mut run = vec![0f32; item_len];
        for item in range {
            let (step, kv_head) = (item / kv_heads, item % kv_heads);
            let cache = &caches[step];
            let start = kv_head * cache.capacity * head_dim;
            let keys = &cache.keys[start..start + cache.len * head_dim];
            let values = &cache.values[start..start + cache.len * head_dim];
            let queries = &q[item * item_len..(item + 1) * item_len];
            query_group(queries, keys, values, head_dim, scale, &mut scores, &mut run);
            out.write_run(item * item_len, &run);
        }
    });
}

/// The query heads that share one KV head (`queries`: `heads × head_dim`) against its
/// `keys` and `values` (`len × head_dim` each). Each key and value is read once for all the
/// heads (7 on Qwen2.5-0.5B) rather than once per head; per head the arithmetic is the same
/// in either order.
fn query_group(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    head_dim: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let heads = queries.len() / head_dim.max(1);
    let len = keys.len() / head_dim.max(1);
    scores.clear();
    scores.resize(heads * len, 0.0);
    for (t, key) in keys.chunks_exact(head_dim).enumerate() {
        for (h, query) in queries.chunks_exact(head_dim).enumerate() {
            scores[h * len + t] = dot(query, key) * scale;
        }
    }
    let mut inverse = Vec::with_capacity(heads);
    for head_scores in scores.chunks_exact_mut(len.max(1)) {
        let best = head_scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        for s in head_scores.iter_mut() {
            *s = (*s - best).exp();
            total += *s;
        }
        inverse.push(1.0 / total);
    }
    out.fill(0.0);
    for (t, value) in values.chunks_exact(head_dim).enumerate() {
        for (h, result) in out.chunks_exact_mut(head_dim).enumerate() {
            let weight = scores[h * len + t];
            for (o, &v) in result.iter_mut().zip(value) {
                *o += weight * v;
            }
        }
    }
    for (result, inverse) in out.chunks_exact_mut(head_dim).zip(inverse) {
        result.iter_mut().for_each(|o| *o *= inverse);
    }
}

/// A dot product kept in 16 lanes, so that the compiler vectorizes it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The f32 values of a CPU tensor's buffer from its layout's start (the KV cache and RoPE
/// tables are contiguous buffers), or an error naming `what` for anything else.
pub(crate) fn cpu_values<'a>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("decode attention: {what} is not in CPU memory");
    };
    if !layout.is_contiguous() {
        candle_core::bail!("decode attention: {what} is not contiguous");
    }
    let values = cpu.as_slice::<f32>()?;
    let start = layout.start_offset();
    let end = start + layout.shape().elem_count();
    values.get(start..end).ok_or_else(|| {
        candle_core::Error::Msg(format!("decode attention: {what} is shorter than its layout"))
    })
}

/// Writes one position (`kv_heads × head_dim` values) into a `[1, kv_heads, capacity,
/// head_dim]` cache buffer in place.
pub(crate) struct WritePosition<'a> {
    pub values: &'a [f32],
    pub position: usize,
    pub capacity: usize,
    pub head_dim: usize,
}

impl InplaceOp1 for WritePosition<'_> {
    fn name(&self) -> &'static str {
        "kv-cache-write-position"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(buffer) = storage else {
            candle_core::bail!("KV cache: the buffer is not f32");
        };
        if !layout.is_contiguous() || self.position >= self.capacity {
            candle_core::bail!(
                "KV cache: cannot write position {} of {}",
                self.position,
                self.capacity
            );
        }
        let start = layout.start_offset();
        for (head, row) in self.values.chunks_exact(self.head_dim).enumerate() {
            let at = start + (head * self.capacity + self.position) * self.head_dim;
            let Some(slot) = buffer.get_mut(at..at + self.head_dim) else {
                candle_core::bail!(
                    "KV cache: position {} of head {head} is out of the buffer",
                    self.position
                );
            };
            slot.copy_from_slice(row);
        }
        Ok(())
    }
}

/// Write `values` at `position` of a cache buffer (see [`WritePosition`]).
pub(crate) fn write_position(
    buffer: &Tensor,
    values: &[f32],
    position: usize,
    capacity: usize,
    head_dim: usize,
) -> candle_core::Result<()> {
    buffer.inplace_op1(&WritePosition {
        values,
        position,
        capacity,
        head_dim,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn values(count: usize, seed: usize) -> Vec<f32> {
        (0..count)
            .map(|i| (((i + seed) * 7919) % 997) as f32 / 997.0 - 0.5)
            .collect()
    }

    /// softmax(q·Kᵀ·scale)·V through candle's tensor ops, per query head.
    fn by_tensors(q: &[f32], keys: &[f32], values: &[f32], heads: Heads, len: usize, scale: f64) -> Vec<f32> {
        let device = Device::Cpu;
        let groups = heads.heads / heads.kv_heads;
        let q = Tensor::from_slice(q, (heads.kv_heads, groups, heads.head_dim), &device).expect("q");
        let k = Tensor::from_slice(keys, (heads.kv_heads, len, heads.head_dim), &device).expect("k");
        let v = Tensor::from_slice(values, (heads.kv_heads, len, heads.head_dim), &device).expect("v");
        let scores = (q.matmul(&k.t().expect("t")).expect("qk") * scale).expect("scale");
        let probs = candle_nn::ops::softmax_last_dim(&scores).expect("softmax");
        probs
            .matmul(&v)
            .expect("pv")
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("vec")
    }

    #[test]
    fn attention_equals_the_tensor_ops_for_every_step() {
        let heads = Heads {
            heads: 6,
            kv_heads: 2,
            head_dim: 40,
        };
        let capacity = 16;
        let lens = [1, 7, 16];
        let buffers: Vec<(Vec<f32>, Vec<f32>)> = lens
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let size = heads.kv_heads * capacity * heads.head_dim;
                (values(size, 3 * i), values(size, 3 * i + 1))
            })
            .collect();
        let caches: Vec<CachedKv<'_>> = buffers
            .iter()
            .zip(lens)
            .map(|((keys, values), len)| CachedKv {
                keys,
                values,
                capacity,
                len,
            })
            .collect();
        let q = values(lens.len() * heads.heads * heads.head_dim, 11);
        let scale = 1.0 / (heads.head_dim as f32).sqrt();
        let mut out = vec![0f32; q.len()];
        attend(&q, &caches, heads, scale, &mut out);

        let per_step = heads.heads * heads.head_dim;
        for (step, cache) in caches.iter().enumerate() {
            // The filled positions of each KV head, without the capacity's gaps.
            let filled = |buffer: &[f32]| -> Vec<f32> {
                (0..heads.kv_heads)
                    .flat_map(|h| {
                        let start = h * capacity * heads.head_dim;
                        buffer[start..start + cache.len * heads.head_dim].to_vec()
                    })
                    .collect()
            };
            let expected = by_tensors(
                &q[step * per_step..(step + 1) * per_step],
                &filled(cache.keys),
                &filled(cache.values),
                heads,
                cache.len,
                f64::from(scale),
            );
            for (i, (a, b)) in out[step * per_step..(step + 1) * per_step]
                .iter()
                .zip(&expected)
                .enumerate()
            {
                assert!((a - b).abs() < 1e-5, "step {step} value {i}: {a} vs {b}");
            }
        }

        // Alone, a step gets the same bits as inside the batch.
        let mut alone = vec![0f32; per_step];
        attend(
            &q[per_step..2 * per_step],
            &caches[1..2],
            heads,
            scale,
            &mut alone,
        );
        assert_eq!(alone, out[per_step..2 * per_step]);
    }

    #[test]
    fn rope_matches_candles_kernels() {
        let device = Device::Cpu;
        let (heads, head_dim) = (3, 8);
        let x = values(heads * head_dim, 5);
        let angles: Vec<f32> = (0..head_dim / 2).map(|i| 0.3 + i as f32 * 0.7).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let cos_t = Tensor::from_slice(&cos, (1, head_dim / 2), &device).expect("cos");
        let sin_t = Tensor::from_slice(&sin, (1, head_dim / 2), &device).expect("sin");
        let x_t = Tensor::from_slice(&x, (1, heads, 1, head_dim), &device).expect("x");
        for interleaved in [false, true] {
            let expected = if interleaved {
                candle_nn::rotary_emb::rope_i(&x_t, &cos_t, &sin_t)
            } else {
                candle_nn::rotary_emb::rope(&x_t, &cos_t, &sin_t)
            }
            .expect("rope")
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
            let mut ours = x.clone();
            rope_token(&mut ours, head_dim, &cos, &sin, interleaved);
            assert_eq!(ours, expected, "interleaved: {interleaved}");
        }
    }

    #[test]
    fn a_position_lands_in_every_head_of_the_buffer() {
        let (kv_heads, capacity, head_dim) = (2, 4, 3);
        let buffer = Tensor::zeros(
            (1, kv_heads, capacity, head_dim),
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .expect("buffer");
        write_position(&buffer, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, capacity, head_dim).expect("write");
        let written = buffer.flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
        let mut expected = vec![0f32; kv_heads * capacity * head_dim];
        expected[2 * head_dim..3 * head_dim].copy_from_slice(&[1.0, 2.0, 3.0]);
        expected[(capacity + 2) * head_dim..(capacity + 3) * head_dim].copy_from_slice(&[4.0, 5.0, 6.0]);
        assert_eq!(written, expected);
        let error =
            write_position(&buffer, &[0.0; 6], capacity, capacity, head_dim).expect_err("out of range");
        assert!(
            error.to_string().contains("cannot write position 4 of 4"),
            "{error}"
        );
    }
}
