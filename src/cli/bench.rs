//! `lifeboat bench`: parse the targets and options, run the bench (a progress bar on
//! stderr; Ctrl-C writes a partial report) and write JSON, Markdown and SVG charts.
//!
//! The command takes its targets directly (`lifeboat bench --target … --target …`); the
//! `engine` subcommand beside them (`bench_engine.rs`) measures the local engine alone.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::CliError;
use crate::bench::{
    self, BenchError, BenchPlan, RunContext,
    cost::Workload,
    machine::{Machine, hash_model_file},
    prompts::{BuiltinPrompts, load_jsonl},
    target::TargetSpec,
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
    /// the report), `price_in=USD,price_out=USD` per million tokens, or for a local target
    /// `gpu_usd_per_hour=USD` or `gpu_price_usd=USD,amortise_months=N,power_watts=W,
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
    /// Directory for bench.json, report.md and the charts [default: bench-results/<UTC time>].
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

pub async fn run(args: BenchArgs) -> Result<(), CliError> {
    let plan = plan(&args)?;
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
