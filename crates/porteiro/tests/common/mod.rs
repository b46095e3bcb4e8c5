//! Shared by the binary's end-to-end tests: skipping when something is missing (a failure under
//! PORTEIRO_REQUIRE_MODELS=1, which scripts/test.sh sets) and running the Python drivers.
// Tests may unwrap, expect and print (the lint policy is for library code).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn required() -> bool {
    std::env::var("PORTEIRO_REQUIRE_MODELS").is_ok()
}

pub fn skip(why: &str) {
    assert!(!required(), "required but missing: {why}");
    eprintln!("skipping: {why}");
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether python3 can import all of `modules` (e.g. "openai, pydantic").
pub fn python_has(modules: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success())
}

/// A catalog model is cached (or the test is skipped / fails as `skip` says).
pub fn cached(alias: &str) -> bool {
    match porteiro_models::fetch::resolve_model(alias, false) {
        Ok(_) => true,
        Err(e) => {
            skip(&format!("{alias} not cached: {e}"));
            false
        }
    }
}

/// Runs `scripts/<name>` with the binary under test first; true when it exits 0.
pub fn run_script(name: &str, args: &[&std::ffi::OsStr]) -> bool {
    Command::new("python3")
        .arg(repo_root().join("scripts").join(name))
        .args(["--porteiro", env!("CARGO_BIN_EXE_porteiro")])
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}
