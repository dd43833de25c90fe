//! Command-line interface: `lifeboat serve`, `lifeboat bench`, `lifeboat mock-upstream` and
//! `lifeboat model`, one file each; `logging` sets up the process's log for all of them.

pub mod bench;
pub mod bench_engine;
pub mod logging;
pub mod mock_upstream;
pub mod model;
pub mod serve;

use clap::{Parser, Subcommand};

/// On-prem OpenAI-compatible endpoint that prefers a hosted gateway and keeps answering
/// when it fails.
#[derive(Debug, Parser)]
#[command(name = "lifeboat", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible API.
    Serve(serve::ServeArgs),
    /// Measure OpenAI-compatible targets on the same prompts: latency, throughput,
    /// errors and $/MTok; writes JSON, Markdown and SVG charts. `bench engine` measures
    /// the local engine itself.
    Bench(bench::BenchCommand),
    /// Run the scriptable fake gateway used by tests and benchmarks.
    MockUpstream(mock_upstream::MockUpstreamArgs),
    /// Local model tools: make-tiny, inspect, generate, pull.
    #[command(subcommand)]
    Model(model::ModelCommand),
}

/// A failed command: the message is printed as it is, with exit code 2 for bad input
/// (config, arguments) and 1 for runtime failures.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Runtime(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Runtime(_) => 1,
        }
    }
}

/// Run the parsed command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Bench(bench::BenchCommand {
            subcommand: Some(bench::BenchSubcommand::Engine(args)),
            ..
        }) => bench_engine::run(args).await,
        Command::Bench(command) => bench::run(command.targets).await,
        Command::MockUpstream(args) => mock_upstream::run(args).await,
        Command::Model(command) => model::run(command).await,
    }
}
