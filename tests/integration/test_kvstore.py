"""KVStore against a real redis-server: tier round trips of paged sessions, pressure, integrity, outages, policy."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from ringserve.workers.kvformat import FORMAT_VERSION
from ringserve.workers.kvstore import IdlePolicy, KVStore, PageGeometry, RedisOptions, TierCapacity
from ringserve.workers.protocol import KVCapacityError, KVDataLossError, KVNotFoundError, KVUnavailableError

FP = "tinyfp0123456789"
L, HKV, D, BLOCK = 2, 2, 16, 16


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def make_shard(T: int, seed: int, *, dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """A random shard as k, v (L, T, Hkv, D)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, T, HKV, D, generator=g).to(dtype), torch.randn(L, T, HKV, D, generator=g).to(dtype)


def nbytes(T: int, dtype=torch.bfloat16) -> int:
    """Device / host bytes of a T-token session: whole pages."""
    geo = PageGeometry(L, HKV, D, BLOCK, dtype)
    return geo.pages_for(T) * geo.page_bytes


def assert_same(a, b) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def append(store: KVStore, sid: str, kv) -> None:
    """Add tokens after the session's, the way the engine does: lease, reserve pages, write, commit."""
    k, v = kv
    with store.lease(sid) as view:
        n0, T = view.length, k.shape[1]
        store.reserve(sid, n0 + T)
        slots = view.slots(n0, n0 + T)
        for layer in range(L):
            view.write(layer, slots, k[layer], v[layer])
        store.commit(sid, n0 + T, meta={"length": n0 + T})


def make_store(url, clock=None, *, device=1 << 20, host=1 << 20, redis_cap=None, ns="g0-r0",
               dtype=torch.bfloat16, **kw) -> KVStore:
    kw.setdefault("chunk_bytes", 4096)  # several chunks per session even at test sizes
    return KVStore(ns, FP, PageGeometry(L, HKV, D, BLOCK, dtype), TierCapacity(device=device, host=host, redis=redis_cap),
                   redis_url=url, clock=clock or FakeClock(), **kw)


@pytest.fixture
def store(redis_url):
    s = make_store(redis_url)
    yield s
    s.close()


def session_keys(redis_server, sid: str) -> list[bytes]:
    return sorted(redis_server.client().keys(f"ringserve:kv:v{FORMAT_VERSION}:{FP}:{sid}:*"))


# --- round trips ------------------------------------------------------------------------------------


def test_round_trip_every_tier_is_bit_exact(store):
    a = make_shard(100, seed=1)  # 100 tokens over several 4 KiB chunks, split along layers and tokens
    store.put("s1", *a, meta={"length": 100})
    assert store.state("s1").tier == "device" and store.state("s1").nbytes == nbytes(100)
    assert store.demote("s1").tier == "host"
    assert store.demote("s1").tier == "redis"
    st = store.stats()["tiers"]
    assert (st["device"]["bytes"], st["host"]["bytes"]) == (0, 0) and st["redis"]["bytes"] > 2 * a[0].numel() * 2
    b = store.read("s1")
    assert store.state("s1").tier == "device"
    assert_same(b, a)
    assert store.meta("s1") == {"length": 100}


def test_round_trip_float32_odd_sizes_and_layout_meta(redis_url):
    store = make_store(redis_url, dtype=torch.float32)
    a = make_shard(37, seed=2, dtype=torch.float32)
    meta = {"layout": {"P": 2, "block": 8, "regions": [[0, 74, "zigzag", 0]]}, "length": 74}  # an SP rank's share
    store.put("odd", *a, meta=meta)
    store.demote("odd", "redis")  # device straight to Redis
    assert_same(store.read("odd"), a)
    assert store.meta("odd") == meta
    store.close()


def test_quantized_round_trip_is_close_and_recorded(store, redis_server):
    a = make_shard(64, seed=3)
    store.put("q", *a, quantized=True)
    store.demote("q", "redis")
    keys = [k.decode() for k in session_keys(redis_server, "q")]
    assert any(":kv:int8:" in k for k in keys) and not any(":kv:raw:" in k for k in keys)
    # about D + 4 bytes per row instead of 2 * D: the stored KV is well under the bf16 size
    assert store.stats()["tiers"]["redis"]["bytes"] < 0.75 * 2 * a[0].numel() * 2
    b = store.read("q")
    assert not torch.equal(b[0], a[0])  # 8-bit: close, not exact
    err = (b[0].float() - a[0].float()).abs().amax(-1) / a[0].float().abs().amax(-1)  # per (layer, token, head)
    assert float(err.max()) < 1 / 127 + 1e-2  # half a quantization step plus bf16 rounding


def test_append_and_write_through_persist_only_the_new_part(redis_url, redis_server):
    store = make_store(redis_url)
    a, d = make_shard(40, seed=4), make_shard(6, seed=5)
    store.put("w", *a, persist="write_through", meta={"length": 40})
    store.flush()
    before = set(session_keys(redis_server, "w"))
    assert store.state("w").persisted_tokens == 40
    append(store, "w", d)
    store.flush()
    after = set(session_keys(redis_server, "w"))
    new = {k.decode() for k in after - before}
    assert new and all("t40-46" in k for k in new)  # only the turn's tokens were written
    assert store.state("w").persisted_tokens == 46 and store.state("w").tier == "device"
    fresh = make_store(redis_url, ns="g0-r0")
    fresh.restore("w")
    assert_same(fresh.read("w"), (torch.cat([a[0], d[0]], 1), torch.cat([a[1], d[1]], 1)))
    assert fresh.meta("w") == {"length": 46}
    store.close(), fresh.close()


def test_delete_frees_every_tier_and_redis_keys(store, redis_server):
    store.put("d1", *make_shard(50, seed=6), persist="write_through")
    store.put("d2", *make_shard(50, seed=7))
    store.flush()
    store.demote("d2", "redis")
    assert session_keys(redis_server, "d1") and session_keys(redis_server, "d2")
    store.delete("d1"), store.delete("d2")
    assert session_keys(redis_server, "d1") == [] and session_keys(redis_server, "d2") == []
    st = store.stats()
    assert st["sessions"] == 0 and all(st["tiers"][t]["bytes"] == 0 for t in ("device", "host", "redis"))
    with pytest.raises(KVNotFoundError, match="d1"):
        store.read("d1")


def test_redis_keys_carry_a_ttl_past_the_session_expiry(redis_url, redis_server):
    clock = FakeClock()
    store = make_store(redis_url, clock, redis_options=RedisOptions(ttl_margin_s=60))
    store.put("t", *make_shard(20, seed=8), expire_at=clock() + 100)
    store.demote("t", "redis")
    r = redis_server.client()
    ttls = [r.pttl(k) for k in session_keys(redis_server, "t")]
    assert ttls and all(150_000 < t <= 160_000 for t in ttls)
    store.set_expiry("t", clock() + 1000)
    assert all(1_050_000 < r.pttl(k) <= 1_060_000 for k in session_keys(redis_server, "t"))
    clock.advance(1001)
    store.tick()  # expired: dropped everywhere
    assert store.sessions() == [] and session_keys(redis_server, "t") == []
    store.close()


# --- pressure and policy ----------------------------------------------------------------------------


def test_pressure_twenty_sessions_stay_answerable_and_lru_is_demoted(redis_url):
    clock = FakeClock()
    per = nbytes(64)
    cap = TierCapacity(device=4 * per, host=5 * per)
    store = make_store(redis_url, clock, device=cap.device, host=cap.host)
    shards, order = {}, []  # order: session ids, least recently used first

    def check_tiers():
        st = store.stats()["tiers"]
        for t in ("device", "host"):
            assert st[t]["bytes"] <= getattr(cap, t), (t, st[t])
            assert st[t]["bytes"] == per * sum(1 for s in order if store.state(s).tier == t)
        rank = {s: i for i, s in enumerate(order)}
        tiers = {t: [rank[s] for s in order if store.state(s).tier == t] for t in ("device", "host", "redis")}
        # least recently used sit lowest: every Redis session is older than every host one, and so on
        assert max(tiers["redis"], default=-1) < min(tiers["host"] + tiers["device"], default=99)
        assert max(tiers["host"], default=-1) < min(tiers["device"], default=99)

    for i in range(20):
        clock.advance(1)
        shards[f"s{i}"] = make_shard(64, seed=100 + i)
        store.put(f"s{i}", *shards[f"s{i}"])
        order.append(f"s{i}")
        check_tiers()
    assert store.state("s19").tier == "device" and store.state("s0").tier == "redis"
    for sid in ["s0", "s7", "s13", "s2", "s19", "s5"] + [f"s{i}" for i in range(20)]:  # all answerable, in any order
        clock.advance(1)
        assert_same(store.read(sid), shards[sid])
        order.remove(sid)
        order.append(sid)
        assert store.state(sid).tier == "device"
        check_tiers()
    store.close()


def test_idle_time_demotes_by_retention_class(redis_url):
    clock = FakeClock()
    store = make_store(redis_url, clock, idle=IdlePolicy(device_idle_s=10, host_idle_s=100, cold_idle_s=5))
    store.put("std", *make_shard(10, 1))
    store.put("cold", *make_shard(10, 2), retention="cold")
    store.put("hot", *make_shard(10, 3), retention="hot")
    clock.advance(6)
    assert store.tick() == [("cold", "device", "redis")]
    clock.advance(5)
    assert store.tick() == [("std", "device", "host")]
    clock.advance(50)
    store.read("std")  # an access resets its idle time
    clock.advance(9)
    assert store.tick() == [] and store.state("std").tier == "device"
    clock.advance(1000)
    store.tick()
    assert [store.state(s).tier for s in ("std", "cold", "hot")] == ["redis", "redis", "device"]
    store.close()


def test_hot_sessions_stay_on_device_and_refuse_beyond_capacity(redis_url):
    per = nbytes(32)
    store = make_store(redis_url, device=3 * per)
    store.put("h1", *make_shard(32, 1), retention="hot")
    store.put("h2", *make_shard(32, 2), retention="hot")
    store.put("s", *make_shard(32, 3))
    store.put("s2", *make_shard(32, 4))  # the standard one makes way, not the hot ones
    assert [store.state(s).tier for s in ("h1", "h2", "s", "s2")] == ["device", "device", "host", "device"]
    with pytest.raises(KVCapacityError, match="hot"):
        store.put("h3", *make_shard(64, 5), retention="hot")
    assert store.demote("h1").tier == "device"
    with pytest.raises(KVCapacityError, match="device tier"):
        store.put("big", *make_shard(200, 6))
    assert "big" not in store.sessions()  # a failed put leaves nothing behind
    store.close()


# --- integrity --------------------------------------------------------------------------------------


def _demoted(store, sid, seed=9, T=60):
    a = make_shard(T, seed)
    store.put(sid, *a)
    store.demote(sid, "redis")
    return a


@pytest.mark.parametrize("where", ["payload", "header"])
def test_flipped_byte_is_refused_and_session_lost(store, redis_server, where):
    _demoted(store, "c")
    r = redis_server.client()
    key = next(k for k in session_keys(redis_server, "c") if b":kv:raw:" in k)
    n = r.strlen(key)
    off = n - 7 if where == "payload" else 30
    byte = r.getrange(key, off, off)
    r.setrange(key, off, bytes([byte[0] ^ 0x01]))
    with pytest.raises(KVDataLossError, match=f"{where} checksum") as e:
        store.read("c")
    assert "lost" in str(e.value) and key.decode() in str(e.value)
    st = store.state("c")
    assert st.kind == "lost" and "checksum" in st.reason
    with pytest.raises(KVDataLossError):  # and stays refused
        store.read("c")
    assert store.stats()["tiers"]["device"]["bytes"] == 0  # nothing half-loaded
    store.delete("c")
    assert session_keys(redis_server, "c") == []


def test_deleted_manifest_means_lost_not_half_loaded(store, redis_server):
    _demoted(store, "m")
    r = redis_server.client()
    r.delete(f"ringserve:kv:v{FORMAT_VERSION}:{FP}:m:g0-r0:manifest")
    with pytest.raises(KVDataLossError, match="manifest"):
        store.read("m")
    assert store.state("m").kind == "lost"
    assert store.stats()["tiers"]["device"]["bytes"] == 0
    fresh = make_store(store.redis.url)  # another group: the begin marker tells "lost" from "never stored"
    with pytest.raises(KVDataLossError, match="commit marker"):
        fresh.restore("m")
    with pytest.raises(KVNotFoundError, match="not in Redis"):
        fresh.restore("never-stored")
    assert fresh.sessions() == []
    fresh.close()


def test_other_model_fingerprint_never_reads_the_kv(store):
    _demoted(store, "fp")
    other = KVStore("g0-r0", "otherweights", store.geometry, TierCapacity(device=1 << 20, host=1 << 20),
                    redis_url=store.redis.url)
    with pytest.raises(KVNotFoundError):
        other.restore("fp")
    other.close()


# --- Redis outages ----------------------------------------------------------------------------------

FAST = RedisOptions(attempts=3, backoff_base_s=0.05, backoff_cap_s=0.2, deadline_s=2.0, connect_timeout_s=0.5,
                    socket_timeout_s=0.5, retry_interval_s=10)


def test_redis_down_during_demotion_keeps_host_copy_then_recovers(redis_url, redis_server):
    clock = FakeClock()
    store = make_store(redis_url, clock, redis_options=FAST, idle=IdlePolicy(device_idle_s=5, host_idle_s=20))
    a = make_shard(80, seed=11)
    store.put("o", *a)
    store.read("o")  # connects the pool while Redis is up
    assert store.demote("o").tier == "host"
    redis_server.stop()
    t0 = time.monotonic()
    assert store.demote("o", "redis").tier == "host"
    assert time.monotonic() - t0 < 5
    st = store.stats()["tiers"]["redis"]
    assert st["degraded"] and "Connection" in st["error"]
    clock.advance(30)  # idle: the policy wants it in Redis, but Redis is down
    assert store.tick() == [] and store.state("o").tier == "host"
    redis_server.start()
    clock.advance(11)  # past the retry interval
    assert store.tick() == [("o", "host", "redis")]
    assert not store.stats()["tiers"]["redis"]["degraded"]
    assert_same(store.read("o"), a)
    store.close()


def test_redis_down_during_restore_fails_fast_then_recovers(redis_url, redis_server):
    store = make_store(redis_url, redis_options=FAST)
    a = _demoted(store, "r", seed=12)
    b = make_shard(30, seed=13)
    store.put("wt", *b, persist="write_through")
    store.flush()
    redis_server.stop()  # SIGTERM: Redis saves, so the data is back after the restart
    t0 = time.monotonic()
    with pytest.raises(KVUnavailableError, match="unreachable.*retry later"):
        store.read("r")
    assert time.monotonic() - t0 < 5
    assert store.state("r").kind == "resident" and store.state("r").tier == "redis"  # not lost
    fresh = make_store(redis_url, redis_options=FAST)
    with pytest.raises(KVUnavailableError):
        fresh.restore("wt")
    redis_server.start()
    assert_same(store.read("r"), a)  # reconnects by itself
    fresh.restore("wt")
    assert_same(fresh.read("wt"), b)
    store.close(), fresh.close()


def test_hung_redis_costs_bounded_time(redis_url, redis_server):
    store = make_store(redis_url, redis_options=FAST)
    _demoted(store, "h", seed=14)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # the server accepts nothing and answers nothing
    try:
        t0 = time.monotonic()
        with pytest.raises(KVUnavailableError):
            store.read("h")
        assert time.monotonic() - t0 < 5
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert store.read("h")[0].shape == (L, 60, HKV, D)
    store.close()


def test_write_through_while_redis_down_is_retried_by_tick(redis_url, redis_server):
    clock = FakeClock()
    store = make_store(redis_url, clock, redis_options=FAST)
    a = make_shard(20, seed=15)
    redis_server.stop()
    store.put("p", *a, persist="write_through")
    with pytest.raises(KVUnavailableError, match="write-through of sessions \\['p'\\]"):
        store.flush()
    assert store.state("p").persisted_tokens == 0 and store.state("p").tier == "device"
    redis_server.start()
    clock.advance(11)
    store.tick()
    store.flush()
    assert store.state("p").persisted_tokens == 20
    fresh = make_store(redis_url)
    fresh.restore("p")
    assert_same(fresh.read("p"), a)
    store.close(), fresh.close()


# --- pages ------------------------------------------------------------------------------------------


def test_pages_are_allocated_as_a_session_grows_and_freed_exactly(store):
    """Appending allocates pages only for the new tokens; a turn that is not committed frees its pages;
    delete returns every page; and nothing is copied on the device while the session stays there."""
    free0 = store.stats()["tiers"]["device"]["free_pages"]
    store.put("g", *make_shard(20, 1))  # 20 tokens: 2 pages of 16
    assert store.stats()["tiers"]["device"]["free_pages"] == free0 - 2
    before = store.counters()
    append(store, "g", make_shard(13, 2))  # 33 tokens: one more page
    after = store.counters()
    assert store.stats()["tiers"]["device"]["free_pages"] == free0 - 3
    assert after.pages_allocated - before.pages_allocated == 1
    assert after.bytes_written - before.bytes_written == 13 * 2 * L * HKV * D * 2  # the new tokens' K and V only
    assert after.bytes_copied == before.bytes_copied  # nothing of the retained 20 was copied
    with store.lease("g") as view:  # a turn that is not kept: reserved, written, then dropped on exit
        store.reserve("g", view.length + 40)
        assert store.stats()["tiers"]["device"]["free_pages"] == free0 - 5
    assert store.stats()["tiers"]["device"]["free_pages"] == free0 - 3 and store.state("g").tokens == 33
    store.delete("g")
    assert store.stats()["tiers"]["device"]["free_pages"] == free0


def test_page_exhaustion_names_the_numbers_and_harms_nothing_else(redis_url):
    store = make_store(None, device=nbytes(64), host=0)  # 4 pages, no lower tier to demote to
    a = make_shard(30, 1)
    store.put("a", *a)  # 2 pages
    with pytest.raises(KVCapacityError, match=r"has 2 free pages of 4 and session 'b' needs 3 more \(12288 bytes\)"):
        store.put("b", *make_shard(40, 2))
    assert store.sessions() == ["a"] and store.stats()["tiers"]["device"]["free_pages"] == 2
    assert_same(store.read("a"), a)
    store.close()


def test_a_leased_session_is_never_demoted_and_a_delete_waits_for_it(store):
    store.put("busy", *make_shard(20, 1))
    free0 = store.stats()["tiers"]["device"]["free_pages"]
    with store.lease("busy"):
        assert store.demote("busy").tier == "device"  # in use: stays
        store.delete("busy")  # freed when the request lets go
        assert store.stats()["tiers"]["device"]["free_pages"] == free0
    assert store.stats()["tiers"]["device"]["free_pages"] == free0 + 2 and store.sessions() == []


def test_an_older_format_is_refused_with_a_clear_message(store, redis_server):
    r = redis_server.client()
    r.set(f"ringserve:kv:v1:{FP}:old:g0-r0:manifest", b"RSKV\x01\x00")
    with pytest.raises(KVDataLossError, match="KV format v1 by an older ringserve; this build reads only v2"):
        store.restore("old")
