//! A scriptable OpenAI-compatible upstream: the one fake gateway used by the tests, the
//! benchmarks and `lifeboat mock-upstream`.
//!
//! It answers `/v1/chat/completions`, `/v1/completions` and `/v1/models` (streaming and not,
//! with usage) with deterministic text, with configurable first-token delay, inter-token
//! delay and length. A fault mode, switched at runtime through [`MockUpstream::set_fault`]
//! or `POST /fault` on the admin API ([`admin_app`]), makes it misbehave the way real
//! gateways do; it counts the requests it saw in each mode so tests can assert how many
//! upstream calls were made.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt,
    net::SocketAddr,
    str::FromStr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
};

mod latency;
mod responses;

pub use latency::LatencyProfile;
use responses::error_response;
pub use responses::{LEAKED_KEY, LEAKED_ORG, LEAKED_URL, mock_text, mock_token};

/// How the mock misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultMode {
    /// Behave.
    None,
    /// Close the listening socket and every open connection: connections are refused.
    /// Requests are never seen, so this mode's count stays 0.
    Refuse,
    /// 500 with an OpenAI error body.
    Http500,
    /// 503 with an OpenAI error body.
    Http503,
    /// 429 with `Retry-After` (see [`MockSettings::retry_after`]).
    Http429,
    /// 402: the account is out of credit.
    Http402,
    /// 401: the key is wrong.
    Http401,
    /// Accept the request and never answer.
    Hang,
    /// Answer 200 and send only `: keep-alive` comments, forever.
    Keepalive,
    /// Stream [`MockSettings::cut_after`] content chunks, then drop the connection.
    MidstreamCut,
    /// Answer 200 with a frame that is not JSON.
    Malformed,
    /// Behave, but send the first token only after [`MockSettings::slow_first_token`].
    Slow,
    /// Answer 200 with a stream whose first frame is `data: [DONE]`: no output at all.
    EmptyStream,
    /// Answer 200 `application/json` with the body `{}`.
    JsonEmptyObject,
    /// 429 whose `Retry-After` and `retry-after-ms` are `1e30` (probes get it too).
    HugeRetryAfter,
    /// Answer 200 and stream one `data:` line that never ends, up to
    /// [`MockSettings::giant_bytes`].
    GiantLine,
    /// Stream valid content chunks as fast as possible, forever: an answer without end.
    EndlessStream,
    /// Answer 200 `application/json` (chunked, no length) with a body of
    /// [`MockSettings::giant_bytes`].
    GiantBody,
    /// 500 whose error text carries a key, an organisation id and an internal URL.
    LeakyError,
    /// Stream [`MockSettings::cut_after`] content chunks, then keep the connection open
    /// and send nothing more.
    Stall,
}

impl FaultMode {
    pub const ALL: [FaultMode; 20] = [
        FaultMode::None,
        FaultMode::Refuse,
        FaultMode::Http500,
        FaultMode::Http503,
        FaultMode::Http429,
        FaultMode::Http402,
        FaultMode::Http401,
        FaultMode::Hang,
        FaultMode::Keepalive,
        FaultMode::MidstreamCut,
        FaultMode::Malformed,
        FaultMode::Slow,
        FaultMode::EmptyStream,
        FaultMode::JsonEmptyObject,
        FaultMode::HugeRetryAfter,
        FaultMode::GiantLine,
        FaultMode::EndlessStream,
        FaultMode::GiantBody,
        FaultMode::LeakyError,
        FaultMode::Stall,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultMode::None => "none",
            FaultMode::Refuse => "refuse",
            FaultMode::Http500 => "http500",
            FaultMode::Http503 => "http503",
            FaultMode::Http429 => "http429",
            FaultMode::Http402 => "http402",
            FaultMode::Http401 => "http401",
            FaultMode::Hang => "hang",
            FaultMode::Keepalive => "keepalive",
            FaultMode::MidstreamCut => "midstream_cut",
            FaultMode::Malformed => "malformed",
            FaultMode::Slow => "slow",
            FaultMode::EmptyStream => "empty_stream",
            FaultMode::JsonEmptyObject => "json_empty_object",
            FaultMode::HugeRetryAfter => "huge_retry_after",
            FaultMode::GiantLine => "giant_line",
            FaultMode::EndlessStream => "endless_stream",
            FaultMode::GiantBody => "giant_body",
            FaultMode::LeakyError => "leaky_error",
            FaultMode::Stall => "stall",
        }
    }
}

impl fmt::Display for FaultMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FaultMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = FaultMode::ALL.iter().map(|m| m.as_str()).collect();
                format!("unknown fault mode {s:?}; expected one of: {}", names.join(", "))
            })
    }
}

/// Behaviour when healthy, and the parameters of the faults.
#[derive(Debug, Clone, PartialEq)]
pub struct MockSettings {
    /// Model ids it serves. Default `["deepseek-chat"]`.
    pub models: Vec<String>,
    /// Delay before the first content token. Default 0.
    pub first_token_delay: Duration,
    /// Delay between tokens. Default 0.
    pub inter_token_delay: Duration,
    /// Completion length when `max_tokens` does not cut it. Default 16.
    pub tokens: u32,
    /// `Retry-After` of `http429`. Default 1 s.
    pub retry_after: Duration,
    /// Content chunks sent before `midstream_cut` drops the connection. Default 3.
    pub cut_after: u32,
    /// First-token delay in `slow` mode. Default 2 s.
    pub slow_first_token: Duration,
    /// Interval of `: keep-alive` comments in `keepalive` mode. Default 100 ms.
    pub keepalive_interval: Duration,
    /// If set, requests must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Larger `max_tokens` is refused with a 400 naming the param, as DeepSeek does
    /// above 8192. Default 8192.
    pub max_tokens_limit: u64,
    /// If set, each request draws its own first-token delay and token rate from this
    /// seeded profile instead of the fixed delays above. Default `None`.
    pub latency_profile: Option<LatencyProfile>,
    /// Bytes sent by `giant_line` and `giant_body` (unless the reader gives up first).
    /// Default 2 GiB.
    pub giant_bytes: u64,
    /// A request whose `Authorization: Bearer <key>` names a key listed here is answered
    /// in that key's mode instead of the current one (one key rate-limited or out of
    /// credit while another is fine). Default empty.
    pub key_faults: BTreeMap<String, FaultMode>,
}

impl Default for MockSettings {
    fn default() -> Self {
        MockSettings {
            models: vec!["deepseek-chat".to_string()],
            first_token_delay: Duration::ZERO,
            inter_token_delay: Duration::ZERO,
            tokens: 16,
            retry_after: Duration::from_secs(1),
            cut_after: 3,
            slow_first_token: Duration::from_secs(2),
            keepalive_interval: Duration::from_millis(100),
            api_key: None,
            max_tokens_limit: 8192,
            latency_profile: None,
            giant_bytes: 2 << 30,
            key_faults: BTreeMap::new(),
        }
    }
}

/// A request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub path: String,
    pub authorization: Option<String>,
    /// Its `x-request-id`, as a gateway would log it.
    pub request_id: Option<String>,
    pub body: Value,
    pub mode: FaultMode,
}

#[derive(Debug)]
struct Inner {
    settings: MockSettings,
    mode: FaultMode,
    /// Requests left before the mode returns to `None`; `None` means until changed.
    remaining: Option<u64>,
    counts: BTreeMap<FaultMode, u64>,
    recent: VecDeque<RecordedRequest>,
    /// Draws of the latency profile, seeded so a run can be repeated.
    latency_rng: latency::ProfileRng,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    /// Bumped to close every open connection (entering `refuse`).
    kill_connections: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the counters inconsistent in a way
        // that matters to a test double; keep serving.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Count a request and decide the mode it is served in.
    fn admit(&self, path: &str, headers: &HeaderMap, body: &Value) -> (FaultMode, MockSettings) {
        let mut inner = self.lock();
        let key_fault = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|key| inner.settings.key_faults.get(key).copied());
        let mode = key_fault.unwrap_or(inner.mode);
        *inner.counts.entry(mode).or_default() += 1;
        if let Some(left) = inner.remaining.as_mut() {
            *left = left.saturating_sub(1);
            if *left == 0 {
                inner.mode = FaultMode::None;
                inner.remaining = None;
            }
        }
        if inner.recent.len() == 64 {
            inner.recent.pop_front();
        }
        inner.recent.push_back(RecordedRequest {
            path: path.to_string(),
            authorization: headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            request_id: headers
                .get(crate::request_id::X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: body.clone(),
            mode,
        });
        let mut settings = inner.settings.clone();
        if let Some(profile) = settings.latency_profile {
            let (first_token, inter_token) = inner.latency_rng.draw(&profile);
            settings.first_token_delay = first_token;
            settings.inter_token_delay = inter_token;
        }
        (mode, settings)
    }
}

/// A running mock upstream. Dropping it stops accepting connections.
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Stops the current accept loop; `None` while refusing.
    accept_stop: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
}

impl MockUpstream {
    /// Start on `127.0.0.1:0`.
    pub async fn start(settings: MockSettings) -> std::io::Result<MockUpstream> {
        MockUpstream::bind(SocketAddr::from(([127, 0, 0, 1], 0)), settings).await
    }

    /// Start on `addr`.
    pub async fn bind(addr: SocketAddr, settings: MockSettings) -> std::io::Result<MockUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (kill_connections, _) = watch::channel(0);
        let latency_rng = latency::ProfileRng::new(settings.latency_profile.as_ref());
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                settings,
                mode: FaultMode::None,
                remaining: None,
                counts: BTreeMap::new(),
                recent: VecDeque::new(),
                latency_rng,
            }),
            kill_connections,
        });
        let stop = spawn_accept_loop(listener, shared.clone());
        Ok(MockUpstream {
            addr,
            shared,
            accept_stop: Mutex::new(Some(stop)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL a client configures: `http://ADDR/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// A lifeboat config whose one remote, `gateway`, is this mock serving its models.
    pub fn gateway_config(&self) -> crate::config::Config {
        let mut config = crate::config::Config::default();
        config.remotes.insert(
            "gateway".into(),
            crate::config::RemoteConfig {
                base_url: self.url(),
                models: self.shared.lock().settings.models.clone(),
                ..crate::config::RemoteConfig::default()
            },
        );
        config
    }

    /// Switch the fault mode for every following request.
    pub async fn set_fault(&self, mode: FaultMode) -> std::io::Result<()> {
        self.set_fault_for(mode, None).await
    }

    /// Switch the fault mode for the next `count` requests (then back to `none`), or until
    /// changed when `count` is `None`.
    pub async fn set_fault_for(&self, mode: FaultMode, count: Option<u64>) -> std::io::Result<()> {
        {
            let mut inner = self.shared.lock();
            inner.mode = mode;
            inner.remaining = count.filter(|_| mode != FaultMode::Refuse);
        }
        let stop = self.accept_stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        match (mode, stop) {
            (FaultMode::Refuse, Some((stop_tx, stopped_rx))) => {
                let _ = stop_tx.send(());
                let _ = stopped_rx.await;
                self.shared
                    .kill_connections
                    .send_modify(|generation| *generation += 1);
            }
            (FaultMode::Refuse, None) => {}
            (_, Some(stop)) => *self.accept_stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(stop),
            (_, None) => {
                let listener = bind_again(self.addr).await?;
                let stop = spawn_accept_loop(listener, self.shared.clone());
                *self.accept_stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(stop);
            }
        }
        Ok(())
    }

    pub fn fault(&self) -> FaultMode {
        self.shared.lock().mode
    }

    /// Change the healthy behaviour (delays, length, models).
    pub fn update_settings(&self, change: impl FnOnce(&mut MockSettings)) {
        change(&mut self.shared.lock().settings);
    }

    /// Requests received while in `mode`.
    pub fn requests_in(&self, mode: FaultMode) -> u64 {
        self.shared.lock().counts.get(&mode).copied().unwrap_or(0)
    }

    /// All generation and model requests received.
    pub fn total_requests(&self) -> u64 {
        self.shared.lock().counts.values().sum()
    }

    /// The most recent request, if any.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.lock().recent.back().cloned()
    }

    /// Forget counts and recorded requests.
    pub fn reset_counts(&self) {
        let mut inner = self.shared.lock();
        inner.counts.clear();
        inner.recent.clear();
    }

    /// Counts and mode as JSON (also served at `GET /stats` on the admin API).
    pub fn stats(&self) -> Value {
        stats_json(&self.shared.lock())
    }
}

fn stats_json(inner: &Inner) -> Value {
    let by_mode: serde_json::Map<String, Value> = inner
        .counts
        .iter()
        .map(|(m, n)| (m.as_str().to_string(), json!(n)))
        .collect();
    json!({
        "mode": inner.mode,
        "remaining": inner.remaining,
        "total": inner.counts.values().sum::<u64>(),
        "by_mode": by_mode,
    })
}

/// Re-bind the address given up while refusing; retried briefly since the kernel may
/// still hold it for a moment.
async fn bind_again(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(err) => last = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("cannot re-bind")))
}

/// Accept connections until told to stop; reports back once the socket is closed.
fn spawn_accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
) -> (oneshot::Sender<()>, oneshot::Receiver<()>) {
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let (stopped_tx, stopped_rx) = oneshot::channel::<()>();
    let app = app(shared.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop_rx => break,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let _ = stream.set_nodelay(true);
                    let service = TowerToHyperService::new(app.clone());
                    let mut kill = shared.kill_connections.subscribe();
                    tokio::spawn(async move {
                        let builder = auto::Builder::new(TokioExecutor::new());
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        tokio::select! {
                            _ = conn => {}
                            _ = kill.changed() => {}
                        }
                    });
                }
            }
        }
        drop(listener);
        let _ = stopped_tx.send(());
    });
    // The caller keeps the receiver of "stopped" to wait on it.
    (stop_tx, stopped_rx)
}

fn app(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(responses::chat))
        .route("/v1/completions", post(responses::completions))
        .route("/v1/models", get(responses::models))
        .with_state(shared)
}

#[derive(Debug, Deserialize)]
struct FaultRequest {
    mode: FaultMode,
    #[serde(default)]
    count: Option<u64>,
}

/// The admin API, served on its own port so that `refuse` (which closes the API socket)
/// can be switched off again: `POST /fault {"mode": "http500", "count": 2}`,
/// `GET /stats`, `POST /reset`.
pub fn admin_app(mock: Arc<MockUpstream>) -> Router {
    Router::new()
        .route("/fault", post(admin_fault))
        .route("/stats", get(admin_stats))
        .route("/reset", post(admin_reset))
        .with_state(mock)
}

async fn admin_fault(State(mock): State<Arc<MockUpstream>>, Json(request): Json<FaultRequest>) -> Response {
    match mock.set_fault_for(request.mode, request.count).await {
        Ok(()) => Json(mock.stats()).into_response(),
        Err(err) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &format!("cannot switch to {}: {err}", request.mode),
            None,
        ),
    }
}

async fn admin_stats(State(mock): State<Arc<MockUpstream>>) -> Response {
    Json(mock.stats()).into_response()
}

async fn admin_reset(State(mock): State<Arc<MockUpstream>>) -> Response {
    if let Err(err) = mock.set_fault(FaultMode::None).await {
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &err.to_string(),
            None,
        );
    }
    mock.reset_counts();
    Json(mock.stats()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_modes_round_trip_through_names() {
        for mode in FaultMode::ALL {
            assert_eq!(mode.as_str().parse::<FaultMode>(), Ok(mode));
            assert_eq!(
                serde_json::to_value(mode).expect("serializes"),
                json!(mode.as_str())
            );
        }
        let Err(message) = "http418".parse::<FaultMode>() else {
            panic!("http418 is not a mode")
        };
        assert!(message.contains("midstream_cut"), "{message}");
    }

    #[test]
    fn text_is_deterministic() {
        assert_eq!(mock_text(3), "Lifeboat keeps");
    }
}
