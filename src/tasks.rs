//! Background tasks that outlive a panic in one of their iterations.
//!
//! A probe, the alert sender and the reload watcher each run a loop for the life of the
//! process. A bug hit by one hostile input (a gateway's header, a webhook's answer) must
//! not end that loop for good: each iteration runs under [`survive`], which logs the
//! panic, counts it in `lifeboat_background_task_panics_total` and lets the loop go on.

use std::{future::Future, panic::AssertUnwindSafe};

use futures_util::FutureExt;

use crate::metrics;

/// Run one iteration of background task `task`; `None` if it panicked (logged and
/// counted), so the caller's loop carries on with its next iteration.
pub async fn survive<F: Future>(task: &'static str, step: F) -> Option<F::Output> {
    // Unwind safety: an iteration shares only atomics and locks that recover from
    // poisoning (breakers, health records, channels) with the rest of the process.
    match AssertUnwindSafe(step).catch_unwind().await {
        Ok(output) => Some(output),
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            tracing::error!(task, panic = detail, "background task panicked; it carries on");
            metrics::background_panic(task);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_iteration_is_caught_and_the_next_one_runs() {
        let mut ran = Vec::new();
        for i in 0..3 {
            let step = async move {
                assert!(i != 1, "iteration {i} fails");
                i
            };
            ran.push(survive("test", step).await);
        }
        assert_eq!(ran, vec![Some(0), None, Some(2)]);
    }
}
