//! `x-request-id` at the HTTP boundary: a request to a generation endpoint gets its
//! [`RequestId`] before anything else runs (authentication included), and every response
//! to it, an error or not, carries `x-request-id` back.

use axum::{
    extract::Request,
    http::{HeaderName, HeaderValue},
    middleware::Next,
    response::Response,
};

use crate::{
    backend::Endpoint,
    request_id::{RequestId, X_REQUEST_ID},
};

/// Middleware for the generation routes: make the request's id (the handler finds it as
/// an extension) and answer `x-request-id` on whatever response comes back.
pub(crate) async fn tag(mut request: Request, next: Next) -> Response {
    let endpoint = if request.uri().path().ends_with("chat/completions") {
        Endpoint::ChatCompletions
    } else {
        Endpoint::Completions
    };
    let header = HeaderName::from_static(X_REQUEST_ID);
    let id = RequestId::generate(endpoint.id_prefix())
        .with_client_header(request.headers().get(&header).map(HeaderValue::as_bytes));
    // Both ids are printable ASCII by construction, so this never fails.
    let echo = HeaderValue::from_str(id.header_value());
    request.extensions_mut().insert(id);
    let mut response = next.run(request).await;
    if let Ok(echo) = echo {
        response.headers_mut().insert(header, echo);
    }
    response
}
