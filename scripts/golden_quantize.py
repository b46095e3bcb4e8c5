#!/usr/bin/env python3
"""Golden reference for `porteiro quantize`: what `llama-quantize` (llama.cpp vendored in llama-cpp-python
0.3.36) writes from the same input. The input is the catalog's smollm2-135m converted to F16 by
`llama-quantize --allow-requantize` (the registries ship no F16 original); from that F16 file each file
type is quantized without an imatrix. Records the sha256 of every file and each tensor's type in
crates/porteiro/tests/golden/quantize.json; tests/quantize.rs checks that `porteiro quantize` writes the
same bytes.

Needs scripts/build-llama-cpp.sh. Usage: scripts/golden_quantize.py [MODEL_ALIAS]
"""
import hashlib, json, os, pathlib, subprocess, sys, tempfile

HOME = pathlib.Path(os.environ.get("PORTEIRO_HOME", pathlib.Path.home() / ".cache/porteiro"))
ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = {"smollm2-135m": "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
          "qwen2.5-0.5b": "qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
          "qwen2.5-1.5b": "qwen2.5-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"}
TYPES = ["Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "Q5_K_M", "Q4_K_S"]


def sha256(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 22), b""):
            h.update(b)
    return h.hexdigest()


def tensor_types(p):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gguf  # the `gguf` package, when installed: per-tensor types for the record
    except ImportError:
        return None
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(p).tensors}


def main():
    alias = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    ref = pathlib.Path(subprocess.check_output([ROOT / "scripts/build-llama-cpp.sh"], text=True).strip().splitlines()[-1])
    env = dict(os.environ, LD_LIBRARY_PATH=str(ref / "lib"))
    q = lambda *a: subprocess.run([ref / "bin/llama-quantize", *map(str, a)], check=True, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    doc = {"model": alias, "reference": "llama-quantize (llama.cpp vendored in llama-cpp-python 0.3.36), no imatrix",
           "input": "the catalog file converted with llama-quantize --allow-requantize IN OUT F16", "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        f16 = os.path.join(tmp, "f16.gguf")
        q("--allow-requantize", HOME / "models" / MODELS[alias], f16, "F16")
        doc["f16_sha256"] = sha256(f16)
        for t in TYPES:
            out = os.path.join(tmp, f"{t}.gguf")
            q(f16, out, t)
            doc["files"][t] = {"sha256": sha256(out), "bytes": os.path.getsize(out)}
            types = tensor_types(out)
            if types:
                doc["files"][t]["tensor_types"] = dict(sorted({v: sum(1 for x in types.values() if x == v)
                                                              for v in types.values()}.items()))
            os.remove(out)
    path = ROOT / "crates/porteiro/tests/golden/quantize.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
