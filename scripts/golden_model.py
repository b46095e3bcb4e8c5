#!/usr/bin/env python3
"""Golden references from llama.cpp (the peer) for the engine's correctness tests.

For each model: greedy 64-token continuations of 5 prompts, the argmax prediction at every position of
2,048 tokens of real text (4 windows of 512, each starting with BOS when the model adds one), and
llama-perplexity's PPL on the same text. Writes crates/porteiro-engine/tests/golden/<alias>.json.

Needs scripts/build-llama-cpp.sh (the reference, with our llama_golden driver) and scripts/fetch-text.sh.
Usage: scripts/golden_model.py [alias ...]
"""
import json, os, pathlib, re, subprocess, sys, tempfile

HOME = pathlib.Path(os.environ.get("PORTEIRO_HOME", pathlib.Path.home() / ".cache/porteiro"))
ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = {
    "smollm2-135m": "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-0.5b": "qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "gemma3-270m": "gemma3-270m/gemma-3-270m-q4_k_m.gguf",
    "qwen2.5-1.5b": "qwen2.5-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "A cidade de São Paulo é conhecida por",
    "Here is a JSON object describing a user named Alice who is 30 years old:\n",
    "Once upon a time, in a small village by the sea,",
]
WINDOW, PPL_CHUNKS, TOP1_WINDOWS, GREEDY_N = 512, 16, 4, 64


def ids(out):
    return [int(x) for x in out.split()]


def main():
    ref = pathlib.Path(subprocess.check_output([ROOT / "scripts/build-llama-cpp.sh"], text=True).strip().splitlines()[-1])
    env = dict(os.environ, LD_LIBRARY_PATH=str(ref / "lib"))
    text_path = subprocess.check_output([ROOT / "scripts/fetch-text.sh"], text=True).strip()
    out_dir = ROOT / "crates/porteiro-engine/tests/golden"
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = str(os.cpu_count())

    def drive(model, *args, stdin=None):
        return subprocess.run([ref / "bin/llama_golden", model, *args], input=stdin, capture_output=True, text=True,
                              env=env, check=True).stdout

    for alias in sys.argv[1:] or MODELS:
        path = HOME / "models" / MODELS[alias]
        if not path.exists():
            subprocess.check_call([ROOT / "target/release/porteiro", "pull", alias])
        print(f"{alias}: reference runs", file=sys.stderr)
        greedy = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, p in enumerate(PROMPTS):
                f = pathlib.Path(tmp) / f"p{i}.txt"
                f.write_text(p, encoding="utf-8")
                prompt_ids, out_ids = drive(str(path), "greedy", str(GREEDY_N), str(f)).splitlines()
                greedy.append({"prompt": p, "prompt_ids": ids(prompt_ids), "ids": ids(out_ids)})
        text_ids = ids(drive(str(path), "tokenize", text_path))
        empty_ids = ids(drive(str(path), "tokenize", "/dev/null"))
        bos = empty_ids[0] if empty_ids else None
        windows = []
        for w in range(TOP1_WINDOWS):
            chunk = text_ids[w * WINDOW:(w + 1) * WINDOW]
            if bos is not None:
                chunk = [bos] + chunk[1:]
            am = ids(drive(str(path), "argmax", stdin=" ".join(map(str, chunk))))
            windows.append({"ids": chunk, "argmax": am})
        res = subprocess.run([ref / "bin/llama-perplexity", "-m", str(path), "-f", text_path, "-c", str(WINDOW),
                              "--chunks", str(PPL_CHUNKS), "-t", threads, "-b", str(WINDOW), "-fa", "off"],
                             capture_output=True, text=True, env=env)
        ppl = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
        if not ppl:
            sys.exit(f"llama-perplexity failed for {alias}:\n{res.stderr[-2000:]}")
        doc = {"model": alias, "reference": "llama.cpp (vendored in llama-cpp-python 0.3.36), flash attention off",
               "bos": bos,
               "greedy": greedy, "top1": windows,
               "perplexity": {"window": WINDOW, "chunks": PPL_CHUNKS,
                              "text": "exllamav3 wiki.utf8, first 400 KB, <doc> tags stripped (scripts/fetch-text.sh)",
                              "ppl": float(ppl.group(1))}}
        (out_dir / f"{alias}.json").write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n")
        print(f"{alias}: ppl {ppl.group(1)}", file=sys.stderr)


if __name__ == "__main__":
    main()
