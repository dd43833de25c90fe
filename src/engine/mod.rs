//! The local backend: a DeepSeek-family model loaded in-process with candle, on its own
//! OS thread behind a bounded queue (full → 429 with `Retry-After`).
//!
//! Prompt rendering and tokenization run on tokio's blocking pool; the engine thread only
//! runs the model. `/ready` reports the load phase until the model is warm.
//!
//! The local model is the scarce resource during an outage, so it is guarded: a request is
//! checked (`n`, prompt bytes) and counted against the queue before any work
//! (`runtime/admission.rs`), an unset `max_tokens` is capped, waiting requests are admitted
//! round-robin across clients (`runtime/fair_queue.rs`), and a client that stops reading
//! loses its slot (`runtime/outbox.rs`).
//!
//! # Rooms
//!
//! - [`load`]: model source → ready-to-run model (a folder, a `.gguf` file, a Hub repo).
//! - [`models`]: the [`models::CausalLm`] trait, the architectures and their tensors,
//!   lifeboat's own decoder for GGUF models and its quantized layers.
//! - `kernels`: lifeboat's own CPU matmul kernels, checked against plain-Rust references.
//! - [`runtime`]: admission, the engine thread, the continuous-batching scheduler, sampling.
//! - [`text`]: tokenizers, chat templates, stop strings, reasoning and tool-call parsing.
//! - [`testing`]: the tiny models the tests generate. [`mod@bench`]: `lifeboat bench engine`.
//!
//! `docs/engine.md` follows one request through them.
//!
//! # Adding an architecture
//!
//! 1. `models/mod.rs`: a variant of [`Arch`] (class name, short name, `Arch::ALL`), what
//!    it adds to [`models::Dims`] in `Dims::from_config`, and every tensor it reads in
//!    `Dims::expected_tensors` (the loader checks them all before reading one). Test: its
//!    class in `architectures_are_recognised_or_refused_precisely`, a bad value in
//!    `bad_dims_are_named`.
//! 2. The layers: `models::build` wraps candle-transformers' model in a `CausalLm` (as
//!    `Qwen2`), or the architecture gets its own file in `models/` when it needs checks of
//!    its own (`deepseek2.rs` refuses by name the configurations candle gets wrong). Test:
//!    each refusal, beside the code.
//! 3. GGUF, if it is served from GGUF: its `general.architecture` in `GGUF_ARCHS` and its
//!    metadata in `read_dims` (`load/gguf.rs`), its tensor names in `gguf_tensor_name`, and
//!    what the decoder needs in `decoder_config` and `models/quantized_decoder.rs`. Test:
//!    `hf_names_map_to_gguf_names`.
//! 4. The tiny model: `testing/tiny.rs` (`tiny_dims`, the `config.json` that `make_tiny`
//!    writes) and `testing/tiny_gguf.rs`, so that `lifeboat model make-tiny` writes one.
//!    Test: the architecture in `every_architecture_serves_and_legacy_completions_work`
//!    (`tests/local_engine.rs`).
//! 5. Reference logits, the proof that the model is right: its short name in `ARCHS` of
//!    `scripts/logit_fixtures.py`, `scripts/make-fixtures logits` (transformers, CPU, f32),
//!    the fixture committed under `tests/fixtures/logits/`, and a
//!    `…_logits_match_transformers` test in `tests/logits.rs` (for GGUF also the
//!    `…_gguf_…` one and the in-batch case), max-abs ≤ 1e-4 after the prompt and after
//!    every decode step.
//! 6. A new chat template family: its rendering against transformers in
//!    `tests/templates.rs` (`scripts/make-fixtures templates`); the README's table of
//!    architectures.
//!
//! # Adding a kernel or a device
//!
//! A CPU kernel:
//! 1. Its byte layout in the kernel file's module doc, and a plain-Rust definition (the
//!    `reference` module in `kernels/mod.rs`, `reference_dot_tile` in `kernels/tiles.rs`):
//!    what the SIMD code is tested against, and the path on other CPUs.
//! 2. The SIMD code in a module of its own under `#[cfg(target_arch = "x86_64")]` and
//!    `#[allow(unsafe_code)]` (`kernels/x86.rs`, `kernels/tiles_x86.rs`), with
//!    `#[target_feature(enable = …)]` and a `// SAFETY:` comment on every `unsafe` block,
//!    reached only after `kernels::available` found the instructions at run time.
//! 3. Selection: an entry point declines (`None`, `false`) a type, shape or CPU it does not
//!    take (`kernels::takes`, `TiledWeight::new`) and the caller falls back to candle;
//!    `models/qlinear.rs` chooses per multiplication, `load/gguf_weights.rs` (`tiles`,
//!    `block_matmul`) at load.
//! 4. Tests beside the kernel: equal to the reference and within tolerance of candle's
//!    `QMatMul` on the same weights (`models::qlinear::test_support`), a row the same alone
//!    and in any batch (`kernels_match_the_reference_and_candle_and_a_row_is_the_same_in_any_batch`),
//!    layouts that round-trip (`tiling_keeps_every_stored_byte`), unfit shapes declined.
//!    End to end: `batched_outputs_equal_unbatched_outputs_with_quantized_weights`
//!    (`tests/batching.rs`).
//! 5. Speed: `cargo bench --bench engine` or `lifeboat bench engine`; the figures go to
//!    `docs/engine.md`, not into comments.
//!
//! A device:
//! 1. [`preferred_device`] picks it (behind a cargo feature, as `cuda` is) and the loader
//!    its dtype (`load/loader.rs`: f32 on the CPU, bf16 otherwise).
//! 2. The CPU-only paths stay behind `device.is_cpu()` (lifeboat's kernels and tiles,
//!    decode attention on slices, the quantized embedding lookup, the sampler's direct
//!    read); the device takes candle's paths until it has kernels of its own, added as
//!    above.
//! 3. The build compiles without the device (`scripts/check-cuda` proves the CUDA build on
//!    a machine without a GPU), and the tiny models' logits on the device match the
//!    fixtures of `tests/logits.rs`.

pub mod bench;
mod kernels;
pub mod load;
pub mod models;
pub mod runtime;
pub mod testing;
pub mod text;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use candle_core::Device;
use tokio::sync::mpsc;

pub use load::loader::{ModelInfo, read_info};
pub use models::Arch;

use load::loader;
use runtime::{admission, scheduler, worker};

use crate::backend::{
    Backend, BackendError, BackendKind, BackendRequest, BackendStatus, Continuation, ErrorKind, EventStream,
    LOCAL_BACKEND_ID, Prompt, Readiness,
};
use crate::config::ModelSpec;

/// Fix the number of CPU threads candle uses for this process. Unless `RAYON_NUM_THREADS`
/// is set, candle recomputes it for every f32 matmul (attention) by reading
/// `/proc/cpuinfo`, a visible share of a decode step. This sets it to the count candle
/// picks itself (the physical cores) when the variable is unset.
///
/// # Safety
/// It sets an environment variable: call it before the process starts a second thread.
#[allow(unsafe_code)]
pub unsafe fn settle_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: the caller guarantees that no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
}

/// Everything that can go wrong loading or running the local model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
}

impl EngineError {
    pub(crate) fn load(path: &Path, message: impl Into<String>) -> EngineError {
        EngineError::Load {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
}

/// Where the engine is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Fetching the model from the Hugging Face Hub.
    Downloading,
    Loading,
    WarmingUp,
    Ready,
    Failed(String),
}

impl Phase {
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Downloading => "downloading",
            Phase::Loading => "loading",
            Phase::WarmingUp => "warming_up",
            Phase::Ready => "ready",
            Phase::Failed(_) => "failed",
        }
    }
}

#[derive(Debug)]
struct Shared {
    phase: Mutex<Phase>,
    info: OnceLock<Arc<ModelInfo>>,
    /// Requests holding a queue ticket (`admission::QueueTicket`): accepted and not yet
    /// started, whether being tokenized, in the channel or in the engine's fair queue.
    queued: AtomicUsize,
    /// The most sequences one step has carried.
    peak_batch: AtomicUsize,
}

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// Model folder, `.gguf` file or Hugging Face repo (see [`ModelSpec`]).
    pub model: PathBuf,
    /// A chat template to use instead of the model's (see [`loader::template_override`]).
    pub chat_template: Option<PathBuf>,
    /// Requests waiting beyond the running ones; more get 429.
    pub queue_capacity: usize,
    /// Sequences decoded together in one step (continuous batching), at most.
    pub max_batch: usize,
    /// Memory the KV caches of running sequences may take, in bytes; beyond it new
    /// requests wait in the queue and the latest sequence is preempted.
    pub kv_cache_bytes: u64,
    /// Tokens generated when a request sets no `max_tokens` (at most what the context
    /// has left).
    pub default_max_tokens: u32,
    /// Largest `n` taken; more is a 400.
    pub max_n: u32,
    /// A streaming client that takes no event for this long loses its sequence.
    pub stalled_client_timeout: Duration,
}

impl LocalSettings {
    /// Settings for `model` with the defaults of `[local]`.
    pub fn new(model: impl Into<PathBuf>) -> LocalSettings {
        let defaults = crate::config::LocalConfig::default();
        LocalSettings {
            model: model.into(),
            chat_template: None,
            queue_capacity: defaults.queue_capacity,
            max_batch: defaults.max_batch,
            kv_cache_bytes: defaults.kv_cache_mib * 1024 * 1024,
            default_max_tokens: defaults.default_max_tokens,
            max_n: defaults.max_n,
            stalled_client_timeout: defaults.stalled_client_timeout,
        }
    }
}

/// Where the engine runs: the first CUDA GPU when the build has the `cuda` feature and a
/// GPU answers (weights then load as bf16, see the loader), the CPU otherwise.
pub fn preferred_device() -> Device {
    #[cfg(feature = "cuda")]
    match Device::new_cuda(0) {
        Ok(device) => return device,
        Err(err) => {
            tracing::warn!(error = %err, "built with CUDA but no usable GPU; the local engine runs on the CPU")
        }
    }
    Device::Cpu
}

/// The in-process model as a [`Backend`].
#[derive(Debug)]
pub struct LocalBackend {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<worker::Job>,
    queue_capacity: usize,
    default_max_tokens: u32,
    max_n: u32,
}

impl LocalBackend {
    /// Start the engine thread; loading continues in the background (see `status`).
    pub fn start(settings: &LocalSettings) -> Result<LocalBackend, EngineError> {
        let spec = ModelSpec::parse(&settings.model);
        let first_phase = match &spec {
            ModelSpec::Local(path) => {
                loader::check_source(path)?;
                Phase::Loading
            }
            ModelSpec::Hub { .. } => Phase::Downloading,
        };
        let shared = Arc::new(Shared {
            phase: Mutex::new(first_phase),
            info: OnceLock::new(),
            queued: AtomicUsize::new(0),
            peak_batch: AtomicUsize::new(0),
        });
        let (jobs, receiver) = mpsc::channel(settings.queue_capacity.max(1));
        let thread_shared = shared.clone();
        let device = preferred_device();
        let template = settings.chat_template.clone();
        let limits = scheduler::BatchLimits {
            max_sequences: settings.max_batch.max(1),
            kv_budget_bytes: settings.kv_cache_bytes,
            stalled_client_timeout: settings.stalled_client_timeout,
        };
        tracing::info!(device = ?device.location(), "local engine device");
        std::thread::Builder::new()
            .name("lifeboat-engine".into())
            .spawn(move || worker::run(spec, template, device, limits, thread_shared, receiver))
            .map_err(|err| {
                EngineError::load(&settings.model, format!("cannot start the engine thread: {err}"))
            })?;
        Ok(LocalBackend {
            shared,
            jobs,
            queue_capacity: settings.queue_capacity.max(1),
            default_max_tokens: settings.default_max_tokens.max(1),
            max_n: settings.max_n.max(1),
        })
    }

    pub fn phase(&self) -> Phase {
        self.shared
            .phase
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The most sequences the engine has decoded in one step so far.
    pub fn peak_batch(&self) -> usize {
        self.shared.peak_batch.load(Ordering::Relaxed)
    }

    /// Wait until the model is ready or failed (tests and `model generate`).
    pub async fn wait_ready(&self) -> Result<(), String> {
        loop {
            match self.phase() {
                Phase::Ready => return Ok(()),
                Phase::Failed(message) => return Err(message),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn unavailable(&self) -> BackendError {
        let message = match self.phase() {
            Phase::Failed(message) => format!("the local model failed to load: {message}"),
            phase => format!("the local model is not ready yet ({})", phase.as_str()),
        };
        BackendError::new(ErrorKind::Unavailable, message)
    }
}

fn local_error(kind: ErrorKind, message: impl Into<String>) -> BackendError {
    BackendError::new(kind, message)
}

/// The prompt text for a continuation: the assistant turn already opened by the
/// template, then the reasoning and answer the client already has, in the R1 layout.
fn continue_text(mut text: String, uses_think: bool, continuation: &Continuation) -> String {
    if uses_think {
        if !text.trim_end().ends_with("<think>") && !continuation.reasoning.is_empty() {
            text.push_str("<think>\n");
        }
        text.push_str(&continuation.reasoning);
        if !continuation.content.is_empty() {
            if text.rfind("<think>") > text.rfind("</think>") {
                text.push_str("\n</think>\n\n");
            }
            text.push_str(&continuation.content);
        }
    } else {
        text.push_str(&continuation.content);
    }
    text
}

/// Render and tokenize the prompt; returns ids and whether the prompt leaves `<think>`
/// open (output starts as reasoning).
fn prepare_prompt(
    info: &ModelInfo,
    prompt: &Prompt,
    tools: Option<&serde_json::Value>,
    continuation: Option<&Continuation>,
) -> Result<(Vec<u32>, bool), BackendError> {
    match prompt {
        Prompt::Chat(messages) => {
            let template = info.template.as_ref().ok_or_else(|| {
                local_error(
                    ErrorKind::BadRequest,
                    "this model has no chat template (tokenizer_config.json `chat_template`); use /v1/completions",
                )
            })?;
            let mut text = template
                .render(messages, tools)
                .map_err(|e| local_error(ErrorKind::BadRequest, e.to_string()))?;
            if let Some(continuation) = continuation {
                text = continue_text(text, template.uses_think, continuation);
            }
            let opened = text.rfind("<think>") > text.rfind("</think>");
            let ids = info
                .tokenizer
                .encode(&text, false)
                .map_err(|e| local_error(ErrorKind::Internal, e.to_string()))?;
            Ok((ids, opened))
        }
        Prompt::Text(prompts) => {
            let text = match prompts.as_slice() {
                [one] => one,
                [] => {
                    return Err(local_error(
                        ErrorKind::BadRequest,
                        "token-id prompts are not supported by the local model",
                    ));
                }
                _ => {
                    return Err(local_error(
                        ErrorKind::BadRequest,
                        "the local model takes one prompt per request",
                    ));
                }
            };
            let mut ids = info
                .tokenizer
                .encode(text, true)
                .map_err(|e| local_error(ErrorKind::Internal, e.to_string()))?;
            if let Some(bos) = info.bos_id
                && ids.first() != Some(&bos)
            {
                ids.insert(0, bos);
            }
            Ok((ids, false))
        }
    }
}

#[async_trait]
impl Backend for LocalBackend {
    fn id(&self) -> &str {
        LOCAL_BACKEND_ID
    }

    async fn wait_ready(&self) -> Result<(), String> {
        LocalBackend::wait_ready(self).await
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Local
    }
    /// Free when nothing is queued: a hedge must not wait behind other requests.
    fn has_capacity(&self) -> bool {
        self.phase() == Phase::Ready && self.shared.queued.load(Ordering::SeqCst) == 0
    }

    fn status(&self) -> BackendStatus {
        let phase = self.phase();
        BackendStatus {
            readiness: match phase {
                Phase::Ready => Readiness::Ready,
                Phase::Failed(_) => Readiness::Failed,
                Phase::Downloading | Phase::Loading | Phase::WarmingUp => Readiness::Starting,
            },
            detail: match phase {
                Phase::Failed(message) => format!("failed: {message}"),
                other => other.as_str().to_string(),
            },
        }
    }

    async fn generate(&self, request: BackendRequest) -> Result<EventStream, BackendError> {
        let info = self
            .shared
            .info
            .get()
            .cloned()
            .ok_or_else(|| self.unavailable())?;
        // Cheapest first: nothing below is spent on a request refused here.
        admission::check_n(request.request.sampling.n, self.max_n)?;
        let bytes = admission::check_prompt_bytes(&request, info.dims.max_context)?;
        let ticket =
            admission::QueueTicket::take(&self.shared, self.queue_capacity).ok_or_else(queue_full)?;
        let generation = request.request.clone();
        let (prompt, think_opened) = tokenize(info.clone(), request, bytes).await?;
        let params = generation.sampling.clone();
        let max_tokens = admission::fit_max_tokens(
            &generation.prompt,
            prompt.len(),
            info.dims.max_context,
            params.max_tokens,
            self.default_max_tokens,
        )?;
        let seed = params.seed.unwrap_or_else(rand::random);
        let (events, receiver) = mpsc::channel(scheduler::EVENT_BUFFER);
        let span = tracing::info_span!(
            "engine",
            request_id = %generation.id,
            prompt_tokens = prompt.len(),
            max_tokens,
            choices = params.n.max(1),
        );
        let job = worker::Job {
            prompt,
            params,
            max_tokens,
            seed,
            think_opened,
            tool_names: generation
                .tools
                .as_ref()
                .and_then(|tools| tools.callable())
                .map(<[String]>::to_vec),
            events,
            client: generation.client.clone(),
            ticket: Some(ticket),
            span,
        };
        self.submit(job, receiver)
    }
}

impl LocalBackend {
    /// Hand `job` to the engine thread; its events arrive on `receiver`.
    fn submit(
        &self,
        job: worker::Job,
        receiver: mpsc::Receiver<Result<crate::backend::GenerationEvent, BackendError>>,
    ) -> Result<EventStream, BackendError> {
        // The ticket bounds what is in the channel, so it is never full; a refused job
        // gives its place back as it is dropped.
        if let Err(err) = self.jobs.try_send(job) {
            return Err(match err {
                mpsc::error::TrySendError::Full(_) => queue_full(),
                mpsc::error::TrySendError::Closed(_) => self.unavailable(),
            });
        }
        Ok(Box::pin(futures_util::stream::unfold(
            receiver,
            |mut receiver| async move {
                let item = receiver.recv().await?;
                Some((item, receiver))
            },
        )))
    }
}

fn queue_full() -> BackendError {
    let mut err = local_error(ErrorKind::RateLimited, "the local model's queue is full");
    err.retry_after = Some(Duration::from_secs(1));
    err
}

/// Render and tokenize on tokio's blocking pool, off the async workers; after a large
/// prompt, give the memory tokenization took back to the system.
async fn tokenize(
    info: Arc<ModelInfo>,
    attempt: BackendRequest,
    bytes: usize,
) -> Result<(Vec<u32>, bool), BackendError> {
    tokio::task::spawn_blocking(move || {
        let prepared = prepare_prompt(
            &info,
            &attempt.request.prompt,
            attempt.request.tools.as_ref().map(|tools| &tools.definitions),
            attempt.continuation.as_ref(),
        );
        if bytes >= admission::TRIM_AFTER_PROMPT_BYTES {
            crate::huge_pages::release_free_memory();
        }
        prepared
    })
    .await
    .map_err(|e| local_error(ErrorKind::Internal, format!("prompt preparation failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_prefills_in_the_r1_layout() {
        let opened = "<｜Assistant｜><think>\n".to_string();
        let both = Continuation {
            reasoning: "2+2".into(),
            content: "It is".into(),
        };
        assert_eq!(
            continue_text(opened.clone(), true, &both),
            "<｜Assistant｜><think>\n2+2\n</think>\n\nIt is"
        );
        let thinking = Continuation {
            reasoning: "hmm".into(),
            content: String::new(),
        };
        assert_eq!(
            continue_text(opened, true, &thinking),
            "<｜Assistant｜><think>\nhmm"
        );
        let answer_only = Continuation {
            reasoning: String::new(),
            content: "Life".into(),
        };
        assert_eq!(continue_text("A:".into(), true, &answer_only), "A:Life");
        assert_eq!(continue_text("A:".into(), false, &answer_only), "A:Life");
    }
}
