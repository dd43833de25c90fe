//! Operational endpoints: `/health` (liveness), `/ready` (can serve), `/metrics`.

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

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

/// `GET /ready`: 200 when every configured backend can take requests (a local model is
/// loaded and warm), else 503 with each backend's phase.
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    let router = state.router();
    let backends = router.backend_ids();
    let statuses = router.backend_statuses();
    let details: serde_json::Map<String, serde_json::Value> = statuses
        .iter()
        .map(|(id, s)| (id.clone(), json!(s.detail)))
        .collect();
    if statuses.iter().any(|(_, s)| !s.ready) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "backends": backends, "phases": details })),
        )
            .into_response();
    }
    if router.has_backends() {
        Json(json!({ "status": "ready", "backends": backends, "phases": details })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "no_backend",
                "message": "no backend is configured: pass --remote-url or --model (or set [remotes] / [local] in the config file)",
                "backends": backends,
            })),
        )
            .into_response()
    }
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
