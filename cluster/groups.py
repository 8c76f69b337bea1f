"""`SequenceParallelGroup`: the Serve deployment that owns one WorkerGroup.

Routing choice (issue 6 allows "another Serve-native mechanism you justify"): every worker group is
its own single-replica deployment (`group-0`, `group-1`, …) and the Gateway routes by the group id
that the session registry records for each session. A group is stateful — it holds the KV of its
sessions — so a request must reach exactly that group; a per-deployment handle expresses that
exactly and survives Gateway restarts, whereas a request router over interchangeable replicas
would have to rediscover the owner from replica ids that change when Serve restarts a replica.
Serve still supervises each group (health checks, restart of a dead replica), and new sessions go
to the group reporting the most free KV capacity (`capacity()`).

A group runs one request at a time (its ranks work in lockstep); requests queue in the replica.
When its WorkerGroup turns unhealthy (a rank died), the next call rebuilds it: sessions that were
persisted to Redis are then restored by the Gateway, the others are reported lost.
"""

from __future__ import annotations

import threading
from dataclasses import asdict

from ray import serve

from ringserve.workers.group import GroupConfig, WorkerGroup

from .metrics import GroupRecorder, safe
from ringserve.workers.sampling import SamplingParams


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
                  health_check_period_s=5, graceful_shutdown_timeout_s=5)
class SequenceParallelGroup:
    def __init__(self, group_id: str, group_cfg: dict):
        self.group_id = group_id
        self.cfg = GroupConfig(**group_cfg)
        self._lock = threading.Lock()
        self.group = WorkerGroup(self.cfg, name=group_id)
        self.rebuilds = 0
        self.recorder = GroupRecorder(group_id)

    def _ready(self) -> WorkerGroup:
        if not self.group.healthy:  # a rank died: start a fresh group; persisted sessions come back
            self.group.shutdown()
            self.group = WorkerGroup(self.cfg, name=self.group_id)
            self.rebuilds += 1
        return self.group

    def check_health(self):  # Serve's health check: an unhealthy group is rebuilt on the next call
        return None

    def capacity(self) -> dict:
        """Free device-tier KV bytes over the ranks (what new sessions are placed by)."""
        with self._lock:
            g = self._ready()
            stats = g.stats()
        return {"group": self.group_id, "free_kv_bytes": sum(s["free_device"] for s in stats),
                "sessions": stats[0]["sessions"], "healthy": g.healthy,
                "kv_bytes": {t: sum(s["bytes"].get(t, 0) for s in stats) for t in ("hbm", "host", "redis")},
                "ranks": [{"rank": s["rank"], "device": s["device"], "healthy": g.healthy, "kv_bytes": s["bytes"],
                           "free_kv_bytes": s["free_device"]} for s in stats]}

    def create(self, sid: str, ids: list[int], opts: dict, chunk: int):
        """Prefill `ids` as session `sid`; yields {"progress": (done, total)} after every chunk of
        `chunk` tokens, then {"session": description}."""
        with self._lock:
            g = self._ready()
            total = len(ids)
            first = ids[:chunk]
            g.prefill(sid, first, **opts)
            yield {"progress": (len(first), total)}
            done = len(first)
            try:
                while done < total:
                    piece = ids[done:done + chunk]
                    g.append(sid, piece)
                    done += len(piece)
                    yield {"progress": (done, total)}
            except BaseException:
                g.drop(sid)
                raise
            yield {"session": {**g.describe(sid), "group": self.group_id}}

    def append(self, sid: str, ids: list[int], chunk: int):
        with self._lock:
            g = self._ready()
            done = 0
            while done < len(ids):
                piece = ids[done:done + chunk]
                g.append(sid, piece)
                done += len(piece)
                yield {"progress": (done, len(ids))}
            yield {"session": {**g.describe(sid), "group": self.group_id}}

    def generate(self, sid: str, ids: list[int], params: dict, retain: bool):
        with self._lock:
            g = self._ready()
            for tok in g.generate(sid, ids, SamplingParams(**params), retain=retain):
                yield tok

    def describe(self, sid: str) -> dict:
        with self._lock:
            return {**self._ready().describe(sid), "group": self.group_id}

    def restore(self, sid: str) -> dict:
        with self._lock:
            return {**self._ready().restore(sid), "group": self.group_id}

    def set_ttl(self, sid: str, ttl_s: float | None) -> None:
        with self._lock:
            self._ready().set_ttl(sid, ttl_s)

    def delete(self, sid: str) -> None:
        with self._lock:
            self._ready().drop(sid)

    def meter(self) -> dict:
        """Apply the retention policy (idle demotion, watermarks), then report every session's tier
        history for billing: {session: {"tier", "length", "moves": [(n, seconds ago, tier)]}}."""
        with self._lock:
            g = self._ready()
            moved = g.tick()
            sessions = g.sessions()[0]
            safe(self.recorder.record, g.stats())
            return {"group": self.group_id, "moved": moved, "sessions": sessions}

    def info(self) -> dict:
        return {"group": self.group_id, "config": asdict(self.cfg), "rebuilds": self.rebuilds}
