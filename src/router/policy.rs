//! Which failures fail over to the next target, and which count against a remote's
//! breaker. One commented case per error kind.

use crate::backend::{BackendError, ErrorKind};

/// Whether another backend should get the request after `error`.
pub fn fails_over(error: &BackendError) -> bool {
    match error.kind {
        // Unreachable, refused, reset: the gateway is down for us.
        ErrorKind::Connect => true,
        // A deadline passed (hang, keep-alive-only, slow first token): waiting longer
        // is exactly what the client must not see.
        ErrorKind::Timeout(_) => true,
        // The gateway's own failure.
        ErrorKind::ServerError => true,
        // Rate-limited: another backend may have capacity now.
        ErrorKind::RateLimited => true,
        // Out of credit: nothing the client can fix.
        ErrorKind::PaymentRequired => true,
        // The gateway rejected lifeboat's key: fail over (and alert), never blame the client.
        ErrorKind::Unauthorized => true,
        // The gateway does not know the routed model: a configuration problem.
        ErrorKind::NotFound => true,
        // Broken or cut before the commit point: nothing was sent yet.
        ErrorKind::MalformedFrame | ErrorKind::StreamCut => true,
        // Loading or failed local model: try whatever is next.
        ErrorKind::Unavailable => true,
        // Unexpected status or bug: another backend may still answer.
        ErrorKind::Internal => true,
        // The client's own mistake: every backend would refuse it the same way.
        ErrorKind::BadRequest => false,
    }
}

/// Whether `error` says the backend is unhealthy (counts toward opening its breaker).
pub fn counts_against_health(error: &BackendError) -> bool {
    !matches!(error.kind, ErrorKind::BadRequest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Origin, TimeoutPhase};

    #[test]
    fn only_client_mistakes_stay() {
        let kinds = [
            ErrorKind::Connect,
            ErrorKind::Timeout(TimeoutPhase::FirstToken),
            ErrorKind::ServerError,
            ErrorKind::RateLimited,
            ErrorKind::PaymentRequired,
            ErrorKind::Unauthorized,
            ErrorKind::NotFound,
            ErrorKind::MalformedFrame,
            ErrorKind::StreamCut,
            ErrorKind::Unavailable,
            ErrorKind::Internal,
        ];
        for kind in kinds {
            assert!(
                fails_over(&BackendError::new(kind, Origin::Upstream, "x")),
                "{kind:?}"
            );
        }
        let bad = BackendError::new(ErrorKind::BadRequest, Origin::Upstream, "x");
        assert!(!fails_over(&bad) && !counts_against_health(&bad));
    }
}
