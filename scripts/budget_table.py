#!/usr/bin/env python3
"""The budget allocator against uniform file types at equal bytes.

For each model and each uniform type T: the uniform file (`porteiro quantize REF --type T`, as in
scripts/compression_table.py, whose --out folder and files it shares), then `porteiro quantize REF
--budget <that file's size in bytes>`: per-tensor types fitted on the calibration half of the wiki
text. Both are then measured against REF on the other half (the allocator never saw it): PPL ratio,
mean KLD, p99 KLD, same top-1. The measurements of one model are taken once and reused across
budgets (--sensitivities).

REF: a catalog alias (its shipped file dequantized to F16: the shipped grid, which flatters the type it
was made with) or NAME=PATH to an F16 original, e.g. a merged fine-tune
(`porteiro lora merge ... --type F16`).

Usage: scripts/budget_table.py [--models smollm2-135m,qwen0.5b-snips=/path/merged-f16.gguf]
       [--types Q3_K_M,Q4_K_M,Q5_K_M] [--chunks 6] [--out DIR]
"""
import json, pathlib, sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from compression_table import parser, quantize, run, workdir  # noqa: E402

CANDIDATES = "Q2_K,Q3_K,Q4_0,Q4_K,Q5_K,Q6_K,Q8_0"


def main():
    ap = parser(__doc__, "Q3_K_M,Q4_K_M,Q5_K_M", 6)
    ap.add_argument("--candidates", default=CANDIDATES)
    ap.add_argument("--calib-chunks", type=int, default=2, help="calibration windows of 256 tokens")
    a = ap.parse_args()
    out, calib, ev = workdir(a)
    rows = []
    for spec in a.models.split(","):
        if "=" in spec:
            alias, ref = spec.split("=", 1)
            ref = pathlib.Path(ref)
        else:
            alias, ref = spec, out / f"{spec}-F16.gguf"
            quantize(spec, ref, "F16")
        measure = lambda q: json.loads(run(["compare", ref, q, "-f", ev, "-c", a.window, "--chunks", a.chunks,
                                            "--json"]).stdout)
        for t in a.types.split(","):
            uni = out / f"{alias}-{t}.gguf"
            quantize(ref, uni, t)
            size = uni.stat().st_size
            fit = out / f"{alias}-budget-{t}.gguf"
            if not fit.exists():
                p = run(["quantize", ref, fit, "--type", t, "--budget", size, "--calib", calib,
                         "--candidates", a.candidates, "--calib-chunks", a.calib_chunks, "--sensitivities", out / f"{alias}.sensitivities.json"])
                (out / f"{alias}-budget-{t}.log").write_text(p.stdout + p.stderr)
            u, b = measure(uni), measure(fit)
            rows.append((alias, t, size, fit.stat().st_size, u, b))
            print(f"{alias} {t}: uniform {size / 2**20:.1f} MiB KLD {u['mean_kld']:.4f}; "
                  f"budget {fit.stat().st_size / 2**20:.1f} MiB KLD {b['mean_kld']:.4f}", file=sys.stderr, flush=True)
    print(f"Text: {ev} ({a.chunks} windows of {a.window}, second halves scored); the allocator measured on {calib}\n")
    print("| model | uniform type | MiB uniform / budget | PPL ratio uniform / budget | mean KLD uniform / budget "
          "| KLD p99 uniform / budget | same top-1 uniform / budget |")
    print("|---|---|---|---|---|---|---|")
    for alias, t, su, sb, u, b in rows:
        print(f"| {alias} | {t} | {su / 2**20:.1f} / {sb / 2**20:.1f} | {u['ppl_ratio']:.4f} / {b['ppl_ratio']:.4f} "
              f"| {u['mean_kld']:.4f} / **{b['mean_kld']:.4f}** ({b['mean_kld'] / u['mean_kld']:.2f}×) "
              f"| {u['kld_p99']:.4f} / {b['kld_p99']:.4f} | {u['same_top1']:.2%} / {b['same_top1']:.2%} |")


if __name__ == "__main__":
    main()
