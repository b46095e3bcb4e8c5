#!/usr/bin/env bash
# The project's test command (README, CI): fetch what the tests need, then every test of the workspace.
# Golden checks against llama.cpp read committed golden files; models missing here are a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-setup.sh
export PORTEIRO_REQUIRE_MODELS=1
cargo test --workspace -- --nocapture 2>&1
