//! Model source → ready-to-run model: where the files come from (a folder, a `.gguf` file
//! or a Hugging Face repo, `hub`), the safetensors loader (`loader`), and the GGUF reader
//! (`gguf` for the header and checks, `gguf_weights` for the tensors, `requant` for types
//! converted at load).

pub mod gguf;
mod gguf_weights;
pub mod hub;
pub mod loader;
pub mod requant;
