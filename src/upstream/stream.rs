//! Upstream response → [`GenerationEvent`]s: SSE frames (or a plain JSON body) become
//! events under the attempt's deadlines and size caps; a failure inside the answer
//! becomes a classified [`BackendError`] (statuses and transport errors: `classify`).

use std::{collections::VecDeque, pin::Pin, time::Duration};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use super::{
    classify::error_chain,
    sse::{SseFrame, SseParser},
};
use crate::backend::{
    BackendError, ChoiceDelta, ErrorKind, EventStream, FinishReason, GenerationEvent, TimeoutPhase,
    ToolCallDelta, Usage,
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
    finish_reason: Option<FinishReason>,
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
    tool_calls: Option<Vec<ToolCallDelta>>,
}

/// The OpenAI error object, leniently (`code` is a string or a number in the wild).
#[derive(Debug, Default, Deserialize)]
pub(super) struct WireError {
    #[serde(default)]
    pub(super) message: Option<String>,
    #[serde(default)]
    pub(super) param: Option<Value>,
    #[serde(default)]
    pub(super) code: Option<Value>,
}

pub(super) fn value_to_string(value: Option<Value>) -> Option<String> {
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
            format!(
                "upstream sent a frame that is not a valid chunk ({err}): {}",
                preview(text)
            ),
        )
    })?;
    if let Some(error) = chunk.error {
        let mut err = BackendError::new(
            ErrorKind::ServerError,
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
            delta.tool_calls = message.tool_calls.map(|mut calls| {
                if full_message {
                    // A full message's calls carry no `index`; deltas need one to merge.
                    for (i, call) in calls.iter_mut().enumerate() {
                        call.index = u32::try_from(i).unwrap_or(u32::MAX);
                    }
                }
                calls
            });
        }
        out.push_back(Ok(GenerationEvent::Delta(delta)));
    }
    if let Some(usage) = chunk.usage {
        out.push_back(Ok(GenerationEvent::Usage(usage)));
    }
    Ok(())
}

pub(super) fn preview(text: &str) -> String {
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
                self.note(&item);
                return Some(item);
            }
            if self.done {
                return None;
            }
            let (deadline, phase) = self.deadlines.next(self.first_output_seen, self.last_progress);
            let failure = match tokio::time::timeout_at(deadline, self.body.next()).await {
                Err(_) => Some(self.deadlines.timeout_error(phase)),
                Ok(Some(Ok(bytes))) => self.take_bytes(&bytes),
                Ok(Some(Err(err))) => Some(BackendError::new(
                    ErrorKind::StreamCut,
                    format!("upstream stream broke: {}", error_chain(&err)),
                )),
                Ok(None) => {
                    self.done = true;
                    self.ended_early()
                }
            };
            if let Some(error) = failure {
                self.done = true;
                return Some(Err(error));
            }
        }
    }

    /// Track what an event handed out means for the stream: output seen, choices
    /// finished; an error ends it.
    fn note(&mut self, item: &Result<GenerationEvent, BackendError>) {
        match item {
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
    }

    /// Parse a piece of the body into events; an error when it passes a cap or cannot
    /// be parsed.
    fn take_bytes(&mut self, bytes: &[u8]) -> Option<BackendError> {
        self.received = self.received.saturating_add(bytes.len());
        if self.received > self.max_answer {
            return Some(too_large("stream", self.max_answer));
        }
        if let Err(err) = self.parser.push(bytes, &mut self.frames) {
            return Some(BackendError::new(
                ErrorKind::MalformedFrame,
                format!("upstream stream is unusable: {err}"),
            ));
        }
        if self.drain_frames() {
            self.done = true;
        }
        None
    }

    /// The body ended: complete after every choice finished, even without `[DONE]`;
    /// anything else is a truncation the client must not mistake for a full answer.
    fn ended_early(&self) -> Option<BackendError> {
        (!self.saw_finish || self.parser.has_partial()).then(|| {
            BackendError::new(
                ErrorKind::StreamCut,
                "upstream stream ended before the response was complete",
            )
        })
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let calls = delta.tool_calls.as_ref().expect("calls");
        assert_eq!(calls[0].index, 0);
        assert_eq!(
            calls[0].function.as_ref().and_then(|f| f.name.as_deref()),
            Some("f")
        );
    }

    #[test]
    fn unknown_finish_reasons_and_tool_call_extras_pass_through() {
        let events = collect(
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,
                "tool_calls":[{"id":"a","type":"function","function":{"name":"f","arguments":"{}"}},
                              {"id":"b","type":"function","function":{"name":"g","arguments":"{}"},"extra_content":{"sig":"s"}}]},
                "finish_reason":"insufficient_system_resource"}]}"#,
        );
        let Ok(GenerationEvent::Delta(delta)) = &events[0] else {
            panic!("expected delta")
        };
        let calls = delta.tool_calls.as_ref().expect("calls");
        assert_eq!(calls.iter().map(|c| c.index).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(calls[1].extra["extra_content"]["sig"], "s");
        assert_eq!(
            delta.finish_reason,
            Some(FinishReason::Other("insufficient_system_resource".into()))
        );
    }

    #[test]
    fn a_tool_call_that_is_not_an_object_is_a_malformed_frame() {
        let events = collect(r#"{"choices":[{"index":0,"delta":{"tool_calls":["call me"]}}]}"#);
        assert!(matches!(&events[0], Err(e) if e.kind == ErrorKind::MalformedFrame));
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
