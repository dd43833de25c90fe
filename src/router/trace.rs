//! The router's part of a request's trace: a `request` span around its whole way through
//! the targets (and around its answer's stream), an `attempt` span per call to a backend
//! that ends with the attempt's outcome, and the lines that explain each decision.
//!
//! Whatever a backend logs while it works for an attempt (the remote client, the local
//! engine's admission) is inside both spans, so one request id ties a failover together.
//! Everything here is per request or per attempt, never per token.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::Stream;
use tokio::time::Instant;
use tracing::{Span, field::Empty};

use super::policy::Decision;
use crate::backend::{BackendError, BackendKind, ErrorKind, EventStream, GenerationEvent, GenerationRequest};

/// The span of one client request; `route` is filled in once the model is resolved.
pub(super) fn request_span(request: &GenerationRequest) -> Span {
    tracing::info_span!(
        "request",
        request_id = %request.id,
        client_request_id = request.id.client(),
        model = %request.model,
        route = Empty,
        endpoint = request.endpoint.as_str(),
        stream = request.stream,
        client = %request.client,
    )
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AttemptEnd {
    /// Its answer reached its end.
    Ok,
    /// It failed, before or after its first output.
    Failed(ErrorKind),
    /// Nobody waits for it any more (the client left, or a hedge or rescue dropped it).
    Cancelled,
}

impl AttemptEnd {
    fn as_str(self) -> &'static str {
        match self {
            AttemptEnd::Ok => "ok",
            AttemptEnd::Failed(_) => "failed",
            AttemptEnd::Cancelled => "cancelled",
        }
    }
}

/// One attempt's span and clock. It ends exactly once: by [`AttemptTrace::end`], or as
/// cancelled when dropped without it.
#[derive(Debug)]
pub(super) struct AttemptTrace {
    span: Span,
    started: Instant,
    ended: bool,
}

impl AttemptTrace {
    /// The `number`th attempt of the request (retries count), on `backend`.
    pub(super) fn start(backend: &str, kind: BackendKind, number: u32) -> AttemptTrace {
        let span = tracing::info_span!(
            "attempt",
            backend,
            backend_kind = kind.as_str(),
            attempt = number,
            outcome = Empty,
            error = Empty,
            ttft_ms = Empty,
            duration_ms = Empty,
        );
        AttemptTrace {
            span,
            started: Instant::now(),
            ended: false,
        }
    }

    pub(super) fn span(&self) -> &Span {
        &self.span
    }

    /// The attempt's first output arrived.
    pub(super) fn first_output(&self) {
        self.span.record("ttft_ms", millis(self.started.elapsed()));
    }

    /// A streaming client's commit point: its first output goes out from this attempt.
    /// (A JSON client's comes when its whole answer is in.)
    pub(super) fn committed(&self) {
        self.span
            .in_scope(|| tracing::info!(commit_point = "first_output", "committed"));
    }

    pub(super) fn end(mut self, end: AttemptEnd) {
        self.finish(end);
    }

    fn finish(&mut self, end: AttemptEnd) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let duration = self.started.elapsed();
        self.span.record("outcome", end.as_str());
        if let AttemptEnd::Failed(kind) = end {
            self.span.record("error", kind.as_str());
        }
        self.span.record("duration_ms", millis(duration));
        self.span.in_scope(|| tracing::info!("attempt finished"));
    }
}

impl Drop for AttemptTrace {
    fn drop(&mut self) {
        self.finish(AttemptEnd::Cancelled);
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Log what the router does after `error` on `backend`, and why.
pub(super) fn decided(backend: &str, error: &BackendError, retries: u32, decision: Decision) {
    let kind = error.kind.as_str();
    match decision {
        Decision::Retry(wait) => tracing::info!(
            backend,
            error = kind,
            detail = %error,
            retries,
            wait_ms = millis(wait),
            decision = "retry",
            "retrying the same backend"
        ),
        Decision::FailOver => tracing::info!(
            backend,
            error = kind,
            detail = %error,
            retries,
            decision = "fail_over",
            "failing over to the next target"
        ),
        Decision::Answer => tracing::info!(
            backend,
            error = kind,
            detail = %error,
            decision = "answer",
            "answering with this error: no other target would do better"
        ),
    }
}

/// `events` produced inside `span`: what the backend logs while the client reads its
/// answer (a deadline, a cut stream, a local continuation) stays in the request's trace.
pub(super) fn in_span(events: EventStream, span: Span) -> EventStream {
    Box::pin(InSpan {
        events,
        span,
        trace: None,
    })
}

/// A committed attempt's `events`, inside its span; the attempt ends with the stream: at
/// its end (ok), at its first error (failed) or when it is dropped unfinished (cancelled).
pub(super) fn traced(events: EventStream, trace: AttemptTrace) -> EventStream {
    Box::pin(InSpan {
        events,
        span: trace.span.clone(),
        trace: Some(trace),
    })
}

struct InSpan {
    events: EventStream,
    span: Span,
    trace: Option<AttemptTrace>,
}

impl Stream for InSpan {
    type Item = Result<GenerationEvent, BackendError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let polled = {
            let _entered = this.span.enter();
            this.events.as_mut().poll_next(cx)
        };
        let end = match &polled {
            Poll::Ready(None) => Some(AttemptEnd::Ok),
            Poll::Ready(Some(Err(error))) => Some(AttemptEnd::Failed(error.kind)),
            Poll::Ready(Some(Ok(_))) | Poll::Pending => None,
        };
        if let Some(end) = end
            && let Some(trace) = this.trace.take()
        {
            trace.end(end);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use futures_util::StreamExt;
    use serde_json::Value;

    use super::*;
    use crate::backend::ChoiceDelta;

    /// What a JSON subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Run `work` under a JSON subscriber; the attempt spans of its "attempt finished" lines.
    fn attempt_ends(work: impl std::future::Future<Output = ()>) -> Vec<Value> {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime");
            runtime.block_on(work);
        });
        let bytes = captured.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["fields"]["message"] == "attempt finished")
            .map(|line| line["span"].clone())
            .collect()
    }

    fn delta() -> Result<GenerationEvent, BackendError> {
        Ok(GenerationEvent::Delta(ChoiceDelta {
            content: Some("a".into()),
            ..ChoiceDelta::default()
        }))
    }

    fn stream(items: Vec<Result<GenerationEvent, BackendError>>) -> EventStream {
        Box::pin(futures_util::stream::iter(items))
    }

    fn started() -> AttemptTrace {
        let trace = AttemptTrace::start("gateway", BackendKind::Remote, 2);
        trace.first_output();
        trace
    }

    #[test]
    fn an_attempt_ends_once_with_its_streams_end() {
        let ends = attempt_ends(async {
            let items: Vec<_> = traced(stream(vec![delta(), delta()]), started()).collect().await;
            assert_eq!(items.len(), 2);
        });
        assert_eq!(ends.len(), 1, "{ends:?}");
        assert_eq!(ends[0]["outcome"], "ok");
        assert_eq!(ends[0]["backend"], "gateway");
        assert_eq!(ends[0]["attempt"], 2);
        assert!(
            ends[0]["ttft_ms"].is_u64() && ends[0]["duration_ms"].is_u64(),
            "{}",
            ends[0]
        );
    }

    #[test]
    fn an_attempt_ends_at_its_first_error_and_the_stream_goes_on_unchanged() {
        let ends = attempt_ends(async {
            let cut = BackendError::new(ErrorKind::StreamCut, "cut");
            let items: Vec<_> = traced(stream(vec![delta(), Err(cut), delta()]), started())
                .collect()
                .await;
            assert_eq!(items.len(), 3);
            assert!(matches!(&items[1], Err(e) if e.kind == ErrorKind::StreamCut));
        });
        assert_eq!(ends.len(), 1, "{ends:?}");
        assert_eq!(ends[0]["outcome"], "failed");
        assert_eq!(ends[0]["error"], "stream_cut");
    }

    #[test]
    fn an_attempt_dropped_unfinished_is_cancelled() {
        let ends = attempt_ends(async {
            let mut events = traced(stream(vec![delta(), delta()]), started());
            assert!(events.next().await.is_some());
        });
        assert_eq!(ends.len(), 1, "{ends:?}");
        assert_eq!(ends[0]["outcome"], "cancelled");
        let ends = attempt_ends(async {
            started().end(AttemptEnd::Failed(ErrorKind::RateLimited));
        });
        assert_eq!(ends.len(), 1, "ended explicitly, then dropped: {ends:?}");
        assert_eq!(ends[0]["error"], "rate_limited");
    }
}
