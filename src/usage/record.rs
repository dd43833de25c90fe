//! One ledger row per attempt: who served it, when, how it ended, its tokens and its
//! cost, and the reading of a backend's `usage` object into those tokens.

use serde_json::Value;

use crate::backend::{BackendKind, ClientId, ErrorKind, Usage};

/// One attempt of one request, as the ledger stores it. A request retried once and then
/// failed over has three of these sharing `request_id`, told apart by `attempt`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    /// The request's id (lifeboat's, or the client's `x-request-id`).
    pub request_id: String,
    /// 1 for the first attempt of the request, counting up over retries, failovers and
    /// hedges. With `request_id` it is the row's unique key, which makes replays harmless.
    pub attempt: u32,
    /// The route (public model name) the client asked for.
    pub route: String,
    /// The backend's configured id.
    pub backend_id: String,
    /// Remote gateway or local model.
    pub backend_kind: BackendKind,
    /// The model name the backend was asked for (the price table's key for a remote).
    pub backend_model: String,
    /// The client's short key hash ([`ClientId`]); never the key itself.
    pub client: ClientId,
    /// When the attempt started, in ms since the Unix epoch (UTC). Prices are looked up
    /// at this instant, so an attempt is priced by the window it started in.
    pub started_ms: i64,
    /// When its first token arrived (ms, UTC), if one did.
    pub first_token_ms: Option<i64>,
    /// When it ended (ms, UTC).
    pub ended_ms: i64,
    /// How it ended.
    pub outcome: Outcome,
    /// Why the router came to this backend (e.g. the error kind that made it fail over);
    /// `None` for the first choice.
    pub fallback_reason: Option<String>,
    /// The tokens it consumed.
    pub tokens: TokenCounts,
    /// True when the backend reported no usage and `tokens` were counted by lifeboat.
    pub usage_estimated: bool,
    /// True when the backend's model had no price, so `cost_nanos` is 0 for want of a
    /// price, not because the attempt was free.
    pub unpriced: bool,
    /// What the attempt cost, in nano-dollars (1e-9 USD).
    pub cost_nanos: i64,
    /// For a local attempt, what the remote would have charged for the same tokens
    /// (nano-dollars); 0 for a remote attempt.
    pub avoided_nanos: i64,
}

/// How an attempt ended. Every outcome may have consumed tokens and is billed by them:
/// a hedge loser or a cut stream still cost what the gateway generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its answer went to the client.
    Served,
    /// It failed before committing, with this kind.
    Failed(ErrorKind),
    /// The client went away while it ran.
    Cancelled,
    /// A hedge raced it and won; it was stopped.
    HedgeLoser,
    /// Its stream broke after the commit point.
    Cut,
}

impl Outcome {
    /// The stored label (`served`, `failed`, `cancelled`, `hedge_loser`, `cut`).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Served => "served",
            Outcome::Failed(_) => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::HedgeLoser => "hedge_loser",
            Outcome::Cut => "cut",
        }
    }

    /// The error kind of a failed attempt.
    pub fn error_kind(self) -> Option<ErrorKind> {
        match self {
            Outcome::Failed(kind) => Some(kind),
            _ => None,
        }
    }

    /// The outcome stored as `label` (and `error_kind` for `failed`); `None` for a label
    /// this version does not know.
    pub fn from_parts(label: &str, error_kind: Option<&str>) -> Option<Outcome> {
        Some(match label {
            "served" => Outcome::Served,
            "failed" => Outcome::Failed(ErrorKind::from_label(error_kind?)?),
            "cancelled" => Outcome::Cancelled,
            "hedge_loser" => Outcome::HedgeLoser,
            "cut" => Outcome::Cut,
            _ => return None,
        })
    }
}

/// The tokens of one attempt. `cached_prompt` is part of `prompt` and `reasoning` part of
/// `completion`, as both DeepSeek and OpenAI count them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    /// All prompt tokens, cached or not.
    pub prompt: u64,
    /// All generated tokens, reasoning included.
    pub completion: u64,
    /// Prompt tokens served from the provider's cache (billed at the cache-hit price).
    pub cached_prompt: u64,
    /// Generated tokens spent on reasoning.
    pub reasoning: u64,
}

impl TokenCounts {
    /// Prompt tokens billed at the cache-miss price.
    pub fn uncached_prompt(&self) -> u64 {
        self.prompt.saturating_sub(self.cached_prompt)
    }

    /// The tokens of a backend's `usage` object. Both provider shapes are read:
    /// DeepSeek's top-level `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens` and
    /// OpenAI's `prompt_tokens_details.cached_tokens`, plus
    /// `completion_tokens_details.reasoning_tokens`. Absent fields count as 0; a cached
    /// count larger than the prompt is capped at the prompt.
    pub fn from_usage(usage: &Usage) -> TokenCounts {
        let extra = &usage.extra;
        let top = |name: &str| extra.get(name).and_then(Value::as_u64);
        let nested = |outer: &str, inner: &str| {
            extra
                .get(outer)
                .and_then(|details| details.get(inner))
                .and_then(Value::as_u64)
        };
        let prompt = usage.prompt_tokens;
        // DeepSeek's hit count first (its own field, always sent); then OpenAI's; then a
        // miss count alone, whose complement is the hit.
        let cached = top("prompt_cache_hit_tokens")
            .or_else(|| nested("prompt_tokens_details", "cached_tokens"))
            .or_else(|| top("prompt_cache_miss_tokens").map(|miss| prompt.saturating_sub(miss)))
            .unwrap_or(0);
        TokenCounts {
            prompt,
            completion: usage.completion_tokens,
            cached_prompt: cached.min(prompt),
            reasoning: nested("completion_tokens_details", "reasoning_tokens").unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn usage(value: Value) -> Usage {
        serde_json::from_value(value).expect("a usage object")
    }

    #[test]
    fn deepseek_cache_fields_at_the_top_level() {
        let tokens = TokenCounts::from_usage(&usage(json!({
            "prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
            "prompt_cache_hit_tokens": 1024, "prompt_cache_miss_tokens": 176,
            "completion_tokens_details": {"reasoning_tokens": 120}
        })));
        assert_eq!(
            tokens,
            TokenCounts {
                prompt: 1200,
                completion: 300,
                cached_prompt: 1024,
                reasoning: 120
            }
        );
        assert_eq!(tokens.uncached_prompt(), 176);
    }

    #[test]
    fn openai_details_objects() {
        let tokens = TokenCounts::from_usage(&usage(json!({
            "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
            "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 64, "audio_tokens": 0}
        })));
        assert_eq!(
            tokens,
            TokenCounts {
                prompt: 2006,
                completion: 300,
                cached_prompt: 1920,
                reasoning: 64
            }
        );
    }

    #[test]
    fn absent_fields_count_as_zero() {
        let tokens = TokenCounts::from_usage(&usage(json!({
            "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15
        })));
        assert_eq!(
            tokens,
            TokenCounts {
                prompt: 10,
                completion: 5,
                cached_prompt: 0,
                reasoning: 0
            }
        );
        assert_eq!(tokens.uncached_prompt(), 10);
        // Details objects without the counted field, or with a null, are absent too.
        let tokens = TokenCounts::from_usage(&usage(json!({
            "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
            "prompt_tokens_details": null, "completion_tokens_details": {}
        })));
        assert_eq!(tokens.cached_prompt, 0);
        assert_eq!(tokens.reasoning, 0);
    }

    #[test]
    fn a_miss_count_alone_gives_the_hit_and_a_hit_never_passes_the_prompt() {
        let tokens = TokenCounts::from_usage(&usage(json!({
            "prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101,
            "prompt_cache_miss_tokens": 30
        })));
        assert_eq!(tokens.cached_prompt, 70);
        let tokens = TokenCounts::from_usage(&usage(json!({
            "prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101,
            "prompt_cache_hit_tokens": 500
        })));
        assert_eq!(tokens.cached_prompt, 100);
        assert_eq!(tokens.uncached_prompt(), 0);
    }

    #[test]
    fn outcomes_round_trip_through_their_stored_parts() {
        let all = [
            Outcome::Served,
            Outcome::Failed(ErrorKind::RateLimited),
            Outcome::Failed(ErrorKind::Timeout(crate::backend::TimeoutPhase::FirstToken)),
            Outcome::Cancelled,
            Outcome::HedgeLoser,
            Outcome::Cut,
        ];
        for outcome in all {
            let kind = outcome.error_kind().map(ErrorKind::as_str);
            assert_eq!(Outcome::from_parts(outcome.as_str(), kind), Some(outcome));
        }
        assert_eq!(Outcome::from_parts("failed", None), None);
        assert_eq!(Outcome::from_parts("exploded", None), None);
    }
}
