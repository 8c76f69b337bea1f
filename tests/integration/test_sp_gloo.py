"""Sequence parallelism as processes joined by gloo: same logits and tokens as one device."""

import pytest
import torch

from helpers import TEXT, make_tiny_llama, model_greedy, model_logits, rel_err, run_gloo
from ringserve.workers.loader import load_model
from ringserve.workers.sampling import SamplingParams
from sp_workers import prefill_and_generate


def reference(spec, ids, question, n):
    loaded = load_model(spec)
    return model_logits(loaded, ids), model_greedy(loaded, ids + question, n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny-sp")
    make_tiny_llama(p, rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    return str(p)


@pytest.mark.parametrize("P,chunk", [(2, 1000), (2, 37), (4, 41)])
def test_tiny_model_sp_matches_single_device(tiny_dir, P, chunk):
    tok = load_model(tiny_dir).tokenizer
    ids = tok.encode(TEXT)[:123]  # 123 does not divide by 2P
    question = tok.encode(" Ring attention")
    ref_logits, ref_tokens = reference(tiny_dir, ids, question, 32)
    results = run_gloo(P, prefill_and_generate, tiny_dir, ids, 32, chunk, question)
    for r in results:
        assert rel_err(r["logits"], ref_logits) < 1e-4
        assert r["greedy"] == ref_tokens
        assert r["progress"][-1] == (len(ids), len(ids))
        assert len(r["progress"]) == -(-len(ids) // chunk)  # one event per chunk
        # chunked prefill: a rank never holds activations for more than its share of one chunk
        assert r["max_rows"] <= 2 * -(-min(chunk, len(ids)) // (2 * P))
    # generation did not retain the turn; the shards still cover the prompt exactly once
    assert sum(r["local_tokens"] for r in results) == len(ids)
    assert max(r["local_tokens"] for r in results) - min(r["local_tokens"] for r in results) <= 2 * -(-len(ids) // chunk)


@pytest.mark.slow
@pytest.mark.parametrize("P", [2])  # P = 4 on the tiny model above (the default model at P = 4: 50 s of CI)
def test_default_model_sp_matches_single_device(P):
    tok = load_model("default").tokenizer
    msgs = [{"role": "user", "content": "Summarise: " + TEXT[:400]}]
    ids = tok.encode_chat(msgs)
    if len(ids) % (2 * P) == 0:
        ids = ids[1:]
    question = tok.encode("Answer briefly.")
    ref_logits, ref_tokens = reference("default", ids, question, 32)
    results = run_gloo(P, prefill_and_generate, "default", ids, 32, 64, question)
    for r in results:
        assert rel_err(r["logits"], ref_logits) < 1e-4
        assert r["greedy"] == ref_tokens
