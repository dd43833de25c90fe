//! Every HTTP status and transport failure of a gateway becomes a classified
//! [`BackendError`]: the status table, `Retry-After` read safely, and error texts with
//! their credentials redacted.

use std::time::Duration;

use reqwest::{StatusCode, header::HeaderMap};
use serde_json::Value;

use super::stream::{WireError, preview, value_to_string};
use crate::{
    backend::{BackendError, ErrorKind, TimeoutPhase},
    config::redact_text,
};

/// Classify a non-2xx upstream response. `body` is (the start of) its body; `secret` is
/// scrubbed from the message in case the gateway echoes the key.
pub fn classify_status(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    secret: Option<&str>,
) -> BackendError {
    let parsed: Option<WireError> = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").cloned())
        .and_then(|e| match e {
            Value::String(message) => Some(WireError {
                message: Some(message),
                ..WireError::default()
            }),
            other => serde_json::from_value(other).ok(),
        });
    let upstream_message = parsed
        .as_ref()
        .and_then(|e| e.message.clone())
        .unwrap_or_else(|| preview(String::from_utf8_lossy(body).trim()));
    let upstream_message = match secret {
        Some(secret) if !secret.is_empty() => upstream_message.replace(secret, "<redacted>"),
        _ => upstream_message,
    };
    let upstream_message = redact_text(&upstream_message);
    let kind = match status.as_u16() {
        400 | 413 | 422 => ErrorKind::BadRequest,
        401 | 403 => ErrorKind::Unauthorized,
        402 => ErrorKind::PaymentRequired,
        404 => ErrorKind::NotFound,
        408 => ErrorKind::Timeout(TimeoutPhase::FirstToken),
        429 => ErrorKind::RateLimited,
        500..=599 => ErrorKind::ServerError,
        _ => ErrorKind::Internal,
    };
    let message = match kind {
        // The client's own mistake: pass the gateway's words through unchanged.
        ErrorKind::BadRequest => upstream_message,
        _ => format!("upstream answered {status}: {upstream_message}"),
    };
    let mut err = BackendError::new(kind, message);
    err.status = Some(status.as_u16());
    err.retry_after = retry_after(headers);
    if let Some(parsed) = parsed {
        err.param = value_to_string(parsed.param);
        err.code = value_to_string(parsed.code);
    }
    err
}

/// Longest `Retry-After` taken from a gateway. Anything beyond the router's cap fails
/// over at once anyway; the clamp only keeps absurd values (`1e30`, the year 9999) from
/// overflowing a `Duration` or an `Instant` downstream.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// `retry-after-ms` (OpenAI), else `Retry-After` in seconds or as an HTTP date; clamped
/// to [`MAX_RETRY_AFTER`]. Negative, NaN or unparsable values are ignored.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let value = headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok()?;
        (value >= 0.0).then_some(value)
    };
    let clamp =
        |secs: f64| Duration::try_from_secs_f64(secs).map_or(MAX_RETRY_AFTER, |d| d.min(MAX_RETRY_AFTER));
    if let Some(ms) = number("retry-after-ms") {
        return Some(clamp(ms / 1000.0));
    }
    if let Some(secs) = number(reqwest::header::RETRY_AFTER.as_str()) {
        return Some(clamp(secs));
    }
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// Classify a transport failure of sending the request (before any status).
pub fn classify_send_error(err: &reqwest::Error) -> BackendError {
    let kind = if err.is_timeout() {
        ErrorKind::Timeout(TimeoutPhase::Connect)
    } else {
        // Refused, reset, DNS failure, TLS failure, or closed before a response: the
        // gateway could not be reached, which is what `Connect` means to the router.
        ErrorKind::Connect
    };
    BackendError::new(kind, format!("cannot reach upstream: {}", error_chain(err)))
}

/// An error with its sources, since reqwest's top-level text hides the cause; URL
/// credentials and key-like words are redacted (the text goes to logs).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    redact_text(&text)
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn status_table() {
        let headers = HeaderMap::new();
        let cases = [
            (400, ErrorKind::BadRequest),
            (401, ErrorKind::Unauthorized),
            (402, ErrorKind::PaymentRequired),
            (403, ErrorKind::Unauthorized),
            (404, ErrorKind::NotFound),
            (429, ErrorKind::RateLimited),
            (500, ErrorKind::ServerError),
            (503, ErrorKind::ServerError),
            (418, ErrorKind::Internal),
        ];
        for (status, kind) in cases {
            let status = StatusCode::from_u16(status).expect("status");
            assert_eq!(
                classify_status(status, &headers, b"{}", None).kind,
                kind,
                "{status}"
            );
        }
    }

    #[test]
    fn bad_request_keeps_upstream_words_and_param() {
        let body = br#"{"error":{"message":"bad temperature","type":"invalid_request_error","param":"temperature","code":null}}"#;
        let err = classify_status(StatusCode::BAD_REQUEST, &HeaderMap::new(), body, None);
        assert_eq!(err.message, "bad temperature");
        assert_eq!(err.param.as_deref(), Some("temperature"));
        assert_eq!(err.code, None);
    }

    #[test]
    fn echoed_key_is_scrubbed() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-live-123"}}"#;
        let err = classify_status(
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            body,
            Some("sk-live-123"),
        );
        assert!(!err.message.contains("sk-live-123"), "{}", err.message);
    }

    #[test]
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(250)));
        let mut headers = HeaderMap::new();
        headers.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn absurd_retry_after_values_are_clamped_or_ignored_never_a_panic() {
        let cases: &[(&str, &str, Option<Duration>)] = &[
            ("retry-after", "1e30", Some(MAX_RETRY_AFTER)),
            ("retry-after", "1e20", Some(MAX_RETRY_AFTER)),
            ("retry-after", "inf", Some(MAX_RETRY_AFTER)),
            ("retry-after", "-5", None),
            ("retry-after", "NaN", None),
            ("retry-after", "-0", Some(Duration::ZERO)),
            (
                "retry-after",
                "Fri, 31 Dec 9999 23:59:59 GMT",
                Some(MAX_RETRY_AFTER),
            ),
            ("retry-after-ms", "1e30", Some(MAX_RETRY_AFTER)),
            ("retry-after-ms", "-1", None),
            ("retry-after-ms", "nan", None),
            ("retry-after-ms", "1.5", Some(Duration::from_micros(1500))),
        ];
        for &(name, value, expected) in cases {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            assert_eq!(retry_after(&headers), expected, "{name}: {value}");
        }
    }
}
