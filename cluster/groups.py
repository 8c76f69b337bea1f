"""`SequenceParallelGroup`: the Serve deployment that owns one WorkerGroup and its scheduler.

Routing choice (issue 6 allows "another Serve-native mechanism you justify"): every worker group is
its own single-replica deployment (`group-0`, `group-1`, …) and the Gateway routes by the group id
that the session registry records for each session. A group is stateful — it holds the KV of its
sessions — so a request must reach exactly that group; a per-deployment handle expresses that
exactly and survives Gateway restarts, whereas a request router over interchangeable replicas
would have to rediscover the owner from replica ids that change when Serve restarts a replica.
Serve still supervises each group (health checks, restart of a dead replica), and new sessions go
to the group reporting the most free KV capacity (`capacity()`).

The deployment only submits work and streams results: the group's scheduler (workers/scheduler.py,
a thread beside Serve's request handling) batches every running generate into one decode step and
shares prefill steps between creates, appends and prompts. Every method is a coroutine that never
blocks the replica's event loop, so control calls (capacity, describe, TTL, metering, health) are
answered while long prefills run; a client that goes away cancels its request at the next step.
When the WorkerGroup turns unhealthy (a rank died), the next call rebuilds it: sessions that were
persisted to Redis are then restored by the Gateway, the others are reported lost.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict

from ray import serve

from ringserve.workers.group import GroupConfig, WorkerGroup
from ringserve.workers.protocol import GroupCapacity, MeterReport, SamplingParams, SessionInfo, TierBytes

from .metrics import GroupRecorder, safe


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024,
                  health_check_period_s=5, graceful_shutdown_timeout_s=5)
class SequenceParallelGroup:
    def __init__(self, group_id: str, group_cfg: dict):
        self.group_id = group_id
        self.cfg = GroupConfig(**group_cfg)
        self._rebuild = threading.Lock()
        self.recorder = GroupRecorder(group_id)
        self.group = self._start()
        self.rebuilds = 0

    def _start(self) -> WorkerGroup:
        g = WorkerGroup(self.cfg, name=self.group_id)
        g.scheduler.on_step = self.recorder.record_step
        return g

    def _ready(self) -> WorkerGroup:
        with self._rebuild:
            if not self.group.healthy:  # a rank died: start a fresh group; persisted sessions come back
                self.group.shutdown()
                self.group = self._start()
                self.rebuilds += 1
            return self.group

    async def _call(self, fn, *args):
        """A blocking group call off the event loop."""
        return await asyncio.to_thread(fn, *args)

    def check_health(self):  # Serve's health check: an unhealthy group is rebuilt on the next call
        return None

    async def capacity(self) -> GroupCapacity:
        """Free device-tier KV bytes over the ranks (what new sessions are placed by), every rank, and the
        scheduler's queue and batch."""
        g = await self._call(self._ready)
        stats = await self._call(g.stats)
        return GroupCapacity(self.group_id, g.healthy, stats[0].sessions, sum(s.free_device_bytes for s in stats),
                             TierBytes(*(sum(getattr(s.kv_bytes, t) for s in stats) for t in ("device", "host", "redis"))),
                             tuple(stats), self.rebuilds, g.scheduler.stats())

    async def _stream(self, g: WorkerGroup, kind: str, sid: str, ids: list[int], **kw):
        h = g.submit(kind, sid, ids, loop=asyncio.get_running_loop(), **kw)
        async for item in h:  # cancelled (client gone): the handle cancels the request
            if isinstance(item, SessionInfo):  # rank 0's view: merge every rank's bytes and tokens
                item = (await self._call(g.describe, sid)).with_group(self.group_id)
            yield item

    async def create(self, sid: str, ids: list[int], opts: dict, progress_every: int):
        """Prefill `ids` as session `sid`: Progress after prefill chunks, then the SessionInfo."""
        g = await self._call(self._ready)
        async for item in self._stream(g, "create", sid, ids, opts=opts, progress_every=progress_every):
            yield item

    async def append(self, sid: str, ids: list[int], progress_every: int):
        g = await self._call(self._ready)
        async for item in self._stream(g, "append", sid, ids, progress_every=progress_every):
            yield item

    async def generate(self, sid: str, ids: list[int], params: dict, retain: bool, stops: list[str] = ()):
        """Token ids, then a GenerationEnd; `stops` end the generation here when the text contains one."""
        g = await self._call(self._ready)
        async for item in self._stream(g, "generate", sid, ids, sampling=SamplingParams(**params), retain=retain,
                                       stops=tuple(stops)):
            yield item

    async def describe(self, sid: str) -> SessionInfo:
        g = await self._call(self._ready)
        return (await self._call(g.describe, sid)).with_group(self.group_id)

    async def restore(self, sid: str) -> SessionInfo:
        g = await self._call(self._ready)
        return (await self._call(g.restore, sid)).with_group(self.group_id)

    async def set_ttl(self, sid: str, ttl_s: float | None) -> None:
        g = await self._call(self._ready)
        await self._call(g.set_ttl, sid, ttl_s)

    async def delete(self, sid: str) -> None:
        """Delete at the next step boundary: a request running on the session is ended first."""
        g = await self._call(self._ready)
        await self._call(g.drop, sid)

    async def meter(self) -> MeterReport:
        """Every session's tier history for billing (the tier policy runs on the group's own tick)."""
        g = await self._call(self._ready)
        sessions = {sid: info.with_group(self.group_id) for sid, info in (await self._call(g.sessions)).items()}
        stats = await self._call(g.stats)
        safe(self.recorder.record, stats)
        return MeterReport(self.group_id, (), sessions)

    async def info(self) -> dict:
        return {"group": self.group_id, "config": asdict(self.cfg), "rebuilds": self.rebuilds}
