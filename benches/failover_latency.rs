//! What failover costs a client: (1) with the gateway's breaker open, a request for the
//! remote model is answered by the local model — compared with asking the local model
//! directly; (2) with the breaker closed and the gateway refusing connections, the time
//! from the request to the local answer's first token; (3) with lifeboat's defaults, a
//! gateway that starts to hang: the time from the fault to each client's answer, for
//! requests in flight when it began and for new ones. Tiny local model, mock gateway.
//!
//! `cargo bench --bench failover_latency [-- --requests 300]`

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lifeboat::{
    app::{self, AppState},
    engine::{Arch, testing::tiny::make_tiny},
    mock_upstream::{FaultMode, MockSettings, MockUpstream},
};
use serde_json::json;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")
}

/// Microseconds from sending a streamed request to its first token.
async fn ttft(client: &reqwest::Client, url: &str, model: &str) -> Option<u64> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": true,
    });
    let started = Instant::now();
    let response = client.post(url).json(&body).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let mut stream = response.bytes_stream();
    let mut first = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.ok()?;
        if first.is_none()
            && (chunk.windows(9).any(|w| w == b"\"content\"") || chunk.windows(9).any(|w| w == b"reasoning"))
        {
            first = Some(started.elapsed().as_micros() as u64);
        }
    }
    first
}

fn row(name: &str, h: &Histogram<u64>) {
    println!(
        "| {name} | {} | {:.3} | {:.3} | {:.3} |",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.9) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0
    );
}

/// Serve `config` on 127.0.0.1:0 and wait until it is ready; returns the chat URL.
async fn serve(config: &lifeboat::config::Config, client: &reqwest::Client) -> String {
    let state = AppState::from_config(config, &HashMap::<String, String>::new()).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(app::run(
        listener,
        app::app(state),
        std::future::pending(),
        Duration::ZERO,
    ));
    for _ in 0..2000 {
        // `ready`, not just 200: a box whose gateway serves is 200 `degraded` while its
        // local model still loads.
        let ready = client.get(format!("http://{addr}/ready")).send().await;
        if let Ok(ready) = ready
            && ready
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|r| r["status"] == "ready")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    format!("http://{addr}/v1/chat/completions")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut requests = 300usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--requests" => match args.next().and_then(|v| v.parse().ok()) {
                Some(n) if n > 0 => requests = n,
                _ => {
                    eprintln!("failover_latency: --requests needs a positive number");
                    std::process::exit(2);
                }
            },
            "--bench" => {}
            other => {
                eprintln!("failover_latency: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let model = tempfile::tempdir().expect("temp dir");
    make_tiny(Arch::Qwen2, model.path(), 7).expect("tiny model");
    let mock = MockUpstream::start(MockSettings::default()).await.expect("mock");
    let mut config = mock.gateway_config();
    config.local.model = Some(model.path().to_path_buf());
    config.local.served_model_name = Some("local-model".into());
    config.router.probe_interval = Duration::ZERO;
    config.router.max_retries = 0;
    config.router.cooldown = Duration::from_secs(3600);
    config.router.max_cooldown = Duration::from_secs(3600);
    lifeboat::upstream::install_crypto_provider();
    let client = reqwest::Client::new();
    let url = serve(&config, &client).await;

    // (1) Breaker open: trip it, then alternate remote-name and local-name requests.
    mock.set_fault(FaultMode::Refuse).await.expect("fault");
    for _ in 0..3 {
        ttft(&client, &url, "deepseek-chat").await;
    }
    let (mut via_open, mut direct) = (histogram(), histogram());
    for _ in 0..20 {
        ttft(&client, &url, "local-model").await; // warm-up
    }
    for _ in 0..requests {
        if let Some(us) = ttft(&client, &url, "deepseek-chat").await {
            via_open.saturating_record(us);
        }
        if let Some(us) = ttft(&client, &url, "local-model").await {
            direct.saturating_record(us);
        }
    }

    // (2) Breaker closed, gateway refusing: every request pays the refused connection.
    let mut config = mock.gateway_config();
    config.local.model = Some(model.path().to_path_buf());
    config.local.served_model_name = Some("local-model".into());
    config.router.probe_interval = Duration::ZERO;
    config.router.max_retries = 0;
    config.router.failure_threshold = u32::MAX;
    config.router.error_rate_threshold = 2.0;
    let url2 = serve(&config, &client).await;
    let (mut refused, mut direct2) = (histogram(), histogram());
    for _ in 0..requests {
        if let Some(us) = ttft(&client, &url2, "deepseek-chat").await {
            refused.saturating_record(us);
        }
        if let Some(us) = ttft(&client, &url2, "local-model").await {
            direct2.saturating_record(us);
        }
    }

    let (in_flight, new, rounds) = hang(&client, model.path()).await;

    println!(
        "failover_latency: time to first token, streamed, tiny local model, {requests} requests per row\n"
    );
    println!("| path | n | p50 ms | p90 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    row("breaker open → local", &via_open);
    row("local directly", &direct);
    row("refused connection → local", &refused);
    row("local directly (same server)", &direct2);
    println!(
        "\nadded by the open breaker: p50 {:.3} ms, p99 {:.3} ms; added by a refused connection: p50 {:.3} ms",
        (via_open.value_at_quantile(0.5) as f64 - direct.value_at_quantile(0.5) as f64) / 1000.0,
        (via_open.value_at_quantile(0.99) as f64 - direct.value_at_quantile(0.99) as f64) / 1000.0,
        (refused.value_at_quantile(0.5) as f64 - direct2.value_at_quantile(0.5) as f64) / 1000.0,
    );
    println!(
        "\nA hanging gateway, lifeboat's defaults (30 s deadlines, adaptive), {rounds} faults: time from \
         the fault to the first token (streams) or the whole answer (JSON), 8 clients each, half streaming\n"
    );
    println!("| requests | n | p50 ms | p90 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    row("in flight when the hang began", &in_flight);
    row("sent 0.5 s into the hang", &new);
}

/// (3): rounds of a hang with lifeboat's defaults; returns the times from the fault to
/// the answers of requests sent at the fault and 0.5 s into it, and the round count.
async fn hang(client: &reqwest::Client, model: &std::path::Path) -> (Histogram<u64>, Histogram<u64>, usize) {
    const ROUNDS: usize = 5;
    const CLIENTS: usize = 8;
    let mock = MockUpstream::start(MockSettings::default()).await.expect("mock");
    let mut config = mock.gateway_config();
    config.local.model = Some(model.to_path_buf());
    config.local.served_model_name = Some("local-model".into());
    let url = serve(&config, client).await;
    let (mut in_flight, mut new) = (histogram(), histogram());
    for _ in 0..ROUNDS {
        // Healthy traffic first, so the deadlines have something to adapt to.
        for i in 0..24 {
            answer_after(client, &url, i % 2 == 0, Instant::now()).await;
        }
        mock.set_fault(FaultMode::Hang).await.expect("fault");
        let fault = Instant::now();
        let wave = |delay: Duration| {
            (0..CLIENTS)
                .map(|i| {
                    let (client, url) = (client.clone(), url.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        answer_after(&client, &url, i % 2 == 0, fault).await
                    })
                })
                .collect::<Vec<_>>()
        };
        let (first, second) = (wave(Duration::ZERO), wave(Duration::from_millis(500)));
        for (tasks, into) in [(first, &mut in_flight), (second, &mut new)] {
            for task in tasks {
                if let Ok(Some(us)) = task.await {
                    into.saturating_record(us);
                }
            }
        }
        mock.set_fault(FaultMode::None).await.expect("recover");
        // Back on the gateway (within the 2 s cooldown) before the next round.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    (in_flight, new, ROUNDS)
}

/// Microseconds from `since` to the first token of a streamed answer or to the whole of
/// a JSON one; `None` for a failed request.
async fn answer_after(client: &reqwest::Client, url: &str, stream: bool, since: Instant) -> Option<u64> {
    if stream {
        let started = Instant::now();
        let waited = started.duration_since(since).as_micros() as u64;
        return ttft(client, url, "deepseek-chat").await.map(|us| us + waited);
    }
    let body = json!({
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 4,
        "temperature": 0,
    });
    let response = client.post(url).json(&body).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.bytes().await.ok()?;
    Some(since.elapsed().as_micros() as u64)
}
