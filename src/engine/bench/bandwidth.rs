//! The memory read bandwidth of this machine with the engine's thread count, and the weight
//! bytes a decode step reads: single-stream decode is bound by the first and proportional
//! to the second, so `lifeboat bench engine` puts its decode speed against that limit.

use std::{path::Path, time::Instant};

/// Bytes the probe reads per pass: well beyond any last-level cache.
const PROBE_BYTES: usize = 256 << 20;
const PASSES: usize = 5;

/// The best read rate (bytes per second) of five passes over a fresh 256 MiB buffer,
/// split across `threads` threads. The buffer is freed before returning.
pub fn read_bytes_per_second(threads: usize) -> f64 {
    let threads = threads.max(1);
    let words = PROBE_BYTES / 8;
    // Written first, so that every page is really there when the timed passes read it.
    let buffer: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..PASSES {
        let start = Instant::now();
        let total = std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(chunk)
                .map(|part| scope.spawn(move || sum(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.min(start.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best
}

/// A sum over eight independent lanes that asks for each line 8 KiB ahead, as the
/// engine's kernels do: on VMs, plain loads left to the hardware prefetcher read a fraction
/// of what prefetched ones do (see `docs/engine.md`).
fn sum(words: &[u64]) -> u64 {
    const AHEAD_WORDS: usize = 1024;
    let mut lanes = [0u64; 8];
    let chunks = words.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(0u64, |a, &w| a.wrapping_add(w));
    for chunk in chunks {
        prefetch(chunk.as_ptr().wrapping_add(AHEAD_WORDS));
        for (lane, &w) in lanes.iter_mut().zip(chunk) {
            *lane = lane.wrapping_add(w);
        }
    }
    lanes.iter().fold(tail, |a, &l| a.wrapping_add(l))
}

#[inline(always)]
fn prefetch(p: *const u64) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a prefetch is a hint; it never faults, also past the end of the buffer.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The bytes of weights one decode step of one sequence reads from a GGUF file's tensors:
/// all of them, except an embedding table that has its own output layer (a step looks up one
/// of its rows). `None` for other formats or an unreadable file.
pub fn weight_bytes_per_token(path: &Path) -> Option<u64> {
    if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
        return None;
    }
    let mut file = std::fs::File::open(path).ok()?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).ok()?;
    let untied = content.tensor_infos.contains_key("output.weight");
    let bytes = content
        .tensor_infos
        .iter()
        .filter(|(name, _)| !(untied && name.as_str() == "token_embd.weight"))
        .map(|(_, info)| {
            let dtype = info.ggml_dtype;
            (info.shape.elem_count() / dtype.block_size() * dtype.type_size()) as u64
        })
        .sum();
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sum_covers_every_word() {
        let words: Vec<u64> = (1..=1003).collect();
        assert_eq!(sum(&words), 1003 * 1004 / 2);
    }

    #[test]
    fn weight_bytes_count_a_gguf_files_tensors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.gguf");
        crate::engine::testing::tiny_gguf::make_tiny_gguf(crate::engine::models::Arch::Qwen2, &path, 7)
            .expect("tiny model");
        let bytes = weight_bytes_per_token(&path).expect("a GGUF file");
        let file_size = std::fs::metadata(&path).expect("metadata").len();
        // The tensors are most of the file; the rest is metadata (the tokenizer).
        assert!(bytes > 0 && bytes < file_size, "{bytes} of {file_size}");
        assert_eq!(
            weight_bytes_per_token(&dir.path().join("model.safetensors")),
            None
        );
    }
}
