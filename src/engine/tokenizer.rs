//! The model's tokenizer (`tokenizer.json`, Hugging Face `tokenizers`) and an incremental
//! detokenizer that never splits a UTF-8 character across two streamed pieces.

use std::path::Path;

use super::EngineError;

/// A loaded tokenizer.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<TextTokenizer, EngineError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|err| EngineError::load(path, format!("cannot load tokenizer: {err}")))?;
        Ok(TextTokenizer { inner })
    }

    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> TextTokenizer {
        TextTokenizer { inner }
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

/// Turns a growing token sequence into text pieces, as candle's `TokenOutputStream`
/// does: decode a window of recent tokens and release only text that is complete.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window that gives decoding its context (spaces, merges).
    prefix: usize,
    /// Tokens before this have been released as text.
    read: usize,
}

impl IncrementalDecoder {
    pub fn new() -> IncrementalDecoder {
        IncrementalDecoder::default()
    }

    /// Add a token; returns newly completed text, if any.
    pub fn push(&mut self, tokenizer: &TextTokenizer, token: u32) -> Result<Option<String>, EngineError> {
        self.ids.push(token);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = tokenizer.decode(&self.ids[self.prefix..])?;
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
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = tokenizer.decode(&self.ids[self.prefix..])?;
        self.read = self.ids.len();
        Ok(after.get(before.len()..).unwrap_or_default().to_string())
    }
}
