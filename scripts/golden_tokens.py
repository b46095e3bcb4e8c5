#!/usr/bin/env python3
"""Writes golden token ids from the reference llama.cpp for porteiro's tokenizer tests.

For each model alias found under $PORTEIRO_HOME/models (default ~/.cache/porteiro/models) this runs the
reference `llama-tokenize` (built by scripts/build-llama-cpp.sh) on a fixed set of texts and writes
crates/porteiro-models/tests/golden/tokens-<alias>.json:

    [{"text": "...", "ids": [..], "add_special": true, "parse_special": true}, ...]

`add_special` is what llama-tokenize passed to llama_tokenize: the model's add_bos flag, unless the
entry was made with --no-bos (then false). Only the Python standard library is used.

Usage: scripts/golden_tokens.py [alias ...]
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("PORTEIRO_HOME", Path.home() / ".cache" / "porteiro"))
REF = Path(os.environ.get("PORTEIRO_LLAMA_CPP", HOME / "llama.cpp-0.3.36"))
OUT = ROOT / "crates" / "porteiro-models" / "tests" / "golden"
ALIASES = ["smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"]
REAL_TEXT = HOME / "data" / "wiki.txt"
REAL_CHARS = 4000

TEXTS = [
    "Hello world! This is a simple test.",
    "I'm sure they'll say it's fine, but we've seen what you'd do. DON'T SHOUT, O'Neil! We'Re HERE'S",
    "Ação, não, coração, São Paulo — açúcar, pão e informação às três horas. Pingüim, avô, você.",
    "def foo(x):\n    if x > 0:\n\treturn x * 2  # double\n    return None\n\n\nclass A:\n\t\tpass\n",
    "Launch 🚀👍🏽 now! 👨\u200d👩\u200d👧\u200d👦 family ❤️ ✓ ★",
    "1234567 3.14159 -42 1,000,000 2024-07-26 0x1F 007 ١٢٣ ½",
    "a   b\n\n\n  c",
    "   leading and trailing   ",
    " ",
    "\n",
    "",
    "col1\tcol2\t\tcol3\r\nline2\r\n\r\n  end \t\n",
    "日本語のテキスト、中文文本。한국어 텍스트. Русский текст. العربية. ελληνικά",
    "non\u00a0breaking\u2003em\u3000ideographic e\u0301 combining \u200b zero-width",
    "!!!??? ...---*** (a) [b] {c} <d> \"quotes\" 'single' `tick` @#$%^&* ~|\\ ==> <= != ''",
    "https://example.com/path?query=value&other=123#frag supercalifragilisticexpialidocious aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    '{"key": "value", "list": [1, 2, 3], "nested": {"ok": true}}\n# Title\n\n- item one\n- item two\n',
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>",
    "<start_of_turn>user\nOlá, tudo bem?<end_of_turn>\n<start_of_turn>model\n",
    "text <|endoftext|> more <s> and </s> <bos><eos> <unk> <pad> <mask>",
    "<|im_start|><|im_start|>nested <|im_end|x <|im_end|>",
]

# special-token texts are also tokenized without parsing the specials
SPECIAL_MARKERS = ["<|", "<s>", "</s>", "<bos>", "<eos>", "<start_of_turn>", "<unk>", "<pad>", "<mask>"]


def model_path(alias):
    d = HOME / "models" / alias
    files = sorted(d.glob("*.gguf")) if d.is_dir() else []
    return files[0] if files else None


def tokenize(tool, model, text, no_bos, parse_special):
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write(text.encode("utf-8"))
        path = f.name
    try:
        cmd = [str(tool), "-m", str(model), "-f", path, "--ids", "--log-disable", "--no-escape"]
        if no_bos:
            cmd.append("--no-bos")
        if not parse_special:
            cmd.append("--no-parse-special")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = str(REF / "lib") + ":" + env.get("LD_LIBRARY_PATH", "")
        res = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.decode(errors='replace')[-2000:]}")
        lines = [l for l in res.stdout.decode().splitlines() if l.startswith("[")]
        if not lines:
            raise RuntimeError(f"no ids in output of {' '.join(cmd)}: {res.stdout!r}")
        return json.loads(lines[-1])
    finally:
        os.unlink(path)


def model_adds_bos(tool, model):
    # an empty prompt gives [BOS] exactly when the model adds one
    return len(tokenize(tool, model, "", False, True)) > 0


def real_text():
    if not REAL_TEXT.is_file():
        print(f"note: {REAL_TEXT} not found (scripts/fetch-text.sh writes it); no real-text entry", file=sys.stderr)
        return None
    t = REAL_TEXT.read_text(encoding="utf-8")[:REAL_CHARS]
    return t[: t.rfind("\n") + 1] or t


def main():
    tool = REF / "bin" / "llama-tokenize"
    if not tool.exists():
        sys.exit(f"{tool} not found: build the reference with scripts/build-llama-cpp.sh (or set PORTEIRO_LLAMA_CPP)")
    aliases = sys.argv[1:] or ALIASES
    texts = list(TEXTS)
    rt = real_text()
    if rt:
        texts.append(rt)
    OUT.mkdir(parents=True, exist_ok=True)
    for alias in aliases:
        model = model_path(alias)
        if model is None:
            print(f"skip {alias}: no .gguf under {HOME / 'models' / alias}", file=sys.stderr)
            continue
        adds_bos = model_adds_bos(tool, model)
        entries = []
        for i, text in enumerate(texts):
            variants = [(False, True)]
            if any(m in text for m in SPECIAL_MARKERS):
                variants.append((False, False))
            if i < 3 and adds_bos:
                variants.append((True, True))
            for no_bos, parse_special in variants:
                ids = tokenize(tool, model, text, no_bos, parse_special)
                entries.append({
                    "text": text,
                    "ids": ids,
                    "add_special": adds_bos and not no_bos,
                    "parse_special": parse_special,
                })
        out = OUT / f"tokens-{alias}.json"
        with open(out, "w", encoding="utf-8") as f:
            f.write("[\n")
            f.write(",\n".join(json.dumps(e, ensure_ascii=False) for e in entries))
            f.write("\n]\n")
        print(f"{alias}: {len(entries)} entries -> {out.relative_to(ROOT)} (model {model.name}, add_bos={adds_bos})")


if __name__ == "__main__":
    main()
