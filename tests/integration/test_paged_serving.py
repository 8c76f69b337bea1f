"""The served path is the benchmarked path: a session built the way the service builds it (a create in
several prefill chunks, appends, retained turns) equals one prefill of the same tokens, at SP = 1, 2 and
4, with KV kept in place in pages; a long create runs the ring on every chunk."""

import pytest
import torch

from helpers import TEXT, make_tiny_llama, needs_triton, rel_err, run_gloo
from ringserve.workers.loader import load_model
from sp_workers import long_create_modes, service_path_session

ANSWER = 6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny-paged")
    make_tiny_llama(p, rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    return str(p)


@pytest.mark.parametrize("P", [1, 2, 4])
def test_service_path_equals_one_prefill_and_keeps_kv_in_place(tiny_dir, P):
    tok = load_model(tiny_dir).tokenizer
    ids = tok.encode(TEXT * 2)
    # lengths that divide evenly by neither pages (8), prefill chunks (37) nor 2P
    context, more, turn, more2, question = ids[:123], ids[123:152], ids[152:157], ids[157:218], ids[218:221]
    res = run_gloo(P, service_path_session, tiny_dir, (context, more, turn, more2, question), 37, 8, ANSWER)
    r0 = res[0]
    tokens, full = r0["tokens"], r0["full"]
    # the create: one progress event per chunk, every chunk with the ring
    assert r0["progress"] == [(min(37 * i, 123), 123) for i in range(1, 5)]
    assert r0["create_modes"] == ["ring"] * 4
    svc_modes = [m for s, m in r0["modes"] if s == "svc"]
    # create; append; the retained turn's prompt (pass-Q); the second append; the question (decode steps are
    # batches, not prefill chunks)
    assert svc_modes == ["ring"] * 4 + ["ring"] + ["replicated"] + ["ring"] * 2 + ["replicated"]
    for r in res:
        assert r["length"] == len(tokens) and r["after_create"] == len(context)
        # logits after each append equal one prefill's at that position
        assert rel_err(r["logits_more"][0], full[len(context) + len(more) - 1]) < 1e-4
        assert rel_err(r["logits_more2"][0], full[-1]) < 1e-4
        # the retained turn's greedy answer is what one prefill's logits choose
        start = len(context) + len(more) + len(turn) - 1
        assert r["answer"] == [int(full[start + i].argmax()) for i in range(ANSWER)]
        assert r["asked"] == r["ref_asked"]
        # in place: an append of n tokens writes the K/V of this rank's share of them and copies nothing
        assert r["append_written"] == r["append_local"] * r["token_bytes"]
        assert r["append_copied"] == 0
        assert r["append_pages"] <= -(-r["append_local"] // r["block"]) + 1
        # answering the retained session: pages only for the question and answer, nothing copied, all freed
        assert r["ask_copied"] == 0
        assert r["ask_pages"] <= -(-(len(question) + ANSWER) // r["block"]) + 1
        assert r["free_after_ask"] == r["free_before_ask"]
    assert sum(r["append_local"] for r in res) == len(more)


def test_long_create_runs_the_ring_on_every_chunk(tmp_path):
    """40K tokens at SP = 2 on a tiny long-context model: pass-KV for every chunk (the engine's record)."""
    make_tiny_llama(tmp_path, n_heads=2, n_kv_heads=1, head_dim=16, layers=1, max_positions=65536)
    n, chunk = 40_000, 8192
    res = run_gloo(2, long_create_modes, str(tmp_path), n, chunk, timeout=900)
    for r in res:
        assert [m for m, _, _ in r["modes"]] == ["ring"] * 5
        assert [(t, c) for _, t, c in r["modes"]] == [(min(chunk, n - c), c) for c in range(0, n, chunk)]
        assert r["progress"][-1] == (n, n) and len(r["progress"]) == 5
        assert r["ring_steps"] == 5 * 1  # one transfer per chunk per layer at P = 2 (P - 1 steps)
    assert sum(r["local"] for r in res) == n


@needs_triton
def test_engine_on_the_paged_triton_kernel_matches_the_cpu_path(tmp_path):
    """The same session through the paged Triton kernel (CPU interpreter) and through the CPU path."""
    from ringserve.workers.engine import ShardEngine
    from ringserve.workers.sampling import SamplingParams

    make_tiny_llama(tmp_path, n_heads=4, n_kv_heads=2, head_dim=32, layers=1)
    loaded = load_model(tmp_path)
    ids = loaded.tokenizer.encode(TEXT)[:70]
    out = {}
    for backend in ("auto", "triton"):
        eng = ShardEngine(loaded, prefill_chunk=23, block=8, attn_backend=backend)
        eng.prefill("s", ids[:50])  # three chunks: the later ones read the context through pages
        logits = eng.append("s", ids[50:53])  # pass-Q against the pages, per-query lengths
        toks = list(eng.generate("s", ids[53:54], SamplingParams(max_tokens=5), stop_ids=frozenset()))
        out[backend] = (logits, toks, [m.mode for m in eng.modes])
    assert out["auto"][2] == out["triton"][2] and "replicated" in out["auto"][2]
    assert rel_err(out["triton"][0], out["auto"][0]) < 1e-4
    assert out["triton"][1] == out["auto"][1]
