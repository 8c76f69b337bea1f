"""A sequence-parallel worker group: P Ray actors (one per rank) in one placement group.

The group driver fans every call out to all P ranks with the same arguments; the ranks talk to each
other through a torch.distributed group (NCCL when each actor has a GPU, gloo otherwise) that is
initialised from rank 0's node address and a free port (Ray Train's recipe). Rank 0 streams the
generated tokens back.

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
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

from .sampling import SamplingParams


class GroupUnhealthy(RuntimeError):
    """A rank died or stopped answering; the group must be rebuilt."""


@dataclass(frozen=True)
class GroupConfig:
    sp: int = 2  # P: ranks in the group
    model: str = "default"  # 'default', a checkpoint folder or a .gguf path
    num_cpus_per_rank: float = 0.5
    num_gpus_per_rank: float = 0.0  # 1 on GPU nodes: then NCCL is used
    max_context: int | None = None
    prefill_chunk: int = 8192
    block: int = 256  # decode / append tokens go to ranks round-robin in blocks of this many
    collective_timeout_s: float = 120.0  # a collective that waits longer fails the group
    call_timeout_s: float = 600.0  # the driver waits at most this long for one call on all ranks
    strategy: str = "PACK"  # placement-group strategy; STRICT_PACK keeps a group on one node
    # KV retention tiers per rank (workers/kvstore.py); kv_device_bytes = 0 keeps sessions in the
    # engine without a store (no tiers, nothing survives the group)
    kv_device_bytes: int = 0
    kv_host_bytes: int = 1 << 30
    kv_redis_bytes: int | None = None
    redis_url: str | None = None
    kv_device_idle_s: float = 300.0  # a standard session idle this long moves device -> host
    kv_host_idle_s: float = 3600.0  # ... and this long, host -> Redis
    kv_cold_idle_s: float = 60.0  # a cold session idle this long moves to Redis
    kv_namespace: str = "sp"  # keys name "{kv_namespace}{P}-r{rank}", so a new group of the same P restores


class ShardWorker:
    """One rank: a ShardEngine plus its share of every session. Runs as a Ray actor."""

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

        from .engine import ShardEngine
        from .loader import load_model

        use_nccl = self.cfg.num_gpus_per_rank > 0 and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(0)  # Ray pins one GPU per actor: set it before creating the NCCL group
            self.device = "cuda"
        else:
            torch.set_num_threads(max(1, int(round(self.cfg.num_cpus_per_rank)) or 1))
        dist.init_process_group("nccl" if use_nccl else "gloo", init_method=f"tcp://{addr}:{port}",
                                rank=self.rank, world_size=self.world,
                                timeout=datetime.timedelta(seconds=self.cfg.collective_timeout_s))
        loaded = load_model(self.cfg.model, device=self.device)
        store = None
        if self.cfg.kv_device_bytes:
            from .kvpolicy import IdlePolicy, TierCapacity
            from .kvstore import KVStore

            store = KVStore(f"{self.cfg.kv_namespace}{self.world}-r{self.rank}", loaded.fingerprint,
                            TierCapacity(self.cfg.kv_device_bytes, self.cfg.kv_host_bytes, self.cfg.kv_redis_bytes),
                            redis_url=self.cfg.redis_url, device=self.device,
                            idle=IdlePolicy(self.cfg.kv_device_idle_s, self.cfg.kv_host_idle_s, self.cfg.kv_cold_idle_s))
        self.engine = ShardEngine(loaded, dist.group.WORLD, max_context=self.cfg.max_context,
                                  prefill_chunk=self.cfg.prefill_chunk, block=self.cfg.block,
                                  timeout_s=self.cfg.collective_timeout_s, kvstore=store)
        return {"rank": self.rank, "pid": os.getpid(), "device": self.device,
                "backend": "nccl" if use_nccl else "gloo", "fingerprint": loaded.fingerprint,
                "max_context": self.engine.max_context}

    def prefill(self, sid: str, ids: list[int], opts: dict | None = None) -> dict:
        events = []
        t0 = time.perf_counter()
        self.engine.prefill(sid, ids, progress=lambda d, t: events.append((d, t)), **(opts or {}))
        self._busy_s += time.perf_counter() - t0
        return {**self._describe(sid), "progress": events}

    def append(self, sid: str, ids: list[int]) -> dict:
        t0 = time.perf_counter()
        self.engine.append(sid, ids)
        self._busy_s += time.perf_counter() - t0
        return self._describe(sid)

    def _describe(self, sid: str) -> dict:
        st = self.engine.kvstore
        if st is None:
            s = self.engine.session(sid)
            return {"length": s.length, "local_tokens": s.cache.length, "tier": "device"}
        from .engine import SessionError
        from .kvformat import KVNotFoundError

        try:
            state = st.state(sid)
            meta = st.meta(sid)
        except KVNotFoundError:
            raise SessionError(f"session {sid!r} is not held by this group") from None
        return {"length": meta.get("length", 0), "local_tokens": state.tokens, "tier": state.tier,
                "moves": st.tier_moves(sid), "retention": st.retention(sid)}

    def restore(self, sid: str) -> dict:
        self.engine.restore(sid)
        return self._describe(sid)

    def flush(self) -> None:
        if self.engine.kvstore is not None:
            self.engine.kvstore.flush()

    def generate(self, sid: str, ids: list[int], params: dict, retain: bool):
        """Rank 0: a generator of token ids (streamed); other ranks run along and return nothing."""
        sp = SamplingParams(**params)
        for tok in self.engine.generate(sid, ids, sp, retain=retain):
            yield tok

    def generate_all(self, sid: str, ids: list[int], params: dict, retain: bool) -> list[int]:
        return list(self.generate(sid, ids, params, retain))

    def drop(self, sid: str) -> None:
        self.engine.drop(sid)

    def sessions(self) -> dict:
        st = self.engine.kvstore
        if st is None:
            return {sid: {"length": s.length, "local_tokens": s.cache.length, "kv_bytes": s.cache.nbytes}
                    for sid, s in self.engine.sessions.items()}
        return {sid: self._describe(sid) for sid in st.sessions()}

    def stats(self) -> dict:
        st = self.engine.kvstore
        comm = self.engine.comm
        base = {"rank": self.rank, "device": self.device,
                "ring": {"steps": getattr(comm, "steps", 0), "wait_s": getattr(comm, "wait_s", 0.0),
                         "busy_s": self._busy_s},
                "counters": st.counters() if st is not None else {}}
        if st is None:
            used = sum(s.cache.nbytes for s in self.engine.sessions.values())
            return {**base, "sessions": len(self.engine.sessions), "bytes": {"hbm": used}, "free_device": 0}
        s = st.stats()
        t = s["tiers"]
        return {**base, "sessions": s["sessions"],
                "bytes": {"hbm": t["device"]["bytes"], "host": t["host"]["bytes"], "redis": t["redis"]["bytes"]},
                "free_device": max(0, t["device"]["capacity"] - t["device"]["bytes"])}

    def tick(self) -> list[tuple[str, str, str]]:
        """Apply the retention policy now (idle demotion, watermarks, write-through retries)."""
        st = self.engine.kvstore
        return st.tick() if st is not None else []

    def set_ttl(self, sid: str, ttl_s: float | None) -> None:
        st = self.engine.kvstore
        if st is not None:
            st.set_expiry(sid, st.clock() + ttl_s if ttl_s else None)

    def tier(self, sid: str) -> dict:
        return self._describe(sid)

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

    # -- the API

    def prefill(self, sid: str, ids: Sequence[int], **opts) -> dict:
        """Create a session; opts (with a KV store): retention, persist, ttl_s, allow_quantized."""
        return self._all([a.prefill.remote(sid, list(ids), opts) for a in self.ranks])[0]

    def restore(self, sid: str) -> dict:
        """Adopt a session persisted to Redis by another group with the same number of ranks."""
        return self._all([a.restore.remote(sid) for a in self.ranks])[0]

    def flush(self) -> None:
        """Wait until every rank's pending write-through reached Redis."""
        self._all([a.flush.remote() for a in self.ranks])

    def append(self, sid: str, ids: Sequence[int]) -> dict:
        return self._all([a.append.remote(sid, list(ids)) for a in self.ranks])[0]

    def generate(self, sid: str, ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
                 retain: bool = False) -> Iterator[int]:
        """Stream token ids from rank 0 while the other ranks run along."""
        import ray

        if not self.healthy:
            raise GroupUnhealthy(f"{self.name} is unhealthy: {self.reason}")
        p = asdict(params)
        others = [a.generate_all.remote(sid, list(ids), p, retain) for a in self.ranks[1:]]
        stream = self.ranks[0].generate.options(num_returns="streaming").remote(sid, list(ids), p, retain)
        while True:
            ready, _ = ray.wait([stream], timeout=self.cfg.call_timeout_s)
            if not ready:
                self._fail(f"rank 0 produced no token within {self.cfg.call_timeout_s:.0f} s")
                raise GroupUnhealthy(f"{self.name}: {self.reason}")
            try:
                ref = next(stream)
            except StopIteration:
                break
            yield self._all([ref])[0]
        self._all(others)

    def drop(self, sid: str) -> None:
        self._all([a.drop.remote(sid) for a in self.ranks])

    def sessions(self) -> list[dict]:
        return self._all([a.sessions.remote() for a in self.ranks])

    def stats(self) -> list[dict]:
        """Per rank: sessions, bytes per tier, free device-tier bytes."""
        return self._all([a.stats.remote() for a in self.ranks])

    def tick(self) -> list[tuple[str, str, str]]:
        """Apply every rank's retention policy now; rank 0's moves as (session, from, to). Ranks hold
        equal shares and see the same accesses, so they move the same sessions."""
        return self._all([a.tick.remote() for a in self.ranks])[0]

    def set_ttl(self, sid: str, ttl_s: float | None) -> None:
        self._all([a.set_ttl.remote(sid, ttl_s) for a in self.ranks])

    def describe(self, sid: str) -> dict:
        """Length, tier and this session's token count on rank 0."""
        return self._all([a.tier.remote(sid) for a in self.ranks])[0]

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


def _is_collective_failure(e: BaseException) -> bool:
    from .ring import CommTimeout

    if isinstance(e, CommTimeout):
        return True
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Timed out", "timed out", "Connection reset",
                                   "gloo", "NCCL", "Broken pipe"))
