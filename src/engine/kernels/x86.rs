//! The AVX-512 VNNI kernels of [`super`]: one weight row's blocks times up to eight
//! activation rows.

use std::arch::x86_64::*;

use super::*;

/// How far ahead to prefetch (bytes of weight blocks): measured on the 1.5B, one or two
/// rows do best 4 KiB ahead, more rows (longer per block) 8 KiB ahead.
const fn prefetch_distance(rows: usize) -> usize {
    if rows <= 2 { 4096 } else { 8192 }
}

/// Called by [`super::dot_rows`] only after [`available`], with what [`super::matmul`]
/// checked: `blocks` is one weight row of `x.blocks` Q4_K or Q6_K blocks and rows
/// `first..first + sums.len()` of `x` exist (1 to [`MAX_ROWS`] of them).
pub(super) fn dot_rows(dtype: GgmlDType, blocks: &[u8], x: &Q8kRows, first: usize, sums: &mut [f32]) {
    let block_bytes = if dtype == GgmlDType::Q4K {
        Q4K_BYTES
    } else {
        Q6K_BYTES
    };
    // Checked in release builds too: these bounds are what keeps the kernels' reads in
    // bounds, and three comparisons are nothing beside a weight row's dot products.
    assert!(matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K), "{dtype:?}");
    assert_eq!(blocks.len(), x.blocks * block_bytes);
    assert!((1..=MAX_ROWS).contains(&sums.len()) && first + sums.len() <= x.rows);
    macro_rules! rows {
        ($kernel:ident) => {
            // SAFETY: the kernels' `# Safety` terms: `super::dot_rows` calls this only when
            // `available()` found AVX-512F/BW/VNNI, and `matmul` checked that `blocks` is
            // `x.blocks` whole blocks of this type (`weight.len() == n · (k / 256) ·
            // block_bytes`, `x.blocks · 256 == k`); `for_each_weight_row` hands over
            // 1..=MAX_ROWS rows from `first`, all below `x.rows`, so `R` is `sums.len()`.
            unsafe {
                match sums.len() {
                    1 => $kernel::<1>(blocks, x, first, sums),
                    2 => $kernel::<2>(blocks, x, first, sums),
                    3 => $kernel::<3>(blocks, x, first, sums),
                    4 => $kernel::<4>(blocks, x, first, sums),
                    5 => $kernel::<5>(blocks, x, first, sums),
                    6 => $kernel::<6>(blocks, x, first, sums),
                    7 => $kernel::<7>(blocks, x, first, sums),
                    _ => $kernel::<8>(blocks, x, first, sums),
                }
            }
        };
    }
    match dtype {
        GgmlDType::Q4K => rows!(q4k),
        _ => rows!(q6k),
    }
}

/// Each row's total is kept as 16 f32 lanes (and, for Q4_K's mins, 4 more) and summed
/// across lanes only at the end of the weight row; the order of operations for a row
/// does not depend on the other rows, so any batch gives it the same bits.
///
/// # Safety
///
/// The CPU has AVX-512F/BW/VNNI, `blocks` holds at most `x.blocks` Q4_K blocks, and rows
/// `first..first + R` of `x` exist (`R == sums.len()`): each row's activations, scales and
/// sub-block sums for block `b < x.blocks` are then inside `x`'s buffers.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q4k<const R: usize>(blocks: &[u8], x: &Q8kRows, first: usize, sums: &mut [f32]) {
    let k = x.blocks * QK_K;
    let nibble = _mm512_set1_epi8(0x0F);
    // Low nibbles in the lower 256 bits, high nibbles (shifted down) in the upper.
    let unpack_shift = halves(0, 4);
    // `vpackssdw` of groups g and g+1 puts, in each 128-bit lane j, four sums of g then
    // four of g+1; bytes 32.. of a group (j ≥ 2) are its second sub-block.
    let pair_index = [
        load_table(&lane_table(|j, t| if t < 4 { 0 } else { 2 } + i16::from(j >= 2))),
        load_table(&lane_table(|j, t| if t < 4 { 4 } else { 6 } + i16::from(j >= 2))),
    ];
    let zero = _mm512_setzero_si512();
    let mut totals = [_mm512_setzero_ps(); R];
    let mut min_totals = [_mm256_setzero_ps(); R];
    for (b, block) in blocks.chunks_exact(Q4K_BYTES).enumerate() {
        let p = block.as_ptr();
        prefetch_ahead(p, prefetch_distance(R), Q4K_BYTES);
        let (d, dmin) = (f16(block, 0), f16(block, 2));
        let (scales, mins) = q4k_scales_mins_vec(&block[4..16], dmin);
        let mut acc = [_mm512_setzero_si512(); R];
        // 32 bytes hold sub-block 2g in their low nibbles and 2g+1 in the high ones: one
        // 64-byte vector lines up with 64 consecutive activations.
        let w: [__m512i; 4] = std::array::from_fn(|g| {
            // SAFETY: `block` is `Q4K_BYTES` (144) long and bytes 16 + 32g .. 48 + 32g
            // (g < 4) end by byte 144.
            let q = unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(16 + 32 * g).cast())) };
            _mm512_and_si512(_mm512_srlv_epi16(q, unpack_shift), nibble)
        });
        let s = [
            _mm512_permutexvar_epi16(pair_index[0], scales),
            _mm512_permutexvar_epi16(pair_index[1], scales),
        ];
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row `first + r < x.rows` and block `b < x.blocks` (see `# Safety`):
            // the block's 256 activations start here, inside `x.qs` (`x.rows · k` long).
            let a = unsafe { x.qs.as_ptr().add((first + r) * k + b * QK_K) };
            for pair in 0..2 {
                // Sums of four products fit in i16 (4·15·127), so two groups share one
                // `vpdpwssd` with their scales: 3 multiplies per 128 products, not 4.
                // SAFETY: bytes 128·pair .. 128·pair + 128 (pair < 2) of the block's 256
                // activations at `a`.
                let (a0, a1) = unsafe {
                    (
                        _mm512_loadu_si512(a.add(128 * pair).cast()),
                        _mm512_loadu_si512(a.add(128 * pair + 64).cast()),
                    )
                };
                let sums = _mm512_packs_epi32(
                    _mm512_dpbusd_epi32(zero, w[2 * pair], a0),
                    _mm512_dpbusd_epi32(zero, w[2 * pair + 1], a1),
                );
                *acc = _mm512_dpwssd_epi32(*acc, sums, s[pair]);
            }
        }
        for r in 0..R {
            let d_a = x.d[(first + r) * x.blocks + b];
            totals[r] = _mm512_fmadd_ps(_mm512_set1_ps(d * d_a), _mm512_cvtepi32_ps(acc[r]), totals[r]);
            // SAFETY: row `first + r < x.rows`, block `b < x.blocks`: its 8 sub-block sums
            // are inside `x.scaled_sub_sums` (8 per block of each row).
            let sub_sums =
                unsafe { _mm256_loadu_ps(x.scaled_sub_sums.as_ptr().add(((first + r) * x.blocks + b) * 8)) };
            min_totals[r] = _mm256_fmadd_ps(mins, sub_sums, min_totals[r]);
        }
    }
    for r in 0..R {
        sums[r] = _mm512_reduce_add_ps(totals[r]) - horizontal_sum(min_totals[r]);
    }
}

/// Q4_K's packed 6-bit scales and mins (12 bytes) as eight i16 scales (in the low
/// lanes of a 512-bit vector, for `vpermw`) and the eight mins times `dmin`.
#[target_feature(enable = "avx512f,avx512bw")]
fn q4k_scales_mins_vec(packed: &[u8], dmin: f32) -> (__m512i, __m256) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    let word = |i: usize| {
        u32::from_le_bytes([
            packed[4 * i],
            packed[4 * i + 1],
            packed[4 * i + 2],
            packed[4 * i + 3],
        ])
    };
    let words = [word(0), word(1), word(2)];
    // llama.cpp's rearrangement: scales 0-3 | scales 4-7 | mins 0-3 | mins 4-7.
    let scales_low = words[0] & LOW6;
    let scales_high = (words[2] & LOW4) | (((words[0] >> 6) & TOP2) << 4);
    let mins_low = words[1] & LOW6;
    let mins_high = ((words[2] >> 4) & LOW4) | (((words[1] >> 6) & TOP2) << 4);
    let scales = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, scales_high as i32, scales_low as i32));
    let mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(
        0,
        0,
        mins_high as i32,
        mins_low as i32,
    )));
    (
        _mm512_zextsi128_si512(scales),
        _mm256_mul_ps(_mm256_set1_ps(dmin), mins),
    )
}

/// # Safety
///
/// As [`q4k`]'s, for Q6_K blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q6k<const R: usize>(blocks: &[u8], x: &Q8kRows, first: usize, sums: &mut [f32]) {
    let k = x.blocks * QK_K;
    let nibble = _mm512_set1_epi8(0x0F);
    let two_bits = _mm512_set1_epi8(0x03);
    // Shift counts per 16-bit lane: the low 256 bits take one pair of high bits, the
    // upper 256 bits the next (see the reference's four quarters).
    let (shift_a, shift_b) = (halves(0, 2), halves(4, 6));
    // `vpackssdw` of the two quarters' sums puts, in each 128-bit lane j, four sums of
    // the first quarter (scale 8·half + j) then four of the second (8·half + 4 + j).
    let pair_index = [
        load_table(&lane_table(|j, t| j as i16 + if t < 4 { 0 } else { 4 })),
        load_table(&lane_table(|j, t| 8 + j as i16 + if t < 4 { 0 } else { 4 })),
    ];
    let zero = _mm512_setzero_si512();
    let mut totals = [_mm512_setzero_ps(); R];
    for (b, block) in blocks.chunks_exact(Q6K_BYTES).enumerate() {
        let p = block.as_ptr();
        prefetch_ahead(p, prefetch_distance(R), Q6K_BYTES);
        let d = f16(block, 208);
        // SAFETY: `block` is `Q6K_BYTES` (210) long; its scales are bytes 192..208.
        let scales16 = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(p.add(192).cast()) });
        let scales_wide = _mm512_zextsi256_si512(scales16);
        let mut acc = [_mm512_setzero_si512(); R];
        for (half, index) in pair_index.iter().enumerate() {
            // SAFETY: of the 210 bytes of `block`, `ql` bytes 64·half .. 64·half + 64 and
            // `qh` bytes 128 + 32·half .. 160 + 32·half (half < 2).
            let (low, high) = unsafe {
                (
                    _mm512_loadu_si512(p.add(64 * half).cast()),
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(128 + 32 * half).cast())),
                )
            };
            let upper_a = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(high, shift_a), two_bits), 4);
            let upper_b = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(high, shift_b), two_bits), 4);
            let wa = _mm512_or_si512(_mm512_and_si512(low, nibble), upper_a);
            let wb = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(low, 4), nibble), upper_b);
            let s = _mm512_permutexvar_epi16(*index, scales_wide);
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row `first + r < x.rows` and block `b < x.blocks` (see `# Safety`):
                // activations 128·half .. 128·half + 128 of the block lie inside `x.qs`.
                let (a0, a1) = unsafe {
                    let a = x.qs.as_ptr().add((first + r) * k + b * QK_K + 128 * half);
                    (_mm512_loadu_si512(a.cast()), _mm512_loadu_si512(a.add(64).cast()))
                };
                // Sums of four products fit in i16 (4·63·127 = 32004).
                let sums = _mm512_packs_epi32(
                    _mm512_dpbusd_epi32(zero, wa, a0),
                    _mm512_dpbusd_epi32(zero, wb, a1),
                );
                *acc = _mm512_dpwssd_epi32(*acc, sums, s);
            }
        }
        for r in 0..R {
            // Quants are stored as q + 32: subtract 32·Σ scale·bsum, same scale d·d_a.
            // SAFETY: row `first + r < x.rows`, block `b < x.blocks`: its 16 sums of 16
            // (32 bytes) are inside `x.bsums` (16 per block of each row).
            let bsums =
                unsafe { _mm256_loadu_si256(x.bsums.as_ptr().add(((first + r) * x.blocks + b) * 16).cast()) };
            let offset = _mm512_zextsi256_si512(_mm256_slli_epi32(_mm256_madd_epi16(scales16, bsums), 5));
            let isum = _mm512_sub_epi32(acc[r], offset);
            let d_a = x.d[(first + r) * x.blocks + b];
            totals[r] = _mm512_fmadd_ps(_mm512_set1_ps(d * d_a), _mm512_cvtepi32_ps(isum), totals[r]);
        }
    }
    for r in 0..R {
        sums[r] = _mm512_reduce_add_ps(totals[r]);
    }
}

#[target_feature(enable = "avx512f")]
fn horizontal_sum(v: __m256) -> f32 {
    _mm512_reduce_add_ps(_mm512_zextps256_ps512(v))
}

/// 16-bit lanes holding `low` in the lower 256 bits and `high` in the upper.
#[target_feature(enable = "avx512f,avx512bw")]
fn halves(low: i16, high: i16) -> __m512i {
    _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_set1_epi16(low)),
        _mm256_set1_epi16(high),
        1,
    )
}

/// Ask for the cache lines of the block `distance` bytes ahead: the hardware prefetcher
/// alone leaves the memory bus idle part of the time. Prefetches never fault, also past the
/// end of the weights.
#[inline(always)]
fn prefetch_ahead(p: *const u8, distance: usize, block_bytes: usize) {
    let ahead = p.wrapping_add(distance);
    let mut offset = 0;
    while offset < block_bytes {
        // SAFETY: a prefetch is a hint; it does not access memory architecturally.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(offset).cast()) };
        offset += 64;
    }
}

/// 32 i16 lanes `8j + t` (128-bit lane j, position t) set to `f(j, t)`.
fn lane_table(f: impl Fn(usize, usize) -> i16) -> [i16; 32] {
    std::array::from_fn(|lane| f(lane / 8, lane % 8))
}

#[target_feature(enable = "avx512f")]
fn load_table(table: &[i16; 32]) -> __m512i {
    // SAFETY: reads the table's 64 bytes.
    unsafe { _mm512_loadu_si512(table.as_ptr().cast()) }
}
