#!/usr/bin/env python3
"""Structured output on a running `porteiro serve`: 50 extraction / formatting tasks with JSON
Schemas (nested objects, arrays, enums, numbers, optional fields, Portuguese text), each run
  - constrained:   response_format json_schema (strict), and
  - unconstrained: the same instructions in the system prompt, no response_format,
reporting the schema-valid rate of each, field-level accuracy against the expected values, and the
per-token decode time of both (streamed, so the overhead of constrained decoding is measured on the
same prompts in the same run). Prints a table and a `STRUCTURED {...}` JSON line; with --check,
exits non-zero unless every constrained answer is valid.

  structured_eval.py --base http://127.0.0.1:8080 --model qwen2.5-0.5b [--check]
"""

import argparse
import json
import random
import sys
import time

from openai import OpenAI

ap = argparse.ArgumentParser()
ap.add_argument("--base", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--check", action="store_true")
ap.add_argument("--limit", type=int, default=50)
ap.add_argument("--frequency-penalty", type=float, default=0.0, help="sampling knob sent with every request (both modes)")
args = ap.parse_args()
client = OpenAI(base_url=args.base + "/v1", api_key="unused", timeout=120, max_retries=0)

rng = random.Random(7)
NAMES = ["Maria Silva", "João Santos", "Ana Costa", "Pedro Almeida", "Beatriz Rocha", "Lucas Ferreira",
         "Emma Brown", "Liam Smith", "Olivia Jones", "Noah Wilson"]
CITIES = ["Lisboa", "Porto", "São Paulo", "Recife", "Curitiba", "London", "Boston", "Madrid", "Berlin", "Braga"]
PRODUCTS = ["apples", "bread", "coffee", "milk", "rice", "eggs", "cheese", "tea"]


def task_person(i):
    n, c, a = NAMES[i], CITIES[i], 20 + 3 * i
    text = f"{n} tem {a} anos e mora em {c}." if i % 2 == 0 else f"{n} is {a} years old and lives in {c}."
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
              "city": {"type": "string"}}, "required": ["name", "age", "city"], "additionalProperties": False}
    return "Extract the person's name, age and city.", text, schema, {"name": n, "age": a, "city": c}


def task_order(i):
    items = [(PRODUCTS[(i + k) % len(PRODUCTS)], 1 + (i + k) % 4, round(0.5 + ((i * 3 + k) % 7) * 0.75, 2)) for k in range(2)]
    oid = f"A{100 + i}"
    text = f"Order {oid}: " + ", ".join(f"{q} {p} at ${u:.2f} each" for p, q, u in items) + "."
    schema = {"type": "object", "properties": {
        "order_id": {"type": "string"},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "product": {"type": "string"}, "quantity": {"type": "integer"}, "unit_price": {"type": "number"}},
            "required": ["product", "quantity", "unit_price"], "additionalProperties": False}}},
        "required": ["order_id", "items"], "additionalProperties": False}
    return "Convert this order to JSON.", text, schema, {"order_id": oid, "items.0.product": items[0][0],
                                                         "items.0.quantity": items[0][1], "items.1.quantity": items[1][1]}


REVIEWS = [("Adorei o produto, chegou rápido e funciona muito bem!", "positive"),
           ("Terrible service, the package arrived broken.", "negative"),
           ("O pedido chegou no prazo.", "neutral"),
           ("Absolutely love it, best purchase this year.", "positive"),
           ("Não recomendo, a qualidade é péssima.", "negative"),
           ("The item is as described.", "neutral"),
           ("Excelente atendimento, voltarei a comprar.", "positive"),
           ("It stopped working after two days, very disappointed.", "negative"),
           ("Recebi a encomenda ontem.", "neutral"),
           ("Fantastic quality and great price!", "positive")]


def task_sentiment(i):
    text, label = REVIEWS[i]
    schema = {"type": "object", "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number"}}, "required": ["sentiment"], "additionalProperties": False}
    return "Classify the sentiment of this review.", text, schema, {"sentiment": label}


def task_event(i):
    day, month, city = 1 + i * 2, 1 + i % 12, CITIES[(i + 3) % 10]
    n = 3 + i
    date = f"{day:02d}/{month:02d}/2025"
    text = f"Reunião de planeamento no dia {date} em {city}, com {n} participantes."
    schema = {"type": "object", "properties": {
        "event": {"type": "object", "properties": {"title": {"type": "string"}, "date": {"type": "string"},
                                                     "city": {"type": "string"}},
                  "required": ["title", "date", "city"], "additionalProperties": False},
        "participants": {"type": "integer"}}, "required": ["event"], "additionalProperties": False}
    return "Extraia o evento (título, data, cidade) e o número de participantes.", text, schema, {
        "event.date": date, "event.city": city, "participants": n}


def task_contact(i):
    n = NAMES[(i + 5) % 10]
    email = n.lower().replace(" ", ".").replace("ã", "a").replace("ç", "c").replace("ã", "a") + "@example.com"
    phone = f"+55 11 9{8000 + i * 37:04d}-{1000 + i * 91:04d}"
    text = f"Contact {n} at {email}" + (f" or call {phone}." if i % 2 == 0 else ".")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"},
              "phone": {"type": "string"}}, "required": ["name", "email"], "additionalProperties": False}
    exp = {"name": n, "email": email}
    if i % 2 == 0:
        exp["phone"] = phone
    return "Extract the contact details.", text, schema, exp


TASKS = [f(i) for f in (task_person, task_order, task_sentiment, task_event, task_contact) for i in range(10)][: args.limit]


def valid(v, s):
    """The subset of JSON Schema these tasks use."""
    t = s.get("type")
    if "enum" in s and v not in s["enum"]:
        return False
    if t == "object":
        if not isinstance(v, dict) or any(k not in v for k in s.get("required", [])):
            return False
        props = s.get("properties", {})
        if s.get("additionalProperties") is False and any(k not in props for k in v):
            return False
        return all(valid(v[k], props[k]) for k in v if k in props)
    if t == "array":
        return isinstance(v, list) and all(valid(x, s["items"]) for x in v)
    if t == "string":
        return isinstance(v, str)
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return True


def get(v, path):
    for p in path.split("."):
        if isinstance(v, list):
            p = int(p)
            if p >= len(v):
                return None
            v = v[p]
        elif isinstance(v, dict):
            v = v.get(p)
        else:
            return None
    return v


def same(a, b):
    if isinstance(b, str):
        return isinstance(a, str) and a.strip().lower() == b.lower()
    return a == b


def run(task, constrained):
    instr, text, schema, expected = task
    system = instr + " Answer with a single JSON object that follows this JSON Schema:\n" + json.dumps(schema)
    kw = {}
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    if constrained:
        kw["response_format"] = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
        msgs = [{"role": "system", "content": instr}, {"role": "user", "content": text}]
    t0 = time.perf_counter()
    stamps, out = [], []
    for ch in client.chat.completions.create(model=args.model, messages=msgs, temperature=0, max_tokens=200,
                                             frequency_penalty=args.frequency_penalty,
                                             stream=True, **kw):
        if ch.choices and ch.choices[0].delta.content:
            stamps.append(time.perf_counter())
            out.append(ch.choices[0].delta.content)
    answer = "".join(out)
    try:
        v = json.loads(answer)
    except Exception:
        v = None
    ok = v is not None and valid(v, schema)
    fields = [same(get(v, k), e) for k, e in expected.items()] if v is not None else [False] * len(expected)
    per_tok = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 2 else None
    return ok, fields, per_tok, answer


res = {}
for constrained in (True, False):
    valid_n, field_ok, field_n, toks, bad = 0, 0, 0, [], []
    for t in TASKS:
        ok, fields, per_tok, answer = run(t, constrained)
        valid_n += ok
        field_ok += sum(fields)
        field_n += len(fields)
        if per_tok:
            toks.append(per_tok)
        if not ok:
            bad.append(answer[:80])
    toks.sort()
    res["constrained" if constrained else "unconstrained"] = {
        "tasks": len(TASKS), "schema_valid": valid_n, "valid_rate": valid_n / len(TASKS),
        "field_accuracy": field_ok / max(field_n, 1), "decode_ms_per_token_median": 1000 * toks[len(toks) // 2] if toks else None,
        "invalid_examples": bad[:3]}
c, u = res["constrained"], res["unconstrained"]
overhead = (c["decode_ms_per_token_median"] / u["decode_ms_per_token_median"] - 1) if c["decode_ms_per_token_median"] and u["decode_ms_per_token_median"] else None
print(f"| {args.model} | schema-valid | field accuracy | decode ms/token (median) |")
print("|---|---|---|---|")
for k in ("constrained", "unconstrained"):
    r = res[k]
    print(f"| {k} | {r['schema_valid']}/{r['tasks']} ({100 * r['valid_rate']:.0f}%) | {100 * r['field_accuracy']:.1f}% | {r['decode_ms_per_token_median']:.2f} |")
print(f"per-token overhead of constrained decoding: {100 * overhead:+.1f}%" if overhead is not None else "overhead: n/a")
res["overhead"] = overhead
print("STRUCTURED " + json.dumps(res))
if args.check and c["schema_valid"] != c["tasks"]:
    print("FAIL: constrained answers that do not validate:", c["invalid_examples"])
    sys.exit(1)
