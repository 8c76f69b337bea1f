"""The KV store's control-plane calls against a real redis-server: an on_demote session demoted again after
an append re-persists only what changed since its last manifest (and until then a restore finds the older,
shorter copy — which is why the Gateway restores only the registry's length); set_retention changes what
the tier policy does; forget drops a session from memory and leaves its Redis copy."""

from __future__ import annotations

import torch

from ringserve.workers.kvformat import FORMAT_VERSION
from ringserve.workers.kvstore import IdlePolicy, KVStore, PageGeometry, TierCapacity

FP = "tinyfp0123456789"
L, HKV, D, BLOCK = 2, 2, 16, 16


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def shard(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, T, HKV, D, generator=g).to(torch.bfloat16),
            torch.randn(L, T, HKV, D, generator=g).to(torch.bfloat16))


def store(url, clock=None, **kw) -> KVStore:
    return KVStore("g0-r0", FP, PageGeometry(L, HKV, D, BLOCK, torch.bfloat16),
                   TierCapacity(device=1 << 20, host=1 << 20), redis_url=url, clock=clock or FakeClock(),
                   chunk_bytes=4096, **kw)


def append(st: KVStore, sid: str, kv) -> None:
    k, v = kv
    with st.lease(sid) as view:
        n0, T = view.length, k.shape[1]
        st.reserve(sid, n0 + T)
        slots = view.slots(n0, n0 + T)
        for layer in range(L):
            view.write(layer, slots, k[layer], v[layer])
        st.commit(sid, n0 + T, meta={"length": n0 + T})


def keys(redis_server, sid: str) -> set[str]:
    return {k.decode() for k in redis_server.client().keys(f"ringserve:kv:v{FORMAT_VERSION}:{FP}:{sid}:*")}


def test_on_demote_session_re_persists_only_what_changed_since_its_last_manifest(redis_url, redis_server):
    s = store(redis_url)
    a, d = shard(40, 1), shard(8, 2)
    s.put("o", *a, meta={"length": 40})  # on_demote: nothing in Redis yet
    assert keys(redis_server, "o") == set()
    s.demote("o", "redis")
    first = keys(redis_server, "o")
    assert first and s.state("o").persisted_tokens == 40
    append(s, "o", d)  # promoted back to the device, then 8 tokens more
    assert s.state("o").tier == "device" and s.state("o").persisted_tokens == 40
    stale = store(redis_url)  # a restore now (its group died) finds the 40-token copy
    stale.restore("o")
    assert stale.meta("o") == {"length": 40}
    stale.forget("o")
    assert keys(redis_server, "o") == first  # forget left the copy alone
    s.demote("o", "redis")
    second = keys(redis_server, "o")
    new = second - first
    assert first <= second and new and all("t40-48" in k for k in new)  # only the appended tokens were written
    fresh = store(redis_url)
    fresh.restore("o")
    assert fresh.meta("o") == {"length": 48}
    k, v = fresh.read("o")
    assert torch.equal(k, torch.cat([a[0], d[0]], 1)) and torch.equal(v, torch.cat([a[1], d[1]], 1))
    for x in (s, stale, fresh):
        x.close()


def test_set_retention_changes_what_the_tier_policy_does(redis_url):
    clock = FakeClock()
    s = store(redis_url, clock, idle=IdlePolicy(device_idle_s=300, host_idle_s=3600, cold_idle_s=5))
    s.put("r", *shard(20, 3))
    clock.t += 10
    assert s.tick() == [] and s.state("r").tier == "device"  # standard: idle 10 s is nothing
    s.set_retention("r", "cold")
    assert s.retention("r") == "cold"
    assert s.tick() == [("r", "device", "redis")]
    s.set_retention("r", "hot")
    s.read("r")  # promoted by its next use; a hot session then stays
    clock.t += 10_000
    assert s.tick() == [] and s.state("r").tier == "device"
    try:
        s.set_retention("r", "lukewarm")
    except ValueError as e:
        assert "retention must be one of" in str(e)
    else:
        raise AssertionError("an unknown retention class was accepted")
    s.close()
