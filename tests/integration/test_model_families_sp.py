"""Qwen2, Qwen3, Qwen3-MoE and Mistral-Nemo-shaped tiny models at SP = 2 through the ring path:
the logits and greedy tokens of one device."""

from helpers import TEXT, make_tiny_model, model_greedy, model_logits, rel_err, run_gloo
from ringserve.workers.loader import load_model
from sp_workers import prefill_and_generate

FAMILIES = {
    "qwen2": dict(tie=True, rope_theta=1e7),
    "qwen3": dict(),
    "qwen3_moe": dict(layers=3, mlp_only_layers=[1]),
    "mistral": dict(seed=1),
}


def each_family(rank, world, runs):
    """prefill_and_generate for every (spec, ids, question) on one spawned group (one start-up)."""
    return [prefill_and_generate(rank, world, spec, ids, 32, 37, question) for spec, ids, question in runs]


def test_families_sp2_match_single_device(tmp_path):
    runs, refs = [], []
    for family, kw in sorted(FAMILIES.items()):
        make_tiny_model(tmp_path / family, family, **kw)
        loaded = load_model(tmp_path / family)
        ids = loaded.tokenizer.encode(TEXT)[:83]  # 83 does not divide by 2P; chunks of 37
        question = loaded.tokenizer.encode(" Ring attention")
        runs.append((str(tmp_path / family), ids, question))
        refs.append((family, model_logits(loaded, ids), model_greedy(loaded, ids + question, 32)))
    for rank_results in run_gloo(2, each_family, runs):
        for (family, ref_logits, ref_tokens), r in zip(refs, rank_results):
            assert rel_err(r["logits"], ref_logits) < 1e-4, family
            assert r["greedy"] == ref_tokens, family
