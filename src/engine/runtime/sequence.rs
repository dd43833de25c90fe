//! One choice of one request as the scheduler runs it: its place in a cache slot, the
//! tokens it still has to feed, and what each sampled token turns into on its way to the
//! client (detokenized, held back at a possible stop string, split into reasoning and
//! answer, parsed for tool calls).

use std::sync::Arc;

use candle_core::Tensor;

use super::{outbox::Outbox, sampler::Sampler, worker::Job};
use crate::{
    backend::{ChoiceDelta, FinishReason, GenerationEvent},
    engine::{
        EngineError,
        load::loader::ModelInfo,
        text::{
            reasoning::{ReasoningSplitter, Split},
            stop::StopMatcher,
            tokenizer::IncrementalDecoder,
            tool_calls::{self, ToolCall, ToolCallParser},
        },
    },
};

/// Why a sequence ended, as the engine tells it apart: a stop string's text was already
/// cut at the match, so less is left to flush than after an end-of-sequence token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    EndOfSequence,
    StopString,
    Length,
}

impl Ending {
    fn finish_reason(self) -> FinishReason {
        match self {
            Ending::EndOfSequence | Ending::StopString => FinishReason::Stop,
            Ending::Length => FinishReason::Length,
        }
    }
}

/// What a step did to a sequence.
pub(super) enum Outcome {
    Running,
    /// Finished for this reason.
    Finished(Ending),
    /// The client is gone.
    Cancelled,
}

/// One choice of one request, decoding in a cache slot.
pub(super) struct Sequence {
    pub(super) job_id: u64,
    pub(super) job: Arc<Job>,
    pub(super) index: u32,
    pub(super) slot: usize,
    /// Start order: the latest started is preempted first when the KV budget runs out.
    pub(super) started: u64,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    splitter: ReasoningSplitter,
    /// Present when the request offered tools and the template has a tool-call markup.
    tool_calls: Option<ToolCallParser>,
    /// No delta has been sent yet (the first one carries the role).
    first: bool,
    pub(super) out: Outbox,
    /// Tokens still to feed: the prompt (in chunks), then each sampled token.
    pub(super) pending: Vec<u32>,
    pub(super) pos: usize,
    /// Tokens sampled so far (a preempted sequence feeds prompt and these again).
    pub(super) generated: Vec<u32>,
}

impl Sequence {
    /// Choice `index` of `job`, starting in `slot` with its whole prompt to feed.
    pub(super) fn new(
        job_id: u64,
        job: Arc<Job>,
        index: u32,
        slot: usize,
        started: u64,
        info: &ModelInfo,
    ) -> Sequence {
        let uses_think = info.template.as_ref().is_some_and(|t| t.uses_think);
        let tool_calls = (info.template.as_ref().and_then(|t| t.tool_calls))
            .zip(job.tool_names.clone())
            .map(|(format, names)| ToolCallParser::new(format, names));
        Sequence {
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
        }
    }

    /// Positions its cache holds after the next step.
    pub(super) fn positions(&self) -> usize {
        self.pos + self.pending.len()
    }

    /// Its cache is gone: feed everything again from position 0, the prompt and then the
    /// tokens already sampled (the last of them is the one still pending).
    pub(super) fn rewind(&mut self) {
        self.pending = self.job.prompt.clone();
        self.pending.extend_from_slice(&self.generated);
        self.pos = 0;
    }

    /// Sample the next token from `logits` and pass its text on.
    pub(super) fn advance(&mut self, logits: &Tensor, info: &ModelInfo) -> Result<Outcome, EngineError> {
        let token = self.sampler.sample(logits)?;
        self.generated.push(token);
        if info.eos_ids.contains(&token) {
            return Ok(Outcome::Finished(Ending::EndOfSequence));
        }
        if let Some(text) = self.decoder.push(&info.tokenizer, token)? {
            let released = self.stops.push(&text);
            let split = self.splitter.push(&released.text);
            if !self.send_split(split, false) {
                return Ok(Outcome::Cancelled);
            }
            if released.stopped {
                return Ok(Outcome::Finished(Ending::StopString));
            }
        }
        if self.generated.len() >= self.job.max_tokens {
            return Ok(Outcome::Finished(Ending::Length));
        }
        self.pending.push(token);
        Ok(Outcome::Running)
    }

    /// Send the last text and the finish `reason`; `false` when the client is gone.
    pub(super) fn finish(&mut self, ending: Ending, info: &ModelInfo) -> Result<bool, EngineError> {
        // After a stop string nothing more is decoded, but what the splitter and the
        // tool-call parser hold from before it goes out; otherwise all held text does.
        let stopped = if ending == Ending::StopString {
            self.flush_split(String::new());
            true
        } else {
            self.finish_text(info)?
        };
        let reason = if stopped {
            FinishReason::Stop
        } else {
            ending.finish_reason()
        };
        Ok(self.send_finish(reason))
    }

    /// Send released text; its answer part goes through the tool-call parser when there is
    /// one (`finished`: flush it).
    fn send_split(&mut self, mut split: Split, finished: bool) -> bool {
        let mut calls: Vec<ToolCall> = Vec::new();
        let mut first_call = 0;
        if let Some(parser) = &mut self.tool_calls {
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
        let entries: Vec<_> = calls
            .iter()
            .enumerate()
            .map(|(n, call)| tool_calls::delta_entry(call, first_call + n))
            .collect();
        let delta = ChoiceDelta {
            index: self.index,
            role: std::mem::take(&mut self.first).then(|| "assistant".to_string()),
            content: (!split.content.is_empty()).then_some(split.content),
            reasoning_content: (!split.reasoning.is_empty()).then_some(split.reasoning),
            tool_calls: (!entries.is_empty()).then_some(entries),
            ..ChoiceDelta::default()
        };
        self.out.send(Ok(GenerationEvent::Delta(delta)))
    }

    /// Flush what the decoder, stop matcher and reasoning splitter still hold. Returns
    /// whether a stop string completed in the held text.
    fn finish_text(&mut self, info: &ModelInfo) -> Result<bool, EngineError> {
        let tail = self.decoder.finish(&info.tokenizer)?;
        let released = self.stops.push(&tail);
        let mut text = released.text;
        let stopped = released.stopped;
        if !stopped {
            text.push_str(&self.stops.finish());
        }
        self.flush_split(text);
        Ok(stopped)
    }

    /// Pass the last `text` and everything the reasoning splitter and tool-call parser hold.
    fn flush_split(&mut self, text: String) {
        let mut split = self.splitter.push(&text);
        let rest = self.splitter.finish();
        split.reasoning.push_str(&rest.reasoning);
        split.content.push_str(&rest.content);
        self.send_split(split, true);
    }

    /// The choice's last delta, with its finish reason (`tool_calls` when the model ended
    /// its turn after calling tools, as OpenAI reports it).
    fn send_finish(&mut self, reason: FinishReason) -> bool {
        let called = self.tool_calls.as_ref().is_some_and(|p| p.calls() > 0);
        let reason = if reason == FinishReason::Stop && called {
            FinishReason::ToolCalls
        } else {
            reason
        };
        let first = self.first;
        let done = ChoiceDelta {
            index: self.index,
            role: first.then(|| "assistant".to_string()),
            content: first.then(String::new),
            finish_reason: Some(reason),
            ..ChoiceDelta::default()
        };
        self.out.send(Ok(GenerationEvent::Delta(done)))
    }
}
