//! The retry loop in front of one gateway (no local fallback): transient failures are
//! retried invisibly, `Retry-After` is honoured up to its cap, the retry budget holds, and
//! an answer after lifeboat's own retries tells SDKs not to retry again.

use crate::common;

use std::{collections::HashMap, time::Duration};

use common::{chat_body, spawn_app_with};
use lifeboat::{
    config::Config,
    mock_upstream::{FaultMode, MockSettings},
};
use serde_json::Value;

fn settings(retry_after: Duration) -> MockSettings {
    MockSettings {
        retry_after,
        ..MockSettings::default()
    }
}

fn fast_backoff(config: &mut Config) {
    config.router.backoff_min = Duration::from_millis(10);
    config.router.backoff_max = Duration::from_millis(20);
    config.router.failure_threshold = 100;
    config.router.error_rate_threshold = 2.0;
}

#[tokio::test]
async fn a_transient_500_is_retried_invisibly() {
    let app = spawn_app_with(settings(Duration::from_secs(1)), fast_backoff, HashMap::new()).await;
    app.mock
        .set_fault_for(FaultMode::Http500, Some(1))
        .await
        .expect("fault");
    let response = app.post_json("/v1/chat/completions", &chat_body(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-lifeboat-backend"], "gateway");
    assert_eq!(response.headers()["x-lifeboat-attempts"], "2");
    assert_eq!(app.mock.requests_in(FaultMode::Http500), 1);
    assert_eq!(app.mock.requests_in(FaultMode::None), 1);
    let metrics = app.get("/metrics").await.text().await.expect("text");
    assert!(
        metrics.contains(r#"lifeboat_retries_total{backend="gateway",reason="server_error"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn retry_after_within_the_cap_is_waited_for() {
    let app = spawn_app_with(settings(Duration::from_secs(1)), fast_backoff, HashMap::new()).await;
    app.mock
        .set_fault_for(FaultMode::Http429, Some(1))
        .await
        .expect("fault");
    let started = std::time::Instant::now();
    let response = app.post_json("/v1/chat/completions", &chat_body(false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-lifeboat-attempts"], "2");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
}

#[tokio::test]
async fn retry_after_beyond_the_cap_is_not_waited_for() {
    let app = spawn_app_with(settings(Duration::from_secs(3)), fast_backoff, HashMap::new()).await;
    app.mock.set_fault(FaultMode::Http429).await.expect("fault");
    let response = app.post_json("/v1/chat/completions", &chat_body(false)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "3", "passed on to the client");
    assert_eq!(response.headers()["x-lifeboat-attempts"], "1");
    assert_eq!(app.mock.requests_in(FaultMode::Http429), 1);
}

#[tokio::test]
async fn after_lifeboat_retried_the_client_is_told_not_to() {
    let app = spawn_app_with(settings(Duration::from_secs(1)), fast_backoff, HashMap::new()).await;
    app.mock.set_fault(FaultMode::Http503).await.expect("fault");
    let response = app.post_json("/v1/chat/completions", &chat_body(false)).await;
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["x-should-retry"], "false");
    assert_eq!(response.headers()["x-lifeboat-attempts"], "2");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "upstream_error");
}

#[tokio::test]
async fn an_empty_retry_budget_means_no_retries() {
    let app = spawn_app_with(
        settings(Duration::from_secs(1)),
        |config| {
            fast_backoff(config);
            config.router.retry_budget_ratio = 0.0;
            config.router.retry_budget_floor = 0;
        },
        HashMap::new(),
    )
    .await;
    app.mock.set_fault(FaultMode::Http500).await.expect("fault");
    for _ in 0..5 {
        let response = app.post_json("/v1/chat/completions", &chat_body(false)).await;
        assert_eq!(response.status(), 502);
        assert_eq!(response.headers()["x-lifeboat-attempts"], "1");
        assert!(response.headers().get("x-should-retry").is_none());
    }
    assert_eq!(
        app.mock.requests_in(FaultMode::Http500),
        5,
        "one call per request: no storm"
    );
}
