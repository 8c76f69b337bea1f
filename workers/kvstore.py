"""Tiered KV retention for one rank: device pages -> (pinned) host pages -> Redis. The tier state machine.

A `KVStore` holds this rank's shard of each retained session. The shard lives in pages (kvpages.py):
on the device tier in the device pool, on the host tier in a host pool of the same page geometry, in
Redis as checksummed chunks under a manifest (kvredis.py, format in kvformat.py). A session is always
in exactly one of these states (`KVStore.state`):

    resident(device | host | redis)   the fastest tier holding a full copy
    moving(from -> to)                a tier move is in progress
    lost(reason)                      its data failed verification or its manifest is gone

A write-through session may also have a committed copy in Redis while resident above it.

How the engine uses it (no working copies, ever):

    store.create(sid, meta=..., retention=..., persist=...)     an empty session on the device tier
    with store.lease(sid) as kv:                                 promoted to the device if needed, and
        store.reserve(sid, n)                                    pinned there while the request runs;
        kv.write(layer, kv.slots(a, b), k, v)                    pages for storage [0, n); new K/V go
        ... attention reads kv's pages in place ...              straight into them
        store.commit(sid, n, meta=...)                           storage [0, n) is the session now
    # leaving the lease drops uncommitted slots (a turn that is not retained) and unpins

Moves copy whole pages between pools run by run, or encode them into Redis values straight from the
pages. A pinned session (a request or a write-through is using it) is never demoted or freed: a
delete of a pinned session frees its pages when the last user lets go. Capacity is a hard limit in
pages; running out gives `KVCapacityError` with the numbers.

Redis down: a demotion that cannot reach Redis leaves the session where it was and marks the Redis
tier degraded; a restore fails with KVUnavailableError after a bounded retry; redis-py reconnects on
the next command, and the next successful command clears the flag.

Threads: public methods hold one store lock. Write-through runs on one background thread that encodes
and writes chunks outside the lock (the session is pinned, and committed slots are never rewritten)
and commits the manifest under the lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .kvpages import KVView, PageGeometry, PagePool
from .kvpolicy import (PERSIST_MODES, RETENTIONS, Candidate, IdlePolicy, TierCapacity, Watermarks, idle_target,
                       lower_tiers, lru_victims)
from .kvredis import Manifest, RedisKV, RedisOptions, RedisTier
from .protocol import (KVCapacityError, KVDataLossError, KVNotFoundError, KVUnavailableError, MoveCount,
                       SessionExistsError, StoreCounters)

__all__ = ["KVStore", "KVState", "PageGeometry", "RedisOptions", "TierCapacity", "Watermarks", "IdlePolicy"]

log = logging.getLogger(__name__)
MOVE_HISTORY = 16  # tier changes remembered per session (read by the billing meter)


@dataclass
class _Conversion:
    session: "_Session"
    lay: object  # kvcodec.PageLayout of the new format
    pages: list[int]  # reserved device pages
    tokens: int  # tokens the session holds afterwards


@dataclass(frozen=True)
class KVState:
    kind: str  # "resident" | "moving" | "lost"
    tier: str | None  # resident: the tier; moving: the source tier
    target: str | None = None  # moving: the destination tier
    reason: str = ""  # lost: what happened
    tokens: int = 0
    persisted_tokens: int = 0  # tokens with a committed copy in Redis
    nbytes: int = 0  # bytes the session occupies in its tier (pages, or Redis values)


class _Session:
    """Book-keeping of one session (all fields guarded by the store lock)."""

    def __init__(self, sid: str, meta: dict, *, retention, persist, quantized, expire_at, now, clock, lay):
        self.id, self.meta = sid, dict(meta)
        self.retention, self.persist, self.quantized = retention, persist, quantized
        self.lay = lay  # the session's KV format (kvcodec.PageLayout): token slots per page, packing
        self.expire_at, self.last_access = expire_at, now
        self._clock = clock
        self._tier: str | None = None  # "device" | "host" | "redis"
        # the last tier changes as (number, store-clock time, new tier); billing meters from these
        self.moves: list[tuple[int, float, str]] = []
        self.move_count = 0
        self.pages: list[int] = []  # its pages in the pool of its tier (device or host); [] in Redis
        self.tokens = 0  # committed storage tokens
        self.moving: tuple[str, str] | None = None
        self.lost: str | None = None
        self.entries: list[dict] = []  # committed Redis values, in manifest order
        self.redis_tokens = 0  # tokens [0, redis_tokens) are committed in Redis
        self.redis_bytes = 0
        self.wt_pending = False  # a write-through is queued or failed and waits for a retry
        self.pins = 0  # requests and write-throughs using its pages right now
        self.dead = False  # deleted while pinned: freed when the last pin goes

    @property
    def tier(self) -> str | None:
        return self._tier

    @tier.setter
    def tier(self, value: str | None) -> None:
        if value != self._tier and value is not None:
            self.move_count += 1
            self.moves = (self.moves + [(self.move_count, self._clock(), value)])[-MOVE_HISTORY:]
        self._tier = value

    @property
    def encoding(self) -> str:
        """How its Redis values are written: a packed format's pages as they are; an exact session's
        tokens, 8-bit when it allows it."""
        if self.lay.format != "exact":
            return "pages"
        return "int8" if self.quantized else "raw"

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.lay.tokens)


class KVStore:
    """One rank's tiered, paged KV store. See the module docstring for the states, moves and failures.

    namespace: names this rank's keys (e.g. "sp2-r1"); fingerprint: `LoadedModel.fingerprint`, so KV
    never meets other weights; geometry: the page shape; capacity: bytes per tier (the memory tiers
    hold capacity // page_bytes pages); redis_url: None = no Redis tier; clock: seconds, monotonic
    (inject one in tests); chunk_bytes: target size of one Redis value.
    """

    def __init__(self, namespace: str, fingerprint: str, geometry: PageGeometry, capacity: TierCapacity, *,
                 redis_url: str | None = None, device: str | torch.device = "cpu",
                 clock: Callable[[], float] = time.monotonic, idle: IdlePolicy = IdlePolicy(),
                 watermarks: Watermarks = Watermarks(), chunk_bytes: int = 16 << 20,
                 redis_options: RedisOptions = RedisOptions()):
        from .kvformat import KeySpace

        KeySpace(fingerprint, "x", namespace)  # validates both names now
        self.namespace, self.fingerprint, self.capacity, self.geometry = namespace, fingerprint, capacity, geometry
        self.device = torch.device(device)
        self.clock, self.idle, self.marks, self.chunk_bytes = clock, idle, watermarks, chunk_bytes
        cuda = self.device.type == "cuda"
        pb = geometry.page_bytes
        self.pools = {"device": PagePool(geometry, capacity.device // pb, device=self.device),
                      "host": PagePool(geometry, capacity.host // pb, device="cpu", pinned=cuda, touch=True)}
        self._stream = torch.cuda.Stream(self.device) if cuda else None  # side stream for tier copies
        self.ropts = redis_options
        self.redis = (RedisTier(redis_url, redis_options, pinned=cuda, min_staging=2 * chunk_bytes + (1 << 20))
                      if redis_url else None)
        self.rkv = RedisKV(self.redis, fingerprint, namespace, chunk_bytes=chunk_bytes) if self.redis else None
        self._redis_used = 0
        self._moves: dict[tuple[str, str], list] = {}  # (from, to) -> [count, bytes, seconds], for metrics
        self._restores = self._lost_count = 0
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.RLock()
        self._redis_next_try = float("-inf")  # background Redis attempts wait for this store-clock time
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._write_through_loop, name=f"kv-wt-{namespace}", daemon=True)
        self._worker.start()

    # -- sessions ------------------------------------------------------------------------------------

    def create(self, session_id: str, *, meta: dict | None = None, retention: str = "standard",
               persist: str = "on_demote", expire_at: float | None = None, quantized: bool = False,
               kv_format: str = "exact") -> KVState:
        """A new, empty session on the device tier (its pages come with `reserve`).

        retention: "hot" (never leaves the device), "standard" (tiered), "cold" (to Redis once idle).
        persist: "on_demote" (Redis only when demoted) or "write_through" (to Redis in the background
        after every commit). expire_at: store-clock time the session expires; Redis keys live
        `ttl_margin_s` longer. quantized: its Redis copy may be 8-bit (int8 per token and head).
        kv_format: how its K/V are kept in its pages on every tier (kvcodec.py: exact, fp8, int4).
        """
        from .kvformat import KeySpace

        if retention not in RETENTIONS:
            raise ValueError(f"retention must be one of {RETENTIONS}, got {retention!r}")
        if persist not in PERSIST_MODES:
            raise ValueError(f"persist must be one of {PERSIST_MODES}, got {persist!r}")
        if persist == "write_through" and self.redis is None:
            raise ValueError("persist='write_through' needs a Redis tier: construct the store with redis_url")
        KeySpace(self.fingerprint, session_id, self.namespace)
        with self._lock:
            if session_id in self._sessions:
                raise SessionExistsError(f"session {session_id!r} is already stored on {self.namespace}")
            s = _Session(session_id, meta or {}, retention=retention, persist=persist, quantized=quantized,
                         expire_at=expire_at, now=self.clock(), clock=self.clock, lay=self._layout(kv_format))
            s.tier = "device"
            self._sessions[session_id] = s
            return self._state(s)

    def acquire(self, session_id: str) -> KVView:
        """The session's pages on the device tier for one request: promoted first if needed and pinned
        (never demoted or freed) until `release(view)`."""
        with self._lock:
            s = self._session(session_id)
            s.last_access = self.clock()
            if s.tier != "device":
                self._promote(s)
            s.pins += 1
            view = KVView(self.pools["device"], s.pages, s.tokens, s.id, s.lay)
            view.owner = s
            return view

    def release(self, view: KVView) -> None:
        """End a request on the session: slots past the committed length are dropped and the pin goes
        (a session deleted meanwhile is freed now). Call once per `acquire`."""
        with self._lock:
            s = view.owner
            view.owner = None
            if s is None:
                return
            if not s.dead:
                self._trim(s, s.tokens)
                s.last_access = self.clock()
            self._unpin(s)

    @contextmanager
    def lease(self, session_id: str) -> Iterator[KVView]:
        """`acquire` ... `release` as a block."""
        view = self.acquire(session_id)
        try:
            yield view
        finally:
            self.release(view)

    def reserve(self, session_id: str, tokens: int) -> None:
        """Pages for storage [0, tokens) of a leased session (demoting LRU sessions to make room).
        Raises KVCapacityError, with the numbers, when the device tier cannot hold them."""
        with self._lock:
            s = self._session(session_id)
            if s.tier != "device" or not s.pins:
                raise RuntimeError(f"reserve() needs session {session_id!r} leased on the device tier")
            need = s.pages_for(tokens) - len(s.pages)
            if need <= 0:
                return
            self._make_room("device", s, need)
            got = self.pools["device"].alloc(need, after=s.pages[-1] if s.pages else None)
            assert got is not None  # _make_room guaranteed the free pages
            s.pages.extend(got)  # the same list object the lease's KVView reads

    def commit(self, session_id: str, tokens: int, meta: dict | None = None) -> KVState:
        """Storage [0, tokens) of the (leased) session now holds its tokens; slots past it are freed.
        Shrinking below what is already committed is refused (its Redis copy would disagree)."""
        with self._lock:
            s = self._session(session_id)
            if tokens < s.tokens:
                raise ValueError(f"session {session_id!r} holds {s.tokens} committed tokens; cannot commit {tokens}")
            if tokens > len(s.pages) * s.lay.tokens:
                raise ValueError(f"session {session_id!r} has pages for {len(s.pages) * s.lay.tokens} tokens, "
                                 f"not {tokens}: reserve() first")
            grew = tokens > s.tokens
            s.tokens = tokens
            if meta is not None:
                s.meta = dict(meta)
            self._trim(s, tokens)
            s.last_access = self.clock()
            if grew and s.persist == "write_through":
                self._queue_write_through(s)
            return self._state(s)

    def put(self, session_id: str, k: torch.Tensor, v: torch.Tensor, *, meta: dict | None = None, **opts) -> KVState:
        """Store a whole shard k, v (L, T, Hkv, D) as a new session (create + reserve + write + commit)."""
        T = k.shape[1]
        self.create(session_id, meta=meta, **opts)
        try:
            with self.lease(session_id) as kv:
                self.reserve(session_id, T)
                slots = kv.slots(0, T)
                for layer in range(self.geometry.layers):
                    kv.write(layer, slots, k[layer].to(self.device), v[layer].to(self.device))
                return self.commit(session_id, T)
        except BaseException:
            self.delete(session_id)
            raise

    def read(self, session_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the session's shard as k, v (L, T, Hkv, D) on the device (promoting it first), in the
        model dtype (a packed format decoded)."""
        g = self.geometry
        with self.lease(session_id) as kv:
            T = kv.length
            k = torch.empty(g.layers, T, g.kv_heads, g.head_dim, dtype=g.dtype, device=self.device)
            v = torch.empty_like(k)
            for layer in range(g.layers):
                for off, kr, vr in kv.layer_runs(layer, T):
                    k[layer, off:off + kr.shape[0]], v[layer, off:off + vr.shape[0]] = kr, vr
            kv.pool.bytes_copied += 2 * k.numel() * k.element_size()
            return k, v

    def kv_format(self, session_id: str) -> str:
        with self._lock:
            return self._session(session_id, allow_lost=True).lay.format

    def stored_bytes(self, session_id: str) -> int:
        """Bytes the session's stored tokens take in its format, scales included, its pages' unused slots
        aside: what its retention is priced by (against its tokens x `geometry.token_bytes`)."""
        from .kvcodec import token_bytes

        with self._lock:
            s = self._session(session_id, allow_lost=True)
            g = self.geometry
            return s.tokens * 2 * g.layers * token_bytes(s.lay.format, g.kv_heads, g.head_dim, g.dtype)

    def convert(self, session_id: str, kv_format: str, keep: torch.Tensor | None = None) -> KVState:
        """Re-encode a session's KV in another format (`convert_begin` + `convert_finish`)."""
        ticket = self.convert_begin(session_id, kv_format, None if keep is None else int(keep.numel()))
        return self.convert_finish(ticket, keep)

    def convert_begin(self, session_id: str, kv_format: str, kept: int | None = None) -> "_Conversion":
        """Reserve the device pages a conversion needs (the session promoted and pinned meanwhile), so that
        `convert_finish` cannot fail; `kept`: only that many of its tokens will be kept (an eviction).
        KVCapacityError if the pages are not there; `convert_abort` gives them back."""
        from .kvcodec import ORDER

        with self._lock:
            s = self._session(session_id)
            if kv_format not in ORDER:
                raise ValueError(f"unknown KV format {kv_format!r}; formats: {', '.join(ORDER)}")
            if s.pins:
                raise KVCapacityError(f"session {session_id!r} is in use; convert it between requests")
            if s.tier != "device":
                self._promote(s)
            lay = self._layout(kv_format)
            tokens = s.tokens if kept is None else kept
            need = -(-tokens // lay.tokens)
            s.pins += 1  # nothing moves it while both copies exist
            try:
                self._make_room("device", s, need)
            except BaseException:
                self._unpin(s)
                raise
            return _Conversion(s, lay, self.pools["device"].alloc(need), tokens)

    def convert_abort(self, c: "_Conversion") -> None:
        with self._lock:
            self.pools["device"].free(c.pages)
            self._unpin(c.session)

    def convert_finish(self, c: "_Conversion", keep: torch.Tensor | None = None) -> KVState:
        """Write the session's tokens (those at storage indices `keep`, in order, when given) into the
        reserved pages in the new format; free the old pages; replace its Redis copy."""
        with self._lock:
            s, pool = c.session, self.pools["device"]
            src = KVView(pool, s.pages, s.tokens, s.id, s.lay)
            dst = KVView(pool, c.pages, 0, s.id, c.lay)
            slots = dst.slots(0, c.tokens)
            for layer in range(self.geometry.layers):
                runs = src.layer_runs(layer, s.tokens)
                if runs:
                    k, v = torch.cat([r[1] for r in runs]), torch.cat([r[2] for r in runs])
                    if keep is not None:
                        k, v = k[keep.to(k.device)], v[keep.to(v.device)]
                    dst.write(layer, slots, k, v)
            pool.free(s.pages)
            s.pages, s.lay, s.tokens = c.pages, c.lay, c.tokens
            self._unpin(s)
            if self.rkv is not None and s.entries:  # the Redis copy is of the old content: write a new one
                try:
                    self.rkv.delete(s.id, s.entries)
                except KVUnavailableError as e:
                    log.warning("old Redis copy of %s expires by TTL: %s", s.id, e)
                self._redis_used -= s.redis_bytes
                s.entries, s.redis_tokens, s.redis_bytes = [], 0, 0
                if s.persist == "write_through":
                    self._queue_write_through(s)
            return self._state(s)

    def set_meta(self, session_id: str, meta: dict) -> None:
        with self._lock:
            self._session(session_id).meta = dict(meta)

    def _layout(self, kv_format: str):
        from .kvcodec import layout

        g = self.geometry
        return layout(kv_format, g.block, g.kv_heads, g.head_dim, g.dtype)

    def delete(self, session_id: str) -> None:
        """Free the session on every tier, its Redis keys included (also one known only to Redis)."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
            if s is None:
                if self.rkv is None:
                    raise KVNotFoundError(f"session {session_id!r} is not stored on {self.namespace}")
                m = self.rkv.manifest(session_id, missing_ok=True)
                keys = self.rkv.keys(session_id)
                if m is None and not self.redis.get_small(keys.begin, "checking a session"):
                    raise KVNotFoundError(f"session {session_id!r} is not stored on {self.namespace} nor in Redis")
                self.rkv.delete(session_id, m.values if m else [])
                return
            s.dead = True
            if not s.pins:
                self._drop_memory(s)
            self._redis_used -= s.redis_bytes
            if self.rkv is not None:
                try:
                    self.rkv.delete(s.id, s.entries)
                except KVUnavailableError as e:  # freed here; its keys expire by their TTL
                    log.warning("deleted %s from memory; its Redis keys will expire by TTL: %s", s.id, e)

    def state(self, session_id: str) -> KVState:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise KVNotFoundError(f"session {session_id!r} is not stored on {self.namespace}")
            return self._state(s)

    def demote(self, session_id: str, to: str | None = None) -> KVState:
        """Move a session down now (to the next lower tier by default). If the target cannot take it
        (full, Redis unreachable, or the session is in use) it stays where it is and the state says so."""
        with self._lock:
            s = self._session(session_id)
            self._demote(s, to, background=False)
            return self._state(s)

    def tick(self) -> list[tuple[str, str, str]]:
        """Apply the policy now: drop expired sessions, demote idle ones, bring tiers under their
        watermarks, retry failed write-throughs. Returns the moves made as (session, from, to)."""
        moves: list[tuple[str, str, str]] = []
        with self._lock:
            now = self.clock()
            for s in [s for s in self._sessions.values() if s.expire_at is not None and now >= s.expire_at]:
                self.delete(s.id)  # Redis down: its keys expire by TTL
            for s in sorted(self._sessions.values(), key=lambda s: s.last_access):
                if s.lost or s.pins or s.tier not in ("device", "host"):
                    continue
                target = idle_target(self._candidate(s), now, self.idle, has_redis=self.redis is not None)
                if target is not None:
                    src = s.tier
                    if self._demote(s, target, background=True):
                        moves.append((s.id, src, s.tier))
            for tier in ("device", "host"):
                for sid in lru_victims(self._candidates(tier), used=self._used(tier), need=0,
                                       capacity=self._cap(tier), marks=self.marks):
                    s = self._sessions[sid]
                    if self._demote(s, None, background=True):
                        moves.append((sid, tier, s.tier))
            if self.redis is not None and self._redis_due():
                for s in [s for s in self._sessions.values() if s.wt_pending and not self._jobs.unfinished_tasks]:
                    self._persist_now(s)
        return moves

    def restore(self, session_id: str, *, to: str = "device", expire_at: float | None = None) -> KVState:
        """Adopt a session from Redis (written by another, possibly dead, group) and load it to `to`.

        The expiry is taken from the manifest's remaining TTL unless given. Raises KVNotFoundError if
        Redis has no such session, KVDataLossError if it is incomplete, corrupt or of an older format
        (nothing is loaded), KVUnavailableError if Redis is down.
        """
        if self.rkv is None:
            raise KVUnavailableError("this store has no Redis tier to restore from: construct it with redis_url")
        with self._lock:
            if session_id in self._sessions:
                s = self._sessions[session_id]
            else:
                m = self.rkv.manifest(session_id, missing_ok=False)
                g = self.geometry
                if (m.shape[0], m.shape[2], m.shape[3]) != (g.layers, g.kv_heads, g.head_dim) or m.dtype != g.dtype:
                    raise KVDataLossError(f"session {session_id!r} in Redis has shape {m.shape} {m.dtype}; this "
                                          f"store holds (L, Hkv, D) = {(g.layers, g.kv_heads, g.head_dim)} {g.dtype}")
                pttl = self.rkv.ttl_ms(session_id)
                if expire_at is None and pttl and pttl > 0:
                    expire_at = self.clock() + max(0.0, pttl / 1000 - self.ropts.ttl_margin_s)
                s = _Session(session_id, m.meta, retention=m.retention, persist=m.persist,
                             quantized=m.encoding == "int8", expire_at=expire_at, now=self.clock(), clock=self.clock,
                             lay=self._layout(m.kv_format))
                s.tier, s.entries, s.redis_tokens, s.tokens = "redis", m.values, m.tokens, m.tokens
                s.redis_bytes = sum(e["nbytes"] for e in s.entries)
                self._redis_used += s.redis_bytes
                self._sessions[session_id] = s
                self._restores += 1
            s.last_access = self.clock()
            if to == "device" and s.tier != "device":
                self._promote(s)
            elif to == "host" and s.tier == "redis":
                self._load(s, "host")
            return self._state(s)

    def set_expiry(self, session_id: str, expire_at: float | None) -> None:
        """Change the session's expiry (store clock) and the TTL of its Redis keys."""
        with self._lock:
            s = self._session(session_id, allow_lost=True)
            s.expire_at = expire_at
            if self.rkv is not None and s.entries:
                self.rkv.expire(s.id, s.entries, self._ttl_ms(s))

    def set_retention(self, session_id: str, retention: str) -> None:
        """Change the session's retention class; the tier policy applies it from its next tick (a session
        made "hot" is promoted to the device with its next request and then stays there)."""
        if retention not in RETENTIONS:
            raise ValueError(f"retention must be one of {RETENTIONS}, got {retention!r}")
        with self._lock:
            self._session(session_id, allow_lost=True).retention = retention

    def forget(self, session_id: str) -> None:
        """Drop a session from this store's memory (its pages are freed once unpinned) without touching
        its Redis copy, which expires by its TTL: for a copy that was adopted but must not be served."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
            if s is None:
                return
            s.dead = True
            if not s.pins:
                self._drop_memory(s)
            self._redis_used -= s.redis_bytes

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until queued write-throughs are done; KVUnavailableError names those that failed."""
        t0 = time.monotonic()
        while self._jobs.unfinished_tasks:
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"write-through still running after {timeout} s")
            time.sleep(0.005)
        with self._lock:
            failed = sorted(s.id for s in self._sessions.values() if s.wt_pending)
        if failed:
            raise KVUnavailableError(f"write-through of sessions {failed} could not reach Redis "
                                     f"({self.redis.error}); they stay in memory and tick() retries")

    # -- introspection -------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Bytes, pages and sessions per tier, capacities, and whether the Redis tier is degraded."""
        with self._lock:
            ss = list(self._sessions.values())
            tiers = {t: {"bytes": self._used(t), "capacity": getattr(self.capacity, t),
                         "sessions": sum(1 for s in ss if s.tier == t and not s.lost)} for t in ("device", "host", "redis")}
            for t in ("device", "host"):
                tiers[t].update(pages=self.pools[t].pages, free_pages=self.pools[t].free_pages)
            tiers["host"]["pinned"] = self.pools["host"].k.is_pinned()
            tiers["redis"]["sessions_persisted"] = sum(1 for s in ss if s.entries)
            tiers["redis"]["enabled"] = self.redis is not None
            tiers["redis"]["degraded"] = bool(self.redis and self.redis.degraded)
            tiers["redis"]["error"] = self.redis.error if self.redis else None
            return {"namespace": self.namespace, "sessions": len(ss), "lost": sum(1 for s in ss if s.lost),
                    "moving": sum(1 for s in ss if s.moving), "page_bytes": self.geometry.page_bytes, "tiers": tiers}

    def counters(self) -> StoreCounters:
        """Cumulative counts for metrics and for the in-place checks (bytes written and copied on the device)."""
        with self._lock:
            dev = self.pools["device"]
            return StoreCounters(moves={k: MoveCount(*v) for k, v in self._moves.items()}, restores=self._restores,
                                 lost=self._lost_count, redis_errors=self.redis.errors if self.redis else 0,
                                 bytes_written=dev.bytes_written, bytes_copied=dev.bytes_copied,
                                 pages_allocated=dev.pages_allocated)

    def retention(self, session_id: str) -> str:
        with self._lock:
            return self._session(session_id, allow_lost=True).retention

    def tier_moves(self, session_id: str) -> list[tuple[int, float, str]]:
        """The session's last tier changes as (number, seconds ago, new tier), oldest first; the
        first entry is its placement. Numbers increase by one per change, so a reader can tell
        which it has seen."""
        with self._lock:
            s = self._session(session_id, allow_lost=True)
            now = self.clock()
            return [(n, max(0.0, now - t), tier) for n, t, tier in s.moves]

    def meta(self, session_id: str) -> dict:
        """The session's metadata (as given with its last commit)."""
        with self._lock:
            return dict(self._session(session_id).meta)

    def sessions(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=5)
        if self.redis is not None:
            self.redis.client.close()

    # -- memory --------------------------------------------------------------------------------------

    def _cap(self, tier: str) -> float:
        if tier == "redis":
            return self.capacity.of("redis")
        return self.pools[tier].pages * self.geometry.page_bytes

    def _used(self, tier: str) -> int:
        if tier == "redis":
            return self._redis_used
        p = self.pools[tier]
        return (p.pages - p.free_pages) * self.geometry.page_bytes

    def _nbytes(self, s: _Session) -> int:
        return len(s.pages) * self.geometry.page_bytes if s.tier in ("device", "host") else s.redis_bytes

    def _trim(self, s: _Session, tokens: int) -> None:
        """Free the pages past storage [0, tokens)."""
        keep = s.pages_for(tokens)
        if s.tier in ("device", "host") and len(s.pages) > keep:
            self.pools[s.tier].free(s.pages[keep:])
            del s.pages[keep:]

    def _unpin(self, s: _Session) -> None:
        s.pins -= 1
        if s.dead and not s.pins:
            self._drop_memory(s)

    def _drop_memory(self, s: _Session) -> None:
        if s.tier in ("device", "host") and s.pages:
            self.pools[s.tier].free(s.pages)
        s.pages = []

    def _make_room(self, tier: str, s: _Session, need: int) -> None:
        """Demote LRU sessions of `tier` so that `need` more pages of s fit; KVCapacityError if they cannot."""
        pool, pb = self.pools[tier], self.geometry.page_bytes
        others = [o for o in self._sessions.values() if o.tier == tier and o is not s]
        hot = sum(len(o.pages) for o in others if o.retention == "hot")
        busy = sum(len(o.pages) for o in others if o.pins and o.retention != "hot")
        mine = len(s.pages) if s.tier == tier else 0
        if need + mine + hot > pool.pages:
            raise KVCapacityError(
                f"session {s.id!r} needs {need + mine} pages ({(need + mine) * pb} bytes) on the {tier} tier of "
                f"{self.namespace}, which has {pool.pages} pages of {pb} bytes ({hot} of them pinned by hot "
                f"sessions): raise the {tier} capacity, shorten the session, or spread it over more ranks")
        for sid in lru_victims(self._candidates(tier, exclude=s), used=self._used(tier), need=need * pb,
                               capacity=self._cap(tier), marks=self.marks):
            self._demote(self._sessions[sid], None, background=True)
        if pool.free_pages < need:
            why = f"; Redis tier degraded ({self.redis.error})" if self.redis and self.redis.degraded else ""
            raise KVCapacityError(
                f"the {tier} tier of {self.namespace} has {pool.free_pages} free pages of {pool.pages} and session "
                f"{s.id!r} needs {need} more ({need * pb} bytes); {busy} pages are held by requests in flight and "
                f"{hot} by hot sessions, and nothing more can be demoted{why}; retry later or raise the tier capacities")

    # -- moves ---------------------------------------------------------------------------------------

    def _demote(self, s: _Session, target: str | None, *, background: bool) -> bool:
        """Move s down to `target` (default: the nearest lower tier that takes it). True if it moved."""
        if s.lost or s.retention == "hot" or s.tier == "redis" or s.pins:
            return False
        targets = [target] if target else lower_tiers(s.tier, has_redis=self.redis is not None)
        for t in targets:
            if t == "host" and s.tier == "device" and self._move_pages(s, "host"):
                return True
            if t == "redis" and self.redis is not None:
                if background and not self._redis_due():
                    return False
                t0 = self.clock()
                if self._persist_now(s):
                    src, nbytes = s.tier, self._nbytes(s)
                    s.moving = (src, "redis")
                    self._drop_memory(s)
                    s.tier, s.moving = "redis", None
                    self._count_move(src, "redis", nbytes, t0)
                    return True
                return False
        return False

    def _move_pages(self, s: _Session, dst: str) -> bool:
        """Copy s's pages into the `dst` pool (device <-> host) and free the old ones. False if dst is full."""
        n = len(s.pages)
        try:
            self._make_room(dst, s, n)
        except KVCapacityError:
            if dst == "device":
                raise
            return False
        src, t0 = s.tier, self.clock()
        s.moving = (src, dst)
        new = self.pools[dst].alloc(n)
        try:
            self._copy(self.pools[src], self.pools[dst], s.pages, new)
        except BaseException:
            self.pools[dst].free(new)
            raise
        finally:
            s.moving = None
        self.pools[src].free(s.pages)
        s.pages, s.tier = new, dst
        self._count_move(src, dst, n * self.geometry.page_bytes, t0)
        return True

    def _promote(self, s: _Session) -> None:
        """Bring s to the device tier (from host memory, or straight from Redis). Raises if it cannot."""
        if s.lost:
            raise KVDataLossError(f"session {s.id!r} is lost: {s.lost}")
        if s.tier == "host":
            self._move_pages(s, "device")
        else:
            self._load(s, "device")

    def _load(self, s: _Session, dst: str) -> None:
        """Read s from Redis into fresh pages of the `dst` pool."""
        n = s.pages_for(s.tokens)
        self._make_room(dst, s, n)
        pages, t0 = self.pools[dst].alloc(n), self.clock()
        s.moving = ("redis", dst)
        try:
            self._read_redis(s, self.pools[dst], pages)
        except BaseException:
            self.pools[dst].free(pages)
            raise
        finally:
            s.moving = None
        s.pages, s.tier = pages, dst
        self._count_move("redis", dst, n * self.geometry.page_bytes, t0)

    def _copy(self, src: PagePool, dst: PagePool, src_pages: list[int], dst_pages: list[int]) -> None:
        """Whole-page copies; on CUDA on the side stream, after the compute stream's pending work."""
        if self._stream is None:
            src.copy_pages_to(dst, src_pages, dst_pages)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            src.copy_pages_to(dst, src_pages, dst_pages, non_blocking=True)
        self._stream.synchronize()

    def _count_move(self, src: str, dst: str, nbytes: int, t0: float) -> None:
        c = self._moves.setdefault((src, dst), [0, 0, 0.0])
        c[0] += 1
        c[1] += nbytes
        c[2] += max(0.0, self.clock() - t0)

    # -- Redis persistence ---------------------------------------------------------------------------

    def _redis_due(self) -> bool:
        return not self.redis.degraded or self.clock() >= self._redis_next_try

    def _ttl_ms(self, s: _Session) -> int:
        left = (s.expire_at - self.clock()) if s.expire_at is not None else self.ropts.default_ttl_s
        return max(1000, int(1000 * (left + self.ropts.ttl_margin_s)))

    def _persist_now(self, s: _Session) -> bool:
        """Write s's tokens not yet in Redis from its pages, then the manifest (under the lock)."""
        if s.redis_tokens >= s.tokens and s.entries:
            s.wt_pending = False
            return True
        try:
            entries = self._write_values(s, list(s.pages), s.redis_tokens, s.tokens)
            self._commit(s, entries, s.tokens)
            return True
        except KVUnavailableError as e:
            self._redis_next_try = self.clock() + self.ropts.retry_interval_s
            log.warning("KV persistence of %s kept in memory: %s", s.id, e)
            if s.persist == "write_through":
                s.wt_pending = True
            return False
        except KVCapacityError as e:
            log.warning("KV persistence of %s kept in memory: %s", s.id, e)
            return False

    def _write_values(self, s: _Session, pages: list[int], t0: int, t1: int) -> list[dict]:
        pool = self.pools[s.tier]
        per_page = s.lay.tokens if s.encoding == "pages" else None
        est = self.rkv.estimate(pool, t0, t1, s.quantized, per_page)
        if self._redis_used + est > self.capacity.of("redis"):
            raise KVCapacityError(f"the Redis tier of {self.namespace} is full ({self._redis_used} of "
                                  f"{self.capacity.redis} bytes)")
        return self.rkv.write(s.id, pool, pages, t0, t1, quantized=s.quantized, ttl_ms=self._ttl_ms(s),
                              first=not s.entries, per_page=per_page)

    def _commit(self, s: _Session, entries: list[dict], tokens: int) -> None:
        """Write the manifest listing every committed value (the commit marker), then record it. A packed
        session rewrites its last, partly filled page: the values of the pages written again are replaced."""
        g = self.geometry
        first_new = min((e["t0"] for e in entries if e["kind"] == "pages"), default=None)
        keep = [e for e in s.entries if first_new is None or e["kind"] != "pages" or e["t1"] <= first_new]
        replaced = [e for e in s.entries if e not in keep]
        values = keep + entries
        self.rkv.commit(s.id, Manifest(g.dtype, (g.layers, tokens, g.kv_heads, g.head_dim), s.meta, s.encoding,
                                       s.retention, s.persist, values, s.lay.format), self._ttl_ms(s))
        if replaced:  # after the manifest that no longer lists them; a failure leaves them to their TTL
            try:
                self.redis.call("dropping replaced values", lambda: self.redis.client.delete(
                    *[e["key"] for e in replaced if e["key"] not in {v["key"] for v in values}]))
            except KVUnavailableError:
                pass
        delta = sum(e["nbytes"] for e in entries) - sum(e["nbytes"] for e in replaced)
        s.entries, s.redis_tokens = values, tokens
        s.wt_pending = s.persist == "write_through" and tokens < s.tokens
        s.redis_bytes += delta
        self._redis_used += delta

    def _read_redis(self, s: _Session, pool: PagePool, pages: list[int]) -> None:
        """Fill pages from Redis, verifying the manifest and every value; the session is lost on failure."""
        try:
            m = self.rkv.manifest(s.id, missing_ok=False)
        except KVNotFoundError as e:  # we committed it, so a missing manifest means lost data
            raise self._lost(s, f"its Redis manifest is missing ({e})") from None
        except KVDataLossError as e:
            raise self._lost(s, str(e)) from None
        if m.values != s.entries or m.tokens != s.tokens:
            raise self._lost(s, "its Redis manifest does not match what this store committed")
        try:
            self.rkv.read(s.id, m, pool, pages)
        except KVDataLossError as e:
            raise self._lost(s, str(e)) from None

    def _lost(self, s: _Session, reason: str) -> KVDataLossError:
        """Mark s lost (its memory copy, if any, is dropped) and return the error to raise."""
        s.lost, s.moving = reason, None
        self._lost_count += 1
        self._drop_memory(s)
        return KVDataLossError(f"session {s.id!r} on {self.namespace} is lost: {reason}. It was not loaded; "
                               "delete it and create the session again")

    # -- write-through -------------------------------------------------------------------------------

    def _queue_write_through(self, s: _Session) -> None:
        s.wt_pending = True
        s.pins += 1  # released by the worker: the pages it reads stay where they are
        self._jobs.put((s, list(s.pages), s.tokens))

    def _write_through_loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                s, pages, tokens = job
                try:
                    with self._lock:
                        t0 = s.redis_tokens
                        if s.dead or self._sessions.get(s.id) is not s or t0 >= tokens:
                            continue
                    entries = self._write_values(s, pages, t0, tokens)  # outside the lock: the slow part
                    with self._lock:
                        if not s.dead and self._sessions.get(s.id) is s and s.redis_tokens == t0:
                            self._commit(s, entries, tokens)
                            s.wt_pending = s.tokens > tokens
                except (KVUnavailableError, KVCapacityError) as e:
                    with self._lock:
                        self._redis_next_try = self.clock() + self.ropts.retry_interval_s
                    log.warning("write-through of %s failed, will retry: %s", s.id, e)
                finally:
                    with self._lock:
                        self._unpin(s)
            except Exception:  # never let the worker die
                log.exception("write-through worker error")
            finally:
                self._jobs.task_done()

    # -- helpers -------------------------------------------------------------------------------------

    def _session(self, sid: str, *, allow_lost: bool = False) -> _Session:
        s = self._sessions.get(sid)
        if s is None:
            hint = " (after a group loss, restore() it from Redis)" if self.redis is not None else ""
            raise KVNotFoundError(f"session {sid!r} is not stored on {self.namespace}{hint}")
        if s.lost and not allow_lost:
            raise KVDataLossError(f"session {sid!r} on {self.namespace} is lost: {s.lost}")
        return s

    def _candidate(self, s: _Session) -> Candidate:
        return Candidate(s.id, s.tier, self._nbytes(s), s.last_access, s.retention)

    def _candidates(self, tier: str, exclude: _Session | None = None) -> list[Candidate]:
        return [self._candidate(s) for s in self._sessions.values()
                if s.tier == tier and s is not exclude and not s.lost and not s.moving and not s.pins]

    def _state(self, s: _Session) -> KVState:
        common = dict(tokens=s.tokens, persisted_tokens=s.redis_tokens, nbytes=self._nbytes(s))
        if s.lost:
            return KVState("lost", None, reason=s.lost, **common)
        if s.moving:
            return KVState("moving", s.moving[0], s.moving[1], **common)
        return KVState("resident", s.tier, **common)
