//! Chat templates from `tokenizer_config.json`, rendered with minijinja plus the
//! Python-compatible string methods (`.strip()`, `.split()`, …) that real templates use.
//!
//! A template is code from a Hub repo, so it runs bounded: [`RENDER_FUEL`] instructions
//! (an endless loop ends in an error), [`MAX_RENDER_BYTES`] of output written through a
//! capped writer (a string doubled into the output stops at the cap instead of growing
//! in memory), and minijinja's own cap on `'x' * n` (100 MB). What fuel cannot bound is
//! a string doubled in a variable and never written: each doubling is a few instructions.
//! So [`ChatTemplate::new`] renders a sample conversation once and refuses a template
//! that runs out of fuel or past the size cap there, before any request is served.

use super::tool_calls::ToolCallFormat;
use minijinja::{Environment, ErrorKind, Value as JinjaValue, context};
use serde_json::{Map, Value};

use crate::backend::ChatMessage;
use crate::engine::EngineError;

const TEMPLATE_NAME: &str = "chat";

/// Instructions one render may execute. The R1 template takes a few dozen per message, so
/// this leaves room for templates a hundred times busier on thousand-message prompts, and
/// ends a runaway loop in under a second (see `docs/engine.md`).
pub const RENDER_FUEL: u64 = 20_000_000;

/// Largest rendered prompt. The request body is capped at `server.max_body_bytes`
/// (default 8 MiB), and a template adds markup, not multiples of the text.
pub const MAX_RENDER_BYTES: usize = 64 * 1024 * 1024;

/// A compiled chat template with the special tokens it refers to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The template mentions `<think>`: output may hold R1-style reasoning.
    pub uses_think: bool,
    /// The markup the template writes tool calls in, parsed back out of the output.
    pub tool_calls: Option<ToolCallFormat>,
    source: String,
}

impl ChatTemplate {
    /// Compile `source`; the error names the template problem.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, EngineError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| -> String {
            // Templates print today's date with it (Llama 3); a server's clock is UTC.
            use std::fmt::Write as _;
            let mut out = String::new();
            match write!(out, "{}", chrono::Utc::now().format(&format)) {
                Ok(()) => out,
                Err(_) => String::new(),
            }
        });
        // Hugging Face renders with trim_blocks and lstrip_blocks, and a `tojson` that
        // keeps key order, does not HTML-escape and separates like Python's json.dumps.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_filter("tojson", python_tojson);
        env.set_fuel(Some(RENDER_FUEL));
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|err| EngineError::Template(format!("cannot compile the chat template: {err}")))?;
        let template = ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            // `<think>` when the prompt opens it, `</think>` alone when the model does.
            uses_think: source.contains("think>"),
            tool_calls: ToolCallFormat::detect(source),
            source: source.to_string(),
        };
        template.check_bounded()?;
        Ok(template)
    }

    /// Render a sample conversation (system, tools, two turns) once and refuse the
    /// template if it runs out of fuel or writes past [`MAX_RENDER_BYTES`]. Other errors
    /// are the template's own rules (some refuse a system message) and pass.
    fn check_bounded(&self) -> Result<(), EngineError> {
        let messages = [
            ChatMessage::text("system", "You are a helpful assistant."),
            ChatMessage::text("user", "What is 2+2?"),
            ChatMessage::text("assistant", "4"),
            ChatMessage::text("user", "And 3+3?"),
        ];
        let tools = serde_json::json!([{"type": "function", "function": {
            "name": "add", "description": "Add two numbers",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}
        }}]);
        for tools in [None, Some(&tools)] {
            match self.render_bounded(&messages, tools) {
                Err(RenderError::Runaway(message)) => {
                    return Err(EngineError::Template(format!(
                        "refused: rendering a sample conversation {message}"
                    )));
                }
                Err(RenderError::Template(err)) => {
                    tracing::debug!(%err, "the chat template refused the sample conversation");
                }
                Ok(_) => {}
            }
        }
        Ok(())
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS and EOS token strings the template is rendered with.
    pub fn special_tokens(&self) -> (&str, &str) {
        (&self.bos_token, &self.eos_token)
    }

    /// Read `chat_template`, `bos_token` and `eos_token` from a `tokenizer_config.json`
    /// value. `None` when it has no template.
    pub fn from_tokenizer_config(config: &Value) -> Result<Option<ChatTemplate>, EngineError> {
        let source = match config.get("chat_template") {
            Some(Value::String(source)) => source.clone(),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => match list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
            {
                Some(source) => source.to_string(),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        let token = |key: &str| match config.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => o
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        };
        ChatTemplate::new(&source, &token("bos_token"), &token("eos_token")).map(Some)
    }

    /// Which kind of template this is, for `model inspect`: whether R1 reasoning is opened
    /// by the prompt (the output then holds only `</think>`) or written by the model.
    pub fn variant(&self) -> &'static str {
        let probe = self
            .render(&[ChatMessage::text("user", "2+2?")], None)
            .unwrap_or_default();
        if probe.trim_end().ends_with("<think>") {
            "R1, the prompt opens <think> (reasoning until </think>)"
        } else if self.uses_think {
            "R1, the model writes <think>…</think> itself"
        } else {
            "no reasoning markup"
        }
    }

    /// The prompt for `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage], tools: Option<&Value>) -> Result<String, EngineError> {
        self.render_bounded(messages, tools).map_err(|err| match err {
            RenderError::Runaway(message) => {
                EngineError::Template(format!("refused: the chat template {message}"))
            }
            RenderError::Template(err) => {
                EngineError::Template(format!("cannot render the chat template: {err}"))
            }
        })
    }

    /// Render within [`RENDER_FUEL`] and [`MAX_RENDER_BYTES`].
    fn render_bounded(&self, messages: &[ChatMessage], tools: Option<&Value>) -> Result<String, RenderError> {
        let messages: Vec<Value> = messages.iter().map(message_json).collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(RenderError::Template)?;
        let mut out = CappedWriter {
            bytes: Vec::new(),
            cap: MAX_RENDER_BYTES,
            overflowed: false,
        };
        let rendered = template.render_captured_to(
            context! {
                messages => JinjaValue::from_serialize(&messages),
                tools => tools.map(JinjaValue::from_serialize),
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            },
            &mut out,
        );
        match rendered {
            _ if out.overflowed => Err(RenderError::Runaway(format!(
                "wrote more than {MAX_RENDER_BYTES} bytes"
            ))),
            Err(err) if err.kind() == ErrorKind::OutOfFuel => Err(RenderError::Runaway(format!(
                "ran more than {RENDER_FUEL} instructions (out of fuel)"
            ))),
            Err(err) => Err(RenderError::Template(err)),
            Ok(_) => String::from_utf8(out.bytes).map_err(|err| {
                RenderError::Template(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("the output is not UTF-8: {err}"),
                ))
            }),
        }
    }
}

/// Why a render failed: a runaway (fuel or size), or the template's own error.
#[derive(Debug)]
enum RenderError {
    Runaway(String),
    Template(minijinja::Error),
}

/// Collects the rendered prompt and fails the write past `cap` bytes, which ends the
/// render (minijinja stops at the first failed write).
struct CappedWriter {
    bytes: Vec<u8>,
    cap: usize,
    overflowed: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.cap {
            self.overflowed = true;
            return Err(std::io::Error::other("the rendered prompt is too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers' `tojson`.
fn python_tojson(
    value: JinjaValue,
    kwargs: minijinja::value::Kwargs,
) -> Result<JinjaValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted for compatibility; Python's defaults are what templates rely on.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(width) => {
            let pad = vec![b' '; width];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&pad),
            );
            serde::Serialize::serialize(&value, &mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonCompact);
            serde::Serialize::serialize(&value, &mut ser)
        }
    };
    result.map_err(|err| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {err}")))?;
    let text = String::from_utf8(out)
        .map_err(|err| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {err}")))?;
    Ok(JinjaValue::from_safe_string(text))
}

/// Python's default JSON separators: `", "` between items, `": "` after keys.
struct PythonCompact;

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

fn message_json(message: &ChatMessage) -> Value {
    let mut map = Map::new();
    map.insert("role".into(), Value::String(message.role.clone()));
    map.insert(
        "content".into(),
        message.content.clone().map_or(Value::Null, Value::String),
    );
    for (key, value) in [
        ("name", message.name.clone()),
        ("tool_call_id", message.tool_call_id.clone()),
        ("reasoning_content", message.reasoning_content.clone()),
    ] {
        if let Some(value) = value {
            map.insert(key.into(), Value::String(value));
        }
    }
    if let Some(calls) = &message.tool_calls {
        map.insert("tool_calls".into(), calls.clone());
    }
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::text(role, content)
    }

    struct Case {
        name: &'static str,
        template: &'static str,
        messages: Vec<ChatMessage>,
        target: &'static str,
    }

    #[test]
    fn table() {
        let r1 = crate::engine::testing::tiny::R1_TEMPLATE;
        let cases = vec![
            Case {
                name: "r1 single turn opens think",
                template: r1,
                messages: vec![msg("user", "Hi")],
                target: "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>\n",
            },
            Case {
                name: "r1 system and history drop old reasoning",
                template: r1,
                messages: vec![
                    msg("system", "Be brief."),
                    msg("user", "2+2?"),
                    msg("assistant", "<think>\nadd</think>\n\n4"),
                    msg("user", "3+3?"),
                ],
                target: "<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜><｜User｜>3+3?<｜Assistant｜><think>\n",
            },
            Case {
                name: "pycompat string methods",
                template: "{% for m in messages %}{{ m.content.strip().upper() }}|{% endfor %}",
                messages: vec![msg("user", "  a b  ")],
                target: "A B|",
            },
        ];
        for case in cases {
            let template =
                ChatTemplate::new(case.template, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
                    .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let rendered = template
                .render(&case.messages, None)
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!(rendered, case.target, "{}", case.name);
        }
    }

    #[test]
    fn runaway_templates_are_refused_when_loaded() {
        let cases = [
            (
                "nested loops",
                "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
                "out of fuel",
            ),
            (
                "string doubled to 100 MB",
                "{% set ns = namespace(s='abc') %}{% for i in range(25) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
                "more than",
            ),
            (
                "repeat then double",
                "{% set ns = namespace(s='x' * 50000000) %}{% for i in range(3) %}{{ ns.s }}{% endfor %}",
                "more than",
            ),
        ];
        for (name, source, expected) in cases {
            let err = ChatTemplate::new(source, "", "").expect_err(name).to_string();
            assert!(err.contains("refused") && err.contains(expected), "{name}: {err}");
        }
    }

    #[test]
    fn a_template_that_runs_away_on_some_input_is_stopped_per_render() {
        let source = "{% for m in messages %}{% if m.content == 'spin' %}\
            {% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}\
            {% endif %}{{ m.content }}{% endfor %}";
        let template = ChatTemplate::new(source, "", "").expect("the sample conversation is fine");
        let err = template
            .render(&[msg("user", "spin")], None)
            .expect_err("runs away");
        assert!(err.to_string().contains("out of fuel"), "{err}");
        assert_eq!(
            template.render(&[msg("user", "hi")], None).expect("renders"),
            "hi"
        );
    }

    #[test]
    fn raise_exception_is_a_clear_error() {
        let template =
            ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").expect("compiles");
        let err = template.render(&[msg("user", "x")], None).expect_err("raises");
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }
}
