//! Model sources and cache, GGUF files, tokenizers and chat templates.
//!
//! Nothing here runs a model: `porteiro-engine` owns the decoder's forward pass and `porteiro-encoder`
//! the sentence encoder's. This crate turns a name or a path into a memory-mapped GGUF file, a tokenizer
//! that matches llama.cpp's, and a chat-template renderer.

pub mod catalog;
pub mod fetch;
pub mod gguf;
pub mod gguf_write;
pub mod template;
pub mod tokenizer;
