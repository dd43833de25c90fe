//! Operational endpoints: `/health` (liveness), `/ready` (can serve), `/metrics`.

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::readiness;
use crate::app::AppState;

/// `GET /health`: the process is up and answering; each backend's breaker and its reason.
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    let backends: serde_json::Map<String, serde_json::Value> = state
        .router()
        .health()
        .into_iter()
        .map(|h| {
            let recent: Vec<serde_json::Value> = h
                .recent
                .iter()
                .map(|e| {
                    json!({
                        "at_unix_ms": e.at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                        "source": e.source.as_str(),
                        "outcome": e.outcome,
                        "latency_ms": e.latency.as_secs_f64() * 1000.0,
                    })
                })
                .collect();
            (
                h.id,
                json!({
                    "kind": h.kind.as_str(),
                    "breaker": h.breaker.as_str(),
                    "reason": h.reason,
                    "availability": {
                        "1m": h.availability.last_minute,
                        "1h": h.availability.last_hour,
                        "24h": h.availability.last_day,
                    },
                    "ttft_ewma_ms": h.ttft_ewma.map(|d| d.as_secs_f64() * 1000.0),
                    "latency_ewma_ms": h.latency_ewma.map(|d| d.as_secs_f64() * 1000.0),
                    "recent": recent,
                }),
            )
        })
        .collect();
    Json(json!({ "status": "ok", "backends": backends })).into_response()
}

/// Marks a readiness answer so the trace layer logs it at debug, whatever its status: a
/// probe asks every few seconds, and a 503 there is an answer, not a server fault (an
/// ERROR line per probe would drown the log of a box that is merely starting).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProbeAnswer;

/// `GET /ready`: 200 when every route has a usable target (`ready`, or `degraded` with
/// the failed parts listed); 503 while a backend is still starting, when some route has
/// none (`not_ready`), or when nothing is configured (`no_backend`). See [`readiness`].
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    let router = state.router();
    let backends = router.backend_ids();
    let statuses = router.backend_statuses();
    let verdict = readiness::judge(router.routes().public(), &statuses);
    let details: serde_json::Map<String, serde_json::Value> = statuses
        .iter()
        .map(|(id, s)| (id.clone(), json!(s.detail)))
        .collect();
    let code = if verdict.state.serves() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = match verdict.state {
        readiness::State::NoBackend => json!({
            "status": verdict.state.as_str(),
            "message": "no backend is configured: pass --remote-url or --model (or set [remotes] / [local] in the config file)",
            "backends": backends,
        }),
        _ => json!({
            "status": verdict.state.as_str(),
            "backends": backends,
            "phases": details,
            "degraded": verdict.degraded,
            "unserved_routes": verdict.unserved,
        }),
    };
    let mut response = (code, Json(body)).into_response();
    response.extensions_mut().insert(ProbeAnswer);
    response
}

/// `GET /metrics`: Prometheus text format (availability gauges refreshed first).
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    for h in state.router().health() {
        crate::metrics::availability(
            &h.id,
            h.availability.last_minute,
            h.availability.last_hour,
            h.availability.last_day,
        );
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}
