"""The Gateway's parsing and validation rules, API keys, input bounds and error sanitizing, without Ray,
Redis or a model: every rule a request can be refused by before any work is done."""

from __future__ import annotations

import math
import time

import grpc
import pytest
from google.protobuf import field_mask_pb2

from ringserve.cluster import rules
from ringserve.cluster.auth import KeyRing
from ringserve.cluster.config import ApiKey, hash_key
from ringserve.cluster.limits import PROXY_ENV, InputLimits, TenantGate, controller_options
from ringserve.cluster.rules import RpcError
from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb
from ringserve.workers.protocol import ContextLimitError, GroupUnhealthy, KVCapacityError

SID = "s-0123456789abcdef"
NOW = 1_750_000_000.0


def refused(code: grpc.StatusCode, match: str = ""):
    class Ctx:
        def __enter__(self):
            return self

        def __exit__(self, typ, e, tb):
            assert typ is RpcError, f"expected RpcError {code.name}, got {typ and typ.__name__}: {e}"
            assert e.code == code, (e.code, e.message)
            assert match in e.message, e.message
            return True
    return Ctx()


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name", [SID, f"sessions/{SID}"])
def test_session_names_accepted(name):
    assert rules.session_id(name) == SID


@pytest.mark.parametrize("name", ["", "sessions/", "s-0123", f"{SID}\n", f"sessions/{SID.upper()}", f"x/{SID}",
                                  f"sessions/{SID}/more", "sessions/" + "a" * 5000, f" {SID}"])
def test_malformed_session_names_refused_with_a_short_message(name):
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed") as _:
        rules.session_id(name)
    try:
        rules.session_id(name)
    except RpcError as e:
        assert len(e.message) < 200


# ------------------------------------------------------------------------------------------------ content


def test_content_shapes():
    assert rules.content(pb.CreateSessionRequest(text="hi"), "content").kind == "text"
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "text is empty"):
        rules.content(pb.CreateSessionRequest(text=" \n\t"), "content")
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "give the content"):
        rules.content(pb.CreateSessionRequest(), "content")
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "give the prompt"):
        rules.content(pb.GenerateRequest(name=SID), "prompt")
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "token_ids is empty"):
        rules.content(pb.CreateSessionRequest(token_ids=pb.TokenIds()), "content")
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="tool", content="x")])
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "role 'tool' is not one of"):
        rules.content(pb.CreateSessionRequest(messages=msgs), "content")
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="  ")])
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "empty content"):
        rules.content(pb.CreateSessionRequest(messages=msgs), "content")
    empty = pb.CreateSessionRequest()
    empty.messages.SetInParent()
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "messages is empty"):
        rules.content(empty, "content")
    c = rules.content(pb.CreateSessionRequest(messages=pb.ChatMessages(messages=[
        pb.ChatMessage(role="system", content="abc"), pb.ChatMessage(role="user", content="de")])), "content")
    assert c.chars == 5 and c.as_messages()[0] == {"role": "system", "content": "abc"}


def size(c, *, room=100, vocab=1000, max_token_bytes=10, normalizes=False):
    rules.check_size(c, room=room, max_tokens=100, length=100 - room, vocab=vocab, max_token_bytes=max_token_bytes,
                     normalizes=normalizes, what="the content")


def test_text_over_what_the_limit_can_hold_is_refused_before_tokenizing():
    size(rules.Content("text", text="x" * 1000))  # 100 tokens x 10 bytes: could fit
    with pytest.raises(ContextLimitError, match="1001 characters.*no text longer than 1000"):
        size(rules.Content("text", text="x" * 1001))
    size(rules.Content("text", text="x" * 3000), normalizes=True)  # NFC may shrink text up to 3x
    with pytest.raises(ContextLimitError):
        size(rules.Content("text", text="x" * 3001), normalizes=True)
    with pytest.raises(ContextLimitError, match="no text longer than 0"):  # a full session: no room at all
        size(rules.Content("text", text="x"), room=0)
    msgs = ({"role": "user", "content": "y" * 600}, {"role": "user", "content": "z" * 401})
    with pytest.raises(ContextLimitError):
        size(rules.Content("messages", messages=msgs))
    assert rules.max_text_chars(-5, 10, False) == 0


def test_token_ids_counted_then_checked_against_the_vocabulary():
    with pytest.raises(ContextLimitError, match="2000000 tokens"):
        size(rules.Content("token_ids", ids=tuple(range(2_000_000))))
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "out of the vocabulary [0, 1000): [-1, 1000]"):
        size(rules.Content("token_ids", ids=(5, -1, 1000, 7)))
    size(rules.Content("token_ids", ids=(0, 999)))


# ------------------------------------------------------------------------------------------------ time


def test_ttl_and_expire_time():
    r = pb.CreateSessionRequest(text="x")
    assert rules.ttl(r, NOW, default_s=3600, max_s=86400) == 3600
    r.ttl.seconds = 60
    assert rules.ttl(r, NOW, default_s=3600, max_s=86400) == 60
    for secs, nanos, msg in [(0, 0, "positive"), (-5, 0, "positive"), (10**9, 0, "exceeds the maximum"),
                             (1, -5, "not a valid duration"), (0, 2_000_000_000, "not a valid duration")]:
        r.ttl.seconds, r.ttl.nanos = secs, nanos
        with refused(grpc.StatusCode.INVALID_ARGUMENT, msg):
            rules.ttl(r, NOW, default_s=3600, max_s=86400)
    r = pb.CreateSessionRequest(text="x")
    for secs, nanos, msg in [(int(NOW) - 10, 0, "in the past"), (int(NOW) + 10**6, 0, "exceeds the maximum"),
                             (253402300800, 0, "not a valid timestamp"), (int(NOW) + 5, 10**9, "not a valid timestamp"),
                             (-62135596801, 0, "not a valid timestamp")]:
        r.expire_time.seconds, r.expire_time.nanos = secs, nanos
        with refused(grpc.StatusCode.INVALID_ARGUMENT, msg):
            rules.ttl(r, NOW, default_s=3600, max_s=86400)
    r.expire_time.seconds, r.expire_time.nanos = int(NOW) + 120, 0
    assert rules.ttl(r, NOW, default_s=3600, max_s=86400) == pytest.approx(120)


def upd(paths, **session):
    return pb.UpdateSessionRequest(session=pb.Session(name=SID, **session),
                                   update_mask=field_mask_pb2.FieldMask(paths=paths))


def test_update_masks():
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "update_mask is empty"):
        rules.update(upd([]), NOW, max_s=86400)
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "'size_tokens' cannot be updated"):
        rules.update(upd(["size_tokens"]), NOW, max_s=86400)
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "twice"):
        rules.update(upd(["retention", "retention"], retention=pb.HOT), NOW, max_s=86400)
    r = upd(["ttl", "expire_time"])
    r.session.ttl.seconds = 60
    r.session.expire_time.seconds = int(NOW) + 60
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "both ttl and expire_time"):
        rules.update(r, NOW, max_s=86400)
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "retention 42 is not a known value"):
        rules.update(upd(["retention"], retention=42), NOW, max_s=86400)
    r = upd(["ttl"])
    r.session.ttl.seconds = 10**8
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "ttl must be within"):
        rules.update(r, NOW, max_s=86400)
    r = upd(["expire_time", "retention"], retention=pb.COLD)
    r.session.expire_time.seconds = int(NOW) + 600
    assert rules.update(r, NOW, max_s=86400) == rules.Update(NOW + 600, "cold")


# ------------------------------------------------------------------------------------------------ generate


def gen(**kw):
    return pb.GenerateRequest(name=SID, text="q", **kw)


def test_sampling_values_checked_by_the_one_rule():
    assert rules.sampling(gen(), 8192)["max_tokens"] == 256
    assert rules.sampling(gen(sampling=pb.SamplingParams(temperature=1e-38)), 8192)["temperature"] < 1e-5
    for kw, msg in [({"max_tokens": -3}, "max_tokens"), ({"max_tokens": 100_000}, "max_tokens"),
                    ({"sampling": pb.SamplingParams(temperature=math.nan)}, "temperature"),
                    ({"sampling": pb.SamplingParams(temperature=math.inf)}, "temperature"),
                    ({"sampling": pb.SamplingParams(temperature=1e9)}, "temperature"),
                    ({"sampling": pb.SamplingParams(temperature=-1)}, "temperature"),
                    ({"sampling": pb.SamplingParams(top_p=1.5)}, "top_p"),
                    ({"sampling": pb.SamplingParams(top_p=-0.1)}, "top_p"),
                    ({"sampling": pb.SamplingParams(top_p=math.nan)}, "top_p"),
                    ({"sampling": pb.SamplingParams(top_k=-1)}, "top_k")]:
        with refused(grpc.StatusCode.INVALID_ARGUMENT, msg):
            rules.sampling(gen(**kw), 8192)


def test_stop_strings():
    assert rules.stops(gen(stop=["a", "b"])) == ["a", "b"]
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "at most 8"):
        rules.stops(gen(stop=[str(i) for i in range(9)]))
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "must not be empty"):
        rules.stops(gen(stop=["a", ""]))
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "at most 256"):
        rules.stops(gen(stop=["x" * 257]))


# ------------------------------------------------------------------------------------------------ lists


def test_page_tokens_are_bound_to_the_tenant_and_refuse_tampering():
    tok = rules.page_token("acme", 50)
    assert rules.page_offset("acme", tok) == 50 and rules.page_offset("acme", "") == 0
    import base64

    forged = base64.urlsafe_b64encode(b"-5." + rules._tag("acme", -5).encode()).decode()
    edited = base64.urlsafe_b64encode(f"51.{rules._tag('acme', 50)}".encode()).decode()
    for bad in [tok + "x", "50", "-1", "AAAA", "☃", "x" * 65, forged, edited, rules.page_token("acme", 0)]:
        with refused(grpc.StatusCode.INVALID_ARGUMENT, "page_token"):
            rules.page_offset("acme", bad)
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "page_token"):
        rules.page_offset("other", tok)  # another tenant's token
    for bad in (-1, 1001):
        with refused(grpc.StatusCode.INVALID_ARGUMENT, "page_size"):
            rules.page_size(bad)
    assert rules.page_size(0) == 50


# ------------------------------------------------------------------------------------------------ misc fields


def test_request_ids_names_and_enums():
    assert rules.request_id("") == "" and rules.request_id("6f1c-9a") == "6f1c-9a"
    for bad in ["a b", "x" * 129, "é", "tab\t"]:
        with refused(grpc.StatusCode.INVALID_ARGUMENT, "request_id"):
            rules.request_id(bad)
    assert rules.display_name("x" * 256) == "x" * 256
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "257 characters"):
        rules.display_name("x" * 257)
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "control characters"):
        rules.display_name("a\x00b")
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "persist 9 is not a known value; use one of ON_DEMOTE"):
        rules.enum_value(rules.PERSIST, 9, "persist")
    assert rules.enum_value(rules.RETENTION, pb.RETENTION_CLASS_UNSPECIFIED, "retention") == "standard"


def test_request_hash_ignores_only_the_idempotency_key():
    a = pb.AppendToSessionRequest(name=SID, text="more", request_id="r1")
    b = pb.AppendToSessionRequest(name=SID, text="more", request_id="r2")
    c = pb.AppendToSessionRequest(name=SID, text="more!", request_id="r1")
    assert rules.request_hash(a) == rules.request_hash(b) != rules.request_hash(c)
    assert a.request_id == "r1"  # the request itself is not changed


def test_usage_scope():
    r = pb.GetUsageRequest(tenant="other")
    r.start_time.seconds = int(NOW) - 60
    with refused(grpc.StatusCode.PERMISSION_DENIED, "admin"):
        rules.usage_scope(r, "acme", False, NOW)
    assert rules.usage_scope(r, "acme", True, NOW).tenant == "other"
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "start_time is required"):
        rules.usage_scope(pb.GetUsageRequest(), "acme", False, NOW)
    r = pb.GetUsageRequest(session="sessions/nope")
    r.start_time.seconds = int(NOW) - 60
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "session 'sessions/nope' is malformed"):
        rules.usage_scope(r, "acme", False, NOW)


# ------------------------------------------------------------------------------------------------ status


def test_status_of_each_layer():
    import redis

    from ringserve.cluster.registry import Conflict, LimitExceeded

    assert rules.status_of(redis.ConnectionError("Error 111 connecting to 10.0.0.5:6379"))[0] == \
        grpc.StatusCode.UNAVAILABLE
    code, msg = rules.status_of(redis.TimeoutError("Timeout reading from socket"))
    assert code == grpc.StatusCode.UNAVAILABLE and "Redis" in msg
    assert rules.status_of(GroupUnhealthy("group-0: a rank died"))[0] == grpc.StatusCode.UNAVAILABLE
    assert rules.status_of(KVCapacityError("no pages"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rules.status_of(LimitExceeded("limit"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rules.status_of(Conflict("busy"))[0] == grpc.StatusCode.ABORTED
    assert rules.status_of(TimeoutError())[0] == grpc.StatusCode.UNAVAILABLE
    from ringserve.workers.tokenizer import ChatTemplateError

    assert rules.status_of(ChatTemplateError("roles must alternate"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, msg = rules.status_of(KeyError("/secret/path.py line 3 in s-aaaaaaaaaaaaaaaa"))
    assert code == grpc.StatusCode.INTERNAL and "reference" in msg and "secret" not in msg and "KeyError" not in msg


GLOO = ("a rank failed: [/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
        "[10.1.2.3]:48213 while session s-aaaaaaaaaaaaaaaa waited; actor 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b "
        "at redis://:hunter2@redis-master.prod.svc:6379/0 and [fe80::1]:443")


def test_sanitize_removes_addresses_paths_stack_text_and_other_sessions():
    out = rules.sanitize(GLOO + "\nTraceback (most recent call last):\n  File \"/app/x.py\", line 1", {SID})
    for leaked in ("pytorch", "pair.cc", "10.1.2.3", "48213", "9f86d081", "hunter2", "redis-master", "6379", "fe80",
                   "s-aaaaaaaaaaaaaaaa", "Traceback", "x.py"):
        assert leaked not in out, (leaked, out)
    assert "<another session>" in out and "Connection closed by peer" in out and "\n" not in out
    kept = (f"session {SID} expired at 2025-06-15T15:06:40Z; tiers hbm/host/redis; sessions/{SID}; 1..8192; "
            "token ids out of the vocabulary [0, 1000): [1000]; top_p must be in (0, 1], got 1.5")
    assert rules.sanitize(kept, {SID}) == kept
    assert len(rules.sanitize("x " * 5000)) <= rules.MAX_MESSAGE


# ------------------------------------------------------------------------------------------------ keys


def md(key):
    return [("authorization", f"Bearer {key}")] if key is not None else []


def test_keys_constant_time_comparison_and_header_shapes():
    ring = KeyRing([ApiKey.from_plain("k-a", "acme", admin=True), ApiKey.from_plain("k-b", "beta")])
    assert ring.authenticate(md("k-a")).tenant == "acme" and ring.authenticate(md("k-a")).admin
    assert ring.authenticate(md("k-b")) .tenant == "beta" and not ring.authenticate(md("k-b")).admin
    with refused(grpc.StatusCode.UNAUTHENTICATED, "unknown API key"):
        ring.authenticate(md("k-c"))
    with refused(grpc.StatusCode.UNAUTHENTICATED, "unknown API key"):  # the hash itself is not a key
        ring.authenticate(md(hash_key("k-a")))
    with refused(grpc.StatusCode.UNAUTHENTICATED, "missing API key"):
        ring.authenticate(md(None))
    for bad in ([("authorization", "k-a")], [("authorization", "Bearer ")], [("authorization", "Basic k-a")],
                [("authorization", "Bearer " + "x" * 5000)]):
        with refused(grpc.StatusCode.UNAUTHENTICATED, "malformed"):
            ring.authenticate(bad)
    with refused(grpc.StatusCode.UNAUTHENTICATED, "exactly one"):
        ring.authenticate(md("k-a") + md("k-b"))


def test_keys_file_rotates_and_fails_closed(tmp_path):
    import os

    f = tmp_path / "keys.yaml"
    f.write_text(f"- {{sha256: {hash_key('k-file')}, tenant: filed}}\n")
    ring = KeyRing([ApiKey.from_plain("k-static", "static")], str(f), recheck_s=0)
    assert ring.authenticate(md("k-file")).tenant == "filed"
    assert ring.authenticate(md("k-static")).tenant == "static"
    f.write_text(f"- {{sha256: {hash_key('k-new')}, tenant: filed}}\n")  # rotated: the old key is revoked
    os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert ring.authenticate(md("k-new")).tenant == "filed"
    with refused(grpc.StatusCode.UNAUTHENTICATED, "unknown"):
        ring.authenticate(md("k-file"))
    f.write_text("- {sha256: nothex, tenant: x}\n")  # a broken rotation: nobody gets in
    os.utime(f, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    for key in ("k-new", "k-static", "anything"):
        with refused(grpc.StatusCode.UNAVAILABLE, "cannot read its API keys"):
            ring.authenticate(md(key))
    f.chmod(0)
    f.unlink()
    with refused(grpc.StatusCode.UNAVAILABLE, "cannot read its API keys"):
        ring.authenticate(md("k-static"))
    f.write_text(f"- {{sha256: {hash_key('k-back')}, tenant: filed}}\n")
    assert ring.authenticate(md("k-back")).tenant == "filed"
    missing = KeyRing([ApiKey.from_plain("k-static", "static")], str(tmp_path / "absent.yaml"), recheck_s=0)
    with refused(grpc.StatusCode.UNAVAILABLE, "cannot read its API keys"):  # unreadable from the start
        missing.authenticate(md("k-static"))


# ------------------------------------------------------------------------------------------------ bounds


def test_tenant_gate_counts_in_flight_requests_per_tenant():
    gate = TenantGate(2)
    with gate.enter("a"), gate.enter("a"):
        with refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests in flight"):
            with gate.enter("a"):
                pass
        with gate.enter("b"):  # another tenant is not affected
            assert gate.in_flight("b") == 1
        assert gate.in_flight("a") == 2
    assert gate.in_flight("a") == 0
    with gate.enter("a"):
        pass


def test_input_limits_and_the_proxy_environment():
    lim = InputLimits()
    assert lim.receive_bytes(8192) == 8 << 20 and lim.receive_bytes(1_000_000) == 16_000_000 + (1 << 20)
    assert InputLimits(max_receive_bytes=123).receive_bytes(10**9) == 123
    assert controller_options(lim, 8192) == {"runtime_env": {"env_vars": {PROXY_ENV: str(8 << 20)}}}
    assert InputLimits.from_dict({"max_concurrent_per_tenant": 3}).max_concurrent_per_tenant == 3
    with pytest.raises(ValueError, match="unknown input keys"):
        InputLimits.from_dict({"max_receive": 1})
    with pytest.raises(ValueError, match="max_concurrent_per_tenant"):
        InputLimits(max_concurrent_per_tenant=0)


# ------------------------------------------------------------------------------------------------ outcomes


def test_every_documented_finish_reason_has_its_engine_reason():
    """Each FinishReason the proto documents is what one engine end reason maps to, and no two share one."""
    documented = {v.number for v in pb.FinishReason.DESCRIPTOR.values} - {pb.FINISH_REASON_UNSPECIFIED}
    assert set(rules.FINISH.values()) == documented and len(rules.FINISH) == len(documented)
    assert rules.FINISH["context"] == pb.CONTEXT_FULL and rules.FINISH["stop_sequence"] == pb.STOP_SEQUENCE


def test_data_plane_errors_keep_their_documented_codes():
    from ringserve.workers.protocol import KVDataLossError

    assert rules.status_of(KVDataLossError("session 's' is lost: payload checksum"))[0] == grpc.StatusCode.DATA_LOSS
    assert rules.status_of(ContextLimitError("exceed the limit of 8 tokens"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    code, msg = rules.status_of(GroupUnhealthy("group-0: a rank died"))
    assert code == grpc.StatusCode.UNAVAILABLE and msg.endswith("retry shortly")


def test_no_healthy_group_is_unavailable_and_new_sessions_go_where_most_kv_is_free():
    """SessionService.pick_group over fake group handles (no Ray): unhealthy or failing groups are skipped;
    none left is UNAVAILABLE, retryable."""
    import asyncio
    from types import SimpleNamespace

    from ringserve.cluster.sessions import SessionService
    from ringserve.workers.protocol import GroupCapacity

    def cap(gid, healthy, free, sessions=0):
        return GroupCapacity(group=gid, healthy=healthy, sessions=sessions, free_kv_bytes=free, kv_bytes=None)

    class Handle:
        def __init__(self, answer):
            self.capacity = SimpleNamespace(remote=lambda: self._answer())
            self.answer = answer

        async def _answer(self):
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer

    def pick(*answers):
        svc = SimpleNamespace(groups={f"g{i}": Handle(a) for i, a in enumerate(answers)})
        return asyncio.run(SessionService.pick_group(svc))

    assert pick(cap("g0", True, 100), cap("g1", True, 300)) == "g1"
    assert pick(cap("g0", True, 100, 1), cap("g1", True, 100, 0)) == "g1"  # a tie: the fewer sessions
    assert pick(cap("g0", True, 10), cap("g1", False, 10**9), RuntimeError("replica restarting")) == "g0"
    for answers in ((cap("g0", False, 100), cap("g1", False, 100)), (RuntimeError("dead"),)):
        with refused(grpc.StatusCode.UNAVAILABLE, "no healthy worker group; retry"):
            pick(*answers)
