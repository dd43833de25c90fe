//! The local engine's waiting room: one FIFO queue per client, admitted in turn, so a
//! client with fifty queued requests cannot starve another's single one.
//!
//! The next request comes from the client with the fewest requests running, then the one
//! admitted least recently (a client new to the queue counts as never admitted), then the
//! one whose oldest request arrived first. With every client backlogged and one slot that
//! is plain round-robin; with one client holding every slot, any other client's request is
//! the next to start when a slot frees.

use std::collections::{HashMap, VecDeque};

use crate::backend::ClientId;

/// One client's place in the queue.
#[derive(Debug)]
struct ClientQueue<T> {
    /// Waiting items with their arrival stamps, oldest first.
    waiting: VecDeque<(u64, T)>,
    /// Items taken off the queue and not yet [`FairQueue::finished`].
    active: usize,
    /// When it was last admitted (0: not since it joined).
    last_turn: u64,
}

/// Per-client FIFO queues with fair admission (see the module doc). A client is forgotten
/// once it has nothing waiting and nothing running, so memory follows the live clients.
#[derive(Debug)]
pub(super) struct FairQueue<T> {
    clients: HashMap<ClientId, ClientQueue<T>>,
    next_stamp: u64,
    next_turn: u64,
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue {
            clients: HashMap::new(),
            next_stamp: 0,
            next_turn: 0,
            len: 0,
        }
    }
}

impl<T> FairQueue<T> {
    /// Items waiting, over all clients.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queue `item` behind `client`'s earlier ones.
    pub(super) fn push(&mut self, client: ClientId, item: T) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.clients
            .entry(client)
            .or_insert_with(|| ClientQueue {
                waiting: VecDeque::new(),
                active: 0,
                last_turn: 0,
            })
            .waiting
            .push_back((stamp, item));
        self.len += 1;
    }

    /// The client whose turn it is, if anything waits.
    fn next_client(&self) -> Option<&ClientId> {
        self.clients
            .iter()
            .filter_map(|(client, queue)| {
                let (stamp, _) = queue.waiting.front()?;
                Some(((queue.active, queue.last_turn, *stamp), client))
            })
            .min_by_key(|(key, _)| *key)
            .map(|(_, client)| client)
    }

    /// The item [`pop`](Self::pop) would return.
    pub(super) fn peek(&self) -> Option<&T> {
        let client = self.next_client()?;
        self.clients.get(client)?.waiting.front().map(|(_, item)| item)
    }

    /// Take the next item; its client counts it as running until [`finished`](Self::finished).
    pub(super) fn pop(&mut self) -> Option<(ClientId, T)> {
        let client = self.next_client()?.clone();
        let queue = self.clients.get_mut(&client)?;
        let (_, item) = queue.waiting.pop_front()?;
        self.next_turn += 1;
        queue.active += 1;
        queue.last_turn = self.next_turn;
        self.len -= 1;
        Some((client, item))
    }

    /// An item [`pop`](Self::pop)ped for `client` is done running.
    pub(super) fn finished(&mut self, client: &ClientId) {
        if let Some(queue) = self.clients.get_mut(client) {
            queue.active = queue.active.saturating_sub(1);
            if queue.active == 0 && queue.waiting.is_empty() {
                self.clients.remove(client);
            }
        }
    }

    /// Keep only the waiting items for which `keep` is true (the rest are dropped).
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let mut len = 0;
        self.clients.retain(|_, queue| {
            queue.waiting.retain(|(_, item)| keep(item));
            len += queue.waiting.len();
            queue.active > 0 || !queue.waiting.is_empty()
        });
        self.len = len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> ClientId {
        ClientId::named(name)
    }

    /// Pop everything, finishing each item at once (one slot, always free).
    fn drain(queue: &mut FairQueue<&'static str>) -> Vec<&'static str> {
        let mut order = Vec::new();
        while let Some((client, item)) = queue.pop() {
            queue.finished(&client);
            order.push(item);
        }
        order
    }

    #[test]
    fn one_client_is_served_in_arrival_order() {
        let mut queue = FairQueue::default();
        for item in ["a1", "a2", "a3"] {
            queue.push(id("a"), item);
        }
        assert_eq!(queue.len(), 3);
        assert_eq!(drain(&mut queue), ["a1", "a2", "a3"]);
        assert!(queue.is_empty() && queue.clients.is_empty());
    }

    #[test]
    fn backlogged_clients_take_turns() {
        let mut queue = FairQueue::default();
        for item in ["a1", "a2", "a3", "a4"] {
            queue.push(id("a"), item);
        }
        for item in ["b1", "b2"] {
            queue.push(id("b"), item);
        }
        queue.push(id("c"), "c1");
        assert_eq!(drain(&mut queue), ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]);
    }

    #[test]
    fn a_flooding_client_cannot_starve_a_newcomer() {
        let mut queue = FairQueue::default();
        for n in 0..50 {
            queue.push(id("flood"), n);
        }
        // The flooder holds both slots when the other client's request arrives.
        let running: Vec<ClientId> = (0..2).filter_map(|_| queue.pop()).map(|(c, _)| c).collect();
        queue.push(id("polite"), 1000);
        // A slot frees: the newcomer goes first, though the flooder's 48 came earlier.
        queue.finished(&running[0]);
        assert_eq!(queue.peek(), Some(&1000));
        assert_eq!(queue.pop(), Some((id("polite"), 1000)));
        assert_eq!(queue.pop().map(|(_, n)| n), Some(2));
    }

    #[test]
    fn fewest_running_goes_first_then_least_recently_admitted() {
        let mut queue = FairQueue::default();
        queue.push(id("a"), "a1");
        queue.push(id("a"), "a2");
        queue.push(id("b"), "b1");
        queue.push(id("b"), "b2");
        assert_eq!(queue.pop().map(|(_, i)| i), Some("a1"));
        // a runs one, b none: b goes next even though a2 arrived first.
        assert_eq!(queue.pop().map(|(_, i)| i), Some("b1"));
        // Both run one; a was admitted longer ago.
        assert_eq!(queue.pop().map(|(_, i)| i), Some("a2"));
        queue.finished(&id("b"));
        assert_eq!(queue.pop().map(|(_, i)| i), Some("b2"));
    }

    #[test]
    fn retain_drops_items_and_forgets_idle_clients() {
        let mut queue = FairQueue::default();
        queue.push(id("a"), 1);
        queue.push(id("a"), 2);
        queue.push(id("b"), 3);
        let running = queue.pop().map(|(c, _)| c);
        assert_eq!(running, Some(id("a")));
        queue.retain(|n| *n != 3 && *n != 2);
        assert!(queue.is_empty());
        assert_eq!(queue.clients.len(), 1, "a still runs one");
        queue.finished(&id("a"));
        assert!(queue.clients.is_empty());
        assert_eq!(queue.pop(), None);
    }
}
