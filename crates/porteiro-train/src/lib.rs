//! LoRA fine-tuning on the CPU over a frozen quantized GGUF model (QLoRA-style: gradients flow
//! through the dequantized rows; the model is never held in full precision).
//!
//! - `real`: the float type training runs in (f32; f64 for gradient checks), GEGM and threads.
//! - `base`: the frozen model, read tile by tile from the GGUF mapping.
//! - `net`: forward and backward passes of llama, qwen2 and gemma3, LoRA parameters.
//! - `data`: OpenAI chat fine-tuning lines into token sequences with the loss on assistant turns.
//! - `optim`: AdamW, warm-up + cosine schedule, gradient clipping.
//! - `run`: the training loop: batches, accumulation, evaluation, checkpoints, resume.

// Row loops walk several parallel arrays (logits, targets, statistics) with one index.
#![allow(clippy::needless_range_loop)]

pub mod base;
pub mod data;
pub mod net;
pub mod optim;
pub mod real;
pub mod run;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("model: {0}")]
    Model(String),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Io(String),
}
