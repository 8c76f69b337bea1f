"""The group scheduler batches every running generate into one decode step: each answer is the one it
gets alone (up to numerical ties), at SP = 1 and 2, greedy and seeded."""

import pytest
import torch

from helpers import TEXT, make_tiny_llama, run_gloo
from ringserve.workers.loader import load_model
from sp_workers import batch_vs_solo

TIE = 1e-5  # relative gap of the solo run's top two logits that counts as a numerical tie


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny-sched")
    make_tiny_llama(p, rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    return str(p)


def _sessions(tiny_dir):
    ids = load_model(tiny_dir).tokenizer.encode(TEXT * 3)
    lengths = [23, 150, 61, 97, 8, 130, 45, 77]  # 8 sessions of different lengths
    contexts = [ids[i * 7:i * 7 + n] for i, n in enumerate(lengths)]
    questions = [ids[200 + 3 * i:200 + 3 * i + 2 + i % 3] for i in range(8)]
    return contexts, questions


@pytest.mark.parametrize("P", [1, 2])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 20}], ids=["greedy", "seeded"])
def test_eight_sessions_at_once_answer_as_they_do_alone(tiny_dir, P, sampling, record_property):
    contexts, questions = _sessions(tiny_dir)
    res = run_gloo(P, batch_vs_solo, tiny_dir, contexts, questions, 10, sampling)
    r0 = res[0]
    assert r0["biggest"] == 8  # the scheduler did decode all eight in one batch
    ties = 0
    for i, (solo, batch) in enumerate(zip(r0["solo"], r0["batch"])):
        assert len(solo) == len(batch) == 10
        if solo == batch:
            continue
        j = next(k for k, (a, b) in enumerate(zip(solo, batch)) if a != b)
        v1, v2 = r0["top2"][i][j]
        assert abs(v1 - v2) <= TIE * abs(v1), f"session {i} differs at token {j} without a tie: {v1} vs {v2}"
        ties += 1
    record_property("numerical_ties", ties)
    for r in res[1:]:  # every rank saw the same tokens
        assert r["batch"] == r0["batch"] and r["solo"] == r0["solo"]
    assert r0["lengths"] == [len(c) for c in contexts]  # nothing was retained
