#!/usr/bin/env python3
"""Adapters made elsewhere load in Porteiro: a PEFT LoRA adapter (rank 8 on every attention and MLP
projection, B drawn random so it changes the model) is saved the way `peft` saves one, converted by
llama.cpp's own convert_lora_to_gguf.py (from the vendored llama.cpp source), and scored with
`llama-perplexity --lora` and `porteiro perplexity --lora` on the same text and windows: they must
agree within 1%, and the adapter must move perplexity.

Needs $PORTEIRO_HOME/st-venv with torch, transformers, peft (scripts/lora_train_bench.py's venv), the
llama.cpp build (scripts/build-llama-cpp.sh) and the text (scripts/fetch-text.sh).
Usage: scripts/lora_peft_check.py [--model smollm2-135m] [--b-std 0.1] [--bin target/release/porteiro]
"""
import argparse, json, os, pathlib, re, subprocess, sys, tarfile, tempfile

HOME = pathlib.Path(os.environ.get("PORTEIRO_HOME", pathlib.Path.home() / ".cache/porteiro"))
ROOT = pathlib.Path(__file__).resolve().parent.parent
REF = pathlib.Path(os.environ.get("PORTEIRO_LLAMA_CPP", HOME / "llama.cpp-0.3.36"))
SRC = HOME / "pkgs/llama_cpp_python-0.3.36.tar.gz"
PY = HOME / "st-venv/bin/python"

MAKE = r'''
import sys, torch, transformers, peft
gguf_path, base_dir, adapter_dir, b_std = sys.argv[1:5]
cfg = transformers.AutoConfig.from_pretrained(str(__import__("pathlib").Path(gguf_path).parent),
                                              gguf_file=__import__("pathlib").Path(gguf_path).name)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
cfg.architectures = [type(model).__name__]
cfg.save_pretrained(base_dir)  # convert_lora_to_gguf.py needs only the base's config
lc = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj",
                     "o_proj", "gate_proj", "up_proj", "down_proj"])
model = peft.get_peft_model(model, lc)
for n, p in model.named_parameters():
    if "lora_B" in n:
        torch.nn.init.normal_(p, std=float(b_std))
model.save_pretrained(adapter_dir)
'''


def ppl_llama(model, lora, text):
    env = dict(os.environ, LD_LIBRARY_PATH=str(REF / "lib"))
    res = subprocess.run([REF / "bin/llama-perplexity", "-m", model, "--lora", lora, "-f", text, "-c", "512",
                          "--chunks", "4", "-b", "512", "-t", str(os.cpu_count()), "-fa", "off"],
                         capture_output=True, text=True, env=env)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
    if not m:
        sys.exit(f"llama-perplexity failed:\n{res.stderr[-2000:]}")
    return float(m.group(1))


def ppl_ours(binary, alias, lora, text):
    args = [binary, "perplexity", "-m", alias, "-f", text, "--chunks", "4"] + (["--lora", lora] if lora else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return float(re.search(r"perplexity ([0-9.]+)", out.stdout + out.stderr).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bin", default=str(ROOT / "target/release/porteiro"))
    ap.add_argument("--b-std", type=float, default=0.1,
                    help="spread of B: enough to move perplexity, not so much the model breaks down")
    a = ap.parse_args()
    gguf = subprocess.run([a.bin, "pull", a.model], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1].split()[-1]
    text = subprocess.run([ROOT / "scripts/fetch-text.sh"], capture_output=True, text=True,
                          check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        t = pathlib.Path(tmp)
        with tarfile.open(SRC) as tf:
            members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name and (
                m.name.endswith("convert_lora_to_gguf.py") or m.name.endswith("convert_hf_to_gguf.py")
                or "/gguf-py/" in m.name or "/llama.cpp/conversion/" in m.name)]
            tf.extractall(t, members=members, filter="data")
        lcpp = next(t.glob("*/vendor/llama.cpp"))
        subprocess.run([PY, "-c", MAKE, gguf, t / "base", t / "adapter", str(a.b_std)], check=True)
        out = t / "peft.gguf"
        env = dict(os.environ, PYTHONPATH=str(lcpp / "gguf-py"))
        subprocess.run([PY, lcpp / "convert_lora_to_gguf.py", "--base", t / "base", "--outtype", "f16",
                        "--outfile", out, t / "adapter"], check=True, env=env)
        base = ppl_ours(a.bin, a.model, None, text)
        ref, ours = ppl_llama(gguf, out, text), ppl_ours(a.bin, a.model, out, text)
    rel = (ours - ref) / ref
    res = {"model": a.model, "ppl_base": base, "ppl_llama_cpp_lora": ref, "ppl_porteiro_lora": ours, "rel": rel}
    print(json.dumps(res))
    if abs(rel) > 0.01 or abs(ours - base) / base < 0.01:
        sys.exit("FAIL: Porteiro and llama.cpp disagree on the converted adapter (or it changes nothing)")
    print("PASS")


if __name__ == "__main__":
    main()
