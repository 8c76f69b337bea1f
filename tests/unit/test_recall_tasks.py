"""The RULER-style tasks of `ringserve bench recall`: generated deterministically from the seed, as long as
asked in the served model's tokens, with their needles where asked and every reference in the context;
RULER's substring scoring; the KV format names the command, the SDK and the Gateway accept."""

import pytest

from ringserve.cluster.recall import TASKS, counter, make_sample, score
from ringserve.workers.protocol import FormatSpecError, KVFormat


@pytest.fixture(scope="module")
def count():
    return counter("default")


@pytest.mark.parametrize("task", TASKS)
def test_tasks_are_seeded_sized_and_hold_their_answers(task, count):
    a = make_sample(task, 1024, 0.5, 0, count)
    assert a == make_sample(task, 1024, 0.5, 0, count)  # deterministic
    assert make_sample(task, 1024, 0.5, 1, count).context != a.context
    assert make_sample(task, 1024, 0.5, 0, count, seed=7).context != a.context
    n = count(a.context)
    assert 0.85 * 1024 <= n <= 1024, n  # the chat template's few tokens on top stay within the length
    assert a.questions and all(q.references for q in a.questions)
    for q in a.questions:
        assert all(r in a.context for r in q.references)
        assert score(" ".join(q.references).upper(), q.references) == 1.0
    if task == "cwe":  # the ten common words are the most frequent ones
        words = [line.split(". ", 1)[1] for line in a.context.splitlines()[1:]]
        top = sorted(set(words), key=words.count, reverse=True)[:10]
        assert set(top) == set(a.questions[0].references)


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_the_needle_sits_at_its_depth(depth, count):
    s = make_sample("niah_single", 2048, depth, 0, count)
    at = s.context.index(s.questions[0].references[0]) / len(s.context)
    assert abs(at - depth) < 0.05, at


def test_score_is_the_fraction_of_references_found():
    refs = ("1234567", "7654321", "abc-river", "9")
    assert score("The numbers: 1234567 and ABC-River", refs) == 0.5
    assert score("", refs) == 0.0
    assert score("7654321, 1234567, abc-river, 9", refs) == 1.0


@pytest.mark.parametrize("text,name,frac,canonical", [
    (None, "exact", None, "exact"), ("exact", "exact", None, "exact"), ("FP8", "fp8", None, "fp8"),
    ("int4", "int4", None, "int4"), ("keep:0.3", "keep", 0.3, "keep:0.3"), (" keep:0.25 ", "keep", 0.25, "keep:0.25"),
])
def test_format_names(text, name, frac, canonical):
    f = KVFormat.parse(text)
    assert (f.name, f.keep_fraction, str(f)) == (name, frac, canonical)
    assert KVFormat.parse(str(f)) == f


@pytest.mark.parametrize("text,why", [("fp16", "unknown KV format"), ("keep", "fraction of tokens"),
                                      ("keep:0", "within"), ("keep:1", "within"), ("keep:-0.2", "within"),
                                      ("keep:lots", "not a number"), ("int4:0.5", "only with it")])
def test_bad_format_names_are_invalid_arguments(text, why):
    with pytest.raises(FormatSpecError, match=why) as e:
        KVFormat.parse(text)
    assert e.value.grpc_code == "INVALID_ARGUMENT"
