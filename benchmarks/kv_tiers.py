"""KV tier moves: host<->Redis GB/s of a 1 GiB session through KVStore, side by side with raw Redis.

    .venv/bin/python benchmarks/kv_tiers.py [--gib 1] [--repeats 3] [--redis-url URL] [--out FILE.md]

Starts its own redis-server (no persistence) on a free loopback port unless --redis-url is given.
Raw figures move the same value sizes (`chunk_bytes`) with redis-py (pipelined SET of memoryviews,
pipelined GET) and with `redis-benchmark` (C client, one connection, no pipelining). Ratios are taken
within one run. On a CUDA machine it also times device<->host through the store against a pinned
`copy_` of the same bytes (the ceiling); without CUDA those rows say "pending".
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import redis
import torch

from ringserve.workers.kvstore import KVStore, PageGeometry, TierCapacity

L, HKV, D = 24, 8, 128  # a Llama-3-8B-like KV shape: 96 KiB per token in bf16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis() -> tuple[subprocess.Popen, str, str]:
    d = tempfile.mkdtemp(prefix="kvbench-redis-")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", d, "--logfile", os.path.join(d, "log")])
    for _ in range(200):
        try:
            redis.Redis(port=port).ping()
            return proc, f"redis://127.0.0.1:{port}/0", d
        except redis.ConnectionError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


GEOMETRY = PageGeometry(L, HKV, D, 256, torch.bfloat16)


def session(gib: float) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (L, T, Hkv, D) of a session of `gib` GiB, T a whole number of pages."""
    T = int(gib * (1 << 30) // GEOMETRY.page_bytes) * GEOMETRY.block
    g = torch.Generator().manual_seed(0)
    k = torch.randn(L, T, HKV, D, generator=g, dtype=torch.float32).bfloat16()
    v = torch.randn(L, T, HKV, D, generator=g, dtype=torch.float32).bfloat16()
    return k, v


def nbytes(shard) -> int:
    return 2 * shard[0].numel() * shard[0].element_size()


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def raw_redis_py(url: str, value_bytes: int, total: int) -> tuple[float, float]:
    """redis-py SET (pipelined memoryviews) and GET (pipelined) of total bytes in value_bytes values."""
    r = redis.Redis.from_url(url, socket_read_size=1 << 20)
    buf = memoryview(os.urandom(value_bytes))
    n = max(1, total // value_bytes)
    per_batch = max(1, (64 << 20) // value_bytes)
    t0 = time.perf_counter()
    for b in range(0, n, per_batch):
        p = r.pipeline(transaction=False)
        for i in range(b, min(n, b + per_batch)):
            p.set(f"raw:{i}", buf)
        p.execute()
    t_set = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in range(0, n, per_batch):
        p = r.pipeline(transaction=False)
        for i in range(b, min(n, b + per_batch)):
            p.get(f"raw:{i}")
        p.execute()
    t_get = time.perf_counter() - t0
    r.delete(*[f"raw:{i}" for i in range(n)])
    return gbps(n * value_bytes, t_set), gbps(n * value_bytes, t_get)


def raw_redis_benchmark(url: str, value_bytes: int, n: int) -> tuple[float, float] | None:
    """redis-benchmark SET/GET of value_bytes values (GB/s = requests/s x value size)."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return None
    port = url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run([exe, "-p", port, "-q", "-t", "set,get", "-n", str(n), "-d", str(value_bytes), "-c", "1"],
                         capture_output=True, text=True, timeout=600).stdout
    rps = {m.group(1): float(m.group(2)) for m in re.finditer(r"(SET|GET): ([\d.]+) requests per second", out)}
    return gbps(int(rps["SET"] * value_bytes), 1.0), gbps(int(rps["GET"] * value_bytes), 1.0)


def store_round(url: str, shard, *, quantized: bool, chunk_bytes: int) -> tuple[float, float]:
    """Host -> Redis (demote) and Redis -> host (restore on a fresh store) of one session; GB/s of KV bytes."""
    cap = TierCapacity(device=2 * nbytes(shard), host=nbytes(shard) + (64 << 20))
    a = KVStore("bench-r0", "benchfp", GEOMETRY, cap, redis_url=url, chunk_bytes=chunk_bytes)
    a.put("big", *shard, quantized=quantized)
    a.demote("big", "host")
    t0 = time.perf_counter()
    assert a.demote("big", "redis").tier == "redis"
    t_store = time.perf_counter() - t0
    a.close()
    b = KVStore("bench-r0", "benchfp", GEOMETRY, cap, redis_url=url, chunk_bytes=chunk_bytes)
    t0 = time.perf_counter()
    assert b.restore("big", to="host").tier == "host"
    t_restore = time.perf_counter() - t0
    b.delete("big")
    b.close()
    return gbps(nbytes(shard), t_store), gbps(nbytes(shard), t_restore)


def gpu_rows(shard) -> list[tuple[str, str, str]]:
    if not torch.cuda.is_available():
        return [("device -> host (store vs pinned copy_)", "pending", "no GPU on this machine"),
                ("host -> device (store vs pinned copy_)", "pending", "no GPU on this machine")]
    dev = torch.device("cuda")
    pinned = torch.empty(shard[0].numel() * 2, dtype=torch.bfloat16, pin_memory=True)
    src = torch.cat([shard[0].flatten(), shard[1].flatten()]).to(dev)
    torch.cuda.synchronize()
    t0 = time.perf_counter(); pinned.copy_(src, non_blocking=True); torch.cuda.synchronize()
    d2h = gbps(src.nbytes, time.perf_counter() - t0)
    t0 = time.perf_counter(); src.copy_(pinned, non_blocking=True); torch.cuda.synchronize()
    h2d = gbps(src.nbytes, time.perf_counter() - t0)
    cap = TierCapacity(device=2 * nbytes(shard), host=nbytes(shard) + (64 << 20))
    st = KVStore("bench-gpu", "benchfp", GEOMETRY, cap, device=dev)
    st.put("g", shard[0].to(dev), shard[1].to(dev))
    torch.cuda.synchronize()
    t0 = time.perf_counter(); st.demote("g", "host"); s_d2h = gbps(nbytes(shard), time.perf_counter() - t0)
    t0 = time.perf_counter()
    with st.lease("g"):  # promotion: pages copied into free device pages
        torch.cuda.synchronize()
    s_h2d = gbps(nbytes(shard), time.perf_counter() - t0)
    st.close()
    return [("device -> host: store / pinned copy_", f"{s_d2h:.1f} / {d2h:.1f}", f"{s_d2h / d2h:.0%}"),
            ("host -> device: store / pinned copy_", f"{s_h2d:.1f} / {h2d:.1f}", f"{s_h2d / h2d:.0%}")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="session size in GiB (K + V)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-mib", type=int, default=16)
    ap.add_argument("--redis-url")
    ap.add_argument("--out", help="also write the results table (markdown) to this file")
    args = ap.parse_args()
    proc = tmp = None
    url = args.redis_url
    if url is None:
        proc, url, tmp = start_redis()
    try:
        chunk = args.chunk_mib << 20
        shard = session(args.gib)
        runs = {"raw redis-py": [], "store": [], "store int8": []}
        for _ in range(args.repeats):
            runs["raw redis-py"].append(raw_redis_py(url, chunk, nbytes(shard)))
            runs["store"].append(store_round(url, shard, quantized=False, chunk_bytes=chunk))
            runs["store int8"].append(store_round(url, shard, quantized=True, chunk_bytes=chunk))
        med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in runs.items()}
        rb = raw_redis_benchmark(url, chunk, 64)
        gpu = gpu_rows(shard)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
            shutil.rmtree(tmp, ignore_errors=True)
    raw_s, raw_g = med["raw redis-py"]
    st_s, st_g = med["store"]
    q_s, q_g = med["store int8"]
    lines = [
        f"KV tiers, {args.gib:g} GiB session (L={L}, Hkv={HKV}, D={D}, bf16, {shard[0].shape[1]} tokens), "
        f"{args.chunk_mib} MiB values, median of {args.repeats}; {datetime.date.today()}, {platform.node()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
        f"redis-py {redis.__version__}, {subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]}",
        "",
        "| move | ringserve KVStore GB/s | raw redis-py GB/s | store / raw | redis-benchmark GB/s |",
        "|---|---|---|---|---|",
        f"| host -> Redis (store) | {st_s:.2f} | {raw_s:.2f} (SET) | {st_s / raw_s:.0%} | {rb[0]:.2f} (SET) |" if rb else "",
        f"| Redis -> host (restore) | {st_g:.2f} | {raw_g:.2f} (GET) | {st_g / raw_g:.0%} | {rb[1]:.2f} (GET) |" if rb else "",
        f"| host -> Redis, int8 (KV bytes / s) | {q_s:.2f} | | | |",
        f"| Redis -> host, int8 (KV bytes / s) | {q_g:.2f} | | | |",
        "",
        "| GPU move | GB/s | ratio |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in gpu],
    ]
    text = "\n".join(x for x in lines if x is not None)
    print(text)
    print("all runs:", {k: [(round(a, 2), round(b, 2)) for a, b in v] for k, v in runs.items()}, file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
