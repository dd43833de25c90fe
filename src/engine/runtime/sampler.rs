//! Next-token choice: temperature, top-k, top-p and a seeded RNG, with repetition, presence
//! and frequency penalties applied first. Greedy when the temperature is 0, which is
//! deterministic.
//!
//! Truncation never sorts the vocabulary (candle's `LogitsProcessor` sorts every logit for
//! top-p, a cost paid per token). Only tokens within `CANDIDATE_SPAN` of the best
//! logit are considered when their mass already covers top-p (exact, see
//! `Sampler::candidates`), and the nucleus is found by a mass-weighted selection in
//! linear time.

use std::collections::HashMap;

use candle_core::Tensor;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::backend::SamplingParams;

/// OpenAI's default temperature when the request gives none.
const DEFAULT_TEMPERATURE: f32 = 1.0;

/// Tokens whose temperature-scaled logit is within this of the best are the first
/// candidates for top-k/top-p (each weighs at least e^-12 ≈ 6e-6 of the best token).
const CANDIDATE_SPAN: f32 = 12.0;

/// Temperatures below this sample greedily. Scaling by `1 / T` overflows `f32` for a tiny
/// `T` (at 1e-45 every logit becomes infinite), and long before that the
/// draw is the argmax in all but exact ties (at 1e-4 a logit 0.01 behind weighs e^-100).
const MIN_TEMPERATURE: f32 = 1e-4;

/// The repetition penalty is clamped into this range, where dividing or multiplying a
/// logit (at most a few hundred) stays finite and non-zero. The API refuses values
/// outside a narrower range; this guards every other caller.
const REPETITION_PENALTY_RANGE: (f32, f32) = (1e-6, 1e6);

/// Below this many tokens the nucleus search just sorts.
const SORT_BELOW: usize = 64;

/// How a token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplingMode {
    Greedy,
    Sample {
        temperature: f32,
        /// Keep only the `k` most likely tokens.
        top_k: Option<usize>,
        /// Keep the fewest most likely tokens whose probability sums to at least `p`.
        top_p: Option<f32>,
    },
}

/// The sampling mode for validated request parameters.
pub fn sampling_mode(params: &SamplingParams) -> SamplingMode {
    let temperature = params.temperature.unwrap_or(DEFAULT_TEMPERATURE);
    let top_k = params.top_k.filter(|k| *k > 0).map(|k| k as usize);
    // A NaN temperature is greedy too.
    if temperature.is_nan() || temperature < MIN_TEMPERATURE || top_k == Some(1) {
        return SamplingMode::Greedy;
    }
    SamplingMode::Sample {
        temperature,
        top_k,
        top_p: params.top_p.filter(|p| *p < 1.0),
    }
}

/// Samples one sequence's tokens.
#[derive(Debug)]
pub struct Sampler {
    mode: SamplingMode,
    rng: StdRng,
    penalties: Penalties,
    /// Reused per step: the vocabulary's scaled logits, then weights.
    weights: Vec<f32>,
    /// Reused per step: (weight, token) of the candidates.
    candidates: Vec<(f32, u32)>,
}

/// Penalty settings and the token counts they apply to.
#[derive(Debug)]
struct Penalties {
    repetition: f32,
    presence: f32,
    frequency: f32,
    /// Prompt and generated tokens, for the repetition penalty (as vLLM does).
    seen: HashMap<u32, ()>,
    /// Generated tokens only, for presence/frequency (as OpenAI defines them).
    generated: HashMap<u32, u32>,
}

impl Sampler {
    /// `seed` is the request's, or a random one when it gave none.
    pub fn new(params: &SamplingParams, seed: u64, prompt: &[u32]) -> Sampler {
        Sampler {
            mode: sampling_mode(params),
            rng: StdRng::seed_from_u64(seed),
            penalties: Penalties {
                repetition: repetition_penalty(params.repetition_penalty),
                presence: params.presence_penalty.unwrap_or(0.0),
                frequency: params.frequency_penalty.unwrap_or(0.0),
                seen: prompt.iter().map(|&t| (t, ())).collect(),
                generated: HashMap::new(),
            },
            weights: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// Choose the next token from `logits` (shape `[vocab]`, any float dtype).
    pub fn sample(&mut self, logits: &Tensor) -> candle_core::Result<u32> {
        read_logits(logits, &mut self.weights)?;
        // Penalties act on logits, before temperature and truncation.
        if self.penalties.active() {
            self.penalties.apply(&mut self.weights);
        }
        let token = match self.mode {
            SamplingMode::Greedy => greedy(&self.weights),
            SamplingMode::Sample {
                temperature,
                top_k,
                top_p,
            } => self.draw(temperature, top_k, top_p),
        };
        let Some(token) = token else {
            candle_core::bail!("no token can be sampled: every logit is NaN or -inf");
        };
        self.penalties.seen.insert(token, ());
        *self.penalties.generated.entry(token).or_default() += 1;
        Ok(token)
    }

    /// Temperature, then top-k, then top-p on what top-k kept (as Hugging Face and vLLM
    /// order them), then one draw.
    fn draw(&mut self, temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> Option<u32> {
        let inverse = 1.0 / temperature;
        // Loops over the whole vocabulary are written lane by lane so they vectorize (libm's
        // exp and one running sum do not).
        let mut lanes = [f32::NEG_INFINITY; LANES];
        for chunk in self.weights.chunks_mut(LANES) {
            for (lane, w) in lanes.iter_mut().zip(chunk) {
                // NaN never wins and never gets mass.
                *w = if w.is_nan() {
                    f32::NEG_INFINITY
                } else {
                    *w * inverse
                };
                *lane = lane.max(*w);
            }
        }
        let best = lanes.into_iter().fold(f32::NEG_INFINITY, f32::max);
        if !best.is_finite() {
            return None;
        }
        let mut sums = [0f64; LANES];
        for chunk in self.weights.chunks_mut(LANES) {
            for (sum, w) in sums.iter_mut().zip(chunk) {
                *w = exp_nonpositive(*w - best);
                *sum += f64::from(*w);
            }
        }
        let total: f64 = sums.iter().sum();
        if top_k.is_none() && top_p.is_none() {
            let target = self.rng.random::<f64>() * total;
            return Some(walk(self.weights.iter().copied().enumerate(), target));
        }
        self.candidates(top_k, top_p, total);
        let mut kept = self.candidates.as_mut_slice();
        if let Some(k) = top_k
            && k < kept.len()
        {
            kept.select_nth_unstable_by(k - 1, by_weight_descending);
            kept = &mut kept[..k];
        }
        if let Some(p) = top_p {
            let mass: f64 = kept.iter().map(|(w, _)| f64::from(*w)).sum();
            let n = nucleus(kept, f64::from(p) * mass);
            kept = &mut kept[..n];
        }
        let mass: f64 = kept.iter().map(|(w, _)| f64::from(*w)).sum();
        let target = self.rng.random::<f64>() * mass;
        Some(walk(kept.iter().map(|&(w, t)| (t as usize, w)), target))
    }

    /// Fill `candidates` with the tokens top-k and top-p can keep. Those within
    /// [`CANDIDATE_SPAN`] of the best logit are enough when they hold top-p's mass (the
    /// nucleus takes the most likely tokens first and stops once it has that mass, so it
    /// never reaches past them) and number at least k; otherwise the whole vocabulary.
    fn candidates(&mut self, top_k: Option<usize>, top_p: Option<f32>, total: f64) {
        let floor = (-CANDIDATE_SPAN).exp();
        self.candidates.clear();
        let mut mass = 0f64;
        for (token, &w) in self.weights.iter().enumerate() {
            if w >= floor {
                self.candidates.push((w, token as u32));
                mass += f64::from(w);
            }
        }
        let enough_mass = top_p.is_some_and(|p| mass >= f64::from(p) * total);
        let enough_tokens = top_k.is_some_and(|k| self.candidates.len() >= k);
        let covered = match (top_k, top_p) {
            (Some(_), Some(_)) => enough_mass && enough_tokens,
            (Some(_), None) => enough_tokens,
            _ => enough_mass,
        };
        if !covered {
            self.candidates.clear();
            self.candidates
                .extend(self.weights.iter().enumerate().map(|(t, &w)| (w, t as u32)));
        }
    }
}

/// The repetition penalty to apply: 1 (none) when unset or NaN, else clamped into
/// [`REPETITION_PENALTY_RANGE`].
fn repetition_penalty(requested: Option<f32>) -> f32 {
    let (low, high) = REPETITION_PENALTY_RANGE;
    match requested {
        Some(p) if !p.is_nan() => p.clamp(low, high),
        _ => 1.0,
    }
}

/// Values per step of the vectorized loops over the vocabulary.
const LANES: usize = 16;

/// e^x for x ≤ 0, within about 2 ulp of `f32::exp`, without branches so a loop of it
/// vectorizes (libm's `expf` is one call per value). Below -87 (e^-87 ≈ 1.6e-38, nothing
/// next to the best token's 1) and for -inf the weight is exactly 0. Cephes' `expf`:
/// e^x = 2^n · e^r with n = round(x / ln 2) and |r| ≤ ln 2 / 2, e^r by a polynomial.
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n · LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.max(-87.0);
    let n = (clamped * LOG2_E).round_ties_even();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^n for n in -126..=0, straight into the exponent bits.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 { 0.0 } else { e_r * scale }
}

/// Copy the step's logits into `into`, reusing its memory: a fresh 600 KB vector per
/// token (151k logits) was mapped and faulted in page by page, most of the sampler's time.
fn read_logits(logits: &Tensor, into: &mut Vec<f32>) -> candle_core::Result<()> {
    into.clear();
    if logits.dtype() == candle_core::DType::F32 && logits.device().is_cpu() {
        let (storage, layout) = logits.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets())
        {
            into.extend_from_slice(cpu.as_slice::<f32>()?.get(start..end).unwrap_or_default());
            if into.len() == logits.elem_count() {
                return Ok(());
            }
            into.clear();
        }
    }
    let values = logits
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    into.extend_from_slice(&values);
    Ok(())
}

/// The first index of the largest logit; NaN and -inf never win.
fn greedy(logits: &[f32]) -> Option<u32> {
    // The maximum lane by lane, so it vectorizes (`f32::max` skips NaN), then the first
    // place it occurs.
    let chunks = logits.chunks_exact(LANES);
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for v in chunks.remainder() {
        lanes[0] = lanes[0].max(*v);
    }
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(*v);
        }
    }
    let best = lanes.into_iter().fold(f32::NEG_INFINITY, f32::max);
    if best == f32::NEG_INFINITY {
        return None;
    }
    logits.iter().position(|v| *v == best).map(|i| i as u32)
}

fn by_weight_descending(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The token where the running sum of weights passes `target` (the last one with weight
/// when rounding leaves `target` just beyond the sum).
fn walk(weights: impl Iterator<Item = (usize, f32)>, target: f64) -> u32 {
    let mut sum = 0f64;
    let mut last = 0;
    for (token, w) in weights {
        if w <= 0.0 {
            continue;
        }
        sum += f64::from(w);
        last = token;
        if sum > target {
            break;
        }
    }
    last as u32
}

/// Reorder `items` so that its first n are the fewest heaviest whose weights sum to at
/// least `need`, and return n (at least 1). Selection halves the range each round, so this
/// is linear in the vocabulary instead of a sort; ties go to the lower token id.
fn nucleus(items: &mut [(f32, u32)], need: f64) -> usize {
    let (mut lo, mut hi, mut need) = (0, items.len(), need);
    while hi - lo > SORT_BELOW {
        let range = &mut items[lo..hi];
        let mid = range.len() / 2;
        range.select_nth_unstable_by(mid, by_weight_descending);
        let upper: f64 = range[..=mid].iter().map(|(w, _)| f64::from(*w)).sum();
        if upper >= need {
            hi = lo + mid + 1;
        } else {
            need -= upper;
            lo += mid + 1;
        }
    }
    let rest = &mut items[lo..hi];
    rest.sort_unstable_by(by_weight_descending);
    let mut sum = 0f64;
    for (i, (w, _)) in rest.iter().enumerate() {
        sum += f64::from(*w);
        if sum >= need {
            return (lo + i + 1).max(1);
        }
    }
    hi.max(1)
}

impl Penalties {
    fn active(&self) -> bool {
        self.repetition != 1.0 || self.presence != 0.0 || self.frequency != 0.0
    }

    fn apply(&self, values: &mut [f32]) {
        if self.repetition != 1.0 {
            for &token in self.seen.keys() {
                if let Some(v) = values.get_mut(token as usize) {
                    // CTRL's rule: shrink positive logits, grow negative ones.
                    *v = if *v >= 0.0 {
                        *v / self.repetition
                    } else {
                        *v * self.repetition
                    };
                }
            }
        }
        for (&token, &count) in &self.generated {
            if let Some(v) = values.get_mut(token as usize) {
                *v -= self.presence + self.frequency * count as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn logits(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).expect("tensor")
    }

    #[test]
    fn temperature_zero_is_greedy_and_modes_map() {
        let greedy = SamplingParams {
            temperature: Some(0.0),
            ..SamplingParams::default()
        };
        assert_eq!(sampling_mode(&greedy), SamplingMode::Greedy);
        let top_p = SamplingParams {
            temperature: Some(0.7),
            top_p: Some(0.9),
            ..SamplingParams::default()
        };
        assert_eq!(
            sampling_mode(&top_p),
            SamplingMode::Sample {
                temperature: 0.7,
                top_k: None,
                top_p: Some(0.9)
            }
        );
        assert_eq!(
            sampling_mode(&SamplingParams::default()),
            SamplingMode::Sample {
                temperature: 1.0,
                top_k: None,
                top_p: None
            }
        );
        let mut sampler = Sampler::new(&greedy, 1, &[]);
        assert_eq!(sampler.sample(&logits(&[0.1, 3.0, 0.2])).expect("sample"), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let params = SamplingParams {
            temperature: Some(1.0),
            ..SamplingParams::default()
        };
        let l = logits(&[1.0, 1.1, 0.9, 1.05, 0.95]);
        let run = |seed| {
            let mut s = Sampler::new(&params, seed, &[]);
            (0..20).map(|_| s.sample(&l).expect("sample")).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(
            run(42),
            run(43),
            "different seeds differ (20 draws over 5 tokens)"
        );
    }

    /// The nucleus by the definition: sort everything, keep the shortest prefix with mass p.
    fn nucleus_by_sorting(weights: &[f32], p: f64) -> Vec<u32> {
        let mut items: Vec<(f32, u32)> = weights.iter().enumerate().map(|(t, &w)| (w, t as u32)).collect();
        items.sort_by(by_weight_descending);
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let mut sum = 0.0;
        let mut kept = Vec::new();
        for (w, t) in items {
            sum += f64::from(w);
            kept.push(t);
            if sum >= p * total {
                break;
            }
        }
        kept.sort_unstable();
        kept
    }

    #[test]
    fn nucleus_selection_equals_sorting() {
        let mut rng = StdRng::seed_from_u64(7);
        for size in [1, 5, 63, 64, 65, 300, 5000] {
            for p in [0.0, 0.1, 0.5, 0.9, 0.999] {
                let weights: Vec<f32> = (0..size).map(|_| rng.random::<f32>().powi(4)).collect();
                let mut items: Vec<(f32, u32)> =
                    weights.iter().enumerate().map(|(t, &w)| (w, t as u32)).collect();
                let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
                let n = nucleus(&mut items, p * total);
                let mut got: Vec<u32> = items[..n].iter().map(|&(_, t)| t).collect();
                got.sort_unstable();
                assert_eq!(got, nucleus_by_sorting(&weights, p), "size {size}, p {p}");
            }
        }
    }

    /// Draw counts of a seeded sampler over `logits`.
    fn histogram(params: &SamplingParams, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut sampler = Sampler::new(params, 11, &[]);
        let tensor = Tensor::new(logits, &Device::Cpu).expect("tensor");
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(&tensor).expect("sample") as usize] += 1;
        }
        counts
    }

    #[test]
    fn draws_follow_the_truncated_distribution() {
        // Probabilities at temperature 1: 0.5, 0.25, 0.125, 0.0625, 0.0625.
        let logits: Vec<f32> = [8.0f32, 4.0, 2.0, 1.0, 1.0].iter().map(|w| w.ln()).collect();
        let draws = 40_000;
        let expect = |counts: &[usize], probs: &[f64]| {
            for (i, (&c, &p)) in counts.iter().zip(probs).enumerate() {
                let share = c as f64 / draws as f64;
                assert!(
                    (share - p).abs() < 0.01,
                    "token {i}: {share} drawn, {p} expected ({counts:?})"
                );
            }
        };
        let all = SamplingParams {
            temperature: Some(1.0),
            ..SamplingParams::default()
        };
        expect(
            &histogram(&all, &logits, draws),
            &[0.5, 0.25, 0.125, 0.0625, 0.0625],
        );
        // top_p 0.7 keeps 0.5 + 0.25 (0.75 ≥ 0.7), renormalised.
        let top_p = SamplingParams {
            top_p: Some(0.7),
            ..all.clone()
        };
        expect(
            &histogram(&top_p, &logits, draws),
            &[2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0, 0.0],
        );
        // top_k 3 keeps 0.5, 0.25, 0.125; top_p 0.9 of those keeps all three (0.857 < 0.9).
        let both = SamplingParams {
            top_k: Some(3),
            top_p: Some(0.9),
            ..all.clone()
        };
        expect(
            &histogram(&both, &logits, draws),
            &[4.0 / 7.0, 2.0 / 7.0, 1.0 / 7.0, 0.0, 0.0],
        );
        // Temperature 0.5 squares the odds: 64:16:4:1:1.
        let cold = SamplingParams {
            temperature: Some(0.5),
            ..SamplingParams::default()
        };
        let z = 86.0;
        expect(
            &histogram(&cold, &logits, draws),
            &[64.0 / z, 16.0 / z, 4.0 / z, 1.0 / z, 1.0 / z],
        );
    }

    #[test]
    fn a_large_vocabulary_takes_the_candidate_shortcut_exactly() {
        // A peaked 151k vocabulary: a few plausible tokens, the rest far below.
        let mut logits = vec![-20.0f32; 151_936];
        for (t, v) in [(17usize, 5.0f32), (90_000, 4.5), (3, 4.0), (151_000, 1.0)] {
            logits[t] = v;
        }
        let params = SamplingParams {
            temperature: Some(1.0),
            top_p: Some(0.95),
            ..SamplingParams::default()
        };
        let counts = histogram(&params, &logits, 2_000);
        let weights: Vec<f32> = logits.iter().map(|&l| (l - 5.0).exp()).collect();
        let nucleus = nucleus_by_sorting(&weights, 0.95);
        for (token, &count) in counts.iter().enumerate() {
            if count > 0 {
                assert!(
                    nucleus.contains(&(token as u32)),
                    "token {token} is outside the nucleus {nucleus:?}"
                );
            }
        }
        assert!(counts[17] > counts[3] && counts[3] > 0, "{:?}", &counts[..20]);
    }

    #[test]
    fn fast_exp_is_within_two_ulp_of_exp() {
        let mut worst = 0f64;
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = -87.0 * i as f32 / steps as f32;
            let exact = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            worst = worst.max(((got - exact) / exact).abs());
        }
        // One f32 ulp is 2^-23 ≈ 1.2e-7 relative.
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-87.5), 0.0);
        assert_eq!(exp_nonpositive(-1e30), 0.0);
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_skips_nan() {
        fn reference(logits: &[f32]) -> Option<u32> {
            let mut best: Option<(usize, f32)> = None;
            for (i, &v) in logits.iter().enumerate() {
                if !v.is_nan() && v != f32::NEG_INFINITY && best.is_none_or(|(_, b)| v > b) {
                    best = Some((i, v));
                }
            }
            best.map(|(i, _)| i as u32)
        }
        let mut rng = StdRng::seed_from_u64(7);
        let specials = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, 3.0, -0.0, 0.0];
        for len in [0, 1, 5, 15, 16, 17, 33, 151_936] {
            for _ in 0..20 {
                let logits: Vec<f32> = (0..len)
                    .map(|_| match rng.random_range(0..10) {
                        0 => specials[rng.random_range(0..specials.len())],
                        _ => f32::from(rng.random_range(-8i8..=3)),
                    })
                    .collect();
                assert_eq!(greedy(&logits), reference(&logits), "{logits:?}");
            }
        }
        assert_eq!(greedy(&[f32::NAN, f32::NEG_INFINITY]), None);
    }

    #[test]
    fn nan_logits_are_never_chosen() {
        let l = logits(&[f32::NAN, 1.0, f32::NAN, 0.5]);
        let greedy = SamplingParams {
            temperature: Some(0.0),
            ..SamplingParams::default()
        };
        assert_eq!(Sampler::new(&greedy, 1, &[]).sample(&l).expect("sample"), 1);
        let hot = SamplingParams {
            temperature: Some(1.0),
            top_p: Some(0.9),
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(&hot, 1, &[]);
        for _ in 0..50 {
            let token = sampler.sample(&l).expect("sample");
            assert!(token == 1 || token == 3, "{token}");
        }
        let none = logits(&[f32::NAN, f32::NEG_INFINITY]);
        let err = Sampler::new(&hot, 1, &[])
            .sample(&none)
            .expect_err("nothing to draw");
        assert!(err.to_string().contains("NaN or -inf"), "{err}");
        assert!(Sampler::new(&greedy, 1, &[]).sample(&none).is_err());
    }

    #[test]
    fn tiny_temperatures_and_penalties_still_sample() {
        // 1e-45 made `1 / T` and `logit / penalty` infinite: no token, a 500.
        let logits = logits(&[0.5, 2.0, -1.0, 1.0]);
        for params in [
            SamplingParams {
                temperature: Some(1e-45),
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: Some(1.0),
                repetition_penalty: Some(1e-45),
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: Some(0.0),
                repetition_penalty: Some(f32::MAX),
                ..SamplingParams::default()
            },
        ] {
            let mut sampler = Sampler::new(&params, 3, &[0, 1, 2, 3]);
            assert!(sampler.sample(&logits).is_ok(), "{params:?}");
        }
        assert_eq!(
            sampling_mode(&SamplingParams {
                temperature: Some(1e-45),
                ..SamplingParams::default()
            }),
            SamplingMode::Greedy
        );
    }

    #[test]
    fn penalties_change_the_greedy_choice() {
        let frequency = SamplingParams {
            temperature: Some(0.0),
            frequency_penalty: Some(2.0),
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(&frequency, 1, &[]);
        let l = logits(&[2.0, 1.5, 0.0]);
        assert_eq!(sampler.sample(&l).expect("sample"), 0);
        assert_eq!(sampler.sample(&l).expect("sample"), 1, "token 0 now costs 2.0");

        let repetition = SamplingParams {
            temperature: Some(0.0),
            repetition_penalty: Some(2.0),
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(&repetition, 1, &[0]);
        assert_eq!(sampler.sample(&l).expect("sample"), 1, "2.0 / 2 < 1.5");
    }
}
