"""Test helpers: tiny checkpoints written in Hugging Face and GGUF formats, and tolerances."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ringserve.kernels._common import HAS_TRITON, interpreting

TEXT = ("The quick brown fox jumps over the lazy dog. Ring attention passes keys and values around a ring "
        "of devices while each computes attention for its own queries. ") * 4


# the Triton kernels themselves, run by the interpreter on the CPU (what `make test` does)
needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and interpreting()), reason="Triton kernels on CPU need TRITON_INTERPRET=1 (set by `make test`)"
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference b."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """Train a small byte-level BPE on TEXT and save tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([TEXT] * 20, trainer)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))


def make_tiny_llama(path: Path, *, rope: dict | None = None, tie: bool = False, seed: int = 0,
                    n_heads: int = 4, n_kv_heads: int = 2, head_dim: int = 16, layers: int = 2,
                    sharded: bool = False):
    """Write a random tiny Llama checkpoint (HF format, safetensors) and return the HF model (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path, 320)
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    kw = dict(vocab_size=vocab, hidden_size=n_heads * head_dim, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
              max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
              bos_token_id=1, eos_token_id=2)
    if rope:
        kw["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    cfg = LlamaConfig(**kw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random init is tiny; widen it so logits differ visibly between tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            else:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path), safe_serialization=True, max_shard_size="20KB" if sharded else "5GB")
    return model


def write_gguf(src: Path, dst: Path, *, qtype: str = "F32", arch: str = "llama") -> Path:
    """Convert a tiny HF checkpoint to GGUF the way llama.cpp does (Q/K rows permuted for its RoPE)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from safetensors.torch import load_file

    from ringserve.workers.loader import permute_rope

    cfg = json.loads((src / "config.json").read_text())
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    w = gguf.GGUFWriter(str(dst), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope.get("rope_type") == "llama3":  # llama.cpp stores llama3 scaling as per-frequency divisors
        from ringserve.workers.loader import config_from_hf
        from ringserve.workers.model import rope_inv_freq
        from dataclasses import replace
        ours = config_from_hf(cfg)
        base, _ = rope_inv_freq(replace(ours, rope_scaling=type(ours.rope_scaling)()))
        scaled, _ = rope_inv_freq(ours)
        w.add_tensor("rope_freqs.weight", (base / scaled).numpy().astype(np.float32))
    tk = json.loads((src / "tokenizer.json").read_text())
    vocab = sorted(tk["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["content"] for t in tk.get("added_tokens", [])}
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in added else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tk["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in sd.items():
        a = t.float().numpy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            mod = rest.rsplit(".", 1)[0]
            if mod == "self_attn.q_proj":
                a = permute_rope(a, cfg["num_attention_heads"])
            elif mod == "self_attn.k_proj":
                a = permute_rope(a, cfg["num_key_value_heads"])
            gname = f"blk.{i}.{per_layer[mod]}.weight"
        else:
            gname = names[name]
        if a.ndim == 2 and qtype != "F32":
            q = getattr(Q, qtype)
            w.add_tensor(gname, gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# ------------------------------------------------------------------ sequence-parallel process groups

def run_gloo(world: int, fn, *args, timeout: float = 600.0):
    """fn(rank, world, *args) on `world` spawned processes joined by gloo; results by rank."""
    from ringserve.workers.procgroup import run_group

    return run_group(world, fn, *args, timeout=timeout)


def free_port_here() -> int:
    from ringserve.workers.procgroup import free_port

    return free_port()
