//! A hosted gateway's latency for the mock: each request draws its time to first token
//! from a log-normal distribution (given its median and 95th percentile) and its token
//! rate from a range, from a seeded generator, so benchmark runs are repeatable.

use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};

/// The 95th percentile of the standard normal distribution.
const Z95: f64 = 1.644_853_626_951_472_2;

/// Per-request latency like a real gateway's (e.g. DeepSeek's: TTFT median ~340 ms,
/// p95 ~900 ms, 30–60 tokens/s).
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyProfile {
    pub ttft_median: Duration,
    /// At least the median; equal to it means every TTFT is the median.
    pub ttft_p95: Duration,
    /// Tokens per second of one stream, drawn uniformly per request from this range.
    pub tokens_per_second: (f64, f64),
    pub seed: u64,
}

impl LatencyProfile {
    /// A profile, or a message naming what is wrong with it.
    pub fn new(
        ttft_median: Duration,
        ttft_p95: Duration,
        tokens_per_second: (f64, f64),
        seed: u64,
    ) -> Result<LatencyProfile, String> {
        if ttft_median.is_zero() {
            return Err("the TTFT median must be greater than 0".into());
        }
        if ttft_p95 < ttft_median {
            return Err(format!(
                "the TTFT p95 ({ttft_p95:?}) must be at least the median ({ttft_median:?})"
            ));
        }
        let (low, high) = tokens_per_second;
        if !(low.is_finite() && high.is_finite() && low > 0.0 && low <= high) {
            return Err(format!(
                "tokens per second must be a range LOW-HIGH with 0 < LOW <= HIGH, not {low}-{high}"
            ));
        }
        Ok(LatencyProfile {
            ttft_median,
            ttft_p95,
            tokens_per_second,
            seed,
        })
    }

    /// A generator for this profile's draws.
    pub fn rng(&self) -> StdRng {
        StdRng::seed_from_u64(self.seed)
    }

    /// One request's (first-token delay, inter-token delay).
    pub fn draw(&self, rng: &mut StdRng) -> (Duration, Duration) {
        let median = self.ttft_median.as_secs_f64();
        let sigma = (self.ttft_p95.as_secs_f64() / median).ln() / Z95;
        // Box–Muller: a standard normal from two uniforms (u1 in (0, 1] so ln is finite).
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let ttft = median * (sigma * z).exp();
        let (low, high) = self.tokens_per_second;
        let rate = if high > low {
            rng.random_range(low..=high)
        } else {
            low
        };
        (
            Duration::from_secs_f64(ttft.min(3600.0)),
            Duration::from_secs_f64(1.0 / rate),
        )
    }
}

/// `"30-60"` or `"45"` tokens per second.
pub fn parse_rate_range(text: &str) -> Result<(f64, f64), String> {
    let number = |s: &str| {
        s.trim()
            .parse::<f64>()
            .map_err(|e| format!("{text:?} is not a rate or LOW-HIGH range: {e}"))
    };
    match text.split_once('-') {
        Some((low, high)) => Ok((number(low)?, number(high)?)),
        None => number(text).map(|r| (r, r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway() -> LatencyProfile {
        LatencyProfile::new(
            Duration::from_millis(340),
            Duration::from_millis(900),
            (30.0, 60.0),
            7,
        )
        .expect("valid")
    }

    #[test]
    fn draws_have_the_asked_median_p95_and_rates() {
        let profile = gateway();
        let mut rng = profile.rng();
        let draws: Vec<(Duration, Duration)> = (0..20_000).map(|_| profile.draw(&mut rng)).collect();
        let mut ttfts: Vec<f64> = draws.iter().map(|(t, _)| t.as_secs_f64()).collect();
        ttfts.sort_by(f64::total_cmp);
        let median = ttfts[ttfts.len() / 2];
        let p95 = ttfts[ttfts.len() * 95 / 100];
        assert!((median - 0.340).abs() < 0.340 * 0.05, "median {median}");
        assert!((p95 - 0.900).abs() < 0.900 * 0.07, "p95 {p95}");
        for (_, gap) in &draws {
            let rate = 1.0 / gap.as_secs_f64();
            assert!((29.999..=60.001).contains(&rate), "rate {rate}");
        }
        // Seeded: the same profile draws the same sequence.
        let mut again = profile.rng();
        assert_eq!(profile.draw(&mut again), draws[0]);
    }

    #[test]
    fn bad_profiles_and_ranges_are_named() {
        let err = LatencyProfile::new(
            Duration::from_millis(500),
            Duration::from_millis(100),
            (30.0, 60.0),
            0,
        )
        .expect_err("p95 below median");
        assert!(err.contains("p95"), "{err}");
        let err = LatencyProfile::new(
            Duration::from_millis(500),
            Duration::from_millis(900),
            (60.0, 30.0),
            0,
        )
        .expect_err("inverted range");
        assert!(err.contains("LOW-HIGH"), "{err}");
        assert_eq!(parse_rate_range("30-60"), Ok((30.0, 60.0)));
        assert_eq!(parse_rate_range("45"), Ok((45.0, 45.0)));
        assert!(parse_rate_range("fast").expect_err("text").contains("fast"));
        // A p95 equal to the median draws the median every time.
        let fixed = LatencyProfile::new(
            Duration::from_millis(50),
            Duration::from_millis(50),
            (20.0, 20.0),
            1,
        )
        .expect("valid");
        let mut rng = fixed.rng();
        assert_eq!(
            fixed.draw(&mut rng),
            (Duration::from_millis(50), Duration::from_millis(50))
        );
    }
}
