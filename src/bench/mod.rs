//! `lifeboat bench`: drive OpenAI-compatible targets with the same prompts and measure
//! stability (sequential requests), load (a concurrency sweep), streaming latency (TTFT,
//! inter-token, end-to-end percentiles) and cost on each side, then write JSON, Markdown
//! and SVG charts.
//!
//! # Layout
//!
//! - [`target`]: target specs from the command line and how each is priced.
//! - [`prompts`]: the built-in prompt sets and JSONL files.
//! - [`client`]: one measured streamed request and the kinds of failure.
//! - [`stats`]: histograms and summaries of a phase.
//! - [`cost`]: $/MTok on each side, workload cost, break-even.
//! - [`machine`]: what the bench ran on; model file digests.
//! - [`report`] and [`charts`]: the files written.

pub mod charts;
pub mod client;
pub mod cost;
pub mod machine;
pub mod prompts;
pub mod report;
pub mod stats;
pub mod target;

use std::{
    future::Future,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use indicatif::ProgressBar;
use serde::Serialize;
use tokio::time::Instant;

use self::{
    client::FailureKind,
    cost::{BreakEven, LocalCost, RemoteCost, Workload},
    machine::{Machine, ModelFile},
    prompts::Prompt,
    stats::{PhaseRecorder, PhaseResult},
    target::{Pricing, TargetKind, TargetSpec},
};

/// Why a bench cannot start or cannot write its results.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("--target {spec:?}: {message}")]
    Target { spec: String, message: String },
    #[error("prompt file {path}: {message}")]
    PromptFile { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("model file {path}: {source}")]
    ModelFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl BenchError {
    /// True for mistakes in the arguments (exit code 2) rather than failures while running.
    pub fn is_usage(&self) -> bool {
        !matches!(self, BenchError::Write { .. } | BenchError::Client(_))
    }
}

/// What to run against every target.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    pub targets: Vec<TargetSpec>,
    pub prompts: Vec<Prompt>,
    /// `builtin:short` or the JSONL path, for the report.
    pub prompt_source: String,
    /// Fixed per run so targets produce comparable lengths.
    pub max_tokens: u32,
    /// Sequential requests of the stability phase (0 skips it).
    pub stability_requests: usize,
    /// Concurrency levels of the load sweep (empty skips it).
    pub concurrency: Vec<usize>,
    /// Requests per concurrency level, at most.
    pub load_requests: usize,
    /// Time per concurrency level, at most: no request starts after it.
    pub load_duration: Duration,
    /// Bound on one whole request, first byte to `[DONE]`.
    pub timeout: Duration,
    /// Unrecorded requests per target before measuring.
    pub warmup: usize,
    pub workload: Workload,
}

impl BenchPlan {
    /// Check the numbers; the message names the flag.
    pub fn validate(&self) -> Result<(), BenchError> {
        let invalid = |m: &str| Err(BenchError::Invalid(m.to_string()));
        if self.targets.is_empty() {
            return invalid("give at least one --target");
        }
        if let Some(level) = self.concurrency.iter().find(|c| **c == 0) {
            return Err(BenchError::Invalid(format!(
                "--concurrency: {level} is not a concurrency level; use 1 or more"
            )));
        }
        if self.max_tokens == 0 {
            return invalid("--max-tokens must be at least 1");
        }
        if self.prompts.is_empty() {
            return invalid("no prompts");
        }
        for target in &self.targets {
            let s = self.settings_for(target);
            if !s.concurrency.is_empty() && s.load_requests == 0 {
                return Err(BenchError::Invalid(format!(
                    "target {}: load requests must be at least 1 (--load-requests or load_requests=)",
                    target.name
                )));
            }
        }
        if self.timeout.is_zero() {
            return invalid("--timeout must be above 0");
        }
        let mut names: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(BenchError::Invalid(format!(
                "two targets are named {:?}; give each a distinct name=",
                pair[0]
            )));
        }
        Ok(())
    }

    /// Requests the whole plan sends, for the progress bar.
    pub fn total_requests(&self) -> u64 {
        self.targets
            .iter()
            .map(|t| {
                let s = self.settings_for(t);
                (self.warmup + s.stability_requests + s.load_requests * s.concurrency.len()) as u64
            })
            .sum()
    }

    /// The run's counts with the target's overrides applied.
    pub fn settings_for(&self, target: &TargetSpec) -> TargetSettings {
        let o = &target.overrides;
        TargetSettings {
            stability_requests: o.requests.unwrap_or(self.stability_requests),
            // A target's own levels apply only when the run has a sweep at all.
            concurrency: if self.concurrency.is_empty() {
                Vec::new()
            } else {
                o.concurrency.clone().unwrap_or_else(|| self.concurrency.clone())
            },
            load_requests: o.load_requests.unwrap_or(self.load_requests),
            max_tokens: o.max_tokens.unwrap_or(self.max_tokens),
        }
    }
}

/// The counts one target is run with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetSettings {
    pub stability_requests: usize,
    pub concurrency: Vec<usize>,
    pub load_requests: usize,
    pub max_tokens: u32,
}

/// The bench settings as recorded in the report.
#[derive(Debug, Clone, Serialize)]
pub struct PlanSummary {
    pub prompt_source: String,
    pub prompts: usize,
    pub max_tokens: u32,
    pub stability_requests: usize,
    pub concurrency: Vec<usize>,
    pub load_requests: usize,
    pub load_duration_seconds: f64,
    pub timeout_seconds: f64,
    pub warmup: usize,
    pub workload: Workload,
}

/// One target's results.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub name: String,
    pub kind: TargetKind,
    pub url: String,
    /// Served by the bench itself from the model file (a local target without `url=`).
    pub in_process: bool,
    pub model: String,
    pub key_env: Option<String>,
    pub pricing: Pricing,
    pub model_file: Option<ModelFile>,
    /// The counts this target ran with (the run's, or its overrides).
    pub settings: TargetSettings,
    pub stability: Option<PhaseResult>,
    pub load: Vec<PhaseResult>,
    pub remote_cost: Option<RemoteCost>,
    pub local_cost: Option<LocalCost>,
}

/// Everything a bench measured, as written to `bench.json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// False when the run was interrupted (Ctrl-C): the figures cover what had finished.
    pub complete: bool,
    pub started_at: String,
    pub finished_at: String,
    pub command_line: Vec<String>,
    pub machine: Machine,
    pub settings: PlanSummary,
    pub targets: Vec<TargetReport>,
    pub break_even: Vec<BreakEven>,
}

/// Which phase a recorder belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Stability,
    Load(usize),
}

#[derive(Debug)]
struct InFlight {
    target: usize,
    phase: Phase,
    recorder: PhaseRecorder,
    started: Instant,
}

/// Results so far, shared with the request tasks so an interrupted run keeps them.
#[derive(Debug, Default)]
struct Progress {
    targets: Vec<TargetReport>,
    in_flight: Option<InFlight>,
}

#[derive(Debug, Clone, Default)]
struct Shared(Arc<Mutex<Progress>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        // Only plain data lives behind this lock; a panicking request task cannot leave
        // it half-updated in a way that matters more than losing the report.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn begin(&self, target: usize, phase: Phase) {
        self.lock().in_flight = Some(InFlight {
            target,
            phase,
            recorder: PhaseRecorder::default(),
            started: Instant::now(),
        });
    }

    fn record(&self, outcome: &Result<client::Sample, FailureKind>) {
        if let Some(in_flight) = self.lock().in_flight.as_mut() {
            in_flight.recorder.record(outcome);
        }
    }

    /// Move the running phase into its target's results.
    fn end(&self) {
        let mut progress = self.lock();
        let Some(in_flight) = progress.in_flight.take() else {
            return;
        };
        let (concurrency, is_load) = match in_flight.phase {
            Phase::Stability => (1, false),
            Phase::Load(c) => (c, true),
        };
        let result = in_flight
            .recorder
            .finish(concurrency, in_flight.started.elapsed());
        if let Some(target) = progress.targets.get_mut(in_flight.target) {
            if is_load {
                target.load.push(result);
            } else {
                target.stability = Some(result);
            }
        }
    }
}

/// Facts about the run recorded alongside the figures.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub command_line: Vec<String>,
    pub machine: Machine,
    /// Model file digest per target, in target order.
    pub model_files: Vec<Option<ModelFile>>,
}

/// Run the plan; if `interrupt` resolves first (Ctrl-C), the phases finished so far and
/// the one running are reported with `complete: false`.
pub async fn run(
    plan: &BenchPlan,
    context: RunContext,
    progress_bar: ProgressBar,
    interrupt: impl Future<Output = ()>,
) -> Result<BenchReport, BenchError> {
    plan.validate()?;
    crate::upstream::install_crypto_provider();
    let max_concurrency = plan.concurrency.iter().copied().max().unwrap_or(1);
    let client = reqwest::Client::builder()
        .user_agent(concat!("lifeboat-bench/", env!("CARGO_PKG_VERSION")))
        .pool_max_idle_per_host(max_concurrency)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| BenchError::Client(crate::upstream::classify::error_chain(&e)))?;
    let started_at = chrono::Utc::now();
    let shared = Shared::default();
    shared.lock().targets = plan
        .targets
        .iter()
        .zip(context.model_files.iter().cloned().chain(std::iter::repeat(None)))
        .map(|(t, model_file)| TargetReport {
            name: t.name.clone(),
            kind: t.kind,
            url: t.url.clone(),
            in_process: t.in_process,
            model: t.model.clone(),
            key_env: t.key_env.clone(),
            pricing: t.pricing,
            model_file,
            settings: plan.settings_for(t),
            stability: None,
            load: Vec::new(),
            remote_cost: None,
            local_cost: None,
        })
        .collect();
    let complete = tokio::select! {
        () = run_all(plan, &client, &shared, &progress_bar) => true,
        () = interrupt => false,
    };
    // An interrupted phase still reports what it measured.
    shared.end();
    progress_bar.finish_and_clear();
    let targets = std::mem::take(&mut shared.lock().targets);
    Ok(finish_report(plan, context, started_at, complete, targets))
}

async fn run_all(plan: &BenchPlan, client: &reqwest::Client, shared: &Shared, bar: &ProgressBar) {
    for (index, target) in plan.targets.iter().enumerate() {
        let settings = plan.settings_for(target);
        bar.set_message(format!("{}: warm-up", target.name));
        for i in 0..plan.warmup {
            let body = client::request_body(
                &target.model,
                &plan.prompts[i % plan.prompts.len()],
                settings.max_tokens,
            );
            let _ = client::measure(client, target, &body, plan.timeout).await;
            bar.inc(1);
        }
        if settings.stability_requests > 0 {
            bar.set_message(format!("{}: stability", target.name));
            shared.begin(index, Phase::Stability);
            for i in 0..settings.stability_requests {
                let prompt = &plan.prompts[i % plan.prompts.len()];
                let body = client::request_body(&target.model, prompt, settings.max_tokens);
                let outcome = client::measure(client, target, &body, plan.timeout).await;
                shared.record(&outcome);
                bar.inc(1);
            }
            shared.end();
        }
        for &concurrency in &settings.concurrency {
            bar.set_message(format!("{}: load ×{concurrency}", target.name));
            shared.begin(index, Phase::Load(concurrency));
            let level = LoadLevel {
                concurrency,
                requests: settings.load_requests,
                max_tokens: settings.max_tokens,
            };
            let skipped = load_level(plan, client, target, level, shared, bar).await;
            bar.inc(skipped as u64);
            shared.end();
        }
    }
}

/// One level of the sweep.
#[derive(Debug, Clone, Copy)]
struct LoadLevel {
    concurrency: usize,
    requests: usize,
    max_tokens: u32,
}

/// One concurrency level: `concurrency` workers take requests from a shared counter until
/// the level's request count or time is spent. Returns how many requests were not sent.
async fn load_level(
    plan: &BenchPlan,
    client: &reqwest::Client,
    target: &TargetSpec,
    level: LoadLevel,
    shared: &Shared,
    bar: &ProgressBar,
) -> usize {
    let LoadLevel {
        concurrency,
        requests,
        max_tokens,
    } = level;
    let next = AtomicUsize::new(0);
    let deadline = Instant::now() + plan.load_duration;
    let worker = || async {
        loop {
            if Instant::now() >= deadline {
                break;
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= requests {
                break;
            }
            let body = client::request_body(&target.model, &plan.prompts[i % plan.prompts.len()], max_tokens);
            let outcome = client::measure(client, target, &body, plan.timeout).await;
            shared.record(&outcome);
            bar.inc(1);
        }
    };
    futures_util::future::join_all((0..concurrency).map(|_| worker())).await;
    requests.saturating_sub(next.load(Ordering::Relaxed).min(requests))
}

fn finish_report(
    plan: &BenchPlan,
    context: RunContext,
    started_at: chrono::DateTime<chrono::Utc>,
    complete: bool,
    mut targets: Vec<TargetReport>,
) -> BenchReport {
    for target in &mut targets {
        let phases: Vec<&PhaseResult> = target.stability.iter().chain(target.load.iter()).collect();
        match target.pricing {
            Pricing::Tokens(price) => {
                target.remote_cost = Some(cost::remote_cost(price, &phases, plan.workload));
            }
            Pricing::Gpu(gpu) => {
                // Throughput of the sweep, or of the stability run when there was none.
                let levels: Vec<&PhaseResult> = if target.load.is_empty() {
                    target.stability.iter().collect()
                } else {
                    target.load.iter().collect()
                };
                target.local_cost = Some(cost::local_cost(gpu, &levels, plan.workload));
            }
            Pricing::Unpriced => {}
        }
    }
    let mut break_even = Vec::new();
    for local in &targets {
        let Some(local_cost) = &local.local_cost else {
            continue;
        };
        for remote in &targets {
            let Some(remote_cost) = &remote.remote_cost else {
                continue;
            };
            break_even.push(cost::break_even(
                &local.name,
                local_cost,
                &remote.name,
                remote_cost,
                plan.workload,
            ));
        }
    }
    BenchReport {
        complete,
        started_at: started_at.to_rfc3339(),
        finished_at: chrono::Utc::now().to_rfc3339(),
        command_line: context.command_line,
        machine: context.machine,
        settings: PlanSummary {
            prompt_source: plan.prompt_source.clone(),
            prompts: plan.prompts.len(),
            max_tokens: plan.max_tokens,
            stability_requests: plan.stability_requests,
            concurrency: plan.concurrency.clone(),
            load_requests: plan.load_requests,
            load_duration_seconds: plan.load_duration.as_secs_f64(),
            timeout_seconds: plan.timeout.as_secs_f64(),
            warmup: plan.warmup,
            workload: plan.workload,
        },
        targets,
        break_even,
    }
}
