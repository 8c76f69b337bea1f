"""What the proto documents and no other module reaches, over a real gRPC channel (raw stubs) to a real
local Ray Serve (one SP = 2 group of a tiny Llama) and a real redis-server: the finish reason CONTEXT_FULL,
RESOURCE_EXHAUSTED for the cluster's KV capacity, DATA_LOSS for a Redis copy that fails its checksum (then
LOST and FAILED_PRECONDITION), FAILED_PRECONDITION / ABORTED while a session is still being created, the
background expiry sweep and delete freeing the group's KV, API-key rotation through `api_keys_file`, health
`Watch` and NOT_SERVING, seeded sampling, token-id and chat prompts, ListSessions paging, GetUsage by tier
and by day, HOT retention, and `allow_quantized_kv` in the Redis tier.

This module starts its own cluster because it needs settings the default-model module cannot have: a
context limit of 512 tokens (CONTEXT_FULL in a few steps), a device tier of 24 pages per rank (exhausted by
two hot sessions), and an API-key file it rewrites. The tiny model keeps every test to seconds.

Covered elsewhere (not repeated): bad input and INVALID_ARGUMENT / UNAUTHENTICATED / quota statuses in
test_bad_input.py; LOST after a group dies, Redis down or paused (UNAVAILABLE) in test_faults.py; STOP_SEQUENCE
and per-tenant token quotas in test_billing_exact.py; STOP and the UpdateSession expire_time path in
test_serve_grpc.py.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb
from serve_cluster import Cluster, create, generate

ray = pytest.importorskip("ray")

KEY, ADMIN = "key-states", "key-states-admin"
C = grpc.StatusCode
MAX_POSITIONS = 512
BLOCK = 16  # tokens per KV page (serve_cluster's group config)
PAGE = BLOCK * 2 * 2 * 2 * 16 * 4  # x (K, V) x 2 layers x 2 KV heads x head dim 16 x fp32 = 8 KiB
DEVICE_PAGES = 24  # per rank
FULL = 2 * DEVICE_PAGES * PAGE  # free device-tier bytes of the group with no session
LEAKS = ("127.0.0.1", "/work/", "/tmp/", ".py", "Traceback", "site-packages")


def ids(n: int, offset: int = 0) -> list[int]:
    """n token ids of the tiny vocabulary (ids 5..299, past the special tokens)."""
    return [5 + (i + offset) % 295 for i in range(n)]


@pytest.fixture(scope="module")
def keys_file():
    d = Path(tempfile.mkdtemp(prefix="ringserve-keys-"))
    f = d / "api-keys.yaml"
    write_keys(f, "k-file-1")
    yield f
    f.unlink(missing_ok=True)
    d.rmdir()


def write_keys(f: Path, plain: str | None, *, bump: int = 0) -> None:
    """Rotate the key file in place (a Secret update): one key of tenant 'filed', or unparseable content."""
    from ringserve.cluster.config import hash_key

    f.write_text(f"- {{sha256: {hash_key(plain)}, tenant: filed}}\n" if plain else "- {sha256: nothex, tenant: x}\n")
    t = time.time_ns() + bump * 10**9  # a new mtime even within the file system's time resolution
    os.utime(f, ns=(t, t))


@pytest.fixture(scope="module")
def cluster(keys_file):
    c = Cluster(keys={KEY: ("tenant-s", False), ADMIN: ("ops", True)}, max_positions=MAX_POSITIONS,
                group={"kv_device_bytes": DEVICE_PAGES * PAGE, "kv_host_bytes": 64 << 20},
                extra={"api_keys_file": str(keys_file)})
    yield c
    c.close()


def sid_of(s) -> str:
    return s.name.split("/")[-1]


def get(c: Cluster, name: str, key: str = KEY) -> pb.Session:
    return c.stub.GetSession(pb.GetSessionRequest(name=name), metadata=c.md(key), timeout=30)


def delete(c: Cluster, name: str) -> None:
    c.stub.DeleteSession(pb.DeleteSessionRequest(name=name), metadata=c.md(KEY), timeout=30)


def refused(code: grpc.StatusCode, call, match: str = "") -> str:
    with pytest.raises(grpc.RpcError) as e:
        r = call()
        if hasattr(r, "__iter__") and not isinstance(r, pb.Session):
            list(r)
    msg = e.value.details() or ""
    assert e.value.code() == code, (e.value.code(), msg)
    assert match.lower() in msg.lower(), msg
    assert not any(x in msg for x in LEAKS), msg
    return msg


def wait_tier(c: Cluster, name: str, tier: int, timeout: float = 30) -> pb.Session:
    return c.wait(lambda: (lambda s: s if s.tier == tier else None)(get(c, name)), timeout,
                  what=f"{name} in tier {pb.Tier.Name(tier)}")


def free_bytes(c: Cluster) -> int:
    return c.group().capacity.remote().result(timeout_s=30).free_kv_bytes


def held(c: Cluster, sid: str) -> bool:
    """Whether the group's ranks hold the session (asked of the group, not the Gateway)."""
    from ringserve.workers.protocol import SessionError

    try:
        c.group().describe.remote(sid).result(timeout_s=30)
        return True
    except SessionError:
        return False
    except Exception as e:  # noqa: BLE001 - Ray wraps the group's exception
        if "SessionError" in type(e).__name__ or "not held" in str(e):
            return False
        raise


def settled_free(c: Cluster, want: int) -> int:
    return c.wait(lambda: free_bytes(c) == want and want, 30, what=f"{want} free KV bytes on the group")


# ------------------------------------------------------------------------------------------- finish reasons


def test_context_full_ends_the_stream_at_the_models_limit(cluster):
    c = cluster
    s = create(c, KEY, tokens=ids(496))
    try:
        text, out, last = generate(c, KEY, s.name, token_ids=pb.TokenIds(ids=[7, 8]), max_tokens=100)
        # 496 + 2 prompt tokens held: the stream ends at the model's 512 positions, long before max_tokens.
        # Every generated token takes a position, and one stays free for the end-of-turn token.
        assert last.finish_reason == pb.CONTEXT_FULL, pb.FinishReason.Name(last.finish_reason)
        assert last.usage.prompt_tokens == 2 and last.usage.cached_tokens == 496
        assert len(out) == last.usage.generated_tokens == MAX_POSITIONS - 498 - 1
        # the same prompt with room for every token asked for: LENGTH, and the same tokens up to there
        _, again, end = generate(c, KEY, s.name, token_ids=pb.TokenIds(ids=[7, 8]), max_tokens=5)
        assert end.finish_reason == pb.LENGTH and again == out[:5]
        # a prompt with no room left at all is refused up front (FAILED_PRECONDITION), not cut
        refused(C.FAILED_PRECONDITION, lambda: c.stub.Generate(pb.GenerateRequest(
            name=s.name, token_ids=pb.TokenIds(ids=ids(17))), metadata=c.md(KEY), timeout=60), "exceed the limit")
    finally:
        delete(c, s.name)


def test_seeded_sampling_is_reproducible_and_prompt_forms_agree(cluster):
    c = cluster
    s = create(c, KEY, "A note about orchards, their pickers and the weather of the harvest week. " * 2)
    try:
        def sample(seed=None, **kw):
            sp = pb.SamplingParams(temperature=1.0, **kw)
            if seed is not None:
                sp.seed = seed
            return generate(c, KEY, s.name, "Tell me about the harvest.", sampling=sp, max_tokens=16)[1]
        a, b, other = sample(7), sample(7), sample(8)
        assert a == b and len(a) == 16  # a fixed seed: identical tokens
        assert other != a  # and the seed is what fixes them
        greedy = generate(c, KEY, s.name, "Tell me about the harvest.", max_tokens=16)[1]
        assert sample(9, top_k=1) == greedy  # top_k = 1 leaves only the most likely token
        # the text prompt is one user turn through the chat template: the same tokens as that message
        _, by_text, t_last = generate(c, KEY, s.name, "Which week?", max_tokens=6)
        _, by_msgs, m_last = generate(c, KEY, s.name, None, messages=pb.ChatMessages(messages=[
            pb.ChatMessage(role="user", content="Which week?")]), max_tokens=6)
        assert by_text == by_msgs and t_last.usage.prompt_tokens == m_last.usage.prompt_tokens > 3
        # token ids are appended as they are (no template): exactly that many prompt tokens
        _, by_ids, i_last = generate(c, KEY, s.name, token_ids=pb.TokenIds(ids=[11, 12, 13]), max_tokens=6)
        assert i_last.usage.prompt_tokens == 3 and i_last.usage.cached_tokens == s.size_tokens and len(by_ids) == 6
    finally:
        delete(c, s.name)


# ------------------------------------------------------------------------------------------- KV capacity


def test_hot_sessions_fill_the_device_tier_then_a_create_is_resource_exhausted(cluster):
    c = cluster
    base = settled_free(c, FULL)  # both ranks' device tiers, empty
    hot = [create(c, KEY, tokens=ids(352, k), retention=pb.HOT) for k in range(2)]  # 11 pages per rank each
    cold = create(c, KEY, tokens=ids(40, 9), retention=pb.COLD)
    try:
        assert free_bytes(c) <= base - 4 * 11 * PAGE
        msg = refused(C.RESOURCE_EXHAUSTED, lambda: c.stub.CreateSession(pb.CreateSessionRequest(
            token_ids=pb.TokenIds(ids=ids(200, 3))), metadata=c.md(KEY), timeout=60), "pages")
        assert "hot" in msg
        # the cold session went to Redis; the hot ones stay in device memory however long they idle
        wait_tier(c, cold.name, pb.REDIS)
        time.sleep(2.5)
        assert [get(c, h.name).tier for h in hot] == [pb.HBM, pb.HBM]
        # UpdateSession's retention path: a hot session made cold is demoted like one
        r = c.stub.UpdateSession(pb.UpdateSessionRequest(session=pb.Session(name=hot[0].name, retention=pb.COLD),
                                                         update_mask=field_mask_pb2.FieldMask(paths=["retention"])),
                                 metadata=c.md(KEY), timeout=30)
        assert r.retention == pb.COLD
        wait_tier(c, hot[0].name, pb.REDIS)
    finally:
        for s in (*hot, cold):
            delete(c, s.name)
    # delete frees the group's KV: every page is back, and the group holds none of them
    settled_free(c, base)
    assert not any(held(c, sid_of(s)) for s in (*hot, cold))
    s = create(c, KEY, tokens=ids(200, 3))  # what was refused now fits
    delete(c, s.name)


def test_quantized_kv_is_stored_8_bit_in_redis_and_still_answers(cluster):
    c = cluster
    exact = create(c, KEY, tokens=ids(120, 1), retention=pb.COLD)
    small = create(c, KEY, tokens=ids(120, 1), retention=pb.COLD, allow_quantized_kv=True)
    try:
        assert get(c, small.name).allow_quantized_kv and not get(c, exact.name).allow_quantized_kv
        e, q = wait_tier(c, exact.name, pb.REDIS), wait_tier(c, small.name, pb.REDIS)
        assert e.kv_bytes >= 120 * PAGE // BLOCK  # fp32: at least the tokens' exact bytes
        assert 0 < q.kv_bytes < e.kv_bytes * 0.4, (q.kv_bytes, e.kv_bytes)  # int8 + scales instead of fp32
        r = c.redis_client()
        keys = {sid: list(r.scan_iter(match=f"*{sid}*")) for sid in (sid_of(e), sid_of(q))}
        kinds = {sid: {enc for enc in (b"raw", b"int8") if any(b":kv:" + enc + b":" in k for k in ks)}
                 for sid, ks in keys.items()}
        assert kinds == {sid_of(e): {b"raw"}, sid_of(q): {b"int8"}}, kinds  # the chunks' encodings in Redis
        for s in (exact, small):  # promoted back and answered from the cached context
            _, out, last = generate(c, KEY, s.name, "Go on.", max_tokens=4)
            assert len(out) == 4 and last.usage.cached_tokens == 120
    finally:
        delete(c, exact.name)
        delete(c, small.name)


# ------------------------------------------------------------------------------------------- data loss


def corrupted(c: Cluster, offset: int) -> pb.Session:
    """A cold session whose copy in Redis has one payload bit flipped (its group holds it only there)."""
    s = create(c, KEY, tokens=ids(100, offset), retention=pb.COLD)
    wait_tier(c, s.name, pb.REDIS)
    r = c.redis_client()
    keys = sorted(k for k in r.scan_iter(match=f"*{sid_of(s)}*") if b":kv:raw:" in k)
    assert keys
    off = r.strlen(keys[0]) - 7
    r.setrange(keys[0], off, bytes([r.getrange(keys[0], off, off)[0] ^ 0x01]))
    return s


def ask(c: Cluster, name: str):
    return lambda: c.stub.Generate(pb.GenerateRequest(name=name, text="And?", max_tokens=2), metadata=c.md(KEY),
                                   timeout=60)


def test_a_redis_copy_that_fails_its_checksum_is_data_loss_and_shown_lost(cluster):
    c = cluster
    s = corrupted(c, 2)
    try:
        msg = refused(C.DATA_LOSS, ask(c, s.name), "lost")
        assert "checksum" in msg
        assert get(c, s.name).tier == pb.LOST  # kept, so its owner sees what happened
    finally:
        delete(c, s.name)
    refused(C.NOT_FOUND, lambda: get(c, s.name))


def test_after_data_loss_the_session_is_lost_for_every_request(cluster):
    """The proto: DATA_LOSS once, "the session is LOST from then on" (FAILED_PRECONDITION, as for a session
    lost with its group in test_faults.py). Found failing at 3b371f4 (every later request was DATA_LOSS again:
    the Gateway did not mark the record LOST); fixed in cluster/sessions.py `SessionService._failed`."""
    c = cluster
    s = corrupted(c, 8)
    try:
        refused(C.DATA_LOSS, ask(c, s.name), "lost")
        refused(C.FAILED_PRECONDITION, ask(c, s.name), "LOST")
        refused(C.FAILED_PRECONDITION, lambda: c.stub.AppendToSession(pb.AppendToSessionRequest(
            name=s.name, text="more"), metadata=c.md(KEY), timeout=60), "LOST")
    finally:
        delete(c, s.name)


# ------------------------------------------------------------------------------------------- creating


class Busy:
    """A long Generate on its own session, so the group's steps are shared and a create takes longer."""

    def __init__(self, c: Cluster):
        self.s = create(c, KEY, tokens=ids(60, 5))
        self.call = c.stub.Generate(pb.GenerateRequest(name=self.s.name, text="Go on and on.", max_tokens=300),
                                    metadata=c.md(KEY), timeout=120)
        self.t = threading.Thread(target=self._drain, daemon=True)
        self.t.start()

    def _drain(self):
        try:
            for _ in self.call:
                pass
        except grpc.RpcError:
            pass

    def stop(self, c):
        self.call.cancel()
        self.t.join(30)
        delete(c, self.s.name)


def test_a_session_still_being_created_is_failed_precondition_and_its_retry_aborted(cluster):
    c = cluster
    busy = Busy(c)
    seen = False
    try:
        for attempt in range(5):  # the create may finish before the calls land: then try again
            req = pb.CreateSessionRequest(token_ids=pb.TokenIds(ids=ids(480, attempt)), request_id=f"slow-{attempt}")
            it = iter(c.stub.CreateSession(req, metadata=c.md(KEY), timeout=120))
            assert next(it).HasField("progress")
            newest = c.stub.ListSessions(pb.ListSessionsRequest(page_size=1), metadata=c.md(KEY), timeout=30)
            name = newest.sessions[0].name  # listed at once, newest first
            codes = []
            for call in (lambda: get(c, name),
                         lambda: list(c.stub.Generate(pb.GenerateRequest(name=name, text="q", max_tokens=2),
                                                      metadata=c.md(KEY), timeout=30)),
                         lambda: list(c.stub.CreateSession(req, metadata=c.md(KEY), timeout=30))):
                try:
                    call()
                    codes.append(C.OK)
                except grpc.RpcError as e:
                    codes.append((e.code(), e.details()))
            done = [ev for ev in it][-1].session
            assert done.name == name and done.size_tokens == 480
            if codes[0] == C.OK:  # finished before the first call: nothing was observed in flight
                delete(c, name)
                continue
            assert codes[0][0] == C.FAILED_PRECONDITION and "still being created" in codes[0][1], codes
            # later calls may land after the create finished; while it runs they get their documented codes
            assert codes[1] == C.OK or (codes[1][0] == C.FAILED_PRECONDITION and "being created" in codes[1][1])
            assert codes[2] == C.OK or (codes[2][0] == C.ABORTED and "still running" in codes[2][1]), codes
            again = list(c.stub.CreateSession(req, metadata=c.md(KEY), timeout=60))[-1].session
            assert again.name == name  # the retry with the same request_id returns the same session
            assert get(c, name).size_tokens == 480
            delete(c, name)
            seen = True
            break
    finally:
        busy.stop(c)
    assert seen, "every create finished before a call reached it"


# ------------------------------------------------------------------------------------------- expiry, delete


def test_the_sweep_alone_expires_a_session_and_frees_its_kv(cluster):
    """Nothing reads the session through the Gateway (a read deletes an expired session itself): the
    background sweep must delete its record, stop its meter at the expiry instant and free its pages."""
    c = cluster
    base = settled_free(c, FULL)
    r = pb.CreateSessionRequest(token_ids=pb.TokenIds(ids=ids(90, 4)))
    r.ttl.seconds = 2
    s = list(c.stub.CreateSession(r, metadata=c.md(KEY), timeout=60))[-1].session
    sid, expire = sid_of(s), s.expire_time.ToNanoseconds() / 1e9
    assert free_bytes(c) < base and held(c, sid)
    reg = c.registry()
    c.wait(lambda: reg.get(sid) is None, 15, what="the sweep deleting the expired record")
    assert time.time() >= expire
    c.wait(lambda: not held(c, sid), 15, what="the group dropping the expired session")
    settled_free(c, base)
    ends = [rec["end"] / 1000 for rec in c.ledger().records("tenant-s", time.time() - 600, time.time() + 60, sid)
            if rec["kind"] == "retention"]
    assert ends and abs(max(ends) - expire) <= 0.001  # billed to the expiry, not to when the sweep ran
    refused(C.NOT_FOUND, lambda: get(c, s.name))


# ------------------------------------------------------------------------------------------- lists, usage


def test_list_sessions_pages_newest_first(cluster):
    c = cluster
    made = [create(c, KEY, tokens=ids(20, k)).name for k in range(5)]
    try:
        pages, token = [], ""
        while True:
            page = c.stub.ListSessions(pb.ListSessionsRequest(page_size=2, page_token=token), metadata=c.md(KEY),
                                       timeout=30)
            pages.append([x.name for x in page.sessions])
            token = page.next_page_token
            if not token:
                break
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [n for p in pages for n in p] == made[::-1]  # newest first, each once
        whole = c.stub.ListSessions(pb.ListSessionsRequest(), metadata=c.md(KEY), timeout=30)
        assert [x.name for x in whole.sessions] == made[::-1] and not whole.next_page_token
    finally:
        for n in made:
            delete(c, n)


def test_usage_by_tier_and_by_day_adds_up(cluster):
    c = cluster
    s = create(c, KEY, tokens=ids(64, 6))
    try:
        _, out, last = generate(c, KEY, s.name, token_ids=pb.TokenIds(ids=[9, 10]), max_tokens=5)
        time.sleep(1.2)  # a meter pass: retention accrues in the HBM tier

        def usage(by):
            r = pb.GetUsageRequest(session=s.name, group_by=by)
            r.start_time.seconds = int(time.time()) - 600
            return c.stub.GetUsage(r, metadata=c.md(KEY), timeout=30)
        tiers = usage(pb.TIER)
        lines = {i.key: i for i in tiers.line_items}
        assert "compute" in lines and "hbm" in lines and set(lines) <= {"hbm", "host", "redis", "compute"}
        assert lines["compute"].prefill_tokens == 64 + 2 and lines["compute"].generated_tokens == 5
        assert lines["compute"].cached_tokens == 64
        lived = time.time() - s.create_time.ToNanoseconds() / 1e9
        assert 0 < lines["hbm"].token_seconds["hbm"] <= 64 * lived and lines["hbm"].generated_tokens == 0
        assert sum(i.cost for i in tiers.line_items) == pytest.approx(tiers.total.cost, rel=1e-9, abs=1e-12)
        days = usage(pb.DAY)
        assert [i.key for i in days.line_items] == [time.strftime("%Y%m%d", time.gmtime())]
        assert days.line_items[0].generated_tokens == 5 and days.total.prefill_tokens == 66
        # the admin reads the same numbers for this tenant
        r = pb.GetUsageRequest(session=s.name, group_by=pb.TIER, tenant="tenant-s")
        r.start_time.seconds = int(time.time()) - 600
        admin = c.stub.GetUsage(r, metadata=c.md(ADMIN), timeout=30)
        assert {i.key: i.generated_tokens for i in admin.line_items}["compute"] == 5
    finally:
        delete(c, s.name)


# ------------------------------------------------------------------------------------------- keys, health


def test_api_keys_file_rotation_takes_effect_and_a_broken_file_fails_closed(cluster, keys_file):
    c = cluster
    listing = lambda key: c.stub.ListSessions(pb.ListSessionsRequest(), metadata=c.md(key), timeout=30)  # noqa: E731
    c.wait(lambda: listing("k-file-1") is not None, 10, what="the file's key accepted")
    write_keys(keys_file, "k-file-2", bump=1)  # rotated: the old key is revoked
    c.wait(lambda: listing("k-file-2") is not None, 10, what="the rotated key accepted")
    refused(C.UNAUTHENTICATED, lambda: listing("k-file-1"), "unknown API key")
    assert listing(KEY) is not None  # the configured keys stay valid
    write_keys(keys_file, None, bump=2)  # a broken rotation: nobody gets in, not even the configured keys
    c.wait(lambda: (lambda e: e if e == C.UNAVAILABLE else None)(_code(lambda: listing(KEY))), 10,
           what="a broken key file refusing every request")
    refused(C.UNAVAILABLE, lambda: listing("k-file-2"), "API keys")
    write_keys(keys_file, "k-file-3", bump=3)
    c.wait(lambda: listing("k-file-3") is not None, 10, what="the fixed file's key accepted")
    assert listing(KEY) is not None


def _code(call):
    try:
        call()
        return C.OK
    except grpc.RpcError as e:
        return e.code()


def test_health_watch_reports_not_serving_while_redis_is_down(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    c = cluster
    health = health_pb2_grpc.HealthStub(c.channel)
    H = health_pb2.HealthCheckResponse
    assert health.Check(health_pb2.HealthCheckRequest(service="ringserve.v1.RingServe"), timeout=30).status == H.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    assert e.value.code() == C.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    seen = [next(watch).status]
    c.redis.stop()
    try:
        seen.append(next(watch).status)  # the change is pushed (checked every few seconds)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status == H.NOT_SERVING
    finally:
        c.redis.start()
    seen.append(next(watch).status)
    watch.cancel()
    assert seen == [H.SERVING, H.NOT_SERVING, H.SERVING]
