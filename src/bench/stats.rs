//! Figures of one phase: HDR histograms of TTFT, inter-token and end-to-end latency (in
//! microseconds, 3 significant digits), exact summaries of the raw latencies, token sums
//! and failures by kind.

use std::{collections::BTreeMap, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::client::{FailureKind, Sample};

/// Significant decimal digits kept by the histograms: values are exact to 0.1 %.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Mean, median, extremes and spread of raw values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Sample standard deviation (n − 1); 0 for fewer than two values.
    pub stdev: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Summary {
        if values.is_empty() {
            return Summary::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let stdev = if n > 1 {
            (sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Summary {
            count: n,
            mean,
            median,
            min: sorted[0],
            max: sorted[n - 1],
            stdev,
        }
    }
}

/// Percentiles in milliseconds, read from a histogram.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// A histogram as its recorded values: `[microseconds, count]` pairs, lossless within the
/// histogram's precision and readable without a decoder.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RawHistogram {
    pub unit: &'static str,
    pub significant_digits: u8,
    pub values: Vec<[u64; 2]>,
}

/// Latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct LatencyHistogram(Histogram<u64>);

impl LatencyHistogram {
    pub fn new() -> LatencyHistogram {
        // Auto-resizing: a stall of any length is recorded rather than dropped.
        let mut histogram = Histogram::new(SIGNIFICANT_DIGITS).unwrap_or_else(|_| unreachable_histogram());
        histogram.auto(true);
        LatencyHistogram(histogram)
    }

    pub fn record(&mut self, value: Duration) {
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX).max(1);
        // With auto-resize on, recording cannot fail.
        let _ = self.0.record(micros);
    }

    pub fn percentiles(&self) -> Percentiles {
        let h = &self.0;
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            min_ms: ms(h.min()),
            max_ms: ms(h.max()),
        }
    }

    pub fn raw(&self) -> RawHistogram {
        RawHistogram {
            unit: "microseconds",
            significant_digits: SIGNIFICANT_DIGITS,
            values: self
                .0
                .iter_recorded()
                .map(|v| [v.value_iterated_to(), v.count_at_value()])
                .collect(),
        }
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram::new()
    }
}

/// 3 significant digits is always a valid precision, so construction cannot fail; this
/// keeps the type total without an `unwrap`.
fn unreachable_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 2, 1).unwrap_or_else(|_| unreachable!("1..2 at 1 digit is valid"))
}

/// Failures by kind, every kind present (0 when none) so tables line up.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FailureCounts(pub BTreeMap<FailureKind, u64>);

impl FailureCounts {
    pub fn get(&self, kind: FailureKind) -> u64 {
        self.0.get(&kind).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// Collects one phase's samples as they arrive.
#[derive(Debug, Clone, Default)]
pub struct PhaseRecorder {
    ttft: LatencyHistogram,
    inter_token: LatencyHistogram,
    end_to_end: LatencyHistogram,
    latencies_ms: Vec<f64>,
    stream_rates: Vec<f64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    successes: u64,
    failures: FailureCounts,
}

impl PhaseRecorder {
    pub fn record(&mut self, outcome: &Result<Sample, FailureKind>) {
        match outcome {
            Ok(sample) => {
                self.successes += 1;
                self.ttft.record(sample.ttft);
                for gap in &sample.inter_token {
                    self.inter_token.record(*gap);
                }
                self.end_to_end.record(sample.end_to_end);
                self.latencies_ms.push(sample.end_to_end.as_secs_f64() * 1000.0);
                if let Some(rate) = sample.decode_tokens_per_sec() {
                    self.stream_rates.push(rate);
                }
                self.prompt_tokens += sample.prompt_tokens;
                self.completion_tokens += sample.completion_tokens;
            }
            Err(kind) => *self.failures.0.entry(*kind).or_default() += 1,
        }
    }

    pub fn requests(&self) -> u64 {
        self.successes + self.failures.total()
    }

    /// The phase's figures, given how long it ran.
    pub fn finish(&self, concurrency: usize, wall: Duration) -> PhaseResult {
        let requests = self.requests();
        let secs = wall.as_secs_f64();
        let per_sec = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let mut failures = self.failures.clone();
        for kind in FailureKind::ALL {
            failures.0.entry(kind).or_default();
        }
        PhaseResult {
            concurrency,
            requests,
            successes: self.successes,
            success_rate: if requests == 0 {
                0.0
            } else {
                self.successes as f64 / requests as f64
            },
            failures,
            wall_seconds: secs,
            requests_per_sec: per_sec(self.successes),
            output_tokens_per_sec: per_sec(self.completion_tokens),
            total_tokens_per_sec: per_sec(self.completion_tokens + self.prompt_tokens),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            latency_ms: Summary::of(&self.latencies_ms),
            ttft: self.ttft.percentiles(),
            inter_token: self.inter_token.percentiles(),
            end_to_end: self.end_to_end.percentiles(),
            stream_tokens_per_sec: Summary::of(&self.stream_rates),
            histograms: PhaseHistograms {
                ttft: self.ttft.raw(),
                inter_token: self.inter_token.raw(),
                end_to_end: self.end_to_end.raw(),
            },
        }
    }
}

/// Every figure of one phase (a stability run, or one concurrency level of the sweep).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseResult {
    pub concurrency: usize,
    pub requests: u64,
    pub successes: u64,
    pub success_rate: f64,
    pub failures: FailureCounts,
    pub wall_seconds: f64,
    /// Successful requests per second of wall time.
    pub requests_per_sec: f64,
    /// Output (completion) tokens of successful requests per second of wall time.
    pub output_tokens_per_sec: f64,
    /// Input plus output tokens per second of wall time.
    pub total_tokens_per_sec: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// End-to-end latency of successful requests, exact (not from the histogram).
    pub latency_ms: Summary,
    pub ttft: Percentiles,
    pub inter_token: Percentiles,
    pub end_to_end: Percentiles,
    /// Decode rate of each stream after its first token.
    pub stream_tokens_per_sec: Summary,
    pub histograms: PhaseHistograms,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseHistograms {
    pub ttft: RawHistogram,
    pub inter_token: RawHistogram,
    pub end_to_end: RawHistogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_values() {
        let s = Summary::of(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!((s.mean, s.median, s.min, s.max), (2.5, 2.5, 1.0, 4.0));
        assert!((s.stdev - 1.290_994_448_7).abs() < 1e-9);
    }

    #[test]
    fn histogram_percentiles_within_precision() {
        let mut h = LatencyHistogram::new();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p = h.percentiles();
        assert!((p.p50_ms - 50.0).abs() <= 0.05, "{p:?}");
        assert!((p.p99_ms - 99.0).abs() <= 0.1, "{p:?}");
        assert_eq!(h.raw().values.iter().map(|v| v[1]).sum::<u64>(), 100);
    }
}
