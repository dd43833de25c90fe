//! A seeded random latency profile for the mock, so it can stand in for a hosted gateway:
//! a log-normal time to first token given by its median and p95, and a per-stream token
//! rate drawn uniformly from a range.

use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};

/// The z-score of the 95th percentile of a standard normal distribution.
const Z_P95: f64 = 1.644_853_626_951_472_2;

/// How a hosted gateway's latency varies from request to request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyProfile {
    /// Median time to first token.
    pub ttft_median: Duration,
    /// 95th percentile of the time to first token (at least the median).
    pub ttft_p95: Duration,
    /// Slowest per-stream decode rate, tokens per second.
    pub tokens_per_sec_min: f64,
    /// Fastest per-stream decode rate, tokens per second.
    pub tokens_per_sec_max: f64,
    /// Seed of the random draws, so two runs see the same delays in the same order.
    pub seed: u64,
}

impl LatencyProfile {
    /// A profile like a hosted DeepSeek gateway: TTFT median 340 ms, p95 900 ms,
    /// 30–60 tokens/s per stream.
    pub fn hosted_deepseek(seed: u64) -> LatencyProfile {
        LatencyProfile {
            ttft_median: Duration::from_millis(340),
            ttft_p95: Duration::from_millis(900),
            tokens_per_sec_min: 30.0,
            tokens_per_sec_max: 60.0,
            seed,
        }
    }

    /// Check the numbers make a distribution; the message names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.ttft_median.is_zero() {
            return Err("ttft median must be above 0".into());
        }
        if self.ttft_p95 < self.ttft_median {
            return Err(format!(
                "ttft p95 ({:?}) must be at least the median ({:?})",
                self.ttft_p95, self.ttft_median
            ));
        }
        let (min, max) = (self.tokens_per_sec_min, self.tokens_per_sec_max);
        if !(min.is_finite() && max.is_finite() && min > 0.0 && min <= max) {
            return Err(format!(
                "token rate range {min}-{max} must be positive and ordered"
            ));
        }
        Ok(())
    }
}

/// The random source of one mock; idle when it has no profile.
#[derive(Debug)]
pub(super) struct ProfileRng(StdRng);

impl ProfileRng {
    pub(super) fn new(profile: Option<&LatencyProfile>) -> ProfileRng {
        ProfileRng(StdRng::seed_from_u64(profile.map_or(0, |p| p.seed)))
    }

    /// One request's (first-token delay, inter-token delay).
    pub(super) fn draw(&mut self, profile: &LatencyProfile) -> (Duration, Duration) {
        let median = profile.ttft_median.as_secs_f64();
        let sigma = (profile.ttft_p95.as_secs_f64() / median).ln() / Z_P95;
        let ttft = median * (sigma * self.standard_normal()).exp();
        let rate = if profile.tokens_per_sec_max > profile.tokens_per_sec_min {
            self.0
                .random_range(profile.tokens_per_sec_min..=profile.tokens_per_sec_max)
        } else {
            profile.tokens_per_sec_min
        };
        (
            Duration::from_secs_f64(ttft.min(600.0)),
            Duration::from_secs_f64(1.0 / rate),
        )
    }

    /// Box–Muller: one standard normal draw from two uniforms.
    fn standard_normal(&mut self) -> f64 {
        let u1: f64 = 1.0 - self.0.random::<f64>(); // in (0, 1], so ln is finite
        let u2: f64 = self.0.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_match_the_median_and_p95() {
        let profile = LatencyProfile::hosted_deepseek(7);
        let mut rng = ProfileRng::new(Some(&profile));
        let mut ttfts: Vec<f64> = Vec::new();
        for _ in 0..20_000 {
            let (ttft, itl) = rng.draw(&profile);
            ttfts.push(ttft.as_secs_f64());
            let rate = 1.0 / itl.as_secs_f64();
            assert!((29.999..=60.001).contains(&rate), "{rate}");
        }
        ttfts.sort_by(f64::total_cmp);
        let median = ttfts[ttfts.len() / 2];
        let p95 = ttfts[ttfts.len() * 95 / 100];
        assert!((0.32..0.36).contains(&median), "median {median}");
        assert!((0.83..0.97).contains(&p95), "p95 {p95}");
    }

    #[test]
    fn same_seed_same_delays() {
        let profile = LatencyProfile::hosted_deepseek(1);
        let mut a = ProfileRng::new(Some(&profile));
        let mut b = ProfileRng::new(Some(&profile));
        for _ in 0..10 {
            assert_eq!(a.draw(&profile), b.draw(&profile));
        }
    }
}
