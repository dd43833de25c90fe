//! Upstream response → [`GenerationEvent`]s: SSE frames (or a plain JSON body) become
//! events under the attempt's deadlines, and every HTTP status or transport failure
//! becomes a classified [`BackendError`].

use std::{collections::VecDeque, pin::Pin, time::Duration};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::{StatusCode, header::HeaderMap};
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use super::sse::{SseFrame, SseParser};
use crate::backend::{
    BackendError, ChoiceDelta, ErrorKind, EventStream, GenerationEvent, Origin, TimeoutPhase, Usage,
};
use crate::config::redact_text;

/// The deadlines of one attempt, fixed when the request is sent.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub started: Instant,
    pub first_token: Duration,
    pub idle: Duration,
    pub total: Duration,
}

impl Deadlines {
    /// The instant by which the next thing must arrive, and which deadline that is.
    pub fn next(&self, first_output_seen: bool, last_progress: Instant) -> (Instant, TimeoutPhase) {
        let total = self.started + self.total;
        let (deadline, phase) = if first_output_seen {
            (last_progress + self.idle, TimeoutPhase::Idle)
        } else {
            (self.started + self.first_token, TimeoutPhase::FirstToken)
        };
        if total <= deadline {
            (total, TimeoutPhase::Total)
        } else {
            (deadline, phase)
        }
    }

    pub fn timeout_error(&self, phase: TimeoutPhase) -> BackendError {
        let (what, limit) = match phase {
            TimeoutPhase::Connect => ("connecting", self.first_token),
            TimeoutPhase::FirstToken => ("waiting for the first token", self.first_token),
            TimeoutPhase::Idle => ("waiting for the next chunk", self.idle),
            TimeoutPhase::Total => ("for the whole response", self.total),
        };
        BackendError::new(
            ErrorKind::Timeout(phase),
            Origin::Upstream,
            format!(
                "upstream timed out {what} (limit {})",
                humantime::format_duration(limit)
            ),
        )
    }
}

/// How much of a gateway's answer lifeboat holds at most. A gateway is not trusted to end
/// its lines, its events or its answer: past a cap the attempt fails as
/// [`ErrorKind::MalformedFrame`] (and fails over, before the commit point).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseLimits {
    /// One SSE event (a line, or the joined `data:` lines of one event).
    pub max_frame_bytes: usize,
    /// A whole non-streamed JSON answer.
    pub max_json_body_bytes: usize,
    /// Everything one streamed answer may send, comments and all.
    pub max_answer_bytes: usize,
}

impl From<&crate::config::RemoteConfig> for ResponseLimits {
    fn from(config: &crate::config::RemoteConfig) -> Self {
        ResponseLimits {
            max_frame_bytes: config.max_frame_bytes,
            max_json_body_bytes: config.max_json_body_bytes,
            max_answer_bytes: config.max_answer_bytes,
        }
    }
}

fn too_large(what: &str, limit: usize) -> BackendError {
    BackendError::new(
        ErrorKind::MalformedFrame,
        Origin::Upstream,
        format!("upstream {what} passed the limit of {limit} bytes"),
    )
}

/// Upstream chunk or full response, both shapes in one lenient struct.
#[derive(Debug, Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Debug, Deserialize)]
struct WireChoice {
    #[serde(default)]
    index: u32,
    /// Chat streaming.
    #[serde(default)]
    delta: Option<WireMessage>,
    /// Chat non-streaming.
    #[serde(default)]
    message: Option<WireMessage>,
    /// Legacy completions.
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

/// The OpenAI error object, leniently (`code` is a string or a number in the wild).
#[derive(Debug, Default, Deserialize)]
struct WireError {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    param: Option<Value>,
    #[serde(default)]
    code: Option<Value>,
}

fn value_to_string(value: Option<Value>) -> Option<String> {
    match value? {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

/// Turn one upstream JSON object (chunk or full response) into events.
fn events_from_json(
    text: &str,
    out: &mut VecDeque<Result<GenerationEvent, BackendError>>,
) -> Result<(), BackendError> {
    let chunk: WireChunk = serde_json::from_str(text).map_err(|err| {
        BackendError::new(
            ErrorKind::MalformedFrame,
            Origin::Upstream,
            format!(
                "upstream sent a frame that is not a valid chunk ({err}): {}",
                preview(text)
            ),
        )
    })?;
    if let Some(error) = chunk.error {
        let mut err = BackendError::new(
            ErrorKind::ServerError,
            Origin::Upstream,
            format!(
                "upstream reported an error inside the stream: {}",
                redact_text(error.message.as_deref().unwrap_or("(no message)"))
            ),
        );
        err.code = value_to_string(error.code);
        return Err(err);
    }
    for choice in chunk.choices {
        let mut delta = ChoiceDelta {
            index: choice.index,
            logprobs: choice.logprobs.filter(|v| !v.is_null()),
            finish_reason: choice.finish_reason,
            ..ChoiceDelta::default()
        };
        if let Some(text) = choice.text {
            delta.content = Some(text);
        }
        let full_message = choice.message.is_some();
        if let Some(message) = choice.delta.or(choice.message) {
            delta.role = message.role;
            delta.content = message.content.or(delta.content);
            delta.reasoning_content = message.reasoning_content;
            delta.tool_calls = message.tool_calls.map(|calls| {
                if full_message {
                    // A full message's calls carry no `index`; deltas need one to merge.
                    calls
                        .into_iter()
                        .enumerate()
                        .map(|(i, mut call)| {
                            if let Value::Object(map) = &mut call {
                                map.entry("index").or_insert(Value::from(i));
                            }
                            call
                        })
                        .collect()
                } else {
                    calls
                }
            });
        }
        out.push_back(Ok(GenerationEvent::Delta(delta)));
    }
    if let Some(usage) = chunk.usage {
        out.push_back(Ok(GenerationEvent::Usage(usage)));
    }
    Ok(())
}

fn preview(text: &str) -> String {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len() {
        format!("{}…", &text[..end])
    } else {
        text.to_string()
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

struct SseState {
    body: ByteStream,
    parser: SseParser,
    frames: Vec<SseFrame>,
    pending: VecDeque<Result<GenerationEvent, BackendError>>,
    deadlines: Deadlines,
    first_output_seen: bool,
    last_progress: Instant,
    saw_finish: bool,
    done: bool,
    /// Bytes received so far, against `max_answer`.
    received: usize,
    max_answer: usize,
}

impl SseState {
    /// Handle the frames parsed so far; returns true once `[DONE]` was seen.
    fn drain_frames(&mut self) -> bool {
        for frame in self.frames.drain(..) {
            match frame {
                // Comments (`: keep-alive`) are deliberately not progress.
                SseFrame::Comment => {}
                SseFrame::Data(data) if data.trim() == "[DONE]" => return true,
                SseFrame::Data(data) => {
                    self.last_progress = Instant::now();
                    if let Err(err) = events_from_json(&data, &mut self.pending) {
                        self.pending.push_back(Err(err));
                        return true;
                    }
                }
            }
        }
        false
    }

    async fn next_event(&mut self) -> Option<Result<GenerationEvent, BackendError>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                match &item {
                    Ok(event) => {
                        if event.is_output() {
                            self.first_output_seen = true;
                        }
                        if let GenerationEvent::Delta(d) = event {
                            self.saw_finish |= d.finish_reason.is_some();
                        }
                    }
                    Err(_) => {
                        self.pending.clear();
                        self.done = true;
                    }
                }
                return Some(item);
            }
            if self.done {
                return None;
            }
            let (deadline, phase) = self.deadlines.next(self.first_output_seen, self.last_progress);
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Err(_) => {
                    self.done = true;
                    return Some(Err(self.deadlines.timeout_error(phase)));
                }
                Ok(Some(Ok(bytes))) => {
                    self.received = self.received.saturating_add(bytes.len());
                    if self.received > self.max_answer {
                        self.done = true;
                        return Some(Err(too_large("stream", self.max_answer)));
                    }
                    if let Err(err) = self.parser.push(&bytes, &mut self.frames) {
                        self.done = true;
                        return Some(Err(BackendError::new(
                            ErrorKind::MalformedFrame,
                            Origin::Upstream,
                            format!("upstream stream is unusable: {err}"),
                        )));
                    }
                    if self.drain_frames() {
                        self.done = true;
                    }
                }
                Ok(Some(Err(err))) => {
                    self.done = true;
                    return Some(Err(BackendError::new(
                        ErrorKind::StreamCut,
                        Origin::Upstream,
                        format!("upstream stream broke: {}", error_chain(&err)),
                    )));
                }
                Ok(None) => {
                    self.done = true;
                    // A body that ends after every choice finished is complete even without
                    // `[DONE]`; anything else is a truncation the client must not mistake
                    // for a full answer.
                    if !self.saw_finish || self.parser.has_partial() {
                        return Some(Err(BackendError::new(
                            ErrorKind::StreamCut,
                            Origin::Upstream,
                            "upstream stream ended before the response was complete",
                        )));
                    }
                }
            }
        }
    }
}

/// Events from an SSE body, under `deadlines` and `limits`.
pub fn sse_events(body: ByteStream, deadlines: Deadlines, limits: ResponseLimits) -> EventStream {
    let state = SseState {
        body,
        parser: SseParser::with_max_frame(limits.max_frame_bytes),
        frames: Vec::new(),
        pending: VecDeque::new(),
        deadlines,
        first_output_seen: false,
        last_progress: Instant::now(),
        saw_finish: false,
        done: false,
        received: 0,
        max_answer: limits.max_answer_bytes,
    };
    Box::pin(futures_util::stream::unfold(state, |mut state| async move {
        let item = state.next_event().await?;
        Some((item, state))
    }))
}

/// Read a whole (non-SSE) body of at most `limit` bytes before `deadline`; a longer one
/// is refused as soon as it is known to be longer (by `Content-Length` or by counting).
pub async fn read_json_body(
    response: reqwest::Response,
    deadlines: &Deadlines,
    limit: usize,
) -> Result<Vec<u8>, BackendError> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(too_large("JSON answer", limit));
    }
    let (deadline, phase) = deadlines.next(false, deadlines.started);
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    let read = async {
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|err| {
                BackendError::new(
                    ErrorKind::StreamCut,
                    Origin::Upstream,
                    format!("upstream response broke: {}", error_chain(&err)),
                )
            })?;
            if body.len() + chunk.len() > limit {
                return Err(too_large("JSON answer", limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match tokio::time::timeout_at(deadline, read).await {
        Err(_) => Err(deadlines.timeout_error(phase)),
        Ok(result) => result.map(|()| body),
    }
}

/// Events from a complete (non-SSE) JSON response, for gateways that ignore `stream`.
pub fn json_events(body: &[u8]) -> EventStream {
    let mut out = VecDeque::new();
    let text = String::from_utf8_lossy(body);
    if let Err(err) = events_from_json(&text, &mut out) {
        out.push_back(Err(err));
    }
    Box::pin(futures_util::stream::iter(out))
}

/// Classify a non-2xx upstream response. `body` is (the start of) its body; `secret` is
/// scrubbed from the message in case the gateway echoes the key.
pub fn classify_status(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    secret: Option<&str>,
) -> BackendError {
    let parsed: Option<WireError> = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").cloned())
        .and_then(|e| match e {
            Value::String(message) => Some(WireError {
                message: Some(message),
                ..WireError::default()
            }),
            other => serde_json::from_value(other).ok(),
        });
    let upstream_message = parsed
        .as_ref()
        .and_then(|e| e.message.clone())
        .unwrap_or_else(|| preview(String::from_utf8_lossy(body).trim()));
    let upstream_message = match secret {
        Some(secret) if !secret.is_empty() => upstream_message.replace(secret, "<redacted>"),
        _ => upstream_message,
    };
    let upstream_message = redact_text(&upstream_message);
    let kind = match status.as_u16() {
        400 | 413 | 422 => ErrorKind::BadRequest,
        401 | 403 => ErrorKind::Unauthorized,
        402 => ErrorKind::PaymentRequired,
        404 => ErrorKind::NotFound,
        408 => ErrorKind::Timeout(TimeoutPhase::FirstToken),
        429 => ErrorKind::RateLimited,
        500..=599 => ErrorKind::ServerError,
        _ => ErrorKind::Internal,
    };
    let message = match kind {
        // The client's own mistake: pass the gateway's words through unchanged.
        ErrorKind::BadRequest => upstream_message,
        _ => format!("upstream answered {status}: {upstream_message}"),
    };
    let mut err = BackendError::new(kind, Origin::Upstream, message);
    err.status = Some(status.as_u16());
    err.retry_after = retry_after(headers);
    if let Some(parsed) = parsed {
        err.param = value_to_string(parsed.param);
        err.code = value_to_string(parsed.code);
    }
    err
}

/// Longest `Retry-After` taken from a gateway. Anything beyond the router's cap fails
/// over at once anyway; the clamp only keeps absurd values (`1e30`, the year 9999) from
/// overflowing a `Duration` or an `Instant` downstream.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// `retry-after-ms` (OpenAI), else `Retry-After` in seconds or as an HTTP date; clamped
/// to [`MAX_RETRY_AFTER`]. Negative, NaN or unparsable values are ignored.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let value = headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok()?;
        (value >= 0.0).then_some(value)
    };
    let clamp =
        |secs: f64| Duration::try_from_secs_f64(secs).map_or(MAX_RETRY_AFTER, |d| d.min(MAX_RETRY_AFTER));
    if let Some(ms) = number("retry-after-ms") {
        return Some(clamp(ms / 1000.0));
    }
    if let Some(secs) = number(reqwest::header::RETRY_AFTER.as_str()) {
        return Some(clamp(secs));
    }
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// Classify a transport failure of sending the request (before any status).
pub fn classify_send_error(err: &reqwest::Error) -> BackendError {
    let kind = if err.is_timeout() {
        ErrorKind::Timeout(TimeoutPhase::Connect)
    } else {
        // Refused, reset, DNS failure, TLS failure, or closed before a response: the
        // gateway could not be reached, which is what `Connect` means to the router.
        ErrorKind::Connect
    };
    BackendError::new(
        kind,
        Origin::Upstream,
        format!("cannot reach upstream: {}", error_chain(err)),
    )
}

/// An error with its sources, since reqwest's top-level text hides the cause; URL
/// credentials and key-like words are redacted (the text goes to logs).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    redact_text(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn collect(text: &str) -> Vec<Result<GenerationEvent, BackendError>> {
        let mut out = VecDeque::new();
        if let Err(err) = events_from_json(text, &mut out) {
            out.push_back(Err(err));
        }
        out.into_iter().collect()
    }

    #[test]
    fn chat_chunk_becomes_delta_and_usage() {
        let events = collect(
            r#"{"choices":[{"index":0,"delta":{"content":"Hi","reasoning_content":null},"finish_reason":null}],
                "usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4,"prompt_cache_hit_tokens":0}}"#,
        );
        let Ok(GenerationEvent::Delta(delta)) = &events[0] else {
            panic!("expected delta: {events:?}")
        };
        assert_eq!(delta.content.as_deref(), Some("Hi"));
        let Ok(GenerationEvent::Usage(usage)) = &events[1] else {
            panic!("expected usage")
        };
        assert_eq!(usage.total_tokens, 4);
        assert_eq!(usage.extra["prompt_cache_hit_tokens"], 0);
    }

    #[test]
    fn full_message_tool_calls_get_indexes() {
        let events = collect(
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,
                "tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},
                "finish_reason":"tool_calls"}]}"#,
        );
        let Ok(GenerationEvent::Delta(delta)) = &events[0] else {
            panic!("expected delta")
        };
        assert_eq!(delta.tool_calls.as_ref().expect("calls")[0]["index"], 0);
    }

    #[test]
    fn malformed_and_in_band_errors_are_classified() {
        let events = collect("{\"choices\": [");
        assert!(matches!(&events[0], Err(e) if e.kind == ErrorKind::MalformedFrame));
        let events = collect(r#"{"error":{"message":"overloaded","code":503}}"#);
        assert!(
            matches!(&events[0], Err(e) if e.kind == ErrorKind::ServerError && e.code.as_deref() == Some("503"))
        );
    }

    #[test]
    fn status_table() {
        let headers = HeaderMap::new();
        let cases = [
            (400, ErrorKind::BadRequest),
            (401, ErrorKind::Unauthorized),
            (402, ErrorKind::PaymentRequired),
            (403, ErrorKind::Unauthorized),
            (404, ErrorKind::NotFound),
            (429, ErrorKind::RateLimited),
            (500, ErrorKind::ServerError),
            (503, ErrorKind::ServerError),
            (418, ErrorKind::Internal),
        ];
        for (status, kind) in cases {
            let status = StatusCode::from_u16(status).expect("status");
            assert_eq!(
                classify_status(status, &headers, b"{}", None).kind,
                kind,
                "{status}"
            );
        }
    }

    #[test]
    fn bad_request_keeps_upstream_words_and_param() {
        let body = br#"{"error":{"message":"bad temperature","type":"invalid_request_error","param":"temperature","code":null}}"#;
        let err = classify_status(StatusCode::BAD_REQUEST, &HeaderMap::new(), body, None);
        assert_eq!(err.message, "bad temperature");
        assert_eq!(err.param.as_deref(), Some("temperature"));
        assert_eq!(err.code, None);
    }

    #[test]
    fn echoed_key_is_scrubbed() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-live-123"}}"#;
        let err = classify_status(
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            body,
            Some("sk-live-123"),
        );
        assert!(!err.message.contains("sk-live-123"), "{}", err.message);
    }

    #[test]
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(250)));
        let mut headers = HeaderMap::new();
        headers.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn absurd_retry_after_values_are_clamped_or_ignored_never_a_panic() {
        let cases: &[(&str, &str, Option<Duration>)] = &[
            ("retry-after", "1e30", Some(MAX_RETRY_AFTER)),
            ("retry-after", "1e20", Some(MAX_RETRY_AFTER)),
            ("retry-after", "inf", Some(MAX_RETRY_AFTER)),
            ("retry-after", "-5", None),
            ("retry-after", "NaN", None),
            ("retry-after", "-0", Some(Duration::ZERO)),
            (
                "retry-after",
                "Fri, 31 Dec 9999 23:59:59 GMT",
                Some(MAX_RETRY_AFTER),
            ),
            ("retry-after-ms", "1e30", Some(MAX_RETRY_AFTER)),
            ("retry-after-ms", "-1", None),
            ("retry-after-ms", "nan", None),
            ("retry-after-ms", "1.5", Some(Duration::from_micros(1500))),
        ];
        for &(name, value, expected) in cases {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            assert_eq!(retry_after(&headers), expected, "{name}: {value}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_pick_the_nearest() {
        let now = Instant::now();
        let d = Deadlines {
            started: now,
            first_token: Duration::from_secs(10),
            idle: Duration::from_secs(5),
            total: Duration::from_secs(12),
        };
        assert_eq!(
            d.next(false, now),
            (now + Duration::from_secs(10), TimeoutPhase::FirstToken)
        );
        assert_eq!(
            d.next(true, now),
            (now + Duration::from_secs(5), TimeoutPhase::Idle)
        );
        assert_eq!(
            d.next(true, now + Duration::from_secs(9)),
            (now + Duration::from_secs(12), TimeoutPhase::Total)
        );
    }
}
