//! Test harness: a lifeboat app on 127.0.0.1:0 in front of the mock upstream.

#![allow(dead_code, unreachable_pub)]

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use lifeboat::{
    app::{self, AppState},
    config::Config,
    http_server::{self, ServerLimits},
    mock_upstream::{MockSettings, MockUpstream},
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// Deadlines short enough for fault tests, long enough for a loaded 2-core machine.
pub const FIRST_TOKEN_TIMEOUT: Duration = Duration::from_millis(1500);
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(1500);

pub struct TestApp {
    pub addr: SocketAddr,
    /// The running app's state (for reloads).
    pub state: AppState,
    pub client: reqwest::Client,
    pub mock: Arc<MockUpstream>,
    shutdown: Option<oneshot::Sender<()>>,
    pub server: JoinHandle<std::io::Result<()>>,
}

/// The config a test app starts from: one remote `gateway` at the mock, serving
/// `deepseek-chat`, with short deadlines.
pub fn test_config(mock: &MockUpstream) -> Config {
    let mut config = mock.gateway_config();
    if let Some(gateway) = config.remotes.get_mut("gateway") {
        gateway.first_token_timeout = FIRST_TOKEN_TIMEOUT;
        gateway.idle_timeout = IDLE_TIMEOUT;
    }
    config
}

/// Add a remote `canary` at `canary_url` and a route `chat` on `gateway` that sends
/// `share` of its requests to the canary's `canary_model` first.
pub fn add_canary_route(config: &mut Config, canary_url: &str, canary_model: &str, share: f64) {
    use lifeboat::config::{CanaryConfig, RemoteConfig, RouteConfig};
    config.remotes.insert(
        "canary".into(),
        RemoteConfig {
            base_url: canary_url.to_string(),
            ..RemoteConfig::default()
        },
    );
    config.routes.push(RouteConfig {
        name: "chat".into(),
        remote: "gateway".into(),
        remote_model: Some("deepseek-chat".into()),
        canary: Some(CanaryConfig {
            remote: "canary".into(),
            remote_model: Some(canary_model.to_string()),
            share,
        }),
        ..RouteConfig::default()
    });
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(MockSettings::default(), |_| {}, HashMap::new()).await
}

/// Start a mock with `settings`, then lifeboat with the test config changed by `tweak`;
/// secrets are looked up in `env`.
pub async fn spawn_app_with(
    settings: MockSettings,
    tweak: impl FnOnce(&mut Config),
    env: HashMap<String, String>,
) -> TestApp {
    spawn_app_limited(
        settings,
        tweak,
        env,
        ServerLimits {
            grace: Duration::from_secs(5),
            ..ServerLimits::default()
        },
    )
    .await
}

/// [`spawn_app_with`] served with `limits` (connection cap, timeouts, grace).
pub async fn spawn_app_limited(
    settings: MockSettings,
    tweak: impl FnOnce(&mut Config),
    env: HashMap<String, String>,
    limits: ServerLimits,
) -> TestApp {
    let mock = Arc::new(MockUpstream::start(settings).await.expect("mock starts"));
    let mut config = test_config(&mock);
    tweak(&mut config);
    let state = AppState::from_config(&config, &env).expect("valid test config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(http_server::serve(
        listener,
        app::app(state.clone()),
        async {
            let _ = rx.await;
        },
        limits,
    ));
    lifeboat::upstream::install_crypto_provider();
    TestApp {
        addr,
        state,
        client: reqwest::Client::new(),
        mock,
        shutdown: Some(tx),
        server,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    /// Ask the server to shut down gracefully.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Wait until `/ready` says `ready`: every backend loaded and warm (a box whose gateway
/// serves answers 200 `degraded` while its local model still loads).
pub async fn wait_until_ready(app: &TestApp) {
    for _ in 0..6000 {
        let ready: Value = app.get("/ready").await.json().await.unwrap_or_default();
        if ready["status"] == "ready" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "never ready: {}",
        app.get("/ready").await.text().await.unwrap_or_default()
    );
}

/// A minimal valid chat request.
pub fn chat_body(stream: bool) -> Value {
    json!({
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "Say something"}],
        "max_tokens": 8,
        "stream": stream,
    })
}

/// One parsed SSE stream as a client sees it.
#[derive(Debug, Default)]
pub struct SseBody {
    /// Every `data:` payload in order, `[DONE]` included.
    pub data: Vec<String>,
    /// Comment lines (starting with `:`).
    pub comments: Vec<String>,
}

impl SseBody {
    pub fn parse(text: &str) -> SseBody {
        let mut body = SseBody::default();
        for frame in text.split("\n\n") {
            for line in frame.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    body.data.push(data.trim_start().to_string());
                } else if line.starts_with(':') {
                    body.comments.push(line.to_string());
                }
            }
        }
        body
    }

    /// JSON payloads (everything but `[DONE]`).
    pub fn json(&self) -> Vec<Value> {
        self.data
            .iter()
            .filter(|d| d.as_str() != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("frame is not JSON ({e}): {d}")))
            .collect()
    }

    pub fn done_count(&self) -> usize {
        self.data.iter().filter(|d| d.as_str() == "[DONE]").count()
    }

    /// Concatenated `delta.content` of choice 0.
    pub fn content(&self) -> String {
        self.json()
            .iter()
            .filter_map(|c| {
                c["choices"].get(0)?["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    }
}

pub async fn read_sse(response: reqwest::Response) -> SseBody {
    SseBody::parse(&response.text().await.expect("body"))
}

/// lifeboat serving only the local `model` as `served_name`, once `/ready` says 200.
pub async fn spawn_local_app(model: &std::path::Path, served_name: &str) -> TestApp {
    spawn_local_app_with(model, served_name, |_| {}).await
}

/// [`spawn_local_app`] with more of the config changed by `more`.
pub async fn spawn_local_app_with(
    model: &std::path::Path,
    served_name: &str,
    more: impl FnOnce(&mut lifeboat::config::Config) + Send + 'static,
) -> TestApp {
    let model = model.to_path_buf();
    let served_name = served_name.to_string();
    let app = spawn_app_with(
        MockSettings::default(),
        move |config| {
            config.remotes.clear();
            config.local.model = Some(model);
            config.local.served_model_name = Some(served_name);
            more(config);
        },
        HashMap::new(),
    )
    .await;
    // Real GGUF files take seconds to load on 2 cores.
    for _ in 0..6000 {
        if app.get("/ready").await.status() == 200 {
            return app;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "local model never became ready: {}",
        app.get("/ready").await.text().await.unwrap_or_default()
    );
}

/// Where `scripts/fetch-test-models` puts real model files.
pub fn models_dir() -> std::path::PathBuf {
    std::env::var_os("LIFEBOAT_MODELS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"))
}

/// The model file, or `None` (test skipped) when it was not fetched and not required.
pub fn model_file(name: &str) -> Option<std::path::PathBuf> {
    let path = models_dir().join(name);
    if path.exists() {
        return Some(path);
    }
    let required = std::env::var("LIFEBOAT_REQUIRE_MODELS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{} is missing; run scripts/fetch-test-models",
        path.display()
    );
    eprintln!(
        "skipped: {} not fetched (scripts/fetch-test-models)",
        path.display()
    );
    None
}
