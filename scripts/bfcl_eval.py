#!/usr/bin/env python3
"""Tool calling measured on the Berkeley Function Calling Leaderboard (bfcl-eval==2026.3.23 wheel: BFCL v4
simple_python, multiple, parallel, parallel_multiple, irrelevance) through `porteiro serve` and the
official `openai` client, at temperature 0, tool_choice `auto` (OpenAI's default; `--tool-choice required` forces calls), parallel calls
allowed (the OpenAI default).

  bfcl_eval.py [--models smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b] [--categories all] [--start 0] [--limit 100]
               [--bin target/release/porteiro] [--parallel 4] [--json OUT]

Scoring follows BFCL's AST checker (scripts/lora_eval.py: function name, required parameters present,
no unknown ones, types, every value among the possible answers):
- simple_python, multiple: exactly one call, and it passes;
- parallel, parallel_multiple: as many calls as the answer has, each matched by a different call that
  passes (any order, as BFCL);
- irrelevance: no call at all (text is the right answer).
Prints a Markdown table (accuracy per model and category, with n) and one JSON line per cell.
"""

import argparse
import concurrent.futures
import json
import os
import sys
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_data import _schema, fetch, oai_name, serve, stop  # noqa: E402
from lora_eval import bfcl_check  # noqa: E402

CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance"]
MAX_TOKENS = 512


def load(category):
    """[{id, question, function, ground_truth (None for irrelevance)}] in the file's order."""
    f = f"BFCL_v4_{category}.json"
    with zipfile.ZipFile(fetch("bfcl")) as z:
        gold = {}
        if category != "irrelevance":
            gold = {d["id"]: d["ground_truth"]
                    for d in map(json.loads, z.read(f"bfcl_eval/data/possible_answer/{f}").splitlines())}
        return [{"id": d["id"], "question": d["question"], "function": d["function"],
                 "ground_truth": gold.get(d["id"])}
                for d in map(json.loads, z.read(f"bfcl_eval/data/{f}").splitlines())]


def request(item, tool_choice="auto"):
    tools = [{"type": "function", "function": {"name": oai_name(f["name"]), "description": f.get("description", ""),
                                               "parameters": _schema(f["parameters"])}} for f in item["function"]]
    return {"messages": item["question"][0], "tools": tools, "tool_choice": tool_choice}


def ask(client, model, req, max_tokens):
    """The answer as {"calls": [{"name", "arguments"}], "content"} or {"error"}."""
    try:
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens, **req)
    except Exception as e:  # one bad item never stops a run
        return {"error": str(e)[:300]}
    m = r.choices[0].message
    calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in (m.tool_calls or [])]
    return {"calls": calls, "content": m.content or "", "finish": r.choices[0].finish_reason}


def verdict(category, item, ans):
    """None when the answer is right, else why not."""
    if "error" in ans:
        return "error: " + ans["error"][:100]
    calls = ans["calls"]
    if category == "irrelevance":
        return None if not calls else f"called {calls[0]['name']}"
    gt = item["ground_truth"]
    if len(calls) != len(gt):
        return f"{len(calls)} calls, want {len(gt)}" + (f" (text: {ans['content'][:60]!r})" if not calls else "")
    free = list(range(len(calls)))
    for g in gt:
        label = {"ground_truth": [g], "function": item["function"]}
        hit = next((i for i in free if bfcl_check(calls[i], label) is None), None)
        if hit is None:
            return bfcl_check(calls[free[0]], label) if len(free) == 1 else f"no call matches {next(iter(g))}"
        free.remove(hit)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b")
    ap.add_argument("--categories", default="all")
    ap.add_argument("--limit", type=int, default=100, help="N items of each category from --start (0: all)")
    ap.add_argument("--start", type=int, default=0,
                    help="first item of each category (items 0-29 were the development slice; report from 100 on)")
    ap.add_argument("--bin", default="target/release/porteiro")
    ap.add_argument("--parallel", type=int, default=4, help="requests in flight (batched by the server)")
    ap.add_argument("--tool-choice", default="auto", help="auto (the OpenAI default) or required")
    ap.add_argument("--json", help="also write every answer with its verdict here (JSON lines)")
    args = ap.parse_args()
    from openai import OpenAI

    cats = CATEGORIES if args.categories == "all" else args.categories.split(",")
    data = {c: load(c)[args.start:][: args.limit or None] for c in cats}
    out = open(args.json, "w", encoding="utf-8") if args.json else None
    table = {}
    for model in args.models.split(","):
        srv, url = serve(args.bin, model)
        client = OpenAI(base_url=url + "/v1", api_key="none", timeout=900, max_retries=0)
        try:
            for c in cats:
                items = data[c]
                answers = [None] * len(items)
                t0 = time.time()
                run_all_calls(client, model, [request(it, args.tool_choice) for it in items], answers, args.parallel)
                verdicts = [verdict(c, it, a) for it, a in zip(items, answers)]
                right = sum(v is None for v in verdicts)
                table[(model, c)] = (right, len(items))
                print(json.dumps({"model": model, "category": c, "n": len(items), "correct": right,
                                  "accuracy": round(right / max(1, len(items)), 4),
                                  "seconds": round(time.time() - t0, 1)}), flush=True)
                if out:
                    for it, a, v in zip(items, answers, verdicts):
                        out.write(json.dumps({"model": model, "category": c, "id": it["id"], "answer": a,
                                              "verdict": v or "ok"}) + "\n")
        finally:
            stop(srv)
    models = args.models.split(",")
    print("\n| model | " + " | ".join(cats) + " |")
    print("|---|" + "---|" * len(cats))
    for m in models:
        cells = [f"{100 * r / max(1, n):.1f}% ({r}/{n})" for r, n in (table[(m, c)] for c in cats)]
        print(f"| {m} | " + " | ".join(cells) + " |")


def run_all_calls(client, model, reqs, answers, parallel):
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        futs = {pool.submit(ask, client, model, r, MAX_TOKENS): i for i, r in enumerate(reqs)}
        for f in concurrent.futures.as_completed(futs):
            answers[futs[f]] = f.result()


if __name__ == "__main__":
    main()
