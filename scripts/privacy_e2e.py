#!/usr/bin/env python3
"""Proof that personal data does not leave: the real `porteiro serve` between the official `openai`
client and a recording upstream that stores every byte it receives.

Started by crates/porteiro/tests/privacy_e2e.rs (or by hand):
  privacy_e2e.py --porteiro target/release/porteiro --corpus ~/.cache/porteiro/data/pii_synth_v2.json

The recorder answers every chat request by echoing the last user message (as JSON, or as an SSE
stream cut into 3-character chunks so placeholders are split across chunks). The labelled corpus
(presidio-evaluator's synth_dataset_v2.json, 1,500 sentences) goes through
  - tier `masked` (policy mask): every sentence, JSON; every 10th sentence also streamed;
  - tier `local-only` (policy keep_local): every 5th sentence;
then the recorded bytes are searched for every labelled value. Values of the validated categories
(e-mail, phone, card, IBAN, SSN, IP) and of the context-rule categories the issue lists (person,
street address, postal code, driver's licence) must never be found; leaks of the other types
(places, organisations, dates, ages, titles, web domains, nationalities) are reported, and with
`--quasi` (quasi-identifiers on) must be zero too. Masked answers must come
back restored, byte for byte. Block and allow tiers, secrets, and the audit trail (verify, then
edits / deletions / reorders / insertions caught by `porteiro audit verify`) are checked too.
Prints one line per check and a `PRIVACY {...}` line with the figures; exits non-zero on failure.
"""

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer

import openai
from openai import OpenAI

from e2e_common import FakeUpstream, check, finish, start_porteiro

ap = argparse.ArgumentParser()
ap.add_argument("--porteiro", required=True)
ap.add_argument("--corpus", required=True)
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--quasi", action="store_true",
                help="turn on [privacy] quasi_identifiers: dates, ages, web addresses, places, groups, organisations, titles")
args = ap.parse_args()

VALIDATED = {"EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS"}
CONTEXT = {"PERSON", "STREET_ADDRESS", "ZIP_CODE", "US_DRIVER_LICENSE"}
if args.quasi:
    # With quasi-identifiers on, no labelled value of any type may leak: dates, ages, web
    # addresses, nationalities/groups, places, organisations and job titles too.
    CONTEXT |= {"AGE", "DATE_TIME", "DOMAIN_NAME", "NRP", "GPE", "ORGANIZATION", "TITLE"}
CONTEXT_NAMES = ", ".join(sorted(CONTEXT))
RECORDED = []  # (model, raw bytes)
LOCK = threading.Lock()


def last_user(body):
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                return "".join(p.get("text", "") for p in c)
            return c or ""
    return ""


class Recorder(FakeUpstream):
    def do_POST(self):
        raw = self.body()
        body = json.loads(raw)
        with LOCK:
            RECORDED.append((body.get("model"), raw))
        text = last_user(body)
        base = {"id": "rec-1", "created": 1, "model": body.get("model")}
        if body.get("stream"):
            chunk = lambda delta, fin: dict(base, object="chat.completion.chunk",
                                            choices=[{"index": 0, "delta": delta, "finish_reason": fin}])
            self.reply_sse([chunk({"content": text[i:i + 3]}, None) for i in range(0, len(text), 3)]
                           + [chunk({}, "stop")])
            return
        self.reply_json(dict(base, object="chat.completion", choices=[
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}))


rec = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
threading.Thread(target=rec.serve_forever, daemon=True).start()
REC = f"http://127.0.0.1:{rec.server_address[1]}/v1"

work = tempfile.mkdtemp(prefix="porteiro-privacy-")
audit_db = os.path.join(work, "audit.db")
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
audit_db = "{audit_db}"
quasi_identifiers = {"true" if args.quasi else "false"}
""")
    for name, policy in [("masked", "mask"), ("local-only", "keep_local"), ("blocked", "block"), ("open", "allow")]:
        f.write(f'[[upstreams]]\nname = "{name}"\nbase_url = "{REC}"\nmodel = "rec-{name}"\nprivacy = "{policy}"\nretries = 0\n')

env = dict(os.environ, PORTEIRO_AUDIT_KEY="e2e-audit-key")
srv, BASE = start_porteiro(args.porteiro, args.model, cfg, env)

client = OpenAI(base_url=BASE + "/v1", api_key="unused", timeout=60, max_retries=0)
corpus = json.load(open(args.corpus))
FIG = {}


def recorded_text(raw):
    """Every string the upstream received, joined (JSON escapes decoded)."""
    body = json.loads(raw)
    out = []

    def walk(v):
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
    walk(body)
    return "\n".join(out)


def leaks(samples, raws):
    """Per entity type: (labelled values, values found in what the upstream received)."""
    per = {}
    for s, raw in zip(samples, raws):
        seen = recorded_text(raw) if raw is not None else ""
        for sp in s["spans"]:
            t = sp["entity_type"]
            n, k = per.get(t, (0, 0))
            per[t] = (n + 1, k + (1 if raw is not None and sp["entity_value"] in seen else 0))
    return per


# --- mask, JSON: every sentence ---------------------------------------------------------------
restored = 0
raws = []
t_start = time.time()
for s in corpus:
    before = len(RECORDED)
    r = client.chat.completions.with_raw_response.create(
        model="masked", messages=[{"role": "user", "content": s["full_text"]}])
    out = r.parse().choices[0].message.content
    restored += out == s["full_text"]
    raws.append(RECORDED[before][1] if len(RECORDED) > before else None)
FIG["mask_json_requests"] = len(corpus)
FIG["mask_json_seconds"] = round(time.time() - t_start, 1)
check("mask: every answer restored exactly (JSON)", restored == len(corpus), f"{restored}/{len(corpus)}")
check("mask: every request reached the upstream", all(r is not None for r in raws))
per = leaks(corpus, raws)
FIG["mask_leaks"] = {t: {"values": n, "leaked": k} for t, (n, k) in sorted(per.items())}
bad = {t: per[t] for t in VALIDATED if per.get(t, (0, 0))[1]}
check("mask: zero values of the validated categories in the recorded bytes", not bad, str(bad))
for t in sorted(set(per) - VALIDATED):
    n, k = per.get(t, (0, 0))
    print(f"     {t}: {k}/{n} values reached the upstream ({100 * k / max(n, 1):.1f}%)")
# The context-rule categories the issue lists (person names, postal addresses and their postal
# codes, identity numbers) must not leak either.
bad = {t: per[t] for t in CONTEXT if per.get(t, (0, 0))[1]}
check(f"mask: zero values of {CONTEXT_NAMES} reached the upstream", not bad, str(bad))

# --- mask, streaming: every 10th sentence, placeholders split across 3-character chunks ---------
sub = corpus[::10]
ok = 0
for s in sub:
    stream = client.chat.completions.create(
        model="masked", stream=True, messages=[{"role": "user", "content": s["full_text"]}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    ok += text == s["full_text"]
check("mask: every streamed answer restored exactly", ok == len(sub), f"{ok}/{len(sub)}")

# --- keep_local: every 5th sentence --------------------------------------------------------------
sub = corpus[::5]
kept = 0
raws = []
for s in sub:
    before = len(RECORDED)
    r = client.chat.completions.with_raw_response.create(
        model="local-only", max_tokens=1, messages=[{"role": "user", "content": s["full_text"]}])
    reached = len(RECORDED) > before
    raws.append(RECORDED[before][1] if reached else None)
    if r.headers.get("x-porteiro-privacy") == "keep_local":
        kept += 1
        check_ok = not reached and r.headers.get("x-porteiro-tier") == "local"
        if not check_ok:
            check("keep_local: a request kept local never reaches the upstream", False, s["full_text"][:60])
per = leaks(sub, raws)
FIG["keep_local_requests"] = len(sub)
FIG["keep_local_kept"] = kept
FIG["keep_local_leaks"] = {t: {"values": n, "leaked": k} for t, (n, k) in sorted(per.items())}
bad = {t: per[t] for t in VALIDATED if per.get(t, (0, 0))[1]}
check("keep_local: zero values of the validated categories reached the upstream", not bad, str(bad))
print(f"     keep_local kept {kept}/{len(sub)} requests on the local tier")
bad = {t: per[t] for t in CONTEXT if per.get(t, (0, 0))[1]}
check(f"keep_local: zero values of {CONTEXT_NAMES} reached the upstream", not bad, str(bad))


# --- block, secrets, allow -------------------------------------------------------------------------
before = len(RECORDED)
try:
    client.chat.completions.create(model="blocked", messages=[{"role": "user", "content": "mail ana@example.com, CPF 529.982.247-25"}])
    check("block: 400", False, "no error")
except openai.BadRequestError as e:
    msg = str(e)
    check("block: 400 names the categories, never the values",
          "email" in msg and "cpf" in msg and "ana@example.com" not in msg and "529.982" not in msg, msg)
check("block: nothing reached the upstream", len(RECORDED) == before)

secret = "sk-proj-Zx81kLq0pVt6YwR3nMbC5dHf"
before = len(RECORDED)
out = client.chat.completions.create(model="masked", messages=[{"role": "user", "content": f"my key is {secret}"}])
check("secrets: masked on the way out, restored on the way back",
      secret not in RECORDED[before][1].decode() and out.choices[0].message.content == f"my key is {secret}")
before = len(RECORDED)
client.chat.completions.create(model="open", messages=[{"role": "user", "content": f"my key is {secret}"}])
check("allow: the explicit opt-out sends the request as it is", secret in RECORDED[before][1].decode())

n_requests = len(corpus) + len(corpus[::10]) + len(corpus[::5]) + 3  # block, secret, allow

# --- the audit trail ---------------------------------------------------------------------------------
srv.send_signal(signal.SIGTERM)
srv.wait(timeout=60)
check("server stopped cleanly on SIGTERM", srv.returncode == 0, f"exit {srv.returncode}")


def verify(db, *extra):
    p = subprocess.run([args.porteiro, "audit", "verify", db, *extra], capture_output=True, text=True, env=env)
    return p.returncode, p.stdout


code, out = verify(audit_db)
count = sqlite3.connect(audit_db).execute("SELECT COUNT(*) FROM audit").fetchone()[0]
check("audit: the untouched trail verifies", code == 0, out.strip().splitlines()[-1] if out else "")
check("audit: one record per chat request", count == n_requests, f"{count} records, {n_requests} requests")
raw_db = open(audit_db, "rb").read()
values = [sp["entity_value"] for s in corpus for sp in s["spans"] if sp["entity_type"] in VALIDATED]
check("audit: no labelled value is stored in the trail", not any(v.encode() in raw_db for v in values + [secret]))
pol = dict(sqlite3.connect(audit_db).execute("SELECT policy, COUNT(*) FROM audit GROUP BY policy").fetchall())
FIG["audit_policies"] = pol
check("audit: policies recorded", pol.get("mask", 0) > 0 and pol.get("keep_local", 0) > 0
      and pol.get("block") == 1 and pol.get("allow") == 1, str(pol))
code, _ = verify(audit_db, "--key-env", "NO_SUCH_VAR")
check("audit: the chain is keyed (verifying without the key fails)", code == 1)


def tampered(sql):
    db = os.path.join(work, "t.db")
    shutil.copy(audit_db, db)
    for ext in ("-wal", "-shm"):
        if os.path.exists(audit_db + ext):
            shutil.copy(audit_db + ext, db + ext)
    c = sqlite3.connect(db)
    c.executescript("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;" + sql)
    c.commit()
    c.close()
    return verify(db, "--anchor", str(count))


for name, sql, want in [
    ("edited", "UPDATE audit SET policy = 'none' WHERE seq = 7;", "record 7 was edited"),
    ("deleted", "DELETE FROM audit WHERE seq = 9;", "record 9 was deleted"),
    ("reordered", "UPDATE audit SET seq = -1 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 4; UPDATE audit SET seq = 4 WHERE seq = -1;", "record 3 was edited"),
    ("inserted", "UPDATE audit SET seq = seq + 1000000 WHERE seq >= 5; UPDATE audit SET seq = seq - 999999 WHERE seq >= 1000000;"
                 "INSERT INTO audit SELECT 5, ts_ms, 'req-forged', key_id, tier, route, 'allow', categories, hash, hash FROM audit WHERE seq = 4;", "record 5 was edited"),
    ("truncated", f"DELETE FROM audit WHERE seq > {count - 2};", "records at the end were deleted"),
]:
    code, out = tampered(sql)
    check(f"audit: {name} record caught", code == 1 and want in out, out.strip().splitlines()[0] if out else "")

print("PRIVACY " + json.dumps(FIG))
shutil.rmtree(work, ignore_errors=True)
rec.shutdown()
finish("privacy")
