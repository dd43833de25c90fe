//! `lifeboat serve`: load the config, apply flags and environment, build the backends and
//! the router, and serve until SIGTERM/SIGINT with a graceful drain.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::Args;
use tokio::net::TcpListener;

use super::CliError;
use crate::{
    app::{self, AppState},
    config::{Config, DEFAULT_MODEL, Overrides, ProcessEnv},
    http_server::{self, ServerLimits},
    shutdown,
};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (see lifeboat.example.toml). Without it, defaults apply.
    #[arg(long, short, env = "LIFEBOAT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "LIFEBOAT_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Base URL of the remote OpenAI-compatible gateway, ending in /v1.
    #[arg(long, env = "LIFEBOAT_REMOTE_URL", value_name = "URL")]
    pub remote_url: Option<String>,
    /// Name of the environment variable holding the gateway's API key.
    #[arg(long, env = "LIFEBOAT_REMOTE_API_KEY_ENV", value_name = "NAME")]
    pub remote_api_key_env: Option<String>,
    /// Model served by the remote (repeat or comma-separate for several).
    #[arg(
        long,
        env = "LIFEBOAT_REMOTE_MODEL",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub remote_model: Vec<String>,
    /// Local model served in-process: a folder (config.json, tokenizer.json,
    /// *.safetensors), a .gguf file, or a Hugging Face repo (`owner/name`,
    /// `owner/name:Q4_K_M`, `owner/name/file.gguf`) fetched into the HF cache; `none` for
    /// no local model [default: unsloth/DeepSeek-R1-Distill-Qwen-1.5B-GGUF:Q4_K_M].
    #[arg(long, env = "LIFEBOAT_MODEL", value_name = "PATH_OR_REPO")]
    pub model: Option<PathBuf>,
    /// Name clients use for the local model [default: the file, folder or repo name].
    #[arg(long, env = "LIFEBOAT_SERVED_MODEL_NAME", value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Chat template for the local model instead of its own: a Jinja file, or a .gguf
    /// file or model folder to take the template from.
    #[arg(long, env = "LIFEBOAT_CHAT_TEMPLATE", value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
}

impl ServeArgs {
    /// The config this invocation means: file (or defaults), then flags/environment.
    pub fn load_config(&self) -> Result<Config, CliError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path).map_err(|e| CliError::Usage(e.to_string()))?,
            None => Config::default(),
        };
        config
            .apply(&Overrides {
                listen: self.listen,
                remote_url: self.remote_url.clone(),
                remote_api_key_env: self.remote_api_key_env.clone(),
                remote_models: self.remote_model.clone(),
                model: self.model.clone(),
                served_model_name: self.served_model_name.clone(),
                chat_template: self.chat_template.clone(),
            })
            .map_err(|e| CliError::Usage(e.to_string()))?;
        match config.local.model.as_deref() {
            Some(model) if model == Path::new("none") => config.local.model = None,
            Some(_) => {}
            None => {
                // The fallback lifeboat exists for: a small DeepSeek model, fetched once.
                tracing::info!(
                    model = DEFAULT_MODEL,
                    "no --model given; the local model is the default"
                );
                config.local.model = Some(PathBuf::from(DEFAULT_MODEL));
            }
        }
        let single_unrouted_remote = config.remotes.len() == 1 && config.routes.is_empty();
        if let Some((name, remote)) = config
            .remotes
            .iter_mut()
            .find(|(_, r)| r.models.is_empty())
            .filter(|_| single_unrouted_remote)
        {
            // A lone gateway with no model listed (`--remote-url` alone) would be
            // unreachable; DeepSeek's chat model is the one lifeboat exists for.
            tracing::info!(remote = %name, "no models listed for the remote; serving deepseek-chat");
            remote.models.push("deepseek-chat".to_string());
        }
        Ok(config)
    }
}

pub async fn run(args: ServeArgs) -> Result<(), CliError> {
    let config = args.load_config()?;
    let state = AppState::from_config(&config, &ProcessEnv).map_err(|e| CliError::Usage(e.to_string()))?;
    if !state.router().has_backends() {
        tracing::warn!(
            "no backend configured: every generation request will fail; pass --remote-url URL or --model PATH_OR_REPO"
        );
    }
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| CliError::Runtime(format!("cannot listen on {}: {e}", config.server.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Runtime(format!("cannot read the listening address: {e}")))?;
    for (name, remote) in &config.remotes {
        tracing::info!(remote = %name, base_url = %crate::config::redact_text(&remote.base_url), models = ?remote.models, "remote gateway");
    }
    tracing::info!(%addr, "lifeboat listening; OpenAI base URL http://{addr}/v1");
    spawn_reloader(args, state.clone());
    http_server::serve(
        listener,
        app::app(state),
        shutdown::signal(),
        ServerLimits::from_config(&config.server),
    )
    .await
    .map_err(|e| CliError::Runtime(format!("server error: {e}")))
}

/// On SIGHUP, re-read the config file (and secrets) and swap in the new routes, remotes
/// and keys; requests in flight finish under the old ones. A bad file changes nothing.
fn spawn_reloader(args: ServeArgs, state: AppState) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload by restarting");
            return;
        };
        while hangups.recv().await.is_some() {
            let reload = async {
                args.load_config()
                    .map_err(|e| e.to_string())
                    .and_then(|config| state.reload(&config, &ProcessEnv).map_err(|e| e.to_string()))
            };
            match crate::tasks::survive("reload", reload).await {
                Some(Ok(())) => tracing::info!("SIGHUP: configuration reloaded"),
                Some(Err(message)) => {
                    tracing::error!(%message, "SIGHUP: reload failed; keeping the running configuration")
                }
                None => tracing::error!("SIGHUP: reload panicked; keeping the running configuration"),
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (args, state);
}
