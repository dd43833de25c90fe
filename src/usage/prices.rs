//! What a remote attempt costs: a price table per remote model (cache-hit input,
//! cache-miss input, output) in integer nano-dollars per token, with optional UTC time
//! windows that scale the price (an off-peak discount), priced at the attempt's start.
//!
//! # Rounding
//!
//! Prices are configured in USD per million tokens and converted once, exactly, from
//! their decimal digits (a float is read through its shortest decimal form, so `0.07`
//! is 0.07 and not 0.07000000000000000666): 1 USD/MTok = 1000 nano-dollars per token, and
//! digits past the third decimal of USD/MTok round half up (`0.0285` → 29 n$/token). So
//! the resolution is $0.001 per million tokens; a finer price (`0.0028`) is stored as the
//! nearest step (`0.003`). All sums after that are integers; a window's multiplier is
//! applied once to an attempt's total, rounding half up to a whole nano-dollar.

use std::{collections::HashMap, fmt};

use chrono::{DateTime, Datelike, Duration, NaiveTime, Utc, Weekday};
use serde::{Deserialize, Deserializer, de};

use super::record::TokenCounts;

/// A price in nano-dollars (1e-9 USD) per token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct NanosPerToken(pub i64);

/// Why a price could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    /// Not a plain non-negative decimal number.
    #[error("price {0:?} is not a non-negative decimal number of USD per million tokens")]
    NotADecimal(String),
    /// Too large to hold as nano-dollars per token.
    #[error("price {0:?} USD per million tokens is too large")]
    TooLarge(String),
    /// A time of day that is not `HH:MM` or `HH:MM:SS`.
    #[error("time of day {0:?} is not HH:MM or HH:MM:SS (UTC)")]
    TimeOfDay(String),
}

impl NanosPerToken {
    /// The price of `usd_per_mtok`, a decimal such as `"0.27"` (USD per million tokens),
    /// rounded half up to a whole nano-dollar per token (see the module's "Rounding").
    pub fn from_usd_per_mtok(usd_per_mtok: &str) -> Result<NanosPerToken, PriceError> {
        let text = usd_per_mtok.trim();
        let bad = || PriceError::NotADecimal(usd_per_mtok.to_owned());
        let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) {
            return Err(bad());
        }
        let too_large = || PriceError::TooLarge(usd_per_mtok.to_owned());
        // n$/token = USD/MTok × 1e9 / 1e6 = USD/MTok × 1000: the whole part times 1000
        // plus the first three decimals, then the fourth decides the rounding.
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_large())?
        };
        let mut nanos = whole.checked_mul(1000).ok_or_else(too_large)?;
        let frac = frac.as_bytes();
        for (i, scale) in [100, 10, 1].into_iter().enumerate() {
            let digit = frac.get(i).map_or(0, |d| i64::from(d - b'0'));
            nanos = nanos.checked_add(digit * scale).ok_or_else(too_large)?;
        }
        if frac.get(3).is_some_and(|d| *d >= b'5') {
            nanos = nanos.checked_add(1).ok_or_else(too_large)?;
        }
        Ok(NanosPerToken(nanos))
    }

    /// [`NanosPerToken::from_usd_per_mtok`] of a float, read through its shortest decimal
    /// form so that binary float error never reaches the price.
    pub fn from_usd_per_mtok_f64(usd_per_mtok: f64) -> Result<NanosPerToken, PriceError> {
        if !usd_per_mtok.is_finite() || usd_per_mtok < 0.0 {
            return Err(PriceError::NotADecimal(usd_per_mtok.to_string()));
        }
        // `Display` of an f64 is its shortest round-tripping decimal, never exponent form.
        NanosPerToken::from_usd_per_mtok(&usd_per_mtok.to_string())
    }
}

impl<'de> Deserialize<'de> for NanosPerToken {
    /// From USD per million tokens, as a decimal string (`"0.27"`) or a number (`0.27`).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = NanosPerToken;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("USD per million tokens, as a number or a decimal string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<NanosPerToken, E> {
                NanosPerToken::from_usd_per_mtok(v).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<NanosPerToken, E> {
                NanosPerToken::from_usd_per_mtok_f64(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<NanosPerToken, E> {
                NanosPerToken::from_usd_per_mtok(&v.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NanosPerToken, E> {
                NanosPerToken::from_usd_per_mtok(&v.to_string()).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A span of UTC time of day, on some weekdays or all, in which prices are scaled.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceWindow {
    /// Where the window opens (inclusive), UTC, `"HH:MM"` or `"HH:MM:SS"`.
    #[serde(deserialize_with = "time_of_day")]
    pub start: NaiveTime,
    /// Where it closes (exclusive). An `end` before `start` crosses midnight; equal to
    /// `start`, the window is the whole day.
    #[serde(deserialize_with = "time_of_day")]
    pub end: NaiveTime,
    /// The days it applies on, named by the day the window *opens* (a Friday 22:00–02:00
    /// window covers Saturday 01:00); empty means every day.
    #[serde(default)]
    pub weekdays: Vec<Weekday>,
    /// The price multiplier in basis points: 10000 is the full price, 5000 half.
    pub multiplier_bp: u32,
}

fn time_of_day<'de, D: Deserializer<'de>>(deserializer: D) -> Result<NaiveTime, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_time_of_day(&text).map_err(de::Error::custom)
}

/// `"HH:MM"` or `"HH:MM:SS"` as a UTC time of day.
pub fn parse_time_of_day(text: &str) -> Result<NaiveTime, PriceError> {
    NaiveTime::parse_from_str(text, "%H:%M:%S")
        .or_else(|_| NaiveTime::parse_from_str(text, "%H:%M"))
        .map_err(|_| PriceError::TimeOfDay(text.to_owned()))
}

impl PriceWindow {
    /// Whether the instant `at` falls inside the window.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        let time = at.time();
        let (inside, opened_on) = if self.start <= self.end {
            let whole_day = self.start == self.end;
            (whole_day || (self.start <= time && time < self.end), at.weekday())
        } else if time >= self.start {
            // Crossing midnight, before it: the window opened today.
            (true, at.weekday())
        } else {
            // Crossing midnight, after it: the window opened yesterday.
            (time < self.end, (at - Duration::days(1)).weekday())
        };
        inside && (self.weekdays.is_empty() || self.weekdays.contains(&opened_on))
    }
}

/// One remote model's prices.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Prompt tokens served from the provider's cache.
    pub input_cache_hit: NanosPerToken,
    /// Prompt tokens not in the cache.
    pub input_cache_miss: NanosPerToken,
    /// Generated tokens (reasoning included, as providers bill it).
    pub output: NanosPerToken,
    /// Windows that scale these prices; the first that contains an attempt's start
    /// applies, none means the full price.
    #[serde(default)]
    pub windows: Vec<PriceWindow>,
}

/// An attempt's cost, and whether a price was known for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Nano-dollars; 0 when unpriced.
    pub nanos: i64,
    /// False when the model had no price (the ledger marks such rows).
    pub priced: bool,
}

impl ModelPrice {
    /// The full-price cost of `tokens`, before any window.
    fn base_nanos(&self, tokens: &TokenCounts) -> i128 {
        let mul = |count: u64, price: NanosPerToken| i128::from(count) * i128::from(price.0);
        mul(tokens.cached_prompt, self.input_cache_hit)
            + mul(tokens.uncached_prompt(), self.input_cache_miss)
            + mul(tokens.completion, self.output)
    }

    /// The multiplier (basis points) in force at `started_ms`.
    pub fn multiplier_bp_at(&self, started_ms: i64) -> u32 {
        let Some(at) = DateTime::<Utc>::from_timestamp_millis(started_ms) else {
            return 10_000;
        };
        self.windows
            .iter()
            .find(|window| window.contains(at))
            .map_or(10_000, |window| window.multiplier_bp)
    }

    /// What `tokens` cost in an attempt that started at `started_ms` (ms, UTC):
    /// hit × hit price + miss × miss price + output × output price, times the window's
    /// multiplier, rounded half up to a nano-dollar (saturating at `i64::MAX`).
    pub fn cost_nanos(&self, tokens: &TokenCounts, started_ms: i64) -> i64 {
        let bp = i128::from(self.multiplier_bp_at(started_ms));
        let scaled = (self.base_nanos(tokens) * bp + 5_000) / 10_000;
        i64::try_from(scaled).unwrap_or(i64::MAX)
    }
}

/// Prices per remote model name, as the backend is asked for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct PriceTable {
    models: HashMap<String, ModelPrice>,
}

impl PriceTable {
    /// An empty table: every model unpriced.
    pub fn empty() -> PriceTable {
        PriceTable::default()
    }

    /// DeepSeek's list prices for `deepseek-chat` and `deepseek-reasoner` as published on
    /// <https://api-docs.deepseek.com/quick_start/pricing> (the copy read on 2026-12-08,
    /// in effect since 2025-09-05 16:00 UTC): both models $0.07 (cache hit) / $0.56
    /// (cache miss) input and $1.68 output per million tokens, the night-time discount
    /// withdrawn. Third-party guides from 2026 report both names moved to DeepSeek-V4
    /// Flash and due to be retired, and peak/off-peak prices again: DeepSeek changes its
    /// prices and its discount schedule (the former off-peak window was 16:30–00:30 UTC
    /// at half price or less), so config overrides these figures and adds whatever
    /// [`PriceWindow`] is in force.
    pub fn deepseek_defaults() -> PriceTable {
        let list = ModelPrice {
            input_cache_hit: NanosPerToken(70),
            input_cache_miss: NanosPerToken(560),
            output: NanosPerToken(1_680),
            windows: Vec::new(),
        };
        let mut table = PriceTable::empty();
        table.insert("deepseek-chat", list.clone());
        table.insert("deepseek-reasoner", list);
        table
    }

    /// Sets (or replaces) `model`'s prices.
    pub fn insert(&mut self, model: impl Into<String>, price: ModelPrice) {
        self.models.insert(model.into(), price);
    }

    /// `model`'s prices, if it has any.
    pub fn get(&self, model: &str) -> Option<&ModelPrice> {
        self.models.get(model)
    }

    /// What `tokens` on `model` cost in an attempt that started at `started_ms`; an
    /// unknown model costs 0 and says so (`priced: false`).
    pub fn cost(&self, model: &str, tokens: &TokenCounts, started_ms: i64) -> Cost {
        match self.get(model) {
            Some(price) => Cost {
                nanos: price.cost_nanos(tokens, started_ms),
                priced: true,
            },
            None => Cost {
                nanos: 0,
                priced: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn price(text: &str) -> i64 {
        NanosPerToken::from_usd_per_mtok(text).expect("a price").0
    }

    fn ms(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .expect("a valid time")
            .timestamp_millis()
    }

    fn tokens(prompt: u64, cached: u64, completion: u64) -> TokenCounts {
        TokenCounts {
            prompt,
            completion,
            cached_prompt: cached,
            reasoning: 0,
        }
    }

    #[test]
    fn decimal_prices_convert_exactly_and_round_half_up() {
        assert_eq!(price("0.07"), 70);
        assert_eq!(price("0.56"), 560);
        assert_eq!(price("1.68"), 1_680);
        assert_eq!(price("2"), 2_000);
        assert_eq!(price(".5"), 500);
        assert_eq!(price("0.0284"), 28);
        assert_eq!(price("0.0285"), 29);
        assert_eq!(price("0.00049"), 0);
        assert_eq!(price("0.0005"), 1);
        for bad in ["", ".", "-0.1", "1e-3", "0.1.2", "abc", "1,5"] {
            assert!(
                NanosPerToken::from_usd_per_mtok(bad).is_err(),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn float_prices_have_no_binary_error() {
        // 0.07 as an f64 is 0.0700000000000000066…, 0.1 + 0.2 is 0.30000000000000004.
        assert_eq!(NanosPerToken::from_usd_per_mtok_f64(0.07).expect("a price").0, 70);
        assert_eq!(
            NanosPerToken::from_usd_per_mtok_f64(0.1 + 0.2)
                .expect("a price")
                .0,
            300
        );
        assert_eq!(
            NanosPerToken::from_usd_per_mtok_f64(1.1).expect("a price").0,
            1_100
        );
        assert!(NanosPerToken::from_usd_per_mtok_f64(-1.0).is_err());
        assert!(NanosPerToken::from_usd_per_mtok_f64(f64::NAN).is_err());
        let from_json: ModelPrice =
            serde_json::from_str(r#"{"input_cache_hit": 0.07, "input_cache_miss": "0.56", "output": 2}"#)
                .expect("a model price");
        assert_eq!(
            (
                from_json.input_cache_hit.0,
                from_json.input_cache_miss.0,
                from_json.output.0
            ),
            (70, 560, 2_000)
        );
    }

    #[test]
    fn a_cost_by_hand() {
        let table = PriceTable::deepseek_defaults();
        // 1000 prompt tokens of which 800 cached, 500 out:
        // 800 × 70 + 200 × 560 + 500 × 1680 = 56 000 + 112 000 + 840 000 = 1 008 000 n$.
        let cost = table.cost("deepseek-chat", &tokens(1_000, 800, 500), ms(2026, 12, 8, 12, 0));
        assert_eq!(
            cost,
            Cost {
                nanos: 1_008_000,
                priced: true
            }
        );
        // One million uncached prompt tokens cost the list price exactly: $0.56.
        let cost = table.cost("deepseek-reasoner", &tokens(1_000_000, 0, 0), 0);
        assert_eq!(cost.nanos, 560_000_000);
    }

    #[test]
    fn an_unknown_model_costs_nothing_and_says_so() {
        let cost = PriceTable::deepseek_defaults().cost("gpt-9", &tokens(10, 0, 10), 0);
        assert_eq!(
            cost,
            Cost {
                nanos: 0,
                priced: false
            }
        );
    }

    fn with_window(start: &str, end: &str, weekdays: Vec<Weekday>, bp: u32) -> ModelPrice {
        ModelPrice {
            input_cache_hit: NanosPerToken(70),
            input_cache_miss: NanosPerToken(560),
            output: NanosPerToken(1_680),
            windows: vec![PriceWindow {
                start: parse_time_of_day(start).expect("a time"),
                end: parse_time_of_day(end).expect("a time"),
                weekdays,
                multiplier_bp: bp,
            }],
        }
    }

    #[test]
    fn a_window_starts_on_its_minute() {
        let price = with_window("16:30", "20:00", vec![], 5_000);
        let used = tokens(1_000, 0, 1_000); // 560 000 + 1 680 000 = 2 240 000 n$ at full price
        assert_eq!(price.cost_nanos(&used, ms(2026, 12, 8, 16, 29)), 2_240_000);
        assert_eq!(price.cost_nanos(&used, ms(2026, 12, 8, 16, 30)), 1_120_000);
        assert_eq!(price.cost_nanos(&used, ms(2026, 12, 8, 16, 31)), 1_120_000);
        // The end is exclusive.
        assert_eq!(price.cost_nanos(&used, ms(2026, 12, 8, 19, 59)), 1_120_000);
        assert_eq!(price.cost_nanos(&used, ms(2026, 12, 8, 20, 0)), 2_240_000);
    }

    #[test]
    fn a_window_across_midnight_and_its_weekdays() {
        // DeepSeek's former off-peak hours: 16:30–00:30 UTC at half price.
        let every_day = with_window("16:30", "00:30", vec![], 5_000);
        assert_eq!(every_day.multiplier_bp_at(ms(2026, 12, 8, 23, 59)), 5_000);
        assert_eq!(every_day.multiplier_bp_at(ms(2026, 12, 9, 0, 0)), 5_000);
        assert_eq!(every_day.multiplier_bp_at(ms(2026, 12, 9, 0, 29)), 5_000);
        assert_eq!(every_day.multiplier_bp_at(ms(2026, 12, 9, 0, 30)), 10_000);
        assert_eq!(every_day.multiplier_bp_at(ms(2026, 12, 9, 12, 0)), 10_000);
        // Friday nights only: Saturday 00:10 is Friday's window, Friday 00:10 is not
        // (that belongs to Thursday's). 2026-12-11 is a Friday.
        let fridays = with_window("22:00", "02:00", vec![Weekday::Fri], 2_500);
        assert_eq!(fridays.multiplier_bp_at(ms(2026, 12, 11, 22, 0)), 2_500);
        assert_eq!(fridays.multiplier_bp_at(ms(2026, 12, 12, 0, 10)), 2_500);
        assert_eq!(fridays.multiplier_bp_at(ms(2026, 12, 11, 0, 10)), 10_000);
        assert_eq!(fridays.multiplier_bp_at(ms(2026, 12, 12, 22, 0)), 10_000);
    }

    #[test]
    fn a_multiplier_rounds_the_total_half_up_once() {
        let price = with_window("00:00", "00:00", vec![], 3_333);
        // 3 output tokens = 5 040 n$; × 0.3333 = 1 679.832 → 1 680.
        assert_eq!(price.cost_nanos(&tokens(0, 0, 3), 0), 1_680);
        // 1 cached token = 70 n$; × 0.5 = 35 exactly; × 0.3333 = 23.331 → 23.
        let half = with_window("00:00", "00:00", vec![], 5_000);
        assert_eq!(half.cost_nanos(&tokens(1, 1, 0), 0), 35);
        assert_eq!(price.cost_nanos(&tokens(1, 1, 0), 0), 23);
    }

    #[test]
    fn windows_read_from_config() {
        let price: ModelPrice = toml::from_str(
            r#"
            input_cache_hit = "0.07"
            input_cache_miss = "0.56"
            output = "1.68"
            [[windows]]
            start = "16:30"
            end = "00:30"
            weekdays = ["Sat", "Sun"]
            multiplier_bp = 5000
            "#,
        )
        .expect("a model price");
        assert_eq!(price.windows[0].weekdays, vec![Weekday::Sat, Weekday::Sun]);
        assert_eq!(price.windows[0].end, parse_time_of_day("00:30").expect("a time"));
        let bad = toml::from_str::<ModelPrice>(
            "input_cache_hit = 1\ninput_cache_miss = 1\noutput = 1\n[[windows]]\nstart = \"25:00\"\nend = \"01:00\"\nmultiplier_bp = 1",
        );
        assert!(bad.is_err());
    }
}
