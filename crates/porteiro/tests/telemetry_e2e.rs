//! Telemetry on the real binary (scripts/telemetry_e2e.py): a known sequence of requests, then
//! `/metrics` through the `prometheus_client` parser, the dashboard in headless Chromium (its KPIs
//! equal `/metrics`; screenshot in target/test-artifacts/), the request log and `porteiro report`.
//!
//! Skipped with a message when the model, python's `openai` / `prometheus_client`, node with
//! scripts/dashboard/node_modules, or /usr/bin/chromium are missing, unless PORTEIRO_REQUIRE_MODELS=1
//! (scripts/test-setup.sh installs them all).

use std::path::Path;
use std::process::Command;

fn skip(why: &str) {
    assert!(
        std::env::var("PORTEIRO_REQUIRE_MODELS").is_err(),
        "required but missing: {why}"
    );
    eprintln!("skipping: {why}");
}

#[test]
fn metrics_dashboard_request_log_and_report_agree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if let Err(e) = porteiro_models::fetch::resolve_model("smollm2-135m", false) {
        return skip(&format!("smollm2-135m not cached: {e}"));
    }
    let py_ok = Command::new("python3")
        .args(["-c", "import openai, prometheus_client"])
        .status()
        .is_ok_and(|s| s.success());
    if !py_ok {
        return skip("python3 with `openai` and `prometheus_client`");
    }
    let node_dir = root.join("scripts/dashboard");
    if !node_dir.join("node_modules/playwright-core").exists() {
        return skip("scripts/dashboard/node_modules (npm install in scripts/dashboard)");
    }
    if !Path::new("/usr/bin/chromium").exists() && std::env::var("CHROMIUM").is_err() {
        return skip("/usr/bin/chromium (Debian's chromium package)");
    }
    let artifacts = root.join("target/test-artifacts");
    let status = Command::new("python3")
        .arg(root.join("scripts/telemetry_e2e.py"))
        .args(["--porteiro", env!("CARGO_BIN_EXE_porteiro")])
        .arg("--artifacts")
        .arg(&artifacts)
        .arg("--node-dir")
        .arg(&node_dir)
        .status()
        .unwrap();
    assert!(status.success(), "scripts/telemetry_e2e.py failed");
}
