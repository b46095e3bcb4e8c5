#!/usr/bin/env python3
"""Structured output through the official `openai` SDK against the real `porteiro serve`:
json_object, json_schema, `client.beta.chat.completions.parse` with a Pydantic model, tools with
tool_choice required / named / none / auto (a valid call or text, whichever the model picks),
parallel_tool_calls false, streamed tool calls reassembled by the SDK's own
stream helper, and 400s naming unsupported schema features. Then the 50-task evaluation
(scripts/structured_eval.py --check: every constrained answer must validate).

Started by crates/porteiro/tests/structured_e2e.rs:
  structured_e2e.py --porteiro target/release/porteiro --model smollm2-135m
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Literal, Optional

import openai
from openai import OpenAI
from pydantic import BaseModel

from e2e_common import check, finish, start_porteiro

ap = argparse.ArgumentParser()
ap.add_argument("--porteiro", required=True)
ap.add_argument("--model", default="smollm2-135m")
args = ap.parse_args()
M = args.model

work = tempfile.mkdtemp(prefix="porteiro-structured-")
cfg = os.path.join(work, "porteiro.toml")
open(cfg, "w").write('[model]\nctx = 2048\nthreads = 2\n[embeddings]\nmodel = ""\n[log]\npath = ""\n')
srv, BASE = start_porteiro(args.porteiro, M, cfg)
client = OpenAI(base_url=BASE + "/v1", api_key="unused", timeout=120, max_retries=0)


def user(t):
    return [{"role": "user", "content": t}]


r = client.chat.completions.create(model=M, messages=user("Give me a JSON object describing a cat."),
                                   response_format={"type": "json_object"}, max_tokens=120, temperature=0)
try:
    obj = json.loads(r.choices[0].message.content)
    check("json_object: a JSON object", isinstance(obj, dict), r.choices[0].message.content[:80])
except Exception as e:
    check("json_object: a JSON object", r.choices[0].finish_reason == "length", f"{e}: {r.choices[0].message.content[:80]}")


class Item(BaseModel):
    product: str
    quantity: int


class Order(BaseModel):
    customer: str
    status: Literal["open", "paid", "shipped"]
    item: Item
    note: Optional[str] = None


# A 135M model repeats itself; a frequency penalty (an ordinary sampling knob) keeps it from looping.
p = client.beta.chat.completions.parse(
    model=M, temperature=0, max_tokens=200, response_format=Order, frequency_penalty=0.5,
    messages=user("Pedido da cliente Ana Costa, já pago: 2 cafés."))
parsed = p.choices[0].message.parsed
check("parse(): the SDK parses the answer into the Pydantic model", isinstance(parsed, Order), repr(parsed)[:120])

tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                         "required": ["city", "unit"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "send_email", "description": "Send an e-mail",
          "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "subject": {"type": "string"}},
                         "required": ["to", "subject"]}}}]


def args_valid(call):
    a = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        return isinstance(a.get("city"), str) and a.get("unit") in ("celsius", "fahrenheit") and set(a) <= {"city", "unit"}
    return isinstance(a.get("to"), str) and isinstance(a.get("subject"), str)


r = client.chat.completions.create(model=M, temperature=0, tools=tools, tool_choice="required",
                                   messages=user("What's the weather in Recife, in celsius?"))
c = r.choices[0]
check("tools (required): tool_calls with finish_reason tool_calls",
      c.finish_reason == "tool_calls" and c.message.tool_calls and c.message.content is None, str(c)[:200])
check("tools: arguments valid against the function's schema", c.message.tool_calls and args_valid(c.message.tool_calls[0]))

r = client.chat.completions.create(model=M, temperature=0, tools=tools, frequency_penalty=0.5, max_tokens=200,
                                   tool_choice={"type": "function", "function": {"name": "send_email"}},
                                   messages=user("Mail bob@example.com that the report is ready."))
tc = r.choices[0].message.tool_calls
check("tools (named): that function is called", tc and tc[0].function.name == "send_email" and args_valid(tc[0]), str(tc)[:160])

r = client.chat.completions.create(model=M, temperature=0, tools=tools, tool_choice="none", max_tokens=16,
                                   messages=user("Say hello."))
check("tools (none): a plain text answer", r.choices[0].message.tool_calls is None and r.choices[0].message.content)

# auto: the model decides. Whatever it decides, the answer keeps OpenAI's contract: either valid calls
# with finish_reason tool_calls and no text, or text with no calls.
def consistent(c):
    if c.message.tool_calls:
        return c.finish_reason == "tool_calls" and all(args_valid(t) for t in c.message.tool_calls)
    return c.finish_reason in ("stop", "length") and c.message.content is not None


for q in ["What's the weather in Porto, in celsius?", "Say hello.", "What is 2 + 2?"]:
    r = client.chat.completions.create(model=M, temperature=0, tools=tools, messages=user(q), max_tokens=64)
    check(f"tools (auto), {q!r}: a valid call or a text answer", consistent(r.choices[0]), str(r.choices[0])[:200])
msgs = user("What's the weather in Porto?")
r = client.chat.completions.create(model=M, temperature=0, tools=tools, tool_choice="required", messages=msgs)
call = r.choices[0].message.tool_calls[0]
msgs += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
         {"role": "tool", "tool_call_id": call.id, "content": "{\"temp\": 21}"}]
r = client.chat.completions.create(model=M, temperature=0, tools=tools, messages=msgs, max_tokens=24)
check("tools (auto) after the tool result: a valid answer", consistent(r.choices[0]), str(r.choices[0])[:160])
r = client.chat.completions.create(model=M, temperature=0, tools=tools, tool_choice="required", messages=user(
    "Weather in Porto and in Faro, in celsius?"), parallel_tool_calls=False, max_tokens=200)
check("tools (required, parallel_tool_calls false): exactly one call",
      len(r.choices[0].message.tool_calls or []) == 1, str(r.choices[0])[:200])

# The same knob as above: greedy decoding of a 135M model can loop inside a string argument.
with client.beta.chat.completions.stream(model=M, temperature=0, tools=tools, tool_choice="required",
                                         frequency_penalty=0.5,
                                         messages=user("Weather in Lisbon in fahrenheit?")) as s:
    n_events = sum(1 for _ in s)
    final = s.get_final_completion()
fc = final.choices[0]
check("streamed tool call: the SDK reassembles delta.tool_calls", fc.finish_reason == "tool_calls" and
      fc.message.tool_calls and args_valid(fc.message.tool_calls[0]), f"{n_events} events: {str(fc)[:160]}")

for name, rf, want in [
    ("if/then", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}}}, "if"),
    ("unknown format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "format": "nope"}}}}}, "nope"),
    ("response_format type", {"type": "xml"}, "xml"),
]:
    try:
        client.chat.completions.create(model=M, messages=user("x"), response_format=rf)
        check(f"400 for unsupported {name}", False, "accepted")
    except openai.BadRequestError as e:
        check(f"400 for unsupported {name} names it", want in str(e), str(e)[:160])

p = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "structured_eval.py"),
                    "--base", BASE, "--model", M, "--check", "--frequency-penalty", "0.5"],
                   capture_output=True, text=True)
print(p.stdout.strip())
check("50 tasks: every constrained answer validates", p.returncode == 0, p.stderr.strip()[-300:])
srv.terminate()
srv.wait(timeout=30)
finish("structured-output")
