#!/usr/bin/env python3
"""Golden check of LoRA training against PyTorch: for each model, `porteiro lora train` runs 20 optimizer
steps on crates/porteiro-train/tests/golden/chat.jsonl with a trace (every step's token sequences, loss
and learning rate, the initial adapter, the first step's gradients); scripts/lora_reference.py replays
the trace in plain PyTorch over the same GGUF weights dequantized by the `gguf` package (torch.optim.AdamW,
clip_grad_norm_) and must agree: first loss and every first-step gradient tensor within 1e-3 relative,
every loss within 1%. The sequences, learning rates and PyTorch's losses go to
crates/porteiro-train/tests/golden/train.json, which `training_matches_pytorch` (tests/golden.rs)
replays without torch.

Needs the st-venv with torch and gguf (scripts/test-setup.sh builds it; `pip install gguf==0.19.0`).
Usage: scripts/golden_lora_train.py [--models smollm2-135m,qwen2.5-0.5b,gemma3-270m] [--bin target/release/porteiro]
"""
import argparse, json, os, pathlib, subprocess, sys, tempfile

HOME = pathlib.Path(os.environ.get("PORTEIRO_HOME", pathlib.Path.home() / ".cache/porteiro"))
ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "crates/porteiro-train/tests/golden"
# Small steps (about one sequence each) keep the golden file and CI short; B starts non-zero so the
# first step's A gradients are not trivially zero.
ARGS = ["--rank", "4", "--alpha", "8", "--batch-tokens", "200", "--micro-tokens", "200", "--epochs", "2",
        "--max-steps", "20", "--lr", "1e-3", "--warmup", "3", "--init-b", "0.01", "--seed", "1",
        "--clip", "1.0", "--threads", "2"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b,gemma3-270m")
    ap.add_argument("--bin", default=str(ROOT / "target/release/porteiro"))
    a = ap.parse_args()
    py = HOME / "st-venv/bin/python"
    out_path = GOLDEN / "train.json"
    golden = json.loads(out_path.read_text()) if out_path.exists() else {}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for alias in a.models.split(","):
            trace = pathlib.Path(tmp) / f"{alias}.jsonl"
            subprocess.run([a.bin, "lora", "train", "-m", alias, "--data", GOLDEN / "chat.jsonl",
                            "--out", pathlib.Path(tmp) / f"{alias}.gguf", "--trace", trace, *ARGS], check=True)
            rep = pathlib.Path(tmp) / f"{alias}.ref.json"
            res = subprocess.run([py, ROOT / "scripts/lora_reference.py", "--trace", trace, "--steps", "20",
                                  "--json", rep])
            doc = json.loads(rep.read_text())
            if res.returncode != 0 or not doc.get("pass"):
                failed.append(alias)
            lines = [json.loads(l) for l in trace.read_text().splitlines() if l.strip()]
            cfg, steps = lines[0], lines[1:]
            ref = {r["step"]: r for r in doc["steps"]}
            golden[alias] = {
                "args": ARGS,
                "rank": cfg["rank"], "alpha": cfg["alpha"],
                "loss_rel_max": max(r["rel"] for r in doc["steps"]),
                "grad_rel_max": doc["steps"][0].get("grad_rel_max"),
                "steps": [{"lr": s["lr"], "loss_torch": ref[s["step"]]["loss_ours"],
                           "grad_norm_torch": ref[s["step"]]["grad_norm_ours"],
                           "sequences": [{"tokens": q["tokens"], "mask": "".join(map(str, q["mask"]))}
                                         for q in s["sequences"]]} for s in steps],
            }
            print(f"{alias}: loss max rel {golden[alias]['loss_rel_max']:.2e}, "
                  f"first-step grads max rel {golden[alias]['grad_rel_max']:.2e}", file=sys.stderr)
    out_path.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    if failed:
        sys.exit(f"the PyTorch reference disagrees for {', '.join(failed)}")


if __name__ == "__main__":
    main()
