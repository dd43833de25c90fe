//! The continuous-batching scheduler on the engine thread: every running sequence advances
//! one token per step in one forward pass, new requests join at the next step as far as the
//! slots and the KV budget allow (the latest sequence is preempted and later recomputed when
//! the budget runs out), and finished or cancelled sequences (the client's event receiver
//! dropped, or the client stopped reading for `stalled_client_timeout`) leave at once.
//! Waiting requests are admitted round-robin across clients (`fair_queue.rs`).
//!
//! A step, in order: cancelled and stalled clients leave, sequences over the KV budget are
//! preempted, each running sequence is given its share of the step (one token when
//! decoding, a chunk when prefilling), one forward pass runs, and every sequence that fed
//! its last pending token samples the next one (`sequence.rs`).

use std::{
    collections::{HashMap, VecDeque},
    panic::AssertUnwindSafe,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use candle_core::{Device, Tensor};
use tokio::sync::mpsc;

use super::{
    fair_queue::FairQueue,
    outbox::Outbox,
    sequence::{Outcome, Sequence},
    worker::Job,
};
use crate::{
    backend::{BackendError, ClientId, ErrorKind, GenerationEvent, TimeoutPhase, Usage},
    engine::{
        EngineError, Shared,
        load::loader::ModelInfo,
        models::{CausalLm, SlotStep},
    },
    metrics,
};

/// Events buffered per request. A client that reads none pauses only its own sequence
/// once this many wait (the engine thread never blocks on it while others decode).
pub(crate) const EVENT_BUFFER: usize = 64;

/// Prompt tokens one step takes at most, so that a long prompt joining the batch is
/// prefilled in chunks and running streams keep getting tokens in between.
const PREFILL_CHUNK: usize = 512;

/// How many sequences run together and how much KV cache they may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    /// Sequences decoded in one step at most.
    pub max_sequences: usize,
    /// KV cache memory the cached positions of all running sequences may take, in bytes.
    pub kv_budget_bytes: u64,
    /// A client that takes no event for this long loses its sequences (and its slots).
    pub stalled_client_timeout: Duration,
}

/// A request being served: its choices run as separate sequences.
#[derive(Debug)]
struct ActiveJob {
    job: Arc<Job>,
    client: ClientId,
    /// Choices still running or waiting for a slot.
    open_choices: u32,
    completion_tokens: u64,
    /// An error was sent: the remaining choices are dropped.
    failed: bool,
}

pub(super) struct Scheduler {
    model: Box<dyn CausalLm>,
    info: Arc<ModelInfo>,
    device: Device,
    /// Long prompts go in chunks (models with their own slots; candle-transformers' models
    /// take a prompt in one piece).
    chunked_prefill: bool,
    kv_bytes_per_token: u64,
    kv_budget_bytes: u64,
    stalled_client_timeout: Duration,
    jobs: HashMap<u64, ActiveJob>,
    next_job: u64,
    next_start: u64,
    /// Sequences put aside when the KV budget ran out; they resume first, recomputing
    /// their cache from prompt and generated tokens.
    preempted: VecDeque<Sequence>,
    /// Choices of admitted jobs waiting for a slot, in arrival order.
    starting: VecDeque<(u64, u32)>,
    running: Vec<Sequence>,
    free_slots: Vec<usize>,
    /// Jobs taken off the channel, waiting for a slot, one queue per client. They still
    /// count against `queue_capacity` (each holds its queue ticket until it starts), so a
    /// full engine answers 429 at the API.
    waiting: FairQueue<Job>,
    /// Finished requests whose last events their clients have not read yet.
    draining: Vec<Outbox>,
    shared: Arc<Shared>,
}

impl Scheduler {
    pub(super) fn new(
        model: Box<dyn CausalLm>,
        info: Arc<ModelInfo>,
        device: Device,
        limits: BatchLimits,
        shared: Arc<Shared>,
    ) -> Scheduler {
        Scheduler {
            chunked_prefill: model.max_sequences() > 1,
            kv_bytes_per_token: model.kv_bytes_per_token() as u64,
            model,
            info,
            device,
            kv_budget_bytes: limits.kv_budget_bytes,
            stalled_client_timeout: limits.stalled_client_timeout,
            jobs: HashMap::new(),
            next_job: 0,
            next_start: 0,
            preempted: VecDeque::new(),
            starting: VecDeque::new(),
            running: Vec::new(),
            free_slots: (0..limits.max_sequences.max(1)).rev().collect(),
            waiting: FairQueue::default(),
            draining: Vec::new(),
            shared,
        }
    }

    /// Serve jobs until the queue closes.
    pub(super) fn run(&mut self, mut queue: mpsc::Receiver<Job>) {
        loop {
            self.flush_draining();
            let idle = self.running.is_empty()
                && self.preempted.is_empty()
                && self.starting.is_empty()
                && self.waiting.is_empty();
            if idle && self.draining.is_empty() {
                match queue.blocking_recv() {
                    Some(job) => self.enqueue(job),
                    None => return,
                }
            } else if idle {
                // Only slow readers left: look for work now and then.
                match queue.try_recv() {
                    Ok(job) => self.enqueue(job),
                    Err(mpsc::error::TryRecvError::Empty) => {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            // Everything that arrived joins its client's queue before anyone is admitted,
            // so the turn order sees every client.
            while let Ok(job) = queue.try_recv() {
                self.enqueue(job);
            }
            self.turn();
        }
    }

    fn enqueue(&mut self, job: Job) {
        job.span
            .in_scope(|| tracing::debug!(running = self.running.len(), "queued on the engine"));
        self.waiting.push(job.client.clone(), job);
    }

    /// Pass on what finished requests still hold for their clients; an outbox is dropped
    /// once it is empty, its client gone, or stalled past the timeout.
    fn flush_draining(&mut self) {
        let timeout = self.stalled_client_timeout;
        self.draining
            .retain_mut(|out| out.flush() && out.is_backed_up() && !out.is_stalled(timeout));
    }

    /// Admit what fits, then run one step if anything runs.
    fn turn(&mut self) {
        // Clients that left while waiting give their place (and queue count) back now.
        self.waiting.retain(|job| !job.events.is_closed());
        self.admit();
        if !self.running.is_empty() {
            self.step();
        }
    }

    /// KV bytes of the positions the running sequences hold after the next step.
    fn used_bytes(&self) -> u64 {
        let positions: usize = self.running.iter().map(Sequence::positions).sum();
        positions as u64 * self.kv_bytes_per_token
    }

    /// Whether one more sequence with `positions` to feed may start now. A sequence always
    /// starts when nothing runs, so one request larger than the budget is served alone.
    fn fits(&self, positions: usize) -> bool {
        !self.free_slots.is_empty()
            && (self.running.is_empty()
                || self.used_bytes() + positions as u64 * self.kv_bytes_per_token <= self.kv_budget_bytes)
    }

    /// Resume preempted sequences, start waiting choices, then take waiting jobs in, as
    /// far as slots and budget go.
    fn admit(&mut self) {
        loop {
            let admitted = if !self.preempted.is_empty() {
                self.resume_preempted()
            } else if !self.starting.is_empty() {
                self.start_next_choice()
            } else {
                self.accept_waiting_job()
            };
            if !admitted {
                return;
            }
        }
    }

    /// The first preempted sequence goes back into a slot; `false` when it does not fit.
    fn resume_preempted(&mut self) -> bool {
        let Some(sequence) = self.preempted.front() else {
            return false;
        };
        if !self.fits(sequence.positions()) {
            return false;
        }
        if let (Some(mut sequence), Some(slot)) = (self.preempted.pop_front(), self.free_slots.pop()) {
            sequence.slot = slot;
            self.running.push(sequence);
        }
        true
    }

    /// The first waiting choice of an admitted job starts; `false` when it does not fit.
    fn start_next_choice(&mut self) -> bool {
        let Some(&(job_id, index)) = self.starting.front() else {
            return false;
        };
        let Some(active) = self.jobs.get(&job_id) else {
            self.starting.pop_front();
            return true;
        };
        if !self.fits(active.job.prompt.len()) {
            return false;
        }
        self.starting.pop_front();
        let job = active.job.clone();
        self.start_sequence(job_id, job, index);
        true
    }

    /// The next job in the clients' turn order is admitted, its choices queued to start;
    /// `false` when none waits or its prompt does not fit.
    fn accept_waiting_job(&mut self) -> bool {
        let Some(job) = self.waiting.peek() else {
            return false;
        };
        if !job.events.is_closed() && !self.fits(job.prompt.len()) {
            return false;
        }
        let Some((client, mut job)) = self.waiting.pop() else {
            return false;
        };
        // Started (or gone): it no longer counts against the queue.
        job.ticket.take();
        if job.events.is_closed() {
            job.span
                .in_scope(|| tracing::debug!("cancelled: the client left while it waited"));
            self.waiting.finished(&client);
            return true;
        }
        let job_id = self.next_job;
        self.next_job += 1;
        let choices = job.params.n.max(1);
        job.span.in_scope(|| tracing::debug!(job_id, "admitted"));
        self.starting.extend((0..choices).map(|index| (job_id, index)));
        self.jobs.insert(
            job_id,
            ActiveJob {
                job: Arc::new(job),
                client,
                open_choices: choices,
                completion_tokens: 0,
                failed: false,
            },
        );
        true
    }

    /// A job is done (finished, failed or cancelled): its client runs one fewer.
    fn forget_job(&mut self, job_id: u64) {
        if let Some(active) = self.jobs.remove(&job_id) {
            self.waiting.finished(&active.client);
        }
    }

    fn start_sequence(&mut self, job_id: u64, job: Arc<Job>, index: u32) {
        let Some(slot) = self.free_slots.pop() else {
            return;
        };
        let started = self.next_start;
        self.next_start += 1;
        job.span
            .in_scope(|| tracing::debug!(choice = index, slot, batch = self.running.len() + 1, "started"));
        let sequence = Sequence::new(job_id, job, index, slot, started, &self.info);
        self.running.push(sequence);
    }

    /// While the running sequences' positions exceed the KV budget, put the latest started
    /// aside (its cache is dropped and recomputed when it resumes, as vLLM's recompute
    /// preemption does); the oldest always keeps running.
    fn preempt_over_budget(&mut self) {
        while self.running.len() > 1 && self.used_bytes() > self.kv_budget_bytes {
            let Some(latest) = (0..self.running.len()).max_by_key(|&i| self.running[i].started) else {
                return;
            };
            let mut sequence = self.running.swap_remove(latest);
            self.free_slot(sequence.slot);
            sequence.rewind();
            sequence.job.span.in_scope(|| {
                tracing::debug!(
                    choice = sequence.index,
                    positions = sequence.pending.len(),
                    "KV budget full: sequence preempted"
                );
            });
            self.preempted.push_front(sequence);
        }
    }

    /// One forward pass over every running sequence, then one token for each that has
    /// consumed its input.
    fn step(&mut self) {
        self.leave_cancelled();
        self.cancel_stalled();
        self.preempt_over_budget();
        if self.running.is_empty() {
            return;
        }
        let takes = self.plan_takes();
        let Some(logits) = self.forward(&takes) else {
            return;
        };
        let outcomes = self.advance_running(&takes, logits);
        self.settle(outcomes);
    }

    /// Cancelled clients leave before any compute is spent on them.
    fn leave_cancelled(&mut self) {
        let (closed, open): (Vec<Sequence>, Vec<Sequence>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| s.out.is_closed());
        self.running = open;
        for sequence in closed {
            self.retire(sequence, Outcome::Cancelled);
        }
    }

    /// How many pending tokens each running sequence feeds this step. Decoding sequences
    /// feed their one token; prompts share a chunk (a prompt that finds no room waits for
    /// the next step); a sequence whose client has not read its earlier events waits too.
    fn plan_takes(&mut self) -> Vec<usize> {
        let mut prefill_room = if self.chunked_prefill {
            PREFILL_CHUNK
        } else {
            usize::MAX
        };
        self.running
            .iter_mut()
            .map(|s| {
                s.out.flush();
                if s.out.is_backed_up() {
                    0
                } else if s.pending.len() <= 1 {
                    s.pending.len()
                } else {
                    let take = s.pending.len().min(prefill_room);
                    prefill_room -= take;
                    take
                }
            })
            .collect()
    }

    /// The forward pass over what each sequence takes; the last position's logits of each
    /// sequence that took any. `None` when nothing was to be computed, or when the pass
    /// failed (every running job then has the error).
    fn forward(&mut self, takes: &[usize]) -> Option<Vec<Tensor>> {
        let steps: Vec<SlotStep<'_>> = self
            .running
            .iter()
            .zip(takes)
            .filter(|(_, take)| **take > 0)
            .map(|(s, &take)| SlotStep {
                slot: s.slot,
                tokens: &s.pending[..take],
                pos: s.pos,
            })
            .collect();
        let stepped = steps.len();
        if stepped == 0 {
            // Every sequence waits for its client to read: nothing to compute yet.
            drop(steps);
            std::thread::sleep(std::time::Duration::from_millis(1));
            return None;
        }
        self.shared.peak_batch.fetch_max(stepped, Ordering::Relaxed);
        let device = self.device.clone();
        let model = &mut self.model;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| model.forward_slots(&steps, &device)));
        drop(steps);
        let message = match result {
            Ok(Ok(logits)) if logits.len() == stepped => return Some(logits),
            Ok(Ok(logits)) => format!(
                "the model returned {} logits for {stepped} sequences",
                logits.len()
            ),
            Ok(Err(err)) => err.to_string(),
            Err(_) => "the engine panicked while generating; see the log".into(),
        };
        self.fail_all(message);
        None
    }

    /// Each sequence that took tokens moves past them; one that has fed all it had samples
    /// its next token from its logits.
    fn advance_running(&mut self, takes: &[usize], logits: Vec<Tensor>) -> Vec<Result<Outcome, EngineError>> {
        let mut logits = logits.into_iter();
        let mut outcomes = Vec::with_capacity(self.running.len());
        for (sequence, &take) in self.running.iter_mut().zip(takes) {
            if take == 0 {
                outcomes.push(Ok(Outcome::Running));
                continue;
            }
            let Some(logits) = logits.next() else {
                outcomes.push(Ok(Outcome::Running));
                continue;
            };
            sequence.pending.drain(..take);
            sequence.pos += take;
            let outcome = if sequence.pending.is_empty() {
                sequence.advance(&logits, &self.info)
            } else {
                Ok(Outcome::Running)
            };
            outcomes.push(outcome);
        }
        outcomes
    }

    /// Sequences that finished, left or failed in this step give their slots back.
    fn settle(&mut self, outcomes: Vec<Result<Outcome, EngineError>>) {
        // Backwards, so that swap_remove only moves sequences already looked at.
        let mut done = Vec::new();
        for (index, outcome) in outcomes.into_iter().enumerate().rev() {
            if !matches!(outcome, Ok(Outcome::Running)) {
                done.push((self.running.swap_remove(index), outcome));
            }
        }
        for (sequence, outcome) in done {
            match outcome {
                Ok(outcome) => self.retire(sequence, outcome),
                Err(err) => {
                    self.free_slot(sequence.slot);
                    self.fail_job(sequence.job_id, err.to_string(), Some(sequence.out));
                }
            }
        }
    }

    /// Give a cache slot back (its cache is dropped).
    fn free_slot(&mut self, slot: usize) {
        self.model.release_slot(slot);
        self.free_slots.push(slot);
    }

    /// A sequence is done: send its last text and finish reason; when it was its job's
    /// last choice, the job's usage.
    fn retire(&mut self, mut sequence: Sequence, outcome: Outcome) {
        let job_id = sequence.job_id;
        let finish = match outcome {
            Outcome::Finished(reason) => Some(reason),
            Outcome::Cancelled | Outcome::Running => None,
        };
        sequence.job.span.in_scope(|| {
            let (choice, generated) = (sequence.index, sequence.generated.len());
            match finish {
                Some(ending) => tracing::debug!(choice, generated, ending = ?ending, "finished"),
                None => tracing::debug!(choice, generated, "cancelled: the client is gone"),
            }
        });
        let mut delivered = true;
        if let Some(reason) = finish {
            delivered = match sequence.finish(reason, &self.info) {
                Ok(delivered) => delivered,
                Err(err) => {
                    self.free_slot(sequence.slot);
                    return self.fail_job(job_id, err.to_string(), Some(sequence.out));
                }
            };
        }
        let generated = sequence.generated.len() as u64;
        self.free_slot(sequence.slot);
        if finish.is_none() || !delivered {
            // The client left: its other choices have nobody to go to either.
            if self.jobs.contains_key(&job_id) {
                self.drop_job(job_id);
            }
            return;
        }
        self.close_choice(job_id, generated, sequence.out);
    }

    /// A choice finished and reached its client: count it; after the job's last choice,
    /// send the job's usage. `out` waits in `draining` while its client has not read all.
    fn close_choice(&mut self, job_id: u64, generated: u64, mut out: Outbox) {
        let Some(active) = self.jobs.get_mut(&job_id) else {
            return;
        };
        active.completion_tokens += generated;
        active.open_choices = active.open_choices.saturating_sub(1);
        if active.open_choices == 0 {
            if !active.failed {
                let prompt_tokens = active.job.prompt.len() as u64;
                let completion_tokens = active.completion_tokens;
                out.send(Ok(GenerationEvent::Usage(Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: prompt_tokens + completion_tokens,
                    extra: serde_json::Map::new(),
                })));
            }
            self.forget_job(job_id);
        }
        if out.is_backed_up() {
            self.draining.push(out);
        }
    }

    /// Cancel the sequences of clients that have taken no event for the stall timeout:
    /// their slots and KV caches go to clients that read. Such a client finds an error
    /// after what its channel already holds, should it ever read again.
    fn cancel_stalled(&mut self) {
        let timeout = self.stalled_client_timeout;
        while let Some(index) = self.running.iter().position(|s| s.out.is_stalled(timeout)) {
            let sequence = self.running.swap_remove(index);
            let client = self
                .jobs
                .get(&sequence.job_id)
                .map_or_else(ClientId::default, |a| a.client.clone());
            sequence.job.span.in_scope(|| {
                tracing::warn!(
                    %client,
                    choice = sequence.index,
                    generated = sequence.generated.len(),
                    timeout = %humantime::format_duration(timeout),
                    "a streaming client stopped reading: its sequence is cancelled and its slot freed"
                );
            });
            metrics::local_stalled_client();
            self.free_slot(sequence.slot);
            let mut out = sequence.out;
            out.replace_held(Err(BackendError::new(
                ErrorKind::Timeout(TimeoutPhase::Idle),
                format!(
                    "the local model stopped this answer: the client read nothing for {}",
                    humantime::format_duration(timeout)
                ),
            )));
            // Kept until the timeout passes once more, then dropped with the channel.
            out.flush();
            self.draining.push(out);
            self.drop_job(sequence.job_id);
        }
    }

    /// Send the job's client an error once, after what `out` (or one of its running
    /// sequences) still holds for it; its other choices stop.
    fn fail_job(&mut self, job_id: u64, message: String, out: Option<Outbox>) {
        let span = self
            .jobs
            .get(&job_id)
            .map_or_else(tracing::Span::none, |a| a.job.span.clone());
        span.in_scope(|| tracing::error!(%message, "local generation failed"));
        if let Some(active) = self.jobs.get_mut(&job_id)
            && !active.failed
        {
            active.failed = true;
            let fresh = || Outbox::new(active.job.events.clone());
            let mut out = out
                .or_else(|| {
                    self.running
                        .iter_mut()
                        .find(|s| s.job_id == job_id)
                        .map(|s| std::mem::replace(&mut s.out, fresh()))
                })
                .unwrap_or_else(fresh);
            out.send(Err(BackendError::new(ErrorKind::Internal, message)));
            if out.is_backed_up() {
                self.draining.push(out);
            }
        }
        self.drop_job(job_id);
    }

    /// Remove a job and every sequence or waiting choice of it.
    fn drop_job(&mut self, job_id: u64) {
        self.forget_job(job_id);
        self.starting.retain(|(id, _)| *id != job_id);
        self.preempted.retain(|s| s.job_id != job_id);
        let mut index = 0;
        while index < self.running.len() {
            if self.running[index].job_id == job_id {
                let slot = self.running.swap_remove(index).slot;
                self.free_slot(slot);
            } else {
                index += 1;
            }
        }
    }

    /// A step failed as a whole: every running job gets the error; caches start afresh.
    fn fail_all(&mut self, message: String) {
        let ids: Vec<u64> = self.running.iter().map(|s| s.job_id).collect();
        for id in ids {
            self.fail_job(id, message.clone(), None);
        }
        self.model.clear_kv_cache();
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
