//! lifeboat's own CPU matmul kernels (AVX-512 VNNI) for quantized weights: 16-row tiles
//! for Q4_K, Q6_K, Q5_0 and Q8_0 (`tiles`, `tiles_q5_0`, `tiles_x86`), kernels on the
//! stored blocks for Q4_K and Q6_K (here and `x86`) and Q8_0 (`q8_0`), each checked against
//! a plain-Rust definition; and the output buffer candle's thread pool fills (`shared_out`).
//!
//! # Stored blocks
//!
//! Q4_K and Q6_K weights times activation rows as stored in the GGUF file, unpacking each
//! block once for a group of up to eight rows. Weights whose shape fits go into 16-row
//! tiles instead ([`tiles`], faster for every row count); this path takes the rest (a row
//! count that is not a multiple of 16).
//!
//! Why: candle has two CPU paths for these types, and neither suits 2–8 rows. Its per-row
//! dot products (`k_quants::matmul`) unpack every weight block again for every row, and its
//! repacked x86 tiles are built for prompts, so that several decode streams barely beat
//! one. Here each block
//! is loaded and unpacked once, then multiplied with every row's 8-bit activations by
//! AVX-512 VNNI instructions (`vpdpbusd`, with two groups' sums sharing one `vpdpwssd`
//! that applies their sub-block scales). Q8_0 weights have their own kernel (`q8_0`).
//!
//! The arithmetic is llama.cpp's: activations are quantized per 256 values (Q8_K: one f32
//! scale, 8-bit values, sums of each 16), integer block sums are exact, and each block adds
//! `d·d_a·Σ` to an f32 total in block order. A row's result depends only on that row, so a
//! sequence gets the same logits alone or inside any batch (the batching tests rely on it).

use candle_core::quantized::GgmlDType;

use shared_out::SharedOut;

/// Activation rows one kernel call multiplies with a block (one accumulator per row in
/// registers); more rows (prompts) go through in groups of this many.
pub(crate) const MAX_ROWS: usize = 8;
const QK_K: usize = 256;
const Q4K_BYTES: usize = 144;
const Q6K_BYTES: usize = 210;
/// Weight rows per unit of work handed to candle's thread pool.
const ROWS_PER_ITEM: usize = 8;
/// Weight rows per unit of work for prompts: each group of activation rows is read from the
/// cache once for this many weight rows.
const PROMPT_ROWS_PER_ITEM: usize = 64;

/// Activation rows quantized per 256 values, as llama.cpp's Q8_K.
#[derive(Debug)]
pub(crate) struct Q8kRows {
    rows: usize,
    /// Blocks of 256 per row.
    blocks: usize,
    /// `rows × blocks × 256` values.
    qs: Vec<i8>,
    /// One scale per block.
    d: Vec<f32>,
    /// Sums of each 16 values, 16 per block.
    bsums: Vec<i16>,
    /// Sums of each 32 values (Q4_K's sub-blocks) times the block's scale, 8 per block:
    /// Q4_K's mins term is then one 8-wide multiply-add per block and row.
    scaled_sub_sums: Vec<f32>,
}

impl Q8kRows {
    /// Quantize `rows` rows of `k` values (`k` a multiple of 256).
    pub(crate) fn quantize(x: &[f32], rows: usize, k: usize) -> Q8kRows {
        debug_assert_eq!(x.len(), rows * k);
        debug_assert_eq!(k % QK_K, 0);
        let blocks = k / QK_K;
        let mut out = Q8kRows {
            rows,
            blocks,
            qs: vec![0; rows * k],
            d: vec![0.0; rows * blocks],
            bsums: vec![0; rows * blocks * 16],
            scaled_sub_sums: vec![0.0; rows * blocks * 8],
        };
        for (b, values) in x.chunks_exact(QK_K).enumerate() {
            let qs = &mut out.qs[b * QK_K..(b + 1) * QK_K];
            out.d[b] = quantize_block(values, qs);
            for (sum, group) in out.bsums[b * 16..(b + 1) * 16]
                .iter_mut()
                .zip(qs.chunks_exact(16))
            {
                *sum = group.iter().map(|&q| i16::from(q)).sum();
            }
            let d = out.d[b];
            for (sum, pair) in out.scaled_sub_sums[b * 8..(b + 1) * 8]
                .iter_mut()
                .zip(out.bsums[b * 16..(b + 1) * 16].chunks_exact(2))
            {
                *sum = d * f32::from(pair[0] + pair[1]);
            }
        }
        out
    }

    fn row(&self, r: usize) -> (&[i8], &[f32], &[i16]) {
        let k = self.blocks * QK_K;
        (
            &self.qs[r * k..(r + 1) * k],
            &self.d[r * self.blocks..(r + 1) * self.blocks],
            &self.bsums[r * self.blocks * 16..(r + 1) * self.blocks * 16],
        )
    }
}

/// Symmetric 8-bit quantization of one block (`qs` as long as `values`): returns the scale
/// (0 for an all-zero block, whose values stay 0).
///
/// Written so that the compiler vectorizes it (it runs for every matmul's input): the
/// maximum in 16 lanes, and rounding half to even (one instruction) rather than half away
/// from zero (a libm call per value); the two differ only on exact halves.
fn quantize_block(values: &[f32], qs: &mut [i8]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(0f32, |m, v| m.max(v.abs()));
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            let a = v.abs();
            *lane = if a > *lane { a } else { *lane };
        }
    }
    let amax = lanes.iter().fold(tail, |m, &v| m.max(v));
    if amax == 0.0 {
        return 0.0;
    }
    let iscale = 127.0 / amax;
    for (q, v) in qs.iter_mut().zip(values) {
        *q = (v * iscale).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    amax / 127.0
}

/// Whether this CPU has the instructions the kernels use (checked once).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether [`multiply`] takes `rows` activation rows times weights of this type and width.
/// Q8_0 only for decode steps: its prompts keep candle's repacked tiles, which are no
/// larger than the stored blocks and faster.
pub(crate) fn takes(dtype: GgmlDType, rows: usize, k: usize) -> bool {
    available()
        && rows > 0
        && match dtype {
            GgmlDType::Q4K | GgmlDType::Q6K => k.is_multiple_of(QK_K),
            GgmlDType::Q8_0 => rows <= MAX_ROWS && q8_0::supports_width(k),
            _ => false,
        }
}

/// `lhs` (`rows × k`) times the `n` weight rows stored in `weight` as `dtype` blocks, as
/// `rows × n` values; `None` when [`takes`] declines or the sizes do not fit.
pub(crate) fn multiply(
    dtype: GgmlDType,
    weight: &[u8],
    n: usize,
    k: usize,
    lhs: &[f32],
    rows: usize,
) -> Option<Vec<f32>> {
    if !takes(dtype, rows, k) || lhs.len() != rows * k {
        return None;
    }
    let mut out = vec![0f32; rows * n];
    let done = if dtype == GgmlDType::Q8_0 {
        q8_0::matmul(weight, n, k, &q8_0::Q8Rows::quantize(lhs, rows, k), &mut out)
    } else {
        matmul(dtype, weight, n, k, &Q8kRows::quantize(lhs, rows, k), &mut out)
    };
    done.then_some(out)
}

/// `out[r·n + j] = x_r · w_j` for the `n` weight rows of `k` values stored in `weight` as
/// `dtype` blocks. `false` (nothing written) when the type, the sizes or the CPU do not fit.
fn matmul(dtype: GgmlDType, weight: &[u8], n: usize, k: usize, x: &Q8kRows, out: &mut [f32]) -> bool {
    let block_bytes = match dtype {
        GgmlDType::Q4K => Q4K_BYTES,
        GgmlDType::Q6K => Q6K_BYTES,
        _ => return false,
    };
    if !available()
        || !k.is_multiple_of(QK_K)
        || x.blocks * QK_K != k
        || x.rows == 0
        || weight.len() != n * (k / QK_K) * block_bytes
        || out.len() != x.rows * n
    {
        return false;
    }
    for_each_weight_row(weight, n, x.rows, out, |blocks, first, sums| {
        dot_rows(dtype, blocks, x, first, sums)
    });
    true
}

/// On candle's thread pool, `dot(blocks, first, sums)` for every weight row `j` (`blocks`:
/// its stored bytes, `weight` holding `n` rows of one length) and every group of up to
/// [`MAX_ROWS`] of the `rows` activation rows (`first..first + sums.len()`), the sums
/// landing in `out[r·n + j]`. Callers have checked `out.len() == rows · n`.
fn for_each_weight_row(
    weight: &[u8],
    n: usize,
    rows: usize,
    out: &mut [f32],
    dot: impl Fn(&[u8], usize, &mut [f32]) + Sync,
) {
    let row_bytes = weight.len() / n.max(1);
    let out_ptr = SharedOut::new(out);
    let per_item = if rows > MAX_ROWS {
        PROMPT_ROWS_PER_ITEM
    } else {
        ROWS_PER_ITEM
    };
    let items = n.div_ceil(per_item);
    candle_core::utils::barrier_pool().execute_chunked(items, |range| {
        let out_ptr = &out_ptr;
        let mut sums = [0f32; MAX_ROWS];
        for item in range {
            let weight_rows = item * per_item..((item + 1) * per_item).min(n);
            // An item's few weight rows stay in L1 while every group of activation rows
            // passes over them.
            for first in (0..rows).step_by(MAX_ROWS) {
                let count = MAX_ROWS.min(rows - first);
                for j in weight_rows.clone() {
                    dot(
                        &weight[j * row_bytes..(j + 1) * row_bytes],
                        first,
                        &mut sums[..count],
                    );
                    for (r, sum) in sums[..count].iter().enumerate() {
                        out_ptr.write((first + r) * n + j, *sum);
                    }
                }
            }
        }
    });
}

/// One weight row (its blocks) dotted with activation rows `first..first + sums.len()`.
fn dot_rows(dtype: GgmlDType, blocks: &[u8], x: &Q8kRows, first: usize, sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        x86::dot_rows(dtype, blocks, x, first, sums);
        return;
    }
    for (r, sum) in sums.iter_mut().enumerate() {
        *sum = match dtype {
            GgmlDType::Q4K => reference::q4k(blocks, x, first + r),
            _ => reference::q6k(blocks, x, first + r),
        };
    }
}

fn f16(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Q4_K's eight 6-bit sub-block scales and mins, packed in 12 bytes (llama.cpp's
/// `get_scale_min_k4`).
fn q4k_scales_mins(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut scales, mut mins) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        if j < 4 {
            scales[j] = packed[j] & 63;
            mins[j] = packed[j + 4] & 63;
        } else {
            scales[j] = (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4);
            mins[j] = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
        }
    }
    (scales, mins)
}

/// Plain-Rust versions: the definition the SIMD kernels are tested against, and the path on
/// CPUs without them (only reached in tests: `matmul` declines there).
mod reference {
    use super::*;

    pub(super) fn q4k(blocks: &[u8], x: &Q8kRows, r: usize) -> f32 {
        let (qs, d_a, bsums) = x.row(r);
        let mut sum = 0f32;
        for (b, block) in blocks.chunks_exact(Q4K_BYTES).enumerate() {
            let (d, dmin) = (f16(block, 0), f16(block, 2));
            let (scales, mins) = q4k_scales_mins(&block[4..16]);
            let quants = &block[16..];
            let a = &qs[b * QK_K..(b + 1) * QK_K];
            let mut isum = 0i32;
            for g in 0..4 {
                let bytes = &quants[32 * g..32 * g + 32];
                let (mut low, mut high) = (0i32, 0i32);
                for (l, &q) in bytes.iter().enumerate() {
                    low += i32::from(q & 0x0F) * i32::from(a[64 * g + l]);
                    high += i32::from(q >> 4) * i32::from(a[64 * g + 32 + l]);
                }
                isum += i32::from(scales[2 * g]) * low + i32::from(scales[2 * g + 1]) * high;
            }
            let bs = &bsums[b * 16..(b + 1) * 16];
            let msum: i32 = (0..8)
                .map(|s| i32::from(mins[s]) * (i32::from(bs[2 * s]) + i32::from(bs[2 * s + 1])))
                .sum();
            sum += (d * d_a[b]) * isum as f32 - (dmin * d_a[b]) * msum as f32;
        }
        sum
    }

    pub(super) fn q6k(blocks: &[u8], x: &Q8kRows, r: usize) -> f32 {
        let (qs, d_a, bsums) = x.row(r);
        let mut sum = 0f32;
        for (b, block) in blocks.chunks_exact(Q6K_BYTES).enumerate() {
            let (ql, qh, scales) = (&block[..128], &block[128..192], &block[192..208]);
            let d = f16(block, 208);
            let a = &qs[b * QK_K..(b + 1) * QK_K];
            // Quants stored unsigned (q + 32): Σ sc·q·a = Σ sc·(q+32)·a − 32·Σ sc·bsum.
            let mut isum = 0i32;
            for half in 0..2 {
                let (ql, qh) = (&ql[64 * half..64 * half + 64], &qh[32 * half..32 * half + 32]);
                for l in 0..32 {
                    let quants = [
                        (ql[l] & 0x0F) | ((qh[l] & 3) << 4),
                        (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4),
                        (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                        (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                    ];
                    for (quarter, q) in quants.into_iter().enumerate() {
                        let y = 128 * half + 32 * quarter + l;
                        let scale = scales[8 * half + 2 * quarter + l / 16] as i8;
                        isum += i32::from(scale) * i32::from(q) * i32::from(a[y]);
                    }
                }
            }
            let offset: i32 = (0..16)
                .map(|j| i32::from(scales[j] as i8) * i32::from(bsums[b * 16 + j]))
                .sum();
            sum += (d * d_a[b]) * (isum - 32 * offset) as f32;
        }
        sum
    }
}

pub(crate) mod q8_0;
pub(super) mod shared_out;
mod tiles;
mod tiles_q5_0;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod tiles_x86;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86;

pub(crate) use tiles::{TiledWeight, multiply_group};

#[cfg(test)]
mod tests {
    use candle_core::{
        Device, Module, Tensor,
        quantized::{QMatMul, QTensor},
    };

    use super::*;
    use crate::engine::models::qlinear::test_support::{matrix, max_abs_diff};

    fn activations(rows: usize, k: usize) -> Vec<f32> {
        (0..rows * k)
            .map(|i| ((i * 31 + 7) % 23) as f32 / 23.0 - 0.45)
            .collect()
    }

    #[test]
    fn quantized_activations_round_trip() {
        let k = 512;
        let x = activations(2, k);
        let q = Q8kRows::quantize(&x, 2, k);
        for r in 0..2 {
            let (qs, d, bsums) = q.row(r);
            for (i, v) in x[r * k..(r + 1) * k].iter().enumerate() {
                let back = f32::from(qs[i]) * d[i / QK_K];
                assert!((back - v).abs() <= d[i / QK_K] / 2.0 + 1e-6, "{i}: {v} vs {back}");
            }
            assert_eq!(bsums[3], qs[48..64].iter().map(|&q| i16::from(q)).sum::<i16>());
        }
        // An all-zero block quantizes to zeros with a zero scale, not NaN.
        let zeros = Q8kRows::quantize(&[0.0; 256], 1, 256);
        assert_eq!(zeros.d, vec![0.0]);
    }

    #[test]
    fn kernels_match_the_reference_and_candle_and_a_row_is_the_same_in_any_batch() {
        let (n, k) = (40, 768);
        let weight = matrix(n, k);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&weight, dtype).expect("quantize");
            let bytes = q.data().expect("bytes").into_owned();
            let candle = QMatMul::from_qtensor(q).expect("qmatmul");
            for rows in (1..=MAX_ROWS).chain([2 * MAX_ROWS + 3]) {
                let x = activations(rows, k);
                let q8 = Q8kRows::quantize(&x, rows, k);
                let mut out = vec![0f32; rows * n];
                if !matmul(dtype, &bytes, n, k, &q8, &mut out) {
                    // Without AVX-512 VNNI `matmul` declines; the reference still gets checked.
                    assert!(!available());
                    for (r, row) in out.chunks_exact_mut(n).enumerate() {
                        for (j, v) in row.iter_mut().enumerate() {
                            let blocks = &bytes[j * bytes.len() / n..(j + 1) * bytes.len() / n];
                            *v = match dtype {
                                GgmlDType::Q4K => reference::q4k(blocks, &q8, r),
                                _ => reference::q6k(blocks, &q8, r),
                            };
                        }
                    }
                }
                for r in 0..rows {
                    // Row r alone, through the same path: a row's logits must not depend on
                    // its batch, bit for bit.
                    let alone = Q8kRows::quantize(&x[r * k..(r + 1) * k], 1, k);
                    let mut single = vec![0f32; n];
                    if !matmul(dtype, &bytes, n, k, &alone, &mut single) {
                        for (j, v) in single.iter_mut().enumerate() {
                            let blocks = &bytes[j * bytes.len() / n..(j + 1) * bytes.len() / n];
                            *v = match dtype {
                                GgmlDType::Q4K => reference::q4k(blocks, &alone, 0),
                                _ => reference::q6k(blocks, &alone, 0),
                            };
                        }
                    }
                    for j in 0..n {
                        assert_eq!(
                            out[r * n + j].to_bits(),
                            single[j].to_bits(),
                            "{dtype:?} rows {rows} ({r},{j})"
                        );
                        let blocks = &bytes[j * bytes.len() / n..(j + 1) * bytes.len() / n];
                        let expected = match dtype {
                            GgmlDType::Q4K => reference::q4k(blocks, &q8, r),
                            _ => reference::q6k(blocks, &q8, r),
                        };
                        // The same integer sums; only the order of the f32 additions differs.
                        let tolerance = 1e-5 * expected.abs().max(1.0);
                        assert!(
                            (out[r * n + j] - expected).abs() <= tolerance,
                            "{dtype:?} ({r},{j}): {} vs {expected}",
                            out[r * n + j]
                        );
                    }
                }
                let xt = Tensor::from_vec(x, (rows, k), &Device::Cpu).expect("x");
                let theirs = candle.forward(&xt).expect("candle");
                let ours = Tensor::from_vec(out, (rows, n), &Device::Cpu).expect("ours");
                let diff = max_abs_diff(&ours, &theirs);
                // Both quantize activations per 256 values; only rounding and order differ.
                assert!(diff < 2e-3, "{dtype:?} rows {rows}: {diff}");
            }
        }
    }

    #[test]
    fn mismatched_sizes_are_declined() {
        let q8 = Q8kRows::quantize(&activations(1, 256), 1, 256);
        let mut out = vec![0f32; 2];
        assert!(!matmul(GgmlDType::Q4K, &[0u8; Q4K_BYTES], 2, 256, &q8, &mut out));
        assert!(!matmul(
            GgmlDType::Q8_0,
            &[0u8; 34 * 8],
            1,
            256,
            &q8,
            &mut out[..1]
        ));
    }
}
