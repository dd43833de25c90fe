//! One measured request: a streamed chat completion with usage, timed from send to the
//! first content token, between tokens and to the end, and every failure sorted by kind.

use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{prompts::Prompt, target::TargetSpec};
use crate::upstream::sse::{SseFrame, SseParser};

/// Why a request did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// No complete answer within the bench's request timeout.
    Timeout,
    /// 429 Too Many Requests.
    RateLimited,
    /// Any 5xx.
    ServerError,
    /// Refused, reset or unreachable before a response.
    Connection,
    /// The stream ended without `[DONE]`, carried an in-band error, or a frame did not parse.
    BrokenStream,
    /// Any 4xx other than 429 (bad key, out of credit, bad request).
    ClientError,
}

impl FailureKind {
    pub const ALL: [FailureKind; 6] = [
        FailureKind::Timeout,
        FailureKind::RateLimited,
        FailureKind::ServerError,
        FailureKind::Connection,
        FailureKind::BrokenStream,
        FailureKind::ClientError,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::RateLimited => "429",
            FailureKind::ServerError => "5xx",
            FailureKind::Connection => "connection",
            FailureKind::BrokenStream => "broken stream",
            FailureKind::ClientError => "other 4xx",
        }
    }
}

/// What a successful request measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Send to the first non-empty content (or reasoning) delta.
    pub ttft: Duration,
    /// Gaps between consecutive content deltas.
    pub inter_token: Vec<Duration>,
    /// Send to `[DONE]`.
    pub end_to_end: Duration,
    /// From the server's usage; 0 if it sent none.
    pub prompt_tokens: u64,
    /// From the server's usage, or the count of content deltas if it sent none.
    pub completion_tokens: u64,
    /// First to last content delta, for the per-stream decode rate.
    pub decode_time: Duration,
}

impl Sample {
    /// Tokens per second of this stream after its first token; `None` with one token.
    pub fn decode_tokens_per_sec(&self) -> Option<f64> {
        let secs = self.decode_time.as_secs_f64();
        (self.completion_tokens > 1 && secs > 0.0).then(|| (self.completion_tokens - 1) as f64 / secs)
    }
}

/// The request body every target gets: same prompt, fixed `max_tokens`, greedy, streamed
/// with usage.
pub fn request_body(model: &str, prompt: &Prompt, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": prompt.messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

/// Send one streamed request and time it; the whole exchange is bounded by `timeout`.
pub async fn measure(
    client: &reqwest::Client,
    target: &TargetSpec,
    body: &Value,
    timeout: Duration,
) -> Result<Sample, FailureKind> {
    let start = Instant::now();
    match tokio::time::timeout(timeout, exchange(client, target, body, start)).await {
        Ok(result) => result,
        Err(_) => Err(FailureKind::Timeout),
    }
}

async fn exchange(
    client: &reqwest::Client,
    target: &TargetSpec,
    body: &Value,
    start: Instant,
) -> Result<Sample, FailureKind> {
    let mut request = client.post(format!("{}/chat/completions", target.url)).json(body);
    if let Some(key) = &target.api_key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.map_err(|err| {
        if err.is_timeout() {
            FailureKind::Timeout
        } else {
            FailureKind::Connection
        }
    })?;
    let status = response.status();
    if status.as_u16() == 429 {
        return Err(FailureKind::RateLimited);
    }
    if status.is_server_error() {
        return Err(FailureKind::ServerError);
    }
    if !status.is_success() {
        return Err(FailureKind::ClientError);
    }
    let mut parser = SseParser::new();
    let mut frames = Vec::new();
    let mut body = response.bytes_stream();
    let mut first_token: Option<Instant> = None;
    let mut last_token: Option<Instant> = None;
    let mut inter_token = Vec::new();
    let mut deltas = 0u64;
    let mut usage: Option<(u64, u64)> = None;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|_| FailureKind::BrokenStream)?;
        let now = Instant::now();
        parser
            .push(&chunk, &mut frames)
            .map_err(|_| FailureKind::BrokenStream)?;
        for frame in frames.drain(..) {
            let SseFrame::Data(data) = frame else { continue };
            if data.trim() == "[DONE]" {
                let (Some(first), Some(last)) = (first_token, last_token) else {
                    // A stream that finished without one token answered nothing.
                    return Err(FailureKind::BrokenStream);
                };
                let (prompt_tokens, completion_tokens) = usage.unwrap_or((0, deltas));
                return Ok(Sample {
                    ttft: first - start,
                    inter_token,
                    end_to_end: now - start,
                    prompt_tokens,
                    completion_tokens,
                    decode_time: last - first,
                });
            }
            let chunk: Value = serde_json::from_str(&data).map_err(|_| FailureKind::BrokenStream)?;
            if chunk.get("error").is_some() {
                return Err(FailureKind::BrokenStream);
            }
            if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
                let field = |name: &str| u.get(name).and_then(Value::as_u64).unwrap_or(0);
                usage = Some((field("prompt_tokens"), field("completion_tokens")));
            }
            if has_content(&chunk) {
                deltas += 1;
                if let Some(last) = last_token {
                    inter_token.push(now - last);
                }
                first_token.get_or_insert(now);
                last_token = Some(now);
            }
        }
    }
    Err(FailureKind::BrokenStream)
}

/// True when a chunk carries visible output: content, reasoning or a tool call.
fn has_content(chunk: &Value) -> bool {
    let Some(delta) = chunk.pointer("/choices/0/delta") else {
        return false;
    };
    let non_empty = |key: &str| {
        delta
            .get(key)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    non_empty("content") || non_empty("reasoning_content") || delta.get("tool_calls").is_some()
}
