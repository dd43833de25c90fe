//! What lifeboat adds in front of a gateway: the same requests sent directly to the mock
//! upstream and through lifeboat, alternating, at several concurrency levels, for JSON
//! and streaming answers. Prints added latency (p50/p99) and the RPS ratio.
//!
//! `cargo bench --bench proxy_overhead [-- --seconds 1 --rounds 3 --concurrency 1,16,64]`
//!
//! Client, lifeboat and mock share this machine: the direct arm pays for client + mock,
//! the proxied arm for client + lifeboat + mock, so the difference is lifeboat's cost
//! including the CPU it takes away from the others.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use lifeboat::{
    app::{self, AppState},
    mock_upstream::{MockSettings, MockUpstream},
};
use serde_json::{Value, json};

#[derive(Debug, Clone)]
struct Options {
    seconds: f64,
    rounds: u32,
    concurrency: Vec<usize>,
    /// The mock's latency profile: first token, then between tokens.
    first_token_delay: Duration,
    inter_token_delay: Duration,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        seconds: 1.0,
        rounds: 3,
        concurrency: vec![1, 16, 64],
        first_token_delay: Duration::ZERO,
        inter_token_delay: Duration::ZERO,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--seconds" => {
                options.seconds = value("--seconds")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?
            }
            "--rounds" => {
                options.rounds = value("--rounds")?.parse().map_err(|e| format!("--rounds: {e}"))?
            }
            "--concurrency" => {
                options.concurrency = value("--concurrency")?
                    .split(',')
                    .map(|c| {
                        c.trim()
                            .parse::<usize>()
                            .map_err(|e| format!("--concurrency: {e}"))
                    })
                    .collect::<Result<_, _>>()?;
                if options.concurrency.contains(&0) {
                    return Err("--concurrency: levels must be at least 1".into());
                }
            }
            "--first-token-delay" => {
                options.first_token_delay = humantime::parse_duration(&value("--first-token-delay")?)
                    .map_err(|e| format!("--first-token-delay: {e}"))?
            }
            "--inter-token-delay" => {
                options.inter_token_delay = humantime::parse_duration(&value("--inter-token-delay")?)
                    .map_err(|e| format!("--inter-token-delay: {e}"))?
            }
            // Passed by `cargo bench`.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(options)
}

/// Start the mock and lifeboat on their own runtime so the load generator's threads do
/// not share a scheduler with them.
fn start_servers(settings: MockSettings) -> (SocketAddr, SocketAddr) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("server runtime");
        runtime.block_on(async move {
            let mock = MockUpstream::start(settings).await.expect("mock");
            let config = mock.gateway_config();
            let state = AppState::from_config(&config, &HashMap::<String, String>::new()).expect("config");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            tx.send((mock.addr(), addr)).expect("report addresses");
            app::run(listener, app::app(state), std::future::pending(), Duration::ZERO)
                .await
                .expect("server");
            drop(mock);
        });
    });
    rx.recv().expect("servers started")
}

struct ArmResult {
    latencies: Histogram<u64>,
    requests: u64,
    elapsed: Duration,
    errors: u64,
}

async fn drive(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    concurrency: usize,
    duration: Duration,
) -> ArmResult {
    let body = Arc::new(serde_json::to_vec(body).expect("body"));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let url = url.to_string();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut errors = 0;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let ok = match client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.as_ref().clone())
                    .send()
                    .await
                {
                    Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    latencies.saturating_record(t0.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut errors = 0;
    for task in tasks {
        let (h, e) = task.await.expect("worker");
        latencies.add(&h).expect("same bounds");
        errors += e;
    }
    ArmResult {
        requests: latencies.len(),
        latencies,
        elapsed: started.elapsed(),
        errors,
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let options = match options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("proxy_overhead: {message}");
            std::process::exit(2);
        }
    };
    let (mock_addr, lifeboat_addr) = start_servers(MockSettings {
        first_token_delay: options.first_token_delay,
        inter_token_delay: options.inter_token_delay,
        ..MockSettings::default()
    });
    lifeboat::upstream::install_crypto_provider();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()
        .expect("client");
    let direct_url = format!("http://{mock_addr}/v1/chat/completions");
    let proxied_url = format!("http://{lifeboat_addr}/v1/chat/completions");
    let duration = Duration::from_secs_f64(options.seconds);

    println!(
        "proxy_overhead: {} round(s) of {:.1} s per arm, alternating direct/proxied; 16-token answers; \
         mock first token {}, between tokens {}\n",
        options.rounds,
        options.seconds,
        humantime::format_duration(options.first_token_delay),
        humantime::format_duration(options.inter_token_delay),
    );
    println!(
        "| mode | conc | direct p50 ms | direct p99 ms | via p50 ms | via p99 ms | added p50 ms | added p99 ms | direct rps | via rps | rps ratio | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for stream in [false, true] {
        let body = json!({
            "model": "deepseek-chat",
            "messages": [{"role": "user", "content": "Benchmark the proxy overhead please"}],
            "max_tokens": 16,
            "stream": stream,
        });
        for &concurrency in &options.concurrency {
            // Warm both paths (connections, allocator).
            drive(
                &client,
                &direct_url,
                &body,
                concurrency,
                Duration::from_millis(200),
            )
            .await;
            drive(
                &client,
                &proxied_url,
                &body,
                concurrency,
                Duration::from_millis(200),
            )
            .await;
            let mut direct = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut proxied = direct.clone();
            let (mut direct_rps, mut proxied_rps) = (0.0, 0.0);
            let mut errors = 0;
            for _ in 0..options.rounds {
                let d = drive(&client, &direct_url, &body, concurrency, duration).await;
                let p = drive(&client, &proxied_url, &body, concurrency, duration).await;
                direct.add(&d.latencies).expect("bounds");
                proxied.add(&p.latencies).expect("bounds");
                direct_rps += d.requests as f64 / d.elapsed.as_secs_f64();
                proxied_rps += p.requests as f64 / p.elapsed.as_secs_f64();
                errors += d.errors + p.errors;
            }
            direct_rps /= f64::from(options.rounds);
            proxied_rps /= f64::from(options.rounds);
            let (d50, d99) = (direct.value_at_quantile(0.5), direct.value_at_quantile(0.99));
            let (p50, p99) = (proxied.value_at_quantile(0.5), proxied.value_at_quantile(0.99));
            println!(
                "| {} | {concurrency} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {direct_rps:.0} | {proxied_rps:.0} | {:.2} | {errors} |",
                if stream { "sse" } else { "json" },
                ms(d50),
                ms(d99),
                ms(p50),
                ms(p99),
                ms(p50) - ms(d50),
                ms(p99) - ms(d99),
                proxied_rps / direct_rps,
            );
        }
    }
}
