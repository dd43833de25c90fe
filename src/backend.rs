//! The seam between "what the client asked" and "who serves it": the `Backend` trait,
//! the engine-neutral request it receives and the `GenerationEvent` stream it yields.
//!
//! Both the remote gateway client (`upstream`) and the local engine implement
//! [`Backend`]; the router only ever sees this module's types, never HTTP or candle.

#![warn(missing_docs)]

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

    /// The prefix of this endpoint's request ids (and of its responses' `id`), as OpenAI's.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => RequestId::CHAT_PREFIX,
            Endpoint::Completions => RequestId::COMPLETION_PREFIX,
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
    /// Sampling temperature; `None`: the backend's default.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Top-k sampling (a vLLM / llama.cpp extension).
    pub top_k: Option<u32>,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
    /// Sequences that end the answer (not included in it).
    pub stop: StopSequences,
    /// OpenAI presence penalty.
    pub presence_penalty: Option<f32>,
    /// OpenAI frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Multiplicative repetition penalty (a vLLM / llama.cpp extension).
    pub repetition_penalty: Option<f32>,
    /// Number of choices to generate (`n`), at least 1.
    pub n: u32,
    /// Whether to return log probabilities of the chosen tokens.
    pub logprobs: bool,
    /// How many alternatives per position to return with `logprobs`.
    pub top_logprobs: Option<u32>,
}

/// A validated generation request, independent of the backend that will serve it.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Made before dispatch; the response's `id` and the request's id in every log line.
    pub id: RequestId,
    /// The endpoint it came in on.
    pub endpoint: Endpoint,
    /// The model name exactly as the client sent it.
    pub model: String,
    /// Whether the client asked for SSE.
    pub stream: bool,
    /// Whether the client asked for a final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// What to generate from.
    pub prompt: Prompt,
    /// Sampling and length settings.
    pub sampling: SamplingParams,
    /// The tools a chat request offers and its `tool_choice`; `None` when it offers none.
    pub tools: Option<Tools>,
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
            tools: None,
            raw,
            client: ClientId::default(),
        }
    }

    /// The bytes of text this request puts in a prompt (before a template adds its own):
    /// messages, tool calls and offered tools. Counted without copying; the local engine
    /// refuses by it before tokenizing, the router estimates tokens by it.
    pub fn prompt_bytes(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let bytes: usize = match &self.prompt {
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
        bytes
            + self
                .tools
                .as_ref()
                .map_or(0, |tools| json_bytes(&tools.definitions))
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

    /// A printable name (`anonymous` for the default).
    pub fn as_str(&self) -> &str {
        if self.0.is_empty() { "anonymous" } else { &self.0 }
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The part of an answer already delivered to the client, which another backend is to
/// continue: prefilled, never repeated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Continuation {
    /// Reasoning text already sent.
    pub reasoning: String,
    /// Answer text already sent.
    pub content: String,
}

/// The tools a chat request offers, parsed once by the API layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// Names of the offered functions, in request order.
    pub functions: Vec<String>,
    /// How the model may use them.
    pub choice: ToolChoice,
    /// The `tools` array as the client sent it: chat templates render definitions (their
    /// JSON Schemas included) verbatim, and a remote forwards the raw body anyway.
    pub definitions: Value,
}

impl Tools {
    /// The functions the model may call, or `None` when it may call none (nothing
    /// offered, or `tool_choice: "none"`).
    pub fn callable(&self) -> Option<&[String]> {
        (self.choice != ToolChoice::None && !self.functions.is_empty()).then_some(self.functions.as_slice())
    }
}

/// `tool_choice`: whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model decides (the default when tools are offered).
    #[default]
    Auto,
    /// The model must not call a tool.
    None,
    /// The model must call some tool.
    Required,
    /// The model must call this function.
    Function(String),
    /// A form lifeboat does not interpret (e.g. a list of allowed tools): a remote gets
    /// it verbatim, the local model treats it as `Auto`.
    Other,
}

/// One attempt's request to one backend.
#[derive(Debug, Clone)]
pub struct BackendRequest {
    /// The model name at this backend (a route may rename it).
    pub model: String,
    /// What the client asked, shared by every attempt.
    pub request: Arc<GenerationRequest>,
    /// Deadlines the router derived from what this backend has shown lately; a remote
    /// takes the shorter of these and its configured ones. `None`: configured only.
    pub deadlines: Option<AttemptDeadlines>,
    /// Set when this attempt continues an answer another backend started and lost.
    pub continuation: Option<Continuation>,
}

impl BackendRequest {
    /// An attempt at `model` under the backend's configured deadlines.
    pub fn new(model: impl Into<String>, request: Arc<GenerationRequest>) -> BackendRequest {
        BackendRequest {
            model: model.into(),
            request,
            deadlines: None,
            continuation: None,
        }
    }

    /// [`GenerationRequest::prompt_bytes`] plus the continuation this attempt prefills.
    pub fn prompt_bytes(&self) -> usize {
        self.request.prompt_bytes()
            + self
                .continuation
                .as_ref()
                .map_or(0, |c| c.reasoning.len() + c.content.len())
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
    /// Tokens in the prompt.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Both together.
    pub total_tokens: u64,
    /// Provider extras such as `prompt_tokens_details` or DeepSeek's
    /// `prompt_cache_hit_tokens`, passed through untouched.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Incremental output for one choice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChoiceDelta {
    /// Which choice (`n` > 1) this belongs to.
    pub index: u32,
    /// `assistant` on a choice's first delta.
    pub role: Option<String>,
    /// Chat content, or the text of a legacy completion.
    pub content: Option<String>,
    /// Reasoning text (DeepSeek `reasoning_content`).
    pub reasoning_content: Option<String>,
    /// Tool-call fragments; a call's pieces share its `index`.
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    /// OpenAI `logprobs` of this delta, as the backend produced it.
    pub logprobs: Option<Value>,
    /// Set on a choice's last delta.
    pub finish_reason: Option<FinishReason>,
}

/// Why a choice ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// A natural end: an end-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The model called tools.
    ToolCalls,
    /// The provider filtered the content.
    ContentFilter,
    /// A reason lifeboat does not know (e.g. DeepSeek's `insufficient_system_resource`),
    /// passed through as the backend said it.
    Other(String),
}

impl FinishReason {
    /// The OpenAI wire value.
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::Other(reason) => reason,
        }
    }

    /// From the OpenAI wire value.
    pub fn from_wire(reason: &str) -> FinishReason {
        match reason {
            "stop" => FinishReason::Stop,
            "length" => FinishReason::Length,
            "tool_calls" => FinishReason::ToolCalls,
            "content_filter" => FinishReason::ContentFilter,
            other => FinishReason::Other(other.to_string()),
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for FinishReason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for FinishReason {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let reason = std::borrow::Cow::<str>::deserialize(deserializer)?;
        Ok(FinishReason::from_wire(&reason))
    }
}

/// A fragment of one tool call: the first carries its id and function name, the ones
/// after it pieces of the arguments, all with the call's `index`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Which call of the choice this fragment belongs to.
    #[serde(default)]
    pub index: u32,
    /// The call's id (first fragment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (first fragment).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The function's name and a piece of its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta>,
    /// Provider extras (e.g. a signature a client must send back), passed through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ToolCallDelta {
    /// Add the next fragment of the same call: the function's name and arguments arrive
    /// in pieces and are concatenated; the other fields are taken when given.
    pub fn absorb(&mut self, next: ToolCallDelta) {
        if next.id.is_some() {
            self.id = next.id;
        }
        if next.kind.is_some() {
            self.kind = next.kind;
        }
        if let Some(piece) = next.function {
            let function = self.function.get_or_insert_with(FunctionCallDelta::default);
            for (whole, piece) in [
                (&mut function.name, piece.name),
                (&mut function.arguments, piece.arguments),
            ] {
                if let Some(piece) = piece {
                    whole.get_or_insert_with(String::new).push_str(&piece);
                }
            }
        }
        self.extra
            .extend(next.extra.into_iter().filter(|(_, value)| !value.is_null()));
    }
}

/// The function part of a [`ToolCallDelta`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionCallDelta {
    /// The function's name (first fragment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A piece of the JSON arguments; the pieces concatenated are the whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
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
    /// Output for one choice.
    Delta(ChoiceDelta),
    /// Token accounting for the whole request (last, when given).
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

/// Which deadline of an attempt ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPhase {
    /// Opening the connection.
    Connect,
    /// From the request to the first output.
    FirstToken,
    /// Between two frames after the first output.
    Idle,
    /// The whole attempt.
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

    /// Every kind, for reading a stored label back ([`ErrorKind::from_label`]).
    pub const ALL: [ErrorKind; 16] = [
        ErrorKind::Connect,
        ErrorKind::Timeout(TimeoutPhase::Connect),
        ErrorKind::Timeout(TimeoutPhase::FirstToken),
        ErrorKind::Timeout(TimeoutPhase::Idle),
        ErrorKind::Timeout(TimeoutPhase::Total),
        ErrorKind::RateLimited,
        ErrorKind::ServerError,
        ErrorKind::Unauthorized,
        ErrorKind::PaymentRequired,
        ErrorKind::NotFound,
        ErrorKind::BadRequest,
        ErrorKind::MalformedFrame,
        ErrorKind::StreamCut,
        ErrorKind::Empty,
        ErrorKind::Unavailable,
        ErrorKind::Internal,
    ];

    /// The kind whose [`ErrorKind::as_str`] is `label` (the usage ledger stores labels).
    pub fn from_label(label: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|kind| kind.as_str() == label)
    }
}

/// A failed attempt, classified so the router can decide from the value alone.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// Human-readable detail; never contains a secret.
    pub message: String,
    /// The upstream HTTP status, when there was one.
    pub status: Option<u16>,
    /// `Retry-After` (or `retry-after-ms`) of a 429/503, when given.
    pub retry_after: Option<Duration>,
    /// The upstream's OpenAI `param`, passed back on a client error.
    pub param: Option<String>,
    /// The upstream's OpenAI `code`, passed back on a client error.
    pub code: Option<String>,
}

impl BackendError {
    /// An error of `kind` with a message and nothing else.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            message: message.into(),
            status: None,
            retry_after: None,
            param: None,
            code: None,
        }
    }
}

/// The id the local model is known by in config, headers and metrics. Code tells local
/// from remote by [`BackendKind`], never by comparing ids with this.
pub const LOCAL_BACKEND_ID: &str = "local";

/// Remote gateway or in-process model: the one way lifeboat says which side served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// A hosted gateway reached over HTTP.
    Remote,
    /// The in-process model.
    Local,
}

impl BackendKind {
    /// Low-cardinality label for metrics and logs.
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
    /// Where it stands.
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

    /// Remote or local.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kind_labels_are_distinct_and_read_back() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_label(kind.as_str()), Some(kind));
        }
        assert_eq!(ErrorKind::from_label("no_such_kind"), None);
    }

    #[test]
    fn finish_reasons_round_trip_including_ones_lifeboat_does_not_know() {
        for wire in [
            "stop",
            "length",
            "tool_calls",
            "content_filter",
            "insufficient_system_resource",
        ] {
            let reason: FinishReason = serde_json::from_value(Value::from(wire)).expect("any string");
            assert_eq!(
                serde_json::to_value(&reason).expect("serializes"),
                Value::from(wire)
            );
        }
        assert_eq!(FinishReason::from_wire("length"), FinishReason::Length);
        assert_eq!(
            FinishReason::from_wire("insufficient_system_resource"),
            FinishReason::Other("insufficient_system_resource".into())
        );
    }

    #[test]
    fn tool_call_fragments_absorb_into_one_call() {
        let fragments: Vec<ToolCallDelta> = serde_json::from_value(serde_json::json!([
            {"index": 1, "id": "c1", "type": "function", "function": {"name": "get_", "arguments": ""}},
            {"index": 1, "function": {"name": "weather", "arguments": "{\"city\":"}, "extra_content": {"sig": "s"}},
            {"index": 1, "function": {"arguments": "\"Paris\"}"}, "extra_content": null},
        ]))
        .expect("fragments");
        let mut whole = ToolCallDelta::default();
        for fragment in fragments {
            whole.absorb(fragment);
        }
        assert_eq!(whole.id.as_deref(), Some("c1"));
        assert_eq!(whole.kind.as_deref(), Some("function"));
        let function = whole.function.expect("function");
        assert_eq!(function.name.as_deref(), Some("get_weather"));
        assert_eq!(function.arguments.as_deref(), Some("{\"city\":\"Paris\"}"));
        assert_eq!(
            whole.extra["extra_content"]["sig"], "s",
            "a provider's extras survive"
        );
    }

    #[test]
    fn tools_are_callable_only_when_offered_and_not_declined() {
        let tools = |functions: &[&str], choice: ToolChoice| Tools {
            functions: functions.iter().map(|f| f.to_string()).collect(),
            choice,
            definitions: Value::Null,
        };
        let offered = ["get_weather", "get_time"];
        let names = vec!["get_weather".to_string(), "get_time".to_string()];
        assert_eq!(
            tools(&offered, ToolChoice::Auto).callable(),
            Some(names.as_slice())
        );
        assert_eq!(
            tools(&offered, ToolChoice::Function("get_time".into())).callable(),
            Some(names.as_slice())
        );
        assert_eq!(
            tools(&offered, ToolChoice::Other).callable(),
            Some(names.as_slice())
        );
        assert_eq!(tools(&offered, ToolChoice::None).callable(), None);
        assert_eq!(tools(&[], ToolChoice::Required).callable(), None);
    }
}
