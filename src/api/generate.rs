//! The generation handlers (`/v1/chat/completions`, `/v1/completions`): validate, hand
//! the request to the router, and answer as one JSON body or as an SSE stream.

use std::{collections::BTreeMap, time::SystemTime};

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::time::Instant;

use super::{
    error::ApiError,
    sse,
    types::{AssistantMessage, ChatChoice, Completion, TextChoice, ToolCall},
    validate,
};
use crate::{
    app::AppState,
    backend::{
        BackendKind, ChoiceDelta, ClientId, Endpoint, FinishReason, GenerationEvent, RequestId,
        ToolCallDelta, Usage,
    },
    metrics::{self, InFlight},
    router::Routed,
};

/// What every response of one request shares.
#[derive(Debug, Clone)]
pub(crate) struct ResponseMeta {
    /// The request's id, made before dispatch; its own part is the response's `id`.
    pub id: RequestId,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
    pub backend: String,
    pub backend_kind: BackendKind,
    pub attempts: u32,
    pub include_usage: bool,
    pub started: Instant,
}

impl ResponseMeta {
    fn new(
        id: RequestId,
        endpoint: Endpoint,
        routed: &Routed,
        include_usage: bool,
        started: Instant,
    ) -> ResponseMeta {
        ResponseMeta {
            id,
            created: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: routed.model.clone(),
            endpoint,
            backend: routed.backend.clone(),
            backend_kind: routed.backend_kind,
            attempts: routed.attempts,
            include_usage,
            started,
        }
    }

    /// Record the end of the request in the metrics and the log (one line per request).
    pub(crate) fn finish(&self, status: u16, usage: Option<&Usage>) {
        let elapsed = self.started.elapsed();
        metrics::request_finished(self.endpoint.as_str(), &self.backend, status, elapsed);
        if let Some(usage) = usage {
            metrics::tokens(&self.backend, usage.prompt_tokens, usage.completion_tokens);
        }
        tracing::info!(
            request_id = %self.id,
            client_request_id = self.id.client(),
            endpoint = self.endpoint.as_str(),
            backend = %self.backend,
            attempts = self.attempts,
            status,
            duration_ms = elapsed.as_millis() as u64,
            prompt_tokens = usage.map(|u| u.prompt_tokens),
            completion_tokens = usage.map(|u| u.completion_tokens),
            "request finished"
        );
    }
}

/// `POST /v1/chat/completions`
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    client: Option<Extension<ClientId>>,
    id: Option<Extension<RequestId>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(state, Endpoint::ChatCompletions, Caller { client, id }, body).await
}

/// `POST /v1/completions`
pub(crate) async fn completions(
    State(state): State<AppState>,
    client: Option<Extension<ClientId>>,
    id: Option<Extension<RequestId>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(state, Endpoint::Completions, Caller { client, id }, body).await
}

/// What the middleware learnt about a request before its handler ran.
struct Caller {
    /// Set by the auth middleware.
    client: Option<Extension<ClientId>>,
    /// Set by the request-id middleware.
    id: Option<Extension<RequestId>>,
}

async fn generate(
    state: AppState,
    endpoint: Endpoint,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let in_flight = InFlight::start();
    // Both middlewares run on every generation route; the fallbacks keep a route that
    // skipped one answering.
    let id = caller
        .id
        .map_or_else(|| RequestId::generate(endpoint.id_prefix()), |Extension(id)| id);
    let request_id = id.clone();
    let result = async move {
        let body = body.map_err(|rejection| body_error(rejection, state.max_body_bytes))?;
        let mut request = validate::parse_as(endpoint, &body, id.clone())?;
        request.client = caller.client.map(|Extension(client)| client).unwrap_or_default();
        let (stream, include_usage) = (request.stream, request.include_usage);
        // One router snapshot for the whole request (a reload swaps in a new one); an
        // unknown model comes back from it as `RouteError::UnknownModel`.
        let routed = state.router().dispatch(request).await?;
        metrics::first_token(&routed.backend, started.elapsed());
        let meta = ResponseMeta::new(id, endpoint, &routed, include_usage, started);
        let headers = [
            ("x-lifeboat-backend", header_value(&routed.backend)),
            ("x-lifeboat-attempts", HeaderValue::from(routed.attempts)),
            (
                "x-lifeboat-fallback-reason",
                HeaderValue::from_static(routed.fallback_reason.unwrap_or("none")),
            ),
        ];
        if stream {
            Ok((headers, sse::respond(routed.events, meta, in_flight)).into_response())
        } else {
            let body = collect(routed, &meta).await?;
            Ok((headers, body).into_response())
        }
    }
    .await;
    if let Err(error) = &result {
        failed(error, endpoint, &request_id, started);
    }
    result
}

/// Count and log a request that ends with an error (a served one is counted when its
/// answer ends, by [`ResponseMeta::finish`]).
fn failed(error: &ApiError, endpoint: Endpoint, request_id: &RequestId, started: Instant) {
    let backend = match error {
        ApiError::Route(crate::router::RouteError::Backend { backend, .. }) => backend.as_str(),
        _ => "none",
    };
    let status = error.status().as_u16();
    let elapsed = started.elapsed();
    metrics::request_finished(endpoint.as_str(), backend, status, elapsed);
    let body = error.body();
    tracing::info!(
        request_id = %request_id,
        client_request_id = request_id.client(),
        endpoint = endpoint.as_str(),
        backend,
        status,
        duration_ms = elapsed.as_millis() as u64,
        error_type = body.kind,
        error_code = body.code.as_deref(),
        "request finished"
    );
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn body_error(rejection: BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit }
    } else {
        ApiError::BadBody(rejection.body_text())
    }
}

/// One choice being assembled from deltas.
#[derive(Debug, Default)]
struct ChoiceAcc {
    content: Option<String>,
    reasoning: Option<String>,
    /// Tool calls by their `index`.
    tool_calls: BTreeMap<u32, ToolCallDelta>,
    logprobs: Option<Value>,
    finish_reason: Option<FinishReason>,
}

impl ChoiceAcc {
    fn add(&mut self, delta: ChoiceDelta) {
        if let Some(text) = delta.content {
            self.content.get_or_insert_with(String::new).push_str(&text);
        }
        if let Some(text) = delta.reasoning_content {
            self.reasoning.get_or_insert_with(String::new).push_str(&text);
        }
        for call in delta.tool_calls.into_iter().flatten() {
            self.tool_calls.entry(call.index).or_default().absorb(call);
        }
        if let Some(logprobs) = delta.logprobs {
            match &mut self.logprobs {
                Some(acc) => merge_logprobs(acc, logprobs),
                None => self.logprobs = Some(logprobs),
            }
        }
        if delta.finish_reason.is_some() {
            self.finish_reason = delta.finish_reason;
        }
    }

    /// The whole chat choice numbered `index`.
    fn into_chat_choice((index, mut acc): (u32, ChoiceAcc)) -> ChatChoice {
        let tool_calls = acc.take_tool_calls();
        ChatChoice {
            index,
            message: AssistantMessage {
                role: "assistant",
                content: acc.content,
                reasoning_content: acc.reasoning,
                tool_calls,
            },
            logprobs: acc.logprobs,
            finish_reason: acc.finish_reason,
        }
    }

    /// The whole text completion choice numbered `index`.
    fn into_text_choice((index, acc): (u32, ChoiceAcc)) -> TextChoice {
        TextChoice {
            index,
            text: acc.content.unwrap_or_default(),
            logprobs: acc.logprobs,
            finish_reason: acc.finish_reason,
        }
    }

    /// The whole tool calls, in index order.
    fn take_tool_calls(&mut self) -> Option<Vec<ToolCall>> {
        let calls: Vec<ToolCall> = std::mem::take(&mut self.tool_calls)
            .into_values()
            .map(ToolCall::from)
            .collect();
        (!calls.is_empty()).then_some(calls)
    }
}

/// Logprobs arrive per chunk as objects of arrays (`content`, `tokens`, …): append them.
fn merge_logprobs(acc: &mut Value, next: Value) {
    match (acc, next) {
        (Value::Object(acc), Value::Object(next)) => {
            for (key, value) in next {
                match (acc.get_mut(&key), value) {
                    (Some(Value::Array(existing)), Value::Array(more)) => existing.extend(more),
                    (_, value) => {
                        acc.insert(key, value);
                    }
                }
            }
        }
        (acc, next) => *acc = next,
    }
}

/// Drain a routed stream into one complete response body.
async fn collect(mut routed: Routed, meta: &ResponseMeta) -> Result<Response, ApiError> {
    let mut choices: BTreeMap<u32, ChoiceAcc> = BTreeMap::new();
    let mut usage: Option<Usage> = None;
    while let Some(event) = routed.events.next().await {
        match event {
            Ok(GenerationEvent::Delta(delta)) => choices.entry(delta.index).or_default().add(delta),
            Ok(GenerationEvent::Usage(u)) => usage = Some(u),
            Err(error) => {
                // Nothing was sent yet, so a late failure is still a clean error response.
                metrics::stream_failed(&meta.backend, error.kind);
                return Err(ApiError::from_stream(&meta.backend, meta.backend_kind, error));
            }
        }
    }
    meta.finish(200, usage.as_ref());
    let response = match meta.endpoint {
        Endpoint::ChatCompletions => Json(Completion {
            id: meta.id.to_string(),
            object: "chat.completion",
            created: meta.created,
            model: meta.model.clone(),
            choices: choices.into_iter().map(ChoiceAcc::into_chat_choice).collect(),
            usage,
        })
        .into_response(),
        Endpoint::Completions => Json(Completion {
            id: meta.id.to_string(),
            object: "text_completion",
            created: meta.created,
            model: meta.model.clone(),
            choices: choices.into_iter().map(ChoiceAcc::into_text_choice).collect(),
            usage,
        })
        .into_response(),
    };
    Ok(response)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tool_call_deltas_merge_by_index() {
        let mut acc = ChoiceAcc::default();
        let pieces = [
            json!([{"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]),
            json!([{"index": 0, "function": {"arguments": "{\"city\":"}}]),
            json!([{"index": 1, "id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
            json!([{"index": 0, "function": {"arguments": "\"Paris\"}"}}]),
        ];
        for piece in pieces {
            let calls: Vec<ToolCallDelta> = serde_json::from_value(piece).expect("tool-call deltas");
            acc.add(ChoiceDelta {
                tool_calls: Some(calls),
                ..ChoiceDelta::default()
            });
        }
        let calls = serde_json::to_value(acc.take_tool_calls()).expect("serializes");
        assert_eq!(
            calls[0],
            json!({"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}})
        );
        assert_eq!(calls[1]["id"], "c2");
    }

    #[test]
    fn logprobs_append() {
        let mut acc = json!({"content": [{"token": "a"}]});
        merge_logprobs(&mut acc, json!({"content": [{"token": "b"}], "refusal": null}));
        assert_eq!(acc["content"].as_array().map(Vec::len), Some(2));
    }
}
