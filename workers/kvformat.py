"""The unit of retained KV (`KVShard`), the errors of the KV store, and the Redis value format.

Shape alphabet (as in model.py): L layers, Hkv KV heads, T tokens, D head dim.

A `KVShard` is one rank's shard of one session: k, v (L, Hkv, T, D) — the per-layer layout of the
engine's `KVCache`, sliced to the T tokens this rank holds — and the absolute positions (T,) of those
tokens (sequence-parallel ranks hold non-contiguous positions).

Redis value format, version 1. Every value is self-describing:

    offset  size  field
    0       4     magic b"RSKV"
    4       2     format version (little-endian u16)
    6       2     reserved (0)
    8       4     header length H (u32)
    12      8     xxh3_64 of the header bytes (u64)
    20      H     header: UTF-8 JSON (kind, format, fingerprint, session, namespace, layer and token
                  range, payload parts with dtype and shape, payload length, payload xxh3_64)
    20+H    P     payload: the parts, packed back to back in header order

A chunk holds layers [l0, l1) x tokens [t0, t1) of both K and V ("raw": k then v in the session
dtype; "int8": q_k, scale_k, q_v, scale_v in the `ringserve.kernels.quant` format). The positions of a
token range are their own value. The manifest — written after every chunk it lists, so it is the
commit marker — lists each value's key, ranges, size and payload checksum, and carries the shard's
dtype, shape and meta. A reader verifies the envelope, the header fields it expects, and both
checksums; anything else is `KVDataLossError`, never data.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import xxhash

FORMAT_VERSION = 1
MAGIC = b"RSKV"
_PREFIX = struct.Struct("<4sHHIQ")  # magic, version, reserved, header length, header xxh3_64
_CHECKSUM_PLACEHOLDER = "0" * 16  # the payload checksum is hex of fixed width, so the header length is known before it

# ---------------------------------------------------------------------------------------------------
# errors (the gRPC layer maps them: UNAVAILABLE, DATA_LOSS, NOT_FOUND, RESOURCE_EXHAUSTED)


class KVStoreError(Exception):
    """Base class of the KV store's errors."""


class KVUnavailableError(KVStoreError):
    """Redis could not be reached after a bounded retry (gRPC UNAVAILABLE: retry later)."""


class KVDataLossError(KVStoreError):
    """Stored KV failed verification or its manifest is gone; the session is lost (gRPC DATA_LOSS)."""


class KVNotFoundError(KVStoreError, KeyError):
    """No such session in this store or in Redis (gRPC NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class KVCapacityError(KVStoreError):
    """The tiers cannot hold the session (gRPC RESOURCE_EXHAUSTED)."""


# ---------------------------------------------------------------------------------------------------
# the shard


@dataclass
class KVShard:
    """One rank's KV of one session. Treat the tensors as read-only once handed to the store."""

    k: torch.Tensor  # (L, Hkv, T, D)
    v: torch.Tensor  # (L, Hkv, T, D)
    positions: torch.Tensor  # (T,) int64, absolute token positions held by this shard
    meta: dict[str, Any] = field(default_factory=dict)  # small, JSON-able (session length, next position, ...)

    def __post_init__(self):
        if self.k.dim() != 4 or self.k.shape != self.v.shape:
            raise ValueError(f"k and v must both be (L, Hkv, T, D); got {tuple(self.k.shape)} and {tuple(self.v.shape)}")
        if self.k.dtype != self.v.dtype or self.k.device != self.v.device:
            raise ValueError(f"k and v must share dtype and device; got {self.k.dtype}/{self.k.device} "
                             f"and {self.v.dtype}/{self.v.device}")
        if self.positions.dtype != torch.int64 or tuple(self.positions.shape) != (self.k.shape[2],):
            raise ValueError(f"positions must be int64 of shape ({self.k.shape[2]},), got "
                             f"{self.positions.dtype} {tuple(self.positions.shape)}")
        json.dumps(self.meta)  # fail now, not when it is persisted

    @property
    def num_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Exact bytes of k, v and positions: the amount a tier accounts for this shard."""
        return shard_nbytes(tuple(self.k.shape), self.k.dtype)

    @classmethod
    def from_cache(cls, cache, *, start: int = 0, end: int | None = None, meta: dict | None = None) -> "KVShard":
        """Copy tokens [start, end) (default: all `cache.length`) of an engine `KVCache` into a shard.

        Positions are start..end-1 (a single-device cache holds contiguous positions); `meta` gets
        "length" = end unless given. Use start > 0 to build the delta for `KVStore.append`.
        """
        end = cache.length if end is None else end
        if not 0 <= start <= end <= cache.length:
            raise ValueError(f"token range [{start}, {end}) is outside the cache's {cache.length} tokens")
        k = cache.k[:, :, start:end].contiguous()  # (L, Hkv, T, D), a copy: the cache keeps growing in place
        v = cache.v[:, :, start:end].contiguous()
        pos = torch.arange(start, end, dtype=torch.int64, device=k.device)
        return cls(k, v, pos, dict(meta) if meta is not None else {"length": end})

    def into_cache(self, cache) -> None:
        """Load this shard into a fresh engine `KVCache` (tokens in shard order; cache.length = T)."""
        if cache.length:
            raise ValueError(f"the cache already holds {cache.length} tokens; load a shard into a fresh cache")
        L, Hkv, T, D = self.k.shape
        if (cache.k.shape[0], cache.k.shape[1], cache.k.shape[3]) != (L, Hkv, D):
            raise ValueError(f"shard (L, Hkv, D) = {(L, Hkv, D)} does not match the cache's "
                             f"{(cache.k.shape[0], cache.k.shape[1], cache.k.shape[3])}: a different model?")
        cache.reserve(T)
        cache.k[:, :, :T].copy_(self.k)
        cache.v[:, :, :T].copy_(self.v)
        cache.length = T

    def to(self, device) -> "KVShard":
        return KVShard(self.k.to(device), self.v.to(device), self.positions.to(device), dict(self.meta))


def shard_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    L, Hkv, T, D = shape
    return 2 * L * Hkv * T * D * _itemsize(dtype) + 8 * T


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise KVDataLossError(f"stored KV names an unknown dtype {name!r}")
    return dt


# ---------------------------------------------------------------------------------------------------
# keys


@dataclass(frozen=True)
class KeySpace:
    """Redis key names of one rank's shard of one session.

    ringserve:kv:v{FORMAT}:{fingerprint}:{session}:{namespace}:{what}; {session} and {namespace} come
    before the suffix so that a pattern on one session's keys is a prefix.
    """

    fingerprint: str
    session: str
    namespace: str

    def __post_init__(self):
        for name in ("fingerprint", "session", "namespace"):
            value = getattr(self, name)
            if not value or ":" in value or any(c.isspace() for c in value):
                raise ValueError(f"{name} {value!r} must be non-empty without ':' or whitespace (it names Redis keys)")

    @property
    def prefix(self) -> str:
        return f"ringserve:kv:v{FORMAT_VERSION}:{self.fingerprint}:{self.session}:{self.namespace}"

    @property
    def manifest(self) -> str:
        return f"{self.prefix}:manifest"

    @property
    def begin(self) -> str:
        """Written before the first chunk: a missing manifest next to it means "lost", not "never stored"."""
        return f"{self.prefix}:begin"

    def chunk(self, l0: int, l1: int, t0: int, t1: int, encoding: str) -> str:
        return f"{self.prefix}:kv:{encoding}:t{t0}-{t1}:l{l0}-{l1}"

    def positions(self, t0: int, t1: int) -> str:
        return f"{self.prefix}:pos:t{t0}-{t1}"


# ---------------------------------------------------------------------------------------------------
# chunk planning


@dataclass(frozen=True)
class ChunkPlan:
    """One value: layers [l0, l1) x tokens [t0, t1), or the positions of [t0, t1) when kind == "pos"."""

    kind: str  # "kv" | "pos"
    l0: int
    l1: int
    t0: int
    t1: int


def plan_chunks(L: int, Hkv: int, D: int, t0: int, t1: int, *, bytes_per_elem: float, max_bytes: int) -> list[ChunkPlan]:
    """Split tokens [t0, t1) of every layer into values of at most ~max_bytes (K and V together).

    Whole layers are grouped while they fit (so a reader can hand layers over in order); a layer larger
    than max_bytes is split along tokens. The positions of the range come first, as one value.
    """
    per_token_layer = 2 * Hkv * D * bytes_per_elem  # K and V of one token of one layer
    T = t1 - t0
    plans = [ChunkPlan("pos", 0, 0, t0, t1)]
    if T == 0:
        return plans
    layers_per_chunk = int(max_bytes // max(1.0, per_token_layer * T))
    if layers_per_chunk >= 1:
        for l0 in range(0, L, layers_per_chunk):
            plans.append(ChunkPlan("kv", l0, min(L, l0 + layers_per_chunk), t0, t1))
    else:
        tokens_per_chunk = max(1, int(max_bytes // per_token_layer))
        for l in range(L):
            for a in range(t0, t1, tokens_per_chunk):
                plans.append(ChunkPlan("kv", l, l + 1, a, min(t1, a + tokens_per_chunk)))
    return plans


# ---------------------------------------------------------------------------------------------------
# envelope: prefix + JSON header + payload


def encoded_size(header: dict, parts: Sequence[tuple[str, torch.dtype, Sequence[int]]]) -> int:
    """Bytes of the value that `encode_into` writes for this header and these parts."""
    return _PREFIX.size + len(_header_bytes(header, parts, _CHECKSUM_PLACEHOLDER)) + _parts_nbytes(parts)


def encode_into(buf: memoryview, header: dict, tensors: Sequence[tuple[str, torch.Tensor]]) -> tuple[int, str]:
    """Write one value into `buf` (a writable byte view): prefix, header, then the tensors' bytes.

    The tensors are copied straight into their place in `buf` (one copy; from a CUDA tensor this is the
    device-to-host copy into a pinned staging buffer). Returns (bytes written, payload xxh3_64 in hex).
    """
    parts = [(name, t.dtype, tuple(t.shape)) for name, t in tensors]
    hlen = len(_header_bytes(header, parts, _CHECKSUM_PLACEHOLDER))
    off = _PREFIX.size + hlen
    end = off + _parts_nbytes(parts)
    if end > len(buf):
        raise ValueError(f"value of {end} bytes does not fit a staging buffer of {len(buf)} bytes")
    dst = torch.frombuffer(buf, dtype=torch.uint8, count=end - off, offset=off) if end > off else None
    pos = 0
    for _, t in tensors:
        n = t.numel() * t.element_size()
        if n:
            dst[pos:pos + n].view(t.dtype).view(t.shape).copy_(t)
        pos += n
    checksum = format(xxhash.xxh3_64_intdigest(buf[off:end]), "016x")
    hb = _header_bytes(header, parts, checksum)
    assert len(hb) == hlen
    buf[_PREFIX.size:off] = hb
    buf[:_PREFIX.size] = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, hlen, xxhash.xxh3_64_intdigest(hb))
    return end, checksum


def decode(value, key: str, expect: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Verify one value and return (header, {part name: tensor view into `value`}).

    `expect` holds header fields that must match exactly (kind, fingerprint, session, ranges, and the
    payload checksum the manifest recorded). Raises KVDataLossError naming the key and what failed.
    """
    mv = memoryview(value).cast("B")
    if len(mv) < _PREFIX.size:
        raise KVDataLossError(f"stored KV value {key} is truncated ({len(mv)} bytes)")
    magic, version, _, hlen, hsum = _PREFIX.unpack_from(mv)
    if magic != MAGIC:
        raise KVDataLossError(f"stored KV value {key} is not a ringserve KV value (bad magic)")
    if version != FORMAT_VERSION:
        raise KVDataLossError(f"stored KV value {key} has format version {version}; this build reads {FORMAT_VERSION}")
    hb = mv[_PREFIX.size:_PREFIX.size + hlen]
    if len(hb) != hlen or xxhash.xxh3_64_intdigest(hb) != hsum:
        raise KVDataLossError(f"stored KV value {key} failed its header checksum: the value is corrupt")
    header = json.loads(bytes(hb))
    for name, want in expect.items():
        if header.get(name) != want:
            raise KVDataLossError(f"stored KV value {key} has {name}={header.get(name)!r}, expected {want!r}")
    off = _PREFIX.size + hlen
    payload = mv[off:]
    if len(payload) != header["payload_nbytes"]:
        raise KVDataLossError(f"stored KV value {key} holds {len(payload)} payload bytes, its header says "
                              f"{header['payload_nbytes']}")
    if format(xxhash.xxh3_64_intdigest(payload), "016x") != header["payload_xxh3"]:
        raise KVDataLossError(f"stored KV value {key} failed its payload checksum (xxh3_64): the value is corrupt")
    out, pos = {}, 0
    if not len(payload):
        raw = torch.empty(0, dtype=torch.uint8)
    else:
        with warnings.catch_warnings():  # a read-only buffer (bytes from redis-py) is only ever read from
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(payload, dtype=torch.uint8)
    for name, dt, shape in header["parts"]:
        dtype = dtype_from_name(dt)
        n = _numel(shape) * _itemsize(dtype)
        out[name] = raw[pos:pos + n].view(dtype).view(shape)
        pos += n
    return header, out


def _parts_nbytes(parts) -> int:
    return sum(_numel(shape) * _itemsize(dt) for _, dt, shape in parts)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _header_bytes(header: dict, parts, checksum: str) -> bytes:
    full = dict(header, format=FORMAT_VERSION, parts=[[n, dtype_name(dt), list(s)] for n, dt, s in parts],
                payload_nbytes=_parts_nbytes(parts), payload_xxh3=checksum)
    return json.dumps(full, separators=(",", ":"), sort_keys=True).encode()
