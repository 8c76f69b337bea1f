"""The session registry on a real redis-server: limits, idempotency, expiry index, paging."""

import threading

import pytest

from ringserve.cluster.registry import LimitExceeded, Registry, SessionRecord, new_session_id


def rec(tenant="t", size=100, t=1000.0, ttl=60.0):
    return SessionRecord(new_session_id(), tenant, "group-0", size, t, t + ttl, t)


def test_limits_on_sessions_and_tokens_per_tenant(redis_url):
    reg = Registry(redis_url)
    for _ in range(3):
        reg.create(rec(size=300), max_sessions=3, max_tokens=1000)
    with pytest.raises(LimitExceeded, match="already holds 3 sessions"):
        reg.create(rec(size=1), max_sessions=3, max_tokens=1000)
    reg.create(rec(tenant="other", size=1), max_sessions=3, max_tokens=1000)  # per tenant
    first = reg.list("t", offset=0, count=10)[0][-1]
    assert reg.delete(first) and not reg.delete(first)  # idempotent delete frees its tokens
    with pytest.raises(LimitExceeded, match="would exceed its limit of 1000"):
        reg.create(rec(size=401), max_sessions=3, max_tokens=1000)
    reg.create(rec(size=400), max_sessions=3, max_tokens=1000)


def test_concurrent_creates_cannot_both_pass_a_limit(redis_url):
    reg = Registry(redis_url)
    ok, refused = [], []

    def go():
        try:
            ok.append(reg.create(rec(size=10), max_sessions=5, max_tokens=10**9))
        except LimitExceeded:
            refused.append(1)

    threads = [threading.Thread(target=go) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == 5 and len(refused) == 15


def test_request_id_makes_create_idempotent_and_expiry_index(redis_url):
    reg = Registry(redis_url)
    a = reg.create(rec(t=1000, ttl=10), max_sessions=9, max_tokens=10**6, request_id="r-1")
    b = reg.create(rec(t=1000, ttl=10), max_sessions=9, max_tokens=10**6, request_id="r-1")
    assert a.id == b.id and len(reg.list("t", offset=0, count=10)[0]) == 1
    c = reg.create(rec(t=1000, ttl=100), max_sessions=9, max_tokens=10**6)
    assert [r.id for r in reg.expired(now=1050)] == [a.id]
    c.expire_time = 1020
    reg.put(c)
    assert {r.id for r in reg.expired(now=1050)} == {a.id, c.id}


def test_paging_newest_first(redis_url):
    reg = Registry(redis_url)
    ids = [reg.create(rec(t=1000 + i), max_sessions=99, max_tokens=10**6).id for i in range(7)]
    page1, more1 = reg.list("t", offset=0, count=3)
    page3, more3 = reg.list("t", offset=6, count=3)
    assert [r.id for r in page1] == ids[::-1][:3] and more1
    assert [r.id for r in page3] == [ids[0]] and not more3
