//! `lifeboat bench`: parse the targets and options, run the bench (a progress bar on
//! stderr; Ctrl-C writes a partial report) and write JSON, Markdown and SVG charts.
//!
//! The command takes its targets directly (`lifeboat bench --target … --target …`); the
//! `engine` subcommand beside them (`bench_engine.rs`) measures the local engine alone.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::net::TcpListener;

use super::CliError;
use crate::bench::{
    self, BenchError, BenchPlan, RunContext,
    cost::Workload,
    machine::{Machine, hash_model_file},
    prompts::{BuiltinPrompts, load_jsonl},
    target::TargetSpec,
};
use crate::{
    app::{self, AppState},
    config::{Config, ProcessEnv},
};

/// `lifeboat bench`: targets, or the `engine` subcommand.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchCommand {
    #[command(subcommand)]
    pub subcommand: Option<BenchSubcommand>,
    #[command(flatten)]
    pub targets: BenchArgs,
}

#[derive(Debug, Subcommand)]
pub enum BenchSubcommand {
    /// The local engine's speed on a model file: time to ready, prefill, decode, TTFT and
    /// aggregate decode at 1/2/4/8 streams, peak RSS.
    Engine(super::bench_engine::EngineBenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A target to drive, repeatable: `name=NAME,kind=remote|lifeboat|local,url=BASE/v1,
    /// model=MODEL` plus `key_env=VAR` (required for remote), `model_file=PATH` (hashed into
    /// the report; a local target with `model_file=` and no `url=` is loaded and served
    /// in-process by the bench under the name `model=`), `price_in=USD,price_out=USD` per
    /// million tokens, or for a local target `gpu_usd_per_hour=USD` or `gpu_price_usd=USD,amortise_months=N,power_watts=W,
    /// usd_per_kwh=USD`; and per-target counts for a slow target: `requests=N,
    /// concurrency=1/2/4,load_requests=N,max_tokens=N`.
    #[arg(long = "target", value_name = "SPEC", required = true)]
    pub targets: Vec<String>,
    /// Built-in prompt set.
    #[arg(long, value_enum, default_value = "mixed", conflicts_with = "prompt_file")]
    pub prompts: BuiltinPrompts,
    /// JSONL prompt file: one `{"messages": [...]}` or `{"prompt": "..."}` per line.
    #[arg(long, value_name = "PATH")]
    pub prompt_file: Option<PathBuf>,
    /// max_tokens of every request, so targets produce comparable lengths.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Sequential requests of the stability run (0 skips it).
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Concurrency levels of the load sweep (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub concurrency: Vec<usize>,
    /// Skip the load sweep.
    #[arg(long)]
    pub no_load: bool,
    /// At most this many requests per concurrency level.
    #[arg(long, default_value_t = 256)]
    pub load_requests: usize,
    /// At most this long per concurrency level (no request starts after it), e.g. 60s.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub load_duration: Duration,
    /// Bound on one whole request, e.g. 120s; a request past it counts as a timeout.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    pub timeout: Duration,
    /// Unrecorded requests per target before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Monthly input volume of the workload to cost, in millions of tokens.
    #[arg(long, default_value_t = 100.0)]
    pub workload_input_mtok: f64,
    /// Monthly output volume of the workload to cost, in millions of tokens.
    #[arg(long, default_value_t = 50.0)]
    pub workload_output_mtok: f64,
    /// Directory for bench.json, report.md and the charts [default: bench-results/YYYYMMDDTHHMMSSZ,
    /// the UTC time].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

fn usage(err: BenchError) -> CliError {
    if err.is_usage() {
        CliError::Usage(err.to_string())
    } else {
        CliError::Runtime(err.to_string())
    }
}

/// Turn the arguments into a checked plan, reading prompt files and key variables.
pub fn plan(args: &BenchArgs) -> Result<BenchPlan, CliError> {
    let targets = args
        .targets
        .iter()
        .map(|spec| TargetSpec::parse(spec, |name| std::env::var(name).ok()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(usage)?;
    let (prompts, prompt_source) = match &args.prompt_file {
        Some(path) => (load_jsonl(path).map_err(usage)?, path.display().to_string()),
        None => (
            args.prompts.prompts(),
            format!("builtin:{:?}", args.prompts).to_lowercase(),
        ),
    };
    let workload = Workload {
        input_mtok_per_month: args.workload_input_mtok,
        output_mtok_per_month: args.workload_output_mtok,
    };
    if !(workload.input_mtok_per_month >= 0.0 && workload.output_mtok_per_month >= 0.0) {
        return Err(CliError::Usage("--workload-*-mtok must be 0 or more".into()));
    }
    let plan = BenchPlan {
        targets,
        prompts,
        prompt_source,
        max_tokens: args.max_tokens,
        stability_requests: args.requests,
        concurrency: if args.no_load {
            Vec::new()
        } else {
            args.concurrency.clone()
        },
        load_requests: args.load_requests,
        load_duration: args.load_duration,
        timeout: args.timeout,
        warmup: args.warmup,
        workload,
    };
    plan.validate().map_err(usage)?;
    Ok(plan)
}

/// A local model the bench serves itself (a `kind=local` target with `model_file=` and no
/// `url=`): the app `lifeboat serve --model` runs, on an ephemeral loopback port, so the
/// figures are those of the API clients use. Stopped when dropped.
struct InProcessServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Load `model` in-process, serve it as `served_name` and wait until it is warm; returns
/// the base URL (`http://127.0.0.1:PORT/v1`).
async fn serve_in_process(model: &Path, served_name: &str) -> Result<(String, InProcessServer), CliError> {
    let mut config = Config::default();
    config.local.model = Some(model.to_path_buf());
    config.local.served_model_name = Some(served_name.to_string());
    let state = AppState::from_config(&config, &ProcessEnv).map_err(|e| CliError::Usage(e.to_string()))?;
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| CliError::Runtime(format!("cannot listen on loopback for the in-process model: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Runtime(format!("in-process server address: {e}")))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app::run(
        listener,
        app::app(state.clone()),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    let server = InProcessServer { stop: Some(stop) };
    eprintln!("loading {} in-process as {served_name}…", model.display());
    state
        .wait_local_ready()
        .await
        .map_err(|message| CliError::Runtime(format!("the in-process model failed to load: {message}")))?;
    Ok((format!("http://{addr}/v1"), server))
}

pub async fn run(args: BenchArgs) -> Result<(), CliError> {
    let mut plan = plan(&args)?;
    let mut model_files = Vec::new();
    for target in &plan.targets {
        let digest = match target.model_file.clone() {
            Some(path) => {
                let hashed = tokio::task::spawn_blocking(move || {
                    hash_model_file(&path).map_err(|source| BenchError::ModelFile { path, source })
                })
                .await
                .map_err(|e| CliError::Runtime(format!("hashing a model file failed: {e}")))?;
                Some(hashed.map_err(usage)?)
            }
            None => None,
        };
        model_files.push(digest);
    }
    // Served until every request has been measured.
    let mut in_process_servers = Vec::new();
    for target in plan.targets.iter_mut().filter(|t| t.in_process) {
        let model = target.model_file.clone().unwrap_or_default();
        let (url, server) = serve_in_process(&model, &target.model).await?;
        target.url = url;
        in_process_servers.push(server);
    }
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("bench-results").join(chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string())
    });
    let context = RunContext {
        command_line: std::env::args().collect(),
        machine: Machine::detect(),
        model_files,
    };
    // Drawn only when stderr is a terminal.
    let bar = ProgressBar::with_draw_target(Some(plan.total_requests()), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let report = bench::run(&plan, context, bar, crate::shutdown::signal())
        .await
        .map_err(usage)?;
    drop(in_process_servers);
    let written = bench::report::write_all(&report, &out).map_err(usage)?;
    for path in &written {
        println!("wrote {}", path.display());
    }
    if !report.complete {
        return Err(CliError::Runtime(format!(
            "interrupted: partial report written to {}",
            out.display()
        )));
    }
    Ok(())
}
