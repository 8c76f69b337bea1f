"""ringserve's metrics, defined once as data and exported through `ray.util.metrics`.

Everything that names a series reads it from here: the recording code (`metrics()[key]`), the
Grafana dashboard (`PANELS`, rendered to deploy/grafana/ringserve.json by cluster/grafana.py), and
the checks of the Prometheus alerting rules (deploy/prometheus/ringserve-rules.yml). A renamed or
removed series fails tests/unit/test_ops_files.py (the committed dashboard is stale, or reads a
series nobody defines) instead of silently breaking a panel.

Ray exports every metric on each node's Prometheus endpoint (`metrics-export-port`) with a `ray_`
prefix, plus the labels SessionName (the Ray cluster), WorkerId and NodeAddress; a counter's name
gets `_total` (ours already end in it). Names follow Prometheus conventions: a unit suffix
(`_seconds`, `_bytes`, `_tokens`), base units only (token-hours are `_token_seconds_total`; ÷ 3600).

Adding a series and its panel is one change in this file — an entry in METRICS and one in PANELS:

    Metric("queue_depth", "ringserve_scheduler_queue_depth", "gauge",
           "Requests waiting for a group's scheduler", ("group",)),
    Panel("Scheduler", "Queue depth", [(f"max by (group) ({sel('queue_depth')})", "{{group}}")]),

then `make grafana` (rewrites the dashboard and the chart's copy), and recording it where it
happens: `safe(lambda: metrics()["queue_depth"].set(n, tags={"group": g}))`. The tests then
require the new panel to return data against a real Prometheus, so the test workload
(tests/integration/test_ops.py) must make the series appear.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from itertools import product

LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
THROUGHPUT_BOUNDS = (10, 100, 1e3, 1e4, 3e4, 1e5, 3e5, 1e6, 3e6)
KINDS = ("counter", "gauge", "histogram")

# Label values known in advance. Counters over them are exported at 0 from the start, so a
# `rate()` or `increase()` sees the first event (a series that appears at 1 has no increase).
TIERS = ("hbm", "host", "redis")
LABEL_VALUES = {"tier": TIERS, "from_tier": TIERS, "to_tier": TIERS, "kind": ("prefill", "decode")}


@dataclass(frozen=True)
class Metric:
    key: str  # how the code records it: metrics()[key]
    name: str  # the series name ringserve registers with Ray
    kind: str  # counter | gauge | histogram
    help: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histogram bucket upper bounds

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.name.startswith("ringserve_"):
            raise ValueError(f"metric {self.name}: names start with 'ringserve_'")
        if (self.kind == "counter") != self.name.endswith("_total"):
            raise ValueError(f"metric {self.name}: counters, and only counters, end in '_total'")
        if (self.kind == "histogram") != bool(self.buckets):
            raise ValueError(f"metric {self.name}: histograms, and only histograms, have buckets")

    @property
    def series(self) -> str:
        """The name Prometheus sees."""
        return "ray_" + self.name

    def exported(self) -> tuple[str, ...]:
        """Every series name Prometheus gets for this metric."""
        if self.kind == "histogram":
            return tuple(self.series + s for s in ("_bucket", "_sum", "_count"))
        return (self.series,)


METRICS: tuple[Metric, ...] = (
    Metric("sessions", "ringserve_sessions", "gauge",
           "Live sessions by the tier their KV is in and their retention class", ("tier", "retention_class")),
    Metric("kv_bytes", "ringserve_kv_bytes", "gauge", "KV cache bytes held per tier, over a group's ranks",
           ("tier", "group")),
    Metric("kv_free_bytes", "ringserve_kv_free_bytes", "gauge",
           "Free KV capacity per tier, over a group's ranks (tiers whose capacity the group reports)",
           ("tier", "group")),
    Metric("moves", "ringserve_tier_moves_total", "counter", "Session moves between KV tiers",
           ("from_tier", "to_tier", "group")),
    Metric("move_bytes", "ringserve_tier_move_bytes_total", "counter", "Bytes moved between KV tiers",
           ("from_tier", "to_tier", "group")),
    Metric("move_rate", "ringserve_tier_move_throughput_bytes_per_second", "gauge",
           "Bytes per second of the tier moves of the last metering interval", ("from_tier", "to_tier", "group")),
    Metric("token_seconds", "ringserve_retention_token_seconds_total", "counter",
           "Retention metered into the billing ledger, tokens x seconds, by tier", ("tier",)),
    Metric("prefill_tokens", "ringserve_prefill_tokens_total", "counter", "Tokens prefilled (create, append)"),
    Metric("prefill_rate", "ringserve_prefill_throughput_tokens_per_second", "histogram",
           "Prefill speed of each CreateSession / AppendToSession", buckets=THROUGHPUT_BOUNDS),
    Metric("ttft", "ringserve_time_to_first_token_seconds", "histogram", "Generate: request start to first token",
           buckets=LATENCY_BOUNDS),
    Metric("itl", "ringserve_inter_token_latency_seconds", "histogram", "Generate: time between consecutive tokens",
           buckets=LATENCY_BOUNDS),
    Metric("ring_step", "ringserve_ring_step_seconds", "histogram",
           "Mean ring-attention step time of a metering interval", ("group",), LATENCY_BOUNDS),
    Metric("comm_wait", "ringserve_ring_comm_wait_ratio", "gauge",
           "Share of prefill time spent waiting for ring transfers (not hidden by compute)", ("group",)),
    Metric("redis_errors", "ringserve_redis_errors_total", "counter", "KV-tier Redis calls that failed after retries",
           ("group",)),
    Metric("restores", "ringserve_session_restores_total", "counter", "Sessions restored from Redis onto a group"),
    Metric("lost", "ringserve_sessions_lost_total", "counter", "Sessions lost (failed checksums, or no persisted copy)"),
    Metric("unmetered", "ringserve_billing_unmetered_sessions", "gauge",
           "Live sessions whose retention is not metered (reconciliation; must stay 0)"),
    Metric("orphaned", "ringserve_billing_orphaned_intervals", "gauge",
           "Open billing intervals of sessions that are gone (reconciliation; must stay 0)"),
    Metric("queue_depth", "ringserve_scheduler_queue_depth", "gauge",
           "Requests waiting for a group's scheduler (not yet admitted)", ("group",)),
    Metric("running", "ringserve_scheduler_running_requests", "gauge",
           "Requests a group's scheduler has admitted (prefilling or in the decode batch)", ("group",)),
    Metric("batch", "ringserve_scheduler_decode_batch_size", "histogram",
           "Sessions in each step's decode batch (steps that decode)", ("group",), BATCH_BOUNDS),
    Metric("step_tokens", "ringserve_scheduler_tokens_total", "counter",
           "Tokens computed by a group's steps, by kind (prefill chunks, decode batch)", ("kind", "group")),
    Metric("preemptions", "ringserve_scheduler_preemptions_total", "counter",
           "Times a started prefill yielded a step to other requests (a long create making way)", ("group",)),
    Metric("step_time", "ringserve_scheduler_step_seconds", "histogram", "Duration of each step on the ranks",
           ("group",), LATENCY_BOUNDS),
)
BY_KEY = {m.key: m for m in METRICS}

# Series of Ray Serve itself that the dashboard and the alerts read (Ray 2.60 names).
SERVE_SERIES = {
    "replica_healthy": "ray_serve_deployment_replica_healthy",  # gauge, 1 = healthy, per replica
    "requests": "ray_serve_deployment_request_counter_total",  # counter per deployment and route
}
APP = 'application="ringserve"'


# ---------------------------------------------------------------------------------- PromQL helpers

def sel(key: str, match: str = "") -> str:
    """The selector of a metric (by key), filtered to the dashboard's Ray cluster(s); `match` adds
    label matchers, e.g. sel("kv_bytes", 'tier="hbm"')."""
    name = BY_KEY[key].series if key in BY_KEY else SERVE_SERIES[key]
    return f'{name}{{SessionName=~"$SessionName"{"," + match if match else ""}}}'


def rate(key: str, by: str = "", match: str = "") -> str:
    return f"sum{f' by ({by})' if by else ''} (rate({sel(key, match)}[$__rate_interval]))"


def increase(key: str, by: str = "", match: str = "") -> str:
    return f"sum{f' by ({by})' if by else ''} (increase({sel(key, match)}[$__range]))"


def quantile(key: str, q: float, by: str = "") -> str:
    """The q-quantile of a histogram over the last rate interval (NaN when nothing was observed)."""
    m = BY_KEY[key]
    assert m.kind == "histogram", f"{m.name} is not a histogram"
    return (f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) "
            f"(rate({m.series}_bucket{{SessionName=~\"$SessionName\"}}[$__rate_interval])))")


# ---------------------------------------------------------------------------------- the dashboard

@dataclass(frozen=True)
class Panel:
    row: str
    title: str
    queries: list  # [(PromQL, legend)]
    unit: str = "short"  # a Grafana unit id: bytes, s, percentunit, Bps, currencyUSD, ...
    help: str = ""
    stack: bool = False


def _price_by_tier() -> str:
    """A vector of the dashboard's price variables, one series per tier (label `tier`)."""
    return " or ".join(f'label_replace(vector($price_{t}), "tier", "{t}", "", "")' for t in TIERS)


HBM = 'tier="hbm"'
HBM_USED = f"sum by (group) ({sel('kv_bytes', HBM)})"

PANELS: tuple[Panel, ...] = (
    Panel("Sessions and KV", "Sessions by tier", [(f"sum by (tier) ({sel('sessions')})", "{{tier}}")],
          help="Live sessions by the tier their KV is in (moving / lost are transient)", stack=True),
    Panel("Sessions and KV", "Sessions by retention class",
          [(f"sum by (retention_class) ({sel('sessions')})", "{{retention_class}}")], stack=True),
    Panel("Sessions and KV", "KV bytes per tier", [(f"sum by (tier) ({sel('kv_bytes')})", "{{tier}}")],
          unit="bytes", stack=True),
    Panel("Sessions and KV", "HBM KV in use per group",
          [(f"{HBM_USED} / ({HBM_USED} + sum by (group) ({sel('kv_free_bytes', HBM)}))", "{{group}}")],
          unit="percentunit", help="Share of the device-tier KV capacity in use; demotion starts at the high watermark"),
    Panel("Tier moves", "Tier moves per second", [(rate("moves", "from_tier, to_tier"), "{{from_tier}} → {{to_tier}}")],
          unit="ops"),
    Panel("Tier moves", "Tier move traffic", [(rate("move_bytes", "from_tier, to_tier"), "{{from_tier}} → {{to_tier}}")],
          unit="Bps"),
    Panel("Tier moves", "Tier move throughput (last metering interval)",
          [(f"max by (from_tier, to_tier) ({sel('move_rate')})", "{{from_tier}} → {{to_tier}}")], unit="Bps",
          help="Bytes per second while moving: how fast a demotion / promotion runs, not how much"),
    Panel("Billing", "Token-hours accrued per hour, by tier", [(rate("token_seconds", "tier"), "{{tier}}")],
          help="Tokens x seconds metered per second = the tokens held on average (token-hours per hour)", stack=True),
    Panel("Billing", "Retention cost accrual per hour, by tier",
          [(f"{rate('token_seconds', 'tier')} * on (tier) ({_price_by_tier()}) / 1e6", "{{tier}}")],
          stack=True,
          help="Currency units per hour: token-hours per hour x the dashboard's price variables (per 1M "
               "token-hours; defaults: the standard class). Invoices come from the ledger: `ringserve usage`"),
    Panel("Billing", "Billing reconciliation (must stay 0)",
          [(f"max({sel('unmetered')})", "unmetered sessions"), (f"max({sel('orphaned')})", "orphaned intervals")]),
    Panel("Prefill and latency", "Prefill tokens per second", [(rate("prefill_tokens"), "tokens/s")], unit="short"),
    Panel("Prefill and latency", "Prefill speed per request",
          [(quantile("prefill_rate", q), f"p{int(q * 100)}") for q in (0.5, 0.9)], unit="short",
          help="Tokens per second of each CreateSession / AppendToSession"),
    Panel("Prefill and latency", "Time to first token",
          [(quantile("ttft", q), f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], unit="s"),
    Panel("Prefill and latency", "Inter-token latency",
          [(quantile("itl", q), f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], unit="s"),
    Panel("Ring attention", "Ring communication share of prefill",
          [(f"max by (group) ({sel('comm_wait')})", "{{group}}")], unit="percentunit",
          help="Time waiting for ring transfers that compute did not hide; growing = communication-bound"),
    Panel("Ring attention", "Ring step time", [(quantile("ring_step", 0.5, "group"), "{{group}} p50"),
                                               (quantile("ring_step", 0.95, "group"), "{{group}} p95")], unit="s"),
    Panel("Scheduler", "Queue and running requests",
          [(f"sum by (group) ({sel('queue_depth')})", "{{group}} waiting"),
           (f"sum by (group) ({sel('running')})", "{{group}} running")],
          help="Waiting: not admitted yet (no free pages, or over max_running); running: admitted"),
    Panel("Scheduler", "Decode batch size", [(quantile("batch", q, "group"), f"{{{{group}}}} p{int(q * 100)}")
                                             for q in (0.5, 0.95)],
          help="Sessions sharing one decode step"),
    Panel("Scheduler", "Tokens per second by kind", [(rate("step_tokens", "kind"), "{{kind}}")], stack=True,
          help="Prefill vs decode share of what the groups compute"),
    Panel("Scheduler", "Preemptions per second", [(rate("preemptions", "group"), "{{group}}")], unit="ops",
          help="A started prefill waiting a step so shorter requests go first"),
    Panel("Scheduler", "Step time", [(quantile("step_time", q, "group"), f"{{{{group}}}} p{int(q * 100)}")
                                     for q in (0.5, 0.99)], unit="s"),
    Panel("Failures", "Redis errors per second", [(rate("redis_errors", "group"), "{{group}}")], unit="ops"),
    Panel("Failures", "Restores and lost sessions (dashboard range)",
          [(increase("restores"), "restored from Redis"), (increase("lost"), "lost")]),
    Panel("Failures", "Serve replicas healthy",
          [(f"min by (deployment) (last_over_time({sel('replica_healthy', APP)}[$__rate_interval]))",
            "{{deployment}}")],
          help="1 = every replica of the deployment passes Serve's health check (Ray exports it only "
               "when set: gaps on a busy head are bridged over the rate interval)"),
    Panel("Failures", "Requests per second (Serve)",
          [(rate("requests", "deployment", APP), "{{deployment}}")], unit="reqps"),
)


# ---------------------------------------------------------------------------------- recording

_LOCK = threading.Lock()
_METRICS: dict | None = None


def _build() -> dict:
    from ray.util.metrics import Counter, Gauge, Histogram

    out = {}
    for m in METRICS:
        if m.kind == "counter":
            out[m.key] = Counter(m.name, m.help, tag_keys=m.tags)
        elif m.kind == "gauge":
            out[m.key] = StickyGauge(Gauge(m.name, m.help, tag_keys=m.tags))
        else:
            out[m.key] = Histogram(m.name, m.help, boundaries=list(m.buckets), tag_keys=m.tags)
    for m in METRICS:
        safe(_prime, out, m)
    gauges = [g for g in out.values() if isinstance(g, StickyGauge)]
    threading.Thread(target=_refresh_forever, args=(gauges, _refresh_interval_s()), name="ringserve-metrics",
                     daemon=True).start()
    return out


class StickyGauge:
    """A Ray gauge whose last value per tag set stays exported, as a Prometheus gauge does.

    Ray 2.60 drops a gauge series that was not set within two metric report intervals (measured:
    a value set once is gone from the node's endpoint ~20 s later at the default 10 s interval).
    Values set rarely (ring wait share, move throughput, reconciliation results) would vanish, and
    an alert's `for:` would restart at every gap; so the last values are re-set in the background."""

    def __init__(self, gauge):
        self._gauge = gauge
        self._last: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def set(self, value, tags: dict | None = None) -> None:
        self._gauge.set(value, tags=tags)
        with self._lock:
            self._last[tuple(sorted((tags or {}).items()))] = value

    def refresh(self) -> None:
        with self._lock:
            last = list(self._last.items())
        for tags, value in last:
            self._gauge.set(value, tags=dict(tags) or None)


def _refresh_interval_s() -> float:
    try:
        import ray

        return max(0.5, ray._config.metrics_report_interval_ms() / 2000)  # half a report interval
    except Exception:
        return 5.0


def _refresh_forever(gauges: list, every_s: float) -> None:
    while True:
        time.sleep(every_s)
        for g in gauges:
            safe(g.refresh)


def _prime(objs: dict, m: Metric, **fixed: str) -> None:
    """Export a counter at 0 for every combination of its known label values (`fixed` supplies the
    others), so alerts on `increase()` fire on the first event. Ray's public `inc` refuses 0, so this
    records through `_record`; if Ray drops that, the series simply appear on the first event."""
    if m.kind != "counter" or not set(m.tags) <= set(LABEL_VALUES) | set(fixed):
        return
    free = [t for t in m.tags if t not in fixed]
    for values in product(*(LABEL_VALUES[t] for t in free)):
        tags = {**fixed, **dict(zip(free, values))}
        if tags.get("from_tier") is not None and tags.get("from_tier") == tags.get("to_tier"):
            continue
        objs[m.key]._record(0, tags=tags or None)


def metrics() -> dict:
    """The metric objects by key (created on first use, in the process that records them)."""
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
        self._primed = False

    def _delta(self, key, value):
        prev = self.seen.get(key, 0)
        self.seen[key] = value
        return value - prev if value >= prev else value  # a rebuilt rank starts from zero

    def record(self, stats: list) -> None:
        """`stats`: one entry per rank, a `RankStats` (workers/protocol.py) or its older dict form."""
        stats = [_rank_dict(s) for s in stats]
        m, g = metrics(), self.group
        if not self._primed:
            self._primed = True
            for d in METRICS:
                if "group" in d.tags:
                    safe(_prime, m, d, group=g)
        for t in TIERS:
            m["kv_bytes"].set(sum(s.get("bytes", {}).get(t, 0) for s in stats), tags={"tier": t, "group": g})
        for t, field_ in (("hbm", "free_device"), ("host", "free_host"), ("redis", "free_redis")):
            if all(field_ in s for s in stats):
                m["kv_free_bytes"].set(sum(s[field_] for s in stats), tags={"tier": t, "group": g})
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


    def record_step(self, plan, results, stats) -> None:
        """One scheduler step (called by the group's scheduler thread after every step)."""
        m, g = metrics(), self.group
        r0 = results[0]
        m["queue_depth"].set(stats.waiting, tags={"group": g})
        m["running"].set(stats.running, tags={"group": g})
        m["step_time"].observe(r0.seconds, tags={"group": g})
        if r0.decode_tokens:
            m["batch"].observe(r0.decode_tokens, tags={"group": g})
            m["step_tokens"].inc(r0.decode_tokens, tags={"kind": "decode", "group": g})
        if r0.prefill_tokens:
            m["step_tokens"].inc(r0.prefill_tokens, tags={"kind": "prefill", "group": g})
        new = self._delta("preemptions", stats.preemptions)
        if new:
            m["preemptions"].inc(new, tags={"group": g})


def _tier(name) -> str:
    name = str(getattr(name, "value", name))  # a Tier enum or its name
    return {"device": "hbm"}.get(name, name)


def _rank_dict(s) -> dict:
    """A rank's stats as the dict `record` reads (read by attribute, so this module needs nothing
    from workers/)."""
    if isinstance(s, dict):
        return s
    c = s.counters
    return {"rank": s.rank, "bytes": {_tier(k): v for k, v in s.kv_bytes.api().items()},
            "free_device": s.free_device_bytes,
            "ring": {"steps": s.ring_steps, "wait_s": s.ring_wait_s, "busy_s": s.busy_s},
            "counters": {"redis_errors": c.redis_errors,
                         "moves": {k: (v.count, v.bytes, v.seconds) for k, v in c.moves.items()}}}
