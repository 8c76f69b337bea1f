"""Prefill throughput of a Qwen3-30B-A3B-shaped MoE layer stack: grouped by expert vs dense.

The stack is the FFN half of `--layers` decoder layers (RMSNorm -> MoE FFN -> residual), random
weights, Qwen3-30B-A3B widths: E 2048, X 128 experts, K 8 per token, Fx 768, bf16 on the GPU.
  ringserve  workers/moe.py `MoEFeedForward`: tokens grouped by expert, one matmul pair per expert
  dense      `moe_dense_ref`: every expert on every token in a plain loop, then the routing weights
Both run the same weights on the same --tokens hidden states; outputs are compared first (bf16).
Each figure is the median of --repeats timed runs after a warm-up. Prints a markdown row and,
with --json, writes the figures there.

    python3 benchmarks/moe_gpu.py [--tokens 32768] [--layers 4] [--json $OUT/moe.json]
    python3 benchmarks/moe_gpu.py --device cpu --tokens 256 --experts 16 --width 256   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(args, device, dtype):
    from ringserve.workers.model import ModelConfig, RMSNorm
    from ringserve.workers.moe import MoEFeedForward

    cfg = ModelConfig(vocab_size=8, dim=args.width, n_layers=args.layers, n_heads=32, n_kv_heads=4, head_dim=128,
                      intermediate_size=8, n_experts=args.experts, n_experts_per_tok=args.topk,
                      moe_intermediate_size=args.expert_width, norm_topk_prob=True)
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        norm, ffn = RMSNorm(cfg.dim, 1e-6), MoEFeedForward(cfg)
        with torch.no_grad():
            for p in ffn.parameters():
                p.normal_(0, 0.02)
        layers.append((norm.to(device, dtype), ffn.to(device, dtype)))
    return cfg, layers


def stack(layers, x, ffn_fn):
    for norm, ffn in layers:
        x = x + ffn_fn(ffn, norm(x))
    return x


def timed(fn, repeats, sync):
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=2048)  # E
    ap.add_argument("--experts", type=int, default=128)  # X
    ap.add_argument("--topk", type=int, default=8)  # K
    ap.add_argument("--expert-width", type=int, default=768)  # Fx
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    from ringserve.workers.moe import moe_dense_ref

    cfg, layers = build(args, device, dtype)
    x = torch.randn(args.tokens, cfg.dim, device=device, dtype=dtype)
    ours = stack(layers, x, lambda ffn, h: ffn(h))
    ref = stack(layers, x, moe_dense_ref)
    err = float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())
    assert err < (3e-2 if dtype == torch.bfloat16 else 1e-4), f"grouped and dense MoE disagree: rel err {err:.2e}"

    t_ours = timed(lambda: stack(layers, x, lambda ffn, h: ffn(h)), args.repeats, sync)
    t_dense = timed(lambda: stack(layers, x, moe_dense_ref), args.repeats, sync)
    flops = 2 * args.tokens * args.topk * 3 * cfg.dim * args.expert_width * args.layers  # routed expert work
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "dtype": str(dtype), "tokens": args.tokens, "layers": args.layers,
           "E": cfg.dim, "X": args.experts, "K": args.topk, "Fx": args.expert_width, "rel_err": err,
           "ours_tok_s": args.tokens / t_ours, "dense_tok_s": args.tokens / t_dense,
           "speedup": t_dense / t_ours, "ours_tflops_routed": flops / t_ours / 1e12}
    print(json.dumps(res, indent=1))
    print("| tokens | layers | E / X / K / Fx | ringserve tok/s | dense loop tok/s | speedup | routed TFLOP/s |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    print(f"| {args.tokens} | {args.layers} | {cfg.dim} / {args.experts} / {args.topk} / {args.expert_width} "
          f"| {res['ours_tok_s']:.0f} | {res['dense_tok_s']:.0f} | {res['speedup']:.1f}x "
          f"| {res['ours_tflops_routed']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
