"""`SequenceParallelGroup`: the Serve deployment that owns one WorkerGroup.

Routing choice (issue 6 allows "another Serve-native mechanism you justify"): every worker group is
its own single-replica deployment (`group-0`, `group-1`, …) and the Gateway routes by the group id
that the session registry records for each session. A group is stateful — it holds the KV of its
sessions — so a request must reach exactly that group; a per-deployment handle expresses that
exactly and survives Gateway restarts, whereas a request router over interchangeable replicas
would have to rediscover the owner from replica ids that change when Serve restarts a replica.
Serve still supervises each group (health checks, restart of a dead replica), and new sessions go
to the group reporting the most free KV capacity (`capacity()`).

The deployment only submits work and passes results through: chunking, progress and the KV all
live in the workers (one engine call per create / append / generate). A group runs one request at a
time (its ranks work in lockstep); requests queue in the replica. When its WorkerGroup turns
unhealthy (a rank died), the next call rebuilds it: sessions that were persisted to Redis are then
restored by the Gateway, the others are reported lost.
"""

from __future__ import annotations

import threading
from dataclasses import asdict

from ray import serve

from ringserve.workers.group import GroupConfig, WorkerGroup
from ringserve.workers.protocol import GroupCapacity, MeterReport, SessionInfo, TierBytes
from ringserve.workers.sampling import SamplingParams

from .metrics import GroupRecorder, safe


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

    def capacity(self) -> GroupCapacity:
        """Free device-tier KV bytes over the ranks (what new sessions are placed by), and every rank."""
        with self._lock:
            g = self._ready()
            stats = g.stats()
        return GroupCapacity(self.group_id, g.healthy, stats[0].sessions, sum(s.free_device_bytes for s in stats),
                             TierBytes(*(sum(getattr(s.kv_bytes, t) for s in stats) for t in ("device", "host", "redis"))),
                             tuple(stats), self.rebuilds)

    def create(self, sid: str, ids: list[int], opts: dict, progress_every: int):
        """Prefill `ids` as session `sid`: Progress after prefill chunks, then the SessionInfo."""
        with self._lock:
            for item in self._ready().create(sid, ids, progress_every=progress_every, **opts):
                yield item.with_group(self.group_id) if isinstance(item, SessionInfo) else item

    def append(self, sid: str, ids: list[int], progress_every: int):
        with self._lock:
            for item in self._ready().append(sid, ids, progress_every=progress_every):
                yield item.with_group(self.group_id) if isinstance(item, SessionInfo) else item

    def generate(self, sid: str, ids: list[int], params: dict, retain: bool):
        """Token ids, then a GenerationEnd."""
        with self._lock:
            yield from self._ready().generate_stream(sid, ids, SamplingParams(**params), retain=retain)

    def describe(self, sid: str) -> SessionInfo:
        with self._lock:
            return self._ready().describe(sid).with_group(self.group_id)

    def restore(self, sid: str) -> SessionInfo:
        with self._lock:
            return self._ready().restore(sid).with_group(self.group_id)

    def set_ttl(self, sid: str, ttl_s: float | None) -> None:
        with self._lock:
            self._ready().set_ttl(sid, ttl_s)

    def delete(self, sid: str) -> None:
        with self._lock:
            self._ready().drop(sid)

    def meter(self) -> MeterReport:
        """Apply the retention policy (idle demotion, watermarks), then report every session's tier
        history for billing."""
        with self._lock:
            g = self._ready()
            moved = g.tick()
            sessions = {sid: info.with_group(self.group_id) for sid, info in g.sessions().items()}
            safe(self.recorder.record, g.stats())
            return MeterReport(self.group_id, tuple(moved), sessions)

    def info(self) -> dict:
        return {"group": self.group_id, "config": asdict(self.cfg), "rebuilds": self.rebuilds}
