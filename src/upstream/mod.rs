//! The remote backend: an OpenAI-compatible gateway reached over pooled reqwest
//! connections. It always streams from the gateway (so the first-token and idle deadlines
//! apply to every request) and always asks for usage.

pub mod classify;
pub mod keys;
pub mod sse;
pub mod stream;

use std::sync::Once;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::{Serialize, ser::SerializeMap};
use serde_json::Value;
use tokio::time::Instant;

use crate::{
    backend::{Backend, BackendError, BackendKind, BackendRequest, ErrorKind, EventStream},
    config::{ProbeKind, RemoteConfig, Secret},
    request_id::X_REQUEST_ID,
};
use classify::{classify_send_error, classify_status, error_chain};
use keys::{GatewayKey, KeyRing, KeyVerdict};
use stream::{Deadlines, ResponseLimits};

/// Largest error body read from the gateway; the rest is not needed for a message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// One remote gateway.
#[derive(Debug)]
pub struct RemoteBackend {
    id: String,
    /// Base URL with a trailing `/`, so joining `chat/completions` keeps its `/v1`.
    base_url: reqwest::Url,
    /// Its keys (none for a gateway without auth), rotated on 429/402/401.
    keys: KeyRing,
    client: reqwest::Client,
    config: RemoteConfig,
}

impl RemoteBackend {
    /// Build the client for `config` (already validated) with one key (or none).
    pub fn new(
        id: impl Into<String>,
        config: &RemoteConfig,
        api_key: Option<Secret>,
    ) -> Result<Self, BackendError> {
        let id = id.into();
        let keys = api_key
            .map(|secret| GatewayKey::new(secret, format!("remotes.{id}.api_key_env")))
            .transpose()
            .map_err(|message| BackendError::new(ErrorKind::Unauthorized, message))?;
        RemoteBackend::with_keys(id, config, keys.into_iter().collect())
    }

    /// Build the client for `config` (already validated) with its resolved `keys`, used
    /// round-robin (see [`keys`]); a key that got 401/402 is parked for `key_cooldown`.
    pub fn with_keys(
        id: impl Into<String>,
        config: &RemoteConfig,
        keys: Vec<GatewayKey>,
    ) -> Result<Self, BackendError> {
        let mut base = config.base_url.trim_end_matches('/').to_string();
        base.push('/');
        let base_url = reqwest::Url::parse(&base).map_err(|err| {
            BackendError::new(
                ErrorKind::Internal,
                format!("bad base URL {:?}: {err}", crate::config::redact_text(&base)),
            )
        })?;
        install_crypto_provider();
        let client = reqwest::Client::builder()
            .user_agent(concat!("lifeboat/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .tcp_nodelay(true)
            .build()
            .map_err(|err| {
                BackendError::new(
                    ErrorKind::Internal,
                    format!("cannot build HTTP client: {}", error_chain(&err)),
                )
            })?;
        Ok(RemoteBackend {
            id: id.into(),
            base_url,
            keys: KeyRing::new(keys, config.key_cooldown),
            client,
            config: config.clone(),
        })
    }

    /// The body sent upstream: the client's JSON with the gateway's model name, streaming
    /// forced on and usage always requested (stripped later if the client did not ask).
    fn upstream_body(request: &BackendRequest) -> UpstreamBody<'_> {
        let mut options = match request.request.raw.get("stream_options") {
            Some(Value::Object(map)) => map.clone(),
            _ => serde_json::Map::new(),
        };
        options.insert("include_usage".into(), Value::Bool(true));
        UpstreamBody {
            raw: &request.request.raw,
            model: &request.model,
            stream_options: options,
        }
    }
}

/// Serializes the client's body with the three overridden fields, without copying it.
struct UpstreamBody<'a> {
    raw: &'a serde_json::Map<String, Value>,
    model: &'a str,
    stream_options: serde_json::Map<String, Value>,
}

impl Serialize for UpstreamBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        const OVERRIDDEN: [&str; 3] = ["model", "stream", "stream_options"];
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in self.raw {
            if !OVERRIDDEN.contains(&key.as_str()) {
                map.serialize_entry(key, value)?;
            }
        }
        map.serialize_entry("model", self.model)?;
        map.serialize_entry("stream", &true)?;
        map.serialize_entry("stream_options", &self.stream_options)?;
        map.end()
    }
}

/// reqwest is built without a default crypto provider (ring builds far faster than
/// aws-lc here); install ring once per process.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // An error only means another provider was installed first, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[async_trait]
impl Backend for RemoteBackend {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Remote
    }

    fn endpoint(&self) -> Option<&str> {
        Some(self.base_url.as_str())
    }

    fn context_window(&self) -> Option<u32> {
        self.config.context_window
    }

    /// `GET {base}/models` by default: unbilled, and it exercises DNS, TLS, the key and the gateway's
    /// front end. Any non-2xx — a 400 or 401 included — is a failure, not "reachable". With
    /// `probe = "chat"`, a one-token chat completion instead (billed, but proves the model
    /// answers).
    async fn probe(&self) -> Result<(), BackendError> {
        fn internal(err: impl std::fmt::Display) -> BackendError {
            BackendError::new(ErrorKind::Internal, err.to_string())
        }
        let mut builder = match self.config.probe {
            ProbeKind::Models => self.client.get(self.base_url.join("models").map_err(internal)?),
            ProbeKind::Chat => {
                let model = self
                    .config
                    .probe_model
                    .clone()
                    .or_else(|| self.config.models.first().cloned())
                    .unwrap_or_default();
                let body = serde_json::json!({
                    "model": model,
                    "messages": [{"role": "user", "content": "ping"}],
                    "max_tokens": 1,
                    "stream": false,
                });
                self.client
                    .post(self.base_url.join("chat/completions").map_err(internal)?)
                    .json(&body)
            }
        };
        // An unparked key if there is one (see `KeyRing::probe_key`).
        let key = self.keys.probe_key();
        if let Some(key) = key {
            builder = builder.header(AUTHORIZATION, key.header.clone());
        }
        let deadline = self.config.connect_timeout + self.config.first_token_timeout;
        let response = match tokio::time::timeout(deadline, builder.send()).await {
            Err(_) => {
                return Err(BackendError::new(
                    ErrorKind::Timeout(crate::backend::TimeoutPhase::FirstToken),
                    "probe timed out",
                ));
            }
            Ok(Err(err)) => return Err(classify_send_error(&err)),
            Ok(Ok(response)) => response,
        };
        if response.status().is_success() {
            if let Some(key) = key {
                self.keys.unpark(key);
            }
            return Ok(());
        }
        let status = response.status();
        let headers = response.headers().clone();
        let body = read_limited(response, Instant::now() + deadline).await;
        let error = classify_status(status, &headers, &body, key.map(|k| k.secret.expose()));
        if let Some(key) = key
            && KeyVerdict::of_status(error.status) == KeyVerdict::Park
        {
            self.keys.park(key, &self.id, &error);
        }
        Err(error)
    }

    /// One attempt as the router sees it: with several keys, a 429, 402 or 401 moves on
    /// to the next key within the attempt's own first-token deadline, and only when every
    /// key is spent does the attempt fail (with the last status, so the router fails over).
    async fn generate(&self, request: BackendRequest) -> Result<EventStream, BackendError> {
        let deadlines = self.deadlines(&request);
        let url = self
            .base_url
            .join(request.request.endpoint.path())
            .map_err(|err| BackendError::new(ErrorKind::Internal, err.to_string()))?;
        let body = serde_json::to_vec(&Self::upstream_body(&request))
            .map_err(|err| BackendError::new(ErrorKind::Internal, err.to_string()))?;
        let call = Call {
            url,
            body: Bytes::from(body),
            // The client's `x-request-id` (else lifeboat's), so the gateway's logs join ours.
            request_id: HeaderValue::from_str(request.request.id.header_value()).ok(),
        };
        let response = if self.keys.is_empty() {
            self.send(&call, None, &deadlines).await?
        } else {
            self.send_rotating(&call, &deadlines).await?
        };
        let is_json = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let limits = ResponseLimits::from(&self.config);
        if is_json {
            // A gateway that ignored `stream: true` and answered in one piece.
            let body = stream::read_json_body(response, &deadlines, limits.max_json_body_bytes).await?;
            return Ok(stream::json_events(&body));
        }
        Ok(stream::sse_events(
            Box::pin(response.bytes_stream()),
            deadlines,
            limits,
        ))
    }
}

// === impl RemoteBackend: sending ===

impl RemoteBackend {
    /// The configured deadlines, shortened (never lengthened) by the router's adaptive ones.
    fn deadlines(&self, request: &BackendRequest) -> Deadlines {
        let adaptive = request.deadlines;
        Deadlines {
            started: Instant::now(),
            first_token: adaptive.map_or(self.config.first_token_timeout, |d| {
                d.first_token.min(self.config.first_token_timeout)
            }),
            idle: adaptive.map_or(self.config.idle_timeout, |d| d.idle.min(self.config.idle_timeout)),
            total: self.config.total_timeout,
        }
    }

    /// Send with each usable key in turn until one gets past the status line.
    async fn send_rotating(
        &self,
        call: &Call,
        deadlines: &Deadlines,
    ) -> Result<reqwest::Response, BackendError> {
        let mut attempt = self.keys.attempt();
        let mut last: Option<BackendError> = None;
        while let Some(key) = attempt.next_key() {
            crate::metrics::gateway_key_request(&self.id, &key.fingerprint);
            let error = match self.send(call, Some(key), deadlines).await {
                Ok(response) => return Ok(response),
                Err(error) => error,
            };
            match KeyVerdict::of_status(error.status) {
                // Not about the key: another key would fare no better.
                KeyVerdict::Keep => return Err(error),
                KeyVerdict::TryNext => {}
                KeyVerdict::Park => self.keys.park(key, &self.id, &error),
            }
            tracing::debug!(backend = %self.id, key = %key.fingerprint, status = ?error.status, "trying the gateway's next key");
            last = Some(error);
        }
        // Either the last key's own answer, or (no key was usable at all) the status that
        // parked the last of them.
        Err(last.unwrap_or_else(|| self.keys.all_parked_error()))
    }

    /// One HTTP call with `key`; `Ok` once a 2xx status line arrived.
    async fn send(
        &self,
        call: &Call,
        key: Option<&GatewayKey>,
        deadlines: &Deadlines,
    ) -> Result<reqwest::Response, BackendError> {
        let mut builder = self
            .client
            .post(call.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .body(call.body.clone());
        if let Some(request_id) = &call.request_id {
            builder = builder.header(X_REQUEST_ID, request_id.clone());
        }
        if let Some(key) = key {
            builder = builder.header(AUTHORIZATION, key.header.clone());
        }
        let (response_deadline, phase) = deadlines.next(false, deadlines.started);
        let response = match tokio::time::timeout_at(response_deadline, builder.send()).await {
            Err(_) => return Err(deadlines.timeout_error(phase)),
            Ok(Err(err)) => return Err(classify_send_error(&err)),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let headers = response.headers().clone();
        let body = read_limited(response, response_deadline).await;
        Err(classify_status(
            status,
            &headers,
            &body,
            key.map(|k| k.secret.expose()),
        ))
    }
}

/// What every HTTP call of one attempt sends, whichever key it goes with.
#[derive(Debug)]
struct Call {
    url: reqwest::Url,
    body: Bytes,
    request_id: Option<HeaderValue>,
}

/// Read at most [`MAX_ERROR_BODY`] bytes of an error response before `deadline`.
async fn read_limited(response: reqwest::Response, deadline: Instant) -> Vec<u8> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    let read = async {
        while let Some(Ok(chunk)) = chunks.next().await {
            body.extend_from_slice(&chunk);
            if body.len() >= MAX_ERROR_BODY {
                body.truncate(MAX_ERROR_BODY);
                break;
            }
        }
    };
    // A gateway that sends a status and then stalls still gets classified by its status.
    let _ = tokio::time::timeout_at(deadline, read).await;
    body
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::{Endpoint, GenerationRequest, Prompt, RequestId, SamplingParams};

    #[test]
    fn upstream_body_renames_model_and_forces_usage_keeping_unknown_fields() {
        let raw = serde_json::json!({
            "model": "public", "messages": [], "stream": false,
            "stream_options": {"include_usage": false, "future_option": 1},
            "brand_new_field": {"x": [1, 2]}
        });
        let Value::Object(raw) = raw else { unreachable!() };
        let request = BackendRequest::new(
            "deepseek-chat",
            Arc::new(GenerationRequest {
                id: RequestId::generate(RequestId::CHAT_PREFIX),
                endpoint: Endpoint::ChatCompletions,
                model: "public".into(),
                stream: false,
                include_usage: false,
                prompt: Prompt::Chat(vec![]),
                sampling: SamplingParams::default(),
                tools: None,
                raw,
                client: Default::default(),
            }),
        );
        let body = serde_json::to_value(RemoteBackend::upstream_body(&request)).expect("serializes");
        assert_eq!(body["model"], "deepseek-chat");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["stream_options"]["future_option"], 1);
        assert_eq!(body["brand_new_field"]["x"][1], 2);
    }

    #[test]
    fn base_url_keeps_its_path() {
        let config = RemoteConfig {
            base_url: "http://127.0.0.1:1/v1".into(),
            ..RemoteConfig::default()
        };
        let backend = RemoteBackend::new("g", &config, None).expect("builds");
        let url = backend
            .base_url
            .join(Endpoint::ChatCompletions.path())
            .expect("joins");
        assert_eq!(url.as_str(), "http://127.0.0.1:1/v1/chat/completions");
    }
}
