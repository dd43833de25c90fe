//! The tiny test models the project generates itself (random weights, a small real
//! tokenizer, an R1-style template), as safetensors (`tiny`) or one GGUF file
//! (`tiny_gguf`), so every engine path runs in tests without downloads.

pub mod tiny;
pub mod tiny_gguf;
