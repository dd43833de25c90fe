//! `lifeboat mock-upstream`: run the scriptable fake gateway, with its admin API on a
//! second port so faults can be switched from a shell (`curl -d '{"mode":"http500"}' …`).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::Args;
use tokio::net::TcpListener;

use super::CliError;
use crate::mock_upstream::{FaultMode, LatencyProfile, MockSettings, MockUpstream, admin_app};

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
    /// Draw each request's first-token delay from a log-normal distribution with this
    /// median (e.g. 340ms) instead of --first-token-delay; needs --ttft-p95.
    #[arg(long, value_parser = humantime::parse_duration, requires = "ttft_p95")]
    pub ttft_median: Option<Duration>,
    /// 95th percentile of the random first-token delay (e.g. 900ms).
    #[arg(long, value_parser = humantime::parse_duration, requires = "ttft_median")]
    pub ttft_p95: Option<Duration>,
    /// Per-stream token rate range in tokens/s, drawn uniformly per request with the
    /// random profile, e.g. 30-60.
    #[arg(long, value_parser = parse_rate_range, default_value = "30-60")]
    pub token_rate: (f64, f64),
    /// Seed of the random latency profile.
    #[arg(long, default_value_t = 42)]
    pub latency_seed: u64,
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
    let latency_profile = match (args.ttft_median, args.ttft_p95) {
        (Some(ttft_median), Some(ttft_p95)) => {
            let profile = LatencyProfile {
                ttft_median,
                ttft_p95,
                tokens_per_sec_min: args.token_rate.0,
                tokens_per_sec_max: args.token_rate.1,
                seed: args.latency_seed,
            };
            profile
                .validate()
                .map_err(|e| CliError::Usage(format!("latency profile: {e}")))?;
            Some(profile)
        }
        _ => None,
    };
    let settings = MockSettings {
        latency_profile,
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

/// `MIN-MAX` tokens/s, e.g. `30-60`, or one number for a fixed rate.
fn parse_rate_range(text: &str) -> Result<(f64, f64), String> {
    let (min, max) = text.split_once('-').unwrap_or((text, text));
    let parse = |s: &str| {
        s.trim()
            .parse::<f64>()
            .map_err(|_| format!("expected MIN-MAX tokens/s such as 30-60, got {text:?}"))
    };
    Ok((parse(min)?, parse(max)?))
}
