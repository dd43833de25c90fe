//! GGUF weights in types without a fast CPU kernel (Q4_1, Q5_0, Q5_1, Q8_1) become Q8_0, and
//! Q8_0 rows get zero-padded to the width candle's repacked kernels need — one row at a
//! time, straight from the memory-mapped file into the final blocks, so loading never
//! holds an f32 copy of a whole tensor (slow to make, and about four times its Q8_0 size).

use candle_core::quantized::{
    GgmlDType, GgmlType, QStorage, QTensor,
    k_quants::{BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1},
};

use crate::engine::models::qlinear::as_blocks;

/// The `[rows, width]` tensor stored as `raw` bytes of `dtype`, as Q8_0 rows of
/// `padded_width` values (zeros past `width`). `None` for other types, or bytes that do not
/// hold exactly those rows.
pub fn to_q8_0(
    dtype: GgmlDType,
    raw: &[u8],
    rows: usize,
    width: usize,
    padded_width: usize,
) -> Option<QTensor> {
    match dtype {
        GgmlDType::Q4_1 => convert::<BlockQ4_1>(raw, rows, width, padded_width),
        GgmlDType::Q5_0 => convert::<BlockQ5_0>(raw, rows, width, padded_width),
        GgmlDType::Q5_1 => convert::<BlockQ5_1>(raw, rows, width, padded_width),
        GgmlDType::Q8_0 => convert::<BlockQ8_0>(raw, rows, width, padded_width),
        GgmlDType::Q8_1 => convert::<BlockQ8_1>(raw, rows, width, padded_width),
        _ => None,
    }
}

fn convert<T: GgmlType>(raw: &[u8], rows: usize, width: usize, padded_width: usize) -> Option<QTensor> {
    let q8 = BlockQ8_0::BLCK_SIZE;
    if !width.is_multiple_of(T::BLCK_SIZE) || padded_width < width || !padded_width.is_multiple_of(q8) {
        return None;
    }
    let blocks = as_blocks::<T>(raw)?;
    let per_row = width / T::BLCK_SIZE;
    if blocks.len() != rows * per_row {
        return None;
    }
    let out_per_row = padded_width / q8;
    let mut out = vec![BlockQ8_0::zeros(); rows * out_per_row];
    let mut values = vec![0f32; padded_width];
    for (row, dst) in blocks
        .chunks_exact(per_row.max(1))
        .zip(out.chunks_exact_mut(out_per_row))
    {
        // The padding past `width` stays zero.
        T::to_float(row, &mut values[..width]);
        BlockQ8_0::from_float(&values, dst);
    }
    QTensor::new(QStorage::Cpu(Box::new(out)), (rows, padded_width)).ok()
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::engine::models::qlinear::test_support::{matrix, max_abs_diff};

    #[test]
    fn rows_convert_and_pad_like_dequantize_then_quantize() {
        let device = Device::Cpu;
        let (rows, width) = (6, 96);
        let dense = matrix(rows, width);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0] {
            let stored = QTensor::quantize(&dense, dtype).expect("quantize");
            let raw = stored.data().expect("bytes").into_owned();
            let converted = to_q8_0(dtype, &raw, rows, width, 256).expect("converts");
            assert_eq!(converted.dtype(), GgmlDType::Q8_0);
            assert_eq!(converted.shape().dims(), &[rows, 256]);
            let expected = stored
                .dequantize(&device)
                .and_then(|d| d.pad_with_zeros(1, 0, 256 - width))
                .and_then(|d| QTensor::quantize(&d, GgmlDType::Q8_0))
                .and_then(|q| q.dequantize(&device))
                .expect("reference");
            let got = converted.dequantize(&device).expect("dequantize");
            assert_eq!(max_abs_diff(&got, &expected), 0.0, "{dtype:?}");
        }
        assert!(to_q8_0(GgmlDType::Q4K, &[], 1, 256, 256).is_none());
        assert!(
            to_q8_0(GgmlDType::Q5_0, &[0; 10], 1, 32, 32).is_none(),
            "wrong length"
        );
    }
}
