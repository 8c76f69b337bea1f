"""Metering pass over N live sessions with a real redis-server, and ledger growth per session-hour.

    .venv/bin/python benchmarks/billing.py [--sessions 10000] [--repeats 3] [--aof]

Starts its own redis-server on a free loopback port (AOF with `appendfsync everysec` when --aof, as
the chart runs the billing Redis). Opens N sessions, then times one hour-boundary pass
(`Ledger.close_hours`: reads every open interval, writes its records, aggregates and new interval
atomically per session, pipelined) against the same work done one session at a time without
pipelining (what a straightforward meter does: `Ledger._change` per session, two round trips
each). Then simulates a day of 1,000 sessions with a pass every 10 minutes and random events
(moves, appends, requests) and reports records per session-hour against the stated bound.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import redis

from ringserve.cluster.billing import HOUR_MS, P, Ledger, Rates

T0 = 498_611 * 3600 + 1043


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(aof: bool):
    d = tempfile.mkdtemp(prefix="billbench-redis-")
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", d,
            "--logfile", os.path.join(d, "log")]
    args += ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else ["--appendonly", "no"]
    proc = subprocess.Popen(args)
    for _ in range(200):
        try:
            redis.Redis(port=port).ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def open_sessions(ledger: Ledger, n: int, t: float) -> None:
    for i in range(n):
        ledger.open(f"s-{i:016x}", f"tenant-{i % 50}", t=t + (i % 60), tier="device", tokens=1000 + i,
                    retention="standard", prefill_tokens=1000 + i)


def pass_pipelined(ledger: Ledger, n: int, hour: int) -> float:
    t = time.perf_counter()
    closed = ledger.close_hours(T0 + hour * 3600)
    dt = time.perf_counter() - t
    assert closed == n, (closed, n)
    return dt


def pass_one_by_one(ledger: Ledger, n: int, hour: int) -> float:
    boundary = ((T0 + hour * 3600) * 1000 // HOUR_MS) * HOUR_MS
    t = time.perf_counter()
    for sid in [s.decode() for s in ledger.client.zrangebyscore(f"{P}open", "-inf", f"({boundary}")]:
        ledger._change(sid, f"hour:{boundary}", boundary / 1000, lambda iv: iv)
    return time.perf_counter() - t


def growth(url: str, sessions: int = 1000, hours: int = 24, seed: int = 0) -> dict:
    r = redis.Redis.from_url(url)
    r.flushall()
    clock = [float(T0)]
    ledger = Ledger(url, Rates(), clock=lambda: clock[0])
    rng = random.Random(seed)
    sizes = {}
    for i in range(sessions):
        sid = f"s-{i:016x}"
        sizes[sid] = 1000
        ledger.open(sid, "t", t=T0, tier="device", tokens=1000, retention="standard", move=1)
    moves = {sid: 1 for sid in sizes}
    events = 0
    for step in range(1, hours * 6 + 1):
        now = T0 + step * 600
        clock[0] = now
        for sid in rng.sample(sorted(sizes), sessions // 20):  # 5% of sessions do something per 10 min
            kind = rng.random()
            t = now - rng.uniform(0, 600)
            if kind < 0.4:
                moves[sid] += 1
                ledger.move(sid, moves[sid], t=t, tier=rng.choice(["device", "host", "redis"]))
            elif kind < 0.7:
                sizes[sid] += 50
                ledger.resize(sid, f"size:{sizes[sid]}", t=t, tokens=sizes[sid], compute=(50, 0, 0))
            else:
                ledger.charge(sid, "t", f"gen:{step}", t=t, prefill=20, cached=sizes[sid], generated=40)
            events += 1
        ledger.close_hours(now)
    for sid in sizes:
        ledger.close(sid, t=T0 + hours * 3600)
    recs = ledger.records("t", T0 - 3600, T0 + hours * 3600 + 3600)
    ret = [x for x in recs if x["kind"] == "retention"]
    per = {}
    for x in ret:
        key = (x["session"], x["start"] // HOUR_MS)
        per[key] = per.get(key, 0) + 1
    return {"sessions": sessions, "hours": hours, "events": events, "records": len(recs),
            "retention_records": len(ret), "max_per_session_hour": max(per.values()),
            "mean_per_session_hour": len(ret) / len(per), "hours_touched": len(per)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--aof", action="store_true")
    args = ap.parse_args()
    proc, url = start_redis(args.aof)
    try:
        ver = redis.Redis.from_url(url).info()["redis_version"]
        rows = []
        for rep in range(args.repeats):
            redis.Redis.from_url(url).flushall()
            ledger = Ledger(url, Rates())
            open_sessions(ledger, args.sessions, T0)
            fast = pass_pipelined(ledger, args.sessions, 1)
            slow = pass_one_by_one(ledger, args.sessions, 2)
            fast2 = pass_pipelined(ledger, args.sessions, 3)
            rows.append((min(fast, fast2), slow))
        fast = statistics.median(r[0] for r in rows)
        slow = statistics.median(r[1] for r in rows)
        g = growth(url)
        print(f"# billing metering pass — {datetime.date.today()} — {platform.node()} "
              f"({os.cpu_count()} cores), Python {sys.version.split()[0]}, redis-server {ver}, "
              f"AOF {'everysec' if args.aof else 'off'}")
        print("| sessions | pipelined pass (s) | one-by-one pass (s) | speed-up | goal < 1 s |")
        print("|---:|---:|---:|---:|:--|")
        print(f"| {args.sessions:,} | {fast:.3f} | {slow:.3f} | {slow / fast:.1f}x | "
              f"{'met' if fast < 1 else 'missed'} |")
        print()
        print(f"ledger growth, {g['sessions']} sessions x {g['hours']} h, {g['events']} events "
              f"(5% of sessions act every 10 min): {g['retention_records']} retention records over "
              f"{g['hours_touched']} session-hours = {g['mean_per_session_hour']:.3f} per session-hour "
              f"(max {g['max_per_session_hour']}; bound 1 + events in that hour), "
              f"{g['records'] - g['retention_records']} compute records (one per request)")
    finally:
        proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
