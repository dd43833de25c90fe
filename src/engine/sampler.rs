//! Next-token choice: temperature, top-k, top-p and a seeded RNG (candle's
//! `LogitsProcessor`), with repetition, presence and frequency penalties applied first.
//! Greedy when the temperature is 0, which is deterministic.

use std::collections::HashMap;

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::backend::SamplingParams;

/// OpenAI's default temperature when the request gives none.
const DEFAULT_TEMPERATURE: f64 = 1.0;

/// Samples one sequence's tokens.
pub struct Sampler {
    processor: LogitsProcessor,
    penalties: Penalties,
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

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("penalties", &self.penalties)
            .finish_non_exhaustive()
    }
}

/// The candle sampling mode for validated request parameters.
pub fn sampling_mode(params: &SamplingParams) -> Sampling {
    let temperature = params.temperature.map_or(DEFAULT_TEMPERATURE, f64::from);
    if temperature <= 0.0 {
        return Sampling::ArgMax;
    }
    let k = params.top_k.filter(|k| *k > 0).map(|k| k as usize);
    let p = params.top_p.map(f64::from).filter(|p| *p < 1.0);
    match (k, p) {
        (Some(1), _) => Sampling::ArgMax,
        (None, None) => Sampling::All { temperature },
        (Some(k), None) => Sampling::TopK { k, temperature },
        (None, Some(p)) => Sampling::TopP { p, temperature },
        (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
    }
}

impl Sampler {
    /// `seed` is the request's, or a random one when it gave none.
    pub fn new(params: &SamplingParams, seed: u64, prompt: &[u32]) -> Sampler {
        Sampler {
            processor: LogitsProcessor::from_sampling(seed, sampling_mode(params)),
            penalties: Penalties {
                repetition: params.repetition_penalty.unwrap_or(1.0),
                presence: params.presence_penalty.unwrap_or(0.0),
                frequency: params.frequency_penalty.unwrap_or(0.0),
                seen: prompt.iter().map(|&t| (t, ())).collect(),
                generated: HashMap::new(),
            },
        }
    }

    /// Choose the next token from `logits` (shape `[vocab]`, any float dtype).
    pub fn sample(&mut self, logits: &Tensor) -> candle_core::Result<u32> {
        let logits = logits.to_dtype(candle_core::DType::F32)?;
        // Penalties act on logits, before temperature and truncation (candle's
        // `sample_f` hook sees probabilities, and not at all when greedy).
        let token = if self.penalties.active() {
            let mut values = logits.to_vec1::<f32>()?;
            self.penalties.apply(&mut values);
            let penalized = Tensor::from_vec(values, logits.shape(), logits.device())?;
            self.processor.sample(&penalized)?
        } else {
            self.processor.sample(&logits)?
        };
        self.penalties.seen.insert(token, ());
        *self.penalties.generated.entry(token).or_default() += 1;
        Ok(token)
    }
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
        assert!(matches!(sampling_mode(&greedy), Sampling::ArgMax));
        let top_p = SamplingParams {
            temperature: Some(0.7),
            top_p: Some(0.9),
            ..SamplingParams::default()
        };
        assert!(matches!(sampling_mode(&top_p), Sampling::TopP { .. }));
        assert!(matches!(
            sampling_mode(&SamplingParams::default()),
            Sampling::All { .. }
        ));
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
