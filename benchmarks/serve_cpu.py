"""Serving overhead on this CPU: SDK -> gRPC -> Serve (Gateway) -> group, against driving the same
WorkerGroup directly, in the same run; then 16 concurrent clients on 4 sessions.

    .venv/bin/python benchmarks/serve_cpu.py [--doc-tokens 1000] [--max-tokens 32] [--repeats 3]

Both paths: default model, one group of SP = 2 ranks (gloo) on a local Ray with 2 CPUs, a retained
session of --doc-tokens tokens, the same greedy question. TTFT = request start to first token (the
question's prefill against the retained context plus one decode step); tokens/s = generated tokens
after the first / time after the first.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time


def doc_text(n_words: int) -> str:
    words = ("the archive holds letters ledgers and maps of the old harbour its ships and merchants").split()
    return " ".join(words[i % len(words)] for i in range(n_words))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--doc-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import ray
    from ray import serve

    from ringserve.client import Client
    from ringserve.cluster.config import ApiKey, ServeConfig
    from ringserve.cluster.serve_app import LocalRedis, free_port, start
    from ringserve.workers.group import GroupConfig, WorkerGroup
    from ringserve.workers.loader import load_tokenizer
    from ringserve.workers.sampling import SamplingParams

    tok = load_tokenizer("default")
    text = doc_text(args.doc_tokens)
    ids = tok.encode_chat([{"role": "user", "content": text}], add_generation_prompt=False)[: args.doc_tokens]
    question = "Which places does the archive describe? Answer in two sentences."
    q_ids = tok.encode_turn([{"role": "user", "content": question}])
    gcfg = dict(sp=2, num_cpus_per_rank=0.25)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    def measure(stream):
        t0 = time.perf_counter()
        first, n = None, 0
        for _ in stream:
            n += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        return first - t0, (n - 1) / (end - first) if n > 1 else 0.0, n

    # direct: the WorkerGroup API the Serve deployment wraps
    group = WorkerGroup(GroupConfig(**gcfg))
    group.prefill("s", ids)
    direct = [measure(group.generate("s", q_ids, SamplingParams(max_tokens=args.max_tokens), retain=False))
              for _ in range(args.repeats + 1)][1:]
    group.shutdown()

    redis = LocalRedis()
    port, key = free_port(), "bench-key"
    cfg = ServeConfig.from_dict({"grpc_port": port, "http_port": free_port(), "redis_url": redis.url, "groups": 1,
                                 "group": gcfg, "api_keys": [vars(ApiKey.from_plain(key, "bench"))]})
    start(cfg)
    client = Client(f"localhost:{port}", api_key=key, timeout=300)
    s = client.create_session(tokens=ids, ttl="1h")
    served = [measure(s.generate(question, max_tokens=args.max_tokens)) for _ in range(args.repeats + 1)][1:]

    # 16 concurrent clients on 4 sessions
    sessions = [s] + [client.create_session(tokens=ids[: args.doc_tokens // 2], ttl="1h") for _ in range(3)]
    errors, done = [], []

    def worker(i):
        try:
            with Client(f"localhost:{port}", api_key=key, timeout=600) as c:
                sess = c.get_session(sessions[i % 4].name)
                done.append(len(sess.generate(question, max_tokens=8).text()))
        except Exception as e:  # counted, reported
            errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for x in sessions:
        x.delete()
    client.close()
    serve.shutdown()
    ray.shutdown()
    redis.stop()

    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    d_ttft, d_tps = med(direct, 0), med(direct, 1)
    s_ttft, s_tps = med(served, 0), med(served, 1)
    print(f"\ndefault model, SP = 2 (gloo, 2 CPUs), context {len(ids)} tokens, question {len(q_ids)} tokens, "
          f"{args.max_tokens} tokens, median of {args.repeats}; {time.strftime('%Y-%m-%d')}")
    print("| path | TTFT ms | decode tok/s |")
    print("|---|---:|---:|")
    print(f"| WorkerGroup directly | {1000 * d_ttft:.0f} | {d_tps:.1f} |")
    print(f"| SDK -> gRPC -> Serve -> group | {1000 * s_ttft:.0f} | {s_tps:.1f} |")
    print(f"| difference | +{1000 * (s_ttft - d_ttft):.0f} ms | {100 * (1 - s_tps / d_tps):.1f}% fewer |")
    print(f"\n16 concurrent clients on 4 sessions: {len(done)} answered, {len(errors)} errors, {wall:.1f} s wall"
          + (f"; first error: {errors[0]}" if errors else ""))


if __name__ == "__main__":
    main()
