"""Serving on this CPU, through the served path (SDK -> gRPC -> Serve proxy -> Gateway -> group), one group
of SP = 2 ranks (gloo) on a local Ray with 2 CPUs, default model, greedy.

    .venv/bin/python benchmarks/serve_cpu.py [--sections overhead,batching,interference] [--repeats 3]

overhead      one Generate at a time: TTFT and decode tokens/s through gRPC vs driving the same WorkerGroup
              directly (what the Serve deployment adds).
batching      aggregate decode tokens/s of 1, 4 and 16 sessions answering at once (one group: the
              scheduler decodes them in one batch per step) vs the same requests one at a time, in the
              same run. Each session is distinct (a session serves one request at a time).
interference  TTFT of 16 short Generates on 16 sessions, arriving 0.25 s apart while a 6K-token create runs
              on the same group; p50 / p99 against one prefill chunk's time (the create's own chunk
              times, measured from its progress events) plus one decode step (measured alone).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

WORDS = ("the archive holds letters ledgers and maps of the old harbour its ships and the merchants who traded "
         "there and the storms that closed it for weeks at a time").split()
QUESTION = "Which places does the archive describe? Answer in two sentences."


def doc(n_words: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def pctl(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def timed_generate(session, max_tokens):
    """(ttft s, decode tok/s after the first token, tokens) of one streamed Generate."""
    t0 = time.perf_counter()
    g = session.generate(QUESTION, max_tokens=max_tokens)
    first, n = None, 0
    for _ in g:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    n = g.usage.generated_tokens
    return first - t0, (n - 1) / (end - first) if n > 1 and end > first else 0.0, n


def overhead_direct(args, gcfg, tok):
    """The WorkerGroup driven directly (before Serve takes the CPUs): [(ttft, tok/s, n)]."""
    from ringserve.workers.group import GroupConfig, WorkerGroup
    from ringserve.workers.protocol import SamplingParams

    ids = tok.encode_chat([{"role": "user", "content": doc(args.doc_tokens)}])[: args.doc_tokens]
    q_ids = tok.encode_turn([{"role": "user", "content": QUESTION}], add_generation_prompt=True)

    def one(group):
        t0 = time.perf_counter()
        first, n = None, 0
        for _ in group.generate("s", q_ids, SamplingParams(max_tokens=args.max_tokens)):
            n += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        return first - t0, (n - 1) / (end - first), n

    group = WorkerGroup(GroupConfig(**gcfg))
    try:
        group.prefill("s", ids)
        return ids, [one(group) for _ in range(args.repeats + 1)][1:]
    finally:
        group.shutdown()


def overhead_served(args, client, ids, direct):
    s = client.create_session(tokens=ids, ttl="1h")
    served = [timed_generate(s, args.max_tokens) for _ in range(args.repeats + 1)][1:]
    s.delete()
    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    d_ttft, d_tps, s_ttft, s_tps = med(direct, 0), med(direct, 1), med(served, 0), med(served, 1)
    print(f"\n### overhead: context {len(ids)} tokens, {args.max_tokens} tokens, median of {args.repeats}")
    print("| path | TTFT ms | decode tok/s |")
    print("|---|---:|---:|")
    print(f"| WorkerGroup directly | {1000 * d_ttft:.0f} | {d_tps:.1f} |")
    print(f"| SDK -> gRPC -> Serve -> group | {1000 * s_ttft:.0f} | {s_tps:.1f} |")
    print(f"| difference | +{1000 * (s_ttft - d_ttft):.0f} ms | {100 * (1 - s_tps / d_tps):.1f}% fewer |")


def concurrently(fns):
    out, errs = [None] * len(fns), []

    def run(i):
        try:
            out[i] = fns[i]()
        except Exception as e:  # counted, reported
            errs.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0, errs


def batching(args, address, key):
    """Two figures per concurrency: end to end (all tokens / wall, prompts included) and decode only
    (tokens after each request's first / the time spent decoding: from the first request's first token
    to the last request's last when together, the sum of each request's decode time when one at a time)."""
    from ringserve.client import Client

    print(f"\n### batching: {args.batch_tokens} tokens per request, sessions of ~{args.session_words} words")
    print("| concurrent sessions | end to end: one at a time tok/s | all at once tok/s | ratio | decode only: one "
          "at a time tok/s | all at once tok/s | ratio | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with Client(address, api_key=key, timeout=1200) as c:
        sessions = [c.create_session(doc(args.session_words, seed=i), ttl="1h") for i in range(16)]
    for n in (1, 4, 16):
        def one(i):
            with Client(address, api_key=key, timeout=1200) as c:
                g = c.get_session(sessions[i].name).generate(QUESTION, max_tokens=args.batch_tokens)
                first = None
                for _ in g:
                    if first is None:
                        first = time.perf_counter()
                return g.usage.generated_tokens, first, time.perf_counter()
        t0 = time.perf_counter()
        seq = [one(i) for i in range(n)]
        t_seq = time.perf_counter() - t0
        par, t_par, errs = concurrently([lambda i=i: one(i) for i in range(n)])
        par = [p for p in par if p]
        e2e_seq, e2e_par = sum(x[0] for x in seq) / t_seq, sum(x[0] for x in par) / t_par
        dec_seq = sum(x[0] - 1 for x in seq) / sum(x[2] - x[1] for x in seq)
        dec_par = sum(x[0] - 1 for x in par) / (max(x[2] for x in par) - min(x[1] for x in par))
        print(f"| {n} | {e2e_seq:.1f} | {e2e_par:.1f} | {e2e_par / e2e_seq:.2f}x | {dec_seq:.1f} | {dec_par:.1f} | "
              f"{dec_par / dec_seq:.2f}x | {len(errs)} |", flush=True)
    with Client(address, api_key=key) as c:
        for s in sessions:
            c.get_session(s.name).delete()


def _engine_batch_rank(rank, world, n_sessions, n_words, batch_tokens, chunk):
    """On every rank of a gloo group (no Ray, no Serve): the same sessions and questions through the
    engine's own scheduler core and executor; decode-only tok/s of n at once and of one at a time."""
    import torch.distributed as dist

    from ringserve.workers.engine import ShardEngine
    from ringserve.workers.executor import StepExecutor
    from ringserve.workers.loader import load_model
    from ringserve.workers.protocol import SamplingParams
    from ringserve.workers.scheduler import SchedulerConfig, SchedulerCore

    lm = load_model("default")
    tok = lm.tokenizer
    eng = ShardEngine(lm, dist.group.WORLD, prefill_chunk=chunk, kv_device_bytes=1 << 30)
    q = tok.encode_turn([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    for i in range(n_sessions):
        eng.prefill(f"s{i}", tok.encode_chat([{"role": "user", "content": doc(n_words, seed=i)}]))
    core, ex = SchedulerCore(SchedulerConfig(chunk)), StepExecutor(eng)

    def run(ids):
        hs = [core.submit("generate", f"s{i}", q, sampling=SamplingParams(max_tokens=batch_tokens), stop_ids=())
              for i in ids]
        t = n = 0
        while not all(h.done for h in hs):
            plan = core.plan()
            t0 = time.perf_counter()
            core.apply(plan, [ex.step(plan)])
            if plan.decode and not plan.prefill:
                t, n = t + time.perf_counter() - t0, n + len(plan.decode)
        return n, t

    seq = [run([i]) for i in range(n_sessions)]
    par = run(list(range(n_sessions)))
    return sum(x[0] for x in seq) / sum(x[1] for x in seq), par[0] / par[1]


def batching_engine(args):
    from ringserve.workers.procgroup import run_group

    print("\n### batching, the engine alone (2 gloo processes, 1 thread each, no Ray or Serve), decode steps only")
    print("| concurrent sessions | one at a time tok/s | all at once tok/s | ratio |")
    print("|---:|---:|---:|---:|")
    for n in (1, 4, 16):
        one, alls = run_group(2, _engine_batch_rank, n, args.session_words, args.batch_tokens, args.chunk,
                              threads=1, timeout=3600)[0]
        print(f"| {n} | {one:.1f} | {alls:.1f} | {alls / one:.2f}x |", flush=True)


def interference(args, address, key, chunk):
    from ringserve.client import Client

    with Client(address, api_key=key, timeout=1200) as c:
        sessions = [c.create_session(doc(120, seed=100 + i), ttl="1h") for i in range(16)]
        step = [timed_generate(sessions[0], 6)[1] for _ in range(2)][-1]  # decode tok/s alone
        t_step = 1 / step
        alone = []  # the same create with nothing else running: its chunk time
        c.create_session(doc(args.create_words, seed=7), ttl="1h",
                         progress=lambda d, t: alone.append(time.perf_counter())).delete()
        chunk_alone = statistics.median(b - a for a, b in zip(alone, alone[1:]))
    progress = []
    created = {}

    def create():
        with Client(address, api_key=key, timeout=1200) as c:
            created["s"] = c.create_session(doc(args.create_words, seed=7), ttl="1h",
                                            progress=lambda d, t: progress.append((time.perf_counter(), d)))
        created["end"] = time.perf_counter()

    th = threading.Thread(target=create)
    th.start()
    while not progress:
        time.sleep(0.05)

    def ask(i):
        time.sleep(0.25 * i)
        with Client(address, api_key=key, timeout=1200) as c:
            ttft, _, _ = timed_generate(c.get_session(sessions[i].name), 4)
            return ttft, time.perf_counter()

    res, _, errs = concurrently([lambda i=i: ask(i) for i in range(16)])
    th.join()
    ttfts = [r[0] for r in res if r]
    during = sum(1 for r in res if r and r[1] - r[0] < created["end"])
    chunk_s = statistics.median(b[0] - a[0] for a, b in zip(progress, progress[1:])) if len(progress) > 1 else float("nan")
    bound = chunk_alone + t_step
    p50, p99 = pctl(ttfts, 0.5), pctl(ttfts, 0.99)
    print(f"\n### interference: 16 short Generates (0.25 s apart) during a {created['s'].size_tokens}-token create "
          f"(prefill chunk {chunk} tokens); {during} of 16 got their first token before the create finished; "
          f"{len(errs)} errors")
    print("| TTFT p50 s | TTFT p99 s | one chunk s (alone) | one chunk s (during the Generates) | one decode step s "
          "(alone) | p99 / (chunk alone + step) |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {p50:.2f} | {p99:.2f} | {chunk_alone:.2f} | {chunk_s:.2f} | {t_step:.3f} | {p99 / bound:.2f} |")
    with Client(address, api_key=key) as c:
        for s in sessions + [created["s"]]:
            c.get_session(s.name).delete()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="overhead,batching,interference")
    ap.add_argument("--doc-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-tokens", type=int, default=32)
    ap.add_argument("--session-words", type=int, default=200)
    ap.add_argument("--create-words", type=int, default=6000)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--cpus-per-rank", type=float, default=1.0)
    args = ap.parse_args()
    sections = args.sections.split(",")
    import platform

    import ray
    import torch
    from ray import serve

    from ringserve.client import Client
    from ringserve.cluster.config import ApiKey, ServeConfig
    from ringserve.cluster.serve_app import LocalRedis, free_port, start
    from ringserve.workers.loader import load_tokenizer

    tok = load_tokenizer("default")
    gcfg = dict(sp=2, num_cpus_per_rank=args.cpus_per_rank, prefill_chunk=args.chunk, kv_device_bytes=1 << 30)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    redis = LocalRedis()
    port, key = free_port(), "bench-key"
    cfg = ServeConfig.from_dict({"grpc_port": port, "http_port": free_port(), "redis_url": redis.url, "groups": 1,
                                 "group": gcfg, "api_keys": [vars(ApiKey.from_plain(key, "bench"))],
                                 "limits": {"max_sessions": 64}})
    print(f"{platform.node()}, 2 CPUs, torch {torch.__version__}, ray {ray.__version__}; {time.strftime('%Y-%m-%d')}; "
          f"default model fp32, SP = 2 ({args.cpus_per_rank} CPU per rank), prefill chunk {args.chunk}")
    try:
        if "overhead" in sections:
            ids, direct = overhead_direct(args, gcfg, tok)
        if "batching" in sections:
            batching_engine(args)
        start(cfg)
        address = f"localhost:{port}"
        if "overhead" in sections:
            with Client(address, api_key=key, timeout=600) as client:
                overhead_served(args, client, ids, direct)
        if "batching" in sections:
            batching(args, address, key)
        if "interference" in sections:
            interference(args, address, key, args.chunk)
    finally:
        serve.shutdown()
        ray.shutdown()
        redis.stop()


if __name__ == "__main__":
    main()
