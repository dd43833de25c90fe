//! Operational endpoints: `/health` (liveness), `/ready` (can serve), `/metrics`.

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::app::AppState;

/// `GET /health`: the process is up and answering.
pub(crate) async fn health() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// `GET /ready`: 200 when at least one backend can take requests, else 503 with the reason.
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    let backends = state.router.backend_ids();
    if state.router.has_backends() {
        Json(json!({ "status": "ready", "backends": backends })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "no_backend",
                "message": "no backend is configured: pass --remote-url (or set [remotes] in the config file)",
                "backends": backends,
            })),
        )
            .into_response()
    }
}

/// `GET /metrics`: Prometheus text format.
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}
