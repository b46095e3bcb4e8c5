#!/usr/bin/env python3
"""Telemetry end to end on the real binary: a known sequence of requests through `porteiro serve`
(local answers, an upstream tier answering JSON and SSE, an upstream that fails so the local tier
takes over, an invalid request), then
  - `/metrics` parsed by the `prometheus_client` package's parser (valid text format) and checked
    against the sequence: requests per tier, tokens, upstream cost from the price table, the
    all-upstream baseline, savings, hit ratio;
  - the dashboard in headless Chromium (playwright-core, scripts/dashboard/check.mjs): the page loads
    with no external asset, the charts render, and its KPIs equal what `/metrics` says; a screenshot
    is kept (--artifacts);
  - after SIGTERM, the request log has one row per request, stored prompts are sealed, and
    `porteiro report` writes the HTML and Markdown report with the same KPIs.
Started by crates/porteiro/tests/telemetry_e2e.rs. Exits non-zero if any check failed.
"""

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import threading
import urllib.request
from http.server import ThreadingHTTPServer

from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from e2e_common import FakeUpstream, check, finish, start_porteiro

ap = argparse.ArgumentParser()
ap.add_argument("--porteiro", required=True)
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--artifacts", required=True, help="folder for the dashboard screenshot")
ap.add_argument("--node-dir", required=True, help="scripts/dashboard (with node_modules)")
args = ap.parse_args()

class Upstream(FakeUpstream):
    def do_POST(self):
        body = json.loads(self.body())
        if body.get("model") == "fail-model":
            return self.reply_json({"error": {"message": "down", "type": "server_error"}}, status=500)
        usage = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
        base = {"id": "up-1", "created": 1, "model": body.get("model")}
        if body.get("stream"):
            chunk = lambda choices, **kw: dict(base, object="chat.completion.chunk", choices=choices, **kw)
            events = [chunk([{"index": 0, "delta": {"content": p}, "finish_reason": None}]) for p in ["Hi", " there", "!"]]
            events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
            if (body.get("stream_options") or {}).get("include_usage"):
                events.append(chunk([], usage=usage))
            return self.reply_sse(events)
        self.reply_json(dict(base, object="chat.completion", usage=usage, choices=[
            {"index": 0, "message": {"role": "assistant", "content": "Hi there!"}, "finish_reason": "stop"}]))


up = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
threading.Thread(target=up.serve_forever, daemon=True).start()
UP = f"http://127.0.0.1:{up.server_address[1]}/v1"

work = tempfile.mkdtemp(prefix="porteiro-telemetry-")
log_db = os.path.join(work, "requests.db")
cfg = os.path.join(work, "porteiro.toml")
PRICE_IN, PRICE_OUT, MACHINE = 1.0, 4.0, 3.6
with open(cfg, "w") as f:
    f.write(f"""
[model]
ctx = 512
threads = 2
[embeddings]
model = ""
[privacy]
policy = "allow"
[telemetry]
machine_price_per_hour = {MACHINE}
[log]
path = "{log_db}"
store_text = true
[[upstreams]]
name = "big"
base_url = "{UP}"
model = "big-model"
price_in_per_m = {PRICE_IN}
price_out_per_m = {PRICE_OUT}
[[upstreams]]
name = "broken"
base_url = "{UP}"
model = "fail-model"
retries = 0
""")
env = dict(os.environ, PORTEIRO_LOG_KEY="e2e-log-key")
srv, BASE = start_porteiro(args.porteiro, args.model, cfg, env)
client = OpenAI(base_url=BASE + "/v1", api_key="unused", timeout=60, max_retries=0)
SECRET_PHRASE = "zebra-telemetry-marker-4411"
# The known sequence.
for i in range(6):
    client.chat.completions.create(model=args.model, max_tokens=4, temperature=0,
                                   messages=[{"role": "user", "content": f"{SECRET_PHRASE} say hi {i}"}])
for i in range(3):
    client.chat.completions.create(model="big", messages=[{"role": "user", "content": "hard question"}])
for i in range(2):
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="big", stream=True, messages=[{"role": "user", "content": "hard question"}]) if c.choices)
    check("upstream stream passes through (usage chunk not added)", text == "Hi there!", text)
r = client.chat.completions.with_raw_response.create(model="broken", max_tokens=4, messages=[{"role": "user", "content": "x"}])
check("failed upstream falls back to local", r.headers.get("x-porteiro-fallback") == "status")
try:
    client.chat.completions.create(model=args.model, temperature=5, messages=[{"role": "user", "content": "x"}])
    check("invalid request refused", False)
except Exception:
    pass
N_LOCAL, N_BIG, N_ERR = 8, 5, 1  # 6 + fallback + invalid; 3 JSON + 2 SSE; the invalid one
N = N_LOCAL + N_BIG

# --- /metrics through a real Prometheus parser --------------------------------------------------------
text = urllib.request.urlopen(BASE + "/metrics").read().decode()
fams = {f.name: f for f in text_string_to_metric_families(text)}
check("/metrics parses as Prometheus text", "porteiro_tier_requests" in fams, f"{len(fams)} families")


def total(fam, **want):
    return sum(s.value for s in fams[fam].samples
               if s.name.endswith("_total") or fams[fam].type != "counter"
               if all(s.labels.get(k) == v for k, v in want.items()))


def value(name, **want):
    """The value of the sample called `name` (family or sample name) with these labels."""
    for f in fams.values():
        for s in f.samples:
            if s.name in (name, name + "_total") and all(s.labels.get(k) == v for k, v in want.items()):
                return s.value
    return None


local_reqs = total("porteiro_tier_requests", tier="local")
big_reqs = total("porteiro_tier_requests", tier="big")
check("requests per tier", (local_reqs, big_reqs) == (N_LOCAL, N_BIG), f"local {local_reqs}, big {big_reqs}")
check("errors counted", total("porteiro_tier_errors") == N_ERR, str(total("porteiro_tier_errors")))
tin = total("porteiro_tier_tokens", tier="big", direction="in")
tout = total("porteiro_tier_tokens", tier="big", direction="out")
check("upstream tokens from usage (JSON and stream)", (tin, tout) == (N_BIG * 20, N_BIG * 5), f"{tin} in, {tout} out")
big_cost = total("porteiro_tier_cost_usd", tier="big")
want_big = (tin * PRICE_IN + tout * PRICE_OUT) / 1e6
check("upstream cost from the price table", abs(big_cost - want_big) < 1e-12, f"{big_cost} vs {want_big}")
local_cost = total("porteiro_tier_cost_usd", tier="local")
check("local requests are not free (machine price x busy time)", local_cost > 0, str(local_cost))
all_in = sum(s.value for s in fams["porteiro_tier_tokens"].samples if s.labels.get("direction") == "in")
all_out = sum(s.value for s in fams["porteiro_tier_tokens"].samples if s.labels.get("direction") == "out")
baseline = value("porteiro_baseline_cost_usd")
want_base = (all_in * PRICE_IN + all_out * PRICE_OUT) / 1e6
check("baseline = every token at the upstream's prices", abs(baseline - want_base) < 1e-12, f"{baseline} vs {want_base}")
cost = value("porteiro_cost_usd")
hit = value("porteiro_hit_ratio")
cpm = value("porteiro_cost_per_1k_requests_usd")
savings = value("porteiro_savings_usd")
check("hit ratio", abs(hit - N_LOCAL / N) < 1e-12, str(hit))
check("cost per 1000 requests", abs(cpm - cost / N * 1000) < 1e-12, str(cpm))
check("savings = baseline - cost", abs(savings - (baseline - cost)) < 1e-12, str(savings))
check("TTFT and inter-token histograms present",
      value("porteiro_tier_ttft_seconds_count", tier="local") and value("porteiro_tier_inter_token_seconds_count", tier="big"))

# --- the dashboard in headless Chromium -----------------------------------------------------------------
os.makedirs(args.artifacts, exist_ok=True)
shot = os.path.join(args.artifacts, "dashboard.png")
p = subprocess.run(["node", os.path.join(args.node_dir, "check.mjs"), BASE + "/", shot],
                   capture_output=True, text=True, timeout=120)
check("dashboard page loads in Chromium", p.returncode == 0, p.stderr.strip()[-300:])
if p.returncode == 0:
    shown = json.loads(p.stdout)
    usd = lambda v: "$" + (f"{v:.6f}" if abs(v) < 0.01 else f"{v:.4f}")
    check("dashboard: no page errors, no external assets", not shown["errors"] and not shown["external"],
          str(shown["errors"] + shown["external"]))
    check("dashboard: hit ratio equals /metrics", shown["hit_ratio"] == f"{hit * 100:.1f}%", shown["hit_ratio"])
    check("dashboard: requests", shown["requests"] == str(N), shown["requests"])
    check("dashboard: CPM equals /metrics", shown["cpm"] == usd(cpm), f"{shown['cpm']} vs {usd(cpm)}")
    check("dashboard: savings equal /metrics", shown["savings"] == usd(savings), f"{shown['savings']} vs {usd(savings)}")
    for tier in ("local", "big"):
        q = value("porteiro_tier_latency_recent_seconds", tier=tier, quantile="0.95")
        check(f"dashboard: P95 of {tier} equals /metrics", shown["p95"].get(tier) == f"{q * 1000:.1f}",
              f"{shown['p95'].get(tier)} vs {q * 1000:.1f}")
    check("dashboard: charts rendered", shown["chart_requests"]["ink"] > 0 and shown["chart_cost"]["ink"] > 0,
          json.dumps([shown["chart_requests"], shown["chart_cost"]]))
    check("dashboard: route table and recent requests", shown["routes"] >= 2 and shown["recent"] == N,
          f"{shown['routes']} routes, {shown['recent']} recent")
    check("dashboard: screenshot kept", os.path.getsize(shot) > 10_000, shot)

# --- the request log and the report ------------------------------------------------------------------
srv.send_signal(signal.SIGTERM)
srv.wait(timeout=60)
check("server stopped cleanly", srv.returncode == 0, str(srv.returncode))
rows = sqlite3.connect(log_db).execute("SELECT COUNT(*), SUM(tier = 'local'), SUM(prompt IS NOT NULL) FROM requests").fetchone()
check("request log: one row per request", rows[0] == N and rows[1] == N_LOCAL, str(rows))
check("request log: prompts stored", rows[2] >= 6, str(rows))
raw = b"".join(open(log_db + ext, "rb").read() for ext in ("", "-wal") if os.path.exists(log_db + ext))
check("request log: stored prompts are sealed (no plaintext on disk)", SECRET_PHRASE.encode() not in raw)
out_html = os.path.join(args.artifacts, "report.html")
p = subprocess.run([args.porteiro, "report", "--since", "1h", "--db", log_db, "-o", out_html], capture_output=True, text=True)
md = open(out_html[:-5] + ".md").read() if p.returncode == 0 else p.stderr
check("report: Markdown with the same KPIs", f"| requests | {N} |" in md and f"{N_LOCAL / N * 100:.1f}%" in md, md[:300])
check("report: HTML with inline charts", p.returncode == 0 and "<svg" in open(out_html).read())

up.shutdown()
finish("telemetry")
