#!/usr/bin/env python3
"""The compression table: a model at each file type against its F16 original — size, bits per weight,
PPL ratio, mean KLD, same top-1 (`porteiro compare` on held-out text), decode tok/s (`porteiro bench`).

Usage: scripts/quant_table.py ORIGINAL.gguf EVAL.txt [TYPE ...] [--extra=NAME:FILE ...]
ORIGINAL is the reference (an F16 file; `porteiro quantize M f16.gguf --type F16` makes one from a
quantized catalog model: say so when reporting). EVAL must be text the model was not calibrated on.
"""
import json, os, pathlib, subprocess, sys, tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = os.environ.get("PORTEIRO_BIN", str(ROOT / "target/release/porteiro"))


def run(*args):
    return subprocess.run([BIN, *map(str, args)], check=True, capture_output=True, text=True).stdout


def row(name, path, orig, text, weights):
    c = json.loads(run("compare", orig, path, "-f", text, "-c", 512, "--chunks", 8, "--json"))
    b = json.loads(run("bench", "-m", path, "-p", 0, "-n", 64, "-r", 3, "--json"))
    size = os.path.getsize(path)
    tg = round(b["decode_tok_s"], 1)
    return {"type": name, "MiB": round(size / 2**20, 1), "bpw": round(8 * size / weights, 2),
            "ppl_ratio": round(c["ppl_ratio"], 4), "mean_kld": round(c["mean_kld"], 5),
            "same_top1_pct": round(100 * c["same_top1"], 1), "decode_tok_s": tg}


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--extra")]
    extra = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--extra=")]
    orig, text, types = args[0], args[1], args[2:] or ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]
    weights = os.path.getsize(orig) / 2  # an F16 original: two bytes a weight (norms aside)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in types:
            out = os.path.join(tmp, f"{t}.gguf")
            run("quantize", orig, out, "--type", t)
            rows.append(row(t, out, orig, text, weights))
            os.remove(out)
            print(json.dumps(rows[-1]), flush=True)
    for e in extra:
        name, path = e.split(":", 1) if ":" in e else (os.path.basename(e), e)
        rows.append(row(name, path, orig, text, weights))
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
