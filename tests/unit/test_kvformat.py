"""The KV value format, chunk planning, the page pools, and the tier policy — no Redis needed."""

from __future__ import annotations

import json

import pytest
import torch

from ringserve.workers.kvformat import FORMAT_VERSION, KeySpace, Part, decode, encode_into, encoded_size, plan_chunks
from ringserve.workers.kvpages import KVView, PageGeometry, PagePool, runs_of
from ringserve.workers.kvpolicy import Candidate, IdlePolicy, TierCapacity, Watermarks, idle_target, lru_victims
from ringserve.workers.protocol import KVDataLossError


def _value(seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 3, 5, 8, generator=g).bfloat16()[:, :, 1:4]  # a non-contiguous slice, as chunks are
    v = torch.randn(2, 3, 3, 8, generator=g)
    header = {"kind": "kv", "session": "s", "l0": 0, "l1": 2, "t0": 1, "t1": 4}
    parts = [Part.of("k", k), Part.of("v", v)]
    buf = bytearray(encoded_size(header, parts))
    n, checksum = encode_into(memoryview(buf), header, parts)
    assert n == len(buf)
    return buf, k, v, checksum


def test_value_round_trip_is_self_describing():
    buf, k, v, checksum = _value()
    header, parts = decode(bytes(buf), "key", {"kind": "kv", "l0": 0, "payload_xxh3": checksum})
    assert header["format"] == FORMAT_VERSION and header["parts"][0] == ["k", "bfloat16", [2, 3, 3, 8]]
    assert torch.equal(parts["k"], k) and torch.equal(parts["v"], v)


@pytest.mark.parametrize("offset,what", [(0, "magic"), (4, "format version"), (25, "header checksum"),
                                         (-1, "payload checksum"), (-200, "payload checksum")])
def test_any_flipped_byte_is_refused(offset, what):
    buf, *_ = _value()
    buf[offset] ^= 0x10
    with pytest.raises(KVDataLossError, match=what):
        decode(buf, "ringserve:kv:x", {})


def test_truncated_or_unexpected_values_are_refused():
    buf, *_ = _value()
    with pytest.raises(KVDataLossError, match="payload"):
        decode(buf[:-3], "k", {})
    with pytest.raises(KVDataLossError, match="session='s', expected 'other'"):
        decode(buf, "k", {"session": "other"})
    with pytest.raises(KVDataLossError, match="truncated"):
        decode(buf[:10], "k", {})


def test_chunk_plan_covers_every_layer_and_token_within_the_size():
    for L, T, max_bytes in [(4, 100, 2000), (4, 100, 100_000), (3, 7, 64), (1, 1, 10)]:
        plans = plan_chunks(L, 2, 8, 10, 10 + T, bytes_per_elem=2, max_bytes=max_bytes)
        cells = set()
        for p in plans:
            assert 2 * (p.l1 - p.l0) * 2 * (p.t1 - p.t0) * 8 * 2 <= max(max_bytes, 2 * 2 * 8 * 2)
            cells |= {(l, t) for l in range(p.l0, p.l1) for t in range(p.t0, p.t1)}
        assert cells == {(l, t) for l in range(L) for t in range(10, 10 + T)}


def test_keys_name_fingerprint_format_session_and_rank():
    ks = KeySpace("fp1", "sess", "g2-r1")
    assert ks.manifest == f"ringserve:kv:v{FORMAT_VERSION}:fp1:sess:g2-r1:manifest"
    assert ks.chunk(0, 4, 0, 128, "raw").startswith(ks.prefix + ":")
    with pytest.raises(ValueError, match="session"):
        KeySpace("fp1", "a:b", "g2-r1")


def test_older_format_is_refused_with_its_version():
    buf, *_ = _value()
    buf[4:6] = (FORMAT_VERSION - 1).to_bytes(2, "little")
    with pytest.raises(KVDataLossError, match=f"format version {FORMAT_VERSION - 1}; this build reads only"):
        decode(buf, "k", {})
    ks = KeySpace("fp1", "sess", "g2-r1")
    assert ks.older_manifest(1) == "ringserve:kv:v1:fp1:sess:g2-r1:manifest"


GEO = PageGeometry(layers=2, kv_heads=2, head_dim=4, block=4, dtype=torch.float32)


def test_page_geometry_counts_bytes():
    assert GEO.token_bytes == 2 * 2 * 2 * 4 * 4 and GEO.page_bytes == 4 * GEO.token_bytes
    assert [GEO.pages_for(n) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]


def test_allocator_grows_a_run_in_place_and_never_strands_free_pages():
    pool = PagePool(GEO, 10)
    a = pool.alloc(3)
    b = pool.alloc(2)
    assert a == [0, 1, 2] and b == [3, 4] and pool.free_pages == 5
    pool.free(a)
    assert pool.alloc(2, after=4) == [5, 6]  # extends b's run
    # free pages now: 0-2 and 7-9, in two runs; a request for 5 takes both (fragmented, not refused)
    got = pool.alloc(5)
    assert got == [0, 1, 2, 7, 8]  # the largest run first, then the smallest run that holds the rest
    assert pool.free_pages == 1 and pool.alloc(2) is None and pool.free_pages == 1  # nothing taken on failure
    pool.free(got + b + [5, 6])
    assert pool.free_pages == 10 and pool.alloc(10) == list(range(10))  # every free run merged back


def test_allocator_prefers_the_smallest_run_that_fits():
    pool = PagePool(GEO, 12)
    blocks = [pool.alloc(1) for _ in range(12)]
    pool.free(blocks[1] + blocks[2] + blocks[3])  # a run of 3 at 1
    pool.free(blocks[6] + blocks[7])  # a run of 2 at 6
    assert pool.alloc(2) == [6, 7] and pool.alloc(3) == [1, 2, 3]
    assert runs_of([4, 5, 6, 9, 1, 2]) == [(0, 4, 3), (3, 9, 1), (4, 1, 2)]


def test_view_writes_into_pages_and_reads_back_in_place():
    pool = PagePool(GEO, 8)
    pages = [5, 6, 1]  # two runs: storage 0..7 in pages 5-6, 8..11 in page 1
    kv = KVView(pool, pages, 0, "s")
    k = torch.randn(10, 2, 4)
    v = torch.randn(10, 2, 4)
    kv.write(1, kv.slots(0, 10), k, v)
    assert pool.bytes_written == 2 * k.numel() * 4
    runs = kv.layer_runs(1, 10)
    assert [(off, t.shape[0]) for off, t, _ in runs] == [(0, 8), (8, 2)]
    assert all(t.data_ptr() >= pool.k.data_ptr() for _, t, _ in runs)  # views of the pool, not copies
    assert torch.equal(torch.cat([t for _, t, _ in runs]), k) and torch.equal(torch.cat([t for *_, t in runs]), v)
    dk, dv = torch.empty(1, 10, 2, 4), torch.empty(1, 10, 2, 4)
    pool.read(pages, slice(1, 2), 0, 10, dk, dv)
    assert torch.equal(dk[0], k) and torch.equal(dv[0], v)
    other = PagePool(GEO, 8)
    pool.copy_pages_to(other, pages, [0, 1, 2])
    dk2 = torch.empty(1, 10, 2, 4)
    other.read([0, 1, 2], slice(1, 2), 0, 10, dk2, torch.empty_like(dk2))
    assert torch.equal(dk2[0], k)


def test_lru_victims_respect_watermarks_and_hot():
    marks = Watermarks(high=0.9, low=0.5)
    cands = [Candidate("a", "device", 30, 3.0), Candidate("b", "device", 30, 1.0),
             Candidate("c", "device", 30, 2.0, "hot")]
    assert lru_victims(cands, used=60, need=30, capacity=100, marks=marks) == []  # 90 <= high
    assert lru_victims(cands, used=90, need=10, capacity=100, marks=marks) == ["b", "a"]  # to <= 50, hot skipped


def test_idle_targets_by_retention():
    idle = IdlePolicy(device_idle_s=10, host_idle_s=100, cold_idle_s=5)
    c = lambda tier, ret="standard": Candidate("x", tier, 1, 0.0, ret)  # noqa: E731
    assert idle_target(c("device"), 9, idle, has_redis=True) is None
    assert idle_target(c("device"), 10, idle, has_redis=True) == "host"
    assert idle_target(c("device"), 100, idle, has_redis=True) == "redis"
    assert idle_target(c("device"), 100, idle, has_redis=False) == "host"
    assert idle_target(c("host"), 100, idle, has_redis=True) == "redis"
    assert idle_target(c("device", "cold"), 5, idle, has_redis=True) == "redis"
    assert idle_target(c("device", "hot"), 1e9, idle, has_redis=True) is None


def test_capacity_config_is_checked():
    with pytest.raises(ValueError, match="host"):
        TierCapacity(device=1, host=-1)
    with pytest.raises(ValueError, match="watermarks"):
        Watermarks(high=0.5, low=0.9)
    assert json.dumps(TierCapacity(device=1, host=2).__dict__)
