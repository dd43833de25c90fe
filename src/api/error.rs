//! The one place where errors become HTTP: [`ApiError`], its status table and the OpenAI
//! error body `{"error":{"message","type","param","code"}}`, used before a stream starts
//! and, through [`ApiError::body`], inside one.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use super::{
    types::{ErrorBody, ErrorResponse},
    validate::ValidationError,
};
use crate::{
    backend::{BackendError, BackendKind, ErrorKind},
    router::RouteError,
};

/// Every way a request can fail, as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("Request body is larger than the limit of {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    #[error("Could not read the request body: {0}")]
    BadBody(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("Unknown request URL: {method} {path}. Please check the URL and method.")]
    RouteNotFound { method: String, path: String },
    #[error("Method {method} is not allowed for {path}.")]
    MethodNotAllowed { method: String, path: String },
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A bug; the detail is logged, the client gets a generic text.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Status, OpenAI `type` and `code` for an [`ApiError`].
struct Classified {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
}

fn classify(status: StatusCode, kind: &'static str, code: Option<&'static str>) -> Classified {
    Classified { status, kind, code }
}

/// The status table for failed backend attempts. A client's own mistake keeps its 4xx;
/// everything that is the gateway's fault is a 5xx, since the client cannot fix it.
fn classify_backend(error: &BackendError) -> Classified {
    use StatusCode as S;
    match error.kind {
        ErrorKind::BadRequest => classify(S::BAD_REQUEST, "invalid_request_error", None),
        ErrorKind::RateLimited => classify(
            S::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
        ),
        ErrorKind::Timeout(_) => classify(S::GATEWAY_TIMEOUT, "api_error", Some("upstream_timeout")),
        ErrorKind::Connect => classify(S::BAD_GATEWAY, "api_error", Some("upstream_unreachable")),
        ErrorKind::ServerError => classify(S::BAD_GATEWAY, "api_error", Some("upstream_error")),
        ErrorKind::Unauthorized => classify(S::BAD_GATEWAY, "api_error", Some("upstream_auth_failed")),
        ErrorKind::PaymentRequired => classify(S::BAD_GATEWAY, "api_error", Some("upstream_out_of_credit")),
        ErrorKind::NotFound => classify(S::BAD_GATEWAY, "api_error", Some("upstream_model_not_found")),
        ErrorKind::MalformedFrame => {
            classify(S::BAD_GATEWAY, "api_error", Some("upstream_malformed_response"))
        }
        ErrorKind::StreamCut => classify(S::BAD_GATEWAY, "api_error", Some("upstream_stream_cut")),
        ErrorKind::Empty => classify(S::BAD_GATEWAY, "api_error", Some("upstream_empty_response")),
        ErrorKind::Unavailable => classify(S::SERVICE_UNAVAILABLE, "api_error", Some("backend_unavailable")),
        ErrorKind::Internal => classify(S::INTERNAL_SERVER_ERROR, "api_error", Some("internal_error")),
    }
}

/// What a client is told about a gateway failure: who, what kind, the HTTP status, and
/// how many attempts lifeboat made — never the gateway's own text.
fn upstream_failure_message(backend: &str, error: &BackendError, attempts: u32) -> String {
    use crate::backend::TimeoutPhase;
    let what = match error.kind {
        ErrorKind::Connect => "could not be reached",
        ErrorKind::Timeout(TimeoutPhase::Connect) => "timed out while connecting",
        ErrorKind::Timeout(TimeoutPhase::FirstToken) => "timed out before the first token",
        ErrorKind::Timeout(TimeoutPhase::Idle) => "stalled in the middle of the answer",
        ErrorKind::Timeout(TimeoutPhase::Total) => "ran past the time allowed for a whole answer",
        ErrorKind::RateLimited => "is rate-limiting requests",
        ErrorKind::ServerError if error.status.is_none() => "reported an error inside its answer",
        ErrorKind::ServerError => "failed with a server error",
        ErrorKind::Unauthorized => "refused lifeboat's gateway key",
        ErrorKind::PaymentRequired => "is out of credit",
        ErrorKind::NotFound => "does not serve the routed model",
        ErrorKind::MalformedFrame => "sent a malformed or oversized answer",
        ErrorKind::StreamCut => "broke off the answer before it was complete",
        ErrorKind::Empty => "sent an empty answer",
        ErrorKind::BadRequest | ErrorKind::Unavailable | ErrorKind::Internal => "failed",
    };
    let mut message = format!("The upstream gateway `{backend}` {what}");
    if let Some(status) = error.status {
        message.push_str(&format!(" (HTTP {status})"));
    }
    if attempts > 1 {
        message.push_str(&format!(" after {attempts} attempts"));
    }
    message.push('.');
    message
}

impl ApiError {
    fn classified(&self) -> Classified {
        use StatusCode as S;
        match self {
            ApiError::Validation(_) | ApiError::BadBody(_) => {
                classify(S::BAD_REQUEST, "invalid_request_error", None)
            }
            ApiError::ModelNotFound(_) | ApiError::Route(RouteError::UnknownModel(_)) => {
                classify(S::NOT_FOUND, "invalid_request_error", Some("model_not_found"))
            }
            ApiError::PayloadTooLarge { .. } => classify(
                S::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
            ),
            ApiError::Unauthorized(_) => {
                classify(S::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key"))
            }
            ApiError::RouteNotFound { .. } => {
                classify(S::NOT_FOUND, "invalid_request_error", Some("unknown_url"))
            }
            ApiError::MethodNotAllowed { .. } => classify(
                S::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                Some("method_not_allowed"),
            ),
            ApiError::Route(RouteError::AllOpen { .. }) => {
                classify(S::SERVICE_UNAVAILABLE, "api_error", Some("all_backends_failing"))
            }
            ApiError::Route(RouteError::NoBackend { .. }) => {
                classify(S::SERVICE_UNAVAILABLE, "api_error", Some("no_backend_available"))
            }
            ApiError::Route(RouteError::Backend { error, .. }) => classify_backend(error),
            ApiError::Internal(_) => classify(S::INTERNAL_SERVER_ERROR, "api_error", Some("internal_error")),
        }
    }

    /// HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        self.classified().status
    }

    /// The OpenAI error object, for a JSON body or an in-band stream event.
    pub fn body(&self) -> ErrorBody {
        let classified = self.classified();
        let (message, param, code) = match self {
            ApiError::Validation(err) => (err.to_string(), err.param().map(str::to_string), None),
            ApiError::Route(RouteError::Backend { error, .. }) if error.kind == ErrorKind::BadRequest => {
                (error.message.clone(), error.param.clone(), error.code.clone())
            }
            ApiError::Internal(_) => (
                "The server had an error while processing your request.".to_string(),
                None,
                None,
            ),
            ApiError::Route(RouteError::Backend { error, .. }) if error.kind == ErrorKind::Internal => (
                "The server had an error while processing your request.".to_string(),
                None,
                None,
            ),
            // A gateway's own words can carry its internals (keys, org ids, internal URLs):
            // the client gets the classification, the log gets the (redacted) detail.
            ApiError::Route(RouteError::Backend {
                backend,
                backend_kind: BackendKind::Remote,
                error,
                attempts,
            }) => (upstream_failure_message(backend, error, *attempts), None, None),
            other => (other.to_string(), None, None),
        };
        ErrorBody {
            message,
            kind: classified.kind,
            param,
            code: code.or_else(|| classified.code.map(str::to_string)),
        }
    }

    /// Build from a failure after the commit point (sent in-band).
    pub fn from_stream(backend: &str, backend_kind: BackendKind, error: BackendError) -> ApiError {
        ApiError::Route(RouteError::Backend {
            backend: backend.to_string(),
            backend_kind,
            error,
            attempts: 1,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "request rejected");
        }
        let mut response = (status, Json(ErrorResponse { error: self.body() })).into_response();
        let headers = response.headers_mut();
        if let ApiError::Route(RouteError::Backend {
            backend,
            error,
            attempts,
            ..
        }) = &self
        {
            headers.insert("x-lifeboat-attempts", HeaderValue::from(*attempts));
            if *attempts > 1 {
                // lifeboat spent its own retries; SDKs must not multiply them.
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            if let Ok(value) = HeaderValue::from_str(backend) {
                headers.insert("x-lifeboat-backend", value);
            }
            if let Some(after) = error.retry_after {
                // Round up: `Retry-After: 0` would invite an immediate retry storm.
                let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
        }
        if let ApiError::Route(RouteError::AllOpen { retry_in, .. }) = &self {
            let secs = retry_in.as_secs() + u64::from(retry_in.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::TimeoutPhase;

    fn backend_error(kind: ErrorKind) -> ApiError {
        ApiError::Route(RouteError::Backend {
            backend: "g".into(),
            backend_kind: BackendKind::Remote,
            error: BackendError::new(kind, "detail"),
            attempts: 1,
        })
    }

    #[test]
    fn status_table() {
        let cases = [
            (backend_error(ErrorKind::BadRequest), 400),
            (backend_error(ErrorKind::RateLimited), 429),
            (backend_error(ErrorKind::Timeout(TimeoutPhase::Idle)), 504),
            (backend_error(ErrorKind::Connect), 502),
            (backend_error(ErrorKind::Unauthorized), 502),
            (backend_error(ErrorKind::PaymentRequired), 502),
            (backend_error(ErrorKind::Internal), 500),
            (ApiError::ModelNotFound("x".into()), 404),
            (ApiError::PayloadTooLarge { limit: 1 }, 413),
            (ApiError::Unauthorized("no"), 401),
        ];
        for (error, status) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
        }
    }

    #[test]
    fn internal_detail_is_not_sent() {
        let body = ApiError::Internal("secret stack trace".into()).body();
        assert!(!body.message.contains("secret"));
    }

    #[test]
    fn a_gateways_own_words_reach_the_client_only_for_its_own_mistakes() {
        let leaky = "Incorrect key sk-live-123 for Org org-internal-42 at http://10.0.0.7:8000";
        let mut error = BackendError::new(ErrorKind::ServerError, leaky);
        error.status = Some(500);
        error.code = Some("org-internal-42".into());
        let body = ApiError::Route(RouteError::Backend {
            backend: "gateway".into(),
            backend_kind: BackendKind::Remote,
            error,
            attempts: 2,
        })
        .body();
        assert_eq!(
            body.message,
            "The upstream gateway `gateway` failed with a server error (HTTP 500) after 2 attempts."
        );
        assert_eq!(body.code.as_deref(), Some("upstream_error"));

        let mut bad = BackendError::new(ErrorKind::BadRequest, "bad temperature");
        bad.param = Some("temperature".into());
        let body = ApiError::Route(RouteError::Backend {
            backend: "gateway".into(),
            backend_kind: BackendKind::Remote,
            error: bad,
            attempts: 1,
        })
        .body();
        assert_eq!(
            (body.message.as_str(), body.param.as_deref()),
            ("bad temperature", Some("temperature"))
        );
    }

    #[test]
    fn rate_limit_carries_retry_after_rounded_up() {
        let mut error = BackendError::new(ErrorKind::RateLimited, "slow down");
        error.retry_after = Some(Duration::from_millis(1500));
        let response = ApiError::Route(RouteError::Backend {
            backend: "g".into(),
            backend_kind: BackendKind::Remote,
            error,
            attempts: 2,
        })
        .into_response();
        assert_eq!(response.headers()["retry-after"], "2");
        assert_eq!(
            response.headers()["x-should-retry"],
            "false",
            "lifeboat already retried"
        );
        assert_eq!(response.headers()["x-lifeboat-backend"], "g");
    }
}
