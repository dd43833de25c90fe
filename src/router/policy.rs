//! Which failures fail over to the next target, and which count against a remote's
//! breaker. One commented case per error kind.

use std::time::Duration;

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
        // A 200 that carried no answer at all is as useless to the client as a 5xx.
        ErrorKind::Empty => true,
        // Loading or failed local model: try whatever is next.
        ErrorKind::Unavailable => true,
        // Unexpected status or bug: another backend may still answer.
        ErrorKind::Internal => true,
        // The client's own mistake: every backend would refuse it the same way.
        ErrorKind::BadRequest => false,
    }
}

/// Whether the same backend deserves another try after `error` (within the retry
/// budget). Only fast, transient failures: a timeout already cost its whole deadline, and
/// auth, credit and model errors do not fix themselves in a second.
pub fn retries_same_backend(error: &BackendError, retry_after_cap: Duration) -> bool {
    match error.kind {
        // A refused or reset connection is often one bad pooled connection.
        ErrorKind::Connect => true,
        // 5xx and broken frames are typically one overloaded replica.
        ErrorKind::ServerError | ErrorKind::MalformedFrame | ErrorKind::StreamCut | ErrorKind::Empty => true,
        // Honour `Retry-After` up to the cap; beyond it, fail over at once.
        ErrorKind::RateLimited => error.retry_after.is_none_or(|after| after <= retry_after_cap),
        _ => false,
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
            ErrorKind::Empty,
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

    #[test]
    fn retry_after_beyond_the_cap_fails_over_at_once() {
        let cap = Duration::from_secs(2);
        let mut limited = BackendError::new(ErrorKind::RateLimited, Origin::Upstream, "x");
        limited.retry_after = Some(Duration::from_secs(1));
        assert!(retries_same_backend(&limited, cap));
        limited.retry_after = Some(Duration::from_secs(3));
        assert!(!retries_same_backend(&limited, cap));
        let timeout = BackendError::new(
            ErrorKind::Timeout(TimeoutPhase::FirstToken),
            Origin::Upstream,
            "x",
        );
        assert!(!retries_same_backend(&timeout, cap));
        assert!(retries_same_backend(
            &BackendError::new(ErrorKind::ServerError, Origin::Upstream, "x"),
            cap
        ));
    }
}
