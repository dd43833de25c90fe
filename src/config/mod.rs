//! lifeboat's configuration: one strict TOML file, defaults that start with no file at
//! all, overrides from flags and `LIFEBOAT_*` variables, and secrets only by reference.
//!
//! Precedence, highest first: command-line flags, environment (clap reads both into
//! [`Overrides`]), the file, the defaults below. Every error names the key path.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

mod model_spec;
mod secret;
mod validate;

pub use model_spec::{DEFAULT_MODEL, HubFile, ModelSpec};
pub use secret::{EnvSource, ProcessEnv, Secret, read_secret_file, redact_text, resolve_secret};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    /// Remote OpenAI-compatible gateways by name, e.g. `[remotes.gateway]`.
    pub remotes: BTreeMap<String, RemoteConfig>,
    /// Public model names, aliases and renames, e.g. `[[routes]]`.
    pub routes: Vec<RouteConfig>,
    /// The in-process model, `[local]`.
    pub local: LocalConfig,
    /// Failover and breaker settings, `[router]`.
    pub router: RouterConfig,
    /// Breaker alerts, `[alerts]`.
    pub alerts: AlertsConfig,
}

/// `[alerts]`: where breaker state changes are posted.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Environment variables that each hold one webhook URL (Slack-compatible JSON is
    /// posted). URLs carry tokens, so they are secrets and never written in the file.
    pub webhook_envs: Vec<String>,
}

/// `[router]`: when a remote counts as failing and how long it is left alone.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Consecutive failures that open a remote's breaker. Default 3.
    pub failure_threshold: u32,
    /// First cooldown of an open breaker before one trial (the probe's, when probing is on,
    /// which costs one unbilled `GET /models`). Default 1 s.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Cooldowns double on repeated trips, up to this: a recovered gateway is back within
    /// it. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub max_cooldown: Duration,
    /// Error share over the last minute that opens a breaker (with at least
    /// `error_rate_min_requests` outcomes); above 1 turns the rate trigger off. Default 0.5.
    pub error_rate_threshold: f64,
    /// Outcomes needed before the error rate counts. Default 4.
    pub error_rate_min_requests: u32,
    /// Extra attempts on the same remote for fast transient failures. Default 1.
    pub max_retries: u32,
    /// First backoff bound; doubles per retry (full jitter). Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Largest backoff bound. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Longest `Retry-After` lifeboat waits for; longer fails over at once. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub retry_after_cap: Duration,
    /// Retries allowed as a fraction of requests in the last 10 s. Default 0.2.
    pub retry_budget_ratio: f64,
    /// Retries allowed in any 10 s on top of the ratio. Default 10.
    pub retry_budget_floor: u32,
    /// Interval of the active probe of each remote (`GET /models`); "0s" turns it off.
    /// Default 10 s.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            failure_threshold: 3,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(2),
            error_rate_threshold: 0.5,
            error_rate_min_requests: 4,
            max_retries: 1,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            retry_after_cap: Duration::from_secs(2),
            retry_budget_ratio: 0.2,
            retry_budget_floor: 10,
            probe_interval: Duration::from_secs(10),
        }
    }
}

/// `[local]`: the model lifeboat runs itself.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Model folder, `.gguf` file or Hugging Face repo (`owner/name[:QUANT]`). None: no
    /// local model (`lifeboat serve` then uses the default DeepSeek model unless `none`).
    pub model: Option<PathBuf>,
    /// Name clients use for it; defaults to the folder name.
    pub served_model_name: Option<String>,
    /// Chat template to use instead of the model's own: a Jinja file, or a `.gguf` file or
    /// model folder whose template to take (e.g. a DeepSeek-R1 template for another model).
    pub chat_template: Option<PathBuf>,
    /// Requests that may wait while others run; beyond it, 429 with `Retry-After`. Default 16.
    pub queue_capacity: usize,
    /// Sequences decoded together in one step (continuous batching). Default 8.
    pub max_batch: usize,
    /// Memory, in MiB, that the KV caches of running sequences may take: requests beyond it
    /// wait in the queue, and a sequence that grows past it is paused and resumed later.
    /// Default 1024.
    pub kv_cache_mib: u64,
    /// Back up every remote route with this model (failover target). Default true.
    pub fallback: bool,
    /// Tokens generated when a request sets no `max_tokens` (at most what the context has
    /// left), so one request cannot hold a slot for a whole context. Default 2048.
    pub default_max_tokens: u32,
    /// Largest `n` (choices per request) the local model takes; more is a 400. Default 4.
    pub max_n: u32,
    /// A streaming client that takes no event for this long loses its sequence, so its
    /// batch slot and KV cache go to others. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub stalled_client_timeout: Duration,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            model: None,
            served_model_name: None,
            chat_template: None,
            queue_capacity: 16,
            max_batch: 8,
            kv_cache_mib: 1024,
            fallback: true,
            default_max_tokens: 2048,
            max_n: 4,
            stalled_client_timeout: Duration::from_secs(30),
        }
    }
}

impl LocalConfig {
    /// The public name of the local model, if there is one.
    pub fn served_name(&self) -> Option<String> {
        let model = self.model.as_ref()?;
        Some(
            self.served_model_name
                .clone()
                .unwrap_or_else(|| ModelSpec::parse(model).served_name()),
        )
    }
}

/// `[server]`: the HTTP side facing clients.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Largest accepted request body in bytes. Default 8 MiB (base64 images are big).
    pub max_body_bytes: usize,
    /// How long in-flight requests may run after SIGTERM/SIGINT. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Names of environment variables that each hold one accepted client API key.
    /// Empty (the default) means no client authentication.
    pub client_api_key_envs: Vec<String>,
    /// Names of environment variables that each hold one admin key, required on
    /// `/metrics`, `/health` and `/ready` when any is set. Empty (the default) leaves them
    /// open, as a Prometheus scraper expects.
    pub admin_api_key_envs: Vec<String>,
    /// Open client connections at most; past it new ones wait in the kernel's backlog
    /// until one closes. Default 1024.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers. On HTTP/1 hyper also runs
    /// this timer while a kept-alive connection waits for its next request. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a client may take to send a whole request body, from its headers on (a
    /// body that stops coming, or is shorter than its `Content-Length`). Default 60 s.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 8 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            client_api_key_envs: Vec::new(),
            admin_api_key_envs: Vec::new(),
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// `[remotes.NAME]`: one OpenAI-compatible gateway.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// Base URL ending in `/v1`, e.g. `https://api.deepseek.com/v1`.
    pub base_url: String,
    /// Name of the environment variable that holds the gateway key (never the key).
    pub api_key_env: Option<String>,
    /// Or a file holding the key (a mounted secret); re-read on SIGHUP, so a key can be
    /// rotated without a restart.
    pub api_key_file: Option<PathBuf>,
    /// Or several environment variables, one key each (key rotation): used round-robin;
    /// on 429, 402 or 401 the next key is tried before the next target, and a key that got
    /// 401 or 402 is parked for `key_cooldown`. Set one of `api_key_env`, `api_key_envs`
    /// and `api_key_file`.
    pub api_key_envs: Vec<String>,
    /// How long a key that got 401 or 402 is left out before it is tried again. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub key_cooldown: Duration,
    /// Models served under the same name at the gateway and by lifeboat.
    pub models: Vec<String>,
    /// TCP + TLS connect deadline. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// From sending the request to the first content token. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub first_token_timeout: Duration,
    /// Longest gap between two data frames; `: keep-alive` comments do not count. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Whole attempt. Default 10 min.
    #[serde(with = "humantime_serde")]
    pub total_timeout: Duration,
    /// Idle keep-alive connections kept per host. Default 64.
    pub pool_max_idle_per_host: usize,
    /// `remote-preferred` (default: the local model backs it up) or `remote-only`.
    pub egress: Egress,
    /// How the background probe checks this gateway: `models` (unbilled `GET /models`,
    /// default) or `chat` (a one-token chat completion with `probe_model`, billed but it
    /// proves the model answers).
    pub probe: ProbeKind,
    /// Model for the `chat` probe; defaults to the first of `models`.
    pub probe_model: Option<String>,
    /// Race the local model when this gateway is slow to its first token. Default false.
    pub hedge: bool,
    /// Hedge after this long without a first token; default: the gateway's p95 TTFT.
    #[serde(with = "humantime_serde")]
    pub hedge_after: Option<Duration>,
    /// How long an idle pooled connection is kept. Default 90 s.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// When a stream from this gateway breaks after the first token, let the local model
    /// continue the answer instead of sending an in-band error. Default false.
    pub continue_locally: bool,
    /// Largest SSE event (one line, or the `data:` lines of one event) taken from this
    /// gateway; longer fails the attempt as malformed. Default 1 MiB.
    pub max_frame_bytes: usize,
    /// Largest non-streamed JSON answer taken from this gateway. Default 64 MiB.
    pub max_json_body_bytes: usize,
    /// Most bytes one streamed answer may send in all. Default 128 MiB.
    pub max_answer_bytes: usize,
    /// `adaptive` (default): the first-token and idle deadlines follow this gateway's
    /// recent p99 (× `deadline_multiplier`, at least the floors, at most the configured
    /// timeouts); `fixed`: the configured timeouts only.
    pub deadline: DeadlineMode,
    /// Default 3.
    pub deadline_multiplier: f64,
    /// Shortest adaptive first-token deadline. Default 1.5 s.
    #[serde(with = "humantime_serde")]
    pub first_token_floor: Duration,
    /// Shortest adaptive idle deadline. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub idle_floor: Duration,
    /// Tokens (prompt and answer) a request may take at this gateway; a request that
    /// cannot fit skips it. Default: unknown (never skipped).
    pub context_window: Option<u32>,
}

/// See [`RemoteConfig::deadline`].
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DeadlineMode {
    #[default]
    Adaptive,
    Fixed,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            base_url: String::new(),
            api_key_env: None,
            api_key_file: None,
            api_key_envs: Vec::new(),
            key_cooldown: Duration::from_secs(60),
            models: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            first_token_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            total_timeout: Duration::from_secs(600),
            pool_max_idle_per_host: 64,
            egress: Egress::RemotePreferred,
            probe: ProbeKind::Models,
            probe_model: None,
            hedge: false,
            hedge_after: None,
            pool_idle_timeout: Duration::from_secs(90),
            continue_locally: false,
            max_frame_bytes: 1024 * 1024,
            max_json_body_bytes: 64 * 1024 * 1024,
            max_answer_bytes: 128 * 1024 * 1024,
            deadline: DeadlineMode::Adaptive,
            deadline_multiplier: 3.0,
            first_token_floor: Duration::from_millis(1500),
            idle_floor: Duration::from_secs(1),
            context_window: None,
        }
    }
}

/// `[[routes]]`: a public model name served by a remote under another name.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The name clients use and `/v1/models` lists.
    pub name: String,
    /// Other names that resolve to this route (e.g. `deepseek-v3`).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Key of the remote in `[remotes]` (not needed for `egress = "local-only"`).
    #[serde(default)]
    pub remote: String,
    /// Model name at the gateway; defaults to `name`.
    pub remote_model: Option<String>,
    /// See `remotes.NAME.continue_locally`; set per route.
    #[serde(default)]
    pub continue_locally: bool,
    /// Where this route's requests may go. Default `remote-preferred`.
    #[serde(default)]
    pub egress: Egress,
    /// See `remotes.NAME.hedge`; set per route.
    #[serde(default)]
    pub hedge: bool,
    /// See `remotes.NAME.hedge_after`.
    #[serde(default, with = "humantime_serde")]
    pub hedge_after: Option<Duration>,
    /// Send a share of this route's requests to another remote first (a canary).
    #[serde(default)]
    pub canary: Option<CanaryConfig>,
    /// More remotes tried in order after the route's own (a second gateway, an on-prem
    /// vLLM/SGLang cluster), before the local model. At most [`MAX_FALLBACKS`].
    #[serde(default)]
    pub fallbacks: Vec<FallbackConfig>,
}

impl RouteConfig {
    /// The model name at one remote of this route: the entry's own `remote_model` (a
    /// fallback's or the canary's), else the route's `remote_model`, else its name.
    pub fn model_at(&self, entry_model: Option<&String>) -> String {
        entry_model
            .or(self.remote_model.as_ref())
            .cloned()
            .unwrap_or_else(|| self.name.clone())
    }
}

/// Longest `fallbacks` list of a route.
pub const MAX_FALLBACKS: usize = 8;

/// One entry of `routes[].fallbacks`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// Key of the remote in `[remotes]`.
    pub remote: String,
    /// Model name at that remote; defaults to the route's `remote_model`, then its name.
    pub remote_model: Option<String>,
}

/// `[routes.canary]`: another remote that gets `share` of the route's requests first; the
/// route's own remote (then the local model) backs it up.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    pub remote: String,
    /// Model name at the canary; defaults to the route's `remote_model` or `name`.
    pub remote_model: Option<String>,
    /// Fraction of requests, between 0 and 1 (exclusive).
    pub share: f64,
}

/// See [`RemoteConfig::probe`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    #[default]
    Models,
    Chat,
}

/// Where a route's requests may be served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Egress {
    /// The remote first, the local model when it fails.
    #[default]
    RemotePreferred,
    /// Only the local model: nothing leaves the box.
    LocalOnly,
    /// Only the remote: no local fallback.
    RemoteOnly,
}

/// Settings that flags or `LIFEBOAT_*` variables override (clap merges the two).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub remote_url: Option<String>,
    pub remote_api_key_env: Option<String>,
    pub remote_models: Vec<String>,
    pub model: Option<PathBuf>,
    pub served_model_name: Option<String>,
    pub chat_template: Option<PathBuf>,
}

/// A configuration problem, always naming where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// `detail` is "line N, column M: key.path: message", each part when known.
    #[error("{origin}: {detail}")]
    Parse { origin: String, detail: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Name of the remote created by `--remote-url` when the file defines none.
pub const DEFAULT_REMOTE_NAME: &str = "gateway";

impl Config {
    /// Read and parse a TOML file; the error names the file, line and key path.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Parse TOML text; `origin` names the text in errors (usually the file name).
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let deserializer =
            toml::Deserializer::parse(text).map_err(|err| parse_error(origin, text, "", &err))?;
        serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let key = err.path().to_string();
            let key = if key == "." { String::new() } else { key };
            parse_error(origin, text, &key, err.inner())
        })
    }

    /// Apply flag/environment overrides on top of the file.
    pub fn apply(&mut self, overrides: &Overrides) -> Result<(), ConfigError> {
        if let Some(listen) = overrides.listen {
            self.server.listen = listen;
        }
        if let Some(model) = &overrides.model {
            self.local.model = Some(model.clone());
        }
        if let Some(name) = &overrides.served_model_name {
            self.local.served_model_name = Some(name.clone());
        }
        if let Some(template) = &overrides.chat_template {
            self.local.chat_template = Some(template.clone());
        }
        let touches_remote = overrides.remote_url.is_some()
            || overrides.remote_api_key_env.is_some()
            || !overrides.remote_models.is_empty();
        if !touches_remote {
            return Ok(());
        }
        let name = match self.remotes.len() {
            0 => DEFAULT_REMOTE_NAME.to_string(),
            1 => self.remotes.keys().next().cloned().unwrap_or_default(),
            _ => {
                let names: Vec<&str> = self.remotes.keys().map(String::as_str).collect();
                return Err(ConfigError::invalid(
                    "--remote-url/--remote-api-key-env/--remote-model",
                    format!(
                        "ambiguous: the config file defines several remotes ({}); edit the file instead",
                        names.join(", ")
                    ),
                ));
            }
        };
        let remote = self.remotes.entry(name).or_default();
        if let Some(url) = &overrides.remote_url {
            remote.base_url = url.clone();
        }
        if let Some(env) = &overrides.remote_api_key_env {
            // The flag names the key: it replaces whatever source the file gave.
            remote.api_key_env = Some(env.clone());
            remote.api_key_file = None;
            remote.api_key_envs.clear();
        }
        if !overrides.remote_models.is_empty() {
            remote.models = overrides.remote_models.clone();
        }
        Ok(())
    }
}

fn parse_error(origin: &str, text: &str, key: &str, err: &toml::de::Error) -> ConfigError {
    let location = err.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("line {line}, column {column}")
    });
    let parts: Vec<String> = [
        location,
        Some(key.to_string()),
        Some(err.message().trim().to_string()),
    ]
    .into_iter()
    .flatten()
    .filter(|part| !part.is_empty())
    .collect();
    ConfigError::Parse {
        origin: origin.to_string(),
        detail: parts.join(": "),
    }
}

#[cfg(test)]
mod tests;
