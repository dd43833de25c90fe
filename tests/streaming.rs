//! SSE framing as clients see it: chunks, the usage chunk, keep-alive comments, in-band
//! errors after the first byte, exactly one `[DONE]`, and graceful shutdown of streams.

use crate::common;

use std::{collections::HashMap, time::Duration};

use common::{chat_body, read_sse, spawn_app, spawn_app_with};
use futures_util::StreamExt;
use lifeboat::mock_upstream::{FaultMode, MockSettings, mock_text};
use serde_json::json;

#[tokio::test]
async fn stream_without_usage_strips_the_usage_frame() {
    let app = spawn_app().await;
    let response = app.post_json("/v1/chat/completions", &chat_body(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-lifeboat-backend"], "gateway");
    let sse = read_sse(response).await;
    assert_eq!(sse.done_count(), 1);
    assert_eq!(
        sse.data.last().map(String::as_str),
        Some("[DONE]"),
        "[DONE] is last"
    );
    let chunks = sse.json();
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "no usage key when not asked"
    );
    assert!(
        chunks
            .iter()
            .all(|c| !c["choices"].as_array().expect("choices").is_empty())
    );
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let ids: std::collections::HashSet<&str> = chunks.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids.len(), 1, "one id for the whole stream");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(sse.content(), mock_text(8));
    assert_eq!(
        chunks.last().expect("chunk")["choices"][0]["finish_reason"],
        "length"
    );
    // lifeboat still asked the gateway for usage.
    assert_eq!(
        app.mock.last_request().expect("seen").body["stream_options"]["include_usage"],
        true
    );
}

#[tokio::test]
async fn stream_with_include_usage_ends_with_a_usage_chunk() {
    let app = spawn_app().await;
    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true});
    let sse = read_sse(app.post_json("/v1/chat/completions", &body).await).await;
    assert_eq!(sse.done_count(), 1);
    let chunks = sse.json();
    let (last, rest) = chunks.split_last().expect("chunks");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 8);
    assert_eq!(last["usage"]["prompt_tokens"], 2);
    assert_eq!(last["usage"]["total_tokens"], 10);
    assert!(
        rest.iter().all(|c| c["usage"].is_null()),
        "usage is null on every other chunk"
    );
}

#[tokio::test]
async fn keep_alive_comments_from_the_gateway_do_not_leak_as_content() {
    let settings = MockSettings {
        slow_first_token: Duration::from_millis(400),
        keepalive_interval: Duration::from_millis(50),
        ..MockSettings::default()
    };
    let app = spawn_app_with(settings, |_| {}, HashMap::new()).await;
    app.mock.set_fault(FaultMode::Slow).await.expect("fault");
    let response = app.post_json("/v1/chat/completions", &chat_body(true)).await;
    assert_eq!(response.status(), 200);
    let sse = read_sse(response).await;
    assert!(
        sse.comments.iter().all(|c| !c.contains("keep-alive")),
        "gateway comments leaked: {:?}",
        sse.comments
    );
    assert_eq!(sse.content(), mock_text(8));
    assert_eq!(sse.done_count(), 1);
}

#[tokio::test]
async fn failure_after_the_first_byte_is_an_in_band_error_then_one_done() {
    // With delays between tokens the chunks before the cut reach lifeboat; without them
    // hyper may drop its unflushed buffer on the abort, which is a cut before the commit
    // point (a clean 502, tested in upstream_faults.rs).
    let settings = MockSettings {
        cut_after: 3,
        inter_token_delay: Duration::from_millis(20),
        ..MockSettings::default()
    };
    let app = spawn_app_with(settings, |_| {}, HashMap::new()).await;
    app.mock.set_fault(FaultMode::MidstreamCut).await.expect("fault");
    let response = app.post_json("/v1/chat/completions", &chat_body(true)).await;
    assert_eq!(response.status(), 200, "headers were committed before the cut");
    let sse = read_sse(response).await;
    assert_eq!(sse.done_count(), 1);
    assert_eq!(sse.data.last().map(String::as_str), Some("[DONE]"));
    let chunks = sse.json();
    let error = chunks.last().expect("error frame");
    assert_eq!(error["error"]["code"], "upstream_stream_cut", "{error}");
    assert_eq!(error["error"]["type"], "api_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .expect("message")
            .contains("broke")
    );
    assert_eq!(
        sse.content(),
        mock_text(3),
        "the 3 chunks before the cut were delivered"
    );
}

#[tokio::test]
async fn malformed_frame_before_any_content_is_a_clean_http_error() {
    let app = spawn_app().await;
    app.mock.set_fault(FaultMode::Malformed).await.expect("fault");
    let response = app.post_json("/v1/chat/completions", &chat_body(true)).await;
    assert_eq!(
        response.status(),
        502,
        "nothing was committed, so the status can still say it"
    );
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "upstream_malformed_response");
}

#[tokio::test]
async fn graceful_shutdown_lets_a_running_stream_finish() {
    let settings = MockSettings {
        tokens: 10,
        inter_token_delay: Duration::from_millis(40),
        ..MockSettings::default()
    };
    let mut app = spawn_app_with(settings, |_| {}, HashMap::new()).await;
    let mut body = chat_body(true);
    body["max_tokens"] = json!(10);
    let response = app.post_json("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let first = bytes.next().await.expect("first chunk").expect("bytes");
    app.shutdown();
    let mut text = String::from_utf8_lossy(&first).to_string();
    while let Some(chunk) = bytes.next().await {
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("stream continues during drain"),
        ));
    }
    let sse = common::SseBody::parse(&text);
    assert_eq!(sse.content(), mock_text(10));
    assert_eq!(sse.done_count(), 1);
    let result = tokio::time::timeout(Duration::from_secs(10), &mut app.server).await;
    assert!(
        matches!(result, Ok(Ok(Ok(())))),
        "server exits after the drain: {result:?}"
    );
    assert!(
        reqwest::Client::new()
            .get(app.url("/health"))
            .send()
            .await
            .is_err(),
        "no new connections after shutdown"
    );
}
