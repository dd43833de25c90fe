//! What a bench drives: target specs from the command line
//! (`name=gw,kind=remote,url=https://…/v1,model=deepseek-chat,key_env=GATEWAY_API_KEY`)
//! and the prices each side is costed with.

use std::{collections::BTreeMap, path::PathBuf};

use serde::Serialize;

use super::BenchError;

/// Hours in an average month (365.25 × 24 / 12).
pub const HOURS_PER_MONTH: f64 = 730.5;

/// Who serves the target, which decides how it is costed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// A hosted gateway sold per million tokens; needs a key.
    Remote,
    /// A lifeboat server (it may fail over, so costed as remote when prices are given).
    Lifeboat,
    /// A local model (`lifeboat serve --model …`, or served in-process by the bench from
    /// `model_file=` when no `url=` is given), costed by GPU-hours.
    Local,
}

impl TargetKind {
    fn parse(text: &str) -> Result<TargetKind, String> {
        match text {
            "remote" => Ok(TargetKind::Remote),
            "lifeboat" => Ok(TargetKind::Lifeboat),
            "local" => Ok(TargetKind::Local),
            other => Err(format!(
                "unknown target kind {other:?}; expected remote, lifeboat or local"
            )),
        }
    }
}

/// USD per million tokens, input and output priced separately.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TokenPrice {
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
}

/// What a local GPU costs per hour: a rental price, or a purchase amortised over months
/// plus power.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "basis")]
pub enum GpuCost {
    Rental {
        usd_per_hour: f64,
    },
    Purchase {
        price_usd: f64,
        amortise_months: f64,
        power_watts: f64,
        usd_per_kwh: f64,
    },
}

impl GpuCost {
    /// USD per hour of owning or renting the GPU, busy or not.
    pub fn usd_per_hour(&self) -> f64 {
        match *self {
            GpuCost::Rental { usd_per_hour } => usd_per_hour,
            GpuCost::Purchase {
                price_usd,
                amortise_months,
                power_watts,
                usd_per_kwh,
            } => price_usd / (amortise_months * HOURS_PER_MONTH) + power_watts / 1000.0 * usd_per_kwh,
        }
    }
}

/// How a target is costed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum Pricing {
    Tokens(TokenPrice),
    Gpu(GpuCost),
    /// No price given: cost is left out of the report for this target.
    Unpriced,
}

/// One OpenAI-compatible endpoint to drive.
#[derive(Debug, Clone, Serialize)]
pub struct TargetSpec {
    pub name: String,
    pub kind: TargetKind,
    /// Base URL ending in `/v1` (`/chat/completions` is appended); empty until the bench
    /// has started an in-process target.
    pub url: String,
    /// A local target without `url=`: the bench serves `model_file` itself, in-process.
    pub in_process: bool,
    pub model: String,
    /// Name of the environment variable holding the bearer key (never the key itself).
    pub key_env: Option<String>,
    #[serde(skip)]
    pub api_key: Option<String>,
    /// The model file the target serves, hashed into the report.
    pub model_file: Option<PathBuf>,
    pub pricing: Pricing,
    /// Per-target replacements of the run's counts, for a slow target.
    pub overrides: TargetOverrides,
}

/// Run settings one target replaces (e.g. fewer requests for a CPU-bound local model);
/// `None` keeps the run's value.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TargetOverrides {
    /// Sequential requests of the stability run (`requests=10`).
    pub requests: Option<usize>,
    /// Concurrency levels (`concurrency=1/2/4`).
    pub concurrency: Option<Vec<usize>>,
    /// Requests per concurrency level (`load_requests=8`).
    pub load_requests: Option<usize>,
    /// max_tokens of this target's requests (`max_tokens=32`).
    pub max_tokens: Option<u32>,
}

/// Prices used when a target gives none, by model name; data, not logic, and overridden
/// by `price_in=…,price_out=…` on the target.
pub const DEFAULT_PRICES: &[(&str, TokenPrice)] = &[(
    // DeepSeek V3.2 list price (cache miss), USD per million tokens.
    "deepseek-chat",
    TokenPrice {
        input_usd_per_mtok: 0.42,
        output_usd_per_mtok: 1.90,
    },
)];

const KEYS: &str = "name, kind, url, model, key_env, model_file, price_in, price_out, \
gpu_usd_per_hour, gpu_price_usd, amortise_months, power_watts, usd_per_kwh, requests, \
concurrency, load_requests, max_tokens";

impl TargetSpec {
    /// Parse `key=value,…`; `env` looks up the key variable (the process environment in the
    /// CLI, a map in tests).
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<TargetSpec, BenchError> {
        let bad = |message: String| BenchError::Target {
            spec: text.to_string(),
            message,
        };
        let mut fields = BTreeMap::new();
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            let key = key.trim();
            if !KEYS.split(", ").any(|k| k == key) {
                return Err(bad(format!("unknown key {key:?}; expected one of {KEYS}")));
            }
            if fields.insert(key, value.trim().to_string()).is_some() {
                return Err(bad(format!("{key} given twice")));
            }
        }
        let required = |key: &str| {
            fields
                .get(key)
                .cloned()
                .ok_or_else(|| bad(format!("missing {key}=")))
        };
        let number = |key: &str| -> Result<Option<f64>, BenchError> {
            fields
                .get(key)
                .map(|v| match v.parse::<f64>() {
                    Ok(n) if n.is_finite() && n >= 0.0 => Ok(n),
                    _ => Err(bad(format!("{key}={v} is not a non-negative number"))),
                })
                .transpose()
        };
        let kind = TargetKind::parse(fields.get("kind").map_or("remote", String::as_str)).map_err(bad)?;
        let in_process =
            kind == TargetKind::Local && !fields.contains_key("url") && fields.contains_key("model_file");
        let url = if in_process {
            String::new()
        } else {
            let url = required("url")
                .map_err(|_| {
                    bad(match kind {
                        TargetKind::Local => {
                            "missing url= (or model_file= alone, to serve the model in-process)".into()
                        }
                        _ => "missing url=".into(),
                    })
                })?
                .trim_end_matches('/')
                .to_string();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(bad(format!("url {url:?} must start with http:// or https://")));
            }
            url
        };
        let model = required("model")?;
        let name = fields.get("name").cloned().unwrap_or_else(|| model.clone());
        let key_env = fields.get("key_env").cloned();
        let api_key = match &key_env {
            Some(var) => Some(
                env(var)
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| bad(format!("key_env: environment variable {var} is not set")))?,
            ),
            None if kind == TargetKind::Remote => {
                return Err(bad(
                    "a remote target needs key_env=NAME (the variable holding its API key)".into(),
                ));
            }
            None => None,
        };
        let price = match (number("price_in")?, number("price_out")?) {
            (Some(input), Some(output)) => Some(TokenPrice {
                input_usd_per_mtok: input,
                output_usd_per_mtok: output,
            }),
            (None, None) => None,
            _ => {
                return Err(bad(
                    "give both price_in and price_out (USD per million tokens)".into()
                ));
            }
        };
        let gpu = match (number("gpu_usd_per_hour")?, number("gpu_price_usd")?) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "give gpu_usd_per_hour (rental) or gpu_price_usd (purchase), not both".into(),
                ));
            }
            (Some(usd_per_hour), None) => Some(GpuCost::Rental { usd_per_hour }),
            (None, Some(price_usd)) => {
                let amortise_months = number("amortise_months")?.unwrap_or(36.0);
                if amortise_months <= 0.0 {
                    return Err(bad("amortise_months must be above 0".into()));
                }
                Some(GpuCost::Purchase {
                    price_usd,
                    amortise_months,
                    power_watts: number("power_watts")?.unwrap_or(0.0),
                    usd_per_kwh: number("usd_per_kwh")?.unwrap_or(0.0),
                })
            }
            (None, None) => None,
        };
        let pricing = match (kind, price, gpu) {
            (_, Some(_), Some(_)) => {
                return Err(bad(
                    "a target is priced per token or per GPU-hour, not both".into()
                ));
            }
            (TargetKind::Local, Some(_), None) => {
                return Err(bad(
                    "a local target is costed by GPU-hour: use gpu_usd_per_hour or gpu_price_usd".into(),
                ));
            }
            (_, Some(price), None) => Pricing::Tokens(price),
            (TargetKind::Local, None, Some(gpu)) => Pricing::Gpu(gpu),
            (_, None, Some(_)) => {
                return Err(bad(
                    "only a local target is costed by GPU-hour; use price_in/price_out".into(),
                ));
            }
            (TargetKind::Local, None, None) => Pricing::Unpriced,
            (_, None, None) => DEFAULT_PRICES
                .iter()
                .find(|(m, _)| *m == model)
                .map_or(Pricing::Unpriced, |(_, p)| Pricing::Tokens(*p)),
        };
        let count = |key: &str| -> Result<Option<usize>, BenchError> {
            fields
                .get(key)
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|_| bad(format!("{key}={v} is not a whole number")))
                })
                .transpose()
        };
        let concurrency = fields
            .get("concurrency")
            .map(|v| {
                v.split('/')
                    .map(|level| match level.trim().parse::<usize>() {
                        Ok(0) => Err(bad(
                            "concurrency: 0 is not a concurrency level; use 1 or more (levels separated by /)".into(),
                        )),
                        Ok(n) => Ok(n),
                        Err(_) => Err(bad(format!("concurrency={v}: expected levels such as 1/2/4"))),
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let max_tokens = match count("max_tokens")? {
            Some(0) => return Err(bad("max_tokens must be at least 1".into())),
            Some(n) => Some(u32::try_from(n).map_err(|_| bad(format!("max_tokens={n} is too large")))?),
            None => None,
        };
        let overrides = TargetOverrides {
            requests: count("requests")?,
            concurrency,
            load_requests: count("load_requests")?,
            max_tokens,
        };
        Ok(TargetSpec {
            overrides,
            name,
            kind,
            url,
            in_process,
            model,
            key_env,
            api_key,
            model_file: fields.get("model_file").map(PathBuf::from),
            pricing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "KEY").then(|| "sk-test".to_string())
    }

    #[test]
    fn parses_a_remote_with_the_default_price() {
        let spec = TargetSpec::parse("name=gw,url=http://h/v1/,model=deepseek-chat,key_env=KEY", env)
            .expect("parses");
        assert_eq!(spec.url, "http://h/v1");
        assert_eq!(spec.api_key.as_deref(), Some("sk-test"));
        assert_eq!(
            spec.pricing,
            Pricing::Tokens(TokenPrice {
                input_usd_per_mtok: 0.42,
                output_usd_per_mtok: 1.90
            })
        );
    }

    #[test]
    fn purchase_is_amortised_plus_power() {
        let spec = TargetSpec::parse(
            "kind=local,url=http://h/v1,model=m,gpu_price_usd=7305,amortise_months=10,power_watts=500,usd_per_kwh=0.2",
            env,
        )
        .expect("parses");
        let Pricing::Gpu(gpu) = spec.pricing else {
            panic!("gpu")
        };
        assert!((gpu.usd_per_hour() - (1.0 + 0.1)).abs() < 1e-9);
    }

    #[test]
    fn errors_name_the_problem() {
        let message = |text: &str| TargetSpec::parse(text, env).expect_err("fails").to_string();
        assert!(message("kind=cloud,url=http://h/v1,model=m").contains("unknown target kind \"cloud\""));
        assert!(message("url=http://h/v1,model=m,key_env=NOPE").contains("NOPE is not set"));
        assert!(message("url=http://h/v1,model=m").contains("needs key_env"));
        assert!(message("kind=local,model=m").contains("missing url="));
        assert!(message("kind=local,url=h,model=m").contains("must start with http"));
        assert!(message("kind=local,url=http://h,model=m,colour=red").contains("unknown key \"colour\""));
        assert!(message("kind=local,url=http://h,model=m,gpu_usd_per_hour=x").contains("not a non-negative"));
        assert!(
            message("kind=local,url=http://h,model=m,concurrency=1/0")
                .contains("0 is not a concurrency level")
        );
    }

    #[test]
    fn overrides_replace_the_run_counts() {
        let spec = TargetSpec::parse(
            "kind=local,url=http://h/v1,model=m,requests=10,concurrency=1/2/4,max_tokens=32",
            env,
        )
        .expect("parses");
        assert_eq!(spec.overrides.requests, Some(10));
        assert_eq!(spec.overrides.concurrency, Some(vec![1, 2, 4]));
        assert_eq!(spec.overrides.max_tokens, Some(32));
    }

    #[test]
    fn a_local_model_file_without_url_is_served_in_process() {
        let spec = TargetSpec::parse("kind=local,model=m,model_file=models/x.gguf", env).expect("parses");
        assert!(spec.in_process && spec.url.is_empty());
        let served =
            TargetSpec::parse("kind=local,url=http://h/v1,model=m,model_file=x.gguf", env).expect("parses");
        assert!(!served.in_process);
        let remote = TargetSpec::parse("model=m,model_file=x.gguf,key_env=KEY", env)
            .expect_err("a remote needs a url")
            .to_string();
        assert!(remote.contains("missing url="), "{remote}");
    }
}
