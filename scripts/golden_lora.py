#!/usr/bin/env python3
"""Golden check of LoRA adapters against llama.cpp: Porteiro writes a fixed adapter per model
(crates/porteiro-engine/tests/lora.rs, `write_golden_adapters`), llama-perplexity scores the model
with and without it (`--lora`) on the same text and windows as the model goldens, and the figures go
to crates/porteiro-engine/tests/golden/lora.json, which `perplexity_with_an_adapter_matches_llama_cpp`
reproduces within 1%.

Needs scripts/build-llama-cpp.sh (the reference) and scripts/fetch-text.sh.
Usage: scripts/golden_lora.py
"""
import json, os, pathlib, re, subprocess, sys, tempfile

HOME = pathlib.Path(os.environ.get("PORTEIRO_HOME", pathlib.Path.home() / ".cache/porteiro"))
ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = {
    "smollm2-135m": "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-0.5b": "qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}
WINDOW, CHUNKS = 512, 4


def ppl(ref, model, text, extra):
    env = dict(os.environ, LD_LIBRARY_PATH=str(ref / "lib"))
    res = subprocess.run([ref / "bin/llama-perplexity", "-m", model, "-f", text, "-c", str(WINDOW),
                          "--chunks", str(CHUNKS), "-t", str(os.cpu_count()), "-b", str(WINDOW), "-fa", "off",
                          *extra], capture_output=True, text=True, env=env)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
    if not m:
        sys.exit(f"llama-perplexity failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return float(m.group(1))


def main():
    ref = pathlib.Path(subprocess.run([ROOT / "scripts/build-llama-cpp.sh"], check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1])
    text = subprocess.run([ROOT / "scripts/fetch-text.sh"], check=True, capture_output=True,
                          text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(["cargo", "test", "--release", "-p", "porteiro-engine", "--test", "lora",
                        "write_golden_adapters", "--", "--ignored", "--exact"],
                       check=True, cwd=ROOT, env=dict(os.environ, PORTEIRO_LORA_OUT=out))
        models = {}
        for alias, rel in MODELS.items():
            model = str(HOME / "models" / rel)
            adapter = str(pathlib.Path(out) / f"{alias}.gguf")
            models[alias] = {"window": WINDOW, "chunks": CHUNKS,
                             "ppl_base": ppl(ref, model, text, []),
                             "ppl_lora": ppl(ref, model, text, ["--lora", adapter])}
            print(f"{alias}: {models[alias]}", file=sys.stderr)
    doc = {"reference": "llama-perplexity --lora, llama.cpp vendored in llama-cpp-python 0.3.36, flash attention off",
           "adapter": "rank 4 on every projection, alpha 8, seeded, B amplitude per model (tests/lora.rs golden_adapter)",
           "text": "exllamav3 wiki.utf8, first 400 KB (scripts/fetch-text.sh)", "models": models}
    path = ROOT / "crates/porteiro-engine/tests/golden/lora.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(path)


if __name__ == "__main__":
    main()
