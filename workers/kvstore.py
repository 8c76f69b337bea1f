"""Tiered KV retention for one rank: device memory -> (pinned) host memory -> Redis.

A `KVStore` holds this rank's shard (`KVShard`) of each retained session. A session is always in
exactly one of these states (`KVStore.state`):

    resident(device | host | redis)   the fastest tier holding a full copy
    moving(from -> to)                a tier move is in progress
    lost(reason)                      its data failed verification or its manifest is gone

A write-through session may also have a committed copy in Redis while resident above it.

Moves are large contiguous copies: device<->host on a side CUDA stream into a preallocated host pool
(pinned on CUDA; ordinary memory on a CPU-only build, where pin_memory() raises); host/device<->Redis
as self-describing chunks of `chunk_bytes` (kvformat.py), pipelined through a preallocated staging
buffer, optionally 8-bit (`ringserve.kernels.quant`) for sessions that opt in. The manifest is written
after the chunks it lists, so it is the commit marker; every key carries a TTL a margin past the
session's expiry, so a dead process leaks nothing for long.

Redis down: a demotion that cannot reach Redis leaves the session where it was and marks the Redis tier
degraded; a restore fails with KVUnavailableError after a bounded retry; redis-py reconnects on the
next command, and the next successful command clears the flag.

Threads: public methods hold one store lock. Write-through runs on one background thread that encodes
and writes chunks outside the lock (the device tensors it reads are never written in place: promotion
and append build new tensors) and commits the manifest under the lock.
"""

from __future__ import annotations

import bisect
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from .kvformat import (KeySpace, KVCapacityError, KVDataLossError, KVNotFoundError, KVShard, KVStoreError,
                       KVUnavailableError, ChunkPlan, decode, dtype_from_name, dtype_name, encode_into,
                       encoded_size, plan_chunks, shard_nbytes)
from .kvpolicy import (PERSIST_MODES, RETENTIONS, Candidate, IdlePolicy, TierCapacity, Watermarks,
                       idle_target, lower_tiers, lru_victims)

__all__ = ["KVStore", "KVShard", "KVState", "RedisOptions", "TierCapacity", "Watermarks", "IdlePolicy",
           "KVStoreError", "KVUnavailableError", "KVDataLossError", "KVNotFoundError", "KVCapacityError"]

log = logging.getLogger(__name__)
_ALIGN = 64  # host-pool blocks start on 64-byte boundaries
MOVE_HISTORY = 16  # tier changes remembered per session (read by the billing meter)


@dataclass(frozen=True)
class KVState:
    kind: str  # "resident" | "moving" | "lost"
    tier: str | None  # resident: the tier; moving: the source tier
    target: str | None = None  # moving: the destination tier
    reason: str = ""  # lost: what happened
    tokens: int = 0
    persisted_tokens: int = 0  # tokens with a committed copy in Redis


@dataclass(frozen=True)
class RedisOptions:
    """How the store talks to Redis. A failing call is retried `attempts` times with exponential
    backoff, and never for longer than `deadline_s` in all, so a dead Redis costs bounded time."""

    attempts: int = 3
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 0.5
    deadline_s: float = 3.0
    connect_timeout_s: float = 1.0
    socket_timeout_s: float = 5.0  # per socket read/write, so a hung server cannot hang us either
    ttl_margin_s: float = 300.0  # keys outlive the session's expiry by this much
    default_ttl_s: float = 86400.0  # TTL of a session put without expire_at
    retry_interval_s: float = 1.0  # store-clock seconds between background attempts while degraded
    pipeline_bytes: int = 64 << 20  # staging buffer: values in flight per pipelined round trip


# ---------------------------------------------------------------------------------------------------
# host tier: one preallocated buffer and a first-fit allocator


class HostPool:
    """A preallocated (pinned on CUDA) byte buffer handing out aligned blocks; no allocation per move."""

    def __init__(self, nbytes: int, *, pinned: bool):
        self.pinned = pinned
        self.size = nbytes + (1 << 20 if nbytes else 0)  # slack for block alignment
        self.buf = torch.empty(self.size, dtype=torch.uint8, pin_memory=pinned)
        if not pinned:
            self.buf.zero_()  # fault the pages in now (pinned memory already is), not during the first move
        self._free: list[tuple[int, int]] = [(0, self.size)] if self.size else []  # sorted (offset, size)

    def alloc(self, nbytes: int) -> int | None:
        need = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        for i, (off, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, size - need)
                return off
        return None

    def free(self, off: int, nbytes: int) -> None:
        size = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        i = bisect.bisect(self._free, (off, size))
        self._free.insert(i, (off, size))
        if i + 1 < len(self._free) and off + size == self._free[i + 1][0]:  # merge with the next block
            self._free[i] = (off, size + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:  # and with the previous one
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]

    def views(self, off: int, shape: Sequence[int], dtype: torch.dtype) -> KVShard:
        """k, v, positions viewed in place at block `off`: positions first (8-byte aligned), then k, v."""
        L, Hkv, T, D = shape
        nk = L * Hkv * T * D * torch.empty((), dtype=dtype).element_size()
        b = self.buf
        pos = b[off:off + 8 * T].view(torch.int64)
        k = b[off + 8 * T:off + 8 * T + nk].view(dtype).view(L, Hkv, T, D)
        v = b[off + 8 * T + nk:off + 8 * T + 2 * nk].view(dtype).view(L, Hkv, T, D)
        return KVShard(k, v, pos)


# ---------------------------------------------------------------------------------------------------
# Redis tier: bounded retries, pipelined chunk writes, fast bulk reads into a staging buffer


class RedisTier:
    def __init__(self, url: str, opts: RedisOptions, *, pinned: bool, min_staging: int):
        self.url, self.opts = url, opts
        self.client = redis.Redis.from_url(url, socket_timeout=opts.socket_timeout_s,
                                           socket_connect_timeout=opts.connect_timeout_s,
                                           socket_read_size=1 << 20, retry=Retry(NoBackoff(), 0))
        size = max(opts.pipeline_bytes, min_staging)
        self._staging = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        if not pinned:
            self._staging.zero_()  # resident from the start, like pinned memory
        self._staging_mv = memoryview(self._staging.numpy()).cast("B")
        self._io = threading.Lock()  # one user of the staging buffer at a time
        self.error: str | None = None  # set while degraded: the last failure
        self.errors = 0  # calls that failed after their retries (for metrics)

    @property
    def degraded(self) -> bool:
        return self.error is not None

    def call(self, what: str, fn: Callable):
        """Run fn() with bounded retries; KVUnavailableError when Redis stays unreachable."""
        o, t0, err = self.opts, time.monotonic(), None
        for attempt in range(o.attempts):
            try:
                out = fn()
                self.error = None
                return out
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                err = e
            pause = min(o.backoff_cap_s, o.backoff_base_s * 2 ** attempt)
            if attempt + 1 == o.attempts or time.monotonic() - t0 + pause > o.deadline_s:
                break
            time.sleep(pause)
        self.error = f"{type(err).__name__}: {err}"
        self.errors += 1
        raise KVUnavailableError(
            f"Redis at {self._where()} is unreachable ({what}; {attempt + 1} attempts over "
            f"{time.monotonic() - t0:.2f} s; last error {self.error}). The KV stays in memory where it was; "
            "check that Redis is running — the store reconnects by itself, retry later.")

    def _where(self) -> str:
        kw = self.client.connection_pool.connection_kwargs
        return f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}"

    # -- writes --------------------------------------------------------------------------------------

    def write_values(self, items: Iterator[tuple[str, dict, list]], ttl_ms: int) -> list[dict]:
        """SET every (key, header, tensors) value with a TTL, pipelined in batches that fill the staging
        buffer; returns one manifest entry per value. A failed batch is retried whole (SET is idempotent)."""
        entries: list[dict] = []
        with self._io:
            batch, used = [], 0
            for key, header, tensors in items:
                n = encoded_size(header, [(nm, t.dtype, tuple(t.shape)) for nm, t in tensors])
                if used + n > len(self._staging_mv) and batch:
                    self._flush(batch, ttl_ms)
                    batch, used = [], 0
                view = self._staging_mv[used:used + n] if n <= len(self._staging_mv) else memoryview(bytearray(n))
                _, checksum = encode_into(view, header, tensors)
                batch.append((key, view))
                used += n if n <= len(self._staging_mv) else 0
                entries.append(dict(_entry(header), key=key, nbytes=n, payload_xxh3=checksum))
            if batch:
                self._flush(batch, ttl_ms)
        return entries

    def _flush(self, batch: list[tuple[str, memoryview]], ttl_ms: int) -> None:
        def send():
            pipe = self.client.pipeline(transaction=False)
            for key, view in batch:
                pipe.set(key, view, px=ttl_ms)
            pipe.execute()
        self.call(f"writing {len(batch)} KV chunks", send)

    def set_small(self, key: str, value: bytes, ttl_ms: int, what: str) -> None:
        self.call(what, lambda: self.client.set(key, value, px=ttl_ms))

    # -- reads ---------------------------------------------------------------------------------------

    def read_values(self, entries: Sequence[dict]) -> Iterator[tuple[dict, memoryview | None]]:
        """Yield (entry, value bytes or None if the key is gone), batch by batch; a view is valid only
        until the next one is requested (it points into the staging buffer)."""
        with self._io:
            i = 0
            while i < len(entries):
                batch, used = [], 0
                while i < len(entries) and (not batch or used + entries[i]["nbytes"] <= len(self._staging_mv)):
                    batch.append(entries[i])
                    used += entries[i]["nbytes"]
                    i += 1
                values = self.call(f"reading {len(batch)} KV chunks", lambda: self._get_many(batch))
                yield from zip(batch, values)

    def get_small(self, key: str, what: str):
        return self.call(what, lambda: self.client.get(key))

    def _get_many(self, batch: Sequence[dict]) -> list[memoryview | None]:
        """Pipelined GETs read straight into the staging buffer with recv_into.

        redis-py's pure-Python reply parser copies every bulk reply through a BytesIO and caps restores
        near 0.6 GB/s; reading the replies of our own pipelined GETs off the connection's socket halves
        the copies. It uses a pooled redis-py connection (so AUTH, TLS and the database come from the URL)
        and falls back to a plain pipeline if that connection has no socket attribute.
        """
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            if getattr(conn, "_sock", None) is None:
                conn.connect()
            sock = getattr(conn, "_sock", None)
            if sock is None:
                pipe = self.client.pipeline(transaction=False)
                for e in batch:
                    pipe.get(e["key"])
                return [None if v is None else memoryview(v) for v in pipe.execute()]
            conn.send_packed_command(conn.pack_commands([("GET", e["key"]) for e in batch]))
            out, used, rest = [], 0, bytearray()
            for e in batch:
                line = _read_line(sock, rest)
                if line[:1] == b"-":
                    raise redis.ResponseError(line[1:].decode(errors="replace"))
                n = int(line[1:])
                if n < 0:
                    out.append(None)
                    continue
                fits = n == e["nbytes"] and used + n <= len(self._staging_mv)
                dst = self._staging_mv[used:used + n] if fits else memoryview(bytearray(n))
                used += n if fits else 0
                _read_exact(sock, rest, dst)
                _read_exact(sock, rest, memoryview(bytearray(2)))  # the CRLF after the bulk string
                out.append(dst)
            if rest:
                raise redis.ConnectionError("unexpected bytes after the pipelined replies")
            return out
        except BaseException:
            conn.disconnect()  # never hand a connection in an unknown protocol state back to the pool
            raise
        finally:
            pool.release(conn)


def _read_line(sock: socket.socket, rest: bytearray) -> bytes:
    while True:
        i = rest.find(b"\r\n")
        if i >= 0:
            line = bytes(rest[:i])
            del rest[:i + 2]
            return line
        data = sock.recv(65536)
        if not data:
            raise redis.ConnectionError("Redis closed the connection")
        rest += data


def _read_exact(sock: socket.socket, rest: bytearray, dst: memoryview) -> None:
    m = min(len(rest), len(dst))
    dst[:m] = rest[:m]
    del rest[:m]
    got = m
    while got < len(dst):
        n = sock.recv_into(dst[got:], len(dst) - got)
        if n == 0:
            raise redis.ConnectionError("Redis closed the connection")
        got += n


def _entry(header: dict) -> dict:
    return {k: header[k] for k in ("kind", "encoding", "l0", "l1", "t0", "t1")}


# ---------------------------------------------------------------------------------------------------
# the store


class _Session:
    """Book-keeping of one session (all fields guarded by the store lock)."""

    def __init__(self, sid: str, shape, dtype, meta, *, retention, persist, quantized, expire_at, now, clock):
        self.id, self.shape, self.dtype, self.meta = sid, tuple(shape), dtype, dict(meta)
        self.retention, self.persist, self.quantized = retention, persist, quantized
        self.expire_at, self.last_access = expire_at, now
        self._clock = clock
        self._tier: str | None = None  # "device" | "host" | "redis"
        # the last tier changes as (number, store-clock time, new tier); billing meters from these
        self.moves: list[tuple[int, float, str]] = []
        self.move_count = 0
        self.data: KVShard | None = None  # the in-memory copy (device tensors or host-pool views)
        self.host_off: int | None = None
        self.moving: tuple[str, str] | None = None
        self.lost: str | None = None
        self.entries: list[dict] = []  # committed Redis values, in manifest order
        self.redis_tokens = 0  # tokens [0, redis_tokens) are committed in Redis
        self.redis_bytes = 0
        self.wt_pending = False  # a write-through is queued or failed and waits for a retry

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
    def nbytes(self) -> int:
        return shard_nbytes(self.shape, self.dtype)

    @property
    def tokens(self) -> int:
        return self.shape[2]

    @property
    def encoding(self) -> str:
        return "int8" if self.quantized else "raw"


class KVStore:
    """One rank's tiered KV store. See the module docstring for states, moves and failure behaviour.

    namespace: names this rank's keys (e.g. "group3-rank1"); fingerprint: `LoadedModel.fingerprint`,
    so KV never meets other weights; capacity: bytes per tier; redis_url: None = no Redis tier;
    clock: seconds, monotonic (inject one in tests); chunk_bytes: target size of one Redis value.
    """

    def __init__(self, namespace: str, fingerprint: str, capacity: TierCapacity, *, redis_url: str | None = None,
                 device: str | torch.device = "cpu", clock: Callable[[], float] = time.monotonic,
                 idle: IdlePolicy = IdlePolicy(), watermarks: Watermarks = Watermarks(),
                 chunk_bytes: int = 16 << 20, redis_options: RedisOptions = RedisOptions()):
        KeySpace(fingerprint, "x", namespace)  # validates both names now
        self.namespace, self.fingerprint, self.capacity = namespace, fingerprint, capacity
        self.device = torch.device(device)
        self.clock, self.idle, self.marks, self.chunk_bytes = clock, idle, watermarks, chunk_bytes
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None  # side stream for tier copies
        self.host = HostPool(capacity.host, pinned=cuda)
        self.redis = (RedisTier(redis_url, redis_options, pinned=cuda, min_staging=2 * chunk_bytes + (1 << 20))
                      if redis_url else None)
        self.ropts = redis_options
        self._used = {"device": 0, "host": 0, "redis": 0}
        # cumulative, for metrics: moves[(from, to)] = [count, bytes, seconds]; restores; lost
        self._counters = {"moves": {}, "restores": 0, "lost": 0}
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.RLock()
        self._redis_next_try = float("-inf")  # background Redis attempts wait for this store-clock time
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._write_through_loop, name=f"kv-wt-{namespace}", daemon=True)
        self._worker.start()

    # -- public API ----------------------------------------------------------------------------------

    def put(self, session_id: str, shard: KVShard, *, retention: str = "standard", persist: str = "on_demote",
            expire_at: float | None = None, allow_quantized: bool = False) -> KVState:
        """Retain `shard` as `session_id` on the device tier (demoting LRU sessions to make room).

        retention: "hot" (never leaves the device), "standard" (tiered), "cold" (to Redis once idle).
        persist: "on_demote" (Redis only when demoted) or "write_through" (to Redis in the background
        now and after each append). expire_at: store-clock time the session expires; Redis keys live
        `ttl_margin_s` longer. allow_quantized: its Redis copy may be 8-bit (int8 per token and head).
        """
        if retention not in RETENTIONS:
            raise ValueError(f"retention must be one of {RETENTIONS}, got {retention!r}")
        if persist not in PERSIST_MODES:
            raise ValueError(f"persist must be one of {PERSIST_MODES}, got {persist!r}")
        if persist == "write_through" and self.redis is None:
            raise ValueError("persist='write_through' needs a Redis tier: construct the store with redis_url")
        KeySpace(self.fingerprint, session_id, self.namespace)
        with self._lock:
            if session_id in self._sessions:
                raise ValueError(f"session {session_id!r} is already stored on {self.namespace}; "
                                 "append to it or delete it first")
            s = _Session(session_id, shard.k.shape, shard.k.dtype, shard.meta, retention=retention, persist=persist,
                         quantized=allow_quantized, expire_at=expire_at, now=self.clock(), clock=self.clock)
            self._make_room("device", s)
            s.data = self._to_device(shard)
            s.tier = "device"
            self._used["device"] += s.nbytes
            self._sessions[session_id] = s
            if persist == "write_through":
                self._queue_write_through(s)
            return self._state(s)

    def get(self, session_id: str) -> KVShard:
        """The session's shard on the device tier, promoting it first. Read-only: do not write into it."""
        with self._lock:
            s = self._session(session_id)
            s.last_access = self.clock()
            if s.tier != "device":
                self._promote(s)
            return KVShard(s.data.k, s.data.v, s.data.positions, dict(s.meta))

    def append(self, session_id: str, delta: KVShard) -> KVState:
        """Add the tokens of a turn (k, v (L, Hkv, Tn, D), positions (Tn,)) after the session's tokens.

        meta of the delta replaces the session's meta when non-empty. Write-through sessions persist
        only the new tokens (and a new manifest) in the background.
        """
        with self._lock:
            s = self._session(session_id)
            s.last_access = self.clock()
            if s.tier != "device":
                self._promote(s)
            cur = s.data
            if (delta.k.shape[0], delta.k.shape[1], delta.k.shape[3]) != (s.shape[0], s.shape[1], s.shape[3]) \
                    or delta.k.dtype != s.dtype:
                raise ValueError(f"delta {tuple(delta.k.shape)} {delta.k.dtype} does not match session "
                                 f"{session_id!r} {s.shape} {s.dtype}")
            grown = KVShard(torch.cat([cur.k, delta.k.to(self.device)], 2), torch.cat([cur.v, delta.v.to(self.device)], 2),
                            torch.cat([cur.positions, delta.positions.to(self.device)]), delta.meta or s.meta)
            extra = grown.nbytes - s.nbytes
            self._used["device"] -= s.nbytes
            try:
                self._make_room("device", s, need=grown.nbytes)
            finally:
                self._used["device"] += s.nbytes
            s.data, s.shape, s.meta = grown, tuple(grown.k.shape), dict(grown.meta)
            self._used["device"] += extra
            if s.persist == "write_through":
                self._queue_write_through(s)
            return self._state(s)

    def delete(self, session_id: str) -> None:
        """Free the session on every tier, its Redis keys included (also one known only to Redis)."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
            if s is None:
                if self.redis is None:
                    raise KVNotFoundError(f"session {session_id!r} is not stored on {self.namespace}")
                keys = KeySpace(self.fingerprint, session_id, self.namespace)
                header = self._read_manifest(keys, missing_ok=True)
                if header is None and not self.redis.get_small(keys.begin, "checking a session"):
                    raise KVNotFoundError(f"session {session_id!r} is not stored on {self.namespace} nor in Redis")
                entries = header["values"] if header else []
                self.redis.call("deleting a session", lambda: self.redis.client.delete(
                    keys.manifest, keys.begin, *[e["key"] for e in entries]))
                return
            self._drop_memory(s)
            self._used["redis"] -= s.redis_bytes
            if self.redis is not None:
                keys = KeySpace(self.fingerprint, s.id, self.namespace)
                try:  # the manifest goes first: a crash in between leaves uncommitted chunks that expire by TTL
                    self.redis.call("deleting a session", lambda: self.redis.client.delete(
                        keys.manifest, keys.begin, *[e["key"] for e in s.entries]))
                except KVUnavailableError as e:  # freed here; its keys expire by their TTL
                    log.warning("deleted %s from memory; its Redis keys will expire by TTL: %s", s.id, e)

    def state(self, session_id: str) -> KVState:
        s = self._sessions.get(session_id)
        if s is None:
            raise KVNotFoundError(f"session {session_id!r} is not stored on {self.namespace}")
        return self._state(s)

    def demote(self, session_id: str, to: str | None = None) -> KVState:
        """Move a session down now (to the next lower tier by default). If the target cannot take it
        (full, or Redis unreachable) the session stays where it is and the state says so."""
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
                if s.lost or s.tier not in ("device", "host"):
                    continue
                target = idle_target(self._candidate(s), now, self.idle, has_redis=self.redis is not None)
                if target is not None:
                    src = s.tier
                    if self._demote(s, target, background=True):
                        moves.append((s.id, src, s.tier))
            for tier in ("device", "host"):
                for sid in lru_victims(self._candidates(tier), used=self._used[tier], need=0,
                                       capacity=self.capacity.of(tier), marks=self.marks):
                    s = self._sessions[sid]
                    if self._demote(s, None, background=True):
                        moves.append((sid, tier, s.tier))
            if self.redis is not None and self._redis_due():
                for s in [s for s in self._sessions.values() if s.wt_pending and not self._jobs.unfinished_tasks]:
                    self._persist_now(s, background=True)
        return moves

    def restore(self, session_id: str, *, to: str = "device", expire_at: float | None = None) -> KVState:
        """Adopt a session from Redis (written by another, possibly dead, group) and load it to `to`.

        The expiry is taken from the manifest's remaining TTL unless given. Raises KVNotFoundError if
        Redis has no such session, KVDataLossError if it is incomplete or corrupt (nothing is loaded),
        KVUnavailableError if Redis is down.
        """
        if self.redis is None:
            raise KVUnavailableError("this store has no Redis tier to restore from: construct it with redis_url")
        with self._lock:
            if session_id in self._sessions:
                s = self._sessions[session_id]
            else:
                keys = KeySpace(self.fingerprint, session_id, self.namespace)
                h = self._read_manifest(keys, missing_ok=False)
                pttl = self.redis.call("reading a manifest TTL", lambda: self.redis.client.pttl(keys.manifest))
                if expire_at is None and pttl and pttl > 0:
                    expire_at = self.clock() + max(0.0, pttl / 1000 - self.ropts.ttl_margin_s)
                s = _Session(session_id, h["shape"], dtype_from_name(h["dtype"]), h["meta"],
                             retention=h["retention"], persist=h["persist"], quantized=h["encoding"] == "int8",
                             expire_at=expire_at, now=self.clock(), clock=self.clock)
                s.tier, s.entries, s.redis_tokens = "redis", h["values"], h["shape"][2]
                s.redis_bytes = sum(e["nbytes"] for e in s.entries)
                self._used["redis"] += s.redis_bytes
                self._sessions[session_id] = s
                self._counters["restores"] += 1
            s.last_access = self.clock()
            if to == "device" and s.tier != "device":
                self._promote(s)
            elif to == "host" and s.tier == "redis":
                self._load_to_host(s)
            return self._state(s)

    def set_expiry(self, session_id: str, expire_at: float | None) -> None:
        """Change the session's expiry (store clock) and the TTL of its Redis keys."""
        with self._lock:
            s = self._session(session_id, allow_lost=True)
            s.expire_at = expire_at
            if self.redis is not None and s.entries:
                keys = KeySpace(self.fingerprint, s.id, self.namespace)
                ttl = self._ttl_ms(s)

                def expire():
                    pipe = self.redis.client.pipeline(transaction=False)
                    for key in [keys.manifest, keys.begin, *[e["key"] for e in s.entries]]:
                        pipe.pexpire(key, ttl)
                    pipe.execute()
                self.redis.call("extending key TTLs", expire)

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

    def stats(self) -> dict:
        """Bytes and sessions per tier, capacities, and whether the Redis tier is degraded."""
        with self._lock:
            ss = list(self._sessions.values())
            tiers = {t: {"bytes": self._used[t], "capacity": getattr(self.capacity, t),
                         "sessions": sum(1 for s in ss if s.tier == t and not s.lost)} for t in ("device", "host", "redis")}
            tiers["host"]["pinned"] = self.host.pinned
            tiers["redis"]["sessions_persisted"] = sum(1 for s in ss if s.entries)
            tiers["redis"]["enabled"] = self.redis is not None
            tiers["redis"]["degraded"] = bool(self.redis and self.redis.degraded)
            tiers["redis"]["error"] = self.redis.error if self.redis else None
            return {"namespace": self.namespace, "sessions": len(ss), "lost": sum(1 for s in ss if s.lost),
                    "moving": sum(1 for s in ss if s.moving), "tiers": tiers}

    def counters(self) -> dict:
        """Cumulative counts for metrics: {"moves": {(from, to): [count, bytes, seconds]}, "restores",
        "lost", "redis_errors"}; bytes are the session's in-memory size."""
        with self._lock:
            return {"moves": {k: list(v) for k, v in self._counters["moves"].items()},
                    "restores": self._counters["restores"], "lost": self._counters["lost"],
                    "redis_errors": self.redis.errors if self.redis else 0}

    def retention(self, session_id: str) -> str:
        with self._lock:
            return self._session(session_id, allow_lost=True).retention

    def _count_move(self, src: str, dst: str, nbytes: int, t0: float) -> None:
        c = self._counters["moves"].setdefault((src, dst), [0, 0, 0.0])
        c[0] += 1
        c[1] += nbytes
        c[2] += max(0.0, self.clock() - t0)

    def tier_moves(self, session_id: str) -> list[tuple[int, float, str]]:
        """The session's last tier changes as (number, seconds ago, new tier), oldest first; the
        first entry is its placement. Numbers increase by one per change, so a reader can tell
        which it has seen."""
        with self._lock:
            s = self._session(session_id, allow_lost=True)
            now = self.clock()
            return [(n, max(0.0, now - t), tier) for n, t, tier in s.moves]

    def meta(self, session_id: str) -> dict:
        """The session's metadata (as given with its last put or append)."""
        with self._lock:
            return dict(self._session(session_id).meta)

    def sessions(self) -> list[str]:
        return list(self._sessions)

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=5)
        if self.redis is not None:
            self.redis.client.close()

    # -- moves ---------------------------------------------------------------------------------------

    def _make_room(self, tier: str, s: _Session, need: int | None = None) -> None:
        """Demote LRU sessions of `tier` so that s (need bytes) fits; KVCapacityError if it cannot."""
        need = s.nbytes if need is None else need
        cap = self.capacity.of(tier)
        hot = sum(o.nbytes for o in self._sessions.values() if o.tier == tier and o.retention == "hot" and o is not s)
        if need + hot > cap:
            raise KVCapacityError(
                f"session {s.id!r} needs {need} bytes on the {tier} tier of {self.namespace}, which holds "
                f"{cap:.0f} bytes ({hot} of them pinned by hot sessions): raise the {tier} capacity, "
                "shorten the session, or spread it over more ranks")
        for sid in lru_victims(self._candidates(tier, exclude=s), used=self._used[tier], need=need,
                               capacity=cap, marks=self.marks):
            self._demote(self._sessions[sid], None, background=True)
        if self._used[tier] + need > cap:
            why = f"; Redis tier degraded ({self.redis.error})" if self.redis and self.redis.degraded else ""
            raise KVCapacityError(
                f"the {tier} tier of {self.namespace} is full ({self._used[tier]} of {cap:.0f} bytes) and "
                f"nothing more can be demoted to make room for {need} bytes of session {s.id!r}{why}; "
                "retry later or raise the tier capacities")

    def _demote(self, s: _Session, target: str | None, *, background: bool) -> bool:
        """Move s down to `target` (default: the nearest lower tier that takes it). True if it moved."""
        if s.lost or s.retention == "hot" or s.tier == "redis":
            return False
        targets = [target] if target else lower_tiers(s.tier, has_redis=self.redis is not None)
        for t in targets:
            if t == "host" and s.tier == "device" and self._fits_host(s) and self._move_to_host(s):
                return True
            if t == "redis" and self.redis is not None:
                if background and not self._redis_due():
                    return False
                t0 = self.clock()
                if self._persist_now(s, background=background):
                    src = s.tier
                    self._count_move(src, "redis", s.nbytes, t0)
                    s.moving = (src, "redis")
                    self._drop_memory(s)
                    s.tier, s.moving = "redis", None
                    return True
                return False
        return False

    def _fits_host(self, s: _Session) -> bool:
        if s.nbytes > self.capacity.host:
            return False
        try:
            self._make_room("host", s)
        except KVCapacityError:
            return False
        return True

    def _move_to_host(self, s: _Session) -> bool:
        off = self._host_alloc(s)
        if off is None:
            return False
        t0 = self.clock()
        s.moving = (s.tier, "host")
        dst = self.host.views(off, s.shape, s.dtype)
        self._copy([dst.k, dst.v, dst.positions], [s.data.k, s.data.v, s.data.positions])
        self._drop_memory(s)
        s.data, s.host_off, s.tier, s.moving = KVShard(dst.k, dst.v, dst.positions, s.meta), off, "host", None
        self._used["host"] += s.nbytes
        self._count_move("device", "host", s.nbytes, t0)
        return True

    def _host_alloc(self, s: _Session) -> int | None:
        """A pool block for s; fragmentation is treated as pressure (LRU host sessions go to Redis)."""
        off = self.host.alloc(s.nbytes)
        for victim in sorted(self._candidates("host", exclude=s), key=lambda c: c.last_access):
            if off is not None:
                break
            self._demote(self._sessions[victim.session], "redis", background=True)
            off = self.host.alloc(s.nbytes)
        return off

    def _promote(self, s: _Session) -> None:
        """Bring s to the device tier (from host memory, or straight from Redis). Raises if it cannot."""
        if s.lost:
            raise KVDataLossError(f"session {s.id!r} is lost: {s.lost}")
        self._make_room("device", s)
        src, t0 = s.tier, self.clock()
        s.moving = (src, "device")
        try:
            dev = KVShard(*(torch.empty(s.shape, dtype=s.dtype, device=self.device) for _ in range(2)),
                          torch.empty(s.tokens, dtype=torch.int64, device=self.device), s.meta)
            if src == "host":
                self._copy([dev.k, dev.v, dev.positions], [s.data.k, s.data.v, s.data.positions])
                self._drop_memory(s)
            else:
                self._read_redis(s, dev)
        finally:
            s.moving = None
        s.data, s.tier = dev, "device"
        self._used["device"] += s.nbytes
        self._count_move(src, "device", s.nbytes, t0)

    def _load_to_host(self, s: _Session) -> None:
        if not self._fits_host(s) or (off := self._host_alloc(s)) is None:
            raise KVCapacityError(f"the host tier of {self.namespace} cannot hold session {s.id!r} ({s.nbytes} bytes)")
        s.moving, t0 = ("redis", "host"), self.clock()
        views = self.host.views(off, s.shape, s.dtype)
        try:
            self._read_redis(s, views)
        except BaseException:
            self.host.free(off, s.nbytes)
            raise
        finally:
            s.moving = None
        s.data, s.host_off, s.tier = KVShard(views.k, views.v, views.positions, s.meta), off, "host"
        self._used["host"] += s.nbytes
        self._count_move("redis", "host", s.nbytes, t0)

    def _drop_memory(self, s: _Session) -> None:
        if s.tier == "device" and s.data is not None:
            self._used["device"] -= s.nbytes
        elif s.tier == "host" and s.host_off is not None:
            self.host.free(s.host_off, s.nbytes)
            self._used["host"] -= s.nbytes
        s.data, s.host_off = None, None

    def _copy(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        """Large contiguous copies; on CUDA on the side stream, after the compute stream's pending work."""
        if self._stream is None:
            for d, x in zip(dst, src):
                d.copy_(x)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for d, x in zip(dst, src):
                d.copy_(x, non_blocking=True)
        self._stream.synchronize()

    def _to_device(self, shard: KVShard) -> KVShard:
        if shard.k.device == self.device:  # keep the caller's tensors: the store never writes into them
            return KVShard(shard.k.contiguous(), shard.v.contiguous(), shard.positions.contiguous(), dict(shard.meta))
        dev = KVShard(torch.empty_like(shard.k, device=self.device), torch.empty_like(shard.v, device=self.device),
                      torch.empty_like(shard.positions, device=self.device), dict(shard.meta))
        self._copy([dev.k, dev.v, dev.positions], [shard.k, shard.v, shard.positions])
        return dev

    # -- Redis persistence ---------------------------------------------------------------------------

    def _redis_due(self) -> bool:
        return not self.redis.degraded or self.clock() >= self._redis_next_try

    def _ttl_ms(self, s: _Session) -> int:
        left = (s.expire_at - self.clock()) if s.expire_at is not None else self.ropts.default_ttl_s
        return max(1000, int(1000 * (left + self.ropts.ttl_margin_s)))

    def _persist_now(self, s: _Session, *, background: bool) -> bool:
        """Write s's tokens not yet in Redis from its in-memory copy, then the manifest (under the lock)."""
        if s.redis_tokens >= s.tokens and s.entries:
            s.wt_pending = False
            return True
        try:
            entries = self._write_values(s, s.data, s.redis_tokens, s.tokens)
            self._commit(s, entries, s.tokens)
            return True
        except KVUnavailableError as e:
            self._redis_next_try = self.clock() + self.ropts.retry_interval_s
            log.warning("KV demotion of %s kept in memory: %s", s.id, e)
            if s.persist == "write_through":
                s.wt_pending = True
            return False
        except KVCapacityError as e:
            log.warning("KV demotion of %s kept in memory: %s", s.id, e)
            return False

    def _write_values(self, s: _Session, src: KVShard, t0: int, t1: int) -> list[dict]:
        """Write chunks for tokens [t0, t1) of `src` (a full-session shard); returns manifest entries."""
        L, Hkv, _, D = s.shape
        bpe = 1 + 4 / D if s.quantized else src.k.element_size()
        plans = plan_chunks(L, Hkv, D, t0, t1, bytes_per_elem=bpe, max_bytes=self.chunk_bytes)
        est = int(sum(2 * (p.l1 - p.l0) * Hkv * (p.t1 - p.t0) * D * bpe for p in plans) + 8 * (t1 - t0))
        if self._used["redis"] + est > self.capacity.of("redis"):
            raise KVCapacityError(f"the Redis tier of {self.namespace} is full ({self._used['redis']} of "
                                  f"{self.capacity.redis} bytes)")
        keys = KeySpace(self.fingerprint, s.id, self.namespace)
        ttl = self._ttl_ms(s)
        if not s.entries:
            self.redis.set_small(keys.begin, b"1", ttl, "marking a session write")
        base = {"fingerprint": self.fingerprint, "session": s.id, "namespace": self.namespace,
                "dtype": dtype_name(s.dtype), "encoding": s.encoding}
        return self.redis.write_values(self._value_items(keys, base, s, src, plans), ttl)

    def _value_items(self, keys: KeySpace, base: dict, s: _Session, src: KVShard, plans: list[ChunkPlan]):
        for p in plans:
            header = dict(base, kind=p.kind, l0=p.l0, l1=p.l1, t0=p.t0, t1=p.t1)
            if p.kind == "pos":
                yield keys.positions(p.t0, p.t1), header, [("positions", src.positions[p.t0:p.t1])]
                continue
            k = src.k[p.l0:p.l1, :, p.t0:p.t1]  # (l, Hkv, t, D)
            v = src.v[p.l0:p.l1, :, p.t0:p.t1]
            key = keys.chunk(p.l0, p.l1, p.t0, p.t1, s.encoding)
            if s.quantized:
                from ringserve.kernels.quant import quantize_kv
                qk, sk = quantize_kv(k)  # int8 (l, Hkv, t, D), scale (l, Hkv, t) fp32
                qv, sv = quantize_kv(v)
                yield key, header, [("k_q", qk), ("k_scale", sk), ("v_q", qv), ("v_scale", sv)]
            else:
                yield key, header, [("k", k), ("v", v)]

    def _commit(self, s: _Session, entries: list[dict], tokens: int) -> None:
        """Write the manifest listing every committed value (the commit marker), then record it."""
        keys = KeySpace(self.fingerprint, s.id, self.namespace)
        all_entries = s.entries + entries
        header = {"kind": "manifest", "fingerprint": self.fingerprint, "session": s.id, "namespace": self.namespace,
                  "dtype": dtype_name(s.dtype), "shape": [*s.shape[:2], tokens, s.shape[3]], "meta": s.meta,
                  "encoding": s.encoding, "retention": s.retention, "persist": s.persist, "values": all_entries}
        buf = bytearray(encoded_size(header, []))
        encode_into(memoryview(buf), header, [])
        self.redis.set_small(keys.manifest, bytes(buf), self._ttl_ms(s), "writing a manifest")
        added = sum(e["nbytes"] for e in entries)
        s.entries, s.redis_tokens = all_entries, tokens
        s.wt_pending = s.persist == "write_through" and tokens < s.tokens
        s.redis_bytes += added
        self._used["redis"] += added

    def _read_manifest(self, keys: KeySpace, *, missing_ok: bool) -> dict | None:
        raw = self.redis.get_small(keys.manifest, "reading a manifest")
        if raw is None:
            if missing_ok:
                return None
            if self.redis.get_small(keys.begin, "checking a session"):
                raise KVDataLossError(
                    f"session {keys.session!r} on {keys.namespace} is lost: its chunks were written but its "
                    "manifest (the commit marker) is missing; delete it and create the session again")
            raise KVNotFoundError(f"session {keys.session!r} of model {keys.fingerprint} is not in Redis "
                                  f"for {keys.namespace} (never persisted, deleted, or expired)")
        header, _ = decode(raw, keys.manifest, {"kind": "manifest", "fingerprint": keys.fingerprint,
                                                "session": keys.session, "namespace": keys.namespace})
        return header

    def _read_redis(self, s: _Session, dst: KVShard) -> None:
        """Fill dst from Redis, verifying the manifest and every value; the session is lost on failure."""
        keys = KeySpace(self.fingerprint, s.id, self.namespace)
        try:
            h = self._read_manifest(keys, missing_ok=False)
        except KVNotFoundError as e:  # we committed it, so a missing manifest means lost data
            raise self._lost(s, f"its Redis manifest is missing ({e})") from None
        except KVDataLossError as e:
            raise self._lost(s, str(e)) from None
        if h["values"] != s.entries or h["shape"][2] != s.tokens:
            raise self._lost(s, "its Redis manifest does not match what this store committed")
        if s.quantized:
            from ringserve.kernels.quant import dequantize_kv
        base = {"fingerprint": self.fingerprint, "session": s.id, "namespace": self.namespace,
                "dtype": dtype_name(s.dtype), "encoding": s.encoding}
        covered = 0
        for e, value in self.redis.read_values(s.entries):
            if value is None:
                raise self._lost(s, f"its Redis value {e['key']} is missing")
            try:
                _, parts = decode(value, e["key"], dict(base, **_entry(e), payload_xxh3=e["payload_xxh3"]))
            except KVDataLossError as err:
                raise self._lost(s, str(err)) from None
            t = slice(e["t0"], e["t1"])
            if e["kind"] == "pos":
                self._copy([dst.positions[t]], [parts["positions"]])
                continue
            l = slice(e["l0"], e["l1"])
            if s.quantized:
                k = dequantize_kv(parts["k_q"].to(self.device), parts["k_scale"].to(self.device), dtype=s.dtype)
                v = dequantize_kv(parts["v_q"].to(self.device), parts["v_scale"].to(self.device), dtype=s.dtype)
                self._copy([dst.k[l, :, t], dst.v[l, :, t]], [k, v])
            else:
                self._copy([dst.k[l, :, t], dst.v[l, :, t]], [parts["k"], parts["v"]])
            covered += (e["l1"] - e["l0"]) * (e["t1"] - e["t0"])
        if covered != s.shape[0] * s.tokens:
            raise self._lost(s, "its Redis values do not cover every layer and token")

    def _lost(self, s: _Session, reason: str) -> KVDataLossError:
        """Mark s lost (its memory copy, if any, is dropped) and return the error to raise."""
        s.lost, s.moving = reason, None
        self._counters["lost"] += 1
        self._drop_memory(s)
        return KVDataLossError(f"session {s.id!r} on {self.namespace} is lost: {reason}. It was not loaded; "
                              "delete it and create the session again")

    # -- write-through -------------------------------------------------------------------------------

    def _queue_write_through(self, s: _Session) -> None:
        s.wt_pending = True
        self._jobs.put((s, s.data, s.tokens))  # s.data's tensors are never written in place

    def _write_through_loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                s, src, tokens = job
                with self._lock:
                    t0 = s.redis_tokens
                    if self._sessions.get(s.id) is not s or t0 >= tokens:
                        continue
                try:
                    entries = self._write_values(s, src, t0, tokens)  # outside the lock: the slow part
                    with self._lock:
                        if self._sessions.get(s.id) is s and s.redis_tokens == t0:
                            self._commit(s, entries, tokens)
                            s.wt_pending = s.tokens > tokens
                except (KVUnavailableError, KVCapacityError) as e:
                    with self._lock:
                        self._redis_next_try = self.clock() + self.ropts.retry_interval_s
                    log.warning("write-through of %s failed, will retry: %s", s.id, e)
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
        return Candidate(s.id, s.tier, s.nbytes, s.last_access, s.retention)

    def _candidates(self, tier: str, exclude: _Session | None = None) -> list[Candidate]:
        return [self._candidate(s) for s in self._sessions.values()
                if s.tier == tier and s is not exclude and not s.lost and not s.moving]

    def _state(self, s: _Session) -> KVState:
        if s.lost:
            return KVState("lost", None, reason=s.lost, tokens=s.tokens, persisted_tokens=s.redis_tokens)
        if s.moving:
            return KVState("moving", s.moving[0], s.moving[1], tokens=s.tokens, persisted_tokens=s.redis_tokens)
        return KVState("resident", s.tier, tokens=s.tokens, persisted_tokens=s.redis_tokens)
