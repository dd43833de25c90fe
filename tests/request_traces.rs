//! One request, one trace: the request id lifeboat makes before dispatch is the response's
//! `id`; a client's `x-request-id` is echoed on every generation response (else lifeboat's
//! id is) and forwarded to the gateway; a hostile one is ignored. With
//! `LIFEBOAT_LOG_FORMAT=json`, the real binary's log ties a failed-over request together:
//! the API's line, the gateway attempts and their failures, the failover decision, the local
//! attempt and the engine thread's lines all carry the same request id.

use std::{collections::HashMap, time::Duration};

use lifeboat::{
    engine::{Arch, testing::tiny::make_tiny},
    mock_upstream::{FaultMode, MockSettings, MockUpstream},
    request_id::MAX_CLIENT_REQUEST_ID_BYTES,
};
use reqwest::header::HeaderValue;
use serde_json::{Value, json};

use crate::{
    cli::{Running, lifeboat, write_config},
    common::{self, chat_body, spawn_app, spawn_app_with},
};

fn echoed(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-request-id")
        .unwrap_or_else(|| panic!("no x-request-id on a {} response", response.status()))
        .to_str()
        .expect("ascii")
        .to_string()
}

async fn post_with_id(
    app: &common::TestApp,
    path: &str,
    body: &Value,
    id: Option<HeaderValue>,
) -> reqwest::Response {
    let mut request = app.client.post(app.url(path)).json(body);
    if let Some(id) = id {
        request = request.header("x-request-id", id);
    }
    request.send().await.expect("request sent")
}

#[tokio::test]
async fn a_clients_request_id_is_echoed_and_forwarded_to_the_gateway() {
    let app = spawn_app().await;
    let id = HeaderValue::from_static("trace-me-123");
    let response = post_with_id(&app, "/v1/chat/completions", &chat_body(false), Some(id.clone())).await;
    assert_eq!(response.status(), 200);
    assert_eq!(echoed(&response), "trace-me-123");
    let body: Value = response.json().await.expect("json");
    let own = body["id"].as_str().expect("id");
    assert!(
        own.starts_with("chatcmpl-"),
        "lifeboat's id stays the response's id: {body}"
    );
    let seen = app.mock.last_request().expect("the gateway was called");
    assert_eq!(seen.request_id.as_deref(), Some("trace-me-123"));

    let response = post_with_id(&app, "/v1/chat/completions", &chat_body(true), Some(id)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(echoed(&response), "trace-me-123", "SSE responses echo it too");
    let sse = common::read_sse(response).await;
    assert!(sse.json().iter().all(|chunk| chunk["id"] != "trace-me-123"));
}

#[tokio::test]
async fn without_a_client_id_lifeboats_own_is_echoed_forwarded_and_the_responses_id() {
    let app = spawn_app().await;
    let response = post_with_id(&app, "/v1/chat/completions", &chat_body(false), None).await;
    assert_eq!(response.status(), 200);
    let echo = echoed(&response);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["id"], echo.as_str(), "{body}");
    let seen = app.mock.last_request().expect("the gateway was called");
    assert_eq!(seen.request_id.as_deref(), Some(echo.as_str()));

    let response = post_with_id(&app, "/v1/chat/completions", &chat_body(true), None).await;
    let echo = echoed(&response);
    let chunks = common::read_sse(response).await.json();
    assert!(!chunks.is_empty());
    assert!(
        chunks.iter().all(|chunk| chunk["id"] == echo.as_str()),
        "{chunks:?}"
    );

    let legacy = json!({"model": "deepseek-chat", "prompt": "Say", "max_tokens": 4});
    let response = post_with_id(&app, "/v1/completions", &legacy, None).await;
    assert_eq!(response.status(), 200);
    let echo = echoed(&response);
    assert!(echo.starts_with("cmpl-"), "{echo}");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["id"], echo.as_str());
}

#[tokio::test]
async fn error_responses_echo_the_request_id() {
    let mut env = HashMap::new();
    env.insert("CLIENT_KEY".to_string(), "key-a".to_string());
    let app = spawn_app_with(
        MockSettings::default(),
        |config| config.server.client_api_key_envs = vec!["CLIENT_KEY".into()],
        env,
    )
    .await;
    let id = || Some(HeaderValue::from_static("err-42"));
    // Refused before the handler runs: no key.
    let response = post_with_id(&app, "/v1/chat/completions", &chat_body(false), id()).await;
    assert_eq!(response.status(), 401);
    assert_eq!(echoed(&response), "err-42");

    let authed = |body: &Value, path: &str| {
        app.client
            .post(app.url(path))
            .bearer_auth("key-a")
            .header("x-request-id", "err-42")
            .json(body)
    };
    let unknown_model = json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]});
    let invalid = json!({"model": "deepseek-chat", "messages": "not a list"});
    for (body, path, status) in [
        (&unknown_model, "/v1/chat/completions", 404),
        (&invalid, "/v1/chat/completions", 400),
        (&invalid, "/v1/completions", 400),
    ] {
        let response = authed(body, path).send().await.expect("sent");
        assert_eq!(response.status(), status, "{body}");
        assert_eq!(echoed(&response), "err-42");
    }

    // The gateway fails for good: the 502 echoes it, and every call upstream carried it.
    app.mock.set_fault(FaultMode::Http500).await.expect("fault");
    let response = authed(&chat_body(false), "/v1/chat/completions")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 502);
    assert_eq!(echoed(&response), "err-42");
    assert_eq!(
        app.mock.last_request().and_then(|r| r.request_id).as_deref(),
        Some("err-42")
    );
}

#[tokio::test]
async fn a_hostile_request_id_is_ignored_never_echoed_or_forwarded() {
    let app = spawn_app().await;
    let hostile = [
        HeaderValue::from_str(&"x".repeat(MAX_CLIENT_REQUEST_ID_BYTES + 1)).expect("long"),
        HeaderValue::from_str(&"y".repeat(8 * 1024)).expect("very long"),
        HeaderValue::from_bytes(b"two\tcolumns").expect("tab"),
        HeaderValue::from_bytes(b"caf\xc3\xa9-\xff").expect("past ascii"),
    ];
    for id in hostile {
        let response = post_with_id(&app, "/v1/chat/completions", &chat_body(false), Some(id.clone())).await;
        assert_eq!(response.status(), 200, "{id:?}");
        let echo = echoed(&response);
        assert_ne!(echo.as_bytes(), id.as_bytes());
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["id"], echo.as_str(), "lifeboat's own id instead of {id:?}");
        let seen = app.mock.last_request().and_then(|r| r.request_id);
        assert_eq!(seen.as_deref(), Some(echo.as_str()), "{id:?}");
    }
    let longest = "z".repeat(MAX_CLIENT_REQUEST_ID_BYTES);
    let id = HeaderValue::from_str(&longest).expect("longest");
    let response = post_with_id(&app, "/v1/chat/completions", &chat_body(false), Some(id)).await;
    assert_eq!(echoed(&response), longest, "the longest usable id is kept");
}

#[test]
fn an_unknown_log_format_is_refused_at_startup() {
    let output = lifeboat()
        .args(["serve", "--model", "none"])
        .env("LIFEBOAT_LISTEN", "127.0.0.1:0")
        .env("LIFEBOAT_LOG_FORMAT", "xml")
        .output()
        .expect("binary runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("LIFEBOAT_LOG_FORMAT")
            && stderr.contains("xml")
            && stderr.contains("`text` or `json`"),
        "{stderr}"
    );
}

/// The JSON log lines of one process.
struct JsonLog(Vec<Value>);

impl JsonLog {
    fn parse(lines: &[String]) -> JsonLog {
        let parsed: Vec<Value> = lines
            .iter()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
            })
            .collect();
        JsonLog(parsed)
    }

    /// Lines inside the request `id`: a span of theirs, or the line itself, carries it.
    fn of_request(&self, id: &str) -> Vec<&Value> {
        self.0
            .iter()
            .filter(|line| {
                line["fields"]["request_id"] == id
                    || line["spans"]
                        .as_array()
                        .is_some_and(|spans| spans.iter().any(|span| span["request_id"] == id))
            })
            .collect()
    }
}

fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or("")
}

/// The innermost span named `name` among a line's spans.
fn span<'a>(line: &'a Value, name: &str) -> Option<&'a Value> {
    line["spans"]
        .as_array()?
        .iter()
        .rev()
        .find(|span| span["name"] == name)
}

#[test]
fn a_failed_over_request_is_one_trace_in_the_json_log() {
    let model = tempfile::tempdir().expect("temp dir");
    make_tiny(Arch::Qwen2, model.path(), 7).expect("tiny model");
    lifeboat::upstream::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The gateway answers every call with a 500.
    let mock = runtime
        .block_on(MockUpstream::start(MockSettings::default()))
        .expect("mock starts");
    runtime
        .block_on(mock.set_fault(FaultMode::Http500))
        .expect("fault");
    let config = write_config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[router]\nprobe_interval = \"0s\"\n\
         [remotes.gateway]\nbase_url = \"{}\"\nmodels = [\"deepseek-chat\"]\n\
         [local]\nserved_model_name = \"tiny\"\n",
        mock.url()
    ));
    let mut command = lifeboat();
    command
        .args([
            "serve",
            "--config",
            &config.path().display().to_string(),
            "--model",
        ])
        .arg(model.path())
        .env("LIFEBOAT_LOG_FORMAT", "json")
        .env("LIFEBOAT_LOG", "info,lifeboat::engine=debug");
    let mut server = Running::spawn(command);
    let listening: Value = serde_json::from_str(&server.wait_for("OpenAI base URL")).expect("a JSON line");
    let base = format!("http://{}", listening["fields"]["addr"].as_str().expect("addr"));

    let hostile = "h".repeat(300);
    let (echo, response_ids, hostile_echo) = runtime.block_on(async {
        let client = reqwest::Client::new();
        for _ in 0..3000 {
            let ready: Value = match client.get(format!("{base}/ready")).send().await {
                Ok(response) => response.json().await.unwrap_or_default(),
                Err(_) => Value::Null,
            };
            if ready["status"] == "ready" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let body = json!({
            "model": "deepseek-chat",
            "messages": [{"role": "user", "content": "Are you there?"}],
            "max_tokens": 5,
            "temperature": 0,
            "stream": true,
        });
        let response = client
            .post(format!("{base}/v1/chat/completions"))
            .header("x-request-id", "trace-me-123")
            .json(&body)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-lifeboat-backend"], "local");
        let echo = echoed(&response);
        let sse = common::read_sse(response).await;
        assert_eq!(sse.done_count(), 1);
        let ids: Vec<String> = sse
            .json()
            .iter()
            .map(|chunk| chunk["id"].as_str().unwrap_or("").to_string())
            .collect();
        // Hostile: far too long; refused with 404 (unknown model), still lifeboat's id.
        let response = client
            .post(format!("{base}/v1/chat/completions"))
            .header("x-request-id", hostile.as_str())
            .json(&json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), 404);
        (echo, ids, echoed(&response))
    });
    assert_eq!(echo, "trace-me-123");
    assert_eq!(
        mock.last_request().and_then(|r| r.request_id).as_deref(),
        Some("trace-me-123"),
        "forwarded to the gateway"
    );
    assert_eq!(server.terminate(), 0);
    let log = JsonLog::parse(&server.log);
    let dump = server.log.join("\n");

    let id = response_ids.first().cloned().unwrap_or_default();
    assert!(id.starts_with("chatcmpl-"), "{response_ids:?}");
    assert!(response_ids.iter().all(|chunk_id| *chunk_id == id));
    let trace = log.of_request(&id);

    // The API's line: both ids, who served, the status.
    let api = trace
        .iter()
        .find(|line| message(line) == "request finished")
        .unwrap_or_else(|| panic!("no API line for {id}:\n{dump}"));
    assert_eq!(api["fields"]["client_request_id"], "trace-me-123", "{api}");
    assert_eq!(api["fields"]["backend"], "local", "{api}");
    assert_eq!(api["fields"]["status"], 200, "{api}");

    // Every line of the router and the engine for this request sits in its request span,
    // which carries the client's id, the route and the client.
    let in_request: Vec<&Value> = trace
        .iter()
        .copied()
        .filter(|line| span(line, "request").is_some())
        .collect();
    for line in &in_request {
        let request = span(line, "request").expect("request span");
        assert_eq!(request["client_request_id"], "trace-me-123", "{line}");
        assert_eq!(request["route"], "deepseek-chat", "{line}");
        assert_eq!(request["stream"], true, "{line}");
        assert_eq!(request["endpoint"], "chat", "{line}");
        assert!(
            request["client"].as_str().is_some_and(|c| c.starts_with("ip:")),
            "{line}"
        );
    }
    let attempt_ends = |backend: &str| -> Vec<&Value> {
        in_request
            .iter()
            .filter(|line| message(line) == "attempt finished")
            .filter_map(|line| span(line, "attempt"))
            .filter(|attempt| attempt["backend"] == backend)
            .collect()
    };
    // The gateway: its 500, retried once, then failed over.
    let gateway = attempt_ends("gateway");
    assert_eq!(gateway.len(), 2, "the attempt and its retry:\n{dump}");
    for attempt in &gateway {
        assert_eq!(attempt["outcome"], "failed", "{attempt}");
        assert_eq!(attempt["error"], "server_error", "{attempt}");
        assert!(attempt["duration_ms"].is_u64(), "{attempt}");
    }
    let decision = |name: &str| {
        in_request.iter().find(|line| {
            line["fields"]["decision"] == name
                && line["fields"]["backend"] == "gateway"
                && line["fields"]["error"] == "server_error"
        })
    };
    assert!(decision("retry").is_some(), "no retry decision:\n{dump}");
    let failover = decision("fail_over").unwrap_or_else(|| panic!("no failover decision:\n{dump}"));
    assert!(
        span(failover, "attempt").is_none(),
        "decided in the request span, after the attempt"
    );

    // The local attempt: the third, committed at its first output, finished ok.
    let local = attempt_ends("local");
    assert_eq!(local.len(), 1, "{dump}");
    assert_eq!(local[0]["attempt"], 3);
    assert_eq!(local[0]["outcome"], "ok");
    assert!(local[0]["ttft_ms"].is_u64(), "{}", local[0]);
    assert!(
        in_request.iter().any(|line| message(line) == "committed"
            && line["fields"]["commit_point"] == "first_output"
            && span(line, "attempt").is_some_and(|a| a["backend"] == "local")),
        "no commit line:\n{dump}"
    );

    // The engine thread's lines for this request, inside request → attempt → engine.
    let engine: Vec<&Value> = in_request
        .iter()
        .copied()
        .filter(|line| line["threadName"] == "lifeboat-engine")
        .collect();
    for event in ["queued on the engine", "admitted", "started", "finished"] {
        let line = engine
            .iter()
            .find(|line| message(line) == event)
            .unwrap_or_else(|| panic!("no engine line {event:?} for {id}:\n{dump}"));
        let names: Vec<&str> = line["spans"]
            .as_array()
            .map(|spans| spans.iter().filter_map(|s| s["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(names, ["request", "attempt", "engine"], "{line}");
        assert_eq!(
            span(line, "attempt").map(|a| &a["backend"]),
            Some(&json!("local"))
        );
        assert_eq!(span(line, "engine").map(|e| &e["request_id"]), Some(&json!(id)));
    }

    // The hostile id: not echoed, never logged, the request served as any other.
    assert!(hostile_echo.starts_with("chatcmpl-"), "{hostile_echo}");
    assert!(!dump.contains(&hostile), "a hostile id reached the log");
    let refused = log.of_request(&hostile_echo);
    assert!(
        refused
            .iter()
            .any(|line| message(line) == "request finished" && line["fields"]["status"] == 404),
        "{dump}"
    );
}
