"""The client SDK against an in-process fake server.

The fake (``FakeRingServe``) stands in for the real gateway (cluster/, tested end to end
elsewhere): it records every call with its metadata and can fail any method on demand, which is
how these tests reach retries, deadlines and mid-stream failures.
"""

import asyncio
import collections
import subprocess
import sys
import threading
import time
from concurrent import futures
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from google.protobuf import empty_pb2, message_factory

from ringserve.client import (
    AsyncClient, Client, Generation, InvalidArgument, NotFound, PermissionDenied, RingServeError,
    Session, Unavailable, errors,
)
from ringserve.client import _retry
from ringserve.client.session import Usage
from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb
from ringserve.proto.ringserve.v1 import ringserve_pb2_grpc

pytestmark = pytest.mark.timeout(60)

KEY = "rk-test-123"
# The message of the CreateSession / AppendToSession streams, taken from the service definition
# so this fake follows the .proto (the SDK itself only touches its `event` oneof).
SessionEvent = message_factory.GetMessageClass(
    pb.DESCRIPTOR.services_by_name["RingServe"].methods_by_name["CreateSession"].output_type)
DELTAS = [("Hello", [101]), (", ", [102]), ("world", [103])]


# --- the fake server --------------------------------------------------------------------------

class FakeRingServe(ringserve_pb2_grpc.RingServeServicer):
    """Just enough of the service: sessions in a dict, fixed answers, injectable failures."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.calls = collections.defaultdict(list)  # method -> [(request, metadata dict)]
        self.faults = {}                            # method -> [code, message, times left or None]
        self.abort_generate_after_first = False
        self.delay = {}                             # method -> seconds to stall before answering
        self.sessions = {}                          # name -> pb.Session
        self.next_id = 0

    def fail(self, method, code, message="injected", times=None):
        """Fail the next ``times`` calls of ``method`` (all of them if None) with ``code``."""
        self.faults[method] = [code, message, times]

    def _enter(self, method, request, context):
        with self.lock:
            self.calls[method].append((request, dict(context.invocation_metadata())))
            fault = self.faults.get(method)
            if fault and fault[2] is not None:
                fault[2] -= 1
                if fault[2] < 0:
                    fault = None
        if fault:
            context.abort(fault[0], fault[1])
        time.sleep(self.delay.get(method, 0))

    def add_session(self, size=3, **fields):
        with self.lock:
            self.next_id += 1
            name = f"sessions/s-{self.next_id:04x}"
        s = pb.Session(name=name, tenant="t-test", size_tokens=size, tier=pb.HBM, group="g0",
                       kv_bytes=size * 1024, token_seconds={"hbm": 12.5}, cost_accrued=0.25,
                       currency="USD", **fields)
        s.create_time.GetCurrentTime()
        s.update_time.GetCurrentTime()
        s.expire_time.FromSeconds(int(time.time()) + 3600)
        self.sessions[name] = s
        return s

    def _get(self, name, context):
        if name not in self.sessions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"session {name} not found")
        return self.sessions[name]

    def _prefill(self, total):
        for done in range(total // 4, total + 1, total // 4):
            yield SessionEvent(progress=pb.Progress(tokens_done=done, tokens_total=total))

    def CreateSession(self, request, context):
        self._enter("CreateSession", request, context)
        yield from self._prefill(100)
        yield SessionEvent(session=self.add_session(
            display_name=request.display_name, retention=request.retention, persist=request.persist))

    def AppendToSession(self, request, context):
        self._enter("AppendToSession", request, context)
        s = self._get(request.name, context)
        yield from self._prefill(8)
        s.size_tokens += 8
        yield SessionEvent(session=s)

    def GetSession(self, request, context):
        self._enter("GetSession", request, context)
        return self._get(request.name, context)

    def ListSessions(self, request, context):
        self._enter("ListSessions", request, context)
        names = sorted(self.sessions)
        start = int(request.page_token or 0)
        end = start + request.page_size
        return pb.ListSessionsResponse(sessions=[self.sessions[n] for n in names[start:end]],
                                       next_page_token=str(end) if end < len(names) else "")

    def UpdateSession(self, request, context):
        self._enter("UpdateSession", request, context)
        s = self._get(request.session.name, context)
        for path in request.update_mask.paths:
            if path == "ttl":
                s.expire_time.FromSeconds(int(time.time()) + request.session.ttl.seconds)
            elif path == "retention":
                s.retention = request.session.retention
        return s

    def DeleteSession(self, request, context):
        self._enter("DeleteSession", request, context)
        self._get(request.name, context)
        del self.sessions[request.name]
        return empty_pb2.Empty()

    def Generate(self, request, context):
        self._enter("Generate", request, context)
        self._get(request.name, context)
        for i, (text, ids) in enumerate(DELTAS):
            last = i == len(DELTAS) - 1
            yield pb.GenerateResponse(
                text_delta=text, token_ids=ids, group="g0",
                usage=pb.Usage(prompt_tokens=5, cached_tokens=3, generated_tokens=3, cost=0.01,
                               currency="USD") if last else None,
                finish_reason=pb.STOP if last else pb.FINISH_REASON_UNSPECIFIED)
            if self.abort_generate_after_first:
                context.abort(grpc.StatusCode.UNAVAILABLE, "worker group g0 went away")

    def Status(self, request, context):
        self._enter("Status", request, context)
        group = pb.GroupStatus(id="g0", ranks=[pb.RankStatus(rank=0, device="cpu", healthy=True)],
                               sessions=len(self.sessions), healthy=True)
        return pb.StatusResponse(groups=[group], sessions=len(self.sessions))


@pytest.fixture(scope="module")
def server():
    """(address, servicer): one in-process server for the module, on a free loopback port."""
    servicer = FakeRingServe()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    ringserve_pb2_grpc.add_RingServeServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", servicer
    srv.stop(grace=None)


@pytest.fixture
def fake(server):
    server[1].reset()
    return server[1]


@pytest.fixture
def fast_backoff(monkeypatch):
    """Backoff without the wait: records each jitter window and sleeps 1% of it."""
    windows = []

    class Jitter:
        @staticmethod
        def uniform(lo, hi):
            windows.append(hi)
            return hi * 0.01

    monkeypatch.setattr(_retry, "random", Jitter)
    return windows


@pytest.fixture
def client(server, fake):
    with Client(server[0], api_key=KEY, timeout=5.0, stream_timeout=5.0) as c:
        yield c


# --- auth, create, progress -------------------------------------------------------------------

def test_every_call_carries_the_api_key(client, fake):
    s = client.create_session("a document")
    s.refresh()
    s.generate("q").text()
    for method in ("CreateSession", "GetSession", "Generate"):
        assert fake.calls[method][0][1]["authorization"] == f"Bearer {KEY}"


def test_no_api_key_sends_no_authorization(server, fake):
    with Client(server[0]) as c:
        c.status()
    assert "authorization" not in fake.calls["Status"][0][1]


def test_create_session_streams_progress_and_returns_the_session(client, fake):
    seen = []
    s = client.create_session("a document", display_name="doc", retention="cold",
                              persist="write_through", progress=lambda done, total: seen.append((done, total)))
    assert seen == [(25, 100), (50, 100), (75, 100), (100, 100)]
    assert isinstance(s, Session) and s.name in fake.sessions
    assert s.id == s.name.removeprefix("sessions/") and s.id.startswith("s-")
    assert (s.display_name, s.retention, s.persist, s.tier) == ("doc", "cold", "write_through", "hbm")
    assert s.create_time.tzinfo is not None and s.expire_time > s.create_time
    assert s.billed_through is None
    assert s.token_seconds == {"hbm": 12.5} and (s.cost_accrued, s.currency) == (0.25, "USD")
    req = fake.calls["CreateSession"][0][0]
    assert req.text == "a document" and len(req.request_id) == 36  # a uuid4


def test_progress_bar_draws_on_stderr(client, capsys):
    client.create_session("a document", progress=True)
    err = capsys.readouterr().err
    assert "100/100 tokens" in err and "100%" in err and "tok/s" in err and err.endswith("\n")


def test_content_forms(client, fake):
    client.create_session(tokens=[1, 2, 3])
    client.create_session(messages=[{"role": "user", "content": "hi"}, ("assistant", "hello")])
    tok, msgs = (c[0] for c in fake.calls["CreateSession"])
    assert list(tok.token_ids.ids) == [1, 2, 3]
    assert [(m.role, m.content) for m in msgs.messages.messages] == [("user", "hi"), ("assistant", "hello")]
    with pytest.raises(ValueError, match="exactly one of"):
        client.create_session("text", tokens=[1])
    with pytest.raises(ValueError, match="exactly one of"):
        client.create_session()
    with pytest.raises(ValueError, match="retention must be one of"):
        client.create_session("x", retention="warm")
    assert len(fake.calls["CreateSession"]) == 2  # bad arguments never reach the server


@pytest.mark.parametrize("ttl,seconds", [
    ("1h30m", 5400), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), (" 1h 30m ", 5400),
    (timedelta(minutes=5), 300), (45, 45), (2.5, 2.5),
])
def test_ttl_is_sent_as_a_duration(client, fake, ttl, seconds):
    client.create_session("doc", ttl=ttl)
    req = fake.calls["CreateSession"][0][0]
    assert req.WhichOneof("expiration") == "ttl"
    assert req.ttl.ToTimedelta().total_seconds() == seconds


@pytest.mark.parametrize("ttl", ["1x", "h", "0s", "-1h", 0, -5, True])
def test_bad_ttl_is_refused_before_sending(client, ttl):
    with pytest.raises((ValueError, TypeError), match="ttl"):
        client.create_session("doc", ttl=ttl)


def test_expire_time(client, fake):
    when = datetime(2030, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    client.create_session("doc", expire_time=when)
    req = fake.calls["CreateSession"][0][0]
    assert req.WhichOneof("expiration") == "expire_time"
    assert req.expire_time.ToDatetime(tzinfo=timezone.utc) == when
    with pytest.raises(ValueError, match="timezone-aware"):
        client.create_session("doc", expire_time=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="not both"):
        client.create_session("doc", ttl="1h", expire_time=when)
    # neither: the field is left unset and the server applies its default
    client.create_session("doc")
    assert fake.calls["CreateSession"][1][0].WhichOneof("expiration") is None


# --- retries and errors -----------------------------------------------------------------------

def test_unavailable_twice_then_success_is_retried(client, fake, fast_backoff):
    name = fake.add_session().name
    fake.fail("GetSession", grpc.StatusCode.UNAVAILABLE, times=2)
    assert client.get_session(name).name == name
    assert len(fake.calls["GetSession"]) == 3
    assert fast_backoff == pytest.approx([0.2, 0.4])  # exponential windows, full jitter within them


def test_unavailable_forever_gives_up_after_retries_plus_one(client, fake, fast_backoff):
    fake.fail("GetSession", grpc.StatusCode.UNAVAILABLE, "redis is down")
    with pytest.raises(Unavailable, match="redis is down") as info:
        client.get_session("s-1")
    assert len(fake.calls["GetSession"]) == 4 + 1
    assert info.value.attempts == 5 and info.value.code == grpc.StatusCode.UNAVAILABLE
    assert fast_backoff == pytest.approx([0.2, 0.4, 0.8, 1.6])


def test_backoff_window_is_capped(server, fake, fast_backoff):
    fake.fail("Status", grpc.StatusCode.UNAVAILABLE)
    with Client(server[0], retries=7) as c, pytest.raises(Unavailable):
        c.status()
    assert fast_backoff == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])


def test_deadline_covers_all_attempts(server, fake, monkeypatch):
    # Jitter at the top of each window: 0.2 s fits in a 0.3 s deadline, the next 0.4 s does not.
    monkeypatch.setattr(_retry.random, "uniform", lambda lo, hi: hi)
    fake.fail("Status", grpc.StatusCode.UNAVAILABLE)
    with Client(server[0], timeout=0.3, retries=10) as c:
        start = time.monotonic()
        with pytest.raises(Unavailable):
            c.status()
    assert len(fake.calls["Status"]) == 2
    assert time.monotonic() - start < 0.3


def test_invalid_argument_is_not_retried(client, fake, fast_backoff):
    fake.fail("GetSession", grpc.StatusCode.INVALID_ARGUMENT, "name must look like sessions/s-<hex>")
    with pytest.raises(InvalidArgument) as info:
        client.get_session("s-1")
    assert info.value.message == "name must look like sessions/s-<hex>"
    assert str(info.value) == "INVALID_ARGUMENT: name must look like sessions/s-<hex>"
    assert len(fake.calls["GetSession"]) == 1 and fast_backoff == []


@pytest.mark.parametrize("code,cls", [
    (grpc.StatusCode.NOT_FOUND, errors.NotFound),
    (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
    (grpc.StatusCode.DATA_LOSS, errors.DataLoss),
    (grpc.StatusCode.ABORTED, errors.Aborted),
    (grpc.StatusCode.INTERNAL, errors.Internal),
    (grpc.StatusCode.UNIMPLEMENTED, errors.RingServeError),
])
def test_status_codes_map_to_typed_errors(client, fake, code, cls):
    fake.fail("Status", code, "because")
    with pytest.raises(cls) as info:
        client.status()
    assert info.value.code == code and info.value.message == "because"
    assert len(fake.calls["Status"]) == 1


def test_deadline_exceeded(server, fake):
    fake.delay["Status"] = 0.5
    with Client(server[0], timeout=0.1) as c, pytest.raises(errors.DeadlineExceeded):
        c.status()
    fake.delay["Generate"] = 0.5
    with Client(server[0], stream_timeout=0.1) as c, pytest.raises(errors.DeadlineExceeded):
        c.get_session(fake.add_session().name).generate("q").text()


def test_stream_retried_before_its_first_message_with_the_same_request_id(client, fake, fast_backoff):
    fake.fail("CreateSession", grpc.StatusCode.UNAVAILABLE, times=1)
    s = client.create_session("doc")
    attempts = [req for req, _ in fake.calls["CreateSession"]]
    assert len(attempts) == 2 and attempts[0].request_id == attempts[1].request_id
    assert list(fake.sessions) == [s.name]


def test_generate_failing_after_a_delta_is_not_retried(client, fake, fast_backoff):
    s = client.create_session("doc")
    fake.abort_generate_after_first = True
    gen = s.generate("q")
    seen = []
    with pytest.raises(Unavailable, match="went away"):
        for delta in gen:
            seen.append(delta)
    assert seen == ["Hello"] and len(fake.calls["Generate"]) == 1 and fast_backoff == []
    with pytest.raises(Unavailable):  # the partial text is never passed off as the answer
        gen.text()


# --- generate ---------------------------------------------------------------------------------

def test_generation_text_usage_finish_reason_group(client, fake):
    s = client.create_session("doc")
    gen = s.generate("q", max_tokens=16, temperature=0.7, top_p=0.9, top_k=40, seed=7, stop="\n\n",
                     retain_turn=True)
    assert isinstance(gen, Generation) and "Generate" not in fake.calls  # lazy
    assert gen.usage is None and gen.finish_reason is None and not gen.done
    assert gen.text() == "Hello, world"
    assert gen.done and gen.finish_reason == "stop" and gen.group == "g0"
    assert gen.usage == Usage(prompt_tokens=5, cached_tokens=3, generated_tokens=3, cost=0.01, currency="USD")
    assert gen.token_ids == [101, 102, 103]
    req = fake.calls["Generate"][0][0]
    assert (req.name, req.text, req.max_tokens, list(req.stop), req.retain_turn) == (s.name, "q", 16, ["\n\n"], True)
    assert req.sampling.seed == 7 and req.sampling.top_k == 40
    assert req.sampling.temperature == pytest.approx(0.7) and req.sampling.top_p == pytest.approx(0.9)


def test_generation_iterate_then_text(client, fake):
    s = client.create_session("doc")
    gen = s.generate("q")
    first = next(iter(gen))
    assert first == "Hello"
    assert gen.text() == "Hello, world"  # includes what was already iterated
    assert not fake.calls["Generate"][0][0].sampling.HasField("seed")


def test_cancelled_generation(client, fake):
    gen = client.create_session("doc").generate("q")
    next(iter(gen))
    gen.cancel()
    with pytest.raises(errors.Cancelled):
        gen.text()


# --- session lifecycle ------------------------------------------------------------------------

def test_session_context_manager_deletes(client, fake):
    with client.create_session("doc") as s:
        assert s.name in fake.sessions
    assert [r.name for r, _ in fake.calls["DeleteSession"]] == [s.name]
    assert s.name not in fake.sessions
    with client.create_session("doc") as s2:
        s2.delete()  # already gone when the block ends: NotFound is ignored
    assert len(fake.calls["DeleteSession"]) == 3


def test_session_context_manager_deletes_on_error(client, fake):
    with pytest.raises(KeyError), client.create_session("doc"):
        raise KeyError("boom")
    assert len(fake.calls["DeleteSession"]) == 1 and not fake.sessions


def test_list_sessions_follows_page_tokens(client, fake):
    names = [fake.add_session().name for _ in range(7)]
    listed = list(client.list_sessions(page_size=3))
    assert [s.name for s in listed] == names
    assert [r.page_token for r, _ in fake.calls["ListSessions"]] == ["", "3", "6"]
    assert all(r.page_size == 3 for r, _ in fake.calls["ListSessions"])


def test_extend_and_set_retention(client, fake):
    s = client.create_session("doc")
    before = s.expire_time
    assert s.extend(ttl="6h") is s
    req = fake.calls["UpdateSession"][0][0]
    assert list(req.update_mask.paths) == ["ttl"] and req.session.ttl.seconds == 6 * 3600
    assert req.session.name == s.name and s.expire_time > before
    when = datetime.now(timezone.utc) + timedelta(days=2)
    s.extend(expire_time=when)
    assert list(fake.calls["UpdateSession"][1][0].update_mask.paths) == ["expire_time"]
    with pytest.raises(ValueError, match="exactly one"):
        s.extend()
    s.set_retention("HOT")
    req = fake.calls["UpdateSession"][2][0]
    assert list(req.update_mask.paths) == ["retention"] and req.session.retention == pb.HOT
    assert s.retention == "hot"


def test_refresh_and_append(client, fake):
    s = client.create_session("doc")
    fake.sessions[s.name].tier = pb.REDIS
    assert s.tier == "hbm" and s.refresh() is s and s.tier == "redis"
    seen = []
    assert s.append("more text", progress=lambda d, t: seen.append(d)) is s
    assert s.size_tokens == 11 and seen == [2, 4, 6, 8]
    req = fake.calls["AppendToSession"][0][0]
    assert (req.name, req.text) == (s.name, "more text")


def test_names_and_ids_are_both_accepted(client, fake):
    name = fake.add_session().name
    sid = name.removeprefix("sessions/")
    assert client.get_session(sid).name == name
    assert client.get_session(name).id == sid
    assert [r.name for r, _ in fake.calls["GetSession"]] == [name, name]
    with pytest.raises(NotFound):
        client.get_session("s-missing")
    for bad in ("", "sessions/", "projects/p/sessions/s-1"):
        with pytest.raises(ValueError, match="session name"):
            client.get_session(bad)


def test_status(client, fake):
    fake.add_session()
    st = client.status()
    assert isinstance(st, pb.StatusResponse) and st.sessions == 1 and st.groups[0].id == "g0"
    fake.fail("Status", grpc.StatusCode.PERMISSION_DENIED, "Status needs an admin API key")
    with pytest.raises(PermissionDenied, match="admin"):
        client.status()


# --- asyncio client ---------------------------------------------------------------------------

def test_async_create_generate_delete(server, fake):
    async def main():
        async with AsyncClient(server[0], api_key=KEY, timeout=5.0) as c:
            progress = []
            s = await c.create_session("doc", ttl="1h30m", progress=lambda d, t: progress.append(d))
            assert progress == [25, 50, 75, 100] and s.tier == "hbm"
            deltas = [d async for d in s.generate("q")]
            gen = s.generate("again")
            text = await gen.text()
            await s.extend(ttl="2h")
            await s.refresh()
            await s.delete()
            async with c.create_session("doc") as s2:  # deleted at the end of the block
                assert s2.name in fake.sessions
            listed = [x.name async for x in c.list_sessions(page_size=1)]
            return s, deltas, text, gen, s2, listed

    s, deltas, text, gen, s2, listed = asyncio.run(main())
    assert deltas == ["Hello", ", ", "world"] and text == "Hello, world"
    assert gen.finish_reason == "stop" and gen.usage.generated_tokens == 3
    assert fake.calls["CreateSession"][0][0].ttl.seconds == 5400
    assert fake.calls["CreateSession"][0][1]["authorization"] == f"Bearer {KEY}"
    assert [r.name for r, _ in fake.calls["DeleteSession"]] == [s.name, s2.name]
    assert not fake.sessions and listed == []


def test_async_retries_and_errors(server, fake, fast_backoff):
    async def main():
        async with AsyncClient(server[0], api_key=KEY, timeout=5.0) as c:
            name = fake.add_session().name
            fake.fail("GetSession", grpc.StatusCode.UNAVAILABLE, times=2)
            s = await c.get_session(name)
            fake.fail("Status", grpc.StatusCode.INVALID_ARGUMENT, "nope")
            with pytest.raises(InvalidArgument, match="nope"):
                await c.status()
            fake.abort_generate_after_first = True
            with pytest.raises(Unavailable):
                async for _ in s.generate("q"):
                    pass
            fake.fail("ListSessions", grpc.StatusCode.UNAVAILABLE)
            with pytest.raises(Unavailable) as info:
                [x async for x in c.list_sessions()]
            return info.value

    err = asyncio.run(main())
    assert len(fake.calls["GetSession"]) == 3
    assert len(fake.calls["Status"]) == 1 and len(fake.calls["Generate"]) == 1
    assert len(fake.calls["ListSessions"]) == 5 and err.attempts == 5


# --- packaging --------------------------------------------------------------------------------

def test_import_pulls_in_no_heavy_dependencies():
    code = ("import sys, ringserve.client; "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'numpy'}); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_public_surface():
    import ringserve.client as rc
    for name in ("Client", "AsyncClient", "Session", "Generation", "errors", "RingServeError",
                 "InvalidArgument", "NotFound", "Unavailable", "DeadlineExceeded", "from_rpc_error"):
        assert name in rc.__all__ and hasattr(rc, name)
    assert issubclass(errors.Unknown, RingServeError)


def test_usage_requests_are_checked_before_sending():
    from datetime import datetime, timedelta, timezone

    from ringserve.client import _wire

    r = _wire.usage_request("2h", None, None, group_by="day", session="s-0123456789abcdef", tenant="")
    age = datetime.now(timezone.utc) - r.start_time.ToDatetime(tzinfo=timezone.utc)
    assert timedelta(hours=2) - timedelta(seconds=5) < age < timedelta(hours=2, seconds=5)
    assert not r.HasField("end_time") and r.session == "sessions/s-0123456789abcdef"
    with pytest.raises(ValueError, match="exactly one of since"):
        _wire.usage_request("2h", datetime.now(timezone.utc), None, group_by="day", session=None, tenant="")
    with pytest.raises(ValueError, match="exactly one of since"):
        _wire.export_request(None, None, None, format="csv", session=None, tenant="")
    with pytest.raises(ValueError, match="group_by must be one of"):
        _wire.usage_request("1h", None, None, group_by="week", session=None, tenant="")
    with pytest.raises(ValueError, match="format must be one of"):
        _wire.export_request("1h", None, None, format="xml", session=None, tenant="")
    with pytest.raises(ValueError, match="start must be timezone-aware"):
        _wire.usage_request(None, datetime.now(), None, group_by="day", session=None, tenant="")
