"""The Redis tier of the KV store: bounded retries, pipelined chunk I/O, and the manifest protocol.

`RedisTier` is the connection: every call has bounded retries and a deadline, so a dead Redis costs
bounded time and surfaces as `KVUnavailableError`; chunk values are written pipelined from a staging
buffer and read back with `recv_into` into it.

`RedisKV` is the protocol of one rank's sessions on top of it (format: kvformat.py): a session's
tokens [t0, t1) are written as chunks read straight out of its pages (8-bit when the session allows
it), then a manifest listing every committed value is written last — the commit marker. A `begin`
key written before the first chunk tells "lost" (chunks but no manifest) from "never persisted".
Reading verifies the manifest against what the store committed and every value's checksums, and
writes the values straight into pages of a pool; any mismatch is `KVDataLossError`, never data.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from .kvformat import (FORMAT_VERSION, ChunkPlan, KeySpace, Part, decode, dtype_name, encode_into, encoded_size,
                       plan_chunks)
from .kvpages import PagePool
from .protocol import KVDataLossError, KVNotFoundError, KVUnavailableError


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

    def write_values(self, items: Iterator[tuple[str, dict, list[Part]]], ttl_ms: int) -> list[dict]:
        """SET every (key, header, parts) value with a TTL, pipelined in batches that fill the staging
        buffer; returns one manifest entry per value. A failed batch is retried whole (SET is idempotent)."""
        entries: list[dict] = []
        with self._io:
            batch, used = [], 0
            for key, header, parts in items:
                n = encoded_size(header, parts)
                if used + n > len(self._staging_mv) and batch:
                    self._flush(batch, ttl_ms)
                    batch, used = [], 0
                view = self._staging_mv[used:used + n] if n <= len(self._staging_mv) else memoryview(bytearray(n))
                _, checksum = encode_into(view, header, parts)
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
# the manifest protocol of one rank's sessions


@dataclass(frozen=True)
class Manifest:
    """What a committed manifest says about one session's shard."""

    dtype: torch.dtype
    shape: tuple[int, int, int, int]  # (L, T, Hkv, D): T storage tokens
    meta: dict
    encoding: str  # "raw" | "int8" (an exact session's tokens) | "pages" (a packed format's pages as stored)
    retention: str
    persist: str
    values: list[dict]
    kv_format: str = "exact"

    @property
    def tokens(self) -> int:
        return self.shape[1]


class RedisKV:
    """Chunks and manifests of one rank's sessions (namespace) for one model (fingerprint)."""

    def __init__(self, tier: RedisTier, fingerprint: str, namespace: str, *, chunk_bytes: int):
        self.tier, self.fingerprint, self.namespace, self.chunk_bytes = tier, fingerprint, namespace, chunk_bytes

    def keys(self, sid: str) -> KeySpace:
        return KeySpace(self.fingerprint, sid, self.namespace)

    def _base(self, sid: str, dtype: torch.dtype, encoding: str) -> dict:
        return {"fingerprint": self.fingerprint, "session": sid, "namespace": self.namespace,
                "dtype": dtype_name(dtype), "encoding": encoding}

    def estimate(self, pool: PagePool, t0: int, t1: int, quantized: bool, per_page: int | None = None) -> int:
        """Bytes the values of tokens [t0, t1) will take (to check the tier's capacity first); per_page:
        a packed format's token slots per page (its whole pages are written)."""
        g = pool.geometry
        if per_page:
            return (-(-t1 // per_page) - t0 // per_page) * g.page_bytes
        bpe = 1 + 4 / g.head_dim if quantized else torch.empty((), dtype=g.dtype).element_size()
        return int(2 * g.layers * g.kv_heads * g.head_dim * (t1 - t0) * bpe)

    def write(self, sid: str, pool: PagePool, pages: list[int], t0: int, t1: int, *, quantized: bool,
              ttl_ms: int, first: bool, per_page: int | None = None) -> list[dict]:
        """Write storage tokens [t0, t1) of a session's pages as chunk values; returns their manifest entries.
        `first`: nothing of this session is in Redis yet (write the `begin` marker first). per_page: the
        session is in a packed format with this many token slots per page — its pages holding [t0, t1)
        are written whole, as their bytes (the compressed form, bit for bit)."""
        g = pool.geometry
        keys = self.keys(sid)
        if first:
            self.tier.set_small(keys.begin, b"1", ttl_ms, "marking a session write")
        if per_page:
            return self._write_pages(keys, sid, pool, pages, t0 // per_page, -(-t1 // per_page), ttl_ms)
        bpe = 1 + 4 / g.head_dim if quantized else torch.empty((), dtype=g.dtype).element_size()
        plans = plan_chunks(g.layers, g.kv_heads, g.head_dim, t0, t1, bytes_per_elem=bpe, max_bytes=self.chunk_bytes)
        encoding = "int8" if quantized else "raw"
        base = self._base(sid, g.dtype, encoding)
        return self.tier.write_values(self._items(keys, base, pool, pages, plans, quantized, encoding), ttl_ms)

    def _items(self, keys, base, pool: PagePool, pages, plans: list[ChunkPlan], quantized: bool, encoding: str):
        g = pool.geometry
        for p in plans:
            header = dict(base, kind="kv", l0=p.l0, l1=p.l1, t0=p.t0, t1=p.t1)
            shape = (p.l1 - p.l0, p.t1 - p.t0, g.kv_heads, g.head_dim)  # (l, t, Hkv, D)
            key = keys.chunk(p.l0, p.l1, p.t0, p.t1, encoding)
            layers = slice(p.l0, p.l1)
            if quantized:
                from ringserve.kernels.quant import quantize_kv

                k = torch.empty(shape, dtype=g.dtype, device=pool.device)
                v = torch.empty_like(k)
                pool.read(pages, layers, p.t0, p.t1, k, v)
                qk, sk = quantize_kv(k)  # int8 (l, t, Hkv, D), scale (l, t, Hkv) fp32
                qv, sv = quantize_kv(v)
                yield key, header, [Part.of("k_q", qk), Part.of("k_scale", sk), Part.of("v_q", qv), Part.of("v_scale", sv)]
            else:  # both parts are filled from the pages straight into the staging buffer
                def fill_k(dst, p=p, layers=layers):
                    k = pool.flat("k", layers)
                    for off, f, n in pool.slot_runs(pages, p.t0, p.t1):
                        dst[:, off - p.t0:off - p.t0 + n].copy_(k[:, f:f + n])

                def fill_v(dst, p=p, layers=layers):
                    v = pool.flat("v", layers)
                    for off, f, n in pool.slot_runs(pages, p.t0, p.t1):
                        dst[:, off - p.t0:off - p.t0 + n].copy_(v[:, f:f + n])
                yield key, header, [Part("k", g.dtype, shape, fill_k), Part("v", g.dtype, shape, fill_v)]

    def _write_pages(self, keys, sid: str, pool: PagePool, pages: list[int], p0: int, p1: int, ttl_ms: int) -> list[dict]:
        g = pool.geometry
        half = g.page_bytes // (2 * g.layers)  # bytes of one page-layer of K (or V)
        per_chunk = max(1, self.chunk_bytes // max(1, 2 * g.layers * half))  # pages per value, every layer
        base = self._base(sid, g.dtype, "pages")

        def items():
            for a in range(p0, p1, per_chunk):
                b = min(p1, a + per_chunk)
                idx = torch.as_tensor(pages[a:b], device=pool.device)
                header = dict(base, kind="pages", l0=0, l1=g.layers, t0=a, t1=b)
                shape = (g.layers, b - a, half)
                parts = [Part(name, torch.uint8, shape,
                              lambda dst, t=t, idx=idx: dst.copy_(t.view(torch.uint8).reshape(g.layers, pool.pages,
                                                                                               half)[:, idx]))
                         for name, t in (("k", pool.k), ("v", pool.v))]
                yield keys.chunk(0, g.layers, a, b, "pages"), header, parts
        return self.tier.write_values(items(), ttl_ms)

    def commit(self, sid: str, m: Manifest, ttl_ms: int) -> None:
        """Write the manifest listing every committed value: the commit marker."""
        header = {"kind": "manifest", "fingerprint": self.fingerprint, "session": sid, "namespace": self.namespace,
                  "dtype": dtype_name(m.dtype), "shape": list(m.shape), "meta": m.meta, "encoding": m.encoding,
                  "retention": m.retention, "persist": m.persist, "values": m.values, "kv_format": m.kv_format}
        buf = bytearray(encoded_size(header, []))
        encode_into(memoryview(buf), header, [])
        self.tier.set_small(self.keys(sid).manifest, bytes(buf), ttl_ms, "writing a manifest")

    def manifest(self, sid: str, *, missing_ok: bool) -> Manifest | None:
        from .kvformat import dtype_from_name

        keys = self.keys(sid)
        raw = self.tier.get_small(keys.manifest, "reading a manifest")
        if raw is None:
            if missing_ok:
                return None
            if self.tier.get_small(keys.begin, "checking a session"):
                raise KVDataLossError(
                    f"session {sid!r} on {self.namespace} is lost: its chunks were written but its manifest "
                    "(the commit marker) is missing; delete it and create the session again")
            for old in range(1, FORMAT_VERSION):
                if self.tier.get_small(keys.older_manifest(old), "checking an older format"):
                    raise KVDataLossError(
                        f"session {sid!r} on {self.namespace} was persisted in KV format v{old} by an older "
                        f"ringserve; this build reads only v{FORMAT_VERSION}: create the session again")
            raise KVNotFoundError(f"session {sid!r} of model {self.fingerprint} is not in Redis for "
                                  f"{self.namespace} (never persisted, deleted, or expired)")
        h, _ = decode(raw, keys.manifest, {"kind": "manifest", "fingerprint": self.fingerprint, "session": sid,
                                           "namespace": self.namespace})
        return Manifest(dtype_from_name(h["dtype"]), tuple(h["shape"]), h["meta"], h["encoding"], h["retention"],
                        h["persist"], h["values"], h.get("kv_format", "exact"))

    def ttl_ms(self, sid: str) -> int:
        keys = self.keys(sid)
        return self.tier.call("reading a manifest TTL", lambda: self.tier.client.pttl(keys.manifest))

    def read(self, sid: str, m: Manifest, pool: PagePool, pages: list[int]) -> None:
        """Fill storage [0, m.tokens) of `pages` from the values the manifest lists, verifying each.
        Raises KVDataLossError saying what failed (the caller marks the session lost)."""
        L = m.shape[0]
        quantized = m.encoding == "int8"
        base = self._base(sid, m.dtype, m.encoding)
        covered = 0
        for e, value in self.tier.read_values(m.values):
            if value is None:
                raise KVDataLossError(f"its Redis value {e['key']} is missing")
            _, parts = decode(value, e["key"], dict(base, **_entry(e), payload_xxh3=e["payload_xxh3"]))
            layers = slice(e["l0"], e["l1"])
            if e["kind"] == "pages":  # a packed format's pages, byte for byte
                idx = torch.as_tensor(pages[e["t0"]:e["t1"]], device=pool.device)
                for name, t in (("k", pool.k), ("v", pool.v)):
                    t.view(torch.uint8).reshape(t.shape[0], pool.pages, -1)[:, idx] = parts[name].to(pool.device)
                covered += (e["l1"] - e["l0"]) * (e["t1"] - e["t0"])
                continue
            if quantized:
                from ringserve.kernels.quant import dequantize_kv

                k = dequantize_kv(parts["k_q"].to(pool.device), parts["k_scale"].to(pool.device), dtype=m.dtype)
                v = dequantize_kv(parts["v_q"].to(pool.device), parts["v_scale"].to(pool.device), dtype=m.dtype)
            else:
                k, v = parts["k"], parts["v"]
            pool.fill(pages, layers, e["t0"], k, v)
            covered += (e["l1"] - e["l0"]) * (e["t1"] - e["t0"])
        want = L * (len(pages) if m.encoding == "pages" else m.tokens)
        if covered != want:
            raise KVDataLossError("its Redis values do not cover every layer and token")

    def delete(self, sid: str, values: Sequence[dict]) -> None:
        """The manifest goes first: a crash in between leaves uncommitted chunks that expire by TTL."""
        keys = self.keys(sid)
        self.tier.call("deleting a session", lambda: self.tier.client.delete(
            keys.manifest, keys.begin, *[e["key"] for e in values]))

    def expire(self, sid: str, values: Sequence[dict], ttl_ms: int) -> None:
        keys = self.keys(sid)

        def run():
            pipe = self.tier.client.pipeline(transaction=False)
            for key in [keys.manifest, keys.begin, *[e["key"] for e in values]]:
                pipe.pexpire(key, ttl_ms)
            pipe.execute()
        self.tier.call("extending key TTLs", run)
