"""ringserve's metrics, exported through `ray.util.metrics`: they appear in the Ray dashboard's
metrics view and on every node's Prometheus endpoint (`metrics-export-port`), where Ray prefixes
them with `ray_` (e.g. `ray_ringserve_time_to_first_token_seconds_bucket`).

Names follow Prometheus conventions: a unit suffix (`_seconds`, `_bytes`, `_tokens`), `_total` on
counters, base units only (token-hours are exported as `_token_seconds_total`; divide by 3600).

    metric                                              kind       tags
    ringserve_sessions                                  gauge      tier, retention_class
    ringserve_kv_bytes                                  gauge      tier, group
    ringserve_tier_moves_total                          counter    from_tier, to_tier, group
    ringserve_tier_move_bytes_total                     counter    from_tier, to_tier, group
    ringserve_tier_move_throughput_bytes_per_second     gauge      from_tier, to_tier, group (last pass)
    ringserve_retention_token_seconds_total             counter    tier
    ringserve_prefill_tokens_total                      counter    -
    ringserve_prefill_throughput_tokens_per_second      histogram  - (one per CreateSession / Append)
    ringserve_time_to_first_token_seconds               histogram  -
    ringserve_inter_token_latency_seconds               histogram  -
    ringserve_ring_step_seconds                         histogram  group (mean step of a metering interval)
    ringserve_ring_comm_wait_ratio                      gauge      group (share of prefill time waiting on the ring)
    ringserve_redis_errors_total                        counter    group
    ringserve_session_restores_total                    counter    -
    ringserve_sessions_lost_total                       counter    -
    ringserve_billing_unmetered_sessions                gauge      - (reconciliation)
    ringserve_billing_orphaned_intervals                gauge      - (reconciliation)
"""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_METRICS: dict | None = None

LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
THROUGHPUT_BOUNDS = [10, 100, 1e3, 1e4, 3e4, 1e5, 3e5, 1e6, 3e6]


def _build() -> dict:
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "sessions": Gauge("ringserve_sessions", "Live sessions by the tier their KV is in and their retention class",
                          tag_keys=("tier", "retention_class")),
        "kv_bytes": Gauge("ringserve_kv_bytes", "KV cache bytes held per tier, over a group's ranks",
                          tag_keys=("tier", "group")),
        "moves": Counter("ringserve_tier_moves_total", "Session moves between KV tiers",
                         tag_keys=("from_tier", "to_tier", "group")),
        "move_bytes": Counter("ringserve_tier_move_bytes_total", "Bytes moved between KV tiers",
                              tag_keys=("from_tier", "to_tier", "group")),
        "move_rate": Gauge("ringserve_tier_move_throughput_bytes_per_second",
                           "Bytes per second of the tier moves of the last metering interval",
                           tag_keys=("from_tier", "to_tier", "group")),
        "token_seconds": Counter("ringserve_retention_token_seconds_total",
                                 "Retention metered into the billing ledger, tokens x seconds, by tier",
                                 tag_keys=("tier",)),
        "prefill_tokens": Counter("ringserve_prefill_tokens_total", "Tokens prefilled (create, append)"),
        "prefill_rate": Histogram("ringserve_prefill_throughput_tokens_per_second",
                                  "Prefill speed of each CreateSession / AppendToSession", boundaries=THROUGHPUT_BOUNDS),
        "ttft": Histogram("ringserve_time_to_first_token_seconds", "Generate: request start to first token",
                          boundaries=LATENCY_BOUNDS),
        "itl": Histogram("ringserve_inter_token_latency_seconds", "Generate: time between consecutive tokens",
                         boundaries=LATENCY_BOUNDS),
        "ring_step": Histogram("ringserve_ring_step_seconds", "Mean ring-attention step time of a metering interval",
                               boundaries=LATENCY_BOUNDS, tag_keys=("group",)),
        "comm_wait": Gauge("ringserve_ring_comm_wait_ratio",
                           "Share of prefill time spent waiting for ring transfers (not hidden by compute)",
                           tag_keys=("group",)),
        "redis_errors": Counter("ringserve_redis_errors_total", "KV-tier Redis calls that failed after retries",
                                tag_keys=("group",)),
        "restores": Counter("ringserve_session_restores_total", "Sessions restored from Redis onto a group"),
        "lost": Counter("ringserve_sessions_lost_total", "Sessions lost (failed checksums, or no persisted copy)"),
        "unmetered": Gauge("ringserve_billing_unmetered_sessions", "Live sessions whose retention is not metered"),
        "orphaned": Gauge("ringserve_billing_orphaned_intervals", "Open billing intervals of sessions that are gone"),
    }


def metrics() -> dict:
    """The metric objects (created on first use, in the process that records them)."""
    global _METRICS
    with _LOCK:
        if _METRICS is None:
            _METRICS = _build()
        return _METRICS


def safe(fn, *args, **kwargs) -> None:
    """Record, never failing the request that records (no Ray, exporter trouble)."""
    try:
        fn(*args, **kwargs)
    except Exception:
        pass


class GroupRecorder:
    """Turns a group's cumulative per-rank counters (KVStore.counters(), RingComm) into metric
    increments, remembering what it has already exported."""

    def __init__(self, group: str):
        self.group = group
        self.seen: dict = {}

    def _delta(self, key, value):
        prev = self.seen.get(key, 0)
        self.seen[key] = value
        return value - prev if value >= prev else value  # a rebuilt rank starts from zero

    def record(self, stats: list[dict]) -> None:
        m, g = metrics(), self.group
        for t in ("hbm", "host", "redis"):
            m["kv_bytes"].set(sum(s.get("bytes", {}).get(t, 0) for s in stats), tags={"tier": t, "group": g})
        steps = wait = busy = 0.0
        pair_bytes: dict = {}
        for s in stats:
            r = s["rank"]
            ring = s.get("ring", {})
            steps += self._delta((r, "steps"), ring.get("steps", 0))
            wait += self._delta((r, "wait"), ring.get("wait_s", 0.0))
            busy += self._delta((r, "busy"), ring.get("busy_s", 0.0))
            c = s.get("counters") or {}
            errs = self._delta((r, "redis_errors"), c.get("redis_errors", 0))
            if errs:
                m["redis_errors"].inc(errs, tags={"group": g})
            for (src, dst), (n, nbytes, secs) in (c.get("moves") or {}).items():
                src, dst = _tier(src), _tier(dst)
                dn = self._delta((r, src, dst, "n"), n)
                db = self._delta((r, src, dst, "b"), nbytes)
                ds = self._delta((r, src, dst, "s"), secs)
                tags = {"from_tier": src, "to_tier": dst, "group": g}
                if dn:
                    m["moves"].inc(dn, tags=tags)
                if db:
                    m["move_bytes"].inc(db, tags=tags)
                    b, sec = pair_bytes.get((src, dst), (0, 0.0))
                    pair_bytes[(src, dst)] = (b + db, sec + ds)
        for (src, dst), (b, sec) in pair_bytes.items():
            if sec > 0:
                m["move_rate"].set(b / sec, tags={"from_tier": src, "to_tier": dst, "group": g})
        if steps and busy > 0:  # steps, wait and busy are all summed over the ranks
            m["ring_step"].observe(busy / steps, tags={"group": g})
            m["comm_wait"].set(min(1.0, wait / busy), tags={"group": g})


def _tier(name: str) -> str:
    return {"device": "hbm"}.get(name, name)
