"""Bad input over a real gRPC channel (raw stubs: the SDK would refuse much of this before sending) to a
real local Ray Serve (one SP = 2 group of a tiny Llama) with a real redis-server, and the same against
another tenant's session.

The bad-input suite sends 55 classes of bad request (counted in BAD_CLASSES below): each gets its
documented status code and a message that names no internal address, source path or another tenant's
session; afterwards the service answers a normal request and the other tenant's session, usage and
answers are unchanged. The cross-tenant suite tries every session-scoped RPC on another tenant's session:
NOT_FOUND / PERMISSION_DENIED, and nothing changes."""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
from google.protobuf import field_mask_pb2

from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb
from serve_cluster import Cluster, create, generate

ray = pytest.importorskip("ray")

A, B, ADMIN = "key-tenant-a", "key-tenant-b", "key-admin"
C = grpc.StatusCode
MAX_RECEIVE = 1 << 20  # the proxy's receive bound in this cluster
IN_FLIGHT = 3  # requests in flight per tenant
BAD_CLASSES: list[str] = []  # filled as the suite runs; its length is asserted


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(keys={A: ("tenant-a", False), B: ("tenant-b", False), ADMIN: ("ops", True)},
                inputs={"max_receive_bytes": MAX_RECEIVE, "max_concurrent_per_tenant": IN_FLIGHT})
    yield c
    c.close()


def snapshot(c: Cluster, key: str, name: str) -> dict:
    """What another tenant could have changed about a session: its record, size, expiry, class, tier, its
    compute records, and its greedy answer."""
    s = c.stub.GetSession(pb.GetSessionRequest(name=name), metadata=c.md(key), timeout=60)
    recs = c.compute_records(s.tenant, s.name.split("/")[-1])
    return {"size": s.size_tokens, "expire": s.expire_time.ToNanoseconds(), "retention": s.retention,
            "update": s.update_time.ToNanoseconds(), "tier": s.tier, "display": s.display_name,
            "compute": [(r["prefill_tokens"], r["cached_tokens"], r["generated_tokens"]) for r in recs]}


def proxy_peak_mb() -> int:
    """Peak resident memory (VmHWM) of Serve's proxy process, in MiB."""
    import psutil

    me = os.getpid()  # the proxy of this module's cluster: its raylet is a child of this process (another
    # pytest worker may run a cluster of its own at the same time)
    pids = [p.pid for p in psutil.process_iter(["cmdline"]) if "ProxyActor" in " ".join(p.info["cmdline"] or ())
            and me in {a.pid for a in p.parents()}]
    assert len(pids) == 1, pids
    with open(f"/proc/{pids[0]}/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM"))


def expect(code: grpc.StatusCode, what: str, call, match: str = "", codes: tuple = ()):
    """Run `call`, which must fail with `code` (or one of `codes`) and a clean, non-empty message."""
    BAD_CLASSES.append(what)
    with pytest.raises(grpc.RpcError) as e:
        r = call()
        if hasattr(r, "__iter__") and not isinstance(r, (pb.Session, pb.ListSessionsResponse)):
            list(r)
    got, msg = e.value.code(), e.value.details() or ""
    assert got == code or got in codes, f"{what}: {got} {msg!r}"
    assert msg.strip(), f"{what}: no message"
    assert match.lower() in msg.lower(), f"{what}: {msg!r}"
    for leak in ("127.0.0.1", "/work/", "/tmp/", "Traceback", "site-packages", ".py"):
        assert leak not in msg, f"{what}: message leaks {leak!r}: {msg!r}"
    return msg


def test_bad_input_suite_then_the_service_is_whole_and_other_tenants_unchanged(cluster):
    c, s = cluster, cluster.stub
    victim = create(c, B, "Tenant B keeps notes about lighthouses and the ships that pass them. " * 4,
                    display_name="b-notes")
    before_answer = generate(c, B, victim.name, "What is kept?", max_tokens=8)[0]
    before = snapshot(c, B, victim.name)
    mine = create(c, A, "Tenant A keeps a diary of walks along the river and the birds seen there. " * 3)
    vid = victim.name.split("/")[-1]
    a, none = c.md(A), None
    big = "x" * (MAX_RECEIVE + 1024)

    # -- transport and authentication: an oversized message is refused by the proxy's gRPC core from its
    # length prefix, before it is buffered (the proxy's peak memory does not grow by the message's size)
    peak = proxy_peak_mb()
    huge = "x" * (64 << 20)
    for key, what in ((None, "oversized message without a key"), (A, "oversized message with a key")):
        t0 = time.monotonic()
        expect(C.RESOURCE_EXHAUSTED, what, lambda: s.CreateSession(pb.CreateSessionRequest(text=huge),
                                                                    metadata=c.md(key), timeout=30), "larger than max")
        assert time.monotonic() - t0 < 5
    expect(C.RESOURCE_EXHAUSTED, "message just over the receive bound", lambda: s.AppendToSession(
        pb.AppendToSessionRequest(name=mine.name, text=big), metadata=a, timeout=30), "larger than max")
    assert proxy_peak_mb() - peak < 32, (peak, proxy_peak_mb())
    del huge
    expect(C.UNAUTHENTICATED, "no API key", lambda: s.GetSession(pb.GetSessionRequest(name=mine.name), timeout=30),
           "missing API key")
    expect(C.UNAUTHENTICATED, "authorization not Bearer", lambda: s.GetSession(
        pb.GetSessionRequest(name=mine.name), metadata=[("authorization", A)], timeout=30), "malformed")
    expect(C.UNAUTHENTICATED, "unknown API key", lambda: s.ListSessions(
        pb.ListSessionsRequest(), metadata=c.md("not-a-key"), timeout=30), "unknown API key")
    expect(C.UNAUTHENTICATED, "two authorization headers", lambda: s.ListSessions(
        pb.ListSessionsRequest(), metadata=c.md(A) + c.md(B), timeout=30), "exactly one")
    expect(C.PERMISSION_DENIED, "Status without admin key", lambda: s.Status(pb.StatusRequest(), metadata=a, timeout=30),
           "admin")

    # -- create content
    cs = lambda **kw: s.CreateSession(pb.CreateSessionRequest(**kw), metadata=a, timeout=60)  # noqa: E731
    expect(C.INVALID_ARGUMENT, "create without content", lambda: cs(), "text, token_ids or messages")
    expect(C.INVALID_ARGUMENT, "blank text", lambda: cs(text=" \n "), "empty")
    t0 = time.monotonic()
    expect(C.FAILED_PRECONDITION, "text over what the token limit can hold", lambda: cs(text="word " * 180_000),
           "characters")
    assert time.monotonic() - t0 < 5  # refused before tokenizing 900 KB
    expect(C.FAILED_PRECONDITION, "a million token ids", lambda: cs(token_ids=pb.TokenIds(ids=[5] * 1_000_000)),
           "1000000 tokens")
    expect(C.FAILED_PRECONDITION, "token ids just over the limit", lambda: cs(token_ids=pb.TokenIds(ids=[5] * 4097)),
           "exceed the limit of 4096")
    expect(C.INVALID_ARGUMENT, "token ids beyond the vocabulary", lambda: cs(token_ids=pb.TokenIds(ids=[1, 10**6])),
           "out of the vocabulary")
    expect(C.INVALID_ARGUMENT, "negative token ids", lambda: cs(token_ids=pb.TokenIds(ids=[1, -7])),
           "out of the vocabulary")
    expect(C.INVALID_ARGUMENT, "unknown chat role", lambda: cs(messages=pb.ChatMessages(
        messages=[pb.ChatMessage(role="root", content="hi")])), "role")
    expect(C.INVALID_ARGUMENT, "empty chat message", lambda: cs(messages=pb.ChatMessages(
        messages=[pb.ChatMessage(role="user", content="")])), "empty content")
    expect(C.INVALID_ARGUMENT, "display name too long", lambda: cs(text="hi there", display_name="n" * 300), "256")
    expect(C.INVALID_ARGUMENT, "unknown retention class", lambda: cs(text="hi there", retention=17), "retention 17")
    expect(C.INVALID_ARGUMENT, "unknown persist mode", lambda: cs(text="hi there", persist=-2), "persist")
    expect(C.INVALID_ARGUMENT, "malformed request_id", lambda: cs(text="hi there", request_id="has space"),
           "request_id")

    # -- expiration
    def with_ttl(secs, nanos=0):
        r = pb.CreateSessionRequest(text="hi there")
        r.ttl.seconds, r.ttl.nanos = secs, nanos
        return s.CreateSession(r, metadata=a, timeout=60)

    def with_expire(secs, nanos=0):
        r = pb.CreateSessionRequest(text="hi there")
        r.expire_time.seconds, r.expire_time.nanos = secs, nanos
        return s.CreateSession(r, metadata=a, timeout=60)
    expect(C.INVALID_ARGUMENT, "negative ttl", lambda: with_ttl(-60), "positive")
    expect(C.INVALID_ARGUMENT, "ttl beyond the maximum", lambda: with_ttl(10**10), "maximum")
    expect(C.INVALID_ARGUMENT, "ttl that is not a duration", lambda: with_ttl(5, -3), "not a valid duration")
    expect(C.INVALID_ARGUMENT, "expire_time in the past", lambda: with_expire(int(time.time()) - 5), "past")
    expect(C.INVALID_ARGUMENT, "expire_time past year 9999", lambda: with_expire(2**40), "not a valid timestamp")

    # -- names and pages
    expect(C.INVALID_ARGUMENT, "malformed session name", lambda: s.GetSession(
        pb.GetSessionRequest(name="sessions/../../etc"), metadata=a, timeout=30), "malformed")
    expect(C.INVALID_ARGUMENT, "session name with a trailing newline", lambda: s.DeleteSession(
        pb.DeleteSessionRequest(name=mine.name + "\n"), metadata=a, timeout=30), "malformed")
    expect(C.NOT_FOUND, "unknown session", lambda: s.GetSession(
        pb.GetSessionRequest(name="sessions/s-00000000000000ff"), metadata=a, timeout=30), "not found")
    expect(C.NOT_FOUND, "another tenant's session", lambda: s.GetSession(
        pb.GetSessionRequest(name=victim.name), metadata=a, timeout=30), "not found")
    expect(C.INVALID_ARGUMENT, "page_size over 1000", lambda: s.ListSessions(
        pb.ListSessionsRequest(page_size=5000), metadata=a, timeout=30), "page_size")
    expect(C.INVALID_ARGUMENT, "negative page_size", lambda: s.ListSessions(
        pb.ListSessionsRequest(page_size=-1), metadata=a, timeout=30), "page_size")
    expect(C.INVALID_ARGUMENT, "tampered page_token", lambda: s.ListSessions(
        pb.ListSessionsRequest(page_token="MTAw"), metadata=a, timeout=30), "page_token")
    for i in range(2):  # tenant B pages its list; its token is worthless to A
        create(c, B, f"Another note of tenant B, number {i}, about harbours. " * 2)
    token = s.ListSessions(pb.ListSessionsRequest(page_size=1), metadata=c.md(B), timeout=30).next_page_token
    assert token
    expect(C.INVALID_ARGUMENT, "another tenant's page_token", lambda: s.ListSessions(
        pb.ListSessionsRequest(page_size=1, page_token=token), metadata=a, timeout=30), "page_token")

    # -- generate
    g = lambda **kw: s.Generate(pb.GenerateRequest(name=mine.name, **kw), metadata=a, timeout=60)  # noqa: E731
    expect(C.INVALID_ARGUMENT, "generate without a prompt", lambda: g(), "prompt")
    expect(C.INVALID_ARGUMENT, "huge max_tokens", lambda: g(text="q", max_tokens=2**31 - 1), "max_tokens")
    expect(C.INVALID_ARGUMENT, "negative max_tokens", lambda: g(text="q", max_tokens=-5), "max_tokens")
    expect(C.INVALID_ARGUMENT, "NaN temperature", lambda: g(text="q", sampling=pb.SamplingParams(
        temperature=float("nan"))), "temperature")
    expect(C.INVALID_ARGUMENT, "huge temperature", lambda: g(text="q", sampling=pb.SamplingParams(
        temperature=3e38)), "temperature")
    expect(C.INVALID_ARGUMENT, "top_p above 1", lambda: g(text="q", sampling=pb.SamplingParams(top_p=7)), "top_p")
    expect(C.INVALID_ARGUMENT, "negative top_k", lambda: g(text="q", sampling=pb.SamplingParams(top_k=-3)), "top_k")
    expect(C.INVALID_ARGUMENT, "nine stop strings", lambda: g(text="q", stop=[str(i) for i in range(9)]),
           "at most 8")
    expect(C.INVALID_ARGUMENT, "an empty stop string", lambda: g(text="q", stop=["a", ""]), "empty")
    expect(C.INVALID_ARGUMENT, "a huge stop string", lambda: g(text="q", stop=["z" * 5000]), "256")
    expect(C.FAILED_PRECONDITION, "prompt over the session's remaining context", lambda: g(
        token_ids=pb.TokenIds(ids=[5] * (4096 - mine.size_tokens))), "exceed the limit")

    # -- append / update / usage
    expect(C.FAILED_PRECONDITION, "append over the limit", lambda: s.AppendToSession(pb.AppendToSessionRequest(
        name=mine.name, token_ids=pb.TokenIds(ids=[5] * 4096)), metadata=a, timeout=60), "exceed the limit")

    def update(paths, **session):
        r = pb.UpdateSessionRequest(session=pb.Session(name=mine.name, **session),
                                    update_mask=field_mask_pb2.FieldMask(paths=paths))
        return s.UpdateSession(r, metadata=a, timeout=30)
    expect(C.INVALID_ARGUMENT, "unknown update_mask path", lambda: update(["tenant"]), "cannot be updated")
    expect(C.INVALID_ARGUMENT, "empty update_mask", lambda: update([]), "empty")
    both = pb.Session(name=mine.name)
    both.ttl.seconds, both.expire_time.seconds = 60, int(time.time()) + 60
    expect(C.INVALID_ARGUMENT, "ttl and expire_time both set", lambda: s.UpdateSession(pb.UpdateSessionRequest(
        session=both, update_mask=field_mask_pb2.FieldMask(paths=["ttl", "expire_time"])), metadata=a, timeout=30),
        "both")
    start = pb.GetUsageRequest()
    start.start_time.seconds = int(time.time()) - 3600
    no_end = pb.GetUsageRequest(end_time=start.start_time)
    no_end.start_time.seconds = int(time.time())
    expect(C.INVALID_ARGUMENT, "usage ending before it starts", lambda: s.GetUsage(no_end, metadata=a, timeout=30),
           "after start_time")
    long = pb.GetUsageRequest()
    long.start_time.seconds = int(time.time()) - 200 * 86400
    expect(C.INVALID_ARGUMENT, "usage over more than 93 days", lambda: s.GetUsage(long, metadata=a, timeout=30),
           "93 days")
    bad_by = pb.GetUsageRequest(group_by=12)
    bad_by.start_time.CopyFrom(start.start_time)
    expect(C.INVALID_ARGUMENT, "unknown group_by", lambda: s.GetUsage(bad_by, metadata=a, timeout=30), "group_by")
    expect(C.INVALID_ARGUMENT, "usage without start_time", lambda: s.GetUsage(pb.GetUsageRequest(), metadata=a,
                                                                               timeout=30), "start_time")

    # -- invalid UTF-8 in a string field: Serve's proxy parses the message before the Gateway sees it and
    # answers with the parser's message (UNKNOWN, not INVALID_ARGUMENT: a known limit of Serve's proxy)
    raw = c.channel.unary_stream("/ringserve.v1.RingServe/CreateSession", request_serializer=lambda b: b,
                                 response_deserializer=lambda b: b)
    expect(C.INVALID_ARGUMENT, "invalid UTF-8 in text", lambda: raw(b"\x0a\x03\xff\xfe\xfd", metadata=a, timeout=30),
           "utf-8", codes=(C.UNKNOWN,))

    # -- per-tenant concurrency: tenant A's (IN_FLIGHT + 1)-th concurrent request is refused at once (one
    # session each: a session's requests run one at a time in its group)
    others = [create(c, A, f"Tenant A's side note {i} on river birds. " * 2) for i in range(IN_FLIGHT)]
    streams = [s.Generate(pb.GenerateRequest(name=o.name, text="Go on.", max_tokens=1500), metadata=a, timeout=120)
               for o in others]
    firsts = [next(iter(st)) for st in streams]  # all of them are running
    assert all(f is not None for f in firsts)
    expect(C.RESOURCE_EXHAUSTED, "over the tenant's concurrent requests", lambda: s.GetSession(
        pb.GetSessionRequest(name=mine.name), metadata=a, timeout=30), "in flight")
    assert s.GetSession(pb.GetSessionRequest(name=victim.name), metadata=c.md(B), timeout=30).name  # B unaffected
    for st in streams:
        st.cancel()

    # -- the count, then the service is whole and tenant B's session is as it was
    assert len(BAD_CLASSES) >= 30 and len(set(BAD_CLASSES)) == len(BAD_CLASSES), BAD_CLASSES
    assert len(BAD_CLASSES) == 55, len(BAD_CLASSES)
    c.wait(lambda: c.stub.GetSession(pb.GetSessionRequest(name=mine.name), metadata=a, timeout=30), 30,
           what="A's requests admitted again")
    fresh = create(c, A, "A normal request after all of that: a note about tulips.")
    text, ids, last = generate(c, A, fresh.name, "And the tulips?", max_tokens=6)
    assert len(ids) == 6 and last.usage.generated_tokens == 6 and last.finish_reason == pb.LENGTH
    assert snapshot(c, B, victim.name) == before
    assert generate(c, B, victim.name, "What is kept?", max_tokens=8)[0] == before_answer
    assert vid not in str(BAD_CLASSES)


def test_every_session_rpc_on_another_tenants_session_is_refused_and_changes_nothing(cluster):
    c, s = cluster, cluster.stub
    b = create(c, B, "Tenant B's private ledger of orchards and their apple harvests. " * 3, retention=pb.COLD)
    sid = b.name.split("/")[-1]
    generate(c, B, b.name, "Which orchards?", max_tokens=4)
    before = snapshot(c, B, b.name)
    tokens_before = c.registry().tenant_tokens("tenant-b")
    a = c.md(A)
    start = int(time.time()) - 3600

    def usage(**kw):
        r = pb.GetUsageRequest(**kw)
        r.start_time.seconds = start
        return s.GetUsage(r, metadata=a, timeout=30)

    def export(**kw):
        r = pb.ExportUsageRequest(**kw)
        r.start_time.seconds = start
        return s.ExportUsage(r, metadata=a, timeout=30)

    ttl = pb.Session(name=b.name)
    ttl.ttl.seconds = 60
    calls = {
        "GetSession": (C.NOT_FOUND, lambda: s.GetSession(pb.GetSessionRequest(name=b.name), metadata=a, timeout=30)),
        "UpdateSession ttl": (C.NOT_FOUND, lambda: s.UpdateSession(pb.UpdateSessionRequest(
            session=ttl, update_mask=field_mask_pb2.FieldMask(paths=["ttl"])), metadata=a, timeout=30)),
        "UpdateSession retention": (C.NOT_FOUND, lambda: s.UpdateSession(pb.UpdateSessionRequest(
            session=pb.Session(name=b.name, retention=pb.HOT), update_mask=field_mask_pb2.FieldMask(
                paths=["retention"])), metadata=a, timeout=30)),
        "DeleteSession": (C.NOT_FOUND, lambda: s.DeleteSession(pb.DeleteSessionRequest(name=b.name), metadata=a,
                                                               timeout=30)),
        "AppendToSession": (C.NOT_FOUND, lambda: s.AppendToSession(pb.AppendToSessionRequest(
            name=b.name, text="A's words in B's session", request_id="r-cross"), metadata=a, timeout=30)),
        "Generate": (C.NOT_FOUND, lambda: s.Generate(pb.GenerateRequest(name=b.name, text="leak it", retain_turn=True),
                                                     metadata=a, timeout=30)),
        "GetUsage of the session": (C.NOT_FOUND, lambda: usage(session=b.name)),
        "ExportUsage of the session": (C.NOT_FOUND, lambda: export(session=b.name)),
        "GetUsage of the tenant": (C.PERMISSION_DENIED, lambda: usage(tenant="tenant-b")),
        "ExportUsage of the tenant": (C.PERMISSION_DENIED, lambda: export(tenant="tenant-b")),
    }
    for what, (code, call) in calls.items():
        msg = expect(code, f"cross-tenant {what}", call)
        assert "tenant-b" not in msg, (what, msg)
    # A's own listing and usage do not show it either
    assert b.name not in [x.name for x in s.ListSessions(pb.ListSessionsRequest(), metadata=a, timeout=30).sessions]
    assert sid not in [i.key for i in usage().line_items]
    assert sid not in b"".join(x.data for x in export()).decode()
    time.sleep(1.5)  # a meter pass and a tier tick: nothing of A's attempts lands late
    after = snapshot(c, B, b.name)
    assert {k: v for k, v in after.items() if k != "tier"} == {k: v for k, v in before.items() if k != "tier"}
    assert c.registry().tenant_tokens("tenant-b") == tokens_before
    # the admin may read B's usage; the session and its compute are B's alone
    r = pb.GetUsageRequest(tenant="tenant-b", session=b.name)
    r.start_time.seconds = start
    total = s.GetUsage(r, metadata=c.md(ADMIN), timeout=30).total
    assert total.prefill_tokens == sum(p for p, _, _ in before["compute"]) and total.generated_tokens == 4


def test_concurrent_requests_of_one_tenant_do_not_starve_another(cluster):
    """The per-tenant limit bounds what one tenant holds in the Gateway: B is served while A is at it."""
    c, s = cluster, cluster.stub
    mine = create(c, A, "Tenant A's notes on clouds and weather fronts. " * 3)
    theirs = create(c, B, "Tenant B's notes on tides. " * 3)
    errors: list = []

    def hammer():
        try:
            for _ in range(3):
                list(s.Generate(pb.GenerateRequest(name=mine.name, text="More.", max_tokens=40), metadata=c.md(A),
                                timeout=120))
        except grpc.RpcError as e:
            errors.append(e.code())
    threads = [threading.Thread(target=hammer) for _ in range(IN_FLIGHT + 3)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    assert generate(c, B, theirs.name, "Tides?", max_tokens=4)[2].usage.generated_tokens == 4
    assert time.monotonic() - t0 < 30
    for t in threads:
        t.join(180)
    assert set(errors) <= {C.RESOURCE_EXHAUSTED} and errors  # A's excess was refused, nothing else failed
