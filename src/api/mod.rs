//! The HTTP boundary: knows the OpenAI wire format, knows nothing about routing policy.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /v1/models/{id}`, `GET /health`, `GET /ready`, `GET /metrics` (the last three behind
//! `server.admin_api_key_envs` when set). Every error, including unknown URLs, wrong
//! methods and panics, is an OpenAI error body.

pub mod auth;
pub mod error;
mod generate;
mod models;
mod readiness;
mod request_ids;
mod sse;
mod status;
pub mod types;
pub mod validate;

use axum::{
    Router,
    extract::{DefaultBodyLimit, Request},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};

use crate::app::AppState;
use error::ApiError;
pub(crate) use status::ProbeAnswer;

/// All routes with their state; `app::app` adds the cross-cutting layers.
pub fn routes(state: AppState) -> Router {
    // The request id comes first, so even a refused key is answered with `x-request-id`.
    let generation = Router::new()
        .route("/chat/completions", post(generate::chat_completions))
        .route("/completions", post(generate::completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_key))
        .route_layer(middleware::from_fn(request_ids::tag));
    let v1 = Router::new()
        .route("/models", get(models::list))
        .route("/models/{*id}", get(models::get))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_key))
        .merge(generation)
        .layer(DefaultBodyLimit::max(state.max_body_bytes));
    // Operational endpoints: open unless admin keys are configured.
    let admin = Router::new()
        .route("/health", get(status::health))
        .route("/ready", get(status::ready))
        .route("/metrics", get(status::metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin_key,
        ));
    Router::new()
        .nest("/v1", v1)
        .merge(admin)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found(request: Request) -> Response {
    ApiError::RouteNotFound {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
    }
    .into_response()
}

async fn method_not_allowed(request: Request) -> Response {
    ApiError::MethodNotAllowed {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
    }
    .into_response()
}
