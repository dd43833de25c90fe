//! The local engine's speed on a model file (issue figures: time to ready, prefill of a
//! 512-token prompt, single-stream decode, TTFT and aggregate decode at 1/2/4/8 streams,
//! peak RSS). `scripts/bench-llamacpp` runs it alternately with llama.cpp on the same GGUF.
//!
//! `cargo bench --bench engine -- --model FILE_OR_DIR [--prompt-tokens 512]
//!  [--decode-tokens 128] [--concurrency 1,2,4,8] [--stream-tokens 32] [--json]`

use lifeboat::engine::bench::{self, EngineBenchOptions};

fn options() -> Result<(EngineBenchOptions, bool), String> {
    let mut options = EngineBenchOptions::default();
    let mut json = false;
    let mut model = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let number = |name: &str, text: String| -> Result<usize, String> {
            text.trim()
                .parse::<usize>()
                .map_err(|e| format!("{name}: {text:?}: {e}"))
        };
        match arg.as_str() {
            "--model" => model = Some(value("--model")?),
            "--prompt-tokens" => options.prompt_tokens = number(&arg, value(&arg)?)?,
            "--decode-tokens" => options.decode_tokens = number(&arg, value(&arg)?)? as u32,
            "--stream-tokens" => options.stream_tokens = number(&arg, value(&arg)?)? as u32,
            "--concurrency" => {
                options.concurrency = value(&arg)?
                    .split(',')
                    .map(|c| number("--concurrency", c.to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--json" => json = true,
            // Passed by `cargo bench`.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    options.model = model
        .ok_or("--model FILE_OR_DIR is required (e.g. models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf)")?
        .into();
    Ok((options, json))
}

fn main() {
    let (options, json) = match options() {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("engine bench: {message}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("engine bench: cannot start the runtime: {err}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(bench::run(&options, |step| eprintln!("engine bench: {step}…"))) {
        Ok(report) if json => match serde_json::to_string(&report) {
            Ok(line) => println!("{line}"),
            Err(err) => {
                eprintln!("engine bench: {err}");
                std::process::exit(1);
            }
        },
        Ok(report) => println!("{report}"),
        Err(message) => {
            eprintln!("engine bench: {message}");
            std::process::exit(1);
        }
    }
}
