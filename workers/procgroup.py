"""Run a function on every rank of a process group made of local processes (no Ray).

The engine has no Ray inside, so tests and benchmarks drive P engines as P spawned processes joined
by gloo: `run_group(P, fn, *args)` calls fn(rank, world, *args) on each rank and returns the
results by rank. Results travel as plain pickles (torch's shared-memory tensors would vanish with
the process that made them).
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, backend, threads, fn, args, q):
    import torch
    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        q.put((rank, pickle.dumps(fn(rank, world, *args))))
    except BaseException as e:  # report instead of leaving the parent waiting
        q.put((rank, pickle.dumps(RuntimeError(f"rank {rank}: {e}\n{traceback.format_exc()}"))))
    finally:
        dist.destroy_process_group()


def run_group(world: int, fn, *args, backend: str = "gloo", threads: int = 1, timeout: float = 600.0):
    """fn(rank, world, *args) on `world` spawned processes; returns results by rank or raises the
    first rank's error. `fn` must be importable (a module-level function)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, backend, threads, fn, args, q))
             for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, res = q.get(timeout=timeout)
            res = pickle.loads(res)
            if isinstance(res, BaseException):
                raise res
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
