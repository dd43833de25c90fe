//! A quantized linear layer, with lifeboat's CPU kernels where they beat candle's.
//!
//! On CPUs with AVX-512 VNNI (`kernels::available`):
//! - Q4_K, Q6_K, Q5_0 and Q8_0 weights (and a tied embedding table of those types, which
//!   the output layer shares) are held in lifeboat's 16-row tiles (`kernels::tiles`,
//!   about the stored size) and every multiplication goes through them;
//! - weights of those types in a shape the tiles do not fit (rows not a multiple of 16)
//!   stay as stored and take the stored-block kernels: Q4_K and Q6_K for any number of
//!   rows, Q8_0 for decode steps of up to [`QLinear::FEW_ROWS`] rows;
//! - everything else goes through candle's `QMatMul`: its repacked tiles for prompts (for
//!   Q8_0 much faster than per-row dot products) and per-row dot products for one row.
//!
//! Other CPUs and CUDA use candle's paths throughout.

use candle_core::{
    DType, Module, Tensor,
    quantized::{
        GgmlDType, GgmlType, QMatMul,
        k_quants::{self, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0},
    },
};

use std::sync::Arc;

use crate::engine::kernels::{self, TiledWeight};

/// A weight `[out, in]` applied as `x · Wᵀ`.
#[derive(Debug)]
pub struct QLinear {
    weight: Weight,
    /// The weight's rows were padded with zeros beyond this many inputs (see [`QLinear::padded`]).
    inputs: Option<usize>,
}

#[derive(Debug)]
enum Weight {
    /// candle's quantized (or dense) matmul over the weight as stored.
    Stored(QMatMul),
    /// Q4_K, Q6_K, Q5_0 or Q8_0 in lifeboat's 16-row tiles (CPUs with the kernels): every
    /// number of rows goes through them, and the stored blocks are gone.
    Tiled(Arc<TiledWeight>),
}

impl QLinear {
    /// Up to this many rows (decode steps), stored Q8_0 weights go through lifeboat's kernel;
    /// more rows (prompts) take candle's repacked tiles.
    pub const FEW_ROWS: usize = kernels::MAX_ROWS;

    pub fn new(matmul: QMatMul) -> QLinear {
        QLinear {
            weight: Weight::Stored(matmul),
            inputs: None,
        }
    }

    /// A weight in tiles (see `kernels::tiles`), possibly shared with the tied
    /// embedding table.
    pub(crate) fn tiled(weight: Arc<TiledWeight>) -> QLinear {
        QLinear {
            weight: Weight::Tiled(weight),
            inputs: None,
        }
    }

    /// A weight whose rows were zero-padded from `inputs` to a multiple of 256 columns, the
    /// width candle's repacked x86 prompt kernels need (Qwen2.5-0.5B's 896-wide layers
    /// otherwise run per-row dot products, several times slower); inputs are padded to match.
    pub fn padded(matmul: QMatMul, inputs: usize) -> QLinear {
        QLinear {
            weight: Weight::Stored(matmul),
            inputs: Some(inputs),
        }
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let matmul = match &self.weight {
            Weight::Stored(matmul) => matmul,
            Weight::Tiled(tiles) => return Self::through_tiles(tiles, x),
        };
        let padded;
        let x = match (self.inputs, matmul) {
            (Some(inputs), QMatMul::QTensor(weight)) => {
                let (_, width) = weight.shape().dims2()?;
                padded = x.pad_with_zeros(candle_core::D::Minus1, 0, width.saturating_sub(inputs))?;
                &padded
            }
            _ => x,
        };
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            if let Some(out) = self.stored_blocks(x, rows)? {
                return Ok(out);
            }
            if rows == 1
                && let Some(out) = self.single_row(x)?
            {
                return Ok(out);
            }
        }
        matmul.forward(x)
    }

    /// `x` times each of `linears` (one input width): when all are tiled, in one pass over
    /// the thread pool with the input quantized once (`kernels::multiply_group`);
    /// otherwise one by one.
    pub fn forward_group<const N: usize>(
        linears: [&QLinear; N],
        x: &Tensor,
    ) -> candle_core::Result<[Tensor; N]> {
        let tiled: Option<Vec<&TiledWeight>> = linears
            .iter()
            .map(|linear| match &linear.weight {
                Weight::Tiled(tiles) => Some(tiles.as_ref()),
                Weight::Stored(_) => None,
            })
            .collect();
        let mut outs = Vec::with_capacity(N);
        match tiled {
            Some(tiled) if x.device().is_cpu() && !tiled.is_empty() => {
                let k = tiled[0].dims().1;
                let rows = x.elem_count() / k.max(1);
                let lhs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let Some(products) = kernels::multiply_group(&tiled, &lhs, rows) else {
                    candle_core::bail!(
                        "weights of {k} inputs cannot multiply an input of shape {:?}",
                        x.dims()
                    );
                };
                for (out, weight) in products.into_iter().zip(&tiled) {
                    outs.push(Self::shaped(x, out, weight.dims().0)?);
                }
            }
            _ => {
                for linear in linears {
                    outs.push(linear.forward(x)?);
                }
            }
        }
        outs.try_into()
            .map_err(|_| candle_core::Error::Msg("a group of linear layers lost an output".into()))
    }

    fn through_tiles(tiles: &TiledWeight, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, k) = tiles.dims();
        let rows = x.elem_count() / k.max(1);
        let lhs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        match tiles.multiply(&lhs, rows) {
            Some(out) => Self::shaped(x, out, n),
            None => candle_core::bail!(
                "a {:?} weight of {k} inputs cannot multiply an input of shape {:?}",
                tiles.dtype(),
                x.dims()
            ),
        }
    }

    /// `x` times the stored blocks through lifeboat's kernels (Q4_K and Q6_K for any number
    /// of rows, Q8_0 for decode steps, see [`kernels::takes`]); `None` for other types
    /// or CPUs without the kernels.
    fn stored_blocks(&self, x: &Tensor, rows: usize) -> candle_core::Result<Option<Tensor>> {
        let Weight::Stored(QMatMul::QTensor(weight)) = &self.weight else {
            return Ok(None);
        };
        let (n, k) = weight.shape().dims2()?;
        if !kernels::takes(weight.dtype(), rows, k) {
            return Ok(None);
        }
        let lhs = x.flatten_all()?.to_vec1::<f32>()?;
        match kernels::multiply(weight.dtype(), &weight.data()?, n, k, &lhs, rows) {
            Some(out) => Self::shaped(x, out, n).map(Some),
            None => Ok(None),
        }
    }

    /// `out` (rows of `n`) shaped like `x` with its last dimension `n`.
    fn shaped(x: &Tensor, out: Vec<f32>, n: usize) -> candle_core::Result<Tensor> {
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Tensor::from_vec(out, shape, x.device())
    }

    /// `x` (one row) times the stored blocks, or `None` for a type without a CPU dot product.
    fn single_row(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Weight::Stored(QMatMul::QTensor(weight)) = &self.weight else {
            return Ok(None);
        };
        let (n, k) = weight.shape().dims2()?;
        let bytes = weight.data()?;
        let lhs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; n];
        let done = match weight.dtype() {
            GgmlDType::Q4K => multiply::<BlockQ4K>(&bytes, k, n, &lhs, &mut out)?,
            GgmlDType::Q5K => multiply::<BlockQ5K>(&bytes, k, n, &lhs, &mut out)?,
            GgmlDType::Q6K => multiply::<BlockQ6K>(&bytes, k, n, &lhs, &mut out)?,
            GgmlDType::Q8_0 => multiply::<BlockQ8_0>(&bytes, k, n, &lhs, &mut out)?,
            _ => false,
        };
        if !done {
            return Ok(None);
        }
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Ok(Some(Tensor::from_vec(out, shape, x.device())?))
    }
}

/// `out = lhs · blocksᵀ` for one row; `false` when the bytes cannot be viewed as blocks.
fn multiply<T: GgmlType>(
    bytes: &[u8],
    k: usize,
    n: usize,
    lhs: &[f32],
    out: &mut [f32],
) -> candle_core::Result<bool> {
    let Some(blocks) = as_blocks::<T>(bytes) else {
        return Ok(false);
    };
    if !k.is_multiple_of(T::BLCK_SIZE) || blocks.len() != n * (k / T::BLCK_SIZE) {
        return Ok(false);
    }
    k_quants::matmul((1, k, n), lhs, blocks, out)?;
    Ok(true)
}

/// The stored bytes of a quantized tensor as its blocks, without a copy. Only for candle's
/// block types named below.
#[allow(unsafe_code)]
pub(crate) fn as_blocks<T: GgmlType>(bytes: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if size == 0
        || !bytes.len().is_multiple_of(size)
        || bytes.as_ptr().align_offset(std::mem::align_of::<T>()) != 0
    {
        return None;
    }
    // SAFETY: the block types this is used with (Q4_K, Q5_K, Q6_K, Q8_0 here; Q4_1, Q5_0,
    // Q5_1, Q8_1 in `requant`) are `#[repr(C)]` structs of `f16` and byte arrays, for which
    // every bit pattern is valid; the length is a whole number of blocks and the pointer is
    // aligned for `T` (checked above), and the slice borrows `bytes`, so it cannot outlive
    // them. The bytes are candle's storage of exactly these blocks (`QTensor::data` views
    // its `Vec<T>`) or a GGUF tensor of that type (GGUF aligns tensor data to 32 bytes).
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

/// Test helpers shared by the engine's quantization tests.
#[cfg(test)]
pub(crate) mod test_support {
    use candle_core::{Device, Tensor};

    /// A deterministic `[rows, cols]` matrix with values in [-0.5, 0.5).
    pub(crate) fn matrix(rows: usize, cols: usize) -> Tensor {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5)
            .collect();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("matrix")
    }

    /// The largest absolute difference between two tensors of one shape.
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("difference")
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, quantized::QTensor};

    use super::{
        test_support::{matrix, max_abs_diff},
        *,
    };

    #[test]
    fn padded_weights_give_the_unpadded_product() {
        let device = Device::Cpu;
        let (n, k) = (32, 96);
        let weight = matrix(n, k);
        let padded = weight.pad_with_zeros(1, 0, 256 - k).expect("pad");
        let plain = QLinear::new(
            QMatMul::from_qtensor(QTensor::quantize(&weight, GgmlDType::Q8_0).expect("q")).expect("mm"),
        );
        let wide = QLinear::padded(
            QMatMul::from_qtensor(QTensor::quantize(&padded, GgmlDType::Q8_0).expect("q")).expect("mm"),
            k,
        );
        for rows in [1, 5] {
            let x = Tensor::from_vec(
                (0..rows * k)
                    .map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.3)
                    .collect::<Vec<_>>(),
                (1, rows, k),
                &device,
            )
            .expect("x");
            let a = plain.forward(&x).expect("plain");
            let b = wide.forward(&x).expect("padded");
            assert_eq!(a.dims(), b.dims());
            let diff = max_abs_diff(&a, &b);
            // Several rows go through the repacked kernels, which quantize activations per
            // 256 values (Q8_K) instead of per 32 (Q8_0): equal up to that rounding.
            assert!(diff < 5e-3, "{rows} rows: {diff}");
        }
    }

    #[test]
    fn one_row_through_stored_blocks_equals_candles_matmul() {
        let device = Device::Cpu;
        let (n, k) = (48, 512);
        let weight = matrix(n, k);
        let x = Tensor::from_vec(
            (0..k)
                .map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.3)
                .collect::<Vec<_>>(),
            (1, 1, k),
            &device,
        )
        .expect("x");
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&weight, dtype).expect("quantize");
            let linear = QLinear::new(QMatMul::from_qtensor(q).expect("qmatmul"));
            let ours = linear
                .single_row(&x)
                .expect("runs")
                .expect("a CPU dot product exists");
            let Weight::Stored(matmul) = &linear.weight else {
                panic!("built from a QMatMul");
            };
            let candle = matmul.forward(&x).expect("candle");
            assert_eq!(ours.dims(), candle.dims());
            let diff = max_abs_diff(&ours, &candle);
            // Same Q8_K activations and block dot products, summed in another order.
            assert!(diff < 1e-3, "{dtype:?}: {diff}");
        }
    }
}
