#!/usr/bin/env python3
"""Speed and memory of LoRA training with torch + peft on the CPU: the baseline Porteiro's own trainer is
compared with. The GGUF is dequantized into a float32 transformers model (transformers' own GGUF loader;
where it lacks the architecture, the model class is built from the GGUF's metadata and tensors), peft puts
rank-R adapters on every attention and MLP projection, and AdamW steps over packed chat text.

Data: a chat JSONL ({"messages": [{"role", "content"}, ...]} per line), each conversation rendered as
"role: content" lines, tokenized once with llama-tokenize (scripts/build-llama-cpp.sh) and cut into
sequences of --seq-len tokens; a step is --batch-tokens tokens (batch of equal-length sequences, loss on
every token: this measures speed, not quality). tokens/s leaves out the first (warm-up) step; peak RSS is
the process's lifetime maximum (load included), rss_after_load_mib the resident size before training.

Needs $PORTEIRO_HOME/st-venv with torch, transformers, peft==0.13.2 (newer peft drags in a newer torch),
accelerate<1.3, gguf==0.19.0; gemma3 needs transformers >= 4.50 (st-venv pins 4.46.3 for the encoder).
Usage: scripts/lora_train_bench.py --model GGUF --data FILE.jsonl [--threads 2] [--steps 10]
         [--batch-tokens 1024] [--seq-len 256] [--rank 16] [--alpha 32] [--build]
"""
import argparse, json, os, pathlib, resource, subprocess, sys, tempfile, time

import gguf
import numpy as np
import torch

HOME = pathlib.Path(os.environ.get("PORTEIRO_HOME", pathlib.Path.home() / ".cache/porteiro"))
REF = pathlib.Path(os.environ.get("PORTEIRO_LLAMA_CPP", HOME / "llama.cpp-0.3.36"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def field(r, key, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def build(path, r):
    """transformers model from GGUF metadata + dequantized tensors, undoing what convert_hf_to_gguf did:
    llama's Q/K row permutation and gemma's "+1" on norm weights."""
    import transformers as tf
    a = field(r, "general.architecture")
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    hp = dict(vocab_size=int(emb.shape[1]), hidden_size=field(r, f"{a}.embedding_length"),
              intermediate_size=field(r, f"{a}.feed_forward_length"), num_hidden_layers=field(r, f"{a}.block_count"),
              num_attention_heads=field(r, f"{a}.attention.head_count"),
              num_key_value_heads=field(r, f"{a}.attention.head_count_kv"),
              rms_norm_eps=field(r, f"{a}.attention.layer_norm_rms_epsilon"),
              rope_theta=field(r, f"{a}.rope.freq_base", 10000.0),
              max_position_embeddings=field(r, f"{a}.context_length"),
              tie_word_embeddings=not any(t.name == "output.weight" for t in r.tensors))
    hd = field(r, f"{a}.attention.key_length", hp["hidden_size"] // hp["num_attention_heads"])
    if a == "llama":
        cfg, cls = tf.LlamaConfig(head_dim=hd, **hp), tf.LlamaForCausalLM
    elif a == "qwen2":
        cfg, cls = tf.Qwen2Config(**hp), tf.Qwen2ForCausalLM
    elif a == "gemma3":  # needs transformers >= 4.50
        cfg = tf.Gemma3TextConfig(head_dim=hd, query_pre_attn_scalar=hd, hidden_activation="gelu_pytorch_tanh",
                                  sliding_window=field(r, f"{a}.attention.sliding_window", 512),
                                  sliding_window_pattern=field(r, f"{a}.attention.sliding_window_pattern", 6),
                                  rope_local_base_freq=field(r, f"{a}.rope.freq_base_swa", 10000.0),
                                  final_logit_softcapping=None, attn_logit_softcapping=None, **hp)
        cls = tf.Gemma3ForCausalLM
    else:
        sys.exit(f"architecture {a} not supported")
    sd = {}
    for t in r.tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                             .reshape([int(n) for n in reversed(t.shape)]))
        parts = t.name.split(".")
        if parts[0] == "blk":
            kind = parts[2]
            if a == "llama" and kind in ("attn_q", "attn_k") and parts[3] == "weight":
                nh = hp["num_attention_heads"] if kind == "attn_q" else hp["num_key_value_heads"]
                w = w.reshape(nh, w.shape[0] // nh // 2, 2, -1).transpose(1, 2).reshape(w.shape)
            hf = HF_NAMES.get(kind) or {
                "ffn_norm": "pre_feedforward_layernorm" if a == "gemma3" else "post_attention_layernorm",
                "post_attention_norm": "post_attention_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}[kind]
            name = f"model.layers.{parts[1]}.{hf}.{parts[3]}"
        else:
            name = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[parts[0]] \
                + "." + parts[1]
        if a == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # Gemma3RMSNorm multiplies by (1 + w)
        sd[name] = w
    model = cls(cfg)  # randomly initialized, then every weight replaced
    missing = set(model.load_state_dict(sd, strict=False, assign=True).missing_keys)
    if cfg.tie_word_embeddings:
        model.tie_weights()
        missing.discard("lm_head.weight")
    if missing:
        sys.exit(f"no GGUF tensor for {sorted(missing)[:4]}")
    return model.float()


def load(path, force_build):
    r = gguf.GGUFReader(path)
    tied = not any(t.name == "output.weight" for t in r.tensors)
    if not force_build:
        try:
            from transformers import AutoModelForCausalLM
            p = pathlib.Path(path)
            # transformers 4.46 does not tie a GGUF's embeddings by itself (lm_head would be random)
            return AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, torch_dtype=torch.float32,
                                                        tie_word_embeddings=tied), "transformers-gguf"
        except Exception as e:  # e.g. architecture not in transformers' GGUF table
            print(f"transformers cannot load it ({str(e)[:200]}); building it", file=sys.stderr)
    return build(path, r), "built"


def tokens(model_path, data):
    text = "\n\n".join("\n".join(f"{m['role']}: {m['content']}" for m in json.loads(l)["messages"])
                       for l in open(data) if l.strip())
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write(text); f.flush()
        res = subprocess.run([REF / "bin/llama-tokenize", "-m", model_path, "-f", f.name, "--ids", "--log-disable"],
                             capture_output=True, text=True, check=True,
                             env=dict(os.environ, LD_LIBRARY_PATH=str(REF / "lib")))
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--build", action="store_true", help="skip transformers' GGUF loader (tests the fallback)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model

    seq = min(args.seq_len, args.batch_tokens)
    per_step = max(1, args.batch_tokens // seq)
    ids = tokens(args.model, args.data)
    n_seq = len(ids) // seq
    if n_seq == 0:
        sys.exit("not enough text for one sequence")
    data = torch.tensor(ids[:n_seq * seq]).view(n_seq, seq)

    t0 = time.perf_counter()
    model, how = load(args.model, args.build)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                             target_modules=TARGETS))
    model.train()
    load_s = time.perf_counter() - t0
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_load = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    times = []
    for s in range(args.steps):
        batch = data[[(s * per_step + i) % n_seq for i in range(per_step)]]  # wraps round a small file
        t = time.perf_counter()
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        print(f"step {s + 1}: loss {loss.item():.4f} {times[-1]:.2f} s, peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", file=sys.stderr)
    timed = args.steps - 1
    print(json.dumps({
        "impl": "torch+peft", "model": args.model, "load": how,
        "tokens_per_s": round(timed * batch.numel() / sum(times[1:]), 2) if timed else None,
        # the median step resists a busy machine's stalls better than the mean
        "tokens_per_s_median_step": round(batch.numel() / sorted(times[1:])[timed // 2], 2) if timed else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_load_mib": round(rss_load, 1), "peak_rss_load_mib": round(peak_load, 1),
        "load_s": round(load_s, 1),
        "steps": args.steps, "tokens": timed * batch.numel(), "batch": list(batch.shape),
        "rank": args.rank, "alpha": args.alpha, "threads": args.threads,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}))


if __name__ == "__main__":
    main()
