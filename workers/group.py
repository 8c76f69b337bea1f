"""A sequence-parallel worker group: P Ray actors (one per rank) in one placement group, and its scheduler.

The ranks talk to each other through a torch.distributed group (NCCL when each actor has a GPU, gloo
otherwise) initialised from rank 0's node address and a free port (Ray Train's recipe). Work runs in
steps: the group's `Scheduler` (workers/scheduler.py) decides each step, `run_step` sends the same
`StepPlan` to every rank and each rank's `StepExecutor` runs it. Requests (`submit`, or the
`create` / `append` / `generate` conveniences) stream their results through a `Handle`; everything
that comes back is a type from `protocol.py`.

Control calls never wait behind compute: each rank actor has a "control" concurrency group of its
own threads, so describe, stats, sessions, tier ticks, TTL changes, restores and flushes are answered
while the rank's step thread computes (they touch the KV store under its lock, never the process
group). Deletes go through the scheduler: they end the session's running request and free its pages
at the next step boundary. The KV tier policy runs on the group's own tick (`kv_tick_s`).

Failure: every collective has a timeout, and every call the driver waits on has one too. A rank that
dies, a collective that fails, or a step that raises on some rank (the ranks may have diverged)
marks the group unhealthy and raises `GroupUnhealthy` with the reason, instead of hanging; every
request of the group then fails with it (UNAVAILABLE), and the owner rebuilds the group (a persisted
session can then be restored on the new one). A request's own failure (a bad prompt, no pages, a
sampling error) is not a group failure: the executor agrees on it across ranks and fails that request.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Sequence

import ray

from .plan import StepPlan, StepResult
from .protocol import (GenerationEnd, GroupUnhealthy, KVDataLossError, KVNotFoundError, Progress, RankStats,
                       SamplingParams, SessionError, SessionInfo, Tier, TierBytes, TierMove)
from .scheduler import Handle, Scheduler, SchedulerConfig

CONTROL = "control"  # the rank actors' concurrency group for calls answered while a step runs


@dataclass(frozen=True)
class GroupConfig:
    sp: int = 2  # P: ranks in the group
    model: str = "default"  # 'default', a checkpoint folder or a .gguf path
    num_cpus_per_rank: float = 0.5
    num_gpus_per_rank: float = 0.0  # 1 on GPU nodes: then NCCL is used
    max_context: int | None = None  # lowers the model's context limit per session
    max_context_beyond_model: bool = False  # the explicit override to raise it past what the model supports
    prefill_chunk: int | None = None  # tokens per prefill chunk; None: per device (engine.DEFAULT_PREFILL_CHUNK)
    block: int = 256  # tokens per KV page; also decode / append tokens go to ranks round-robin in blocks
    collective_timeout_s: float = 120.0  # a collective that waits longer fails the group
    call_timeout_s: float = 600.0  # the driver waits at most this long for one call on all ranks
    strategy: str = "PACK"  # placement-group strategy; STRICT_PACK keeps a group on one node
    # KV retention tiers per rank (workers/kvstore.py). Device: None = 80 % of free GPU memory after the
    # weights, or room for two full-context sessions on the CPU (engine.default_kv_device_bytes).
    kv_device_bytes: int | None = None
    kv_host_bytes: int = 1 << 30
    kv_redis_bytes: int | None = None
    redis_url: str | None = None
    kv_device_idle_s: float = 300.0  # a standard session idle this long moves device -> host
    kv_host_idle_s: float = 3600.0  # ... and this long, host -> Redis
    kv_cold_idle_s: float = 60.0  # a cold session idle this long moves to Redis
    kv_namespace: str = "sp"  # keys name "{kv_namespace}{P}-r{rank}", so a new group of the same P restores
    kv_tick_s: float = 1.0  # the KV tier policy (idle demotion, watermarks, retries) runs this often; 0 = never
    # the scheduler (workers/scheduler.py)
    step_tokens: int = 0  # prefill tokens per step shared by waiting prefills; 0 = one prefill chunk
    max_running: int = 64  # requests admitted at once (bounds the decode batch)
    max_waiting: int = 1024  # queued requests beyond that are refused (RESOURCE_EXHAUSTED)
    queue_timeout_s: float = 60.0  # a request waiting for KV pages fails after this


class ShardWorker:
    """One rank: a ShardEngine with its paged KV store. Runs as a Ray actor."""

    def __init__(self, rank: int, world: int, cfg: dict):
        self.rank, self.world, self.cfg = rank, world, GroupConfig(**cfg)
        self._busy_s = 0.0  # seconds spent in prefill / append (ring attention runs there)
        self.engine = None
        self.device = "cpu"

    def node_address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the process-group rendezvous."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def setup(self, addr: str, port: int) -> dict:
        import datetime

        import torch
        import torch.distributed as dist

        from .engine import ShardEngine, default_kv_device_bytes
        from .executor import StepExecutor
        from .kvpages import PageGeometry
        from .kvpolicy import IdlePolicy, TierCapacity
        from .kvstore import KVStore
        from .loader import load_model

        c = self.cfg
        use_nccl = c.num_gpus_per_rank > 0 and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(0)  # Ray pins one GPU per actor: set it before creating the NCCL group
            self.device = "cuda"
        else:
            torch.set_num_threads(max(1, int(round(c.num_cpus_per_rank)) or 1))
        dist.init_process_group("nccl" if use_nccl else "gloo", init_method=f"tcp://{addr}:{port}",
                                rank=self.rank, world_size=self.world,
                                timeout=datetime.timedelta(seconds=c.collective_timeout_s))
        loaded = load_model(c.model, device=self.device)
        m = loaded.config
        geometry = PageGeometry(m.n_layers, m.n_kv_heads, m.head_dim, c.block, next(loaded.model.parameters()).dtype)
        max_context = m.context_limit(c.max_context, beyond_model=c.max_context_beyond_model)
        device_bytes = c.kv_device_bytes or default_kv_device_bytes(geometry, max_context, self.world,
                                                                    torch.device(self.device))
        store = KVStore(f"{c.kv_namespace}{self.world}-r{self.rank}", loaded.fingerprint, geometry,
                        TierCapacity(device_bytes, c.kv_host_bytes, c.kv_redis_bytes), redis_url=c.redis_url,
                        device=self.device, idle=IdlePolicy(c.kv_device_idle_s, c.kv_host_idle_s, c.kv_cold_idle_s))
        self.engine = ShardEngine(loaded, dist.group.WORLD, store=store, max_context=max_context,
                                  prefill_chunk=c.prefill_chunk, block=c.block, timeout_s=c.collective_timeout_s,
                                  beyond_model=c.max_context_beyond_model)
        self.executor = StepExecutor(self.engine, describe=self.describe)
        return {"rank": self.rank, "pid": os.getpid(), "device": self.device,
                "backend": "nccl" if use_nccl else "gloo", "fingerprint": loaded.fingerprint,
                "max_context": self.engine.limit.max_tokens, "prefill_chunk": self.engine.prefill_chunk,
                "kv_device_bytes": device_bytes, "page_bytes": geometry.page_bytes}

    # -- the step (the default concurrency group: one at a time, in plan order) -----------------------

    def step(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        try:
            return self.executor.step(plan)
        finally:
            if plan.prefill:
                self._busy_s += time.perf_counter() - t0

    # -- control calls -------------------------------------------------------------------------------

    @ray.method(concurrency_group=CONTROL)
    def describe(self, sid: str) -> SessionInfo:
        """This rank's view of a session (kv_bytes and local tokens of this rank only)."""
        st = self.engine.store
        try:
            state = st.state(sid)
            moves = tuple(TierMove(n, age, Tier(t)) for n, age, t in st.tier_moves(sid))
            retention = st.retention(sid)
            length = st.meta(sid)["length"] if state.kind != "lost" else 0
        except KVNotFoundError:
            raise SessionError(f"session {sid!r} is not held by this group") from None
        meta = st.meta(sid) if state.kind != "lost" else {}
        fmt = st.kv_format(sid)
        if meta.get("layout", {}).get("evicted"):
            fmt = f"keep:{meta.get('keep_fraction')}"
        g = st.geometry
        tokens = state.tokens
        if meta.get("layout"):  # every token of the session this rank holds, evicted ones included
            from .layout import ShardLayout

            lay = ShardLayout.from_dict(meta["layout"])
            lay.evicted = None
            tokens = lay.local_counts()[self.rank]
        # what is priced: its stored tokens in its format against all of its tokens exactly, page slots aside
        return SessionInfo(sid, length, Tier(state.tier) if state.tier else None, state.kind, moves, retention,
                           state.nbytes, (state.tokens,), state.persisted_tokens, kv_format=fmt,
                           exact_bytes=tokens * g.token_bytes, stored_bytes=st.stored_bytes(sid))

    @ray.method(concurrency_group=CONTROL)
    def sessions(self) -> dict[str, SessionInfo]:
        out = {}
        for sid in self.engine.store.sessions():
            try:
                out[sid] = self.describe(sid)
            except SessionError:  # deleted meanwhile
                pass
        return out

    @ray.method(concurrency_group=CONTROL)
    def restore(self, sid: str, expect_length: int | None = None, to: str = "device") -> SessionInfo:
        """Adopt a session from Redis (loaded to `to`). With `expect_length`, a copy of another length (an
        on_demote session appended to after its last demotion) is refused: KVDataLossError, and this rank
        forgets it (its Redis copy is left to its TTL)."""
        if sid in self.engine.store.sessions():  # held already (restored by another call): nothing to adopt
            return self.describe(sid)
        try:
            self.engine.store.restore(sid, to=to)
        except KVNotFoundError as e:
            raise SessionError(f"session {sid!r} was never persisted to Redis ({e})") from None
        info = self.describe(sid)
        if expect_length is not None and info.length != expect_length:
            self.engine.store.forget(sid)
            raise KVDataLossError(f"session {sid!r}: the copy in Redis holds {info.length} tokens on rank "
                                  f"{self.rank}, the session {expect_length}; it was appended to after its last "
                                  "copy was written, so the copy is stale and was not loaded")
        return info

    @ray.method(concurrency_group=CONTROL)
    def forget(self, sid: str) -> None:
        """Drop a session from this rank's memory, leaving its Redis copy (if any) to its TTL."""
        self.engine.store.forget(sid)

    @ray.method(concurrency_group=CONTROL)
    def set_retention(self, sid: str, retention: str) -> None:
        self.engine.store.set_retention(sid, retention)

    @ray.method(concurrency_group=CONTROL)
    def flush(self) -> None:
        self.engine.store.flush()

    @ray.method(concurrency_group=CONTROL)
    def stats(self) -> RankStats:
        st = self.engine.store
        s = st.stats()
        t = s["tiers"]
        comm = self.engine.comm
        return RankStats(rank=self.rank, device=self.device, sessions=s["sessions"],
                         kv_bytes=TierBytes(t["device"]["bytes"], t["host"]["bytes"], t["redis"]["bytes"]),
                         free_device_bytes=t["device"]["free_pages"] * s["page_bytes"], page_bytes=s["page_bytes"],
                         device_pages=t["device"]["pages"], free_device_pages=t["device"]["free_pages"],
                         ring_steps=getattr(comm, "steps", 0), ring_wait_s=getattr(comm, "wait_s", 0.0),
                         ring_bytes_sent=getattr(comm, "bytes_sent", 0),
                         busy_s=self._busy_s, modes=dict(self.engine.mode_counts), counters=st.counters(),
                         redis_degraded=bool(t["redis"]["degraded"]))

    @ray.method(concurrency_group=CONTROL)
    def tick(self) -> list[tuple[str, str, str]]:
        """Apply the retention policy now (idle demotion, watermarks, write-through retries)."""
        return self.engine.store.tick()

    @ray.method(concurrency_group=CONTROL)
    def set_ttl(self, sid: str, ttl_s: float | None) -> None:
        st = self.engine.store
        st.set_expiry(sid, st.clock() + ttl_s if ttl_s else None)

    @ray.method(concurrency_group=CONTROL)
    def ping(self) -> int:
        return self.rank

    @ray.method(concurrency_group=CONTROL)
    def pid(self) -> int:
        return os.getpid()


class WorkerGroup:
    """P rank actors in one placement group (one bundle per rank), driven in lockstep by a scheduler."""

    def __init__(self, cfg: GroupConfig = GroupConfig(), *, name: str | None = None):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .loader import load_tokenizer

        self.cfg, self.name = cfg, name or f"group-{uuid.uuid4().hex[:8]}"
        self.healthy, self.reason = True, ""
        bundle = {"CPU": cfg.num_cpus_per_rank}
        if cfg.num_gpus_per_rank:
            bundle["GPU"] = cfg.num_gpus_per_rank
        self.pg = placement_group([dict(bundle) for _ in range(cfg.sp)], strategy=cfg.strategy)
        ray.get(self.pg.ready(), timeout=cfg.call_timeout_s)
        actor = ray.remote(concurrency_groups={CONTROL: 4})(ShardWorker)
        self.ranks = [
            actor.options(num_cpus=cfg.num_cpus_per_rank, num_gpus=cfg.num_gpus_per_rank,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(
                              placement_group=self.pg, placement_group_bundle_index=r),
                          max_concurrency=1).remote(r, cfg.sp, asdict(cfg))
            for r in range(cfg.sp)]
        addr, port = ray.get(self.ranks[0].node_address.remote(), timeout=cfg.call_timeout_s)
        self.info = self._all([a.setup.remote(addr, port) for a in self.ranks])
        sched = SchedulerConfig(prefill_chunk=self.info[0]["prefill_chunk"], step_tokens=cfg.step_tokens,
                                max_running=cfg.max_running, max_waiting=cfg.max_waiting,
                                queue_timeout_s=cfg.queue_timeout_s)
        self.scheduler = Scheduler(self.run_step, sched, load_tokenizer(cfg.model), name=f"{self.name}-scheduler",
                                   on_broken=lambda e: self.healthy and self._fail(f"its scheduler stopped: {e}"))
        self._stop = threading.Event()
        if cfg.kv_tick_s > 0:
            threading.Thread(target=self._tick_loop, name=f"{self.name}-kv-tick", daemon=True).start()

    # -- fan-out helpers

    def _all(self, refs):
        """Wait for one control call on every rank. A request's error (an unknown session) is raised as
        it is; a rank that died or stopped answering makes the group unhealthy."""
        if not self.healthy:
            raise GroupUnhealthy(f"{self.name} is unhealthy: {self.reason}")
        try:
            return ray.get(refs, timeout=self.cfg.call_timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            self._fail(f"a rank did not answer within {self.cfg.call_timeout_s:.0f} s")
            raise GroupUnhealthy(f"{self.name}: {self.reason}") from e
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as e:
            self._fail(f"a rank died: {type(e).__name__}")
            raise GroupUnhealthy(f"{self.name}: {self.reason}") from e
        except ray.exceptions.RayTaskError as e:
            raise (e.cause if getattr(e, "cause", None) is not None else e) from None

    def _fail(self, reason: str):
        self.healthy, self.reason = False, reason

    def run_step(self, plan: StepPlan) -> list[StepResult]:
        """One step on every rank. Any exception on a rank fails the group: the ranks may have diverged
        (requests' own failures come back as events, never as exceptions)."""
        try:
            return self._all([a.step.remote(plan) for a in self.ranks])
        except GroupUnhealthy:
            raise
        except Exception as e:
            self._fail(f"step {plan.step} failed on a rank: {type(e).__name__}")
            raise GroupUnhealthy(f"{self.name}: {self.reason}") from e

    def _merge(self, infos: list[SessionInfo]) -> SessionInfo:
        """Rank 0's view of a session with bytes and tokens summed over the ranks."""
        first = infos[0]
        return replace(first, kv_bytes=sum(i.kv_bytes for i in infos), exact_bytes=sum(i.exact_bytes for i in infos),
                       stored_bytes=sum(i.stored_bytes for i in infos),
                       local_tokens=tuple(t for i in infos for t in i.local_tokens))

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.cfg.kv_tick_s):
            if not self.healthy:
                return
            try:
                self.tick()
            except Exception:  # a rank died: the next request finds the group unhealthy
                pass

    # -- requests (through the scheduler)

    def submit(self, kind: str, sid: str, ids: Sequence[int], **kw) -> Handle:
        """Queue a request ("create", "append", "generate"); its results stream from the Handle. kw:
        opts, sampling, retain, stop_ids, stops, progress_every, loop (an asyncio loop to stream to)."""
        if not self.healthy:
            raise GroupUnhealthy(f"{self.name} is unhealthy: {self.reason}")
        return self.scheduler.submit(kind, sid, list(ids), **kw)

    def create(self, sid: str, ids: Sequence[int], *, progress_every: int = 0, **opts) -> Iterator[Progress | SessionInfo]:
        """Create a session: Progress after prefill chunks (at most every `progress_every` tokens, and
        the last), then its SessionInfo. opts: retention, persist, ttl_s, allow_quantized."""
        for item in self.submit("create", sid, ids, opts=opts, progress_every=progress_every):
            yield self.describe(sid) if isinstance(item, SessionInfo) else item

    def prefill(self, sid: str, ids: Sequence[int], **opts) -> SessionInfo:
        """`create` without the progress: returns the session."""
        return _last(self.create(sid, ids, **opts))

    def append(self, sid: str, ids: Sequence[int], *, progress_every: int = 0) -> Iterator[Progress | SessionInfo]:
        for item in self.submit("append", sid, ids, progress_every=progress_every):
            yield self.describe(sid) if isinstance(item, SessionInfo) else item

    def extend(self, sid: str, ids: Sequence[int]) -> SessionInfo:
        """`append` without the progress."""
        return _last(self.append(sid, ids))

    def generate_stream(self, sid: str, ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
                        retain: bool = False, stops: Sequence[str] = ()) -> Handle:
        """Token ids, then a GenerationEnd. `stops`: strings that end the generation here, in the group."""
        return self.submit("generate", sid, ids, sampling=params, retain=retain, stops=tuple(stops))

    def generate(self, sid: str, ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
                 retain: bool = False, stops: Sequence[str] = ()) -> Iterator[int]:
        """The token ids of `generate_stream`."""
        h = self.generate_stream(sid, ids, params, retain=retain, stops=stops)
        try:
            for item in h:
                if isinstance(item, int):
                    yield item
        finally:
            h.cancel()  # a consumer that stops reading stops the work

    def set_format(self, sid: str, kv_format: str, keep_fraction: float | None = None) -> SessionInfo:
        """Move a session to a smaller KV format ("fp8", "int4"), or keep a fraction of its tokens
        (kv_format "keep"), at a step boundary between its requests."""
        opts = {"kv_format": kv_format, "keep_fraction": keep_fraction}
        return _last(self.describe(sid) if isinstance(x, SessionInfo) else x
                     for x in self.submit("convert", sid, [], opts=opts))

    def drop(self, sid: str) -> None:
        """Delete a session on every rank at the next step boundary (its running request ends first)."""
        self.scheduler.drop(sid).result(timeout=self.cfg.call_timeout_s)
        if self.scheduler.broken is not None:
            raise GroupUnhealthy(f"{self.name}: {self.scheduler.broken}")

    # -- control calls (answered while a step runs)

    def restore(self, sid: str, expect_length: int | None = None, to: str = "device") -> SessionInfo:
        """Adopt a session persisted to Redis by another group with the same number of ranks. With
        `expect_length`, every rank's copy must hold that many tokens, else no rank keeps it and
        KVDataLossError says which rank disagreed."""
        refs = [a.restore.remote(sid, expect_length, to) for a in self.ranks]
        if expect_length is None:
            return self._merge(self._all(refs))
        infos, error = [], None
        for ref in refs:  # every rank answers before anything is decided
            try:
                infos.append(self._all([ref])[0])
            except KVDataLossError as e:
                error = error or e
        if error is not None:
            self._all([a.forget.remote(sid) for a in self.ranks])
            raise error
        return self._merge(infos)

    def set_retention(self, sid: str, retention: str) -> None:
        """Change a session's retention class on every rank (the tier policy reads it at its next tick)."""
        self._all([a.set_retention.remote(sid, retention) for a in self.ranks])

    def flush(self) -> None:
        """Wait until every rank's pending write-through reached Redis."""
        self._all([a.flush.remote() for a in self.ranks])

    def sessions(self) -> dict[str, SessionInfo]:
        """Every session rank 0 holds, with bytes and tokens summed over the ranks."""
        per_rank = self._all([a.sessions.remote() for a in self.ranks])
        return {sid: self._merge([r[sid] for r in per_rank if sid in r]) for sid in per_rank[0]}

    def stats(self) -> list[RankStats]:
        """Per rank: sessions, KV bytes and pages per tier, ring and store counters."""
        return self._all([a.stats.remote() for a in self.ranks])

    def tick(self) -> list[tuple[str, str, str]]:
        """Apply every rank's retention policy now; rank 0's moves as (session, from, to)."""
        return self._all([a.tick.remote() for a in self.ranks])[0]

    def set_ttl(self, sid: str, ttl_s: float | None) -> None:
        self._all([a.set_ttl.remote(sid, ttl_s) for a in self.ranks])

    def describe(self, sid: str) -> SessionInfo:
        """Length, tier, tier history and bytes of a session over the ranks."""
        return self._merge(self._all([a.describe.remote(sid) for a in self.ranks]))

    def check_health(self, timeout_s: float = 10.0) -> bool:
        try:
            ray.get([a.ping.remote() for a in self.ranks], timeout=timeout_s)
        except Exception as e:
            self._fail(f"health check failed: {type(e).__name__}")
        if self.scheduler.broken is not None:
            self._fail(f"its scheduler stopped: {self.scheduler.broken}")
        return self.healthy

    def shutdown(self):
        from ray.util.placement_group import remove_placement_group

        self._stop.set()
        self.scheduler.close()
        for a in self.ranks:
            try:
                ray.kill(a)
            except Exception:
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:
            pass


def _last(items: Iterator):
    out = None
    for out in items:
        pass
    return out
