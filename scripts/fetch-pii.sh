#!/usr/bin/env bash
# Fetches the labelled PII corpus nobody here wrote: presidio-evaluator 0.3.2's source package ships
# data/synth_dataset_v2.json (1,500 sentences, character spans, 17 entity types). Verifies the
# package's sha256, writes $PORTEIRO_HOME/data/pii_synth_v2.json and prints its path.
set -euo pipefail
HOME_DIR=${PORTEIRO_HOME:-$HOME/.cache/porteiro}
out="$HOME_DIR/data/pii_synth_v2.json"
if [[ -s $out ]]; then echo "$out"; exit 0; fi
mkdir -p "$HOME_DIR/pkgs" "$HOME_DIR/data"
pkg="$HOME_DIR/pkgs/presidio_evaluator-0.3.2.tar.gz"
want=2ec1be3710a2843553a5fb185916d85b0fa174fb9e1927e03ea83152fdc95eb1
[[ -f $pkg ]] || pip download --quiet --no-deps --no-binary :all: presidio-evaluator==0.3.2 -d "$HOME_DIR/pkgs" >&2
got=$(sha256sum "$pkg" | cut -d' ' -f1)
if [[ $got != "$want" ]]; then
  echo "fetch-pii: $pkg has sha256 $got, expected $want" >&2
  exit 1
fi
tar -xzf "$pkg" -O presidio_evaluator-0.3.2/data/synth_dataset_v2.json >"$out.partial"
mv "$out.partial" "$out"
echo "$out"
