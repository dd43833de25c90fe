//! `lifeboat bench` against the mock upstream on real sockets: the figures match the
//! mock's known delays and token counts, every fault mode is counted under the right
//! kind, an interrupted run still reports, and bad arguments exit with a clear message.

use crate::common;

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use indicatif::ProgressBar;
use lifeboat::{
    bench::{
        self, BenchPlan, BenchReport, RunContext,
        client::FailureKind,
        cost::Workload,
        machine::Machine,
        prompts::BuiltinPrompts,
        stats::PhaseResult,
        target::{HOURS_PER_MONTH, TargetSpec},
    },
    mock_upstream::{FaultMode, MockSettings, MockUpstream},
};

const FIRST_TOKEN: Duration = Duration::from_millis(50);
const INTER_TOKEN: Duration = Duration::from_millis(10);
const TOKENS: u32 = 20;
/// Room for scheduling on a loaded 2-core machine: added to upper bounds only.
const SLACK_MS: f64 = 40.0;

fn fixed_mock() -> MockSettings {
    MockSettings {
        first_token_delay: FIRST_TOKEN,
        inter_token_delay: INTER_TOKEN,
        tokens: TOKENS,
        ..MockSettings::default()
    }
}

fn target(spec: &str) -> TargetSpec {
    TargetSpec::parse(spec, |_| Some("sk-bench".to_string())).expect("valid target")
}

fn plan(
    targets: Vec<TargetSpec>,
    stability: usize,
    concurrency: Vec<usize>,
    load_requests: usize,
) -> BenchPlan {
    BenchPlan {
        targets,
        prompts: BuiltinPrompts::Short.prompts(),
        prompt_source: "builtin:short".into(),
        max_tokens: 64,
        stability_requests: stability,
        concurrency,
        load_requests,
        load_duration: Duration::from_secs(30),
        timeout: Duration::from_secs(10),
        warmup: 0,
        workload: Workload {
            input_mtok_per_month: 100.0,
            output_mtok_per_month: 50.0,
        },
    }
}

fn context() -> RunContext {
    RunContext {
        command_line: vec!["test".into()],
        machine: Machine::detect(),
        model_files: Vec::new(),
    }
}

async fn run(plan: &BenchPlan) -> BenchReport {
    bench::run(plan, context(), ProgressBar::hidden(), std::future::pending())
        .await
        .expect("bench runs")
}

/// Prompt tokens as the mock counts them (whitespace words) for `n` requests in order.
fn prompt_words(n: usize) -> u64 {
    let prompts = BuiltinPrompts::Short.prompts();
    (0..n)
        .map(|i| {
            let text = prompts[i % prompts.len()].messages[0]["content"]
                .as_str()
                .unwrap_or_default();
            text.split_whitespace().count() as u64
        })
        .sum()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_match_the_mocks_fixed_delays() {
    let mock = MockUpstream::start(fixed_mock()).await.expect("mock");
    let url = mock.url();
    let remote = target(&format!(
        "name=gw,kind=remote,url={url},model=deepseek-chat,key_env=K,price_in=1.0,price_out=2.0"
    ));
    let local = target(&format!(
        "name=box,kind=local,url={url},model=deepseek-chat,gpu_usd_per_hour=3.6"
    ));
    let report = run(&plan(vec![remote, local], 5, vec![1, 4], 8)).await;
    assert!(report.complete);

    let first = ms(FIRST_TOKEN);
    let gap = ms(INTER_TOKEN);
    // The last token is sent after the first delay and 19 gaps.
    let e2e = first + f64::from(TOKENS - 1) * gap;
    for t in &report.targets {
        let s = t.stability.as_ref().expect("stability ran");
        assert_eq!(
            (s.requests, s.successes, s.success_rate),
            (5, 5, 1.0),
            "{}",
            t.name
        );
        assert_eq!(s.failures.total(), 0);
        assert_eq!(s.completion_tokens, 5 * u64::from(TOKENS));
        assert_eq!(s.prompt_tokens, prompt_words(5));
        // Percentiles: the histogram reports the top of a value's bucket, so lower bounds
        // are exact; upper bounds allow scheduling.
        assert_eq!(s.ttft.count, 5);
        assert!(
            s.ttft.min_ms >= first && s.ttft.p99_ms <= first + SLACK_MS,
            "{:?}",
            s.ttft
        );
        assert_eq!(s.inter_token.count, 5 * u64::from(TOKENS - 1));
        assert!(
            s.inter_token.p50_ms >= gap * 0.9 && s.inter_token.p50_ms <= gap + SLACK_MS / 4.0,
            "{:?}",
            s.inter_token
        );
        assert!(
            s.end_to_end.min_ms >= e2e && s.end_to_end.p99_ms <= e2e + SLACK_MS,
            "{:?}",
            s.end_to_end
        );
        assert!(
            s.latency_ms.min >= e2e && s.latency_ms.max <= e2e + SLACK_MS,
            "{:?}",
            s.latency_ms
        );
        assert!(s.latency_ms.mean >= s.latency_ms.min && s.latency_ms.mean <= s.latency_ms.max);
        // 19 tokens after the first, at one per 10 ms: at most 100 tokens/s per stream.
        let rate = s.stream_tokens_per_sec;
        assert!(
            rate.max <= 1000.0 / gap * 1.05 && rate.min >= 19.0 / ((e2e - first + SLACK_MS) / 1000.0),
            "{rate:?}"
        );
        // Raw histograms hold every sample.
        let total = |h: &lifeboat::bench::stats::RawHistogram| h.values.iter().map(|v| v[1]).sum::<u64>();
        assert_eq!(total(&s.histograms.ttft), 5);
        assert_eq!(total(&s.histograms.inter_token), 95);

        assert_eq!(t.load.len(), 2);
        for level in &t.load {
            assert_eq!((level.requests, level.successes), (8, 8));
            check_rates(level, e2e);
        }
    }

    // Cost: remote from the price table, exact.
    let gw = &report.targets[0];
    let rc = gw.remote_cost.as_ref().expect("priced");
    assert!((rc.workload_monthly_usd - (100.0 * 1.0 + 50.0 * 2.0)).abs() < 1e-9);
    assert!((rc.workload_usd_per_output_mtok - (2.0 + 2.0 * 1.0)).abs() < 1e-9);
    let (input, output) = gw
        .stability
        .iter()
        .chain(&gw.load)
        .fold((0, 0), |(i, o), p| (i + p.prompt_tokens, o + p.completion_tokens));
    let mix = (input as f64 * 1.0 + output as f64 * 2.0) / (input + output) as f64;
    assert!((rc.measured_mix_usd_per_mtok.expect("tokens") - mix).abs() < 1e-12);

    // Local: GPU $/hour over measured tokens/hour at each level.
    let boxed = &report.targets[1];
    let lc = boxed.local_cost.as_ref().expect("priced");
    assert_eq!(lc.gpu_usd_per_hour, 3.6);
    for (level, phase) in lc.by_concurrency.iter().zip(&boxed.load) {
        let expected = 3.6 / (phase.output_tokens_per_sec * 3600.0) * 1e6;
        assert!((level.usd_per_output_mtok.expect("tokens") - expected).abs() < 1e-9);
    }
    // At concurrency 4, 8 requests take at least two rounds of one answer each.
    let four = &boxed.load[1];
    assert!(four.output_tokens_per_sec <= 160.0 / (2.0 * e2e / 1000.0));
    let best = boxed
        .load
        .iter()
        .map(|p| p.output_tokens_per_sec)
        .fold(0.0, f64::max);
    assert_eq!(lc.best_output_tokens_per_sec, best);
    let capacity = best * 3600.0 * HOURS_PER_MONTH / 1e6;
    assert!((lc.capacity_output_mtok_per_month - capacity).abs() < 1e-9);

    // Break-even: the GPU's month over the remote's price per output MTok.
    assert_eq!(report.break_even.len(), 1);
    let even = &report.break_even[0];
    assert!((even.output_mtok_per_month - 3.6 * HOURS_PER_MONTH / 4.0).abs() < 1e-9);
    assert!((even.input_mtok_per_month - 2.0 * even.output_mtok_per_month).abs() < 1e-9);
    assert!((even.utilisation.expect("capacity") - even.output_mtok_per_month / capacity).abs() < 1e-12);

    // Everything is written: JSON with histograms, Markdown tables, three charts.
    let dir = tempfile::tempdir().expect("tempdir");
    let written = bench::report::write_all(&report, dir.path()).expect("writes");
    assert_eq!(written.len(), 5);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("bench.json")).expect("json")).expect("parses");
    assert_eq!(
        json["targets"][0]["stability"]["histograms"]["ttft"]["unit"],
        "microseconds"
    );
    let md = std::fs::read_to_string(dir.path().join("report.md")).expect("md");
    for heading in ["## Stability", "## Streaming", "## Load", "## Cost", "Break-even"] {
        assert!(md.contains(heading), "{heading} missing:\n{md}");
    }
    for chart in ["latency.svg", "throughput.svg", "cost.svg"] {
        let svg = std::fs::read_to_string(dir.path().join(chart)).expect("svg");
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{chart}");
    }
}

/// Rates are successes and tokens over the level's wall time, which is at least the
/// requests' critical path.
fn check_rates(level: &PhaseResult, e2e_ms: f64) {
    let rounds = (level.requests as f64 / level.concurrency as f64).ceil();
    assert!(level.wall_seconds * 1000.0 >= rounds * e2e_ms, "{level:?}");
    assert!((level.requests_per_sec - level.successes as f64 / level.wall_seconds).abs() < 1e-9);
    assert!((level.output_tokens_per_sec - level.completion_tokens as f64 / level.wall_seconds).abs() < 1e-9);
    assert!(level.requests_per_sec <= level.concurrency as f64 / (e2e_ms / 1000.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_mode_is_counted_under_its_kind() {
    let cases = [
        (FaultMode::Http500, FailureKind::ServerError),
        (FaultMode::Http503, FailureKind::ServerError),
        (FaultMode::Http429, FailureKind::RateLimited),
        (FaultMode::Http402, FailureKind::ClientError),
        (FaultMode::Http401, FailureKind::ClientError),
        (FaultMode::Refuse, FailureKind::Connection),
        (FaultMode::Hang, FailureKind::Timeout),
        (FaultMode::Keepalive, FailureKind::Timeout),
        (FaultMode::Slow, FailureKind::Timeout),
        (FaultMode::MidstreamCut, FailureKind::BrokenStream),
        (FaultMode::Malformed, FailureKind::BrokenStream),
    ];
    for (mode, kind) in cases {
        let mock = MockUpstream::start(fixed_mock()).await.expect("mock");
        mock.set_fault(mode).await.expect("fault");
        let mut plan = plan(
            vec![target(&format!(
                "name=gw,url={},model=deepseek-chat,key_env=K",
                mock.url()
            ))],
            3,
            vec![2],
            4,
        );
        // Shorter than `slow`'s 2 s first token; long enough for the other modes' answers.
        plan.timeout = Duration::from_millis(700);
        let report = run(&plan).await;
        let t = &report.targets[0];
        for phase in t.stability.iter().chain(&t.load) {
            assert_eq!(phase.successes, 0, "{mode}: {:?}", phase.failures);
            assert_eq!(phase.success_rate, 0.0, "{mode}");
            assert_eq!(
                phase.failures.get(kind),
                phase.requests,
                "{mode}: {:?}",
                phase.failures
            );
            assert_eq!(phase.failures.total(), phase.requests, "{mode}");
        }
        assert_eq!(t.stability.as_ref().map(|p| p.requests), Some(3), "{mode}");
        assert_eq!(t.load[0].requests, 4, "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_outage_gives_the_partial_success_rate() {
    let mock = MockUpstream::start(MockSettings::default()).await.expect("mock");
    mock.set_fault_for(FaultMode::Http429, Some(2))
        .await
        .expect("fault");
    let plan = plan(
        vec![target(&format!(
            "name=gw,url={},model=deepseek-chat,key_env=K",
            mock.url()
        ))],
        5,
        Vec::new(),
        0,
    );
    let report = run(&plan).await;
    let s = report.targets[0].stability.as_ref().expect("ran");
    assert_eq!((s.requests, s.successes), (5, 3));
    assert!((s.success_rate - 0.6).abs() < 1e-12);
    assert_eq!(s.failures.get(FailureKind::RateLimited), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifeboat_itself_is_a_target() {
    let app = common::spawn_app_with(fixed_mock(), |_| {}, HashMap::new()).await;
    let plan = plan(
        vec![target(&format!(
            "name=lifeboat,kind=lifeboat,url=http://{}/v1,model=deepseek-chat",
            app.addr
        ))],
        3,
        Vec::new(),
        0,
    );
    let report = run(&plan).await;
    let s = report.targets[0].stability.as_ref().expect("ran");
    assert_eq!(s.successes, 3);
    assert_eq!(s.completion_tokens, 3 * u64::from(TOKENS));
    assert!(s.ttft.min_ms >= ms(FIRST_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_reports_what_it_measured() {
    let mock = MockUpstream::start(fixed_mock()).await.expect("mock");
    let plan = plan(
        vec![target(&format!(
            "name=gw,url={},model=deepseek-chat,key_env=K",
            mock.url()
        ))],
        1000,
        vec![4],
        100,
    );
    let interrupt = tokio::time::sleep(Duration::from_millis(1200));
    let report = bench::run(&plan, context(), ProgressBar::hidden(), interrupt)
        .await
        .expect("runs");
    assert!(!report.complete);
    let s = report.targets[0]
        .stability
        .as_ref()
        .expect("the running phase is kept");
    assert!(s.successes >= 2 && s.requests < 1000, "{s:?}");
    assert!(report.targets[0].load.is_empty());
    let md = bench::report::markdown(&report);
    assert!(md.contains("Partial report"));
}

// === the binary ===

/// A child process killed when the test ends, even on a failed assertion.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run `lifeboat bench ARGS` to completion (at most 60 s); returns (exit code, stdout, stderr).
fn bench_binary(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lifeboat"));
    command
        .arg("bench")
        .args(args)
        .envs(env.iter().copied())
        .env_remove("LIFEBOAT_BENCH_UNSET_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = KillOnDrop(command.spawn().expect("binary starts"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "bench {args:?} did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |pipe: Option<&mut dyn std::io::Read>| {
        let mut text = String::new();
        if let Some(pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    };
    let stdout = read(child.0.stdout.as_mut().map(|p| p as &mut dyn std::io::Read));
    let stderr = read(child.0.stderr.as_mut().map(|p| p as &mut dyn std::io::Read));
    (status.code().unwrap_or(-1), stdout, stderr)
}

#[test]
fn bad_arguments_exit_2_with_a_clear_message() {
    let local = "name=l,kind=local,url=http://127.0.0.1:9/v1,model=m";
    let cases: [(Vec<&str>, &str); 7] = [
        (
            vec!["--target", "kind=cloud,url=http://127.0.0.1:9/v1,model=m"],
            "unknown target kind \"cloud\"; expected remote, lifeboat or local",
        ),
        (
            vec!["--target", local, "--prompt-file", "/nonexistent/prompts.jsonl"],
            "prompt file /nonexistent/prompts.jsonl",
        ),
        (
            vec!["--target", local, "--concurrency", "1,0,8"],
            "--concurrency: 0 is not a concurrency level",
        ),
        (
            vec![
                "--target",
                "url=http://127.0.0.1:9/v1,model=m,key_env=LIFEBOAT_BENCH_UNSET_KEY",
            ],
            "environment variable LIFEBOAT_BENCH_UNSET_KEY is not set",
        ),
        (
            vec!["--target", "url=http://127.0.0.1:9/v1,model=m"],
            "a remote target needs key_env",
        ),
        (
            vec![
                "--target",
                "name=l,kind=local,url=http://127.0.0.1:9/v1,model=m,model_file=/nonexistent.gguf",
            ],
            "model file /nonexistent.gguf",
        ),
        (
            vec![
                "--target",
                "kind=local,url=http://127.0.0.1:9/v1,model=m",
                "--max-tokens",
                "0",
            ],
            "--max-tokens must be at least 1",
        ),
    ];
    for (args, expected) in cases {
        let (code, _, stderr) = bench_binary(&args, &[]);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // No target at all is clap's own usage error (also exit 2).
    let (code, _, stderr) = bench_binary(&[], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--target"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_writes_every_file() {
    let mock = MockUpstream::start(fixed_mock()).await.expect("mock");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let target = format!(
        "name=gw,url={},model=deepseek-chat,key_env=BENCH_TEST_KEY",
        mock.url()
    );
    let out_arg = out.display().to_string();
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        bench_binary(
            &[
                "--target",
                &target,
                "--requests",
                "3",
                "--concurrency",
                "1,2",
                "--load-requests",
                "4",
                "--out",
                &out_arg,
            ],
            &[("BENCH_TEST_KEY", "sk-test")],
        )
    })
    .await
    .expect("joins");
    assert_eq!(code, 0, "{stderr}");
    for file in [
        "bench.json",
        "report.md",
        "latency.svg",
        "throughput.svg",
        "cost.svg",
    ] {
        assert!(stdout.contains(file), "{stdout}");
        assert!(out.join(file).exists(), "{file}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).expect("md");
    assert!(md.contains("| gw | 3 | 100.0 % |"), "{md}");
    // The key itself never reaches the report, only the variable's name.
    let json = std::fs::read_to_string(out.join("bench.json")).expect("json");
    assert!(!json.contains("sk-test") && json.contains("BENCH_TEST_KEY"));
}

#[test]
fn a_local_model_file_is_served_in_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny");
    lifeboat::engine::testing::tiny::make_tiny(lifeboat::engine::Arch::Qwen2, &model, 1).expect("tiny model");
    let out = dir.path().join("run");
    let target = format!(
        "name=box,kind=local,model=tiny,model_file={},gpu_usd_per_hour=1",
        model.display()
    );
    let out_arg = out.display().to_string();
    let (code, _, stderr) = bench_binary(
        &[
            "--target",
            &target,
            "--requests",
            "2",
            "--concurrency",
            "2",
            "--load-requests",
            "2",
            "--max-tokens",
            "4",
            "--out",
            &out_arg,
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("in-process as tiny"), "{stderr}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("bench.json")).expect("json")).expect("parses");
    let t = &json["targets"][0];
    assert_eq!(t["in_process"], true);
    assert!(
        t["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("http://127.0.0.1:")),
        "{t}"
    );
    assert_eq!(t["stability"]["successes"], 2, "{t}");
    assert_eq!(t["load"][0]["successes"], 2, "{t}");
    assert!(
        t["model_file"]["sha256"].as_str().is_some_and(|h| h.len() == 64),
        "{t}"
    );
    let md = std::fs::read_to_string(out.join("report.md")).expect("md");
    assert!(md.contains("(served in-process)"), "{md}");

    // A broken model file is named, not hung on.
    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, b"GGUF").expect("write");
    let target = format!("kind=local,model=m,model_file={}", broken.display());
    let (code, _, stderr) = bench_binary(&["--target", &target, "--requests", "1", "--no-load"], &[]);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("broken.gguf"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bench_engine_measures_a_tiny_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    lifeboat::engine::testing::tiny::make_tiny(lifeboat::engine::Arch::Qwen2, dir.path(), 1)
        .expect("tiny model");
    let model = dir.path().display().to_string();
    let (code, stdout, stderr) = bench_binary(
        &[
            "engine",
            "--model",
            &model,
            "--prompt-tokens",
            "40",
            "--decode-tokens",
            "8",
            "--concurrency",
            "1,2",
            "--stream-prompt-tokens",
            "8",
            "--stream-tokens",
            "4",
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    let prompt = report["prefill_prompt_tokens"].as_u64().expect("prompt tokens");
    // 40 tokens of text, plus the BOS the completions endpoint adds.
    assert!((39..=41).contains(&prompt), "{report}");
    let decoded = report["decode_tokens"].as_u64().expect("decode tokens");
    assert!((1..=8).contains(&decoded), "{report}");
    assert!(report["ready_seconds"].as_f64().expect("ready") > 0.0);
    assert!(report["peak_rss_bytes"].as_u64().expect("rss") > 0);
    let streams = report["streams"].as_array().expect("streams");
    let levels: Vec<u64> = streams.iter().filter_map(|s| s["concurrency"].as_u64()).collect();
    assert_eq!(levels, [1, 2]);
    assert!(
        streams
            .iter()
            .all(|s| s["aggregate_tokens_per_second"].as_f64() > Some(0.0)),
        "{report}"
    );

    // Bad arguments: exit 2 and the flag named.
    for (args, expected) in [
        (
            vec!["engine", "--model", "/nonexistent/model.gguf"],
            "no such file",
        ),
        (
            vec!["engine", "--model", &model, "--concurrency", "0"],
            "--concurrency",
        ),
        (
            vec!["engine", "--model", &model, "--decode-tokens", "1"],
            "--decode-tokens",
        ),
        (vec!["engine"], "--model"),
    ] {
        let (code, _, stderr) = bench_binary(&args, &[]);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
