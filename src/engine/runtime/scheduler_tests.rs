//! The scheduler driven turn by turn with a fake model: a model whose "cache" is the list
//! of tokens fed to each slot and whose next token is a function of that list, so that
//! what each forward pass carried is on record and a wrong recompute changes the answer.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use candle_core::{Device, Tensor};
use tokio::sync::mpsc;

use super::{BatchLimits, EVENT_BUFFER, PREFILL_CHUNK, Scheduler};
use crate::{
    backend::{BackendError, ClientId, ErrorKind, GenerationEvent, SamplingParams, TimeoutPhase},
    engine::{
        Arch, Phase, Shared,
        load::loader::ModelInfo,
        models::{CausalLm, Dims, SlotStep},
        runtime::worker::Job,
        testing::tiny::{EOS, tiny_tokenizer},
        text::tokenizer::TextTokenizer,
    },
};

type Event = Result<GenerationEvent, BackendError>;

/// What one forward pass fed to one slot.
#[derive(Debug, Clone, PartialEq)]
struct Fed {
    slot: usize,
    pos: usize,
    tokens: Vec<u32>,
}

/// Everything the fake model was asked to do.
#[derive(Debug, Default)]
struct Record {
    /// One entry per forward pass.
    passes: Vec<Vec<Fed>>,
    /// Slots given back, in order.
    released: Vec<usize>,
}

/// A model with `slots` cache slots. Its next token is a word chosen by a hash of
/// everything the slot holds, or end-of-sequence once the slot holds `eos_at` tokens.
struct FakeModel {
    caches: Vec<Vec<u32>>,
    kv_bytes_per_token: usize,
    eos_at: Option<usize>,
    text: Arc<TestText>,
    record: Arc<Mutex<Record>>,
}

/// Token ids the fake model answers with, from the tiny test tokenizer.
struct TestText {
    tokenizer: TextTokenizer,
    words: Vec<u32>,
    eos: u32,
}

fn test_text() -> Arc<TestText> {
    static TEXT: OnceLock<Arc<TestText>> = OnceLock::new();
    TEXT.get_or_init(|| {
        let tokenizer = TextTokenizer::from_tokenizer(tiny_tokenizer().expect("tiny tokenizer"));
        let words = tokenizer
            .encode("the boat rows over a grey sea", false)
            .expect("encode");
        let eos = tokenizer.token_id(EOS).expect("EOS token");
        Arc::new(TestText {
            tokenizer,
            words,
            eos,
        })
    })
    .clone()
}

impl FakeModel {
    fn new(slots: usize) -> FakeModel {
        FakeModel {
            caches: vec![Vec::new(); slots],
            kv_bytes_per_token: 1,
            eos_at: None,
            text: test_text(),
            record: Arc::default(),
        }
    }

    fn next_token(&self, cache: &[u32]) -> u32 {
        if self.eos_at.is_some_and(|at| cache.len() >= at) {
            return self.text.eos;
        }
        let hash = cache
            .iter()
            .fold(17u64, |h, &t| h.wrapping_mul(31).wrapping_add(u64::from(t)));
        self.text.words[(hash % self.text.words.len() as u64) as usize]
    }

    fn logits(&self, token: u32) -> candle_core::Result<Tensor> {
        let mut logits = vec![0f32; self.text.tokenizer.vocab_size()];
        logits[token as usize] = 10.0;
        Tensor::new(logits, &Device::Cpu)
    }
}

impl CausalLm for FakeModel {
    fn forward(&mut self, _ids: &Tensor, _pos: usize) -> candle_core::Result<Tensor> {
        candle_core::bail!("the scheduler feeds slots")
    }

    fn clear_kv_cache(&mut self) {
        self.caches.iter_mut().for_each(Vec::clear);
    }

    fn max_sequences(&self) -> usize {
        self.caches.len()
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.kv_bytes_per_token
    }

    fn forward_slots(
        &mut self,
        steps: &[SlotStep<'_>],
        _device: &Device,
    ) -> candle_core::Result<Vec<Tensor>> {
        let mut fed = Vec::new();
        let mut logits = Vec::new();
        for step in steps {
            let cache = &mut self.caches[step.slot];
            if step.pos == 0 {
                cache.clear();
            }
            if step.pos != cache.len() {
                candle_core::bail!("slot {} fed at {} but holds {}", step.slot, step.pos, cache.len());
            }
            cache.extend_from_slice(step.tokens);
            let token = self.next_token(&self.caches[step.slot]);
            logits.push(self.logits(token)?);
            fed.push(Fed {
                slot: step.slot,
                pos: step.pos,
                tokens: step.tokens.to_vec(),
            });
        }
        self.record.lock().expect("record").passes.push(fed);
        Ok(logits)
    }

    fn release_slot(&mut self, slot: usize) {
        self.caches[slot].clear();
        self.record.lock().expect("record").released.push(slot);
    }
}

fn limits(slots: usize) -> BatchLimits {
    BatchLimits {
        max_sequences: slots,
        kv_budget_bytes: u64::MAX,
        stalled_client_timeout: Duration::from_secs(30),
    }
}

/// A scheduler around `model`, and the record of what the model was asked.
fn new_scheduler(model: FakeModel, limits: BatchLimits) -> (Scheduler, Arc<Mutex<Record>>) {
    let record = model.record.clone();
    let text = test_text();
    let info = ModelInfo {
        arch: Arch::Qwen2,
        dims: Dims {
            vocab: text.tokenizer.vocab_size(),
            hidden: 8,
            intermediate: 16,
            layers: 1,
            heads: 1,
            kv_heads: 1,
            head_dim: 8,
            tie_embeddings: false,
            qkv_bias: false,
            qk_norm: false,
            max_context: 4096,
            mla: None,
        },
        tokenizer: text.tokenizer.clone(),
        template: None,
        eos_ids: vec![text.eos],
        bos_id: None,
        weight_types: BTreeMap::new(),
        tokenizer_source: "the tiny test tokenizer".into(),
    };
    let shared = Arc::new(Shared {
        phase: Mutex::new(Phase::Ready),
        info: OnceLock::new(),
        queued: AtomicUsize::new(0),
        peak_batch: AtomicUsize::new(0),
    });
    let scheduler = Scheduler::new(Box::new(model), Arc::new(info), Device::Cpu, limits, shared);
    (scheduler, record)
}

/// A greedy request of `client` whose prompt is `prompt_len` tokens starting with `marker`
/// (so that its passes can be told apart), and the receiver of its events.
fn job(
    client: &str,
    marker: u32,
    prompt_len: usize,
    max_tokens: usize,
    n: u32,
) -> (Job, mpsc::Receiver<Event>) {
    let (events, receiver) = mpsc::channel(EVENT_BUFFER);
    let mut prompt = vec![marker];
    prompt.extend((1..prompt_len).map(|i| 100 + i as u32));
    let job = Job {
        prompt,
        params: SamplingParams {
            temperature: Some(0.0),
            n,
            ..SamplingParams::default()
        },
        max_tokens,
        seed: 0,
        think_opened: false,
        tool_names: None,
        events,
        client: ClientId::named(client),
        ticket: None,
        span: tracing::Span::none(),
    };
    (job, receiver)
}

/// Turns until nothing runs or waits (at most `limit`).
fn run_until_idle(scheduler: &mut Scheduler, limit: usize) {
    for _ in 0..limit {
        if scheduler.running.is_empty()
            && scheduler.preempted.is_empty()
            && scheduler.starting.is_empty()
            && scheduler.waiting.is_empty()
        {
            return;
        }
        scheduler.turn();
    }
    panic!("still busy after {limit} turns");
}

/// A request's answer as its client saw it.
#[derive(Debug, Default, PartialEq)]
struct Answer {
    /// Text and finish reason per choice.
    choices: BTreeMap<u32, (String, Option<String>)>,
    completion_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    errors: Vec<(ErrorKind, String)>,
}

fn read(receiver: &mut mpsc::Receiver<Event>) -> Answer {
    let mut answer = Answer::default();
    while let Ok(event) = receiver.try_recv() {
        match event {
            Ok(GenerationEvent::Delta(delta)) => {
                let choice = answer.choices.entry(delta.index).or_default();
                choice.0.push_str(delta.content.as_deref().unwrap_or_default());
                if delta.finish_reason.is_some() {
                    choice.1 = delta.finish_reason.map(|reason| reason.to_string());
                }
            }
            Ok(GenerationEvent::Usage(usage)) => {
                answer.completion_tokens = Some(usage.completion_tokens);
                answer.prompt_tokens = Some(usage.prompt_tokens);
            }
            Err(err) => answer.errors.push((err.kind, err.message)),
        }
    }
    answer
}

/// What the passes fed that `matches`, with the number of its pass.
fn fed_where(record: &Record, matches: impl Fn(&Fed) -> bool) -> Vec<(usize, Fed)> {
    record
        .passes
        .iter()
        .enumerate()
        .flat_map(|(n, pass)| pass.iter().filter(|f| matches(f)).map(move |f| (n, f.clone())))
        .collect()
}

/// The finish reason of `answer`'s only choice.
fn finish(answer: &Answer) -> Option<&str> {
    answer.choices.get(&0).and_then(|(_, reason)| reason.as_deref())
}

#[test]
fn running_requests_share_each_forward_pass_and_a_newcomer_joins_at_the_next() {
    let (mut scheduler, record) = new_scheduler(FakeModel::new(2), limits(2));
    let (short, mut short_events) = job("a", 1, 4, 3, 1);
    let (long, mut long_events) = job("b", 2, 4, 8, 1);
    let (late, mut late_events) = job("c", 3, 4, 2, 1);
    scheduler.enqueue(short);
    scheduler.enqueue(long);
    scheduler.turn();
    scheduler.enqueue(late);
    run_until_idle(&mut scheduler, 50);

    let record = record.lock().expect("record");
    let markers = |pass: &Vec<Fed>| -> Vec<u32> {
        pass.iter()
            .map(|f| if f.pos == 0 { f.tokens[0] } else { u32::MAX })
            .collect()
    };
    // Both prompts in the first pass, then one token each per pass while both run.
    assert_eq!(markers(&record.passes[0]), [1, 2]);
    for pass in &record.passes[1..3] {
        assert_eq!(pass.len(), 2, "{pass:?}");
        assert!(pass.iter().all(|f| f.tokens.len() == 1), "{pass:?}");
    }
    // The short one finished after 3 tokens; the late prompt takes its slot in the very next
    // pass, beside the long one's next token.
    let pass = &record.passes[3];
    assert_eq!(pass.len(), 2, "{pass:?}");
    assert!(pass.iter().any(|f| f.pos == 0 && f.tokens[0] == 3), "{pass:?}");
    assert!(pass.iter().any(|f| f.tokens.len() == 1), "{pass:?}");

    assert_eq!(finish(&read(&mut short_events)), Some("length"));
    assert_eq!(finish(&read(&mut long_events)), Some("length"));
    assert_eq!(finish(&read(&mut late_events)), Some("length"));
    assert_eq!(scheduler.shared.peak_batch.load(Ordering::Relaxed), 2);
}

#[test]
fn each_of_n_choices_runs_in_its_own_slot_and_usage_counts_them_all() {
    let (mut scheduler, record) = new_scheduler(FakeModel::new(3), limits(3));
    let (request, mut events) = job("a", 1, 5, 4, 3);
    scheduler.enqueue(request);
    run_until_idle(&mut scheduler, 20);

    let record = record.lock().expect("record");
    let mut slots: Vec<usize> = record.passes[0].iter().map(|f| f.slot).collect();
    slots.sort_unstable();
    assert_eq!(slots, [0, 1, 2], "the prompt goes into three slots in one pass");
    assert!(record.passes[1..].iter().all(|pass| pass.len() == 3));

    let answer = read(&mut events);
    assert_eq!(answer.choices.len(), 3);
    let first = &answer.choices[&0];
    for (text, reason) in answer.choices.values() {
        assert_eq!(reason.as_deref(), Some("length"));
        // Greedy on the same prompt: the same text in every choice.
        assert_eq!((text, reason), (&first.0, &first.1));
    }
    assert_eq!(answer.prompt_tokens, Some(5), "the prompt is counted once");
    assert_eq!(
        answer.completion_tokens,
        Some(12),
        "4 tokens for each of 3 choices"
    );
}

#[test]
fn max_tokens_finishes_with_length_and_end_of_sequence_with_stop() {
    let (mut scheduler, _) = new_scheduler(FakeModel::new(1), limits(1));
    let (request, mut events) = job("a", 1, 4, 5, 1);
    scheduler.enqueue(request);
    run_until_idle(&mut scheduler, 20);
    let answer = read(&mut events);
    assert_eq!(finish(&answer), Some("length"));
    assert_eq!(answer.completion_tokens, Some(5));

    // The model says end-of-sequence once the slot holds 7 tokens: after the prompt's 4
    // and three words.
    let model = FakeModel {
        eos_at: Some(7),
        ..FakeModel::new(1)
    };
    let (mut scheduler, _) = new_scheduler(model, limits(1));
    let (request, mut events) = job("a", 1, 4, 50, 1);
    scheduler.enqueue(request);
    run_until_idle(&mut scheduler, 20);
    let answer = read(&mut events);
    assert_eq!(finish(&answer), Some("stop"));
    assert_eq!(answer.completion_tokens, Some(4), "three words and the end token");
    assert!(!answer.choices[&0].0.is_empty());
    assert!(!answer.choices[&0].0.contains(EOS), "the end token is not text");
}

#[test]
fn a_client_that_leaves_costs_no_further_pass_and_its_slot_goes_to_the_next() {
    let (mut scheduler, record) = new_scheduler(FakeModel::new(1), limits(1));
    let (leaving, leaving_events) = job("a", 1, 4, 100, 1);
    let (next, mut next_events) = job("b", 2, 4, 3, 1);
    scheduler.enqueue(leaving);
    scheduler.enqueue(next);
    for _ in 0..3 {
        scheduler.turn();
    }
    let passes = record.lock().expect("record").passes.len();
    drop(leaving_events);

    scheduler.turn();
    {
        let record = record.lock().expect("record");
        assert_eq!(record.passes.len(), passes, "no compute for a client that left");
        assert_eq!(record.released, [0], "its slot is given back at once");
    }
    assert!(scheduler.running.is_empty());
    assert_eq!(scheduler.free_slots, [0]);

    run_until_idle(&mut scheduler, 20);
    let record = record.lock().expect("record");
    let first_after = &record.passes[passes];
    assert_eq!(first_after[0].tokens[0], 2, "the waiting request starts next");
    assert_eq!(finish(&read(&mut next_events)), Some("length"));
    assert!(scheduler.jobs.is_empty());
}

#[test]
fn a_preempted_sequence_recomputes_its_cache_and_gives_the_answer_it_gives_alone() {
    // Two 6-token prompts fit the 20-token budget; grown by a token per step each, they
    // outgrow it, and the later one is put aside until the first is done.
    let budget = BatchLimits {
        kv_budget_bytes: 20,
        ..limits(2)
    };
    let (mut scheduler, record) = new_scheduler(FakeModel::new(2), budget);
    let (first, mut first_events) = job("a", 1, 6, 10, 1);
    let (second, mut second_events) = job("b", 2, 6, 10, 1);
    scheduler.enqueue(first);
    scheduler.enqueue(second);
    run_until_idle(&mut scheduler, 100);

    let record = record.lock().expect("record");
    assert_eq!(record.passes[0].len(), 2, "both prompts fit the budget at first");
    let second_slot = record.passes[0][1].slot;
    let recomputed: Vec<(usize, Fed)> = fed_where(&record, |f| f.pos == 0 && f.tokens[0] == 2)
        .into_iter()
        .skip(1)
        .collect();
    assert_eq!(
        recomputed.len(),
        1,
        "preempted once, then fed again from position 0"
    );
    let (pass, refeed) = &recomputed[0];
    assert!(refeed.tokens.len() > 6, "prompt and generated tokens: {refeed:?}");
    assert!(record.released.contains(&second_slot));
    assert!(
        record.passes[..*pass].iter().any(|p| p.len() == 1),
        "the first ran alone in between"
    );
    let first_answer = read(&mut first_events);
    let second_answer = read(&mut second_events);
    assert!(first_answer.errors.is_empty() && second_answer.errors.is_empty());
    assert_eq!(finish(&second_answer), Some("length"));
    assert_eq!(second_answer.completion_tokens, Some(10));

    let (mut alone, _) = new_scheduler(FakeModel::new(2), limits(2));
    let (second, mut alone_events) = job("b", 2, 6, 10, 1);
    alone.enqueue(second);
    run_until_idle(&mut alone, 100);
    assert_eq!(read(&mut alone_events), second_answer);
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_while_a_stream_keeps_decoding() {
    let (mut scheduler, record) = new_scheduler(FakeModel::new(2), limits(2));
    let (stream, mut stream_events) = job("a", 1, 4, 20, 1);
    scheduler.enqueue(stream);
    scheduler.turn();
    scheduler.turn();
    let long_prompt = 2 * PREFILL_CHUNK + 100;
    let (long, mut long_events) = job("b", 2, long_prompt, 2, 1);
    scheduler.enqueue(long);
    for _ in 0..3 {
        scheduler.turn();
    }

    let record = record.lock().expect("record");
    let chunks: Vec<(usize, usize)> = record.passes[2..5]
        .iter()
        .map(|pass| {
            let stream = pass.iter().find(|f| f.slot == record.passes[0][0].slot);
            let prompt = pass.iter().find(|f| f.slot != record.passes[0][0].slot);
            assert_eq!(stream.map(|f| f.tokens.len()), Some(1), "{pass:?}");
            prompt.map_or((0, 0), |f| (f.pos, f.tokens.len()))
        })
        .collect();
    assert_eq!(
        chunks,
        [
            (0, PREFILL_CHUNK),
            (PREFILL_CHUNK, PREFILL_CHUNK),
            (2 * PREFILL_CHUNK, 100)
        ]
    );
    drop(record);
    run_until_idle(&mut scheduler, 50);
    assert_eq!(finish(&read(&mut stream_events)), Some("length"));
    assert_eq!(finish(&read(&mut long_events)), Some("length"));
}

#[test]
fn waiting_requests_start_in_turn_across_clients() {
    let (mut scheduler, record) = new_scheduler(FakeModel::new(1), limits(1));
    let mut receivers = Vec::new();
    for (client, marker) in [("a", 1), ("a", 2), ("a", 3), ("b", 4)] {
        let (request, events) = job(client, marker, 3, 2, 1);
        scheduler.enqueue(request);
        receivers.push(events);
    }
    run_until_idle(&mut scheduler, 50);

    let record = record.lock().expect("record");
    let starts: Vec<u32> = fed_where(&record, |f| f.pos == 0)
        .into_iter()
        .map(|(_, f)| f.tokens[0])
        .collect();
    assert_eq!(starts, [1, 4, 2, 3], "b's one request goes before a's second");
    for events in &mut receivers {
        assert_eq!(finish(&read(events)), Some("length"));
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_loses_its_slot_after_the_stall_timeout() {
    let timeout = Duration::from_secs(10);
    let limits = BatchLimits {
        stalled_client_timeout: timeout,
        ..limits(1)
    };
    let (mut scheduler, record) = new_scheduler(FakeModel::new(1), limits);
    let (stalled, mut stalled_events) = job("a", 1, 3, 1000, 1);
    let (next, mut next_events) = job("b", 2, 3, 3, 1);
    scheduler.enqueue(stalled);
    scheduler.enqueue(next);
    // The reader takes nothing: its channel fills, then its sequence waits.
    for _ in 0..EVENT_BUFFER + 10 {
        scheduler.turn();
    }
    let passes = record.lock().expect("record").passes.len();
    assert!(
        passes <= EVENT_BUFFER + 2,
        "it paused once its events backed up: {passes}"
    );

    tokio::time::advance(timeout - Duration::from_millis(1)).await;
    scheduler.turn();
    assert_eq!(scheduler.running.len(), 1, "not before the timeout");
    assert_eq!(record.lock().expect("record").passes.len(), passes);

    tokio::time::advance(Duration::from_millis(1)).await;
    run_until_idle(&mut scheduler, 20);
    assert_eq!(record.lock().expect("record").released[0], 0);
    assert_eq!(finish(&read(&mut next_events)), Some("length"));

    // Should it read again, it finds what its channel held, then the timeout error.
    let held = read(&mut stalled_events);
    assert!(held.errors.is_empty());
    assert_eq!(finish(&held), None);
    scheduler.flush_draining();
    let rest = read(&mut stalled_events);
    assert!(
        matches!(
            rest.errors.as_slice(),
            [(kind, _)] if *kind == ErrorKind::Timeout(TimeoutPhase::Idle)
        ),
        "{rest:?}"
    );
}
