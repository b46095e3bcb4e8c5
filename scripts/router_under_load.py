#!/usr/bin/env python3
"""Routing-decision latency inside `porteiro serve`, idle and while the local model generates.

  router_under_load.py [--bin target/release/porteiro] [--model qwen2.5-0.5b] [--streams 4]
                       [--decisions 60] [--tokens 256]

Starts the server on loopback (routes only, every tier local, privacy guard and request log off),
then sends `model: auto` requests whose prompts are about --tokens encoder tokens long (wiki text,
max_tokens 1) one after another and reads each answer's `x-porteiro-decision-ms`: first with the
server idle, then while --streams requests for the model itself generate 256 tokens each, restarted
as they finish. Prints p50 / p95 / max of both. Bounded: the decisions are counted, the streams stop
when they are done, the server is stopped at the end.
"""

import argparse
import concurrent.futures
import os
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import start_porteiro  # noqa: E402

from openai import OpenAI  # noqa: E402

HOME = os.environ.get("PORTEIRO_HOME", os.path.expanduser("~/.cache/porteiro"))


def quantiles(ms):
    ms = sorted(ms)
    q = lambda p: ms[min(len(ms) - 1, round(p * (len(ms) - 1)))]
    return f"p50 {q(0.5):.2f} ms  p95 {q(0.95):.2f} ms  max {ms[-1]:.2f} ms  ({len(ms)} decisions)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="target/release/porteiro")
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--decisions", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=256, help="about this many encoder tokens per prompt")
    ap.add_argument("--nice", type=int, default=10,
                    help="[model] nice: the generating threads' niceness (the default 10; 0 to compare)")
    a = ap.parse_args()
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(f'[model]\nnice = {a.nice}\n[privacy]\npolicy = "allow"\naudit_db = ""\n[log]\npath = ""\n'
              '[[routes]]\nname = "extract"\ntier = "local"\n'
              'examples = ["extract the fields from this text", "format this as JSON"]\n')
    cfg.close()
    with open(os.path.join(HOME, "data/wiki.txt")) as f:
        words = f.read().split()
    # ~0.75 words per WordPiece token on this text; different windows so no cache can help.
    n = int(a.tokens * 0.75)
    prompts = [" ".join(words[i * n:(i + 1) * n]) for i in range(2 * a.decisions)]
    srv, base = start_porteiro(a.bin, a.model, cfg.name, timeout_s=600)
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)

    def decide(p):
        raw = client.chat.completions.with_raw_response.create(
            model="auto", max_tokens=1, messages=[{"role": "user", "content": p}])
        return float(raw.headers["x-porteiro-decision-ms"])

    try:
        for p in prompts[:3]:
            decide(p)  # warm-up
        idle = [decide(p) for p in prompts[:a.decisions]]
        stop = threading.Event()

        def generate():
            while not stop.is_set():
                client.chat.completions.create(model=a.model, max_tokens=256, temperature=0.8, messages=[
                    {"role": "user", "content": "Write a long story about a lighthouse keeper."}])

        with concurrent.futures.ThreadPoolExecutor(a.streams) as pool:
            gens = [pool.submit(generate) for _ in range(a.streams)]
            time.sleep(3)  # the streams are decoding
            busy = [decide(p) for p in prompts[a.decisions:2 * a.decisions]]
            stop.set()
            for g in gens:
                g.result()
        print(f"{a.tokens}-token prompts, {a.model} serving, 2 threads, [model] nice = {a.nice}:")
        print(f"  idle:                     {quantiles(idle)}")
        print(f"  {a.streams} streams generating:     {quantiles(busy)}")
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(timeout=60)


if __name__ == "__main__":
    main()
