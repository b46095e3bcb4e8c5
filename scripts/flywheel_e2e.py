#!/usr/bin/env python3
"""The flywheel's collect, curate and cluster stages on the real binary, with real data nobody here
wrote: SNIPS utterances (intent labels) and BFCL simple_python questions (tool calls, the first 12
sharing one toolbox as an agent's would) sent through the official `openai` client to `porteiro
serve`, which passes them to a scripted teacher upstream answering with the datasets' ground truth,
half of them streamed. Plus what curation must drop: a truncated answer, a chat with a person, an
exact duplicate; and an e-mail the privacy guard must mask the same way in prompt and answer.

Then `porteiro flywheel curate`, `clusters`, `finetune` (one cluster, a few seconds' budget) and
`select` (--json), and checks on what they wrote. Then S6: `promote` writes the routes file, a
restarted gateway routes `model: auto` through it (reloading it as it changes): a shadow route is
compared live and promoted or rolled back, a promoted route is served locally and monitored, and
when the teacher's answers drift it is rolled back; every change in the audit trail. Run by
crates/porteiro/tests/flywheel_e2e.rs.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import FakeUpstream, check, finish, start_porteiro  # noqa: E402
from lora_data import SNIPS_SYSTEM, _schema, load_bfcl, load_snips, oai_name  # noqa: E402

from openai import OpenAI  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--porteiro", required=True)
ap.add_argument("--model", default="smollm2-135m")
args = ap.parse_args()

snips = load_snips()["test"][:24]
bfcl = load_bfcl()[:12]
TOOLBOX = [{"type": "function", "function": {"name": oai_name(f["name"]), "description": f.get("description", ""),
                                             "parameters": _schema(f["parameters"])}}
           for it in bfcl for f in it["function"]]
EMAIL = "ana.silva@example.com"
EXTRACT = "Extract the e-mail address from the message. Answer with the address only."


def gold_call(item):
    (name, params), = item["ground_truth"][0].items()
    # The first acceptable value of each parameter ("" marks an optional one left out).
    args = {k: v[0] for k, v in params.items() if v and v[0] != ""}
    return oai_name(name), args


DRIFT = False
ANSWERS = {text: ("label", intent) for text, intent in snips}
ANSWERS.update({it["question"][0][-1]["content"]: ("call", gold_call(it)) for it in bfcl})


def teacher_key(text):
    """The dataset row a request is about; the guard may have masked parts of it on the way."""
    if text in ANSWERS:
        return text
    pat = re.compile(re.sub(r"\\\[[A-Z_]+_\d+\\\]", ".+?", re.escape(text)))
    return next((k for k in ANSWERS if pat.fullmatch(k)), None)


class Teacher(FakeUpstream):
    def do_POST(self):
        body = json.loads(self.body())
        last = body["messages"][-1]["content"]
        usage = {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60}
        finish_reason, content, call = "stop", None, None
        if "TRUNCATE" in last:
            finish_reason, content = "length", "The answer goes on and"
        elif body["messages"][0]["content"] == EXTRACT:
            # The guard masked the address before it left: answer with what arrived.
            content = last.split("Contact: ")[1].split(",")[0]
        elif DRIFT and teacher_key(last) and ANSWERS[teacher_key(last)][0] == "label":
            content = "Unknown"  # the teacher's answers changed: a promoted route must roll back
        elif teacher_key(last):
            kind, v = ANSWERS[teacher_key(last)]
            if kind == "label":
                content = v
            else:
                call, finish_reason = v, "tool_calls"
        else:
            content = "Sure, here is a joke about compilers."
        base = {"id": "t-1", "created": 1, "model": body.get("model")}
        if body.get("stream"):
            def chunk(delta, fr=None):
                return dict(base, object="chat.completion.chunk",
                            choices=[{"index": 0, "delta": delta, "finish_reason": fr}])
            if call:
                a = json.dumps(call[1])
                events = [chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                                      "function": {"name": call[0], "arguments": ""}}]}),
                          chunk({"tool_calls": [{"index": 0, "function": {"arguments": a[:5]}}]}),
                          chunk({"tool_calls": [{"index": 0, "function": {"arguments": a[5:]}}]})]
            else:
                events = [chunk({"role": "assistant", "content": content[:3]}), chunk({"content": content[3:]})]
            events.append(chunk({}, finish_reason))
            events.append(dict(base, object="chat.completion.chunk", choices=[], usage=usage))
            return self.reply_sse(events)
        msg = {"role": "assistant", "content": content}
        if call:
            msg["tool_calls"] = [{"id": "call_1", "type": "function",
                                  "function": {"name": call[0], "arguments": json.dumps(call[1])}}]
        self.reply_json(dict(base, object="chat.completion", usage=usage,
                             choices=[{"index": 0, "message": msg, "finish_reason": finish_reason}]))


up = ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
threading.Thread(target=up.serve_forever, daemon=True).start()
work = tempfile.mkdtemp(prefix="porteiro-flywheel-")
cfg = os.path.join(work, "porteiro.toml")
with open(cfg, "w") as f:
    f.write(f"""
[model]
ctx = 512
threads = 2
[embeddings]
model = ""
[privacy]
policy = "mask"
audit_db = "{os.path.join(work, 'audit.db')}"
[log]
path = "{os.path.join(work, 'requests.db')}"
[flywheel]
collect = true
[[upstreams]]
name = "big"
base_url = "http://127.0.0.1:{up.server_address[1]}/v1"
model = "teacher"
price_in_per_m = 2.5
price_out_per_m = 10.0
""")
env = dict(os.environ, PORTEIRO_LOG_KEY="flywheel-e2e-key")
srv, base = start_porteiro(args.porteiro, args.model, cfg, env)
client = OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)


def ask(n, **req):
    """Every other request streamed; returns (content, [(name, arguments)])."""
    if n % 2:
        content, calls = "", {}
        for ch in client.chat.completions.create(model="big", stream=True, **req):
            for c in ch.choices:
                content += c.delta.content or ""
                for t in c.delta.tool_calls or []:
                    cur = calls.setdefault(t.index, ["", ""])
                    cur[0] += (t.function.name or "") if t.function else ""
                    cur[1] += (t.function.arguments or "") if t.function else ""
        return content, [tuple(v) for v in calls.values()]
    m = client.chat.completions.create(model="big", **req).choices[0].message
    return m.content or "", [(t.function.name, t.function.arguments) for t in m.tool_calls or []]


sent = 0
for n, (text, intent) in enumerate(snips):
    got, _ = ask(n, messages=[{"role": "system", "content": SNIPS_SYSTEM}, {"role": "user", "content": text}])
    check(f"snips {n} answered by the teacher", got == intent, got) if n < 2 else None
    sent += 1
for n, it in enumerate(bfcl):
    _, calls = ask(n, messages=it["question"][0], tools=TOOLBOX)
    check(f"bfcl {n} call passes through", calls and calls[0][0] == gold_call(it)[0], calls) if n < 2 else None
    sent += 1
ask(0, messages=[{"role": "system", "content": SNIPS_SYSTEM}, {"role": "user", "content": snips[0][0]}])  # duplicate
ask(1, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                 {"role": "user", "content": "tell me a joke"}])  # a person chatting
ask(0, messages=[{"role": "system", "content": SNIPS_SYSTEM}, {"role": "user", "content": "TRUNCATE me"}])
got, _ = ask(1, messages=[{"role": "system", "content": EXTRACT},
                          {"role": "user", "content": f"Contact: {EMAIL}, thanks"}])
check("the client gets the address back (masked upstream, restored)", got == EMAIL, got)
sent += 4
# Answered locally: never a sample.
client.chat.completions.create(model=args.model, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
srv.send_signal(signal.SIGTERM)  # flushes the request log
srv.wait(timeout=30)


def cli(*a):
    p = subprocess.run([args.porteiro, "flywheel", *a, "--config", cfg, "--dir", os.path.join(work, "fw"), "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:
        print(p.stderr)
    check(f"flywheel {a[0]} exits 0", p.returncode == 0, p.stderr[-300:])
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}


rep = cli("curate")["report"]
check("every upstream answer was collected, the local one not", rep["input"] == sent, rep)
for why in ["truncated", "conversation", "duplicate"]:
    check(f"curation drops the {why} one", rep["dropped"].get(why) == 1, rep["dropped"])
kept = [json.loads(line) for line in open(os.path.join(work, "fw", "curated.jsonl"))]
check("kept = read - dropped", len(kept) == rep["kept"] == sent - sum(rep["dropped"].values()), rep)
raw = open(os.path.join(work, "fw", "curated.jsonl")).read()
check("no personal data in the curated samples", EMAIL not in raw)
ex = [k for k in kept if k["request"]["messages"][0]["content"] == EXTRACT]
check("the address has one placeholder in prompt and answer",
      ex and "[EMAIL_1]" in ex[0]["request"]["messages"][-1]["content"] and ex[0]["answer"]["content"] == "[EMAIL_1]",
      ex and (ex[0]["request"]["messages"][-1], ex[0]["answer"]))
by_q = {k["request"]["messages"][-1]["content"]: k for k in kept}
calls_ok = 0
for it in bfcl:
    k = by_q.get(it["question"][0][-1]["content"])
    tc = (k or {}).get("answer", {}).get("tool_calls") or [{}]
    f = tc[0].get("function", {})
    calls_ok += f.get("name") == gold_call(it)[0] and json.loads(f.get("arguments") or "null") == gold_call(it)[1]
check("tool calls kept whole, streamed or not", calls_ok == len(bfcl), f"{calls_ok}/{len(bfcl)}")
check("a streamed label kept whole", by_q[snips[1][0]]["answer"]["content"] == snips[1][1], by_q[snips[1][0]]["answer"])

cl = cli("clusters")["clusters"]
ids = [m for c in cl for m in c["members"]]
check("each curated sample in exactly one cluster", sorted(ids) == sorted(k["id"] for k in kept), len(ids))
kind_of = {k["id"]: ("tools" if k["request"].get("tools") else
                     "snips" if k["request"]["messages"][0]["content"] == SNIPS_SYSTEM else "other") for k in kept}
mixed = [c["name"] for c in cl if len({kind_of[m] for m in c["members"]}) > 1]
check("no cluster mixes the tool calls with the intent labels", not mixed, mixed)
tools = [c for c in cl if any(kind_of[m] == "tools" for m in c["members"])]
check("the toolbox requests form one task", len(tools) == 1 and tools[0]["kind"] == "tool_calls",
      [(c["name"], len(c["members"])) for c in tools])
check("clusters are named and show exemplars", all(c["name"] and c["exemplars"] for c in cl),
      [(c["name"], c["exemplars"][:1]) for c in cl])
print("clusters:", [(c["name"], c["kind"], len(c["members"])) for c in cl])

ft = cli("finetune", "--model", args.model, "--cluster", "0", "--minutes", "0.1")["adapters"]
check("finetune trains an adapter for the cluster within its budget, with loss and eval",
      len(ft) == 1 and os.path.exists(ft[0]["adapter"]) and ft[0]["training"]["losses"] and ft[0]["training"]["evals"]
      and ft[0]["train"] + ft[0]["test"] == len(cl[0]["members"]), ft)

sel = cli("select", "--models", args.model, "--max-test", "6", "--max-tokens", "64")["scores"]
big = [c for c in cl if len(c["members"]) >= 8]
want = [(c["id"], m) for c in big for m in ["few-shot", "zero-shot"]] + [(0, "lora")]
check("every cluster big enough is scored zero- and few-shot, the tuned one with its adapter too",
      sorted((s["cluster"], s["mode"]) for s in sel) == sorted(want), [(s["cluster"], s["mode"]) for s in sel])
check("scores hold their interval, on 3-6 test samples, without errors",
      all(0 <= s["low"] <= s["rate"] <= s["high"] <= 1 and 3 <= s["n"] <= 6 and s["errors"] == 0 for s in sel), sel)
print("select:", [(s["name"], s["mode"], s["agree"], s["n"]) for s in sel])


def status(threshold):
    p = subprocess.run([args.porteiro, "flywheel", "status", "--dir", os.path.join(work, "fw"), "--json",
                        "--threshold", str(threshold)], capture_output=True, text=True, timeout=60)
    check(f"flywheel status --threshold {threshold} exits 0", p.returncode == 0, p.stderr[-300:])
    return json.loads(p.stdout)["clusters"] if p.returncode == 0 else []


st = status(0.95)
check("status lists every cluster with its stage", len(st) == len(cl) and all(r["stage"] for r in st), st)
check("a few held-out samples never qualify at 0.95",
      all(r["decision"]["promote"] is None for r in st), [r["decision"]["why"] for r in st])
check("the tuned cluster shows its adapter", any(a.startswith("cluster-0-") for a in st[0]["adapters"]), st[0])
st0 = status(0.0)
check("at threshold 0 every evaluated cluster qualifies, zero-shot first",
      all((r["stage"] == "qualifies") == (r["size"] >= 8) for r in st0)
      and all(r["decision"]["promote"]["mode"] == "zero-shot" for r in st0 if r["decision"]["promote"]),
      [(r["stage"], r["decision"]["why"]) for r in st0])

# S6: promote into the routes file, serve through `model: auto`, shadow, promote, monitor, roll back.
pr = cli("promote", "--threshold", "0")
routes_file = os.path.join(work, "fw", "routes.json")
evaluated = [r for r in st0 if r["stage"] == "qualifies"]
check("promote puts every qualifying cluster in shadow, version 1",
      pr["version"] == 1 and sorted(c["route"] for c in pr["changes"]) == sorted(f"cluster-{r['cluster']}" for r in evaluated)
      and all(c["to"] == "shadow" and c["from"] is None for c in pr["changes"]), pr)
check("promoting again with the same evidence changes nothing", cli("promote", "--threshold", "0")["version"] == 1)
label_cl = next(c for c in cl if len(c["members"]) >= 8 and kind_of[c["members"][0]] == "snips")
route = f"cluster-{label_cl['id']}"
# Texts the guard left alone (a masked example is further from the live text it came from).
texts = [k["request"]["messages"][-1]["content"] for k in kept if k["id"] in label_cl["members"]]
texts = [t for t in texts if "[" not in t]
with open(cfg, "a") as f:
    f.write(f"""
[router]
similarity_floor = 0.0
[[routes]]
name = "all"
tier = "big"
examples = ["Answer this request."]
""")
text = open(cfg).read().replace('[embeddings]\nmodel = ""', '[embeddings]\nmodel = "minilm-l6"')
text = text.replace("[flywheel]\ncollect = true\n", f"""[flywheel]
collect = true
routes = "{routes_file}"
shadow_sample = 1.0
monitor_sample = 1.0
min_live = 3
window = 3
""")
open(cfg, "w").write(text)
srv, base = start_porteiro(args.porteiro, args.model, cfg, env)
client = OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)
shadow_log = os.path.join(work, "fw", "shadow.jsonl")


def comparisons():
    return [json.loads(x) for x in open(shadow_log)] if os.path.exists(shadow_log) else []


def auto(text):
    """(tier, route) of a `model: auto` request, once its comparison (if any) is written."""
    before = len(comparisons())
    r = client.chat.completions.with_raw_response.create(
        model="auto", max_tokens=8, messages=[{"role": "system", "content": SNIPS_SYSTEM}, {"role": "user", "content": text}])
    r.parse()
    for _ in range(100):  # one comparison runs at a time: wait for it before the next request
        if len(comparisons()) > before:
            break
        time.sleep(0.1)
    return r.headers.get("x-porteiro-tier"), r.headers.get("x-porteiro-route")


def serving_version(v):
    """Waits until the server uses version `v` of the routes file (it looks every 2 s)."""
    for _ in range(300):
        m = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        got = re.search(r"^porteiro_flywheel_routes_version (\d+)", m, re.M)
        if got and int(got.group(1)) >= v:
            return True
        time.sleep(0.1)
    return False


def stage_of(name):
    return next((r for r in json.load(open(routes_file))["routes"] if r["name"] == name), {}).get("stage")


check("the server loads the routes file", serving_version(1))
served = [auto(t) for t in texts[:3]]
check("a shadow route's requests are still served by the teacher", all(t == "big" for t, _ in served), served)
shadow = [c for c in comparisons() if c["route"] == route]
check("each shadowed request was answered again by the candidate and compared",
      len(shadow) == 3 and all(c["role"] == "shadow" for c in shadow), shadow)
agreed = sum(c["agree"] for c in shadow)
want = "promoted" if agreed == 3 else "rolled_back"
check("the server acts on live agreement with a new version of the routes file", serving_version(2))
check(f"3 live comparisons ({agreed} agreeing) decide the shadow route: {want}", stage_of(route) == want,
      stage_of(route))
# Promote at once (new evidence replaces the route), then the teacher drifts: monitoring rolls it back.
cli("promote", "--threshold", "0", "--no-shadow")
check("--no-shadow promotes", stage_of(route) == "promoted", stage_of(route))
check("the server reloads the new version without a restart",
      serving_version(json.load(open(routes_file))["version"]))
DRIFT = True
served = [auto(t) for t in texts[3:6]]
check("a promoted route's requests are answered locally under its name",
      all(t == "local" and r == route for t, r in served), served)
dash = json.loads(urllib.request.urlopen(base + "/api/dashboard", timeout=5).read())["flywheel"]
check("the dashboard shows the learned routes with their stage and live agreement",
      any(r["name"] == route and r["stage"] in ("promoted", "rolled_back") and r["evidence"]["n"] > 0
          for r in dash["routes"]), dash)
mon = [c for c in comparisons() if c["route"] == route and c["role"] == "monitor"]
check("each was also asked of the teacher, which now disagrees", len(mon) == 3 and not any(c["agree"] for c in mon), mon)
check("the rollback is a new version, in use at once", serving_version(4))
check("live agreement below the threshold rolls the route back", stage_of(route) == "rolled_back", stage_of(route))
t, r = auto(texts[6])
check("after the rollback the teacher serves the cluster again", t == "big" and r == "all", (t, r))
versions = sorted(f for f in os.listdir(os.path.join(work, "fw")) if re.fullmatch(r"routes\.v\d+\.json", f))
check("every version of the routes file is kept", len(versions) == json.load(open(routes_file))["version"] - 1, versions)
srv.send_signal(signal.SIGTERM)
srv.wait(timeout=30)
au = subprocess.run([args.porteiro, "audit", "export", os.path.join(work, "audit.db")],
                    capture_output=True, text=True, timeout=60)
fly = [json.loads(x) for x in au.stdout.splitlines() if '"flywheel' in x]
check("every stage change is in the audit trail",
      [x["policy"] for x in fly if x["route"] == route][-3:] == ["flywheel_" + want, "flywheel_promoted", "flywheel_rolled_back"],
      [(x["route"], x["policy"]) for x in fly])
ver = subprocess.run([args.porteiro, "audit", "verify", os.path.join(work, "audit.db")],
                     capture_output=True, text=True, timeout=60)
check("the trail written by server and CLI verifies", ver.returncode == 0, ver.stdout[-300:] + ver.stderr[-300:])
st = status(0.95)
check("status shows the route's stage", next(r for r in st if r["cluster"] == label_cl["id"])["stage"] == "rolled_back")
finish("flywheel")
