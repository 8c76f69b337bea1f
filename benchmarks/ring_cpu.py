"""Ring prefill on the CPU: SP = 2 (two gloo processes) vs SP = 1, and how much of a ring step is
spent waiting on communication, with the transfer overlapped (posted before the step's attention)
and not overlapped.

    .venv/bin/python benchmarks/ring_cpu.py [--tokens 8000] [--chunk 8192]

Default model (SmolLM2-135M-Instruct, fp32). SP = 1 runs the same ShardEngine without a group, once
with one thread (the per-rank budget of the SP = 2 run) and once with two (the whole machine).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def _prompt(tok, n):
    text = ("The archive holds letters, ledgers and maps of the old harbour, its ships and the merchants "
            "who traded there, and the storms that closed it for weeks at a time. ")
    ids = []
    while len(ids) < n:
        ids += tok.encode(text)
    return ids[:n]


def rank_fn(rank, world, n, chunk, overlap):
    import torch.distributed as dist

    from ringserve.workers.engine import ShardEngine
    from ringserve.workers.loader import load_model

    loaded = load_model("default")
    ids = _prompt(loaded.tokenizer, n)
    group = dist.group.WORLD if world > 1 else None
    eng = ShardEngine(loaded, group, prefill_chunk=chunk, overlap=overlap)
    eng.prefill("warm", ids[:256])
    eng.drop("warm")
    if eng.comm:
        eng.comm.wait_s = 0.0
    t0 = time.perf_counter()
    eng.prefill("s", ids)
    total = time.perf_counter() - t0
    return {"total_s": total, "wait_s": eng.comm.wait_s if eng.comm else 0.0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--chunk", type=int, default=8192)
    args = ap.parse_args()
    from ringserve.workers.procgroup import run_group

    rows = []
    for label, world, threads, overlap in [("SP=1, 1 thread", 1, 1, True), ("SP=1, 2 threads", 1, 2, True),
                                           ("SP=2, overlap on", 2, 1, True), ("SP=2, overlap off", 2, 1, False)]:
        res = run_group(world, rank_fn, args.tokens, args.chunk, overlap, threads=threads, timeout=3600)
        total = max(r["total_s"] for r in res)
        wait = max(r["wait_s"] / r["total_s"] for r in res)
        rows.append((label, total, wait))
        print(f"{label}: {total:.2f} s, {args.tokens / total:.0f} tok/s, comm wait {100 * wait:.1f}% of prefill",
              flush=True)
    base = rows[1][1]
    print()
    print(f"machine: {platform.machine()}, 2 cores; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
          f"default model fp32, {args.tokens} tokens, chunk {args.chunk}")
    print("| run | prefill s | tok/s | vs SP=1 (2 threads) | comm wait share |")
    print("|---|---:|---:|---:|---:|")
    for label, total, wait in rows:
        print(f"| {label} | {total:.2f} | {args.tokens / total:.0f} | {base / total:.2f}x | {100 * wait:.1f}% |")


if __name__ == "__main__":
    main()
