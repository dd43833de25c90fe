//! Routed event stream → OpenAI SSE: `data: {chunk}` frames, the usage chunk with
//! `"choices": []` only when the client asked for it, an in-band `data: {"error":…}` frame
//! for a failure after the first byte, and exactly one `data: [DONE]`.

use std::{collections::VecDeque, convert::Infallible, time::Duration};

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use serde::Serialize;

use super::{
    error::ApiError,
    generate::ResponseMeta,
    types::{ChatChunkChoice, ChatDelta, Chunk, ErrorResponse, TextChunkChoice},
};
use crate::{
    backend::{ChoiceDelta, Endpoint, EventStream, GenerationEvent, Usage},
    metrics::{self, InFlight},
};

/// How often an idle stream gets a `:` comment so proxies keep the connection open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The SSE response for a committed stream.
pub(crate) fn respond(
    events: EventStream,
    meta: ResponseMeta,
    in_flight: InFlight,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let state = StreamState {
        events,
        meta,
        queued: VecDeque::new(),
        usage: None,
        finished: false,
        _in_flight: in_flight,
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        let event = state.next_frame().await?;
        Some((Ok(event), state))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

struct StreamState {
    events: EventStream,
    meta: ResponseMeta,
    /// Frames decided but not yet sent (`[DONE]` after an error).
    queued: VecDeque<Event>,
    usage: Option<Usage>,
    /// The last frame was produced; metrics were recorded.
    finished: bool,
    _in_flight: InFlight,
}

impl StreamState {
    async fn next_frame(&mut self) -> Option<Event> {
        loop {
            if let Some(frame) = self.queued.pop_front() {
                return Some(frame);
            }
            if self.finished {
                return None;
            }
            match self.events.next().await {
                Some(Ok(GenerationEvent::Delta(delta))) => return Some(self.delta_frame(&delta)),
                Some(Ok(GenerationEvent::Usage(usage))) => {
                    let frame = self.meta.include_usage.then(|| self.usage_frame(&usage));
                    self.usage = Some(usage);
                    if let Some(frame) = frame {
                        return Some(frame);
                    }
                }
                Some(Err(error)) => {
                    metrics::stream_failed(&self.meta.backend, error.kind);
                    tracing::warn!(request_id = %self.meta.id, backend = %self.meta.backend, kind = error.kind.as_str(), error = %error, "stream failed after the first byte");
                    let body = ErrorResponse {
                        error: ApiError::from_stream(&self.meta.backend, self.meta.backend_kind, error)
                            .body(),
                    };
                    self.finish(502);
                    self.queued.push_back(Event::default().data("[DONE]"));
                    return Some(json_event(&body));
                }
                None => {
                    self.finish(200);
                    return Some(Event::default().data("[DONE]"));
                }
            }
        }
    }

    fn finish(&mut self, status: u16) {
        self.finished = true;
        self.meta.finish(status, self.usage.as_ref());
    }

    fn chunk<C: Serialize>(&self, choices: Vec<C>, usage: Option<&Usage>) -> Event {
        let object = match self.meta.endpoint {
            Endpoint::ChatCompletions => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        json_event(&Chunk {
            id: self.meta.id.as_str(),
            object,
            created: self.meta.created,
            model: &self.meta.model,
            choices,
            usage: self.meta.include_usage.then_some(usage),
        })
    }

    fn delta_frame(&self, delta: &ChoiceDelta) -> Event {
        match self.meta.endpoint {
            Endpoint::ChatCompletions => self.chunk(
                vec![ChatChunkChoice {
                    index: delta.index,
                    delta: ChatDelta {
                        role: delta.role.as_deref(),
                        content: delta.content.as_deref(),
                        reasoning_content: delta.reasoning_content.as_deref(),
                        tool_calls: delta.tool_calls.as_deref(),
                    },
                    logprobs: delta.logprobs.as_ref(),
                    finish_reason: delta.finish_reason.as_ref(),
                }],
                None,
            ),
            Endpoint::Completions => self.chunk(
                vec![TextChunkChoice {
                    index: delta.index,
                    text: delta.content.as_deref().unwrap_or(""),
                    logprobs: delta.logprobs.as_ref(),
                    finish_reason: delta.finish_reason.as_ref(),
                }],
                None,
            ),
        }
    }

    fn usage_frame(&self, usage: &Usage) -> Event {
        self.chunk::<ChatChunkChoice<'_>>(Vec::new(), Some(usage))
    }
}

impl Drop for StreamState {
    fn drop(&mut self) {
        if !self.finished {
            // The client went away mid-stream; dropping `events` cancels the backend.
            // 499 is nginx's "client closed request", the usual label for this.
            self.meta.finish(499, self.usage.as_ref());
        }
    }
}

fn json_event<T: Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        // Serializing our own types cannot fail; if it ever does, say so in-band.
        Err(err) => Event::default().data(format!(
            "{{\"error\":{{\"message\":\"cannot serialize chunk: {}\",\"type\":\"api_error\",\"param\":null,\"code\":\"internal_error\"}}}}",
            err.to_string().replace(['"', '\\'], "'")
        )),
    }
}
