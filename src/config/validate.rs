//! `Config::validate`: everything parsing cannot check — URLs, references between
//! sections, duplicate model names, limits — each error naming its key path.

use std::collections::HashSet;

use super::{Config, ConfigError, Egress, ProbeKind, RemoteConfig, RouteConfig};

impl Config {
    /// Check everything that parsing cannot: URLs, references between sections,
    /// duplicate model names, non-zero limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_server()?;
        // Every public model name (remote models, the local model's, routes and aliases)
        // is served once.
        let mut public: HashSet<String> = HashSet::new();
        for (name, remote) in &self.remotes {
            check_remote(name, remote, &mut public)?;
        }
        self.check_router()?;
        self.check_local(&mut public)?;
        for (i, route) in self.routes.iter().enumerate() {
            self.check_route(i, route, &mut public)?;
        }
        Ok(())
    }

    /// `[server]` and `[alerts]`.
    fn check_server(&self) -> Result<(), ConfigError> {
        if self.server.max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "server.max_body_bytes",
                "must be greater than 0",
            ));
        }
        for (i, env) in self.server.client_api_key_envs.iter().enumerate() {
            check_env_name(&format!("server.client_api_key_envs[{i}]"), env)?;
        }
        for (i, env) in self.server.admin_api_key_envs.iter().enumerate() {
            check_env_name(&format!("server.admin_api_key_envs[{i}]"), env)?;
        }
        if self.server.max_connections == 0 {
            return Err(ConfigError::invalid(
                "server.max_connections",
                "must be greater than 0",
            ));
        }
        for (field, value) in [
            ("header_read_timeout", self.server.header_read_timeout),
            ("body_read_timeout", self.server.body_read_timeout),
            ("idle_timeout", self.server.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::invalid(
                    format!("server.{field}"),
                    "must be greater than 0",
                ));
            }
        }
        for (i, env) in self.alerts.webhook_envs.iter().enumerate() {
            check_env_name(&format!("alerts.webhook_envs[{i}]"), env)?;
        }
        Ok(())
    }

    /// `[router]`.
    fn check_router(&self) -> Result<(), ConfigError> {
        if self.router.failure_threshold == 0 {
            return Err(ConfigError::invalid(
                "router.failure_threshold",
                "must be at least 1",
            ));
        }
        if self.router.cooldown.is_zero() || self.router.max_cooldown < self.router.cooldown {
            return Err(ConfigError::invalid(
                "router.max_cooldown",
                "router.cooldown must be greater than 0 and router.max_cooldown at least router.cooldown",
            ));
        }
        if self.router.backoff_min.is_zero() {
            return Err(ConfigError::invalid(
                "router.backoff_min",
                "must be greater than 0",
            ));
        }
        if self.router.backoff_max < self.router.backoff_min {
            return Err(ConfigError::invalid(
                "router.backoff_max",
                format!(
                    "must be at least router.backoff_min ({}), got {}",
                    humantime::format_duration(self.router.backoff_min),
                    humantime::format_duration(self.router.backoff_max)
                ),
            ));
        }
        if !(0.0..=10.0).contains(&self.router.retry_budget_ratio) {
            return Err(ConfigError::invalid(
                "router.retry_budget_ratio",
                format!("must be between 0 and 10, got {}", self.router.retry_budget_ratio),
            ));
        }
        Ok(())
    }

    /// `[local]`; its served name joins `public`.
    fn check_local(&self, public: &mut HashSet<String>) -> Result<(), ConfigError> {
        if self.local.queue_capacity == 0 {
            return Err(ConfigError::invalid(
                "local.queue_capacity",
                "must be greater than 0",
            ));
        }
        if self.local.max_batch == 0 {
            return Err(ConfigError::invalid("local.max_batch", "must be greater than 0"));
        }
        if self.local.kv_cache_mib == 0 {
            return Err(ConfigError::invalid(
                "local.kv_cache_mib",
                "must be greater than 0",
            ));
        }
        if self.local.default_max_tokens == 0 {
            return Err(ConfigError::invalid(
                "local.default_max_tokens",
                "must be greater than 0",
            ));
        }
        let max_n = crate::api::validate::MAX_N;
        if !(1..=max_n).contains(&self.local.max_n) {
            return Err(ConfigError::invalid(
                "local.max_n",
                format!("must be between 1 and {max_n}, got {}", self.local.max_n),
            ));
        }
        if self.local.stalled_client_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "local.stalled_client_timeout",
                "must be greater than 0",
            ));
        }
        if self.local.served_model_name.is_some() && self.local.model.is_none() {
            return Err(ConfigError::invalid(
                "local.served_model_name",
                "is set but local.model (--model) is not",
            ));
        }
        if self.local.chat_template.is_some() && self.local.model.is_none() {
            return Err(ConfigError::invalid(
                "local.chat_template",
                "is set but local.model (--model) is not",
            ));
        }
        if let Some(name) = self.local.served_name()
            && !public.insert(name.clone())
        {
            return Err(ConfigError::invalid(
                "local.served_model_name",
                format!("model name {name:?} is already served by a remote"),
            ));
        }
        Ok(())
    }

    /// `routes[i]`: its remote, canary and chain exist, its names are new.
    fn check_route(
        &self,
        i: usize,
        route: &RouteConfig,
        public: &mut HashSet<String>,
    ) -> Result<(), ConfigError> {
        let key = |field: &str| format!("routes[{i}].{field}");
        if route.name.trim().is_empty() {
            return Err(ConfigError::invalid(key("name"), "must not be empty"));
        }
        if route.egress == Egress::LocalOnly {
            if self.local.model.is_none() {
                return Err(ConfigError::invalid(
                    key("egress"),
                    "is local-only but no local model is configured (local.model / --model)",
                ));
            }
            if !route.remote.is_empty() {
                return Err(ConfigError::invalid(
                    key("remote"),
                    "must not be set on a local-only route: nothing leaves the box",
                ));
            }
        } else if !self.remotes.contains_key(&route.remote) {
            let known: Vec<&str> = self.remotes.keys().map(String::as_str).collect();
            return Err(ConfigError::invalid(
                key("remote"),
                format!(
                    "no remote named {:?} (defined remotes: {})",
                    route.remote,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        if let Some(canary) = &route.canary {
            if !(canary.share > 0.0 && canary.share < 1.0) {
                return Err(ConfigError::invalid(
                    key("canary.share"),
                    format!("must be between 0 and 1 (exclusive), got {}", canary.share),
                ));
            }
            if !self.remotes.contains_key(&canary.remote) {
                return Err(ConfigError::invalid(
                    key("canary.remote"),
                    format!("no remote named {:?}", canary.remote),
                ));
            }
            if route.egress == Egress::LocalOnly {
                return Err(ConfigError::invalid(
                    key("canary"),
                    "a local-only route cannot have a canary",
                ));
            }
        }
        self.check_fallbacks(i, route)?;
        for (j, name) in std::iter::once(&route.name).chain(&route.aliases).enumerate() {
            if !public.insert(name.clone()) {
                let field = if j == 0 {
                    "name".to_string()
                } else {
                    format!("aliases[{}]", j - 1)
                };
                return Err(ConfigError::invalid(
                    key(&field),
                    format!("model name {name:?} is defined twice"),
                ));
            }
        }
        Ok(())
    }
}

/// `remotes.NAME`: URL, keys, deadlines and caps; its models join `public`.
fn check_remote(name: &str, remote: &RemoteConfig, public: &mut HashSet<String>) -> Result<(), ConfigError> {
    let key = |field: &str| format!("remotes.{name}.{field}");
    check_base_url(&key("base_url"), &remote.base_url)?;
    if remote.probe == ProbeKind::Chat && remote.probe_model.is_none() && remote.models.is_empty() {
        return Err(ConfigError::invalid(
            key("probe_model"),
            "a chat probe needs a model: set probe_model or list models",
        ));
    }
    check_key_sources(name, remote)?;
    for (field, value) in [
        ("connect_timeout", remote.connect_timeout),
        ("first_token_timeout", remote.first_token_timeout),
        ("idle_timeout", remote.idle_timeout),
        ("total_timeout", remote.total_timeout),
    ] {
        if value.is_zero() {
            return Err(ConfigError::invalid(key(field), "must be greater than 0"));
        }
    }
    for (field, value, floor) in [
        ("max_frame_bytes", remote.max_frame_bytes, 1024),
        ("max_json_body_bytes", remote.max_json_body_bytes, 1024),
        ("max_answer_bytes", remote.max_answer_bytes, 1024),
    ] {
        if value < floor {
            return Err(ConfigError::invalid(
                key(field),
                format!("must be at least {floor} bytes (got {value}); one answer chunk is larger"),
            ));
        }
    }
    if !(remote.deadline_multiplier.is_finite() && remote.deadline_multiplier >= 1.0) {
        return Err(ConfigError::invalid(
            key("deadline_multiplier"),
            format!("must be at least 1 (got {})", remote.deadline_multiplier),
        ));
    }
    if remote.context_window == Some(0) {
        return Err(ConfigError::invalid(
            key("context_window"),
            "must be greater than 0",
        ));
    }
    if remote.egress == Egress::LocalOnly {
        return Err(ConfigError::invalid(
            key("egress"),
            "a remote cannot be local-only; add a [[routes]] entry with egress = \"local-only\"",
        ));
    }
    for (i, model) in remote.models.iter().enumerate() {
        if model.trim().is_empty() {
            return Err(ConfigError::invalid(
                key(&format!("models[{i}]")),
                "must not be empty",
            ));
        }
        if !public.insert(model.clone()) {
            return Err(ConfigError::invalid(
                key(&format!("models[{i}]")),
                format!("model name {model:?} is already served by another remote or route"),
            ));
        }
    }
    Ok(())
}

impl Config {
    /// A route's chain: known remotes, not too long, no target twice (a cycle would call
    /// a failing gateway again), none on a local-only route.
    fn check_fallbacks(&self, i: usize, route: &RouteConfig) -> Result<(), ConfigError> {
        let key = |field: String| format!("routes[{i}].{field}");
        if route.fallbacks.is_empty() {
            return Ok(());
        }
        if route.egress == Egress::LocalOnly {
            return Err(ConfigError::invalid(
                key("fallbacks".into()),
                "a local-only route cannot have remote fallbacks",
            ));
        }
        if route.fallbacks.len() > super::MAX_FALLBACKS {
            return Err(ConfigError::invalid(
                key("fallbacks".into()),
                format!(
                    "has {} entries; at most {} are allowed",
                    route.fallbacks.len(),
                    super::MAX_FALLBACKS
                ),
            ));
        }
        let mut seen = vec![(route.remote.clone(), route.model_at(None))];
        for (j, fallback) in route.fallbacks.iter().enumerate() {
            if !self.remotes.contains_key(&fallback.remote) {
                return Err(ConfigError::invalid(
                    key(format!("fallbacks[{j}].remote")),
                    format!("no remote named {:?}", fallback.remote),
                ));
            }
            let target = (
                fallback.remote.clone(),
                route.model_at(fallback.remote_model.as_ref()),
            );
            if seen.contains(&target) {
                return Err(ConfigError::invalid(
                    key(format!("fallbacks[{j}]")),
                    format!(
                        "{} / {} is already earlier in the chain (a cycle)",
                        target.0, target.1
                    ),
                ));
            }
            seen.push(target);
        }
        Ok(())
    }
}

fn check_base_url(key: &str, url: &str) -> Result<(), ConfigError> {
    if url.is_empty() {
        return Err(ConfigError::invalid(
            key,
            "is required (the gateway's base URL ending in /v1)",
        ));
    }
    // The URL may carry credentials (`https://user:pass@host`): errors show it redacted.
    let shown = super::redact_text(url);
    let parsed = reqwest::Url::parse(url)
        .map_err(|err| ConfigError::invalid(key, format!("{shown:?} is not a valid URL: {err}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ConfigError::invalid(
            key,
            format!("{shown:?} must start with http:// or https://"),
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(ConfigError::invalid(
            key,
            format!("{shown:?} must not have a query or fragment"),
        ));
    }
    Ok(())
}

/// A remote's key comes from one place: `api_key_env`, `api_key_envs` (several keys, each
/// named once) or `api_key_file`. Mixing them would leave the order and the rotation of the
/// keys to guesswork, so it is refused.
fn check_key_sources(name: &str, remote: &RemoteConfig) -> Result<(), ConfigError> {
    let key = |field: &str| format!("remotes.{name}.{field}");
    if let Some(env) = &remote.api_key_env {
        check_env_name(&key("api_key_env"), env)?;
    }
    for (i, env) in remote.api_key_envs.iter().enumerate() {
        let at = key(&format!("api_key_envs[{i}]"));
        check_env_name(&at, env)?;
        if let Some(first) = remote.api_key_envs[..i].iter().position(|e| e == env) {
            return Err(ConfigError::invalid(
                at,
                format!("{env} is already listed as api_key_envs[{first}]"),
            ));
        }
    }
    let sources = [
        ("api_key_env", remote.api_key_env.is_some()),
        ("api_key_envs", !remote.api_key_envs.is_empty()),
        ("api_key_file", remote.api_key_file.is_some()),
    ];
    let set: Vec<&str> = sources
        .iter()
        .filter(|(_, on)| *on)
        .map(|(field, _)| *field)
        .collect();
    if set.len() > 1 {
        return Err(ConfigError::invalid(
            key(set[1]),
            format!(
                "set one of api_key_env, api_key_envs or api_key_file, not {}",
                set.join(" and ")
            ),
        ));
    }
    if remote.key_cooldown.is_zero() {
        return Err(ConfigError::invalid(
            key("key_cooldown"),
            "must be greater than 0",
        ));
    }
    Ok(())
}

fn check_env_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!(
                "{name:?} is not an environment variable name (it must name the variable, never hold the key)"
            ),
        ))
    }
}
