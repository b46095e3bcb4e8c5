//! Telemetry on the real binary (scripts/telemetry_e2e.py): a known sequence of requests, then
//! `/metrics` through the `prometheus_client` parser, the dashboard in headless Chromium (its KPIs
//! equal `/metrics`; screenshot in target/test-artifacts/), the request log and `porteiro report`.
//!
//! Skipped with a message when the model, python's `openai` / `prometheus_client`, node with
//! scripts/dashboard/node_modules, or /usr/bin/chromium are missing, unless PORTEIRO_REQUIRE_MODELS=1
//! (scripts/test-setup.sh installs them all).
// Tests may unwrap, expect and print (the lint policy is for library code).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod common;

use std::path::Path;

#[test]
fn metrics_dashboard_request_log_and_report_agree() {
    let root = common::repo_root();
    if !common::cached("smollm2-135m") {
        return;
    }
    if !common::python_has("openai, prometheus_client") {
        return common::skip("python3 with `openai` and `prometheus_client`");
    }
    let node_dir = root.join("scripts/dashboard");
    if !node_dir.join("node_modules/playwright-core").exists() {
        return common::skip("scripts/dashboard/node_modules (npm install in scripts/dashboard)");
    }
    if !Path::new("/usr/bin/chromium").exists() && std::env::var("CHROMIUM").is_err() {
        return common::skip("/usr/bin/chromium (Debian's chromium package)");
    }
    let artifacts = root.join("target/test-artifacts");
    assert!(
        common::run_script(
            "telemetry_e2e.py",
            &[
                "--artifacts".as_ref(),
                artifacts.as_os_str(),
                "--node-dir".as_ref(),
                node_dir.as_os_str(),
            ]
        ),
        "scripts/telemetry_e2e.py failed"
    );
}
