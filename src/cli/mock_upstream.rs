//! `lifeboat mock-upstream`: run the scriptable fake gateway, with its admin API on a
//! second port so faults can be switched from a shell (`curl -d '{"mode":"http500"}' …`).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::Args;
use tokio::net::TcpListener;

use super::CliError;
use crate::mock_upstream::{FaultMode, MockSettings, MockUpstream, admin_app};

#[derive(Debug, Args)]
pub struct MockUpstreamArgs {
    /// Address of the OpenAI-compatible API.
    #[arg(long, default_value = "127.0.0.1:8090", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Address of the admin API (POST /fault, GET /stats, POST /reset).
    #[arg(long, default_value = "127.0.0.1:8091", value_name = "ADDR")]
    pub admin_listen: SocketAddr,
    /// Model ids served (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "deepseek-chat")]
    pub models: Vec<String>,
    /// Delay before the first token, e.g. 340ms.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub first_token_delay: Duration,
    /// Delay between tokens, e.g. 25ms.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub inter_token_delay: Duration,
    /// Tokens per answer.
    #[arg(long, default_value_t = 16)]
    pub tokens: u32,
    /// Starting fault mode.
    #[arg(long, default_value = "none")]
    pub fault: FaultMode,
    /// Retry-After of http429.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub retry_after: Duration,
    /// Chunks sent before midstream_cut drops the connection.
    #[arg(long, default_value_t = 3)]
    pub cut_after: u32,
    /// First-token delay in slow mode.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub slow_first_token: Duration,
    /// Require this bearer key (name of an environment variable holding it).
    #[arg(long, value_name = "NAME")]
    pub api_key_env: Option<String>,
}

pub async fn run(args: MockUpstreamArgs) -> Result<(), CliError> {
    let api_key = match &args.api_key_env {
        Some(name) => Some(std::env::var(name).map_err(|_| {
            CliError::Usage(format!("--api-key-env: environment variable {name} is not set"))
        })?),
        None => None,
    };
    let settings = MockSettings {
        models: args.models.clone(),
        first_token_delay: args.first_token_delay,
        inter_token_delay: args.inter_token_delay,
        tokens: args.tokens,
        retry_after: args.retry_after,
        cut_after: args.cut_after,
        slow_first_token: args.slow_first_token,
        api_key,
        ..MockSettings::default()
    };
    let mock = MockUpstream::bind(args.listen, settings)
        .await
        .map_err(|e| CliError::Runtime(format!("cannot listen on {}: {e}", args.listen)))?;
    let mock = Arc::new(mock);
    mock.set_fault(args.fault)
        .await
        .map_err(|e| CliError::Runtime(format!("cannot set fault {}: {e}", args.fault)))?;
    let admin = TcpListener::bind(args.admin_listen)
        .await
        .map_err(|e| CliError::Runtime(format!("cannot listen on {}: {e}", args.admin_listen)))?;
    let admin_addr = admin
        .local_addr()
        .map_err(|e| CliError::Runtime(format!("cannot read the admin address: {e}")))?;
    tracing::info!(api = %mock.url(), admin = %admin_addr, fault = %args.fault, "mock upstream running");
    // Machine-readable for scripts that start it on port 0.
    println!("mock-upstream api={} admin=http://{admin_addr}", mock.url());
    axum::serve(admin, admin_app(mock))
        .with_graceful_shutdown(crate::shutdown::signal())
        .await
        .map_err(|e| CliError::Runtime(format!("admin server error: {e}")))
}
