"""Generation continues bit-for-bit after the KV went through the tiers, and after its group died."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import make_tiny_llama
from ringserve.workers.engine import Engine
from ringserve.workers.kvstore import KVShard, KVStore, TierCapacity
from ringserve.workers.loader import load_model

PROMPT_LEN, SPLIT, TOTAL = 40, 4, 10  # greedy TOTAL tokens; the interrupted run stops after SPLIT of them


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(path, layers=3)
    loaded = load_model(path)
    return path, loaded, Engine(loaded)


def prompt(engine) -> list[int]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, engine.cfg.vocab_size, (PROMPT_LEN,), generator=g).tolist()


def greedy(engine, cache, logits, n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens; each is fed back except the last, whose logits come back with it."""
    out = []
    for i in range(n):
        out.append(int(torch.argmax(logits.reshape(-1))))
        if i + 1 < n:
            logits = engine.forward(cache, [out[-1]])
    return out, logits


def uninterrupted(engine) -> list[int]:
    cache = engine.new_cache(PROMPT_LEN + TOTAL)
    toks, _ = greedy(engine, cache, engine.forward(cache, prompt(engine)), TOTAL)
    return toks


def continue_from(engine, shard: KVShard, last_token: int) -> list[int]:
    """Load a shard into a fresh cache, feed the pending token, and greedy the rest."""
    cache = engine.new_cache(shard.num_tokens + TOTAL)
    shard.into_cache(cache)
    toks, _ = greedy(engine, cache, engine.forward(cache, [last_token]), TOTAL - SPLIT)
    return toks


def test_generation_after_round_trip_through_every_tier(tiny, redis_url):
    _, loaded, engine = tiny
    expected = uninterrupted(engine)
    cache = engine.new_cache(PROMPT_LEN + TOTAL)
    first, _ = greedy(engine, cache, engine.forward(cache, prompt(engine)), SPLIT)
    assert first == expected[:SPLIT]
    snap = KVShard.from_cache(cache)  # prompt + the SPLIT - 1 tokens fed back
    store = KVStore("g0-r0", loaded.fingerprint, TierCapacity(device=1 << 20, host=1 << 20), redis_url=redis_url,
                    chunk_bytes=8192)
    store.put("gen", snap)
    assert store.demote("gen").tier == "host"
    assert store.demote("gen").tier == "redis"
    back = store.get("gen")
    assert torch.equal(back.k, snap.k) and torch.equal(back.v, snap.v) and torch.equal(back.positions, snap.positions)
    assert first + continue_from(engine, back, first[-1]) == expected
    store.close()


CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    from ringserve.workers.engine import Engine
    from ringserve.workers.kvstore import KVShard, KVStore, TierCapacity
    from ringserve.workers.loader import load_model

    path, url, ids, split = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    engine = Engine(load_model(path))
    store = KVStore("group1-rank0", engine.loaded.fingerprint, TierCapacity(device=1 << 20, host=1 << 20),
                    redis_url=url, chunk_bytes=8192)
    cache = engine.new_cache(len(ids) + 16)
    logits = engine.forward(cache, ids)                     # prefill: written through
    store.put("survivor", KVShard.from_cache(cache), persist="write_through", expire_at=time.monotonic() + 600)
    toks = []
    for i in range(split):                                  # a turn: appended, written through again
        toks.append(int(torch.argmax(logits.reshape(-1))))
        if i + 1 < split:
            start = cache.length
            logits = engine.forward(cache, [toks[-1]])
            store.append("survivor", KVShard.from_cache(cache, start=start))
    store.flush()
    print(json.dumps(toks), flush=True)
    time.sleep(600)                                         # the group is alive until it is killed
""")


def test_write_through_session_survives_the_loss_of_its_group(tiny, redis_url):
    path, loaded, engine = tiny
    expected = uninterrupted(engine)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), redis_url, json.dumps(prompt(engine)),
                              str(SPLIT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        first = json.loads(line)
    finally:
        child.kill()  # SIGKILL: no clean-up runs in the group
        child.wait(timeout=10)
    assert child.returncode == -9 and first == expected[:SPLIT]
    store = KVStore("group1-rank0", loaded.fingerprint, TierCapacity(device=1 << 20, host=1 << 20),
                    redis_url=redis_url)
    state = store.restore("survivor")
    assert (state.kind, state.tier, state.tokens) == ("resident", "device", PROMPT_LEN + SPLIT - 1)
    shard = store.get("survivor")
    assert shard.meta == {"length": PROMPT_LEN + SPLIT - 1}
    assert first + continue_from(engine, shard, first[-1]) == expected
    store.close()
