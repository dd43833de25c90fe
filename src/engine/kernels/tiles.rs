//! Q4_K, Q6_K, Q5_0 and Q8_0 weights rearranged at load into tiles of 16 rows, the size of
//! the stored blocks, multiplied by any number of activation rows (prompts and decode
//! steps). Q5_0's and Q8_0's layouts and activations are in `tiles_q5_0`.
//!
//! Why: with one weight row per vector (the stored layout, [`super`]), every 32-value
//! sub-block needs its scale applied inside the row's vector, which costs as much as the
//! products (`vpackssdw` + `vpdpwssd` per 128 values), which keeps prompts behind
//! llama.cpp. candle's repacked tiles are fast for prompts but widen the scales to f32 (1.33×
//! the bytes), and with the stored blocks kept for decode the weights would be held twice
//! (and building the repacked copy takes time at load). Here each 32-bit lane of a
//! vector is one of 16 weight rows: a lane sums a whole sub-block before its scale is
//! applied once, in f32, for all 16 rows, and the scales stay 6 bits wide packed as bytes.
//! One layout serves prompts and decode, and the stored blocks are dropped after tiling (a
//! tied embedding table is looked up in the tiles: `TiledWeight::stored_row`).
//!
//! Layouts, per tile of 16 rows and block of 256 columns (`R` = the 16 rows, 4-byte words
//! taken from each row's stored bytes, so tiling is a copy of words and scale bytes):
//! - Q4_K (2368 bytes = 16 × 148): `d[R]` f16, `dmin[R]` f16, `scales[8][R]` u8,
//!   `mins[8][R]` u8, `qs[4 chunks][8 words][R][4]`. Word w of chunk c holds, in its low
//!   nibbles, values 64c + 4w … + 3 (sub-block 2c) and in its high nibbles 64c + 32 + 4w …
//!   (sub-block 2c + 1), as the stored block does.
//! - Q6_K (3360 bytes = 16 × 210): `d[R]` f16, `scales[16][R]` i8,
//!   `ql[2 halves][2][8 words][R][4]`, `qh[2 halves][8 words][R][4]` (see the kernel).

use super::{
    Q4K_BYTES, Q6K_BYTES, Q8kRows, QK_K, SharedOut, available,
    tiles_q5_0::{self as q5_0, Q8Rows32},
};
use candle_core::quantized::GgmlDType;

/// Weight rows per tile: one per 32-bit lane of a 512-bit vector.
pub(crate) const TILE_ROWS: usize = 16;
pub(super) const Q4K_TILE_BYTES: usize = TILE_ROWS * Q4K_BYTES + 4 * TILE_ROWS;
pub(super) const Q6K_TILE_BYTES: usize = TILE_ROWS * Q6K_BYTES;
/// Activation rows a kernel call multiplies with a tile (one accumulator each).
pub(super) const GROUP_ROWS: usize = 4;

/// A tiled type's values per block, stored bytes per block and bytes per tile-block.
fn layout(dtype: GgmlDType) -> Option<(usize, usize, usize)> {
    match dtype {
        GgmlDType::Q4K => Some((QK_K, Q4K_BYTES, Q4K_TILE_BYTES)),
        GgmlDType::Q6K => Some((QK_K, Q6K_BYTES, Q6K_TILE_BYTES)),
        GgmlDType::Q5_0 => Some((q5_0::BLOCK, q5_0::BLOCK_BYTES, q5_0::TILE_BYTES)),
        GgmlDType::Q8_0 => Some((q5_0::BLOCK, q5_0::q8_0::BLOCK_BYTES, q5_0::q8_0::TILE_BYTES)),
        _ => None,
    }
}

/// Activation rows quantized the way a tiled type's kernel takes them.
pub(super) enum Activations {
    /// Per 256 values (Q4_K, Q6_K).
    K(Q8kRows),
    /// Per 32 values (Q5_0, Q8_0).
    Blocks32(Q8Rows32),
}

/// A `[n, k]` weight in the tiled layout.
#[derive(Debug)]
pub(crate) struct TiledWeight {
    dtype: GgmlDType,
    n: usize,
    k: usize,
    bytes: Vec<u8>,
}

impl TiledWeight {
    /// Tile `n × k` weights stored as `dtype` blocks (Q4_K, Q6_K, Q5_0, Q8_0); `None` for another
    /// type, a shape the tiles do not fit (`n` a multiple of 16, `k` of the block size) or a
    /// CPU without the kernels.
    pub(crate) fn new(dtype: GgmlDType, stored: &[u8], n: usize, k: usize) -> Option<TiledWeight> {
        let (per_block, block_bytes, _) = layout(dtype)?;
        if !available()
            || n == 0
            || k == 0
            || !n.is_multiple_of(TILE_ROWS)
            || !k.is_multiple_of(per_block)
            || stored.len() != n * (k / per_block) * block_bytes
        {
            return None;
        }
        Some(TiledWeight {
            dtype,
            n,
            k,
            bytes: tile(dtype, stored, n, k),
        })
    }

    pub(crate) fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// `(n, k)`: output and input width.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Weight row `row` as its stored blocks (for an embedding lookup in a tied table);
    /// `None` past the last row.
    pub(crate) fn stored_row(&self, row: usize) -> Option<Vec<u8>> {
        if row >= self.n {
            return None;
        }
        let tile_len = self.tile_len();
        let t = row / TILE_ROWS;
        let tile = &self.bytes[t * tile_len..(t + 1) * tile_len];
        Some(untile_row(self.dtype, tile, row % TILE_ROWS, self.k))
    }

    /// Bytes of one tile (16 rows, all blocks).
    fn tile_len(&self) -> usize {
        let (per_block, _, tile_bytes) = layout(self.dtype).unwrap_or((QK_K, 0, 0));
        (self.k / per_block) * tile_bytes
    }

    /// `lhs` (`rows × k`) times the weight, as `rows × n` values; `None` when the sizes do
    /// not fit.
    pub(crate) fn multiply(&self, lhs: &[f32], rows: usize) -> Option<Vec<f32>> {
        multiply_group(&[self], lhs, rows).and_then(|mut outs| outs.pop())
    }
}

/// Whether a tiled type takes activations per 32 values (else per 256).
fn per_32(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q5_0 | GgmlDType::Q8_0)
}

/// `lhs` (`rows × k`) times each of `weights` (all `k` inputs wide), as `rows × n` values
/// each, in one pass over the thread pool with the activations quantized once per format:
/// projections that share their input (q, k, v; gate, up) pay one dispatch and one
/// quantization instead of one each (on the 0.5B, ~200 dispatches a token otherwise).
/// `None` when the sizes do not fit.
pub(crate) fn multiply_group(weights: &[&TiledWeight], lhs: &[f32], rows: usize) -> Option<Vec<Vec<f32>>> {
    let k = weights.first()?.k;
    if rows == 0 || lhs.len() != rows * k || weights.iter().any(|w| w.k != k) {
        return None;
    }
    let blocks32 = weights
        .iter()
        .any(|w| per_32(w.dtype))
        .then(|| Activations::Blocks32(Q8Rows32::quantize(lhs, rows, k)));
    let blocks256 = weights
        .iter()
        .any(|w| !per_32(w.dtype))
        .then(|| Activations::K(Q8kRows::quantize(lhs, rows, k)));
    let mut outs: Vec<Vec<f32>> = weights.iter().map(|w| vec![0f32; rows * w.n]).collect();
    let shared: Vec<SharedOut> = outs.iter_mut().map(|out| SharedOut::new(out)).collect();
    // Work item i is a tile of the first weight, then of the next, and so on.
    let mut starts = Vec::with_capacity(weights.len());
    let mut total = 0;
    for weight in weights {
        starts.push(total);
        total += weight.n / TILE_ROWS;
    }
    candle_core::utils::barrier_pool().execute_chunked(total, |range| {
        for item in range {
            let w = starts.partition_point(|&start| start <= item).saturating_sub(1);
            let (weight, shared) = (weights[w], &shared[w]);
            let x = if per_32(weight.dtype) {
                &blocks32
            } else {
                &blocks256
            };
            let Some(x) = x else { continue };
            let t = item - starts[w];
            let tile_len = weight.tile_len();
            let tile = &weight.bytes[t * tile_len..(t + 1) * tile_len];
            for first in (0..rows).step_by(GROUP_ROWS) {
                let count = GROUP_ROWS.min(rows - first);
                let mut sums = [[0f32; TILE_ROWS]; GROUP_ROWS];
                dot_tile(weight.dtype, tile, x, first, &mut sums[..count]);
                for (r, row) in sums[..count].iter().enumerate() {
                    shared.write_run((first + r) * weight.n + t * TILE_ROWS, row);
                }
            }
        }
    });
    Some(outs)
}

/// The 16 weight rows of `tile` (all its blocks) dotted with activation rows
/// `first..first + sums.len()`.
fn dot_tile(dtype: GgmlDType, tile: &[u8], x: &Activations, first: usize, sums: &mut [[f32; TILE_ROWS]]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        super::tiles_x86::dot_tile(dtype, tile, x, first, sums);
        return;
    }
    reference_dot_tile(dtype, tile, x, first, sums);
}

/// Plain-Rust multiplication of the tiled layout: the definition the kernels are tested
/// against (the layout itself is tested against the stored blocks' reference).
pub(super) fn reference_dot_tile(
    dtype: GgmlDType,
    tile: &[u8],
    x: &Activations,
    first: usize,
    sums: &mut [[f32; TILE_ROWS]],
) {
    let k = match x {
        Activations::K(x) => x.blocks * QK_K,
        Activations::Blocks32(x) => x.blocks * q5_0::BLOCK,
    };
    let stored = untile(dtype, tile, TILE_ROWS, k);
    let row_bytes = stored.len() / TILE_ROWS;
    for (r, row_sums) in sums.iter_mut().enumerate() {
        for (j, sum) in row_sums.iter_mut().enumerate() {
            let blocks = &stored[j * row_bytes..(j + 1) * row_bytes];
            *sum = match (dtype, x) {
                (GgmlDType::Q4K, Activations::K(x)) => super::reference::q4k(blocks, x, first + r),
                (GgmlDType::Q6K, Activations::K(x)) => super::reference::q6k(blocks, x, first + r),
                (GgmlDType::Q8_0, Activations::Blocks32(x)) => q5_0::q8_0::reference(blocks, x, first + r),
                (_, Activations::Blocks32(x)) => q5_0::reference(blocks, x, first + r),
                _ => f32::NAN,
            };
        }
    }
}

/// The tiled bytes of `n × k` stored weights (sizes checked by the caller).
fn tile(dtype: GgmlDType, stored: &[u8], n: usize, k: usize) -> Vec<u8> {
    let Some((per_block, block_bytes, tile_bytes)) = layout(dtype) else {
        return Vec::new();
    };
    let blocks = k / per_block;
    let words = word_map(dtype);
    let mut out = vec![0u8; (n / TILE_ROWS) * blocks * tile_bytes];
    for (t, tile) in out.chunks_exact_mut(blocks * tile_bytes).enumerate() {
        for (b, target) in tile.chunks_exact_mut(tile_bytes).enumerate() {
            let source = |row: usize| {
                let at = ((t * TILE_ROWS + row) * blocks + b) * block_bytes;
                &stored[at..at + block_bytes]
            };
            match dtype {
                GgmlDType::Q4K => tile_q4k(source, &words, target),
                GgmlDType::Q5_0 => q5_0::tile_block(source, target),
                GgmlDType::Q8_0 => q5_0::q8_0::tile_block(source, target),
                _ => tile_q6k(source, &words, target),
            }
        }
    }
    out
}

/// Offsets inside a Q4_K tile-block.
pub(super) mod q4k_at {
    pub(crate) const D: usize = 0;
    pub(crate) const DMIN: usize = 32;
    pub(crate) const SCALES: usize = 64;
    pub(crate) const MINS: usize = 192;
    pub(crate) const QS: usize = 320;
}

/// Offsets inside a Q6_K tile-block.
pub(super) mod q6k_at {
    pub(crate) const D: usize = 0;
    pub(crate) const SCALES: usize = 32;
    pub(crate) const QL: usize = 288;
    pub(crate) const QH: usize = 2336;
}

/// Where the 4-byte words of a Q4_K or Q6_K block go (empty for other types): (offset of the word group in the
/// tile-block, where row r's word sits 4·r further; offset of the word in the row's stored
/// block). Tiling and untiling both follow this one map.
fn word_map(dtype: GgmlDType) -> Vec<(usize, usize)> {
    let group = TILE_ROWS * 4;
    match dtype {
        // qs: chunk c (64 values) holds word w at 16 + 32c + 4w.
        GgmlDType::Q4K => (0..4)
            .flat_map(|chunk| (0..8).map(move |w| (chunk, w)))
            .map(|(chunk, w)| (q4k_at::QS + (chunk * 8 + w) * group, 16 + 32 * chunk + 4 * w))
            .collect(),
        // ql: half h, part p (32 bytes each) at 64h + 32p; qh: half h at 128 + 32h.
        GgmlDType::Q6K => (0..2)
            .flat_map(|half| {
                let low = (0..2).flat_map(move |part| {
                    (0..8).map(move |w| {
                        (
                            q6k_at::QL + ((half * 2 + part) * 8 + w) * group,
                            64 * half + 32 * part + 4 * w,
                        )
                    })
                });
                let high =
                    (0..8).map(move |w| (q6k_at::QH + (half * 8 + w) * group, 128 + 32 * half + 4 * w));
                low.chain(high)
            })
            .collect(),
        // Q5_0 and Q8_0 have their own layouts (`tiles_q5_0`).
        _ => Vec::new(),
    }
}

fn tile_q4k<'a>(source: impl Fn(usize) -> &'a [u8], words: &[(usize, usize)], target: &mut [u8]) {
    use q4k_at::*;
    for row in 0..TILE_ROWS {
        let block = source(row);
        target[D + 2 * row..D + 2 * row + 2].copy_from_slice(&block[0..2]);
        target[DMIN + 2 * row..DMIN + 2 * row + 2].copy_from_slice(&block[2..4]);
        let (scales, mins) = super::q4k_scales_mins(&block[4..16]);
        for sub in 0..8 {
            target[SCALES + sub * TILE_ROWS + row] = scales[sub];
            target[MINS + sub * TILE_ROWS + row] = mins[sub];
        }
    }
    tile_words(words, source, target);
}

fn tile_q6k<'a>(source: impl Fn(usize) -> &'a [u8], words: &[(usize, usize)], target: &mut [u8]) {
    use q6k_at::*;
    // Stored Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] i8, d f16.
    for row in 0..TILE_ROWS {
        let block = source(row);
        target[D + 2 * row..D + 2 * row + 2].copy_from_slice(&block[208..210]);
        for group in 0..16 {
            target[SCALES + group * TILE_ROWS + row] = block[192 + group];
        }
    }
    tile_words(words, source, target);
}

/// Every row's quant words into their groups (see [`word_map`]).
fn tile_words<'a>(words: &[(usize, usize)], source: impl Fn(usize) -> &'a [u8], target: &mut [u8]) {
    for &(at, from) in words {
        for row in 0..TILE_ROWS {
            target[at + 4 * row..at + 4 * row + 4].copy_from_slice(&source(row)[from..from + 4]);
        }
    }
}

/// The stored blocks of a tile's first `rows` rows back from the tiled layout (`k`
/// columns): tests and the reference multiply check the layout against the stored
/// definition with it.
fn untile(dtype: GgmlDType, tile: &[u8], rows: usize, k: usize) -> Vec<u8> {
    (0..rows)
        .flat_map(|row| untile_row(dtype, tile, row, k))
        .collect()
}

/// Row `row` (of 16) of a tile as its stored blocks (`k` columns).
fn untile_row(dtype: GgmlDType, tile: &[u8], row: usize, k: usize) -> Vec<u8> {
    let Some((per_block, block_bytes, tile_bytes)) = layout(dtype) else {
        return Vec::new();
    };
    let words = word_map(dtype);
    let mut out = vec![0u8; (k / per_block) * block_bytes];
    for (source, block) in tile
        .chunks_exact(tile_bytes)
        .zip(out.chunks_exact_mut(block_bytes))
    {
        match dtype {
            GgmlDType::Q5_0 => q5_0::untile_block(source, row, block),
            GgmlDType::Q8_0 => q5_0::q8_0::untile_block(source, row, block),
            GgmlDType::Q4K => {
                use q4k_at::*;
                block[0..2].copy_from_slice(&source[D + 2 * row..D + 2 * row + 2]);
                block[2..4].copy_from_slice(&source[DMIN + 2 * row..DMIN + 2 * row + 2]);
                let scales: [u8; 8] = std::array::from_fn(|s| source[SCALES + s * TILE_ROWS + row]);
                let mins: [u8; 8] = std::array::from_fn(|s| source[MINS + s * TILE_ROWS + row]);
                block[4..16].copy_from_slice(&pack_scales_mins(&scales, &mins));
                untile_words(&words, source, row, block);
            }
            _ => {
                use q6k_at::*;
                block[208..210].copy_from_slice(&source[D + 2 * row..D + 2 * row + 2]);
                for group in 0..16 {
                    block[192 + group] = source[SCALES + group * TILE_ROWS + row];
                }
                untile_words(&words, source, row, block);
            }
        }
    }
    out
}

/// Row `row`'s quant words back from their groups (see [`word_map`]).
fn untile_words(words: &[(usize, usize)], source: &[u8], row: usize, block: &mut [u8]) {
    for &(at, to) in words {
        block[to..to + 4].copy_from_slice(&source[at + 4 * row..at + 4 * row + 4]);
    }
}

/// Q4_K's 12-byte packing of eight 6-bit scales and mins (the inverse of
/// `q4k_scales_mins`).
fn pack_scales_mins(scales: &[u8; 8], mins: &[u8; 8]) -> [u8; 12] {
    let mut packed = [0u8; 12];
    for j in 0..4 {
        packed[j] = (scales[j] & 63) | ((scales[j + 4] >> 4) << 6);
        packed[j + 4] = (mins[j] & 63) | ((mins[j + 4] >> 4) << 6);
        packed[j + 8] = (scales[j + 4] & 0x0F) | ((mins[j + 4] & 0x0F) << 4);
    }
    packed
}

#[cfg(test)]
mod tests {
    use candle_core::{
        Device, Module, Tensor,
        quantized::{GgmlDType, QMatMul, QTensor},
    };

    use super::*;
    use crate::engine::models::qlinear::test_support::matrix;

    fn activations(rows: usize, k: usize) -> Vec<f32> {
        (0..rows * k)
            .map(|i| ((i * 31 + 7) % 23) as f32 / 23.0 - 0.45)
            .collect()
    }

    #[test]
    fn tiling_keeps_every_stored_byte() {
        let (n, k) = (32, 512);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&matrix(n, k), dtype).expect("quantize");
            let stored = q.data().expect("data").to_vec();
            let tiled = tile(dtype, &stored, n, k);
            let tile_len = tiled.len() / (n / TILE_ROWS);
            let back: Vec<u8> = tiled
                .chunks_exact(tile_len)
                .flat_map(|t| untile(dtype, t, TILE_ROWS, k))
                .collect();
            assert_eq!(back, stored, "{dtype:?}");
            if available() {
                let tiled = TiledWeight::new(dtype, &stored, n, k).expect("tiles");
                let row_bytes = stored.len() / n;
                for row in [0, 17, n - 1] {
                    let bytes = tiled.stored_row(row).expect("a row");
                    assert_eq!(
                        bytes,
                        stored[row * row_bytes..(row + 1) * row_bytes],
                        "{dtype:?} row {row}"
                    );
                }
                assert!(tiled.stored_row(n).is_none());
            }
        }
    }

    #[test]
    fn tiles_match_the_reference_and_candle_and_a_row_is_the_same_in_any_batch() {
        if !available() {
            return;
        }
        for (dtype, k) in [
            (GgmlDType::Q4K, 768),
            (GgmlDType::Q6K, 768),
            (GgmlDType::Q5_0, 896),
            (GgmlDType::Q8_0, 896),
        ] {
            let n = 48;
            let q = QTensor::quantize(&matrix(n, k), dtype).expect("quantize");
            let stored = q.data().expect("data").to_vec();
            let tiled = TiledWeight::new(dtype, &stored, n, k).expect("tiles");
            let rows = 11;
            let lhs = activations(rows, k);
            let ours = tiled.multiply(&lhs, rows).expect("multiply");

            // The plain-Rust reference on the tiled bytes.
            let x = match dtype {
                GgmlDType::Q5_0 | GgmlDType::Q8_0 => Activations::Blocks32(Q8Rows32::quantize(&lhs, rows, k)),
                _ => Activations::K(Q8kRows::quantize(&lhs, rows, k)),
            };
            let tile_len = tiled.bytes.len() / (n / TILE_ROWS);
            for (t, tile) in tiled.bytes.chunks_exact(tile_len).enumerate() {
                let mut sums = vec![[0f32; TILE_ROWS]; rows];
                reference_dot_tile(dtype, tile, &x, 0, &mut sums);
                for (r, row) in sums.iter().enumerate() {
                    for (j, expected) in row.iter().enumerate() {
                        let got = ours[r * n + t * TILE_ROWS + j];
                        let tolerance = 1e-5 * expected.abs().max(1.0);
                        assert!(
                            (got - expected).abs() <= tolerance,
                            "{dtype:?} row {r} col {j}: {got} vs {expected}"
                        );
                    }
                }
            }

            // candle's own multiplication of the stored blocks.
            let lhs_t = Tensor::from_vec(lhs.clone(), (rows, k), &Device::Cpu).expect("lhs");
            let candle = QMatMul::from_qtensor(q)
                .expect("qmatmul")
                .forward(&lhs_t)
                .expect("candle")
                .flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("vec");
            let worst = ours
                .iter()
                .zip(&candle)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 2e-3, "{dtype:?}: {worst}");

            // Each row alone gets the same bits as inside the batch of 11.
            for r in [0, 4, 10] {
                let alone = tiled.multiply(&lhs[r * k..(r + 1) * k], 1).expect("one row");
                assert_eq!(alone, ours[r * n..(r + 1) * n], "{dtype:?} row {r}");
            }
        }
    }

    #[test]
    fn a_group_gives_each_weight_what_it_gives_alone() {
        if !available() {
            return;
        }
        let k = 512;
        let weights: Vec<TiledWeight> = [(GgmlDType::Q4K, 32), (GgmlDType::Q8_0, 16), (GgmlDType::Q6K, 48)]
            .into_iter()
            .map(|(dtype, n)| {
                let q = QTensor::quantize(&matrix(n, k), dtype).expect("quantize");
                TiledWeight::new(dtype, &q.data().expect("data"), n, k).expect("tiles")
            })
            .collect();
        let lhs = activations(3, k);
        let refs: Vec<&TiledWeight> = weights.iter().collect();
        let group = multiply_group(&refs, &lhs, 3).expect("group");
        for (weight, out) in weights.iter().zip(&group) {
            assert_eq!(
                out,
                &weight.multiply(&lhs, 3).expect("alone"),
                "{:?}",
                weight.dtype
            );
        }
        assert!(
            multiply_group(&refs, &lhs[..k], 3).is_none(),
            "lhs of the wrong size"
        );
    }

    #[test]
    fn shapes_the_tiles_do_not_fit_are_declined() {
        let q = QTensor::quantize(&matrix(24, 256), GgmlDType::Q4K).expect("quantize");
        let stored = q.data().expect("data").to_vec();
        assert!(
            TiledWeight::new(GgmlDType::Q4K, &stored, 24, 256).is_none(),
            "24 rows"
        );
        assert!(
            TiledWeight::new(GgmlDType::Q8_0, &stored, 16, 256).is_none(),
            "type"
        );
        assert!(
            TiledWeight::new(GgmlDType::Q4K, &stored[..10], 16, 256).is_none(),
            "bytes"
        );
        if available() {
            let tiled = TiledWeight::new(GgmlDType::Q4K, &stored[..16 * 144], 16, 256).expect("16 rows");
            assert!(tiled.multiply(&[0.0; 255], 1).is_none(), "lhs width");
        }
    }
}
