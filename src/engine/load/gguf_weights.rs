//! A GGUF file's weights into lifeboat's decoder: tensors read from the memory map (each
//! copied once, its mapped pages dropped after), quantized matrices kept quantized — in
//! lifeboat's tiles on the CPU where the type has them, requantized to Q8_0 where candle has
//! only scalar code — and small tensors in f32. The header side (architecture, checks,
//! tokenizer) is in [`super::gguf`].

use std::{path::Path, sync::Arc};

use memmap2::{Mmap, UncheckedAdvice};

use candle_core::{
    Device, Tensor,
    quantized::{GgmlDType, QMatMul, QTensor, ggml_file::qtensor_from_ggml, gguf_file::Content},
};

use super::{
    gguf::{Header, Meta, decoder_config},
    loader::ModelInfo,
    requant,
};
use crate::engine::{
    EngineError,
    kernels::TiledWeight,
    models::{
        qlinear::QLinear,
        quantized_decoder::{BlockWeights, QuantizedDecoder, TokenEmbedding},
    },
};

/// Reads tensors of a memory-mapped GGUF file, naming the tensor in every error. Each
/// tensor is copied once, from the page cache into its own storage (reading through a
/// buffer first would copy it twice and fault in twice the memory).
struct TensorReader<'a> {
    path: &'a Path,
    content: &'a Content,
    map: &'a Mmap,
    device: &'a Device,
}

impl TensorReader<'_> {
    fn err(&self, name: &str, e: candle_core::Error) -> EngineError {
        EngineError::load(self.path, format!("tensor {name}: {e}"))
    }

    fn qtensor(&self, name: &str) -> Result<QTensor, EngineError> {
        let (dtype, raw, dims) = self.raw(name)?;
        let q = qtensor_from_ggml(dtype, raw, dims, self.device).map_err(|e| self.err(name, e));
        self.release(raw);
        q
    }

    /// Drop the map's pages of a tensor that has been copied out of it. Mapped file pages
    /// count in the process's memory until then: without this the peak RSS is the file
    /// plus the copied weights.
    fn release(&self, raw: &[u8]) {
        let offset = (raw.as_ptr() as usize).wrapping_sub(self.map.as_ptr() as usize);
        // SAFETY: the map is a read-only shared mapping of the model file. After
        // MADV_DONTNEED a read of these pages (another tensor sharing a boundary page, being
        // read on another thread) faults them back in from the file with the same bytes, so
        // every live slice of the map keeps its contents; like the mapping itself this
        // assumes nobody rewrites the file while it loads. The range lies inside the map
        // (`raw` is a subslice of it; memmap2 checks the bounds again).
        #[allow(unsafe_code)]
        let _ = unsafe {
            self.map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, offset, raw.len())
        };
    }

    /// A tensor's type, stored bytes (in the map) and shape.
    fn raw(&self, name: &str) -> Result<(GgmlDType, &[u8], Vec<usize>), EngineError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| EngineError::load(self.path, format!("missing tensor {name}")))?;
        let dtype = info.ggml_dtype;
        let bytes = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        let start = usize::try_from(self.content.tensor_data_offset + info.offset).unwrap_or(usize::MAX);
        let raw = start
            .checked_add(bytes)
            .and_then(|end| self.map.get(start..end))
            .ok_or_else(|| {
                EngineError::load(
                    self.path,
                    format!("tensor {name}: its data ends past the end of the file (truncated?)"),
                )
            })?;
        Ok((dtype, raw, info.shape.dims().to_vec()))
    }

    /// Small tensors (norms, biases, embeddings) in f32.
    fn dense(&self, name: &str) -> Result<Tensor, EngineError> {
        let q = self.qtensor(name)?;
        q.dequantize(self.device).map_err(|e| self.err(name, e))
    }

    /// Weight matrices stay quantized. On the CPU, Q8_0 rows (including requantized ones,
    /// see [`TensorReader::weight`]) of a width that is not a multiple of 256 are
    /// zero-padded to one, so prompts take candle's repacked kernels (see
    /// [`QLinear::padded`]; the padding costs weight bytes, see `docs/engine.md`).
    fn matmul(&self, name: &str) -> Result<QLinear, EngineError> {
        let (dtype, raw, dims) = self.raw(name)?;
        let (rows, width) = match dims.as_slice() {
            [rows, width] => (*rows, *width),
            _ => (0, 0),
        };
        let requantize = self.device.is_cpu() && needs_requantizing(dtype, width);
        let pad =
            self.device.is_cpu() && (requantize || dtype == GgmlDType::Q8_0) && width % PACKED_WIDTH != 0;
        let wide = if pad {
            width.div_ceil(PACKED_WIDTH) * PACKED_WIDTH
        } else {
            width
        };
        let converted = (requantize || pad)
            .then(|| requant::to_q8_0(dtype, raw, rows, width, wide))
            .flatten();
        if converted.is_some() {
            self.release(raw);
        }
        let q = match converted {
            Some(q) => q,
            // Not converted (another type, or bytes it cannot view): as stored, or through
            // f32 when it still needs requantizing.
            None => self.weight(name)?,
        };
        let padded = q.shape().dims().last().is_some_and(|w| *w != width);
        QMatMul::from_qtensor(q)
            .map(|matmul| {
                if padded {
                    QLinear::padded(matmul, width)
                } else {
                    QLinear::new(matmul)
                }
            })
            .map_err(|e| self.err(name, e))
    }

    /// A weight matrix: on the CPU, Q4_K, Q6_K, Q5_0 and Q8_0 go straight from the map into
    /// lifeboat's 16-row tiles (`kernels::tiles`: prompts and decode steps, the stored
    /// size); anything else as [`TensorReader::matmul`].
    fn block_matmul(&self, name: &str) -> Result<QLinear, EngineError> {
        match self.tiles(name)? {
            Some(tiles) => Ok(QLinear::tiled(Arc::new(tiles))),
            None => self.matmul(name),
        }
    }

    /// A weight matrix in lifeboat's tiles, read straight from the map, when the device is
    /// the CPU and the type and shape suit them (`None` otherwise).
    fn tiles(&self, name: &str) -> Result<Option<TiledWeight>, EngineError> {
        if !self.device.is_cpu() {
            return Ok(None);
        }
        let (dtype, raw, dims) = self.raw(name)?;
        let [rows, width] = dims.as_slice() else {
            return Ok(None);
        };
        let tiles = TiledWeight::new(dtype, raw, *rows, *width);
        if tiles.is_some() {
            self.release(raw);
        }
        Ok(tiles)
    }

    /// A weight matrix in a type with a fast CPU kernel. candle multiplies Q4_1, Q5_0,
    /// Q5_1 and Q8_1 with scalar code (several times slower than llama.cpp); on the CPU
    /// they are requantized to Q8_0 at load, which has SIMD kernels. Q8_0 keeps 8 bits
    /// per weight where these keep 4–5, so the rounding it adds is far below theirs; the
    /// cost is memory (8.5 instead of 5–6 bits per weight for those tensors) and load time.
    /// (Q5_0 block weights whose shape fits lifeboat's tiles never get here: see
    /// [`TensorReader::block_matmul`].)
    fn weight(&self, name: &str) -> Result<QTensor, EngineError> {
        let q = self.qtensor(name)?;
        let row = q.shape().dims().last().copied().unwrap_or(0);
        if !(self.device.is_cpu() && needs_requantizing(q.dtype(), row)) {
            return Ok(q);
        }
        q.dequantize(self.device)
            .and_then(|dense| QTensor::quantize(&dense, GgmlDType::Q8_0))
            .map_err(|e| self.err(name, e))
    }
}

/// One transformer block's weights.
fn read_block(
    tensors: &TensorReader<'_>,
    info: &ModelInfo,
    layer: usize,
) -> Result<BlockWeights, EngineError> {
    let n = |part: &str| format!("blk.{layer}.{part}");
    let qkv_bias = if info.dims.qkv_bias {
        Some((
            tensors.dense(&n("attn_q.bias"))?,
            tensors.dense(&n("attn_k.bias"))?,
            tensors.dense(&n("attn_v.bias"))?,
        ))
    } else {
        None
    };
    let qk_norm = if info.dims.qk_norm {
        Some((
            tensors.dense(&n("attn_q_norm.weight"))?,
            tensors.dense(&n("attn_k_norm.weight"))?,
        ))
    } else {
        None
    };
    Ok(BlockWeights {
        attn_norm: tensors.dense(&n("attn_norm.weight"))?,
        q: tensors.block_matmul(&n("attn_q.weight"))?,
        k: tensors.block_matmul(&n("attn_k.weight"))?,
        v: tensors.block_matmul(&n("attn_v.weight"))?,
        qkv_bias,
        qk_norm,
        o: tensors.block_matmul(&n("attn_output.weight"))?,
        ffn_norm: tensors.dense(&n("ffn_norm.weight"))?,
        gate: tensors.block_matmul(&n("ffn_gate.weight"))?,
        up: tensors.block_matmul(&n("ffn_up.weight"))?,
        down: tensors.block_matmul(&n("ffn_down.weight"))?,
    })
}

/// Q4_1, Q5_0, Q5_1 and Q8_1 rows (that Q8_0 blocks can hold) are requantized on the CPU.
fn needs_requantizing(dtype: GgmlDType, row: usize) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1
    ) && row.is_multiple_of(GgmlDType::Q8_0.block_size())
}

/// The row width candle's repacked x86 kernels need (one K-quant super-block).
const PACKED_WIDTH: usize = 256;

/// Read the decoder's weights (tensors already checked by `gguf::check_tensors`).
pub(super) fn build_decoder(
    path: &Path,
    header: Header,
    info: &ModelInfo,
    device: &Device,
) -> Result<QuantizedDecoder, EngineError> {
    let Header { content, reader, .. } = header;
    // Safety: the map is only read (and its pages released, see `TensorReader::release`), only while this
    // function runs; like llama.cpp and candle, lifeboat assumes nobody truncates a model
    // file while it loads (the bounds of every tensor are checked against the map).
    #[allow(unsafe_code)]
    let map = unsafe { Mmap::map(reader.get_ref()) }
        .map_err(|e| EngineError::load(path, format!("cannot memory-map: {e}")))?;
    let tensors = TensorReader {
        path,
        content: &content,
        map: &map,
        device,
    };
    let meta = Meta {
        path,
        map: &content.metadata,
    };
    let freq_factors = if content.tensor_infos.contains_key("rope_freqs.weight") {
        let factors = tensors.dense("rope_freqs.weight")?;
        Some(
            factors
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| tensors.err("rope_freqs.weight", e))?,
        )
    } else {
        None
    };
    let config = decoder_config(&meta, info, freq_factors)?;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let tied_tiles = if tied {
        tensors.tiles("token_embd.weight")?
    } else {
        None
    };
    let (embeddings, output) = match tied_tiles {
        // Tied embeddings in tiles: the output layer multiplies by them, and the lookup
        // reads rows back out of them.
        Some(tiles) => {
            let tiles = Arc::new(tiles);
            (TokenEmbedding::tiled(tiles.clone()), QLinear::tiled(tiles))
        }
        None => {
            // Untied, the table is only looked up (a few rows dequantized per step): as stored,
            // never requantized (that would go through the whole table in f32).
            let table = Arc::new(if tied {
                tensors.weight("token_embd.weight")?
            } else {
                tensors.qtensor("token_embd.weight")?
            });
            let embeddings = TokenEmbedding::new(table.clone(), device)
                .map_err(|e| tensors.err("token_embd.weight", e))?;
            // Tied embeddings: the output layer multiplies by the same quantized table.
            let output = if tied {
                QMatMul::from_arc(table)
                    .map(QLinear::new)
                    .map_err(|e| tensors.err("token_embd.weight", e))?
            } else {
                tensors.block_matmul("output.weight")?
            };
            (embeddings, output)
        }
    };
    let norm = tensors.dense("output_norm.weight")?;
    // Requantizing and padding is CPU work per tensor: the blocks load on every core.
    let layers = info.dims.layers;
    let workers = if device.is_cpu() {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, layers.max(1))
    } else {
        1
    };
    let tensors = &tensors;
    let mut read: Vec<(usize, Result<BlockWeights, EngineError>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|worker| {
                scope.spawn(move || {
                    (worker..layers)
                        .step_by(workers)
                        .map(|layer| (layer, read_block(tensors, info, layer)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| match handle.join() {
                Ok(blocks) => blocks,
                Err(_) => vec![(
                    0,
                    Err(EngineError::load(path, "a thread reading the weights panicked")),
                )],
            })
            .collect()
    });
    read.sort_by_key(|(layer, _)| *layer);
    let blocks = read
        .into_iter()
        .map(|(_, block)| block)
        .collect::<Result<Vec<_>, _>>()?;
    QuantizedDecoder::new(config, embeddings, blocks, norm, output)
        .map_err(|e| EngineError::load(path, format!("cannot build the model: {e}")))
}
