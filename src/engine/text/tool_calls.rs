//! Turns the tool calls a local model writes as text into OpenAI `tool_calls`, so a client
//! that sends `tools` gets the same answer shape from the local fallback as from the
//! gateway (as vLLM's tool parsers do). Two markups, chosen by the chat template:
//! Hermes-style `<tool_call>{"name": …, "arguments": …}</tool_call>` (Qwen2.5, Qwen3) and
//! DeepSeek's (V3, R1)
//! ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME ```json ARGS```
//! <｜tool▁call▁end｜>…<｜tool▁calls▁end｜>``.
//!
//! Small models often skip the markup and answer with the bare call instead
//! (Qwen2.5-Coder writes `{"name": "get_weather", "arguments": {…}}`, sometimes inside a
//! `` ```json `` fence): an answer that is only such an object (or a list of them), naming an
//! offered tool, is a call too. To tell, an answer that opens with `{`, `[` or a fence is
//! held until it ends.
//!
//! Text outside the markup stays content. A block that does not parse (broken JSON, no
//! name, cut by `max_tokens`) is passed on as content, exactly as written: nothing is lost.

use serde_json::Value;

use super::reasoning::partial_tag;
use crate::backend::{FunctionCallDelta, ToolCallDelta};

/// How a model's template writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// `<tool_call>\n{"name": "f", "arguments": {…}}\n</tool_call>`, one block per call.
    Hermes,
    /// DeepSeek V3/R1: one `<｜tool▁calls▁begin｜>` block holding every call.
    DeepSeek,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const DEEPSEEK_OPEN: &str = "<｜tool▁calls▁begin｜>";
const DEEPSEEK_CLOSE: &str = "<｜tool▁calls▁end｜>";
const DEEPSEEK_CALL_OPEN: &str = "<｜tool▁call▁begin｜>";
const DEEPSEEK_CALL_CLOSE: &str = "<｜tool▁call▁end｜>";
const DEEPSEEK_SEP: &str = "<｜tool▁sep｜>";

impl ToolCallFormat {
    /// The markup a chat template teaches, if any.
    pub fn detect(template_source: &str) -> Option<ToolCallFormat> {
        if template_source.contains(DEEPSEEK_CALL_OPEN) {
            Some(ToolCallFormat::DeepSeek)
        } else if template_source.contains(HERMES_OPEN) {
            Some(ToolCallFormat::Hermes)
        } else {
            None
        }
    }

    fn open(self) -> &'static str {
        match self {
            ToolCallFormat::Hermes => HERMES_OPEN,
            ToolCallFormat::DeepSeek => DEEPSEEK_OPEN,
        }
    }

    fn close(self) -> &'static str {
        match self {
            ToolCallFormat::Hermes => HERMES_CLOSE,
            ToolCallFormat::DeepSeek => DEEPSEEK_CLOSE,
        }
    }

    /// The calls of one block's body, or `None` when any of it does not parse.
    fn parse_block(self, body: &str) -> Option<Vec<ToolCall>> {
        match self {
            ToolCallFormat::Hermes => hermes_call(body).map(|call| vec![call]),
            ToolCallFormat::DeepSeek => deepseek_calls(body),
        }
    }
}

/// One function call: its name and its arguments as a JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// Text released by one push: content for the client, and complete calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub content: String,
    pub calls: Vec<ToolCall>,
}

/// Whether the answer as a whole may be a bare call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BareAnswer {
    /// Nothing but whitespace seen yet.
    Undecided,
    /// It opened like JSON: held until the end.
    Holding,
    /// It is ordinary text (or markup).
    No,
}

/// Streams content through while holding back anything that may be tool-call markup.
#[derive(Debug, Clone)]
pub struct ToolCallParser {
    format: ToolCallFormat,
    /// Names of the offered tools: a bare call must name one.
    tool_names: Vec<String>,
    bare: BareAnswer,
    held: String,
    inside: bool,
    /// Calls released so far (their OpenAI `index`es are 0..calls).
    calls: usize,
}

impl ToolCallParser {
    pub fn new(format: ToolCallFormat, tool_names: Vec<String>) -> ToolCallParser {
        ToolCallParser {
            format,
            tool_names,
            bare: BareAnswer::Undecided,
            held: String::new(),
            inside: false,
            calls: 0,
        }
    }

    /// Calls released so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    pub fn push(&mut self, text: &str) -> Parsed {
        let mut out = Parsed::default();
        self.held.push_str(text);
        if self.bare == BareAnswer::Undecided {
            let start = self.held.trim_start();
            if start.is_empty() {
                return out;
            }
            let json_like =
                start.starts_with(['{', '[']) || start.starts_with("```") || "```".starts_with(start);
            self.bare = if json_like && !self.tool_names.is_empty() {
                BareAnswer::Holding
            } else {
                BareAnswer::No
            };
        }
        if self.bare == BareAnswer::Holding {
            return out;
        }
        loop {
            if self.inside {
                let close = self.format.close();
                let Some(at) = self.held.find(close) else {
                    return out;
                };
                let block: String = self.held.drain(..at + close.len()).collect();
                self.inside = false;
                self.release_block(&block, &mut out);
            } else {
                let open = self.format.open();
                if let Some(at) = self.held.find(open) {
                    let before: String = self.held.drain(..at).collect();
                    self.release_content(&before, &mut out);
                    self.inside = true;
                } else {
                    let keep = partial_tag(&self.held, open);
                    let ready: String = self.held.drain(..self.held.len() - keep).collect();
                    self.release_content(&ready, &mut out);
                    return out;
                }
            }
        }
    }

    /// End of generation: an unclosed block is parsed if it can be (a model may stop right
    /// after its last call), else passed on as text; held text goes out as content.
    pub fn finish(&mut self) -> Parsed {
        if self.bare == BareAnswer::Holding {
            self.bare = BareAnswer::No;
            if let Some(calls) = bare_calls(&self.held, &self.tool_names) {
                self.held.clear();
                self.calls += calls.len();
                return Parsed {
                    content: String::new(),
                    calls,
                };
            }
            // Not a bare call: the held answer goes through the markup parser as usual.
            let held = std::mem::take(&mut self.held);
            let mut out = self.push(&held);
            let rest = self.finish();
            out.content.push_str(&rest.content);
            out.calls.extend(rest.calls);
            return out;
        }
        let mut out = Parsed::default();
        let held = std::mem::take(&mut self.held);
        if self.inside {
            self.inside = false;
            self.release_block(&held, &mut out);
        } else {
            self.release_content(&held, &mut out);
        }
        out
    }

    /// `block` runs from the opening marker to the closing one (or to the end).
    fn release_block(&mut self, block: &str, out: &mut Parsed) {
        let body = block
            .strip_prefix(self.format.open())
            .unwrap_or(block)
            .trim_end_matches(self.format.close());
        match self.format.parse_block(body) {
            Some(calls) if !calls.is_empty() => {
                self.calls += calls.len();
                out.calls.extend(calls);
            }
            _ => out.content.push_str(block),
        }
    }

    /// After a call, only text that says something is content (the line breaks between
    /// and after blocks are markup).
    fn release_content(&mut self, text: &str, out: &mut Parsed) {
        let text = if self.calls > 0 { text.trim_start() } else { text };
        out.content.push_str(text);
    }
}

/// `{"name": "f", "arguments": {…}}` (arguments may also be a JSON string).
fn hermes_call(body: &str) -> Option<ToolCall> {
    call_object(&serde_json::from_str(body.trim()).ok()?)
}

/// A whole answer that is one call object or a list of them (inside a ```json fence or
/// not), each naming an offered tool.
fn bare_calls(answer: &str, tool_names: &[String]) -> Option<Vec<ToolCall>> {
    let text = answer.trim();
    let text = text
        .strip_prefix("```json")
        .or_else(|| text.strip_prefix("```"))
        .and_then(|inner| inner.trim_end().strip_suffix("```"))
        .unwrap_or(text);
    let values = match serde_json::from_str::<Value>(text.trim()).ok()? {
        Value::Array(items) => items,
        object => vec![object],
    };
    // An object that only shares a `name` with a tool is data, not a call.
    let has_arguments = |v: &Value| v.get("arguments").or_else(|| v.get("parameters")).is_some();
    if !values.iter().all(has_arguments) {
        return None;
    }
    let calls = values.iter().map(call_object).collect::<Option<Vec<_>>>()?;
    let offered = |call: &ToolCall| tool_names.contains(&call.name);
    (!calls.is_empty() && calls.iter().all(offered)).then_some(calls)
}

/// `{"name": "f", "arguments": {…}}`; `parameters` is read as `arguments` (Llama 3's
/// spelling), and arguments written as a JSON string are taken as they are.
fn call_object(value: &Value) -> Option<ToolCall> {
    let name = value.get("name")?.as_str()?.to_string();
    if name.is_empty() {
        return None;
    }
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        None => "{}".to_string(),
        Some(Value::String(text)) => {
            serde_json::from_str::<Value>(text).ok()?;
            text.clone()
        }
        Some(args) => args.to_string(),
    };
    Some(ToolCall { name, arguments })
}

/// Every `<｜tool▁call▁begin｜>…<｜tool▁call▁end｜>` of a DeepSeek block; the last may lack
/// its end marker when the model stopped right after it.
fn deepseek_calls(body: &str) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let after_open = rest.strip_prefix(DEEPSEEK_CALL_OPEN)?;
        let (call, next) = after_open
            .split_once(DEEPSEEK_CALL_CLOSE)
            .unwrap_or((after_open, ""));
        calls.push(deepseek_call(call)?);
        rest = next.trim();
    }
    Some(calls)
}

/// `function<｜tool▁sep｜>NAME\n```json\nARGS\n```` (V3, R1) or `NAME<｜tool▁sep｜>ARGS`
/// (V3.1).
fn deepseek_call(call: &str) -> Option<ToolCall> {
    let (head, tail) = call.split_once(DEEPSEEK_SEP)?;
    let (name, arguments) = if head.trim() == "function" {
        let (name, args) = tail.split_once('\n').unwrap_or((tail, ""));
        (name.trim(), args)
    } else {
        (head.trim(), tail)
    };
    let arguments = arguments.trim();
    let arguments = arguments
        .strip_prefix("```json")
        .or_else(|| arguments.strip_prefix("```"))
        .map_or(arguments, |inner| inner.trim_end().trim_end_matches("```"))
        .trim();
    let arguments = if arguments.is_empty() { "{}" } else { arguments };
    serde_json::from_str::<Value>(arguments).ok()?;
    (!name.is_empty()).then(|| ToolCall {
        name: name.to_string(),
        arguments: arguments.to_string(),
    })
}

/// The whole of the call numbered `index` of a choice, as one delta.
pub fn delta_entry(call: &ToolCall, index: usize) -> ToolCallDelta {
    ToolCallDelta {
        index: u32::try_from(index).unwrap_or(u32::MAX),
        id: Some(call_id()),
        kind: Some("function".into()),
        function: Some(FunctionCallDelta {
            name: Some(call.name.clone()),
            arguments: Some(call.arguments.clone()),
        }),
        extra: Default::default(),
    }
}

/// `call_` and 24 random letters and digits, the shape OpenAI's ids have.
fn call_id() -> String {
    use rand::{Rng, distr::Alphanumeric};
    let suffix: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("call_{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `text` in pieces of `size` characters; collect everything released.
    fn run(format: ToolCallFormat, text: &str, size: usize) -> Parsed {
        run_offering(format, &[], text, size)
    }

    fn run_offering(format: ToolCallFormat, tools: &[&str], text: &str, size: usize) -> Parsed {
        let names = tools.iter().map(ToString::to_string).collect();
        let mut parser = ToolCallParser::new(format, names);
        let mut all = Parsed::default();
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(size) {
            let piece: String = piece.iter().collect();
            let parsed = parser.push(&piece);
            all.content.push_str(&parsed.content);
            all.calls.extend(parsed.calls);
        }
        let parsed = parser.finish();
        all.content.push_str(&parsed.content);
        all.calls.extend(parsed.calls);
        all
    }

    fn call(name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn hermes_calls_are_parsed_whatever_the_piece_size() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": \"{\\\"tz\\\": \\\"CET\\\"}\"}\n</tool_call>";
        for size in [1, 2, 3, 7, 1000] {
            let parsed = run(ToolCallFormat::Hermes, text, size);
            assert_eq!(parsed.content, "Let me check.\n", "size {size}");
            assert_eq!(
                parsed.calls,
                [
                    call("get_weather", r#"{"city":"Paris"}"#),
                    call("get_time", r#"{"tz": "CET"}"#)
                ],
                "size {size}"
            );
        }
    }

    #[test]
    fn deepseek_calls_are_parsed_in_both_layouts() {
        let r1 = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        for size in [1, 4, 1000] {
            let parsed = run(ToolCallFormat::DeepSeek, r1, size);
            assert_eq!(parsed.content, "", "size {size}");
            assert_eq!(
                parsed.calls,
                [
                    call("get_weather", r#"{"city": "Paris"}"#),
                    call("get_time", "{}")
                ]
            );
        }
        let v31 = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>search<｜tool▁sep｜>{\"q\": \"x\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        assert_eq!(
            run(ToolCallFormat::DeepSeek, v31, 3).calls,
            [call("search", r#"{"q": "x"}"#)]
        );
        // Stopped right after the last call, without the closing marker.
        let unclosed = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\": 1}\n```<｜tool▁call▁end｜>";
        assert_eq!(
            run(ToolCallFormat::DeepSeek, unclosed, 5).calls,
            [call("f", r#"{"a": 1}"#)]
        );
    }

    #[test]
    fn what_does_not_parse_is_passed_on_as_written() {
        for text in [
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": \n</tool_call>",
            "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
            "<tool_call>\n{\"name\": \"f\", \"argu",
            "a < b and <tool_ c",
            "ends with <tool_ca",
        ] {
            let parsed = run(ToolCallFormat::Hermes, text, 2);
            assert_eq!(parsed.content, text);
            assert!(parsed.calls.is_empty());
        }
        let broken = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{oops}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let parsed = run(ToolCallFormat::DeepSeek, broken, 3);
        assert_eq!((parsed.content.as_str(), parsed.calls.len()), (broken, 0));
    }

    #[test]
    fn text_after_the_calls_is_content_without_the_line_breaks() {
        let text = "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>\n\nDone.";
        let parsed = run(ToolCallFormat::Hermes, text, 4);
        assert_eq!(parsed.calls, [call("f", "{}")]);
        assert_eq!(parsed.content, "Done.");
    }

    #[test]
    fn a_bare_call_naming_an_offered_tool_is_a_call() {
        let tools = ["get_weather", "get_time"];
        for text in [
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}",
            "```json\n{\n  \"name\": \"get_weather\",\n  \"arguments\": {\n    \"city\": \"Paris\"\n  }\n}\n```",
            "\n[{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}]",
        ] {
            let parsed = run_offering(ToolCallFormat::Hermes, &tools, text, 3);
            assert_eq!(
                parsed.calls,
                [call("get_weather", r#"{"city":"Paris"}"#)],
                "{text}"
            );
            assert_eq!(parsed.content, "", "{text}");
        }
        // Not calls: an unknown tool, no arguments, other JSON, code, prose; and no tools offered.
        for text in [
            "{\"name\": \"delete_all\", \"arguments\": {}}",
            "{\"name\": \"get_weather\"}",
            "{\"city\": \"Paris\"}",
            "```python\nprint(1)\n```",
            "It is sunny.",
        ] {
            let parsed = run_offering(ToolCallFormat::Hermes, &tools, text, 2);
            assert_eq!((parsed.content.as_str(), parsed.calls.len()), (text, 0));
        }
        let bare = "{\"name\": \"get_weather\", \"arguments\": {}}";
        assert!(run(ToolCallFormat::Hermes, bare, 2).calls.is_empty());
        // A held answer that turns out to hold markup is still parsed.
        let fenced_markup = "```\n<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>";
        let parsed = run_offering(ToolCallFormat::Hermes, &tools, fenced_markup, 4);
        assert_eq!((parsed.content.as_str(), parsed.calls.len()), ("```\n", 1));
    }

    #[test]
    fn the_template_decides_the_format() {
        assert_eq!(
            ToolCallFormat::detect("{{- '\\n<tool_call>\\n{\"name\": \"' }}"),
            Some(ToolCallFormat::Hermes)
        );
        assert_eq!(
            ToolCallFormat::detect("{{'<｜tool▁call▁begin｜>' + tool['type']}}"),
            Some(ToolCallFormat::DeepSeek)
        );
        assert_eq!(ToolCallFormat::detect("{{ messages }}"), None);
    }

    #[test]
    fn entries_have_the_openai_shape() {
        let entry = serde_json::to_value(delta_entry(&call("f", "{}"), 2)).expect("serializes");
        assert_eq!(entry["index"], 2);
        assert_eq!(entry["type"], "function");
        assert_eq!(entry["function"]["name"], "f");
        assert_eq!(entry["function"]["arguments"], "{}");
        let id = entry["id"].as_str().unwrap_or_default();
        assert!(id.starts_with("call_") && id.len() == 29, "{id}");
    }
}
