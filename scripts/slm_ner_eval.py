#!/usr/bin/env python3
"""A small language model as the NER model: how well does a registry SLM, prompted for entities with
JSON-schema-constrained output, find the persons, organisations and places of the labelled corpus?

No NER model ships in the registries (spaCy, flair, stanza and GLiNER download theirs from model
hubs), but instruct SLMs do, and Porteiro runs them. This measures that option; it is not wired
into the privacy guard (see the figures: seconds per sentence against the rules' microseconds).

  slm_ner_eval.py --porteiro target/release/porteiro --corpus ~/.cache/porteiro/data/pii_synth_v2.json \
      --model qwen2.5-1.5b --n 60

Starts `porteiro serve` on loopback with the model, sends every (len/n)-th sentence of the corpus
through the official `openai` client (temperature 0, `response_format` json_schema), finds each
returned string in the sentence, and scores it like `porteiro privacy eval`: a prediction is right
when it overlaps a gold span of its type; a gold value is found when a prediction of its type
overlaps it, and masked when any prediction does. Prints a table and an `SLM_NER {...}` line.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

from openai import OpenAI

from e2e_common import start_porteiro

ap = argparse.ArgumentParser()
ap.add_argument("--porteiro", required=True)
ap.add_argument("--corpus", required=True)
ap.add_argument("--model", default="qwen2.5-1.5b")
ap.add_argument("--n", type=int, default=60, help="sentences to send (spread over the corpus)")
ap.add_argument("--show", type=int, default=0, help="print the first SHOW answers")
args = ap.parse_args()

TYPES = {"people": "PERSON", "organizations": "ORGANIZATION", "places": "GPE"}
SCHEMA = {
    "type": "object",
    "properties": {k: {"type": "array", "items": {"type": "string"}, "maxItems": 8} for k in TYPES},
    "required": list(TYPES),
    "additionalProperties": False,
}
PROMPT = ("Extract the named entities from the text. Copy each one exactly as it is written in the "
          "text. people: names of persons. organizations: companies and institutions. places: "
          "cities, towns, regions and countries. Use empty lists when there are none.\n\nText: ")

corpus = json.load(open(args.corpus, encoding="utf-8"))
step = max(1, len(corpus) // args.n)
sample = corpus[::step][: args.n]

cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
cfg.write("[privacy]\npolicy = \"allow\"\n")
cfg.close()
srv, base = start_porteiro(args.porteiro, args.model, cfg.name, timeout_s=300)
client = OpenAI(base_url=base + "/v1", api_key="none")

stats = {t: {"gold": 0, "pred": 0, "right": 0, "found": 0, "masked": 0} for t in TYPES.values()}
lat, bad_json, not_in_text = [], 0, 0
try:
    for ex in sample:
        text = ex["full_text"]
        t0 = time.time()
        r = client.chat.completions.create(
            model=args.model, temperature=0, max_tokens=160,
            messages=[{"role": "user", "content": PROMPT + text}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "entities", "schema": SCHEMA, "strict": True}})
        lat.append(time.time() - t0)
        try:
            got = json.loads(r.choices[0].message.content)
        except (json.JSONDecodeError, TypeError):
            bad_json += 1
            got = {}
        if args.show > 0:
            args.show -= 1
            print(repr(text[:120]), "->", r.choices[0].message.content)
        preds = []  # (type, start, end)
        for key, typ in TYPES.items():
            for v in got.get(key, []):
                v = v.strip()
                i = text.find(v) if len(v) >= 2 else -1
                if i < 0:
                    not_in_text += 1
                    continue
                preds.append((typ, i, i + len(v)))
        gold = [(s["entity_type"], s["start_position"], s["end_position"]) for s in ex["spans"]]
        over = lambda a, b: a[1] < b[2] and b[1] < a[2]
        for p in preds:
            stats[p[0]]["pred"] += 1
            stats[p[0]]["right"] += any(g[0] == p[0] and over(p, g) for g in gold)
        for g in gold:
            if g[0] in stats:
                stats[g[0]]["gold"] += 1
                stats[g[0]]["found"] += any(p[0] == g[0] and over(p, g) for p in preds)
                stats[g[0]]["masked"] += any(over(p, g) for p in preds)
finally:
    srv.terminate()
    srv.wait(timeout=30)
    os.unlink(cfg.name)

pct = lambda a, b: f"{100 * a / b:.1f}%" if b else "–"
print(f"{args.model} as NER on {len(sample)} sentences of {os.path.basename(args.corpus)}")
print("| type | gold | predicted | precision | recall | masked by any prediction |")
print("|---|---|---|---|---|---|")
for t, s in stats.items():
    print(f"| {t} | {s['gold']} | {s['pred']} | {pct(s['right'], s['pred'])} | "
          f"{pct(s['found'], s['gold'])} | {pct(s['masked'], s['gold'])} |")
lat.sort()
p50 = statistics.median(lat)
p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
print(f"latency per sentence: p50 {p50:.2f} s, p95 {p95:.2f} s; "
      f"{not_in_text} returned strings not in the text; {bad_json} answers not JSON")
print("SLM_NER " + json.dumps({"model": args.model, "sentences": len(sample), "types": stats,
                               "p50_s": round(p50, 3), "p95_s": round(p95, 3),
                               "not_in_text": not_in_text, "bad_json": bad_json}))
