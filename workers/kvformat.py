"""The Redis value format of retained KV, its keys, and chunk planning.

Shape alphabet (as in model.py): L layers, Hkv KV heads, T tokens, D head dim.

A rank keeps each session's shard in pages (kvpages.py); in Redis it is a set of values, each
self-describing. Value format, version 2:

    offset  size  field
    0       4     magic b"RSKV"
    4       2     format version (little-endian u16)
    6       2     reserved (0)
    8       4     header length H (u32)
    12      8     xxh3_64 of the header bytes (u64)
    20      H     header: UTF-8 JSON (kind, format, fingerprint, session, namespace, layer and token
                  range, payload parts with dtype and shape, payload length, payload xxh3_64)
    20+H    P     payload: the parts, packed back to back in header order

A chunk holds layers [l0, l1) x storage tokens [t0, t1) of both K and V ("raw": k then v, each
(l, t, Hkv, D) in the session dtype; "int8": k_q, k_scale, v_q, v_scale in the
`ringserve.kernels.quant` format, scales (l, t, Hkv)). The manifest — written after every chunk it
lists, so it is the commit marker — lists each value's key, ranges, size and payload checksum, and
carries the shard's dtype, shape [L, T, Hkv, D] and meta (the session's layout, which says which
positions the rank's tokens are). A reader verifies the envelope, the header fields it expects, and
both checksums; anything else is `KVDataLossError`, never data.

Version 1 (before paged KV) stored (L, Hkv, T, D) tensors and a positions value; its keys carry
"v1", and a v2 reader that finds only a v1 manifest refuses it with a message saying so.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import xxhash

from .protocol import KVDataLossError

FORMAT_VERSION = 2
MAGIC = b"RSKV"
_PREFIX = struct.Struct("<4sHHIQ")  # magic, version, reserved, header length, header xxh3_64
_CHECKSUM_PLACEHOLDER = "0" * 16  # the payload checksum is hex of fixed width, so the header length is known before it


@dataclass(frozen=True)
class Part:
    """One payload part: its name, dtype and shape, and how to write it into its place (a tensor view)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    fill: Callable[[torch.Tensor], None]

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "Part":
        return cls(name, t.dtype, tuple(t.shape), lambda dst: dst.copy_(t))


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

    def older_manifest(self, version: int) -> str:
        """Where a manifest of an older format version of the same session would be."""
        return self.prefix.replace(f":v{FORMAT_VERSION}:", f":v{version}:", 1) + ":manifest"


# ---------------------------------------------------------------------------------------------------
# chunk planning


@dataclass(frozen=True)
class ChunkPlan:
    """One value: layers [l0, l1) x storage tokens [t0, t1) of K and V."""

    l0: int
    l1: int
    t0: int
    t1: int


def plan_chunks(L: int, Hkv: int, D: int, t0: int, t1: int, *, bytes_per_elem: float, max_bytes: int) -> list[ChunkPlan]:
    """Split tokens [t0, t1) of every layer into values of at most ~max_bytes (K and V together).

    Whole layers are grouped while they fit (so a reader can hand layers over in order); a layer larger
    than max_bytes is split along tokens.
    """
    per_token_layer = 2 * Hkv * D * bytes_per_elem  # K and V of one token of one layer
    T = t1 - t0
    if T <= 0:
        return []
    layers_per_chunk = int(max_bytes // max(1.0, per_token_layer * T))
    if layers_per_chunk >= 1:
        return [ChunkPlan(l0, min(L, l0 + layers_per_chunk), t0, t1) for l0 in range(0, L, layers_per_chunk)]
    tokens_per_chunk = max(1, int(max_bytes // per_token_layer))
    return [ChunkPlan(l, l + 1, a, min(t1, a + tokens_per_chunk)) for l in range(L) for a in range(t0, t1, tokens_per_chunk)]


# ---------------------------------------------------------------------------------------------------
# envelope: prefix + JSON header + payload


def encoded_size(header: dict, parts: Sequence[Part]) -> int:
    """Bytes of the value that `encode_into` writes for this header and these parts."""
    return _PREFIX.size + len(_header_bytes(header, parts, _CHECKSUM_PLACEHOLDER)) + _parts_nbytes(parts)


def encode_into(buf: memoryview, header: dict, parts: Sequence[Part]) -> tuple[int, str]:
    """Write one value into `buf` (a writable byte view): prefix, header, then the parts' bytes.

    Each part writes itself straight into its place in `buf` (one copy: from device pages this is the
    device-to-host copy into a pinned staging buffer). Returns (bytes written, payload xxh3_64 in hex).
    """
    hlen = len(_header_bytes(header, parts, _CHECKSUM_PLACEHOLDER))
    off = _PREFIX.size + hlen
    end = off + _parts_nbytes(parts)
    if end > len(buf):
        raise ValueError(f"value of {end} bytes does not fit a staging buffer of {len(buf)} bytes")
    dst = torch.frombuffer(buf, dtype=torch.uint8, count=end - off, offset=off) if end > off else None
    pos = 0
    for p in parts:
        n = _numel(p.shape) * _itemsize(p.dtype)
        if n:
            p.fill(dst[pos:pos + n].view(p.dtype).view(p.shape))
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
        raise KVDataLossError(f"stored KV value {key} has format version {version}; this build reads only "
                              f"version {FORMAT_VERSION}: create the session again")
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


def _parts_nbytes(parts: Sequence[Part]) -> int:
    return sum(_numel(p.shape) * _itemsize(p.dtype) for p in parts)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _header_bytes(header: dict, parts, checksum: str) -> bytes:
    full = dict(header, format=FORMAT_VERSION, parts=[[p.name, dtype_name(p.dtype), list(p.shape)] for p in parts],
                payload_nbytes=_parts_nbytes(parts), payload_xxh3=checksum)
    return json.dumps(full, separators=(",", ":"), sort_keys=True).encode()
