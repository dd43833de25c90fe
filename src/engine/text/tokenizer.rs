//! The model's tokenizer (`tokenizer.json`, Hugging Face `tokenizers`) and an incremental
//! detokenizer that never splits a UTF-8 character across two streamed pieces.

use std::{collections::HashSet, path::Path};

use crate::engine::EngineError;

/// A loaded tokenizer.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Special tokens that write tool-call markup (DeepSeek's `<｜tool▁calls▁begin｜>`…):
    /// kept in the text when the engine parses tool calls, dropped like other special
    /// tokens otherwise.
    tool_markup: HashSet<u32>,
    /// Every special token, when there is tool markup to tell apart (else empty).
    special: HashSet<u32>,
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<TextTokenizer, EngineError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|err| EngineError::load(path, format!("cannot load tokenizer: {err}")))?;
        Ok(TextTokenizer::from_tokenizer(inner))
    }

    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> TextTokenizer {
        let added = inner.get_added_tokens_decoder();
        let special: HashSet<u32> = added
            .iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| *id)
            .collect();
        let tool_markup: HashSet<u32> = added
            .iter()
            .filter(|(id, token)| special.contains(id) && is_tool_markup(&token.content))
            .map(|(id, _)| *id)
            .collect();
        TextTokenizer {
            inner,
            special: if tool_markup.is_empty() {
                HashSet::new()
            } else {
                special
            },
            tool_markup,
        }
    }

    /// Token ids of `text`. Special-token strings in `text` (from a chat template) are
    /// recognised; `add_special` adds the tokenizer's own BOS/EOS post-processing.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, EngineError> {
        self.inner
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|err| EngineError::Tokenizer(err.to_string()))
    }

    /// Text of `ids`, without special tokens such as BOS/EOS.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.inner
            .decode(ids, true)
            .map_err(|err| EngineError::Tokenizer(err.to_string()))
    }

    /// [`decode`](Self::decode), but special tokens that write tool-call markup stay in
    /// the text (for the tool-call parser).
    pub fn decode_with_tool_markup(&self, ids: &[u32]) -> Result<String, EngineError> {
        if !ids.iter().any(|id| self.tool_markup.contains(id)) {
            return self.decode(ids);
        }
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| self.tool_markup.contains(id) || !self.special.contains(id))
            .collect();
        self.inner
            .decode(&kept, false)
            .map_err(|err| EngineError::Tokenizer(err.to_string()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The pre-tokenizer's `type` as `tokenizer.json` names it (`ByteLevel`, `Sequence`…).
    pub fn pre_tokenizer_kind(&self) -> Option<String> {
        let pre = serde_json::to_value(self.inner.get_pre_tokenizer()?).ok()?;
        pre.get("type")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
    }

    /// The token string of `id` (for BOS/EOS names in a chat template).
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Tokens that write tool calls: DeepSeek's `<｜tool▁calls▁begin｜>`, `<｜tool▁call▁begin｜>`,
/// `<｜tool▁sep｜>` and their ends, Hermes' `<tool_call>` (not special in Qwen's own files,
/// but a converter may mark it so).
fn is_tool_markup(token: &str) -> bool {
    token.contains("tool▁call") || token.contains("tool▁sep") || token.contains("tool_call")
}

/// Turns a growing token sequence into text pieces, as candle's `TokenOutputStream`
/// does: decode a window of recent tokens and release only text that is complete.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window that gives decoding its context (spaces, merges).
    prefix: usize,
    /// Tokens before this have been released as text.
    read: usize,
    /// Keep tool-call markup tokens in the text (the request's tool calls are parsed).
    tool_markup: bool,
}

impl IncrementalDecoder {
    pub fn new() -> IncrementalDecoder {
        IncrementalDecoder::default()
    }

    /// A decoder whose text keeps tool-call markup tokens, for the tool-call parser.
    pub fn with_tool_markup() -> IncrementalDecoder {
        IncrementalDecoder {
            tool_markup: true,
            ..IncrementalDecoder::default()
        }
    }

    fn decode(&self, tokenizer: &TextTokenizer, ids: &[u32]) -> Result<String, EngineError> {
        if self.tool_markup {
            tokenizer.decode_with_tool_markup(ids)
        } else {
            tokenizer.decode(ids)
        }
    }

    /// Add a token; returns newly completed text, if any.
    pub fn push(&mut self, tokenizer: &TextTokenizer, token: u32) -> Result<Option<String>, EngineError> {
        self.ids.push(token);
        let before = self.decode(tokenizer, &self.ids[self.prefix..self.read])?;
        let after = self.decode(tokenizer, &self.ids[self.prefix..])?;
        // A trailing U+FFFD means the last token ended inside a multi-byte character.
        if after.len() > before.len() && !after.ends_with('\u{fffd}') && after.is_char_boundary(before.len())
        {
            let text = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(text))
        } else {
            Ok(None)
        }
    }

    /// Text of tokens not released yet (at the end of generation).
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<String, EngineError> {
        let before = self.decode(tokenizer, &self.ids[self.prefix..self.read])?;
        let after = self.decode(tokenizer, &self.ids[self.prefix..])?;
        self.read = self.ids.len();
        Ok(after.get(before.len()..).unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_pieces_never_split_a_character() {
        let inner = crate::engine::testing::tiny::tiny_tokenizer().expect("trains");
        let tokenizer = TextTokenizer::from_tokenizer(inner);
        let text = "東京は日本の首都です。 Emoji: 🚀🌍✨ zwj 👩‍💻 and é̂ done";
        let ids = tokenizer.encode(text, false).expect("encodes");
        // Byte-level BPE: a 4-byte emoji needs more than one token here.
        assert!(ids.len() > text.chars().count() / 2, "{ids:?}");
        let mut decoder = IncrementalDecoder::new();
        let mut pieces = Vec::new();
        for id in ids {
            pieces.extend(decoder.push(&tokenizer, id).expect("push"));
        }
        pieces.push(decoder.finish(&tokenizer).expect("finish"));
        assert!(pieces.iter().all(|p| !p.contains('\u{fffd}')), "{pieces:?}");
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn tool_markup_tokens_stay_only_when_asked() {
        let mut inner = crate::engine::testing::tiny::tiny_tokenizer().expect("trains");
        inner.add_special_tokens(&[
            tokenizers::AddedToken::from("<｜tool▁calls▁begin｜>", true),
            tokenizers::AddedToken::from("<｜tool▁calls▁end｜>", true),
        ]);
        let tokenizer = TextTokenizer::from_tokenizer(inner);
        let text = "<｜User｜>Hi<｜tool▁calls▁begin｜>x<｜tool▁calls▁end｜><｜tool▁output▁begin｜>";
        let ids = tokenizer.encode(text, false).expect("encodes");
        assert_eq!(tokenizer.decode(&ids).expect("decodes"), "Hix");
        assert_eq!(
            tokenizer.decode_with_tool_markup(&ids).expect("decodes"),
            "Hi<｜tool▁calls▁begin｜>x<｜tool▁calls▁end｜>"
        );

        let mut decoder = IncrementalDecoder::with_tool_markup();
        let mut streamed = String::new();
        for id in ids {
            streamed.push_str(&decoder.push(&tokenizer, id).expect("push").unwrap_or_default());
        }
        streamed.push_str(&decoder.finish(&tokenizer).expect("finish"));
        assert_eq!(streamed, "Hi<｜tool▁calls▁begin｜>x<｜tool▁calls▁end｜>");
    }
}
