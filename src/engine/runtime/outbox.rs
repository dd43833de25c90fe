//! A request's events on their way to its client, and how long the client has gone
//! without taking any: the engine thread never blocks on a slow reader, and one that stops
//! reading altogether is found (see `local.stalled_client_timeout`).

use std::{collections::VecDeque, time::Duration};

use tokio::{sync::mpsc, time::Instant};

use super::worker::EventSender;
use crate::backend::{BackendError, GenerationEvent};

pub(super) type Event = Result<GenerationEvent, BackendError>;

/// A request's events on their way to its client: what the channel cannot take yet waits
/// here, in order.
#[derive(Debug)]
pub(super) struct Outbox {
    events: EventSender,
    held: VecDeque<Event>,
    /// Since when events have waited with none taken by the client. Tokio's clock (the
    /// std clock off a runtime, as on the engine thread) so that tests can pause it.
    stalled_since: Option<Instant>,
}

impl Outbox {
    pub(super) fn new(events: EventSender) -> Outbox {
        Outbox {
            events,
            held: VecDeque::new(),
            stalled_since: None,
        }
    }

    /// Queue an event; `false` when the client is gone.
    pub(super) fn send(&mut self, event: Event) -> bool {
        self.held.push_back(event);
        self.flush()
    }

    /// Pass on what the channel takes; `false` when the client is gone.
    pub(super) fn flush(&mut self) -> bool {
        let mut moved = false;
        while let Some(event) = self.held.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => moved = true,
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.held.push_front(event);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.held.clear();
                    self.stalled_since = None;
                    return false;
                }
            }
        }
        // Room in the channel means the client read since the last flush: its clock
        // starts again from now if events still wait.
        if moved || self.held.is_empty() {
            self.stalled_since = None;
        }
        if !self.held.is_empty() && self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
        }
        true
    }

    /// Events wait for the client to read.
    pub(super) fn is_backed_up(&self) -> bool {
        !self.held.is_empty()
    }

    pub(super) fn is_closed(&self) -> bool {
        self.events.is_closed()
    }

    /// The client has taken no event for `timeout` while events waited for it.
    pub(super) fn is_stalled(&self, timeout: Duration) -> bool {
        self.stalled_since.is_some_and(|since| since.elapsed() >= timeout)
    }

    /// Drop what waits and leave only `event` for the client, should it ever read again
    /// (the channel still holds what it took before).
    /// Its stall clock starts again, so the event waits one more timeout before the
    /// outbox is given up.
    pub(super) fn replace_held(&mut self, event: Event) {
        self.held.clear();
        self.held.push_back(event);
        self.stalled_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ChoiceDelta, Usage};

    fn delta() -> Event {
        Ok(GenerationEvent::Delta(ChoiceDelta::default()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_stalled_after_the_timeout() {
        let timeout = Duration::from_secs(30);
        let (tx, mut rx) = mpsc::channel(2);
        let mut out = Outbox::new(tx);
        assert!(out.send(delta()) && out.send(delta()));
        assert!(
            !out.is_backed_up() && !out.is_stalled(timeout),
            "the channel took both"
        );
        assert!(out.send(delta()));
        assert!(out.is_backed_up());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(out.flush() && !out.is_stalled(timeout));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(out.flush() && out.is_stalled(timeout), "30 s without a read");
        // One read restarts the clock.
        assert!(rx.recv().await.is_some());
        assert!(out.send(delta()) && out.is_backed_up());
        assert!(!out.is_stalled(timeout));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(out.flush() && !out.is_stalled(timeout));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_steady_reader_is_never_stalled() {
        let timeout = Duration::from_secs(2);
        let (tx, mut rx) = mpsc::channel(1);
        let mut out = Outbox::new(tx);
        for _ in 0..20 {
            out.send(delta());
            out.send(delta());
            tokio::time::advance(Duration::from_secs(1)).await;
            assert!(!out.is_stalled(timeout));
            assert!(rx.recv().await.is_some());
            out.flush();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_gone_client_closes_and_replaced_events_wait_alone() {
        let (tx, rx) = mpsc::channel(1);
        let mut out = Outbox::new(tx);
        out.send(delta());
        out.send(delta());
        out.replace_held(Ok(GenerationEvent::Usage(Usage::default())));
        assert_eq!(out.held.len(), 1);
        drop(rx);
        assert!(out.is_closed() && !out.flush());
        assert!(!out.is_backed_up() && !out.is_stalled(Duration::ZERO));
    }
}
