"""A WorkerGroup of Ray actors (SP = 2, gloo) on a local Ray: same tokens as one device, clear errors."""

import time

import pytest

from helpers import TEXT, make_tiny_llama, model_greedy
from ringserve.workers.loader import load_model
from ringserve.workers.protocol import ContextLimitError, SessionError
from ringserve.workers.sampling import SamplingParams

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny-group")
    make_tiny_llama(p)
    return str(p)


def make_group(model, **kw):
    from ringserve.workers.group import GroupConfig, WorkerGroup

    return WorkerGroup(GroupConfig(sp=2, model=model, num_cpus_per_rank=0.5, block=8,
                                   collective_timeout_s=20, call_timeout_s=60, **kw))


def test_group_generates_same_tokens_as_single_device(ray_local):
    loaded = load_model("default")
    tok = loaded.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": TEXT[:300] + "\n\nWhat do the devices pass around?"}])
    context, question = ids[:-9], ids[-9:]
    stop = frozenset(loaded.tokenizer.stop_ids)
    ref = model_greedy(loaded, ids, 32, stop_ids=stop)  # one device, the same stop ids as the group's
    assert len(ref) >= 4  # a real answer, not one that ends at once
    g = make_group("default")
    try:
        events = list(g.create("s", context, progress_every=1))
        info = events[-1]
        assert info.length == len(context) and events[-2].done == events[-2].total == len(context)
        out = list(g.generate("s", question, SamplingParams(max_tokens=32)))
        assert out == ref  # every token, and the same end: a group that stops early or late fails here
        assert not stop & set(out)
        again = list(g.generate("s", question, SamplingParams(max_tokens=32)))
        assert again == out  # the turn was not retained: the session is as it was
        sizes = g.sessions()["s"].local_tokens
        assert sum(sizes) == len(context) and abs(sizes[0] - sizes[1]) <= 1
    finally:
        g.shutdown()


def test_bad_requests_get_clear_errors_and_the_group_keeps_serving(ray_local, tiny_dir):
    g = make_group(tiny_dir, max_context=64)
    try:
        tok = load_model(tiny_dir).tokenizer
        ids = tok.encode(TEXT)
        g.prefill("a", ids[:30])
        with pytest.raises(SessionError, match="session 'nope' is not held by this group"):
            list(g.generate("nope", ids[:3]))
        with pytest.raises(ContextLimitError, match="exceed the limit of 64 tokens"):
            g.prefill("b", ids[:100])
        assert g.healthy
        assert len(list(g.generate("a", ids[30:33], SamplingParams(max_tokens=5), retain=True))) == 5
        assert set(g.sessions()) == {"a"}  # the failed session left nothing behind
    finally:
        g.shutdown()


def test_page_exhaustion_fails_the_request_alone_with_the_numbers(ray_local, tiny_dir):
    """A create whose pages do not fit fails on every rank the same way (RESOURCE_EXHAUSTED, with the
    numbers), leaves nothing behind, and the group and its other session go on."""
    from ringserve.workers.protocol import KVCapacityError

    page = 8 * 2 * 2 * 2 * 16 * 4  # block 8 x (K, V) x 2 layers x 2 KV heads x D 16 x fp32
    g = make_group(tiny_dir, kv_device_bytes=10 * page, kv_host_bytes=0)  # 10 pages per rank, nothing below
    try:
        ids = load_model(tiny_dir).tokenizer.encode(TEXT)
        g.prefill("a", ids[:60])  # 30 tokens per rank: 4 pages each
        with pytest.raises(KVCapacityError, match=r"6 free pages of 10 and session 'b' needs 7 more \(28672 bytes\)") as e:
            g.prefill("b", ids[:97])  # 49 + 48 tokens: rank 0 needs 7 pages, rank 1 only 6 -- both must fail
        assert e.value.grpc_code == "RESOURCE_EXHAUSTED"
        with pytest.raises(KVCapacityError, match=r"session 'c' needs 11 pages \(45056 bytes\).* has 10 pages"):
            g.prefill("c", ids[:170])  # 85 per rank: 11 pages, more than the tier has
        assert g.healthy and set(g.sessions()) == {"a"}
        assert [s.free_device_pages for s in g.stats()] == [6, 6]
        assert len(list(g.generate("a", ids[60:62], SamplingParams(max_tokens=4), retain=True))) == 4
    finally:
        g.shutdown()


def test_a_killed_rank_fails_the_group_quickly_instead_of_hanging(ray_local, tiny_dir):
    from ringserve.workers.group import GroupUnhealthy

    g = make_group(tiny_dir)
    try:
        ids = load_model(tiny_dir).tokenizer.encode(TEXT)[:40]
        g.prefill("a", ids)
        stream = g.generate("a", ids[:2], SamplingParams(max_tokens=200), retain=False)
        next(stream)
        t0 = time.monotonic()
        ray.kill(g.ranks[1])
        with pytest.raises(GroupUnhealthy):
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 45
        assert not g.healthy
        with pytest.raises(GroupUnhealthy, match="unhealthy"):  # later calls fail at once
            g.prefill("b", ids)
    finally:
        g.shutdown()


def test_write_through_session_survives_the_loss_of_its_whole_group(ray_local, tiny_dir, redis_url):
    """Build a session on one group (KV tiers + Redis write-through), kill every rank, restore it on
    a fresh group from Redis and continue: the same tokens as an uninterrupted run."""
    kv = dict(kv_device_bytes=64 << 20, kv_host_bytes=64 << 20, redis_url=redis_url)
    tok = load_model(tiny_dir).tokenizer
    ids = tok.encode(TEXT)
    context, turn, question = ids[:50], ids[50:57], ids[57:61]
    params = SamplingParams(max_tokens=12)

    ref = make_group(tiny_dir)  # the uninterrupted run, device tier only
    try:
        ref.prefill("s", context)
        first = list(ref.generate("s", turn, params, retain=True))
        expected = list(ref.generate("s", question, params))
    finally:
        ref.shutdown()

    a = make_group(tiny_dir, **kv)
    b = None
    try:
        info = a.prefill("s", context, persist="write_through", ttl_s=600)
        assert info.tier.value == "device" and info.length == len(context)
        assert list(a.generate("s", turn, params, retain=True)) == first
        a.flush()
        for r in a.ranks:
            ray.kill(r)
        with pytest.raises(SessionError):  # a new group does not hold it until it restores it
            b = make_group(tiny_dir, **kv)
            list(b.generate("s", question, params))
        restored = b.restore("s")
        assert restored.length == len(context) + len(turn) + len(first)  # the retained turn came back too
        assert list(b.generate("s", question, params)) == expected
    finally:
        a.shutdown()
        if b is not None:
            b.shutdown()
