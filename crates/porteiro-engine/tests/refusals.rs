//! Models we cannot run are refused with a message that names what is wrong, never a panic or a
//! silent fallback.

// A test: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::Arc;

use porteiro_engine::{Model, ModelError};
use porteiro_models::gguf::GgufFile;

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn kv_str(b: &mut Vec<u8>, k: &str, v: &str) {
    put_str(b, k);
    b.extend(8u32.to_le_bytes());
    put_str(b, v);
}

fn kv_u32(b: &mut Vec<u8>, k: &str, v: u32) {
    put_str(b, k);
    b.extend(4u32.to_le_bytes());
    b.extend(v.to_le_bytes());
}

fn kv_f32(b: &mut Vec<u8>, k: &str, v: f32) {
    put_str(b, k);
    b.extend(6u32.to_le_bytes());
    b.extend(v.to_le_bytes());
}

/// A GGUF with llama-style hyperparameters and one 256x4 token embedding of ggml type `code`.
fn file(arch: &str, code: u32, type_bytes_per_256: usize) -> tempfile::NamedTempFile {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(7u64.to_le_bytes());
    kv_str(&mut b, "general.architecture", arch);
    kv_u32(&mut b, &format!("{arch}.embedding_length"), 256);
    kv_u32(&mut b, &format!("{arch}.attention.head_count"), 4);
    kv_u32(&mut b, &format!("{arch}.attention.head_count_kv"), 4);
    kv_u32(&mut b, &format!("{arch}.block_count"), 1);
    kv_u32(&mut b, &format!("{arch}.feed_forward_length"), 512);
    kv_f32(
        &mut b,
        &format!("{arch}.attention.layer_norm_rms_epsilon"),
        1e-5,
    );
    put_str(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(code.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(std::iter::repeat_n(0u8, 4 * type_bytes_per_256));
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&b).unwrap();
    f
}

fn load(f: &tempfile::NamedTempFile) -> Result<Model, ModelError> {
    Model::load(Arc::new(GgufFile::open(f.path()).unwrap()), 1)
}

#[test]
fn unknown_architecture_is_named_with_the_supported_ones() {
    let e = load(&file("falcon", 8, 272))
        .err()
        .expect("must be refused")
        .to_string();
    assert!(
        e.contains("`falcon`") && e.contains("llama, qwen2, gemma3"),
        "{e}"
    );
}

#[test]
fn unsupported_tensor_type_is_named() {
    // ggml type 9 is Q8_1 (36 bytes per 32 values): an activation format, never a weight type here.
    let e = load(&file("llama", 9, 8 * 36))
        .err()
        .expect("must be refused")
        .to_string();
    assert!(
        e.contains("token_embd.weight") && e.contains("Q8_1") && e.contains("Q4_K"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    // A valid Q8_0 embedding but no layers: the first missing tensor is reported by name.
    let e = load(&file("llama", 8, 272))
        .err()
        .expect("must be refused")
        .to_string();
    assert!(
        e.contains("output_norm.weight") || e.contains("blk.0."),
        "{e}"
    );
}
