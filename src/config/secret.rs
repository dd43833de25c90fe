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

    /// A short name for the key in metrics and logs: the first 4 bytes of its SHA-256 in
    /// hex. 32 bits of a hash tell keys apart and reveal nothing usable about them.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.0.as_bytes());
        digest[..4].iter().map(|b| format!("{b:02x}")).collect()
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

/// Prefixes of key material in gateway texts (OpenAI, DeepSeek and similar keys,
/// organisation and project ids).
const KEY_PREFIXES: [&str; 8] = ["sk-", "sk_", "rk-", "pk-", "key-", "org-", "proj_", "proj-"];

/// Text from outside (a gateway's error message, a transport error naming a URL) with
/// what looks like a credential replaced by `<redacted>`: the userinfo of a URL
/// (`https://user:pass@host`), words that start like a key or an organisation id
/// (`sk-…`, `org-…`), a word after `Bearer`, and long random-looking tokens.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut after_bearer = false;
    let mut rest = text;
    while !rest.is_empty() {
        let start = rest.find(|c: char| !is_separator(c)).unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest.find(is_separator).unwrap_or(rest.len());
        let word = &rest[..end];
        if after_bearer && !word.is_empty() {
            out.push_str("<redacted>");
        } else {
            out.push_str(&redact_word(word));
        }
        after_bearer = word.eq_ignore_ascii_case("bearer");
        rest = &rest[end..];
    }
    out
}

fn is_separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '"' | '\'' | ',' | ';' | '(' | ')' | '<' | '>' | '[' | ']' | '{' | '}' | '`'
        )
}

fn redact_word(word: &str) -> String {
    if let Some(scheme_end) = word.find("://") {
        let authority_start = scheme_end + 3;
        let authority_end = word[authority_start..]
            .find(['/', '?', '#'])
            .map_or(word.len(), |i| authority_start + i);
        if let Some(at) = word[authority_start..authority_end].rfind('@') {
            return format!(
                "{}<redacted>{}",
                &word[..authority_start],
                &word[authority_start + at..]
            );
        }
        return word.to_string();
    }
    for prefix in KEY_PREFIXES {
        if word.len() > prefix.len() + 2 && word.starts_with(prefix) {
            return format!("{prefix}<redacted>");
        }
    }
    let token_like = word.len() >= 32
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && word.chars().any(|c| c.is_ascii_digit())
        && word.chars().any(|c| c.is_ascii_alphabetic());
    if token_like {
        return "<redacted>".to_string();
    }
    word.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_gateway_texts_are_redacted() {
        let cases = [
            (
                "Incorrect API key provided: sk-live-abc123. Org org-internal-42 has no access.",
                "Incorrect API key provided: sk-<redacted> Org org-<redacted> has no access.",
            ),
            (
                "error sending request for url (https://admin:hunter2@gw.internal:8443/v1/chat)",
                "error sending request for url (https://<redacted>@gw.internal:8443/v1/chat)",
            ),
            ("header was Bearer abc.def", "header was Bearer <redacted>"),
            (
                "token 4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a leaked",
                "token <redacted> leaked",
            ),
            (
                "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]",
                "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]",
            ),
            ("http://gw/v1 and ünïcode", "http://gw/v1 and ünïcode"),
        ];
        for (text, expected) in cases {
            assert_eq!(redact_text(text), expected, "{text}");
        }
    }
}
