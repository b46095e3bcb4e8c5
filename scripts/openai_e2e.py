#!/usr/bin/env python3
"""End-to-end checks of a running `porteiro serve` with the official `openai` Python package.

Started by crates/porteiro/tests/serve_openai.rs, which launches two servers on loopback:
  --base     the main one (generative model + MiniLM embeddings, ctx 1024, 16 sequences at once)
  --limited  one slot, no queue, API key `sk-test` (for 401 and 429)
Every check raises on failure; the script exits non-zero if any failed and prints one line per check
and a `LOAD {...}` line with the load-test figures.
"""

import argparse
import asyncio
import json
import sys
import time
import traceback
import urllib.error
import urllib.request

import openai
from openai import AsyncOpenAI, OpenAI

ap = argparse.ArgumentParser()
ap.add_argument("--base", required=True)
ap.add_argument("--limited", required=True)
ap.add_argument("--pid", type=int, required=True, help="pid of the main server, for RSS")
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--embed", default="minilm-l6")
ap.add_argument("--ctx", type=int, default=1024)
ap.add_argument("--only", help="run only the checks whose name contains this (debugging)")
ap.add_argument("--exclude", help="skip the checks whose name contains this (debugging)")
args = ap.parse_args()
M, E = args.model, args.embed

client = OpenAI(base_url=args.base + "/v1", api_key="unused", timeout=60, max_retries=0)
CHECKS = []


def check(f):
    CHECKS.append(f)
    return f


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


def user(text):
    return [{"role": "user", "content": text}]


def raises(exc_type, fn):
    try:
        fn()
    except exc_type as e:
        return e
    raise AssertionError(f"expected {exc_type.__name__}")


def metrics(base):
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        out = {}
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@check
def chat_non_stream_usage_and_length():
    r = client.chat.completions.create(
        model=M, messages=user("Write a poem about rain."), max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True})
    expect(r.object == "chat.completion", r.object)
    c = r.choices[0]
    expect(c.finish_reason == "length", c.finish_reason)
    expect(c.message.role == "assistant" and c.message.content, c.message)
    expect(r.usage.completion_tokens == 8, r.usage)
    expect(r.usage.total_tokens == r.usage.prompt_tokens + 8, r.usage)


@check
def chat_stream_matches_non_stream_with_usage():
    kw = dict(model=M, messages=user("Name three fruits."), max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    expect(text == whole.choices[0].message.content, (text, whole.choices[0].message.content))
    expect(chunks[0].choices[0].delta.role == "assistant", chunks[0])
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    expect(finish == [whole.choices[0].finish_reason], finish)
    expect(chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1])
    expect(chunks[-1].usage.completion_tokens == whole.usage.completion_tokens, chunks[-1].usage)


@check
def chat_stop_string():
    kw = dict(model=M, messages=user("Describe a busy market."), max_tokens=24, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    words = full.split()
    expect(len(words) >= 6, full)
    stop = " " + words[4]
    r = client.chat.completions.create(stop=[stop, "never-appears"], **kw)
    expect(r.choices[0].message.content == full[: full.index(stop)], (r.choices[0].message.content, full))
    expect(r.choices[0].finish_reason == "stop", r.choices[0].finish_reason)


@check
def seed_determinism():
    kw = dict(model=M, messages=user("Invent a name for a dog."), max_tokens=16, temperature=1.0,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(seed=11, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=11, **kw).choices[0].message.content
    expect(a == b, (a, b))


@check
def chat_logprobs():
    r = client.chat.completions.create(
        model=M, messages=user("Hi"), max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs.content
    expect(len(lp) == 4 and all(len(t.top_logprobs) == 2 for t in lp), lp)
    expect("".join(t.token for t in lp) == r.choices[0].message.content, lp)


@check
def completions_legacy():
    kw = dict(model=M, prompt="The capital of France is", max_tokens=6, temperature=0,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    expect(r.object == "text_completion" and r.choices[0].finish_reason == "length", r)
    expect(r.usage.completion_tokens == 6, r.usage)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(stream=True, **kw) if ch.choices)
    expect(streamed == r.choices[0].text, (streamed, r.choices[0].text))


@check
def embeddings_float_and_base64():
    texts = ["The cat sat on the mat.", "A kitten rests on a rug.", "Interest rates rose again."]
    # The SDK asks for base64 by default and decodes it; float is asked explicitly.
    b64 = client.embeddings.create(model=E, input=texts)
    flt = client.embeddings.create(model=E, input=texts, encoding_format="float")
    expect(len(b64.data) == 3 and all(len(d.embedding) == 384 for d in b64.data), b64)
    for x, y in zip(b64.data, flt.data):
        expect(max(abs(p - q) for p, q in zip(x.embedding, y.embedding)) < 1e-6, "base64 != float")
    v = [d.embedding for d in flt.data]
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))
    expect(dot(v[0], v[1]) > 0.4 > dot(v[0], v[2]), (dot(v[0], v[1]), dot(v[0], v[2])))
    expect(flt.usage.prompt_tokens > 10, flt.usage)
    single = client.embeddings.create(model=E, input="hello world", encoding_format="float")
    expect(len(single.data) == 1, single)


@check
def models_list_and_retrieve():
    ids = [m.id for m in client.models.list().data]
    expect(ids == [M, E, "auto"], ids)
    expect(client.models.retrieve(M).id == M, "retrieve")
    raises(openai.NotFoundError, lambda: client.models.retrieve("gpt-4o"))


@check
def auto_model_is_routed_and_says_where():
    # No upstream and no routes configured: the router keeps everything local and says so.
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=user("Format this as JSON: name Ana, age 31"), max_tokens=8, temperature=0)
    expect(raw.headers.get("x-porteiro-tier") == "local", dict(raw.headers))
    expect(raw.headers.get("x-porteiro-route") == "default", dict(raw.headers))
    float(raw.headers.get("x-porteiro-score"))
    r = raw.parse()
    expect(r.model == M and r.choices[0].message.content, r)
    with client.chat.completions.with_streaming_response.create(
            model="auto", messages=user("Say hi"), max_tokens=8, stream=True) as resp:
        expect(resp.headers.get("x-porteiro-tier") == "local", dict(resp.headers))
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    expect(text, "empty stream")


@check
def errors_400_name_the_parameter():
    for kw, param in [
        (dict(temperature=5), "temperature"),
        (dict(n=2), "n"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(presence_penalty=9), "presence_penalty"),
    ]:
        e = raises(openai.BadRequestError,
                   lambda: client.chat.completions.create(model=M, messages=user("x"), **kw))
        expect(e.status_code == 400 and e.param == param, (kw, e.param, e.message))
    e = raises(openai.BadRequestError,
               lambda: client.embeddings.create(model=E, input="x", encoding_format="hex"))
    expect(e.param == "encoding_format", e.param)
    # Malformed JSON (the SDK never sends it): raw request.
    req = urllib.request.Request(args.base + "/v1/chat/completions", data=b'{"model": ',
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("malformed JSON accepted")
    except urllib.error.HTTPError as he:
        body = json.loads(he.read())
        expect(he.code == 400 and body["error"]["code"] == "invalid_json", body)


@check
def error_404_unknown_model():
    e = raises(openai.NotFoundError,
               lambda: client.chat.completions.create(model="gpt-4o", messages=user("x")))
    expect(e.status_code == 404 and e.code == "model_not_found", e.code)


@check
def error_400_context_overflow_states_both_counts():
    e = raises(openai.BadRequestError, lambda: client.chat.completions.create(
        model=M, messages=user("Hello there"), max_tokens=5000))
    expect(e.code == "context_length_exceeded", e.code)
    expect(f"maximum context length is {args.ctx} tokens" in e.message and "5000 in the completion" in e.message,
           e.message)
    e = raises(openai.BadRequestError, lambda: client.completions.create(
        model=M, prompt="word " * 1200, max_tokens=4))
    expect(e.code == "context_length_exceeded", e.code)


@check
def error_413_body_too_large():
    e = raises(openai.APIStatusError, lambda: client.chat.completions.create(
        model=M, messages=user("x" * 100_000)))
    expect(e.status_code == 413, e.status_code)


@check
def error_401_with_api_keys():
    bad = OpenAI(base_url=args.limited + "/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    e = raises(openai.AuthenticationError, lambda: bad.models.list())
    expect(e.status_code == 401, e.status_code)
    good = OpenAI(base_url=args.limited + "/v1", api_key="sk-test", max_retries=0, timeout=30)
    expect([m.id for m in good.models.list().data] == [M, "auto"], "models with the right key")


@check
def error_429_with_retry_after():
    c = OpenAI(base_url=args.limited + "/v1", api_key="sk-test", max_retries=0, timeout=30)
    stream = c.chat.completions.create(model=M, messages=user("Tell a long story."), max_tokens=300,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))  # the only slot is taken
    try:
        e = raises(openai.RateLimitError, lambda: c.chat.completions.create(
            model=M, messages=user("hi"), max_tokens=2))
        expect(e.status_code == 429, e.status_code)
        ra = e.response.headers.get("retry-after")
        expect(ra is not None and int(ra) >= 1, ra)
    finally:
        stream.close()


@check
def client_disconnect_frees_the_sequence():
    before = metrics(args.base).get("porteiro_cancelled_requests_total", 0)
    stream = client.chat.completions.create(model=M, messages=user("Count to five hundred."),
                                            max_tokens=600, stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(3):
        next(it)
    expect(metrics(args.base)["porteiro_running_sequences"] == 1, "running before close")
    stream.close()
    t0 = time.time()
    while True:
        m = metrics(args.base)
        if m["porteiro_running_sequences"] == 0 and m["porteiro_kv_cache_bytes"] == 0:
            break
        expect(time.time() - t0 < 5, f"sequence not freed: {m['porteiro_running_sequences']} running")
        time.sleep(0.02)
    expect(m["porteiro_cancelled_requests_total"] == before + 1,
           (before, m["porteiro_cancelled_requests_total"]))
    print(f"  freed {1000 * (time.time() - t0):.0f} ms after close")


@check
def load_32_streams_of_64_tokens():
    n, tokens = 32, 64
    base_rss = rss_mb(args.pid)
    peak = [base_rss]
    done = [False]

    async def sample_rss():
        while not done[0]:
            peak[0] = max(peak[0], rss_mb(args.pid))
            await asyncio.sleep(0.05)

    async def one(ac, i):
        t0 = time.time()
        ttft, text, finish, usage = None, "", None, None
        stream = await ac.chat.completions.create(
            model=M, messages=user(f"Story number {i}: once upon a time"), max_tokens=tokens,
            temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        async for ch in stream:
            if ch.choices:
                if ch.choices[0].delta.content:
                    ttft = ttft or time.time() - t0
                    text += ch.choices[0].delta.content
                finish = ch.choices[0].finish_reason or finish
            if ch.usage:
                usage = ch.usage
        return ttft, finish, usage

    async def main():
        ac = AsyncOpenAI(base_url=args.base + "/v1", api_key="unused", timeout=120, max_retries=0)
        sampler = asyncio.create_task(sample_rss())
        t0 = time.time()
        res = await asyncio.wait_for(asyncio.gather(*(one(ac, i) for i in range(n))), timeout=180)
        wall = time.time() - t0
        done[0] = True
        await sampler
        await ac.close()
        return res, wall

    m0 = metrics(args.base)
    res, wall = asyncio.run(main())
    m1 = metrics(args.base)
    steps = m1["porteiro_engine_steps_total"] - m0["porteiro_engine_steps_total"]
    batch = (m1["porteiro_engine_batch_tokens_total"] - m0["porteiro_engine_batch_tokens_total"]) / max(steps, 1)
    for ttft, finish, usage in res:
        expect(finish == "length" and usage.completion_tokens == tokens, (finish, usage))
    ttfts = sorted(r[0] for r in res)
    p50, p95 = ttfts[len(ttfts) // 2], ttfts[int(len(ttfts) * 0.95) - 1]
    figures = {"streams": n, "tokens_each": tokens, "wall_s": round(wall, 2),
               "aggregate_tok_s": round(n * tokens / wall, 1), "ttft_p50_s": round(p50, 3),
               "ttft_p95_s": round(p95, 3), "rss_before_mb": round(base_rss), "rss_peak_mb": round(peak[0]),
               "engine_steps": int(steps), "mean_batch_tokens": round(batch, 1)}
    print("LOAD " + json.dumps(figures))
    expect(peak[0] - base_rss < 400, f"RSS grew by {peak[0] - base_rss:.0f} MB")
    # The last Done reaches the client just before the engine sweeps its sequence.
    t0 = time.time()
    while True:
        m = metrics(args.base)
        if m["porteiro_running_sequences"] == 0 and m["porteiro_waiting_requests"] == 0:
            break
        expect(time.time() - t0 < 2, (m["porteiro_running_sequences"], m["porteiro_waiting_requests"]))
        time.sleep(0.02)


failed = 0
CHECKS = [f for f in CHECKS if (not args.only or args.only in f.__name__)
          and not (args.exclude and args.exclude in f.__name__)]
for f in CHECKS:
    t0 = time.time()
    try:
        f()
        print(f"ok   {f.__name__} ({time.time() - t0:.1f} s)", flush=True)
    except Exception:
        failed += 1
        print(f"FAIL {f.__name__}", flush=True)
        traceback.print_exc()
print(f"{len(CHECKS) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
