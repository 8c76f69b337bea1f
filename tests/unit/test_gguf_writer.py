"""The tiny GGUF files the loader tests read are checked here by an independent reader: `transformers`
loads each one (its own GGUF reader, its own inverse of llama.cpp's Q/K reorder) and must give the logits
of the Hugging Face checkpoint it was written from. Without this, `helpers.write_gguf` and the loader
could share one mistake (a wrong Q/K permutation written and undone the same way) and every
safetensors-vs-GGUF test would still pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TEXT, make_tiny_llama, make_tiny_model, rel_err, write_gguf

CASES = {  # name: (builder, kwargs); families transformers reads from GGUF
    "llama_gqa": (make_tiny_llama, dict(seed=3)),
    "llama_mha": (make_tiny_llama, dict(seed=4, n_heads=4, n_kv_heads=4)),
    # mistral (written as "llama") with its head_dim 16 != hidden / heads: transformers' GGUF reader ignores
    # attention.key_length, so it cannot be the oracle there; the llama cases check the same reorder
    "mistral": (make_tiny_model, dict(family="mistral", seed=1, hidden_size=64)),
    "qwen2": (make_tiny_model, dict(family="qwen2", seed=2)),
    # qwen3 / qwen3_moe are left out: transformers' GGUF reader takes their head_dim as 128 whatever
    # attention.key_length says; they are not permuted, and qwen2 checks the tensor names they share
}


def hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("name", sorted(CASES))
def test_transformers_reads_the_written_gguf_as_the_checkpoint(name, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    build, kw = CASES[name]
    src = tmp_path / "hf"
    hf = build(src, **kw)
    path = write_gguf(src, tmp_path / f"{name}.gguf")
    gg = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(TEXT).ids[:57]
    ref, got = hf_logits(hf, ids), hf_logits(gg, ids)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-5, rel_err(got, ref)


def test_the_writers_qk_reorder_is_llama_cpps():
    """The permutation write_gguf applies, on a matrix whose rows say where they came from: llama.cpp's
    convert_hf_to_gguf.py interleaves the two RoPE halves of each head (row i of the first half, then row i
    of the second)."""
    from helpers import llama_cpp_permute

    n_heads, head_dim = 2, 8
    w = np.arange(n_heads * head_dim, dtype=np.float32)[:, None]
    got = llama_cpp_permute(w, n_heads)[:, 0].astype(int).tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
