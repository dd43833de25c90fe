//! Secrets by reference: looked up in the environment (or a file) by the name the config
//! gives, and never shown by `Debug` or `Display`.

use std::{collections::HashMap, fmt, path::Path};

use super::ConfigError;

/// Where secrets are looked up; the process environment in production, a map in tests.
pub trait EnvSource {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl EnvSource for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// A secret value (API key). Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself; call only where it is sent (an HTTP header) or compared.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Read a secret from a file (trimmed); `key` is the config path that named it.
pub fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| ConfigError::invalid(key, format!("cannot read {}: {err}", path.display())))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(ConfigError::invalid(key, format!("{} is empty", path.display())));
    }
    Ok(Secret(value.to_string()))
}

/// Read the secret held by environment variable `name`; `key` is the config path that
/// named it, for the error message.
pub fn resolve_secret(env: &dyn EnvSource, key: &str, name: &str) -> Result<Secret, ConfigError> {
    match env.var(name) {
        Some(value) if !value.trim().is_empty() => Ok(Secret(value.trim().to_string())),
        Some(_) => Err(ConfigError::invalid(
            key,
            format!("environment variable {name} is empty"),
        )),
        None => Err(ConfigError::invalid(
            key,
            format!("environment variable {name} is not set"),
        )),
    }
}
