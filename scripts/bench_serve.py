#!/usr/bin/env python3
"""Serving benchmark: aggregate decode tok/s and p50/p95 time to first token at several concurrency
levels, for `porteiro serve` and optionally a peer OpenAI-compatible server on the same model file
(for example llama.cpp's: `python3 -m llama_cpp.server --model FILE --n_threads 2 --port 8001`, from
`pip install 'llama-cpp-python[server]'`), measured in the same run, levels interleaved.

    scripts/bench_serve.py --model smollm2-135m --concurrency 1,4,16 --tokens 64 \
        [--peer-url http://127.0.0.1:8001/v1 --peer-model NAME]

Each level sends `concurrency` streaming chat requests at once (distinct prompts, temperature 0,
`--tokens` completion tokens each) and measures from the first request to the last token.
Needs the release binary (cargo build --release) and the `openai` package.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from openai import AsyncOpenAI

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--threads", type=int, default=os.cpu_count())
ap.add_argument("--concurrency", default="1,4,16")
ap.add_argument("--tokens", type=int, default=64)
ap.add_argument("--peer-url")
ap.add_argument("--peer-model", help="model name the peer expects (default: --model)")
ap.add_argument("--json", action="store_true")
ap.add_argument("--porteiro", help="the porteiro binary (default: target/release/porteiro)")
args = ap.parse_args()
levels = [int(x) for x in args.concurrency.split(",")]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_porteiro():
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(f"[model]\nthreads = {args.threads}\n[embeddings]\nmodel = \"\"\n"
              f"[limits]\nmax_seqs = {max(levels)}\nmax_queue = {max(levels)}\n")
    cfg.close()
    binary = args.porteiro or os.path.join(root, "target/release/porteiro")
    p = subprocess.Popen([binary, "serve", "--port", "0",
                          "--model", args.model, "--config", cfg.name],
                         stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline().strip().rsplit(":", 1)[1])
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() - t0 > 120:
            p.kill()
            sys.exit("porteiro did not become ready in 120 s")
        time.sleep(0.1)
    return p, base + "/v1"


async def one(client, model, i):
    t0 = time.perf_counter()
    first, n = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Request {i}: write a long story about a lighthouse."}],
        max_tokens=args.tokens, temperature=0, stream=True, extra_body={"ignore_eos": True})
    async for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            n += 1
    return first or float("nan"), n


async def level(url, model, c):
    client = AsyncOpenAI(base_url=url, api_key="bench", timeout=600, max_retries=0)
    await one(client, model, -1)  # warm-up
    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(client, model, i) for i in range(c)))
    wall = time.perf_counter() - t0
    await client.close()
    ttft = sorted(r[0] for r in res)
    pick = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))]
    return {"concurrency": c, "tokens": sum(r[1] for r in res), "wall_s": round(wall, 3),
            "aggregate_tok_s": round(sum(r[1] for r in res) / wall, 1),
            "ttft_p50_ms": round(1000 * pick(0.5)), "ttft_p95_ms": round(1000 * pick(0.95))}


def main():
    proc, url = start_porteiro()
    rows = []
    try:
        for c in levels:
            rows.append({"server": "porteiro", **asyncio.run(level(url, args.model, c))})
            if args.peer_url:
                rows.append({"server": "peer", **asyncio.run(level(args.peer_url, args.peer_model or args.model, c))})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'server':<9} {'conc':>4} {'tokens':>6} {'wall s':>7} {'agg tok/s':>9} {'ttft p50':>9} {'ttft p95':>9}")
    for r in rows:
        print(f"{r['server']:<9} {r['concurrency']:>4} {r['tokens']:>6} {r['wall_s']:>7} {r['aggregate_tok_s']:>9}"
              f" {r['ttft_p50_ms']:>7}ms {r['ttft_p95_ms']:>7}ms")
    ours = {r["concurrency"]: r for r in rows if r["server"] == "porteiro"}
    if 1 in ours and max(levels) in ours and max(levels) > 1:
        print(f"porteiro scaling c={max(levels)} vs c=1: "
              f"{ours[max(levels)]['aggregate_tok_s'] / ours[1]['aggregate_tok_s']:.2f}x")


main()
