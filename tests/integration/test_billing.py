"""The billing ledger on a real redis-server, with a fake clock (no sleeping for hours)."""

from __future__ import annotations

import pytest

from ringserve.cluster.billing import HOUR_MS, BelowMinimum, BillingError, Crash, Ledger, Rates
from ringserve.workers.protocol import Tier

T0 = 498_611 * 3600 + 1043  # 17 min 23 s past an hour boundary (UTC)
# rates chosen so that a whole-second interval costs a whole number of nano-units
RATES = Rates(retention={"standard": {"hbm": 3.6, "host": 1.8, "redis": 0.36}}, prefill_per_mtok=0.5,
              cached_per_mtok=0.05, generated_per_mtok=2.0)


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def timeline(ledger: Ledger, clock: Clock, *, twice: bool = False, upto: int | None = None, start: int = 0):
    """A session held 2 h 30 min in HBM, 1 h on host, 45 min in Redis, with an append, a request and
    a meter pass every 10 minutes; a second session on another tenant lives alongside. Steps are
    numbered so a run can stop after any and resume."""
    steps = []

    def at(dt, fn):
        steps.append((T0 + dt, fn))

    at(0, lambda t: ledger.open("s-a", "acme", t=t, tier="device", tokens=1000, retention="standard",
                                prefill_tokens=1000, move=1))
    at(60, lambda t: ledger.open("s-b", "other", t=t, tier="device", tokens=500, retention="standard", move=1))
    at(1800, lambda t: ledger.charge("s-a", "acme", "gen:1", t=t, prefill=20, cached=1000, generated=30))
    at(3600, lambda t: ledger.resize("s-a", "size:1200", t=t, tokens=1200, compute=(200, 0, 0)))
    at(9000, lambda t: ledger.move("s-a", 2, t=t, tier="host"))
    at(12600, lambda t: ledger.move("s-a", 3, t=t, tier="redis"))
    at(15300, lambda t: ledger.close("s-a", t=t))
    at(15400, lambda t: ledger.close("s-b", t=t))
    for dt in range(600, 16200, 600):  # the periodic pass
        at(dt, lambda t: ledger.close_hours(t))
    steps.sort(key=lambda s: s[0])
    for i, (t, fn) in enumerate(steps[start:upto], start):
        clock.t = t
        fn(t)
        if twice:
            fn(t)
    return len(steps)


def snapshot(ledger: Ledger) -> dict:
    recs = {}
    for tenant in ("acme", "other"):
        for r in ledger.records(tenant, T0 - 86400, T0 + 86400):
            recs[r["id"]] = (r["kind"], r.get("tier"), r["start"], r["end"], r.get("token_ms"), r["nanos"])
    return {"records": recs, "acme": ledger.tenant_totals("acme"), "other": ledger.tenant_totals("other"),
            "s-a": ledger.session_usage("s-a", now=T0 + 20000), "open": ledger.open_sessions()}


@pytest.fixture
def fresh(redis_url):
    def make(fault=None, clock=None):
        return Ledger(redis_url, RATES, clock=clock or Clock(T0), fault=fault)
    return make


@pytest.fixture
def baseline(fresh, redis_server):
    clock = Clock(T0)
    ledger = fresh(clock=clock)
    timeline(ledger, clock)
    snap = snapshot(ledger)
    redis_server.client().flushall()
    return snap


def test_tiers_billed_to_the_second_with_hour_records(fresh):
    clock = Clock(T0)
    ledger = fresh(clock=clock)
    timeline(ledger, clock)
    u = ledger.session_usage("s-a", now=T0 + 20000)
    # 1000 tokens for 1 h then 1200 tokens for 1.5 h in HBM, 1 h on host, 45 min in Redis
    assert u["token_seconds"] == {"hbm": 1000 * 3600 + 1200 * 5400, "host": 1200 * 3600, "redis": 1200 * 2700}
    want_ret = (1000 * 3600 + 1200 * 5400) * 1000 * 3.6 / 3600 + 1200 * 3600 * 1000 * 1.8 / 3600 \
        + 1200 * 2700 * 1000 * 0.36 / 3600
    assert u["retention_nanos"] == int(want_ret)
    assert u["compute_nanos"] == 720_000  # (1220 x 0.5 + 1000 x 0.05 + 30 x 2.0) $/1M tokens, in nano-units
    assert u["billed_through"] == T0 + 15300 and not u["open"]  # deleted: accrual stopped there
    recs = [r for r in ledger.records("acme", T0 - 3600, T0 + 86400) if r["kind"] == "retention"]
    # every record lies inside one clock hour and they tile [T0, T0 + 4h15m) without gap or overlap
    assert all(r["start"] // HOUR_MS == (r["end"] - 1) // HOUR_MS for r in recs)
    spans = sorted((r["start"], r["end"]) for r in recs)
    assert spans[0][0] == T0 * 1000 and spans[-1][1] == (T0 + 15300) * 1000
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    boundaries = {e for _, e in spans if e % HOUR_MS == 0}
    assert len(boundaries) == 4  # the four hour boundaries crossed each end a record
    # bounded growth: hours touched + the events inside them (resize, two moves)
    assert len(recs) == 5 + 3
    # the other tenant sees none of it
    assert all(r["session"] == "s-b" for r in ledger.records("other", T0 - 3600, T0 + 86400))
    assert ledger.usage("other", T0 - 3600, T0 + 86400, now=T0 + 20000)["total"]["token_ms"]["hbm"] == \
        500 * 15340 * 1000


def test_replaying_every_write_twice_changes_nothing(fresh, baseline):
    clock = Clock(T0)
    ledger = fresh(clock=clock)
    timeline(ledger, clock, twice=True)
    assert snapshot(ledger) == baseline


@pytest.mark.parametrize("where", ["read", "write", "written"])
def test_crash_between_any_two_steps_then_restart(fresh, baseline, redis_server, where):
    """Stop the meter at the k-th `where` step for every k; a restarted meter replays the timeline
    from the start (what the Gateway and the periodic pass produce again) and ends identical."""
    count = {"n": 0}

    def counting(step):
        count["n"] += step == where

    probe = Clock(T0)
    timeline(fresh(fault=counting, clock=probe), probe)
    total = count["n"]
    assert total >= 10
    for k in range(1, total + 1):
        redis_server.client().flushall()
        seen = {"n": 0}

        def fault(step):
            if step == where:
                seen["n"] += 1
                if seen["n"] == k:
                    raise Crash(f"killed at {where} #{k}")

        clock = Clock(T0)
        with pytest.raises(Crash):
            timeline(fresh(fault=fault, clock=clock), clock)
        clock = Clock(T0)
        timeline(fresh(clock=clock), clock)  # the restart
        assert snapshot(fresh()) == baseline, f"crash at {where} #{k}"


def test_redis_restart_with_aof_mid_run(baseline, aof_redis):
    server = aof_redis
    if True:
        clock = Clock(T0)
        ledger = Ledger(server.url, RATES, clock=clock)
        n = timeline(ledger, clock, upto=15)
        server.kill()  # SIGKILL: only the append-only file brings the data back
        server.start()
        ledger = Ledger(server.url, RATES, clock=clock)
        timeline(ledger, clock, start=15)
        assert n == 34  # every step of the timeline ran: 8 events and 26 meter passes
        assert snapshot(ledger) == baseline


def test_deletion_stops_accrual_at_commit_time(fresh):
    clock = Clock(T0)
    ledger = fresh(clock=clock)
    ledger.open("s-d", "acme", t=T0, tier="host", tokens=300, retention="cold")
    clock.t = T0 + 100
    assert ledger.session_usage("s-d")["token_seconds"]["host"] == 300 * 100  # live: accrues as it goes
    ledger.close("s-d", t=T0 + 125.5)
    for dt in (3600, 7200):
        ledger.close_hours(T0 + dt)
    u = ledger.session_usage("s-d", now=T0 + 7200)
    assert u["token_seconds"]["host"] == 300 * 125.5 and u["billed_through"] == T0 + 125.5
    assert ledger.move("s-d", 2, t=T0 + 200, tier="redis") == "dup"  # nothing reopens it
    assert ledger.session_usage("s-d", now=T0 + 9000) == u
    # a retained turn that finished just after the delete still bills its tokens, and nothing more
    assert ledger.resize("s-d", "size:400", t=T0 + 126, tokens=400, compute=(10, 300, 90), tenant="acme") == "ok"
    late = ledger.session_usage("s-d", now=T0 + 9000)
    assert late["token_seconds"] == u["token_seconds"] and late["billed_through"] == u["billed_through"]
    assert late["compute_nanos"] == 200_000  # (10 x 0.5 + 300 x 0.05 + 90 x 2.0) $/1M tokens


def test_a_late_tier_move_applies_at_the_watermark_never_backwards(fresh):
    ledger = fresh()
    ledger.open("s-l", "acme", t=T0, tier="device", tokens=10, retention="standard", move=1)
    ledger.close_hours(T0 + 3600)  # boundary at T0 - 1043 + 3600
    boundary = T0 - 1043 + 3600
    ledger.move("s-l", 2, t=T0 + 60, tier="host")  # happened before the boundary, seen after it
    ledger.close("s-l", t=boundary + 10)
    u = ledger.session_usage("s-l", now=T0 + 9000)
    assert u["token_seconds"] == {"hbm": 10 * (boundary - T0), "host": 10 * 10, "redis": 0}
    assert ledger.move("s-l", 1, t=T0, tier="device") == "dup"


def test_usage_group_by_and_export(fresh):
    clock = Clock(T0)
    ledger = fresh(clock=clock)
    timeline(ledger, clock)
    by_tier = ledger.usage("acme", T0 - 3600, T0 + 86400, "tier", now=T0 + 20000)
    keys = [i["key"] for i in by_tier["line_items"]]
    assert keys == ["compute", "hbm", "host", "redis"]
    tot = by_tier["total"]
    assert tot["retention_nanos"] + tot["compute_nanos"] == ledger.tenant_totals("acme")["retention_nanos"] + \
        ledger.tenant_totals("acme")["compute_nanos"]
    by_day = ledger.usage("acme", T0 - 3600, T0 + 86400, "day", now=T0 + 20000)
    assert sum(i["records"] for i in by_day["line_items"]) == by_tier["total"]["records"]
    # an hour-aligned window sees exactly the records of that hour
    h = (T0 // 3600 + 1) * 3600
    one = ledger.usage("acme", h, h + 3600, "session", now=T0 + 20000)
    assert one["total"]["token_ms"]["hbm"] == 1200 * 3600 * 1000 - 1200 * (T0 + 3600 - h) * 1000 + \
        1000 * (T0 + 3600 - h) * 1000
    csv_text = "".join(ledger.export("acme", T0 - 3600, T0 + 86400, "csv"))
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("id,event,tenant,session") and len(lines) == 1 + by_tier["records"]
    import json
    rows = [json.loads(x) for x in "".join(ledger.export("acme", T0 - 3600, T0 + 86400, "jsonl")).splitlines()]
    assert len({r["id"] for r in rows}) == len(rows) == by_tier["records"]
    assert all(r["currency"] == "USD" for r in rows)


def test_bad_queries_and_minimum_size(fresh, redis_url):
    ledger = fresh()
    with pytest.raises(BillingError, match="after start"):
        ledger.usage("acme", T0, T0 - 1)
    with pytest.raises(BillingError, match="at most 93 days"):
        ledger.usage("acme", T0, T0 + 94 * 86400)
    with pytest.raises(BillingError, match="group_by"):
        ledger.usage("acme", T0, T0 + 10, "week")
    with pytest.raises(BillingError, match="format"):
        list(ledger.export("acme", T0, T0 + 10, "xml"))
    strict = Ledger(redis_url, Rates(min_session_tokens=1024))
    with pytest.raises(BelowMinimum, match="at least 1024"):
        strict.open("s-m", "acme", t=T0, tier="device", tokens=1000, retention="standard")
    assert strict.open_sessions() == {}
    with pytest.raises(ValueError, match="ISO 4217"):
        Rates(currency="dollars")
    with pytest.raises(ValueError, match="unknown tier"):
        Rates(retention={"standard": {"gpu": 1.0}})
    assert [Tier.parse(t).api for t in ("device", "hbm", "host", "redis")] == ["hbm", "hbm", "host", "redis"]
    with pytest.raises(ValueError, match="unknown tier 'gpu'"):
        Tier.parse("gpu")


def test_reconciliation_reports_unmetered_and_orphaned(fresh):
    ledger = fresh()
    ledger.open("s-1", "acme", t=T0, tier="device", tokens=10, retention="standard")
    ledger.open("s-2", "acme", t=T0, tier="device", tokens=10, retention="standard")
    out = ledger.reconcile({"s-1": "ready", "s-3": "ready", "s-4": "creating"})
    assert out == {"unmetered": ["s-3"], "orphaned": ["s-2"]}
    assert ledger.reconcile({"s-1": "ready", "s-2": "ready"}) == {"unmetered": [], "orphaned": []}


def test_many_sessions_read_at_once_equal_one_by_one(fresh):
    clock = Clock(T0)
    ledger = fresh(clock=clock)
    timeline(ledger, clock, upto=20)  # s-a and s-b both live, with records and open intervals
    now = clock.t + 123.4
    many = ledger.sessions_usage(["s-a", "s-b", "s-none"], now=now)
    assert many == {sid: ledger.session_usage(sid, now=now) for sid in ("s-a", "s-b", "s-none")}
    assert many["s-a"]["open"] and many["s-a"]["billed_through"] == now
    assert many["s-none"]["token_seconds"] == {"hbm": 0, "host": 0, "redis": 0} and not many["s-none"]["open"]


def test_compute_events_apply_once_per_bill_and_sizes_never_shrink(fresh):
    ledger = fresh()
    ledger.open("s-m", "acme", t=T0, tier="device", tokens=100, retention="standard", move=1)
    for _ in range(3):  # the Gateway at the stream's end, a task after a cancel, the meter pass: one record
        ledger.charge("s-m", "acme", "c:b1", t=T0 + 10, prefill=5, generated=7)
    ledger.charge("s-m", "acme", "c:b2", t=T0 + 11, prefill=5, generated=7)
    assert ledger.tenant_totals("acme")["generated_tokens"] == 14 and ledger.applied("s-m", "c:b1")
    assert ledger.resize("s-m", "size:150", t=T0 + 20, tokens=150) == "ok"
    assert ledger.resize("s-m", "size:120", t=T0 + 30, tokens=120) == "same"  # a late, smaller size
    u = ledger.session_usage("s-m", now=T0 + 40)
    assert u["token_seconds"]["hbm"] == 100 * 20 + 150 * 20
    ledger.charge("s-x", "acme", "c:b3", t=T0, prefill=64)  # a create cancelled before it was metered
    assert ledger.session_tenant("s-x") == "acme" and ledger.session_usage("s-x")["compute_nanos"] > 0
