"""Test helpers: tiny checkpoints written in Hugging Face and GGUF formats, tolerances, and the
engine calls tests make (`model_logits`, `model_greedy`) in one place."""

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


def model_logits(loaded, ids) -> torch.Tensor:
    """Logits (T, V) fp32 of every position of a fresh sequence `ids` on one device (P = 1 engine)."""
    from ringserve.workers.engine import ShardEngine

    logits, pos = ShardEngine(loaded).prefill("logits", ids, logits="all")
    out = torch.empty_like(logits)
    out[pos] = logits
    return out


def model_greedy(loaded, ids, n: int, stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """n greedy tokens after `ids` on one device (by default no stop ids: it runs past an end of turn):
    `ids` minus its last token is the session, the last token is the prompt, as `ringserve generate`
    does it."""
    from ringserve.workers.engine import ShardEngine
    from ringserve.workers.sampling import SamplingParams

    assert len(ids) >= 2, "model_greedy needs a session and a prompt: at least 2 tokens"
    eng = ShardEngine(loaded)
    eng.prefill("greedy", ids[:-1])
    return list(eng.generate("greedy", ids[-1:], SamplingParams(max_tokens=n), stop_ids=frozenset(stop_ids)))


def model_check_context(loaded, n_tokens: int) -> None:
    """Raise the engine's refusal (ContextLimitError, naming the limit) if a new session of `n_tokens`
    prompt tokens cannot be served; nothing is computed either way."""
    from ringserve.workers.protocol import ContextLimit

    ContextLimit.of(loaded.config).check_add(0, n_tokens)


def write_tokenizer(path: Path, vocab_size: int, *, style: str = "gpt2") -> None:
    """Train a small byte-level BPE on TEXT and save tokenizer.json + tokenizer_config.json.
    style "gpt2": GPT-2's split (SmolLM2, the tiny Llamas); "qwen2": Qwen's NFC + split with single digits."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    if style == "qwen2":
        from ringserve.workers.tokenizer import QWEN2_SPLIT

        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
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
                    sharded: bool = False, max_positions: int = 256):
    """Write a random tiny Llama checkpoint (HF format, safetensors) and return the HF model (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path, 320)
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    kw = dict(vocab_size=vocab, hidden_size=n_heads * head_dim, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
              max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=tie,
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


# tiny shapes per family: GQA 2:1; qwen3 / qwen3_moe / mistral with head_dim 16 != hidden / heads
TINY_FAMILIES = {
    "qwen2": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96),
    "qwen3": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96),
    "qwen3_moe": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True),
    "mistral": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                    sliding_window=None),
}
_HF_CLASSES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
               "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}


def make_tiny_model(path: Path, family: str, *, seed: int = 0, layers: int = 2, tie: bool = False,
                    rope_theta: float = 1e6, max_positions: int = 256, **config):
    """Write a random tiny checkpoint of `family` (a model_type of TINY_FAMILIES) with transformers'
    own config and model classes, save it as HF safetensors, and return the HF model (fp32).
    `config` overrides or adds config.json keys (e.g. mlp_only_layers, dual_chunk_attention_config)."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path, 320, style="gpt2" if family == "mistral" else "qwen2")
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    cfg_name, model_name = _HF_CLASSES[family]
    kw = dict(TINY_FAMILIES[family], vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=max_positions,
              rms_norm_eps=1e-6, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
              rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    kw.update(config)
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():  # widen the tiny random init so logits differ visibly between tokens
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.normal_(0, 0.2)
            else:  # norms
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path), safe_serialization=True)
    return model


_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}
_GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "mlp.gate": "ffn_gate_inp", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows reordered as llama.cpp's convert_hf_to_gguf.py does for Llama (written out here, not taken
    from the loader under test): HF keeps each head's RoPE halves apart, llama.cpp interleaves them."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(src: Path, dst: Path, *, qtype: str = "F32", arch: str | None = None) -> Path:
    """Convert a tiny HF checkpoint to GGUF the way llama.cpp does: Llama / Mistral as "llama" with
    Q/K rows permuted for its RoPE (checked against transformers' GGUF reader in tests/unit/test_gguf_writer.py), Qwen as stored; MoE experts stacked per layer into
    ffn_{gate,up,down}_exps. `arch` overrides the architecture name written (for error tests)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from safetensors.torch import load_file

    cfg = json.loads((src / "config.json").read_text())
    family = cfg["model_type"]
    permute = _GGUF_ARCH[family] == "llama"
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    w = gguf.GGUFWriter(str(dst), arch or _GGUF_ARCH[family])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    n_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if n_experts:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", False)))
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
    if tk.get("normalizer"):  # the Qwen-style tokenizer of make_tiny_model
        w.add_tokenizer_pre("qwen2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in added else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tk["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}  # (layer, proj) -> expert -> weight
    tensors = {}
    for name, t in sd.items():
        a = t.float().numpy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            if ".experts." in rest:  # mlp.experts.<e>.<proj>.weight
                _, _, e, proj, _ = rest.split(".")
                experts.setdefault((i, proj), {})[int(e)] = a
                continue
            mod, kind = rest.rsplit(".", 1)
            if permute and mod == "self_attn.q_proj":
                a = llama_cpp_permute(a, cfg["num_attention_heads"])
            elif permute and mod == "self_attn.k_proj":
                a = llama_cpp_permute(a, cfg["num_key_value_heads"])
            tensors[f"blk.{i}.{_GGUF_LAYER[mod]}.{kind}"] = a
        else:
            tensors[names[name]] = a
    for (i, proj), by_expert in experts.items():
        tensors[f"blk.{i}.ffn_{proj.split('_')[0]}_exps.weight"] = np.stack([by_expert[e] for e in sorted(by_expert)])
    for gname, a in tensors.items():
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
