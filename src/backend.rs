//! The seam between "what the client asked" and "who serves it": the `Backend` trait,
//! the engine-neutral request it receives and the `GenerationEvent` stream it yields.
//!
//! Both the remote gateway client (`upstream`) and the local engine implement
//! [`Backend`]; the router only ever sees this module's types, never HTTP or candle.

use std::{fmt, pin::Pin, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::request_id::RequestId;

/// Which OpenAI endpoint a request came in on; it decides the wire shape of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions` (legacy text completion)
    Completions,
}

impl Endpoint {
    /// The path of this endpoint below a gateway's `/v1` base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat/completions",
            Endpoint::Completions => "completions",
        }
    }

    /// Low-cardinality label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat",
            Endpoint::Completions => "completions",
        }
    }
}

/// One chat message in typed form, for backends that build their own prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant`, `tool` or `function`.
    pub role: String,
    /// Text content; array content is flattened to its text parts.
    pub content: Option<String>,
    /// Optional participant name.
    pub name: Option<String>,
    /// Tool calls made by an assistant message, as sent by the client.
    pub tool_calls: Option<Value>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
    /// Reasoning text of a previous assistant turn (DeepSeek `reasoning_content`).
    pub reasoning_content: Option<String>,
}

impl ChatMessage {
    /// A plain message with text content.
    pub fn text(role: &str, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.to_string(),
            content: Some(content.into()),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            reasoning_content: None,
        }
    }
}

/// What to generate from: a conversation or raw prompts (legacy completions).
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A chat conversation.
    Chat(Vec<ChatMessage>),
    /// One or more text prompts (token-array prompts are kept only in `raw`).
    Text(Vec<String>),
}

/// `stop` as one string or a list; always normalised to a list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StopSequences(pub Vec<String>);

/// Sampling and length settings in typed form, validated by the API layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingParams {
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    pub stop: StopSequences,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Number of choices to generate (`n`), at least 1.
    pub n: u32,
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
}

/// A validated generation request, independent of the backend that will serve it.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Made before dispatch; the response's `id` and the request's id in every log line.
    pub id: RequestId,
    pub endpoint: Endpoint,
    /// The model name exactly as the client sent it.
    pub model: String,
    /// Whether the client asked for SSE.
    pub stream: bool,
    /// Whether the client asked for a final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    /// Whether the request carries `tools` (a capability the local engine may lack).
    pub has_tools: bool,
    /// Set when a backend must continue an answer another backend started and lost: the
    /// assistant text already sent to the client, to be prefilled, never repeated.
    pub continuation: Option<Continuation>,
    /// The client's JSON body, verbatim. A remote forwards it with only `model`,
    /// `stream` and `stream_options` changed, so fields lifeboat does not know survive.
    pub raw: Map<String, Value>,
    /// Who sent it; the local engine admits round-robin across clients.
    pub client: ClientId,
}

impl GenerationRequest {
    /// A streamed chat request with one user message, for callers outside the API (the
    /// CLI, benches, tests); its raw body holds just what a client would have sent.
    pub fn chat(model: &str, user: &str, sampling: SamplingParams) -> GenerationRequest {
        let mut raw = Map::new();
        raw.insert("model".into(), Value::from(model));
        raw.insert(
            "messages".into(),
            serde_json::json!([{"role": "user", "content": user}]),
        );
        if let Some(max) = sampling.max_tokens {
            raw.insert("max_tokens".into(), Value::from(max));
        }
        GenerationRequest {
            id: RequestId::generate(RequestId::CHAT_PREFIX),
            endpoint: Endpoint::ChatCompletions,
            model: model.to_string(),
            stream: true,
            include_usage: true,
            prompt: Prompt::Chat(vec![ChatMessage::text("user", user)]),
            sampling: SamplingParams {
                n: sampling.n.max(1),
                ..sampling
            },
            has_tools: false,
            continuation: None,
            raw,
            client: ClientId::default(),
        }
    }

    /// The bytes of text this request puts in a prompt (before a template adds its own):
    /// messages, tool calls, offered tools and a continuation. Counted without copying;
    /// the local engine refuses by it before tokenizing, the router estimates tokens by it.
    pub fn prompt_bytes(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let mut bytes = match &self.prompt {
            Prompt::Chat(messages) => messages
                .iter()
                .map(|m| {
                    text(&m.content)
                        + text(&m.reasoning_content)
                        + text(&m.name)
                        + text(&m.tool_call_id)
                        + m.tool_calls.as_ref().map_or(0, json_bytes)
                })
                .sum(),
            Prompt::Text(prompts) => prompts.iter().map(String::len).sum(),
        };
        bytes += self.raw.get("tools").map_or(0, json_bytes);
        if let Some(continuation) = &self.continuation {
            bytes += continuation.reasoning.len() + continuation.content.len();
        }
        bytes
    }
}

/// The length of `value` as compact JSON, without building the string.
fn json_bytes(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail; a value that could not be written counts as 0.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Who sent a request, as far as fairness goes: a short, non-secret name. The API layer
/// fills it from the client's API key (a hash prefix) when keys are configured, else from
/// the peer address; callers outside the API (CLI, benches) share the anonymous one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(String);

impl ClientId {
    /// The client that presented `key`: the first 8 bytes of its SHA-256, in hex. The key
    /// itself never leaves the auth layer, and 64 bits of a hash reveal nothing usable.
    pub fn from_api_key(key: &str) -> ClientId {
        use sha2::Digest;
        ClientId::from_key_digest(&sha2::Sha256::digest(key.as_bytes()).into())
    }

    /// [`ClientId::from_api_key`] from the key's SHA-256, when the caller has it already.
    pub fn from_key_digest(digest: &[u8; 32]) -> ClientId {
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        ClientId(format!("key:{hex}"))
    }

    /// The client at `ip` (without keys, an address is all that tells clients apart; the
    /// port is left out, since every connection of one client has its own).
    pub fn from_ip(ip: std::net::IpAddr) -> ClientId {
        ClientId(format!("ip:{ip}"))
    }

    /// A name given by the caller (tests, benches).
    pub fn named(name: impl Into<String>) -> ClientId {
        ClientId(name.into())
    }

    pub fn as_str(&self) -> &str {
        if self.0.is_empty() { "anonymous" } else { &self.0 }
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The part of an answer already delivered to the client.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Continuation {
    pub reasoning: String,
    pub content: String,
}

/// One attempt's request to one backend.
#[derive(Debug, Clone)]
pub struct BackendRequest {
    /// The model name at this backend (a route may rename it).
    pub model: String,
    pub request: Arc<GenerationRequest>,
    /// Deadlines the router derived from what this backend has shown lately; a remote
    /// takes the shorter of these and its configured ones. `None`: configured only.
    pub deadlines: Option<AttemptDeadlines>,
}

impl BackendRequest {
    /// An attempt at `model` under the backend's configured deadlines.
    pub fn new(model: impl Into<String>, request: Arc<GenerationRequest>) -> BackendRequest {
        BackendRequest {
            model: model.into(),
            request,
            deadlines: None,
        }
    }
}

/// Adaptive deadlines of one attempt (see the router's `deadlines` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptDeadlines {
    /// From sending the request to the first output.
    pub first_token: Duration,
    /// Longest gap between two data frames after the first output.
    pub idle: Duration,
}

/// Token accounting reported by a backend for the whole request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Provider extras such as `prompt_tokens_details` or DeepSeek's
    /// `prompt_cache_hit_tokens`, passed through untouched.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Incremental output for one choice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChoiceDelta {
    pub index: u32,
    pub role: Option<String>,
    /// Chat content, or the text of a legacy completion.
    pub content: Option<String>,
    pub reasoning_content: Option<String>,
    /// OpenAI tool-call deltas, passed through as JSON.
    pub tool_calls: Option<Vec<Value>>,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
}

impl ChoiceDelta {
    /// True when this delta carries something a client would see as output. The router
    /// sends nothing to the client before the first such delta (the commit point).
    pub fn is_output(&self) -> bool {
        let non_empty = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
        non_empty(&self.content)
            || non_empty(&self.reasoning_content)
            || self.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
            || self.finish_reason.is_some()
    }
}

/// What every backend yields, whatever it is.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    Delta(ChoiceDelta),
    Usage(Usage),
}

impl GenerationEvent {
    /// See [`ChoiceDelta::is_output`].
    pub fn is_output(&self) -> bool {
        match self {
            GenerationEvent::Delta(delta) => delta.is_output(),
            GenerationEvent::Usage(_) => false,
        }
    }
}

/// The stream a backend hands back. Dropping it cancels the generation.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<GenerationEvent, BackendError>> + Send>>;

/// Where an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The remote gateway.
    Upstream,
    /// The in-process engine.
    Local,
}

/// Which deadline of an attempt ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPhase {
    Connect,
    FirstToken,
    Idle,
    Total,
}

/// What went wrong, in the vocabulary the router decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No connection could be made, or it closed before any response.
    Connect,
    /// One of the attempt's deadlines ran out.
    Timeout(TimeoutPhase),
    /// 429 from the gateway (see `retry_after`), or the local queue is full.
    RateLimited,
    /// 5xx from the gateway, or an error object inside its stream.
    ServerError,
    /// 401/403: the gateway rejected lifeboat's own key.
    Unauthorized,
    /// 402: the gateway account is out of credit.
    PaymentRequired,
    /// 404: the gateway does not know the model (a route configuration problem).
    NotFound,
    /// 400/422: the request itself is bad; the client's mistake, never failed over.
    BadRequest,
    /// A 200 answer carried a frame that is not valid JSON, or passed a size cap.
    MalformedFrame,
    /// The stream ended or broke before it was complete.
    StreamCut,
    /// A 200 answer that ended without any output: `[DONE]` first, no choices, `{}`.
    Empty,
    /// The backend cannot serve at all right now (local model loading or failed).
    Unavailable,
    /// Anything else (a bug or an unexpected status).
    Internal,
}

impl ErrorKind {
    /// Low-cardinality label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout(TimeoutPhase::Connect) => "timeout_connect",
            ErrorKind::Timeout(TimeoutPhase::FirstToken) => "timeout_first_token",
            ErrorKind::Timeout(TimeoutPhase::Idle) => "timeout_idle",
            ErrorKind::Timeout(TimeoutPhase::Total) => "timeout_total",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::ServerError => "server_error",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::PaymentRequired => "payment_required",
            ErrorKind::NotFound => "not_found",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::MalformedFrame => "malformed_frame",
            ErrorKind::StreamCut => "stream_cut",
            ErrorKind::Empty => "empty",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

/// A failed attempt, classified so the router can decide from the value alone.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    pub kind: ErrorKind,
    pub origin: Origin,
    /// Human-readable detail; never contains a secret.
    pub message: String,
    /// The upstream HTTP status, when there was one.
    pub status: Option<u16>,
    /// `Retry-After` (or `retry-after-ms`) of a 429/503, when given.
    pub retry_after: Option<Duration>,
    /// The upstream's OpenAI `param` and `code`, passed back on a client error.
    pub param: Option<String>,
    pub code: Option<String>,
}

impl BackendError {
    /// An error of `kind` from `origin` with a message and nothing else.
    pub fn new(kind: ErrorKind, origin: Origin, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            origin,
            message: message.into(),
            status: None,
            retry_after: None,
            param: None,
            code: None,
        }
    }
}

/// Remote gateway or in-process model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Remote,
    Local,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Remote => "remote",
            BackendKind::Local => "local",
        }
    }
}

/// Whether a backend can take requests now, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    pub readiness: Readiness,
    /// `ready`, a load phase such as `loading`, or the failure.
    pub detail: String,
}

/// Where a backend stands for `/ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Takes requests.
    Ready,
    /// Will take requests once loaded and warm (downloading, loading, warming up).
    Starting,
    /// Will not take requests without a restart (a model that failed to load).
    Failed,
}

/// Anything that can answer a generation request.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// Stable name used in config, headers (`x-lifeboat-backend`) and metrics.
    fn id(&self) -> &str;

    fn kind(&self) -> BackendKind;

    /// Where requests go (a remote's base URL). A reload keeps a backend's breaker and
    /// health history while its id and endpoint stay the same.
    fn endpoint(&self) -> Option<&str> {
        None
    }

    /// Readiness for `/ready`; a remote is ready once configured (health tracking is the
    /// router's job).
    fn status(&self) -> BackendStatus {
        BackendStatus {
            readiness: Readiness::Ready,
            detail: "ready".into(),
        }
    }
    /// The most tokens (prompt and answer) one request may take, if known; the router
    /// skips a target whose window cannot hold a request. Default: unknown.
    fn context_window(&self) -> Option<u32> {
        None
    }

    /// Whether a new request would start at once (a free local slot). Default: yes.
    fn has_capacity(&self) -> bool {
        true
    }

    /// Wait until the backend can take requests; `Err` with the reason when it never will
    /// (a local model that failed to load). Default: at once.
    async fn wait_ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// A cheap health check (a remote: an unbilled `GET /models`). Default: healthy.
    async fn probe(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Start generating. Errors known before the first event (refused connection, HTTP
    /// status) come back here; later ones arrive inside the stream.
    async fn generate(&self, request: BackendRequest) -> Result<EventStream, BackendError>;
}
