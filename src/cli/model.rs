//! `lifeboat model …`: tools for local models (folders or `.gguf` files) — `make-tiny` (a
//! random-weight test model), `inspect` (what a model holds), `generate` (one prompt,
//! streamed to stdout) and `pull` (fetch a Hugging Face repo into the cache).

use std::{io::Write, path::PathBuf, sync::Arc};

use clap::{Args, Subcommand};
use futures_util::StreamExt;

use super::CliError;
use crate::{
    backend::{Backend, BackendRequest, GenerationEvent, GenerationRequest, SamplingParams},
    config::ModelSpec,
    engine::{
        Arch, LocalBackend, LocalSettings,
        load::hub,
        read_info,
        testing::{tiny::make_tiny, tiny_gguf::make_tiny_gguf},
    },
};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a tiny random-weight model with a real small tokenizer and an R1-style template.
    MakeTiny(MakeTinyArgs),
    /// Show a model's architecture, size, context, tokenizer and template.
    Inspect(InspectArgs),
    /// Run one chat prompt through the local engine and stream the answer.
    Generate(GenerateArgs),
    /// Fetch a Hugging Face repo (`owner/name`, `owner/name:Q4_K_M`, `owner/name/file.gguf`)
    /// into the HF cache ahead of time; prints the local path `serve --model` will use.
    Pull(PullArgs),
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The repo [default: the default local model].
    #[arg(default_value = crate::config::DEFAULT_MODEL)]
    pub repo: String,
}

#[derive(Debug, Args)]
pub struct MakeTinyArgs {
    /// qwen2, llama or qwen3.
    #[arg(long, default_value = "qwen2")]
    pub arch: String,
    /// Output folder (or `.gguf` file with `--gguf`).
    #[arg(long)]
    pub out: PathBuf,
    /// Write one GGUF file (f32, llama.cpp names) instead of a safetensors folder.
    #[arg(long)]
    pub gguf: bool,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Model folder or `.gguf` file.
    pub path: PathBuf,
    /// Print only the chat template's source (to edit it and pass it to
    /// `serve --chat-template`).
    #[arg(long)]
    pub template: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model folder or `.gguf` file.
    pub path: PathBuf,
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub seed: Option<u64>,
}

pub async fn run(command: ModelCommand) -> Result<(), CliError> {
    match command {
        ModelCommand::MakeTiny(args) => {
            let arch = Arch::from_short_name(&args.arch).ok_or_else(|| {
                CliError::Usage(format!(
                    "--arch: unknown architecture {:?}; expected qwen2, llama or qwen3",
                    args.arch
                ))
            })?;
            let made = if args.gguf {
                make_tiny_gguf(arch, &args.out, args.seed)
            } else {
                make_tiny(arch, &args.out, args.seed)
            };
            made.map_err(|e| CliError::Usage(e.to_string()))?;
            emit(&format!(
                "wrote a tiny {} model to {}\n",
                arch.short_name(),
                args.out.display()
            ))
        }
        ModelCommand::Inspect(args) => {
            let info = read_info(&args.path).map_err(|e| CliError::Usage(e.to_string()))?;
            if args.template {
                let template = info.template.as_ref().ok_or_else(|| {
                    CliError::Usage(format!("{}: has no chat template", args.path.display()))
                })?;
                return emit(template.source());
            }
            emit(&describe(&info))
        }
        ModelCommand::Generate(args) => generate(args).await,
        ModelCommand::Pull(args) => {
            let spec = ModelSpec::parse(std::path::Path::new(&args.repo));
            if let ModelSpec::Local(path) = &spec {
                return Err(CliError::Usage(format!(
                    "{}: not a Hugging Face repo id (expected owner/name[:QUANT] or owner/name/file.gguf)",
                    path.display()
                )));
            }
            let path = tokio::task::spawn_blocking(move || hub::resolve(&spec, true))
                .await
                .map_err(|e| CliError::Runtime(format!("download task failed: {e}")))?
                .map_err(|e| CliError::Runtime(e.to_string()))?;
            emit(&format!("{}\n", path.display()))
        }
    }
}

async fn generate(args: GenerateArgs) -> Result<(), CliError> {
    let backend = LocalBackend::start(&LocalSettings {
        queue_capacity: 1,
        ..LocalSettings::new(args.path.clone())
    })
    .map_err(|e| CliError::Usage(e.to_string()))?;
    backend.wait_ready().await.map_err(CliError::Usage)?;
    let request = GenerationRequest::chat(
        "local",
        &args.prompt,
        SamplingParams {
            max_tokens: Some(args.max_tokens),
            temperature: Some(args.temperature),
            seed: args.seed,
            ..SamplingParams::default()
        },
    );
    let mut events = backend
        .generate(BackendRequest::new("local", Arc::new(request)))
        .await
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    let mut stdout = std::io::stdout();
    let mut in_reasoning = false;
    while let Some(event) = events.next().await {
        match event.map_err(|e| CliError::Runtime(e.to_string()))? {
            GenerationEvent::Delta(delta) => {
                if let Some(r) = delta.reasoning_content {
                    if !in_reasoning {
                        let _ = write!(stdout, "[reasoning] ");
                        in_reasoning = true;
                    }
                    let _ = write!(stdout, "{r}");
                }
                if let Some(c) = delta.content {
                    if in_reasoning {
                        let _ = write!(stdout, "\n[answer] ");
                        in_reasoning = false;
                    }
                    let _ = write!(stdout, "{c}");
                }
                if let Some(reason) = delta.finish_reason {
                    let _ = writeln!(stdout, "\n[finish: {reason}]");
                }
                let _ = stdout.flush();
            }
            GenerationEvent::Usage(u) => {
                eprintln!(
                    "usage: {} prompt + {} completion tokens",
                    u.prompt_tokens, u.completion_tokens
                );
            }
        }
    }
    Ok(())
}

/// What `model inspect` prints about a model.
fn describe(info: &crate::engine::ModelInfo) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let d = &info.dims;
    let params: usize = d
        .expected_tensors()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let _ = writeln!(
        out,
        "architecture  {} ({})",
        info.arch.class_name(),
        info.arch.short_name()
    );
    let _ = writeln!(out, "parameters    {params} ({:.2} M)", params as f64 / 1e6);
    let _ = writeln!(
        out,
        "shape         {} layers, hidden {}, {} heads / {} kv heads, head dim {}, ffn {}",
        d.layers, d.hidden, d.heads, d.kv_heads, d.head_dim, d.intermediate
    );
    if let Some(m) = &d.mla {
        let _ = writeln!(
            out,
            "attention     MLA: kv latent {}, q {}, rope dim {}, v dim {}",
            m.kv_lora_rank,
            m.q_lora_rank
                .map_or_else(|| "full rank".to_string(), |r| format!("rank {r}")),
            m.qk_rope_head_dim,
            m.v_head_dim
        );
        let _ = writeln!(
            out,
            "experts       {} routed ({} per token) + {} shared, width {}; {} dense layer(s) first",
            m.routed_experts, m.experts_per_token, m.shared_experts, m.moe_intermediate, m.first_dense_layers
        );
    }
    let _ = writeln!(out, "context       {} tokens", d.max_context);
    let _ = writeln!(
        out,
        "vocabulary    {} (tokenizer: {})",
        d.vocab,
        info.tokenizer.vocab_size()
    );
    let _ = writeln!(out, "eos ids       {:?}", info.eos_ids);
    let weights: Vec<String> = info
        .weight_types
        .iter()
        .map(|(kind, count)| format!("{kind} ×{count}"))
        .collect();
    let _ = writeln!(out, "weights       {}", weights.join(", "));
    let _ = writeln!(out, "tokenizer     {}", info.tokenizer_source);
    let template = match &info.template {
        None => "none".to_string(),
        Some(t) => format!("present; {}", t.variant()),
    };
    let _ = writeln!(out, "chat template {template}");
    out
}

/// Write `text` to stdout; a reader that went away (`| head`) is not an error.
fn emit(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(CliError::Runtime(format!("cannot write to stdout: {err}")))
        }
        _ => Ok(()),
    }
}
