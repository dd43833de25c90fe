//! The local engine's speed on a model file, as `lifeboat bench engine` measures it (time to
//! ready, prefill of a 512-token prompt, single-stream decode, TTFT and aggregate decode at
//! 1/2/4/8 streams, peak RSS). `scripts/bench-llamacpp` runs it alternately with llama.cpp.
//!
//! `cargo bench --bench engine -- --model FILE_OR_DIR [--prompt-tokens 512]
//!  [--decode-tokens 128] [--concurrency 1,2,4,8] [--stream-tokens 32] [--json]`

use clap::Parser;
use lifeboat::cli::{self, Cli};

// The same allocator as the `lifeboat` binary, so load times match what `serve` sees.
#[global_allocator]
static ALLOCATOR: lifeboat::huge_pages::HugePageAlloc = lifeboat::huge_pages::HugePageAlloc;

fn main() {
    lifeboat::huge_pages::limit_malloc_arenas();
    // SAFETY: the first thing the process does, before any thread starts.
    #[allow(unsafe_code)]
    unsafe {
        lifeboat::engine::settle_cpu_threads()
    };
    // `cargo bench` passes `--bench`; everything else is `lifeboat bench engine`'s.
    let args = std::env::args().skip(1).filter(|arg| arg != "--bench");
    let command = ["lifeboat", "bench", "engine"]
        .map(String::from)
        .into_iter()
        .chain(args);
    let cli = Cli::parse_from(command);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("engine bench: cannot start the runtime: {err}");
            std::process::exit(1);
        }
    };
    if let Err(err) = runtime.block_on(cli::run(cli)) {
        eprintln!("engine bench: {err}");
        std::process::exit(err.exit_code());
    }
}
