//! Structured output on the real binary through the official `openai` SDK
//! (scripts/structured_e2e.py): json_object, json_schema, `beta.chat.completions.parse` with a
//! Pydantic model, tools (required / named / none / auto, streamed), 400s naming unsupported
//! schema features, and the 50-task evaluation with every constrained answer schema-valid.
//!
//! Skipped with a message when smollm2-135m or python's `openai` are missing, unless
//! PORTEIRO_REQUIRE_MODELS=1.

use std::path::Path;
use std::process::Command;

#[test]
fn structured_output_through_the_openai_sdk() {
    let required = std::env::var("PORTEIRO_REQUIRE_MODELS").is_ok();
    if let Err(e) = porteiro_models::fetch::resolve_model("smollm2-135m", false) {
        assert!(!required, "smollm2-135m required: {e}");
        return eprintln!("skipping: smollm2-135m not cached: {e}");
    }
    let has = Command::new("python3")
        .args(["-c", "import openai, pydantic"])
        .status()
        .is_ok_and(|s| s.success());
    if !has {
        assert!(!required, "python3 with `openai` required");
        return eprintln!("skipping: python3 with `openai`");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/structured_e2e.py");
    let status = Command::new("python3")
        .arg(script)
        .args([
            "--porteiro",
            env!("CARGO_BIN_EXE_porteiro"),
            "--model",
            "smollm2-135m",
        ])
        .status()
        .unwrap();
    assert!(status.success(), "scripts/structured_e2e.py failed");
}
