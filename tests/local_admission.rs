//! The local engine guarded as the scarce resource it is during an outage, over real
//! sockets: a prompt that cannot fit is refused by size before it is tokenized (RSS
//! measured), `max_tokens` unset is capped, `n` is capped, a streaming client that stops
//! reading loses its slot, and admission is round-robin across clients.

use crate::common;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use candle_core::quantized::gguf_file;
use common::{TestApp, spawn_local_app_with};
use futures_util::StreamExt;
use lifeboat::engine::{
    Arch,
    testing::{
        tiny::make_tiny,
        tiny_gguf::{tiny_gguf_parts, write_gguf},
    },
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};

const MODEL: &str = "tiny";

/// The tiny Qwen2 model (512-token context).
fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    make_tiny(Arch::Qwen2, dir.path(), 7).expect("tiny model");
    dir
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
    });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    body
}

/// `VmRSS` and `VmHWM` of this process (the test server runs in it), in MiB.
fn memory_mib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_that_cannot_fit_is_refused_by_size_before_it_is_tokenized() {
    let dir = tiny_model();
    let app = spawn_local_app_with(dir.path(), MODEL, |_| {}).await;
    // 8 MB for a 512-token model: before, each was tokenized (1M tokens, ~3 s and ~700 MB
    // at peak; three at once 1.9 GB, 1.6 GB of it still resident afterwards).
    let body = chat(&"numbers ".repeat(1_000_000), json!({"max_tokens": 4}));
    let (rss_before, hwm_before) = memory_mib();
    let started = Instant::now();
    let responses =
        futures_util::future::join_all((0..3).map(|_| app.post_json("/v1/chat/completions", &body))).await;
    let elapsed = started.elapsed();
    for response in responses {
        assert_eq!(response.status(), 400);
        let error: Value = response.json().await.expect("json");
        assert_eq!(error["error"]["code"], "context_length_exceeded");
        assert_eq!(error["error"]["param"], "messages");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("8000000 bytes") && message.contains("512 tokens"),
            "{message}"
        );
    }
    let (rss_after, hwm_after) = memory_mib();
    eprintln!(
        "three 8 MB prompts refused in {elapsed:?}: VmRSS {rss_before} -> {rss_after} MiB, \
         VmHWM {hwm_before} -> {hwm_after} MiB"
    );
    // What remains is the bodies themselves (a few copies of 8 MB each); tokenizing them
    // took 1.9 GB. The bound leaves room for other tests running in this process.
    assert!(
        hwm_after.saturating_sub(hwm_before) < 512,
        "peak grew by {} MiB",
        hwm_after - hwm_before
    );
    // The engine still serves.
    let ok = app
        .post_json("/v1/chat/completions", &chat("Hello", json!({"max_tokens": 3})))
        .await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn max_tokens_unset_is_capped_by_the_local_default() {
    let dir = tiny_model();
    let app = spawn_local_app_with(dir.path(), MODEL, |config| {
        config.local.default_max_tokens = 16;
    })
    .await;
    // Before, an unset max_tokens meant the whole remaining context (here ~500 tokens; a
    // 65k-context model was still generating for one request after 3 minutes).
    let response = app
        .post_json("/v1/chat/completions", &chat("Count for me", json!({})))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["usage"]["completion_tokens"], 16, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    // An explicit max_tokens beyond the default is still honoured.
    let response = app
        .post_json(
            "/v1/chat/completions",
            &chat("Count for me", json!({"max_tokens": 40})),
        )
        .await;
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["usage"]["completion_tokens"], 40, "{body}");
}

#[tokio::test]
async fn n_beyond_the_local_limit_is_a_400_naming_n() {
    let dir = tiny_model();
    let app = spawn_local_app_with(dir.path(), MODEL, |_| {}).await;
    // Before, n = 128 ran 128 sequences of the one local model for one request.
    let response = app
        .post_json(
            "/v1/chat/completions",
            &chat("Hi", json!({"n": 128, "max_tokens": 4})),
        )
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], "n");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("at most 4") && message.contains("got 128"),
        "{message}"
    );
    let response = app
        .post_json(
            "/v1/chat/completions",
            &chat("Hi", json!({"n": 4, "max_tokens": 2})),
        )
        .await;
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["choices"].as_array().map(Vec::len), Some(4), "{body}");
}

/// The tiny Qwen2 model as GGUF with a 64k context, so that one answer can outgrow every
/// socket buffer between the engine and a client that stopped reading.
fn long_context_gguf(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tiny-long.gguf");
    let mut parts = tiny_gguf_parts(Arch::Qwen2, 7).expect("tiny parts");
    parts.set("qwen2.context_length", gguf_file::Value::U32(65536));
    write_gguf(&path, &parts).expect("write");
    path
}

async fn stalled_metric(app: &TestApp) -> u64 {
    let text = app.get("/metrics").await.text().await.unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("lifeboat_local_stalled_clients_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_client_that_stops_reading_loses_its_slot() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = long_context_gguf(dir.path());
    let app = spawn_local_app_with(&model, MODEL, |config| {
        config.local.max_batch = 4;
        config.local.stalled_client_timeout = Duration::from_secs(1);
    })
    .await;
    let before = stalled_metric(&app).await;
    // A client with a tiny receive buffer asks for a long streamed answer in 4 choices
    // (all 4 slots), reads the headers, then reads nothing more.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stalled = socket.connect(app.addr).await.expect("connect");
    let body = chat(
        "Count for me",
        json!({"max_tokens": 60000, "n": 4, "stream": true}),
    )
    .to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: lifeboat\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stalled
        .write_all(format!("{head}{body}").as_bytes())
        .await
        .expect("request sent");
    let mut first = [0u8; 512];
    let read = stalled.read(&mut first).await.expect("headers");
    assert!(String::from_utf8_lossy(&first[..read]).starts_with("HTTP/1.1 200"));
    // Before, the engine held its 4 slots for as long as the socket stayed open: this
    // request waited forever. Now, once the buffers are full and the client has taken
    // nothing for 1 s, its sequences are cancelled and the request is served.
    let started = Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(240),
        app.post_json("/v1/chat/completions", &chat("Hi", json!({"max_tokens": 3}))),
    )
    .await
    .expect("served once the stalled client's slots were freed");
    assert_eq!(response.status(), 200);
    eprintln!("served {:?} after the stalled request started", started.elapsed());
    assert!(stalled_metric(&app).await > before, "the stall was counted");
    drop(stalled);
}

/// Stream one request and return when its first output arrived and when it finished.
async fn timed_stream(client: reqwest::Client, url: String, body: Value) -> (Instant, Instant) {
    let response = client.post(url).json(&body).send().await.expect("sent");
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut first = None;
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk.expect("chunk");
        if first.is_none() && chunk.windows(6).any(|w| w == b"\"delta") {
            first = Some(Instant::now());
        }
    }
    let done = Instant::now();
    (first.unwrap_or(done), done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_flooding_cannot_starve_another() {
    let dir = tiny_model();
    let app = spawn_local_app_with(dir.path(), MODEL, |config| {
        config.local.max_batch = 1;
    })
    .await;
    let url = app.url("/v1/chat/completions");
    let body = chat("Count for me", json!({"max_tokens": 400, "stream": true}));
    // Client A (127.0.0.1) queues 8 requests behind the one slot.
    let flood: Vec<_> = (0..8)
        .map(|_| tokio::spawn(timed_stream(app.client.clone(), url.clone(), body.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Client B, from another address (no API keys: clients are told apart by address).
    let other = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        .build()
        .expect("client");
    let sent = Instant::now();
    let (b_first, _) = timed_stream(other, url, body).await;
    let mut a_firsts = Vec::new();
    for task in flood {
        a_firsts.push(task.await.expect("A's request").0);
    }
    // Every A request that had not started when B was sent starts after B, except at
    // most the one whose turn may have come while B was still on its way in. Before
    // (one FIFO), B waited for all of them.
    let waiting = a_firsts.iter().filter(|first| **first > sent).count();
    let overtook_b = a_firsts
        .iter()
        .filter(|first| **first > sent && **first < b_first)
        .count();
    assert!(
        waiting >= 3,
        "the flood was still queued when B came ({waiting} waiting)"
    );
    assert!(
        overtook_b <= 1,
        "{overtook_b} of A's {waiting} waiting requests started before B's"
    );
}
