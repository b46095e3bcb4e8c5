#!/usr/bin/env python3
"""The flywheel's proof on real data nobody here wrote: an agent-like mix of SNIPS intent
classification (a system-prompted label task), BFCL simple_python tool calls (each request with its
own function) and GSM8K word problems, sent through `model: auto` of a Porteiro gateway whose only
upstream tier ("teacher", priced like a frontier model) is qwen2.5-1.5b served by a second
`porteiro serve`. The gateway's local model is qwen2.5-0.5b.

Phases (each a command; the folder --work keeps what they share):
  collect   the all-escalated start: every request of the collection mix goes to the teacher and is
            collected ([flywheel] collect) into the gateway's request log
  replay    a fresh mix (rows disjoint from the collection) through `model: auto`; prints the share
            answered locally, quality against the datasets' ground truth, cost per 1000 requests
            (from the gateway's request log) and P95 latency per tier; --label names the run
            (before / after) and --routes hands the gateway the flywheel's routes file

Between them: `porteiro flywheel run --db WORK/requests.db …` and `porteiro flywheel promote`.
"""

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bfcl_eval import verdict  # noqa: E402
from e2e_common import start_porteiro  # noqa: E402
from lora_data import bfcl_request, load_bfcl, load_gsm8k, load_snips, snips_intent, snips_request  # noqa: E402

from openai import OpenAI  # noqa: E402

GSM8K_SYSTEM = ("Solve the math word problem. Think step by step, then give the final answer on the last "
                "line as `#### <number>`.")
KEY = "flywheel-proof-key"

# Disjoint rows: the collection (what the flywheel learns from) and the fresh mix (what is measured).
MIX = {
    "collect": {"snips": (0, 150), "bfcl": (0, 60), "gsm8k": (0, 20)},
    "fresh": {"snips": (400, 430), "bfcl": (300, 312), "gsm8k": (80, 88)},
}
MAX_TOKENS = {"snips": 8, "bfcl": 256, "gsm8k": 320}


def tasks(which):
    m = MIX[which]
    snips = load_snips()["test"]
    bfcl = [b for b in load_bfcl() if b["id"].startswith("simple")]
    gsm = load_gsm8k()
    out = []
    for text, intent in snips[slice(*m["snips"])]:
        out.append(("snips", snips_request(text), intent))
    for it in bfcl[slice(*m["bfcl"])]:
        out.append(("bfcl", bfcl_request(it), it))
    for q, want in gsm[slice(*m["gsm8k"])]:
        out.append(("gsm8k", {"messages": [{"role": "system", "content": GSM8K_SYSTEM},
                                           {"role": "user", "content": q}]}, want))
    # Interleaved as live traffic would be (a fixed order, so runs compare).
    out.sort(key=lambda t: hashlib.sha256(json.dumps(t[1], sort_keys=True).encode()).hexdigest())
    return out


def gsm_number(text):
    m = re.findall(r"####\s*\$?(-?[\d,]*\.?\d+)", text or "") or re.findall(r"(-?[\d,]*\.?\d+)", text or "")
    return m[-1].replace(",", "").rstrip(".") if m else None


def correct(kind, gold, msg):
    if msg is None:
        return False
    if kind == "snips":
        return snips_intent(msg.content) == gold
    if kind == "bfcl":
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in (msg.tool_calls or [])]
        return verdict("simple_python", gold, {"calls": calls, "content": msg.content or ""}) is None
    got = gsm_number(msg.content)
    try:
        return got is not None and float(got) == float(gold)
    except ValueError:
        return False


def config(work, teacher_base, routes=None):
    path = os.path.join(work, "gateway.toml")
    fly = f'routes = "{routes}"\n' if routes else ""
    with open(path, "w") as f:
        f.write(f"""
[model]
threads = 2
[privacy]
policy = "mask"
audit_db = "{os.path.join(work, 'audit.db')}"
[log]
path = "{os.path.join(work, 'requests.db')}"
[flywheel]
collect = true
{fly}
[router]
# The all-escalated start: one catch-all route to the teacher (every request is at least this close
# to one of its examples); what the flywheel promotes is matched before it.
similarity_floor = 0.0
[[upstreams]]
name = "teacher"
base_url = "{teacher_base}/v1"
model = "qwen2.5-1.5b"
price_in_per_m = 2.50
price_out_per_m = 10.00
timeout_s = 600
[[routes]]
name = "all"
tier = "teacher"
examples = ["Answer this request.", "Call a function for me.", "Solve this problem."]
[telemetry]
machine_price_per_hour = 0.10
""")
    return path


def start(args, routes=None):
    teacher, tbase = start_porteiro(args.porteiro, "qwen2.5-1.5b", os.path.join(args.work, "teacher.toml"),
                                    timeout_s=600)
    env = dict(os.environ, PORTEIRO_LOG_KEY=KEY)
    gw, gbase = start_porteiro(args.porteiro, "qwen2.5-0.5b", config(args.work, tbase, routes), env,
                               timeout_s=600)
    return teacher, gw, gbase


def send(client, kind, req):
    t0 = time.time()
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="auto", temperature=0, max_tokens=MAX_TOKENS[kind], **req)
        r = raw.parse()
        return r.choices[0].message, raw.headers.get("x-porteiro-tier", "?"), \
            raw.headers.get("x-porteiro-route", "?"), time.time() - t0, None
    except Exception as e:  # one bad request never stops the run
        return None, "error", "-", time.time() - t0, str(e)[:200]


def run(args, which):
    todo = tasks(which)
    teacher, gw, base = start(args, args.routes if which == "fresh" else None)
    client = OpenAI(base_url=base + "/v1", api_key="unused", timeout=900, max_retries=0)
    rows = []
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futs = {pool.submit(send, client, k, r): (k, g) for k, r, g in todo}
        for n, f in enumerate(concurrent.futures.as_completed(futs)):
            (kind, gold), (msg, tier, route, secs, err) = futs[f], f.result()
            rows.append({"kind": kind, "tier": tier, "route": route, "secs": secs, "error": err,
                         "ok": correct(kind, gold, msg)})
            if n % 20 == 0:
                print(f"{which}: {n + 1}/{len(todo)} in {time.time() - t0:.0f} s", flush=True)
    for p in (gw, teacher):
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    return rows


def summary(rows, db, since_ms):
    out = {"n": len(rows), "errors": sum(r["error"] is not None for r in rows)}
    out["local_share"] = sum(r["tier"] == "local" for r in rows) / len(rows)
    out["quality"] = sum(r["ok"] for r in rows) / len(rows)
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        out[f"{kind}_quality"] = sum(r["ok"] for r in mine) / len(mine)
        out[f"{kind}_local"] = sum(r["tier"] == "local" for r in mine) / len(mine)
    con = sqlite3.connect(db)
    # Side requests of the flywheel (shadow / monitor comparisons) cost money but are no client's:
    # their cost counts, their number does not.
    side = "(route LIKE 'shadow:%' OR route LIKE 'monitor:%')"
    n, = con.execute(f"SELECT COUNT(*) FROM requests WHERE ts_ms >= ? AND endpoint = 'chat' AND NOT {side}",
                     (since_ms,)).fetchone()
    cost, base, sides = con.execute(f"SELECT SUM(cost_usd), SUM(baseline_usd), SUM({side}) FROM requests "
                                    "WHERE ts_ms >= ? AND endpoint = 'chat'", (since_ms,)).fetchone()
    out["logged"], out["side_requests"] = n, sides or 0
    out["cost_per_1000"] = 1000 * (cost or 0) / max(n, 1)
    out["baseline_per_1000"] = 1000 * (base or 0) / max(n, 1)
    for tier in ("local", "teacher"):
        lat = sorted(r[0] for r in con.execute(
            f"SELECT latency_ms FROM requests WHERE ts_ms >= ? AND tier = ? AND endpoint = 'chat' AND NOT {side}",
            (since_ms, tier)))
        if lat:
            out[f"p95_ms_{tier}"] = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
            out[f"p50_ms_{tier}"] = lat[len(lat) // 2]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=["collect", "replay"])
    ap.add_argument("--porteiro", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--label", default="before")
    ap.add_argument("--routes", help="the flywheel's routes file (replay after the loop)")
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    with open(os.path.join(args.work, "teacher.toml"), "w") as f:
        f.write('[model]\nthreads = 2\n[embeddings]\nmodel = ""\n[privacy]\npolicy = "allow"\naudit_db = ""\n'
                '[log]\npath = ""\n')
    since = int(time.time() * 1000)
    rows = run(args, "collect" if args.phase == "collect" else "fresh")
    label = "collect" if args.phase == "collect" else args.label
    with open(os.path.join(args.work, f"{label}.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    s = summary(rows, os.path.join(args.work, "requests.db"), since)
    with open(os.path.join(args.work, f"{label}-summary.json"), "w") as f:
        json.dump(s, f, indent=1)
    print(json.dumps({label: s}))


if __name__ == "__main__":
    main()
