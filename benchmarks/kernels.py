"""Kernel benchmark: correctness on the GPU, then throughput against the peers, all in one run.

    python benchmarks/kernels.py                 # everything (H100: ~4 min incl. compiles)
    python benchmarks/kernels.py --quick         # smaller sizes, no tuning sweep
    python benchmarks/kernels.py --json out.json # also write every number

Sections: machine ceilings (device copy GB/s counting read + write, bf16 matmul TFLOP/s); prefill
attention (ours Triton, ours via cuDNN-with-LSE, SDPA-cuDNN, SDPA-flash; causal diagonal and full
blocks; T = 8K / 32K / 128K; 32 query / 8 KV heads); split-KV decode (bf16 / int8 / fp8 KV against
SDPA-flash on the same KV bytes; KV = 128K / 1M tokens); LSE merge and KV quantization (GB/s against
the copy ceiling and the torch twins). The last lines are a summary table of ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import traceback

import torch

try:
    import ringserve.kernels as K
except ImportError:  # running from a checkout without `pip install -e .`: map kernels/ by hand
    import importlib.machinery
    import importlib.util

    root = pathlib.Path(__file__).resolve().parents[1]
    pkg = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("ringserve", None, is_package=True))
    pkg.__path__ = []
    sys.modules["ringserve"] = pkg
    spec = importlib.util.spec_from_file_location("ringserve.kernels", root / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(root / "kernels")])
    K = importlib.util.module_from_spec(spec)
    sys.modules["ringserve.kernels"] = K
    spec.loader.exec_module(K)

import triton  # noqa: E402  (after the import fallback above)


RESULTS: dict = {"rows": [], "checks": []}
SUMMARY: list[tuple[str, str, str]] = []


def timeit(fn, min_ms: float = 30.0, reps: int = 5) -> float:
    """Median milliseconds per call: calls are batched between CUDA events so launch overhead overlaps."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    e.synchronize()
    one = max(s.elapsed_time(e), 1e-3)
    inner = max(1, int(min_ms / one))
    times = []
    for _ in range(reps):
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / inner)
    return statistics.median(times)


def row(section: str, name: str, ms: float, *, tflops: float | None = None, gbs: float | None = None, **extra):
    r = {"section": section, "name": name, "ms": round(ms, 4), **extra}
    if tflops is not None:
        r["TFLOP/s"] = round(tflops, 1)
    if gbs is not None:
        r["GB/s"] = round(gbs, 1)
    RESULTS["rows"].append(r)
    unit = f"{tflops:7.1f} TFLOP/s" if tflops is not None else f"{gbs:8.1f} GB/s"
    print(f"  {name:<44} {ms:10.3f} ms  {unit}  {extra if extra else ''}", flush=True)


def check(name: str, err: float, tol: float) -> None:
    ok = err < tol and err == err
    RESULTS["checks"].append({"name": name, "err": err, "tol": tol, "ok": ok})
    print(f"  [{'PASS' if ok else 'FAIL'}] {name}: rel err {err:.2e} (< {tol:g})", flush=True)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def section(title: str, fn, *args):
    print(f"\n== {title}", flush=True)
    try:
        fn(*args)
    except Exception:  # keep the other sections' numbers
        traceback.print_exc()
        RESULTS.setdefault("errors", []).append(title)


# ---------------------------------------------------------------------------------------------------
def ceilings():
    n = 1 << 30  # 1 GiB
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src))
    RESULTS["copy_GBs"] = 2 * n / ms / 1e6
    row("ceiling", "device copy 1 GiB (read+write)", ms, gbs=RESULTS["copy_GBs"])
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = timeit(lambda: a @ b)
    RESULTS["matmul_TFLOPs"] = 2 * 8192**3 / ms / 1e9
    row("ceiling", "bf16 matmul 8192^3", ms, tflops=RESULTS["matmul_TFLOPs"])


def correctness():
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=g, device="cuda").to(dt)  # noqa: E731
    for Tq, Tk, H, Hkv, D, causal, qs, ks in [(4099, 4099, 32, 8, 128, True, 0, 0), (2048, 3000, 32, 8, 128, False, 0, 0),
                                              (1500, 2500, 16, 2, 64, True, 2000, 0), (1000, 1000, 8, 8, 128, True, 0, 500)]:
        q, k, v = r(Tq, H, D), r(Tk, Hkv, D), r(Tk, Hkv, D)
        ro, rl = K.flash_attention_ref(q, k, v, causal=causal, q_start=qs, k_start=ks, out_dtype=torch.float32)
        for be in ("triton", "cudnn", "flash"):
            try:
                o, l = K.flash_attention(q, k, v, causal=causal, q_start=qs, k_start=ks, backend=be)
            except RuntimeError as exc:
                print(f"  {be} unavailable: {exc}")
                continue
            fin = torch.isfinite(rl)
            lerr = (l[fin] - rl[fin]).abs().max().item() if fin.any() else 0.0
            nan = bool(o.isnan().any() or l.isnan().any()) or not torch.equal(torch.isneginf(l), torch.isneginf(rl))
            check(f"attention[{be}] Tq={Tq} Tk={Tk} H={H}/{Hkv} D={D} causal={causal} q0={qs} k0={ks} (lse abs {lerr:.1e})",
                  float("nan") if nan else max(rel(o, ro), lerr / 10), 1e-2)
    for kv_dtype in (torch.bfloat16, torch.int8, torch.float8_e4m3fn):
        q, k, v = r(1, 32, 128), r(200_001, 8, 128), r(200_001, 8, 128)
        ksc = vsc = None
        if kv_dtype != torch.bfloat16:
            k, ksc = K.quantize_kv(k, dtype=kv_dtype)
            v, vsc = K.quantize_kv(v, dtype=kv_dtype)
        o, l = K.decode_attention(q, k, v, k_scale=ksc, v_scale=vsc)
        ro, rl = K.decode_attention_ref(q, k, v, k_scale=ksc, v_scale=vsc, out_dtype=torch.float32)
        check(f"decode {kv_dtype} Tk=200001 H=32/8 (lse abs {(l - rl).abs().max().item():.1e})", rel(o, ro), 1e-2)
    q32 = torch.randn(777, 8, 64, generator=g, device="cuda")
    k32 = torch.randn(2049, 2, 64, generator=g, device="cuda")
    v32 = torch.randn(2049, 2, 64, generator=g, device="cuda")
    ro, rl = K.flash_attention_ref(q32.double(), k32.double(), v32.double(), causal=True, q_start=1500)
    for n in (2, 3, 8):
        b = torch.linspace(0, 2049, n + 1).round().long().tolist()
        parts = [K.flash_attention(q32, k32[x:y], v32[x:y], causal=True, q_start=1500, k_start=x) for x, y in zip(b[:-1], b[1:])]
        for (x, y), (po, pl) in zip(zip(b[:-1], b[1:]), parts):  # each block alone first
            bo, bl = K.flash_attention_ref(q32.double(), k32[x:y].double(), v32[x:y].double(), causal=True, q_start=1500, k_start=x)
            fin = torch.isfinite(bl)
            err = max(rel(po, bo), (pl[fin] - bl[fin]).abs().max().item() if fin.any() else 0.0)
            if err > 1e-5 or not torch.equal(torch.isneginf(pl), torch.isneginf(bl)):
                print(f"    block [{x}, {y}) alone: err {err:.2e}, -inf rows ours {int(torch.isneginf(pl).sum())} ref {int(torch.isneginf(bl).sum())}")
        o, l = parts[0][0].clone(), parts[0][1].clone()
        for i, (po, pl) in enumerate(parts[1:]):
            o_ref, l_ref = K.merge_attention_ref(o.clone(), l.clone(), po, pl)
            K.merge_attention(o, l, po, pl)
            err = rel(o, o_ref)
            if err > 1e-6 or not torch.equal(torch.isneginf(l), torch.isneginf(l_ref)):
                print(f"    merge step {i}: triton vs torch err {err:.2e}, lse diff {(l - l_ref).nan_to_num().abs().max().item():.2e}")
        so, sl = K.merge_attention_stack([p[0] for p in parts], [p[1] for p in parts])
        check(f"split into {n} key blocks + merge_stack == unsplit (fp32)", max(rel(so, ro), (sl - rl).abs().max().item()), 1e-5)
        check(f"split into {n} key blocks + merge == unsplit (fp32)", max(rel(o, ro), (l - rl).abs().max().item()), 1e-5)


# ---------------------------------------------------------------------------------------------------
def _peer_sdpa(q4, k4, v4, causal, which):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[which]

    def f():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=causal)

    return f


PREFILL_SWEEP = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 4), (128, 32, 4, 4)]


def prefill(sizes, D, tune):
    H, Hkv = 32, 8
    g = torch.Generator(device="cuda").manual_seed(1)
    best = {}
    if tune:
        T = 8192
        q = torch.randn(T, H, D, generator=g, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(T, Hkv, D, generator=g, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(T, Hkv, D, generator=g, device="cuda", dtype=torch.bfloat16)
        for causal in (True, False):
            flops = 4 * T * T * H * D / (2 if causal else 1)
            res = []
            for cfg in PREFILL_SWEEP:
                try:
                    ms = timeit(lambda: K.flash_attention(q, k, v, causal=causal, config=cfg), min_ms=50, reps=3)
                except Exception as exc:  # out of shared memory etc.
                    print(f"  config {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                row("prefill-tune", f"D={D} causal={causal} T={T} cfg={cfg}", ms, tflops=flops / ms / 1e9)
                res.append((ms, cfg))
            best[causal] = min(res)[1]
        RESULTS[f"prefill_best_config_D{D}"] = {str(c): v for c, v in best.items()}
    for T in sizes:
        q = torch.randn(T, H, D, generator=g, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(T, Hkv, D, generator=g, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(T, Hkv, D, generator=g, device="cuda", dtype=torch.bfloat16)
        # peers want (1, H, T, D) and equal head counts: expand K/V outside the timed region
        q4 = q.transpose(0, 1).unsqueeze(0)
        k4 = k.repeat_interleave(H // Hkv, dim=1).transpose(0, 1).unsqueeze(0)
        v4 = v.repeat_interleave(H // Hkv, dim=1).transpose(0, 1).unsqueeze(0)
        for causal in (True, False):
            flops = 4 * T * T * H * D / (2 if causal else 1)
            mode = "causal-diagonal" if causal else "full"
            tf = {}
            variants = [
                ("ours triton", lambda: K.flash_attention(q, k, v, causal=causal, config=best.get(causal))),
                ("ours cudnn+LSE (GQA expand)", lambda: K.flash_attention(q, k, v, causal=causal, backend="cudnn")),
                ("SDPA cuDNN", _peer_sdpa(q4, k4, v4, causal, "cudnn")),
                ("SDPA flash", _peer_sdpa(q4, k4, v4, causal, "flash")),
            ]
            for name, fn in variants:
                try:
                    ms = timeit(fn, min_ms=100 if T <= 32768 else 0, reps=3)
                except Exception as exc:
                    print(f"  {name}: {type(exc).__name__}: {str(exc)[:160]}")
                    continue
                tf[name] = flops / ms / 1e9
                row("prefill", f"D={D} {mode} T={T // 1024}K {name}", ms, tflops=tf[name], T=T, D=D, mode=mode)
            if "ours triton" in tf:
                ours = tf["ours triton"]
                vs = ", ".join(f"{ours / tf[p]:.2f}x {p}" for p in ("SDPA cuDNN", "SDPA flash") if p in tf)
                SUMMARY.append((f"prefill D={D} {mode} T={T // 1024}K", f"{ours:.0f} TFLOP/s", vs))
        del q, k, v, q4, k4, v4
        torch.cuda.empty_cache()


DECODE_SWEEP = [(64, 4, 4, 4), (128, 4, 3, 4), (64, 4, 3, 8), (128, 8, 3, 4), (64, 4, 4, 2), (32, 4, 6, 8)]


def decode(sizes, tune):
    H, Hkv, D = 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(2)
    copy = RESULTS["copy_GBs"]
    for Tk in sizes:
        q = torch.randn(1, H, D, generator=g, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(Tk, Hkv, D, generator=g, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(Tk, Hkv, D, generator=g, device="cuda", dtype=torch.bfloat16)
        kv = {"bf16": (k, v, None, None)}
        for name, dt in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
            kq, ks = K.quantize_kv(k, dtype=dt)
            vq, vs = K.quantize_kv(v, dtype=dt)
            kv[name] = (kq, vq, ks, vs)
            # the same scales stored head-major (Hkv, Tk) and passed as the transposed view
            kv[name + " hm-scales"] = (kq, vq, ks.t().contiguous().t(), vs.t().contiguous().t())
        tok_s = {}
        for name, (kk, vv, ks, vs) in kv.items():
            nbytes = sum(x.numel() * x.element_size() for x in (kk, vv, ks, vs) if x is not None) + q.numel() * 2
            cfgs = DECODE_SWEEP if tune else [None]
            best = None
            for cfg in cfgs:
                fn = lambda: K.decode_attention(q, kk, vv, k_scale=ks, v_scale=vs, config=cfg)  # noqa: E731
                ms = timeit(fn, min_ms=30, reps=5)
                if tune:
                    row("decode-tune", f"KV={Tk // 1024}K {name} cfg={cfg}", ms, gbs=nbytes / ms / 1e6)
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            ms, cfg = best
            tok_s[name] = Tk / ms * 1e3
            row("decode", f"KV={Tk // 1024}K {name} ours (cfg {cfg})", ms, gbs=nbytes / ms / 1e6, tokens_per_s=tok_s[name], pct_copy=round(100 * nbytes / ms / 1e6 / copy, 1))
            RESULTS.setdefault("decode_best", {})[f"{Tk}-{name}"] = cfg
        # peer: SDPA flash over the same KV bytes (8 heads, MHA, one query token)
        q4 = q[:, :Hkv].transpose(0, 1).unsqueeze(0)
        k4, v4 = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        nbytes = 2 * k.numel() * 2
        for peer in ("flash", "cudnn"):
            try:
                ms = timeit(_peer_sdpa(q4, k4, v4, False, peer), min_ms=30, reps=5)
                row("decode", f"KV={Tk // 1024}K bf16 SDPA {peer} (same KV bytes)", ms, gbs=nbytes / ms / 1e6, tokens_per_s=Tk / ms * 1e3)
            except Exception as exc:
                print(f"  SDPA {peer}: {type(exc).__name__}: {str(exc)[:160]}")
        bf16_bytes = 2 * k.numel() * 2
        bf16_gbs = bf16_bytes / Tk * tok_s["bf16"] / 1e9
        SUMMARY.append((f"decode KV={Tk // 1024}K bf16", f"{bf16_gbs:.0f} GB/s", f"{100 * bf16_gbs / copy:.0f}% of copy"))
        for name in ("int8", "fp8", "int8 hm-scales", "fp8 hm-scales"):
            SUMMARY.append((f"decode KV={Tk // 1024}K {name}", f"{tok_s[name] / 1e6:.0f} M tok/s", f"{tok_s[name] / tok_s['bf16']:.2f}x bf16 tokens/s"))
        del kv, k, v, q4, k4, v4
        torch.cuda.empty_cache()


def merge_and_quant(T):
    H, D = 32, 128
    g = torch.Generator(device="cuda").manual_seed(3)
    copy = RESULTS["copy_GBs"]
    oa = torch.randn(T, H, D, generator=g, device="cuda")
    ob = torch.randn(T, H, D, generator=g, device="cuda")
    la = torch.randn(T, H, generator=g, device="cuda")
    lb = torch.randn(T, H, generator=g, device="cuda")
    nbytes = 3 * oa.numel() * 4 + 3 * la.numel() * 4  # read a, b; write a (in place)
    ms = timeit(lambda: K.merge_attention(oa, la, ob, lb))
    gbs = nbytes / ms / 1e6
    row("merge", f"pair in place T={T} H={H} D={D} fp32 triton", ms, gbs=gbs, pct_copy=round(100 * gbs / copy, 1))
    SUMMARY.append(("merge pair fp32", f"{gbs:.0f} GB/s", f"{100 * gbs / copy:.0f}% of copy"))
    ms_ref = timeit(lambda: K.merge_attention_ref(oa, la, ob, lb))
    row("merge", "pair in place torch twin (eager)", ms_ref, gbs=nbytes / ms_ref / 1e6)
    S = 8
    outs = torch.randn(S, T // 4, H, D, generator=g, device="cuda")
    lses = torch.randn(S, T // 4, H, generator=g, device="cuda")
    nbytes = outs.numel() * 4 * (S + 1) // S + lses.numel() * 4
    ms = timeit(lambda: K.merge_attention_stack(outs, lses))
    row("merge", f"stack S={S} T={T // 4} fp32 triton", ms, gbs=nbytes / ms / 1e6, pct_copy=round(100 * nbytes / ms / 1e6 / copy, 1))
    ms = timeit(lambda: K.merge_attention_stack_ref(outs, lses))
    row("merge", f"stack S={S} torch twin (eager)", ms, gbs=nbytes / ms / 1e6)
    del oa, ob, outs
    x = torch.randn(1 << 20, 8, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    nbytes = x.numel() * (2 + 1) + x.numel() // 128 * 4
    ms = timeit(lambda: K.quantize_kv(x))
    row("quant", "quantize 1M tok x 8 heads x 128 bf16 -> int8", ms, gbs=nbytes / ms / 1e6, pct_copy=round(100 * nbytes / ms / 1e6 / copy, 1))
    SUMMARY.append(("quantize bf16->int8", f"{nbytes / ms / 1e6:.0f} GB/s", f"{100 * nbytes / ms / 1e6 / copy:.0f}% of copy"))
    ms = timeit(lambda: K.quantize_kv_ref(x))
    row("quant", "quantize torch twin (eager)", ms, gbs=nbytes / ms / 1e6)
    q, s = K.quantize_kv(x)
    ms = timeit(lambda: K.dequantize_kv(q, s))
    row("quant", "dequantize int8 -> bf16", ms, gbs=nbytes / ms / 1e6, pct_copy=round(100 * nbytes / ms / 1e6 / copy, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, no tuning sweep")
    ap.add_argument("--no-tune", action="store_true", help="skip the tile-config sweeps")
    ap.add_argument("--d64", action="store_true", help="also run prefill at D=64")
    ap.add_argument("--json", default=None, help="write all numbers to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET (the benchmark times compiled kernels)")
    tune = not (args.quick or args.no_tune)
    env = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    RESULTS["env"] = env
    print(json.dumps(env))
    section("ceilings", ceilings)
    section("correctness (GPU, fresh random inputs)", correctness)
    section("prefill attention D=128", prefill, [8192] if args.quick else [8192, 32768, 131072], 128, tune)
    if args.d64:
        section("prefill attention D=64", prefill, [8192, 32768], 64, False)
    section("decode attention", decode, [131072] if args.quick else [131072, 1 << 20], tune)
    section("merge + quant", merge_and_quant, 8192 if args.quick else 32768)

    print("\n== summary (H = 32 query / 8 KV heads, D = 128, bf16; ratios from this run)")
    print(f"  {'what':<34} {'ours':>16}   vs")
    for what, ours, vs in SUMMARY:
        print(f"  {what:<34} {ours:>16}   {vs}")
    fails = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
    print(f"  correctness: {len(RESULTS['checks']) - len(fails)}/{len(RESULTS['checks'])} checks pass" + (f"; FAILED: {fails}" if fails else ""))
    RESULTS["summary"] = SUMMARY
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(RESULTS, indent=1, default=str))
    sys.exit(1 if fails or RESULTS.get("errors") else 0)


if __name__ == "__main__":
    main()
