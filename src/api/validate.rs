//! Request bytes → [`GenerationRequest`], or a [`ValidationError`] that names the field,
//! the limit and the value received. Nothing past this point re-checks client input.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::types::{
    ChatCompletionRequest, CompletionRequest, RequestMessage, Role, StopField, StreamOptions, Tool,
};
use crate::backend::{
    ChatMessage, Endpoint, GenerationRequest, Prompt, RequestId, SamplingParams, StopSequences, ToolChoice,
    Tools,
};

/// Largest `n` accepted (OpenAI's own limit is 128).
pub const MAX_N: u32 = 128;
/// Most stop sequences accepted (OpenAI allows 4, DeepSeek 16; lifeboat the larger).
pub const MAX_STOP: usize = 16;
/// Accepted `repetition_penalty` (1 is none; 1.1–1.3 is usual).
pub const REPETITION_PENALTY_RANGE: (f32, f32) = (0.01, 100.0);
/// Largest `top_logprobs` accepted.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// A client mistake, reported as a 400 with `param` set.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("We could not parse the JSON body of your request: {0}")]
    InvalidJson(String),
    #[error("{message}")]
    Invalid { message: String, param: Option<String> },
}

impl ValidationError {
    fn invalid(param: &str, message: impl Into<String>) -> Self {
        ValidationError::Invalid {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// The request field at fault, if one is.
    pub fn param(&self) -> Option<&str> {
        match self {
            ValidationError::InvalidJson(_) => None,
            ValidationError::Invalid { param, .. } => param.as_deref(),
        }
    }
}

/// Parse and validate a body for `endpoint`, under a fresh id (callers outside the API).
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<GenerationRequest, ValidationError> {
    parse_as(endpoint, body, RequestId::generate(endpoint.id_prefix()))
}

/// Parse and validate a body for `endpoint` as the request `id` (made before parsing, so
/// that even a refused request's answer carries it).
pub fn parse_as(
    endpoint: Endpoint,
    body: &[u8],
    id: RequestId,
) -> Result<GenerationRequest, ValidationError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ValidationError::InvalidJson(
            "the body is empty; send a JSON object (Content-Type: application/json)".into(),
        ));
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|err| ValidationError::InvalidJson(err.to_string()))?;
    let Value::Object(raw) = value else {
        return Err(ValidationError::InvalidJson(format!(
            "expected a JSON object, got {}",
            json_type(&value)
        )));
    };
    match endpoint {
        Endpoint::ChatCompletions => chat(raw, id),
        Endpoint::Completions => completion(raw, id),
    }
}

/// The typed view of `raw`, which is handed back intact for forwarding (deserializing
/// from a reference avoids copying the whole body).
fn typed<T: DeserializeOwned>(raw: Map<String, Value>) -> Result<(T, Map<String, Value>), ValidationError> {
    let value = Value::Object(raw);
    let typed = serde_path_to_error::deserialize::<_, T>(&value).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner().to_string();
        let (param, message) = describe_serde_error(&path, &inner);
        ValidationError::Invalid {
            message,
            param: Some(param),
        }
    })?;
    match value {
        Value::Object(raw) => Ok((typed, raw)),
        _ => Err(ValidationError::InvalidJson("expected a JSON object".into())),
    }
}

/// Turn serde's wording into a message naming the parameter.
fn describe_serde_error(path: &str, inner: &str) -> (String, String) {
    let path = if path == "." { "" } else { path };
    if let Some(field) = inner
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        let param = if path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
        return (param.clone(), format!("Missing required parameter: '{param}'."));
    }
    let param = path.to_string();
    let inner = inner.split(" at line ").next().unwrap_or(inner);
    let message = if inner.contains("untagged enum StopField") {
        format!("Invalid type for '{param}': expected a string or an array of strings.")
    } else {
        format!("Invalid value for '{param}': {inner}.")
    };
    (param, message)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_range(param: &str, value: Option<f32>, min: f32, max: f32) -> Result<(), ValidationError> {
    match value {
        Some(v) if !(min..=max).contains(&v) => Err(ValidationError::invalid(
            param,
            format!("Invalid '{param}': must be between {min} and {max}, got {v}."),
        )),
        _ => Ok(()),
    }
}

/// Checks shared by both endpoints.
struct Common {
    model: String,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    stop: Option<StopField>,
}

fn common(c: Common, sampling: &mut SamplingParams) -> Result<(String, bool, bool), ValidationError> {
    if c.model.trim().is_empty() {
        return Err(ValidationError::invalid(
            "model",
            "Invalid 'model': must not be empty.",
        ));
    }
    let stream = c.stream.unwrap_or(false);
    let include_usage = match c.stream_options {
        Some(_) if !stream => {
            return Err(ValidationError::invalid(
                "stream_options",
                "Invalid 'stream_options': only allowed when 'stream' is true.",
            ));
        }
        Some(options) => options.include_usage.unwrap_or(false),
        None => false,
    };
    let n = c.n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ValidationError::invalid(
            "n",
            format!("Invalid 'n': must be between 1 and {MAX_N}, got {n}."),
        ));
    }
    sampling.n = n;
    sampling.stop = stop_sequences(c.stop)?;
    check_sampling(sampling)?;
    Ok((c.model, stream, include_usage))
}

/// `stop` as a list: at most [`MAX_STOP`] sequences, none empty.
fn stop_sequences(stop: Option<StopField>) -> Result<StopSequences, ValidationError> {
    let stop = match stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(list)) => list,
    };
    if stop.len() > MAX_STOP {
        return Err(ValidationError::invalid(
            "stop",
            format!(
                "Invalid 'stop': at most {MAX_STOP} sequences, got {}.",
                stop.len()
            ),
        ));
    }
    if let Some(i) = stop.iter().position(String::is_empty) {
        return Err(ValidationError::invalid(
            &format!("stop[{i}]"),
            format!("Invalid 'stop[{i}]': must not be empty."),
        ));
    }
    Ok(StopSequences(stop))
}

/// The ranges of the sampling parameters both endpoints share.
fn check_sampling(sampling: &SamplingParams) -> Result<(), ValidationError> {
    check_range("temperature", sampling.temperature, 0.0, 2.0)?;
    check_range("top_p", sampling.top_p, 0.0, 1.0)?;
    check_range("presence_penalty", sampling.presence_penalty, -2.0, 2.0)?;
    check_range("frequency_penalty", sampling.frequency_penalty, -2.0, 2.0)?;
    // A temperature of 1e-45 is within OpenAI's range and is forwarded to a remote as
    // sent; the local sampler treats it as greedy, which it is in all but exact ties.
    let (low, high) = REPETITION_PENALTY_RANGE;
    if let Some(p) = sampling.repetition_penalty.filter(|p| !(low..=high).contains(p)) {
        // Not OpenAI's parameter (vLLM's): a tiny one divided logits into infinities.
        return Err(ValidationError::invalid(
            "repetition_penalty",
            format!("Invalid 'repetition_penalty': must be between {low} and {high}, got {p}."),
        ));
    }
    if sampling.max_tokens == Some(0) {
        return Err(ValidationError::invalid(
            "max_tokens",
            "Invalid 'max_tokens': must be at least 1, got 0.",
        ));
    }
    Ok(())
}

fn chat(raw: Map<String, Value>, id: RequestId) -> Result<GenerationRequest, ValidationError> {
    let (mut req, raw): (ChatCompletionRequest, _) = typed(raw)?;
    if req.messages.is_empty() {
        return Err(ValidationError::invalid(
            "messages",
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
        ));
    }
    let messages = std::mem::take(&mut req.messages)
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    check_chat_options(&req)?;
    let tools = tools(req.tools.as_deref(), req.tool_choice.as_ref(), raw.get("tools"))?;
    let mut sampling = SamplingParams {
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        seed: req.seed.map(|s| s as u64),
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        logprobs: req.logprobs.unwrap_or(false),
        top_logprobs: req.top_logprobs,
        ..SamplingParams::default()
    };
    let (model, stream, include_usage) = common(
        Common {
            model: req.model,
            stream: req.stream,
            stream_options: req.stream_options,
            n: req.n,
            stop: req.stop,
        },
        &mut sampling,
    )?;
    Ok(GenerationRequest {
        id,
        endpoint: Endpoint::ChatCompletions,
        model,
        stream,
        include_usage,
        prompt: Prompt::Chat(messages),
        sampling,
        tools,
        raw,
        client: Default::default(),
    })
}

/// The chat-only options: `top_logprobs`, `response_format`, `max_completion_tokens`.
fn check_chat_options(req: &ChatCompletionRequest) -> Result<(), ValidationError> {
    if let Some(k) = req.top_logprobs.filter(|k| *k > MAX_TOP_LOGPROBS) {
        return Err(ValidationError::invalid(
            "top_logprobs",
            format!("Invalid 'top_logprobs': must be between 0 and {MAX_TOP_LOGPROBS}, got {k}."),
        ));
    }
    if req.top_logprobs.is_some() && req.logprobs != Some(true) {
        return Err(ValidationError::invalid(
            "top_logprobs",
            "Invalid 'top_logprobs': 'logprobs' must be true when 'top_logprobs' is set.",
        ));
    }
    if let Some(format) = &req.response_format
        && !matches!(format.kind.as_str(), "text" | "json_object" | "json_schema")
    {
        return Err(ValidationError::invalid(
            "response_format.type",
            format!(
                "Invalid 'response_format.type': expected 'text', 'json_object' or 'json_schema', got '{}'.",
                format.kind
            ),
        ));
    }
    if req.max_completion_tokens == Some(0) {
        return Err(ValidationError::invalid(
            "max_completion_tokens",
            "Invalid 'max_completion_tokens': must be at least 1, got 0.",
        ));
    }
    Ok(())
}

/// Check `tools` and `tool_choice` and type them; `None` when no tools are offered.
/// `definitions` is the client's `tools` array, kept for chat templates.
fn tools(
    offered: Option<&[Tool]>,
    choice: Option<&Value>,
    definitions: Option<&Value>,
) -> Result<Option<Tools>, ValidationError> {
    let offered = offered.unwrap_or_default();
    for (i, tool) in offered.iter().enumerate() {
        if tool.kind != "function" && tool.kind != "custom" {
            return Err(ValidationError::invalid(
                &format!("tools[{i}].type"),
                format!(
                    "Invalid 'tools[{i}].type': expected 'function', got '{}'.",
                    tool.kind
                ),
            ));
        }
        if tool.kind == "function" && tool.function.as_ref().is_none_or(|f| f.name.is_empty()) {
            return Err(ValidationError::invalid(
                &format!("tools[{i}].function.name"),
                format!("Missing required parameter: 'tools[{i}].function.name'."),
            ));
        }
    }
    let choice = tool_choice(choice)?;
    if offered.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tools {
        functions: offered
            .iter()
            .filter_map(|tool| tool.function.as_ref().map(|f| f.name.clone()))
            .collect(),
        choice,
        definitions: definitions.cloned().unwrap_or(Value::Null),
    }))
}

/// `tool_choice`: a mode, a named function, or a form passed on as it is.
fn tool_choice(choice: Option<&Value>) -> Result<ToolChoice, ValidationError> {
    Ok(match choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(ValidationError::invalid(
                    "tool_choice",
                    format!(
                        "Invalid 'tool_choice': expected 'none', 'auto', 'required' or an object, got '{other}'."
                    ),
                ));
            }
        },
        Some(Value::Object(object)) => match object.get("type").and_then(Value::as_str) {
            Some("function") => match object
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            {
                Some(name) if !name.is_empty() => ToolChoice::Function(name.to_string()),
                _ => {
                    return Err(ValidationError::invalid(
                        "tool_choice.function.name",
                        "Missing required parameter: 'tool_choice.function.name'.",
                    ));
                }
            },
            _ => ToolChoice::Other,
        },
        Some(other) => {
            return Err(ValidationError::invalid(
                "tool_choice",
                format!(
                    "Invalid type for 'tool_choice': expected a string or an object, got {}.",
                    json_type(other)
                ),
            ));
        }
    })
}

/// Check one message and flatten its content to text.
fn message(i: usize, m: RequestMessage) -> Result<ChatMessage, ValidationError> {
    let param = format!("messages[{i}].content");
    let content = match m.content {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Array(parts)) => Some(content_parts(&param, &parts)?),
        Some(other) => {
            return Err(ValidationError::invalid(
                &param,
                format!(
                    "Invalid type for '{param}': expected a string or an array of content parts, got {}.",
                    json_type(&other)
                ),
            ));
        }
    };
    let needs_content = match m.role {
        Role::Assistant => m.tool_calls.as_ref().is_none_or(Vec::is_empty),
        _ => true,
    };
    // An assistant turn may be an empty prefix; other roles must say something.
    if content.is_none() && needs_content && m.role != Role::Assistant {
        return Err(ValidationError::invalid(
            &param,
            format!("Missing required parameter: '{param}'."),
        ));
    }
    if m.role == Role::Tool && m.tool_call_id.as_deref().is_none_or(str::is_empty) {
        let param = format!("messages[{i}].tool_call_id");
        return Err(ValidationError::invalid(
            &param,
            format!("Missing required parameter: '{param}'."),
        ));
    }
    Ok(ChatMessage {
        role: m.role.as_str().to_string(),
        content,
        name: m.name,
        tool_calls: m.tool_calls.map(Value::Array),
        tool_call_id: m.tool_call_id,
        reasoning_content: m.reasoning_content,
    })
}

/// Join the text parts of array content; other part types (images, audio, files) are
/// checked for shape and left to the backend, which forwards them from the raw body.
fn content_parts(param: &str, parts: &[Value]) -> Result<String, ValidationError> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let part_param = format!("{param}[{j}]");
        let kind = part.get("type").and_then(Value::as_str).ok_or_else(|| {
            ValidationError::invalid(
                &format!("{part_param}.type"),
                format!("Missing required parameter: '{part_param}.type'."),
            )
        })?;
        if kind == "text" {
            let part_text = part.get("text").and_then(Value::as_str).ok_or_else(|| {
                ValidationError::invalid(
                    &format!("{part_param}.text"),
                    format!("Missing required parameter: '{part_param}.text' (a string)."),
                )
            })?;
            text.push_str(part_text);
        }
    }
    Ok(text)
}

/// `prompt` as text prompts; token-id prompts (`[1, 2]` or `[[1, 2]]`) give none (they
/// are forwarded as they are).
fn text_prompts(prompt: &Value) -> Result<Vec<String>, ValidationError> {
    Ok(match prompt {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if items.is_empty() => {
            return Err(ValidationError::invalid(
                "prompt",
                "Invalid 'prompt': empty array.",
            ));
        }
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        // Token-id prompts (`[1, 2]` or `[[1, 2]]`) are forwarded as they are.
        Value::Array(items)
            if items
                .iter()
                .all(|v| v.is_u64() || v.as_array().is_some_and(|a| a.iter().all(Value::is_u64))) =>
        {
            Vec::new()
        }
        other => {
            return Err(ValidationError::invalid(
                "prompt",
                format!(
                    "Invalid type for 'prompt': expected a string, an array of strings or token ids, got {}.",
                    json_type(other)
                ),
            ));
        }
    })
}

fn completion(raw: Map<String, Value>, id: RequestId) -> Result<GenerationRequest, ValidationError> {
    let (req, raw): (CompletionRequest, _) = typed(raw)?;
    let prompts = text_prompts(&req.prompt)?;
    let mut sampling = SamplingParams {
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        seed: req.seed.map(|s| s as u64),
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        logprobs: req.logprobs.is_some(),
        top_logprobs: req.logprobs,
        ..SamplingParams::default()
    };
    let (model, stream, include_usage) = common(
        Common {
            model: req.model,
            stream: req.stream,
            stream_options: req.stream_options,
            n: req.n,
            stop: req.stop,
        },
        &mut sampling,
    )?;
    Ok(GenerationRequest {
        id,
        endpoint: Endpoint::Completions,
        model,
        stream,
        include_usage,
        prompt: Prompt::Text(prompts),
        sampling,
        tools: None,
        raw,
        client: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_err(body: &str) -> ValidationError {
        parse(Endpoint::ChatCompletions, body.as_bytes()).expect_err("should be rejected")
    }

    #[test]
    fn table_of_bad_chat_requests() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("", None, "body is empty"),
            ("{", None, "could not parse the JSON"),
            ("[1]", None, "expected a JSON object, got an array"),
            (
                r#"{"model":"m"}"#,
                Some("messages"),
                "Missing required parameter: 'messages'",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
                "'model'",
            ),
            (r#"{"model":"m","messages":[]}"#, Some("messages"), "empty array"),
            (
                r#"{"model":"m","messages":"hi"}"#,
                Some("messages"),
                "Invalid value for 'messages'",
            ),
            (
                r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#,
                Some("messages[0].role"),
                "unknown variant `robot`",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}]}"#,
                Some("messages[0].content"),
                "Missing",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
                Some("messages[0].content"),
                "got a number",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text"}]}]}"#,
                Some("messages[0].content[0].text"),
                "Missing",
            ),
            (
                r#"{"model":"m","messages":[{"role":"tool","content":"r"}]}"#,
                Some("messages[0].tool_call_id"),
                "Missing",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#,
                Some("max_tokens"),
                "invalid type: string",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
                Some("max_tokens"),
                "invalid value",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                Some("max_tokens"),
                "at least 1",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                Some("temperature"),
                "between 0 and 2, got 3",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"repetition_penalty":1e-45}"#,
                Some("repetition_penalty"),
                "between 0.01 and 100",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":0}"#,
                Some("n"),
                "between 1 and 128",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":5}"#,
                Some("stop"),
                "string or an array",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
                Some("stream_options"),
                "only allowed",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":""}}]}"#,
                Some("tools[0].function.name"),
                "Missing",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"sometimes"}"#,
                Some("tool_choice"),
                "got 'sometimes'",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tool_choice":{"type":"function","function":{}}}"#,
                Some("tool_choice.function.name"),
                "Missing",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tool_choice":7}"#,
                Some("tool_choice"),
                "got a number",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"yaml"}}"#,
                Some("response_format.type"),
                "got 'yaml'",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_logprobs":3}"#,
                Some("top_logprobs"),
                "'logprobs' must be true",
            ),
        ];
        for (body, param, needle) in cases {
            let err = chat_err(body);
            assert_eq!(err.param(), *param, "param for {body}: {err}");
            assert!(err.to_string().contains(needle), "message for {body}: {err}");
        }
    }

    #[test]
    fn full_surface_is_accepted_and_raw_body_kept() {
        let body = r#"{
            "model": "deepseek-chat",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "look: "}, {"type": "image_url", "image_url": {"url": "data:x"}}, {"type": "text", "text": "this"}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"role": "assistant", "content": "prefix", "reasoning_content": "thought"}
            ],
            "stream": true, "stream_options": {"include_usage": true},
            "max_tokens": 10, "max_completion_tokens": 20, "n": 2, "seed": -3,
            "temperature": 0.5, "top_p": 0.9, "stop": "END",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": "auto", "response_format": {"type": "json_object"},
            "logprobs": true, "top_logprobs": 2, "presence_penalty": 0.1, "frequency_penalty": -0.1,
            "user": "u1", "brand_new_field": {"nested": true}
        }"#;
        let req = parse(Endpoint::ChatCompletions, body.as_bytes()).expect("valid");
        assert!(req.stream && req.include_usage);
        let tools = req.tools.as_ref().expect("tools");
        assert_eq!(tools.choice, ToolChoice::Auto);
        assert_eq!(tools.callable(), Some(&["f".to_string()][..]));
        assert_eq!(req.sampling.max_tokens, Some(20), "max_completion_tokens wins");
        assert_eq!(req.sampling.n, 2);
        assert_eq!(req.sampling.stop, StopSequences(vec!["END".into()]));
        let Prompt::Chat(messages) = &req.prompt else {
            panic!("chat prompt")
        };
        assert_eq!(messages[1].content.as_deref(), Some("look: this"));
        assert_eq!(req.raw["brand_new_field"]["nested"], true);
    }

    #[test]
    fn completion_prompts() {
        let ok = |body: &str| parse(Endpoint::Completions, body.as_bytes());
        let req = ok(r#"{"model":"m","prompt":["a","b"],"stop":["x","y"]}"#).expect("valid");
        assert_eq!(req.prompt, Prompt::Text(vec!["a".into(), "b".into()]));
        ok(r#"{"model":"m","prompt":[[1,2],[3]]}"#).expect("token ids are valid");
        let err = ok(r#"{"model":"m","prompt":{"a":1}}"#).expect_err("object prompt");
        assert_eq!(err.param(), Some("prompt"));
        let err = ok(r#"{"model":"m"}"#).expect_err("missing prompt");
        assert_eq!(err.param(), Some("prompt"));
    }

    #[test]
    fn tools_and_tool_choice_are_typed_once() {
        let chat = |extra: &str| {
            let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
            parse(Endpoint::ChatCompletions, body.as_bytes()).expect("valid")
        };
        let tools = r#","tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}},{"type":"function","function":{"name":"get_time"}}]"#;
        let offered = chat(tools).tools.expect("offered");
        assert_eq!(offered.functions, ["get_weather", "get_time"]);
        assert_eq!(offered.choice, ToolChoice::Auto);
        assert_eq!(offered.definitions[0]["function"]["parameters"]["type"], "object");
        let forced = chat(&format!(
            r#"{tools},"tool_choice":{{"type":"function","function":{{"name":"get_time"}}}}"#
        ));
        assert_eq!(
            forced.tools.expect("offered").choice,
            ToolChoice::Function("get_time".into())
        );
        let declined = chat(&format!(r#"{tools},"tool_choice":"none""#))
            .tools
            .expect("offered");
        assert_eq!(declined.callable(), None);
        let allowed = chat(&format!(
            r#"{tools},"tool_choice":{{"type":"allowed_tools","allowed_tools":{{}}}}"#
        ));
        assert_eq!(allowed.tools.expect("offered").choice, ToolChoice::Other);
        assert_eq!(chat(r#","tools":[]"#).tools, None);
        assert_eq!(chat("").tools, None);
    }
}
