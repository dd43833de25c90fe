//! A gateway that misbehaves on purpose — an answer with nothing in it, absurd
//! `Retry-After` values, a line or a body without end, error texts full of internals —
//! costs clients nothing: they are served by the local model, lifeboat's memory stays
//! bounded, its probes keep running, and nothing internal reaches a client or the log.

use crate::{
    cli::{Running, between, lifeboat, write_config},
    common,
    failover::{Failover, ask, failover_app_with, scenario_with},
};

use std::{collections::HashMap, time::Duration};

use common::{chat_body, read_sse, spawn_app_with};
use lifeboat::mock_upstream::{FaultMode, LEAKED_KEY, LEAKED_ORG, LEAKED_URL, MockSettings, MockUpstream};
use serde_json::Value;

#[tokio::test]
async fn a_stream_with_no_output_fails_over_like_a_5xx() {
    scenario_with(FaultMode::EmptyStream, MockSettings::default(), |_| {}).await;
}

#[tokio::test]
async fn an_empty_json_answer_fails_over_like_a_5xx() {
    scenario_with(FaultMode::JsonEmptyObject, MockSettings::default(), |_| {}).await;
}

#[tokio::test]
async fn an_absurd_retry_after_fails_over_instead_of_a_500() {
    scenario_with(FaultMode::HugeRetryAfter, MockSettings::default(), |_| {}).await;
}

#[tokio::test]
async fn a_line_without_end_fails_over_at_the_frame_cap() {
    scenario_with(FaultMode::GiantLine, MockSettings::default(), |_| {}).await;
}

#[tokio::test]
async fn a_body_without_end_fails_over_at_the_body_cap() {
    // A smaller cap than the default 64 MiB: eight clients at once would hold 512 MiB of
    // this test process before their attempts fail (the default is measured below, alone).
    scenario_with(FaultMode::GiantBody, MockSettings::default(), |config| {
        if let Some(gateway) = config.remotes.get_mut("gateway") {
            gateway.max_json_body_bytes = 1024 * 1024;
        }
    })
    .await;
}

/// The probe of a gateway that answers `Retry-After: 1e30` keeps running: once the
/// gateway recovers, the probe alone closes the breaker, with no client request.
#[tokio::test]
async fn the_probe_survives_an_absurd_retry_after_and_closes_the_breaker_after_recovery() {
    let Failover { app, _model } = failover_app_with(MockSettings::default(), |config| {
        config.router.probe_interval = Duration::from_millis(50);
    })
    .await;
    app.mock
        .set_fault(FaultMode::HugeRetryAfter)
        .await
        .expect("fault");
    let breaker = |health: &Value| {
        health["backends"]["gateway"]["breaker"]
            .as_str()
            .map(str::to_string)
    };
    let opened = async {
        loop {
            let health: Value = app.get("/health").await.json().await.expect("json");
            if breaker(&health).as_deref() == Some("open") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), opened)
        .await
        .expect("the probes alone open the breaker");
    assert_eq!(ask(&app, false).await, "local");
    app.mock.set_fault(FaultMode::None).await.expect("recover");
    let calls_before = app.mock.total_requests();
    let closed = async {
        loop {
            let health: Value = app.get("/health").await.json().await.expect("json");
            if breaker(&health).as_deref() == Some("closed") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("a probe closed the breaker after recovery");
    assert!(
        app.mock.total_requests() > calls_before,
        "probes reached the gateway"
    );
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    assert!(
        !metrics.contains("lifeboat_background_task_panics_total{task=\"probe\"}"),
        "no probe panicked"
    );
}

/// A 500 whose text carries a key, an org id and an internal URL reaches the client as
/// a classified message, in JSON and in a stream.
#[tokio::test]
async fn a_gateways_internal_details_never_reach_the_client() {
    let app = spawn_app_with(MockSettings::default(), |_| {}, HashMap::new()).await;
    app.mock.set_fault(FaultMode::LeakyError).await.expect("fault");
    for stream in [false, true] {
        let response = app.post_json("/v1/chat/completions", &chat_body(stream)).await;
        assert_eq!(response.status(), 502);
        let text = response.text().await.expect("body");
        for secret in [LEAKED_KEY, LEAKED_ORG, LEAKED_URL, "10.1.2.3", "mock:"] {
            assert!(!text.contains(secret), "{secret} reached the client: {text}");
        }
        let body: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(body["error"]["code"], "upstream_error");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(
            message.starts_with("The upstream gateway `gateway` failed with a server error (HTTP 500)"),
            "{message}"
        );
    }
}

/// After the commit point a cap ends the stream with an in-band error and one `[DONE]`.
#[tokio::test]
async fn an_answer_without_end_is_cut_at_the_answer_cap_with_an_in_band_error() {
    let app = spawn_app_with(
        MockSettings::default(),
        |config| {
            if let Some(gateway) = config.remotes.get_mut("gateway") {
                gateway.max_answer_bytes = 256 * 1024;
            }
        },
        HashMap::new(),
    )
    .await;
    app.mock.set_fault(FaultMode::EndlessStream).await.expect("fault");
    let response = app.post_json("/v1/chat/completions", &chat_body(true)).await;
    assert_eq!(response.status(), 200);
    let sse = read_sse(response).await;
    assert_eq!(sse.done_count(), 1);
    let chunks = sse.json();
    let last = chunks.last().expect("frames");
    assert_eq!(last["error"]["code"], "upstream_malformed_response", "{last}");
    assert!(!sse.content().is_empty(), "the answer started before the cap");
}

/// Peak memory of a real `lifeboat serve` process (no local model, default caps) while
/// the gateway sends a 2 GiB line, a 2 GiB JSON body and an endless stream: each attempt
/// fails at its cap with a clean 502, and the process never holds more than a fraction of
/// what the gateway sent. Its log names the failures but no credential.
#[test]
fn memory_stays_bounded_and_logs_stay_clean_against_a_hostile_gateway() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    lifeboat::upstream::install_crypto_provider();
    let mock = runtime
        .block_on(MockUpstream::start(MockSettings::default()))
        .expect("mock");
    // Credentials in the base URL are used by reqwest and must never be logged.
    let base_url = format!("http://admin:hunter2@{}/v1", mock.addr());
    let file = write_config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[router]\nprobe_interval = \"0s\"\nfailure_threshold = 1000\nerror_rate_min_requests = 1000\n\
         [remotes.gateway]\nbase_url = \"{base_url}\"\nmodels = [\"deepseek-chat\"]\n"
    ));
    let mut command = lifeboat();
    command
        .args([
            "serve",
            "--config",
            &file.path().display().to_string(),
            "--model",
            "none",
        ])
        .env("LIFEBOAT_LOG", "debug");
    let mut server = Running::spawn(command);
    let line = server.wait_for("OpenAI base URL");
    let base = between(&line, "OpenAI base URL ", ' ').trim().to_string();
    let pid = server.child.id();
    let peak = || peak_rss_mib(pid);
    let start_peak = peak();

    let cases = [
        (FaultMode::GiantLine, true),
        (FaultMode::GiantLine, false),
        (FaultMode::GiantBody, false),
        (FaultMode::EndlessStream, false),
        (FaultMode::LeakyError, false),
    ];
    let mut peaks = Vec::new();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        for (mode, stream) in cases {
            mock.set_fault(mode).await.expect("fault");
            let started = std::time::Instant::now();
            let response = client
                .post(format!("{base}/chat/completions"))
                .json(&chat_body(stream))
                .send()
                .await
                .expect("sent");
            let status = response.status();
            let text = response.text().await.expect("body");
            let elapsed = started.elapsed();
            if stream {
                assert!(text.contains("upstream_malformed_response"), "{mode}: {text}");
            } else if mode == FaultMode::LeakyError {
                assert_eq!(status, 502, "{mode}: {text}");
            } else {
                assert_eq!(status, 502, "{mode}: {text}");
                assert!(text.contains("upstream_malformed_response"), "{mode}: {text}");
            }
            peaks.push((mode, stream, peak(), elapsed));
        }
    });
    eprintln!("peak RSS at start: {start_peak} MiB");
    for (mode, stream, mib, elapsed) in &peaks {
        eprintln!("after {mode} (stream {stream}): peak RSS {mib} MiB, answered in {elapsed:?}");
    }
    let worst = peaks.iter().map(|p| p.2).max().unwrap_or(0);
    // The caps are 1 MiB per event, 64 MiB per JSON body, 128 MiB per streamed answer;
    // what a stream held before was the gateway's whole output until the deadline.
    assert!(
        worst < start_peak + 200,
        "peak RSS grew from {start_peak} MiB to {worst} MiB"
    );
    assert_eq!(server.terminate(), 0);
    let log = server.log.join("\n");
    for secret in ["hunter2", LEAKED_KEY, LEAKED_ORG] {
        assert!(!log.contains(secret), "{secret} reached the log:\n{log}");
    }
}

/// `VmHWM` (peak resident set) of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}
