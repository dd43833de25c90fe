//! Text in and out of the model: tokenizers (`tokenizer.json`, or rebuilt from GGUF
//! metadata), chat templates, and what the engine makes of generated text — stop strings,
//! the `<think>` reasoning split and tool calls.

pub mod chat_template;
pub mod gguf_tokenizer;
pub mod reasoning;
pub mod stop;
pub mod tokenizer;
pub mod tool_calls;
