#!/usr/bin/env bash
# Everything the test suite needs on a fresh machine: the release binary, the four catalog models
# (pulled through `porteiro pull`, verified by sha256) and the real text used for perplexity.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
for m in smollm2-135m qwen2.5-0.5b gemma3-270m qwen2.5-1.5b; do
  ./target/release/porteiro pull --quiet "$m" >/dev/null
done
scripts/fetch-text.sh >/dev/null
# The server tests: the sentence encoder behind /v1/embeddings, and the official OpenAI Python SDK that
# scripts/openai_e2e.py drives `porteiro serve` with.
./target/release/porteiro pull --quiet minilm-l6 >/dev/null
# Reference vectors for the encoder from the sentence-transformers package (pinned, in its own venv
# under $PORTEIRO_HOME/st-venv: torch's wheels with their CUDA libraries are ~3 GB, fetched once).
HOME_DIR=${PORTEIRO_HOME:-$HOME/.cache/porteiro}
if [[ ! -s $HOME_DIR/data/minilm-reference.json ]]; then
  python3 scripts/minilm_reference.py "$HOME_DIR/models/minilm-l6" "$HOME_DIR/data/minilm-reference.json" >/dev/null
fi
# The privacy guard: its first-name list and the sources of its name words (derived and cached by the
# first scan), the place lists of its opt-in quasi-identifiers, and the labelled PII corpus its tests
# measure against.
for d in names forenames surnames wordfreq-en wordfreq-pt places-cities places-countries; do
  ./target/release/porteiro pull --quiet $d >/dev/null
done
./target/release/porteiro privacy --quasi-identifiers scan "warm-up" >/dev/null
scripts/fetch-pii.sh >/dev/null
python3 -m pip install --quiet --disable-pip-version-check openai prometheus-client
# The flywheel test's real requests: SNIPS utterances and BFCL questions (sha256-checked, cached).
python3 -c 'import sys; sys.path.insert(0, "scripts"); import lora_data as d; d.fetch("snips"); d.fetch("bfcl")'
# The dashboard test: Debian's Chromium driven by playwright-core.
if ! command -v chromium >/dev/null; then
  if [[ $(id -u) == 0 ]]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
(cd scripts/dashboard && npm install --no-audit --no-fund --silent)
# The request log's PostgreSQL sink is tested against a throwaway cluster of Debian's PostgreSQL.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
