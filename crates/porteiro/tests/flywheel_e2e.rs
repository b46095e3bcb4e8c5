//! The flywheel's collect → curate → cluster stages on the real binary (scripts/flywheel_e2e.py):
//! SNIPS and BFCL requests through the `openai` client to `porteiro serve`, answered by a scripted
//! teacher upstream with the datasets' ground truth; then `porteiro flywheel curate`, `clusters`,
//! `finetune`, `select`, `status` and `promote`, and a gateway serving the routes file (shadow,
//! promotion, monitoring, rollback, audit), checked against what was sent.
//!
//! Skipped with a message when the model, the encoder or python's `openai` are missing, unless
//! PORTEIRO_REQUIRE_MODELS=1 (scripts/test-setup.sh installs them all).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod common;

#[test]
fn collected_upstream_answers_are_curated_and_clustered() {
    if !common::cached("smollm2-135m") || !common::cached("minilm-l6") {
        return;
    }
    if !common::python_has("openai") {
        return common::skip("python3 with `openai`");
    }
    assert!(
        common::run_script("flywheel_e2e.py", &[]),
        "scripts/flywheel_e2e.py failed"
    );
}
