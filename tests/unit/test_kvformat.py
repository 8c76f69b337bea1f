"""The KV value format, chunk planning, KVShard <-> KVCache, and the tier policy — no Redis needed."""

from __future__ import annotations

import json

import pytest
import torch

from ringserve.workers.kvformat import (FORMAT_VERSION, KeySpace, KVDataLossError, KVShard, decode, encode_into,
                                        encoded_size, plan_chunks)
from ringserve.workers.kvpolicy import Candidate, IdlePolicy, TierCapacity, Watermarks, idle_target, lru_victims
from ringserve.workers.kvstore import HostPool


def _value(seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 3, 5, 8, generator=g).bfloat16()[:, :, 1:4]  # a non-contiguous slice, as chunks are
    v = torch.randn(2, 3, 3, 8, generator=g)
    header = {"kind": "kv", "session": "s", "l0": 0, "l1": 2, "t0": 1, "t1": 4}
    buf = bytearray(encoded_size(header, [("k", k.dtype, k.shape), ("v", v.dtype, v.shape)]))
    n, checksum = encode_into(memoryview(buf), header, [("k", k), ("v", v)])
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
        assert plans[0].kind == "pos" and (plans[0].t0, plans[0].t1) == (10, 10 + T)
        cells = set()
        for p in plans[1:]:
            assert 2 * (p.l1 - p.l0) * 2 * (p.t1 - p.t0) * 8 * 2 <= max(max_bytes, 2 * 2 * 8 * 2)
            cells |= {(l, t) for l in range(p.l0, p.l1) for t in range(p.t0, p.t1)}
        assert cells == {(l, t) for l in range(L) for t in range(10, 10 + T)}


def test_keys_name_fingerprint_format_session_and_rank():
    ks = KeySpace("fp1", "sess", "g2-r1")
    assert ks.manifest == f"ringserve:kv:v{FORMAT_VERSION}:fp1:sess:g2-r1:manifest"
    assert ks.chunk(0, 4, 0, 128, "raw").startswith(ks.prefix + ":")
    with pytest.raises(ValueError, match="session"):
        KeySpace("fp1", "a:b", "g2-r1")


def test_shard_from_and_into_engine_cache():
    from ringserve.workers.engine import KVCache
    from ringserve.workers.model import ModelConfig

    cfg = ModelConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64)
    cache = KVCache(cfg, 8, device="cpu", dtype=torch.float32)
    cache.reserve(20)
    for layer in range(2):
        cache.write(layer, 0, torch.randn(20, 2, cfg.head_dim), torch.randn(20, 2, cfg.head_dim))
    cache.length = 20
    shard = KVShard.from_cache(cache)
    assert shard.k.shape == (2, 2, 20, cfg.head_dim) and shard.meta == {"length": 20}
    assert torch.equal(shard.positions, torch.arange(20))
    delta = KVShard.from_cache(cache, start=15)
    assert torch.equal(delta.positions, torch.arange(15, 20)) and torch.equal(delta.k, cache.k[:, :, 15:20])
    fresh = KVCache(cfg, 4, device="cpu", dtype=torch.float32)
    shard.into_cache(fresh)
    assert fresh.length == 20 and torch.equal(fresh.keys(1, 20), cache.keys(1, 20))
    with pytest.raises(ValueError, match="fresh cache"):
        shard.into_cache(fresh)


def test_shard_validates_shapes_and_meta():
    k = torch.zeros(2, 2, 4, 8)
    with pytest.raises(ValueError, match="positions"):
        KVShard(k, k, torch.arange(3))
    with pytest.raises(TypeError):
        KVShard(k, k, torch.arange(4), {"x": object()})
    assert KVShard(k, k, torch.arange(4)).nbytes == 2 * k.numel() * 4 + 4 * 8


def test_host_pool_reuses_and_coalesces_blocks():
    pool = HostPool(1000, pinned=False)
    a, b, c = pool.alloc(100), pool.alloc(100), pool.alloc(100)
    assert len({a, b, c}) == 3 and all(x % 64 == 0 for x in (a, b, c))
    pool.free(b, 100)
    pool.free(a, 100)
    assert pool.alloc(200) == a  # the two freed neighbours merged
    assert pool.alloc(pool.size) is None


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
