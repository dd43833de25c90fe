//! What the local engine checks before it spends any work on a request, cheapest first:
//! `n`, the prompt's size in bytes (a prompt that cannot fit is never tokenized), a place
//! in the queue (taken before tokenization, so a burst of huge prompts cannot all be
//! tokenized at once), and, once tokenized, the context and `max_tokens`.

use std::sync::{Arc, atomic::Ordering};

use crate::backend::{BackendError, BackendRequest, ErrorKind, Prompt};
use crate::engine::{Shared, local_error};

/// A prompt longer than this many bytes per context token cannot fit: real tokenizers
/// average 3–5 bytes of text per token (4 for English, less for code and CJK), so 8 leaves
/// room for unusual text while refusing, say, 8 MB for a 512-token model at once.
pub(super) const MAX_PROMPT_BYTES_PER_TOKEN: usize = 8;

/// After tokenizing a prompt this large, the allocator is asked to give free memory back:
/// tokenization takes ~200 bytes per byte of text, and glibc keeps what was freed.
pub(crate) const TRIM_AFTER_PROMPT_BYTES: usize = 256 * 1024;

/// A place in the local queue, held from before tokenization until the engine starts the
/// request (or until the request is dropped on the way): exactly `queue_capacity`
/// requests are in between, whether being tokenized, in the channel or waiting in the
/// engine's fair queue.
#[derive(Debug)]
pub(crate) struct QueueTicket {
    shared: Arc<Shared>,
}

impl QueueTicket {
    /// A place, or `None` when `capacity` requests already hold one.
    pub(crate) fn take(shared: &Arc<Shared>, capacity: usize) -> Option<QueueTicket> {
        if shared.queued.fetch_add(1, Ordering::SeqCst) >= capacity {
            shared.queued.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(QueueTicket {
            shared: shared.clone(),
        })
    }
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `n` beyond the local limit is the client's mistake, reported like OpenAI's own.
pub(crate) fn check_n(n: u32, max_n: u32) -> Result<(), BackendError> {
    if n <= max_n {
        return Ok(());
    }
    let mut err = local_error(
        ErrorKind::BadRequest,
        format!(
            "Invalid 'n': the local model generates at most {max_n} choices per request (local.max_n), got {n}."
        ),
    );
    err.param = Some("n".into());
    Err(err)
}

/// Refuse a prompt by its size before it is rendered or tokenized.
pub(crate) fn check_prompt_bytes(attempt: &BackendRequest, context: usize) -> Result<usize, BackendError> {
    let bytes = attempt.prompt_bytes();
    let limit = context.saturating_mul(MAX_PROMPT_BYTES_PER_TOKEN);
    if bytes <= limit {
        return Ok(bytes);
    }
    let mut err = local_error(
        ErrorKind::BadRequest,
        format!(
            "This model's maximum context length is {context} tokens; the prompt is {bytes} bytes \
             long, more than {limit} bytes ({MAX_PROMPT_BYTES_PER_TOKEN} per token) can fit."
        ),
    );
    err.param = Some(prompt_param(&attempt.request.prompt).into());
    err.code = Some("context_length_exceeded".into());
    Err(err)
}

/// The tokens to generate: what the client asked if it fits the context (refused
/// otherwise, as vLLM does), else `default_max_tokens` or what the context has left.
pub(crate) fn fit_max_tokens(
    prompt: &Prompt,
    prompt_tokens: usize,
    context: usize,
    asked: Option<u32>,
    default_max_tokens: u32,
) -> Result<usize, BackendError> {
    let context_error = |message: String, param: &str| {
        let mut err = local_error(ErrorKind::BadRequest, message);
        err.param = Some(param.into());
        err.code = Some("context_length_exceeded".into());
        err
    };
    if prompt_tokens >= context {
        return Err(context_error(
            format!(
                "This model's maximum context length is {context} tokens; the prompt has {prompt_tokens} tokens."
            ),
            prompt_param(prompt),
        ));
    }
    let room = context - prompt_tokens;
    match asked {
        Some(asked) if asked as usize > room => Err(context_error(
            format!(
                "This model's maximum context length is {context} tokens; the prompt has {prompt_tokens} tokens \
                 and max_tokens asks for {asked} more."
            ),
            "max_tokens",
        )),
        Some(asked) => Ok(asked as usize),
        // Unset: a cap, as vLLM and llama.cpp's server have, so one request cannot hold a
        // slot for the whole context.
        None => Ok(room.min(default_max_tokens as usize)),
    }
}

fn prompt_param(prompt: &Prompt) -> &'static str {
    match prompt {
        Prompt::Chat(_) => "messages",
        Prompt::Text(_) => "prompt",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ChatMessage, Continuation, GenerationRequest, SamplingParams, ToolChoice, Tools};

    fn chat(content: &str) -> GenerationRequest {
        GenerationRequest::chat("m", content, SamplingParams::default())
    }

    fn attempt(content: &str) -> BackendRequest {
        BackendRequest::new("m", std::sync::Arc::new(chat(content)))
    }

    #[test]
    fn prompt_bytes_count_every_text_the_template_renders() {
        let mut request = chat("hello");
        assert_eq!(request.prompt_bytes(), 5);
        request.tools = Some(Tools {
            functions: vec!["a".into()],
            choice: ToolChoice::Auto,
            definitions: serde_json::json!([{"a": 1}]),
        });
        let mut assistant = ChatMessage::text("assistant", "ok");
        assistant.tool_calls = Some(serde_json::json!(["x"]));
        request.prompt = Prompt::Chat(vec![ChatMessage::text("user", "hello"), assistant]);
        assert_eq!(request.prompt_bytes(), 5 + 2 + 5 + 9);
        let mut with_continuation = BackendRequest::new("m", std::sync::Arc::new(request.clone()));
        with_continuation.continuation = Some(Continuation {
            reasoning: "r".into(),
            content: "c".into(),
        });
        assert_eq!(with_continuation.prompt_bytes(), 5 + 2 + 5 + 9 + 2);
        request.prompt = Prompt::Text(vec!["abc".into(), "de".into()]);
        assert_eq!(request.prompt_bytes(), 5 + 9);
    }

    #[test]
    fn a_prompt_too_long_in_bytes_is_refused_before_tokenizing() {
        assert_eq!(
            check_prompt_bytes(&attempt(&"x".repeat(4096)), 512).ok(),
            Some(4096)
        );
        let err = check_prompt_bytes(&attempt(&"x".repeat(4097)), 512).err();
        let err = err.expect("refused");
        assert_eq!(err.kind, ErrorKind::BadRequest);
        assert_eq!(err.param.as_deref(), Some("messages"));
        assert_eq!(err.code.as_deref(), Some("context_length_exceeded"));
        assert!(
            err.message.contains("512 tokens") && err.message.contains("4097 bytes"),
            "{err}"
        );
    }

    #[test]
    fn n_beyond_the_local_limit_names_the_limit_and_the_value() {
        assert!(check_n(4, 4).is_ok());
        let err = check_n(128, 4).expect_err("refused");
        assert_eq!(err.param.as_deref(), Some("n"));
        assert!(
            err.message.contains("at most 4") && err.message.contains("got 128"),
            "{err}"
        );
    }

    #[test]
    fn max_tokens_unset_is_capped_by_the_default_and_the_context() {
        let chat = Prompt::Chat(vec![]);
        assert_eq!(fit_max_tokens(&chat, 100, 512, None, 2048).ok(), Some(412));
        assert_eq!(fit_max_tokens(&chat, 100, 8192, None, 2048).ok(), Some(2048));
        assert_eq!(
            fit_max_tokens(&chat, 100, 8192, Some(4000), 2048).ok(),
            Some(4000)
        );
        let too_many = fit_max_tokens(&chat, 100, 512, Some(413), 2048).err();
        assert_eq!(too_many.and_then(|e| e.param).as_deref(), Some("max_tokens"));
        let full = fit_max_tokens(&Prompt::Text(vec![]), 512, 512, None, 2048).err();
        assert_eq!(full.and_then(|e| e.param).as_deref(), Some("prompt"));
    }
}
