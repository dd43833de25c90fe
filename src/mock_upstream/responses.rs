//! The mock's answers: deterministic completions (streamed or whole, with usage) and
//! the responses of each fault mode.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use super::{FaultMode, MockSettings, Shared};

pub(super) fn error_response(status: StatusCode, kind: &str, message: &str, code: Option<&str>) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

fn authorized(settings: &MockSettings, headers: &HeaderMap) -> bool {
    let Some(key) = &settings.api_key else { return true };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {key}"))
}

/// Count the request, then answer it with the fault of the current mode or a 401 for a
/// wrong key; `Ok` means it should be served normally.
async fn admit(
    shared: &Shared,
    path: &str,
    headers: &HeaderMap,
    body: &Value,
) -> Result<(FaultMode, MockSettings), Response> {
    let (mode, settings) = shared.admit(path, headers, body);
    if let Some(response) = fault_response(mode, &settings).await {
        return Err(response);
    }
    if !authorized(&settings, headers) {
        return Err(error_response(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Incorrect API key provided.",
            Some("invalid_api_key"),
        ));
    }
    Ok((mode, settings))
}

pub(super) async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let settings = match admit(&shared, "/v1/models", &headers, &Value::Null).await {
        Ok((_, settings)) => settings,
        Err(response) => return response,
    };
    let data: Vec<Value> = settings
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "mock"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// The answer for a mode that fails before any content; `None` for modes that stream.
async fn fault_response(mode: FaultMode, settings: &MockSettings) -> Option<Response> {
    let server_error =
        |status: StatusCode, message: &str| Some(error_response(status, "server_error", message, None));
    match mode {
        FaultMode::Http500 => server_error(StatusCode::INTERNAL_SERVER_ERROR, "mock: internal server error"),
        FaultMode::Http503 => server_error(StatusCode::SERVICE_UNAVAILABLE, "mock: service unavailable"),
        FaultMode::Http429 => {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "mock: rate limit reached",
                Some("rate_limit_exceeded"),
            );
            let secs = settings.retry_after.as_secs_f64().ceil() as u64;
            response.headers_mut().insert(header::RETRY_AFTER, secs.into());
            Some(response)
        }
        FaultMode::Http402 => Some(error_response(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_quota",
            "mock: insufficient balance",
            Some("insufficient_quota"),
        )),
        FaultMode::Http401 => Some(error_response(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "mock: authentication fails",
            Some("invalid_api_key"),
        )),
        FaultMode::HugeRetryAfter => {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "mock: rate limit reached, come back in 1e30 seconds",
                Some("rate_limit_exceeded"),
            );
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1e30"));
            headers.insert("retry-after-ms", header::HeaderValue::from_static("1e30"));
            Some(response)
        }
        FaultMode::LeakyError => server_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("mock: upstream failure for key {LEAKED_KEY} Org {LEAKED_ORG} at {LEAKED_URL}"),
        ),
        FaultMode::JsonEmptyObject => Some(Json(json!({})).into_response()),
        FaultMode::GiantBody => Some(
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(giant_body(settings.giant_bytes))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        ),
        FaultMode::Hang => std::future::pending().await,
        _ => None,
    }
}

/// What `leaky_error` puts in its error text, for tests to look for.
pub const LEAKED_KEY: &str = "sk-live-4f9a8b7c6d5e";
pub const LEAKED_ORG: &str = "org-internal-42";
pub const LEAKED_URL: &str = "http://10.1.2.3:8000/internal";

/// `bytes` of `x` in 64 KiB pieces made on demand (the mock never holds them), wrapped in
/// `prefix` and `suffix`.
fn giant_stream(
    prefix: &'static str,
    bytes: u64,
    suffix: &'static str,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send {
    const PIECE: usize = 64 * 1024;
    let piece = Bytes::from(vec![b'x'; PIECE]);
    let pieces = bytes.div_ceil(PIECE as u64);
    let body = futures_util::stream::iter(0..pieces).map(move |_| Ok(piece.clone()));
    futures_util::stream::once(async move { Ok(Bytes::from_static(prefix.as_bytes())) })
        .chain(body)
        .chain(futures_util::stream::once(async move {
            Ok(Bytes::from_static(suffix.as_bytes()))
        }))
}

fn giant_body(bytes: u64) -> Body {
    Body::from_stream(giant_stream(
        r#"{"id":"mock-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":""#,
        bytes,
        r#""},"finish_reason":"stop"}]}"#,
    ))
}

pub(super) async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    generate(shared, headers, body, true).await
}

pub(super) async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(shared, headers, body, false).await
}

/// The deterministic text: token `i` of every answer is always the same word.
pub fn mock_token(i: u32) -> &'static str {
    const WORDS: [&str; 12] = [
        "Life", "boat", " keeps", " the", " lights", " on", " when", " the", " gateway", " goes", " dark",
        ".",
    ];
    WORDS[i as usize % WORDS.len()]
}

/// The full answer text for `n` tokens.
pub fn mock_text(n: u32) -> String {
    (0..n).map(mock_token).collect()
}

async fn generate(shared: Arc<Shared>, headers: HeaderMap, body: Bytes, chat: bool) -> Response {
    let path = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (mode, settings) = match admit(&shared, path, &headers, &parsed).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let Value::Object(request) = parsed else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "mock: body is not a JSON object",
            None,
        );
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !settings.models.contains(&model) {
        return error_response(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            &format!("The model `{model}` does not exist"),
            Some("model_not_found"),
        );
    }
    let requested = request
        .get("max_completion_tokens")
        .or_else(|| request.get("max_tokens"))
        .and_then(Value::as_u64);
    if let Some(requested) = requested.filter(|m| *m > settings.max_tokens_limit) {
        let message = format!(
            "Invalid max_tokens value, the valid range of max_tokens is [1, {}], got {requested}",
            settings.max_tokens_limit
        );
        let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": "max_tokens", "code": "invalid_value"}});
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    }
    let max = requested.map_or(u32::MAX, |m| m.min(u64::from(u32::MAX)) as u32);
    let completion_tokens = settings.tokens.min(max);
    let finish_reason = if completion_tokens < settings.tokens {
        "length"
    } else {
        "stop"
    };
    let prompt_tokens = count_prompt_words(&request);
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + u64::from(completion_tokens),
    });
    let answer = Answer {
        chat,
        model,
        completion_tokens,
        finish_reason,
        usage,
        include_usage: request
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    let stream = request.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let first_delay = if mode == FaultMode::Slow {
        settings.slow_first_token
    } else {
        settings.first_token_delay
    };
    if !stream {
        // The whole answer is ready when its last token would have been streamed.
        let mut pace = TokenPace::new(first_delay, settings.inter_token_delay);
        for _ in 0..completion_tokens {
            pace.advance();
        }
        pace.wait().await;
        return Json(answer.full()).into_response();
    }
    let body = stream_body(mode, &settings, answer, first_delay);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The SSE body of a streamed answer in `mode`: the answer itself (cut, stalled or late
/// in the modes that do that) or the fault's own bytes.
fn stream_body(mode: FaultMode, settings: &MockSettings, answer: Answer, first_delay: Duration) -> Body {
    match mode {
        FaultMode::Keepalive => {
            let interval = settings.keepalive_interval;
            Body::from_stream(futures_util::stream::unfold((), move |()| async move {
                tokio::time::sleep(interval).await;
                Some((Ok::<_, Infallible>(Bytes::from_static(b": keep-alive\n\n")), ()))
            }))
        }
        FaultMode::EmptyStream => Body::from("data: [DONE]\n\n"),
        FaultMode::GiantLine => Body::from_stream(giant_stream(
            r#"data: {"id":"mock-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":""#,
            settings.giant_bytes,
            "",
        )),
        FaultMode::EndlessStream => {
            let chunk = answer.token_chunk(0);
            let role = answer.role_chunk();
            Body::from_stream(
                futures_util::stream::once(async move { Ok::<_, Infallible>(role) })
                    .chain(futures_util::stream::repeat_with(move || Ok(chunk.clone()))),
            )
        }
        FaultMode::Malformed => Body::from(
            "data: {\"id\":\"mock\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\n\ndata: [DONE]\n\n",
        ),
        _ => {
            let cut = match mode {
                FaultMode::MidstreamCut => Some(Cut::Drop(settings.cut_after)),
                FaultMode::Stall => Some(Cut::Stall(settings.cut_after)),
                _ => None,
            };
            // Like DeepSeek under load: `: keep-alive` comments while the first token is late.
            let keepalive = (mode == FaultMode::Slow).then_some(settings.keepalive_interval);
            answer_stream(answer, first_delay, settings.inter_token_delay, cut, keepalive)
        }
    }
}

fn count_prompt_words(request: &serde_json::Map<String, Value>) -> u64 {
    fn words(value: &Value) -> u64 {
        match value {
            Value::String(s) => s.split_whitespace().count() as u64,
            Value::Array(items) => items.iter().map(words).sum(),
            Value::Object(map) => map.get("content").or_else(|| map.get("text")).map_or(0, words),
            _ => 0,
        }
    }
    request
        .get("messages")
        .or_else(|| request.get("prompt"))
        .map_or(0, words)
}

struct Answer {
    chat: bool,
    model: String,
    completion_tokens: u32,
    finish_reason: &'static str,
    usage: Value,
    include_usage: bool,
}

impl Answer {
    fn full(&self) -> Value {
        let text = mock_text(self.completion_tokens);
        let choice = if self.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": self.finish_reason})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": self.finish_reason})
        };
        json!({
            "id": "mock-1", "object": if self.chat { "chat.completion" } else { "text_completion" },
            "created": 1_700_000_000, "model": self.model, "choices": [choice], "usage": self.usage,
        })
    }

    /// One `data: {chunk}` frame. Serialized from borrowed structs rather than built as a
    /// `Value`: the mock stands in for a remote gateway, so the CPU it takes from the
    /// machine it shares with lifeboat in benchmarks should be small.
    fn chunk(&self, role: Option<&str>, text: &str, finish_reason: Option<&str>) -> Bytes {
        let frame = if self.chat {
            let choice = DeltaChoice {
                index: 0,
                delta: Delta {
                    role,
                    content: (finish_reason.is_none()).then_some(text),
                },
                logprobs: None,
                finish_reason,
            };
            serde_json::to_vec(&ChunkFrame::new(self, "chat.completion.chunk", choice))
        } else {
            let choice = TextChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason,
            };
            serde_json::to_vec(&ChunkFrame::new(self, "text_completion", choice))
        };
        let json = frame.unwrap_or_default();
        let mut bytes = Vec::with_capacity(json.len() + 8);
        bytes.extend_from_slice(b"data: ");
        bytes.extend_from_slice(&json);
        bytes.extend_from_slice(b"\n\n");
        Bytes::from(bytes)
    }

    fn role_chunk(&self) -> Bytes {
        self.chunk(Some("assistant"), "", None)
    }

    fn token_chunk(&self, i: u32) -> Bytes {
        self.chunk(None, mock_token(i), None)
    }

    fn finish_chunk(&self) -> Bytes {
        self.chunk(None, "", Some(self.finish_reason))
    }
}

#[derive(Serialize)]
struct ChunkFrame<'a, C> {
    id: &'static str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [C; 1],
}

impl<'a, C> ChunkFrame<'a, C> {
    fn new(answer: &'a Answer, object: &'static str, choice: C) -> Self {
        ChunkFrame {
            id: "mock-1",
            object,
            created: 1_700_000_000,
            model: &answer.model,
            choices: [choice],
        }
    }
}

#[derive(Serialize)]
struct DeltaChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

/// A chat delta: `role` only in the first chunk, no `content` in the finish chunk.
#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

/// The SSE body: role chunk, one chunk per token, finish chunk, usage chunk if asked,
/// `[DONE]`. With a `cut` the body fails (or stalls) after `k` tokens. With `keepalive = Some(interval)` the wait for the first token is
/// filled with `: keep-alive` comments.
/// How an answer stops early: after `k` content chunks the connection drops, or stays
/// open with nothing more sent.
#[derive(Debug, Clone, Copy)]
enum Cut {
    Drop(u32),
    Stall(u32),
}

fn answer_stream(
    answer: Answer,
    first_delay: Duration,
    inter_delay: Duration,
    cut: Option<Cut>,
    keepalive: Option<Duration>,
) -> Body {
    let comments = match keepalive.filter(|i| !i.is_zero()) {
        Some(interval) => {
            let count = (first_delay.as_nanos() / interval.as_nanos()) as u32;
            let rest = first_delay.saturating_sub(interval * count);
            let comments = futures_util::stream::iter(0..count).then(move |_| async move {
                tokio::time::sleep(interval).await;
                Ok(Bytes::from_static(b": keep-alive\n\n"))
            });
            (comments.boxed(), rest)
        }
        None => (futures_util::stream::empty().boxed(), first_delay),
    };
    let (comments, first_delay) = comments;
    Body::from_stream(comments.chain(token_stream(answer, first_delay, inter_delay, cut)))
}

fn token_stream(
    answer: Answer,
    first_delay: Duration,
    inter_delay: Duration,
    cut: Option<Cut>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    // Step 0: role chunk; 1..=n: tokens; n+1: finish; n+2: usage; n+3: [DONE].
    let n = answer.completion_tokens;
    let pace = TokenPace::new(first_delay, inter_delay);
    futures_util::stream::unfold((answer, 0u32, pace), move |(answer, step, mut pace)| async move {
        if let Some(Cut::Stall(k)) = cut
            && step == k + 1
        {
            std::future::pending::<()>().await;
        }
        if let Some(Cut::Drop(k)) = cut
            && step == k + 1
        {
            // Let hyper flush the chunks already written, so the client really receives
            // `k` chunks before the connection drops.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Some((
                Err(std::io::Error::other("mock: connection cut mid-stream")),
                (answer, u32::MAX, pace),
            ));
        }
        let bytes = match step {
            u32::MAX => return None,
            0 => {
                if answer.chat {
                    answer.role_chunk()
                } else {
                    Bytes::new()
                }
            }
            s if s <= n => {
                pace.advance();
                pace.wait().await;
                answer.token_chunk(s - 1)
            }
            s if s == n + 1 => answer.finish_chunk(),
            s if s == n + 2 => {
                if answer.include_usage {
                    let object = if answer.chat { "chat.completion.chunk" } else { "text_completion" };
                    let chunk = json!({"id": "mock-1", "object": object, "created": 1_700_000_000, "model": answer.model, "choices": [], "usage": answer.usage});
                    Bytes::from(format!("data: {chunk}\n\n"))
                } else {
                    Bytes::new()
                }
            }
            s if s == n + 3 => Bytes::from_static(b"data: [DONE]\n\n"),
            _ => return None,
        };
        Some((Ok(bytes), (answer, step + 1, pace)))
    })
    .filter(|item| std::future::ready(!matches!(item, Ok(b) if b.is_empty())))
}

/// When each token is due, counted from the start of the answer like a gateway that
/// generates at its own rate: a reader that is late does not push later tokens back.
/// (Sleeping for each gap in turn would add the reader's delay and up to a 1 ms timer tick
/// per token, which made the mock slower than its settings under load.)
#[derive(Debug)]
struct TokenPace {
    start: tokio::time::Instant,
    due: Duration,
    first_delay: Duration,
    inter_delay: Duration,
    tokens: u32,
}

impl TokenPace {
    fn new(first_delay: Duration, inter_delay: Duration) -> Self {
        TokenPace {
            start: tokio::time::Instant::now(),
            due: Duration::ZERO,
            first_delay,
            inter_delay,
            tokens: 0,
        }
    }

    /// Move to the next token's due time.
    fn advance(&mut self) {
        self.due += if self.tokens == 0 {
            self.first_delay
        } else {
            self.inter_delay
        };
        self.tokens += 1;
    }

    /// Wait until the current token is due; a token already due is not delayed (a timer
    /// would still wait for its next tick).
    async fn wait(&self) {
        let deadline = self.start + self.due;
        if deadline > tokio::time::Instant::now() {
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokens_are_due_from_the_start_so_a_late_reader_does_not_push_them_back() {
        let start = tokio::time::Instant::now();
        let mut pace = TokenPace::new(Duration::from_millis(20), Duration::from_millis(5));
        pace.advance();
        pace.wait().await;
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        // The reader takes 12 ms over the first token: tokens 2 and 3 (due at 25 and 30 ms)
        // are already due, token 4 comes at 35 ms.
        tokio::time::sleep(Duration::from_millis(12)).await;
        for due_ms in [32, 32, 35] {
            pace.advance();
            pace.wait().await;
            assert_eq!(start.elapsed(), Duration::from_millis(due_ms));
        }
    }
}
