//! `GET /v1/models` and `GET /v1/models/{id}` from the route table.

use axum::{
    Json,
    extract::{Path, State},
    response::{IntoResponse, Response},
};

use super::{
    error::ApiError,
    types::{ModelList, ModelObject},
};
use crate::{app::AppState, router::ModelInfo};

fn object(info: ModelInfo, created: u64) -> ModelObject {
    ModelObject {
        id: info.id,
        object: "model",
        created,
        owned_by: info.owned_by,
    }
}

/// `GET /v1/models`
pub(crate) async fn list(State(state): State<AppState>) -> Response {
    let data = state
        .router()
        .models()
        .into_iter()
        .map(|info| object(info, state.started_unix))
        .collect();
    Json(ModelList { object: "list", data }).into_response()
}

/// `GET /v1/models/{id}`; ids may contain `/` (`provider/model`), hence the wildcard.
pub(crate) async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let info = state
        .router()
        .models()
        .into_iter()
        .find(|m| m.id == id)
        .ok_or(ApiError::ModelNotFound(id))?;
    Ok(Json(object(info, state.started_unix)).into_response())
}
