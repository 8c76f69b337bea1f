"""Sequence-parallel prefill on one GPU (NCCL across several GPUs cannot be run on the machines this
project has, so the multi-rank parts are executed as their schedule on one device).

    python benchmarks/ring_gpu.py schedule [--tokens 32768 131072] [--ranks 8]
        (a) the zigzag ring schedule of P ranks run step by step on one GPU (every rank's blocks,
            masks and LSE merges, no communication) vs one causal kernel call on the same work.
    python benchmarks/ring_gpu.py prefill8b [--tokens 32768 131072] [--layers 32]
        (b) prefill of a Llama-3-8B-shaped model (random weights, 32/8 heads, D = 128) with
            ringserve's chunked engine vs the plain PyTorch-SDPA engine, in the same run.
    python benchmarks/ring_gpu.py long1m [--tokens 1048576] [--layers 16]
        (c) a 1M-token chunked prefill of a Llama-3.2-1B-shaped model, then one decode step
            against the retained 1M-token KV.
    python benchmarks/ring_gpu.py paged [--tokens 131072 1048576]
        (d) decode attention of one token over T retained KV tokens of one Llama-3-8B layer (32/8 heads,
            D = 128, bf16): the paged kernel (pages of 256 tokens, scattered) vs the contiguous split-KV
            kernel on the same K/V, as KV GB/s.
    python benchmarks/ring_gpu.py formats [--tokens 131072 1048576] [--layers 4]
        (e) retained KV formats on a Llama-3-8B shape: decode attention of one token over T KV tokens of one
            layer per format (exact bf16, fp8, int4; pages laid out as the store packs them), x32 layers
            for a step's attention; then, through the engine with --layers layers, a whole decode step
            at the first T per format and what KEEP's scoring costs beside the prefill of 32K tokens.
With --layers smaller than the model's, the figure for the whole model is extrapolated linearly
from the measured layers (attention and MLP cost the same in every layer); the output says so.
Prints a markdown table; --json PATH writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ringserve.workers.model import ModelConfig, Transformer

LLAMA3_8B = dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                 rope_theta=500000.0)
LLAMA32_1B = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192,
                  rope_theta=500000.0, tie_word_embeddings=True)


def sync_time(fn, reps=1):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps, out


def random_model(shape: dict, layers: int, max_len: int):
    from ringserve.workers.loader import LoadedModel
    from ringserve.workers.tokenizer import Tokenizer

    cfg = ModelConfig(**{**shape, "n_layers": layers}, max_position_embeddings=max_len + 1024)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    from tokenizers import Tokenizer as HFTok, models

    tok = Tokenizer(HFTok(models.BPE()), stop_ids=frozenset({-1}))
    return LoadedModel(model.eval(), tok, cfg, "random", "random")


def bench_schedule(args):
    from ringserve.kernels import flash_attention
    from ringserve.workers.layout import zigzag_segments
    from ringserve.workers.ring import attend_segments, merge_attention

    H, Hkv, D, P = 32, 8, 128, args.ranks
    rows = []
    for T in args.tokens:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
        segs = zigzag_segments(0, T, P)
        idx = [torch.cat([torch.arange(p, p + n, device="cuda") for p, n in s]) for s in segs]
        qs = [q[i] for i in idx]
        ks = [k[i] for i in idx]
        vs = [v[i] for i in idx]
        flops = 4 * T * T / 2 * H * D
        for backend in args.backends:
            def standalone():
                return flash_attention(q, k, v, causal=True, backend=backend)

            def schedule():
                for r in range(P):  # rank r's ring: its queries against every rank's shard, merged by LSE
                    out = lse = None
                    for step in range(P):
                        src = (r - step) % P
                        o, l = attend_segments(qs[r], segs[r], ks[src], vs[src], segs[src], D ** -0.5, backend)
                        if out is None:
                            out, lse = o, l
                        else:
                            merge_attention(out, lse, o, l)

            sync_time(standalone), sync_time(schedule)  # warm-up / compile
            t_one, _ = sync_time(standalone, 3)
            t_sched, _ = sync_time(schedule, 3)
            rows.append({"T": T, "P": P, "backend": backend, "standalone_tflops": flops / t_one / 1e12,
                         "schedule_tflops": flops / t_sched / 1e12, "ratio": t_one / t_sched})
            print(rows[-1], flush=True)
    print("\n| tokens | P | backend | one causal call TFLOP/s | ring schedule TFLOP/s | ratio |")
    print("|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']} | {r['P']} | {r['backend']} | {r['standalone_tflops']:.0f} | {r['schedule_tflops']:.0f} "
              f"| {r['ratio']:.2f} |")
    return rows


def sdpa_prefill(loaded, ids):
    """What a user would write: the model over the whole prompt with PyTorch SDPA, no cache kept."""
    import torch.nn.functional as F

    def attn(layer, q, k, v):  # (T, H, D), (T, Hkv, D)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        return out[0].transpose(0, 1)

    with torch.inference_mode():
        T = len(ids)
        return loaded.model(torch.as_tensor(ids, device="cuda"), torch.arange(T, device="cuda"), attn)


def bench_prefill8b(args):
    from ringserve.workers.engine import ShardEngine

    full_layers = LLAMA3_8B["n_layers"]
    L = args.layers
    rows = []
    for T in args.tokens:
        loaded = random_model(LLAMA3_8B, L, T)
        ids = torch.randint(0, 128000, (T,)).tolist()
        res = {"T": T, "layers_measured": L}
        t, _ = sync_time(lambda: sdpa_prefill(loaded, ids))  # plain PyTorch SDPA over the whole prompt
        res["sdpa_s"] = t * full_layers / L
        torch.cuda.empty_cache()
        for backend in args.backends:
            # the served path: chunked ring prefill into the paged store (what a group's rank runs)
            eng = ShardEngine(loaded, None, prefill_chunk=args.chunk, attn_backend=backend,
                              kv_device_bytes=2 * T * loaded.config.kv_bytes_per_token(torch.bfloat16))

            def run():
                eng.prefill("s", ids)
                eng.drop("s")

            c0 = eng.store.counters()
            t, _ = sync_time(run)
            c1 = eng.store.counters()
            res[f"ringserve_{backend}_s"] = t * full_layers / L
            res["bytes_per_token"] = (c1.bytes_written - c0.bytes_written + c1.bytes_copied - c0.bytes_copied) / T
            res["token_kv_bytes"] = eng.geometry.token_bytes
            del eng
            torch.cuda.empty_cache()
        rows.append(res)
        print(res, flush=True)
        del loaded
        torch.cuda.empty_cache()
    note = "" if args.layers == full_layers else f" (measured {args.layers} layers, x{full_layers / args.layers:g})"
    print(f"\n| tokens | SDPA engine s{note} | " + " | ".join(f"ringserve {b} s" for b in args.backends) + " | best ratio |")
    print("|---:|---:|" + "---:|" * len(args.backends) + "---:|")
    for r in rows:
        best = min(r[f"ringserve_{b}_s"] for b in args.backends)
        print(f"| {r['T']} | {r['sdpa_s']:.2f} | " + " | ".join(f"{r[f'ringserve_{b}_s']:.2f}" for b in args.backends)
              + f" | {r['sdpa_s'] / best:.2f}x |")
    return rows


def bench_long1m(args):
    from ringserve.workers.engine import ShardEngine
    from ringserve.workers.sampling import SamplingParams

    full_layers = LLAMA32_1B["n_layers"]
    T = args.tokens[0]
    loaded = random_model(LLAMA32_1B, args.layers, T)
    ids = torch.randint(0, 128000, (T,)).tolist()
    eng = ShardEngine(loaded, None, prefill_chunk=args.chunk, attn_backend=args.backends[0],
                      kv_device_bytes=(T + 4096) * loaded.config.kv_bytes_per_token(torch.bfloat16))
    done = []
    t_pf, _ = sync_time(lambda: eng.prefill("s", ids, progress=lambda d, t: done.append(d)))
    kv_gib = eng.store.state("s").nbytes / 2**30
    gen = eng.generate("s", [1], SamplingParams(max_tokens=10), stop_ids=frozenset())
    # the first steps include Triton compiles (lengths divisible by 16 or not specialise differently)
    steps = [sync_time(lambda: next(gen))[0] for _ in range(10)]
    t_dec, t_dec2 = steps[0], sorted(steps[3:])[len(steps[3:]) // 2]
    scale = full_layers / args.layers
    res = {"T": T, "layers_measured": args.layers, "prefill_s": t_pf * scale, "first_step_s": t_dec * scale,
           "decode_step_s": t_dec2 * scale, "decode_steps_s": steps, "kv_gib_measured": kv_gib, "kv_gib_full": kv_gib * scale,
           "chunks": len(done), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(res)
    note = "" if args.layers == full_layers else f" (measured {args.layers} of {full_layers} layers, scaled)"
    print(f"\n1M-token Llama-3.2-1B-shaped prefill{note}: {res['prefill_s']:.1f} s in {len(done)} chunks; "
          f"one decode step over the retained KV: {1000 * res['decode_step_s']:.1f} ms; KV {res['kv_gib_full']:.1f} GiB")
    return [res]


def bench_paged(args):
    """One decode step's attention over T KV tokens of one layer: paged (scattered 256-token pages) vs
    the contiguous split-KV kernel, both Triton, as KV bytes read per second."""
    from ringserve.kernels import decode_attention, paged_attention

    H, Hkv, D, S = 32, 8, 128, 256
    rows = []
    for T in args.tokens:
        g = torch.Generator(device="cuda").manual_seed(0)
        k = torch.randn(T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
        q = torch.randn(1, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        n = T // S
        perm = torch.randperm(n, device="cuda")  # the session's pages, in a scattered order in the pool
        kp = torch.empty(n, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
        vp = torch.empty_like(kp)
        kp[perm] = k.view(n, S, Hkv, D)
        vp[perm] = v.view(n, S, Hkv, D)
        table = perm.to(torch.int32).view(1, n)
        lens = torch.full((1, 1), T, dtype=torch.int32, device="cuda")
        contiguous = lambda: decode_attention(q, k, v)  # noqa: E731
        paged = lambda: paged_attention(q[None], kp, vp, table, lens, max_len=T)  # noqa: E731
        ref, _ = contiguous()
        out, _ = paged()
        err = float((out[0].float() - ref.float()).abs().max())
        for _ in range(3):
            contiguous(), paged()
        t_c, _ = sync_time(contiguous, 20)
        t_p, _ = sync_time(paged, 20)
        nbytes = 2 * k.numel() * k.element_size()
        rows.append({"T": T, "contiguous_ms": 1e3 * t_c, "paged_ms": 1e3 * t_p, "contiguous_gbps": nbytes / t_c / 1e9,
                     "paged_gbps": nbytes / t_p / 1e9, "ratio": t_c / t_p, "max_abs_diff": err})
        print(rows[-1], flush=True)
        del k, v, kp, vp
        torch.cuda.empty_cache()
    print("\n| KV tokens | contiguous ms | paged ms | contiguous GB/s | paged GB/s | paged / contiguous |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']} | {r['contiguous_ms']:.3f} | {r['paged_ms']:.3f} | {r['contiguous_gbps']:.0f} | "
              f"{r['paged_gbps']:.0f} | {r['ratio']:.2f}x |")
    return rows


def bench_formats(args):
    """Decode attention per KV format over T retained tokens (the paged kernel reading packed pages), and
    the engine's decode step and KEEP scoring cost."""
    from ringserve.kernels import paged_attention
    from ringserve.workers import kvcodec
    from ringserve.workers.engine import ShardEngine
    from ringserve.workers.sampling import SamplingParams

    H, Hkv, D, S, layers = 32, 8, 128, 256, LLAMA3_8B["n_layers"]
    rows = []
    for T in args.tokens:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, 1, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        row = {"T": T}
        for fmt in ("exact", "fp8", "int4"):
            lay = kvcodec.layout(fmt, S, Hkv, D, torch.bfloat16)
            n = -(-T // lay.tokens)
            perm = torch.randperm(n, device="cuda")
            pools, packed = [], []
            for _ in ("k", "v"):  # one pool layer each, filled page by page in a scattered order
                pool = torch.empty(n, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
                data, scales = kvcodec.views(pool, lay)
                for c0 in range(0, n, 256):  # encode in slices of pages (bounded temporaries at 1M tokens)
                    c1 = min(n, c0 + 256)
                    x = torch.randn((c1 - c0) * lay.tokens, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
                    d, sc = kvcodec.encode(fmt, x)
                    idx = perm[c0:c1]
                    data[idx] = d.view(c1 - c0, lay.tokens, Hkv, -1)
                    if scales is not None:
                        scales[idx] = sc.view(c1 - c0, lay.tokens, Hkv, -1).to(scales.dtype)
                pools.append(pool)
                packed.append((data, scales))
            (kd, ks), (vd, vs) = packed
            table, lens = perm.to(torch.int32).view(1, n), torch.full((1, 1), T, dtype=torch.int32, device="cuda")
            fn = lambda: paged_attention(q, kd, vd, table, lens, k_scales=ks, v_scales=vs,  # noqa: E731
                                         kv_format=fmt, max_len=T)
            for _ in range(3):
                fn()
            t, _ = sync_time(fn, 20)
            row[f"{fmt}_layer_ms"] = 1e3 * t
            row[f"{fmt}_step_attn_ms"] = 1e3 * t * layers
            row[f"{fmt}_kv_gib_model"] = 2 * n * lay_bytes(pools[0]) * layers / 2**30
            del pools, packed, kd, vd, ks, vs
            torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
    print("\n| KV tokens | exact ms/step (attn, 32 layers) | fp8 | int4 | fp8 speedup | int4 speedup | KV GiB exact / fp8 / int4 |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['T']} | {r['exact_step_attn_ms']:.2f} | {r['fp8_step_attn_ms']:.2f} | {r['int4_step_attn_ms']:.2f} | "
              f"{r['exact_step_attn_ms'] / r['fp8_step_attn_ms']:.2f}x | {r['exact_step_attn_ms'] / r['int4_step_attn_ms']:.2f}x | "
              f"{r['exact_kv_gib_model']:.1f} / {r['fp8_kv_gib_model']:.1f} / {r['int4_kv_gib_model']:.1f} |")
    # the engine: a whole decode step per format at the first T, and KEEP's scoring beside a 32K prefill
    T, L = args.tokens[0], args.layers
    loaded = random_model(LLAMA3_8B, L, T)
    eng = ShardEngine(loaded, None, prefill_chunk=args.chunk, attn_backend=args.backends[0],
                      kv_device_bytes=3 * (T + 4096) * loaded.config.kv_bytes_per_token(torch.bfloat16))
    ids = torch.randint(0, 128000, (T,)).tolist()
    step = {}
    for fmt in ("exact", "fp8", "int4"):
        eng.prefill(fmt, ids, kv_format=fmt)
        gen = eng.generate(fmt, [1], SamplingParams(max_tokens=12), stop_ids=frozenset())
        steps = [sync_time(lambda: next(gen))[0] for _ in range(12)]
        step[fmt] = sorted(steps[4:])[len(steps[4:]) // 2] * layers / L
        eng.drop(fmt)
    short = ids[:32768]
    t_pf, _ = sync_time(lambda: eng.prefill("k", short))
    t_keep, _ = sync_time(lambda: eng.set_format("k", "keep", 0.5))
    eng.drop("k")
    engine = {"T": T, "layers_measured": L, "decode_step_ms": {f: 1e3 * t for f, t in step.items()},
              "keep_tokens": len(short), "prefill_keep_tokens_s": t_pf * layers / L,
              "keep_scoring_s": t_keep * layers / L}
    print(engine)
    print(f"\nengine, {T} tokens, x{layers / L:g} from {L} layers: decode step exact {1e3 * step['exact']:.1f} ms, "
          f"fp8 {1e3 * step['fp8']:.1f} ms ({step['exact'] / step['fp8']:.2f}x), int4 {1e3 * step['int4']:.1f} ms "
          f"({step['exact'] / step['int4']:.2f}x); KEEP scoring of {len(short)} tokens {engine['keep_scoring_s']:.2f} s "
          f"beside their prefill of {engine['prefill_keep_tokens_s']:.2f} s (+{100 * t_keep / t_pf:.0f}%)")
    return rows + [engine]


def lay_bytes(pool_layer: torch.Tensor) -> int:
    """Bytes of one page-layer (K or V) of a pool."""
    return pool_layer[0].numel() * pool_layer.element_size()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["schedule", "prefill8b", "long1m", "paged", "formats"])
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=32768)
    ap.add_argument("--backends", nargs="+", default=["auto", "cudnn"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    defaults = {"schedule": [32768, 131072], "prefill8b": [32768, 131072], "long1m": [1 << 20],
                "paged": [131072, 1 << 20], "formats": [131072, 1 << 20]}
    args.tokens = args.tokens or defaults[args.what]
    args.layers = args.layers or {"schedule": 1, "prefill8b": 32, "long1m": 16, "paged": 1, "formats": 4}[args.what]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    rows = {"schedule": bench_schedule, "prefill8b": bench_prefill8b, "long1m": bench_long1m,
            "paged": bench_paged, "formats": bench_formats}[args.what](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
