//! Q8_0 weights (the 0.5B's, and every Q4_1/Q5_0/Q5_1/Q8_1 tensor requantized at load)
//! times up to eight activation rows on the stored blocks, for decode steps.
//!
//! Why: candle's per-row Q8_0 dot products dominate the decode of a Q8_0 model and run
//! below the memory bandwidth. Here two 32-value blocks make one 64-byte vector, multiplied
//! with each row by one `vpdpbusd` (weights offset to unsigned by +128, the offset taken out
//! again through the activations' block sums), and scaled in f32 lanes.

use super::{available, for_each_weight_row, quantize_block};

/// Values per Q8_0 block.
const QK8_0: usize = 32;
/// Bytes per Q8_0 block: an f16 scale and 32 signed bytes.
const BLOCK_BYTES: usize = 34;

/// Activation rows quantized per 32 values, each block's scale repeated over the 8 i32
/// lanes its products land in, and `128 · Σ q` of each block (the unsigned offset).
#[derive(Debug)]
pub(super) struct Q8Rows {
    rows: usize,
    /// Blocks of 32 per row (even).
    blocks: usize,
    qs: Vec<i8>,
    /// One scale per block, repeated 8 times: a pair of blocks is one 16-lane vector.
    lane_scales: Vec<f32>,
    /// `128 · Σ q` per block at the first of its 8 lanes, zeros elsewhere.
    lane_offsets: Vec<i32>,
}

impl Q8Rows {
    /// Quantize `rows` rows of `k` values (`k` a multiple of 64).
    pub(super) fn quantize(x: &[f32], rows: usize, k: usize) -> Q8Rows {
        debug_assert_eq!(x.len(), rows * k);
        let blocks = k / QK8_0;
        let mut out = Q8Rows {
            rows,
            blocks,
            qs: vec![0; rows * k],
            lane_scales: vec![0.0; rows * blocks * 8],
            lane_offsets: vec![0; rows * blocks * 8],
        };
        for (b, values) in x.chunks_exact(QK8_0).enumerate() {
            let qs = &mut out.qs[b * QK8_0..(b + 1) * QK8_0];
            out.lane_scales[b * 8..(b + 1) * 8].fill(quantize_block(values, qs));
            out.lane_offsets[b * 8] = 128 * qs.iter().map(|&q| i32::from(q)).sum::<i32>();
        }
        out
    }
}

/// Whether [`matmul`] takes a weight of `k` columns.
pub(super) fn supports_width(k: usize) -> bool {
    k.is_multiple_of(2 * QK8_0)
}

/// `out[r·n + j] = x_r · w_j` for `n` weight rows of `k` values stored as Q8_0 blocks.
/// `false` (nothing written) when sizes or the CPU do not fit.
pub(super) fn matmul(weight: &[u8], n: usize, k: usize, x: &Q8Rows, out: &mut [f32]) -> bool {
    if !available()
        || !supports_width(k)
        || x.blocks * QK8_0 != k
        || x.rows == 0
        || weight.len() != n * (k / QK8_0) * BLOCK_BYTES
        || out.len() != x.rows * n
    {
        return false;
    }
    for_each_weight_row(weight, n, x.rows, out, |blocks, first, sums| {
        dot_rows(blocks, x, first, sums)
    });
    true
}

/// One weight row's blocks dotted with activation rows `first..first + sums.len()`.
fn dot_rows(blocks: &[u8], x: &Q8Rows, first: usize, sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        x86::dot_rows(blocks, x, first, sums);
        return;
    }
    for (r, sum) in sums.iter_mut().enumerate() {
        *sum = reference(blocks, x, first + r);
    }
}

/// The plain-Rust definition the kernel is tested against.
fn reference(blocks: &[u8], x: &Q8Rows, r: usize) -> f32 {
    let k = x.blocks * QK8_0;
    let a = &x.qs[r * k..(r + 1) * k];
    let mut sum = 0f32;
    for (b, block) in blocks.chunks_exact(BLOCK_BYTES).enumerate() {
        let d = super::f16(block, 0);
        let dot: i32 = block[2..]
            .iter()
            .zip(&a[b * QK8_0..(b + 1) * QK8_0])
            .map(|(&w, &q)| i32::from(w as i8) * i32::from(q))
            .sum();
        sum += d * x.lane_scales[(r * x.blocks + b) * 8] * dot as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// Called by [`super::dot_rows`] only after [`available`], with what [`matmul`] checked:
    /// `blocks` is one weight row of `x.blocks` (even) Q8_0 blocks and rows
    /// `first..first + sums.len()` of `x` exist (1 to `MAX_ROWS` of them).
    pub(super) fn dot_rows(blocks: &[u8], x: &Q8Rows, first: usize, sums: &mut [f32]) {
        // Checked in release builds too: these bounds keep the kernel's reads in bounds.
        assert_eq!(blocks.len(), x.blocks * BLOCK_BYTES);
        assert!((1..=super::super::MAX_ROWS).contains(&sums.len()) && first + sums.len() <= x.rows);
        // SAFETY: `rows`'s `# Safety` terms: `super::dot_rows` calls this only when
        // `available()` found AVX-512F/BW/VNNI, and `matmul` checked that `blocks` is
        // `x.blocks` whole blocks (`weight.len() == n · (k / 32) · 34`, `x.blocks · 32 ==
        // k`); `for_each_weight_row` hands over 1..=MAX_ROWS rows from `first`, all below
        // `x.rows`, so `R` is `sums.len()`.
        unsafe {
            match sums.len() {
                1 => rows::<1>(blocks, x, first, sums),
                2 => rows::<2>(blocks, x, first, sums),
                3 => rows::<3>(blocks, x, first, sums),
                4 => rows::<4>(blocks, x, first, sums),
                5 => rows::<5>(blocks, x, first, sums),
                6 => rows::<6>(blocks, x, first, sums),
                7 => rows::<7>(blocks, x, first, sums),
                _ => rows::<8>(blocks, x, first, sums),
            }
        }
    }

    /// # Safety
    ///
    /// The CPU has AVX-512F/BW/VNNI, `blocks` holds at most `x.blocks` blocks, and rows
    /// `first..first + R` of `x` exist (`R == sums.len()`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn rows<const R: usize>(blocks: &[u8], x: &Q8Rows, first: usize, sums: &mut [f32]) {
        let k = x.blocks * QK8_0;
        let flip = _mm512_set1_epi8(i8::MIN);
        let zero = _mm512_setzero_si512();
        let mut totals = [_mm512_setzero_ps(); R];
        for (pair, two) in blocks.chunks_exact(2 * BLOCK_BYTES).enumerate() {
            let p = two.as_ptr();
            // Prefetches are hints and never fault, also past the end.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(4096).cast());
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(4096 + 64).cast());
            // SAFETY: `two` is `2 · BLOCK_BYTES` (68) long: the 32 quants of its first block
            // are bytes 2..34, of its second 36..68.
            let (low, high) = unsafe {
                (
                    _mm256_loadu_si256(p.add(2).cast()),
                    _mm256_loadu_si256(p.add(BLOCK_BYTES + 2).cast()),
                )
            };
            // Signed weights + 128 as unsigned bytes for `vpdpbusd`.
            let w = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1), flip);
            // Each block's weight scale over its 8 lanes.
            let d = _mm512_castpd_ps(_mm512_insertf64x4(
                _mm512_castps_pd(_mm512_set1_ps(super::super::f16(two, 0))),
                _mm256_castps_pd(_mm256_set1_ps(super::super::f16(two, BLOCK_BYTES))),
                1,
            ));
            for (r, total) in totals.iter_mut().enumerate() {
                let lanes = ((first + r) * x.blocks + 2 * pair) * 8;
                // SAFETY: row `first + r < x.rows` and blocks `2·pair, 2·pair + 1 < x.blocks`
                // (see `# Safety`): their 64 activations are inside `x.qs` (`x.rows · k`
                // long) and their 16 lanes inside `lane_offsets` and `lane_scales` (8 lanes
                // per block of each row).
                let (a, offset, scale) = unsafe {
                    (
                        _mm512_loadu_si512(x.qs.as_ptr().add((first + r) * k + pair * 2 * QK8_0).cast()),
                        _mm512_loadu_si512(x.lane_offsets.as_ptr().add(lanes).cast()),
                        _mm512_loadu_ps(x.lane_scales.as_ptr().add(lanes)),
                    )
                };
                let dot = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, w, a), offset);
                *total = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), scale), d, *total);
            }
        }
        for (sum, total) in sums.iter_mut().zip(totals) {
            *sum = _mm512_reduce_add_ps(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{
        Device, Module, Tensor,
        quantized::{GgmlDType, QMatMul, QTensor},
    };

    use super::*;
    use crate::engine::{
        kernels::MAX_ROWS,
        models::qlinear::test_support::{matrix, max_abs_diff},
    };

    #[test]
    fn kernel_matches_the_reference_and_candle_and_a_row_is_the_same_in_any_batch() {
        let (n, k) = (24, 896);
        let weight = matrix(n, k);
        let q = QTensor::quantize(&weight, GgmlDType::Q8_0).expect("quantize");
        let bytes = q.data().expect("bytes").into_owned();
        let candle = QMatMul::from_qtensor(q).expect("qmatmul");
        let row_bytes = bytes.len() / n;
        for rows in (1..=MAX_ROWS).chain([2 * MAX_ROWS + 3]) {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 31 + 7) % 23) as f32 / 23.0 - 0.45)
                .collect();
            let q8 = Q8Rows::quantize(&x, rows, k);
            let mut out = vec![0f32; rows * n];
            if !matmul(&bytes, n, k, &q8, &mut out) {
                assert!(!available());
                return;
            }
            for r in 0..rows {
                let alone = Q8Rows::quantize(&x[r * k..(r + 1) * k], 1, k);
                let mut single = vec![0f32; n];
                assert!(matmul(&bytes, n, k, &alone, &mut single));
                for j in 0..n {
                    assert_eq!(
                        out[r * n + j].to_bits(),
                        single[j].to_bits(),
                        "rows {rows} ({r},{j})"
                    );
                    let expected = reference(&bytes[j * row_bytes..(j + 1) * row_bytes], &q8, r);
                    let tolerance = 1e-5 * expected.abs().max(1.0);
                    assert!(
                        (out[r * n + j] - expected).abs() <= tolerance,
                        "({r},{j}): {} vs {expected}",
                        out[r * n + j]
                    );
                }
            }
            let theirs = candle
                .forward(&Tensor::from_vec(x, (rows, k), &Device::Cpu).expect("x"))
                .expect("candle");
            let ours = Tensor::from_vec(out, (rows, n), &Device::Cpu).expect("ours");
            let diff = max_abs_diff(&ours, &theirs);
            assert!(diff < 2e-3, "rows {rows}: {diff}");
        }
    }

    #[test]
    fn widths_that_are_not_pairs_of_blocks_are_declined() {
        assert!(!supports_width(32 * 3));
        let x = Q8Rows::quantize(&[0.5; 96], 1, 96);
        assert!(!matmul(&[0u8; 3 * BLOCK_BYTES], 1, 96, &x, &mut [0.0]));
    }
}
