//! A `tokenizers` tokenizer built from GGUF metadata (`tokenizer.ggml.*`), with the
//! pre-tokenizer that `tokenizer.ggml.pre` names reproduced as llama.cpp splits text.
//!
//! candle's own GGUF tokenizer falls back to GPT-2 rules for every `pre`, which splits
//! digits and CJK differently from what DeepSeek's distills were trained on; an unknown
//! `pre` is therefore refused rather than guessed.

use serde_json::{Value as Json, json};

/// A GGUF token type (`tokenizer.ggml.token_type`), as llama.cpp numbers them.
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

// The regex alternatives llama.cpp uses per pre-tokenizer family (llama-vocab.cpp). They
// are applied in order: each one splits the pieces the previous one left, and the text
// between matches stays a piece of its own (`Isolated`). Non-ASCII characters are written
// as escapes: some (Greek extended U+1F7D, U+1FD3, …) are NFC-normalised to other code
// points by editors, which silently turns a range such as `Ὗ-ώ` backwards.

/// Qwen2 (and DeepSeek-R1-Distill-Qwen): single digits, letters with one leading
/// non-letter, punctuation runs with trailing newlines.
const QWEN2: &[&str] = &[
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];

/// Llama 3 (and DeepSeek-R1-Distill-Llama): like Qwen2 but digits in groups of three.
const LLAMA3: &[&str] = &[
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];

/// SmolLM (StarCoder family): every digit alone, then GPT-2 rules.
const SMOLLM: &[&str] = &[
    "\\p{N}",
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
];

/// DeepSeek LLM (V1 chat/base): newlines, cased-letter runs, ASCII/fullwidth punctuation,
/// trailing whitespace, CJK runs, digit runs.
const DEEPSEEK_LLM: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+",
    "\\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+",
    "\\s+$",
    "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
    "\\p{N}+",
];

/// DeepSeek Coder (V1): newlines, letter runs, punctuation runs, CJK runs, single digits.
const DEEPSEEK_CODER: &[&str] = &[
    "[\r\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
    "\\p{N}",
];

/// DeepSeek V3 / R1: digits in threes, kana/CJK runs, then letters with marks.
const DEEPSEEK_V3: &[&str] = &[
    "\\p{N}{1,3}",
    "[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];

/// How a `tokenizer.ggml.pre` value tokenizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreTokenizer {
    pub regexes: &'static [&'static str],
    /// Whole words found in the vocabulary skip the merges (llama.cpp `ignore_merges`).
    pub ignore_merges: bool,
    /// llama.cpp adds BOS for this family unless the file says otherwise.
    pub add_bos_default: bool,
}

/// The `pre` names lifeboat implements, for error messages and docs.
pub const SUPPORTED_PRE: &[&str] = &[
    "qwen2",
    "deepseek-r1-qwen",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "smollm",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
];

impl PreTokenizer {
    /// The pre-tokenizer for a `tokenizer.ggml.pre` value; `None` when not implemented.
    pub fn for_name(pre: &str) -> Option<PreTokenizer> {
        let plain = |regexes| PreTokenizer {
            regexes,
            ignore_merges: false,
            add_bos_default: false,
        };
        Some(match pre {
            "qwen2" | "deepseek-r1-qwen" => plain(QWEN2),
            "llama3" | "llama-v3" | "llama-bpe" => PreTokenizer {
                regexes: LLAMA3,
                ignore_merges: true,
                add_bos_default: true,
            },
            "smollm" => plain(SMOLLM),
            "deepseek-llm" => plain(DEEPSEEK_LLM),
            "deepseek-coder" => plain(DEEPSEEK_CODER),
            "deepseek-v3" => plain(DEEPSEEK_V3),
            _ => return None,
        })
    }
}

/// The tokenizer arrays and settings read from a GGUF header.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: lifeboat reads byte-level BPE (`gpt2`).
    pub model: String,
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
}

/// Build the tokenizer; the error says which metadata is wrong or unsupported.
pub fn build(vocab: &GgufVocab) -> Result<tokenizers::Tokenizer, String> {
    if vocab.model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model is `{}`; lifeboat reads byte-level BPE tokenizers (`gpt2`), as every \
             DeepSeek model uses",
            vocab.model
        ));
    }
    let pre = PreTokenizer::for_name(&vocab.pre).ok_or_else(|| {
        format!(
            "tokenizer.ggml.pre `{}` is not implemented (lifeboat implements {}); rather than tokenize \
             with the wrong rules, pass a model folder with tokenizer.json",
            vocab.pre,
            SUPPORTED_PRE.join(", ")
        )
    })?;
    if vocab.tokens.is_empty() {
        return Err("tokenizer.ggml.tokens is empty".into());
    }
    if !vocab.token_types.is_empty() && vocab.token_types.len() != vocab.tokens.len() {
        return Err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            vocab.token_types.len(),
            vocab.tokens.len()
        ));
    }
    let mut ids = serde_json::Map::with_capacity(vocab.tokens.len());
    let mut added = Vec::new();
    for (id, token) in vocab.tokens.iter().enumerate() {
        let kind = vocab.token_types.get(id).copied().unwrap_or(1);
        // Control and user-defined tokens are matched in raw text before pre-tokenizing,
        // as llama.cpp does; control ones are dropped when decoding for the client.
        if kind == TOKEN_CONTROL || kind == TOKEN_USER_DEFINED {
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": kind == TOKEN_CONTROL,
            }));
        }
        // A duplicate string keeps its first id, as llama.cpp's token-to-id map does.
        ids.entry(token.clone()).or_insert(json!(id));
    }
    let mut pieces: Vec<Json> = pre
        .regexes
        .iter()
        .map(|regex| {
            json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
        })
        .collect();
    pieces.push(
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}),
    );
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pieces},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre.ignore_merges,
            "vocab": ids,
            "merges": vocab.merges,
        }
    });
    let text = serde_json::to_string(&spec).map_err(|err| err.to_string())?;
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|err| format!("cannot build the tokenizer from tokenizer.ggml.*: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: the 256 byte symbols, a few merges, two special tokens.
    fn small_vocab(pre: &str) -> GgufVocab {
        let mut tokens: Vec<String> = byte_symbols();
        let merges = vec!["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"];
        for merge in &merges {
            tokens.push(merge.replace(' ', ""));
        }
        tokens.push("<|im_start|>".into());
        tokens.push("<think>".into());
        let mut token_types = vec![1; tokens.len()];
        let n = token_types.len();
        token_types[n - 2] = TOKEN_CONTROL;
        token_types[n - 1] = TOKEN_USER_DEFINED;
        GgufVocab {
            model: "gpt2".into(),
            pre: pre.into(),
            tokens,
            token_types,
            merges: merges.into_iter().map(String::from).collect(),
        }
    }

    /// GPT-2's byte-to-symbol table: printable bytes map to themselves, the rest to
    /// U+0100 onwards, in byte order.
    fn byte_symbols() -> Vec<String> {
        let printable =
            |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let mut next = 256u32;
        (0..=255u8)
            .map(|b| {
                if printable(b) {
                    char::from(b).to_string()
                } else {
                    let c = char::from_u32(next).unwrap_or('?');
                    next += 1;
                    c.to_string()
                }
            })
            .collect()
    }

    fn encode(tokenizer: &tokenizers::Tokenizer, text: &str) -> Vec<String> {
        let encoding = tokenizer.encode(text, false).expect("encode");
        encoding.get_tokens().to_vec()
    }

    #[test]
    fn merges_special_tokens_and_round_trip() {
        let tokenizer = build(&small_vocab("qwen2")).expect("builds");
        assert_eq!(encode(&tokenizer, "hello wo"), ["hello", "Ġwo"]);
        assert_eq!(
            encode(&tokenizer, "<|im_start|>hello<think>"),
            ["<|im_start|>", "hello", "<think>"]
        );
        let ids = tokenizer.encode("<|im_start|>hé 12", false).expect("encode");
        let text = tokenizer.decode(ids.get_ids(), false).expect("decode");
        assert_eq!(text, "<|im_start|>hé 12");
        // Control tokens are dropped for the client; user-defined ones are text.
        let text = tokenizer
            .decode(
                tokenizer
                    .encode("<|im_start|>x<think>", false)
                    .expect("encode")
                    .get_ids(),
                true,
            )
            .expect("decode");
        assert_eq!(text, "x<think>");
    }

    #[test]
    fn digits_split_as_each_family_does() {
        let digits = |pre: &str| encode(&build(&small_vocab(pre)).expect("builds"), "12345").len();
        assert_eq!(digits("qwen2"), 5);
        assert_eq!(digits("smollm"), 5);
        assert_eq!(
            digits("llama-bpe"),
            5,
            "groups of 3 then bytes: 123|45 → 5 byte tokens"
        );
        assert_eq!(digits("deepseek-v3"), 5);
    }

    #[test]
    fn unknown_pre_and_model_are_refused() {
        let err = build(&small_vocab("gpt-4o")).expect_err("unknown pre");
        assert!(err.contains("`gpt-4o` is not implemented"), "{err}");
        assert!(err.contains("deepseek-r1-qwen"), "{err}");
        let mut spm = small_vocab("qwen2");
        spm.model = "llama".into();
        let err = build(&spm).expect_err("spm");
        assert!(err.contains("`llama`"), "{err}");
        let mut short = small_vocab("qwen2");
        short.token_types.pop();
        assert!(build(&short).expect_err("short").contains("token_type"));
    }

    #[test]
    fn every_family_regex_compiles() {
        for pre in SUPPORTED_PRE {
            build(&small_vocab(pre)).unwrap_or_else(|err| panic!("{pre}: {err}"));
        }
    }
}
