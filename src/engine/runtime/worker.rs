//! The engine thread: loads the model, warms it up, reports its phase, then hands the job
//! queue to the continuous-batching scheduler (`scheduler.rs`).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use candle_core::{Device, Tensor};
use tokio::sync::mpsc;

use super::{
    admission::QueueTicket,
    scheduler::{BatchLimits, Scheduler},
};
use crate::{
    backend::{BackendError, ClientId, GenerationEvent, SamplingParams},
    config::ModelSpec,
    engine::{
        Phase, Shared,
        load::{hub, loader},
        models::qlinear::QLinear,
    },
};

pub(super) type EventSender = mpsc::Sender<Result<GenerationEvent, BackendError>>;

/// One request, prepared on the async side.
#[derive(Debug)]
pub(crate) struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Tokens to generate at most, per choice (already fitted to the context).
    pub max_tokens: usize,
    pub seed: u64,
    /// The prompt opened `<think>` (R1 template variant).
    pub think_opened: bool,
    /// The names of the tools the request offered (unless it said `tool_choice: "none"`):
    /// tool calls in the output become `tool_calls`.
    pub tool_names: Option<Vec<String>>,
    pub events: EventSender,
    /// Who sent it: waiting jobs are admitted round-robin across clients.
    pub client: ClientId,
    /// Its place in the queue, given back when the engine starts it (taken out) or when
    /// the job is dropped.
    pub ticket: Option<QueueTicket>,
    /// The request's span (a child of the router's attempt span): the engine thread enters
    /// it for each of its lines about this job, since spans do not cross threads by
    /// themselves.
    pub span: tracing::Span,
}

fn set_phase(shared: &Mutex<Phase>, phase: Phase) {
    *shared.lock().unwrap_or_else(|p| p.into_inner()) = phase;
}

/// Run the engine thread until the job queue closes.
pub(crate) fn run(
    spec: ModelSpec,
    template: Option<PathBuf>,
    device: Device,
    limits: BatchLimits,
    shared: Arc<Shared>,
    jobs: mpsc::Receiver<Job>,
) {
    // A Hub model is fetched here (or found in the cache), so the server is up meanwhile.
    let dir = match hub::resolve(&spec, true) {
        Ok(dir) => dir,
        Err(err) => {
            tracing::error!(error = %err, "local model could not be fetched");
            set_phase(&shared.phase, Phase::Failed(err.to_string()));
            return;
        }
    };
    set_phase(&shared.phase, Phase::Loading);
    let load_start = std::time::Instant::now();
    let loaded = match loader::load(&dir, &device) {
        Ok(loaded) => loaded,
        Err(err) => {
            tracing::error!(error = %err, "local model failed to load");
            set_phase(&shared.phase, Phase::Failed(err.to_string()));
            return;
        }
    };
    let mut model = loaded.model;
    let mut info = loaded.info;
    if let Some(source) = template {
        match loader::template_override(&source, &info) {
            Ok(template) => info.template = Some(template),
            Err(err) => {
                tracing::error!(error = %err, "the chat template could not be used");
                set_phase(&shared.phase, Phase::Failed(err.to_string()));
                return;
            }
        }
    }
    let info = Arc::new(info);
    let loaded_in = load_start.elapsed();
    set_phase(&shared.phase, Phase::WarmingUp);
    // A forward pass long enough to take the prompt path, so the first real request pays no
    // first-touch costs (on the CPU, candle builds its repacked tiles for the weight types
    // lifeboat's kernels do not take; see `qlinear`).
    let warm = vec![info.bos_id.unwrap_or(0); QLinear::FEW_ROWS + 1];
    if let Err(err) = Tensor::new(warm.as_slice(), &device)
        .and_then(|t| t.unsqueeze(0))
        .and_then(|t| model.forward(&t, 0))
    {
        set_phase(&shared.phase, Phase::Failed(format!("warm-up failed: {err}")));
        return;
    }
    model.clear_kv_cache();
    let _ = shared.info.set(info.clone());
    set_phase(&shared.phase, Phase::Ready);
    let max_sequences = limits.max_sequences.clamp(1, model.max_sequences());
    let limits = BatchLimits {
        max_sequences,
        ..limits
    };
    tracing::info!(
        model = %dir.display(),
        arch = info.arch.short_name(),
        load_ms = loaded_in.as_millis() as u64,
        warm_up_ms = (load_start.elapsed() - loaded_in).as_millis() as u64,
        max_sequences,
        "local model ready"
    );
    Scheduler::new(model, info, device, limits, shared).run(jobs);
}
