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

What a request computed (cluster/outcomes.py). A request submitted with a `Bill` ends its stream with
an `Outcome` — the tokens the scheduler computed for it, whether it finished, failed or was ended
early — and the outcome is journaled here until the Gateway's meter pass acknowledges it. A stream
whose consumer went away (the client cancelled, its deadline passed, its Gateway died) is journaled
when the scheduler has ended it, so it is billed all the same.

Failure: when the WorkerGroup turns unhealthy (a rank died; found by a request or by the health
probe), it is rebuilt in the background at once; calls meanwhile wait for it (at most
`REBUILD_WAIT_S`) or get UNAVAILABLE. A rebuild changes the group's `epoch`: the Gateway then restores
the sessions persisted to Redis and reports the others lost.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

from ray import serve

from ringserve.workers.group import GroupConfig, WorkerGroup
from ringserve.workers.protocol import (GenerationEnd, GroupCapacity, GroupUnhealthy, MeterReport, RequestCancelled,
                                        SamplingParams, SchedulerStats, SessionError, SessionInfo, TierBytes)

from .metrics import GroupRecorder, safe
from .outcomes import Bill, GroupReport, Outcome

log = logging.getLogger("ringserve.groups")

REBUILD_WAIT_S = 60.0  # a call waits this long for a rebuild in progress before UNAVAILABLE
JOURNAL_MAX = 100_000  # outcomes kept unacknowledged at most (oldest dropped, logged)
COMPUTED_MAX = 100_000  # sessions whose computed tokens are kept (least recently active dropped)


@dataclass
class _Running:
    """A billed request in flight."""

    handle: object
    kind: str
    session: str
    n: int  # its prompt / content tokens
    bill: Bill
    seen: int = 0  # tokens streamed to its consumer
    info: SessionInfo | None = None
    ended: object = None  # the Future of its outcome, once something began to end it (see _end)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024,
                  health_check_period_s=5, graceful_shutdown_timeout_s=5)
class SequenceParallelGroup:
    def __init__(self, group_id: str, group_cfg: dict):
        self.group_id = group_id
        self.cfg = GroupConfig(**group_cfg)
        self._token = uuid.uuid4().hex[:8]  # this replica
        self._lock = threading.Lock()
        self._rebuilder: threading.Thread | None = None
        self._probe: threading.Thread | None = None
        self.recorder = GroupRecorder(group_id)
        self.rebuilds = 0
        self.group = self._start()
        self.inflight: dict[str, _Running] = {}
        self.journal: OrderedDict[str, Outcome] = OrderedDict()
        self.computed: OrderedDict[str, list[int]] = OrderedDict()  # session -> [prompt, generated] computed

    @property
    def epoch(self) -> str:
        return f"{self._token}.{self.rebuilds}"

    # -- the WorkerGroup and its rebuilds ----------------------------------------------------------

    def _start(self) -> WorkerGroup:
        g = WorkerGroup(self.cfg, name=self.group_id)
        g.scheduler.on_step = self.recorder.record_step
        return g

    def _start_rebuild(self) -> None:
        with self._lock:
            if self.group.healthy or (self._rebuilder is not None and self._rebuilder.is_alive()):
                return
            self._rebuilder = threading.Thread(target=self._rebuild, name=f"{self.group_id}-rebuild", daemon=True)
            self._rebuilder.start()

    def _rebuild(self) -> None:
        """Replace the unhealthy WorkerGroup (its ranks killed, its placement group removed) with a fresh
        one, retrying until one starts."""
        log.warning("rebuilding %s: %s", self.group_id, self.group.reason)
        t0, delay = time.monotonic(), 1.0
        self.group.shutdown()
        while True:
            try:
                g = self._start()
                break
            except Exception as e:  # noqa: BLE001 - e.g. its placement group cannot be placed yet
                log.error("rebuilding %s failed (%s); retrying in %.0f s", self.group_id, e, delay)
                time.sleep(delay)
                delay = min(30.0, delay * 2)
        with self._lock:
            self.group = g
            self.rebuilds += 1
        log.warning("rebuilt %s in %.1f s", self.group_id, time.monotonic() - t0)

    def _ready(self) -> WorkerGroup:
        """The healthy WorkerGroup; waits for a rebuild in progress (GroupUnhealthy after REBUILD_WAIT_S)."""
        g = self.group
        if g.healthy:
            return g
        self._start_rebuild()
        t = self._rebuilder
        if t is not None:
            t.join(REBUILD_WAIT_S)
        if self.group.healthy:
            return self.group
        raise GroupUnhealthy(f"{self.group_id} is being rebuilt after a failure; retry shortly")

    async def _call(self, fn, *args):
        """A blocking group call off the event loop."""
        return await asyncio.to_thread(fn, *args)

    def _probe_ranks(self, g: WorkerGroup) -> None:
        """Ping every rank: a dead one (or a stopped scheduler) fails the group and starts its rebuild. A
        slow answer does not: a rank busy under load is not a dead one, and a rebuild loses every session
        held only in memory."""
        import ray

        try:
            ray.get([a.ping.remote() for a in g.ranks], timeout=30)
        except ray.exceptions.GetTimeoutError:
            log.warning("%s: a rank did not answer its health ping within 30 s", self.group_id)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as e:
            g._fail(f"a rank died: {type(e).__name__}")
        if g.scheduler.broken is not None and g.healthy:
            g._fail(f"its scheduler stopped: {type(g.scheduler.broken).__name__}")
        if not g.healthy:
            self._start_rebuild()

    async def check_health(self):
        """Serve's health check (every 5 s). Never fails the replica: a dead rank is found by a probe in
        the background and the group rebuilt, which keeps this replica (and its journal) alive."""
        if not self.group.healthy:
            self._start_rebuild()
        elif self._probe is None or not self._probe.is_alive():
            self._probe = threading.Thread(target=self._probe_ranks, args=(self.group,), daemon=True)
            self._probe.start()

    async def capacity(self) -> GroupCapacity:
        """Free device-tier KV bytes over the ranks (what new sessions are placed by), every rank, and the
        scheduler's queue and batch. Unhealthy (and rebuilding) groups answer at once."""
        g = self.group
        if g.healthy:
            try:
                stats = await self._call(g.stats)
                return GroupCapacity(self.group_id, g.healthy, stats[0].sessions,
                                     sum(s.free_device_bytes for s in stats),
                                     TierBytes(*(sum(getattr(s.kv_bytes, t) for s in stats)
                                                 for t in ("device", "host", "redis"))),
                                     tuple(stats), self.rebuilds, g.scheduler.stats())
            except GroupUnhealthy:
                pass
        self._start_rebuild()
        return GroupCapacity(self.group_id, False, 0, 0, TierBytes(), (), self.rebuilds, SchedulerStats())

    # -- requests ----------------------------------------------------------------------------------

    async def _stream(self, kind: str, sid: str, ids: list[int], bill: Bill | None, **kw):
        g = await self._call(self._ready)
        h = g.submit(kind, sid, ids, loop=asyncio.get_running_loop(), **kw)
        run = _Running(h, kind, sid, len(ids), bill) if bill is not None else None
        if run is not None:
            self.inflight[bill.id] = run
        try:
            async for item in h:  # cancelled (client gone): the handle cancels the request
                if isinstance(item, SessionInfo):  # rank 0's view: merge every rank's bytes and tokens
                    try:
                        item = (await self._call(g.describe, sid)).with_group(self.group_id)
                    except Exception:  # noqa: BLE001 - deleted meanwhile: rank 0's view will do
                        item = item.with_group(self.group_id)
                    if run is not None:
                        run.info = item
                elif isinstance(item, int) and run is not None:
                    run.seen += 1
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            h.cancel()  # journaled once the scheduler has ended it (see _collect)
            raise
        except Exception as e:  # noqa: BLE001 - the request failed: its outcome says why
            if run is None:
                raise
            yield await self._end(run, e)
            return
        if run is not None:
            yield await self._end(run)

    async def _end(self, run: _Running, error: BaseException | None = None) -> Outcome:
        """Journal the outcome of a request that ended, once: a second call — the stream's own end while the
        meter pass's `_collect` is ending it, or after — waits for and returns the first one's outcome (it
        must never see the request as neither in flight nor journaled: a create would be settled failed)."""
        if run.ended is not None:
            try:
                return await asyncio.shield(run.ended)
            except Exception:  # noqa: BLE001 - the first attempt failed before journaling: this one ends it
                pass
        run.ended = asyncio.get_running_loop().create_future()
        try:
            out = await self._journal_end(run, error)
        except BaseException as e:
            run.ended.set_exception(e if isinstance(e, Exception) else RuntimeError("ending was cancelled"))
            run.ended.exception()  # retrieved: a failed first attempt is not an unhandled one
            run.ended = None
            self.inflight.setdefault(run.bill.id, run)
            raise
        run.ended.set_result(out)
        return out

    async def _journal_end(self, run: _Running, error: BaseException | None) -> Outcome:
        if self.inflight.pop(run.bill.id, None) is None:
            done = self.journal.get(run.bill.id)
            if done is not None:
                return done
            return Outcome(run.bill, "failed", error=error)  # acknowledged already: never journaled twice
        h = run.handle
        error = error if error is not None else h.error
        if error is None:
            status = "done"
        elif getattr(h, "cancel_error", None) is not None:
            status = "dropped"
        elif isinstance(error, RequestCancelled):
            status = "cancelled"
        else:
            status = "failed"
        computed, end = h.computed, h.end
        retained = length = 0
        if run.kind == "generate":
            if isinstance(end, GenerationEnd):
                prompt, generated, retained = end.prompt_tokens, end.generated_tokens, end.retained_tokens
            elif computed:
                prompt = min(computed, run.n)
                generated = computed - prompt
            else:  # the group failed under it (no count from the ranks): what reached the stream
                prompt, generated = (run.n, run.seen) if run.seen else (0, 0)
            if retained:
                length = await self._length(run.session)
        else:
            prompt, generated = (run.n if status == "done" else computed), 0
            if status == "done":
                length = run.info.length if run.info is not None else await self._length(run.session)
                retained = run.n if run.kind == "append" else length
        out = Outcome(run.bill, status, prompt, generated, retained, length,
                      end.reason if isinstance(end, GenerationEnd) else "", error)
        c = self.computed.setdefault(run.session, [0, 0])
        c[0] += prompt
        c[1] += generated
        self.computed.move_to_end(run.session)
        while len(self.computed) > COMPUTED_MAX:
            self.computed.popitem(last=False)
        self.journal[run.bill.id] = out
        while len(self.journal) > JOURNAL_MAX:
            old, dropped = self.journal.popitem(last=False)
            log.error("billing journal of %s is full: outcome %s of session %s dropped unbilled", self.group_id,
                      old, dropped.bill.session)
        return out

    async def _length(self, sid: str) -> int:
        try:
            return (await self._call(self.group.describe, sid)).length
        except Exception:  # noqa: BLE001 - deleted (or the group failed) meanwhile
            return 0

    async def _collect(self) -> None:
        """Journal the requests whose consumer went away once the scheduler has ended them."""
        for run in [r for r in self.inflight.values() if r.handle.done]:
            await self._end(run)

    async def create(self, sid: str, ids: list[int], opts: dict, progress_every: int, bill: Bill | None = None):
        """Prefill `ids` as session `sid`: Progress after prefill chunks, then the SessionInfo (then the
        Outcome, when billed)."""
        async for item in self._stream("create", sid, ids, bill, opts=opts, progress_every=progress_every):
            yield item

    async def append(self, sid: str, ids: list[int], progress_every: int, bill: Bill | None = None):
        async for item in self._stream("append", sid, ids, bill, progress_every=progress_every):
            yield item

    async def generate(self, sid: str, ids: list[int], params: dict, retain: bool, stops: list[str] = (),
                       bill: Bill | None = None):
        """Token ids, then a GenerationEnd (then the Outcome, when billed); `stops` end the generation
        here when the text contains one."""
        async for item in self._stream("generate", sid, ids, bill, sampling=SamplingParams(**params), retain=retain,
                                       stops=tuple(stops)):
            yield item

    # -- control calls -----------------------------------------------------------------------------

    async def describe(self, sid: str) -> SessionInfo:
        g = await self._call(self._ready)
        return (await self._call(g.describe, sid)).with_group(self.group_id)

    async def describe_many(self, sids: list[str]) -> dict[str, SessionInfo]:
        """The sessions among `sids` this group holds (one fan-out to the ranks, whatever the count)."""
        g = await self._call(self._ready)
        want = set(sids)
        return {sid: info.with_group(self.group_id) for sid, info in (await self._call(g.sessions)).items()
                if sid in want}

    async def restore(self, sid: str, expect_length: int | None = None, to: str = "device") -> SessionInfo:
        """Adopt a session from Redis; with `expect_length`, only a copy of that length on every rank."""
        g = await self._call(self._ready)
        return (await self._call(g.restore, sid, expect_length, to)).with_group(self.group_id)

    async def forget(self, sid: str) -> None:
        """Drop a session from the ranks' memory, leaving its Redis copy (another group owns it now)."""
        g = await self._call(self._ready)
        await self._call(lambda: g._all([a.forget.remote(sid) for a in g.ranks]))

    async def set_ttl(self, sid: str, ttl_s: float | None) -> None:
        g = await self._call(self._ready)
        await self._call(g.set_ttl, sid, ttl_s)

    async def set_retention(self, sid: str, retention: str) -> None:
        g = await self._call(self._ready)
        await self._call(g.set_retention, sid, retention)

    async def set_format(self, sid: str, kv_format: str, keep_fraction: float | None = None) -> SessionInfo:
        """Store a session in a smaller KV format ("fp8", "int4"), or keep a fraction of its tokens ("keep"),
        between its requests; FormatError (FAILED_PRECONDITION) for a change upward."""
        g = await self._call(self._ready)
        return (await self._call(g.set_format, sid, kv_format, keep_fraction)).with_group(self.group_id)

    async def delete(self, sid: str) -> None:
        """Delete at the next step boundary: a request running on the session is ended first."""
        g = await self._call(self._ready)
        await self._call(g.drop, sid)

    async def outcome(self, bill_id: str):
        """The journaled outcome of a request, "running" while it runs, or None if this replica never
        saw it (or it was acknowledged)."""
        await self._collect()
        if bill_id in self.journal:
            return self.journal[bill_id]
        return "running" if bill_id in self.inflight else None

    async def report(self, acks: list[str] = ()) -> GroupReport:
        """For the meter pass: every session's tier history, the sessions busy with a request, and the
        outcomes not acknowledged yet (`acks`: those settled since the last report)."""
        for b in acks:
            self.journal.pop(b, None)
        await self._collect()
        g, sessions = self.group, None
        if g.healthy:
            try:
                sessions = {sid: info.with_group(self.group_id) for sid, info in (await self._call(g.sessions)).items()}
                safe(self.recorder.record, await self._call(g.stats))
            except GroupUnhealthy:
                sessions = None
        if sessions is None:
            self._start_rebuild()
        busy = frozenset(r.session for r in self.inflight.values())
        outcomes = tuple(replace(o, error=None) for o in self.journal.values())  # settling needs no exception
        return GroupReport(self.group_id, self.epoch, sessions, busy, outcomes)

    async def meter(self) -> MeterReport:
        """Every session's tier history for billing (the tier policy runs on the group's own tick)."""
        r = await self.report()
        return MeterReport(self.group_id, (), r.sessions or {})

    async def computed_tokens(self, sid: str) -> tuple[int, int]:
        """(prompt, generated) tokens this replica's scheduler computed for the session, over the outcomes
        of its billed requests: what its ledger records must add up to."""
        await self._collect()
        return tuple(self.computed.get(sid, (0, 0)))

    async def rank_pids(self) -> list[int]:
        """The process id of every rank (operators and fault tests)."""
        g = await self._call(self._ready)
        return list(await self._call(lambda: g._all([a.pid.remote() for a in g.ranks])))

    async def info(self) -> dict:
        return {"group": self.group_id, "config": asdict(self.cfg), "rebuilds": self.rebuilds, "epoch": self.epoch}


__all__ = ["SequenceParallelGroup", "SessionError"]
