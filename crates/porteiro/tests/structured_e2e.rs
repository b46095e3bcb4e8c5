//! Structured output on the real binary through the official `openai` SDK
//! (scripts/structured_e2e.py): json_object, json_schema, `beta.chat.completions.parse` with a
//! Pydantic model, tools (required / named / none / auto, streamed), 400s naming unsupported
//! schema features, and the 50-task evaluation with every constrained answer schema-valid.
//!
//! Skipped with a message when smollm2-135m or python's `openai` are missing, unless
//! PORTEIRO_REQUIRE_MODELS=1.
// Tests may unwrap, expect and print (the lint policy is for library code).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod common;

#[test]
fn structured_output_through_the_openai_sdk() {
    if !common::cached("smollm2-135m") {
        return;
    }
    if !common::python_has("openai, pydantic") {
        return common::skip("python3 with `openai`");
    }
    assert!(
        common::run_script(
            "structured_e2e.py",
            &["--model".as_ref(), "smollm2-135m".as_ref()]
        ),
        "scripts/structured_e2e.py failed"
    );
}
