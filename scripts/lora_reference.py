#!/usr/bin/env python3
"""Plain-PyTorch reference of the GGUF decoders Porteiro trains LoRA adapters on (llama, qwen2, gemma3),
and a replay of one training run of Porteiro's CPU LoRA trainer against it.

The model is written out by hand (no transformers classes) so that every step mirrors llama.cpp's graph
(src/models/{llama,qwen2,gemma3}.cpp of the vendored llama.cpp 0.3.36): weights are dequantized from the
GGUF with the `gguf` package and run in float32 (or float64, to tell rounding from bugs).

  --ppl MODEL     validates the model itself: perplexity on the first CHUNKS windows of CTX tokens of the
                  text, scored like llama-perplexity (second half of each window, BOS in front when the
                  vocab asks for it), next to llama-perplexity's own figure (both must agree within 1%);
                  with --lora ADAPTER, of the model with that adapter applied (checks the LoRA forward).
  --trace FILE    replays a trace written by `porteiro ... --trace FILE` (JSON lines: one "config", then one
                  "step" per optimizer step): loads the model and the initial adapter, recomputes every
                  step's loss, compares the first step's gradients with the trainer's (grads GGUF) and steps
                  torch.optim.AdamW with the trace's lr, so later losses check the optimizer too.
                  PASS: first loss and every first-step gradient (norm-wise) within 1e-3 relative, every
                  step's loss within 1%.

Needs $PORTEIRO_HOME/st-venv with torch, numpy, gguf==0.19.0; --ppl also llama.cpp's tools
(scripts/build-llama-cpp.sh, $PORTEIRO_LLAMA_CPP) and the text (scripts/fetch-text.sh).
Usage: scripts/lora_reference.py --trace FILE [--dtype float32|float64] [--steps 20] [--json OUT]
       scripts/lora_reference.py --ppl MODEL.gguf [--lora ADAPTER.gguf] [--text wiki.txt] [--ctx 512] [--chunks 4]
"""
import argparse, json, math, os, pathlib, re, subprocess, sys

import gguf
import numpy as np
import torch
import torch.nn.functional as F

HOME = pathlib.Path(os.environ.get("PORTEIRO_HOME", pathlib.Path.home() / ".cache/porteiro"))
REF = pathlib.Path(os.environ.get("PORTEIRO_LLAMA_CPP", HOME / "llama.cpp-0.3.36"))


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_tensors(path, dtype):
    """name -> torch tensor in numpy (row-major) order: a ggml {in, out} weight becomes (out, in)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(a, dtype=np.float32)  # a copy: the reader maps the file
                                       .reshape([int(n) for n in reversed(t.shape)])).to(dtype)
    return out


def rms_norm(x, w, eps):
    # ggml_rms_norm then ggml_mul by the stored weight (gemma's "1 +" is folded in by the converter)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, n_rot, base, neox):
    """x: (T, heads, d). ggml_rope_ext with freq_scale 1, no YaRN: theta_i = pos * base^(-2i/n_rot).
    NORM mode rotates adjacent pairs (2i, 2i+1) (llama: the converter permuted Q/K for this),
    NEOX mode pairs (i, i + n_rot/2). Dimensions past n_rot pass through."""
    half = n_rot // 2
    ang = (torch.arange(x.shape[0], dtype=torch.float64)[:, None]
           * base ** (-2.0 * torch.arange(half, dtype=torch.float64) / n_rot))
    cos, sin = ang.cos().to(x.dtype)[:, None], ang.sin().to(x.dtype)[:, None]
    r, rest = x[..., :n_rot], x[..., n_rot:]
    a, b = (r[..., :half], r[..., half:]) if neox else (r[..., 0::2], r[..., 1::2])
    oa, ob = a * cos - b * sin, a * sin + b * cos
    r = torch.cat([oa, ob], -1) if neox else torch.stack([oa, ob], -1).flatten(-2)
    return torch.cat([r, rest], -1)


class Model:
    def __init__(self, path, dtype=torch.float32):
        r = gguf.GGUFReader(path)
        self.arch = a = field(r, "general.architecture")
        if a not in ("llama", "qwen2", "gemma3"):
            sys.exit(f"{path}: architecture {a} not supported")
        self.n_embd = field(r, f"{a}.embedding_length")
        self.n_layer = field(r, f"{a}.block_count")
        self.n_head = field(r, f"{a}.attention.head_count")
        self.n_head_kv = field(r, f"{a}.attention.head_count_kv", self.n_head)
        self.head_dim = field(r, f"{a}.attention.key_length", self.n_embd // self.n_head)
        self.n_rot = field(r, f"{a}.rope.dimension_count", self.head_dim)
        self.base = field(r, f"{a}.rope.freq_base", 10000.0)
        self.eps = field(r, f"{a}.attention.layer_norm_rms_epsilon")
        self.neox = a != "llama"
        self.bos = field(r, "tokenizer.ggml.bos_token_id")
        self.add_bos = field(r, "tokenizer.ggml.add_bos_token", a == "gemma3")
        self.softcap = field(r, f"{a}.final_logit_softcapping", 0.0) if a == "gemma3" else 0.0
        # llama: kq_scale = attention.scale or 1/sqrt(d); gemma3 scales Q by 1/sqrt(d) (27B: by
        # 1/sqrt(n_embd/n_head)) before attention and passes kq_scale 1.0.
        if a == "gemma3":
            self.q_scale = 1 / math.sqrt(self.n_embd // self.n_head if self.n_layer == 62 else self.head_dim)
            self.kq_scale = 1.0
        else:
            self.q_scale, self.kq_scale = 1.0, field(r, f"{a}.attention.scale", 0.0) or 1 / math.sqrt(self.head_dim)
        # gemma3 sliding window: only if the key is there and > 0; the pattern is either an array of
        # per-layer flags or n (layer l slides iff l % n < n - 1; n = 0: all slide), default 6.
        self.window = field(r, f"{a}.attention.sliding_window", 0) if a == "gemma3" else 0
        pat = field(r, f"{a}.attention.sliding_window_pattern", 6)
        if isinstance(pat, list):
            self.swa = [bool(p) for p in pat][:self.n_layer]
        else:
            self.swa = [self.window > 0 and (pat == 0 or l % pat < pat - 1) for l in range(self.n_layer)]
        self.base_swa = field(r, f"{a}.rope.freq_base_swa", 10000.0)
        del r
        self.w = read_tensors(path, dtype)
        self.out_name = "output.weight" if "output.weight" in self.w else "token_embd.weight"  # tied

    def linear(self, x, name, lora):
        y = x @ self.w[name + ".weight"].T
        if name + ".bias" in self.w:
            y = y + self.w[name + ".bias"]
        ab = lora.get(name + ".weight") if lora else None
        if ab is not None:  # llama.cpp build_lora_mm: W x + scale * B (A x)
            A, B, scale = ab
            y = y + scale * ((x @ A.T) @ B.T)
        return y

    def hidden(self, tokens, lora=None):
        """Final-norm hidden states (T, n_embd) of one sequence at positions 0..T-1."""
        T, H, Hkv, d = len(tokens), self.n_head, self.n_head_kv, self.head_dim
        x = self.w["token_embd.weight"][torch.as_tensor(tokens)]
        if self.arch == "gemma3":
            x = x * math.sqrt(self.n_embd)
        pos = torch.arange(T)
        for l in range(self.n_layer):
            p, w = f"blk.{l}.", lambda n: self.w[f"blk.{l}.{n}.weight"]
            h = rms_norm(x, w("attn_norm"), self.eps)
            q = self.linear(h, p + "attn_q", lora).view(T, H, d)
            k = self.linear(h, p + "attn_k", lora).view(T, Hkv, d)
            v = self.linear(h, p + "attn_v", lora).view(T, Hkv, d)
            if self.arch == "gemma3":
                q, k = rms_norm(q, w("attn_q_norm"), self.eps), rms_norm(k, w("attn_k_norm"), self.eps)
            base = self.base_swa if self.swa[l] else self.base
            q, k = rope(q, self.n_rot, base, self.neox) * self.q_scale, rope(k, self.n_rot, base, self.neox)
            # GQA: head h reads kv head h // (H / Hkv)
            k, v = (t.repeat_interleave(H // Hkv, dim=1).transpose(0, 1) for t in (k, v))
            s = (q.transpose(0, 1) @ k.transpose(1, 2)) * self.kq_scale
            masked = pos[None, :] > pos[:, None]  # key j after query p
            if self.swa[l]:
                masked |= pos[:, None] - pos[None, :] >= self.window  # llama_hparams::is_masked_swa
            s = s.masked_fill(masked, float("-inf")).softmax(-1)
            o = self.linear((s @ v).transpose(0, 1).reshape(T, H * d), p + "attn_output", lora)
            if self.arch == "gemma3":
                o = rms_norm(o, w("post_attention_norm"), self.eps)
            x = x + o
            h = rms_norm(x, w("ffn_norm"), self.eps)
            g = self.linear(h, p + "ffn_gate", lora)
            # gemma3: ggml_gelu = tanh approximation (llama.cpp's CPU kernel reads it from an fp16 table)
            g = F.gelu(g, approximate="tanh") if self.arch == "gemma3" else F.silu(g)
            o = self.linear(g * self.linear(h, p + "ffn_up", lora), p + "ffn_down", lora)
            if self.arch == "gemma3":
                o = rms_norm(o, w("post_ffw_norm"), self.eps)
            x = x + o
        return rms_norm(x, self.w["output_norm.weight"], self.eps)

    def logits(self, h, lora=None):
        y = self.linear(h, self.out_name[:-len(".weight")], lora)
        return self.softcap * torch.tanh(y / self.softcap) if self.softcap else y

    def nll(self, tokens, mask, lora=None, backward_scale=None, rows=256):
        """Sum of -log p(tokens[i] | tokens[:i]) over i with mask[i] = 1, and the count. With
        backward_scale, also backpropagates sum * backward_scale. The vocab projection runs over `rows`
        target positions at a time, detached from the trunk, so a 262k vocab does not hold all its logits."""
        idx = [i for i in range(1, len(tokens)) if mask[i]]
        if not idx:
            return 0.0, 0
        h = self.hidden(tokens, lora)[torch.as_tensor(idx) - 1]
        tgt = torch.as_tensor([tokens[i] for i in idx])
        hd = h.detach().requires_grad_(backward_scale is not None)
        total = 0.0
        for c in range(0, len(idx), rows):
            loss = F.cross_entropy(self.logits(hd[c:c + rows], lora), tgt[c:c + rows], reduction="sum")
            if backward_scale is not None:
                (loss * backward_scale).backward()
            total += loss.item()
        if backward_scale is not None:
            h.backward(hd.grad)
        return total, len(idx)


def llama_tokenize(model, text):
    env = dict(os.environ, LD_LIBRARY_PATH=str(REF / "lib"))
    res = subprocess.run([REF / "bin/llama-tokenize", "-m", model, "-f", text, "--ids", "--log-disable"],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def llama_ppl(model, text, ctx, chunks, lora):
    env = dict(os.environ, LD_LIBRARY_PATH=str(REF / "lib"))
    res = subprocess.run([REF / "bin/llama-perplexity", "-m", model, "-f", text, "-c", str(ctx), "--chunks",
                          str(chunks), "-b", str(ctx), "-t", str(torch.get_num_threads()), "-fa", "off",
                          *(["--lora", lora] if lora else [])],
                         capture_output=True, text=True, env=env)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
    return float(m.group(1)) if m else None


def perplexity(args, dtype):
    """llama-perplexity's recipe: tokenize the whole text (BOS per the vocab), window k = tokens[k*ctx :
    (k+1)*ctx] with its first token replaced by BOS if the vocab adds one, score tokens first+1..ctx-1
    (first = ctx/2) from the logits one position earlier."""
    m = Model(args.ppl, dtype)
    lora = lora_map(*load_adapter(args.lora, dtype)) if args.lora else None
    toks = llama_tokenize(args.ppl, args.text)
    first, nll, n, running = args.ctx // 2, 0.0, 0, []
    with torch.no_grad():
        for k in range(args.chunks):
            seq = toks[k * args.ctx:(k + 1) * args.ctx]
            if m.add_bos:
                seq[0] = m.bos
            s, c = m.nll(seq, [int(i > first) for i in range(len(seq))], lora)
            nll, n = nll + s, n + c
            running.append(round(math.exp(nll / n), 4))
            print(f"[{k + 1}] {running[-1]}", file=sys.stderr)
    ours = math.exp(nll / n)
    ref = None if args.no_ref else llama_ppl(args.ppl, args.text, args.ctx, args.chunks, args.lora)
    rel = None if ref is None else abs(ours - ref) / ref
    return {"model": args.ppl, "lora": args.lora, "arch": m.arch, "dtype": args.dtype, "ctx": args.ctx,
            "chunks": args.chunks, "ppl_torch": round(ours, 4), "ppl_running": running, "ppl_llama_cpp": ref,
            "rel": rel, "pass": rel is not None and rel < 0.01}


def load_adapter(path, dtype):
    """(params by tensor name, alpha) of a llama.cpp LoRA GGUF; lora_a (rank, in), lora_b (out, rank)."""
    alpha = float(field(gguf.GGUFReader(path), "adapter.lora.alpha", 0.0))
    return {n: t.requires_grad_() for n, t in read_tensors(path, dtype).items()}, alpha


def lora_map(params, alpha):
    """base weight name -> (A, B, scale). llama_adapter_lora_weight::get_scale: alpha/rank with rank =
    lora_b's column count; alpha 0 means scale 1, not 0."""
    out = {}
    for n, a in params.items():
        if n.endswith(".lora_a"):
            base = n[:-len(".lora_a")]
            b = params[base + ".lora_b"]
            out[base] = (a, b, alpha / b.shape[1] if alpha else 1.0)
    return out


def replay(args, dtype):
    lines = [json.loads(l) for l in open(args.trace) if l.strip()]
    cfg, steps = lines[0], [l for l in lines[1:] if l.get("kind") == "step"][:args.steps]
    assert cfg["kind"] == "config", "first trace line must be the config"
    for k in ("model", "init", "grads"):  # relative paths: next to the trace
        if cfg.get(k) and not pathlib.Path(cfg[k]).exists():
            cfg[k] = str(pathlib.Path(args.trace).parent / cfg[k])
    model = Model(cfg["model"], dtype)
    params, alpha = load_adapter(cfg["init"], dtype)
    if cfg.get("alpha") is not None and abs(cfg["alpha"] - alpha) > 1e-6:
        print(f"warning: config alpha {cfg['alpha']} != adapter's {alpha}; using the adapter's", file=sys.stderr)
    lora = lora_map(params, alpha)
    names = sorted(params)
    opt = torch.optim.AdamW([params[n] for n in names], lr=0.0, betas=tuple(cfg.get("betas", (0.9, 0.999))),
                            eps=cfg.get("eps", 1e-8), weight_decay=cfg.get("weight_decay", 0.0))
    report = {"trace": args.trace, "model": cfg["model"], "arch": model.arch, "dtype": args.dtype, "steps": []}
    ok = True
    for st in steps:
        opt.zero_grad(set_to_none=False)
        n_tgt = sum(sum(m[1:]) for m in (s["mask"] for s in st["sequences"]))
        total = 0.0
        for s in st["sequences"]:  # independent sequences; gradient of sum/n_tgt accumulates
            total += model.nll(s["tokens"], s["mask"], lora, backward_scale=1.0 / n_tgt)[0]
        loss = total / n_tgt
        for n in names:  # a tensor no sequence reached still takes part in clipping and AdamW
            if params[n].grad is None:
                params[n].grad = torch.zeros_like(params[n])
        grads = [params[n].grad for n in names]
        gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        rel = abs(loss - st["loss"]) / abs(st["loss"])
        row = {"step": st["step"], "loss_ref": st["loss"], "loss_ours": loss, "rel": rel,
               "grad_norm_ref": st.get("grad_norm"), "grad_norm_ours": gnorm}
        ok &= rel < (1e-3 if st is steps[0] else 1e-2)
        print(f"step {st['step']:3d}  loss ref {st['loss']:.6f} ours {loss:.6f} rel {rel:.2e}  "
              f"|g| ref {st.get('grad_norm')} ours {gnorm:.6g}")
        if st is steps[0] and cfg.get("grads"):
            ref = read_tensors(cfg["grads"], torch.float64)
            per, zero = {}, []
            for n in names:
                g, gr = params[n].grad.double(), ref.get(n)
                if gr is None:
                    print(f"  {n}: missing from the grads file"); ok = False; continue
                if not gr.any():  # e.g. lora_a with lora_b = 0 at init: nothing to compare norm-wise
                    zero.append(n)
                    if g.any():
                        print(f"  {n}: reference gradient all zero, ours |g| = {g.norm():.3e}"); ok = False
                    continue
                per[n] = ((g - gr.reshape(g.shape)).norm() / gr.norm()).item()
            worst = max(per.values(), default=0.0)
            ok &= worst < 1e-3
            for n, v in sorted(per.items(), key=lambda kv: -kv[1])[:args.show]:
                print(f"  grad {n}: rel {v:.2e}")
            print(f"  first-step grads: max rel {worst:.2e} over {len(per)} tensors; "
                  f"{len(zero)} with a zero reference gradient")
            row.update(grad_rel=per, grad_rel_max=worst, grad_zero=zero)
        elif st is steps[0]:
            print("  no grads file in the trace: first-step gradients not checked")
        if cfg.get("clip"):  # scales by clip / (norm + 1e-6) when norm > clip
            torch.nn.utils.clip_grad_norm_([params[n] for n in names], cfg["clip"])
        for g in opt.param_groups:
            g["lr"] = st["lr"]
        opt.step()
        report["steps"].append(row)
    report["pass"] = bool(ok and steps)
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace")
    ap.add_argument("--ppl", metavar="MODEL")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--show", type=int, default=8, help="worst first-step gradients to print")
    ap.add_argument("--text", default=str(HOME / "data/wiki.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--lora", help="--ppl with this adapter applied (llama-perplexity --lora)")
    ap.add_argument("--no-ref", action="store_true", help="--ppl without running llama-perplexity")
    args = ap.parse_args()
    if not (args.trace or args.ppl):
        ap.error("give --trace FILE or --ppl MODEL")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    doc = perplexity(args, dtype) if args.ppl else replay(args, dtype)
    print(json.dumps({k: v for k, v in doc.items() if k != "steps"} if args.trace else doc))
    print("PASS" if doc["pass"] else "FAIL")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    sys.exit(0 if doc["pass"] else 1)


if __name__ == "__main__":
    main()
