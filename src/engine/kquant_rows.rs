//! Q4_K and Q6_K weights times a few activation rows (a decode step of up to eight
//! sequences), unpacking each stored block once for all rows.
//!
//! Why: candle has two CPU paths for these types, and neither suits 2–8 rows. Its per-row
//! dot products (`k_quants::matmul`) unpack every weight block again for every row, and its
//! repacked x86 tiles are built for prompts: on the 1.5B a 4-sequence decode step took
//! 79 ms against 29 ms for one sequence, so four streams barely beat one. Here each block
//! is loaded and unpacked once, then multiplied with every row's 8-bit activations by
//! AVX-512 VNNI instructions (`vpmaddubsw` + `vpdpwssd`, two instructions per 64 products).
//!
//! The arithmetic is llama.cpp's: activations are quantized per 256 values (Q8_K: one f32
//! scale, 8-bit values, sums of each 16), integer block sums are exact, and each block adds
//! `d·d_a·Σ` to an f32 total in block order. A row's result depends only on that row, so a
//! sequence gets the same logits alone or inside any batch (the batching tests rely on it).

use candle_core::quantized::GgmlDType;

/// Activation rows one kernel call multiplies with a block (one accumulator per row in
/// registers); more rows (prompts) go through in groups of this many.
pub(crate) const MAX_ROWS: usize = 8;
const QK_K: usize = 256;
const Q4K_BYTES: usize = 144;
const Q6K_BYTES: usize = 210;
/// Weight rows per unit of work handed to candle's thread pool.
const ROWS_PER_ITEM: usize = 8;

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
            let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            if amax == 0.0 {
                continue;
            }
            let iscale = 127.0 / amax;
            out.d[b] = amax / 127.0;
            let qs = &mut out.qs[b * QK_K..(b + 1) * QK_K];
            for (q, v) in qs.iter_mut().zip(values) {
                *q = (v * iscale).round().clamp(-127.0, 127.0) as i8;
            }
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

/// Whether [`matmul`] takes weights of this type.
pub(crate) fn supports(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K)
}

/// `out[r·n + j] = x_r · w_j` for the `n` weight rows of `k` values stored in `weight` as
/// `dtype` blocks. `false` (nothing written) when the type, the sizes or the CPU do not fit.
pub(crate) fn matmul(
    dtype: GgmlDType,
    weight: &[u8],
    n: usize,
    k: usize,
    x: &Q8kRows,
    out: &mut [f32],
) -> bool {
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
    let row_bytes = (k / QK_K) * block_bytes;
    let out_ptr = SharedOut(out.as_mut_ptr());
    let items = n.div_ceil(ROWS_PER_ITEM);
    candle_core::utils::barrier_pool().execute_chunked(items, |range| {
        let out_ptr = &out_ptr;
        let mut sums = [0f32; MAX_ROWS];
        for item in range {
            let weight_rows = item * ROWS_PER_ITEM..((item + 1) * ROWS_PER_ITEM).min(n);
            // An item's few weight rows stay in L1 while every group of activation rows
            // passes over them.
            for first in (0..x.rows).step_by(MAX_ROWS) {
                let count = MAX_ROWS.min(x.rows - first);
                for j in weight_rows.clone() {
                    let blocks = &weight[j * row_bytes..(j + 1) * row_bytes];
                    dot_rows(dtype, blocks, x, first, &mut sums[..count]);
                    for (r, sum) in sums[..count].iter().enumerate() {
                        out_ptr.write((first + r) * n + j, *sum);
                    }
                }
            }
        }
    });
    true
}

/// The output buffer shared by the pool's workers; each writes only its own weight rows'
/// columns, so no element is written twice.
struct SharedOut(*mut f32);

// SAFETY: see `write`: workers write disjoint elements and the buffer outlives the pool's
// `execute_chunked`, which returns only when every worker is done.
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut {}

impl SharedOut {
    #[allow(unsafe_code)]
    fn write(&self, index: usize, value: f32) {
        // SAFETY: `matmul` checked `out.len() == rows · n`, and index = r·n + j with r < rows
        // and j < n; each j belongs to one work item, so no two workers touch one element.
        unsafe { *self.0.add(index) = value }
    }
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

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// How far ahead to prefetch (bytes of weight blocks): measured on the 1.5B, one or two
    /// rows do best 4 KiB ahead, more rows (longer per block) 8 KiB ahead.
    const fn prefetch_distance(rows: usize) -> usize {
        if rows <= 2 { 4096 } else { 8192 }
    }

    pub(super) fn dot_rows(dtype: GgmlDType, blocks: &[u8], x: &Q8kRows, first: usize, sums: &mut [f32]) {
        macro_rules! rows {
            ($kernel:ident) => {
                // SAFETY: callers checked `available()` (AVX-512F/BW/VNNI); the kernels read
                // `blocks` (whole blocks of their type, checked by `matmul`) and `x`'s rows,
                // which are `blocks.len() / block_bytes × 256` values long, within bounds.
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
                let q = unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(16 + 32 * g).cast())) };
                _mm512_and_si512(_mm512_srlv_epi16(q, unpack_shift), nibble)
            });
            let s = [
                _mm512_permutexvar_epi16(pair_index[0], scales),
                _mm512_permutexvar_epi16(pair_index[1], scales),
            ];
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = unsafe { x.qs.as_ptr().add((first + r) * k + b * QK_K) };
                for pair in 0..2 {
                    // Sums of four products fit in i16 (4·15·127), so two groups share one
                    // `vpdpwssd` with their scales: 3 multiplies per 128 products, not 4.
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
                let sub_sums = unsafe {
                    _mm256_loadu_ps(x.scaled_sub_sums.as_ptr().add(((first + r) * x.blocks + b) * 8))
                };
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
            let scales16 = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(p.add(192).cast()) });
            let scales_wide = _mm512_zextsi256_si512(scales16);
            let mut acc = [_mm512_setzero_si512(); R];
            for (half, index) in pair_index.iter().enumerate() {
                let low = unsafe { _mm512_loadu_si512(p.add(64 * half).cast()) };
                let high =
                    unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(128 + 32 * half).cast())) };
                let upper_a =
                    _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(high, shift_a), two_bits), 4);
                let upper_b =
                    _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(high, shift_b), two_bits), 4);
                let wa = _mm512_or_si512(_mm512_and_si512(low, nibble), upper_a);
                let wb = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(low, 4), nibble), upper_b);
                let s = _mm512_permutexvar_epi16(*index, scales_wide);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = unsafe { x.qs.as_ptr().add((first + r) * k + b * QK_K + 128 * half) };
                    let (a0, a1) =
                        unsafe { (_mm512_loadu_si512(a.cast()), _mm512_loadu_si512(a.add(64).cast())) };
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
                let bsums = unsafe {
                    _mm256_loadu_si256(x.bsums.as_ptr().add(((first + r) * x.blocks + b) * 16).cast())
                };
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
    /// alone left the memory bus idle part of the time (1.5B, 4 rows: 57 -> 43 ms a step; one
    /// row 25 -> 23.5 ms). Prefetches never fault, also past the end of the weights.
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
}

#[cfg(test)]
mod tests {
    use candle_core::{
        Device, Module, Tensor,
        quantized::{QMatMul, QTensor},
    };

    use super::*;
    use crate::engine::qlinear::test_support::{matrix, max_abs_diff};

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
