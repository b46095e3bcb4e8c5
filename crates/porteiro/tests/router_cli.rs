//! `porteiro router train` and `router parity` as a user runs them: a scorer trained on a few
//! labelled rows, then every row decided on the f32 encoder and on this CPU's fast path (bf16 or
//! int8). Where the CPU has a fast path the decisions must agree on nearly every row (the same
//! inputs at 8 bits; the held-out measurement in the README is the real figure); where it has none
//! the command must say so and fail.
//!
//! Skipped with a message when minilm-l6 is missing, unless PORTEIRO_REQUIRE_MODELS=1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod common;

use std::process::{Command, Output};

fn porteiro(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_porteiro"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn parity_decides_rows_on_both_encoder_paths() {
    if !common::cached("minilm-l6") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let easy = [
        "play some jazz",
        "set an alarm for seven",
        "what's the weather in Porto",
        "add milk to my shopping list",
        "turn the lights off",
        "book a table for two",
    ];
    let hard = [
        "Prove that there are infinitely many primes and explain each step.",
        "Write a detailed comparison of three consensus algorithms with their failure modes.",
        "A train leaves at 3pm at 80 km/h; another at 4pm at 100 km/h. When does the second catch up?",
        "Derive the closed form of the sum of the first n squares.",
        "Explain the trade-offs of a B-tree against an LSM tree for a write-heavy workload.",
        "Refactor this recursive function into an iterative one and prove it equivalent.",
    ];
    let rows: String = easy
        .iter()
        .map(|p| (p, 1.0))
        .chain(hard.iter().map(|p| (p, 0.0)))
        .map(|(p, local)| {
            serde_json::json!({"prompt": p, "local": local, "upstream": 1.0}).to_string() + "\n"
        })
        .collect();
    let data = dir.path().join("rows.jsonl");
    std::fs::write(&data, rows).unwrap();
    let scorer = dir.path().join("scorer.json");
    let o = porteiro(&[
        "router",
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        scorer.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config = dir.path().join("router.toml");
    std::fs::write(
        &config,
        format!(
            "[router]\nscorer = {:?}\n[[upstreams]]\nname = \"big\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"big\"\n[[routes]]\nname = \"assistant\"\ntier = \"local\"\nexamples = [\"play a song\", \"set a timer\"]\n",
            scorer.to_str().unwrap()
        ),
    )
    .unwrap();
    let o = porteiro(&[
        "router",
        "parity",
        "--data",
        data.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    if !o.status.success() {
        assert!(err.contains("nothing to compare"), "{err}");
        eprintln!("no fast encoder path on this CPU: {err}");
        return;
    }
    println!("{out}");
    let first = out.lines().next().unwrap();
    assert!(first.starts_with("12 rows from"), "{first}");
    // "N (P%) decided alike": at most one of twelve clear-cut rows may flip.
    let alike: usize = first
        .split(": ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(alike >= 11, "{first}");
    assert!(first.contains("largest scorer difference"), "{first}");
}
