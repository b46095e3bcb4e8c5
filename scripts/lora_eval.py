#!/usr/bin/env python3
"""Scores a model (optionally with a LoRA adapter) served by `porteiro serve` on the held-out test file
that `lora_data.py` wrote ($PORTEIRO_HOME/data/lora/<task>.test.jsonl + .labels.jsonl).

  lora_eval.py --task snips|bfcl --model qwen2.5-0.5b [--lora NAME=PATH.gguf] [--limit N] [--port 0]
               [--bin target/release/porteiro] [--json OUT]

Every item goes out at temperature 0 through the official `openai` client (to the adapter's name when
--lora is given). snips: exact intent match with the gold label (first line of the answer, case and
whitespace ignored). bfcl: BFCL's AST check for Python (ported from bfcl_eval's ast_checker:
function name, required parameters present, no unknown ones, types, every value among the possible
answers; ints pass for floats, strings compared after BFCL's standardisation — lowercased, spaces and
",./-_*^" removed —, lists elementwise, dicts key by key; an absent parameter is fine when "" is
among its possible answers). Prints one JSON line {"task","model","adapter","n","accuracy"}; --json
also writes every answer with its verdict.
"""

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_data import (BFCL_MAX_TOKENS, OUT, SNIPS_MAX_TOKENS, oai_name, run_all, serve,  # noqa: E402
                       snips_intent, stop)

PY = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
      "dict": dict, "any": str}


def _std(s):
    return re.sub(r"[ \,\.\/\-\_\*\^]", "", s).lower().replace("'", '"')


def _type_ok(v, poss, want, nested):
    """BFCL's type_checker → (ok, is_variable). A value of the possible answers' type when that differs
    from the declared type is a 'variable' (compared as is, not standardised)."""
    ptype = next((type(a) for a in poss if a != ""), None)
    is_var = ptype is not None and ptype != want
    if type(v) == want:
        if nested is None:
            return True, is_var
        for a in poss:
            if type(a) != list or all(_type_ok(x, a, nested, None)[0] for x in v):
                return True, is_var
        return False, is_var  # BFCL: a nested failure stays a failure
    return (ptype is not None and type(v) == ptype), True


def _dict_ok(v, poss):
    for a in poss:
        if a == "":
            continue
        if all(k in a and (_std(x) if type(x) == str else x) in [_std(y) if type(y) == str else y for y in a[k]]
               for k, x in v.items()) and all(k in v or "" in vals for k, vals in a.items()):
            return True
    return False


def _list_dict_ok(v, poss):
    return any(len(v) == len(a) and all(_dict_ok(x, [a[i]]) for i, x in enumerate(v)) for a in poss)


def _list_ok(v, poss):
    s = [_std(x) if type(x) == str else x for x in v]
    return s in [[_std(y) if type(y) == str else y for y in a] for a in poss]


def bfcl_check(call, label):
    """None when the call passes BFCL's AST check, else the reason. call: {"name", "arguments"}."""
    if "error" in call:
        return "no call: " + call["error"][:80]
    want_name, poss_all = next(iter(label["ground_truth"][0].items()))
    if call["name"] != oai_name(want_name):
        return f"wrong function {call['name']} (want {oai_name(want_name)})"
    desc = next(f for f in label["function"] if f["name"] == want_name)
    props, required = desc["parameters"]["properties"], desc["parameters"].get("required", [])
    try:
        params = json.loads(call["arguments"]) if isinstance(call["arguments"], str) else call["arguments"]
    except json.JSONDecodeError:
        return "arguments are not JSON"
    if not isinstance(params, dict):
        return "arguments are not an object"
    for p in required:
        if p not in params:
            return f"missing required {p}"
    for p, v in params.items():
        if p not in props or p not in poss_all:
            return f"unexpected parameter {p}"
        t, poss = props[p]["type"], poss_all[p]
        want = PY.get(t, str)
        items = props[p].get("items") if t in ("array", "tuple") else None
        nested = PY.get(items["type"]) if isinstance(items, dict) and "type" in items else None
        if t == "float" and type(v) == int:  # Python would accept an int for a float
            v = float(v)
        if nested is float and type(v) == list:  # and JSON's 5 is 5.0 inside a list too (BFCL: not)
            v = [float(x) if type(x) == int else x for x in v]
        ok, is_var = _type_ok(v, poss, want, nested)
        if not ok:
            return f"type of {p}: {type(v).__name__} for {t}"
        if not is_var:
            if want == dict:
                ok = _dict_ok(v, poss)
            elif want == list and nested == dict:
                ok = _list_dict_ok(v, poss)
            elif want == str:
                ok = _std(v) in [_std(a) for a in poss if type(a) == str]
            elif want == list:
                ok = _list_ok(v, poss)
            else:
                ok = v in poss
        else:
            ok = v in poss
        if not ok:
            return f"value of {p}: {v!r} not in {poss!r}"
    for p, vals in poss_all.items():
        if p not in params and "" not in vals:
            return f"missing {p}"
    return None


def bfcl_correct(call, label):
    return bfcl_check(call, label) is None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=["snips", "bfcl"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lora", help="NAME=PATH.gguf: serve this adapter and send every request to it")
    ap.add_argument("--limit", type=int, help="the first N test items")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--bin", default="target/release/porteiro")
    ap.add_argument("--parallel", type=int, default=4, help="requests in flight (batched by the server)")
    ap.add_argument("--json", help="also write the result and every answer here")
    args = ap.parse_args()
    from openai import OpenAI

    base = os.path.join(OUT, f"{args.task}.test")
    reqs = [json.loads(line) for line in open(base + ".jsonl", encoding="utf-8")][: args.limit]
    labels = [json.loads(line) for line in open(base + ".labels.jsonl", encoding="utf-8")][: args.limit]
    adapter = args.lora.split("=", 1)[0] if args.lora else None
    srv, url = serve(args.bin, args.model, args.port, [args.lora] if args.lora else [])
    client = OpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0)
    answers = [None] * len(reqs)
    t0, done = time.time(), [0]

    def on_done(i, ans):
        answers[i] = ans
        done[0] += 1
        if done[0] % 25 == 0 or done[0] == len(reqs):
            print(f"  {done[0]}/{len(reqs)}  {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    try:
        run_all(client, adapter or args.model, reqs, SNIPS_MAX_TOKENS if args.task == "snips" else BFCL_MAX_TOKENS,
                args.parallel, on_done)
    finally:
        stop(srv)
    if args.task == "snips":
        verdicts = [None if isinstance(a, str) and snips_intent(a) == lab["label"] else f"got {a!r}"
                    for a, lab in zip(answers, labels)]
    else:
        verdicts = [bfcl_check(a, lab) for a, lab in zip(answers, labels)]
    right = sum(v is None for v in verdicts)
    res = {"task": args.task, "model": args.model, "adapter": adapter, "n": len(reqs),
           "accuracy": round(right / max(len(reqs), 1), 4)}
    print(json.dumps(res), flush=True)
    if args.json:
        items = [{"answer": a, "label": lab.get("label", lab.get("id")), "error": v}
                 for a, lab, v in zip(answers, labels, verdicts)]
        json.dump({**res, "correct": right, "seconds": round(time.time() - t0, 1), "items": items},
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
