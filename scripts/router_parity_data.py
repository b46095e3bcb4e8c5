#!/usr/bin/env python3
"""Rows for `porteiro router parity` and a routes + scorer configuration to decide them with.

  router_parity_data.py --out DIR [--bin target/release/porteiro]

Prompts from datasets nobody here wrote, the kinds of request the gateway routes: SNIPS utterances
(intents), BFCL questions (tool calls), GSM8K problems (reasoning), presidio-style PII sentences
(extraction into JSON) and Wikipedia paragraphs (summaries). Each row gets a task-type label
(local quality 1 for intents, tools and extraction, 0 for GSM8K, 0.5 for summaries; upstream 1):
proxies, not measured answers, used only to train a realistic scorer (`porteiro router train` on
the dev split, with the f32 encoder: `PORTEIRO_BF16=0`). The held-out split (DIR/heldout.jsonl, rows
never used to train or tune anything) is what `porteiro router parity` reports on.
"""

import argparse
import json
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_data import bfcl_request, load_bfcl, load_gsm8k, load_snips  # noqa: E402

HOME = os.environ.get("PORTEIRO_HOME", os.path.expanduser("~/.cache/porteiro"))

CONFIG = """
[router]
similarity_floor = 0.45
local_min_score = 0.5
scorer = "{scorer}"
[[upstreams]]
name = "big"
base_url = "http://127.0.0.1:9/v1"
model = "big"
[[routes]]
name = "intents"
tier = "local"
examples = ["play some jazz on spotify", "book a table for two tonight", "will it rain tomorrow in Lisbon"]
[[routes]]
name = "extract"
tier = "local"
examples = ["extract the fields from this text", "format this as JSON"]
[[routes]]
name = "math"
tier = "big"
examples = ["solve this word problem step by step", "how many apples are left in total"]
"""


def rows():
    out = []
    for text, _ in load_snips()["test"][:400]:
        out.append({"prompt": text, "local": 1.0, "upstream": 1.0, "kind": "snips"})
    for it in [b for b in load_bfcl()][:300]:
        msgs = bfcl_request(it)["messages"]
        out.append({"prompt": msgs[-1]["content"], "local": 1.0, "upstream": 1.0, "kind": "bfcl"})
    for q, _ in load_gsm8k():
        out.append({"prompt": q, "local": 0.0, "upstream": 1.0, "kind": "gsm8k"})
    with open(os.path.join(HOME, "data/pii_synth_v2.json")) as f:
        for r in json.load(f)[:300]:
            out.append({"prompt": "Extract the personal data from this text as JSON: " + r["full_text"],
                        "local": 1.0, "upstream": 1.0, "kind": "pii"})
    with open(os.path.join(HOME, "data/wiki.txt")) as f:
        paras = [p.strip() for p in f.read().split("\n\n") if len(p.strip()) > 400][:200]
    for p in paras:
        out.append({"prompt": "Summarise this paragraph: " + p[:2000], "local": 0.5, "upstream": 1.0,
                    "kind": "wiki"})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--bin", default="target/release/porteiro")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rs = rows()
    random.Random(0).shuffle(rs)
    cut = len(rs) // 3
    for name, part in (("dev", rs[:cut]), ("heldout", rs[cut:])):
        with open(os.path.join(a.out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    scorer = os.path.abspath(os.path.join(a.out, "scorer.json"))
    subprocess.run([a.bin, "router", "train", "--data", os.path.join(a.out, "dev.jsonl"), "--out", scorer],
                   check=True, env=dict(os.environ, PORTEIRO_BF16="0"))
    with open(os.path.join(a.out, "router.toml"), "w") as f:
        f.write(CONFIG.format(scorer=scorer))
    print(f"{len(rs)} rows: dev {cut}, held out {len(rs) - cut}; config {a.out}/router.toml")


if __name__ == "__main__":
    main()
