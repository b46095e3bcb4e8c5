//! Correctness against llama.cpp, the reference: golden files in tests/golden/ were produced by
//! scripts/golden_model.py from llama.cpp's own runs on the same GGUF files.
//!
//! A model that is not cached is skipped with a message, unless PORTEIRO_REQUIRE_MODELS=1 (set by CI,
//! which pulls every model first): then it is a failure, so the checks cannot pass by not running.

// A test: a failed unwrap is a failed test; skip messages go to stderr.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod golden_check;
use golden_check::check;

#[test]
fn smollm2_135m_matches_llama_cpp() {
    check("smollm2-135m");
}

#[test]
fn qwen25_05b_matches_llama_cpp() {
    check("qwen2.5-0.5b");
}

#[test]
fn gemma3_270m_matches_llama_cpp() {
    check("gemma3-270m");
}

#[test]
fn qwen25_15b_matches_llama_cpp() {
    check("qwen2.5-1.5b");
}
