//! Criterion micro-benchmarks of the hot pieces that are not the model: SSE frame parsing
//! (gateway → lifeboat) and writing (lifeboat → client), request validation, route
//! resolution, route planning (`Router::dispatch` over instant in-memory backends: name
//! lookup, breaker admission, the attempt and the commit point) and next-token sampling.
//!
//! Run with `cargo bench --bench hot_paths`.

use std::{hint::black_box, sync::Arc};

use candle_core::{Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lifeboat::{
    api::{
        types::{ChatChunkChoice, ChatDelta, Chunk},
        validate,
    },
    backend::{
        Backend, BackendError, BackendKind, BackendRequest, ChoiceDelta, Endpoint, EventStream,
        GenerationEvent, GenerationRequest, SamplingParams,
    },
    config::{Config, RemoteConfig},
    engine::runtime::sampler::Sampler,
    mock_upstream::mock_text,
    router::{RouteTable, Router, RouterSettings},
    upstream::sse::{SseFrame, SseParser},
};

/// A streamed answer as a gateway sends it: role chunk, 256 token chunks, finish, usage,
/// `[DONE]`, with a keep-alive comment in the middle.
fn upstream_body() -> Vec<u8> {
    let mut body = String::new();
    body.push_str("data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"deepseek-chat\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n");
    for i in 0..256u32 {
        if i == 128 {
            body.push_str(": keep-alive\n\n");
        }
        let token = lifeboat::mock_upstream::mock_token(i);
        body.push_str(&format!(
            "data: {{\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"deepseek-chat\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}},\"finish_reason\":null}}]}}\n\n",
            serde_json::Value::from(token)
        ));
    }
    body.push_str("data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"deepseek-chat\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":256,\"total_tokens\":268}}\n\n");
    body.push_str("data: [DONE]\n\n");
    body.into_bytes()
}

fn sse_parse(c: &mut Criterion) {
    let body = upstream_body();
    let mut group = c.benchmark_group("sse_parse");
    group.throughput(Throughput::Bytes(body.len() as u64));
    // Network reads arrive in pieces; 1 KiB splits lines across chunks.
    for chunk_size in [64usize, 1024, 16 * 1024] {
        group.bench_function(format!("chunks_of_{chunk_size}"), |b| {
            let mut frames = Vec::with_capacity(300);
            b.iter(|| {
                let mut parser = SseParser::new();
                frames.clear();
                for piece in body.chunks(chunk_size) {
                    let _ = parser.push(black_box(piece), &mut frames);
                }
                black_box(frames.iter().filter(|f| matches!(f, SseFrame::Data(_))).count())
            });
        });
    }
    group.finish();
}

fn sse_write(c: &mut Criterion) {
    let mut group = c.benchmark_group("sse_write");
    group.throughput(Throughput::Elements(1));
    group.bench_function("chat_chunk_frame", |b| {
        let mut frame = Vec::with_capacity(256);
        b.iter(|| {
            let chunk = Chunk {
                id: "chatcmpl-lifeboat-1",
                object: "chat.completion.chunk",
                created: 1_700_000_000,
                model: "deepseek-chat",
                choices: vec![ChatChunkChoice {
                    index: 0,
                    delta: ChatDelta {
                        role: None,
                        content: Some(black_box(" gateway")),
                        reasoning_content: None,
                        tool_calls: None,
                    },
                    logprobs: None,
                    finish_reason: None,
                }],
                usage: None,
            };
            frame.clear();
            frame.extend_from_slice(b"data: ");
            let _ = serde_json::to_writer(&mut frame, &chunk);
            frame.extend_from_slice(b"\n\n");
            black_box(frame.len())
        });
    });
    group.finish();
}

fn request_validation(c: &mut Criterion) {
    let short = serde_json::json!({
        "model": "deepseek-chat",
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}],
        "stream": true, "stream_options": {"include_usage": true},
        "max_tokens": 256, "temperature": 0.7, "top_p": 0.9, "stop": ["\n\n"],
    })
    .to_string();
    let long = serde_json::json!({
        "model": "deepseek-chat",
        "messages": (0..40).map(|i| serde_json::json!({
            "role": if i % 2 == 0 { "user" } else { "assistant" },
            "content": mock_text(200),
        })).collect::<Vec<_>>(),
        "stream": true, "max_tokens": 1024,
    })
    .to_string();
    let mut group = c.benchmark_group("validate_chat");
    for (name, body) in [("short", short), ("40_turns", long)] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                black_box(validate::parse(Endpoint::ChatCompletions, black_box(body.as_bytes())).is_ok())
            });
        });
    }
    group.finish();
}

/// Three gateways of 8 models each: the route table both route benchmarks use.
fn three_gateways() -> Config {
    let mut config = Config::default();
    for gateway in GATEWAYS {
        config.remotes.insert(
            gateway.into(),
            RemoteConfig {
                base_url: format!("https://{gateway}.example/v1"),
                models: (0..8).map(|i| format!("{gateway}-model-{i}")).collect(),
                ..RemoteConfig::default()
            },
        );
    }
    config
}

const GATEWAYS: [&str; 3] = ["deepseek", "openrouter", "together"];

fn route_resolution(c: &mut Criterion) {
    let config = three_gateways();
    let table = RouteTable::from_config(&config);
    c.bench_function("route_resolve", |b| {
        b.iter(|| {
            black_box(
                table
                    .resolve(black_box("together-model-7"))
                    .map(|r| r.targets.len()),
            )
        });
    });
}

/// A backend that answers at once with one finished delta: what is left to measure is the
/// router's own work for a request.
#[derive(Debug)]
struct InstantBackend(String);

#[async_trait::async_trait]
impl Backend for InstantBackend {
    fn id(&self) -> &str {
        &self.0
    }
    fn kind(&self) -> BackendKind {
        BackendKind::Remote
    }
    async fn generate(&self, _request: BackendRequest) -> Result<EventStream, BackendError> {
        let delta = ChoiceDelta {
            content: Some("ok".into()),
            finish_reason: Some(lifeboat::backend::FinishReason::Stop),
            ..ChoiceDelta::default()
        };
        Ok(Box::pin(futures_util::stream::iter([Ok(
            GenerationEvent::Delta(delta),
        )])))
    }
}

/// Route planning as a request meets it: name → route, breaker admission, the attempt and
/// the commit point, through `Router::dispatch` over in-memory backends.
fn route_planning(c: &mut Criterion) {
    let config = three_gateways();
    let backends: Vec<Arc<dyn Backend>> = GATEWAYS
        .into_iter()
        .map(|id| Arc::new(InstantBackend(id.into())) as Arc<dyn Backend>)
        .collect();
    let router = Router::new(
        RouteTable::from_config(&config),
        backends,
        RouterSettings::default(),
    );
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => panic!("runtime: {err}"),
    };
    let request = GenerationRequest::chat("together-model-7", "Hello", SamplingParams::default());
    c.bench_function("route_dispatch", |b| {
        b.iter(|| {
            black_box(
                runtime
                    .block_on(router.dispatch(black_box(request.clone())))
                    .is_ok(),
            )
        });
    });
}

fn sampling(c: &mut Criterion) {
    // A DeepSeek/Qwen-sized vocabulary with a smooth spread of logits.
    let vocab = 151_936usize;
    let logits: Vec<f32> = (0..vocab).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
    let logits = match Tensor::from_vec(logits, vocab, &Device::Cpu) {
        Ok(t) => t,
        Err(err) => panic!("cannot build logits: {err}"),
    };
    let prompt: Vec<u32> = (0..512).collect();
    let mut group = c.benchmark_group("sample_151k_vocab");
    let cases = [
        (
            "greedy",
            SamplingParams {
                temperature: Some(0.0),
                ..SamplingParams::default()
            },
        ),
        (
            "top_p_0.9",
            SamplingParams {
                temperature: Some(0.7),
                top_p: Some(0.9),
                ..SamplingParams::default()
            },
        ),
        (
            "top_k_40_with_penalties",
            SamplingParams {
                temperature: Some(0.7),
                top_k: Some(40),
                repetition_penalty: Some(1.1),
                frequency_penalty: Some(0.5),
                ..SamplingParams::default()
            },
        ),
    ];
    for (name, params) in cases {
        group.bench_function(name, |b| {
            let mut sampler = Sampler::new(&params, 42, &prompt);
            b.iter(|| black_box(sampler.sample(black_box(&logits)).ok()));
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    sse_parse,
    sse_write,
    request_validation,
    route_resolution,
    route_planning,
    sampling
);
criterion_main!(benches);
