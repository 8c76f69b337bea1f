"""The group scheduler over the real gRPC path: no head-of-line blocking behind a long create, control
calls that answer while it runs, bad requests that fail alone, cancellation and stop strings that end
the work in the group, and a delete during a create that frees its pages and bills only what it
prefilled. One group of SP = 2 (gloo),
the default model, a real redis-server, a real local Ray Serve."""

import random
import threading
import time

import pytest

from ringserve.client import Client, errors

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

KEY = "key-sched"
WORDS = ("the archive holds letters ledgers and maps of the old harbour its ships and the merchants who traded "
         "there and the storms that closed it for weeks at a time").split()


CHUNK = 512  # the group's prefill chunk: a long create is several chunks, each a step the scheduler can preempt
LONG_WORDS = 2500  # a long create: ~2.8K tokens of the default model, 5-6 chunks


def text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def cluster():
    from ringserve.cluster.config import ApiKey
    from serve_cluster import local_service

    with local_service({
        "model": "default", "groups": 1, "progress_chunk": 1,
        "group": {"sp": 2, "num_cpus_per_rank": 0.25, "kv_device_bytes": 512 << 20, "kv_host_bytes": 256 << 20,
                  "prefill_chunk": CHUNK, "collective_timeout_s": 60, "call_timeout_s": 300},
        "api_keys": [vars(ApiKey.from_plain(KEY, "tenant-s", admin=True))],
    }) as address:
        yield address


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster, api_key=KEY, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def group(cluster):
    from ray import serve

    return serve.get_deployment_handle("group-0", app_name="ringserve")


def capacity(group):
    return group.capacity.remote().result(timeout_s=30)


def wait_for(cond, timeout: float, every: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s")


class LongCreate:
    """A create of several chunks in a thread, with the time of every progress event."""

    def __init__(self, client, words: int = LONG_WORDS, seed: int = 1):
        self.events, self.error, self.session, self.end = [], None, None, None
        self.t = threading.Thread(target=self._run, args=(client, words, seed), daemon=True)
        self.t.start()

    def _run(self, client, words, seed):
        try:
            self.session = client.create_session(text(words, seed), ttl="1h",
                                                 progress=lambda d, t: self.events.append((time.monotonic(), d, t)))
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.error = e
        self.end = time.monotonic()

    @property
    def running(self) -> bool:
        return self.end is None


def test_no_head_of_line_blocking_behind_a_long_create(client, group):
    short = client.create_session(text(200, 2), ttl="1h")
    q = "Which places does the archive describe? Answer briefly."
    create = LongCreate(client)
    wait_for(lambda: len(create.events) >= 1, 120)  # its prefill is under way
    assert create.running
    # control calls answer while the create computes
    t0 = time.monotonic()
    st = client.status()
    t_status = time.monotonic() - t0
    t0 = time.monotonic()
    again = client.get_session(short.name)
    t_get = time.monotonic() - t0
    assert create.running and again.size_tokens == short.size_tokens
    assert t_status <= 0.5 and t_get <= 0.5, (t_status, t_get)
    assert st.groups[0].healthy
    # a Generate on another session streams its first token before the create is done
    t0 = time.monotonic()
    gen = short.generate(q, max_tokens=8)
    first = next(iter(gen))
    t_first = time.monotonic()
    assert first is not None and create.running, "the first token waited for the whole create"
    gen.text()
    create.t.join(300)
    assert create.error is None, create.error
    assert create.session.size_tokens >= 4 * CHUNK and t_first < create.end
    assert create.events[-1][1] == create.events[-1][2] == create.session.size_tokens
    sched = capacity(group).scheduler
    assert sched.preemptions >= 1  # the create yielded steps to the short request's prompt
    print(f"status {t_status:.3f} s, get_session {t_get:.3f} s, ttft {t_first - t0:.2f} s during a "
          f"{create.session.size_tokens}-token create")
    short.delete(), create.session.delete()


def test_bad_sampling_values_fail_alone_and_the_group_goes_on(client, group):
    a = client.create_session(text(120, 3), ttl="1h")
    b = client.create_session(text(90, 4), ttl="1h")
    before = capacity(group)
    # a temperature below 1e-5 is greedy: answered normally, as greedy
    tiny = a.generate("Say something.", temperature=1e-38, max_tokens=6).text()
    greedy = a.generate("Say something.", max_tokens=6).text()
    assert tiny == greedy
    for kw, msg in [({"temperature": float("nan")}, "temperature"), ({"temperature": 1e9}, "temperature"),
                    ({"top_p": 1.5}, "top_p"), ({"top_p": -0.1}, "top_p")]:
        with pytest.raises(errors.InvalidArgument, match=msg):
            a.generate("Say something.", max_tokens=4, **kw).text()
    t0 = time.monotonic()
    assert b.generate("And you?", max_tokens=4).text()
    assert time.monotonic() - t0 < 5
    after = capacity(group)
    assert after.healthy and after.rebuilds == before.rebuilds == 0
    a.delete(), b.delete()


def test_cancel_leaves_the_batch_and_stop_strings_end_in_the_group(client, group):
    s = client.create_session(text(150, 5), ttl="1h")
    gen = s.generate("Write a very long story about the harbour.", max_tokens=400)
    it = iter(gen)
    for _ in range(5):
        next(it)
    decoded = capacity(group).scheduler.decode_tokens
    gen.cancel()
    wait_for(lambda: capacity(group).scheduler.running == 0, 10)  # the request left at a step boundary
    # it stopped costing compute: far fewer than 400 tokens were decoded for it
    assert capacity(group).scheduler.decode_tokens - decoded < 20
    # a stop string ends the generation in the group: it decodes no token past the one completing it
    free = s.generate("Write a very long story about the harbour.", max_tokens=40)
    full = free.text()
    cut = next(i for i in range(3, len(full)) if full[i] in " ,.") if len(full) > 4 else None
    assert cut is not None, full
    stop = full[max(0, cut - 3):cut + 1]
    before = capacity(group).scheduler.decode_tokens
    g = s.generate("Write a very long story about the harbour.", max_tokens=40, stop=[stop])
    out = g.text()
    assert stop not in out and full.startswith(out)
    assert g.finish_reason == "stop_sequence" and g.usage.generated_tokens < 40
    computed = capacity(group).scheduler.decode_tokens - before
    assert computed <= g.usage.generated_tokens  # nothing computed after the stop (the first token comes from the prompt)
    s.delete()


def test_delete_during_a_create_frees_its_pages_and_bills_only_the_prefill_it_computed(client, group):
    import datetime

    free0 = capacity(group).free_kv_bytes
    create = LongCreate(client, seed=7)
    wait_for(lambda: len(create.events) >= 1, 120)
    creating = [x for x in client.list_sessions() if x.size_tokens >= 4 * CHUNK]
    assert len(creating) == 1 and create.running
    t_delete = datetime.datetime.now(datetime.timezone.utc)
    creating[0].delete()
    create.t.join(120)
    assert isinstance(create.error, (errors.Cancelled, errors.NotFound)), create.error
    wait_for(lambda: capacity(group).free_kv_bytes == free0 and capacity(group).scheduler.running == 0, 10)
    assert all(x.name != creating[0].name for x in client.list_sessions())
    # the chunks the group prefilled before the delete ended the create are billed (whole chunks: it
    # ended at a step boundary), nothing more, and no retention: it never became a session
    total = client.usage(start=t_delete - datetime.timedelta(minutes=5), session=creating[0].name).total
    assert CHUNK <= total.prefill_tokens < creating[0].size_tokens and total.prefill_tokens % CHUNK == 0
    assert total.generated_tokens == 0 and total.retention_cost == 0 and total.compute_cost > 0


def test_a_ttl_counts_from_the_moment_the_session_is_ready(client, group):
    """A create whose prefill outlasts its ttl is not expired half way (neither by the Gateway's sweep nor by
    the group's own tier policy): it becomes ready and then lives its whole ttl."""
    ttl = 2
    t0 = time.time()
    s = client.create_session(text(LONG_WORDS, 11), ttl=ttl)  # 5-6 chunks of the default model: longer than 2 s
    t_ready = time.time()
    assert t_ready - t0 > ttl, "the create was faster than its ttl: this test shows nothing"
    expire = s.expire_time.timestamp()
    assert t_ready - 1.0 <= expire - ttl <= t_ready  # ready (within the response's latency) + ttl
    assert client.get_session(s.name).expire_time == s.expire_time  # the record says the same
    # then the sweep deletes it, and its pages go back to the group
    wait_for(lambda: all(x.name != s.name for x in client.list_sessions()), 20)
    with pytest.raises(errors.NotFound):
        client.get_session(s.name)


def test_sessions_at_once_with_a_bad_request_among_them(client, group):
    """Four sessions answer at once, through the gRPC service, exactly as they answer one at a time, while a
    fifth request among them (a prompt past the model's context limit) is refused alone; the group stays whole."""
    sessions = [client.create_session(text(80, 20 + i), ttl="1h") for i in range(5)]
    q = "Name one place from the text. Answer briefly."
    alone = {i: sessions[i].generate(q, max_tokens=10).text() for i in range(4)}  # one at a time, greedy
    before = capacity(group)
    together, refused = {}, []

    def good(i):
        together[i] = sessions[i].generate(q, max_tokens=10).text()

    def bad():
        try:
            sessions[4].generate(text(9000, 99), max_tokens=4).text()  # ~10K tokens: past the 8K context
        except errors.RingServeError as e:
            refused.append(e)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(4)] + [threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert together == alone
    assert len(refused) == 1 and isinstance(refused[0], errors.FailedPrecondition), refused
    assert "context" in str(refused[0]).lower()
    after = capacity(group)
    assert after.healthy and after.rebuilds == before.rebuilds
    g = sessions[4].generate(q, max_tokens=3)  # the refused request's session still answers
    assert g.text() and g.usage.cached_tokens == sessions[4].size_tokens
    for s in sessions:
        s.delete()
