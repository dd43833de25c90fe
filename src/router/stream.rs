//! Stream plumbing of the router: the commit point (hold everything back until the first
//! real output), the whole answer a JSON client waits for, and the local continuation of a
//! stream that broke after its commit point.

use std::sync::Arc;

use futures_util::StreamExt;

use crate::{
    backend::{
        Backend, BackendError, BackendRequest, ChoiceDelta, Continuation, ErrorKind, EventStream,
        GenerationEvent, GenerationRequest,
    },
    metrics,
};

/// A committed stream that the local model continues if it breaks.
struct Continuable {
    events: EventStream,
    request: Arc<GenerationRequest>,
    from: String,
    /// Taken at the first break: a stream is continued once.
    local: Option<Arc<dyn Backend>>,
    local_model: String,
    sent: Continuation,
    /// The continuation's first delta repeats the role; drop it.
    strip_role: bool,
}

impl Continuable {
    /// Remember what `delta` shows the client.
    fn pass(&mut self, mut delta: ChoiceDelta) -> GenerationEvent {
        if self.strip_role {
            delta.role = None;
            self.strip_role = false;
        }
        if let Some(text) = &delta.content {
            self.sent.content.push_str(text);
        }
        if let Some(text) = &delta.reasoning_content {
            self.sent.reasoning.push_str(text);
        }
        GenerationEvent::Delta(delta)
    }

    /// Ask the local model to continue after `error`; the error back when it cannot.
    async fn continue_locally(&mut self, error: BackendError) -> Result<(), BackendError> {
        let Some(local) = self.local.take() else {
            return Err(error);
        };
        let mut attempt = BackendRequest::new(self.local_model.clone(), self.request.clone());
        attempt.continuation = Some(self.sent.clone());
        match local.generate(attempt).await {
            Ok(rest) => {
                metrics::continued(&self.from, local.id(), error.kind);
                tracing::info!(from = %self.from, to = %local.id(), reason = error.kind.as_str(), "continuing a broken stream locally");
                self.events = rest;
                self.strip_role = true;
                Ok(())
            }
            Err(local_error) => {
                tracing::warn!(%local_error, "the local model could not continue the stream");
                Err(error)
            }
        }
    }
}

/// Pass `events` through, remembering the text sent; if the stream fails, ask `local` to
/// continue from that text (prefilled as the assistant's partial reply) and splice its
/// events in, so the client gets one coherent answer. Falls back to the original error.
pub(super) fn continuing(
    events: EventStream,
    request: Arc<GenerationRequest>,
    from: String,
    local: Arc<dyn Backend>,
    local_model: String,
) -> EventStream {
    let state = Continuable {
        events,
        request,
        from,
        local: Some(local),
        local_model,
        sent: Continuation::default(),
        strip_role: false,
    };
    Box::pin(futures_util::stream::unfold(state, |mut state| async move {
        loop {
            match state.events.next().await? {
                Ok(GenerationEvent::Delta(delta)) => {
                    let event = state.pass(delta);
                    return Some((Ok(event), state));
                }
                Ok(event) => return Some((Ok(event), state)),
                Err(error) => {
                    if let Err(error) = state.continue_locally(error).await {
                        return Some((Err(error), state));
                    }
                }
            }
        }
    }))
}

/// Wait for the first output event. Everything before it is buffered and replayed, so the
/// caller sees the whole stream; an error before it is returned instead of the stream, and
/// so is a stream that ends without any output (`[DONE]` first, no choices): an answer
/// with nothing in it is a failed attempt ([`ErrorKind::Empty`]), never a success.
pub(super) async fn commit(mut events: EventStream) -> Result<EventStream, BackendError> {
    let mut held: Vec<GenerationEvent> = Vec::new();
    loop {
        match events.next().await {
            Some(Ok(event)) => {
                let output = event.is_output();
                held.push(event);
                if output {
                    break;
                }
            }
            Some(Err(error)) => return Err(error),
            None => {
                return Err(BackendError::new(
                    ErrorKind::Empty,
                    "the answer ended before any output (no content, no finish reason)",
                ));
            }
        }
    }
    let replay = futures_util::stream::iter(held.into_iter().map(Ok));
    Ok(Box::pin(replay.chain(events)))
}

/// Drain a committed stream to its end. A JSON client sees nothing until its answer is
/// whole, so its commit point is the end: a cut, stall or bad frame on the way is a
/// failed attempt the router can still retry or fail over, never a 502. (The memory is
/// bounded by the remote's answer caps and the local model's `max_tokens`.)
pub(super) async fn complete(mut events: EventStream) -> Result<EventStream, BackendError> {
    let mut all: Vec<GenerationEvent> = Vec::new();
    while let Some(item) = events.next().await {
        let event = item?;
        if let (Some(GenerationEvent::Delta(last)), GenerationEvent::Delta(next)) = (all.last_mut(), &event)
            && appends_text(last, next)
        {
            push_text(&mut last.content, &next.content);
            push_text(&mut last.reasoning_content, &next.reasoning_content);
            continue;
        }
        all.push(event);
    }
    Ok(Box::pin(futures_util::stream::iter(all.into_iter().map(Ok))))
}

/// Whether `next` only adds text to the same choice as `last`, so the two can be held as
/// one delta (an answer of many thousand chunks is then held at the size of its text).
fn appends_text(last: &ChoiceDelta, next: &ChoiceDelta) -> bool {
    last.index == next.index
        && last.finish_reason.is_none()
        && last.tool_calls.is_none()
        && last.logprobs.is_none()
        && next.role.is_none()
        && next.tool_calls.is_none()
        && next.logprobs.is_none()
        && next.finish_reason.is_none()
}

fn push_text(into: &mut Option<String>, text: &Option<String>) {
    if let Some(text) = text {
        into.get_or_insert_with(String::new).push_str(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{FinishReason, Usage};

    fn delta(content: &str) -> GenerationEvent {
        GenerationEvent::Delta(ChoiceDelta {
            content: Some(content.into()),
            ..ChoiceDelta::default()
        })
    }

    #[tokio::test]
    async fn errors_before_the_first_output_are_returned_not_streamed() {
        let events: EventStream = Box::pin(futures_util::stream::iter(vec![
            Ok(delta("")),
            Err(BackendError::new(ErrorKind::StreamCut, "cut")),
        ]));
        let err = commit(events).await.err().expect("error before commit");
        assert_eq!(err.kind, ErrorKind::StreamCut);
    }

    #[tokio::test]
    async fn a_stream_that_ends_without_output_is_an_empty_answer() {
        let cases: Vec<Vec<Result<GenerationEvent, BackendError>>> = vec![
            vec![],
            vec![Ok(delta(""))],
            vec![Ok(GenerationEvent::Usage(Usage::default()))],
        ];
        for events in cases {
            let events: EventStream = Box::pin(futures_util::stream::iter(events));
            let err = commit(events).await.err().expect("no output is a failure");
            assert_eq!(err.kind, ErrorKind::Empty);
        }
    }

    #[tokio::test]
    async fn a_completed_answer_is_held_as_few_deltas_with_the_same_text() {
        let mut events: Vec<Result<GenerationEvent, BackendError>> =
            vec![Ok(GenerationEvent::Delta(ChoiceDelta {
                role: Some("assistant".into()),
                ..ChoiceDelta::default()
            }))];
        events.extend((0..1000).map(|i| Ok(delta(&i.to_string()))));
        events.push(Ok(GenerationEvent::Delta(ChoiceDelta {
            finish_reason: Some(FinishReason::Stop),
            ..ChoiceDelta::default()
        })));
        let held: Vec<_> = complete(Box::pin(futures_util::stream::iter(events)))
            .await
            .expect("complete")
            .collect()
            .await;
        assert_eq!(held.len(), 2, "role delta with all the text, then the finish");
        let Some(Ok(GenerationEvent::Delta(first))) = held.first() else {
            panic!("delta")
        };
        let text: String = (0..1000).map(|i: i32| i.to_string()).collect();
        assert_eq!(first.content.as_deref(), Some(text.as_str()));
        let cut: EventStream = Box::pin(futures_util::stream::iter(vec![
            Ok(delta("a")),
            Err(BackendError::new(ErrorKind::StreamCut, "cut")),
        ]));
        assert!(complete(cut).await.is_err(), "a cut answer is a failed attempt");
    }

    #[tokio::test]
    async fn held_events_are_replayed_in_order() {
        let events: EventStream = Box::pin(futures_util::stream::iter(vec![
            Ok(delta("")),
            Ok(delta("a")),
            Err(BackendError::new(ErrorKind::StreamCut, "cut")),
        ]));
        let stream = commit(events).await.expect("committed");
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), 3);
        assert!(matches!(&items[1], Ok(e) if *e == delta("a")));
        assert!(items[2].is_err());
    }
}
