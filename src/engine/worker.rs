//! The engine thread: loads the model, warms it up, reports its phase, then generates one
//! request at a time from a bounded queue, stopping a sequence as soon as its client is
//! gone (the event receiver is dropped).

use std::{
    panic::AssertUnwindSafe,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use candle_core::{Device, Tensor};
use tokio::sync::mpsc;

use super::{
    EngineError, Phase, Shared,
    hub::{self, ModelSpec},
    loader::{self, ModelInfo},
    models::CausalLm,
    reasoning::{ReasoningSplitter, Split},
    sampler::Sampler,
    stop::StopMatcher,
    tokenizer::IncrementalDecoder,
};
use crate::backend::{BackendError, ChoiceDelta, ErrorKind, GenerationEvent, Origin, SamplingParams, Usage};

pub(super) type EventSender = mpsc::Sender<Result<GenerationEvent, BackendError>>;

/// One request, prepared on the async side.
#[derive(Debug)]
pub(super) struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Tokens to generate at most, per choice (already fitted to the context).
    pub max_tokens: usize,
    pub seed: u64,
    /// The prompt opened `<think>` (R1 template variant).
    pub think_opened: bool,
    pub events: EventSender,
}

fn set_phase(shared: &Mutex<Phase>, phase: Phase) {
    *shared.lock().unwrap_or_else(|p| p.into_inner()) = phase;
}

/// Run the engine thread until the job queue closes.
pub(super) fn run(
    spec: ModelSpec,
    template: Option<PathBuf>,
    device: Device,
    shared: Arc<Shared>,
    mut jobs: mpsc::Receiver<Job>,
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
    // One forward pass so the first real request pays no first-touch costs.
    let warm = info.bos_id.unwrap_or(0);
    if let Err(err) = Tensor::new(&[warm], &device)
        .and_then(|t| t.unsqueeze(0))
        .and_then(|t| model.forward(&t, 0))
    {
        set_phase(&shared.phase, Phase::Failed(format!("warm-up failed: {err}")));
        return;
    }
    model.clear_kv_cache();
    let _ = shared.info.set(info.clone());
    set_phase(&shared.phase, Phase::Ready);
    tracing::info!(
        model = %dir.display(),
        arch = info.arch.short_name(),
        load_ms = loaded_in.as_millis() as u64,
        warm_up_ms = (load_start.elapsed() - loaded_in).as_millis() as u64,
        "local model ready"
    );

    while let Some(job) = jobs.blocking_recv() {
        let events = job.events.clone();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            generate(model.as_mut(), &info, &device, &job)
        }));
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(err.to_string()),
            Err(_) => Some("the engine panicked while generating; see the log".to_string()),
        };
        if let Some(message) = error {
            tracing::error!(%message, "local generation failed");
            let _ = events.blocking_send(Err(BackendError::new(
                ErrorKind::Internal,
                Origin::Local,
                message,
            )));
        }
        model.clear_kv_cache();
    }
}

/// Send an event; `false` when the client is gone.
fn send(events: &EventSender, event: GenerationEvent) -> bool {
    events.blocking_send(Ok(event)).is_ok()
}

fn send_split(events: &EventSender, index: u32, first: &mut bool, split: Split) -> bool {
    if split.content.is_empty() && split.reasoning.is_empty() {
        return true;
    }
    let delta = ChoiceDelta {
        index,
        role: std::mem::take(first).then(|| "assistant".to_string()),
        content: (!split.content.is_empty()).then_some(split.content),
        reasoning_content: (!split.reasoning.is_empty()).then_some(split.reasoning),
        ..ChoiceDelta::default()
    };
    send(events, GenerationEvent::Delta(delta))
}

/// Generate every choice of `job`, then its usage.
fn generate(
    model: &mut dyn CausalLm,
    info: &ModelInfo,
    device: &Device,
    job: &Job,
) -> Result<(), EngineError> {
    let mut completion_tokens = 0u64;
    for index in 0..job.params.n.max(1) {
        model.clear_kv_cache();
        let mut sampler = Sampler::new(&job.params, job.seed.wrapping_add(u64::from(index)), &job.prompt);
        let mut decoder = IncrementalDecoder::new();
        let mut stops = StopMatcher::new(&job.params.stop.0);
        let uses_think = info.template.as_ref().is_some_and(|t| t.uses_think);
        let mut splitter = ReasoningSplitter::new(uses_think, job.think_opened);
        let mut first = true;
        let mut input = job.prompt.clone();
        let mut pos = 0;
        let mut generated = 0;
        let mut finish = "length";
        let mut stopped_by_string = false;
        while generated < job.max_tokens {
            if job.events.is_closed() {
                return Ok(()); // the client left: stop spending compute on it
            }
            let ids = Tensor::new(input.as_slice(), device).and_then(|t| t.unsqueeze(0))?;
            let logits = model.forward(&ids, pos)?;
            pos += input.len();
            let token = sampler.sample(&logits)?;
            generated += 1;
            if info.eos_ids.contains(&token) {
                finish = "stop";
                break;
            }
            input.clear();
            input.push(token);
            if let Some(text) = decoder.push(&info.tokenizer, token)? {
                let released = stops.push(&text);
                if !send_split(&job.events, index, &mut first, splitter.push(&released.text)) {
                    return Ok(());
                }
                if released.stopped {
                    finish = "stop";
                    stopped_by_string = true;
                    break;
                }
            }
        }
        if !stopped_by_string {
            let tail = decoder.finish(&info.tokenizer)?;
            let released = stops.push(&tail);
            let mut text = released.text;
            if released.stopped {
                finish = "stop";
            } else {
                text.push_str(&stops.finish());
            }
            let mut split = splitter.push(&text);
            let rest = splitter.finish();
            split.reasoning.push_str(&rest.reasoning);
            split.content.push_str(&rest.content);
            if !send_split(&job.events, index, &mut first, split) {
                return Ok(());
            }
        }
        completion_tokens += generated as u64;
        let done = ChoiceDelta {
            index,
            role: first.then(|| "assistant".to_string()),
            content: first.then(String::new),
            finish_reason: Some(finish.to_string()),
            ..ChoiceDelta::default()
        };
        if !send(&job.events, GenerationEvent::Delta(done)) {
            return Ok(());
        }
    }
    let prompt_tokens = job.prompt.len() as u64;
    send(
        &job.events,
        GenerationEvent::Usage(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            extra: serde_json::Map::new(),
        }),
    );
    Ok(())
}
