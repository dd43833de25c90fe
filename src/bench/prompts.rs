//! The prompt sets every target is driven with: built-in short, medium and long chat
//! prompts, or a JSONL file; always in the same order so targets see the same requests.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::BenchError;

/// One chat request's messages (`[{"role": …, "content": …}, …]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prompt {
    pub messages: Vec<Value>,
}

/// A built-in prompt set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinPrompts {
    /// One-line questions.
    Short,
    /// A paragraph of context and a task.
    Medium,
    /// A long document to summarise (about a thousand words).
    Long,
    /// Short, medium and long in turn.
    Mixed,
}

const SHORT: [&str; 4] = [
    "What is a circuit breaker in a web service?",
    "Name three uses of a hash map.",
    "Explain TCP slow start in one sentence.",
    "Write a haiku about failover.",
];

const MEDIUM: [&str; 3] = [
    "A team runs an OpenAI-compatible gateway in front of a hosted model and a local GPU. \
     The hosted model sometimes answers slowly, returns 429 errors or goes down for minutes. \
     Describe how a proxy should decide when to retry, when to fail over to the local model, \
     and how it should avoid a retry storm. Answer in a numbered list.",
    "Here is a Rust function that sums a vector: fn sum(v: &Vec<i64>) -> i64 { let mut s = 0; \
     for i in 0..v.len() { s = s + v[i]; } s }. Review it: point out what is not idiomatic, \
     what could overflow, and rewrite it the way an experienced Rust engineer would.",
    "Compare renting a GPU by the hour with buying one for serving a language model to a team \
     of twenty engineers. Consider utilisation, power, depreciation and the price of a hosted \
     API per million tokens. Conclude with a rule of thumb.",
];

/// The paragraph repeated to build the long prompt.
const LONG_PARAGRAPH: &str = "Server-sent events carry a stream of tokens from the model to the \
client. Each event is a line starting with data, followed by a JSON chunk, and the stream ends \
with a done marker. Proxies must not buffer these events, must forward keep-alive comments \
without treating them as progress, and must report an error inside the stream once the first \
token has been sent, because the HTTP status can no longer change. ";

impl BuiltinPrompts {
    /// The set's prompts, in their fixed order.
    pub fn prompts(self) -> Vec<Prompt> {
        let user = |text: String| Prompt {
            messages: vec![serde_json::json!({"role": "user", "content": text})],
        };
        let long = || {
            let document = LONG_PARAGRAPH.repeat(14);
            user(format!(
                "Summarise the following notes in five bullet points.\n\n{document}"
            ))
        };
        match self {
            BuiltinPrompts::Short => SHORT.iter().map(|t| user((*t).to_string())).collect(),
            BuiltinPrompts::Medium => MEDIUM.iter().map(|t| user((*t).to_string())).collect(),
            BuiltinPrompts::Long => vec![long()],
            BuiltinPrompts::Mixed => vec![
                user(SHORT[0].to_string()),
                user(MEDIUM[0].to_string()),
                long(),
                user(SHORT[1].to_string()),
                user(MEDIUM[1].to_string()),
            ],
        }
    }
}

/// One line of a prompt file: `{"messages": [...]}` or `{"prompt": "text"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    messages: Option<Vec<Value>>,
    prompt: Option<String>,
}

/// Read a JSONL prompt file; blank lines are skipped, anything else must parse.
pub fn load_jsonl(path: &Path) -> Result<Vec<Prompt>, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|source| BenchError::PromptFile {
        path: path.to_path_buf(),
        message: source.to_string(),
    })?;
    let bad = |line: usize, message: String| BenchError::PromptFile {
        path: path.to_path_buf(),
        message: format!("line {line}: {message}"),
    };
    let mut prompts = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: PromptLine = serde_json::from_str(line).map_err(|e| bad(index + 1, e.to_string()))?;
        let messages = match (parsed.messages, parsed.prompt) {
            (Some(messages), None) if !messages.is_empty() => messages,
            (None, Some(prompt)) => vec![serde_json::json!({"role": "user", "content": prompt})],
            _ => {
                return Err(bad(
                    index + 1,
                    "expected exactly one of \"messages\" (non-empty) or \"prompt\"".into(),
                ));
            }
        };
        prompts.push(Prompt { messages });
    }
    if prompts.is_empty() {
        return Err(BenchError::PromptFile {
            path: path.to_path_buf(),
            message: "no prompts in the file".into(),
        });
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sets_are_fixed_and_nonempty() {
        for set in [
            BuiltinPrompts::Short,
            BuiltinPrompts::Medium,
            BuiltinPrompts::Long,
            BuiltinPrompts::Mixed,
        ] {
            let prompts = set.prompts();
            assert!(!prompts.is_empty());
            assert_eq!(prompts, set.prompts());
        }
    }

    #[test]
    fn jsonl_lines_and_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\":\"hi\"}\n\n{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}\n",
        )
        .expect("write");
        assert_eq!(load_jsonl(&path).expect("loads").len(), 2);
        std::fs::write(&path, "{\"prompt\":\"hi\"}\nnot json\n").expect("write");
        let message = load_jsonl(&path).expect_err("fails").to_string();
        assert!(message.contains("line 2"), "{message}");
    }
}
