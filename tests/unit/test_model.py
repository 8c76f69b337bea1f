"""Parity of the model and loaders with `transformers` (the reference no one here wrote)."""

import pytest
import torch

from helpers import TEXT, make_tiny_llama, model_greedy, model_logits, rel_err, write_gguf
from ringserve.workers.loader import ModelLoadError, load_model
from ringserve.workers.model import ModelConfig, RopeScaling, rope_inv_freq
from ringserve.workers.sampling import SamplingParams

ROPES = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.fixture(scope="module", params=sorted(ROPES))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    hf = make_tiny_llama(path, rope=ROPES[request.param], sharded=request.param == "llama3",
                         seed=len(request.param))
    return path, hf


def hf_greedy(hf, ids, n):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_tiny_logits_and_greedy_match_transformers(tiny):
    path, hf = tiny
    loaded = load_model(path)
    assert loaded.config.n_kv_heads == 2 and loaded.config.n_heads == 4  # GQA 2:1
    ids = loaded.tokenizer.encode(TEXT)[:97]  # an odd length
    ours = model_logits(loaded, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-4
    greedy = model_greedy(loaded, ids[:40], 32)
    assert greedy == hf_greedy(hf, ids[:40], 32)


def test_safetensors_and_gguf_give_same_logits(tiny, tmp_path):
    path, _ = tiny
    st = load_model(path)
    gg = load_model(write_gguf(path, tmp_path / "tiny.gguf"))
    ids = st.tokenizer.encode(TEXT)[:61]
    assert gg.tokenizer.encode(TEXT)[:61] == ids  # the tokenizer rebuilt from GGUF metadata agrees
    a, b = model_logits(st, ids), model_logits(gg, ids)
    assert rel_err(b, a) < 1e-5  # llama3 RoPE goes through per-frequency divisors in GGUF


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_quantized_gguf_dequantizes_exactly(tiny, tmp_path, qtype):
    """A quantized GGUF loads as the quantize-dequantize image of the original weights."""
    import gguf
    import numpy as np

    path, _ = tiny
    ref = load_model(path)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    with torch.no_grad():  # what quantizing each matrix and reading it back should give
        for name, p in ref.model.named_parameters():
            if p.dim() == 2:
                a = p.numpy()
                p.copy_(torch.from_numpy(np.asarray(gguf.quants.dequantize(gguf.quants.quantize(a, q), q),
                                                    dtype=np.float32).reshape(a.shape)))
    gg = load_model(write_gguf(path, tmp_path / f"tiny-{qtype}.gguf", qtype=qtype))
    ids = ref.tokenizer.encode(TEXT)[:33]
    ours, expected, orig = model_logits(gg, ids), model_logits(ref, ids), model_logits(load_model(path), ids)
    assert rel_err(ours, expected) < 1e-5
    assert rel_err(ours, orig) > 1e-4  # and it really was quantized


def test_tied_embeddings(tmp_path):
    hf = make_tiny_llama(tmp_path, tie=True, n_heads=4, n_kv_heads=1)  # GQA 4:1, tied head
    loaded = load_model(tmp_path)
    assert loaded.config.tie_word_embeddings
    ids = loaded.tokenizer.encode(TEXT)[:29]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert rel_err(model_logits(loaded, ids), ref) < 1e-4


@pytest.mark.parametrize("rope", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "dynamic", "factor": 3.0},
    ROPES["llama3"],
    ROPES["yarn"],
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16,
     "beta_slow": 2, "mscale": 1.2, "mscale_all_dim": 0.8},
])
@pytest.mark.parametrize("seq_len", [100, 1000])
def test_rope_frequencies_match_transformers(rope, seq_len):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64, max_position_embeddings=256,
                         rope_parameters={"rope_theta": 5000.0, **rope})
    ours = ModelConfig(vocab_size=8, dim=128, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=8,
                       head_dim=64, rope_theta=5000.0, rope_scaling=RopeScaling.from_hf(rope),
                       max_position_embeddings=256)
    inv, scale = rope_inv_freq(ours, seq_len)
    t = rope["rope_type"]
    if t == "default":
        ref = 1.0 / (5000.0 ** (torch.arange(0, 64, 2).float() / 64)); ref_scale = 1.0
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[t](hf_cfg, "cpu", seq_len=max(seq_len, 256) if t == "dynamic" else None)
    torch.testing.assert_close(inv, ref.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale)


def test_rope_scaling_rejects_unknown_type():
    with pytest.raises(ValueError, match="unsupported RoPE scaling type 'longrope'"):
        RopeScaling.from_hf({"rope_type": "longrope", "factor": 2.0})


def test_unsupported_model_type(tmp_path):
    make_tiny_llama(tmp_path)
    import json
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not supported"):
        load_model(tmp_path)
