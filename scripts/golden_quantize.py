#!/usr/bin/env python3
"""Golden reference for `porteiro quantize`: what `llama-quantize` (llama.cpp vendored in llama-cpp-python
0.3.36) writes from the same input. The input is the catalog's smollm2-135m converted to F16 by
`llama-quantize --allow-requantize` (the registries ship no F16 original); from that F16 file each file
type is quantized without an imatrix, and again with a synthetic one (the same values the test builds).
Records the sha256 of every file and each tensor's type in
crates/porteiro/tests/golden/quantize.json; tests/quantize.rs checks that `porteiro quantize` writes the
same bytes.

Needs scripts/build-llama-cpp.sh. Usage: scripts/golden_quantize.py [MODEL_ALIAS]
"""
import hashlib, json, os, pathlib, struct, subprocess, sys, tempfile

HOME = pathlib.Path(os.environ.get("PORTEIRO_HOME", pathlib.Path.home() / ".cache/porteiro"))
ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = {"smollm2-135m": "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
          "qwen2.5-0.5b": "qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
          "qwen2.5-1.5b": "qwen2.5-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"}
TYPES = ["Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "Q5_K_M", "Q4_K_S", "Q3_K_M", "Q2_K"]


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


def gguf_tensors(p):
    """(name, dims) of every tensor in a GGUF file, from its header."""
    d = open(p, "rb").read(64 << 20)
    pos = 4
    _, nt, nkv = struct.unpack_from("<IQQ", d, pos); pos += 20
    size = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string():
        nonlocal pos
        n, = struct.unpack_from("<Q", d, pos); pos += 8 + n
        return d[pos - n:pos].decode("utf-8", "replace")

    def value(t):
        nonlocal pos
        if t == 8:
            string()
        elif t == 9:
            et, n = struct.unpack_from("<IQ", d, pos); pos += 12
            for _ in range(n):
                value(et)
        else:
            pos += size[t]
    for _ in range(nkv):
        string(); t, = struct.unpack_from("<I", d, pos); pos += 4; value(t)
    out = []
    for _ in range(nt):
        name = string(); nd, = struct.unpack_from("<I", d, pos); pos += 4
        dims = struct.unpack_from("<%dQ" % nd, d, pos); pos += 8 * nd + 12
        out.append((name, dims))
    return out


def synthetic_importance(name, cols):
    """The importance of column i of `name` (exact in f32; tests/quantize.rs computes the same)."""
    return [1 + ((i * 37 + len(name) * 11) % 101) / 64 for i in range(cols)]


def write_synthetic_imatrix(f16, path):
    """A GGUF imatrix (llama.cpp's format) with synthetic importances for every layer matrix."""
    def s(x): return struct.pack("<Q", len(x.encode())) + x.encode()
    ts = [(n, d) for n, d in gguf_tensors(f16) if n.startswith("blk.") and len(d) >= 2 and d[1] > 1]
    kv = [s("general.type") + struct.pack("<I", 8) + s("imatrix"),
          s("imatrix.datasets") + struct.pack("<IIQ", 9, 8, 1) + s("synthetic"),
          s("imatrix.chunk_count") + struct.pack("<II", 4, 1),
          s("imatrix.chunk_size") + struct.pack("<II", 4, 512)]
    infos, data, off = [], b"", 0
    for n, d in sorted(ts):
        for suffix, blob, dims in ((".in_sum2", struct.pack("<%df" % d[0], *synthetic_importance(n, d[0])), (d[0], 1)),
                                   (".counts", struct.pack("<f", 1.0), (1, 1))):
            infos.append(s(n + suffix) + struct.pack("<I", 2) + struct.pack("<QQ", *dims) + struct.pack("<IQ", 0, off))
            pad = (-len(blob)) % 32
            data += blob + b"\0" * pad
            off += len(blob) + pad
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kv)) + b"".join(kv) + b"".join(infos)
    head += b"\0" * ((-len(head)) % 32)
    open(path, "wb").write(head + data)


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
        # With an importance matrix: a synthetic one (the test builds the same), named relative to
        # the working directory because llama-quantize records the path it was given.
        write_synthetic_imatrix(f16, os.path.join(tmp, "synthetic.imatrix.gguf"))
        doc["files_imatrix"] = {}
        for t in TYPES:
            out = f"{t}.im.gguf"
            subprocess.run([ref / "bin/llama-quantize", "--imatrix", "synthetic.imatrix.gguf", "f16.gguf", out, t],
                           check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            doc["files_imatrix"][t] = {"sha256": sha256(os.path.join(tmp, out)),
                                       "bytes": os.path.getsize(os.path.join(tmp, out))}
            os.remove(os.path.join(tmp, out))
    path = ROOT / "crates/porteiro/tests/golden/quantize.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
