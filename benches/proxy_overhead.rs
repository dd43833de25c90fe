//! What lifeboat adds in front of a gateway: the same requests sent directly to the mock
//! upstream and through lifeboat, alternating, at several concurrency levels, for JSON
//! and streaming answers. Prints added latency (p50/p99) and the RPS ratio.
//!
//! `cargo bench --bench proxy_overhead [-- --seconds 1 --rounds 3 --concurrency 1,16,64
//! --mode both --first-token-delay 20ms --inter-token-delay 1ms]`
//!
//! Client, lifeboat and mock share this machine (each on its own runtime, as separate
//! processes would be): the direct arm pays for client + mock, the proxied arm for client +
//! lifeboat + mock, so the difference is lifeboat's cost including the CPU it takes away
//! from the others. The CPU columns are the whole process's CPU time per request in each
//! arm, and the cores it kept busy.

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
    /// Which answers to measure: JSON, streamed, or both.
    modes: Vec<bool>,
    /// The mock's latency profile: first token, then between tokens.
    first_token_delay: Duration,
    inter_token_delay: Duration,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        seconds: 1.0,
        rounds: 3,
        concurrency: vec![1, 16, 64],
        modes: vec![false, true],
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
            "--mode" => {
                options.modes = match value("--mode")?.as_str() {
                    "json" => vec![false],
                    "sse" => vec![true],
                    "both" => vec![false, true],
                    other => return Err(format!("--mode: expected json, sse or both, not {other:?}")),
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

/// A multi-threaded runtime on its own OS thread, running `serve` until the process ends.
/// Each party (load generator, lifeboat, mock gateway) gets its own, as it would as separate
/// processes: a timer of one is not delayed because a worker of the same pool is busy with
/// another's work. They still share this machine's cores.
fn spawn_runtime<F, Fut>(name: &'static str, serve: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("server runtime")
            .block_on(serve());
    });
}

/// Start the mock gateway and lifeboat in front of it; returns their addresses.
fn start_servers(settings: MockSettings) -> (SocketAddr, SocketAddr) {
    let (mock_tx, mock_rx) = std::sync::mpsc::channel();
    spawn_runtime("mock", move || async move {
        let mock = MockUpstream::start(settings).await.expect("mock");
        mock_tx
            .send((mock.addr(), mock.gateway_config()))
            .expect("report mock");
        std::future::pending::<()>().await;
    });
    let (mock_addr, config) = mock_rx.recv().expect("mock started");
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_runtime("lifeboat", move || async move {
        let state = AppState::from_config(&config, &HashMap::<String, String>::new()).expect("config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        tx.send(listener.local_addr().expect("addr"))
            .expect("report lifeboat");
        app::run(listener, app::app(state), std::future::pending(), Duration::ZERO)
            .await
            .expect("server");
    });
    (mock_addr, rx.recv().expect("lifeboat started"))
}

struct ArmResult {
    latencies: Histogram<u32>,
    requests: u64,
    elapsed: Duration,
    errors: u64,
    /// CPU time the whole process (client, lifeboat, mock) used during the arm.
    cpu: Duration,
}

/// User + system CPU time of this process so far.
fn process_cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we own.
    #[allow(unsafe_code)]
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
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
    let cpu_before = process_cpu_time();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let url = url.to_string();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = latency_histogram();
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
    let mut latencies = latency_histogram();
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
        cpu: process_cpu_time().saturating_sub(cpu_before),
    }
}

/// Latencies in microseconds up to 60 s with four significant digits: the added latency is
/// the difference of two figures of tens to hundreds of milliseconds, and three digits
/// would round a 500 ms answer to 0.25 ms.
fn latency_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, 60_000_000, 4).expect("histogram")
}

/// CPU spent per arm over all rounds: per request, and as cores kept busy.
#[derive(Default)]
struct ArmCpu {
    cpu: Duration,
    wall: Duration,
    requests: u64,
}

impl ArmCpu {
    fn add(&mut self, arm: &ArmResult) {
        self.cpu += arm.cpu;
        self.wall += arm.elapsed;
        self.requests += arm.requests;
    }

    fn per_request_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64
    }

    fn cores_busy(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
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
        "| mode | conc | direct p50 ms | direct p99 ms | via p50 ms | via p99 ms | added p50 ms | added p99 ms | direct rps | via rps | rps ratio | direct cpu µs/req | via cpu µs/req | cores busy direct/via | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &stream in &options.modes {
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
            let mut direct = latency_histogram();
            let mut proxied = direct.clone();
            let (mut direct_rps, mut proxied_rps) = (0.0, 0.0);
            let (mut direct_cpu, mut proxied_cpu) = (ArmCpu::default(), ArmCpu::default());
            let mut errors = 0;
            for _ in 0..options.rounds {
                let d = drive(&client, &direct_url, &body, concurrency, duration).await;
                let p = drive(&client, &proxied_url, &body, concurrency, duration).await;
                direct.add(&d.latencies).expect("bounds");
                proxied.add(&p.latencies).expect("bounds");
                direct_rps += d.requests as f64 / d.elapsed.as_secs_f64();
                proxied_rps += p.requests as f64 / p.elapsed.as_secs_f64();
                errors += d.errors + p.errors;
                direct_cpu.add(&d);
                proxied_cpu.add(&p);
            }
            direct_rps /= f64::from(options.rounds);
            proxied_rps /= f64::from(options.rounds);
            let (d50, d99) = (direct.value_at_quantile(0.5), direct.value_at_quantile(0.99));
            let (p50, p99) = (proxied.value_at_quantile(0.5), proxied.value_at_quantile(0.99));
            println!(
                "| {} | {concurrency} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {direct_rps:.0} | {proxied_rps:.0} | {:.2} | {:.0} | {:.0} | {:.2}/{:.2} | {errors} |",
                if stream { "sse" } else { "json" },
                ms(d50),
                ms(d99),
                ms(p50),
                ms(p99),
                ms(p50) - ms(d50),
                ms(p99) - ms(d99),
                proxied_rps / direct_rps,
                direct_cpu.per_request_us(),
                proxied_cpu.per_request_us(),
                direct_cpu.cores_busy(),
                proxied_cpu.cores_busy(),
            );
        }
    }
}
