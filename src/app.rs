//! The application: shared state, the axum app built by a function, and the server entry
//! that takes a listener and a shutdown future (so tests start it on port 0).

use std::{
    future::Future,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower_http::{
    catch_panic::CatchPanicLayer,
    classify::{
        ClassifiedResponse, ClassifyResponse, NeverClassifyEos, ServerErrorsAsFailures,
        ServerErrorsFailureClass, SharedClassifier,
    },
    trace::TraceLayer,
};

use crate::{
    alerts::Alerter,
    api::{self, auth::ClientKeys, types::ErrorResponse},
    backend::Backend,
    config::{
        Config, ConfigError, DeadlineMode, EnvSource, RemoteConfig, Secret, read_secret_file, resolve_secret,
    },
    engine::{LocalBackend, LocalSettings},
    http_server::{self, ServerLimits},
    metrics,
    router::{
        RouteTable, Router, RouterSettings,
        breaker::BreakerConfig,
        deadlines::DeadlinePolicy,
        policy::RetryRules,
        retry::{Backoff, RetryBudget},
    },
    upstream::{RemoteBackend, keys::GatewayKey},
};

/// What a reload (SIGHUP) replaces: the router (routes, remotes and their keys) and the
/// accepted client keys. Each request takes one snapshot, so a reload never changes the
/// rules under a request in flight.
#[derive(Debug)]
pub struct Live {
    pub router: Arc<Router>,
    pub client_keys: Arc<ClientKeys>,
    /// Keys for `/metrics`, `/health` and `/ready`; open when empty.
    pub admin_keys: Arc<ClientKeys>,
}

/// Handles shared by every request.
#[derive(Debug, Clone)]
pub struct AppState {
    live: Arc<RwLock<Arc<Live>>>,
    pub metrics: PrometheusHandle,
    pub max_body_bytes: usize,
    /// Process start, reported as `created` of the models.
    pub started_unix: u64,
    /// The running local model and the folder it came from; kept across reloads.
    local: Option<(PathBuf, Arc<dyn Backend>)>,
}

impl AppState {
    /// Build backends and the router from a validated config; secrets come from `env`.
    pub fn from_config(config: &Config, env: &dyn EnvSource) -> Result<AppState, ConfigError> {
        config.validate()?;
        let local: Option<(PathBuf, Arc<dyn Backend>)> = match &config.local.model {
            Some(model) => {
                // Checked here so the error names the setting; the engine reads it later.
                if let Some(template) = &config.local.chat_template
                    && let Err(err) = std::fs::metadata(template)
                {
                    return Err(ConfigError::Invalid {
                        key: "local.chat_template".into(),
                        message: format!("{}: {err}", template.display()),
                    });
                }
                let backend = LocalBackend::start(&LocalSettings {
                    model: model.clone(),
                    chat_template: config.local.chat_template.clone(),
                    queue_capacity: config.local.queue_capacity,
                    max_batch: config.local.max_batch,
                    kv_cache_bytes: config.local.kv_cache_mib.saturating_mul(1024 * 1024),
                    default_max_tokens: config.local.default_max_tokens,
                    max_n: config.local.max_n,
                    stalled_client_timeout: config.local.stalled_client_timeout,
                })
                .map_err(|err| ConfigError::Invalid {
                    key: "local.model".into(),
                    message: err.to_string(),
                })?;
                Some((model.clone(), Arc::new(backend)))
            }
            None => None,
        };
        let live = build_live(config, env, local.as_ref().map(|(_, b)| b.clone()), None)?;
        Ok(AppState {
            live: Arc::new(RwLock::new(Arc::new(live))),
            metrics: metrics::install(),
            max_body_bytes: config.server.max_body_bytes,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            local,
        })
    }

    /// The current router and client keys.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Wait until the local model (if any) is loaded and warm; `Err` with the engine's
    /// message (which names the file) when it failed to load.
    pub async fn wait_local_ready(&self) -> Result<(), String> {
        match &self.local {
            Some((_, backend)) => backend.wait_ready().await,
            None => Ok(()),
        }
    }

    /// The current router.
    pub fn router(&self) -> Arc<Router> {
        self.live().router.clone()
    }

    /// Swap in routes, remotes, keys and router settings from `config`; requests in
    /// flight finish under the old ones. The local model keeps running (changing it needs
    /// a restart); the server settings (listen address, body limit) need a restart too.
    /// On error nothing changes.
    pub fn reload(&self, config: &Config, env: &dyn EnvSource) -> Result<(), ConfigError> {
        config.validate()?;
        let running = self.local.as_ref().map(|(path, _)| path);
        if config.local.model.as_ref() != running {
            return Err(ConfigError::Invalid {
                key: "local.model".into(),
                message: "changing the local model needs a restart".into(),
            });
        }
        let previous = self.router();
        let live = build_live(
            config,
            env,
            self.local.as_ref().map(|(_, b)| b.clone()),
            Some(&previous),
        )?;
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(live);
        Ok(())
    }
}

/// Remotes (with their keys), the router over them and `local`, and the client keys;
/// after a reload the router carries on `previous`'s breaker and health state.
fn build_live(
    config: &Config,
    env: &dyn EnvSource,
    local: Option<Arc<dyn Backend>>,
    previous: Option<&Router>,
) -> Result<Live, ConfigError> {
    let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
    for (name, remote) in &config.remotes {
        let keys = remote_keys(name, remote, env)?;
        let backend =
            RemoteBackend::with_keys(name.clone(), remote, keys).map_err(|err| ConfigError::Invalid {
                key: format!("remotes.{name}"),
                message: err.message,
            })?;
        backends.push(Arc::new(backend));
    }
    backends.extend(local);
    let client_keys = config
        .server
        .client_api_key_envs
        .iter()
        .enumerate()
        .map(|(i, var)| resolve_secret(env, &format!("server.client_api_key_envs[{i}]"), var))
        .collect::<Result<Vec<_>, _>>()?;
    let admin_keys = config
        .server
        .admin_api_key_envs
        .iter()
        .enumerate()
        .map(|(i, var)| resolve_secret(env, &format!("server.admin_api_key_envs[{i}]"), var))
        .collect::<Result<Vec<_>, _>>()?;
    let mut router = Router::new(
        RouteTable::from_config(config),
        backends,
        router_settings(config, env)?,
    );
    if let Some(previous) = previous {
        router.carry_state_from(previous);
    }
    let router = Arc::new(router);
    router.spawn_probes();
    Ok(Live {
        router,
        client_keys: Arc::new(ClientKeys::new(&client_keys)),
        admin_keys: Arc::new(ClientKeys::new(&admin_keys)),
    })
}

/// A remote's keys, read afresh (a reload re-reads them: key rotation), each error naming
/// the key path. The same key under two names is refused: rotating between copies of one
/// key would park and count it as two.
fn remote_keys(
    name: &str,
    remote: &RemoteConfig,
    env: &dyn EnvSource,
) -> Result<Vec<GatewayKey>, ConfigError> {
    let mut named: Vec<(String, Secret)> = Vec::new();
    if let Some(var) = &remote.api_key_env {
        let at = format!("remotes.{name}.api_key_env");
        named.push((at.clone(), resolve_secret(env, &at, var)?));
    }
    if let Some(path) = &remote.api_key_file {
        let at = format!("remotes.{name}.api_key_file");
        named.push((at.clone(), read_secret_file(&at, path)?));
    }
    for (i, var) in remote.api_key_envs.iter().enumerate() {
        let at = format!("remotes.{name}.api_key_envs[{i}]");
        named.push((at.clone(), resolve_secret(env, &at, var)?));
    }
    let mut keys: Vec<GatewayKey> = Vec::with_capacity(named.len());
    for (at, secret) in named {
        if let Some(twin) = keys.iter().find(|k| k.secret == secret) {
            return Err(ConfigError::Invalid {
                message: format!("holds the same key as {}", twin.source),
                key: at,
            });
        }
        let key = GatewayKey::new(secret, at.clone())
            .map_err(|message| ConfigError::Invalid { key: at, message })?;
        keys.push(key);
    }
    Ok(keys)
}

fn router_settings(config: &Config, env: &dyn EnvSource) -> Result<RouterSettings, ConfigError> {
    let webhooks = config
        .alerts
        .webhook_envs
        .iter()
        .enumerate()
        .map(|(i, var)| resolve_secret(env, &format!("alerts.webhook_envs[{i}]"), var))
        .collect::<Result<Vec<_>, _>>()?;
    let alerter = (!webhooks.is_empty()).then(|| Alerter::spawn(webhooks));
    let r = &config.router;
    let backoff =
        Backoff::try_new(r.backoff_min, r.backoff_max, true).map_err(|message| ConfigError::Invalid {
            key: "router.backoff_max".into(),
            message,
        })?;
    Ok(RouterSettings {
        breaker: BreakerConfig {
            failure_threshold: r.failure_threshold,
            cooldown: r.cooldown,
            max_cooldown: r.max_cooldown,
            error_rate_threshold: r.error_rate_threshold,
            min_requests: r.error_rate_min_requests,
            rate_window: std::time::Duration::from_secs(60),
        },
        retry: RetryRules {
            max_retries: r.max_retries,
            retry_after_cap: r.retry_after_cap,
            backoff,
            budget: RetryBudget::new(
                r.retry_budget_ratio,
                r.retry_budget_floor,
                std::time::Duration::from_secs(10),
            ),
        },
        deadlines: config
            .remotes
            .iter()
            .map(|(name, remote)| {
                let policy = DeadlinePolicy {
                    adaptive: remote.deadline == DeadlineMode::Adaptive,
                    multiplier: remote.deadline_multiplier,
                    first_token_floor: remote.first_token_floor,
                    idle_floor: remote.idle_floor,
                };
                (name.clone(), policy)
            })
            .collect(),
        probe_interval: r.probe_interval,
        alerter,
    })
}

/// The whole HTTP application.
pub fn app(state: AppState) -> axum::Router {
    api::routes(state)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new(SharedClassifier::new(ProbesAreAnswers)))
}

/// tower-http's default classification (a 5xx is a failure, logged at ERROR), except for
/// readiness answers: a `/ready` 503 says "do not send me traffic yet" to a probe that
/// asks every few seconds, and is logged at debug with the other responses.
#[derive(Debug, Clone, Copy)]
struct ProbesAreAnswers;

impl ClassifyResponse for ProbesAreAnswers {
    type FailureClass = ServerErrorsFailureClass;
    type ClassifyEos = NeverClassifyEos<ServerErrorsFailureClass>;

    fn classify_response<B>(
        self,
        res: &Response<B>,
    ) -> ClassifiedResponse<Self::FailureClass, Self::ClassifyEos> {
        if res.extensions().get::<api::ProbeAnswer>().is_some() {
            return ClassifiedResponse::Ready(Ok(()));
        }
        ServerErrorsAsFailures::new().classify_response(res)
    }

    fn classify_error<E: std::fmt::Display + 'static>(self, error: &E) -> Self::FailureClass {
        ServerErrorsAsFailures::new().classify_error(error)
    }
}

/// A panic is a bug: log it, answer with a generic OpenAI error, keep the server up.
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = detail, "request handler panicked");
    let body = ErrorResponse {
        error: api::error::ApiError::Internal(detail.to_string()).body(),
    };
    (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
}

/// Serve `app` on `listener` until `shutdown` resolves; then stop accepting and give
/// in-flight requests `grace` to finish before returning. The other server limits
/// (connections, timeouts) are the defaults; `http_server::serve` takes them all.
pub async fn run(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let limits = ServerLimits {
        grace,
        ..ServerLimits::default()
    };
    http_server::serve(listener, app, shutdown, limits).await
}
