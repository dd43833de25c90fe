//! Which failures fail over to the next target, and which count against a remote's
//! breaker. One commented case per error kind.

use std::time::Duration;

use super::retry::{Backoff, RetryBudget};
use crate::backend::{BackendError, BackendKind, ErrorKind};

/// What the router does after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try the same backend again after this wait.
    Retry(Duration),
    /// Move on to the next target.
    FailOver,
    /// Give this error to the client: no other backend would do better.
    Answer,
}

/// The retry rules of one router.
#[derive(Debug, Clone)]
pub struct RetryRules {
    /// Extra attempts on the same remote before failing over.
    pub max_retries: u32,
    /// Longest `Retry-After` waited for; longer fails over at once.
    pub retry_after_cap: Duration,
    /// Delay between retries of one target.
    pub backoff: Backoff,
    /// Retries allowed in proportion to requests, so retries cannot multiply an outage.
    pub budget: RetryBudget,
}

/// After `error` on a backend of `kind` that was already retried `retries` times: retry
/// it (within the budget), fail over, or answer. The local model is never retried: it is
/// the last resort, and its own refusals (queue full, too long) do not pass in a second.
pub fn after_failure(error: &BackendError, kind: BackendKind, retries: u32, rules: &RetryRules) -> Decision {
    if !fails_over(error) {
        return Decision::Answer;
    }
    let retry = kind == BackendKind::Remote
        && retries < rules.max_retries
        && retries_same_backend(error, rules.retry_after_cap)
        && rules.budget.try_withdraw();
    if !retry {
        return Decision::FailOver;
    }
    let wait = rules
        .backoff
        .delay(retries)
        .max(error.retry_after.unwrap_or_default());
    Decision::Retry(wait)
}

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
    use crate::backend::TimeoutPhase;

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
            assert!(fails_over(&BackendError::new(kind, "x")), "{kind:?}");
        }
        let bad = BackendError::new(ErrorKind::BadRequest, "x");
        assert!(!fails_over(&bad) && !counts_against_health(&bad));
    }

    fn rules(max_retries: u32, budget_floor: u32) -> RetryRules {
        RetryRules {
            max_retries,
            retry_after_cap: Duration::from_secs(2),
            backoff: Backoff::try_new(Duration::from_millis(100), Duration::from_secs(1), false)
                .expect("valid"),
            budget: RetryBudget::new(0.0, budget_floor, Duration::from_secs(10)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_failure_retries_within_limits_then_fails_over() {
        let rules = rules(1, 10);
        let server = BackendError::new(ErrorKind::ServerError, "x");
        assert_eq!(
            after_failure(&server, BackendKind::Remote, 0, &rules),
            Decision::Retry(Duration::from_millis(100))
        );
        assert_eq!(
            after_failure(&server, BackendKind::Remote, 1, &rules),
            Decision::FailOver,
            "max_retries spent"
        );
        assert_eq!(
            after_failure(&server, BackendKind::Local, 0, &rules),
            Decision::FailOver,
            "the local model is never retried"
        );
        let mut limited = BackendError::new(ErrorKind::RateLimited, "x");
        limited.retry_after = Some(Duration::from_millis(1500));
        assert_eq!(
            after_failure(&limited, BackendKind::Remote, 0, &rules),
            Decision::Retry(Duration::from_millis(1500)),
            "Retry-After within the cap is honoured"
        );
        let bad = BackendError::new(ErrorKind::BadRequest, "x");
        assert_eq!(
            after_failure(&bad, BackendKind::Remote, 0, &rules),
            Decision::Answer
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_budget_fails_over_instead_of_retrying() {
        let rules = rules(3, 1);
        let server = BackendError::new(ErrorKind::ServerError, "x");
        assert!(matches!(
            after_failure(&server, BackendKind::Remote, 0, &rules),
            Decision::Retry(_)
        ));
        assert_eq!(
            after_failure(&server, BackendKind::Remote, 1, &rules),
            Decision::FailOver,
            "the budget's one retry is spent"
        );
    }

    #[test]
    fn retry_after_beyond_the_cap_fails_over_at_once() {
        let cap = Duration::from_secs(2);
        let mut limited = BackendError::new(ErrorKind::RateLimited, "x");
        limited.retry_after = Some(Duration::from_secs(1));
        assert!(retries_same_backend(&limited, cap));
        limited.retry_after = Some(Duration::from_secs(3));
        assert!(!retries_same_backend(&limited, cap));
        let timeout = BackendError::new(ErrorKind::Timeout(TimeoutPhase::FirstToken), "x");
        assert!(!retries_same_backend(&timeout, cap));
        assert!(retries_same_backend(
            &BackendError::new(ErrorKind::ServerError, "x"),
            cap
        ));
    }
}
