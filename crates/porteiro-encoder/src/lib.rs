//! The sentence encoder: a BERT forward pass (MiniLM-L6 from the catalog) over safetensors weights
//! (`bert`), BERT's WordPiece tokenizer (`wordpiece`) and the bf16 matrix multiply it uses where the
//! CPU has AMX tiles or AVX-512 BF16 (`bf16`). It shares only the thread pool (`porteiro-pool`) with the
//! decoder in `porteiro-engine`.
//!
//! Unsafe code is confined to `bf16` (the tile and AVX-512 BF16 GEMMs and packing), `int8` (the VNNI
//! GEMM) and, in `bert`, the
//! AVX-512 variants, the memory map and the row views its threads share; every unsafe block says
//! why it is sound (`// SAFETY:`). Library code neither panics on a fallible `unwrap`/`expect` nor
//! prints.

// Kernels walk several parallel arrays (heads, rows, scales) with one index; iterator chains hide that.
#![allow(clippy::needless_range_loop)]

pub mod bert;
pub mod bf16;
pub mod int8;
pub mod wordpiece;

pub use bert::{BertEncoder, BertError};

/// A seeded value in [-1, 1) for the kernels' tests (an LCG: no dependency, same numbers everywhere).
#[cfg(test)]
fn test_rand(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}
