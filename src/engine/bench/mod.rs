//! The local engine's speed, measured through its `Backend` as the server uses it: time to
//! ready, prefill of a long prompt, single-stream decode, TTFT and aggregate decode at
//! several concurrent streams, and peak RSS, against the memory bandwidth (`bandwidth`).
//! `benches/engine.rs` prints it; the same figures for llama.cpp come from
//! `scripts/bench-llamacpp`.

pub mod bandwidth;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use serde::Serialize;

use super::{LocalBackend, LocalSettings, load::loader};
use crate::backend::{
    Backend, BackendRequest, Endpoint, GenerationEvent, GenerationRequest, Prompt, SamplingParams,
};

/// What to measure.
#[derive(Debug, Clone)]
pub struct EngineBenchOptions {
    pub model: PathBuf,
    /// Length of the prefill prompt, in the model's tokens.
    pub prompt_tokens: usize,
    /// Tokens generated for the single-stream decode figure.
    pub decode_tokens: u32,
    /// Concurrent stream counts for the TTFT / aggregate figures.
    pub concurrency: Vec<usize>,
    /// Prompt and output length of each concurrent stream.
    pub stream_prompt_tokens: usize,
    pub stream_tokens: u32,
}

impl Default for EngineBenchOptions {
    fn default() -> Self {
        EngineBenchOptions {
            model: PathBuf::new(),
            prompt_tokens: 512,
            decode_tokens: 128,
            concurrency: vec![1, 2, 4, 8],
            stream_prompt_tokens: 64,
            stream_tokens: 32,
        }
    }
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct EngineBenchReport {
    pub model: String,
    pub ready_seconds: f64,
    pub prefill_prompt_tokens: u64,
    pub prefill_seconds: f64,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens: u64,
    pub decode_tokens_per_second: f64,
    pub streams: Vec<StreamFigures>,
    pub peak_rss_bytes: u64,
    /// The machine's memory read rate with the engine's threads (see `bandwidth`).
    pub memory_read_bytes_per_second: f64,
    /// Weight bytes a one-sequence decode step reads (GGUF models).
    pub weight_bytes_per_token: Option<u64>,
}

impl EngineBenchReport {
    /// The share of the measured memory bandwidth that single-stream decode uses (the
    /// weights it reads per token times tokens per second).
    pub fn decode_bandwidth_share(&self) -> Option<f64> {
        let bytes = self.weight_bytes_per_token? as f64;
        (self.memory_read_bytes_per_second > 0.0)
            .then(|| bytes * self.decode_tokens_per_second / self.memory_read_bytes_per_second)
    }
}

/// `concurrency` requests started together.
#[derive(Debug, Clone, Serialize)]
pub struct StreamFigures {
    pub concurrency: usize,
    pub ttft_median_ms: f64,
    pub ttft_max_ms: f64,
    /// All streams' output tokens over the wall time of the whole group (prefill included).
    pub aggregate_tokens_per_second: f64,
    /// The streams' decode speeds added up (each: tokens after its first over the time
    /// since its first): what batching gives once the prompts are in.
    pub decode_tokens_per_second: f64,
    /// Output tokens per second while every stream of the group is decoding (from the last
    /// stream's first token to the first stream's last): steady batched decode, with no
    /// prompt in the way. 0 when the streams never all decode at once.
    pub steady_decode_tokens_per_second: f64,
}

/// One request's timings.
struct Timed {
    first_output: Option<Duration>,
    /// When each output delta (about one per token) arrived.
    outputs: Vec<Duration>,
    end: Duration,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Timed {
    /// Tokens after the first over the time since the first (0 with fewer than two).
    fn decode_rate(&self) -> f64 {
        let span = self
            .end
            .saturating_sub(self.first_output.unwrap_or(self.end))
            .as_secs_f64();
        if self.completion_tokens > 1 && span > 0.0 {
            (self.completion_tokens - 1) as f64 / span
        } else {
            0.0
        }
    }
}

/// Text that the model's own tokenizer turns into about `tokens` tokens (whitespace-joined
/// prose and code, repeated), so every engine sees the same prompt.
pub fn prompt_of_length(
    tokenizer: &super::text::tokenizer::TextTokenizer,
    tokens: usize,
) -> Result<String, String> {
    const TEXT: &str = "The gateway answered slowly, so the local model took over. \
        fn add(a: i32, b: i32) -> i32 { a + b } Numbers: 12 345 6789. \
        Every request was counted, every token was billed, and nothing was lost. ";
    let mut text = String::new();
    let mut ids = Vec::new();
    while ids.len() < tokens {
        text.push_str(TEXT);
        ids = tokenizer.encode(&text, false).map_err(|e| e.to_string())?;
    }
    ids.truncate(tokens);
    tokenizer.decode(&ids).map_err(|e| e.to_string())
}

fn request(prompt: &str, max_tokens: u32) -> BackendRequest {
    let mut request = GenerationRequest::chat(
        "bench",
        prompt,
        SamplingParams {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..SamplingParams::default()
        },
    );
    // A raw text prompt: its length is exactly what was asked, with no template around it.
    request.endpoint = Endpoint::Completions;
    request.prompt = Prompt::Text(vec![prompt.to_string()]);
    BackendRequest::new("bench", Arc::new(request))
}

async fn timed(backend: &LocalBackend, prompt: &str, max_tokens: u32) -> Result<Timed, String> {
    let start = Instant::now();
    let mut events = backend
        .generate(request(prompt, max_tokens))
        .await
        .map_err(|e| e.to_string())?;
    let mut timed = Timed {
        first_output: None,
        outputs: Vec::new(),
        end: Duration::ZERO,
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    while let Some(event) = events.next().await {
        match event.map_err(|e| e.to_string())? {
            GenerationEvent::Delta(delta) => {
                if delta.is_output() {
                    let now = start.elapsed();
                    timed.first_output.get_or_insert(now);
                    timed.outputs.push(now);
                }
            }
            GenerationEvent::Usage(usage) => {
                timed.prompt_tokens = usage.prompt_tokens;
                timed.completion_tokens = usage.completion_tokens;
            }
        }
    }
    timed.end = start.elapsed();
    Ok(timed)
}

/// Peak resident memory of this process (`VmHWM`), in bytes; 0 where /proc is missing.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Output deltas per second in the window where every run is between its first and last
/// output (runs timed from one common start); 0 if that window is empty.
fn steady_rate(runs: &[Timed]) -> f64 {
    let start = runs.iter().filter_map(|r| r.outputs.first()).max();
    let end = runs.iter().filter_map(|r| r.outputs.last()).min();
    let (Some(&start), Some(&end)) = (start, end) else {
        return 0.0;
    };
    if end <= start || runs.iter().any(|r| r.outputs.is_empty()) {
        return 0.0;
    }
    // Deltas after the window opens: the one that opened it marks its start.
    let inside = runs
        .iter()
        .flat_map(|r| &r.outputs)
        .filter(|&&t| t > start && t <= end)
        .count();
    inside as f64 / (end - start).as_secs_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Load the model and measure it; `progress` hears what is being measured.
pub async fn run(options: &EngineBenchOptions, progress: impl Fn(&str)) -> Result<EngineBenchReport, String> {
    if options.concurrency.contains(&0) {
        return Err("--concurrency values must be at least 1".into());
    }
    let tokenizer = loader::read_info(&options.model)
        .map_err(|e| e.to_string())?
        .tokenizer;
    let long_prompt = prompt_of_length(&tokenizer, options.prompt_tokens)?;
    let short_prompt = prompt_of_length(&tokenizer, options.stream_prompt_tokens)?;

    // Before the model loads, so that the probe's buffer never adds to the peak RSS.
    progress("memory bandwidth");
    let memory_read_bytes_per_second =
        bandwidth::read_bytes_per_second(candle_core::utils::get_num_threads());
    let weight_bytes_per_token = bandwidth::weight_bytes_per_token(&options.model);

    progress("loading");
    let start = Instant::now();
    let largest = options.concurrency.iter().copied().max().unwrap_or(1);
    let backend = LocalBackend::start(&LocalSettings {
        queue_capacity: largest.max(1),
        max_batch: largest.max(1),
        ..LocalSettings::new(options.model.clone())
    })
    .map_err(|e| e.to_string())?;
    backend.wait_ready().await?;
    let ready_seconds = start.elapsed().as_secs_f64();

    progress("prefill");
    // One generated token: the time is the prompt's forward pass plus one sample.
    let prefill = timed(&backend, &long_prompt, 1).await?;
    progress("decode");
    let decode = timed(&backend, &short_prompt, options.decode_tokens).await?;
    let decode_tokens_per_second = decode.decode_rate();

    let mut streams = Vec::new();
    for &concurrency in &options.concurrency {
        progress(&format!("{concurrency} concurrent streams"));
        let group_start = Instant::now();
        let runs = futures_util::future::join_all(
            (0..concurrency).map(|_| timed(&backend, &short_prompt, options.stream_tokens)),
        )
        .await;
        let wall = group_start.elapsed().as_secs_f64();
        let runs: Vec<Timed> = runs.into_iter().collect::<Result<_, _>>()?;
        let mut ttfts: Vec<f64> = runs
            .iter()
            .map(|r| r.first_output.unwrap_or(r.end).as_secs_f64() * 1000.0)
            .collect();
        let tokens: u64 = runs.iter().map(|r| r.completion_tokens).sum();
        let decode_tokens_per_second = runs.iter().map(Timed::decode_rate).sum();
        let steady_decode_tokens_per_second = steady_rate(&runs);
        let ttft_max_ms = ttfts.iter().copied().fold(0.0, f64::max);
        streams.push(StreamFigures {
            concurrency,
            ttft_median_ms: median(&mut ttfts),
            ttft_max_ms,
            aggregate_tokens_per_second: tokens as f64 / wall,
            decode_tokens_per_second,
            steady_decode_tokens_per_second,
        });
    }

    let prefill_seconds = prefill.end.as_secs_f64();
    Ok(EngineBenchReport {
        model: options.model.display().to_string(),
        ready_seconds,
        prefill_prompt_tokens: prefill.prompt_tokens,
        prefill_seconds,
        prefill_tokens_per_second: prefill.prompt_tokens as f64 / prefill_seconds,
        decode_tokens: decode.completion_tokens,
        decode_tokens_per_second,
        streams,
        peak_rss_bytes: peak_rss_bytes(),
        memory_read_bytes_per_second,
        weight_bytes_per_token,
    })
}

impl std::fmt::Display for EngineBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "model            {}", self.model)?;
        writeln!(f, "ready            {:.2} s", self.ready_seconds)?;
        writeln!(
            f,
            "prefill          {:.1} tok/s ({} tokens in {:.2} s)",
            self.prefill_tokens_per_second, self.prefill_prompt_tokens, self.prefill_seconds
        )?;
        writeln!(
            f,
            "decode           {:.2} tok/s ({} tokens, one stream)",
            self.decode_tokens_per_second, self.decode_tokens
        )?;
        write!(
            f,
            "bandwidth        {:.1} GB/s read ({} threads)",
            self.memory_read_bytes_per_second / 1e9,
            candle_core::utils::get_num_threads()
        )?;
        match (self.weight_bytes_per_token, self.decode_bandwidth_share()) {
            (Some(bytes), Some(share)) => writeln!(
                f,
                "; decode reads {:.2} GB of weights a token: {:.1} GB/s, {:.0} % of it",
                bytes as f64 / 1e9,
                bytes as f64 * self.decode_tokens_per_second / 1e9,
                share * 100.0
            )?,
            _ => writeln!(f)?,
        }
        writeln!(
            f,
            "streams  TTFT median  TTFT max  aggregate tok/s  decode tok/s (sum)  all decoding tok/s"
        )?;
        for s in &self.streams {
            writeln!(
                f,
                "{:>7}  {:>8.0} ms  {:>5.0} ms  {:>15.2}  {:>18.2}  {:>18.2}",
                s.concurrency,
                s.ttft_median_ms,
                s.ttft_max_ms,
                s.aggregate_tokens_per_second,
                s.decode_tokens_per_second,
                s.steady_decode_tokens_per_second
            )?;
        }
        write!(f, "peak RSS         {:.2} GB", self.peak_rss_bytes as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_have_the_asked_length_and_medians_are_middles() {
        let tokenizer = crate::engine::text::tokenizer::TextTokenizer::from_tokenizer(
            crate::engine::testing::tiny::tiny_tokenizer().expect("tokenizer"),
        );
        let text = prompt_of_length(&tokenizer, 100).expect("prompt");
        let ids = tokenizer.encode(&text, false).expect("encode");
        // Decoding and re-encoding may merge one pair at the cut.
        assert!((99..=100).contains(&ids.len()), "{}", ids.len());
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(peak_rss_bytes() > 0);
    }

    #[test]
    fn steady_rate_counts_only_while_every_stream_decodes() {
        let run = |times_ms: &[u64]| Timed {
            first_output: times_ms.first().map(|&t| Duration::from_millis(t)),
            outputs: times_ms.iter().map(|&t| Duration::from_millis(t)).collect(),
            end: Duration::from_millis(times_ms.last().copied().unwrap_or(0)),
            prompt_tokens: 0,
            completion_tokens: times_ms.len() as u64,
        };
        // Stream a decodes from 0 to 100 ms, b from 40 to 140 ms, one token per 10 ms:
        // both decode from 40 to 100 ms, where a has 6 tokens after 40 ms and b 6.
        let a = run(&(0..=10).map(|i| i * 10).collect::<Vec<_>>());
        let b = run(&(4..=14).map(|i| i * 10).collect::<Vec<_>>());
        let rate = steady_rate(&[a, b]);
        assert!((rate - 12.0 / 0.060).abs() < 1e-6, "{rate}");
        // Streams that never overlap have no steady window.
        let c = run(&[0, 10]);
        let d = run(&[20, 30]);
        assert_eq!(steady_rate(&[c, d]), 0.0);
    }
}
