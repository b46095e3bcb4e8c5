//! The golden check against llama.cpp on the per-block kernels: CPUs without AVX-512 VNNI, or
//! `PORTEIRO_REPACK=0`, run them instead of the repacked layout, so they must meet the same bar. Its own
//! test binary, because the kernel choice is made once per process. One Q4_1 model and one with
//! Q5_0, Q8_0, Q4_K and Q6_K tensors cover every per-block kernel the catalog uses.

// A test: a failed unwrap is a failed test; skip messages go to stderr.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod golden_check;

#[test]
fn per_block_kernels_match_llama_cpp() {
    std::env::set_var("PORTEIRO_REPACK", "0");
    assert!(!porteiro_engine::repack::Repacked::available());
    golden_check::check("smollm2-135m");
    golden_check::check("qwen2.5-0.5b");
}
