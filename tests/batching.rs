//! Continuous batching on tiny GGUF models: sequences decoded together give exactly the
//! text they give alone (greedy and seeded), also when the KV budget preempts some and
//! they resume by recomputing, when prompts arrive while others decode, and for `n` > 1 —
//! with f32 weights and with quantized ones (Q8_0 and Q5_0, which the CPU engine multiplies
//! through lifeboat's tiles).

use std::{path::Path, sync::Arc};

use candle_core::{
    Device,
    quantized::{GgmlDType, QTensor},
};
use futures_util::StreamExt;
use lifeboat::{
    backend::{Backend, BackendRequest, GenerationEvent, GenerationRequest, SamplingParams},
    engine::{
        Arch, LocalBackend, LocalSettings,
        testing::tiny_gguf::{make_tiny_gguf, tiny_gguf_parts, write_gguf},
    },
};

/// Requests of different lengths and sampling settings.
fn requests() -> Vec<SamplingParams> {
    let greedy = |max_tokens| SamplingParams {
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..SamplingParams::default()
    };
    vec![
        greedy(24),
        greedy(9),
        SamplingParams {
            max_tokens: Some(20),
            temperature: Some(0.9),
            top_p: Some(0.9),
            seed: Some(5),
            ..SamplingParams::default()
        },
        greedy(30),
        SamplingParams {
            max_tokens: Some(12),
            temperature: Some(1.0),
            seed: Some(77),
            n: 2,
            ..SamplingParams::default()
        },
    ]
}

const PROMPTS: [&str; 5] = [
    "Hello there",
    "The gateway is down and the local model answers every request that arrives now",
    "Count",
    "fn main() { println!(\"lifeboat\"); }",
    "Two answers please",
];

/// Each choice's text and finish reason, in choice order, and the usage line.
async fn run(backend: &LocalBackend, prompt: &str, params: SamplingParams) -> (Vec<(String, String)>, u64) {
    let request = BackendRequest::new("tiny", Arc::new(GenerationRequest::chat("tiny", prompt, params)));
    let mut events = backend.generate(request).await.expect("accepted");
    let mut choices: Vec<(String, String)> = Vec::new();
    let mut completion = 0;
    while let Some(event) = events.next().await {
        match event.expect("no error") {
            GenerationEvent::Delta(delta) => {
                let index = delta.index as usize;
                if choices.len() <= index {
                    choices.resize(index + 1, Default::default());
                }
                choices[index]
                    .0
                    .push_str(delta.reasoning_content.as_deref().unwrap_or(""));
                choices[index].0.push_str(delta.content.as_deref().unwrap_or(""));
                if let Some(reason) = delta.finish_reason {
                    choices[index].1 = reason.to_string();
                }
            }
            GenerationEvent::Usage(usage) => completion = usage.completion_tokens,
        }
    }
    (choices, completion)
}

async fn backend(model: &Path, max_batch: usize, kv_cache_bytes: u64) -> LocalBackend {
    let backend = LocalBackend::start(&LocalSettings {
        max_batch,
        kv_cache_bytes,
        ..LocalSettings::new(model)
    })
    .expect("starts");
    backend.wait_ready().await.expect("ready");
    backend
}

/// Every request alone, one after another.
async fn alone(model: &Path) -> Vec<(Vec<(String, String)>, u64)> {
    let backend = backend(model, 1, u64::MAX).await;
    let mut outputs = Vec::new();
    for (prompt, params) in PROMPTS.iter().zip(requests()) {
        outputs.push(run(&backend, prompt, params).await);
    }
    outputs
}

/// Every request at once, the later ones arriving while the first decode.
async fn together(backend: &LocalBackend) -> Vec<(Vec<(String, String)>, u64)> {
    let runs = PROMPTS
        .iter()
        .zip(requests())
        .enumerate()
        .map(|(i, (prompt, params))| async move {
            tokio::time::sleep(std::time::Duration::from_millis(i as u64)).await;
            run(backend, prompt, params).await
        });
    futures_util::future::join_all(runs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_outputs_equal_unbatched_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    for arch in [Arch::Qwen2, Arch::Llama] {
        let model = dir.path().join(format!("tiny-{}.gguf", arch.short_name()));
        make_tiny_gguf(arch, &model, 7).expect("tiny GGUF");
        let expected = alone(&model).await;
        for (choices, completion) in &expected {
            assert!(*completion > 0 && choices.iter().all(|(_, reason)| !reason.is_empty()));
        }
        assert_eq!(expected[4].0.len(), 2, "n = 2 gives two choices");

        let batched = backend(&model, 8, u64::MAX).await;
        assert_eq!(
            together(&batched).await,
            expected,
            "{arch:?}: batched differs from alone"
        );
        assert!(
            batched.peak_batch() >= 2,
            "{arch:?}: only {} sequences ran together",
            batched.peak_batch()
        );

        // A budget of ~60 positions cannot hold them all: the latest are preempted and
        // resume by recomputing their cache, with the same text.
        let bytes_per_token = 2 * 2 * 2 * 16 * 4; // tiny_gguf: 2 blocks, K+V, 2 KV heads, 16 dims, f32
        let tight = backend(&model, 8, 60 * bytes_per_token).await;
        assert_eq!(
            together(&tight).await,
            expected,
            "{arch:?}: preempted differs from alone"
        );
    }
}

/// The tiny model with its matrices quantized: Q5_0 for the feed-forward layers, Q8_0 for
/// the rest (the norms stay f32).
fn quantized_tiny_gguf(arch: Arch, path: &Path) {
    let mut parts = tiny_gguf_parts(arch, 7).expect("tiny parts");
    for (name, tensor) in &mut parts.tensors {
        if tensor.shape().dims().len() != 2 {
            continue;
        }
        let dtype = if name.contains("ffn") {
            GgmlDType::Q5_0
        } else {
            GgmlDType::Q8_0
        };
        let dense = tensor.dequantize(&Device::Cpu).expect("dense");
        *tensor = QTensor::quantize(&dense, dtype).expect("quantize");
    }
    write_gguf(path, &parts).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_outputs_equal_unbatched_outputs_with_quantized_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    for arch in [Arch::Qwen2, Arch::Llama] {
        let model = dir.path().join(format!("tiny-{}-q8-q5.gguf", arch.short_name()));
        quantized_tiny_gguf(arch, &model);
        let expected = alone(&model).await;
        for (choices, completion) in &expected {
            assert!(*completion > 0 && choices.iter().all(|(_, reason)| !reason.is_empty()));
        }
        let batched = backend(&model, 8, u64::MAX).await;
        assert_eq!(
            together(&batched).await,
            expected,
            "{arch:?}: batched differs from alone"
        );
        assert!(batched.peak_batch() >= 2, "{arch:?}: nothing ran together");
    }
}
