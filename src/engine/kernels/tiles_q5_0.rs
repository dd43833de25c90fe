//! Q5_0 and Q8_0 in the 16-row tiles of [`super::tiles`]: the layouts, their activations
//! (8-bit per 32 values) and the plain-Rust definitions the kernels are tested against.
//!
//! Why: Qwen2.5-0.5B's weights are mostly Q5_0, which candle multiplies with scalar code.
//! Requantized to Q8_0 at load they would take 8.5 bits per weight instead of 5.5, plus
//! zero padding of 896-wide rows to 1024 for candle's prompt kernels, plus those kernels'
//! repacked copy. Tiled, they keep their stored size.
//!
//! Stored block (22 bytes, 32 values): `d` f16, `qh` u32 (bit j: the 5th bit of value j),
//! `qs[16]` (byte j: value j in the low nibble, value j + 16 in the high one); a value is
//! `d · ((q | bit << 4) − 16)`.
//!
//! Tile-block (352 bytes = 16 × 22): `d[R]` f16, `qh[R]` u32 rearranged, `qs[4 words][R][4]`
//! (word w of a row: its stored bytes 4w … 4w + 3). In the rearranged `qh`, byte i holds in
//! bit w the 5th bit of value 4w + i and in bit 4 + w that of value 16 + 4w + i, so the
//! kernel moves a word's bits in place with one shift and one mask.

use super::{quantize_block, tiles::TILE_ROWS};

/// Values per block.
pub(super) const BLOCK: usize = 32;
/// Bytes of a stored block.
pub(super) const BLOCK_BYTES: usize = 22;
/// Bytes of a tile-block (16 rows).
pub(super) const TILE_BYTES: usize = TILE_ROWS * BLOCK_BYTES;

/// Offsets inside a tile-block.
pub(super) mod at {
    pub(crate) const D: usize = 0;
    pub(crate) const QH: usize = 32;
    pub(crate) const QS: usize = 96;
}

/// Activation rows quantized per 32 values (as llama.cpp's Q8_0), with each block's sum.
#[derive(Debug)]
pub(crate) struct Q8Rows32 {
    pub(super) rows: usize,
    /// Blocks of 32 per row.
    pub(super) blocks: usize,
    pub(super) qs: Vec<i8>,
    pub(super) d: Vec<f32>,
    /// Σ qs of each block.
    pub(super) sums: Vec<i32>,
}

impl Q8Rows32 {
    /// Quantize `rows` rows of `k` values (`k` a multiple of 32).
    pub(crate) fn quantize(x: &[f32], rows: usize, k: usize) -> Q8Rows32 {
        debug_assert_eq!(x.len(), rows * k);
        let blocks = k / BLOCK;
        let mut out = Q8Rows32 {
            rows,
            blocks,
            qs: vec![0; rows * k],
            d: vec![0.0; rows * blocks],
            sums: vec![0; rows * blocks],
        };
        for (b, values) in x.chunks_exact(BLOCK).enumerate() {
            let qs = &mut out.qs[b * BLOCK..(b + 1) * BLOCK];
            out.d[b] = quantize_block(values, qs);
            out.sums[b] = qs.iter().map(|&q| i32::from(q)).sum();
        }
        out
    }
}

/// Tile one block position: `source(row)` is row `row`'s stored block.
pub(super) fn tile_block<'a>(source: impl Fn(usize) -> &'a [u8], target: &mut [u8]) {
    for row in 0..TILE_ROWS {
        let block = source(row);
        target[at::D + 2 * row..at::D + 2 * row + 2].copy_from_slice(&block[0..2]);
        let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
        let at = at::QH + 4 * row;
        target[at..at + 4].copy_from_slice(&rearrange(qh).to_le_bytes());
        for w in 0..4 {
            let at = at::QS + (w * TILE_ROWS + row) * 4;
            target[at..at + 4].copy_from_slice(&block[6 + 4 * w..6 + 4 * w + 4]);
        }
    }
}

/// Row `row`'s stored block back from a tile-block.
pub(super) fn untile_block(source: &[u8], row: usize, block: &mut [u8]) {
    block[0..2].copy_from_slice(&source[at::D + 2 * row..at::D + 2 * row + 2]);
    let at = at::QH + 4 * row;
    let rearranged = u32::from_le_bytes([source[at], source[at + 1], source[at + 2], source[at + 3]]);
    block[2..6].copy_from_slice(&restore(rearranged).to_le_bytes());
    for w in 0..4 {
        let at = at::QS + (w * TILE_ROWS + row) * 4;
        block[6 + 4 * w..6 + 4 * w + 4].copy_from_slice(&source[at..at + 4]);
    }
}

/// Where the 5th bit of value `v` goes in the rearranged `qh` (see the module docs).
fn rearranged_bit(v: usize) -> usize {
    let (high, low) = (v / 16, v % 16);
    let (w, i) = (low / 4, low % 4);
    8 * i + 4 * high + w
}

fn rearrange(qh: u32) -> u32 {
    (0..32).fold(0, |out, v| out | (((qh >> v) & 1) << rearranged_bit(v)))
}

fn restore(rearranged: u32) -> u32 {
    (0..32).fold(0, |out, v| out | (((rearranged >> rearranged_bit(v)) & 1) << v))
}

/// Row `r` of `x` times one weight row's stored Q5_0 blocks.
pub(super) fn reference(blocks: &[u8], x: &Q8Rows32, r: usize) -> f32 {
    let mut total = 0f32;
    for (b, block) in blocks.chunks_exact(BLOCK_BYTES).enumerate() {
        let d = super::f16(block, 0);
        let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
        let index = r * x.blocks + b;
        let a = &x.qs[index * BLOCK..(index + 1) * BLOCK];
        let mut isum = 0i32;
        for j in 0..16 {
            let low = i32::from(block[6 + j] & 0x0F) | (((qh >> j) & 1) as i32) << 4;
            let high = i32::from(block[6 + j] >> 4) | (((qh >> (j + 16)) & 1) as i32) << 4;
            isum += low * i32::from(a[j]) + high * i32::from(a[j + 16]);
        }
        total += d * x.d[index] * (isum - 16 * x.sums[index]) as f32;
    }
    total
}

/// Q8_0 in the same tiles: its blocks (`d` f16, 32 × i8) become `d[R]` f16 and
/// `qs[8 words][R][4]` with every weight offset by +128 (stored unsigned: the kernel's
/// `vpdpbusd` takes one unsigned operand; it takes 128·Σa back off). 544 bytes = 16 × 34.
pub(super) mod q8_0 {
    use super::TILE_ROWS;

    pub(crate) const BLOCK_BYTES: usize = 34;
    pub(crate) const TILE_BYTES: usize = TILE_ROWS * BLOCK_BYTES;
    pub(crate) const D: usize = 0;
    pub(crate) const QS: usize = 32;

    pub(crate) fn tile_block<'a>(source: impl Fn(usize) -> &'a [u8], target: &mut [u8]) {
        for row in 0..TILE_ROWS {
            let block = source(row);
            target[D + 2 * row..D + 2 * row + 2].copy_from_slice(&block[0..2]);
            for w in 0..8 {
                let at = QS + (w * TILE_ROWS + row) * 4;
                for i in 0..4 {
                    target[at + i] = block[2 + 4 * w + i] ^ 0x80;
                }
            }
        }
    }

    pub(crate) fn untile_block(source: &[u8], row: usize, block: &mut [u8]) {
        block[0..2].copy_from_slice(&source[D + 2 * row..D + 2 * row + 2]);
        for w in 0..8 {
            let at = QS + (w * TILE_ROWS + row) * 4;
            for i in 0..4 {
                block[2 + 4 * w + i] = source[at + i] ^ 0x80;
            }
        }
    }

    /// Row `r` of `x` times one weight row's stored Q8_0 blocks.
    pub(crate) fn reference(blocks: &[u8], x: &super::Q8Rows32, r: usize) -> f32 {
        let mut total = 0f32;
        for (b, block) in blocks.chunks_exact(BLOCK_BYTES).enumerate() {
            let index = r * x.blocks + b;
            let a = &x.qs[index * super::BLOCK..(index + 1) * super::BLOCK];
            let isum: i32 = block[2..]
                .iter()
                .zip(a)
                .map(|(&w, &a)| i32::from(w as i8) * i32::from(a))
                .sum();
            total += super::super::f16(block, 0) * x.d[index] * isum as f32;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rearranging_the_fifth_bits_round_trips_and_is_a_permutation() {
        let mut seen = [false; 32];
        for v in 0..32 {
            seen[rearranged_bit(v)] = true;
        }
        assert!(seen.iter().all(|&s| s));
        for qh in [0u32, 1, 0x8000_0000, 0xDEAD_BEEF, 0x0123_4567, u32::MAX] {
            assert_eq!(restore(rearrange(qh)), qh);
        }
        // Value 4w + i lands in byte i, bit w; value 16 + 4w + i in byte i, bit 4 + w.
        assert_eq!(rearrange(1 << 5), 1 << (8 + 1));
        assert_eq!(rearrange(1 << 23), 1 << (24 + 4 + 1));
    }
}
