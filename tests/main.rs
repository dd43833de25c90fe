//! The integration tests, one module per area, linked into one test binary.
//!
//! Run one area with `cargo test --test integration failover::`.

mod common;

mod bad_input;
mod batching;
mod bench;
mod chains;
mod chat_api;
mod cli;
mod failover;
mod fuzz_corpora;
mod gateway_keys;
mod gguf_local;
mod gguf_models;
mod hostile_gateway;
mod hub;
mod local_admission;
mod local_engine;
mod local_limits;
mod logits;
mod outage;
mod readiness;
mod reload;
mod request_traces;
mod retries;
mod server_limits;
mod streaming;
mod templates;
mod upstream_faults;
