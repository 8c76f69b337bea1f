"""A paged session answers bit-for-bit the same after its KV went through every tier, and after its group died."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import make_tiny_llama
from ringserve.workers.engine import ShardEngine
from ringserve.workers.kvpages import PageGeometry
from ringserve.workers.kvstore import KVStore, TierCapacity
from ringserve.workers.loader import load_model
from ringserve.workers.sampling import SamplingParams

PROMPT_LEN, TURN, ANSWER = 40, 6, 10
BLOCK = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(path, layers=3)
    return path, load_model(path)


def tokens(loaded) -> tuple[list[int], list[int], list[int]]:
    """A context, a question whose answer is retained, and a second question."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, loaded.config.vocab_size, (PROMPT_LEN + 2 * TURN,), generator=g).tolist()
    return ids[:PROMPT_LEN], ids[PROMPT_LEN:PROMPT_LEN + TURN], ids[PROMPT_LEN + TURN:]


def store_for(loaded, url, ns="g0-r0") -> KVStore:
    m = loaded.config
    geo = PageGeometry(m.n_layers, m.n_kv_heads, m.head_dim, BLOCK, torch.float32)
    return KVStore(ns, loaded.fingerprint, geo, TierCapacity(device=1 << 20, host=1 << 20), redis_url=url,
                   chunk_bytes=8192)


def converse(eng: ShardEngine, sid: str, context, turn, *, persist="on_demote") -> list[int]:
    """Create the session and keep one answered turn in it; returns the turn's answer."""
    eng.prefill(sid, context, persist=persist, ttl_s=600)
    params = SamplingParams(max_tokens=ANSWER)
    return list(eng.generate(sid, turn, params, retain=True, stop_ids=frozenset()))


def ask(eng: ShardEngine, sid: str, question) -> list[int]:
    return list(eng.generate(sid, question, SamplingParams(max_tokens=ANSWER), stop_ids=frozenset()))


def test_answers_after_a_round_trip_through_every_tier(tiny, redis_url):
    _, loaded = tiny
    context, turn, question = tokens(loaded)
    ref = ShardEngine(loaded, block=BLOCK)  # device tier only, never moved
    ref_turn = converse(ref, "s", context, turn)
    expected = ask(ref, "s", question)

    eng = ShardEngine(loaded, store=store_for(loaded, redis_url), block=BLOCK)
    assert converse(eng, "gen", context, turn) == ref_turn
    snap = eng.store.read("gen")
    assert torch.equal(snap[0], ref.store.read("s")[0])  # the same KV, built the same way
    assert eng.store.demote("gen").tier == "host"
    assert eng.store.demote("gen").tier == "redis"
    back = eng.store.read("gen")  # promoted into fresh device pages
    assert eng.store.state("gen").tier == "device"
    assert torch.equal(back[0], snap[0]) and torch.equal(back[1], snap[1])
    eng.store.demote("gen", "redis")
    assert ask(eng, "gen", question) == expected  # a Generate promotes it itself
    assert eng.store.state("gen").tier == "device"
    eng.store.close()


CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    from ringserve.workers.engine import ShardEngine
    from ringserve.workers.kvpages import PageGeometry
    from ringserve.workers.kvstore import KVStore, TierCapacity
    from ringserve.workers.loader import load_model
    from ringserve.workers.sampling import SamplingParams

    path, url, context, turn = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    loaded = load_model(path)
    m = loaded.config
    store = KVStore("group1-rank0", loaded.fingerprint, PageGeometry(m.n_layers, m.n_kv_heads, m.head_dim, 8,
                    torch.float32), TierCapacity(device=1 << 20, host=1 << 20), redis_url=url, chunk_bytes=8192)
    eng = ShardEngine(loaded, store=store, block=8)
    eng.prefill("survivor", context, persist="write_through", ttl_s=600)   # written through
    toks = list(eng.generate("survivor", turn, SamplingParams(max_tokens=10), retain=True,
                             stop_ids=frozenset()))                        # the turn: written through again
    store.flush()
    print(json.dumps(toks), flush=True)
    time.sleep(600)                                                        # alive until it is killed
""")


def test_write_through_session_survives_the_loss_of_its_group(tiny, redis_url):
    path, loaded = tiny
    context, turn, question = tokens(loaded)
    ref = ShardEngine(loaded, block=BLOCK)
    ref_turn = converse(ref, "s", context, turn)
    expected = ask(ref, "s", question)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), redis_url, json.dumps(context), json.dumps(turn)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        first = json.loads(line)
    finally:
        child.kill()  # SIGKILL: no clean-up runs in the group
        child.wait(timeout=10)
    assert child.returncode == -9 and first == ref_turn
    store = store_for(loaded, redis_url, ns="group1-rank0")
    state = store.restore("survivor")
    assert (state.kind, state.tier, state.tokens) == ("resident", "device", PROMPT_LEN + TURN + ANSWER)
    eng = ShardEngine(loaded, store=store, block=BLOCK)
    assert eng.length("survivor") == PROMPT_LEN + TURN + ANSWER  # the layout came back with the KV
    assert ask(eng, "survivor", question) == expected
    store.close()
