//! lifeboat: an on-prem OpenAI-compatible endpoint that prefers a hosted gateway and
//! keeps answering when it is slow, rate-limited, out of credit or down.
//!
//! # Layout
//!
//! Dependency direction: `api → router → backend ← upstream`; `metrics` is a leaf.
//!
//! - [`cli`]: the `lifeboat` subcommands, one file each.
//! - [`config`]: the strict TOML config, overrides and secrets by reference.
//! - [`app`]: shared state, the axum app and the server entry (listener + shutdown).
//! - [`http_server`]: the accept loop: connection cap, header/body/idle timeouts, drain.
//! - [`api`]: the OpenAI wire format, validation, errors → HTTP, SSE.
//! - [`router`]: route table and the commit point; decides who serves.
//! - [`backend`]: the `Backend` trait and the engine-neutral event stream.
//! - [`request_id`]: a request's id (lifeboat's and the client's `x-request-id`), a leaf.
//! - [`upstream`]: the remote gateway over reqwest, its keys (rotation and parking), SSE
//!   parsing, error classification.
//! - [`engine`]: the local model on candle: loader, tokenizer, chat template, sampler,
//!   the engine thread, and the tiny test model.
//! - [`bench`]: `lifeboat bench`: latency, throughput, errors and $/MTok of any
//!   OpenAI-compatible target, written as JSON, Markdown and SVG charts.
//! - [`metrics`]: metric names with units, Prometheus rendering.
//! - [`mock_upstream`]: the scriptable fake gateway for tests, benches and the CLI.
//! - [`shutdown`]: the SIGINT/SIGTERM future.
//! - [`tasks`]: background loops that survive a panic in one iteration.
//! - [`huge_pages`]: the binary's allocator (large blocks on transparent huge pages).

pub mod api;
pub mod app;
pub mod backend;
pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
pub mod http_server;
pub mod huge_pages;
pub mod metrics;
pub mod mock_upstream;
pub mod request_id;
pub mod router;
pub mod shutdown;
pub mod tasks;
pub mod upstream;
