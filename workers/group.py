"""A sequence-parallel worker group: P Ray actors (one per rank) in one placement group.

The group driver fans every call out to all P ranks with the same arguments; the ranks talk to each
other through a torch.distributed group (NCCL when each actor has a GPU, gloo otherwise) that is
initialised from rank 0's node address and a free port (Ray Train's recipe). Long calls stream from
rank 0: a create or an append yields `Progress` after every prefill chunk (from inside the engine),
then the session's `SessionInfo`; a generate yields token ids, then a `GenerationEnd`. Everything
that comes back is a type from `protocol.py`.

Failure: every collective has a timeout, and every call the driver waits on has one too. A rank
that dies (or a collective that times out) marks the group unhealthy and raises `GroupUnhealthy`
with the reason, instead of hanging; the caller rebuilds the group (a persisted session can then be
restored on the new one).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Sequence

from .protocol import (GenerationEnd, GroupUnhealthy, KVNotFoundError, Progress, RankStats, SessionError,
                       SessionInfo, Tier, TierBytes, TierMove)
from .sampling import SamplingParams


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


class _Throttle:
    """Progress at most every `every` tokens, and always the last one."""

    def __init__(self, every: int):
        self.every, self.last = max(0, every), 0

    def due(self, p: Progress) -> bool:
        if p.done >= p.total or p.done - self.last >= self.every:
            self.last = p.done
            return True
        return False


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
        return {"rank": self.rank, "pid": os.getpid(), "device": self.device,
                "backend": "nccl" if use_nccl else "gloo", "fingerprint": loaded.fingerprint,
                "max_context": self.engine.limit.max_tokens, "prefill_chunk": self.engine.prefill_chunk,
                "kv_device_bytes": device_bytes, "page_bytes": geometry.page_bytes}

    # -- streaming calls (rank 0 streams; the other ranks run the `_all` twin) --------------------------

    def create(self, sid: str, ids: list[int], opts: dict, progress_every: int = 0) -> Iterator[Progress | SessionInfo]:
        yield from self._timed(self.engine.prefill_steps(sid, ids, **opts), progress_every)
        yield self.describe(sid)

    def append(self, sid: str, ids: list[int], progress_every: int = 0) -> Iterator[Progress | SessionInfo]:
        yield from self._timed(self.engine.append_steps(sid, ids), progress_every)
        yield self.describe(sid)

    def generate(self, sid: str, ids: list[int], params: dict, retain: bool) -> Iterator[int | GenerationEnd]:
        from .engine import GenerationStats

        stats = GenerationStats()
        yield from self.engine.generate(sid, ids, SamplingParams(**params), retain=retain, stats=stats)
        yield GenerationEnd(stats.stop_reason, stats.prompt_tokens, stats.generated_tokens, stats.retained_tokens)

    def run_all(self, method: str, *args) -> None:
        """What ranks 1..P-1 run for a streaming call: the same work, nothing streamed back."""
        for _ in getattr(self, method)(*args):
            pass

    def _timed(self, steps, progress_every: int):
        throttle, t0 = _Throttle(progress_every), time.perf_counter()
        try:
            for p in steps:
                if throttle.due(p):
                    yield p
        finally:
            self._busy_s += time.perf_counter() - t0

    # -- control calls -------------------------------------------------------------------------------

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
        return SessionInfo(sid, length, Tier(state.tier) if state.tier else None, state.kind, moves, retention,
                           state.nbytes, (state.tokens,), state.persisted_tokens)

    def sessions(self) -> dict[str, SessionInfo]:
        out = {}
        for sid in self.engine.store.sessions():
            try:
                out[sid] = self.describe(sid)
            except SessionError:  # deleted meanwhile
                pass
        return out

    def restore(self, sid: str) -> SessionInfo:
        self.engine.restore(sid)
        return self.describe(sid)

    def flush(self) -> None:
        self.engine.store.flush()

    def drop(self, sid: str) -> None:
        self.engine.drop(sid)

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

    def tick(self) -> list[tuple[str, str, str]]:
        """Apply the retention policy now (idle demotion, watermarks, write-through retries)."""
        return self.engine.store.tick()

    def set_ttl(self, sid: str, ttl_s: float | None) -> None:
        st = self.engine.store
        st.set_expiry(sid, st.clock() + ttl_s if ttl_s else None)

    def ping(self) -> int:
        return self.rank

    def pid(self) -> int:
        return os.getpid()


class WorkerGroup:
    """P rank actors in one placement group (one bundle per rank), driven in lockstep."""

    def __init__(self, cfg: GroupConfig = GroupConfig(), *, name: str | None = None):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg, self.name = cfg, name or f"group-{uuid.uuid4().hex[:8]}"
        self.healthy, self.reason = True, ""
        bundle = {"CPU": cfg.num_cpus_per_rank}
        if cfg.num_gpus_per_rank:
            bundle["GPU"] = cfg.num_gpus_per_rank
        self.pg = placement_group([dict(bundle) for _ in range(cfg.sp)], strategy=cfg.strategy)
        ray.get(self.pg.ready(), timeout=cfg.call_timeout_s)
        actor = ray.remote(ShardWorker)
        self.ranks = [
            actor.options(num_cpus=cfg.num_cpus_per_rank, num_gpus=cfg.num_gpus_per_rank,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(
                              placement_group=self.pg, placement_group_bundle_index=r),
                          max_concurrency=1).remote(r, cfg.sp, asdict(cfg))
            for r in range(cfg.sp)]
        addr, port = ray.get(self.ranks[0].node_address.remote(), timeout=cfg.call_timeout_s)
        self.info = self._all([a.setup.remote(addr, port) for a in self.ranks])

    # -- fan-out helpers

    def _all(self, refs):
        import ray

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
            cause = e.cause if hasattr(e, "cause") else e
            if _is_collective_failure(cause):
                self._fail(f"a collective failed: {cause}")
                raise GroupUnhealthy(f"{self.name}: {self.reason}") from e
            # a request error (unknown session, prompt too long): the same on every rank, group fine
            self._settle(refs)
            raise cause from None

    def _settle(self, refs):
        """Wait for the other ranks of a failed call so the group stays in lockstep."""
        import ray

        for r in refs:
            try:
                ray.get(r, timeout=self.cfg.call_timeout_s)
            except Exception:
                pass

    def _fail(self, reason: str):
        self.healthy, self.reason = False, reason

    def _stream(self, method: str, *args) -> Iterator:
        """Items streamed by rank 0's `method` while the other ranks run it along (`run_all`)."""
        import ray

        if not self.healthy:
            raise GroupUnhealthy(f"{self.name} is unhealthy: {self.reason}")
        others = [a.run_all.remote(method, *args) for a in self.ranks[1:]]
        stream = getattr(self.ranks[0], method).options(num_returns="streaming").remote(*args)
        try:
            while True:
                ready, _ = ray.wait([stream], timeout=self.cfg.call_timeout_s)
                if not ready:
                    self._fail(f"rank 0 sent nothing within {self.cfg.call_timeout_s:.0f} s")
                    raise GroupUnhealthy(f"{self.name}: {self.reason}")
                try:
                    ref = next(stream)
                except StopIteration:
                    break
                yield self._all([ref])[0]
        except BaseException:
            if self.healthy:
                self._settle(others)
            raise
        self._all(others)

    def _merge(self, infos: list[SessionInfo]) -> SessionInfo:
        """Rank 0's view of a session with bytes and tokens summed over the ranks."""
        first = infos[0]
        return replace(first, kv_bytes=sum(i.kv_bytes for i in infos),
                       local_tokens=tuple(t for i in infos for t in i.local_tokens))

    # -- the API

    def create(self, sid: str, ids: Sequence[int], *, progress_every: int = 0, **opts) -> Iterator[Progress | SessionInfo]:
        """Create a session: Progress after prefill chunks (at most every `progress_every` tokens, and
        the last), then its SessionInfo. opts: retention, persist, ttl_s, allow_quantized."""
        for item in self._stream("create", sid, list(ids), opts, progress_every):
            if isinstance(item, Progress):
                yield item
        yield self.describe(sid)

    def prefill(self, sid: str, ids: Sequence[int], **opts) -> SessionInfo:
        """`create` without the progress: returns the session."""
        return _last(self.create(sid, ids, **opts))

    def append(self, sid: str, ids: Sequence[int], *, progress_every: int = 0) -> Iterator[Progress | SessionInfo]:
        for item in self._stream("append", sid, list(ids), progress_every):
            if isinstance(item, Progress):
                yield item
        yield self.describe(sid)

    def extend(self, sid: str, ids: Sequence[int]) -> SessionInfo:
        """`append` without the progress."""
        return _last(self.append(sid, ids))

    def generate_stream(self, sid: str, ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
                        retain: bool = False) -> Iterator[int | GenerationEnd]:
        """Token ids from rank 0 while the other ranks run along, then a GenerationEnd."""
        yield from self._stream("generate", sid, list(ids), asdict(params), retain)

    def generate(self, sid: str, ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
                 retain: bool = False) -> Iterator[int]:
        """The token ids of `generate_stream`."""
        for item in self.generate_stream(sid, ids, params, retain=retain):
            if isinstance(item, int):
                yield item

    def restore(self, sid: str) -> SessionInfo:
        """Adopt a session persisted to Redis by another group with the same number of ranks."""
        return self._merge(self._all([a.restore.remote(sid) for a in self.ranks]))

    def flush(self) -> None:
        """Wait until every rank's pending write-through reached Redis."""
        self._all([a.flush.remote() for a in self.ranks])

    def drop(self, sid: str) -> None:
        self._all([a.drop.remote(sid) for a in self.ranks])

    def sessions(self) -> dict[str, SessionInfo]:
        """Every session rank 0 holds, with bytes and tokens summed over the ranks."""
        per_rank = self._all([a.sessions.remote() for a in self.ranks])
        return {sid: self._merge([r[sid] for r in per_rank if sid in r]) for sid in per_rank[0]}

    def stats(self) -> list[RankStats]:
        """Per rank: sessions, KV bytes and pages per tier, ring and store counters."""
        return self._all([a.stats.remote() for a in self.ranks])

    def tick(self) -> list[tuple[str, str, str]]:
        """Apply every rank's retention policy now; rank 0's moves as (session, from, to). Ranks hold
        equal shares and see the same accesses, so they move the same sessions."""
        return self._all([a.tick.remote() for a in self.ranks])[0]

    def set_ttl(self, sid: str, ttl_s: float | None) -> None:
        self._all([a.set_ttl.remote(sid, ttl_s) for a in self.ranks])

    def describe(self, sid: str) -> SessionInfo:
        """Length, tier, tier history and bytes of a session over the ranks."""
        return self._merge(self._all([a.describe.remote(sid) for a in self.ranks]))

    def check_health(self, timeout_s: float = 10.0) -> bool:
        import ray

        try:
            ray.get([a.ping.remote() for a in self.ranks], timeout=timeout_s)
        except Exception as e:
            self._fail(f"health check failed: {type(e).__name__}")
        return self.healthy

    def shutdown(self):
        import ray
        from ray.util.placement_group import remove_placement_group

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


def _is_collective_failure(e: BaseException) -> bool:
    from .ring import CommTimeout

    if isinstance(e, CommTimeout):
        return True
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Timed out", "timed out", "Connection reset",
                                   "gloo", "NCCL", "Broken pipe"))
