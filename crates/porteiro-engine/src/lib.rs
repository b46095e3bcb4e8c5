//! The local inference engine: quantized kernels over memory-mapped GGUF weights, the transformer
//! forward pass (llama, qwen2, gemma3) run on `porteiro-pool`'s threads, KV cache, sampling and
//! generation, and the continuous-batching scheduler that serves many sequences at once. The sentence
//! encoder is `porteiro-encoder`.

// Kernels walk several parallel arrays (blocks, scales, sums) with one index; iterator chains hide that.
#![allow(clippy::needless_range_loop)]

pub mod budget;
pub mod eval;
pub mod generate;
pub mod imatrix;
pub mod lora;
pub mod mix;
pub mod model;
pub mod quant;
pub mod quantize;
pub mod repack;
pub mod sampler;
pub mod scheduler;
pub mod simd;

pub use generate::{generate, FinishReason, GenerateOptions, Generation, StopText};
pub use model::{BatchToken, KvCache, Model, ModelError, Scratch};
pub use sampler::{Sampler, SamplingParams};

use std::path::Path;
use std::sync::Arc;

use porteiro_models::gguf::GgufFile;
use porteiro_models::template::ChatTemplate;
use porteiro_models::tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Gguf(#[from] porteiro_models::gguf::GgufError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] porteiro_models::tokenizer::TokenizerError),
    #[error("chat template: {0}")]
    Template(String),
}

/// A model ready to run: weights, its tokenizer and its chat template (if the file has one).
pub struct LocalModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

impl LocalModel {
    /// Loads a model for serving. Where the CPU runs the repacked kernels, the matrices are
    /// repacked from the file mapping into huge-page-backed memory and their file pages released;
    /// otherwise the weights are read into huge-page-backed memory (`GgufFile::open_resident`)
    /// unless `PORTEIRO_MMAP=1` asks to run from the file mapping.
    pub fn open(path: &Path, threads: usize) -> Result<Self, LoadError> {
        let mapped =
            std::env::var("PORTEIRO_MMAP").is_ok_and(|v| v == "1") || repack::Repacked::available();
        let file = Arc::new(if mapped {
            GgufFile::open(path)?
        } else {
            GgufFile::open_resident(path)?
        });
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let template = ChatTemplate::from_gguf(&file, &tokenizer)
            .map_err(|e| LoadError::Template(e.to_string()))?;
        let model = Model::load(file, threads)?;
        Ok(Self {
            model,
            tokenizer,
            template,
        })
    }
}
