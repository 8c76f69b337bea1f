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


def test_request_id_checks_the_content_and_a_failed_create_frees_it(redis_url):
    from ringserve.cluster.registry import KeyReused

    reg = Registry(redis_url)
    a = reg.create(rec(), max_sessions=9, max_tokens=10**6, request_id="r-2", content_hash="h1")
    with pytest.raises(KeyReused, match="other content"):
        reg.create(rec(), max_sessions=9, max_tokens=10**6, request_id="r-2", content_hash="h2")
    assert reg.create(rec(), max_sessions=9, max_tokens=10**6, request_id="r-2", content_hash="h1").id == a.id
    reg.delete(a)  # it was still "creating": a create that never finished frees its key for a retry
    b = reg.create(rec(), max_sessions=9, max_tokens=10**6, request_id="r-2", content_hash="h1")
    assert b.id != a.id
    b.state = "ready"
    reg.put(b)
    reg.delete(b)  # a session that existed keeps its key: a late retry must not create it again
    with pytest.raises(KeyReused, match="deleted since"):
        reg.create(rec(), max_sessions=9, max_tokens=10**6, request_id="r-2", content_hash="h1")


def test_writes_are_compare_and_set_and_growth_never_reverts(redis_url):
    from ringserve.cluster.registry import Conflict

    reg = Registry(redis_url)
    r = reg.create(rec(size=100), max_sessions=9, max_tokens=10**6)
    stale = reg.get(r.id)
    assert reg.grow(r.id, "t", 150)  # an append finished
    stale.expire_time += 60
    with pytest.raises(Conflict):  # a writer that read before the append cannot write over it
        reg.put(stale)
    assert reg.get(r.id).size_tokens == 150 and reg.tenant_tokens("t") == 150
    assert reg.grow(r.id, "t", 120) and reg.get(r.id).size_tokens == 150  # a late, smaller report changes nothing
    # an update racing appends: neither loses the other's change
    done = threading.Event()

    def extend():
        while not done.is_set():
            reg.update(r.id, lambda x: setattr(x, "expire_time", x.expire_time + 1))

    t = threading.Thread(target=extend)
    t.start()
    for n in range(151, 251):
        reg.grow(r.id, "t", n)
    done.set()
    t.join()
    final = reg.get(r.id)
    assert final.size_tokens == 250 and reg.tenant_tokens("t") == 250 and final.expire_time > r.expire_time


def test_delete_wins_no_revival_and_counters_move_once(redis_url):
    from ringserve.cluster.registry import LimitExceeded

    reg = Registry(redis_url)
    r = reg.create(rec(size=100), max_sessions=9, max_tokens=1000)
    reg.reserve("t", "bill-1", 300, max_tokens=1000)  # an append in flight
    assert reg.tenant_tokens("t") == 400
    with pytest.raises(LimitExceeded, match="limit of 1000"):
        reg.reserve("t", "bill-2", 601, max_tokens=1000)
    assert reg.delete(r) and not reg.delete(r)
    assert reg.tenant_tokens("t") == 300  # the session's tokens left once; the reservation is still held
    assert not reg.grow(r.id, "t", 400, "bill-1")  # the append finished after the delete: no revival
    assert reg.get(r.id) is None and reg.tenant_tokens("t") == 0
    assert reg.update(r.id, lambda x: setattr(x, "state", "ready")) is None
    reg.reserve("t", "bill-3", 50, max_tokens=1000, ttl_s=-1)  # its Gateway died before settling it
    assert reg.tenant_tokens("t") == 50 and reg.release_expired() == 1 and reg.tenant_tokens("t") == 0
    assert not reg.release("t", "bill-3")


def test_idempotency_keys_of_appends_and_turns(redis_url):
    from ringserve.cluster.registry import KeyReused

    reg = Registry(redis_url)
    kw = dict(kind="append", session="s-1", content_hash="h", group="group-0", ttl_s=60)
    assert reg.idem_begin("t", "k", bill="b1", **kw).state == "new"
    st = reg.idem_begin("t", "k", bill="b2", **kw)
    assert (st.state, st.bill, st.group) == ("pending", "b1", "group-0")
    with pytest.raises(KeyReused):
        reg.idem_begin("t", "k", bill="b3", **{**kw, "content_hash": "other"})
    with pytest.raises(KeyReused):
        reg.idem_begin("t", "k", bill="b3", **{**kw, "kind": "turn"})
    assert reg.idem_begin("t", "k", bill="b2", takeover="b1", **kw).state == "new"  # b1 ended unsettled
    assert not reg.idem_done(reg.idem_key("t", "k"), "b1", {"x": 1})  # the old attempt cannot settle it now
    assert reg.idem_done(reg.idem_key("t", "k"), "b2", {"length": 7})
    st = reg.idem_begin("t", "k", bill="b4", **kw)
    assert st.state == "done" and st.result == {"length": 7}
    assert reg.idem_begin("t", "k2", bill="b5", **kw).state == "new"
    assert reg.idem_release(reg.idem_key("t", "k2"), "b5")  # failed: a retry runs again
    assert reg.idem_begin("t", "k2", bill="b6", **kw).state == "new"
    assert reg.idem_begin("other-tenant", "k", bill="b7", **kw).state == "new"  # keys are per tenant
