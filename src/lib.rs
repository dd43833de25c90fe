//! lifeboat: an on-prem OpenAI-compatible endpoint that prefers a hosted gateway and
//! keeps answering when it is slow, rate-limited, out of credit or down.
//!
//! # Layout
//!
//! Dependency direction: `api → router → backend ← {upstream, engine}`; `metrics`,
//! `alerts` and `usage` are leaves anyone may call; `cli` sits on top and `app` wires the
//! pieces together. The README's "Source layout" lists the same modules (`scripts/check-readme-tree` keeps it
//! equal to `src/`), and `docs/architecture.md` describes how the router decides.
//!
//! - [`cli`]: the `lifeboat` subcommands, one file each.
//! - [`config`]: the strict TOML config, overrides and secrets by reference.
//! - [`app`]: shared state, the axum app and the server entry (listener + shutdown).
//! - [`http_server`]: the accept loop: connection cap, header/body/idle timeouts, drain.
//! - [`api`]: the OpenAI wire format, validation, errors → HTTP, SSE.
//! - [`router`]: decides who serves: route table, dispatch and the commit point, failover
//!   policy, retries, breaker, deadlines, health, hedging.
//! - [`backend`]: the `Backend` trait and the engine-neutral event stream.
//! - [`request_id`]: a request's id (lifeboat's and the client's `x-request-id`), a leaf.
//! - [`upstream`]: the remote gateway over reqwest, its keys (rotation and parking), SSE
//!   parsing, error classification.
//! - [`engine`]: the local model on candle: loading, models, tokenizers, chat templates,
//!   sampler, scheduler, the engine thread, and the tiny test model (`docs/engine.md`).
//! - [`bench`](mod@bench): `lifeboat bench`: latency, throughput, errors and $/MTok of any
//!   OpenAI-compatible target, written as JSON, Markdown and SVG charts.
//! - [`metrics`]: metric names with units, Prometheus rendering.
//! - [`alerts`]: breaker changes POSTed to webhooks, in the background.
//! - [`usage`]: the usage ledger: one row per attempt with tokens and cost (SQLite or
//!   PostgreSQL), prices in integer nano-dollars, a batching writer off the request path.
//! - [`mock_upstream`]: the scriptable fake gateway for tests, benches and the CLI.
//! - [`shutdown`]: the SIGINT/SIGTERM future.
//! - [`tasks`]: background loops that survive a panic in one iteration.
//! - [`huge_pages`]: the binary's allocator (large blocks on transparent huge pages).

pub mod alerts;
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
pub mod usage;
