//! Splits R1-style output into `reasoning_content` (inside `<think>…</think>`) and
//! `content`, as DeepSeek's own API does. Handles both template variants: the model emits
//! `<think>` itself, or the prompt already opened it and the output holds only `</think>`.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing seen yet; `<think>` may still open reasoning.
    Start,
    Reasoning,
    Answer,
}

/// Routes streamed text to reasoning or answer.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    phase: Phase,
    /// Text that may be the start of a tag.
    held: String,
    /// Whether reasoning is recognised at all (the model's template has think tags).
    enabled: bool,
}

/// Text released by one push, by destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

impl ReasoningSplitter {
    /// `enabled`: the template uses think tags. `opened_by_prompt`: the rendered prompt
    /// ends inside `<think>`, so output starts as reasoning.
    pub fn new(enabled: bool, opened_by_prompt: bool) -> ReasoningSplitter {
        ReasoningSplitter {
            phase: if enabled && opened_by_prompt {
                Phase::Reasoning
            } else {
                Phase::Start
            },
            held: String::new(),
            enabled,
        }
    }

    pub fn push(&mut self, text: &str) -> Split {
        let mut out = Split::default();
        if !self.enabled {
            out.content.push_str(text);
            return out;
        }
        self.held.push_str(text);
        loop {
            match self.phase {
                Phase::Start => {
                    let trimmed = self.held.trim_start();
                    if trimmed.starts_with(OPEN) {
                        let start = self.held.len() - trimmed.len() + OPEN.len();
                        self.held.drain(..start);
                        self.phase = Phase::Reasoning;
                    } else if OPEN.starts_with(trimmed) {
                        return out; // maybe `<thi…`: wait
                    } else {
                        self.phase = Phase::Answer;
                    }
                }
                Phase::Reasoning => {
                    if let Some(at) = self.held.find(CLOSE) {
                        out.reasoning.push_str(&self.held[..at]);
                        self.held.drain(..at + CLOSE.len());
                        // The answer conventionally starts after a blank line.
                        let rest = self.held.trim_start_matches('\n').to_string();
                        self.held = rest;
                        self.phase = Phase::Answer;
                    } else {
                        let keep = partial_tag(&self.held, CLOSE);
                        let split = self.held.len() - keep;
                        out.reasoning.push_str(&self.held[..split]);
                        self.held.drain(..split);
                        return out;
                    }
                }
                Phase::Answer => {
                    out.content.push_str(&self.held);
                    self.held.clear();
                    return out;
                }
            }
        }
    }

    /// End of generation: whatever is held goes where it was heading.
    pub fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        match self.phase {
            Phase::Reasoning => Split {
                reasoning: held,
                content: String::new(),
            },
            _ => Split {
                reasoning: String::new(),
                content: held,
            },
        }
    }
}

/// Bytes at the end of `text` that could begin `tag` (held back until the next piece
/// says whether the tag follows; also used by the tool-call parser).
pub(super) fn partial_tag(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(enabled: bool, opened: bool, pieces: &[&str]) -> Split {
        let mut splitter = ReasoningSplitter::new(enabled, opened);
        let mut all = Split::default();
        for piece in pieces {
            let s = splitter.push(piece);
            all.reasoning.push_str(&s.reasoning);
            all.content.push_str(&s.content);
        }
        let s = splitter.finish();
        all.reasoning.push_str(&s.reasoning);
        all.content.push_str(&s.content);
        all
    }

    #[test]
    fn model_opens_think_itself() {
        let split = run(
            true,
            false,
            &[
                "<thi",
                "nk>\nLet me",
                " think.</th",
                "ink>\n\nThe answer",
                " is 4.",
            ],
        );
        assert_eq!(split.reasoning, "\nLet me think.");
        assert_eq!(split.content, "The answer is 4.");
    }

    #[test]
    fn prompt_opened_think() {
        let split = run(true, true, &["Hmm, 2+2.", "</think>", "4"]);
        assert_eq!(split.reasoning, "Hmm, 2+2.");
        assert_eq!(split.content, "4");
    }

    #[test]
    fn no_think_is_all_content() {
        assert_eq!(run(true, false, &["Hello ", "<b>"]).content, "Hello <b>");
        assert_eq!(
            run(false, true, &["<think>x</think>y"]).content,
            "<think>x</think>y"
        );
        assert_eq!(run(true, true, &["cut mid-thought"]).reasoning, "cut mid-thought");
    }
}
