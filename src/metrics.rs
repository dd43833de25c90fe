//! Metric names (defined once, with their units) and the small helpers that record them.
//! A leaf module: anyone may call it. Rendered in Prometheus text format at `/metrics`.

use std::{sync::OnceLock, time::Duration};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::backend::{BackendKind, ErrorKind};

/// Client requests by `endpoint`, `backend` (or `none`) and HTTP `status`.
pub const REQUESTS_TOTAL: &str = "lifeboat_requests_total";
/// Time from receiving a request to its last byte, by `endpoint` and `backend`.
pub const REQUEST_DURATION_SECONDS: &str = "lifeboat_request_duration_seconds";
/// Time from receiving a request to its first output, by `backend`.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "lifeboat_time_to_first_token_seconds";
/// Attempts started on a backend, by `backend` and `kind` (`remote`/`local`).
pub const ATTEMPTS_TOTAL: &str = "lifeboat_attempts_total";
/// Failed attempts, by `backend` and error `kind` (see `ErrorKind::as_str`).
pub const ATTEMPT_ERRORS_TOTAL: &str = "lifeboat_attempt_errors_total";
/// Failures after the commit point, sent in-band to the client, by `backend` and `kind`.
pub const STREAM_ERRORS_TOTAL: &str = "lifeboat_stream_errors_total";
/// Share of successful attempts and probes, by `backend` and `window` (`1m`, `1h`, `24h`).
pub const AVAILABILITY_RATIO: &str = "lifeboat_availability_ratio";
/// Hedged attempts by `outcome` (`primary_won`, `hedge_won`, `hedge_failed`).
pub const HEDGES_TOTAL: &str = "lifeboat_hedges_total";
/// Broken streams continued by another backend, by `from`, `to` and `reason`.
pub const CONTINUATIONS_TOTAL: &str = "lifeboat_continuations_total";
/// Retries on the same backend, by `backend` and the `reason` (error kind).
pub const RETRIES_TOTAL: &str = "lifeboat_retries_total";
/// Failovers, by `from` and `to` backend and the `reason` (error kind).
pub const FAILOVERS_TOTAL: &str = "lifeboat_failovers_total";
/// Breaker state per `backend`: 0 closed, 1 half-open, 2 open.
pub const BREAKER_STATE: &str = "lifeboat_breaker_state";
/// Breaker transitions, by `backend` and the state entered (`to`).
pub const BREAKER_TRANSITIONS_TOTAL: &str = "lifeboat_breaker_transitions_total";
/// Tokens accounted, by `backend` and `type` (`prompt`/`completion`).
pub const TOKENS_TOTAL: &str = "lifeboat_tokens_total";
/// Requests being answered right now.
pub const IN_FLIGHT_REQUESTS: &str = "lifeboat_in_flight_requests";
/// Requests failed over while waiting on a remote whose breaker tripped (`backend`).
pub const RESCUES_TOTAL: &str = "lifeboat_rescues_total";
/// Panics caught in one iteration of a background task (`task`), which then carried on.
pub const BACKGROUND_PANICS_TOTAL: &str = "lifeboat_background_task_panics_total";
/// Local sequences cancelled because their streaming client stopped reading
/// (`local.stalled_client_timeout`).
pub const LOCAL_STALLED_CLIENTS_TOTAL: &str = "lifeboat_local_stalled_clients_total";

/// Calls made to a gateway with each of its keys, by `backend` and `key` (the key's
/// fingerprint: 8 hex digits of its SHA-256, never the key).
pub const GATEWAY_KEY_REQUESTS_TOTAL: &str = "lifeboat_gateway_key_requests_total";
/// Keys parked after a 401 or 402, by `backend`, `key` (fingerprint) and `status`.
pub const GATEWAY_KEY_PARKED_TOTAL: &str = "lifeboat_gateway_key_parked_total";

/// Usage-ledger rows committed to the database.
pub const LEDGER_ROWS_WRITTEN_TOTAL: &str = "lifeboat_ledger_rows_written_total";
/// Usage-ledger rows lost, by `reason`: `queue_full` (the writer fell behind),
/// `write_failed` (the database refused the batch), `closed` (the writer had stopped).
pub const LEDGER_ROWS_DROPPED_TOTAL: &str = "lifeboat_ledger_rows_dropped_total";

/// Latency buckets in seconds, from 1 ms to 10 min.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
];

/// Install the process-wide recorder once and return its handle. Every app in the process
/// (tests start several) shares it, because `metrics` has one global recorder.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (a host program); then our
            // handle renders nothing, which is better than refusing to start.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(REQUESTS_TOTAL, "Client requests by endpoint, backend and status");
    metrics::describe_histogram!(
        REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Request duration until the last byte"
    );
    metrics::describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        metrics::Unit::Seconds,
        "Time from request to first output"
    );
    metrics::describe_counter!(ATTEMPTS_TOTAL, "Attempts started per backend");
    metrics::describe_counter!(ATTEMPT_ERRORS_TOTAL, "Failed attempts per backend and error kind");
    metrics::describe_counter!(STREAM_ERRORS_TOTAL, "Failures after the first streamed byte");
    metrics::describe_counter!(TOKENS_TOTAL, "Tokens per backend and type");
    metrics::describe_gauge!(IN_FLIGHT_REQUESTS, "Requests in flight");
    metrics::describe_counter!(FAILOVERS_TOTAL, "Failovers from one backend to the next");
    metrics::describe_counter!(RETRIES_TOTAL, "Retries on the same backend");
    metrics::describe_counter!(CONTINUATIONS_TOTAL, "Broken streams continued locally");
    metrics::describe_counter!(HEDGES_TOTAL, "Hedged attempts by outcome");
    metrics::describe_gauge!(AVAILABILITY_RATIO, "Successful attempts and probes over a window");
    metrics::describe_gauge!(BREAKER_STATE, "Breaker state: 0 closed, 1 half-open, 2 open");
    metrics::describe_counter!(BREAKER_TRANSITIONS_TOTAL, "Breaker state changes");
    metrics::describe_counter!(
        GATEWAY_KEY_REQUESTS_TOTAL,
        "Gateway calls per key (by the key's SHA-256 fingerprint)"
    );
    metrics::describe_counter!(GATEWAY_KEY_PARKED_TOTAL, "Gateway keys parked after a 401 or 402");
    metrics::describe_counter!(LEDGER_ROWS_WRITTEN_TOTAL, "Usage-ledger rows committed");
    metrics::describe_counter!(LEDGER_ROWS_DROPPED_TOTAL, "Usage-ledger rows lost, by reason");
    metrics::describe_counter!(
        LOCAL_STALLED_CLIENTS_TOTAL,
        "Local sequences cancelled because the client stopped reading"
    );
}

pub fn attempt_started(backend: &str, kind: BackendKind) {
    metrics::counter!(ATTEMPTS_TOTAL, "backend" => backend.to_string(), "kind" => kind.as_str()).increment(1);
}

pub fn attempt_failed(backend: &str, kind: ErrorKind) {
    metrics::counter!(ATTEMPT_ERRORS_TOTAL, "backend" => backend.to_string(), "kind" => kind.as_str())
        .increment(1);
}

pub fn availability(backend: &str, minute: Option<f64>, hour: Option<f64>, day: Option<f64>) {
    for (window, value) in [("1m", minute), ("1h", hour), ("24h", day)] {
        if let Some(value) = value {
            metrics::gauge!(AVAILABILITY_RATIO, "backend" => backend.to_string(), "window" => window)
                .set(value);
        }
    }
}

pub fn hedge(outcome: &'static str) {
    metrics::counter!(HEDGES_TOTAL, "outcome" => outcome).increment(1);
}

pub fn continued(from: &str, to: &str, reason: ErrorKind) {
    metrics::counter!(CONTINUATIONS_TOTAL, "from" => from.to_string(), "to" => to.to_string(), "reason" => reason.as_str())
        .increment(1);
}

pub fn retry(backend: &str, reason: ErrorKind) {
    metrics::counter!(RETRIES_TOTAL, "backend" => backend.to_string(), "reason" => reason.as_str())
        .increment(1);
}

pub fn failover(from: &str, to: &str, reason: ErrorKind) {
    metrics::counter!(FAILOVERS_TOTAL, "from" => from.to_string(), "to" => to.to_string(), "reason" => reason.as_str())
        .increment(1);
}

/// A breaker moved `to` a state (its label), whose [`BREAKER_STATE`] gauge value is `level`.
pub fn breaker_transition(backend: &str, to: &'static str, level: f64) {
    metrics::gauge!(BREAKER_STATE, "backend" => backend.to_string()).set(level);
    metrics::counter!(BREAKER_TRANSITIONS_TOTAL, "backend" => backend.to_string(), "to" => to).increment(1);
}

pub fn stream_failed(backend: &str, kind: ErrorKind) {
    metrics::counter!(STREAM_ERRORS_TOTAL, "backend" => backend.to_string(), "kind" => kind.as_str())
        .increment(1);
}

pub fn request_finished(endpoint: &'static str, backend: &str, status: u16, elapsed: Duration) {
    metrics::counter!(REQUESTS_TOTAL, "endpoint" => endpoint, "backend" => backend.to_string(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!(REQUEST_DURATION_SECONDS, "endpoint" => endpoint, "backend" => backend.to_string())
        .record(elapsed.as_secs_f64());
}

pub fn gateway_key_request(backend: &str, key: &str) {
    metrics::counter!(GATEWAY_KEY_REQUESTS_TOTAL, "backend" => backend.to_string(), "key" => key.to_string())
        .increment(1);
}

pub fn gateway_key_parked(backend: &str, key: &str, status: u16) {
    metrics::counter!(GATEWAY_KEY_PARKED_TOTAL, "backend" => backend.to_string(), "key" => key.to_string(), "status" => status.to_string())
        .increment(1);
}

pub fn local_stalled_client() {
    metrics::counter!(LOCAL_STALLED_CLIENTS_TOTAL).increment(1);
}

pub fn first_token(backend: &str, elapsed: Duration) {
    metrics::histogram!(TIME_TO_FIRST_TOKEN_SECONDS, "backend" => backend.to_string())
        .record(elapsed.as_secs_f64());
}

pub fn tokens(backend: &str, prompt: u64, completion: u64) {
    metrics::counter!(TOKENS_TOTAL, "backend" => backend.to_string(), "type" => "prompt").increment(prompt);
    metrics::counter!(TOKENS_TOTAL, "backend" => backend.to_string(), "type" => "completion")
        .increment(completion);
}

pub fn ledger_rows_written(rows: u64) {
    metrics::counter!(LEDGER_ROWS_WRITTEN_TOTAL).increment(rows);
}

pub fn ledger_rows_dropped(reason: &'static str, rows: u64) {
    metrics::counter!(LEDGER_ROWS_DROPPED_TOTAL, "reason" => reason).increment(rows);
}

pub fn rescued(backend: &str) {
    metrics::counter!(RESCUES_TOTAL, "backend" => backend.to_string()).increment(1);
}

pub fn background_panic(task: &'static str) {
    metrics::counter!(BACKGROUND_PANICS_TOTAL, "task" => task).increment(1);
}

/// Counts a request as in flight until dropped.
#[derive(Debug)]
pub struct InFlight(());

impl InFlight {
    pub fn start() -> InFlight {
        metrics::gauge!(IN_FLIGHT_REQUESTS).increment(1.0);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(IN_FLIGHT_REQUESTS).decrement(1.0);
    }
}
