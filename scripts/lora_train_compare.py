#!/usr/bin/env python3
"""Training speed and memory, Porteiro against torch + peft, in one run: for each model, `porteiro lora
train --json` and scripts/lora_train_bench.py (torch + peft over the dequantized model) train the same
number of steps of --batch-tokens tokens from the same chat JSONL, rank 16 on every attention and MLP
projection, at the same thread count. Each side reports tokens/s after its first step and its peak RSS;
the table gives the ratio. Run it on a quiet machine: both sides are CPU-bound.

Usage: scripts/lora_train_compare.py --data FILE.jsonl [--models smollm2-135m,qwen2.5-0.5b] [--steps 6]
         [--batch-tokens 1024] [--threads 2] [--bin target/release/porteiro]
"""
import argparse, json, os, pathlib, subprocess, sys, tempfile

HOME = pathlib.Path(os.environ.get("PORTEIRO_HOME", pathlib.Path.home() / ".cache/porteiro"))
ROOT = pathlib.Path(__file__).resolve().parent.parent


def last_json(out):
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bin", default=str(ROOT / "target/release/porteiro"))
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for alias in a.models.split(","):
            path = subprocess.run([a.bin, "pull", alias], capture_output=True, text=True, check=True)
            gguf = path.stdout.strip().splitlines()[-1].split()[-1]
            ours = last_json(subprocess.run(
                [a.bin, "lora", "train", "-m", alias, "--data", a.data, "--out", f"{tmp}/{alias}.gguf",
                 "--rank", "16", "--alpha", "32", "--batch-tokens", str(a.batch_tokens), "--epochs", "50",
                 "--max-steps", str(a.steps), "--checkpoint-every", "0", "-t", str(a.threads), "--json"],
                capture_output=True, text=True, check=True).stdout)
            torch = last_json(subprocess.run(
                [str(HOME / "st-venv/bin/python"), str(ROOT / "scripts/lora_train_bench.py"), "--model", gguf,
                 "--data", a.data, "--threads", str(a.threads), "--steps", str(a.steps),
                 "--batch-tokens", str(a.batch_tokens), "--rank", "16", "--alpha", "32"],
                capture_output=True, text=True, check=True).stdout)
            rows.append((alias, ours, torch))
            print(json.dumps({"model": alias, "porteiro": ours, "torch": torch}), flush=True)
    print(f"\n| model | Porteiro tok/s | torch+peft tok/s | speed ratio | Porteiro peak RSS | torch peak RSS |")
    print("|---|---|---|---|---|---|")
    for alias, o, t in rows:
        print(f"| {alias} | {o['tokens_per_s']:.1f} | {t['tokens_per_s']:.1f} | "
              f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x | {o['peak_rss_mib']:.0f} MiB | {t['peak_rss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
