"""The served path is the benchmarked path: creating a long session through the service against the
engine alone, and the device bytes copied per token created.

    .venv/bin/python benchmarks/serve_path.py [--lengths 16384,65536] [--sp 2] [--chunk 8192] [--no-grpc]

Model: a random Llama-shaped checkpoint written for the run (4 layers, hidden 256, 4 query / 2 KV heads
of 64, 64K positions; fp32 on the CPU) — the default model holds only 8K tokens, and this one keeps
a 64K-token prefill within minutes on 2 cores. Three ways to create the same session, one after the
other in one run:

  * engine   `ShardEngine.prefill` on SP ranks joined by gloo (spawned processes, 1 thread each): what
             BENCHMARKS.md's ring figures measure;
  * group    `WorkerGroup.prefill` on a local Ray (the Serve deployment's data path: rank actors, their
             paged KV stores, progress streamed from rank 0);
  * gRPC     `Client.create_session(tokens=...)` through `ringserve serve`'s stack (SDK -> gRPC -> Serve
             proxy -> Gateway -> group deployment), with Redis for the registry and billing.

Device bytes copied per created token come from the ranks' own KV-store counters (bytes written into
pages, and retained KV copied: promotions, restores, reads), summed over the ranks, divided by the
tokens, against the bytes of one token's KV. (The ring sends each chunk's K and V from where the
projections put them: no staging copy to count.) Times are the median of --repeats creates.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_model(path: Path) -> None:
    from helpers import make_tiny_llama  # the tests' writer of random HF checkpoints

    make_tiny_llama(path, n_heads=4, n_kv_heads=2, head_dim=64, layers=4, max_positions=65536 + 1024)


def token_ids(n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def engine_rank(rank, world, path, n, chunk, repeats):
    import torch.distributed as dist

    from ringserve.workers.engine import ShardEngine
    from ringserve.workers.loader import load_model

    loaded = load_model(path)
    eng = ShardEngine(loaded, dist.group.WORLD if world > 1 else None, prefill_chunk=chunk)
    ids = token_ids(n, loaded.config.vocab_size)
    eng.prefill("warm", ids[:512])
    eng.drop("warm")
    times = []
    for i in range(repeats):
        c0 = eng.store.counters()
        t0 = time.perf_counter()
        eng.prefill(f"s{i}", ids)
        times.append(time.perf_counter() - t0)
        c1 = eng.store.counters()
        eng.drop(f"s{i}")
    return {"s": times, "written": c1.bytes_written - c0.bytes_written, "copied": c1.bytes_copied - c0.bytes_copied,
            "token_bytes": eng.geometry.token_bytes}


def copied(stats_before, stats_after) -> tuple[int, int]:
    w = sum(b.counters.bytes_written - a.counters.bytes_written for a, b in zip(stats_before, stats_after))
    c = sum(b.counters.bytes_copied - a.counters.bytes_copied for a, b in zip(stats_before, stats_after))
    return w, c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384,65536")
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-grpc", action="store_true")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="serve-path-"))
    path = tmp / "model"
    make_model(path)

    from ringserve.workers.loader import load_model
    from ringserve.workers.procgroup import run_group

    loaded = load_model(path)
    vocab, token_bytes = loaded.config.vocab_size, None
    rows: dict[int, dict] = {n: {} for n in lengths}
    for n in lengths:  # the engine alone
        res = run_group(args.sp, engine_rank, str(path), n, args.chunk, args.repeats, threads=1, timeout=7200)
        token_bytes = res[0]["token_bytes"]
        times = [max(r["s"][i] for r in res) for i in range(args.repeats)]
        rows[n]["engine"] = (statistics.median(times), sum(r["written"] for r in res), sum(r["copied"] for r in res))
        print(f"engine {n}: {times} s", flush=True)

    import ray

    from ringserve.workers.group import GroupConfig, WorkerGroup

    per_rank = max(lengths) // args.sp + 4096
    kv_bytes = 2 * per_rank * token_bytes
    gcfg = dict(sp=args.sp, model=str(path), num_cpus_per_rank=1.0, prefill_chunk=args.chunk,
                kv_device_bytes=kv_bytes, kv_host_bytes=0, call_timeout_s=7200, collective_timeout_s=3600)
    ray.init(num_cpus=args.sp, include_dashboard=False, log_to_driver=False)
    group = WorkerGroup(GroupConfig(**gcfg))
    try:
        group.prefill("warm", token_ids(512, vocab))
        group.drop("warm")
        for n in lengths:
            times = []
            for i in range(args.repeats):
                before = group.stats()
                t0 = time.perf_counter()
                group.prefill(f"s{n}", token_ids(n, vocab))
                times.append(time.perf_counter() - t0)
                rows[n]["group"] = (statistics.median(times), *copied(before, group.stats()))
                group.drop(f"s{n}")
            print(f"group {n}: {times} s", flush=True)
    finally:
        group.shutdown()

    if not args.no_grpc:
        from ray import serve

        from ringserve.client import Client
        from ringserve.cluster.config import ApiKey, ServeConfig
        from ringserve.cluster.serve_app import LocalRedis, free_port, start

        redis = LocalRedis()
        port = free_port()
        cfg = ServeConfig.from_dict({
            "grpc_port": port, "http_port": free_port(), "redis_url": redis.url, "model": str(path), "groups": 1,
            "group": {**gcfg, "redis_url": redis.url},
            "limits": {"max_sessions": 10, "max_tokens": 10 * max(lengths)},
            "api_keys": [vars(ApiKey.from_plain("bench-key", "bench", admin=True))],
        })
        start(cfg)
        try:
            with Client(f"localhost:{port}", api_key="bench-key", timeout=7200) as client:
                client.create_session(tokens=token_ids(512, vocab)).delete()  # warm
                for n in lengths:
                    times = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        s = client.create_session(tokens=token_ids(n, vocab), ttl="1h")
                        times.append(time.perf_counter() - t0)
                        assert s.size_tokens == n
                        s.delete()
                    rows[n]["grpc"] = (statistics.median(times),)
                    print(f"grpc {n}: {times} s", flush=True)
        finally:
            serve.shutdown()
            redis.stop()
    ray.shutdown()

    cfg = loaded.config
    print()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs; Python {platform.python_version()}, torch "
          f"{torch.__version__}; {time.strftime('%Y-%m-%d')}; random Llama shape L={cfg.n_layers} E={cfg.dim} "
          f"H={cfg.n_heads} Hkv={cfg.n_kv_heads} D={cfg.head_dim} fp32, SP={args.sp} (1 thread per rank), "
          f"prefill chunk {args.chunk}; one token's KV = {token_bytes} bytes")
    print("| tokens | engine s | group s | group / engine | gRPC s | gRPC / engine | device bytes per token created "
          "(group: written into pages + copied) | / one token's KV |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for n in lengths:
        e, g = rows[n]["engine"], rows[n]["group"]
        gr = rows[n].get("grpc")
        w, c = g[1], g[2]
        per = (w + c) / n
        grpc = f"{gr[0]:.2f} | {gr[0] / e[0]:.2f}x" if gr else "- | -"
        print(f"| {n} | {e[0]:.2f} | {g[0]:.2f} | {g[0] / e[0]:.2f}x | {grpc} | {w / n:.0f} + {c / n:.0f} = "
              f"{per:.0f} | {per / token_bytes:.2f}x |")


if __name__ == "__main__":
    main()
