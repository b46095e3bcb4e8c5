#!/usr/bin/env python3
"""The compression table: for each model and file type, the size, bits per weight, PPL ratio, mean and
p99 KLD, same top-1 against the model's reference, and decode speed (ours, and llama.cpp's on the same
file with --peer).

The registries ship no F16 original of the catalog models, so the reference is the shipped file
dequantized to F16 (`porteiro quantize ALIAS ref.gguf --type F16`), and every row is quantized from
that reference: the figures measure what each type loses relative to the shipped weights. Text: measure
on text the quantizer never saw (the default splits wiki.txt: first half for calibration, second half
for measuring). Quantized files are cached in --out and reused.

Usage: scripts/compression_table.py [--models smollm2-135m,qwen2.5-1.5b] [--types Q8_0,Q4_K_M,Q3_K_M]
       [--chunks 8] [--window 512] [--peer] [--imatrix] [--out DIR]
"""
import argparse, json, os, pathlib, re, subprocess, sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOME = pathlib.Path(os.environ.get("PORTEIRO_HOME", pathlib.Path.home() / ".cache/porteiro"))
BIN = os.environ.get("PORTEIRO_BIN", str(ROOT / "target/release/porteiro"))


def run(args, **kw):
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"porteiro {' '.join(map(str, args))} failed:\n{p.stderr[-2000:]}")
    return p


def texts(out):
    """calib.txt / eval.txt: the two halves of the perplexity text (split at a paragraph)."""
    calib, ev = out / "calib.txt", out / "eval.txt"
    if not (calib.exists() and ev.exists()):
        wiki = (HOME / "data/wiki.txt").read_text()
        cut = wiki.find("\n\n", len(wiki) // 2)
        calib.write_text(wiki[:cut])
        ev.write_text(wiki[cut:])
    return calib, ev


def quantize(src, dst, ftype, extra=()):
    if dst.exists():
        return None
    p = run(["quantize", src, dst, "--type", ftype, *extra])
    m = re.search(r"([\d.]+) bits per weight", p.stdout + p.stderr)
    return float(m.group(1)) if m else None


def parser(doc, types, chunks):
    """The options this script and budget_table.py share."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-0.5b,qwen2.5-1.5b")
    ap.add_argument("--types", default=types)
    ap.add_argument("--chunks", type=int, default=chunks)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", default=str(HOME / "compression"))
    return ap


def workdir(a):
    """The --out folder, made if missing, and its calibration and evaluation halves."""
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    return (out, *texts(out))


def main():
    ap = parser(__doc__, "Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K", 8)
    ap.add_argument("--gen", type=int, default=64, help="decode tokens for the speed column")
    ap.add_argument("--peer", action="store_true", help="llama.cpp's decode speed on the same file")
    ap.add_argument("--imatrix", action="store_true", help="quantize with an imatrix from the calibration half")
    a = ap.parse_args()
    out, calib, ev = workdir(a)
    rows = []
    for alias in a.models.split(","):
        ref = out / f"{alias}-F16.gguf"
        quantize(alias, ref, "F16")
        extra, tag = [], ""
        if a.imatrix:
            im = out / f"{alias}.imatrix.gguf"
            if not im.exists():
                run(["imatrix", "-m", ref, "-f", calib, "-o", im])
            extra, tag = ["--imatrix", im], "-im"
        for t in a.types.split(","):
            q = out / f"{alias}-{t}{tag}.gguf"
            quantize(ref, q, t, extra)
            c = json.loads(run(["compare", ref, q, "-f", ev, "-c", a.window, "--chunks", a.chunks, "--json"]).stdout)
            bench = ["bench", "-m", q, "-p", 0, "-n", a.gen, "-r", 1, "--json"]
            b = json.loads(run(bench + (["--compare", "llama.cpp"] if a.peer else [])).stdout)
            peer = (b.get("llama_cpp") or {}).get("decode_tok_s")
            size = q.stat().st_size
            bpw = 8 * size / (ref.stat().st_size / 2)
            rows.append((alias, t + tag, size, bpw, c, b["decode_tok_s"], peer))
            print(f"{alias} {t}{tag}: {size / 2**20:.1f} MiB, ppl ratio {c['ppl_ratio']:.4f}, "
                  f"KLD {c['mean_kld']:.4f}, top-1 {c['same_top1']:.2%}, {b['decode_tok_s']:.1f} tok/s",
                  file=sys.stderr, flush=True)
    print(f"Reference: each model's shipped file dequantized to F16; text: {ev} "
          f"({a.chunks} windows of {a.window}, second halves scored)\n")
    print("| model | type | size MiB | bpw | PPL ratio | mean KLD | KLD p99 | same top-1 | decode tok/s |"
          + (" llama.cpp tok/s |" if a.peer else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if a.peer else ""))
    for alias, t, size, bpw, c, tok, peer in rows:
        line = (f"| {alias} | {t} | {size / 2**20:.1f} | {bpw:.2f} | {c['ppl_ratio']:.4f} | {c['mean_kld']:.4f} "
                f"| {c['kld_p99']:.4f} | {c['same_top1']:.2%} | {tok:.1f} |")
        if a.peer:
            line += f" {peer:.1f} |" if peer else " — |"
        print(line)


if __name__ == "__main__":
    main()
