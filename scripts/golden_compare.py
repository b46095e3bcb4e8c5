#!/usr/bin/env python3
"""Golden reference for `porteiro compare`: `llama-perplexity --kl-divergence` (the peer) on two models
that share a tokenizer, over the same windows of real text. The base's log-probabilities are saved with
--kl-divergence-base, then the other model is scored against them. Writes
crates/porteiro-engine/tests/golden/compare.json with the statistics llama.cpp prints.

Needs scripts/build-llama-cpp.sh and scripts/fetch-text.sh. Usage: scripts/golden_compare.py
"""
import json, os, pathlib, re, subprocess, sys, tempfile

HOME = pathlib.Path(os.environ.get("PORTEIRO_HOME", pathlib.Path.home() / ".cache/porteiro"))
ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = ("qwen2.5-1.5b", "qwen2.5-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
QUANT = ("qwen2.5-0.5b", "qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
WINDOW, CHUNKS = 512, 4
# llama-perplexity's summary lines -> our field names (values as printed; Δp lines in percent).
FIELDS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([-0-9.]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([-0-9.]+)",
    "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([-0-9.]+)",
    "mean_kld": r"Mean\s+KLD:\s*([-0-9.]+)",
    "max_kld": r"Maximum KLD:\s*([-0-9.]+)",
    "kld_p999": r"99\.9%\s+KLD:\s*([-0-9.]+)",
    "kld_p99": r"99\.0%\s+KLD:\s*([-0-9.]+)",
    "kld_p95": r"95\.0%\s+KLD:\s*([-0-9.]+)",
    "kld_p90": r"90\.0%\s+KLD:\s*([-0-9.]+)",
    "kld_median": r"Median\s+KLD:\s*([-0-9.]+)",
    "mean_dp_pct": r"Mean\s+Δp:\s*([-0-9.]+)",
    "rms_dp_pct": r"RMS Δp\s*:\s*([-0-9.]+)",
    "same_top1_pct": r"Same top p:\s*([-0-9.]+)",
}


def main():
    ref = pathlib.Path(subprocess.check_output([ROOT / "scripts/build-llama-cpp.sh"], text=True).strip().splitlines()[-1])
    env = dict(os.environ, LD_LIBRARY_PATH=str(ref / "lib"))
    text = subprocess.check_output([ROOT / "scripts/fetch-text.sh"], text=True).strip()
    common = ["-f", text, "-c", str(WINDOW), "--chunks", str(CHUNKS), "-t", str(os.cpu_count()), "-b", str(WINDOW),
              "-fa", "off"]
    with tempfile.TemporaryDirectory() as tmp:
        logits = os.path.join(tmp, "base.kld")
        for args in (["-m", str(HOME / "models" / BASE[1]), "--kl-divergence-base", logits],
                     ["-m", str(HOME / "models" / QUANT[1]), "--kl-divergence-base", logits, "--kl-divergence"]):
            res = subprocess.run([ref / "bin/llama-perplexity", *args, *common], capture_output=True, text=True, env=env)
            if res.returncode != 0:
                sys.exit(f"llama-perplexity failed ({res.returncode}):\n{res.stderr[-2000:]}")
        out = res.stdout + res.stderr
    stats = {}
    for k, pat in FIELDS.items():
        m = re.search(pat, out)
        if not m:
            sys.exit(f"no `{k}` in llama-perplexity's output:\n{out[-3000:]}")
        stats[k] = float(m.group(1))
    doc = {"base": BASE[0], "quant": QUANT[0], "window": WINDOW, "chunks": CHUNKS,
           "reference": "llama-perplexity --kl-divergence (llama.cpp vendored in llama-cpp-python 0.3.36), flash attention off",
           "text": "exllamav3 wiki.utf8, first 400 KB, <doc> tags stripped (scripts/fetch-text.sh)", "stats": stats}
    path = ROOT / "crates/porteiro-engine/tests/golden/compare.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
