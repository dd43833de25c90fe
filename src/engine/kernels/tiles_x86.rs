//! The AVX-512 VNNI kernels of [`super::tiles`]: one tile (16 weight rows, one per 32-bit
//! lane) times up to four activation rows, over all blocks of the row.

use std::arch::x86_64::*;

use super::{
    Q8kRows, QK_K,
    tiles::{Activations, GROUP_ROWS, Q4K_TILE_BYTES, Q6K_TILE_BYTES, TILE_ROWS},
    tiles_q5_0::{self as q5_0, Q8Rows32},
};
use candle_core::quantized::GgmlDType;

// Each tile-block's parts, as the kernels read them (16 lanes of f16 `d`, 16 bytes per scale
// group, 64 bytes per word of 16 rows), end where the next begins and the last ends at the
// tile-block's size: what the `SAFETY` comments' offset sums rest on.
const _: () = {
    use super::tiles::{q4k_at, q6k_at};
    use q5_0::{at as q5_0_at, q8_0 as q8_0_at};
    const HALFS: usize = 2 * TILE_ROWS;
    const WORDS: usize = 4 * TILE_ROWS;
    assert!(q4k_at::D + HALFS == q4k_at::DMIN && q4k_at::DMIN + HALFS == q4k_at::SCALES);
    assert!(q4k_at::SCALES + 8 * TILE_ROWS == q4k_at::MINS && q4k_at::MINS + 8 * TILE_ROWS == q4k_at::QS);
    assert!(q4k_at::QS + 4 * 8 * WORDS == Q4K_TILE_BYTES);
    assert!(q6k_at::D + HALFS == q6k_at::SCALES && q6k_at::SCALES + 16 * TILE_ROWS == q6k_at::QL);
    assert!(q6k_at::QL + 2 * 2 * 8 * WORDS == q6k_at::QH && q6k_at::QH + 2 * 8 * WORDS == Q6K_TILE_BYTES);
    assert!(q5_0_at::D + HALFS == q5_0_at::QH && q5_0_at::QH + WORDS == q5_0_at::QS);
    assert!(q5_0_at::QS + 4 * WORDS == q5_0::TILE_BYTES);
    assert!(q8_0_at::D + HALFS == q8_0_at::QS && q8_0_at::QS + 8 * WORDS == q8_0_at::TILE_BYTES);
};

/// Called by `tiles::dot_tile` only after [`super::available`], with what
/// [`super::tiles::multiply_group`] established: `tile` is one tile of `x.blocks`
/// tile-blocks of `dtype`, and rows `first..first + sums.len()` of `x` exist (1 to
/// [`GROUP_ROWS`] of them).
pub(super) fn dot_tile(
    dtype: GgmlDType,
    tile: &[u8],
    x: &Activations,
    first: usize,
    sums: &mut [[f32; TILE_ROWS]],
) {
    macro_rules! rows {
        ($kernel:ident, $x:expr, $bytes:expr) => {{
            let x = $x;
            // Checked in release builds too: these bounds keep the kernels' reads in bounds.
            assert_eq!(tile.len(), x.blocks * $bytes);
            assert!((1..=GROUP_ROWS).contains(&sums.len()) && first + sums.len() <= x.rows);
            // SAFETY: the kernels' `# Safety` terms. `tiles::dot_tile` calls this only when
            // `available()` found AVX-512F/BW/VNNI. `multiply_group` slices `tile` as
            // `(k / per_block) · tile-block bytes` of a `TiledWeight` (`k` a multiple of
            // `per_block`, checked by `TiledWeight::new`) and quantizes `x` from `rows × k`
            // values, so `x.blocks == k / per_block`; this match pairs each type with its
            // own activations. It passes 1..=GROUP_ROWS rows from `first`, all below
            // `rows == x.rows`, so `R` is `sums.len()`.
            unsafe {
                match sums.len() {
                    1 => $kernel::<1>(tile, x, first, sums),
                    2 => $kernel::<2>(tile, x, first, sums),
                    3 => $kernel::<3>(tile, x, first, sums),
                    _ => $kernel::<GROUP_ROWS>(tile, x, first, sums),
                }
            }
        }};
    }
    match (dtype, x) {
        (GgmlDType::Q4K, Activations::K(x)) => rows!(q4k, x, Q4K_TILE_BYTES),
        (GgmlDType::Q6K, Activations::K(x)) => rows!(q6k, x, Q6K_TILE_BYTES),
        (GgmlDType::Q5_0, Activations::Blocks32(x)) => rows!(q5_0, x, q5_0::TILE_BYTES),
        (GgmlDType::Q8_0, Activations::Blocks32(x)) => rows!(q8_0, x, q5_0::q8_0::TILE_BYTES),
        // `TiledWeight::multiply` pairs each type with its activations; anything else
        // takes the plain definition.
        _ => super::tiles::reference_dot_tile(dtype, tile, x, first, sums),
    }
}

/// 4 bytes of activations at `p`, in every lane.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn broadcast4(p: *const i8) -> __m512i {
    // SAFETY: the caller passes a pointer with 4 readable bytes.
    _mm512_set1_epi32(unsafe { std::ptr::read_unaligned(p.cast::<i32>()) })
}

/// 16 bytes at `p` widened to f32 lanes (`signed` for Q6_K's scales).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bytes_to_f32(p: *const u8, signed: bool) -> __m512 {
    // SAFETY: the caller passes a pointer with 16 readable bytes.
    let bytes = unsafe { _mm_loadu_si128(p.cast()) };
    _mm512_cvtepi32_ps(if signed {
        _mm512_cvtepi8_epi32(bytes)
    } else {
        _mm512_cvtepu8_epi32(bytes)
    })
}

/// 16 f16 values at `p` as f32 lanes.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn halfs_to_f32(p: *const u8) -> __m512 {
    // SAFETY: the caller passes a pointer with 32 readable bytes.
    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p.cast()) })
}

/// Bytes of weights to prefetch ahead of the line being multiplied: decode steps are bound
/// by memory bandwidth, and the hardware prefetcher alone leaves it idle at times. One
/// prefetch per 64-byte line as the kernel consumes one, not a block's worth at once (a
/// burst overflows the miss buffers); 8 KiB ahead measured best (see `docs/engine.md`).
const PREFETCH_AHEAD: usize = 8192;

/// Ask for the lines of `bytes` bytes from `p` (a hint: it never faults, also past the end
/// of the weights).
#[inline(always)]
fn prefetch(p: *const u8, bytes: usize) {
    let mut offset = 0;
    while offset < bytes {
        // SAFETY: a prefetch is a hint; it does not access memory architecturally.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(offset).cast()) };
        offset += 64;
    }
}

/// Lane `j` of row `r`'s total: Σ over blocks of `d_a · (Σ_sub d·scale·Σ q·a) − d_a·Σ_sub
/// dmin·min·Σ a`, the same operations in the same order whatever `R` is.
///
/// # Safety
///
/// The CPU has AVX-512F/BW/VNNI; `tile.len() == x.blocks · Q4K_TILE_BYTES`; rows
/// `first..first + R` of `x` exist. Every tile-block `b < x.blocks` then lies inside `tile`
/// and every row's block `b` of 256 activations inside `x.qs` (`x.rows · k` long).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q4k<const R: usize>(tile: &[u8], x: &Q8kRows, first: usize, sums: &mut [[f32; TILE_ROWS]]) {
    use super::tiles::q4k_at::*;
    let k = x.blocks * QK_K;
    let nibble = _mm512_set1_epi8(0x0F);
    let mut totals = [_mm512_setzero_ps(); R];
    for b in 0..x.blocks {
        // SAFETY: `b < x.blocks`, so tile-block `b` (`Q4K_TILE_BYTES` from `p`) is inside
        // `tile` (see `# Safety`).
        let p = unsafe { tile.as_ptr().add(b * Q4K_TILE_BYTES) };
        prefetch(p.wrapping_add(PREFETCH_AHEAD), QS);
        // SAFETY: row `first + r < x.rows` (`r < R`) and `b < x.blocks`: the start of the
        // row's block `b` in `x.qs`.
        let acts: [*const i8; R] =
            std::array::from_fn(|r| unsafe { x.qs.as_ptr().add((first + r) * k + b * QK_K) });
        // SAFETY: the 16 f16 `d` at `D` and `dmin` at `DMIN`, 32 bytes each, end by
        // `SCALES` (asserted at the top of the file), inside the tile-block.
        let (d, dmin) = unsafe { (halfs_to_f32(p.add(D)), halfs_to_f32(p.add(DMIN))) };
        let mut block = [_mm512_setzero_ps(); R];
        for chunk in 0..4 {
            let mut low = [_mm512_setzero_si512(); R];
            let mut high = [_mm512_setzero_si512(); R];
            for w in 0..8 {
                prefetch(p.wrapping_add(PREFETCH_AHEAD + QS + (chunk * 8 + w) * 64), 64);
                // SAFETY: word `chunk · 8 + w < 32` of the 64-byte words at `QS`, which end
                // at `Q4K_TILE_BYTES` (asserted at the top of the file).
                let q = unsafe { _mm512_loadu_si512(p.add(QS + (chunk * 8 + w) * 64).cast()) };
                let q_low = _mm512_and_si512(q, nibble);
                let q_high = _mm512_and_si512(_mm512_srli_epi16(q, 4), nibble);
                for r in 0..R {
                    // SAFETY: activations `64·chunk + 4w` and 32 further, 4 bytes each, end
                    // by 64·3 + 28 + 32 + 4 = 256: inside the row's block at `acts[r]`.
                    let (a_low, a_high) = unsafe {
                        let a = acts[r].add(64 * chunk + 4 * w);
                        (broadcast4(a), broadcast4(a.add(32)))
                    };
                    low[r] = _mm512_dpbusd_epi32(low[r], q_low, a_low);
                    high[r] = _mm512_dpbusd_epi32(high[r], q_high, a_high);
                }
            }
            for (sub, sums) in [(2 * chunk, &low), (2 * chunk + 1, &high)] {
                // SAFETY: scale group `sub < 8` of the 16-byte groups at `SCALES`, which
                // end at `MINS` (asserted at the top of the file).
                let scale = _mm512_mul_ps(d, unsafe { bytes_to_f32(p.add(SCALES + sub * TILE_ROWS), false) });
                for r in 0..R {
                    block[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r]), scale, block[r]);
                }
            }
        }
        for r in 0..R {
            let d_a = x.d[(first + r) * x.blocks + b];
            totals[r] = _mm512_fmadd_ps(block[r], _mm512_set1_ps(d_a), totals[r]);
        }
        // Mins: Σ_sub dmin·min·(d_a·Σ a over the sub-block), the activation side precomputed.
        let sub_sums = |r: usize| ((first + r) * x.blocks + b) * 8;
        for sub in 0..8 {
            // SAFETY: min group `sub < 8` of the 16-byte groups at `MINS`, which end at `QS`
            // (asserted at the top of the file).
            let min = _mm512_mul_ps(dmin, unsafe {
                bytes_to_f32(p.add(MINS + sub * TILE_ROWS), false)
            });
            for (r, total) in totals.iter_mut().enumerate() {
                let s = x.scaled_sub_sums[sub_sums(r) + sub];
                *total = _mm512_fnmadd_ps(min, _mm512_set1_ps(s), *total);
            }
        }
    }
    for r in 0..R {
        // SAFETY: `sums[r]` holds 16 f32.
        unsafe { _mm512_storeu_ps(sums[r].as_mut_ptr(), totals[r]) };
    }
}

/// Q6_K: values are stored as q + 32 in 6 bits (4 in `ql`, 2 in `qh`); the products use
/// the unsigned q + 32 and each 16-value group takes off 32·Σa (the activations' sums).
///
/// # Safety
///
/// As [`q4k`]'s, with `tile.len() == x.blocks · Q6K_TILE_BYTES`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q6k<const R: usize>(tile: &[u8], x: &Q8kRows, first: usize, sums: &mut [[f32; TILE_ROWS]]) {
    use super::tiles::q6k_at::*;
    let k = x.blocks * QK_K;
    let nibble = _mm512_set1_epi8(0x0F);
    let bits = [
        _mm512_set1_epi8(0x03),
        _mm512_set1_epi8(0x0C),
        _mm512_set1_epi8(0x30),
        _mm512_set1_epi8(0xC0u8 as i8),
    ];
    let mut totals = [_mm512_setzero_ps(); R];
    for b in 0..x.blocks {
        // SAFETY: `b < x.blocks`, so tile-block `b` (`Q6K_TILE_BYTES` from `p`) is inside
        // `tile` (see `# Safety`).
        let p = unsafe { tile.as_ptr().add(b * Q6K_TILE_BYTES) };
        let ahead = p.wrapping_add(PREFETCH_AHEAD);
        prefetch(ahead, QL);
        // SAFETY: row `first + r < x.rows` (`r < R`) and `b < x.blocks`: the start of the
        // row's block `b` in `x.qs`.
        let acts: [*const i8; R] =
            std::array::from_fn(|r| unsafe { x.qs.as_ptr().add((first + r) * k + b * QK_K) });
        // SAFETY: the 16 f16 `d` at `D`, 32 bytes, end at `SCALES` (asserted at the top of
        // the file), inside the tile-block.
        let d = unsafe { halfs_to_f32(p.add(D)) };
        let mut block = [_mm512_setzero_ps(); R];
        // Value 128·half + 32·quarter + 4·w + i (i < 4) of a row is, in word w of that row:
        // quarter 0: ql[half][0] low nibble, qh bits 0-1; 1: ql[half][1] low, bits 2-3;
        // 2: ql[half][0] high, bits 4-5; 3: ql[half][1] high, bits 6-7. Its 16-value group
        // (scale) is 8·half + 2·quarter + w / 4.
        for half in 0..2 {
            for (quarter, &mask) in bits.iter().enumerate() {
                for group_half in 0..2 {
                    let mut isum = [_mm512_setzero_si512(); R];
                    for w in 4 * group_half..4 * group_half + 4 {
                        // Each of the block's lines once, spread over the loop.
                        match quarter {
                            0 | 1 => {
                                prefetch(ahead.wrapping_add(QL + ((half * 2 + quarter) * 8 + w) * 64), 64)
                            }
                            2 => prefetch(ahead.wrapping_add(QH + (half * 8 + w) * 64), 64),
                            _ => {}
                        }
                        // SAFETY: `ql` word `(2·half + quarter % 2) · 8 + w < 32` of the 64-byte
                        // words at `QL`, which end at `QH`, and `qh` word `8·half + w < 16` of
                        // those at `QH`, which end at `Q6K_TILE_BYTES` (asserted at the top of
                        // the file).
                        let (low_word, high_word) = unsafe {
                            (
                                _mm512_loadu_si512(
                                    p.add(QL + ((half * 2 + quarter % 2) * 8 + w) * 64).cast(),
                                ),
                                _mm512_loadu_si512(p.add(QH + (half * 8 + w) * 64).cast()),
                            )
                        };
                        let low = if quarter < 2 {
                            _mm512_and_si512(low_word, nibble)
                        } else {
                            _mm512_and_si512(_mm512_srli_epi16(low_word, 4), nibble)
                        };
                        let top = _mm512_and_si512(high_word, mask);
                        let top = match quarter {
                            0 => _mm512_slli_epi16(top, 4),
                            1 => _mm512_slli_epi16(top, 2),
                            2 => top,
                            _ => _mm512_srli_epi16(top, 2),
                        };
                        let q = _mm512_or_si512(low, top);
                        for r in 0..R {
                            // SAFETY: activations `128·half + 32·quarter + 4w` .. + 4 end by
                            // 128 + 96 + 28 + 4 = 256: inside the row's block at `acts[r]`.
                            let a = unsafe { broadcast4(acts[r].add(128 * half + 32 * quarter + 4 * w)) };
                            isum[r] = _mm512_dpbusd_epi32(isum[r], q, a);
                        }
                    }
                    let group = 8 * half + 2 * quarter + group_half;
                    // SAFETY: scale group `group < 16` of the 16-byte groups at `SCALES`,
                    // which end at `QL` (asserted at the top of the file).
                    let scale = _mm512_mul_ps(d, unsafe {
                        bytes_to_f32(p.add(SCALES + group * TILE_ROWS), true)
                    });
                    for r in 0..R {
                        let bsum = i32::from(x.bsums[((first + r) * x.blocks + b) * 16 + group]);
                        let centred = _mm512_sub_epi32(isum[r], _mm512_set1_epi32(32 * bsum));
                        block[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), scale, block[r]);
                    }
                }
            }
        }
        for r in 0..R {
            let d_a = x.d[(first + r) * x.blocks + b];
            totals[r] = _mm512_fmadd_ps(block[r], _mm512_set1_ps(d_a), totals[r]);
        }
    }
    for r in 0..R {
        // SAFETY: `sums[r]` holds 16 f32.
        unsafe { _mm512_storeu_ps(sums[r].as_mut_ptr(), totals[r]) };
    }
}

/// Q5_0: values are (4 low bits | 5th bit << 4) − 16; the products use the unsigned 5-bit
/// value and each block takes off 16·Σa (the activations' block sums).
///
/// # Safety
///
/// The CPU has AVX-512F/BW/VNNI; `tile.len() == x.blocks · q5_0::TILE_BYTES`; rows
/// `first..first + R` of `x` exist. Every tile-block `b < x.blocks` then lies inside `tile`
/// and every row's block `b` of 32 activations inside `x.qs` (`x.rows · k` long).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q5_0<const R: usize>(tile: &[u8], x: &Q8Rows32, first: usize, sums: &mut [[f32; TILE_ROWS]]) {
    use q5_0::at::*;
    let k = x.blocks * q5_0::BLOCK;
    let nibble = _mm512_set1_epi8(0x0F);
    let fifth = _mm512_set1_epi8(0x10);
    let mut totals = [_mm512_setzero_ps(); R];
    for b in 0..x.blocks {
        // SAFETY: `b < x.blocks`, so tile-block `b` (`q5_0::TILE_BYTES` from `p`) is inside
        // `tile` (see `# Safety`).
        let p = unsafe { tile.as_ptr().add(b * q5_0::TILE_BYTES) };
        prefetch(p.wrapping_add(PREFETCH_AHEAD), q5_0::TILE_BYTES);
        // SAFETY: row `first + r < x.rows` (`r < R`) and `b < x.blocks`: the start of the
        // row's block `b` in `x.qs`.
        let acts: [*const i8; R] =
            std::array::from_fn(|r| unsafe { x.qs.as_ptr().add((first + r) * k + b * q5_0::BLOCK) });
        // SAFETY: the 16 f16 `d` at `D` (32 bytes) end at `QH`, the 16 `qh` words at `QH`
        // (64 bytes) at `QS` (asserted at the top of the file), inside the tile-block.
        let (d, qh) = unsafe { (halfs_to_f32(p.add(D)), _mm512_loadu_si512(p.add(QH).cast())) };
        // Two sums per row (low and high nibbles' values), so that one row's `vpdpbusd`s do
        // not wait on each other (a single chain held a one-row step to ~8 bytes a cycle).
        let mut isum = [_mm512_setzero_si512(); R];
        let mut isum_high = [_mm512_setzero_si512(); R];
        for w in 0..4 {
            // SAFETY: word `w < 4` of the 64-byte words at `QS`, which end at
            // `q5_0::TILE_BYTES` (asserted at the top of the file).
            let q = unsafe { _mm512_loadu_si512(p.add(QS + w * 64).cast()) };
            // Byte i of a lane: bit w is value 4w + i's 5th bit, bit 4 + w value 16 + 4w + i's.
            let low_fifth = _mm512_and_si512(_mm512_sllv_epi32(qh, _mm512_set1_epi32(4 - w as i32)), fifth);
            let high_fifth = _mm512_and_si512(_mm512_srlv_epi32(qh, _mm512_set1_epi32(w as i32)), fifth);
            // (a & nibble) | b in one instruction.
            let low = _mm512_ternarylogic_epi32::<0xEC>(q, low_fifth, nibble);
            let high = _mm512_ternarylogic_epi32::<0xEC>(_mm512_srli_epi16(q, 4), high_fifth, nibble);
            for r in 0..R {
                // SAFETY: activations `4w` and 16 further, 4 bytes each, end by 12 + 16 + 4 =
                // 32: inside the row's block at `acts[r]`.
                let (a_low, a_high) = unsafe {
                    let a = acts[r].add(4 * w);
                    (broadcast4(a), broadcast4(a.add(16)))
                };
                isum[r] = _mm512_dpbusd_epi32(isum[r], low, a_low);
                isum_high[r] = _mm512_dpbusd_epi32(isum_high[r], high, a_high);
            }
        }
        for r in 0..R {
            let index = (first + r) * x.blocks + b;
            let both = _mm512_add_epi32(isum[r], isum_high[r]);
            let centred = _mm512_sub_epi32(both, _mm512_set1_epi32(16 * x.sums[index]));
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(x.d[index]));
            totals[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), scale, totals[r]);
        }
    }
    for r in 0..R {
        // SAFETY: `sums[r]` holds 16 f32.
        unsafe { _mm512_storeu_ps(sums[r].as_mut_ptr(), totals[r]) };
    }
}

/// Q8_0: weights stored as w + 128 (unsigned for `vpdpbusd`); each block takes 128·Σa off.
///
/// # Safety
///
/// As [`q5_0()`]'s, with `tile.len() == x.blocks · q5_0::q8_0::TILE_BYTES`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q8_0<const R: usize>(tile: &[u8], x: &Q8Rows32, first: usize, sums: &mut [[f32; TILE_ROWS]]) {
    use q5_0::q8_0::*;
    let k = x.blocks * q5_0::BLOCK;
    let mut totals = [_mm512_setzero_ps(); R];
    for b in 0..x.blocks {
        // SAFETY: `b < x.blocks`, so tile-block `b` (`TILE_BYTES` from `p`) is inside `tile`
        // (see `# Safety`).
        let p = unsafe { tile.as_ptr().add(b * TILE_BYTES) };
        prefetch(p.wrapping_add(PREFETCH_AHEAD), TILE_BYTES);
        // SAFETY: row `first + r < x.rows` (`r < R`) and `b < x.blocks`: the start of the
        // row's block `b` in `x.qs`.
        let acts: [*const i8; R] =
            std::array::from_fn(|r| unsafe { x.qs.as_ptr().add((first + r) * k + b * q5_0::BLOCK) });
        // SAFETY: the 16 f16 `d` at `D`, 32 bytes, end at `QS` (asserted at the top of the
        // file), inside the tile-block.
        let d = unsafe { halfs_to_f32(p.add(D)) };
        // Even and odd words in two sums per row: two shorter `vpdpbusd` chains (see `q5_0`).
        let mut isum = [[_mm512_setzero_si512(); R]; 2];
        for w in 0..8 {
            // SAFETY: word `w < 8` of the 64-byte words at `QS`, which end at `TILE_BYTES`
            // (asserted at the top of the file).
            let q = unsafe { _mm512_loadu_si512(p.add(QS + w * 64).cast()) };
            for r in 0..R {
                let sum = &mut isum[w % 2][r];
                // SAFETY: activations `4w` .. `4w + 4` (`w < 8`) end by 32: inside the row's
                // block at `acts[r]`.
                *sum = _mm512_dpbusd_epi32(*sum, q, unsafe { broadcast4(acts[r].add(4 * w)) });
            }
        }
        for r in 0..R {
            let index = (first + r) * x.blocks + b;
            let both = _mm512_add_epi32(isum[0][r], isum[1][r]);
            let centred = _mm512_sub_epi32(both, _mm512_set1_epi32(128 * x.sums[index]));
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(x.d[index]));
            totals[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), scale, totals[r]);
        }
    }
    for r in 0..R {
        // SAFETY: `sums[r]` holds 16 f32.
        unsafe { _mm512_storeu_ps(sums[r].as_mut_ptr(), totals[r]) };
    }
}
