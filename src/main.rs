//! The `lifeboat` binary: parse the command line, set up logging, run the subcommand.

use clap::Parser;
use lifeboat::cli::{self, Cli};

// Model weights and KV caches on huge pages: their page faults dominate a model's
// start-up otherwise (see `huge_pages` and docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: lifeboat::huge_pages::HugePageAlloc = lifeboat::huge_pages::HugePageAlloc;

fn main() {
    lifeboat::huge_pages::limit_malloc_arenas();
    // SAFETY: the first thing the process does, before the runtime starts its threads.
    #[allow(unsafe_code)]
    unsafe {
        lifeboat::engine::settle_cpu_threads()
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("lifeboat: cannot start the async runtime: {err}");
            std::process::exit(1);
        }
    };
    runtime.block_on(run());
    // Dropping the runtime would wait for every `spawn_blocking` task, so a prompt render
    // or tokenization still running would hold the exit after SIGTERM's drain; renders are
    // bounded by fuel, and this bounds the wait whatever else is still running.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
}

async fn run() {
    let cli = Cli::parse();
    if let Err(err) = cli::logging::init() {
        eprintln!("lifeboat: {err}");
        std::process::exit(err.exit_code());
    }
    if let Err(err) = cli::run(cli).await {
        eprintln!("lifeboat: {err}");
        std::process::exit(err.exit_code());
    }
}
