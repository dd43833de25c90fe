//! The continuous-batching scheduler on the engine thread: every running sequence advances
//! one token per step in one forward pass, new requests join at the next step as far as the
//! slots and the KV budget allow (the latest sequence is preempted and later recomputed when
//! the budget runs out), and finished or cancelled sequences (the client's event receiver
//! dropped, or the client stopped reading for `stalled_client_timeout`) leave at once.
//! Waiting requests are admitted round-robin across clients (`fair_queue.rs`).

use std::{
    collections::{HashMap, VecDeque},
    panic::AssertUnwindSafe,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use candle_core::{Device, Tensor};
use tokio::sync::mpsc;

use super::{
    EngineError, Shared,
    fair_queue::FairQueue,
    loader::ModelInfo,
    models::{CausalLm, SlotStep},
    outbox::Outbox,
    reasoning::{ReasoningSplitter, Split},
    sampler::Sampler,
    stop::StopMatcher,
    tokenizer::IncrementalDecoder,
    tool_calls::{self, ToolCall, ToolCallParser},
    worker::Job,
};
use crate::{
    backend::{BackendError, ChoiceDelta, ClientId, ErrorKind, GenerationEvent, Origin, TimeoutPhase, Usage},
    metrics,
};

/// Events buffered per request. A client that reads none pauses only its own sequence
/// once this many wait (the engine thread never blocks on it while others decode).
pub(super) const EVENT_BUFFER: usize = 64;

/// Prompt tokens one step takes at most, so that a long prompt joining the batch is
/// prefilled in chunks and running streams keep getting tokens in between.
const PREFILL_CHUNK: usize = 512;

/// Finish reason of a sequence ended by a stop string (sent as `stop`).
const STOP_STRING: &str = "stop_string";

/// How many sequences run together and how much KV cache they may hold.
#[derive(Debug, Clone, Copy)]
pub(super) struct BatchLimits {
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

/// One choice of one request, decoding in a cache slot.
struct Sequence {
    job_id: u64,
    job: Arc<Job>,
    index: u32,
    slot: usize,
    /// Start order: the latest started is preempted first when the KV budget runs out.
    started: u64,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    splitter: ReasoningSplitter,
    /// Present when the request offered tools and the template has a tool-call markup.
    tool_calls: Option<ToolCallParser>,
    /// No delta has been sent yet (the first one carries the role).
    first: bool,
    out: Outbox,
    /// Tokens still to feed: the prompt (in chunks), then each sampled token.
    pending: Vec<u32>,
    pos: usize,
    /// Tokens sampled so far (a preempted sequence feeds prompt and these again).
    generated: Vec<u32>,
}

impl Sequence {
    /// Positions its cache holds after the next step.
    fn positions(&self) -> usize {
        self.pos + self.pending.len()
    }
}

/// What a step did to a sequence.
enum Outcome {
    Running,
    /// Finished with this reason (`stop` or `length`).
    Finished(&'static str),
    /// The client is gone.
    Cancelled,
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
            let timeout = self.stalled_client_timeout;
            self.draining
                .retain_mut(|out| out.flush() && out.is_backed_up() && !out.is_stalled(timeout));
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
            // Clients that left while waiting give their place (and queue count) back now.
            self.waiting.retain(|job| !job.events.is_closed());
            self.admit();
            if self.running.is_empty() {
                continue;
            }
            self.step();
        }
    }

    fn enqueue(&mut self, job: Job) {
        job.span
            .in_scope(|| tracing::debug!(running = self.running.len(), "queued on the engine"));
        self.waiting.push(job.client.clone(), job);
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

    /// Resume preempted sequences, start waiting choices, then take the waiting job in, as
    /// far as slots and budget go.
    fn admit(&mut self) {
        loop {
            if let Some(sequence) = self.preempted.front() {
                if !self.fits(sequence.positions()) {
                    return;
                }
                if let (Some(mut sequence), Some(slot)) = (self.preempted.pop_front(), self.free_slots.pop())
                {
                    sequence.slot = slot;
                    self.running.push(sequence);
                }
                continue;
            }
            if let Some(&(job_id, index)) = self.starting.front() {
                let Some(active) = self.jobs.get(&job_id) else {
                    self.starting.pop_front();
                    continue;
                };
                if !self.fits(active.job.prompt.len()) {
                    return;
                }
                self.starting.pop_front();
                let job = active.job.clone();
                self.start_sequence(job_id, job, index);
                continue;
            }
            let Some(job) = self.waiting.peek() else {
                return;
            };
            if !job.events.is_closed() && !self.fits(job.prompt.len()) {
                return;
            }
            let Some((client, mut job)) = self.waiting.pop() else {
                return;
            };
            // Started (or gone): it no longer counts against the queue.
            job.ticket.take();
            if job.events.is_closed() {
                job.span
                    .in_scope(|| tracing::debug!("cancelled: the client left while it waited"));
                self.waiting.finished(&client);
                continue;
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
        }
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
        let uses_think = self.info.template.as_ref().is_some_and(|t| t.uses_think);
        let tool_calls = (self.info.template.as_ref().and_then(|t| t.tool_calls))
            .zip(job.tool_names.clone())
            .map(|(format, names)| ToolCallParser::new(format, names));
        job.span
            .in_scope(|| tracing::debug!(choice = index, slot, batch = self.running.len() + 1, "started"));
        self.running.push(Sequence {
            job_id,
            index,
            slot,
            started,
            sampler: Sampler::new(&job.params, job.seed.wrapping_add(u64::from(index)), &job.prompt),
            decoder: if tool_calls.is_some() {
                IncrementalDecoder::with_tool_markup()
            } else {
                IncrementalDecoder::new()
            },
            stops: StopMatcher::new(&job.params.stop.0),
            splitter: ReasoningSplitter::new(uses_think, job.think_opened),
            tool_calls,
            first: true,
            out: Outbox::new(job.events.clone()),
            pending: job.prompt.clone(),
            pos: 0,
            generated: Vec::new(),
            job,
        });
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
            // Feed everything again: prompt, then the tokens already sampled (the last of
            // them is the one still pending).
            sequence.pending = sequence.job.prompt.clone();
            sequence.pending.extend_from_slice(&sequence.generated);
            sequence.pos = 0;
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
        // Cancelled clients leave before any compute is spent on them.
        let (closed, open): (Vec<Sequence>, Vec<Sequence>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| s.out.is_closed());
        self.running = open;
        for sequence in closed {
            self.retire(sequence, Outcome::Cancelled);
        }
        self.cancel_stalled();
        self.preempt_over_budget();
        if self.running.is_empty() {
            return;
        }
        // Decoding sequences feed their one token; prompts share a chunk (a prompt that
        // finds no room waits for the next step); a sequence whose client has not read its
        // earlier events waits too.
        let mut prefill_room = if self.chunked_prefill {
            PREFILL_CHUNK
        } else {
            usize::MAX
        };
        let takes: Vec<usize> = self
            .running
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
            .collect();
        let steps: Vec<SlotStep<'_>> = self
            .running
            .iter()
            .zip(&takes)
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
            return;
        }
        self.shared.peak_batch.fetch_max(stepped, Ordering::Relaxed);
        let device = self.device.clone();
        let model = &mut self.model;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| model.forward_slots(&steps, &device)));
        drop(steps);
        let mut logits = match result {
            Ok(Ok(logits)) if logits.len() == stepped => logits.into_iter(),
            Ok(Ok(logits)) => {
                return self.fail_all(format!(
                    "the model returned {} logits for {stepped} sequences",
                    logits.len()
                ));
            }
            Ok(Err(err)) => return self.fail_all(err.to_string()),
            Err(_) => return self.fail_all("the engine panicked while generating; see the log".into()),
        };
        let mut outcomes = Vec::with_capacity(self.running.len());
        for (sequence, take) in self.running.iter_mut().zip(takes) {
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
                advance(sequence, &logits, &self.info)
            } else {
                Ok(Outcome::Running)
            };
            outcomes.push(outcome);
        }
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
                Some(reason) => tracing::debug!(choice, generated, reason, "finished"),
                None => tracing::debug!(choice, generated, "cancelled: the client is gone"),
            }
        });
        let mut delivered = true;
        if let Some(reason) = finish {
            // After a stop string nothing more is decoded, but what the splitter and the
            // tool-call parser hold from before it goes out; otherwise all held text does.
            let flushed = if reason == STOP_STRING {
                flush_split(&mut sequence, String::new());
                Ok(Some("stop"))
            } else {
                finish_text(&mut sequence, &self.info)
            };
            delivered = match flushed {
                Ok(reason_after) => send_finish(&mut sequence, reason_after.unwrap_or(reason)),
                Err(err) => {
                    self.free_slot(sequence.slot);
                    return self.fail_job(job_id, err.to_string(), Some(sequence.out));
                }
            };
        }
        let generated = sequence.generated.len() as u64;
        self.free_slot(sequence.slot);
        let mut out = sequence.out;
        let Some(active) = self.jobs.get_mut(&job_id) else {
            return;
        };
        active.completion_tokens += generated;
        active.open_choices = active.open_choices.saturating_sub(1);
        if finish.is_none() || !delivered {
            // The client left: its other choices have nobody to go to either.
            self.drop_job(job_id);
            return;
        }
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
                Origin::Local,
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
            out.send(Err(BackendError::new(
                ErrorKind::Internal,
                Origin::Local,
                message,
            )));
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

/// Send released text; its answer part goes through the tool-call parser when there is
/// one (`finished`: flush it).
fn send_split(sequence: &mut Sequence, mut split: Split, finished: bool) -> bool {
    let mut calls: Vec<ToolCall> = Vec::new();
    let mut first_call = 0;
    if let Some(parser) = &mut sequence.tool_calls {
        first_call = parser.calls();
        let mut parsed = parser.push(&split.content);
        if finished {
            let rest = parser.finish();
            parsed.content.push_str(&rest.content);
            parsed.calls.extend(rest.calls);
        }
        split.content = parsed.content;
        calls = parsed.calls;
    }
    if split.content.is_empty() && split.reasoning.is_empty() && calls.is_empty() {
        return true;
    }
    let entries: Vec<serde_json::Value> = calls
        .iter()
        .enumerate()
        .map(|(n, call)| tool_calls::delta_entry(call, first_call + n))
        .collect();
    let delta = ChoiceDelta {
        index: sequence.index,
        role: std::mem::take(&mut sequence.first).then(|| "assistant".to_string()),
        content: (!split.content.is_empty()).then_some(split.content),
        reasoning_content: (!split.reasoning.is_empty()).then_some(split.reasoning),
        tool_calls: (!entries.is_empty()).then_some(entries),
        ..ChoiceDelta::default()
    };
    sequence.out.send(Ok(GenerationEvent::Delta(delta)))
}

/// Sample the next token from `logits` and pass its text on.
fn advance(sequence: &mut Sequence, logits: &Tensor, info: &ModelInfo) -> Result<Outcome, EngineError> {
    let token = sequence.sampler.sample(logits)?;
    sequence.generated.push(token);
    if info.eos_ids.contains(&token) {
        return Ok(Outcome::Finished("stop"));
    }
    if let Some(text) = sequence.decoder.push(&info.tokenizer, token)? {
        let released = sequence.stops.push(&text);
        let split = sequence.splitter.push(&released.text);
        if !send_split(sequence, split, false) {
            return Ok(Outcome::Cancelled);
        }
        if released.stopped {
            return Ok(Outcome::Finished(STOP_STRING));
        }
    }
    if sequence.generated.len() >= sequence.job.max_tokens {
        return Ok(Outcome::Finished("length"));
    }
    sequence.pending.push(token);
    Ok(Outcome::Running)
}

/// Flush what the decoder, stop matcher and reasoning splitter still hold. Returns
/// `Some("stop")` when a stop string completed in the held text.
fn finish_text(sequence: &mut Sequence, info: &ModelInfo) -> Result<Option<&'static str>, EngineError> {
    let tail = sequence.decoder.finish(&info.tokenizer)?;
    let released = sequence.stops.push(&tail);
    let mut text = released.text;
    let stopped = released.stopped;
    if !stopped {
        text.push_str(&sequence.stops.finish());
    }
    flush_split(sequence, text);
    Ok(stopped.then_some("stop"))
}

/// Pass the last `text` and everything the reasoning splitter and tool-call parser hold.
fn flush_split(sequence: &mut Sequence, text: String) {
    let mut split = sequence.splitter.push(&text);
    let rest = sequence.splitter.finish();
    split.reasoning.push_str(&rest.reasoning);
    split.content.push_str(&rest.content);
    send_split(sequence, split, true);
}

/// The choice's last delta, with its finish reason (`tool_calls` when the model ended
/// its turn after calling tools, as OpenAI reports it).
fn send_finish(sequence: &mut Sequence, reason: &'static str) -> bool {
    let called = sequence.tool_calls.as_ref().is_some_and(|p| p.calls() > 0);
    let reason = if reason == "stop" && called {
        "tool_calls"
    } else {
        reason
    };
    let first = sequence.first;
    let done = ChoiceDelta {
        index: sequence.index,
        role: first.then(|| "assistant".to_string()),
        content: first.then(String::new),
        finish_reason: Some(reason.to_string()),
        ..ChoiceDelta::default()
    };
    sequence.out.send(Ok(GenerationEvent::Delta(done)))
}
